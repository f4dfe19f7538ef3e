"""Pictures of tensors: conv kernels as a grid, 2-D slices as a heatmap, anything as a histogram.

Takes numpy arrays (what `Client.get` returns) and writes a PNG. matplotlib is an optional
extra (`pip install '.[plot]'` in a checkout): it is imported only when a picture is drawn, through
its object API (`Figure` on an Agg canvas), so no pyplot state and no display are involved.

Weights and gradients are signed, so float values are drawn with a diverging colour map
centred on 0: white is 0, red positive, blue negative, equally deep for equal magnitudes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gradwire import limits
from gradwire.updates import Histogram, Stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_DPI",
    "FIGSIZE",
    "INSTALL_HINT",
    "KINDS",
    "MAX_KERNEL_IN",
    "MAX_KERNEL_OUT",
    "HistogramData",
    "PlotError",
    "PlotResult",
    "PlotUnavailable",
    "check_options",
    "choose_kind",
    "histogram_of",
    "plot_array",
    "plot_histogram",
    "require_matplotlib",
]

Kind = Literal["kernels", "heatmap", "histogram"]
KINDS: tuple[str, ...] = ("auto", "kernels", "heatmap", "histogram")

FIGSIZE: tuple[float, float] = (8.0, 6.0)  # inches; the PNG is FIGSIZE * dpi pixels
DEFAULT_DPI = 100  # so 800 x 600 pixels by default
DEFAULT_BINS = 50
MAX_KERNEL_OUT = 32  # kernel grid columns: output channels (filters) shown at most
MAX_KERNEL_IN = 32  # kernel grid rows: input channels shown at most
MAX_BINS = limits.MAX_HISTOGRAM_BINS  # as the server's statistics allow

INSTALL_HINT = (
    "pictures need matplotlib: install gradwire's plot extra (pip install 'gradwire[plot]' "
    "where gradwire is installed; in a checkout: pip install '.[plot]')"
)

DIVERGING = "RdBu_r"  # red positive, blue negative, white 0
SEQUENTIAL = "viridis"  # for non-negative integer data (class indices, counts)
GAP_COLOUR = "#b0b0b0"  # between kernels in the grid
NAN_COLOUR = "#ffd700"  # gold: apart from red, blue, white and the grey gaps
POSINF_COLOUR = "#000000"  # black: +inf, past the top of the scale
NEGINF_COLOUR = "#00a651"  # green: -inf, past its bottom

# A conv weight or its gradient: `conv1.weight`, `features.0.weight.grad`, ...
_WEIGHT_NAME = re.compile(r"(^|\.)weight(\.grad)?$")


class PlotError(ValueError):
    """An array that the asked-for kind cannot draw (a 3-D array as a heatmap, ...)."""


class PlotUnavailable(ImportError):
    """matplotlib is not installed; the message says how to install it."""


@dataclass(frozen=True)
class PlotResult:
    """What was drawn: the kind chosen, the PNG's size in pixels, and any note (truncation)."""

    path: Path
    kind: Kind
    width: int
    height: int
    note: str | None = None


@dataclass(frozen=True)
class HistogramData:
    """Counts of the finite values in equal-width bins from `low` to `high`, and a summary.

    Shaped like the server's statistics (min, max, mean, std over finite values; counts of
    the rest), so that a histogram computed on the server draws the same way as one made
    here from fetched values.
    """

    counts: np.ndarray[Any, np.dtype[np.int64]]
    low: float
    high: float
    count: int  # values summarised, finite or not
    mean: float
    std: float
    nan_count: int = 0
    inf_count: int = 0

    @classmethod
    def from_stats(cls, stats: Stats) -> HistogramData:
        """The histogram a server binned, with its summary: `client.stats(selector,
        bins=N).stats`. PlotError for statistics asked for without bins."""
        histogram = stats.histogram
        if histogram is None:
            raise PlotError(
                "these statistics have no histogram: ask for one, client.stats(selector, "
                f"bins=N) (bins up to {MAX_BINS})"
            )
        return cls(
            counts=np.asarray(histogram.counts, dtype=np.int64),
            low=histogram.low,
            high=histogram.high,
            count=stats.count,
            mean=stats.mean,
            std=stats.std,
            nan_count=stats.nan_count,
            inf_count=stats.inf_count,
        )


