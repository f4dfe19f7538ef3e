"""Summary statistics of a tensor, computed where it lives: only the summary leaves the device.

Min, max, mean, std and norm are taken over the finite values, so that one NaN does not hide
the rest; NaN, infinite and zero values are counted. Sums accumulate in float64. Large tensors
are summarised in runs of CHUNK_ELEMENTS, so the temporary memory stays bounded; everything
stays on the device until the one copy of the results to the host at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradwire_server.errors import InvalidInput

#: Values summarised per pass over a run; bounds the float64 temporaries (128 MiB).
CHUNK_ELEMENTS = 1 << 24
MAX_BINS = 4096


@dataclass(frozen=True)
class Histogram:
    low: float
    high: float
    counts: list[int]  # equal-width bins; the last includes `high`


@dataclass(frozen=True)
class Summary:
    count: int
    min: float
    max: float
    mean: float
    std: float  # population standard deviation of the finite values
    norm: float  # L2 norm of the finite values
    nan_count: int
    inf_count: int
    zero_count: int
    histogram: Histogram | None


def check_bins(bins: int, low: float | None, high: float | None) -> None:
    """Refuses histogram settings before any work is done."""
    if not 0 <= bins <= MAX_BINS:
        raise InvalidInput(
            f"histogram_bins must be between 0 and {MAX_BINS}, got {bins}", reason="BAD_BINS"
        )
    for bound in (low, high):
        if bound is not None and not math.isfinite(bound):
            raise InvalidInput(f"histogram bounds must be finite, got {bound}", reason="BAD_BINS")
    if low is not None and high is not None and not low < high:
        raise InvalidInput(
            f"histogram_low must be below histogram_high, got [{low}, {high}]", reason="BAD_BINS"
        )


def _runs(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + CHUNK_ELEMENTS] for i in range(0, flat.numel(), CHUNK_ELEMENTS)]


def summarize(
    tensor: torch.Tensor, bins: int = 0, low: float | None = None, high: float | None = None
) -> Summary:
    """The statistics of `tensor` (any dtype, any device), with a `bins`-bin histogram."""
    check_bins(bins, low, high)
    flat = tensor.detach().reshape(-1)
    device, f64 = flat.device, torch.float64
    runs = _runs(flat)
    # float64 copies of each run; kept between the passes when there is only one run.
    cache: dict[int, torch.Tensor] = {}

    def values(i: int) -> torch.Tensor:
        if i in cache:
            return cache[i]
        run = runs[i].to(f64)
        if len(runs) == 1:
            cache[i] = run
        return run

    zero = torch.zeros((), dtype=f64, device=device)
    total, squares = zero.clone(), zero.clone()
    counts = torch.zeros(4, dtype=torch.int64, device=device)  # finite, nan, inf, zero
    smallest = torch.full((), math.inf, dtype=f64, device=device)
    largest = torch.full((), -math.inf, dtype=f64, device=device)
    for i in range(len(runs)):
        run = values(i)
        finite = torch.isfinite(run)
        counts += torch.stack(
            [finite.sum(), torch.isnan(run).sum(), torch.isinf(run).sum(), (run == 0).sum()]
        )
        kept = torch.where(finite, run, zero)
        total += kept.sum()
        squares += (kept * kept).sum()
        smallest = torch.minimum(smallest, torch.where(finite, run, math.inf).amin())
        largest = torch.maximum(largest, torch.where(finite, run, -math.inf).amax())
    finite_count = counts[0].clamp(min=1).to(f64)
    mean = total / finite_count
    deviation = zero.clone()
    for i in range(len(runs)):
        run = values(i)
        centred = torch.where(torch.isfinite(run), run - mean, zero)
        deviation += (centred * centred).sum()
    none_finite = counts[0] == 0
    smallest = torch.where(none_finite, zero, smallest)
    largest = torch.where(none_finite, zero, largest)
    histogram = None
    if bins:
        lo = smallest if low is None else torch.tensor(low, dtype=f64, device=device)
        hi = largest if high is None else torch.tensor(high, dtype=f64, device=device)
        if low is None and high is None:  # one distinct value: a unit-wide range, as numpy
            same = lo == hi
            lo, hi = torch.where(same, lo - 0.5, lo), torch.where(same, hi + 0.5, hi)
        hi = torch.maximum(hi, lo)  # one bound given and past the other: an empty range
        binned = torch.zeros(bins + 1, dtype=torch.int64, device=device)
        width = (hi - lo).clamp(min=torch.finfo(f64).tiny)
        for i in range(len(runs)):
            run = values(i)
            inside = torch.isfinite(run) & (run >= lo) & (run <= hi)
            at = ((run - lo) / width * bins).floor().clamp(0, bins - 1)
            at = torch.where(inside, at, float(bins)).to(torch.int64)
            binned += torch.bincount(at, minlength=bins + 1)
        bounds = torch.stack([lo, hi]).cpu()
        histogram = Histogram(float(bounds[0]), float(bounds[1]), binned[:bins].cpu().tolist())
    # The one synchronisation: every figure leaves the device together.
    figures = torch.stack(
        [smallest, largest, mean, (deviation / finite_count).sqrt(), squares.sqrt()]
    ).cpu()
    finite_n, nans, infs, zeros = counts.cpu().tolist()
    return Summary(
        count=flat.numel(),
        min=float(figures[0]),
        max=float(figures[1]),
        mean=float(figures[2]) if finite_n else 0.0,
        std=float(figures[3]) if finite_n else 0.0,
        norm=float(figures[4]),
        nan_count=nans,
        inf_count=infs,
        zero_count=zeros,
        histogram=histogram,
    )
