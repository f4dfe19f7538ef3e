"""Inspection through a real server: statistics, activations, optimizer state, deltas, Watch
and server-side Train runs, each checked against the same thing done in local PyTorch."""

from __future__ import annotations

import functools
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire.fill import Fill
from gradwire.updates import Stats, WatchUpdate
from gradwire_server import servicer as servicer_module
from gradwire_server import stats as server_stats
from gradwire_server.app import Running, start
from gradwire_server.errors import InvalidInput
from gradwire_server.models import TINY_MLP, ModelSpec
from gradwire_server.trainer import Trainer
from tests.background import Reader, eventually
from tests.cli_run import run_main
from tests.serve_in_process import serving
from tests.test_train_step import local_model, local_train_step, random_batch

PARAMETERS = ("conv1.weight", "conv2.weight", "linear.weight")


def numpy_stats(values: np.ndarray[Any, Any]) -> dict[str, float]:
    finite = values[np.isfinite(values)].astype(np.float64)
    return {
        "min": finite.min(),
        "max": finite.max(),
        "mean": finite.mean(),
        "std": finite.std(),
        "norm": float(np.sqrt((finite * finite).sum())),
    }


def assert_stats_match(got: Stats, values: np.ndarray[Any, Any]) -> None:
    want = numpy_stats(values)
    assert got.count == values.size
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got.nan_count == int(np.isnan(values).sum())
    assert got.inf_count == int(np.isinf(values).sum())
    assert got.zero_count == int((values == 0).sum())


def train_once(client: gradwire.Client, seed: int = 1) -> tuple[np.ndarray[Any, Any], ...]:
    x, y = random_batch(8, seed)
    client.forward(x, y)
    client.backward()
    client.step()
    return x, y


# --- statistics -------------------------------------------------------------------------


def test_stats_of_a_parameter_equal_numpy(client: gradwire.Client) -> None:
    values = client.get("linear.weight")
    read = client.stats("linear.weight", bins=16)
    assert read.shape == read.full_shape == (20, 3200)
    assert read.stats is not None
    assert_stats_match(read.stats, values)
    assert read.stats.histogram is not None
    counts, edges = np.histogram(values.astype(np.float64), bins=16)
    assert read.stats.histogram.counts == tuple(counts)
    assert read.stats.histogram.edges == pytest.approx(list(edges))


def test_a_histogram_s_edges_are_those_it_counted_by_bit_for_bit(
    client: gradwire.Client,
) -> None:
    """Histogram.edges are the server's edges, numpy's: low + (high - low) * i / n differed
    from them in the last bit, and its last edge passed `high` (0.30000000000000004 for
    [-1, 0.3] in 10 bins), so that a value on an edge fell on the other side of it from
    where it was counted (found by a review of the client's API)."""
    values = np.linspace(-1, 0.3, 27, dtype=np.float32).reshape(3, 3, 3)
    client.set("conv1.weight[5]", values)
    read = client.stats("conv1.weight[5]", bins=10, low=-1.0, high=0.3)
    assert read.stats is not None and read.stats.histogram is not None
    edges = read.stats.histogram.edges
    assert edges == np.linspace(-1.0, 0.3, 11).tolist()
    assert (edges[0], edges[-1]) == (-1.0, 0.3)
    counts, _ = np.histogram(values.astype(np.float64), np.array(edges))
    assert read.stats.histogram.counts == tuple(counts)


def test_stats_of_a_slice_with_nan_inf_and_zeros(client: gradwire.Client) -> None:
    values = np.linspace(-2, 2, 27, dtype=np.float32).reshape(3, 3, 3)
    values[0, 0, 0], values[1, 1, 1], values[2, 2, 2] = np.nan, np.inf, -np.inf
    values[0, 1, :] = 0
    client.set("conv1.weight[5]", values)
    read = client.stats("conv1.weight[5]", bins=4, low=-1.0, high=1.0)
    assert read.shape == (3, 3, 3)
    assert read.stats is not None
    assert_stats_match(read.stats, values)
    assert (read.stats.nan_count, read.stats.inf_count, read.stats.zero_count) == (1, 2, 3)
    finite = values[np.isfinite(values)]
    counts, _ = np.histogram(finite, bins=4, range=(-1.0, 1.0))
    assert read.stats.histogram is not None
    assert read.stats.histogram.counts == tuple(counts)


def test_a_histogram_bound_of_zero_is_a_bound_not_one_left_out(client: gradwire.Client) -> None:
    """low=0.0 or high=0.0 bounds the histogram there: taken for no bound, the histogram
    spans the values' own range (-2 to 2 here)."""
    values = np.linspace(-2, 2, 27, dtype=np.float32).reshape(3, 3, 3)
    client.set("conv1.weight[5]", values)
    for low, high in ((0.0, None), (None, 0.0)):
        read = client.stats("conv1.weight[5]", bins=2, low=low, high=high)
        assert read.stats is not None and read.stats.histogram is not None
        counts, edges = np.histogram(
            values, bins=2, range=(0.0 if low == 0.0 else -2.0, 0.0 if high == 0.0 else 2.0)
        )
        assert read.stats.histogram.counts == tuple(counts)
        assert read.stats.histogram.edges == pytest.approx(list(edges))


def test_stats_of_values_none_of_which_is_finite_are_nan(client: gradwire.Client) -> None:
    # The contract sends 0 for them; the client read 0.0, like a slice of zeros.
    values = np.full((3, 3, 3), np.nan, dtype=np.float32)
    values[0, 0, :] = np.inf
    client.set("conv1.weight[5]", values)
    read = client.stats("conv1.weight[5]")
    assert read.stats is not None
    assert (read.stats.count, read.stats.finite, read.stats.zero_count) == (27, 0, 0)
    figures = (read.stats.min, read.stats.max, read.stats.mean, read.stats.std, read.stats.norm)
    assert all(math.isnan(x) for x in figures), figures


def test_stats_of_integer_and_0d_tensors(client: gradwire.Client) -> None:
    x, y = random_batch(8, 3)
    client.forward(x, y)
    target = client.stats("target")
    assert target.stats is not None
    assert_stats_match(target.stats, y)
    loss = client.stats("loss", bins=3)
    assert loss.stats is not None and loss.shape == ()
    assert loss.stats.min == loss.stats.max == pytest.approx(float(client.get("loss")))
    assert loss.stats.histogram is not None and sum(loss.stats.histogram.counts) == 1


def test_stats_of_an_absent_gradient(client: gradwire.Client) -> None:
    read = client.stats("conv1.weight.grad")
    assert read.stats is None and read.shape is None and read.full_shape is None


def test_stats_say_the_state_version_and_tensor_they_were_read_from(
    client: gradwire.Client,
) -> None:
    """Present or absent, the statistics carry the version of the state they summarize, as
    a read does: a caller comparing them with a read, or waiting for a step, goes by it."""
    version = client.set("conv1.weight[5]", np.zeros((3, 3, 3), dtype=np.float32))
    assert version > 0
    read = client.stats("conv1.weight[5]")
    assert (read.name, read.version) == ("conv1.weight", version)
    absent = client.stats("conv1.weight.grad")
    assert (absent.name, absent.version, absent.stats) == ("conv1.weight.grad", version, None)


def test_summarize_in_runs_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    values = torch.randn(1000, dtype=torch.float64)
    values[::97] = float("nan")
    monkeypatch.setattr(server_stats, "SMALL_ELEMENTS", 0)  # torch's passes, not numpy's
    whole = server_stats.summarize(values, bins=10)
    monkeypatch.setattr(server_stats, "CHUNK_ELEMENTS", 64)
    in_runs = server_stats.summarize(values, bins=10)
    assert in_runs.histogram == whole.histogram
    for key in ("count", "nan_count", "inf_count", "zero_count", "min", "max"):
        assert getattr(in_runs, key) == getattr(whole, key)
    for key in ("mean", "std", "norm"):
        assert getattr(in_runs, key) == pytest.approx(getattr(whole, key), rel=1e-12)


def _cases_for_both_paths() -> list[tuple[np.ndarray[Any, Any], int, float | None, float | None]]:
    """Values, bins and the edges given: random, and the corners each step of the summary
    has (none, one value, all equal, all zero, NaN and infinities, a sum that overflows)."""
    rng = np.random.default_rng(7)
    cases: list[tuple[np.ndarray[Any, Any], int, float | None, float | None]] = []
    corners = [
        np.array([]),
        np.array([2.5]),
        np.full(9, -3.0),
        np.zeros(5),
        np.array([np.nan, np.nan]),
        np.array([np.inf, -np.inf, 1.0]),
        np.array([1e308, 1e308, -5.0]),
        np.array([np.nan, 0.0, -0.0, 4.0, np.inf]),
    ]
    for values in corners:
        for bins, low, high in [(0, None, None), (3, None, None), (4, -1.0, None), (2, None, -4.0)]:
            cases.append((values, bins, low, high))
    for _ in range(60):
        values = rng.standard_normal(int(rng.integers(1, 3000))) * 10.0 ** int(rng.integers(-3, 4))
        if rng.random() < 0.5:
            values = np.round(values)
        spots = rng.integers(0, values.size, int(rng.integers(0, 4)))
        values[spots] = rng.choice([np.nan, np.inf, -np.inf, 0.0], spots.size)
        low, high = sorted(rng.standard_normal(2))
        given = [(None, None), (float(low), None), (None, float(high)), (float(low), float(high))]
        cases.append((values, int(rng.integers(0, 50)), *given[int(rng.integers(0, 4))]))
    return cases


@pytest.mark.parametrize(("values", "bins", "low", "high"), _cases_for_both_paths())
def test_a_small_tensor_s_summary_in_numpy_equals_torch_s(
    values: np.ndarray[Any, Any], bins: int, low: float | None, high: float | None
) -> None:
    """Tensors up to SMALL_ELEMENTS are summarised in numpy, seven times faster; larger ones
    and a GPU's in torch. Both must give the same figures: counts and bins exactly, sums to
    rounding (each adds in its own order)."""
    small = server_stats._summarize_small(values, bins, low, high)
    torch_s = server_stats._summarize(torch.from_numpy(values), bins, low, high)
    assert small.histogram == torch_s.histogram
    for key in ("count", "nan_count", "inf_count", "zero_count", "min", "max"):
        assert getattr(small, key) == getattr(torch_s, key), key
    for key in ("mean", "std", "norm"):
        ours, theirs = getattr(small, key), getattr(torch_s, key)
        assert ours == pytest.approx(theirs, rel=1e-12, nan_ok=True), key


def test_summarize_takes_numpy_for_small_cpu_tensors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    monkeypatch.setattr(
        server_stats, "_summarize_small", lambda values, *_: taken.append(values.size)
    )
    server_stats.summarize(torch.ones(server_stats.SMALL_ELEMENTS, dtype=torch.bfloat16))
    server_stats.summarize(torch.ones(server_stats.SMALL_ELEMENTS + 1))
    server_stats.summarize(torch.ones(2, 3, dtype=torch.int32), bins=2)
    assert taken == [server_stats.SMALL_ELEMENTS, 6]


def values_on_the_edges(seed: int) -> tuple[np.ndarray[Any, Any], int, float, float]:
    """Random values, every edge of a random histogram among them with the float64 values
    either side of it, and values past its range, NaN and infinities: where torch.histc and
    numpy.histogram part. (The neighbours below an edge are where the first guess of
    _bin_counts is a bin too high: without them, nothing checked that it moves it down.)"""
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(1, 60))
    low, high = sorted(rng.normal(size=2) * 10.0 ** rng.integers(-3, 4))
    edges = np.linspace(low, high, bins + 1)
    values = np.concatenate(
        [
            rng.uniform(low - 0.1, high + 0.1, 500),
            edges,
            np.nextafter(edges, -np.inf),
            np.nextafter(edges, np.inf),
            [np.nan, np.inf, -np.inf, 1e300, -1e300],
        ]
    )
    return values, bins, float(low), float(high)