def require_matplotlib() -> None:
    """Raises PlotUnavailable (with the install hint) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "matplotlib":
            raise PlotUnavailable(f"{INSTALL_HINT} ({err})") from None
        # Installed, and failing to import: a matplotlib built for another numpy was said to
        # be missing (a review of installing: matplotlib 3.7.0 beside numpy 2).
        raise PlotUnavailable(
            f"pictures need matplotlib, which is installed but fails to import: {err} "
            "(one older than its numpy? pip install -U matplotlib)"
        ) from None


def choose_kind(name: str, shape: tuple[int, ...]) -> Kind:
    """auto: a 4-D conv weight (or its gradient) -> kernels, 2-D -> heatmap, else histogram."""
    if len(shape) == 4 and _WEIGHT_NAME.search(name):
        return "kernels"
    if len(shape) == 2:
        return "heatmap"
    return "histogram"


def histogram_of(values: np.ndarray[Any, Any], bins: int = DEFAULT_BINS) -> HistogramData:
    """A HistogramData of an array's values, computed here."""
    _check_bins(bins)
    flat = np.asarray(values).reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.astype(np.int8)
    nan = np.isnan(flat) if flat.dtype.kind in "fc" else np.zeros(flat.shape, bool)
    inf = np.isinf(flat) if flat.dtype.kind in "fc" else np.zeros(flat.shape, bool)
    finite = flat[~(nan | inf)].astype(np.float64)
    if finite.size == 0:
        counts = np.zeros(bins, np.int64)
        low, high, mean, std = 0.0, 1.0, math.nan, math.nan
    else:
        low, high = float(finite.min()), float(finite.max())
        if low == high:  # one value: a bin of width 1 around it, as numpy does
            low, high = low - 0.5, high + 0.5
        counts, _ = np.histogram(finite, bins=bins, range=(low, high))
        mean, std = float(finite.mean()), float(finite.std())
    return HistogramData(
        counts=counts.astype(np.int64),
        low=low,
        high=high,
        count=int(flat.size),
        mean=mean,
        std=std,
        nan_count=int(nan.sum()),
        inf_count=int(inf.sum()),
    )


def plot_array(
    values: np.ndarray[Any, Any],
    out: str | os.PathLike[str],
    *,
    name: str,
    kind: str = "auto",
    label: str | None = None,
    title: str | None = None,
    bins: int = DEFAULT_BINS,
    dpi: int = DEFAULT_DPI,
) -> PlotResult:
    """Draws `values` as `kind` into the PNG file `out`.

    `name`: the tensor's name (`conv1.weight.grad`), which auto uses to recognise conv
    weights; `label`: what the picture shows, for the default title (the full selector,
    `conv2.weight[:4]`; default `name`); `title`: replaces the default title.
    """
    require_matplotlib()
    if values is None:  # Client.get's absent gradient: "cannot draw object values" said not
        raise PlotError(
            f"{name} is None (absent): nothing to draw, so {out} was not written; a "
            "gradient is absent until a backward()"
        )
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise PlotError(f"cannot draw {array.dtype} values; only numbers")
    chosen: Kind
    if kind == "auto":
        chosen = choose_kind(name, array.shape)
    elif kind in ("kernels", "heatmap", "histogram"):
        chosen = kind  # type: ignore[assignment]
    else:
        raise PlotError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    _check_dpi(dpi)
    heading = title if title is not None else heading_of(label or name, array.shape)
    if chosen == "kernels":
        return _write(lambda fig: _draw_kernels(fig, array, heading), out, chosen, dpi)
    if chosen == "heatmap":
        return _write(lambda fig: _draw_heatmap(fig, array, heading), out, chosen, dpi)
    data = histogram_of(array, bins)
    return _write(lambda fig: _draw_histogram(fig, data, heading), out, chosen, dpi)


