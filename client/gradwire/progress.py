"""Terminal output for the long-running commands: a progress bar, statistics, a live table.

Plain text, no dependency: on a terminal the bar and the table redraw in place; into a file
or a pipe each update is a line of its own, so logs and scripts read them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from gradwire.display import format_size, format_tensor
from gradwire.updates import Histogram, Stats, WatchUpdate

BAR_WIDTH = 30
_CLEAR_LINE = "\r\x1b[2K"
_HOME_AND_CLEAR = "\x1b[H\x1b[2J"


def _interactive(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar:
    """`step 120/1000 [###-------] 12%  85.3 steps/s  loss 2.9912  eta 10s`, kept current."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.live = _interactive(out)
        self.started = time.perf_counter()

    def line(self, done: int, loss: float, rate: float | None = None) -> str:
        if rate is None:
            rate = done / max(time.perf_counter() - self.started, 1e-9)
        filled = BAR_WIDTH * done // max(self.total, 1)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        return (
            f"step {done}/{self.total} [{bar}] {100 * done // max(self.total, 1):3d}%  "
            f"{rate:.1f} steps/s  loss {format_loss(loss)}  eta {format_duration(eta)}"
        )

    def update(self, done: int, loss: float, rate: float | None = None) -> None:
        text = self.line(done, loss, rate)
        if self.live:
            self.out.write(_CLEAR_LINE + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self, message: str) -> None:
        if self.live:
            self.out.write("\n")
        self.out.write(message + "\n")
        self.out.flush()


