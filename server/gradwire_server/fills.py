"""Tensors the server makes on its device from a Fill: zeros, ones, a constant, or seeded
random values, so that a big synthetic batch needs no upload (client/gradwire/fill.py asks
for them).

A fill the dtype it names cannot hold is refused (InvalidInput, reason BAD_FILL) before
anything is made, with a message that says what would do, where torch would wrap, truncate,
fill with inf or say only "not implemented for 'Long'". No grpc here, and no trainer state:
the trainer checks a fill's size against its limit first (Trainer._make).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from gradwire_server.errors import InvalidInput, device_lost, device_memory


@dataclass(frozen=True)
class FillSpec:
    """A tensor to make on the device: zeros, ones, a constant, or seeded random values."""

    kind: Literal["zeros", "ones", "constant", "uniform", "normal", "randint"]
    shape: tuple[int, ...]
    dtype: str | None = None  # torch dtype name; None: float32 for inputs, int64 for targets
    value: float = 0.0
    low: float = 0.0
    high: float = 0.0
    std: float = 1.0
    seed: int = 0

    def reseeded(self, step: int) -> FillSpec:
        """This fill at step `step` of a run: a random kind's seed advanced by `step`, so that
        each step sees new data (as the client's Fill.reseeded); other kinds unchanged."""
        if self.kind in ("uniform", "normal", "randint"):
            return dataclasses.replace(self, seed=(self.seed + step) % (1 << 64))
        return self


TensorInput = torch.Tensor | FillSpec


def fill_dtype(spec: FillSpec, default: torch.dtype) -> torch.dtype | None:
    """The dtype `spec` names, `default` where it names none; None for a name torch has no
    dtype by."""
    if spec.dtype is None:
        return default
    named = getattr(torch, spec.dtype, None)
    return named if isinstance(named, torch.dtype) else None


def dtype_name(dtype: torch.dtype) -> str:
    """The name a Fill or a Tensor message gives `dtype`: "int32", not "torch.int32"."""
    return str(dtype).removeprefix("torch.")


INT64_MAX = 2**63 - 1


def int_range(dtype: torch.dtype) -> tuple[int, int]:
    """The least and greatest values of an integer dtype."""
    info = torch.iinfo(dtype)
    return info.min, info.max


def scalar_for(value: float, dtype: torch.dtype) -> tuple[float | int, str]:
    """`value` as a one-value fill of `dtype` (fill_, torch.full) should be given it, and ""; or
    (0, why) when `dtype` cannot hold it. torch's own check compares in double precision:
    2**63 passed for int64 and wrapped to its least value, and 3.4028235e38 (float32's
    largest, as numpy prints it) was refused though it rounds to that largest. Here a float
    is rounded to `dtype` first and refused only if that makes a finite value infinite; an
    integer is truncated toward zero, as fill_ does, and compared exactly. A bool takes any
    value (all but 0 are True, NaN too, as in torch). A complex dtype takes it as its real
    part, rounded as its floating parts are (a complex parameter's FillParameters failed
    INTERNAL, in torch.iinfo)."""
    if dtype == torch.bool:
        return value, ""
    if dtype.is_floating_point or dtype.is_complex:
        made = torch.tensor(value, dtype=torch.float64).to(dtype).item()
        rounded = made.real if isinstance(made, complex) else made
        if math.isfinite(value) and not math.isfinite(rounded):
            return 0, f"past its range, ±{torch.finfo(dtype).max:.7g} (to fill with inf, send inf)"
        return rounded, ""
    low, high = int_range(dtype)
    if not math.isfinite(value) or not low <= math.trunc(value) <= high:
        return 0, f"{dtype_name(dtype)} holds whole numbers from {low} to {high}"
    return math.trunc(value), ""


def make(
    spec: FillSpec, default_dtype: torch.dtype, device: torch.device, what: str
) -> torch.Tensor:
    """The tensor `spec` asks for, made on `device`; of `default_dtype` where `spec` names no
    dtype. `what` names it in errors ("input", "target"). Running out of device memory is
    OverLimit (OUT_OF_MEMORY); anything else wrong with the fill, InvalidInput (BAD_FILL)."""
    dtype = fill_dtype(spec, default_dtype)
    if dtype is None:
        raise InvalidInput(f"{what}: unknown fill dtype {spec.dtype!r}", reason="BAD_FILL")
    try:
        with device_memory(what, device):
            if spec.kind == "zeros":
                return torch.zeros(spec.shape, dtype=dtype, device=device)
            if spec.kind == "ones":
                return torch.ones(spec.shape, dtype=dtype, device=device)
            if spec.kind == "constant":
                whole = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
                if whole and not (math.isfinite(spec.value) and spec.value == int(spec.value)):
                    # torch would truncate: 3.7 would become class 3 without a word.
                    # The name as the fill's dtype names it (int64), not torch's.
                    named = dtype_name(dtype)
                    probabilities = (
                        " (a target fill is int64 class indices unless given a dtype: "
                        "give float32 for class probabilities)"
                        if what == "target" and spec.dtype is None
                        else ""
                    )
                    raise InvalidInput(
                        f"{what}: a constant fill of {named} needs a whole number, got "
                        f"{spec.value}{probabilities}",
                        reason="BAD_FILL",
                    )
                value, why = scalar_for(spec.value, dtype)
                if why:  # 2**63 as int64 wrapped; 1e5 as float16 was inf in one value
                    raise InvalidInput(
                        f"{what}: a constant fill of {dtype_name(dtype)} cannot hold "
                        f"{spec.value!r}: {why}",
                        reason="BAD_FILL",
                    )
                return torch.full(spec.shape, value, dtype=dtype, device=device)
            if spec.kind in ("uniform", "normal") and not (
                dtype.is_floating_point or dtype.is_complex
            ):
                # torch says only '"check_uniform_bounds" not implemented for 'Long''.
                hint = (
                    " (a target fill is int64 class indices unless given a dtype: give "
                    "float32 for class probabilities)"
                    if what == "target" and spec.dtype is None
                    else ""
                )
                raise InvalidInput(
                    f"{what}: a {spec.kind} fill draws real numbers, and "
                    f"{dtype_name(dtype)} holds whole ones: give a "
                    f"floating dtype, or use randint{hint}",
                    reason="BAD_FILL",
                )
            gen = torch.Generator(device=device)
            gen.manual_seed(spec.seed)
            if spec.kind == "uniform":
                if not spec.low < spec.high:
                    raise InvalidInput(
                        f"{what}: uniform fill needs low < high, got [{spec.low}, {spec.high})",
                        reason="BAD_FILL",
                    )
                top = torch.finfo(dtype).max
                # torch: "to is out of bounds for float", and a width past `top` refused
                if not (-top <= spec.low < spec.high <= top and spec.high - spec.low <= top):
                    raise InvalidInput(
                        f"{what}: a uniform fill of {dtype_name(dtype)} needs finite bounds "
                        f"within its range, ±{top:.4g}, and at most {top:.4g} apart; got "
                        f"[{spec.low}, {spec.high})",
                        reason="BAD_FILL",
                    )
                out = torch.empty(spec.shape, dtype=dtype, device=device)
                return out.uniform_(spec.low, spec.high, generator=gen)
            if spec.kind == "normal":
                std = spec.std or 1.0  # the contract's unset standard deviation
                top = torch.finfo(dtype).max
                # torch filled float16 with inf for a mean of 1e10, and said "normal
                # expects std >= 0.0" of a negative one.
                if not (abs(spec.value) <= top and 0 < std <= top):
                    raise InvalidInput(
                        f"{what}: a normal fill of {dtype_name(dtype)} needs a mean within "
                        f"its range, ±{top:.4g}, and a standard deviation more than 0 and at "
                        f"most {top:.4g} (0 is taken as 1); got mean {spec.value}, "
                        f"std {spec.std}",
                        reason="BAD_FILL",
                    )
                out = torch.empty(spec.shape, dtype=dtype, device=device)
                return out.normal_(spec.value, std, generator=gen)
            if spec.kind == "randint":
                # int() of an infinite or NaN bound said Python's words, "cannot convert
                # float NaN to integer" (found by a review of the error catalogue).
                finite = math.isfinite(spec.low) and math.isfinite(spec.high)
                low, high = (int(spec.low), int(spec.high)) if finite else (0, 0)
                if not finite or low != spec.low or high != spec.high or not low < high:
                    raise InvalidInput(
                        f"{what}: randint fill needs whole numbers low < high, "
                        f"got [{spec.low}, {spec.high})",
                        reason="BAD_FILL",
                    )
                if not (dtype.is_floating_point or dtype.is_complex):
                    # torch: "to - 1 is out of bounds for int", or for 2**70 "Overflow
                    # when unpacking long long".
                    first, last = (0, 1) if dtype == torch.bool else int_range(dtype)
                    end = min(last + 1, INT64_MAX)  # torch takes `high` as an int64
                    if low < first or high > end:
                        raise InvalidInput(
                            f"{what}: a randint fill of {dtype_name(dtype)} needs bounds "
                            f"within [{first}, {end}), the values it can draw; got "
                            f"[{low}, {high})",
                            reason="BAD_FILL",
                        )
                else:
                    # torch only warns (an error in a later release) and then draws
                    # numbers the dtype cannot hold exactly.
                    digits = 1 - round(math.log2(torch.finfo(dtype).eps))
                    if low < -(2**digits) or high - 1 > 2**digits:
                        raise InvalidInput(
                            f"{what}: a randint fill of {dtype_name(dtype)} needs bounds within "
                            f"[-2^{digits}, 2^{digits}], the whole numbers it holds "
                            f"exactly; got [{low}, {high})",
                            reason="BAD_FILL",
                        )
                return torch.randint(
                    low, high, spec.shape, generator=gen, dtype=dtype, device=device
                )
    # e.g. a random kind asked of a dtype it lacks, or bounds past the dtype (OverflowError)
    except (RuntimeError, OverflowError, ValueError) as err:
        if device_lost(err):
            raise  # the device's failure, not the caller's fill
        raise InvalidInput(
            f"{what}: cannot make a {spec.kind} fill of {dtype_name(dtype)}: {err}",
            reason="BAD_FILL",
        ) from err
    raise InvalidInput(f"{what}: unknown fill kind {spec.kind!r}", reason="BAD_FILL")