@pytest.mark.parametrize("seed", range(40))
def test_a_histogram_counts_values_on_its_edges_as_numpy_does(seed: int) -> None:
    """A value on an edge lies in the bin above it, as the .proto says and numpy.histogram
    counts; torch.histc, used before, put some in the bin below (a review of watching found
    a count off by one in 1 of 40 random cases; with the edges among the values, in most)."""
    values, bins, low, high = values_on_the_edges(seed)
    summary = server_stats.summarize(torch.from_numpy(values), bins=bins, low=low, high=high)
    assert summary.histogram is not None
    counts, _ = np.histogram(values[np.isfinite(values)], bins, (low, high))
    assert summary.histogram.counts == counts.tolist()


@pytest.mark.parametrize("seed", range(40))
def test_the_device_s_binning_counts_as_numpy_does(seed: int) -> None:
    """The binning a tensor off the CPU gets (the CPU's is numpy.histogram's own), run here
    on the CPU; tests/test_gpu.py runs it on CUDA."""
    values, bins, low, high = values_on_the_edges(seed)
    edges = server_stats._edges(low, high, bins)
    expected, numpy_edges = np.histogram(values[np.isfinite(values)], bins, (low, high))
    assert edges.numpy().tobytes() == numpy_edges.tobytes()
    counted = server_stats._bin_counts(torch.from_numpy(values), edges, low, high)
    assert counted.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("low", "high", "bins"),
    [(0.0, 1.0, 4096), (-3.1, 7.7, 7), (1e-310, 2e-310, 3), (5e-324, 2e-323, 3)],
)
def test_histogram_edges_are_numpy_s_bit_for_bit(low: float, high: float, bins: int) -> None:
    edges = server_stats._edges(low, high, bins)
    assert edges.numpy().tobytes() == np.linspace(low, high, bins + 1).tobytes()


@pytest.mark.parametrize(
    ("low", "high", "bins", "said"),
    [
        # the width overflows
        (-1.7e308, 1.7e308, 2, r"\[-1\.7e\+308, 1\.7e\+308\] is wider than a float64 holds"),
        # edges repeat
        (
            1.0,
            math.nextafter(1.0, 2.0),
            4096,
            r"4096 bins over \[1\.0, 1\.0000000000000002\] cannot each have a width",
        ),
        # a step that rounds to 0
        (5e-324, 1e-323, 4096, r"4096 bins over \[5e-324, 1e-323\] cannot each have a width"),
    ],
)
def test_a_range_numpy_refuses_for_its_bins_is_refused(
    low: float, high: float, bins: int, said: str
) -> None:
    """numpy.histogram raises for both. Taken, the first gave wrong counts on the CPU, and
    on a GPU an index out of range (a device-side assert, which ends the server's use of
    the device); the second put a value in a bin of no width (found by a review)."""
    with np.errstate(all="ignore"), pytest.raises(ValueError):
        np.histogram([low, high], bins, (low, high))
    for given in [(low, high), (None, None)]:  # given, or the values' own range
        with pytest.raises(InvalidInput, match=said) as refused:
            values = torch.tensor([low, high], dtype=torch.float64)
            server_stats.check_bins(bins, *given)
            server_stats.summarize(values, bins, *given)
        assert refused.value.reason == "BAD_BINS"


def test_a_histogram_range_too_narrow_for_its_bins_is_refused_for_an_absent_tensor(
    client: gradwire.Client,
) -> None:
    """GetStats checks a range given against its bins before it reads: a tensor not there
    yet (no loss before a Forward) is refused as one that is, not answered without a
    histogram."""
    with pytest.raises(errors.InvalidArgument, match="cannot each have a width") as refused:
        client.stats("loss", bins=4096, low=1.0, high=math.nextafter(1.0, 2.0))
    assert refused.value.reason == "BAD_BINS"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("size", [432, 300_000])  # numpy's path, and the device's
@pytest.mark.parametrize(
    ("value", "bins", "low"),
    [(3e38, 2, None), (3e38, 4096, None), (-1.5e300, 7, None), (0.1, 2, 1e300)],
)
def test_a_unit_wide_range_is_widened_where_it_would_have_no_width(
    device: str, size: int, value: float, bins: int, low: float | None
) -> None:
    """3e38 - 0.5 is 3e38: the unit-wide range around one distinct value, or beside the one
    edge given, had no width there, and every value was left out of a histogram whose edges
    both held it ([3e38, 3e38], counts [0, 0]; found by a review of the contract). Two
    float64 spacings a bin now, which keeps each value where numpy puts a value on an edge."""
    values = torch.full((size,), value, dtype=torch.float64, device=device)
    histogram = server_stats.summarize(values, bins=bins, low=low).histogram
    assert histogram is not None and histogram.low < histogram.high
    edges = server_stats._edges(histogram.low, histogram.high, bins).numpy()
    expected, _ = np.histogram(values.cpu().numpy(), edges)
    assert histogram.counts == expected.tolist()
    assert sum(histogram.counts) == (0 if low is not None else size)


@pytest.mark.parametrize("size", [5, 300_000])
@pytest.mark.parametrize(
    ("value", "bins"), [(1e15, 7), (2.0**52, 1), (2.0**53 - 1, 2), (1e8, 2), (-3.5, 4096)]
)
def test_a_unit_wide_range_numpy_can_bin_is_numpy_s(value: float, bins: int, size: int) -> None:
    """The widening is for ranges numpy refuses alone: its first form widened these too,
    where numpy answers (found by a review of the fix)."""
    values = np.full(size, value)
    counts, edges = np.histogram(values, bins)
    histogram = server_stats.summarize(torch.from_numpy(values), bins=bins).histogram
    assert histogram is not None
    assert (histogram.low, histogram.high, histogram.counts) == (
        edges[0],
        edges[-1],
        counts.tolist(),
    )


def test_values_at_float64_s_largest_are_binned_and_an_edge_there_refused() -> None:
    """Widened past float64's largest value, the range overflowed and the whole GetStats
    was refused, "give histogram_low and histogram_high closer together", of a caller who
    gave neither (found by a review of the fix)."""
    largest = sys.float_info.max
    for value in (largest, -largest):
        summary = server_stats.summarize(torch.full((5,), value, dtype=torch.float64), bins=3)
        assert summary.histogram is not None and sum(summary.histogram.counts) == 5
        assert value in (summary.histogram.low, summary.histogram.high)
        # Two float64 spacings a bin, as around any other value numpy cannot widen.
        assert summary.histogram.high - summary.histogram.low == 2 * 3 * math.ulp(largest)
    with pytest.raises(InvalidInput) as refused:
        server_stats.summarize(torch.zeros(5, dtype=torch.float64), bins=4, low=largest)
    assert refused.value.reason == "BAD_BINS"
    assert (
        f"a histogram from histogram_low {largest!r} has no room above it in float64 for 4 "
        "bins: give both edges"
    ) in refused.value.message
    # The other side names the other edge; one bin is "1 bin".
    with pytest.raises(InvalidInput) as refused:
        server_stats.summarize(torch.zeros(5, dtype=torch.float64), bins=1, high=-largest)
    assert refused.value.reason == "BAD_BINS"
    assert (
        f"a histogram from histogram_high {-largest!r} has no room below it in float64 for 1 "
        "bin: give both edges"
    ) in refused.value.message


@pytest.mark.parametrize(("low", "high", "value"), [(1e300, None, 0.1), (None, -1e300, -0.1)])
def test_an_edge_given_beside_a_range_widened_to_two_spacings_a_bin_is_kept(
    low: float | None, high: float | None, value: float
) -> None:
    """1e300 + 1 is 1e300: the unit-wide range beside the one edge given is two float64
    spacings a bin instead, all of them on the side away from the values, the edge given
    one end of it, as it is of the unit-wide range."""
    bins = 3
    values = torch.full((5,), value, dtype=torch.float64)
    histogram = server_stats.summarize(values, bins=bins, low=low, high=high).histogram
    assert histogram is not None and histogram.counts == [0, 0, 0]
    width = 2 * bins * math.ulp(1e300)
    if low is not None:
        assert (histogram.low, histogram.high) == (low, low + width)
    else:
        assert high is not None and (histogram.low, histogram.high) == (high - width, high)


@pytest.mark.parametrize(
    ("low", "high", "edges", "counts"),
    [
        (None, -5.0, (-6.0, -5.0), [0, 0]),  # every value above the edge given
        (5.0, None, (5.0, 6.0), [0, 0]),  # every value below it
        (3.0, None, (3.0, 4.0), [1, 0]),  # the largest value on it: counted
        (None, -2.0, (-3.0, -2.0), [0, 1]),  # the smallest on it, in the last bin
        (None, 0.5, (-2.0, 0.5), [1, 1]),  # a range the values leave room for, as before
    ],
)
def test_one_histogram_edge_past_the_values_keeps_the_edge_given(
    low: float | None, high: float | None, edges: tuple[float, float], counts: list[int]
) -> None:
    """Given one edge, the other is the values' extreme; past the one given, that left an
    empty range [x, x] and the edge asked for appeared nowhere (`stats --high -5` printed
    three bins [-0.192, -0.192); found by a review of watching). Now a range of width 1
    from the edge given, away from the values."""
    values = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    summary = server_stats.summarize(values, bins=2, low=low, high=high)
    assert summary.histogram is not None
    assert (summary.histogram.low, summary.histogram.high) == edges
    assert summary.histogram.counts == counts


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"histogram_bins": -1}, "histogram_bins must be between 0 and 4096, got -1"),
        ({"histogram_bins": 5000}, "histogram_bins must be between 0 and 4096, got 5000"),
        (
            {"histogram_bins": 4, "histogram_low": 1.0, "histogram_high": 1.0},
            "histogram_low must be below histogram_high",
        ),
        (
            {"histogram_bins": 4, "histogram_low": 2.0, "histogram_high": 1.0},
            r"histogram_low must be below histogram_high, got \[2\.0, 1\.0\]",
        ),
        ({"histogram_bins": 4, "histogram_low": math.nan}, "bounds must be finite, got nan"),
        ({"histogram_bins": 4, "histogram_high": math.inf}, "bounds must be finite, got inf"),
        (
            {"histogram_bins": 4, "histogram_low": -math.inf, "histogram_high": 0.0},
            "bounds must be finite, got -inf",
        ),
    ],
)
def test_bad_histogram_settings_are_invalid_argument(
    client: gradwire.Client, fields: dict[str, Any], said: str
) -> None:
    """As another language's client sends them; the Python client refuses each itself
    (test_client's BAD_ARGUMENTS), in words naming its own arguments."""
    request = pb.GetStatsRequest(name="conv1.weight", **fields)
    with pytest.raises(errors.InvalidArgument, match=said) as caught:
        client._call("GetStats", request)
    assert caught.value.reason == "BAD_BINS"


def test_histogram_edges_sent_with_no_bins_are_answered_without_a_histogram(
    client: gradwire.Client,
) -> None:
    """histogram_bins 0 is no histogram, whatever edges another language's client sends
    beside it: the edges are not checked against bins there are none of (0 bins over
    [0, 1] would divide by zero, and fail the call)."""
    request = pb.GetStatsRequest(
        name="conv1.weight", histogram_bins=0, histogram_low=0.0, histogram_high=1.0
    )
    response = client._call("GetStats", request)
    assert response.stats.count == 16 * 3 * 3 * 3
    assert not response.stats.HasField("histogram")


