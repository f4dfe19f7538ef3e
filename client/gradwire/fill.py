"""Tensors the server makes itself (ones, zeros, a constant, seeded random values).

Big synthetic batches then need no upload.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from gradwire import codec, limits
from gradwire._pb import trainer_pb2 as pb
from gradwire.limits import Real, Whole

if TYPE_CHECKING:
    import torch

FillKind = Literal["zeros", "ones", "constant", "uniform", "normal", "randint"]
_KIND: dict[str, int] = {
    "zeros": pb.Fill.KIND_ZEROS,
    "ones": pb.Fill.KIND_ONES,
    "constant": pb.Fill.KIND_CONSTANT,
    "uniform": pb.Fill.KIND_UNIFORM,
    "normal": pb.Fill.KIND_NORMAL,
    "randint": pb.Fill.KIND_RANDINT,
}


#: A Fill's dtype as its constructors take it: a name ("float32"), or numpy's or torch's dtype
#: (np.float32, np.dtype("int64"), torch.float32), as torch takes them. Typed `str` alone,
#: a type-checked caller's Fill.ones(8, dtype=torch.int64) was refused (found by a review
#: of the client as a type-checked user's code sees it).
DType: TypeAlias = "str | np.dtype[Any] | type[np.generic] | torch.dtype"


def _named(dtype: DType | None) -> str | None:
    """`dtype` by its name, as the Fill keeps it (None: the default)."""
    return dtype if dtype is None or isinstance(dtype, str) else _dtype_name(dtype)


def _shape(shape: tuple[Whole | Sequence[Whole], ...]) -> tuple[int, ...]:
    """A constructor's *shape: its dimensions, or (as torch.ones takes them) one sequence
    of them, Fill.ones((8, 3, 10, 10)), which protobuf refused from deep inside. Any
    sequence, as the constructors are typed: a range was refused as no whole number (found by
    the review of the client as a type checker sees it)."""
    one = shape[0] if len(shape) == 1 else None
    if isinstance(one, Sequence) and not isinstance(one, (str, bytes)):  # torch.Size: a tuple
        return _dimensions(one)
    return _dimensions(shape)


def _dimensions(shape: Sequence[Any]) -> tuple[int, ...]:
    """The dimensions as ints; TypeError naming the shape for any that is not a whole
    number (a float, a nested tuple: Fill.ones((8, 3), 10))."""
    try:
        if any(isinstance(d, bool) for d in shape):
            raise TypeError
        dimensions = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(
            f"a Fill's shape is whole numbers, given one by one (Fill.ones(8, 3, 10, 10)) or "
            f"as one tuple or list (Fill.ones((8, 3, 10, 10))); got {shape!r}"
        ) from None
    # What an int64 holds (protobuf refused more only when sent); a negative one is the
    # server's to refuse, saying which.
    for d in dimensions:
        limits.whole(d, f"a Fill's dimension (in {dimensions})", codec.INT64_MIN, codec.INT64_MAX)
    return dimensions


def _dtype_name(dtype: object) -> str:
    """The name of a dtype given as torch's or numpy's (torch.int64, np.float32): as torch
    does, a Fill takes them, and they were sent as "unknown dtype <class 'numpy.float32'>"."""
    if type(dtype).__module__ == "torch" and str(dtype).startswith("torch."):  # a torch.dtype
        return str(dtype).removeprefix("torch.")
    try:
        return str(np.dtype(dtype).name)  # type: ignore[call-overload]
    except (TypeError, ValueError):  # ValueError: a tensor given for its dtype, among others
        raise TypeError(
            f"a Fill's dtype is a name ('float32'), or numpy's or torch's dtype; got {dtype!r}"
        ) from None


@dataclass(frozen=True)
class Fill:
    """A fill spec: `Fill.ones(8, 3, 10, 10)` is the tutorial's `torch.ones(8, 3, 10, 10)`.
    As in torch, the shape may be given as one tuple or list too: `Fill.ones(x.shape)`."""

    kind: FillKind
    shape: tuple[int, ...]
    # None: the model's input dtype (float32 unless its ModelSpec says otherwise) for inputs;
    # int64 class indices for targets, or float32 for a model trained with "mse".
    dtype: str | None = None  # "float32", "int64", ...
    value: float = 0.0
    low: float = 0.0
    high: float = 0.0
    std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KIND:
            raise ValueError(f"a Fill's kind is one of {', '.join(_KIND)}; got {self.kind!r}")
        if self.dtype is not None and not isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.dtype is not None and self.dtype not in codec.DTYPE_NAMES.values():
            # Taken as given, it was refused when sent, "unknown dtype 'uint8'", naming
            # neither the Fill nor its argument (found by a review of the client's API).
            raise codec.CodecError(
                f"a Fill's dtype is one the wire carries, "
                f"{', '.join(sorted(codec.DTYPE_NAMES.values()))}; got {self.dtype!r} (an "
                "array of int8, uint8, int16 or uint16 is sent as int32, of uint32 as int64; "
                "a Fill is made on the server, in its own dtype)"
            )
        # Checked as they are given, not when sent: protobuf's errors then named none of them.
        what = {"value": "mean" if self.kind == "normal" else "value", "std": "std"}
        for field in ("value", "low", "high", "std"):
            number = limits.real(getattr(self, field), what.get(field, field))
            object.__setattr__(self, field, number)
        if self.kind == "normal" and not 0 < self.std < math.inf:
            # The contract reads a std of 0 as unset, 1: Fill.normal(std=0) drew values of
            # standard deviation 1 without a word.
            raise ValueError(
                f"a normal fill's std must be more than 0 and finite, got {self.std!r} "
                "(for every value equal to the mean, Fill.constant(mean, ...))"
            )
        object.__setattr__(self, "shape", _dimensions(self.shape))
        # Kept as a Python int: a numpy seed overflowed in reseeded()'s sum (found by a review).
        object.__setattr__(self, "seed", limits.check_seed(self.seed))

    @classmethod
    def _made(
        cls,
        kind: FillKind,
        shape: tuple[Whole | Sequence[Whole], ...],
        dtype: DType | None,
        **numbers: Real,
    ) -> Fill:
        """A Fill of `kind`, its `numbers` (value, low, high, std, seed) Python's or numpy's,
        as __post_init__ checks them, making each a float and the seed an int. Typed float
        and int, a type-checked caller's Fill.uniform(batch, 3, seed=s) for s in np.arange(n)
        was refused (found by a review of the client as a type-checked user's code sees it)."""
        given: dict[str, Any] = numbers
        return cls(kind, _shape(shape), _named(dtype), **given)

    @classmethod
    def ones(cls, *shape: Whole | Sequence[Whole], dtype: DType | None = None) -> Fill:
        """torch.ones(*shape): all 1. `dtype` ("float32", np.float32 or torch.float32): by
        default the model's input dtype for an input, int64 for class indices (float32
        for an mse model's target), the tensor's own in set()."""
        return cls._made("ones", shape, dtype)

    @classmethod
    def zeros(cls, *shape: Whole | Sequence[Whole], dtype: DType | None = None) -> Fill:
        """torch.zeros(*shape): all 0; `dtype` as in ones()."""
        return cls._made("zeros", shape, dtype)

    @classmethod
    def constant(
        cls, value: Real, *shape: Whole | Sequence[Whole], dtype: DType | None = None
    ) -> Fill:
        """torch.full(shape, value): all `value`; `dtype` as in ones()."""
        return cls._made("constant", shape, dtype, value=value)

    @classmethod
    def uniform(
        cls,
        *shape: Whole | Sequence[Whole],
        low: Real = 0.0,
        high: Real = 1.0,
        seed: Whole = 0,
        dtype: DType | None = None,
    ) -> Fill:
        """Values uniform in [low, high), drawn from `seed`, a floating `dtype` (as in
        ones()). The same seed draws the same values every call: give each batch a seed of
        its own (train() does, seed + n - 1 at step n; reseeded())."""
        return cls._made("uniform", shape, dtype, low=low, high=high, seed=seed)

    @classmethod
    def normal(
        cls,
        *shape: Whole | Sequence[Whole],
        mean: Real = 0.0,
        std: Real = 1.0,
        seed: Whole = 0,
        dtype: DType | None = None,
    ) -> Fill:
        """torch.normal's values of `mean` and `std`, drawn from `seed` (the same values
        every call, as uniform's), a floating `dtype` (as in ones()); `std` more than 0
        (the contract reads 0 as unset, 1)."""
        return cls._made("normal", shape, dtype, value=mean, std=std, seed=seed)

    @classmethod
    def randint(
        cls,
        low: Whole,
        high: Whole,
        *shape: Whole | Sequence[Whole],
        seed: Whole = 0,
        dtype: DType | None = None,
    ) -> Fill:
        """torch.randint(low, high, shape): whole numbers in [low, high), `high` left out
        (class indices for 20 classes: Fill.randint(0, 20, batch)), drawn from `seed` (the
        same values every call, as uniform's), in any `dtype` (as in ones())."""
        return cls._made("randint", shape, dtype, low=low, high=high, seed=seed)

    def reseeded(self, step: int) -> Fill:
        """This fill at step `step` of a run: a random kind's seed advanced by `step`, as the
        server's Train does, so that each step sees new data; other kinds unchanged."""
        step = limits.whole(step, "step", 0, limits.MAX_SEED)
        if self.kind in ("uniform", "normal", "randint"):
            return replace(self, seed=(self.seed + step) % (1 << 64))
        return self

    def to_proto(self) -> pb.Fill:
        return pb.Fill(
            kind=_KIND[self.kind],  # type: ignore[arg-type]
            shape=self.shape,
            dtype=codec.dtype_from_name(self.dtype) if self.dtype else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
            value=self.value,
            low=self.low,
            high=self.high,
            std=self.std,
            seed=self.seed,
        )