def plot_histogram(
    data: HistogramData | Stats,
    out: str | os.PathLike[str],
    *,
    label: str,
    shape: Sequence[int],
    title: str | None = None,
    dpi: int = DEFAULT_DPI,
) -> PlotResult:
    """Draws counts already binned into the PNG `out`: the server's (GetStats), as
    `client.stats(selector, bins=N).stats` gives them, or a HistogramData (histogram_of()).

    `label` and `shape` (any sequence: it is only shown): what was summarised, for the
    default title; `title` replaces it.
    Statistics were refused with an AttributeError, HistogramData alone taken (found by a
    review of the client as a researcher uses it in a notebook).
    """
    require_matplotlib()
    if isinstance(data, Stats):
        data = HistogramData.from_stats(data)
    elif isinstance(data, Histogram):
        raise PlotError(
            "give the statistics (client.stats(selector, bins=N).stats), not their "
            "histogram: the title says their count, mean and std"
        )
    _check_dpi(dpi)
    heading = title if title is not None else heading_of(label, shape)
    return _write(lambda fig: _draw_histogram(fig, data, heading), out, "histogram", dpi)


# --- drawing ----------------------------------------------------------------------------


def check_options(kind: str, bins: int, dpi: int) -> None:
    """Raises PlotError for a kind, bin count or dpi out of range, before any values are read."""
    if kind not in KINDS:
        raise PlotError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    _check_bins(bins)
    _check_dpi(dpi)


def _check_bins(bins: int) -> None:
    if not 1 <= bins <= MAX_BINS:
        raise PlotError(f"bins must be between 1 and {MAX_BINS}, not {bins}")


def _check_dpi(dpi: int) -> None:
    if not 10 <= dpi <= 1000:
        raise PlotError(f"dpi must be between 10 and 1000, not {dpi}")


