"""`gradwire plot`: pictures of tensors, drawn from a real server's values into PNG files.

Sizes are asserted, not pixels: the PNG is FIGSIZE * dpi, whatever matplotlib draws inside.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gradwire
from gradwire import limits, plot
from gradwire.errors import Unimplemented
from tests.cli_run import Run, run_main

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="needs matplotlib: gradwire's plot extra (pip install '.[plot]')",
)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, decoding the whole image on the way."""
    from matplotlib.image import imread

    pixels: np.ndarray[Any, Any] = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels.shape[1], pixels.shape[0]


def size_at(dpi: int) -> tuple[int, int]:
    return round(plot.FIGSIZE[0] * dpi), round(plot.FIGSIZE[1] * dpi)


def backward(client: gradwire.Client) -> None:
    client.forward(gradwire.Fill.ones(8, 3, 10, 10), gradwire.Fill.ones(8, dtype="int64"))
    client.backward()


def only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- one test per kind --------------------------------------------------------------------


@needs_matplotlib
def test_conv1_weight_draws_as_kernels(cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "conv1.png"
    result = cli("plot", "conv1.weight", "--out", str(out))
    assert result.code == 0, result.err
    assert result.out == (f"wrote {out}: kernels of conv1.weight [16, 3, 3, 3], 800x600 pixels\n")
    assert png_size(out) == size_at(plot.DEFAULT_DPI) == (800, 600)
    assert only_file(tmp_path) == ["conv1.png"]  # no temporary file left beside it
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # the PNG's mode is what the umask gives any new file
    assert out.stat().st_mode == plain.stat().st_mode


@needs_matplotlib
def test_a_2d_slice_draws_as_a_heatmap_at_the_asked_dpi(cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "linear.png"
    result = cli("plot", "linear.weight[:, :64]", "--out", str(out), "--dpi", "50", "--json")
    assert result.code == 0, result.err
    assert result.json() == {
        "out": str(out),
        "kind": "heatmap",
        "selector": "linear.weight[:, :64]",
        "shape": [20, 64],
        "width": 400,
        "height": 300,
        "note": None,
    }
    assert png_size(out) == size_at(50)


@needs_matplotlib
def test_a_heatmap_s_values_show_their_progress_with_progress(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heatmap's values cross the wire as get's do, and show their progress as get's do
    (--progress into a file or pipe); a histogram's, binned on the server, cross as counts."""
    monkeypatch.setattr(limits, "CHUNK_BYTES", 16_000)  # linear.weight: 16 chunks
    out = tmp_path / "linear.png"
    result = cli("plot", "linear.weight", "--kind", "heatmap", "--out", str(out), "--progress")
    assert result.code == 0, result.err
    lines = result.err.splitlines()
    assert lines[0].startswith("receiving linear.weight: 15.6 KiB / 250.0 KiB    6%  "), lines
    assert lines[-1].startswith("receiving linear.weight: 250.0 KiB / 250.0 KiB  100%  ")
    assert result.out.startswith(f"wrote {out}: heatmap of linear.weight [20, 3200]")
    histogram = cli("plot", "linear.weight", "--kind", "histogram", "--out", str(out))
    assert histogram.code == 0 and histogram.err == ""
    quiet = cli("plot", "linear.weight", "--kind", "heatmap", "--out", str(out))
    assert quiet.code == 0 and quiet.err == ""  # not a terminal, no --progress


@needs_matplotlib
def test_conv2_weight_as_a_histogram(cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "conv2-hist.png"
    result = cli(
        "plot", "conv2.weight", "--kind", "histogram", "--bins", "80", "--out", str(out),
        "--title", "conv2 at init",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "histogram of conv2.weight [32, 16, 3, 3]" in result.out
    assert png_size(out) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
@pytest.mark.parametrize("kind", ["histogram", "heatmap"])
def test_the_title_given_is_the_one_drawn(cli: Run, tmp_path: Path, kind: str) -> None:
    """--title reaches the picture, a histogram binned by the server's as a heatmap: two
    titles draw two pictures, the same title the same one."""
    drawn = []
    for i, title in enumerate(["first title", "second title", "first title"]):
        out = tmp_path / f"{i}.png"
        result = cli("plot", "linear.weight", "--kind", kind, "--title", title, "--out", str(out))
        assert result.code == 0, result.err
        drawn.append(out.read_bytes())
    assert drawn[0] != drawn[1] and drawn[0] == drawn[2]


@needs_matplotlib
@pytest.mark.parametrize(
    "selector", ["conv2.weight[0]", "conv1.weight[0, 0, 0]", "conv1.weight[0, 0, 0, 0]"]
)
def test_auto_draws_other_ranks_as_a_histogram(cli: Run, tmp_path: Path, selector: str) -> None:
    out = tmp_path / "h.png"
    result = cli("plot", selector, "--out", str(out), "--json")
    assert result.code == 0, result.err
    assert result.json()["kind"] == "histogram"
    assert png_size(out) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
def test_gradients_after_backward(cli: Run, client: gradwire.Client, tmp_path: Path) -> None:
    backward(client)
    hist, kernels = tmp_path / "grad-hist.png", tmp_path / "grad-kernels.png"
    result = cli("plot", "conv2.weight.grad", "--kind", "histogram", "--out", str(hist))
    assert result.code == 0, result.err
    assert png_size(hist) == size_at(plot.DEFAULT_DPI)
    result = cli("plot", "conv1.weight.grad", "--out", str(kernels), "--json")
    assert result.code == 0, result.err
    assert result.json()["kind"] == "kernels"
    assert png_size(kernels) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
def test_a_histogram_is_binned_on_the_server(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_values(*args: object, **kwargs: object) -> None:
        raise AssertionError("a histogram fetched the tensor's values")

    monkeypatch.setattr(gradwire.Client, "read", no_values)
    out = tmp_path / "h.png"
    result = cli("plot", "conv2.weight", "--kind", "histogram", "--out", str(out), "--json")
    assert result.code == 0, result.err
    assert result.json()["shape"] == [32, 16, 3, 3]
    assert png_size(out) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
def test_a_server_without_getstats_gets_a_histogram_from_the_values(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unimplemented(*args: object, **kwargs: object) -> None:
        raise Unimplemented("Method not found: GetStats")

    monkeypatch.setattr(gradwire.Client, "stats", unimplemented)
    out = tmp_path / "h.png"
    result = cli("plot", "conv1.weight[0]", "--out", str(out), "--json")
    assert result.code == 0, result.err
    assert result.json()["kind"] == "histogram"
    assert png_size(out) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
def test_a_histogram_of_an_absent_gradient_exits_1(cli: Run, tmp_path: Path) -> None:
    result = cli(
        "plot", "conv1.weight.grad", "--kind", "histogram", "--out", str(tmp_path / "g.png")
    )
    assert result.code == 1
    assert "conv1.weight.grad is None" in result.err
    assert only_file(tmp_path) == []


# --- errors -------------------------------------------------------------------------------


@needs_matplotlib
def test_an_absent_gradient_exits_1_and_writes_nothing(cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "grad.png"
    result = cli("plot", "conv1.weight.grad", "--out", str(out))
    assert result.code == 1
    assert result.out == ""
    assert "conv1.weight.grad is None" in result.err
    assert "gradwire backward" in result.err
    assert only_file(tmp_path) == []


@pytest.mark.parametrize("selector", ["conv1.weight[0", "conv1.weight[x]", "conv1..weight"])
def test_a_bad_selector_exits_2(cli: Run, tmp_path: Path, selector: str) -> None:
    result = cli("plot", selector, "--out", str(tmp_path / "x.png"))
    assert result.code == 2
    assert result.err.startswith("gradwire plot: error: ")
    assert only_file(tmp_path) == []


def test_an_unknown_tensor_exits_1(cli: Run, tmp_path: Path) -> None:
    result = cli("plot", "conv9.weight", "--out", str(tmp_path / "x.png"))
    assert result.code == 1
    assert "NOT_FOUND" in result.err
    assert only_file(tmp_path) == []


@needs_matplotlib
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["linear.weight", "--kind", "kernels"], "kernels need a 4-D"),
        (["conv2.weight[0]", "--kind", "heatmap"], "a heatmap needs a 2-D slice"),
        (["conv1.weight", "--bins", "0"], "bins must be between 1 and 4096"),
        (["conv1.weight", "--dpi", "5"], "dpi must be between"),
        (["conv1.weight", "--kind", "pie"], "invalid choice: 'pie'"),
    ],
)
def test_a_kind_or_option_that_cannot_draw_exits_2(
    cli: Run, tmp_path: Path, argv: list[str], message: str
) -> None:
    result = cli("plot", *argv, "--out", str(tmp_path / "x.png"))
    assert result.code == 2
    assert message in result.err
    assert only_file(tmp_path) == []


def test_out_must_be_a_png_in_a_folder_that_exists(cli: Run, tmp_path: Path) -> None:
    result = cli("plot", "conv1.weight", "--out", str(tmp_path / "x.jpg"))
    assert result.code == 2
    assert "PNG" in result.err
    result = cli("plot", "conv1.weight", "--out", str(tmp_path / "missing" / "x.png"))
    assert result.code == 2
    assert "no such folder" in result.err


def test_out_is_required(cli: Run) -> None:
    result = cli("plot", "conv1.weight")
    assert result.code == 2
    assert "--out" in result.err


def test_without_matplotlib_exits_2_with_the_install_hint(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, as when it is absent.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli("plot", "conv1.weight", "--out", str(tmp_path / "x.png"))
    assert result.code == 2
    assert "pip install 'gradwire[plot]' where gradwire is installed" in result.err
    assert "pip install '.[plot]'" in result.err
    assert only_file(tmp_path) == []


def _require_matplotlib_saying(tmp_path: Path, init: str) -> str:
    """What require_matplotlib says, in a process of its own, of a matplotlib whose
    `__init__.py` is `init`: its PlotUnavailable's message."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text(init)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from gradwire.plot import PlotUnavailable, require_matplotlib\n"
        "try:\n"
        "    require_matplotlib()\n"
        "except PlotUnavailable as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_matplotlib_that_fails_to_import_is_not_said_to_be_missing(tmp_path: Path) -> None:
    """A matplotlib built for another numpy (3.7.0 beside numpy 2) fails to import: it was
    told to install the plot extra, which it had (a review of installing)."""
    said = _require_matplotlib_saying(
        tmp_path, "raise ImportError('numpy.core.multiarray failed to import')\n"
    )
    assert said == (
        "pictures need matplotlib, which is installed but fails to import: numpy.core."
        "multiarray failed to import (one older than its numpy? pip install -U matplotlib)\n"
    )


def test_the_plot_extra_asks_for_a_matplotlib_that_imports_beside_numpy_2() -> None:
    """The extra's floor let pip pick matplotlib 3.7.0 beside numpy 2, which fails to import
    (the test above): the floor is 3.8, as RELIABILITY.md's row of installing says, and no
    test held it until a review of its rows."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    extra = re.search(r"^plot = \[(.*?)\]", pyproject, re.MULTILINE)  # tomllib: 3.11 on
    assert extra, "no plot extra in pyproject.toml"
    (wanted,) = [Requirement(r) for r in re.findall(r'"([^"]+)"', extra[1])]
    assert wanted.name == "matplotlib"
    assert not wanted.specifier.contains(Version("3.7.0"))
    assert wanted.specifier.contains(Version("3.8.0"))


def test_a_matplotlib_missing_a_module_of_its_own_is_not_said_to_be_missing(
    tmp_path: Path,
) -> None:
    """Only matplotlib itself missing is the plot extra's to install: one of its own imports
    failing says so, naming it."""
    said = _require_matplotlib_saying(tmp_path, "import gradwire_no_such_module\n")
    assert said.startswith(
        "pictures need matplotlib, which is installed but fails to import: No module named "
        "'gradwire_no_such_module'"
    ), said


def test_a_matplotlib_that_fails_to_import_a_part_of_its_own_is_not_said_to_be_missing(
    tmp_path: Path,
) -> None:
    """`from matplotlib import _part` failing in a broken install raises an ImportError (not
    ModuleNotFoundError) whose name is matplotlib's own: it is installed, and says so."""
    said = _require_matplotlib_saying(tmp_path, "from matplotlib import _no_such_part\n")
    assert said.startswith(
        "pictures need matplotlib, which is installed but fails to import: cannot import name "
        "'_no_such_part'"
    ), said


def test_the_thin_client_imports_without_matplotlib() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "import gradwire, gradwire.cli, gradwire.plot; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout == "ok\n", done.stderr


def test_plot_help() -> None:
    result = run_main("plot", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())  # argparse wraps lines at the terminal's width
    assert text.startswith("usage: gradwire plot ")
    for words in (
        "selector",
        "--out FILE.png",
        "{auto,kernels,heatmap,histogram}",
        "--bins BINS",
        "--title TITLE",
        "--dpi DPI",
        "a 2-D slice -> heatmap",
        "anything else -> histogram",
        "a column per output channel",
        f"at most {plot.MAX_KERNEL_OUT} output x {plot.MAX_KERNEL_IN} input channels",
        "diverging colour map centred on 0",
        "(800 x 600 pixels by default)",
        "pip install '.[plot]'",
    ):
        assert words in text, words


# --- the drawing module, without a server -------------------------------------------------


@needs_matplotlib
def test_a_large_kernel_grid_is_truncated_and_says_so(tmp_path: Path) -> None:
    weights = np.random.default_rng(0).standard_normal((40, 35, 3, 3)).astype(np.float32)
    result = plot.plot_array(weights, tmp_path / "k.png", name="features.3.weight")
    assert result.kind == "kernels"
    assert result.note == "showing the first 32 of 40 output x 32 of 35 input channels"
    assert png_size(tmp_path / "k.png") == size_at(plot.DEFAULT_DPI)


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("conv1.weight", (16, 3, 3, 3), "kernels"),
        ("conv1.weight.grad", (16, 3, 3, 3), "kernels"),
        ("input", (8, 3, 10, 10), "histogram"),  # 4-D, but a batch, not kernels
        ("conv1.overweight", (16, 3, 3, 3), "histogram"),  # a name ending in weight
        ("conv1.weighted", (16, 3, 3, 3), "histogram"),  # one going on past it
        ("linear.weight", (20, 3200), "heatmap"),
        ("output", (8, 20), "heatmap"),
        ("loss", (), "histogram"),
        ("target", (8,), "histogram"),
        ("conv2.weight", (32, 16, 3), "histogram"),
        ("x.weight", (1, 2, 3, 4, 5), "histogram"),
    ],
)
def test_auto_chooses_by_name_and_rank(name: str, shape: tuple[int, ...], kind: str) -> None:
    assert plot.choose_kind(name, shape) == kind


def test_histogram_of_counts_finite_values_and_reports_the_rest() -> None:
    values = np.array([1.0, 2.0, 3.0, np.nan, np.inf, -np.inf, 2.0], dtype=np.float32)
    data = plot.histogram_of(values, bins=2)
    assert data.counts.tolist() == [1, 3]
    assert (data.low, data.high) == (1.0, 3.0)
    assert (data.count, data.nan_count, data.inf_count) == (7, 1, 2)
    assert data.mean == pytest.approx(2.0)
    assert data.std == pytest.approx(np.std([1.0, 2.0, 3.0, 2.0]))  # of the population
    constant = plot.histogram_of(np.full(5, 2.0, np.float32), bins=4)
    assert constant.counts.sum() == 5  # one value still lands in a bin
    assert (constant.low, constant.high) == (1.5, 2.5)  # a bin of width 1 around it
    one = plot.histogram_of(np.array([0.25], np.float32), bins=3)
    assert (one.counts.sum(), one.mean, one.std) == (1, 0.25, 0.0)
    empty = plot.histogram_of(np.array([], np.float32))
    assert empty.counts.sum() == 0 and (empty.low, empty.high) == (0.0, 1.0)
    assert len(empty.counts) == plot.DEFAULT_BINS  # the bins asked for, none filled


def test_the_bins_and_dpi_asked_for_are_taken_up_to_their_ends() -> None:
    values = np.arange(5, dtype=np.float32)
    assert len(plot.histogram_of(values, bins=plot.MAX_BINS).counts) == 4096
    with pytest.raises(plot.PlotError, match="bins must be between 1 and 4096, not 4097"):
        plot.histogram_of(values, bins=4097)
    plot.check_options("auto", 1, 10)
    plot.check_options("histogram", 4096, 1000)
    for dpi in (9, 1001):
        with pytest.raises(plot.PlotError, match=f"dpi must be between 10 and 1000, not {dpi}"):
            plot.check_options("auto", 50, dpi)


@needs_matplotlib
@pytest.mark.parametrize(
    ("values", "cmap", "scale"),
    [
        (np.array([[0.5, 1.0]], np.float32), plot.DIVERGING, (-1.0, 1.0)),  # floats: signed
        (np.zeros((2, 2), np.float32), plot.DIVERGING, (-1.0, 1.0)),  # nothing but 0
        (np.array([[-2, 1]]), plot.DIVERGING, (-2.0, 2.0)),
        (np.array([[0, 3]]), plot.SEQUENTIAL, (0.0, 3.0)),  # class indices, counts
        (np.full((2, 2), 4), plot.SEQUENTIAL, (4.0, 5.0)),  # one value: a span of 1 above
        (np.array([[-128, 1]], np.int8), plot.DIVERGING, (-128.0, 128.0)),  # |int8's least|
    ],
)
def test_a_colour_scale_is_centred_on_0_for_signed_values_alone(
    values: np.ndarray[Any, Any], cmap: str, scale: tuple[float, float]
) -> None:
    chosen, low, high = plot._colour_scale(values)
    assert chosen.name.startswith(cmap)
    assert (low, high) == scale


@needs_matplotlib
def test_a_boolean_mask_draws_as_a_histogram(tmp_path: Path) -> None:
    result = plot.plot_array(np.array([True, False, True]), tmp_path / "m.png", name="mask")
    assert result.kind == "histogram" and png_size(result.path) == size_at(plot.DEFAULT_DPI)


def test_a_single_value_is_titled_as_one() -> None:
    """A loss was titled "loss  []" above "1 values" (found by a review of the CLI)."""
    assert plot.heading_of("loss", ()) == "loss  (a single value)"
    assert plot.heading_of("conv1.weight[0]", (3, 3, 3)) == "conv1.weight[0]  [3, 3, 3]"
    assert (plot._values(1), plot._values(2048)) == ("1 value", "2,048 values")


def test_a_picture_that_cannot_be_written_is_named_without_its_temporary(
    cli: Run, tmp_path: Path
) -> None:
    """The message named the hidden temporary the picture is written to first
    ('.x.png.41129db3.tmp'), not the file asked for (found by a review of the CLI)."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder no one can create a file in, root included")
    out = Path("/proc") / f"gradwire-{tmp_path.name}.png"
    result = cli("plot", "conv1.weight", "--out", str(out))
    assert result.code == 1
    assert result.err.startswith(f"gradwire plot: error: cannot write {out}: ")
    assert ".tmp" not in result.err


@pytest.mark.parametrize(
    ("selector", "kind"), [("conv1.weight", "kernels"), ("linear.weight", "heatmap")]
)
def test_bins_for_a_picture_that_is_no_histogram_are_refused(
    cli: Run, tmp_path: Path, selector: str, kind: str
) -> None:
    """--bins 7 drew kernels or a heatmap, the bins dropped without a word (found by a
    review of the CLI); with --kind histogram they are taken."""
    out = tmp_path / "x.png"
    result = cli("plot", selector, "--out", str(out), "--bins", "7")
    assert result.code == 2
    assert f"draws as {kind}: add --kind histogram" in result.err and not out.exists()
    assert cli("plot", selector, "--out", str(out), "--bins", "7", "--kind", "histogram").code == 0


@needs_matplotlib
def test_a_heatmap_draws_each_cell_in_its_own_colour() -> None:
    """Rows of +1 and -1, 256 columns wide: matplotlib's default smoothing blended each row
    through white into the next, drawing a 0 the tensor does not hold (found by the
    forty-fourth session's walkthrough as a researcher). Every pixel inside the axes must be
    one of the two colours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stripes = np.ones((10, 256), dtype=np.float32)
    stripes[1::2] = -1
    fig = Figure(figsize=plot.FIGSIZE, dpi=plot.DEFAULT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    assert plot._draw_heatmap(fig, stripes, "stripes") is None
    fig.canvas.draw()
    image = fig.axes[0].get_images()[0]
    box = fig.axes[0].get_window_extent()
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
    height = pixels.shape[0]  # the buffer's rows run from the top, the box's y from the bottom
    inside = pixels[
        height - int(box.y1) + 3 : height - int(box.y0) - 3, int(box.x0) + 3 : int(box.x1) - 3
    ].reshape(-1, 3)
    colours = np.array([image.cmap(image.norm(v))[:3] for v in (1.0, -1.0)]) * 255
    nearest = np.abs(inside[:, None, :] - colours[None, :, :]).max(axis=2).min(axis=1)
    assert inside.shape[0] > 100_000
    assert nearest.max() <= 2, "a pixel of neither row's colour"


@needs_matplotlib
def test_a_heatmap_wider_than_its_pixels_says_so(tmp_path: Path) -> None:
    weights = np.random.default_rng(0).standard_normal((20, 3200)).astype(np.float32)
    result = plot.plot_array(weights, tmp_path / "h.png", name="linear.weight")
    assert result.kind == "heatmap"
    assert result.note is not None
    assert result.note.startswith("3,200 columns on about ")
    assert result.note.endswith(
        "pixels: a pixel shows one of the cells it covers; slice the tensor to see every value"
    )
    narrow = plot.plot_array(weights[:, :64], tmp_path / "n.png", name="linear.weight")
    assert narrow.note is None


@needs_matplotlib
@pytest.mark.parametrize("kind", ["heatmap", "kernels"])
def test_infinities_have_colours_of_their_own_and_are_counted(kind: str) -> None:
    """+inf and -inf were drawn gold, as NaN (matplotlib takes them for 'bad' too), and the
    title counted NaN alone (found by a review of watching training remotely)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    values = np.zeros((4, 6), dtype=np.float32)
    values[0], values[1], values[2, :3], values[3] = np.inf, -np.inf, np.nan, 0.5
    fig = Figure(figsize=plot.FIGSIZE, dpi=plot.DEFAULT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if kind == "heatmap":
        plot._draw_heatmap(fig, values, "extremes")
        title = fig.axes[0].get_title()
    else:
        plot._draw_kernels(fig, values.reshape(2, 2, 2, 3), "extremes")
        title = fig.get_suptitle()
    assert "3 NaN shown gold; 6 +inf shown black; 6 -inf shown green" in title
    image = fig.axes[0].get_images()[0]
    drawn = image.cmap(image.norm(image.get_array()))[..., :3]
    wanted = {to_rgb(c) for c in (plot.NAN_COLOUR, plot.POSINF_COLOUR, plot.NEGINF_COLOUR)}
    seen = {tuple(round(float(v), 4) for v in pixel) for pixel in drawn.reshape(-1, 3)}
    assert {tuple(round(v, 4) for v in colour) for colour in wanted} <= seen


# --- found by mutation testing of the plot command ----------------------------------------------


@needs_matplotlib
def test_out_may_say_png_in_capitals(cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "W.PNG"
    result = cli("plot", "conv1.weight", "--out", str(out))
    assert result.code == 0, result.err
    assert png_size(out) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
@pytest.mark.parametrize(("selector", "kind"), [("linear.weight.grad", "heatmap"),
                                                ("conv1.weight.grad", "kernels")])  # fmt: skip
def test_an_absent_gradient_drawn_as_a_kind_asked_for_exits_1(
    cli: Run, tmp_path: Path, selector: str, kind: str
) -> None:
    out = tmp_path / "grad.png"
    result = cli("plot", selector, "--kind", kind, "--out", str(out))
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"gradwire plot: error: {selector} is None (absent): nothing to draw, so {out} was not "
        "written; it exists after `gradwire backward`\n"
    )
    assert only_file(tmp_path) == []


def test_the_servers_histogram_counts_the_values_it_leaves_out(
    client: gradwire.Client, tmp_path: Path
) -> None:
    """The histogram plot draws from GetStats: its NaN and infinities, counted apart for the
    picture's title, as numpy counts them."""
    from gradwire.cli.tensors import _server_histogram
    from gradwire.selector import parse_selector

    nan, inf = float("nan"), float("inf")
    values = np.array([[nan, inf, -inf], [1, 2, 3], [nan, nan, 0.5]], dtype=np.float32)
    client.set("conv1.weight[0, 0]", values)
    binned = _server_histogram(client, parse_selector("conv1.weight[0, 0]"), 4, tmp_path / "x.png")
    assert binned is not None
    data, shape = binned
    local = plot.histogram_of(values, bins=4)
    assert shape == (3, 3)
    assert (data.count, data.nan_count, data.inf_count) == (9, 3, 2)
    assert data.counts.tolist() == local.counts.tolist()
    assert (data.low, data.high) == (local.low, local.high)


@needs_matplotlib
def test_plot_histogram_draws_the_statistics_client_stats_gives(
    client: gradwire.Client, tmp_path: Path
) -> None:
    """plot_histogram's docstring names counts "binned by the server's GetStats": given what
    client.stats() returns, it raised AttributeError ("'tuple' object has no attribute
    'any'"), a HistogramData being a type of the plot module's own (found by a review of the
    client as a researcher uses it in a notebook). The same picture as the CLI's."""
    summary = client.stats("conv2.weight", bins=40)
    assert summary.stats is not None and summary.shape is not None
    out = tmp_path / "conv2.png"
    result = plot.plot_histogram(summary.stats, out, label="conv2.weight", shape=summary.shape)
    assert (result.kind, png_size(out)) == ("histogram", size_at(plot.DEFAULT_DPI))
    data = plot.HistogramData.from_stats(summary.stats)
    assert data.counts.tolist() == list(summary.stats.histogram.counts)  # type: ignore[union-attr]
    assert (data.count, data.mean, data.std) == (
        summary.stats.count,
        summary.stats.mean,
        summary.stats.std,
    )
    with pytest.raises(plot.PlotError, match="not their histogram"):
        plot.plot_histogram(
            summary.stats.histogram,  # type: ignore[arg-type]
            out,
            label="conv2.weight",
            shape=summary.shape,
        )
    without = client.stats("conv2.weight").stats
    assert without is not None
    with pytest.raises(plot.PlotError, match=r"no histogram: ask for one, client\.stats"):
        plot.plot_histogram(without, out, label="conv2.weight", shape=summary.shape)


@needs_matplotlib
def test_a_pictures_note_is_said_in_its_line_and_its_json(cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "w.png"
    text = cli("plot", "linear.weight", "--out", str(out))
    data = cli("plot", "linear.weight", "--out", str(out), "--json").json()
    assert data["note"].startswith("3,200 columns on about ")
    width, height = size_at(plot.DEFAULT_DPI)
    assert text.out == (
        f"wrote {out}: heatmap of linear.weight [20, 3200], {width}x{height} pixels "
        f"({data['note']})\n"
    )


@needs_matplotlib
def test_a_histogram_without_bins_given_has_the_default_bins(cli: Run, tmp_path: Path) -> None:
    default, given = tmp_path / "default.png", tmp_path / "given.png"
    argv = ("plot", "conv2.weight", "--kind", "histogram", "--out")
    assert cli(*argv, str(default)).code == 0
    assert cli(*argv, str(given), "--bins", str(plot.DEFAULT_BINS)).code == 0
    assert default.read_bytes() == given.read_bytes()


def test_a_histogram_has_50_bins_unless_told() -> None:
    """The help's "(default 50)": nothing held the number itself, only DEFAULT_BINS to
    whatever it was."""
    assert len(plot.histogram_of(np.arange(5, dtype=np.float32)).counts) == 50


@needs_matplotlib
def test_the_colours_drawn_are_those_the_help_and_the_titles_name() -> None:
    """Red positive and blue negative (the help's words), grey between kernels, and NaN,
    +inf and -inf in the gold, black and green their titles name. The tests above read
    the colours from the module's own constants, so a constant changed went unseen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    values = np.array([[1.0, -1.0, np.nan], [np.inf, -np.inf, 0.0]], dtype=np.float32)
    fig = Figure(figsize=plot.FIGSIZE, dpi=plot.DEFAULT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    plot._draw_kernels(fig, np.stack([values, values])[:, None], "colours")
    kernels, overlay = fig.axes[0].get_images()
    drawn = kernels.cmap(kernels.norm(kernels.get_array()))[..., :3]
    (positive, negative, nan), (high, low, _) = drawn[:, :3]
    assert positive[0] > positive[2] and negative[2] > negative[0]  # red, blue
    assert tuple(nan) == to_rgb("gold") and tuple(high) == to_rgb("black")
    assert low[1] > max(low[0], low[2])  # green
    gap = overlay.get_array()[0, 3]  # the column between the two kernels
    assert gap[3] == 1.0 and gap[0] == gap[1] == gap[2] and 0.3 < gap[0] < 0.9  # grey
    assert overlay.get_array()[0, 0, 3] == 0.0  # and clear over a kernel's values


def test_a_histogram_s_mean_and_std_are_those_of_float64_for_half_precision() -> None:
    """Summed in the values' own float16, the mean came back rounded to float16's
    precision (0.32495 for 0.32504)."""
    values = np.array([0.1, 0.2, 0.3, 0.7], dtype=np.float16)
    data = plot.histogram_of(values)
    wide = values.astype(np.float64)
    assert (data.mean, data.std) == (float(wide.mean()), float(wide.std()))


# --- found by the third mutation pass over the drawing --------------------------------------


def _figure() -> Any:
    """A figure as `_write` makes one, for the drawing functions to fill and a test to read."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=plot.FIGSIZE, dpi=plot.DEFAULT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@needs_matplotlib
@pytest.mark.parametrize(
    ("values", "lines"),
    [
        ([1, 2, 3, np.nan, np.inf, -np.inf, 2], ["7 values, mean 2, std 0.7071",
                                                  "not drawn: 1 NaN, 2 inf"]),
        ([0.25], ["1 value, mean 0.25, std 0"]),
        ([], ["no values: the selection is empty"]),
        ([np.nan, np.inf], ["2 values, none finite", "not drawn: 1 NaN, 1 inf"]),
        ([1.0, np.nan], ["2 values, mean 1, std 0", "not drawn: 1 NaN, 0 inf"]),
        ([1.0, -np.inf], ["2 values, mean 1, std 0", "not drawn: 0 NaN, 1 inf"]),
    ],
)  # fmt: skip
def test_a_histogram_s_title_says_its_values_and_what_it_leaves_out(
    values: list[float], lines: list[str]
) -> None:
    fig = _figure()
    data = plot.histogram_of(np.array(values, np.float32), bins=2)
    assert plot._draw_histogram(fig, data, "h") is None
    assert fig.axes[0].get_title() == "\n".join(["h", *lines])


@needs_matplotlib
def test_a_histogram_s_title_groups_thousands_and_keeps_4_digits() -> None:
    fig = _figure()
    data = plot.HistogramData(
        counts=np.array([8776]), low=0.0, high=1.0, count=12345, mean=1.23456,
        std=0.0123456, nan_count=1234, inf_count=2335,
    )  # fmt: skip
    plot._draw_histogram(fig, data, "h")
    assert fig.axes[0].get_title() == (
        "h\n12,345 values, mean 1.235, std 0.01235\nnot drawn: 1,234 NaN, 2,335 inf"
    )


@needs_matplotlib
@pytest.mark.parametrize(
    ("low", "high", "counts", "span", "zero_line"),
    [
        (-1.0, 3.0, [1, 2, 0, 1], (-1.0, 3.0), True),
        (0.0, 3.0, [1, 0, 2], (0.0, 3.0), False),  # 0 at an end: no line on the edge
        (-3.0, 0.0, [1, 0, 2], (-3.0, 0.0), False),
        (2.0, 2.0, [5], (1.5, 2.5), False),  # no width: one unit around the value
        (math.nan, math.nan, [0, 0], (0.0, 1.0), False),  # none finite: [0, 1]
        (-math.inf, 1.0, [0, 0], (0.0, 1.0), False),
    ],
)
def test_a_histogram_s_bins_span_its_range_and_0_is_marked_inside_it(
    low: float, high: float, counts: list[int], span: tuple[float, float], zero_line: bool
) -> None:
    fig = _figure()
    data = plot.HistogramData(np.array(counts), low, high, sum(counts), 0.0, 0.0)
    plot._draw_histogram(fig, data, "h")
    ax = fig.axes[0]
    assert ax.get_xlim() == span
    drawn = ax.patches[0].get_data()
    assert drawn.values.tolist() == counts
    edges = drawn.edges
    assert edges.tolist() == np.linspace(*span, len(counts) + 1).tolist()
    assert [line.get_xdata() for line in ax.lines] == ([[0.0, 0.0]] if zero_line else [])
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top == (1 if not any(counts) else pytest.approx(max(counts), rel=0.1))


@needs_matplotlib
@pytest.mark.parametrize(
    ("shape", "bands"),
    [
        ((16, 3, 3, 3), [range(0, 8), range(8, 16)]),  # conv1: two bands of 8 filters
        ((5, 1, 2, 2), [range(0, 3), range(3, 5)]),  # the last band part full
        ((4, 1, 1, 5), [range(0, 2), range(2, 4)]),  # 3 bands asked, 2 of 2 enough
        ((3, 1, 1, 1), [range(0, 2), range(2, 3)]),  # 3 wide to 1 high: the page's shape
        ((1, 32, 3, 3), [range(0, 1)]),  # taller than wide: one band
        ((40, 35, 2, 2), [range(0, 32)]),  # the first 32 x 32
    ],
)
def test_a_kernel_grid_shows_each_filter_once_in_bands_of_tiles(
    shape: tuple[int, int, int, int], bands: list[range]
) -> None:
    """Each kernel a tile at its filter's column and input's row, a grey gap between tiles,
    and every filter in one band, ticked with its own number at the centre of its cell (the
    tile and the gap after it)."""
    weights = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) - 100
    n_out, n_in, kh, kw = shape
    shown_out, shown_in = min(n_out, plot.MAX_KERNEL_OUT), min(n_in, plot.MAX_KERNEL_IN)
    note = None
    if (shown_out, shown_in) != (n_out, n_in):
        note = f"showing the first 32 of {n_out} output x 32 of {n_in} input channels"
    fig = _figure()
    assert plot._draw_kernels(fig, weights, "k") == note
    assert fig.get_suptitle() == ("k" if note is None else f"k\n{note}")
    bound = float(np.abs(weights[:shown_out, :shown_in]).max())  # of what is shown alone
    axes = fig.axes[:-1]  # the colour bar last
    assert len(axes) == len(bands)
    for ax, band in zip(axes, bands, strict=True):
        image = ax.get_images()[0]
        assert (image.norm.vmin, image.norm.vmax) == (-bound, bound)
        mosaic, overlay = (image.get_array() for image in ax.get_images())
        assert mosaic.shape == (shown_in * (kh + 1) - 1, len(bands[0]) * (kw + 1) - 1)
        covered = np.zeros(mosaic.shape, bool)
        for column, o in enumerate(band):
            for i in range(shown_in):
                x = column * (kw + 1)
                tile = (slice(i * (kh + 1), i * (kh + 1) + kh), slice(x, x + kw))
                assert mosaic[tile].tolist() == weights[o, i].tolist()
                covered[tile] = True
        assert (overlay[..., 3] == np.where(covered, 0.0, 1.0)).all()  # grey off the tiles
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(o) for o in band]
        assert ax.get_xticks().tolist() == [c * (kw + 1) + kw / 2 for c in range(len(band))]
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(shown_in)]
        assert ax.get_yticks().tolist() == [i * (kh + 1) + kh / 2 for i in range(shown_in)]
        crowded = max(len(bands[0]), shown_in) > 16
        assert ax.get_xticklabels()[0].get_fontsize() == (7 if crowded else 9)
        assert ax.xaxis.get_major_ticks()[0].tick1line.get_markersize() == 0  # labels alone
    assert axes[-1].get_xlabel() == "output channel (one filter per column)"
    assert fig.get_supylabel() == "input channel"
    assert fig.axes[-1].get_ylabel() == "value"


@needs_matplotlib
def test_a_heatmap_of_a_slice_with_ones_in_its_shape_names_its_two_dims() -> None:
    fig = _figure()
    values = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], np.float32)
    assert plot._draw_heatmap(fig, values.reshape(1, 2, 1, 3), "h") is None
    ax, bar = fig.axes
    assert ax.get_images()[0].get_array().tolist() == values.tolist()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("column (dim 1, 3)", "row (dim 0, 2)")
    assert bar.get_ylabel() == "value"
    fig.canvas.draw()
    ticks = [*ax.get_xticks(), *ax.get_yticks()]
    assert ticks and all(t == int(t) for t in ticks)  # a tick per cell, none between


@needs_matplotlib
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 0, 5), "nothing to draw: shape [1, 0, 5] is empty"),
        ((0, 5), "nothing to draw: shape [0, 5] is empty"),
        ((5,), "a heatmap needs a 2-D slice, not 1-D [5]"),
        ((1, 5, 1), "a heatmap needs a 2-D slice, not 3-D [1, 5, 1]"),
    ],
)
def test_a_heatmap_of_no_values_or_one_dim_is_refused(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(plot.PlotError, match=re.escape(message)):
        plot._draw_heatmap(_figure(), np.zeros(shape, np.float32), "h")


@needs_matplotlib
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 2, 3, 3, 1), "kernels need a 4-D [out, in, kh, kw] tensor, not 5-D [2, 2, 3, 3, 1]"),
        ((2, 2, 0, 3), "no kernels to draw: shape [2, 2, 0, 3] is empty"),
        ((2, 2, 3, 0), "no kernels to draw: shape [2, 2, 3, 0] is empty"),
    ],
)
def test_kernels_of_another_rank_or_of_no_values_are_refused(
    shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(plot.PlotError, match=re.escape(message)):
        plot._draw_kernels(_figure(), np.zeros(shape, np.float32), "k")


def _stripes(rows: int, columns: int) -> np.ndarray[Any, Any]:
    values = np.ones((rows, columns), np.float32)
    values[1::2] = -1  # every picture on the same colour scale, so with the same axes
    return values


@needs_matplotlib
def test_a_heatmap_is_crowded_past_one_cell_a_pixel_of_its_laid_out_axes() -> None:
    """The pixels counted are the axes' own once laid out (those of a picture like it that
    is not crowded), and a cell a pixel is not too many; the note goes in the title too."""
    narrow = _figure()
    plot._draw_heatmap(narrow, _stripes(20, 64), "h")
    narrow.draw_without_rendering()
    pixels = math.floor(narrow.axes[0].get_window_extent().width)
    fig = _figure()
    note = plot._draw_heatmap(fig, _stripes(20, 3200), "h")
    said = f"3,200 columns on about {pixels} pixels"
    assert note == (
        f"{said}: a pixel shows one of the cells it covers; slice the tensor to see every value"
    )
    assert fig.axes[0].get_title() == f"h\n{said}: one cell a pixel"
    assert plot._draw_heatmap(_figure(), _stripes(20, pixels), "h") is None
    wider = plot._draw_heatmap(_figure(), _stripes(20, pixels + 1), "h")
    assert wider is not None
    assert wider.startswith(f"{pixels + 1:,} columns on about {pixels} pixels:")


@needs_matplotlib
def test_a_heatmap_crowded_both_ways_says_both_after_its_extremes() -> None:
    fig = _figure()
    values = _stripes(1000, 1000)
    values[0, 0] = np.nan
    note = plot._draw_heatmap(fig, values, "h")
    assert note is not None
    match = re.fullmatch(
        r"1,000 columns on about (\d+) pixels and 1,000 rows on about (\d+) pixels: a pixel "
        "shows one of the cells it covers; slice the tensor to see every value",
        note,
    )
    assert match is not None, note
    assert int(match[1]) > int(match[2])  # the axes wider than high, as the figure
    assert fig.axes[0].get_title() == f"h\n1 NaN shown gold\n{note.split(':')[0]}: one cell a pixel"


@needs_matplotlib
def test_only_the_extremes_present_are_counted_and_the_values_are_left_as_they_were() -> None:
    """A title names only what the picture holds; the infinities moved past the scale are
    moved in a copy, not in the caller's array."""
    values = np.array([[1.0, np.inf], [np.inf, 0.5]])
    fig = _figure()
    plot._draw_heatmap(fig, values, "h")
    assert fig.axes[0].get_title() == "h\n2 +inf shown black"
    assert values.tolist() == [[1.0, np.inf], [np.inf, 0.5]]


@needs_matplotlib
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # matplotlib's own
def test_infinities_beside_float64_s_largest_still_draw_past_the_scale() -> None:
    """+inf is drawn at the scale's top plus its span: past float64's largest (8e307 + 1.6e308)
    that was inf, which matplotlib draws as NaN (gold); it stops at the largest value. (A
    scale that wide is refused before it is drawn, test_float64_values_past_a_quarter...: the
    guard keeps _drawable's own arithmetic finite all the same.)"""
    largest = np.finfo(np.float64).max
    drawn, _ = plot._drawable(np.array([[8e307, 0.0], [np.inf, -np.inf]]), -8e307, 8e307)
    assert np.isfinite(drawn).all()
    assert (drawn[1, 0], drawn[1, 1]) == (largest, -largest)


@needs_matplotlib
def test_plot_array_takes_each_kind_asked_for_and_refuses_others(tmp_path: Path) -> None:
    weights = np.ones((2, 2, 3, 3), np.float32)
    out = tmp_path / "x.png"
    assert plot.plot_array(weights, out, name="x", kind="kernels").kind == "kernels"
    assert plot.plot_array(weights[0, 0], out, name="x", kind="histogram").kind == "histogram"
    assert plot.plot_array(weights[0, 0], out, name="x", kind="heatmap").kind == "heatmap"
    with pytest.raises(plot.PlotError, match="unknown kind 'pie': expected one of auto, "):
        plot.plot_array(weights, tmp_path / "pie.png", name="x", kind="pie")
    with pytest.raises(plot.PlotError, match="dpi must be between 10 and 1000, not 5"):
        plot.plot_array(weights, tmp_path / "dpi.png", name="x", dpi=5)
    data = plot.histogram_of(weights)
    with pytest.raises(plot.PlotError, match="dpi must be between 10 and 1000, not 1001"):
        plot.plot_histogram(data, tmp_path / "dpi.png", label="x", shape=(2,), dpi=1001)
    assert only_file(tmp_path) == ["x.png"]


@needs_matplotlib
def test_auto_recognises_a_conv_weight_by_its_name_not_its_label(tmp_path: Path) -> None:
    weights = np.ones((4, 2, 3, 3), np.float32)
    result = plot.plot_array(
        weights, tmp_path / "k.png", name="conv1.weight", label="conv1.weight[:4]"
    )
    assert result.kind == "kernels"


@needs_matplotlib
def test_plot_array_draws_with_the_label_title_and_bins_given(tmp_path: Path) -> None:
    """The same picture as one drawn with the heading and the histogram made apart."""
    values = np.random.default_rng(0).standard_normal(200).astype(np.float32)
    drawn = plot.plot_array(
        values, tmp_path / "a.png", name="conv1.bias", label="conv1.bias[:200]", bins=7
    )
    plot.plot_histogram(
        plot.histogram_of(values, 7), tmp_path / "b.png", label="conv1.bias[:200]", shape=(200,)
    )
    assert drawn.path.read_bytes() == (tmp_path / "b.png").read_bytes()
    plot.plot_array(values, tmp_path / "c.png", name="conv1.bias", title="", bins=7)
    plot.plot_histogram(
        plot.histogram_of(values, 7), tmp_path / "d.png", label="x", shape=(1,), title=""
    )
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "d.png").read_bytes()  # untitled
    assert (tmp_path / "c.png").read_bytes() != drawn.path.read_bytes()


