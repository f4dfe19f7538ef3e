"""The model's buffers kept across a forward pass, so that a call that fails changes nothing.

A forward pass in training changes some buffers: BatchNorm's running statistics and its
count (counted even for a batch it then refuses), in place; a module may also replace one
(`self.count = self.count + 1`). A Forward or TrainStep that fails after that must leave them
as they were, as it leaves everything else.

Copying every buffer before every pass is what that takes at its simplest, and what a model
with a large constant buffer (a 64 MiB causal mask) cannot pay: its Forward went from 8 ms
to 70 ms (found by a review). So:

- a buffer up to ALWAYS_COPIED_BYTES, and a norm layer's whatever its size, is copied before
  every pass;
- a larger one is copied before its first LEARNING_PASSES passes, and compared after each
  (values and version counter). Found unchanged by all of them, it is taken for a constant
  (a mask, a table) and copied no more; changed by any, it is copied before every pass from
  then on. A constant seen changing later (its version counter moved) is copied from its
  next pass on; that pass itself, if it fails, cannot put it back, and the log says so.
  One the module replaces needs no copy: the pass left its values be, and putting it back
  in its place is enough; its successor is learnt as a new buffer.

Version counters alone do not tell: BatchNorm's kernel updates its statistics without moving
them, and so does a write through `.data` (an EMA's `self.usage.data.mul_(0.9)`, which a review
found changed by a refused call). An inference tensor (made under torch.inference_mode) has
no version counter and cannot be changed in place outside that mode: only its place is kept.

A pass may also make a layer (one built when first needed, with buffers of its own): a failed
pass takes away the layers it added, as it takes away the buffers it registered, and puts
back one it replaced; a layer a pass that succeeded made is kept, and its buffers from then
on, for each pass walks the modules the model has at its start.
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
#: The passes a larger buffer is copied before, and compared after, to learn whether any
#: pass changes it.
LEARNING_PASSES = 2
#: The modules whose buffers are copied before every pass whatever their size: BatchNorm
#: and InstanceNorm, whose running statistics change with no version counter moving.
_NORMS = nn.modules.batchnorm._NormBase


def _always_copied(module: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether a buffer is copied before every pass, whatever the passes show: a small one,
    or a norm layer's."""
    small = tensor.numel() * tensor.element_size() <= ALWAYS_COPIED_BYTES
    return small or isinstance(module, _NORMS)


@dataclass
class Kept:
    """One buffer as a pass found it: where it was, its version counter (None for an
    inference tensor), and a copy of it (None for one not copied)."""

    module: nn.Module
    key: str
    tensor: torch.Tensor
    version: int | None
    copy: torch.Tensor | None


#: A module without buffers, as `Before.names` notes it.
_NONE: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())


@dataclass
class Before:
    """The buffers as one pass found them: each one `Kept`, and, for each of the model's
    modules then, its buffer names, in order, and those of them not persistent, so that
    one the pass registers can be taken away and one it deletes put back as it was, and its
    layers (None for a module without any), so that one the pass adds can be taken away."""

    kept: list[Kept]
    modules: list[nn.Module]
    names: list[tuple[tuple[str, ...], tuple[str, ...]]]
    layers: list[dict[str, nn.Module | None] | None]


def _modules(model: nn.Module) -> list[nn.Module]:
    """The model's modules, each once, as `model.modules()` gives them but breadth first:
    a pass starts with this walk, and torch's takes half as long again (names made and
    thrown away: 3.9 us against 2.4 us for Simple's four)."""
    found = [model]
    seen = {id(model)}
    for module in found:  # grows as it goes
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


@dataclass
class _Learnt:
    """What the passes so far showed of one large buffer."""

    tensor: weakref.ref[torch.Tensor]
    unchanged: int = 0  # passes that left it as it was
    changing: bool = False


