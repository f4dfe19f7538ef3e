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
#: A slice's start or stop past this is indexed, to name the node (`autograd_of`), as this:
#: the same selection, for no dimension is this long, without torch's warning of truncating
#: a start of -2**63.
_NAMED_BOUND_MAX = 2**62
#: A step up to this is indexed as written whatever the dimension: no stride comes near
#: 2**52, so none overflows; a longer step is first brought to its dimension's size.
_SMALL_STEP = 1024


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
    written = all(_forward_steps(key) for key in chain)
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
    """tensor[key][key]..., each key as a script writes it (one item alone, else a tuple),
    its slices' bounds and steps brought within what torch indexes without overflow
    (`_within`); None where torch refuses or fails: a read is not refused for its name."""
    out = tensor
    try:
        for key in chain:
            key = _within(key, out.shape)
            out = out[key[0] if len(key) == 1 else key]
    except (IndexError, RuntimeError, TypeError, ValueError):
        return None
    return out


def _forward_steps(key: tuple[IndexItem, ...]) -> bool:
    """Whether torch indexes `key` at all: it refuses a slice's negative step, which `select`
    reads by flipping."""
    return all(not isinstance(item, slice) or item.step is None or item.step > 0 for item in key)


def _within(key: tuple[IndexItem, ...], shape: Sequence[int]) -> tuple[IndexItem, ...]:
    """`key` selecting the same from a tensor of `shape`, with each slice's bounds within
    +-_NAMED_BOUND_MAX and its step at most its dimension's size (2 at least): a step of
    2**62 overflowed a stride in torch, and a bound of -2**63 made it warn. The node's name
    stays torch's for the key as written: a step of 1 where one of 2,000 was written on a
    dimension of one would make a tuple's full span, which torch names AliasBackward0, not
    SliceBackward0."""
    if all(not isinstance(item, slice) or _small(item) for item in key):
        return key  # the common case, as it is
    consumed = sum(1 for item in key if item is not None and item is not Ellipsis)
    items: list[IndexItem] = []
    dim = 0  # the dimension of `shape` the next item indexes
    for item in key:
        if item is Ellipsis:
            dim += len(shape) - consumed
        elif item is not None:
            if isinstance(item, slice) and dim < len(shape):
                limit = max(shape[dim], 2)
                start, stop = (
                    None if b is None else max(-_NAMED_BOUND_MAX, min(b, _NAMED_BOUND_MAX))
                    for b in (item.start, item.stop)
                )
                step = item.step if item.step is None or item.step <= limit else limit
                item = slice(start, stop, step)
            dim += 1
        items.append(item)
    return tuple(items)


def _small(item: slice) -> bool:
    """Whether a slice is indexed as written with no overflow whatever its dimension."""
    return (item.step is None or item.step <= _SMALL_STEP) and all(
        b is None or abs(b) <= _NAMED_BOUND_MAX for b in (item.start, item.stop)
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