@needs_matplotlib
def test_plot_array_refuses_what_is_not_a_number_and_takes_unsigned(tmp_path: Path) -> None:
    with pytest.raises(plot.PlotError, match="cannot draw complex64 values; only numbers"):
        plot.plot_array(np.ones((2, 2), np.complex64), tmp_path / "c.png", name="c")
    assert only_file(tmp_path) == []
    counts = plot.plot_array(np.array([[0, 3]], np.uint8), tmp_path / "u.png", name="counts")
    assert counts.kind == "heatmap"


@needs_matplotlib
def test_plot_array_of_an_absent_tensor_says_it_is_absent(
    client: gradwire.Client, tmp_path: Path
) -> None:
    """What Client.get returns for a gradient before backward(), None, was refused as
    "cannot draw object values; only numbers" (found by a review of the client's API as a
    researcher uses it)."""
    client.reset()
    grad = client.get("conv1.weight.grad")
    with pytest.raises(plot.PlotError, match=r"conv1\.weight\.grad is None \(absent\)"):
        plot.plot_array(grad, tmp_path / "g.png", name="conv1.weight.grad")
    assert only_file(tmp_path) == []


def test_plot_array_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plot.PlotUnavailable, match=re.escape(plot.INSTALL_HINT)):
        plot.plot_array(np.ones(3), tmp_path / "x.png", name="x")
    assert only_file(tmp_path) == []


