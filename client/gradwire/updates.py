"""What the inspection RPCs answer, as plain dataclasses: statistics, watch updates, progress."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwire import codec, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.display import listed
from gradwire.selector import SelectorError, parse_selector

__all__ = ["Histogram", "Stats", "TensorStats", "TrainProgress", "WatchUpdate", "Watched"]


@dataclass(frozen=True)
class Histogram:
    """Counts of a tensor's finite values in equal-width bins from `low` to `high`
    (`Stats.histogram`, asked for with `bins`); `edges` gives the bins' edges."""

    low: float  # lower edge of the first bin
    high: float  # upper edge of the last bin (included in it)
    counts: tuple[int, ...]  # one per equal-width bin

    @property
    def edges(self) -> list[float]:
        """The bins' edges, len(counts) + 1 of them, the first `low` and the last `high`:
        those the server counted by, bit for bit numpy.histogram's (np.linspace's). They
        were low + (high - low) * i / n, a bit off theirs, the last past `high` at times."""
        return [float(edge) for edge in np.linspace(self.low, self.high, len(self.counts) + 1)]


@dataclass(frozen=True)
class Stats:
    """A tensor's summary; min, max, mean, std and norm over its finite values, NaN when it
    has none (numpy's mean of nothing)."""

    count: int
    min: float
    max: float
    mean: float
    std: float  # population standard deviation (divides by the count of finite values)
    norm: float  # L2 norm
    nan_count: int
    inf_count: int
    zero_count: int
    histogram: Histogram | None

    @property
    def finite(self) -> int:
        """Values that are neither NaN nor infinite. With none, min, max, mean, std and norm
        are NaN (the server sends 0 for them, which would read as a tensor of zeros)."""
        return self.count - self.nan_count - self.inf_count


@dataclass(frozen=True)
class TensorStats:
    """One GetStats: the summary (None when the tensor is absent) and what the server saw."""

    name: str
    version: int
    stats: Stats | None
    shape: tuple[int, ...] | None  # the selection's shape; None when absent
    full_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class Watched:
    """One watched tensor in one update."""

    name: str
    # A numpy array when values were asked for and the tensor is present, else None
    value: np.ndarray[Any, Any] | None
    stats: Stats | None  # when statistics were asked for and the tensor is present
    full_shape: tuple[int, ...] | None  # None when absent
    #: The selector it was watched by, as Python writes it ("conv1.weight[0, 0]"); "" when
    #: not known (an update decoded without its request)
    selector: str = ""
    #: The torch dtype its values are of ("bfloat16", whose values arrive as float32);
    #: None when no values came
    dtype: str | None = None

    @property
    def present(self) -> bool:
        return self.full_shape is not None


@dataclass(frozen=True)
class WatchUpdate:
    """One update of a watch (`Client.watch`): the state version every tensor in it was read
    at, what led to it, and each watched tensor in order; `update["conv1.weight[0]"]` finds
    one by its selector, or by its name."""

    version: int  # the state version every tensor here was read at
    cause: str  # the RPC that led to this state: "Step", "Forward", ...; "Watch" at first
    skipped: int  # updates missed since the last one, while this subscriber was busy
    steps: int  # Steps applied to the model since it was created or reset
    tensors: tuple[Watched, ...]  # one per watched selector, in order

    def __getitem__(self, key: str) -> Watched:
        """The tensor watched by selector `key` ("conv1.weight[0, 0]", spaced as you like),
        or else the first one of that name ("conv1.weight"). By name alone, two slices of
        one tensor could not be told apart, and a selector with an index was a KeyError.
        A KeyError says what the update holds: it said the key alone, KeyError(0) for
        update[0] (found by a review of the client as a researcher uses it in a notebook)."""
        if not isinstance(key, str):
            raise KeyError(
                f"{key!r}: an update holds {self._held()}, by selector (or by a tensor's name); "
                "update.tensors[0] is the first watched"
            )
        try:
            selector = str(parse_selector(key))
        except SelectorError:
            selector = None
        for watched in self.tensors:
            if selector is not None and watched.selector == selector:
                return watched
        for watched in self.tensors:
            if watched.name == key:
                return watched
        raise KeyError(
            f"{key!r} was not watched: this update holds {self._held()} (by selector, or by "
            "a tensor's name)"
        )

    def _held(self) -> str:
        """The selectors watched, for a KeyError: "conv1.weight.grad[0] and loss"."""
        return listed([watched.selector or watched.name for watched in self.tensors])