class TransferLine:
    """`receiving linear.weight: 12.0 MiB / 64.0 MiB  18%  1.20 MiB/s  eta 43s`, for a value
    crossing the wire (get, set): on a terminal, one line rewritten in place (at most ten
    times a second) and finished at the end; elsewhere (`--progress` into a log or CI), a
    line of its own at each further tenth of the way, at most one a second, and the last.
    A value of one chunk, whole at its first report, shows nothing: it had no wait to show.
    Called as a client's `progress=`, `(bytes_done, bytes_total)`."""

    #: Seconds between two rewrites of a terminal's line; between two lines elsewhere.
    LIVE_EVERY = 0.1
    LOG_EVERY = 1.0

    def __init__(self, out: TextIO, what: str, *, live: bool | None = None) -> None:
        self.out = out
        self.what = what
        self.live = _interactive(out) if live is None else live
        self.started = time.perf_counter()
        self._shown = False  # a line is on the screen or in the log
        self._last = -math.inf  # when it was written
        self._tenth = -1  # the tenth of the way the last line written reached

    def line(self, done: int, total: int) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = done / elapsed
        percent = 100 * done // total if total else 100
        eta = (total - done) / rate if rate > 0 else float("inf")
        text = (
            f"{self.what}: {format_bytes(done)} / {format_bytes(total)}  {percent:3d}%  "
            f"{rate / 2**20:.2f} MiB/s"
        )
        return text + (f"  eta {format_duration(eta)}" if done < total else "")

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        end = done >= total
        if end and not self._shown:
            return  # one chunk, or nothing shown yet: a line now says nothing of a wait
        tenth = 10 * done // total if total else 10
        if not end:
            if self.live and now - self._last < self.LIVE_EVERY:
                return
            if not self.live and (tenth <= self._tenth or now - self._last < self.LOG_EVERY):
                return
        text = self.line(done, total)
        if self.live:
            self.out.write(_CLEAR_LINE + text + ("\n" if end else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self._shown, self._last, self._tenth = True, now, tenth

    def close(self) -> None:
        """Ends a line left unfinished on a terminal (a transfer that failed or was stopped),
        so that what comes next (the error) starts a line of its own."""
        if self.live and self._shown and self._tenth < 10:
            self.out.write("\n")
            self.out.flush()
            self._tenth = 10


def format_bytes(size: int) -> str:
    """`512 B`, `250.0 KiB`, `64.0 MiB`, `1.50 GiB`."""
    if size < 1024:
        return f"{size} B"
    if size < 2**20:
        return f"{size / 1024:.1f} KiB"
    if size < 2**30:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**30:.2f} GiB"


def format_loss(loss: float) -> str:
    """`2.9912`; `3.676e+26`, `1.2e-07` or `nan` where four decimals would say nothing."""
    if loss == 0 or (math.isfinite(loss) and 1e-4 <= abs(loss) < 1e6):
        return f"{loss:.4f}"
    return f"{loss:.4g}"


def format_duration(seconds: float) -> str:
    """`42s`, `5m03s`, `2h05m`; `?` for an unknown (infinite) time."""
    if seconds == float("inf"):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_stats(stats: Stats) -> list[str]:
    """The statistics as aligned `name value` lines, the histogram as bars after them. With
    no finite value there is no min, max, mean, std or norm, nor anything to bin: a
    `finite 0` line says so, and the histogram's."""
    summary = [
        ("min", f"{stats.min:.6g}"),
        ("max", f"{stats.max:.6g}"),
        ("mean", f"{stats.mean:.6g}"),
        ("std", f"{stats.std:.6g}"),
        ("norm", f"{stats.norm:.6g}"),
    ]
    rows = [
        ("count", f"{stats.count}"),
        *(summary if stats.finite else [("finite", "0")]),
        ("nan", f"{stats.nan_count}"),
        ("inf", f"{stats.inf_count}"),
        ("zeros", f"{stats.zero_count}"),
    ]
    lines = [f"{name:<6} {value}" for name, value in rows]
    if stats.histogram is not None and not stats.finite:
        # Empty bins over a range of the server's choosing ([-0.5, 0.5]) read as data.
        lines.append("histogram: no finite value to bin")
    elif stats.histogram is not None:
        lines.append("histogram:")
        lines.extend(histogram_bars(stats.histogram))
    return lines


def histogram_bars(histogram: Histogram, width: int = 40) -> list[str]:
    """One line per bin: its range, its count and a bar scaled to the largest bin. The edges
    are padded to one width, so that the counts and bars line up (0 beside 0.025)."""
    edges = [f"{edge: .4g}" for edge in histogram.edges]
    pad = max(map(len, edges), default=0)
    most = max(histogram.counts, default=0) or 1
    last = len(histogram.counts) - 1
    return [
        f"  [{edges[i]:>{pad}}, {edges[i + 1]:>{pad}}{']' if i == last else ')'}"
        f" {count:>8d} {'#' * round(width * count / most)}".rstrip()  # no bar, no space
        for i, count in enumerate(histogram.counts)
    ]


def summary_cells(stats: Stats | None) -> str:
    """One table cell for a tensor's statistics."""
    if stats is None:
        return "absent"
    if stats.count == 1:  # a scalar (the loss, say): its value is all there is to say
        if stats.nan_count or stats.inf_count:
            return "value nan" if stats.nan_count else "value infinite"
        return f"value {stats.mean:.6g}"
    if stats.count == 0:
        return "empty"
    if stats.finite == 0:
        return f"no finite values  nan {stats.nan_count}  inf {stats.inf_count}"
    text = (
        f"mean {stats.mean: .4g}  std {stats.std:.4g}  min {stats.min: .4g}  "
        f"max {stats.max: .4g}  norm {stats.norm:.4g}"
    )
    if stats.nan_count or stats.inf_count:
        text += f"  nan {stats.nan_count}  inf {stats.inf_count}"
    return text


#: The longest bar of a histogram in a watch table: narrower than stats', as it is indented.
WATCH_BAR = 30

#: Values a watch table's cell shows in full; larger tensors show their first and last few.
CELL_VALUES = 12


def value_cell(value: Any, dtype: str | None = None) -> str:
    """A tensor's values on one line: in full up to CELL_VALUES of them, else the first six
    and last three of them in memory order, with the shape (a conv weight's 432 values made
    a line 7 KB long). `dtype`: as format_tensor's."""
    array = np.asarray(value)
    if array.size <= CELL_VALUES:
        return " ".join(format_tensor(value, dtype).split())
    flat = array.reshape(-1)

    def shown(values: Any) -> str:
        return ", ".join(f"{v:.4g}" if array.dtype.kind == "f" else str(v) for v in values)

    return (
        f"[{shown(flat[:6])}, ..., {shown(flat[-3:])}] of {format_size(array.shape)} "
        "(--json for every value)"
    )


class WatchTable:
    """The latest watch update as a table: redrawn in place on a terminal, appended elsewhere."""

    def __init__(self, out: TextIO, selectors: Sequence[str]) -> None:
        self.out = out
        self.selectors = list(selectors)
        self.live = _interactive(out)
        self.width = max(len(s) for s in self.selectors)

    def lines(self, update: WatchUpdate) -> list[str]:
        head = f"version {update.version}  steps {update.steps}  after {update.cause}"
        if update.skipped:
            head += f"  ({update.skipped} skipped)"
        lines = [head]
        for selector, watched in zip(self.selectors, update.tensors, strict=True):
            if not watched.present:
                cell = "absent"
            elif watched.value is not None:
                cell = value_cell(watched.value, watched.dtype)
                if watched.stats is not None:
                    cell += "  |  " + summary_cells(watched.stats)
            else:
                cell = summary_cells(watched.stats)
            lines.append(f"  {selector:<{self.width}}  {cell}")
            stats = watched.stats
            if stats is not None and stats.histogram is not None and stats.count > 1:
                # Under its row, as `gradwire stats --bins` prints it (a scalar's is its value):
                # with no finite value, empty bins over [-0.5, 0.5] would read as data.
                bars = (
                    histogram_bars(stats.histogram, WATCH_BAR)
                    if stats.finite
                    else ["histogram: no finite value to bin"]
                )
                lines.extend("    " + line for line in bars)
        return lines

    def show(self, update: WatchUpdate) -> None:
        text = "\n".join(self.lines(update))
        self.out.write((_HOME_AND_CLEAR if self.live else "") + text + "\n")
        self.out.flush()