@needs_matplotlib
def test_a_picture_that_fails_to_draw_leaves_no_file_behind(tmp_path: Path) -> None:
    """A title matplotlib cannot typeset fails in savefig, the temporary already open."""
    with pytest.raises(ValueError):
        plot.plot_array(np.ones(3), tmp_path / "x.png", name="x", title=r"$\notacommand$")
    assert only_file(tmp_path) == []


def test_an_unknown_kind_is_refused_before_any_values_are_read() -> None:
    with pytest.raises(plot.PlotError, match="unknown kind 'pie': expected one of auto, kernels"):
        plot.check_options("pie", 50, 100)


@needs_matplotlib
def test_a_crowded_heatmap_s_pixels_are_those_of_the_picture_written(tmp_path: Path) -> None:
    """The note written beside the PNG counts the pixels of its laid-out axes, as drawn in
    the figure `_figure` makes (the tests' stand-in for `_write`'s)."""
    weights = np.random.default_rng(0).standard_normal((20, 3200)).astype(np.float32)
    written = plot.plot_array(weights, tmp_path / "h.png", name="linear.weight")
    assert written.note == plot._draw_heatmap(_figure(), weights, "linear.weight  [20, 3200]")


@needs_matplotlib
def test_a_picture_never_writes_into_a_file_already_at_its_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary is created, not opened for writing: a file (or a link) put at its name
    is not written through, and the picture fails."""
    monkeypatch.setattr(plot.secrets, "token_hex", lambda n: "0" * 2 * n)
    (tmp_path / ".x.png.00000000.tmp").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        plot.plot_array(np.ones(3), tmp_path / "x.png", name="x")
    assert not (tmp_path / "x.png").exists()


@needs_matplotlib
def test_a_picture_interrupted_while_saved_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of savefig: a KeyboardInterrupt, no Exception, still cleaned up."""
    from matplotlib.figure import Figure

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot.plot_array(np.ones(3), tmp_path / "x.png", name="x")
    assert only_file(tmp_path) == []