@dataclass(frozen=True)
class TrainProgress:
    """One report of a run (`Client.train`): the steps done of those asked, the latest loss
    and state version, and the rate; `done` on the last."""

    step: int  # steps done in this run
    steps: int  # steps asked for
    loss: float  # loss of the latest step
    version: int  # state version after the latest step
    steps_per_s: float  # rate over the run so far
    done: bool  # the run completed
    # The first step of the run whose loss was NaN or infinite, reported or not; 0: none (or
    # a server from before it said).
    first_nonfinite_step: int = 0
    # The run's last progress: it ended at first_nonfinite_step, before the steps asked for,
    # as train(stop_at_nonfinite=True) asks.
    stopped_at_nonfinite: bool = False


def stats_from_proto(message: pb.Stats) -> Stats:
    histogram = None
    if message.HasField("histogram"):
        h = message.histogram
        histogram = Histogram(h.low, h.high, tuple(h.counts))
    nothing = message.count - message.nan_count - message.inf_count == 0
    return Stats(
        count=message.count,
        min=math.nan if nothing else message.min,
        max=math.nan if nothing else message.max,
        mean=math.nan if nothing else message.mean,
        std=math.nan if nothing else message.std,
        norm=math.nan if nothing else message.norm,
        nan_count=message.nan_count,
        inf_count=message.inf_count,
        zero_count=message.zero_count,
        histogram=histogram,
    )


def tensor_stats(response: pb.GetStatsResponse) -> TensorStats:
    if not response.HasField("stats"):
        return TensorStats(response.name, response.version, None, None, None)
    return TensorStats(
        response.name,
        response.version,
        stats_from_proto(response.stats),
        tuple(response.shape),
        tuple(response.full_shape),
    )


_WATCHED = pb.WatchUpdate.DESCRIPTOR.fields_by_name["tensors"].number
_WATCHED_TENSOR = pb.WatchedTensor.DESCRIPTOR.fields_by_name["tensor"].number


def watch_update(
    data: bytes, allocate: codec.Allocate | None = None, selectors: Sequence[str] = ()
) -> WatchUpdate:
    """A WatchUpdate from its bytes, each tensor's values read without a per-element loop;
    `allocate` makes the arrays a value needs (bfloat16 widened to float32); `selectors`,
    the Watch's in order as Python writes them (str of a parsed Selector), are each
    tensor's `selector`."""
    split = wire.split(data, pb.WatchUpdate)
    message = split.message
    tensors = []
    for i, watched in enumerate(message.tensors):
        value = None
        if watched.HasField("tensor"):
            path = ((_WATCHED, i), (_WATCHED_TENSOR, 0))
            value = codec.decode_split(split, path, watched.tensor, allocate=allocate)
        present = (
            len(watched.full_shape) > 0 or watched.HasField("tensor") or watched.HasField("stats")
        )
        tensors.append(
            Watched(
                watched.name,
                value,
                stats_from_proto(watched.stats) if watched.HasField("stats") else None,
                tuple(watched.full_shape) if present else None,
                selectors[i] if i < len(selectors) else "",
                codec.DTYPE_NAMES.get(watched.tensor.dtype) if value is not None else None,
            )
        )
    return WatchUpdate(
        message.version, message.cause, message.skipped, message.steps, tuple(tensors)
    )


def train_progress(message: pb.TrainProgress) -> TrainProgress:
    return TrainProgress(
        message.step,
        message.steps,
        message.loss,
        message.version,
        message.steps_per_s,
        message.done,
        message.first_nonfinite_step,
        message.stopped_at_nonfinite,
    )
