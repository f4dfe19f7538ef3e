"""Commands on tensors: forward, backward, step, zero-grad, get, plot, stats, set and fill."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gradwire.cli.arguments import narrowed, parse_source, parse_value, random_source
from gradwire.cli.connection import session_option
from gradwire.cli.errors import CommandError, UsageError
from gradwire.cli.output import emit, json_line_with_values
from gradwire.client import Client
from gradwire.display import format_read, format_size
from gradwire.errors import (
    GradwireError,
    Unimplemented,
)
from gradwire.fill import Fill
from gradwire.plot import (
    DEFAULT_BINS,
    HistogramData,
    PlotError,
    PlotUnavailable,
    check_options,
    choose_kind,
    plot_array,
    plot_histogram,
    require_matplotlib,
)
from gradwire.progress import (
    TransferLine,
    format_stats,
)
from gradwire.results import Listing
from gradwire.selector import Selector, parse_selector
from gradwire.updates import Stats


def _forward_data(args: argparse.Namespace, client: Client) -> tuple[Any, Any]:
    """The input and targets forward sends: as given, or ones shaped for the server's model
    (as ListTensors describes it): 8 samples, and targets for as many samples as the input
    has (class 1, the tutorial's, for cross-entropy; ones for mse)."""
    if args.no_targets and args.targets is not None:  # one was dropped (a review of the CLI)
        raise UsageError("--targets and --no-targets ask for opposites: give one of them")
    sources = (args.input, None if args.no_targets else args.targets)
    if args.seed is not None and not any(random_source(s) for s in sources if s is not None):
        # Dropped without a word, where replay refuses --seed without --init random (found
        # by a review of the CLI as a researcher).
        # What this forward sends, said as given: "the default input is ones" was said of
        # an --input t.npy too (found by a review of the CLI as a researcher, its --help).
        given = [
            "the default input is ones" if args.input is None else f"the input is {args.input}",
            "no targets"
            if args.no_targets
            else "the default targets are class 1 (ones for an mse model)"
            if args.targets is None
            else f"the targets are {args.targets}",
        ]
        raise UsageError(
            "--seed seeds uniform, normal and randint sources, and this forward has none "
            f"({', '.join(given)}): give one, such as --input {_random_input(client)}, or "
            "leave --seed out"
        )
    seed = 0 if args.seed is None else args.seed
    model = None
    if args.input is None or (args.targets is None and not args.no_targets):
        model = client.list_tensors()
    if args.input is None:
        assert model is not None
        sample_shape, dtype = model_input(model)
        inputs: Any = Fill.ones(8, *sample_shape, dtype=dtype)
    else:
        inputs = parse_source(args.input, seed)
    if args.no_targets:
        return inputs, None
    if args.targets is not None:
        return inputs, parse_source(args.targets, seed)
    assert model is not None
    shape = tuple(inputs.shape)
    if not shape:  # the server refuses it too, --targets or not
        sample = [str(d) for d in model_input(model)[0]]
        takes, example = ", ".join(["N", *sample]), ",".join(["8", *sample])
        raise UsageError(
            f"the input has no dimension (shape []), where the model takes [{takes}]: give "
            f"its shape, such as ones:{example}"
        )
    if model.loss == "mse":
        return inputs, Fill.ones(shape[0], model.outputs or 1)
    if model.outputs == 1:  # one class: class 1 does not exist
        return inputs, Fill.zeros(shape[0], dtype="int64")
    return inputs, Fill.ones(shape[0], dtype="int64")


def cmd_forward(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    inputs, target = _forward_data(args, client)
    result = client.forward(inputs, target, eval_mode=args.eval)
    loss = "no target, no loss" if result.loss is None else f"loss {result.loss!r}"
    emit(
        out,
        args,
        {"version": result.version, "output_shape": list(result.output_shape), "loss": result.loss},
        f"output {format_size(result.output_shape)}, {loss} (version {result.version})",
    )


def cmd_backward(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    version = client.backward(retain_graph=args.retain_graph)
    emit(out, args, {"version": version}, f"backward done (version {version})")


def cmd_step(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    result = client.step()
    emit(
        out,
        args,
        {"version": result.version, "parameters_updated": result.parameters_updated},
        f"step done: {result.parameters_updated} parameters updated (version {result.version})",
    )


def cmd_zero_grad(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    version = client.zero_grad(set_to_none=not args.zeros)
    # As torch's zero_grad(set_to_none=False): a gradient that is None stays None.
    what = "zeroed in place (those that were None stay None)" if args.zeros else "set to None"
    emit(out, args, {"version": version}, f"gradients {what} (version {version})")


@contextlib.contextmanager
def _transfer_line(args: argparse.Namespace, what: str) -> Iterator[TransferLine | None]:
    """The progress line of a value `what` crossing (get, set), on stderr: on a terminal
    unless --no-progress, elsewhere with --progress; None where none is to be shown. A 64
    MiB read is a minute of silence at 10 Mbit/s, a slow transfer and a hung one alike
    (found by a review of a researcher on a slow, distant link). A line a failure left
    unfinished is ended, so that the error starts a line of its own."""
    err: TextIO = getattr(args, "err", sys.stderr)
    shown = getattr(args, "progress", None)
    line = None if shown is False else TransferLine(err, what)
    if line is not None and not line.live and not shown:
        line = None
    try:
        yield line
    finally:
        if line is not None:
            line.close()


def cmd_get(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    selector = parse_selector(args.selector)
    if args.out is not None:
        _save_npy(args, client, selector, out)
        return
    # numpy, printed as torch prints it (display.py): importing torch took a second more
    with _transfer_line(args, f"receiving {args.selector}") as line:
        read = client.read(args.selector, values=not args.shape_only, progress=line)
    data = {
        "name": read.name,
        "selector": str(selector),
        "version": read.version,
        "present": read.present,
        "dtype": read.dtype,
        "shape": None if read.shape is None else list(read.shape),
        "full_shape": None if read.full_shape is None else list(read.full_shape),
        "requires_grad": read.requires_grad,
        "grad_fn": read.grad_fn or None,
        "whole_parameter": read.whole_parameter,
        "device": read.device or None,  # None on the CPU
    }
    if args.shape_only:
        emit(out, args, data, "None" if read.shape is None else format_size(read.shape))
    elif args.json:  # the values' lists made only for JSON, and a piece at a time (a review)
        json_line_with_values(out, data, read.value)
    else:
        out.write(format_read(read) + "\n")
    if not read.present:
        _note_absent(args, read.name)


def _save_npy(args: argparse.Namespace, client: Client, selector: Selector, out: TextIO) -> None:
    """get --out: the values, as the Python client returns them (numpy: bfloat16 widened
    exactly to float32), into a .npy file that `gradwire set` takes back."""
    path: Path = args.out
    if args.shape_only:
        raise UsageError("--out saves values, and --shape-only fetches none: give one of them")
    if path.suffix != ".npy":  # numpy.save would add one, and set takes only FILE.npy
        raise UsageError(f"--out {path}: get --out writes a .npy file; name it something.npy")
    if not path.parent.is_dir():
        raise UsageError(f"--out {path}: no such folder {path.parent}")
    with _transfer_line(args, f"receiving {args.selector}") as line:
        read = client.read(args.selector, progress=line)
    if read.value is None or read.shape is None:
        raise _absent(selector, path, "nothing to save")
    array = np.asarray(read.value)
    try:
        np.save(path, array, allow_pickle=False)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None
    dtype = str(array.dtype)
    widened = f" ({read.dtype} on the server)" if read.dtype not in (None, dtype) else ""
    emit(
        out,
        args,
        {
            "name": read.name,
            "selector": str(selector),
            "version": read.version,
            "shape": list(array.shape),
            "dtype": dtype,
            "out": str(path),
        },
        f"wrote {selector} {format_size(array.shape)} {dtype}{widened} (version "
        f"{read.version}) to {path}",
    )


def _after(name: str) -> str:
    """When an absent tensor will be there: `it exists after ...`."""
    if name.endswith(".delta"):
        # It said "after gradwire forward" (found by a walkthrough as a researcher).
        return (
            "the next `gradwire step`: a parameter's change is recorded from the first time it "
            "is asked for, as now"
        )
    if name.startswith("optimizer."):
        return "a `gradwire step` of an optimizer that keeps it"
    return f"`gradwire {'backward' if name.endswith('.grad') else 'forward'}`"


def _absent(selector: Selector, out: Path, nothing: str = "nothing to draw") -> CommandError:
    return CommandError(
        f"{selector.name} is None (absent): {nothing}, so {out} was not written; "
        f"it exists after {_after(selector.name)}"
    )


def _note_absent(args: argparse.Namespace, name: str) -> None:
    """A word on stderr beside get's and stats' "None" for a Step's change: a bare None read
    as "the step changed nothing" (found by a walkthrough as a researcher). stdout keeps
    PyTorch's None, as for a gradient."""
    if name.endswith(".delta") and not args.json:
        err: TextIO = getattr(args, "err", sys.stderr)
        err.write(f"hint: {name} is absent; it is there after {_after(name)}\n")


def _server_histogram(
    client: Client, selector: Selector, bins: int, out: Path
) -> tuple[HistogramData, tuple[int, ...]] | None:
    """The histogram binned by the server (GetStats): no values cross the wire. None from a
    server that predates GetStats; absent tensors raise."""
    try:
        summary = client.stats(str(selector), bins=bins)
    except Unimplemented:
        return None
    stats = summary.stats
    if stats is None or stats.histogram is None or summary.shape is None:
        raise _absent(selector, out)
    return HistogramData.from_stats(stats), summary.shape


def cmd_plot(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    selector = parse_selector(args.selector)
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out}: the picture is a PNG; name it something.png")
    if not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: no such folder {args.out.parent}")
    bins = DEFAULT_BINS if args.bins is None else args.bins
    try:
        check_options(args.kind, bins, args.dpi)
        require_matplotlib()  # before any values cross the wire
    except (PlotError, PlotUnavailable) as e:
        raise UsageError(str(e)) from None
    kind = args.kind
    if kind == "auto":  # the shape decides; it costs a read without values
        shape = client.shape(args.selector)
        if shape is None:
            raise _absent(selector, args.out)
        kind = choose_kind(selector.name, shape)
    if args.bins is not None and kind != "histogram":  # dropped without a word (a review)
        raise UsageError(
            f"--bins is a histogram's, and {selector} draws as {kind}: add --kind histogram, "
            "or leave --bins out"
        )
    label = str(selector)
    try:
        binned = (
            _server_histogram(client, selector, bins, args.out) if kind == "histogram" else None
        )
        if binned is not None:
            data, shape = binned
            result = plot_histogram(
                data, args.out, label=label, shape=shape, title=args.title, dpi=args.dpi
            )
        else:
            with _transfer_line(args, f"receiving {args.selector}") as line:
                value = client.get(args.selector, progress=line)
            if value is None:
                raise _absent(selector, args.out)
            shape = np.shape(value)
            result = plot_array(
                np.asarray(value),
                args.out,
                name=selector.name,
                kind=kind,
                label=label,
                title=args.title,
                bins=bins,
                dpi=args.dpi,
            )
    except PlotError as e:
        raise UsageError(f"{selector}: {e}") from None
    except OSError as e:  # in its words alone: the file named is the hidden temporary's
        raise CommandError(f"cannot write {args.out}: {e.strerror or e}") from None
    note = f" ({result.note})" if result.note else ""
    emit(
        out,
        args,
        {
            "out": str(result.path),
            "kind": result.kind,
            "selector": label,
            "shape": list(shape),
            "width": result.width,
            "height": result.height,
            "note": result.note,
        },
        f"wrote {result.path}: {result.kind} of {label} {list(shape)}, "
        f"{result.width}x{result.height} pixels{note}",
    )


def stats_json(stats: Stats) -> dict[str, Any]:
    """Statistics for --json: min, max, mean, std, norm and the histogram are null when no
    value is finite (NaN in Stats; the contract sends 0 for them, which a script could take
    for a real 0, and bins over [-0.5, 0.5])."""
    data = dataclasses.asdict(stats)
    if stats.finite == 0:
        # The histogram too: empty bins over a range of the server's choosing read as data.
        data.update(dict.fromkeys(("min", "max", "mean", "std", "norm", "histogram")))
    return data


def cmd_stats(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    if not args.bins and (args.low is not None or args.high is not None):
        # The edges of a histogram not asked for: ignored without a word (a review).
        raise UsageError("--low and --high are a histogram's edges: give --bins too")
    edges = [(flag, v) for flag, v in (("--low", args.low), ("--high", args.high)) if v is not None]
    for flag, edge in edges:
        if not math.isfinite(edge):  # the server's refusal came as exit 1 (a review of the CLI)
            raise UsageError(f"{flag} must be a finite number, got {edge:g}")
    if args.low is not None and args.high is not None and not args.low < args.high:
        # The server's words name its fields (histogram_low), not these options.
        raise UsageError(f"--low must be below --high, got --low {args.low:g} --high {args.high:g}")
    read = client.stats(args.selector, bins=args.bins, low=args.low, high=args.high)
    # Which slice, as get's JSON says.
    which = {"name": read.name, "selector": str(parse_selector(args.selector))}
    if read.stats is None:
        emit(out, args, {**which, "version": read.version, "present": False}, "None")
        _note_absent(args, read.name)
        return
    data = {
        **which,
        "version": read.version,
        "present": True,
        "shape": list(read.shape or ()),
        **stats_json(read.stats),
    }
    text = "\n".join(
        [f"{args.selector} {format_size(read.shape or ())}", *format_stats(read.stats)]
    )
    emit(out, args, data, text)


def _random_input(client: Client) -> str:
    """A random --input for the served model, as an example: 8 samples of its shape, drawn
    uniform for a float model, randint below 10 for one of integer inputs. It named the
    tutorial's shape for every model (a review of serving one's own model)."""
    shape: tuple[int, ...] = (3, 10, 10)
    dtype: str | None = None
    with contextlib.suppress(GradwireError):  # the example is extra: never fail over it
        shape, dtype = model_input(client.list_tensors())
    size = ",".join(str(n) for n in (8, *shape))
    if dtype is not None and not dtype.startswith(("float", "bfloat")):
        return f"randint:10:{size}:{dtype}"
    return f"uniform:{size}" + (f":{dtype}" if dtype and dtype != "float32" else "")


def model_input(model: Listing) -> tuple[tuple[int, ...], str | None]:
    """One sample's shape and the input dtype (None: the server's float32) of the model the
    server serves. A server from before ListTensors described its model (outputs 0) serves
    the tutorial's Simple; a model may take samples of shape () (token ids, say)."""
    if not model.outputs:
        return (3, 10, 10), None
    return model.sample_shape, None if model.input_dtype == "unknown" else model.input_dtype


def cmd_set(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    selector = parse_selector(args.selector)
    # Read before any call, so that one that cannot be read is refused first; numbers as
    # float64 until the tensor's dtype is known.
    value = parse_value(args.value)
    # The tensor written, as listed before the write: its dtype is what numbers are sent in,
    # and its shape what the line written describes (an absent gradient's: its parameter's).
    tensors = {t.name: t for t in client.list_tensors().tensors}
    listed = tensors.get(selector.name)
    if isinstance(value, np.ndarray) and not args.value.endswith(".npy"):  # numbers
        value = narrowed(value, args.value, listed.dtype if listed is not None else None)
    with _transfer_line(args, f"sending {args.selector}") as line:
        version = client.set(args.selector, value, progress=line)
    data: dict[str, Any] = {"version": version}
    how = ""
    whole = listed
    if listed is not None and not listed.present and listed.kind == "gradient":
        whole = tensors.get(selector.name.removesuffix(".grad"))
    if listed is not None and whole is not None and whole.present:
        # What the write did to the value, as numpy's assignment does: a [3, 3] array
        # written to conv1.weight overwrote all 48 kernels, and the line said only
        # "written" (found by a review of the CLI).
        shape = _selected_shape(whole.shape, selector.index)
        given, dtype = _value_shape_and_dtype(value, args.value.endswith(".npy"))
        data.update(shape=list(shape), dtype=listed.dtype)
        # A single number is no broadcast to speak of: every element, as asked.
        broadcast = bool(given) and _without_leading_ones(given, len(shape)) != shape
        cast = dtype is not None and dtype != listed.dtype
        # Numbers with a fraction, into an integer tensor: cast as numpy's assignment casts
        # them, 2.5 to 2, where the line said only "written" (a review of serving one's own
        # model).
        cut = dtype is None and listed.dtype.startswith(("int", "uint"))  # bool: no fraction
        cut = cut and isinstance(value, np.ndarray) and _has_fractions(value)
        if broadcast or cast or cut:
            shown = [str(list(given))] if given or broadcast or cast else []
            what = " ".join([*shown, *([dtype] if dtype is not None and cast else []), "value"])
            done = [f"broadcast to {list(shape)}"] if broadcast else []
            done += [f"cast to {listed.dtype}"] if cast else []
            done += [f"cast to {listed.dtype}, its fractions dropped"] if cut else []
            how = f": a {what} {' and '.join(done)}"
            data.update(value_shape=list(given), value_dtype=dtype or listed.dtype)
            if cut:
                data.update(fractions_dropped=True)
    emit(out, args, data, f"{args.selector} written{how} (version {version})")


def _has_fractions(value: np.ndarray[Any, Any]) -> bool:
    """Whether numbers parsed from the command line hold one that is not whole."""
    if value.dtype.kind != "f":
        return False
    finite = value[np.isfinite(value)]
    return bool(np.any(finite != np.trunc(finite)))


def _without_leading_ones(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """`shape` less the leading 1s past `ndim` dimensions, which numpy's assignment drops:
    [1, 3] written to a [3] slice is no broadcast, nor [5] to one element."""
    while len(shape) > ndim and shape[0] == 1:
        shape = shape[1:]
    return shape


def _selected_shape(shape: Sequence[int], chain: Sequence[Any]) -> tuple[int, ...]:
    """The shape `chain` selects from a tensor of `shape`, as numpy's basic indexing gives
    it: applied to a view of one element repeated, which costs nothing whatever the size."""
    view = np.lib.stride_tricks.as_strided(
        np.zeros(1, np.int8), shape=tuple(shape), strides=(0,) * len(shape)
    )
    for key in chain:
        view = view[key]
    return tuple(view.shape)


def _value_shape_and_dtype(value: Any, from_file: bool) -> tuple[tuple[int, ...], str | None]:
    """A `set` value's shape, and its dtype where the user chose one (a .npy file's, a fill's
    :DTYPE); None where it is the tensor's (a number or a JSON list, a fill without one). By
    name: a big-endian file's float32 is '>f4' as a str, and no cast (found by a review)."""
    if isinstance(value, Fill):
        return tuple(value.shape), value.dtype
    array = np.asarray(value)
    return tuple(array.shape), array.dtype.name if from_file else None


def cmd_fill(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    indexed = next((name for name in args.names if "[" in name), None)
    if indexed is not None:  # the server's answer, "no tensor named", did not say why
        raise UsageError(
            f"fill takes whole parameters, and {indexed!r} is a part of one: write a part "
            f"with set, as in: gradwire set{session_option(args.session)} {shlex.quote(indexed)} "
            f"{args.value}"
        )
    version = client.fill_parameters(args.value, args.names)
    which = ", ".join(args.names) if args.names else "every parameter"
    # The JSON says what the text says: the value and names too ([]: every parameter).
    said = {"version": version, "value": args.value, "names": args.names}
    emit(out, args, said, f"{which} filled with {args.value} (version {version})")