def _write(
    draw: Callable[[Figure], str | None], out: str | os.PathLike[str], kind: Kind, dpi: int
) -> PlotResult:
    """Makes a figure, lets `draw` fill it (returning a note or None), writes it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    note: str | None = draw(fig)
    path = Path(out)
    # Into a temporary file beside the target, then renamed: a reader never sees half a PNG,
    # and a failure leaves no file behind. Opened with open(), not mkstemp, so the PNG gets
    # the permissions the umask gives any new file rather than mkstemp's owner-only 0600.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Opened before the cleanup's try: a file already at that name, which "x" refuses, is
    # not this picture's to remove (the cleanup unlinked it).
    f = open(tmp, "xb")  # noqa: SIM115  # closed by the with below
    try:
        with f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    width, height = round(FIGSIZE[0] * dpi), round(FIGSIZE[1] * dpi)
    return PlotResult(path, kind, width, height, note)


def _colour_scale(array: np.ndarray[Any, Any]) -> tuple[Colormap, float, float]:
    """A diverging map symmetric about 0 for signed data; sequential for non-negative ints."""
    import matplotlib

    values = array.astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    signed = array.dtype.kind == "f" or (finite.size > 0 and finite.min() < 0)
    if signed:
        bound = float(np.abs(finite).max()) if finite.size else 0.0
        bound = bound if bound > 0 else 1.0
        if bound > _WIDEST_BOUND:
            # Past it the scale's width (2 * bound), or its ticks' arithmetic, overflows to
            # inf, and matplotlib raised a ValueError of its own ("Axis limits cannot be NaN
            # or Inf", "arange: cannot compute length").
            raise PlotError(
                f"values as large as {bound:.4g} cannot be placed on a colour scale: past "
                f"{_WIDEST_BOUND:.4g}, a quarter of float64's largest, its arithmetic "
                "overflows; gradwire stats shows them, or plot a slice without them"
            )
        cmap = matplotlib.colormaps[DIVERGING].with_extremes(**_EXTREMES)
        return cmap, -bound, bound
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    cmap = matplotlib.colormaps[SEQUENTIAL].with_extremes(**_EXTREMES)
    return cmap, low, high if high > low else low + 1.0


#: The largest |value| a diverging scale [-bound, bound] is drawn for: at half of float64's
#: largest its width overflows, and past a quarter matplotlib's tick locator does (seen).
_WIDEST_BOUND = float(np.finfo(np.float64).max) / 4

#: The colours of what the scale cannot place: matplotlib draws infinities as it draws NaN
#: ("bad"), so +inf and -inf came out gold, counted nowhere (found by a review).
_EXTREMES = {"bad": NAN_COLOUR, "over": POSINF_COLOUR, "under": NEGINF_COLOUR}


def _drawable(values: np.ndarray[Any, Any], vmin: float, vmax: float) -> tuple[Any, list[str]]:
    """`values` as float64 for imshow, infinities moved past the scale's ends (drawn in its
    `over` and `under` colours: black and green), and what the title says of those and of
    NaN (gold)."""
    drawn = values.astype(np.float64)  # a copy
    if values.dtype.kind != "f":
        return drawn, []
    high, low = np.isposinf(drawn), np.isneginf(drawn)
    # Past the scale's ends by its span, but finite: vmax + span overflowed to inf for
    # float64 values near their largest, which drew as NaN again (a review).
    largest = float(np.finfo(np.float64).max)
    span = vmax - vmin
    drawn[high], drawn[low] = min(vmax + span, largest), max(vmin - span, -largest)
    said = [
        f"{count} {what} shown {colour}"
        for count, what, colour in (
            (int(np.isnan(drawn).sum()), "NaN", "gold"),
            (int(high.sum()), "+inf", "black"),
            (int(low.sum()), "-inf", "green"),
        )
        if count
    ]
    return drawn, said


def _channel_ticks(ax_set: Any, count: int, cell: int, limit: int, first: int = 0) -> None:
    """Ticks at the centres of grid cells, labelled by channel; every k-th when crowded."""
    step = max(1, math.ceil(count / limit))
    positions = [i * cell + (cell - 1) / 2 for i in range(0, count, step)]
    ax_set(positions, [str(first + i) for i in range(0, count, step)])


def _draw_kernels(fig: Figure, array: np.ndarray[Any, Any], heading: str) -> str | None:
    """One tile per (out, in) kernel: a column per output channel (filter), a row per input."""
    from matplotlib.colors import to_rgba

    if array.ndim != 4:
        raise PlotError(
            f"kernels need a 4-D [out, in, kh, kw] tensor, not {array.ndim}-D {list(array.shape)}"
        )
    n_out, n_in, kh, kw = array.shape
    if 0 in array.shape:
        raise PlotError(f"no kernels to draw: shape {list(array.shape)} is empty")
    shown_out, shown_in = min(n_out, MAX_KERNEL_OUT), min(n_in, MAX_KERNEL_IN)
    note = None
    if (shown_out, shown_in) != (n_out, n_in):
        note = (
            f"showing the first {shown_out} of {n_out} output x {shown_in} of {n_in} input channels"
        )
    cmap, vmin, vmax = _colour_scale(array[:shown_out, :shown_in])
    kernels, extremes = _drawable(array[:shown_out, :shown_in], vmin, vmax)
    # Every kernel a tile of one image, a one-pixel gap (NaN, drawn grey) between tiles: far
    # cheaper than an Axes per kernel, and every tile shares one colour scale. A grid much
    # wider than the figure (conv1's 16 filters of 3 inputs) wraps into bands of filters,
    # stacked, so the tiles fill the page instead of a thin strip.
    cell_h, cell_w = kh + 1, kw + 1
    grid_w, grid_h = shown_out * cell_w, shown_in * cell_h
    target = (FIGSIZE[0] - 1.5) / (FIGSIZE[1] - 1.0)  # the figure less colour bar and labels
    bands = max(1, min(shown_out, round(math.sqrt(grid_w / grid_h / target))))
    per_band = math.ceil(shown_out / bands)
    bands = math.ceil(shown_out / per_band)
    axes = fig.subplots(bands, 1, squeeze=False)[:, 0]
    image: AxesImage | None = None
    for band, ax in enumerate(axes):
        first = band * per_band
        mosaic = np.full((grid_h - 1, per_band * cell_w - 1), np.nan)
        gap = np.ones(mosaic.shape, bool)  # True between tiles, False on a kernel's values
        for o in range(first, min(first + per_band, shown_out)):
            x = (o - first) * cell_w
            for i in range(shown_in):
                mosaic[i * cell_h : i * cell_h + kh, x : x + kw] = kernels[o, i]
                gap[i * cell_h : i * cell_h + kh, x : x + kw] = False
        image = ax.imshow(mosaic, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        # The gaps are NaN too; grey over them, so a NaN inside a kernel keeps its own colour.
        overlay = np.zeros((*gap.shape, 4))
        overlay[gap] = to_rgba(GAP_COLOUR)
        ax.imshow(overlay, interpolation="nearest")
        count = min(per_band, shown_out - first)
        _channel_ticks(ax.set_xticks, count, cell_w, 32, first)
        _channel_ticks(ax.set_yticks, shown_in, cell_h, 32)
        ax.tick_params(length=0, labelsize=7 if max(per_band, shown_in) > 16 else 9)
    assert image is not None
    axes[-1].set_xlabel("output channel (one filter per column)")
    fig.supylabel("input channel", fontsize=10)
    fig.colorbar(image, ax=list(axes), label="value", shrink=0.9)
    extra = [note] if note else []
    extra += ["; ".join(extremes)] if extremes else []
    fig.suptitle("\n".join([heading, *extra]), fontsize=11)
    return note


def _draw_heatmap(fig: Figure, array: np.ndarray[Any, Any], heading: str) -> str | None:
    matrix = array
    if matrix.ndim != 2:  # [1, 20, 1, 64] and the like are 2-D in all but name
        matrix = matrix.reshape([d for d in matrix.shape if d != 1])
    if matrix.ndim != 2:
        raise PlotError(
            f"a heatmap needs a 2-D slice, not {array.ndim}-D {list(array.shape)}: "
            "index it down to two dimensions, e.g. 'conv2.weight[0, 0]' or 'linear.weight[:, :64]'"
        )
    if matrix.size == 0:
        raise PlotError(f"nothing to draw: shape {list(array.shape)} is empty")
    cmap, vmin, vmax = _colour_scale(matrix)
    ax = fig.add_subplot()
    # Each cell its own colour: matplotlib's default smooths a matrix over about 210 columns
    # or 160 rows at this size, and blended rows of +1 and -1 through white, a 0 that the
    # tensor does not hold (found by a walkthrough as a researcher).
    drawn, extremes = _drawable(matrix, vmin, vmax)
    image = ax.imshow(
        drawn,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    fig.colorbar(image, ax=ax, label="value")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"column (dim 1, {matrix.shape[1]})")
    ax.set_ylabel(f"row (dim 0, {matrix.shape[0]})")
    extra = ["; ".join(extremes)] if extremes else []
    _title(ax, heading, extra)
    fig.draw_without_rendering()  # the layout, for the axes' size in pixels
    box = ax.get_window_extent()
    crowded = [
        f"{cells:,} {what} on about {pixels} pixels"
        for cells, what, pixels in (
            (matrix.shape[1], "columns", math.floor(box.width)),
            (matrix.shape[0], "rows", math.floor(box.height)),
        )
        if cells > pixels
    ]
    if not crowded:
        return None
    note = " and ".join(crowded)
    _title(ax, heading, [*extra, f"{note}: one cell a pixel"])
    return f"{note}: a pixel shows one of the cells it covers; slice the tensor to see every value"


def _draw_histogram(fig: Figure, data: HistogramData, heading: str) -> str | None:
    ax = fig.add_subplot()
    low, high = data.low, data.high
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        low, high = (low - 0.5, low + 0.5) if math.isfinite(low) else (0.0, 1.0)
    edges = np.linspace(low, high, len(data.counts) + 1)
    ax.stairs(data.counts, edges, fill=True, color="#4477aa", edgecolor="#223355")
    if low < 0 < high:
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_xlim(low, high)
    ax.set_ylim(0, None if data.counts.any() else 1)
    finite = data.count - data.nan_count - data.inf_count
    if data.count == 0:
        summary = "no values: the selection is empty"
    elif finite:
        summary = f"{_values(data.count)}, mean {data.mean:.4g}, std {data.std:.4g}"
    else:
        summary = f"{_values(data.count)}, none finite"
    extra = [summary]
    if data.nan_count or data.inf_count:
        extra.append(f"not drawn: {data.nan_count:,} NaN, {data.inf_count:,} inf")
    _title(ax, heading, extra)
    return None


def heading_of(label: str, shape: Sequence[int]) -> str:
    """A picture's default title: what it shows and its shape; a single value says so (a
    loss was titled "loss  []", found by a review of the CLI)."""
    return f"{label}  {list(shape)}" if len(shape) else f"{label}  (a single value)"


def _values(count: int) -> str:
    """`1 value`, `2,048 values`."""
    return f"{count:,} value{'' if count == 1 else 's'}"


def _title(ax: Axes, heading: str, extra: list[str]) -> None:
    ax.set_title("\n".join([heading, *extra]) if extra else heading, fontsize=11)