def test_stats_of_an_unknown_name_is_not_found(client: gradwire.Client) -> None:
    with pytest.raises(errors.NotFound, match=r"conv1\.weight"):
        client.stats("conv1.weigth")


# --- activations, optimizer state, deltas --------------------------------------------------


def test_activations_equal_local_module_outputs(client: gradwire.Client) -> None:
    model = local_model()
    outputs: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(
                lambda m, a, out, name=name: outputs.__setitem__(name, out.detach())
            )
    x, y = random_batch(4, 5)
    model(torch.from_numpy(x))
    assert client.shape("conv1.output") is None  # before any Forward: absent
    client.forward(x, y)
    for name in ("conv1", "conv2", "linear"):
        assert np.array_equal(client.get(f"{name}.output"), outputs[name].numpy()), name
    assert np.array_equal(client.get("conv2.output[1, 3]"), outputs["conv2"][1, 3].numpy())


def test_a_failed_forward_keeps_the_last_activations(client: gradwire.Client) -> None:
    x, y = random_batch(2, 6)
    client.forward(x, y)
    before = client.get("conv1.output")
    with pytest.raises(errors.InvalidArgument):
        client.forward(x, np.array([0, 99]))  # class 99 is refused
    assert np.array_equal(client.get("conv1.output"), before)


def test_a_pass_the_model_refuses_leaves_no_activations_and_no_graph() -> None:
    """The last pass's activations and graph go as the next pass begins, so that two
    passes' are never held at once: a pass that then fails inside the model (TinyMLP's
    BatchNorm refuses a batch of one in training) leaves no activations, read as absent, as
    before a first Forward, and no graph to backpropagate, and the rest as it was. A call
    refused before its pass keeps them (the test above)."""
    activations = ("fc1.output", "norm.output", "fc2.output")
    good = Fill.uniform(4, 16, seed=1), Fill.randint(0, 4, 4, seed=2)
    one = Fill.uniform(1, 16, seed=3), Fill.randint(0, 4, 1, seed=4)
    with serving(TINY_MLP, seed=0) as (_, client):
        calls: list[Callable[[], object]] = [
            lambda: client.forward(*one),
            lambda: client.train_step(*one, zero_grad=True),
        ]
        for call in calls:
            client.train_step(*good)
            client.forward(*good)  # its graph alive, for a Backward
            assert all(client.get(name) is not None for name in activations)
            listing = client.list_tensors()
            before = {name: client.get(name) for name in ("output", "loss", "fc1.weight.grad")}
            with pytest.raises(errors.InvalidArgument) as caught:
                call()
            assert caught.value.reason == "MODEL_REFUSED"
            assert client.list_tensors().version == listing.version
            for name in activations:
                assert client.get(name) is None, name
            for name, value in before.items():
                assert np.array_equal(client.get(name), value), name
            shown = {t.name: t.present for t in client.list_tensors().tensors}
            assert not any(shown[name] for name in activations)
            with pytest.raises(errors.FailedPrecondition) as refused:
                client.backward()
            assert refused.value.reason == "GRAPH_FREED"
            assert "let go of as a later call's pass began" in refused.value.message
            assert client.list_tensors().version == listing.version
        # A pass that succeeds has a graph of its own again: once Backward frees it, a
        # second Backward is told that, not that a later call let it go.
        client.forward(*good)
        client.backward()
        with pytest.raises(errors.FailedPrecondition) as freed:
            client.backward()
        assert "already freed by Backward" in freed.value.message


class _Residual(nn.Module):
    """A ResNet-like block: its layers' outputs are changed in place after they are returned."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.fc(x))
        out += x  # changes bn.output in place
        return self.head(self.relu(out))  # and so does the ReLU, bn.output again


def _local_outputs(model: nn.Module, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """Each module's output as it returned it: copied in the hook."""
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(
                lambda m, a, out, name=name: outputs.__setitem__(name, out.detach().numpy().copy())
            )
    model(torch.from_numpy(x))
    return outputs


def test_an_output_the_model_changes_in_place_later_reads_as_changed() -> None:
    """As the .proto says: kept without a copy, as a forward hook sees it. bn.output reads as
    relu(bn(fc(x)) + x), fc.output and the ReLU's as the module returned them (found by the
    forty-fourth session's walkthrough as a researcher; copying such outputs was built and
    taken out again, RELIABILITY.md says why)."""
    spec = ModelSpec("Residual", _Residual, (4,), 3)
    running = start(Trainer(spec, seed=0), "127.0.0.1", 0)
    torch.manual_seed(0)
    local = _Residual()
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    want = _local_outputs(local, x)
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client:
        client.forward(x, np.arange(8) % 3)
        for name in ("fc", "relu", "head"):
            np.testing.assert_array_equal(client.get(f"{name}.output"), want[name], name)
        np.testing.assert_array_equal(client.get("bn.output"), want["relu"])  # changed later
        assert not np.array_equal(want["bn"], want["relu"])
    running.stop(grace=None)


@pytest.mark.parametrize(
    ("settings", "keys"),
    [
        ({"kind": "sgd", "lr": 0.1, "momentum": 0.9}, ["momentum_buffer"]),
        ({"kind": "adam", "lr": 0.01}, ["step", "exp_avg", "exp_avg_sq"]),
    ],
)
def test_optimizer_state_equals_local_optimizer_state(
    client: gradwire.Client, settings: dict[str, Any], keys: list[str]
) -> None:
    client.set_optimizer(**settings)
    names = [f"optimizer.{p}.{key}" for p in PARAMETERS for key in keys]
    listing = {t.name: t for t in client.list_tensors().tensors}
    assert all(listing[n].kind == "optimizer_state" and not listing[n].present for n in names)
    model = local_model()
    kind = settings.pop("kind")
    optimizer = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)(
        model.parameters(), **settings
    )
    for seed in (1, 2):
        x, y = random_batch(8, seed)
        client.train_step(x, y, zero_grad=True)
        local_train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y), zero_grad=True)
    params = dict(model.named_parameters())
    for p in PARAMETERS:
        for key in keys:
            want = torch.as_tensor(optimizer.state[params[p]][key]).numpy()
            assert np.array_equal(client.get(f"optimizer.{p}.{key}"), want), (p, key)


def test_optimizer_state_names_follow_the_optimizer(client: gradwire.Client) -> None:
    with pytest.raises(errors.NotFound):  # plain SGD keeps no momentum buffer
        client.get("optimizer.conv1.weight.momentum_buffer")
    client.set_optimizer("adam")
    assert "optimizer.conv1.weight.exp_avg" in client.list_tensors().names()


def _unkept(client: gradwire.Client, name: str, watch: bool = False) -> errors.NotFound:
    with pytest.raises(errors.NotFound) as refused:
        next(client.watch([name], timeout=30)) if watch else client.get(name)
    assert refused.value.reason == "UNKNOWN_TENSOR"
    assert refused.value.metadata["name"] == name
    assert refused.value.message.startswith(f"no tensor named {name!r}; the optimizer in use, ")
    return refused.value


def test_state_the_optimizer_does_not_keep_is_named_for_what_it_keeps(
    client: gradwire.Client,
) -> None:
    """Such a name was answered "did you mean 'conv1.weight.delta'" (found by a review
    integrating from Node.js): the optimizer in use, what it keeps, and when its kind does."""
    buffer, exp_avg = "optimizer.conv1.weight.momentum_buffer", "optimizer.conv1.weight.exp_avg"
    for name, watch in ((exp_avg, False), (buffer, True), (buffer, False)):
        error = _unkept(client, name, watch)
        assert "SGD with momentum 0, keeps no state for conv1.weight" in error.message
        assert error.metadata["closest"] == ""
    assert "SGD keeps a momentum_buffer only with momentum, from the first Step" in error.message
    assert "Adam keeps step, exp_avg and exp_avg_sq, from the first Step" in (
        _unkept(client, exp_avg).message
    )
    client.set_optimizer("sgd", lr=0.1, momentum=0.9)
    error = _unkept(client, exp_avg)
    assert "SGD with momentum 0.9, keeps momentum_buffer for conv1.weight, not exp_avg" in (
        error.message
    )
    assert error.metadata["closest"] == buffer
    train_once(client, seed=1)
    client.set_optimizer(momentum=0.0, keep_state=True)  # torch keeps the buffers, unused
    assert "uses no state for conv1.weight (the momentum_buffer it had before momentum 0 " in (
        _unkept(client, buffer).message
    )
    client.set_optimizer("adam")
    error = _unkept(client, buffer, watch=True)
    assert "Adam, keeps step, exp_avg and exp_avg_sq for conv1.weight, not momentum_buffer: " in (
        error.message
    )
    assert error.metadata["closest"] == ",".join(
        f"optimizer.conv1.weight.{key}" for key in ("step", "exp_avg", "exp_avg_sq")
    )
    # Not state either kind keeps: the names nearest, as for any other name.
    with pytest.raises(errors.NotFound, match=r"; did you mean 'optimizer\.conv1\.weight"):
        client.get("optimizer.conv1.weight.velocity")
    # A state's name without "optimizer." is no state's: the names nearest, as for any other.
    with pytest.raises(errors.NotFound) as caught:
        client.get("conv1.weight.exp_avg")
    assert "the optimizer in use" not in caught.value.message
    assert "; did you mean 'optimizer.conv1.weight.exp_avg'" in caught.value.message
    # The momentum as %g shows it: six significant digits, not every one of 1/3.
    client.set_optimizer("sgd", lr=0.1, momentum=1 / 3)
    assert "SGD with momentum 0.333333, keeps momentum_buffer for conv1.weight, not " in (
        _unkept(client, exp_avg).message
    )


def test_delta_is_exactly_the_change_the_last_step_made(client: gradwire.Client) -> None:
    for p in PARAMETERS:  # each asked for: each parameter's change is recorded from its ask
        assert client.shape(f"{p}.delta") is None  # no Step yet
    x, y = random_batch(8, 7)
    client.forward(x, y)
    client.backward()
    before = {p: client.get(p) for p in PARAMETERS}
    client.step()
    for p in PARAMETERS:
        assert np.array_equal(client.get(f"{p}.delta"), client.get(p) - before[p]), p
    delta = client.get("conv1.weight.delta")
    client.set("conv1.weight", 0.5)  # a write is no Step: the delta stays the last Step's
    assert np.array_equal(client.get("conv1.weight.delta"), delta)
    client.reset(seed=0)
    assert client.shape("conv1.weight.delta") is None


def test_deltas_are_recorded_from_the_first_time_one_is_asked_for(
    client: gradwire.Client,
) -> None:
    train_once(client, seed=1)  # nobody asked yet: this Step skips the copy deltas need
    assert client.shape("linear.weight.delta") is None  # asking turns recording on
    before = client.get("linear.weight")
    train_once(client, seed=2)
    assert np.array_equal(client.get("linear.weight.delta"), client.get("linear.weight") - before)


class BigAndSmall(nn.Module):
    """A large layer and a small one: a delta of the small one's is cheap to record, of the
    large one's the model's size again."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1024, 1024)  # a weight of 4 MiB
        self.small = nn.Linear(1024, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.small(self.big(x))
        return out


BIG_AND_SMALL = ModelSpec("BigAndSmall", BigAndSmall, (1024,), 4)


def big_and_small_batch(seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 1024), dtype=np.float32), rng.integers(0, 4, 8)


def _present_deltas(client: gradwire.Client) -> set[str]:
    """The deltas ListTensors lists present; a listing asks for none."""
    listing = client.list_tensors().tensors
    return {t.name for t in listing if t.kind == "delta" and t.present}


def _ask_for_delta(client: gradwire.Client, how: str, name: str) -> None:
    """Asks for delta `name` as a caller would: a read, statistics, a watch's first update
    (the watch then ended), or a TrainStep's fetch (which also takes a step)."""
    if how == "get":
        assert client.get(name) is None
    elif how == "stats":
        assert client.stats(name).stats is None
    elif how == "watch":
        stream = client.watch([name], values=True, timeout=30)
        assert not next(stream)[name].present
        stream.close()
    else:
        assert how == "train_step"
        x, y = big_and_small_batch(0)
        (fetched,) = client.train_step(x, y, fetch=[name]).fetched
        assert fetched.value is not None  # this step's change: asked before the step began


