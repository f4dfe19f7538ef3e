"""numpy basic indexing applied to torch tensors on their device, with errors a person can act on.

torch refuses negative slice steps, which numpy allows; reads take them by narrowing to the
selected span and flipping it. Writes need a view of the original, so they refuse them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradwire.codec import MAX_DIMS, IndexItem, format_index
from gradwire_server.errors import IndexOutOfRange, InvalidInput

IndexChain = Sequence[tuple[IndexItem, ...]]


def _expand(
    key: tuple[IndexItem, ...], shape: Sequence[int], label: Callable[[], str]
) -> list[IndexItem]:
    ndim = len(shape)
    consumed = sum(1 for item in key if item is not None and item is not Ellipsis)
    if consumed > ndim:
        # "it has 0 dimension(s) but 1 were indexed" left a person to work out that the
        # selection was already one value (found by a newcomer's walkthrough).
        has = (
            "it is one value (no dimensions left to index)"
            if ndim == 0
            else f"it has {ndim} dimension{'s' * (ndim != 1)}, shape {list(shape)}"
        )
        given = "1 index was" if consumed == 1 else f"{consumed} indices were"
        raise InvalidInput(
            f"too many indices for {label()}: {has}, and {given} given",
            reason="TOO_MANY_INDICES",
        )
    if Ellipsis not in key:
        return list(key)
    at = key.index(Ellipsis)
    fill: list[IndexItem] = [slice(None)] * (ndim - consumed)
    return [*key[:at], *fill, *key[at + 1 :]]


def _apply(
    tensor: torch.Tensor, key: tuple[IndexItem, ...], label: Callable[[], str], *, writable: bool
) -> torch.Tensor:
    out = tensor
    dim = 0  # position in `out`
    source_dim = 0  # position in `tensor`, for messages
    for item in _expand(key, tensor.shape, label):
        if item is None:
            if out.dim() >= MAX_DIMS:
                # torch would go on; numpy, and so every reply, stops at 64.
                raise InvalidInput(
                    f"{label()}: new axes would give the selection more than {MAX_DIMS} "
                    "dimensions, the most a tensor can have",
                    reason="BAD_INDEX",
                )
            out = out.unsqueeze(dim)
            dim += 1
            continue
        size = out.shape[dim]
        if isinstance(item, slice):
            start, stop, step = item.indices(size)
            # A step beyond the dimension's size selects what a step of its size does (at
            # most `start`); torch would multiply it into a stride that overflows int64.
            limit = max(size, 1)
            step = max(-limit, min(step, limit))
            if step > 0:
                out = out[(slice(None),) * dim + (slice(start, stop, step),)]
            else:
                if writable:
                    raise InvalidInput(
                        f"{label()}: negative slice steps can be read but not written; "
                        "write the span with a positive step instead",
                        reason="NEGATIVE_STEP_WRITE",
                    )
                span = range(start, stop, step)
                if len(span) == 0:
                    out = out.narrow(dim, 0, 0)
                else:
                    low = span[-1]
                    out = out.narrow(dim, low, span[0] - low + 1)
                    out = out[(slice(None),) * dim + (slice(None, None, -step),)].flip(dim)
            dim += 1
        else:
            assert isinstance(item, int)  # _expand replaced the ellipsis
            if not -size <= item < size:
                raise IndexOutOfRange(
                    f"index {item} is out of range for dimension {source_dim} of {label()} "
                    f"(size {size}; valid: {-size} to {size - 1})",
                    metadata={"index": str(item), "dimension": str(source_dim), "size": str(size)},
                )
            out = out.select(dim, item)
        source_dim += 1
    return out


def select(
    tensor: torch.Tensor, chain: IndexChain, name: str, *, writable: bool = False
) -> torch.Tensor:
    """tensor[chain[0]][chain[1]]..., computed where the tensor lives.

    With `writable`, the result is always a view of `tensor`, so writing to it writes the
    tensor; chains that cannot give one are refused.
    """
    out = tensor
    for position, key in enumerate(chain):
        # Named only when an error needs it: formatting costs more than indexing.
        label = functools.partial(lambda p: name + format_index(chain[:p]), position)
        out = _apply(out, key, label, writable=writable)
    return out


#: A node's name is cut to this many bytes on the wire (GetTensorResponse.grad_fn): PyTorch's
#: own are shorter ("ScaledDotProductFlashAttentionForCpuBackward0" is 45), and a custom
#: autograd Function's class could be named at any length.
MAX_GRAD_FN_BYTES = 64
#: Slice steps up to this, and starts and stops within this, are indexed as written to name
#: the node (`autograd_of`); others are named from `select`'s own indexing, which clamps them
#: (torch warned of truncating a start of -2**63, and a step of 2**62 overflowed a stride).
_WRITTEN_STEP_MAX = 1024
_WRITTEN_BOUND_MAX = 2**62


@dataclass(frozen=True)
class Autograd:
    """What PyTorch's print of a selection shows of autograd, in grad mode: whether it
    requires grad, the name of the node that made it (`grad_fn=<SelectBackward0>`; "" for a
    leaf or an untracked tensor), and whether it is a parameter itself, which prints as
    "Parameter containing:" (GetTensorResponse)."""

    requires_grad: bool = False
    grad_fn: str = ""
    whole_parameter: bool = False

    def get(self) -> Autograd:
        """Itself: known already (AutogradOf works it out when asked)."""
        return self


UNTRACKED = Autograd()


def own_autograd(tensor: torch.Tensor) -> Autograd:
    """What a print of all of `tensor` shows of autograd, read now: kept for a tensor the
    server holds detached (a module's output, once its pass is over), which then has none."""
    return Autograd(
        tensor.requires_grad, _node_name(tensor), isinstance(tensor, torch.nn.Parameter)
    )


class AutogradOf:
    """What PyTorch's print of tensor[chain...] shows of autograd, worked out when asked
    (`get`, under the trainer's lock, which holds `tensor` as it was): a read that sends it
    asks; a Watch and statistics, which send none, do not pay for it (7.5 us for a slice
    of a parameter, about as much as the slice itself). `own`: all of the tensor's
    (`own_autograd`), where `tensor` is a detached copy that has lost it."""

    __slots__ = ("_chain", "_own", "_tensor")

    def __init__(
        self, tensor: torch.Tensor, chain: IndexChain, own: Autograd | None = None
    ) -> None:
        self._tensor = tensor
        self._chain = chain
        self._own = own

    def get(self) -> Autograd:
        return autograd_of(self._tensor, self._chain, self._own)


def autograd_of(tensor: torch.Tensor, chain: IndexChain, own: Autograd | None = None) -> Autograd:
    """What `print(tensor[chain[0]][chain[1]]...)` shows of autograd in PyTorch, for a chain
    that `select` has taken already. `own`: what a print of all of the tensor shows
    (`own_autograd`), where `tensor` has lost it (detached); else read from `tensor`.

    A whole tensor shows its own node. A selection shows its indexing's last node, named by
    indexing as a script writes the index (a key of one item as that item, `w[:]`, not
    `w[(:,)]`), for torch names the node by the path its indexing takes: `w[:]` is
    SliceBackward0 but `w[(slice(None),)]` AliasBackward0, and `w[0, :]` SelectBackward0
    where `select`, one dimension at a time, would make an AliasBackward0 last. Views only,
    of the live tensor where it has its autograd. Where it has not, or torch refuses the
    chain (a negative step, which `select` reads by flipping) or fails on it (a view a
    model made without grad and changed in place cannot be indexed in grad mode), a
    stand-in on the meta device is indexed instead, with `select` for a chain torch
    refuses (FlipBackward0 where the flip comes last): its shape and strides, no data.
    `select` of the live tensor made a second copy of a flipped selection only to name it,
    and the view's refusal failed the read (found by a review)."""
    live = own is None
    if own is None:
        if not tensor.requires_grad:  # the common case, at once: a gradient, the input
            frozen = not chain and isinstance(tensor, torch.nn.Parameter)
            return Autograd(whole_parameter=True) if frozen else UNTRACKED
        if not chain:
            return own_autograd(tensor)  # a whole tensor: its own node
    elif not chain:
        return own if own.requires_grad or own.whole_parameter else UNTRACKED
    elif not own.requires_grad:
        return UNTRACKED
    written = all(_as_written(key) for key in chain)
    with torch.enable_grad():
        out = _indexed_as_written(tensor, chain) if live and written else None
        if out is None:
            stand_in = torch.empty_strided(
                tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta"
            ).requires_grad_()
            out = _indexed_as_written(stand_in, chain) if written else None
            if out is None:
                out = select(stand_in, chain, "")
    return Autograd(True, _node_name(out), False)


def _indexed_as_written(tensor: torch.Tensor, chain: IndexChain) -> torch.Tensor | None:
    """tensor[key][key]..., each key as a script writes it (one item alone, else a tuple);
    None where torch refuses or fails: a read is not refused for its name."""
    out = tensor
    try:
        for key in chain:
            out = out[key[0] if len(key) == 1 else key]
    except (IndexError, RuntimeError, TypeError, ValueError):
        return None
    return out


def _as_written(key: tuple[IndexItem, ...]) -> bool:
    """Whether torch indexes `key` as numpy does: every slice's step positive and small, its
    bounds within int64 with room."""
    return all(
        not isinstance(item, slice)
        or (
            (item.step is None or 0 < item.step <= _WRITTEN_STEP_MAX)
            and all(b is None or abs(b) <= _WRITTEN_BOUND_MAX for b in (item.start, item.stop))
        )
        for item in key
    )


def _node_name(tensor: torch.Tensor) -> str:
    """The name torch's repr prints in `grad_fn=<...>` (torch/_tensor_str.py), cut to
    MAX_GRAD_FN_BYTES; "" for none."""
    try:
        node = tensor.grad_fn
    except RuntimeError:  # a view made and changed in place without grad: torch's own word
        return "Invalid"
    if node is None:
        return ""
    name = type(node).__name__
    if name == "CppFunction":
        name = node.name().rsplit("::", 1)[-1]
    return name.encode()[:MAX_GRAD_FN_BYTES].decode(errors="ignore")
