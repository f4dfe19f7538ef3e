"""numpy basic indexing applied to torch tensors on their device, with errors a person can act on.

torch refuses negative slice steps, which numpy allows; reads take them by narrowing to the
selected span and flipping it. Writes need a view of the original, so they refuse them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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