@pytest.mark.parametrize("how", ["get", "stats", "watch", "train_step"])
def test_asking_one_delta_records_that_parameter_alone(how: str) -> None:
    """Reading one parameter's delta (40 bytes of a bias) turned recording on for the whole
    model, for good: every Step then copied every parameter into buffers as large as the
    model, held until the server stopped (a 1.41 GB model's server grew from 3.18 to 4.59
    GB, its steps peaked at 5.99 GB: found by a review serving a large model). Each way of
    asking records the parameter asked for, from then on, and no other."""
    with serving(BIG_AND_SMALL, seed=0) as (trainer, client):
        _ask_for_delta(client, how, "small.bias.delta")
        for seed in (1, 2):
            before = client.get("small.bias")
            x, y = big_and_small_batch(seed)
            client.train_step(x, y)
            after = client.get("small.bias")
            assert np.array_equal(client.get("small.bias.delta"), after - before)
            assert _present_deltas(client) == {"small.bias.delta"}
            assert set(trainer._delta_buffers) == {"small.bias"}  # no copy of big.weight
        # Another parameter's is absent (None) until asked for, and recorded from then on.
        assert client.get("big.weight.delta") is None
        before = client.get("big.weight")
        client.train_step(*big_and_small_batch(3))
        assert np.array_equal(client.get("big.weight.delta"), client.get("big.weight") - before)
        assert _present_deltas(client) == {"small.bias.delta", "big.weight.delta"}


def test_a_watch_of_a_delta_sees_each_step_change_of_that_parameter_alone() -> None:
    with serving(BIG_AND_SMALL, seed=0) as (trainer, client):
        stream = client.watch(["small.weight.delta"], values=True, timeout=30)
        try:
            assert not next(stream)["small.weight.delta"].present  # no Step yet
            before = client.get("small.weight")
            client.train_step(*big_and_small_batch(1))
            change = client.get("small.weight") - before
            update = next(stream)
            while update.cause != "TrainStep" or update["small.weight.delta"].value is None:
                update = next(stream)
            assert np.array_equal(update["small.weight.delta"].value, change)
        finally:
            stream.close()
        assert _present_deltas(client) == {"small.weight.delta"}
        assert set(trainer._delta_buffers) == {"small.weight"}


def test_the_memory_estimate_counts_the_delta_buffers_of_the_parameters_recorded() -> None:
    trainer = Trainer(BIG_AND_SMALL, seed=0)
    try:
        nothing_recorded = trainer._update_bytes()
        trainer.read("small.bias.delta")
        assert trainer._update_bytes() - nothing_recorded == 4 * 4  # small.bias's buffer
        trainer.read("big.weight.delta")
        assert trainer._update_bytes() - nothing_recorded == 4 * 4 + 1024 * 1024 * 4
    finally:
        trainer.close()


class WideAndHead(nn.Module):
    """A weight of 64 MiB before a head of 20 values."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(4096, 4096, bias=False)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.wide(x)[:, :4])
        return out


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.memory
def test_a_small_delta_asked_for_costs_the_server_no_copy_of_the_model() -> None:
    """The server's memory over a step, before and after the 16 bytes of head.bias.delta are
    read: each Step copied all 64 MiB of the weights from then on, for good (found by a
    review serving a large model, +1.41 GB for a 1.41 GB model)."""
    spec = ModelSpec("WideAndHead", WideAndHead, (4096,), 4)
    x, y = np.ones((1, 4096), dtype=np.float32), np.zeros(1, dtype=np.int64)
    with serving(spec, seed=0) as (trainer, client):
        for _ in range(2):  # gradients made, and kept beside the next step's: the peak held
            client.train_step(x, y)
        held = _resident()
        before = client.get("head.bias")
        assert client.get("head.bias.delta") is None
        client.train_step(x, y)
        assert np.array_equal(client.get("head.bias.delta"), client.get("head.bias") - before)
        assert _resident() - held < 16 << 20  # a copy of the weight: 64 MiB more
        assert sum(b.nbytes for b in trainer._delta_buffers.values()) == 16


@pytest.mark.parametrize("track_deltas", [False, True])
def test_track_deltas_records_every_parameter_and_by_default_none_unasked(
    track_deltas: bool,
) -> None:
    """Trainer(track_deltas=True) records every parameter's change from the start, with no
    ask; by default none is recorded until asked for, whatever another delta's ask."""
    trainer = Trainer(BIG_AND_SMALL, seed=0, track_deltas=track_deltas)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client:
            if not track_deltas:
                assert client.get("small.bias.delta") is None
            names = [n for n in trainer.parameters]
            before = {n: client.get(n) for n in names}
            client.train_step(*big_and_small_batch(1))
            recorded = names if track_deltas else ["small.bias"]
            assert _present_deltas(client) == {f"{n}.delta" for n in recorded}
            assert set(trainer._delta_buffers) == set(recorded)
            for n in recorded:
                assert np.array_equal(client.get(f"{n}.delta"), client.get(n) - before[n]), n
    finally:
        running.stop(grace=None)


def test_new_kinds_are_read_only(client: gradwire.Client) -> None:
    client.set_optimizer("sgd", lr=0.1, momentum=0.9)
    train_once(client)
    for name in ("conv1.output", "conv1.weight.delta", "optimizer.conv1.weight.momentum_buffer"):
        with pytest.raises(errors.InvalidArgument) as caught:
            client.set(name, 0.0)
        assert caught.value.reason == "READ_ONLY"


def test_train_step_fetches_activations_deltas_and_optimizer_state(
    client: gradwire.Client,
) -> None:
    client.set_optimizer("sgd", lr=0.1, momentum=0.9)
    x, y = random_batch(8, 8)
    fetch = [
        "conv2.output[0, 0]",
        "linear.weight.delta[:2]",
        "optimizer.linear.weight.momentum_buffer[0, :5]",
    ]
    result = client.train_step(x, y, fetch=fetch)
    for read, selector in zip(result.fetched, fetch, strict=True):
        assert np.array_equal(read.value, client.get(selector)), selector
    assert result.fetched[0].value.shape == (10, 10)
    with pytest.raises(errors.OutOfRange):  # refused before the step: nothing changed
        client.train_step(x, y, fetch=["conv2.output[8]"])
    assert client.list_tensors().version == result.version


class Branching(nn.Module):
    """Reads a value of its input to choose a path: torch cannot run it on meta tensors, so
    the shapes of its outputs are known only after a forward pass. A BatchNorm too, whose
    running statistics every forward pass in training changes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 1e6:  # .item() under the hood: refused on meta tensors
            x = x.clamp(-1e6, 1e6)
        out: torch.Tensor = self.norm(self.lin(x))
        return out


class Positions(nn.Module):
    """A table of positions as a layer of its own, made when first needed."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table: torch.Tensor
        self.register_buffer("table", table)


class Caching(nn.Module):
    """Keeps a tensor made by its first forward pass, on the input's device, as models keep a
    table of positions: in an attribute (one it has from the start, or one it makes then), as
    a buffer it registers then, in a dict or a list, in a list in a dict, on an object of
    its own, or in a layer it makes then."""

    where = "attribute"

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.offsets: torch.Tensor | None = None
        self.cache: dict[str, torch.Tensor] = {}
        self.tables: list[torch.Tensor] = []
        self.nested: dict[str, list[torch.Tensor]] = {"tables": []}
        self.state = SimpleNamespace(table=None)

    def kept(self) -> torch.Tensor | None:
        if self.where == "buffer":
            return self._buffers.get("lazy")
        if self.where == "new attribute":
            return vars(self).get("made")
        if self.where == "list":
            return self.tables[0] if self.tables else None
        if self.where == "list in a dict":
            return self.nested["tables"][0] if self.nested["tables"] else None
        if self.where == "object":
            return self.state.table  # type: ignore[no-any-return]
        if self.where == "layer":
            positions = self._modules.get("positions")
            return None if positions is None else positions.get_buffer("table")
        return self.cache.get("offsets") if self.where == "dict" else self.offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept() is None:
            made = torch.arange(4, device=x.device, dtype=x.dtype)
            if self.where == "buffer":
                self.register_buffer("lazy", made, persistent=False)
            elif self.where == "new attribute":
                self.made = made
            elif self.where == "dict":
                self.cache["offsets"] = made
            elif self.where == "list":
                self.tables.append(made)
            elif self.where == "list in a dict":
                self.nested["tables"].append(made)
            elif self.where == "object":
                self.state.table = made
            elif self.where == "layer":
                self.positions = Positions(made)
            else:
                self.offsets = made
        kept = self.kept()
        assert kept is not None
        out: torch.Tensor = self.lin(x + kept)
        return out


class CachingInABuffer(Caching):
    where = "buffer"


class CachingInADict(Caching):
    where = "dict"


class CachingInANewAttribute(Caching):
    where = "new attribute"


class CachingInAList(Caching):
    where = "list"


class CachingInAListInADict(Caching):
    where = "list in a dict"


class CachingOnAnObject(Caching):
    where = "object"


class CachingInALayer(Caching):
    where = "layer"


def test_a_model_that_cannot_run_on_meta_tensors_has_its_outputs_fetched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It answered INTERNAL to any TrainStep fetching a module output, from the run on meta
    # tensors that checks the fetch (found by a review). Its fetches are now checked after the
    # forward pass, and a refusal there puts back what the pass changed.
    trainer = Trainer(ModelSpec("Branching", Branching, (4,), 3), device="cpu", seed=0)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
            y = np.array([0, 1, 2, 0, 1])
            first = client.train_step(x, y, fetch=["lin.output[1:3]", "norm.output"])
            assert np.array_equal(first.fetched[0].value, client.get("lin.output")[1:3])
            assert np.array_equal(first.fetched[1].value, client.get("norm.output"))
            assert first.fetched[1].value.mean(axis=0) == pytest.approx([0, 0, 0], abs=1e-6)
            model = trainer._model
            norm = model.get_submodule("norm")
            assert isinstance(norm, nn.BatchNorm1d)
            before = {
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "output": client.get("lin.output"),
                "version": client.list_tensors().version,
            }
            refused: list[tuple[str, type[errors.RemoteError]]] = [
                ("lin.output[5]", errors.OutOfRange),
                ("norm.output[0, 0, 0]", errors.InvalidArgument),
            ]
            for fetch, error in refused:
                with pytest.raises(error):
                    client.train_step(x * 2, y, zero_grad=True, fetch=["lin.weight", fetch])
                assert client.list_tensors().version == before["version"]
                assert np.array_equal(client.get("lin.output"), before["output"])
                for key, value in model.state_dict().items():  # the running statistics too
                    assert torch.equal(value, before["state"][key]), (fetch, key)
            monkeypatch.setattr(servicer_module.limits, "MAX_VALUE_BYTES", 40)
            with pytest.raises(errors.ResourceExhausted) as caught:
                client.train_step(x, y, fetch=["lin.output"])  # 60 bytes
            assert caught.value.reason == "FETCH_TOO_LARGE"
            assert client.list_tensors().version == before["version"]
            assert torch.equal(norm.running_mean, before["state"]["norm.running_mean"])
            monkeypatch.undo()
            done = client.train_step(x, y, fetch=["lin.output[0]"])
            assert done.version == before["version"] + 4
            assert np.array_equal(done.fetched[0].value, client.get("lin.output")[0])
    finally:
        running.stop(grace=None)