class Buffers:
    """The buffers of one model, kept before each pass and put back after a failed one."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        #: Large buffers by id, with what the passes showed of them; an entry whose tensor
        #: has gone (a module replaced it) is dropped when a new one takes its place.
        self._large: dict[int, _Learnt] = {}

    def keep(self) -> Before:
        """Each buffer as it is now: the record `put_back` and `learn` take. Nearly free for
        a model without buffers (Simple)."""
        kept: list[Kept] = []
        modules = _modules(self._model)
        names: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        layers = [dict(m._modules) if m._modules else None for m in modules]
        for module in modules:
            found = module._buffers
            hidden = module._non_persistent_buffers_set
            names.append((tuple(found), tuple(hidden) if hidden else ()) if found else _NONE)
            for key, tensor in found.items():
                if tensor is None:
                    continue
                if tensor.is_inference():
                    kept.append(Kept(module, key, tensor, None, None))
                    continue
                copied = _always_copied(module, tensor) or not self._constant(tensor)
                copy = tensor.clone() if copied else None
                kept.append(Kept(module, key, tensor, tensor._version, copy))
        return Before(kept, modules, names, layers)

    def learn(self, before: Before) -> None:
        """Notes, for each large buffer, whether the pass since `keep` changed it."""
        kept = before.kept
        for k in kept:
            if k.version is None or _always_copied(k.module, k.tensor):
                continue  # nothing to learn: an inference tensor, or one copied every pass
            if k.module._buffers.get(k.key) is not k.tensor:
                # Replaced: put back by its place alone, as the pass left its values be. Its
                # successor, a tensor not seen before, is copied until its own passes are
                # learnt (a buffer replaced every pass is copied every pass).
                continue
            learnt = self._learnt(k.tensor)
            if learnt.changing:
                continue  # copied before every pass: nothing more to learn
            changed = k.tensor._version != k.version
            if not changed and k.copy is not None:
                changed = not torch.equal(k.copy, k.tensor)
            if changed:
                learnt.changing = True
            else:
                learnt.unchanged += 1
        if len(self._large) > 2 * len(kept) + 16:  # tensors replaced pass after pass
            self._large = {i: v for i, v in self._large.items() if v.tensor() is not None}

    def put_back(self, before: Before) -> None:
        """The buffers as `keep` found them: each in its place again (a module may have
        replaced it), its values from the copy, and none the pass registered (a cache made
        when first needed: left behind, a failed call would have changed the model's state,
        and its checkpoints); the layers too, none the pass added. On a device that failed
        the copies fail too: the failure at hand is the one to answer, so this one is
        logged."""
        for module, layers, (names, hidden) in zip(
            before.modules, before.layers, before.names, strict=True
        ):
            children, wanted = module._modules, layers or {}
            if list(children.items()) != list(wanted.items()):  # in order; layers by identity
                children.clear()
                children.update(wanted)
            if tuple(module._buffers) != names:
                now = dict(module._buffers)
                module._buffers.clear()
                for key in names:  # in their order; one deleted gets its tensor back below
                    module._buffers[key] = now.get(key)
            if module._non_persistent_buffers_set != set(hidden):
                module._non_persistent_buffers_set.clear()
                module._non_persistent_buffers_set.update(hidden)
        try:
            with torch.no_grad():
                for k in before.kept:
                    if k.module._buffers.get(k.key) is not k.tensor:
                        k.module._buffers[k.key] = k.tensor
                    if k.copy is not None:
                        # Whatever its version counter says: BatchNorm's kernel updates its
                        # statistics in place without moving it.
                        k.tensor.copy_(k.copy)
                    elif k.version is not None and k.tensor._version != k.version:
                        self._learnt(k.tensor).changing = True  # copied from its next pass
                        log.warning(
                            "buffer %r changed in a failed forward pass and could not be put "
                            "back: a large buffer no pass had changed before is not copied",
                            k.key,
                        )
        except Exception as err:
            log.warning("the model's buffers could not be put back after a failure: %s", err)

    def _constant(self, tensor: torch.Tensor) -> bool:
        """Whether a large buffer is taken for a constant: unchanged by its first passes."""
        learnt = self._large.get(id(tensor))
        if learnt is None or learnt.tensor() is not tensor:
            return False
        return not learnt.changing and learnt.unchanged >= LEARNING_PASSES

    def _learnt(self, tensor: torch.Tensor) -> _Learnt:
        learnt = self._large.get(id(tensor))
        if learnt is None or learnt.tensor() is not tensor:
            learnt = self._large[id(tensor)] = _Learnt(weakref.ref(tensor))
        return learnt