@needs_matplotlib
def test_a_picture_has_the_size_it_says_whatever_matplotlibrc_saves_at(tmp_path: Path) -> None:
    """savefig's own dpi (savefig.dpi in a user's matplotlibrc) does not set the PNG's size:
    the dpi asked for does, as the result says."""
    import matplotlib

    with matplotlib.rc_context({"savefig.dpi": 50}):
        result = plot.plot_array(np.ones(3), tmp_path / "x.png", name="x")
    assert png_size(result.path) == (result.width, result.height) == size_at(plot.DEFAULT_DPI)


@needs_matplotlib
def test_a_file_already_at_the_temporary_name_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open(tmp, "xb") refuses a file already there, and the cleanup unlinked it: a file the
    picture did not create (found by the seventieth session's mutation pass)."""
    monkeypatch.setattr(plot.secrets, "token_hex", lambda n: "0" * 2 * n)
    squatter = tmp_path / ".x.png.00000000.tmp"
    squatter.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        plot.plot_array(np.ones(3), tmp_path / "x.png", name="x")
    assert squatter.read_bytes() == b"someone else's"


@needs_matplotlib
@pytest.mark.parametrize("kind", ["heatmap", "kernels"])
def test_float64_values_past_a_quarter_of_their_largest_are_refused_saying_why(
    tmp_path: Path, kind: str
) -> None:
    """A diverging scale is [-b, b]: for b past half of float64's largest its width overflows
    to inf, and past a quarter matplotlib's tick locator does; matplotlib's own ValueError
    ("Axis limits cannot be NaN or Inf", "arange: cannot compute length") came out of
    plot_array. A PlotError says why; values up to that bound still draw (found by the
    seventieth session's mutation pass)."""
    shape = (2, 1, 2, 1) if kind == "kernels" else (2, 2)
    for large in (9e307, 5e307):
        values = np.array([[large, 0.0], [1.0, -1.0]]).reshape(shape)
        with pytest.raises(plot.PlotError, match=r"^values as large as .* cannot be placed"):
            plot.plot_array(values, tmp_path / "big.png", name="conv.weight", kind=kind)
    assert not list(tmp_path.iterdir())
    largest = np.finfo(np.float64).max / 4
    values = np.array([[largest, 0.0], [1.0, -largest]]).reshape(shape)
    drawn = plot.plot_array(values, tmp_path / "drawn.png", name="conv.weight", kind=kind)
    assert png_size(drawn.path) == size_at(plot.DEFAULT_DPI)