class Tracking(nn.Module):
    """Keeps the last batch's mean of a layer's output in a buffer, from a forward hook: a
    method of its own, a lambda over it, or a partial; and counts its passes in a numpy
    array, in place."""

    hook = "method"

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen: torch.Tensor
        self.register_buffer("seen", torch.zeros(3))
        self.passes = np.zeros(1)
        if self.hook == "lambda":
            self.lin.register_forward_hook(lambda m, a, o: setattr(self, "seen", o.detach()[0]))
        elif self.hook == "partial":
            self.lin.register_forward_hook(functools.partial(type(self)._track, self))
        else:
            self.lin.register_forward_hook(self._track)

    def _track(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.seen = output.detach().mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        out: torch.Tensor = self.lin(x)
        return out


class TrackingByLambda(Tracking):
    hook = "lambda"


class TrackingByPartial(Tracking):
    hook = "partial"


class Crop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.width = 6

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, : self.width]


class Narrowing(nn.Module):
    """A layer's output one column narrower after each pass in training, down to 2: its
    shape, for one input shape, changes with the model's own state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.crop = Crop()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.crop(self.lin(x))
        if self.training:
            self.crop.width = max(2, self.crop.width - 1)
        out: torch.Tensor = self.head(nn.functional.pad(h, (0, 6 - h.shape[1])))
        return out


@pytest.mark.parametrize("model", [Tracking, TrackingByLambda, TrackingByPartial])
def test_a_layer_s_own_hook_writes_nothing_of_the_run_on_meta_tensors_into_the_model(
    model: type[Tracking],
) -> None:
    # Shared with the model's copy, the hook wrote the copy's meta tensor into the model's
    # buffer: GetTensor and checkpoints failed until the next Forward (a review; a lambda
    # and a partial by a review of the mend, which copied methods alone, and a numpy counter
    # moved in place by the run too).
    with serving(ModelSpec(model.__name__, model, (4,), 3), seed=0) as (trainer, client):
        x, y = np.ones((2, 4), np.float32), np.array([0, 2])
        client.forward(x, y)
        seen = client.get("seen")
        with pytest.raises(errors.OutOfRange):
            client.train_step(x, y, fetch=["lin.output[5]"])
        assert trainer._model.get_buffer("seen").device.type == "cpu"
        assert np.array_equal(client.get("seen"), seen)
        tracking = trainer._model
        assert isinstance(tracking, Tracking) and tracking.passes[0] == 1


def test_module_outputs_whose_shapes_change_are_checked_against_the_pass_s() -> None:
    # The run on meta tensors is kept per input shape: a fetch its shapes passed was refused
    # after the step, the step applied; one that fitted the pass's shapes was refused (a
    # review).
    with serving(ModelSpec("Narrowing", Narrowing, (4,), 3), seed=0) as (trainer, client):
        x, y = np.ones((2, 4), np.float32), np.array([0, 2])
        assert client.train_step(x, y, fetch=["crop.output[0, 4]"]).fetched[0].value.shape == ()
        crop = trainer._model.get_submodule("crop")
        assert isinstance(crop, Crop) and crop.width == 5  # the next pass: 5 wide
        client.train_step(x, y, fetch=["crop.output[0, 4]"])
        assert crop.width == 4  # the next pass: 4 wide, and no column 4
        version = client.list_tensors().version
        with pytest.raises(errors.OutOfRange):
            client.train_step(x, y, fetch=["crop.output[0, 4]"])
        assert client.list_tensors().version == version
        crop.width = 6  # wider than the shapes kept
        assert client.train_step(x, y, fetch=["crop.output[0, 5]"]).version == version + 4
        # Shapes kept from a run made while the layer was narrow refuse a fetch it is wide
        # enough for now: a new run, not a refusal.
        x3, y3 = np.ones((3, 4), np.float32), np.array([0, 1, 2])
        crop.width = 2
        client.train_step(x3, y3, fetch=["crop.output[0, 1]"])  # kept: 2 wide
        crop.width = 6
        assert client.train_step(x3, y3, fetch=["crop.output[0, 5]"]).fetched[0].value.shape == ()


class Locking(nn.Module):
    """Holds a lock, which copy.deepcopy cannot copy: it gets no run on meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            out: torch.Tensor = self.lin(x)
            return out


def test_a_model_that_cannot_be_copied_has_its_fetches_checked_after_the_forward() -> None:
    spec = ModelSpec("Locking", Locking, (4,), 3)
    trainer = Trainer(spec, device="cpu", seed=0, one_thread_for_small_work=True)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            x, y = np.ones((2, 4), np.float32), np.array([0, 2])
            fetched = client.train_step(x, y, fetch=["lin.output[1]"]).fetched[0].value
            assert np.array_equal(fetched, client.get("lin.output")[1])
            assert trainer._meta_run(x.shape, torch.float32) is None
            version, weight = client.list_tensors().version, client.get("lin.weight")
            with pytest.raises(errors.OutOfRange):
                client.train_step(x * 2, y, fetch=["lin.output[2]"])
            assert client.list_tensors().version == version
            assert np.array_equal(client.get("lin.weight"), weight)
            assert np.array_equal(client.get("lin.output")[1], fetched)
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize(
    ("one_thread", "model"),
    [
        (False, Caching),
        (True, Caching),
        (False, CachingInABuffer),
        (False, CachingInADict),
        (False, CachingInANewAttribute),
        (False, CachingInAList),
        (False, CachingInAListInADict),
        (True, CachingInAListInADict),
        (False, CachingOnAnObject),
        (False, CachingInALayer),
    ],
    ids=[
        "attribute",
        "attribute-one-thread",
        "buffer",
        "dict",
        "new-attribute",
        "list",
        "list-in-a-dict",
        "list-in-a-dict-one-thread",
        "object",
        "layer",
    ],
)
def test_a_run_on_meta_tensors_leaves_a_model_s_own_tensors_as_they_were(
    one_thread: bool, model: type[Caching]
) -> None:
    # The meta run that checks a fetch (and, with one thread for small work, counts a step's
    # operations) left a model that makes a tensor in its first forward pass with a meta one:
    # every Forward after it failed INTERNAL (a buffer or a dict entry made so: found by a
    # review of the first mend, which put back attributes alone; a list in a dict, an object
    # or a layer made so: by two later reviews). The run is now made on a copy of the model.
    spec = ModelSpec("Caching", model, (4,), 3)
    trainer = Trainer(spec, device="cpu", seed=0, one_thread_for_small_work=one_thread)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            x, y = np.ones((2, 4), np.float32), np.array([0, 2])
            fetched = client.train_step(x, y, fetch=["lin.output"]).fetched[0].value
            caching = trainer._model
            assert isinstance(caching, model)
            kept = caching.kept()
            assert kept is not None and kept.device.type == "cpu"
            local = model()
            with torch.no_grad():
                for name, p in local.named_parameters():
                    p.copy_(torch.from_numpy(client.get(name)))
            client.forward(x, y)
            assert np.array_equal(client.get("lin.output"), local(torch.from_numpy(x)).detach())
            assert fetched.shape == (2, 3)
            assert client.train_step(x, y, fetch=["lin.output[1]"]).fetched[0].value.shape == (3,)
            with pytest.raises(errors.OutOfRange):  # checked before the step, on the run's shapes
                client.train_step(x, y, fetch=["lin.output[2]"])
            assert caching.kept() is kept
            # A new shape, once the model holds its tensor: a new run on meta tensors, which
            # takes the model's tensor as a meta one, and leaves it.
            x3, y3 = np.ones((3, 4), np.float32), np.array([0, 2, 1])
            assert client.train_step(x3, y3, fetch=["lin.output[2]"]).fetched[0].value.shape == (3,)
            assert trainer._meta_run(x3.shape, torch.float32) is not None
            assert caching.kept() is kept and kept.device.type == "cpu"
    finally:
        running.stop(grace=None)


# --- Watch ------------------------------------------------------------------------------------


class Watcher(Reader):
    """Collects a watch's updates on a thread, until `until` says so or it is stopped."""

    def __init__(
        self,
        client: gradwire.Client,
        selectors: list[str],
        until: Callable[[WatchUpdate], bool],
        **kw: Any,
    ) -> None:
        super().__init__(client.watch(selectors, timeout=30, **kw), until)
        assert self.first.wait(10), "no first update"

    @property
    def updates(self) -> list[WatchUpdate]:
        return self.messages


def test_watch_sends_the_state_now_then_one_update_per_mutation(
    client: gradwire.Client, address: str
) -> None:
    watcher = Watcher(
        client,
        ["conv1.weight.grad[0, 0]", "loss"],
        until=lambda u: u.cause == "ZeroGrad",
        values=True,
    )
    with gradwire.connect(address) as driver:
        x, y = random_batch(8, 9)
        versions = [driver.forward(x, y).version, driver.backward(), driver.step().version]
        versions.append(driver.zero_grad())
    updates = watcher.join()
    first = updates[0]
    assert (first.version, first.cause, first.steps, first.skipped) == (0, "Watch", 0, 0)
    assert not first["loss"].present
    with pytest.raises(KeyError):  # indexed by selector, not by position: no TypeError
        first[0]
    # The watcher may lag behind the driver: it then sees a later state, and counts the skips.
    seen = {u.version: u for u in updates[1:]}
    assert sum(u.skipped + 1 for u in updates[1:]) == len(versions)
    assert max(seen) == versions[-1]
    causes = dict(zip(versions, ["Forward", "Backward", "Step", "ZeroGrad"], strict=True))
    for version, update in seen.items():
        assert update.cause == causes[version]
        assert update.steps == (1 if version >= versions[2] else 0)
    last = seen[versions[-1]]
    assert not last["conv1.weight.grad"].present  # zero_grad set it to None
    assert last["loss"].value == pytest.approx(float(client.get("loss")))


def test_watch_values_and_stats_equal_a_read_at_the_same_version(
    client: gradwire.Client, address: str
) -> None:
    watcher = Watcher(
        client,
        ["linear.weight[:, :8]"],
        until=lambda u: u.cause == "Step",
        values=True,
        stats=True,
        bins=5,
    )
    with gradwire.connect(address) as driver:
        train_once(driver)
    updates = watcher.join()
    latest = updates[-1]
    assert latest.version == client.list_tensors().version
    watched = latest["linear.weight"]
    assert np.array_equal(watched.value, client.get("linear.weight[:, :8]"))
    assert watched.stats is not None
    assert_stats_match(watched.stats, watched.value)
    assert watched.stats.histogram is not None and len(watched.stats.histogram.counts) == 5


def test_each_update_is_one_version_while_training_runs(
    client: gradwire.Client, address: str
) -> None:
    # The statistics are computed under the trainer's lock; values copied any later would
    # come from a later step and disagree with them.
    watcher = Watcher(
        client,
        ["linear.weight"],
        until=lambda u: u.steps == 60,
        values=True,
        stats=True,
    )
    x, y = random_batch(8, 12)
    with gradwire.connect(address) as driver:
        driver.set_optimizer("sgd", lr=0.1)
        for _ in range(60):
            driver.train_step(x, y)
    updates = watcher.join()
    assert len(updates) >= 2
    for update in updates:
        watched = update["linear.weight"]
        assert watched.stats is not None
        assert_stats_match(watched.stats, watched.value)


