"""The model's buffers kept across a forward pass, so that a call that fails changes nothing.

A forward pass in training changes some buffers: BatchNorm's running statistics and its
count (counted even for a batch it then refuses), in place; a module may also replace one
(`self.count = self.count + 1`). A Forward or TrainStep that fails after that must leave them
as they were, as it leaves everything else.

Copying every buffer before every pass is what that takes at its simplest, and what a model
with a large constant buffer (a 64 MiB causal mask) cannot pay: its Forward went from 8 ms
to 70 ms (found by a review). So a buffer up to ALWAYS_COPIED_BYTES is copied each pass, and
a larger one only once a pass has been seen to change it (its version counter moved, or the
module replaced it): a mask or a table is never copied, and a large buffer that does change
is from its second pass on. The first pass that changes a large buffer cannot put it back
if it fails; the log says so. BatchNorm's kernel updates its running statistics without
moving their version counters, so a norm layer's buffers (BatchNorm's, InstanceNorm's) are
copied whatever their size; a large buffer another such kernel changes is not seen to.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Buffers up to this size are copied before every forward pass.
ALWAYS_COPIED_BYTES = 1 << 20
#: The modules whose buffers are copied before every pass whatever their size: BatchNorm
#: and InstanceNorm, whose running statistics change with no version counter moving.
_NORMS = nn.modules.batchnorm._NormBase


@dataclass
class Kept:
    """One buffer as a pass found it: where it was, its version counter, and a copy of it
    (None for a large one not yet seen to change)."""

    module: nn.Module
    key: str
    tensor: torch.Tensor
    version: int
    copy: torch.Tensor | None


class Buffers:
    """The buffers of one model, kept before each pass and put back after a failed one."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = [m for m in model.modules()]
        #: Large buffers a pass has been seen to change, by id; held weakly, so that one a
        #: module replaces each pass leaves no entry behind.
        self._changing: weakref.WeakValueDictionary[int, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )

    def keep(self) -> list[Kept]:
        """Each buffer as it is now: the record `put_back` and `learn` take. Empty, and
        nearly free, for a model without buffers (Simple)."""
        kept = []
        for module in self._modules:
            for key, tensor in module._buffers.items():
                if tensor is None:
                    continue
                copied = (
                    tensor.numel() * tensor.element_size() <= ALWAYS_COPIED_BYTES
                    or isinstance(module, _NORMS)
                    or self._seen_changing(tensor)
                )
                copy = tensor.clone() if copied else None
                kept.append(Kept(module, key, tensor, tensor._version, copy))
        return kept

    def learn(self, kept: list[Kept]) -> None:
        """Notes the large buffers the pass since `keep` changed: copied from now on."""
        for k in kept:
            now = k.module._buffers.get(k.key)
            if k.copy is None and (now is not k.tensor or k.tensor._version != k.version):
                for changed in (k.tensor, now):
                    if changed is not None:
                        self._changing[id(changed)] = changed

    def put_back(self, kept: list[Kept]) -> None:
        """The buffers as `keep` found them: each in its place again (a module may have
        replaced it), its values from the copy. On a device that failed the copies fail
        too: the failure at hand is the one to answer, so this one is logged."""
        self.learn(kept)
        try:
            with torch.no_grad():
                for k in kept:
                    if k.module._buffers.get(k.key) is not k.tensor:
                        k.module._buffers[k.key] = k.tensor
                    if k.copy is not None:
                        # Whatever its version counter says: BatchNorm's kernel updates its
                        # statistics in place without moving it.
                        k.tensor.copy_(k.copy)
                    elif k.tensor._version != k.version:
                        log.warning(
                            "buffer %r changed in a failed forward pass and could not be put "
                            "back: it is not copied before a pass until one has changed it",
                            k.key,
                        )
        except Exception as err:
            log.warning("the model's buffers could not be put back after a failure: %s", err)

    def _seen_changing(self, tensor: torch.Tensor) -> bool:
        return self._changing.get(id(tensor)) is tensor
