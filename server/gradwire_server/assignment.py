"""numpy's assignment, as a value written into a tensor or a slice of it follows it: the
value broadcasts to the slot, after the leading dimensions of size 1 it has beyond the slot's
are dropped, and an integer slot must hold every value. torch's copy_ does neither: it
refuses [1, 1, 4] into [4], and wraps 2**40 into an int32 slot as 0. A tensor whose values
are not each in a place of their own (`expand`'s) cannot be written in place at all.
"""

from __future__ import annotations

import torch

from gradwire_server.errors import InvalidInput
from gradwire_server.fills import dtype_name
from gradwire_server.indexing import IndexChain, select


def without_leading_ones(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """`shape` less the leading dimensions of size 1 it has beyond `ndim`: numpy's assignment
    drops them (a [1, 1, 4] value into a [4] slot), torch's copy_ does not."""
    extra = 0
    while len(shape) - extra > ndim and shape[extra] == 1:
        extra += 1
    return shape[extra:]


def check_writable(
    shape: tuple[int, ...], target: tuple[int, ...], name: str, chain: IndexChain
) -> None:
    """InvalidInput (SHAPE_MISMATCH) unless a value of `shape` broadcasts to `target`, as in
    numpy's assignment."""
    try:
        fitted = without_leading_ones(shape, len(target))
        broadcast = torch.broadcast_shapes(fitted, target)  # type: ignore[no-untyped-call]
    except RuntimeError:
        broadcast = None
    if broadcast != target:
        raise InvalidInput(
            f"a value of shape {list(shape)} cannot be written to "
            f"{name}{'' if not chain else ' slice'} of shape {list(target)}",
            reason="SHAPE_MISMATCH",
        )


def no_repeats(tensor: torch.Tensor) -> bool:
    """Whether each value of `tensor` has a place of its own: no dimension of more than one
    value has a stride of 0 (as `expand` makes), so it can be written in place."""
    return all(st or n <= 1 for st, n in zip(tensor.stride(), tensor.shape, strict=True))


def writable_slot(
    tensor: torch.Tensor, chain: IndexChain, name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """tensor[chain...], the slot a value of `shape` is written to, a view of `tensor`;
    InvalidInput where the value cannot be written there: one check for a write and for the
    first chunk of a streamed one, so that the two refuse alike."""
    slot = select(tensor.detach(), chain, name, writable=True)
    check_writable(shape, tuple(slot.shape), name, chain)
    check_no_repeats(slot, name, chain)
    return slot


def check_no_repeats(target: torch.Tensor, name: str, chain: IndexChain) -> None:
    """InvalidInput (READ_ONLY) unless each value of `target`, the slot a write fills, has a
    place of its own: torch refuses to copy into one that views a value in several places
    (a parameter made with `expand`), and the write was answered INTERNAL."""
    if not no_repeats(target):
        raise InvalidInput(
            f"{name}{'' if not chain else ' slice'} of shape {list(target.shape)} views one "
            "value in several places (a stride of 0, as `expand` makes), so it cannot be "
            "written value by value; FillParameters (gradwire fill) sets a parameter to one value",
            reason="READ_ONLY",
        )


#: The integer dtypes torch's aminmax takes on the CPU (not uint16, uint32, uint64).
_REDUCIBLE = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def check_holds(source: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """InvalidInput (BAD_VALUE) unless an integer `dtype` holds every value of `source`:
    copied in, 2**40 became 0 in an int32 tensor, and NaN -2**31 (found by the twenty-first
    session's review of the client). Fractions truncate, as numpy's assignment does."""
    if dtype.is_floating_point or dtype == torch.bool or source.dtype == torch.bool:
        return
    if source.dtype == dtype or source.numel() == 0:
        return
    info = torch.iinfo(dtype)
    if not source.dtype.is_floating_point:
        given = torch.iinfo(source.dtype)
        if info.min <= given.min and given.max <= info.max:
            return  # every value of the source's type fits
        if source.dtype in _REDUCIBLE:  # two reductions, where the copy below took 53 ms of
            least, most = (int(v) for v in torch.aminmax(source))  # 9.6M int32 values
            if info.min <= least and most <= info.max:
                return  # every value fits: the mask is only for the message
        source = source.to(torch.int64)  # uint8 compared with -128 wraps it to 128
        outside = (source < info.min) | (source > info.max)
    else:  # bounds that floats hold exactly, powers of two: float(2**63 - 1) rounds up;
        # fractions truncate toward zero first (-0.5 into uint8 is 0, as in numpy)
        below = torch.trunc(source) < info.min
        outside = below | (source >= float(info.max) + 1) | ~torch.isfinite(source)
    if bool(outside.any()):
        first = source[outside].reshape(-1)[0].item()
        raise InvalidInput(
            f"{first!r} does not fit {name}'s dtype {dtype_name(dtype)}, "
            f"which holds whole numbers from {info.min} to {info.max}",
            reason="BAD_VALUE",
        )