def test_each_mutation_is_the_cause_a_watcher_hears_of(client: gradwire.Client) -> None:
    """Each update names the RPC whose mutation led to it: one call at a time, each update
    read before the next call, so none is skipped."""
    stream = client.watch(["conv1.weight"], timeout=30)
    assert next(stream).cause == "Watch"
    x, y = random_batch(8, 12)
    for cause, call in (
        ("Forward", lambda: client.forward(x, y)),
        ("SetTensor", lambda: client.set("conv1.weight[0, 0, 0, 0]", np.float32(0.5))),
        ("FillParameters", lambda: client.fill_parameters(0.5, ["conv1.weight"])),
        ("SetOptimizer", lambda: client.set_optimizer("sgd", lr=0.01)),
    ):
        call()
        update = next(stream)
        assert (update.cause, update.skipped) == (cause, 0)
    stream.close()


def test_a_train_step_is_one_update_whose_version_moved_by_its_parts(
    client: gradwire.Client,
) -> None:
    """A TrainStep moves the version by 4 (3 without zero_grad), one for each of its parts,
    yet is one update to a Watch, `skipped` counting none of them; so is each step of a
    Train. The contract said an update follows each applied mutation and that a TrainStep
    adds one to the version for each part: a C++ client that checked each update's version
    against the last one's plus skipped + 1 took the gap for updates lost (found by a review
    of the .proto as the only contract, compiled and called from C++)."""
    root = Path(__file__).resolve().parents[1]
    contract = (root / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert "A TrainStep, and each step of a Train, is one update here" in said
    stream = client.watch(["loss"], timeout=30, latest=False)  # each update as it was sent
    version = next(stream).version
    x, y = random_batch(8, 12)
    for zero_grad, parts in ((True, 4), (False, 3)):
        moved = client.train_step(x, y, zero_grad=zero_grad).version
        update = next(stream)
        assert (update.cause, update.version, update.skipped) == ("TrainStep", moved, 0)
        assert moved == version + parts
        version = moved
    last = list(client.train(x, y, 2))[-1].version
    steps = [next(stream)]
    while steps[-1].version != last:  # a watcher behind the run may see both steps in one
        steps.append(next(stream))
    assert {u.cause for u in steps} == {"TrainStep"}
    assert sum(u.skipped + 1 for u in steps) == 2
    assert last == version + 8
    stream.close()


def test_watch_every_n_steps(client: gradwire.Client, address: str) -> None:
    watcher = Watcher(client, ["conv1.weight"], until=lambda u: u.steps == 4, every_steps=2)
    x, y = random_batch(8, 10)
    with gradwire.connect(address) as driver:
        driver.set_optimizer("sgd", lr=0.01)
        for _ in range(4):
            driver.train_step(x, y)
            time.sleep(0.05)
    updates = watcher.join()
    assert [u.steps for u in updates] == [0, 2, 4]
    assert [u.cause for u in updates] == ["Watch", "TrainStep", "TrainStep"]
    assert all(u["conv1.weight"].stats is not None for u in updates)  # the default


def test_watch_every_n_steps_sees_a_reset_before_any_step(client: gradwire.Client) -> None:
    # A Reset was known only by the step counter going down: one made before any Step (the
    # counter 0 before and after) sent no update, though the contract promises one.
    stream = client.watch(["conv1.weight"], every_steps=2, timeout=20)
    assert next(stream).cause == "Watch"
    client.zero_grad()  # a mutation that is not a Step: no update due
    version = client.reset(seed=1)
    update = next(stream)
    stream.close()
    assert (update.cause, update.version, update.steps) == ("Reset", version, 0)


def test_a_slow_watcher_gets_the_latest_state_and_a_skip_count(
    client: gradwire.Client, address: str
) -> None:
    # 3 MiB per update: a watcher that reads nothing fills the transport's window in a few,
    # and the server then skips updates for it instead of queueing them (or waiting).
    stream = client.watch(["conv2.output"], values=True, timeout=60)
    assert next(stream).version == 0
    x, y = random_batch(256, 11)
    with gradwire.connect(address) as driver:
        driver.set_optimizer("sgd", lr=0.01)
        for _ in range(5):
            driver.train_step(x, y)  # none waits on the watcher
        final = driver.get("conv2.output")
    updates = []
    for update in stream:
        updates.append(update)
        if update.version == 21:
            break
    stream.close()
    # One update is due per mutating call (a TrainStep's four parts are one): 6 in all,
    # each delivered or counted as skipped.
    assert sum(u.skipped + 1 for u in updates) == 6
    assert any(u.skipped for u in updates)
    assert np.array_equal(updates[-1]["conv2.output"].value, final)


@pytest.mark.parametrize("latest", [True, False])
def test_a_loop_slower_than_the_updates_takes_the_newest(
    client: gradwire.Client, address: str, latest: bool
) -> None:
    """Small updates that gRPC had buffered came one by one, each as it was: a loop that
    looked once the training was over read the first of 60 steps, and needed 60 reads to
    reach the server's state (a review read updates hundreds of steps behind). Read as they
    come (`latest`, the default), each update taken is the newest received, those it
    replaced counted in its `skipped`; without, the buffered ones still come in order."""
    steps = 60
    stream = client.watch(["loss", "conv1.weight.grad"], timeout=60, latest=latest)
    first = next(stream)
    x, y = random_batch(8, 5)
    with gradwire.connect(address) as driver:
        for _ in range(steps):
            final = driver.train_step(x, y).version
    taken = []
    for update in stream:
        taken.append(update)
        if update.version == final:
            break
    stream.close()
    assert sum(u.skipped + 1 for u in taken) == steps  # each step's update taken or counted
    assert taken[-1]["loss"].stats is not None
    assert taken[-1].steps - first.steps == steps  # the last is the server's final state
    if latest:
        assert len(taken) < steps // 4, [u.version for u in taken]
    else:  # 60 small updates fit in gRPC's buffer: most come one by one (the server merges
        # one into the next only when a step is applied before the update is made)
        assert len(taken) > steps * 3 // 4, [u.version for u in taken]


def test_watch_refuses_bad_items_with_a_status(client: gradwire.Client) -> None:
    with pytest.raises(errors.NotFound):
        next(client.watch(["conv1.weigth"]))
    with pytest.raises(errors.OutOfRange):
        next(client.watch(["conv1.weight[99]"]))
    # The client refuses these itself, when watch() is called: sent as they are, the
    # server refuses them too.
    item = pb.WatchItem(name="conv1.weight", stats=True)
    bad_bins = pb.WatchItem(name="conv1.weight", stats=True, histogram_bins=-2)
    # Refused with values alone too, where no statistics would use them.
    bins_unused = pb.WatchItem(name="conv1.weight", values=True, histogram_bins=-2)
    for request, reason, said in (
        (pb.WatchRequest(items=[bad_bins]), "BAD_BINS", "histogram_bins must be between"),
        (pb.WatchRequest(items=[bins_unused]), "BAD_BINS", "histogram_bins must be between"),
        # Each value named in the order given, the negative one and the other.
        (pb.WatchRequest(items=[item], every_steps=-1), "BAD_REQUEST", "negative, got -1 and 0"),
        (
            pb.WatchRequest(items=[item], every_steps=2, min_interval_ms=-1),
            "BAD_REQUEST",
            "every_steps and min_interval_ms cannot be negative, got 2 and -1",
        ),
        (pb.WatchRequest(), "BAD_REQUEST", "Watch needs at least one item"),
    ):
        with pytest.raises(errors.InvalidArgument) as no:
            next(client._stream("Watch", request))
        assert (no.value.reason, said in no.value.message) == (reason, True)


def test_a_watch_item_asking_for_neither_values_nor_stats_gets_stats(
    client: gradwire.Client,
) -> None:
    request = pb.WatchRequest(items=[pb.WatchItem(name="conv1.weight")])
    stream = client._stream("Watch", request, timeout=30)
    first = pb.WatchUpdate.FromString(next(stream))
    stream.close()  # type: ignore[attr-defined]
    watched = first.tensors[0]
    assert watched.HasField("stats") and not watched.HasField("tensor")
    assert list(watched.full_shape) == [16, 3, 3, 3]


def test_a_watch_item_asking_for_values_alone_gets_no_stats(client: gradwire.Client) -> None:
    """Statistics are sent only when asked for, or when nothing is: values alone come
    without them (the update's room was counted without them too)."""
    request = pb.WatchRequest(items=[pb.WatchItem(name="conv1.weight", values=True)])
    stream = client._stream("Watch", request, timeout=30)
    first = pb.WatchUpdate.FromString(next(stream))
    stream.close()  # type: ignore[attr-defined]
    watched = first.tensors[0]
    assert watched.HasField("tensor") and not watched.HasField("stats")


def test_a_watch_ends_with_an_error_when_its_session_closes(address: str) -> None:
    """Not as a normal end, which a reader would take for one (a review saw OK): as a Train
    on it does, FAILED_PRECONDITION (CLOSED)."""
    with gradwire.connect(address) as owner:
        session = owner.open_session(seed=0)
        stream = session.watch(["conv1.weight"], timeout=30)
        assert next(stream).version == 0
        session.close()
        with pytest.raises(errors.FailedPrecondition, match="was closed") as info:
            next(stream)
        assert info.value.reason == "CLOSED"
        assert info.value.message.endswith("nothing more to watch; open a session and watch it")


# --- Train: a server-side run ----------------------------------------------------------------


def test_a_train_s_rate_counts_every_step_done(client: gradwire.Client) -> None:
    """steps_per_s is the steps done over the time the run has taken: at least the steps
    over the time the caller has waited, which began first (a rate that left a step out
    said 0 steps a second after the first)."""
    began = time.perf_counter()
    for p in client.train(Fill.ones(8, 3, 10, 10), Fill.ones(8), steps=3):
        assert p.steps_per_s >= p.step / (time.perf_counter() - began), p


def test_train_run_equals_a_local_loop_with_reseeded_fills(
    client: gradwire.Client, address: str
) -> None:
    client.set_optimizer("sgd", lr=0.01, momentum=0.9)
    x, y = Fill.normal(8, 3, 10, 10, seed=100), Fill.randint(0, 20, 8, seed=200)
    progress = list(client.train(x, y, steps=6, every=4))
    assert [(p.step, p.steps, p.done) for p in progress] == [(4, 6, False), (6, 6, True)]
    assert all(p.steps_per_s > 0 for p in progress)  # the server's rate, passed on
    assert progress[-1].version == client.list_tensors().version == 1 + 6 * 4
    # The same run, one TrainStep at a time with the seeds advanced, on a second server.
    with gradwire.connect(address) as c, c.open_session(0, "sgd", lr=0.01, momentum=0.9) as other:
        for k in range(6):
            # Fill.reseeded is the client's account of a run's step k: it must be the server's
            step_x, step_y = x.reseeded(k), y.reseeded(k)
            assert (step_x.seed, step_y.seed) == (100 + k, 200 + k)
            result = other.train_step(step_x, step_y)
        assert result.loss == progress[-1].loss
        for p in PARAMETERS:
            assert np.array_equal(other.get(p), client.get(p)), p


def test_train_run_of_a_sent_batch_equals_a_local_loop(client: gradwire.Client) -> None:
    # A tensor sent once serves every step (staged on the model's device once): each step
    # must see it whole and unchanged, as the local loop does.
    client.set_optimizer("sgd", lr=0.05, momentum=0.9)
    x, y = random_batch(8, seed=7)
    progress = list(client.train(x, y, steps=5, every=5))
    model = local_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        _, loss = local_train_step(
            model, optimizer, torch.from_numpy(x), torch.from_numpy(y), zero_grad=True
        )
    assert progress[-1].done and progress[-1].loss == loss.item()
    for name, p in model.named_parameters():
        assert np.array_equal(client.get(name), p.detach().numpy()), name
    np.testing.assert_array_equal(client.get("input"), x)


def test_train_stops_between_steps_when_cancelled(client: gradwire.Client) -> None:
    client.set_optimizer("sgd", lr=0.001)
    run = client.train(Fill.ones(8, 3, 10, 10), Fill.ones(8), steps=10_000, every=1)
    first = next(run)
    run.close()  # cancels the call
    deadline = time.monotonic() + 10
    version = client.list_tensors().version
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = client.list_tensors().version
        if again == version:
            break
        version = again
    assert first.step >= 1
    assert (version - 1) % 4 == 0  # whole steps only: zero_grad, forward, backward, step
    assert version < 1 + 10_000 * 4


def test_a_train_that_reports_no_progress_still_stops_between_steps_when_cancelled(
    client: gradwire.Client, address: str
) -> None:
    """A run that yields nothing until its end is asked nothing by gRPC meanwhile: it sees
    the cancel itself, between two steps (else it ran on to its last step)."""
    client.set_optimizer("sgd", lr=0.001)
    start = client.list_tensors().version
    steps = 1_000_000
    request = pb.TrainRequest(
        input=pb.TensorSource(fill=Fill.ones(8, 3, 10, 10).to_proto()),
        target=pb.TensorSource(fill=Fill.ones(8).to_proto()),
        steps=steps,
        every=steps,
    )
    with grpc.insecure_channel(address) as channel:
        train = channel.unary_stream(
            "/gradwire.v1.Trainer/Train",
            request_serializer=pb.TrainRequest.SerializeToString,
            response_deserializer=pb.TrainProgress.FromString,
        )
        call = train(request, timeout=600)
        eventually(lambda: client.list_tensors().version > start + 8, "the run never began")
        call.cancel()
    versions = [client.list_tensors().version]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and versions[-2:-1] != versions[-1:]:
        time.sleep(0.2)
        versions.append(client.list_tensors().version)
    assert versions[-2] == versions[-1], "the run went on after its cancel"
    assert (versions[-1] - start) % 4 == 0 and versions[-1] < start + steps * 4


def test_train_past_its_timeout_says_the_steps_applied(client: gradwire.Client) -> None:
    # The server ends the run between two steps before the caller's deadline, the count
    # said; gRPC ended it at the deadline with no word of the steps applied.
    client.set_optimizer("sgd", lr=0.001)
    before = client.list_tensors().version
    run = client.train(Fill.ones(8, 3, 10, 10), Fill.ones(8), steps=10**6, every=10**6, timeout=2)
    with pytest.raises(errors.DeadlineExceeded, match=r"stopped after [0-9]+ of 1000000") as got:
        list(run)
    assert got.value.reason == "DEADLINE_PASSED"
    done = int(got.value.metadata["steps_done"])
    after = client.list_tensors().version
    assert done >= 1 and int(got.value.metadata["version"]) == after == before + 4 * done
    assert f"training stopped after {done} of 1000000 steps" in got.value.message  # as counted


class _SlowFirst(nn.Module):
    """A first step of 1 s, as a GPU's warm-up takes, then quick ones (its pass on meta
    tensors, the server's memory estimate, is not a step)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.warm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta and not self.warm:
            self.warm = True
            time.sleep(1.0)
        return self.linear(x)


def test_train_s_deadline_is_not_judged_by_its_first_step() -> None:
    """The run was judged by the slowest of its steps, the first's warm-up among them: a
    first step of 2 s within 3 s stopped the run there, where 18 more fit (a review)."""
    with serving(ModelSpec("SlowFirst", _SlowFirst, (4,), 2), seed=0) as (_, client):
        run = client.train(
            Fill.ones(2, 4), Fill.zeros(2, dtype="int64"), 10**6, every=10**6, timeout=2
        )
        with pytest.raises(errors.DeadlineExceeded) as got:
            list(run)
    assert got.value.reason == "DEADLINE_PASSED"
    assert int(got.value.metadata["steps_done"]) > 10


@pytest.mark.parametrize(
    ("steps", "every", "target"),
    [(0, 1, Fill.ones(8)), (3, -1, Fill.ones(8)), (3, 1, None)],
)
def test_bad_train_requests_are_invalid_argument(
    client: gradwire.Client, steps: int, every: int, target: Any
) -> None:
    # The client refuses them itself, when train() is called; sent as they are, the server
    # refuses them too.
    with pytest.raises(ValueError):
        client.train(Fill.ones(8, 3, 10, 10), target, steps=steps, every=every)
    request = pb.TrainRequest(
        input=pb.TensorSource(fill=Fill.ones(8, 3, 10, 10).to_proto()), steps=steps, every=every
    )
    if target is not None:
        request.target.fill.CopyFrom(target.to_proto())
    with pytest.raises(errors.InvalidArgument):
        list(client._stream("Train", request))
    assert client.list_tensors().version == 0


def test_a_train_request_s_refusals_name_its_rpc_and_its_field(client: gradwire.Client) -> None:
    """What is missing or bad is named as the caller sent it: Train's request, its input."""
    ones = pb.TensorSource(fill=Fill.ones(8, 3, 10, 10).to_proto())
    with pytest.raises(errors.InvalidArgument) as refused:
        list(client._stream("Train", pb.TrainRequest(input=ones, steps=3)))
    assert refused.value.message.startswith("Train needs an input and a target"), refused.value
    bad = pb.TensorSource(fill=pb.Fill(kind=99, shape=[8, 3, 10, 10]))  # type: ignore[arg-type]
    target = pb.TensorSource(fill=Fill.ones(8).to_proto())
    with pytest.raises(errors.InvalidArgument) as refused:
        list(client._stream("Train", pb.TrainRequest(input=bad, target=target, steps=3)))
    assert refused.value.message.startswith("input: fill kind 99 is not one of"), refused.value
    with pytest.raises(errors.InvalidArgument) as refused:
        list(client._stream("Train", pb.TrainRequest(input=ones, target=bad, steps=3)))
    assert refused.value.message.startswith("target: fill kind 99 is not one of"), refused.value
    assert client.list_tensors().version == 0


def test_train_refuses_a_bad_input_before_any_step(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="takes"):
        list(client.train(Fill.ones(8, 3, 9, 9), Fill.ones(8), steps=3))
    assert client.list_tensors().version == 0


def test_a_train_input_fill_of_a_wrong_shape_is_refused_before_it_is_made(
    client: gradwire.Client, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a Forward's and a TrainStep's are (test_trainer.py): 2**28 values made in full
    took 11-17 s and 3.6 GB of the server before the refusal."""
    made: list[str] = []
    make = trainer._make

    def recorded(source: Any, dtype: torch.dtype, what: str) -> torch.Tensor:
        made.append(what)
        return make(source, dtype, what)

    monkeypatch.setattr(trainer, "_make", recorded)
    with pytest.raises(errors.InvalidArgument, match="takes") as refused:
        list(client.train(Fill.ones(2**20, 3, 10), Fill.zeros(1), steps=3))
    assert refused.value.reason == "BAD_INPUT_SHAPE"
    assert made == []
    assert client.list_tensors().version == 0


# --- another model: everything above follows it ------------------------------------------------


@contextmanager
def mlp_and_a_copy() -> Iterator[tuple[gradwire.Client, nn.Module, Running]]:
    """A server of TINY_MLP, a client of it, and a local TinyMLP holding its parameters."""
    running = start(Trainer(TINY_MLP, device="cpu", seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            local = TINY_MLP.factory()
            with torch.no_grad():
                for name, p in local.named_parameters():
                    p.copy_(torch.from_numpy(client.get(name)))
            yield client, local, running
    finally:
        running.stop(grace=None)


def test_a_model_s_buffers_are_read_as_pytorch_keeps_them() -> None:
    # BatchNorm's running statistics could not be read (a researcher's walkthrough).
    with mlp_and_a_copy() as (client, local, _):
        optimizer = torch.optim.SGD(local.parameters(), lr=0.01)
        client.set_optimizer("sgd", lr=0.01)
        listing = {t.name: t for t in client.list_tensors().tensors}
        buffers = ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
        assert [listing[b].kind for b in buffers] == ["buffer"] * 3
        assert listing["norm.num_batches_tracked"].dtype == "int64"
        assert listing["norm.running_var"].shape == (32,) and listing["norm.running_var"].present
        rng = np.random.default_rng(0)
        for step in range(2):
            x = rng.standard_normal((6, 16)).astype(np.float32)
            y = np.array([0, 1, 2, 3, 0, 1])
            result = client.train_step(x, y, fetch=["norm.running_mean[:4]"])
            local_train_step(
                local, optimizer, torch.from_numpy(x), torch.from_numpy(y), zero_grad=False
            )
            expected = dict(local.named_buffers())
            for name in buffers:
                assert np.array_equal(client.get(name), expected[name].numpy()), (step, name)
            assert np.array_equal(result.fetched[0].value, expected["norm.running_mean"][:4])
        assert client.get("norm.num_batches_tracked") == 2
        with pytest.raises(errors.InvalidArgument) as caught:
            client.set("norm.running_mean", np.zeros(32, np.float32))
        assert caught.value.reason == "READ_ONLY"
        assert "a buffer of the model" in caught.value.message
        watch = client.watch(["norm.running_var[0]"], values=True)
        client.forward(x, y)
        update = next(watch)
        watch.close()
        assert update["norm.running_var[0]"].value == client.get("norm.running_var[0]")


@pytest.mark.parametrize("how", ["unary", "stream", "batch", "cli"])
def test_a_forward_in_eval_mode_runs_as_model_eval_and_leaves_the_model_training(
    how: str, tmp_path: Path
) -> None:
    # The model always trained: BatchNorm's running statistics could be watched but never
    # used, and every Forward moved them (a researcher's walkthrough).
    with mlp_and_a_copy() as (client, local, running):
        rng = np.random.default_rng(3)
        x, y = rng.standard_normal((6, 16)).astype(np.float32), np.array([0, 1, 2, 3, 0, 1])
        client.forward(x, y)  # running statistics of one batch
        local(torch.from_numpy(x))
        held = {k: v.clone() for k, v in local.named_buffers()}
        x = rng.standard_normal((1, 16)).astype(np.float32) + 3  # one sample: eval only
        y = np.array([2])
        if how == "unary":
            version = client.forward(x, y, eval_mode=True).version
        elif how == "stream":
            client.stream_above_bytes = 16
            client.chunk_bytes = 16
            version = client.forward(x, y, eval_mode=True).version
        elif how == "batch":
            with client.batch() as batch:
                done = batch.forward(x, y, eval_mode=True)
            version = done.result().version
        else:
            np.save(tmp_path / "x.npy", x)
            np.save(tmp_path / "y.npy", y)
            result = run_main(
                "forward", "--eval", "--input", str(tmp_path / "x.npy"),
                "--targets", str(tmp_path / "y.npy"), "--json",
                "--target", f"127.0.0.1:{running.port}",
            )  # fmt: skip
            assert result.code == 0, result.err
            version = result.json()["version"]
        assert version == 2
        local.eval()
        expected = local(torch.from_numpy(x))
        loss = nn.CrossEntropyLoss()(expected, torch.from_numpy(y))
        assert np.array_equal(client.get("output"), expected.detach().numpy())
        assert client.get("loss") == loss.item()
        for name, value in held.items():  # neither moved nor counted
            assert np.array_equal(client.get(name), value.numpy()), name
        client.backward()  # the graph is there, as after model.eval() in PyTorch
        loss.backward()
        for name, p in local.named_parameters():
            assert p.grad is not None
            assert np.array_equal(client.get(f"{name}.grad"), p.grad.numpy()), name
        with pytest.raises(errors.InvalidArgument) as caught:  # training again
            client.forward(x, y)
        assert caught.value.reason == "MODEL_REFUSED"
        # Refused, and so changing nothing: BatchNorm counted the batch before refusing it.
        assert client.get("norm.num_batches_tracked") == 1


def test_inspection_follows_a_model_with_biases_and_a_norm_layer() -> None:
    running = start(Trainer(TINY_MLP, device="cpu", seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            names = client.list_tensors().names()
            assert {"fc1.output", "norm.output", "fc2.output", "norm.bias.delta"} <= set(names)
            client.set_optimizer("adam", lr=0.01)
            assert "optimizer.norm.weight.exp_avg_sq" in client.list_tensors().names()
            x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
            y = np.array([0, 1, 2, 3, 0, 1])
            local = TINY_MLP.factory()
            with torch.no_grad():
                for name, p in local.named_parameters():
                    p.copy_(torch.from_numpy(client.get(name)))
            outputs: dict[str, torch.Tensor] = {}
            for name, module in local.named_modules():
                if name:
                    module.register_forward_hook(
                        lambda m, a, out, name=name: outputs.__setitem__(name, out.detach())
                    )
            local.train()(torch.from_numpy(x))
            result = client.train_step(x, y, fetch=["norm.output", "fc1.bias.delta"])
            assert np.array_equal(result.fetched[0].value, outputs["norm"].numpy())
            grad = client.stats("fc1.bias.grad", bins=3)
            assert grad.shape == (32,) and grad.stats is not None
            assert_stats_match(grad.stats, client.get("fc1.bias.grad"))
            watch = client.watch(["fc2.output", "optimizer.fc2.bias.step"], values=True)
            first = next(watch)
            watch.close()
            assert first["fc2.output"].value.shape == (6, 4)
            assert first["optimizer.fc2.bias.step"].value == 1.0
    finally:
        running.stop(grace=None)


def test_a_minimum_interval_coalesces_updates(client: gradwire.Client, address: str) -> None:
    stream = client.watch(["conv1.weight[0, 0, 0]"], values=True, min_interval=2.0, timeout=30)
    first = next(stream)  # the state now; the next update comes 2 s later at the earliest
    x, y = random_batch(8, 13)
    with gradwire.connect(address) as driver:
        driver.set_optimizer("sgd", lr=0.01)
        for _ in range(10):
            driver.train_step(x, y)  # done in well under 2 s: all land before the next update
        final = driver.get("conv1.weight[0, 0, 0]")
    update = next(stream)
    # The interval runs from each update sent, not from the first alone.
    with gradwire.connect(address) as driver:
        for _ in range(3):
            driver.train_step(x, y)
    later = next(stream)
    stream.close()
    assert (first.version, update.version, update.steps) == (0, 1 + 10 * 4, 10)
    assert update.skipped == 10  # 11 mutating calls, one update
    assert (later.version, later.skipped) == (1 + 13 * 4, 2)
    assert np.array_equal(update["conv1.weight"].value, final)
    with pytest.raises(ValueError, match="min_interval must be seconds"):
        client.watch(["loss"], min_interval=-1.0)  # refused by the client, when called
    refused = pb.WatchRequest(items=[pb.WatchItem(name="loss", stats=True)], min_interval_ms=-1)
    with pytest.raises(errors.InvalidArgument):  # and by the server, sent as it is
        next(client._stream("Watch", refused))


@pytest.mark.parametrize("interval", [0.0, 30.0])
def test_a_closed_watch_lets_go_of_its_place_at_once(
    client: gradwire.Client, server: Running, monkeypatch: pytest.MonkeyPatch, interval: float
) -> None:
    """A watch closed by its reader held one of the server's 16 places until the next poll,
    half a second: watches opened and closed in a loop made every call BUSY meanwhile
    (found by the twenty-first session's review of the client). Between updates, and in
    the pause a minimum interval makes. The poll made a minute here: let go of at once,
    the place is free long before."""
    monkeypatch.setattr(servicer_module, "WATCH_POLL_S", 60.0)
    for _ in range(3):
        stream = client.watch(["loss"], min_interval=interval)
        next(stream)
        stream.close()
        eventually(lambda: server.servicer.slots.taken == 0, "the watch held its place", within=20)
        # Nor is it told of the mutations after it: its trainer let go of it too.
        eventually(
            lambda: len(server.servicer.trainer._subscriptions) == 0,
            "the watch stayed subscribed to its trainer",
            within=20,
        )


@pytest.mark.parametrize("how", ["end", "close"])
def test_an_ended_or_closed_subscription_neither_waits_nor_pauses(how: str) -> None:
    """end: the watch's call ended. The end is kept, not only signalled: one that came
    between the watch loop's check of its call and its wait would have been lost, and the
    wait would have run its course. close: its model closed (its session closed, the server
    stopping), which ends a watcher's wait and its minimum interval's pause, and later ones
    do not wait: a watcher in its pause would otherwise have held on for the whole
    interval."""
    from gradwire_server.watch import Subscription

    subscription = Subscription()
    getattr(subscription, how)()
    start = time.monotonic()
    assert not subscription.wait(30.0)
    subscription.pause(30.0)
    assert time.monotonic() - start < 10.0
    assert subscription.closed == (how == "close")


@pytest.mark.parametrize("how", ["end", "close"])
def test_an_end_or_a_close_wakes_a_wait_already_under_way(how: str) -> None:
    """Not only the waits after it: one already waiting returns then, not at its timeout
    (a watcher of a closed session would have held its place until then)."""
    from gradwire_server.watch import Subscription

    subscription = Subscription()
    returned: list[bool] = []
    thread = threading.Thread(target=lambda: returned.append(subscription.wait(600.0)), daemon=True)
    thread.start()
    eventually(lambda: len(subscription._cond._waiters) == 1)  # type: ignore[attr-defined]
    getattr(subscription, how)()
    thread.join(30.0)
    assert returned == [False]


def test_a_removed_subscription_is_told_of_no_more_mutations() -> None:
    from gradwire_server.watch import Subscription, Subscriptions

    subscriptions = Subscriptions()
    kept, removed = Subscription(), Subscription()
    subscriptions.add(kept)
    subscriptions.add(removed)
    subscriptions.remove(removed)
    subscriptions.announce(1)
    assert len(subscriptions) == 1
    assert (kept.take(), removed.take()) == (1, 0)
    subscriptions.close()  # the model gone: each one closed, and none kept
    assert kept.closed and len(subscriptions) == 0


def test_a_step_counter_that_goes_back_is_due_to_an_every_n_steps_subscriber() -> None:
    """A counter lower than the last one announced is a state replaced, due whatever its
    Nth step, flagged a reset or not, though from 7 back to 3 stays in the same tenth."""
    from gradwire_server.watch import Subscription

    subscription = Subscription(every_steps=10, steps=7)
    subscription.announce(3)
    assert subscription.take() == 1
    subscription.announce(4)  # on from there: the same tenth, not due
    assert subscription.take() == 0


def test_an_every_n_steps_subscriber_counts_its_nth_steps_from_the_trainer_s_count() -> None:
    """Subscribed at step 25, every 10 steps: the 26th is not due, the 30th is."""
    from gradwire_server.watch import Subscription

    subscription = Subscription(every_steps=10, steps=25)
    subscription.announce(26)
    assert subscription.take() == 0
    subscription.announce(30)
    assert subscription.take() == 1
    # Every step: a mutation that is no Step (a Set, a Forward) is not due.
    subscription = Subscription(every_steps=1, steps=4)
    subscription.announce(4)
    assert subscription.take() == 0
    subscription.announce(5)
    assert subscription.take() == 1


def test_a_watch_s_minimum_interval_sleeps_through_the_updates_it_counts() -> None:
    """Its pause woke at every mutation announced, each a thread wake and a GIL trip per
    watcher (found by the review of the twenty-first session's change); a watcher's
    interval is what bounds its cost however fast training runs."""
    from gradwire_server.watch import Subscription

    subscription = Subscription()
    woke = threading.Event()

    def pause() -> None:
        subscription.pause(30.0)
        woke.set()

    thread = threading.Thread(target=pause)
    thread.start()
    announced, until = 0, time.monotonic() + 1.0
    while time.monotonic() < until and not woke.is_set():  # a second of updates
        subscription.announce(announced)
        announced += 1
        time.sleep(0.001)
    assert not woke.is_set()  # slept through them all
    subscription.end()
    assert woke.wait(10.0)
    thread.join(10.0)
    assert subscription.take() == announced


class _Odd(nn.Module):
    """A model whose attributes meta_copy must walk with care: a frozen parameter, a lazy
    layer never called, a list named like torch's hook dicts, a list that holds itself,
    tensors in sets and tuples and nested as deep as it looks, numpy arrays on either side of
    the size it shares, a closure hook with a keyword-only default, and one with a cell never
    set."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.unused = nn.LazyLinear(2)  # never called: its parameters have no shape to copy
        self.extra_hooks = [torch.ones(2)]  # a list, not one of torch's hook dicts
        self.cycle: list[Any] = [torch.ones(1)]
        self.cycle.append(self.cycle)
        self.deep = {"a": [SimpleNamespace(t=torch.ones(1))]}  # a list in a dict on an object
        self.four_deep = [[[[torch.ones(1)]]]]  # as deep as a copy looks: four levels
        self.four_objects_deep = SimpleNamespace(
            a=SimpleNamespace(b=SimpleNamespace(c=SimpleNamespace(t=torch.ones(1))))
        )
        self.held = ((torch.ones(1),), {torch.ones(1)}, frozenset([torch.ones(1)]))
        if False:  # never set: the closure's cell for it stays empty
            unset = None
        self.lin.register_forward_hook(lambda m, a, o: None if True else unset)
        # numpy arrays over 1 MiB are shared, not copied; one of 1 MiB is copied
        self.table = np.zeros((1 << 18) + 1, np.float32)
        self.counter = np.zeros(1 << 18, np.float32)
        seen: list[tuple[int, ...]] = []

        def hook(module: nn.Module, args: Any, output: torch.Tensor, *, scale: int = 2) -> None:
            seen.append(tuple(output.shape) * scale)

        self.seen = seen
        self.lin.register_forward_hook(hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.frozen


def test_a_meta_copy_keeps_what_the_model_s_own_attributes_and_hooks_need() -> None:
    from gradwire_server.meta_copy import meta_copy

    model = _Odd()
    copied = meta_copy(model, lambda *_: None)
    assert isinstance(copied, _Odd)
    assert copied.frozen.is_meta and not copied.frozen.requires_grad
    assert isinstance(copied.unused.weight, nn.parameter.UninitializedParameter)
    assert copied.lin.weight.is_meta and copied.lin.weight.requires_grad
    assert copied.extra_hooks[0].is_meta and copied.cycle[0].is_meta
    assert copied.deep["a"][0].t.is_meta and not model.deep["a"][0].t.is_meta
    assert copied.four_deep[0][0][0][0].is_meta and not model.four_deep[0][0][0][0].is_meta
    assert copied.four_objects_deep.a.b.c.t.is_meta
    assert all(next(iter(held)).is_meta for held in copied.held)  # a tuple, a set, a frozenset
    assert copied.table is model.table
    assert copied.counter is not model.counter and np.array_equal(copied.counter, model.counter)
    out = copied(torch.empty(2, 4, device="meta"))  # its hook runs with its default
    assert out.shape == (2, 3) and out.is_meta
    assert copied.seen == [(2, 3, 2, 3)] and model.seen == []
