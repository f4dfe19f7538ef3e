"""Summary statistics of a tensor, computed where it lives: only the summary leaves the device.

Min, max, mean, std and norm are taken over the finite values, so that one NaN does not hide
the rest; NaN, infinite and zero values are counted. Sums accumulate in float64. Large tensors
are summarised in runs of CHUNK_ELEMENTS, so the temporary memory stays bounded. The figures
stay on the device until one copy of them to the host at the end; besides, each run's sum is
read once, to skip the masks of non-finite values when there are none (most of the time).
The histogram's bins are numpy.histogram's, a value on an edge in the bin above it.

A small tensor on the CPU (up to SMALL_ELEMENTS values) is summarised in numpy instead: the
same figures, each op a microsecond where torch's dispatch costs several. Statistics are taken
under the trainer's lock, so a watcher's every update is time that training waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradwire import limits
from gradwire_server.errors import InvalidInput

#: Values summarised per pass over a run; bounds the float64 temporaries (128 MiB).
CHUNK_ELEMENTS = 1 << 24

#: CPU tensors up to this many values are summarised in numpy (see the module's docstring):
#: torch's parallel grain size, below which torch runs an op on one thread as numpy does.
#: Measured on the 2-core VM of docs/PERFORMANCE.md, without a histogram: 9 us against 68
#: for one value, 11 against 71 for 432 (conv1.weight), 73 against 147 for 32,768.
SMALL_ELEMENTS = 32768


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
    if not 0 <= bins <= limits.MAX_HISTOGRAM_BINS:
        raise InvalidInput(
            f"histogram_bins must be between 0 and {limits.MAX_HISTOGRAM_BINS}, got {bins}",
            reason="BAD_BINS",
        )
    for bound in (low, high):
        if bound is not None and not math.isfinite(bound):
            raise InvalidInput(f"histogram bounds must be finite, got {bound}", reason="BAD_BINS")
    if low is not None and high is not None and not low < high:
        raise InvalidInput(
            f"histogram_low must be below histogram_high, got [{low}, {high}]", reason="BAD_BINS"
        )
    if bins and low is not None and high is not None:
        _edges(low, high, bins)  # a range too wide or too narrow for its bins: refused now


def _edges(start: float, stop: float, bins: int) -> torch.Tensor:
    """`numpy.linspace(start, stop, bins + 1)` bit for bit, as numpy.histogram makes its edges:
    edge i is i * step + start, and the last is `stop` itself. On the CPU, whatever the
    tensor's device. InvalidInput (BAD_BINS) where numpy.histogram raises: a range whose
    width overflows float64, or one too narrow for every bin to have a width."""
    width = stop - start
    if not math.isfinite(width):
        raise InvalidInput(
            f"a histogram over [{start:g}, {stop:g}] is wider than a float64 holds: give "
            "histogram_low and histogram_high closer together (gradwire stats --low, --high)",
            reason="BAD_BINS",
        )
    # (numpy divides in another order where the step rounds to 0: such a range is refused
    # below, holding fewer float64 values than the bins need.)
    edges = torch.arange(bins + 1, dtype=torch.float64).mul_(width / bins).add_(start)
    edges[-1] = stop
    if not bool((edges[1:] > edges[:-1]).all()):
        raise InvalidInput(
            f"{bins} bins over [{start!r}, {stop!r}] cannot each have a width: the range "
            "holds too few float64 values; ask for fewer bins, or a wider range",
            reason="BAD_BINS",
        )
    return edges


def _runs(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + CHUNK_ELEMENTS] for i in range(0, flat.numel(), CHUNK_ELEMENTS)]


def _bin_counts(
    values: torch.Tensor, edges: torch.Tensor, start: float, stop: float
) -> torch.Tensor:
    """How many of the float64 `values` fall in each bin `[edges[i], edges[i + 1])`, the last
    bin closed, as numpy.histogram counts them, on the values' device: a value on an edge lies
    in the bin above it, and values outside the edges or NaN in none. numpy's own method: a
    first guess by arithmetic, moved by one bin where the edges say so. torch.histc stops at
    the guess, which puts some values on or beside an edge in the bin below."""
    bins = edges.numel() - 1
    outside = (values >= start).logical_and_(values <= stop).logical_not_()  # NaN too
    guess = torch.sub(values, start).div_(stop - start).mul_(bins)
    index = guess.masked_fill_(outside, 0).to(torch.int64).clamp_(max=bins - 1)
    index -= (values < edges[index]).to(torch.int64)
    index += (values >= edges[index + 1]).logical_and_(index != bins - 1).to(torch.int64)
    index.masked_fill_(outside, bins)  # counted in a bin past the last, dropped
    return torch.bincount(index, minlength=bins + 1)[:bins]


def summarize(
    tensor: torch.Tensor, bins: int = 0, low: float | None = None, high: float | None = None
) -> Summary:
    """The statistics of `tensor` (any dtype, any device), with a `bins`-bin histogram."""
    check_bins(bins, low, high)
    flat = tensor.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.numel() <= SMALL_ELEMENTS:
        return _summarize_small(flat.to(torch.float64).numpy(), bins, low, high)
    return _summarize(flat, bins, low, high)


def _summarize_small(
    values: np.ndarray[Any, Any], bins: int, low: float | None, high: float | None
) -> Summary:
    """summarize() of float64 `values`, in numpy: _summarize's steps, one for one. No
    np.dot: its BLAS threads fought torch's OpenMP team for the cores (6.6 ms for 64,000
    values where this takes 0.07)."""
    # Overflow to inf and inf - inf are the figures wanted (a norm of inf), as in torch,
    # which does not warn.
    with np.errstate(all="ignore"):
        count = values.size
        total = float(values.sum())
        finite: np.ndarray[Any, Any] | None = None
        if math.isfinite(total):  # all finite: no masks to make or apply
            finite_n, nans = count, 0
            kept = values
        else:
            finite = np.isfinite(values)
            finite_n, nans = int(np.count_nonzero(finite)), int(np.count_nonzero(np.isnan(values)))
            kept = np.where(finite, values, 0.0)
            total = float(kept.sum())
        zeros = count - int(np.count_nonzero(values))  # NaN is not zero
        squares = float(np.square(kept).sum())
        mean = total / max(finite_n, 1)
        filled = values if finite is None else np.where(finite, values, mean)
        smallest, largest = (float(filled.min()), float(filled.max())) if finite_n else (0.0, 0.0)
        deviation = float(np.square(filled - mean).sum())
    histogram = None
    if bins:
        start, stop = _histogram_range(smallest, largest, low, high, bins)
        counts = np.zeros(bins, dtype=np.int64)
        if stop > start:
            counts, _ = np.histogram(values, _edges(start, stop, bins).numpy())
        histogram = Histogram(start, stop, [int(c) for c in counts])
    return Summary(
        count=count,
        min=smallest,
        max=largest,
        mean=mean if finite_n else 0.0,
        std=math.sqrt(deviation / max(finite_n, 1)) if finite_n else 0.0,
        norm=math.sqrt(squares),
        nan_count=nans,
        inf_count=count - finite_n - nans,
        zero_count=zeros,
        histogram=histogram,
    )


def _histogram_range(
    smallest: float, largest: float, low: float | None, high: float | None, bins: int
) -> tuple[float, float]:
    """The histogram's edges, from the finite values' extremes (0 and 0 when there are
    none), in both paths: those given, else the extremes, with a unit-wide range where that
    leaves none, as numpy.histogram makes it (`_unit_wide`)."""
    lo = smallest if low is None else low
    hi = largest if high is None else high
    if low is None and high is None and lo == hi:  # one distinct value: as numpy does
        return _unit_wide(lo, bins, 0.5, 0.5)
    # The values' extreme at or past the one edge given: a unit-wide range beside it, on
    # the side the values lie outside (the range was empty, and hid the edge given).
    if low is None and lo >= hi:
        return _unit_wide(hi, bins, 1.0, 0.0)
    if high is None and hi <= lo:
        return _unit_wide(lo, bins, 0.0, 1.0)
    return lo, hi


def _unit_wide(at: float, bins: int, below: float, above: float) -> tuple[float, float]:
    """[at - below, at + above]; where that leaves the bins no width in float64 (3e38 - 0.5
    is 3e38), as many float64 spacings at `at` as make each bin two wide, on the same
    sides (around one distinct value at float64's largest, on the side it has room on;
    beside an edge given there, BAD_BINS, there being no room). The unit-wide range
    of no width left every value out of a histogram whose edges both held it (found by a
    review of the contract; numpy raises "Too many bins for data range")."""
    start, stop = at - below, at + above
    if _has_width(start, stop, bins):
        return start, stop
    spacing = 2 * bins * math.ulp(at)
    if below and above:  # around one distinct value
        start, stop = at - spacing / 2, at + spacing / 2
        if math.isinf(stop):  # past float64's largest value: below it, `at` the last edge
            start, stop = at - spacing, at
        elif math.isinf(start):
            start, stop = at, at + spacing
        return start, stop
    start, stop = at - spacing * (below > 0), at + spacing * (above > 0)
    if math.isinf(start) or math.isinf(stop):
        side, edge = ("below", "histogram_high") if below else ("above", "histogram_low")
        raise InvalidInput(
            f"a histogram from {edge} {at!r} has no room {side} it in float64 for {bins} "
            f"bin{'s' if bins != 1 else ''}: give both edges (gradwire stats --low, --high)",
            reason="BAD_BINS",
        )
    return start, stop


def _has_width(start: float, stop: float, bins: int) -> bool:
    if not (math.isfinite(start) and math.isfinite(stop) and start < stop):
        return False
    try:
        _edges(start, stop, bins)
    except InvalidInput:
        return False
    return True


def _summarize(flat: torch.Tensor, bins: int, low: float | None, high: float | None) -> Summary:
    """summarize() of a flat tensor in torch, on its device."""
    device, f64 = flat.device, torch.float64
    runs = _runs(flat)
    # float64 copies of each run and their finite masks; kept between the passes when there
    # is only one run, as for every tensor under CHUNK_ELEMENTS.
    cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def values(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A run in float64, and its finite mask; None when every value is finite, which
        its sum being finite shows at the cost of one sum (masks cost more than all else)."""
        if i in cache:
            return cache[i]
        run = runs[i].to(f64)
        pair = run, None if bool(torch.isfinite(run.sum())) else torch.isfinite(run)
        if len(runs) == 1:
            cache[i] = pair
        return pair

    zero = torch.zeros((), dtype=f64, device=device)
    total, squares = zero.clone(), zero.clone()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # finite, NaN, zero
    for i in range(len(runs)):
        run, finite = values(i)
        if finite is None:  # all finite: no masks to make or apply
            counts[0] += run.numel()
            counts[2] += run.numel() - torch.count_nonzero(run)
            total += run.sum()
            squares += torch.dot(run, run)
            continue
        counts += torch.stack([finite.sum(), torch.isnan(run).sum(), (run == 0).sum()])
        kept = torch.where(finite, run, zero)
        total += kept.sum()
        squares += torch.dot(kept, kept)
    finite_count = counts[0].clamp(min=1).to(f64)
    mean = total / finite_count
    # Non-finite values replaced by the mean, which lies among the finite ones: the extremes
    # are the finite values' own, and those values add nothing to the squared deviations.
    deviation = zero.clone()
    smallest = torch.full((), math.inf, dtype=f64, device=device)
    largest = torch.full((), -math.inf, dtype=f64, device=device)
    for i in range(len(runs)):
        run, finite = values(i)
        filled = run if finite is None else torch.where(finite, run, mean)
        low_high = torch.aminmax(filled)
        smallest = torch.minimum(smallest, low_high.min)
        largest = torch.maximum(largest, low_high.max)
        centred = filled - mean
        deviation += torch.dot(centred, centred)
    none_finite = counts[0] == 0
    smallest = torch.where(none_finite, zero, smallest)
    largest = torch.where(none_finite, zero, largest)
    histogram = None
    if bins:
        # The edges are made from numbers, as numpy's: the extremes leave the device here.
        extremes = torch.stack([smallest, largest]).cpu()
        start, stop = _histogram_range(float(extremes[0]), float(extremes[1]), low, high, bins)
        binned = torch.zeros(bins, dtype=torch.int64, device=device)
        if stop > start:
            edges = _edges(start, stop, bins).to(device)
            for i in range(len(runs)):
                run = values(i)[0]
                if device.type == "cpu":
                    # numpy's own histogram over its own edges, on the run's memory: 0.23 ms
                    # for 64,000 values here, where torch.histogram (the same counts, a
                    # binary search each) took 0.74, the passes of _bin_counts 0.45 and
                    # numpy given only the range 0.35 (torch.histc 0.11, and miscounted).
                    # A watcher of linear.weight's 32 bins took 1.2 ms of the lock an
                    # update; training waits for it. (numpy sorts the values first, with
                    # AVX-512 on that Intel host; on the AMD host, in the twenty-third
                    # session, numpy given the range took 1.8 ms, torch.histogram 0.9.)
                    counted, _ = np.histogram(run.numpy(), edges.numpy())
                    binned += torch.from_numpy(counted)
                else:  # torch.histogram has no CUDA kernel
                    binned += _bin_counts(run, edges, start, stop)
    # Every figure, count and bin leaves the device together, in one synchronisation (the
    # counts, at most 2^28, are exact in float64). Before it: one per run of a tensor with
    # non-finite values' check, and the histogram's bounds when they were not given.
    figures = torch.stack(
        [smallest, largest, mean, (deviation / finite_count).sqrt(), squares.sqrt()]
    )
    parts = [figures, counts.to(f64)] + ([binned.to(f64)] if bins else [])
    low_, high_, mean_, std_, norm_, finite_n, nans, zeros, *bin_counts = (
        torch.cat(parts).cpu().tolist()
    )
    if bins:
        histogram = Histogram(start, stop, [int(c) for c in bin_counts])
    finite_n, nans, zeros = int(finite_n), int(nans), int(zeros)
    return Summary(
        count=flat.numel(),
        min=low_,
        max=high_,
        mean=mean_ if finite_n else 0.0,
        std=std_ if finite_n else 0.0,
        norm=norm_,
        nan_count=nans,
        inf_count=flat.numel() - finite_n - nans,
        zero_count=zeros,
        histogram=histogram,
    )
