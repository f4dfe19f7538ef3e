"""The `gradwire` command: parse arguments, call the Client, print the result (or JSON with --json).

Exit codes: 0 success, 1 the server (or the channel) answered an error, 2 a usage error,
130 stopped by Ctrl-C, 141 a reader that went away (README.md, "The command line").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import select
import shlex
import signal
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import numpy as np

from gradwire import __version__, codec, limits
from gradwire.client import DEFAULT_TARGET, NEVER_REACHED, UNRESOLVED, Client, check_session
from gradwire.credentials import TOKEN_ENV, load_token, read_optional
from gradwire.display import format_size, format_tensor
from gradwire.errors import (
    Cancelled,
    DeadlineExceeded,
    GradwireError,
    RemoteError,
    Unavailable,
    Unimplemented,
)
from gradwire.fill import Fill
from gradwire.plot import (
    DEFAULT_BINS,
    DEFAULT_DPI,
    FIGSIZE,
    KINDS,
    MAX_KERNEL_IN,
    MAX_KERNEL_OUT,
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
    ProgressBar,
    WatchTable,
    format_duration,
    format_loss,
    format_stats,
)
from gradwire.results import Listing, OptimizerConfig
from gradwire.selector import Selector, SelectorError, parse_selector
from gradwire.updates import Stats

# Remote commands get a Client; local ones (serve, replay --embedded) get None.
Command = Callable[[argparse.Namespace, Any, TextIO], None]

SOURCE_HELP = (
    "ones:SHAPE, zeros:SHAPE, full:VALUE:SHAPE, uniform:SHAPE, normal:SHAPE, "
    "randint:HIGH:SHAPE (0 <= x < HIGH), each with an optional :DTYPE at the end "
    "(float32, float64, int64, ...); or a .npy file. SHAPE is comma-separated: 8,3,10,10"
)


class UsageError(Exception):
    """Arguments that parse but make no sense; exit code 2."""

    #: Said already, in the server's JSON log (`serve --log-format json`): main adds no line.
    logged = False


class CommandError(Exception):
    """A local command that failed for a reason outside the arguments; exit code 1."""

    #: Said already, in the server's JSON log (`serve --log-format json`): main adds no line.
    logged = False


class Interrupted(Exception):
    """A command that Ctrl-C stopped after it said where it stopped (a train's summary, a
    watch's last update); exit code 130, as for any command Ctrl-C ends, so that a script's
    next command does not run as if it had finished (`gradwire train ... && next` ran next:
    found by a review of the CLI)."""


class _Output:
    """The standard output a command writes to, whose errors say what failed: writing to a
    full disk (`gradwire list > /dev/full`) ended in a traceback (found by a review of the
    CLI). A reader gone away stays a BrokenPipeError, which ends a command quietly."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with self._failing():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._failing():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the stream's
        return getattr(self._stream, name)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as e:
            raise CommandError(f"cannot write the output: {e.strerror or e}") from None


# --- argument values --------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    """Comma-separated dimensions; nothing at all is a shape of no dimension. An empty
    dimension ("8,,3", "8,3,") is refused: dropped, it made another shape than the one
    written (found by a review of the CLI)."""
    if not text.strip():
        return ()
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(
            f"bad shape {text!r}: expected comma-separated integers such as 8,3,10,10"
        ) from None
    if any(d < 0 for d in shape):
        raise UsageError(f"bad shape {text!r}: dimensions cannot be negative")
    return shape


def _shape_option(text: str) -> tuple[int, ...]:
    """_shape as an option's type: argparse reports an ArgumentTypeError as a usage error
    (exit 2); any other exception escapes it as a traceback."""
    try:
        return _shape(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: The environment variable naming the session commands act on (--session).
SESSION_ENV = "GRADWIRE_SESSION"
#: The environment variable naming the server every command calls unless --target says.
TARGET_ENV = "GRADWIRE_TARGET"


def _seconds(text: str) -> float:
    """A duration for an option: a finite number of seconds, 0 or more, that gRPC can hold."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: expected seconds, such as 20 or 0.5"
        ) from None
    if not math.isfinite(seconds) or not 0 <= seconds <= limits.MAX_GRPC_SECONDS:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: expected seconds from 0 to {limits.MAX_GRPC_SECONDS:,}"
        )
    return seconds


def _seed(text: str) -> int:
    """A seed as the wire carries it (uint64). Out of range, each --seed gave a traceback
    from protobuf or torch (found by a review of the CLI)."""
    try:
        return limits.check_seed(int(text))
    except ValueError:  # int()'s too
        raise argparse.ArgumentTypeError(
            f"bad seed {text!r}: expected a whole number from 0 to {limits.MAX_SEED}"
        ) from None


def _client_keepalive(text: str) -> float:
    """A client's ping interval: 0 (no pings), or at least what a gradwire server takes.
    Closer, the server closed the connection ("too_many_pings"), ending a healthy watch
    with gRPC's own log line and a hint that blamed the network (found by a review)."""
    seconds = _seconds(text)
    if 0 < seconds < limits.MIN_CLIENT_PING_S:
        raise argparse.ArgumentTypeError(
            f"bad interval {text!r}: a gradwire server takes a ping every "
            f"{limits.MIN_CLIENT_PING_S:g} s at most and closes a connection pinged more "
            f"often: give {limits.MIN_CLIENT_PING_S:g} or more, or 0 for no pings"
        )
    return seconds


def _positive_seconds(text: str) -> float:
    """A duration that must be more than 0: a call's deadline, say. Refused, it gave the
    range of _seconds, which starts at 0 (found by a review of the CLI)."""
    try:
        seconds = _seconds(text)
    except argparse.ArgumentTypeError:
        seconds = math.nan
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: expected seconds more than 0 (up to "
            f"{limits.MAX_GRPC_SECONDS:,})"
        )
    return seconds


def _seconds_or_forever(text: str) -> float:
    """A duration that may be for ever: inf, or as _seconds."""
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    return _seconds(text)


def _positive_seconds_or_forever(text: str) -> float:
    """A duration that may be for ever (inf) and must be more than 0: a session's idle time,
    where 0 closed every session as soon as it was opened."""
    try:
        seconds = _seconds_or_forever(text)
    except argparse.ArgumentTypeError:  # refused with the message below, which says "> 0"
        seconds = math.nan
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: expected seconds more than 0 (up to "
            f"{limits.MAX_GRPC_SECONDS:,}), or inf for never"
        )
    return seconds


def _port(text: str) -> int:
    """A TCP port for an option: 0 (a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: expected 0 (a free one) to 65535")
    return port


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer option's type: a whole number, `minimum` or more (and `maximum` at most:
    past it, the client's own check ended `watch --bins 5000` in a traceback)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            expected = (
                f", {minimum} or more" if maximum is None else f" from {minimum} to {maximum}"
            )
            raise argparse.ArgumentTypeError(
                f"bad number {text!r}: expected a whole number{expected}"
            )
        return value

    return whole


def parse_source(text: str, seed: int = 0) -> Any:
    """A Fill (or a numpy array from a .npy file) from the CLI's source syntax."""
    if text.endswith(".npy"):
        return _load_npy(Path(text))
    parts = text.split(":")
    kind = parts[0]
    dtype = None
    if len(parts) > 1 and parts[-1] and parts[-1][0].isalpha():
        dtype = parts.pop()
        try:
            codec.dtype_from_name(dtype)
        except codec.CodecError as err:
            raise UsageError(f"bad source {text!r}: {err}") from None
    try:
        if kind in ("ones", "zeros", "uniform", "normal") and len(parts) == 2:
            shape = _shape(parts[1])
            if kind == "uniform":
                return Fill.uniform(*shape, seed=seed, dtype=dtype)
            if kind == "normal":
                return Fill.normal(*shape, seed=seed, dtype=dtype)
            return Fill(kind, shape, dtype)  # type: ignore[arg-type]
        if kind == "full" and len(parts) == 3:
            try:
                value = float(parts[1])
            except ValueError:  # float's own words: "could not convert string to float"
                raise ValueError(f"the value {parts[1]!r} is not a number") from None
            if _overflowed(parts[1], value):  # full:1e999 filled with inf, exit 0 (a review)
                raise UsageError(
                    f"bad source {text!r}: {parts[1]!r} is beyond any float's range; write "
                    "inf for infinity"
                )
            return Fill.constant(value, *_shape(parts[2]), dtype=dtype)
        if kind == "randint" and len(parts) == 3:
            high = _randint_high(parts[1])
            return Fill.randint(0, high, *_shape(parts[2]), seed=seed, dtype=dtype)
    except ValueError as err:
        raise UsageError(f"bad source {text!r}: {err}") from None
    raise UsageError(f"bad source {text!r}: expected {SOURCE_HELP}")


def _random_source(text: str) -> bool:
    """Whether a source, as parse_source reads it, draws random values (takes a seed)."""
    return not text.endswith(".npy") and text.split(":")[0] in ("uniform", "normal", "randint")


#: The first bytes of every .npy file (numpy.save writes them; numpy.lib.format).
_NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: Path) -> Any:
    """The array in a .npy file; a UsageError, not a traceback, for a file that is none."""
    if path.is_dir():  # it said "no such file" of a folder (found by a review of the CLI)
        raise UsageError(f"{path} is a folder, not a .npy file")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        with path.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
            if head != _NPY_MAGIC:
                found = "it is empty" if not head else "it has no .npy header"
                raise UsageError(
                    f"{path} is not a .npy file ({found}): write one with numpy.save, or "
                    "with gradwire get SELECTOR --out FILE.npy"
                )
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:  # cut short, or objects that need pickle
        raise UsageError(f"{path} is not a .npy file numpy can read: {e}") from None


_OUT_OF_RANGE = "bad value {!r}: beyond float32's range (about 3.4e38); write inf for infinity"


def _whole(text: str, what: str) -> int:
    """`text` as a whole number; a ValueError naming `what` otherwise. int()'s own words for
    4,301 digits and more told a CLI user to call sys.set_int_max_str_digits()."""
    try:
        return int(text)
    except ValueError:
        digits = text.strip().lstrip("+-")
        if digits.isdigit():
            raise ValueError(f"{what} has {len(digits):,} digits: far too large") from None
        raise ValueError(f"{what} {text!r} is not a whole number") from None


def _randint_high(text: str) -> int:
    """randint's HIGH: a whole number above 0. randint:0:3 went to the server, exit 1,
    INVALID_ARGUMENT "randint fill needs whole numbers low < high, got [0.0, 0.0)", where a
    malformed source is refused here (found by a review of the CLI as a researcher)."""
    what = "HIGH in randint:HIGH:SHAPE must be a whole number above 0 (it draws 0 <= x < HIGH)"
    digits = text.strip().lstrip("+-")
    try:
        high = _whole(text, "randint's upper bound")
    except ValueError as err:
        if digits.isdigit():  # too many digits: said as it is
            raise
        raise ValueError(f"{err}; {what}") from None
    if high <= 0:
        raise ValueError(f"randint's upper bound {text!r} is not above 0; {what}")
    return high


def _overflowed(text: str, value: float) -> bool:
    """Whether `value`, parsed from `text`, is an infinity no one wrote: 1e400, which no
    float holds, where `inf` and `-Infinity` mean it."""
    return math.isinf(value) and text.strip().lstrip("+-").lower() not in ("inf", "infinity")


def _fill_value(text: str) -> float:
    """fill's value: a number, nan or inf; a number no float holds (1e400) is refused, as
    `set` refuses it. Taken as inf, it filled every parameter with infinity, exit 0. One
    past a parameter's own dtype (1e39 for float32) is the server's to refuse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad value {text!r}: expected a number") from None
    if _overflowed(text, value):
        raise argparse.ArgumentTypeError(
            f"bad value {text!r}: beyond any float's range; write inf for infinity"
        )
    return value


def parse_value(text: str) -> Any:
    """A value for `set`: a number (nan and inf too, as `fill` takes them), a JSON list, a
    fill spec or a .npy file. Numbers come as a numpy array, float64 where they have
    fractions, until `_narrowed` puts them in the tensor's dtype. A number no float holds
    (1e400) is refused, not written as infinity."""

    def number(digits: str) -> float:
        if math.isinf(parsed := float(digits)):  # 1e400: no float holds it
            raise UsageError(_OUT_OF_RANGE.format(text))
        return parsed

    def integer(digits: str) -> int | float:
        # A whole number past int64 is a float, as numpy would make it of a float's text:
        # kept a Python int, numpy made an object array ("expected numbers"), and int()
        # refused 4,301 digits in a traceback (found by a review of the CLI).
        if len(digits.lstrip("-")) < 19:
            return int(digits)
        with contextlib.suppress(ValueError):  # past int()'s 4,300 digits: a float's
            if codec.INT64_MIN <= (whole := int(digits)) <= codec.INT64_MAX:
                return whole
        return number(digits)

    try:
        value = json.loads(text, parse_float=number, parse_int=integer)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # meant as a list: say what is wrong with it
            raise UsageError(
                f"bad value {text!r}: not a JSON list of numbers ({err.msg} at character "
                f"{err.pos + 1}), such as [1, 2.5, -3] or [[1, 2], [3, 4]]"
            ) from None
        try:
            value = float(text)  # nan, inf, -inf, as `fill` takes them; +1, .5 too
        except ValueError:
            if ":" not in text and not text.endswith(".npy"):  # no fill, no file: say all
                raise UsageError(
                    f"bad value {text!r}: expected a number (0.5, nan, -inf), a JSON list "
                    "([1, 2, 3]), a fill (such as full:0.5:3,3; gradwire set -h lists them) "
                    "or a .npy file"
                ) from None
            return parse_source(text)
        if _overflowed(text, value):
            raise UsageError(_OUT_OF_RANGE.format(text)) from None  # +1e400
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise UsageError(
            f"bad value {text!r}: expected a number, a JSON list, a fill or a .npy file"
        )
    try:
        array = np.asarray(value)
    except ValueError:  # ragged lists; numpy's words were of "inhomogeneous shape"
        raise UsageError(
            f"bad value {text!r}: the lists inside it differ in length; a value's rows must "
            "all be as long, as in [[1, 2, 3], [4, 5, 6]]"
        ) from None
    if array.dtype.kind not in "biuf":
        raise UsageError(f"bad value {text!r}: expected numbers")
    return array


def _narrowed(array: np.ndarray[Any, Any], text: str, dtype: str | None) -> Any:
    """Numbers `text` wrote, parsed as `array`, in `dtype` (the tensor's) where numpy has it,
    float32 otherwise, if they have fractions; refused past its range. Sent as float32
    whatever the tensor, a float64 one got them rounded (found by a review)."""
    if array.dtype != np.float64:
        return array
    sent = np.dtype(dtype if dtype in ("float16", "float32", "float64") else "float32")
    with np.errstate(over="ignore"):
        narrowed = array.astype(sent)
    if (np.isfinite(array) & ~np.isfinite(narrowed)).any():
        if sent == np.float32:
            raise UsageError(_OUT_OF_RANGE.format(text))
        raise UsageError(
            f"bad value {text!r}: beyond {sent.name}'s range (about "
            f"{float(np.finfo(sent).max):.2g}), the tensor's dtype; write inf for infinity"
        )
    return narrowed


# --- output -----------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A tensor's values as nested lists; `_json_line` spells those that are not finite.
    A torch tensor's own tolist(): numpy has no bfloat16, and np.asarray of one raised."""
    if value is None:
        return None
    tolist = getattr(value, "tolist", None)
    return tolist() if tolist is not None else np.asarray(value).tolist()


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite as a string ("nan", "inf", "-inf"): JSON
    has none, and a string keeps the line readable by any parser while every finite value
    stays a number. Tensor values, losses and statistics alike."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_line(data: Any) -> str:
    """One line of strict JSON, which every parser reads (Python's json writes bare NaN)."""
    return json.dumps(_finite(data), allow_nan=False) + "\n"


def _emit(out: TextIO, args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        out.write(_json_line(data))
    else:
        out.write(text + "\n")


# --- commands -----------------------------------------------------------------------


def _forward_data(args: argparse.Namespace, client: Client) -> tuple[Any, Any]:
    """The input and targets forward sends: as given, or ones shaped for the server's model
    (as ListTensors describes it): 8 samples, and targets for as many samples as the input
    has (class 1, the tutorial's, for cross-entropy; ones for mse)."""
    if args.no_targets and args.targets is not None:  # one was dropped (a review of the CLI)
        raise UsageError("--targets and --no-targets ask for opposites: give one of them")
    sources = (args.input, None if args.no_targets else args.targets)
    if args.seed is not None and not any(_random_source(s) for s in sources if s is not None):
        # Dropped without a word, where replay refuses --seed without --init random (found
        # by a review of the CLI as a researcher).
        raise UsageError(
            "--seed seeds uniform, normal and randint sources, and this forward has none (the "
            "default input is ones, the default targets class 1): give one, such as --input "
            "uniform:8,3,10,10, or leave --seed out"
        )
    seed = 0 if args.seed is None else args.seed
    model = None
    if args.input is None or (args.targets is None and not args.no_targets):
        model = client.list_tensors()
    if args.input is None:
        assert model is not None
        sample_shape, dtype = _model_input(model)
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
        sample = [str(d) for d in _model_input(model)[0]]
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
    _emit(
        out,
        args,
        {"version": result.version, "output_shape": list(result.output_shape), "loss": result.loss},
        f"output {format_size(result.output_shape)}, {loss} (version {result.version})",
    )


def cmd_backward(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    version = client.backward(retain_graph=args.retain_graph)
    _emit(out, args, {"version": version}, f"backward done (version {version})")


def cmd_step(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    result = client.step()
    _emit(
        out,
        args,
        {"version": result.version, "parameters_updated": result.parameters_updated},
        f"step done: {result.parameters_updated} parameters updated (version {result.version})",
    )


def cmd_zero_grad(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    version = client.zero_grad(set_to_none=not args.zeros)
    # As torch's zero_grad(set_to_none=False): a gradient that is None stays None.
    what = "zeroed in place (those that were None stay None)" if args.zeros else "set to None"
    _emit(out, args, {"version": version}, f"gradients {what} (version {version})")


def cmd_get(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    selector = parse_selector(args.selector)
    if args.out is not None:
        _save_npy(args, client, selector, out)
        return
    # numpy, printed as torch prints it (display.py): importing torch took a second more
    read = client.read(args.selector, values=not args.shape_only)
    data = {
        "name": read.name,
        "selector": str(selector),
        "version": read.version,
        "present": read.present,
        "dtype": read.dtype,
        "shape": None if read.shape is None else list(read.shape),
        "full_shape": None if read.full_shape is None else list(read.full_shape),
    }
    if args.shape_only:
        text = "None" if read.shape is None else format_size(read.shape)
    else:
        data["values"] = _jsonable(read.value)
        text = format_tensor(read.value, read.dtype)
    _emit(out, args, data, text)
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
    read = client.read(args.selector)
    if read.value is None or read.shape is None:
        raise _absent(selector, path, "nothing to save")
    array = np.asarray(read.value)
    try:
        np.save(path, array, allow_pickle=False)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None
    dtype = str(array.dtype)
    widened = f" ({read.dtype} on the server)" if read.dtype not in (None, dtype) else ""
    _emit(
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
            "the next `gradwire step`: a Step's change is recorded from the first time one "
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
    histogram = stats.histogram
    data = HistogramData(
        counts=np.asarray(histogram.counts, dtype=np.int64),
        low=histogram.low,
        high=histogram.high,
        count=stats.count,
        mean=stats.mean,
        std=stats.std,
        nan_count=stats.nan_count,
        inf_count=stats.inf_count,
    )
    return data, summary.shape


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
            value = client.get(args.selector)
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
    _emit(
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


def _stats_json(stats: Stats) -> dict[str, Any]:
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
        _emit(out, args, {**which, "version": read.version, "present": False}, "None")
        _note_absent(args, read.name)
        return
    data = {
        **which,
        "version": read.version,
        "present": True,
        "shape": list(read.shape or ()),
        **_stats_json(read.stats),
    }
    text = "\n".join(
        [f"{args.selector} {format_size(read.shape or ())}", *format_stats(read.stats)]
    )
    _emit(out, args, data, text)


class _Stop:
    """What Ctrl-C (SIGINT) asks of a loop of steps: the first press sets it, for the loop to
    stop between two steps, the step under way finishing; a second raises KeyboardInterrupt
    at once. With `at_once` (a server-side run, whose call is cancelled as the interrupt
    unwinds it, and which stops between two of its own steps), the first raises it too. The
    loop looked only once its call came back: a server-side run went on to its last step,
    and a call to a server that had stopped answering waited for its deadline, a second
    Ctrl-C doing no more than the first (found by a review of watching training)."""

    def __init__(self, err: TextIO) -> None:
        self.event = threading.Event()
        self.at_once = False
        self._err = err

    def is_set(self) -> bool:
        return self.event.is_set()

    def __call__(self, signum: int, frame: object) -> None:
        if self.event.is_set() or self.at_once:
            self.event.set()
            raise KeyboardInterrupt
        self.event.set()
        self._err.write("\nstopping after this step (Ctrl-C again to stop at once)\n")


@contextlib.contextmanager
def _stop_on_interrupt(err: TextIO) -> Iterator[_Stop]:
    """A `_Stop` that Ctrl-C (SIGINT) sets inside the block, so a loop can stop between two
    steps, not inside one."""
    stop = _Stop(err)
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach only the main thread: nothing to install
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _model_input(model: Listing) -> tuple[tuple[int, ...], str | None]:
    """One sample's shape and the input dtype (None: the server's float32) of the model the
    server serves. A server from before ListTensors described its model (outputs 0) serves
    the tutorial's Simple; a model may take samples of shape () (token ids, say)."""
    if not model.outputs:
        return (3, 10, 10), None
    return model.sample_shape, None if model.input_dtype == "unknown" else model.input_dtype


def _train_data(args: argparse.Namespace, client: Client) -> tuple[Fill, Fill]:
    """Random inputs and targets made on the server, shaped for the model it serves (as
    ListTensors describes it); new ones each step (seed + step)."""
    model = client.list_tensors()
    sample_shape, dtype = _model_input(model)
    integers = dtype is not None and not dtype.startswith(("float", "bfloat"))
    if integers and args.input_high is None:
        raise UsageError(
            f"{model.model} takes {dtype} inputs (ids, say): give --input-high N to draw "
            "them from 0..N-1 (N: its vocabulary's size, an Embedding's rows), or drive it "
            "with your own data from Python (Client.train_step or Client.train)"
        )
    if not integers and args.input_high is not None:
        raise UsageError(
            f"--input-high is for a model of integer inputs; {model.model} takes "
            f"{dtype or 'float32'}, drawn from a normal distribution"
        )
    # Given, each is taken as it is: `or` took --classes 0 and --input-shape '' for unset.
    shape = sample_shape if args.input_shape is None else args.input_shape
    outputs = args.classes if args.classes is not None else (model.outputs or 20)
    if model.loss != "mse" and model.outputs and outputs > model.outputs:
        # The server's answer named a class in the target, which read like --targets, and
        # not --classes (found by a review of the CLI).
        raise UsageError(
            f"--classes {outputs} is more than {model.model}'s {model.outputs} outputs: its "
            f"labels run from 0 to {model.outputs - 1}; give --classes {model.outputs} or "
            "fewer, or leave it out"
        )
    if integers:
        x = Fill.randint(0, args.input_high, args.batch, *shape, seed=args.seed, dtype=dtype)
    else:
        x = Fill.normal(args.batch, *shape, seed=args.seed, dtype=dtype)
    target_seed = (args.seed + 1_000_003) % (1 << 64)  # a seed is a uint64
    if model.loss == "mse":
        return x, Fill.normal(args.batch, outputs, seed=target_seed)
    return x, Fill.randint(0, outputs, args.batch, seed=target_seed)


def cmd_train(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    x, y = _train_data(args, client)
    bar = ProgressBar(sys.stderr if args.json else out, args.steps)
    done, loss, version = 0, float("nan"), None
    # The first step with a loss that is not finite (server-side, as the server counts it:
    # a progress every 5 steps said "by step 10" of a run that diverged at step 8, found by
    # a review of the CLI; from a server from before it counted, the first reported).
    diverged_at = None
    # An error that ended the run (the server stopping, say): raised after the summary.
    failed: RemoteError | None = None
    with _stop_on_interrupt(getattr(args, "err", sys.stderr)) as stop:
        stop.at_once = args.server_side  # before the run starts: a press then ends it too
        if args.server_side:
            halt = not args.keep_going
            run = client.train(x, y, args.steps, every=args.every, stop_at_nonfinite=halt)
            try:
                for progress in run:
                    done, loss, version = progress.step, progress.loss, progress.version
                    if diverged_at is None and progress.first_nonfinite_step:
                        diverged_at = progress.first_nonfinite_step
                    elif diverged_at is None and not math.isfinite(loss):
                        diverged_at = done
                    bar.update(done, loss, progress.steps_per_s)
                    # A server from before stop_at_nonfinite runs on: closing the run stops
                    # it there.
                    if stop.is_set() or (halt and diverged_at is not None):
                        break
            except RemoteError as e:
                failed = e
            except KeyboardInterrupt:
                if not stop.is_set():  # not the handler's: raised before it was installed
                    raise
            finally:
                run.close()  # cancels the run on the server: it stops between two steps
        else:
            for k in range(args.steps):
                if stop.is_set():
                    break
                try:
                    result = client.train_step(x.reseeded(k), y.reseeded(k))
                except RemoteError as e:
                    failed = e
                    break
                done, loss, version = k + 1, result.loss, result.version
                if diverged_at is None and not math.isfinite(loss):
                    diverged_at = done
                halted = diverged_at == done and not args.keep_going
                if done % args.every == 0 or done == args.steps or halted:
                    bar.update(done, loss)
                if halted:  # it ran on, its steps wasted, until the end (found by a review)
                    break
    # A server-side run that the server ended (stopping, the session closed, a step
    # refused) says how many steps stay applied, and the version then: more than the last
    # progress it sent. The summary said that progress's, beside an error that said the
    # server's (found by a review of the CLI).
    reported = done  # the step whose loss `loss` is (0: none reported)
    if failed is not None and "steps_done" in failed.metadata:
        with contextlib.suppress(ValueError):
            done = max(done, int(failed.metadata["steps_done"]))
        with contextlib.suppress(KeyError, ValueError):  # an older server sends no version
            version = int(failed.metadata["version"])
    if failed is not None and done == 0:
        raise failed  # no step to sum up (a wrong --input-shape, say): the error says it all
    stopped = done < args.steps
    ran_on = False
    if args.server_side and stopped and failed is None:
        # The server ran on until it saw the stop: its steps after the last progress it sent
        # are applied too, so the version to report is the server's, not that progress's.
        with contextlib.suppress(GradwireError):
            now = client.list_tensors().version
            ran_on = now != version
            version = now
    data = {"steps": done, "asked": args.steps, "version": version}
    # The loss of the last step reported, and that step: not the last applied when the
    # server ended the run (none reported: no loss, where "nan" read as divergence).
    data["loss"], data["loss_step"] = (loss, reported) if reported else (None, None)
    data["stopped"] = stopped
    data["diverged_at"] = diverged_at
    # Ended by the divergence, not by Ctrl-C, the server or the steps asked for.
    halted = stopped and diverged_at is not None and not args.keep_going and failed is None
    data["stopped_at_nonfinite"] = halted and not stop.is_set()
    steps = f"{done} steps reported (the server may have run more before the stop reached it)"
    text = f"{'stopped after' if stopped else 'trained'} {steps if ran_on else f'{done} steps'}"
    if not reported:
        text += ": no loss reported"
    elif reported < done:
        text += f": loss {format_loss(loss)} at step {reported}, the last reported"
    else:
        text += f": loss {format_loss(loss)}"
    if version is not None:
        text += f", version {version}"
    if args.json:
        _emit(out, args, data, text)
    else:
        bar.finish(text)
        if diverged_at is not None:
            halted_at = done if data["stopped_at_nonfinite"] else None
            out.write(_divergence_hint(client, diverged_at, halted_at) + "\n")
    if failed is not None:
        raise failed
    if stop.is_set():
        raise Interrupted


def _divergence_hint(client: Client, step: int, halted_at: int | None = None) -> str:
    """What to do about a loss that stopped being finite (by `step`): start again with a
    smaller lr. `halted_at`: the step the run was stopped at for it (not --keep-going):
    `step`, or, against a server from before Train's stop_at_nonfinite, the progress that
    showed it, the server perhaps running on until the stop reached it."""
    lower = "gradwire optimizer --lr ... with a smaller learning rate"
    with contextlib.suppress(GradwireError):  # the hint is extra: never fail over it
        opt = client.list_tensors().optimizer
        lower = (
            f"gradwire optimizer --kind {opt.kind} --lr {opt.lr / 10:g} (a tenth of lr {opt.lr:g})"
        )
    stopped = ""
    if halted_at == step:
        stopped = "; the run stopped there (--keep-going runs on)"
    elif halted_at is not None:  # said "stopped there" of a run that went on (a review)
        stopped = (
            f"; the run was stopped at step {halted_at}, the first progress to show it "
            "(--keep-going runs on)"
        )
    return (
        f"the loss was no longer finite by step {step}: training diverged, and the parameters "
        f"may have too{stopped}. To start again: gradwire reset, then {lower}"
    )


def cmd_watch(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    stats = args.stats or not args.values
    if args.bins and not stats:  # dropped without a word (found by a review of the CLI)
        raise UsageError(
            "--bins draws histograms in the statistics, which --values alone leaves out: add "
            "--stats, or leave --bins out"
        )
    # As get --json writes them: two slices of one tensor share a name, not a selector.
    selectors = [str(parse_selector(text)) for text in args.selectors]
    stream = client.watch(
        args.selectors,
        values=args.values,
        stats=stats,
        bins=args.bins,
        every_steps=args.every_steps,
        min_interval=args.interval,
        timeout=args.duration,
    )
    table = WatchTable(out, args.selectors)
    seen, version = 0, None
    with _ends_when_the_reader_goes(out, client.close) as gone:
        try:
            for update in stream:
                # Counted before it is shown: a Ctrl-C just after its line appears must count it.
                seen, version = seen + 1, update.version
                if args.json:
                    out.write(_json_line(_watch_json(update, selectors)))
                    out.flush()
                else:
                    table.show(update)
                if args.count is not None and seen >= args.count:
                    break
        except DeadlineExceeded:
            if not seen:  # not even the first update: no server answered, or too short a time
                raise
            # --duration reached after an update: the watch ends as asked
        except Exception:
            if gone.is_set():  # the watch's call, cancelled for a reader gone
                raise BrokenPipeError from None  # exit 141, as for a reader gone at a write
            raise
        except KeyboardInterrupt:
            # Where it stopped, under the table (a --json reader has each update's version, and
            # lines of one shape): the last update on screen may be one of many alike.
            if not args.json:
                last = f": the last at version {version}" if seen else ""
                out.write(f"stopped after {seen} update{'' if seen == 1 else 's'}{last}\n")
            raise Interrupted from None  # nothing was changing
        finally:
            stream.close()


@contextlib.contextmanager
def _ends_when_the_reader_goes(out: TextIO, end: Callable[[], object]) -> Iterator[threading.Event]:
    """While inside, a reader of `out` that goes away (`gradwire watch loss | head -1`) calls
    `end` (the client's close, which cancels its calls) on a thread of its own, and sets
    the event returned: where `out` is this process's standard output and a pipe. A watch
    noticed only at its next write, which on an idle server, or with a large --every-steps,
    might never come: the command, and the server's place it held, lasted as long (found by
    a review of watching training). The thread is stopped, and waited for, on the way out.
    It interrupted the main thread at first, which could land after the watch had ended as
    asked (`--count 1 | head -1`): exit 130 for a command that had done its work (found by
    a review of that change)."""
    gone = threading.Event()
    try:
        fd = out.fileno() if isinstance(out, _Output) else -1
        piped = fd >= 0 and stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (OSError, ValueError):
        piped = False
    if not piped:
        yield gone
        return
    wake, woken = os.pipe()  # written on the way out, to end the thread's wait at once
    poller = select.poll()
    poller.register(fd, 0)  # a pipe's write end reports POLLERR once it has no reader
    poller.register(wake, select.POLLIN)

    def wait() -> None:
        if any(ready == fd for ready, _ in poller.poll()):
            gone.set()
            end()

    thread = threading.Thread(target=wait, name="gradwire-reader", daemon=True)
    thread.start()
    try:
        yield gone
    finally:
        os.write(woken, b"x")
        thread.join()
        os.close(wake)
        os.close(woken)


def _watch_json(update: Any, selectors: Sequence[str]) -> dict[str, Any]:
    tensors = []
    for watched, selector in zip(update.tensors, selectors, strict=True):
        item: dict[str, Any] = {
            "name": watched.name,
            "selector": selector,
            "present": watched.present,
        }
        if watched.value is not None:
            item["dtype"] = watched.dtype  # as get --json says it: "bfloat16" read as floats
            item["value"] = _jsonable(watched.value)
        if watched.stats is not None:
            item["stats"] = _stats_json(watched.stats)
        tensors.append(item)
    return {
        "version": update.version,
        "cause": update.cause,
        "skipped": update.skipped,
        "steps": update.steps,
        "tensors": tensors,
    }


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
        value = _narrowed(value, args.value, listed.dtype if listed is not None else None)
    version = client.set(args.selector, value)
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
        if broadcast or cast:
            what = " ".join(w for w in (str(list(given)), dtype if cast else None) if w)
            done = [f"broadcast to {list(shape)}"] if broadcast else []
            done += [f"cast to {listed.dtype}"] if cast else []
            how = f": a {what} value {' and '.join(done)}"
            data.update(value_shape=list(given), value_dtype=dtype or listed.dtype)
    _emit(out, args, data, f"{args.selector} written{how} (version {version})")


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
            f"with set, as in: gradwire set {shlex.quote(indexed)} {args.value}"
        )
    version = client.fill_parameters(args.value, args.names)
    which = ", ".join(args.names) if args.names else "every parameter"
    _emit(out, args, {"version": version}, f"{which} filled with {args.value} (version {version})")


def cmd_list(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    listing = client.list_tensors()
    if args.json:
        out.write(
            _json_line(
                {
                    "version": listing.version,
                    "model": listing.model,
                    "device": listing.device,
                    "optimizer": vars(listing.optimizer),
                    # What the model takes and gives, for building --input and --targets.
                    "sample_shape": list(listing.sample_shape),
                    "input_dtype": listing.input_dtype,
                    "outputs": listing.outputs,
                    "loss": listing.loss,
                    "tensors": [{**vars(t), "shape": list(t.shape)} for t in listing.tensors],
                }
            )
        )
        return
    out.write(
        f"model {listing.model} on {listing.device}, optimizer "
        f"{_describe_optimizer(listing.optimizer, brief=True)}, version {listing.version}\n"
    )
    if listing.outputs:  # what the model takes: for --input and --targets (0: not said)
        sample = ", ".join(["N", *(str(d) for d in listing.sample_shape)])
        targets = (
            f"class indices in [0, {listing.outputs})"
            if listing.loss == "cross_entropy"
            else f"floats [N, {listing.outputs}]"
        )
        out.write(
            f"input {listing.input_dtype} [{sample}] -> output [N, {listing.outputs}]; loss "
            f"{listing.loss}, targets {targets}\n"
        )
    # Columns as wide as their widest entry: "activation" and "optimizer_state" included.
    name_w, kind_w, dtype_w = (
        max(len(getattr(t, field)) for t in listing.tensors) for field in ("name", "kind", "dtype")
    )
    for t in listing.tensors:
        shape = format_size(t.shape) if t.present else "None"
        out.write(f"  {t.name:<{name_w}}  {t.kind:<{kind_w}}  {t.dtype:<{dtype_w}}  {shape}\n")


def _describe_optimizer(config: OptimizerConfig, *, brief: bool = False) -> str:
    """'sgd lr=0.01 momentum=0.9 weight_decay=0.0 nesterov=False': the kind and every setting
    the server reports; `brief` leaves out those that are off (0 or False)."""
    settings = (
        f"{k}={v}"
        for k, v in vars(config).items()
        if k != "kind" and v is not None and not (brief and k != "lr" and not v)
    )
    return " ".join((config.kind, *settings))


def cmd_reset(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    version = client.reset(args.seed)
    seeded = "unseeded" if args.seed is None else f"seed {args.seed}"
    _emit(out, args, {"version": version}, f"model re-initialised, {seeded} (version {version})")


def cmd_save(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    saved = client.save_checkpoint(args.name)
    _emit(
        out,
        args,
        {"name": saved.name, "version": saved.version, "bytes": saved.bytes},
        f"saved state version {saved.version} as checkpoint {saved.name!r} "
        f"({_bytes(saved.bytes)}) in the server's state directory",
    )


def cmd_load(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    loaded = client.load_checkpoint(args.name)
    name = args.name or "state"
    _emit(
        out,
        args,
        {"version": loaded.version, "saved_version": loaded.saved_version},
        f"loaded checkpoint {name!r}, saved at version {loaded.saved_version} "
        f"(version {loaded.version})",
    )


def cmd_open_session(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    client.session = None  # opened beside the default session, whatever --session says
    session = client.open_session(args.seed)
    ident, idle = session.detach(), session.session_idle_s
    lasts = (
        "it stays open until closed"
        if idle is None or math.isinf(idle)
        else f"the server closes it after {_seconds_text(idle)} without calls"
    )
    _emit(
        out,
        args,
        {"session": ident, "idle_timeout_s": idle},
        f"session {ident} opened; {lasts}\n"
        f"act on it with --session {ident}, or: export {SESSION_ENV}={ident}\n"
        f"close it with: gradwire close-session {ident}",
    )


def cmd_close_session(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    ident = args.id or args.session
    if not ident:
        raise UsageError(
            f"name the session to close: gradwire close-session ID (or --session ID, or "
            f"${SESSION_ENV})"
        )
    try:
        client.session = check_session(ident, "ID" if args.id else "--session")
    except ValueError as e:
        raise UsageError(str(e)) from None
    client.close_session()
    _emit(out, args, {"session": ident, "closed": True}, f"session {ident} closed")


def _predates(client: Client, rpc: str, cannot: str, instead: str = "") -> CommandError:
    """The error of a command whose call the server answered UNIMPLEMENTED: a server from
    before `rpc`, which cannot do what the command asks; `instead`: what else to do."""
    return CommandError(
        f"the server at {client.target} predates {rpc} and cannot {cannot}: a newer gradwire "
        f"serve can{instead}"
    )


def cmd_sessions(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        listing = client.list_sessions()
    except Unimplemented:
        raise _predates(client, "ListSessions", "list its sessions") from None
    timeout = listing.idle_timeout_s
    if args.json:
        data = {
            "sessions": [vars(s) for s in listing.sessions],
            "opening": listing.opening,
            "max_sessions": listing.max_sessions,
            "idle_timeout_s": timeout,
        }
        out.write(_json_line(data))
        return
    closing = (
        "none is closed for want of calls"
        if math.isinf(timeout)
        else f"each is closed after {format_duration(timeout)} without calls"
    )
    opening = f" ({listing.opening} more opening)" if listing.opening else ""
    out.write(
        f"{len(listing.sessions)} of {listing.max_sessions} sessions open beside the default "
        f"one{opening}; {closing}\n"
    )
    if not listing.sessions:
        return
    # "running": calls in progress now, not calls made (it read "calls", and a newcomer took
    # it for a count of them).
    out.write(f"{'session':<32}  {'version':>8}  {'open':>7}  {'idle':>7}  running  closes in\n")
    for s in listing.sessions:
        idle = "-" if s.calls_in_progress else format_duration(s.idle_s)
        if math.isinf(timeout):
            closes = "never"
        elif s.calls_in_progress:  # a call in progress keeps it open however long it lasts
            closes = "after its calls"
        else:
            closes = format_duration(max(0.0, timeout - s.idle_s))
        out.write(
            f"{s.session:<32}  {s.version:>8}  {format_duration(s.open_s):>7}  {idle:>7}  "
            f"{s.calls_in_progress:>7}  {closes}\n"
        )


def cmd_delete_checkpoint(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        freed = client.delete_checkpoint(args.name)
    except Unimplemented:  # it said "UNIMPLEMENTED: Method not found!" alone (a review)
        raise _predates(
            client,
            "DeleteCheckpoint",
            "remove checkpoints",
            f", or remove {args.name}.safetensors from its --state-dir on its machine",
        ) from None
    _emit(
        out,
        args,
        {"name": args.name, "bytes": freed},
        f"removed checkpoint {args.name!r} ({_bytes(freed)}) from the server's state directory",
    )


def cmd_checkpoints(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        found = client.list_checkpoints()
    except Unimplemented:
        raise _predates(
            client,
            "ListCheckpoints",
            "list its checkpoints",
            " (gradwire load of a name it does not hold names those it does)",
        ) from None
    if args.json:
        out.write(_json_line({"checkpoints": [vars(c) for c in found]}))
        return
    out.write(f"{len(found)} checkpoint{'' if len(found) == 1 else 's'} in the server's state "
              f"directory{':' if found else ' (gradwire save NAME writes one)'}\n")  # fmt: skip
    if not found:
        return
    width = max(len("name"), *(len(c.name) for c in found))
    out.write(
        f"{'name':<{width}}  {'version':>8}  {'size':>10}  {'saved (local time)':<19}  model\n"
    )
    for c in found:
        version = "-" if c.saved_version < 0 else str(c.saved_version)
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.saved_unix_s))
        # What a load would refuse it for, in place of its model's name.
        held = f"cannot be loaded: {c.problem}" if c.problem else c.model
        out.write(f"{c.name:<{width}}  {version:>8}  {_size(c.bytes):>10}  {saved:<19}  {held}\n")


def _size(count: int) -> str:
    """`812 B`, `1.3 MiB`, `2.0 GiB`: a file's size, short, for a table."""
    if count < 1024:
        return f"{count} B"
    for unit, power in (("KiB", 1), ("MiB", 2), ("GiB", 3)):
        if count < 1024 ** (power + 1) or unit == "GiB":
            return f"{count / 1024**power:.1f} {unit}"
    raise AssertionError("unreachable")


def _seconds_text(seconds: float) -> str:
    """`42.5 s`, `1,234,567 s`, `0.0004 s`: as given, never in exponent form past a second."""
    if seconds >= 1:
        return f"{seconds:,.3f}".rstrip("0").rstrip(".") + " s"
    return f"{seconds:g} s"


def _bytes(count: int) -> str:
    """`67,108,864 bytes (64.0 MiB)`: exact, and readable."""
    return f"{count:,} bytes ({count / 2**20:.1f} MiB)"


def cmd_info(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        info = client.server_info()
    except Unimplemented:
        raise _predates(
            client,
            "GetServerInfo",
            "describe itself",
            " (gradwire list shows its model and device)",
        ) from None
    if args.json:
        out.write(_json_line({**vars(info), "limits": vars(info.limits)}))
        return
    lim = info.limits
    idle = lim.session_idle_timeout_s
    closing = (
        "none is closed for want of calls"
        if math.isinf(idle)
        else f"each closed after {_seconds_text(idle)} without calls"
    )
    pings = (
        f"a ping after {_seconds_text(lim.keepalive_s)} of silence, the connection closed when "
        f"it goes unanswered for {_seconds_text(lim.keepalive_timeout_s)}"
        if lim.keepalive_s
        else "no pings from the server"
    )
    ids = f"at most {lim.max_request_id_chars} characters"
    if lim.last_request_ids_kept:  # 0: a server from before it was reported
        ids += (
            f"; a retry is matched to its first attempt while its id is kept: "
            f"{_seconds_text(lim.request_id_kept_s)} after its last use, or while among the "
            f"last {lim.last_request_ids_kept:,} ({lim.max_request_ids_kept:,} ids at most)"
        )
    rows = [
        ("message size", f"at most {_bytes(lim.max_message_bytes)} each way"),
        (
            "tensor values",
            f"at most {_bytes(lim.max_value_bytes)} in one message; larger ones stream, "
            f"{_bytes(lim.default_chunk_bytes)} a chunk by default",
        ),
        ("elements", f"at most {lim.max_elements:,} in a tensor sent or made"),
        ("dimensions", f"at most {lim.max_dims}"),
        ("names", f"at most {lim.max_name_chars} characters"),
        ("histogram bins", f"at most {lim.max_histogram_bins:,}"),
        ("steps per Train", f"at most {lim.max_train_steps:,}"),
        ("request ids", ids),
        (
            "retry answers",
            f"the latest {_bytes(lim.answer_bytes_kept)} kept; a retry whose answer was let "
            "go is refused (ANSWER_NOT_KEPT), not applied again",
        ),
        ("calls at once", f"{lim.max_concurrent} (an open watch or stream holds one)"),
        ("batches", f"at most {lim.max_batch_calls:,} calls in one Batch"),
        ("selectors", f"at most {lim.max_selectors:,} in one watch or one step's fetch"),
        (
            "health watches",
            f"at most {lim.max_health_watches} open at once; past that, poll (gradwire health)",
        ),
        (
            "reflection",
            f"at most {lim.max_reflection_streams} streams open at once (grpcurl, an IDE); "
            "one more is refused",
        ),
        ("sessions", f"{lim.max_sessions} beside the default one; {closing}"),
        (
            "keepalive",
            f"{pings}; a client may ping a quiet connection every "
            f"{_seconds_text(lim.min_client_ping_s)} at most, or it is closed",
        ),
    ]
    # A server from before these limits were reported answers 0 for them: left out.
    unreported = {
        "retry answers": not lim.answer_bytes_kept,
        "health watches": not lim.max_health_watches,
        "reflection": not lim.max_reflection_streams,
        "batches": not lim.max_batch_calls,
        "selectors": not lim.max_selectors,
    }
    rows = [(name, text) for name, text in rows if not unreported.get(name)]
    out.write(
        f"gradwire {info.version} with PyTorch {info.torch_version}, models on {info.device}\n"
    )
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        # Wrapped to INFO_COLUMNS, the text's column kept (one row ran to 168 characters),
        # and never between a number and its unit.
        kept = _NUMBER_AND_UNIT.sub("\\1\xa0\\2", text)
        lines = textwrap.wrap(kept, INFO_COLUMNS - width - 2, break_on_hyphens=False)
        for i, line in enumerate(lines):
            out.write(f"{'' if i else name:<{width}}  {line}\n".replace("\xa0", " "))


#: The width `gradwire info` wraps its rows to.
INFO_COLUMNS = 100
_NUMBER_AND_UNIT = re.compile(r"(\d) (s|bytes|MiB)\b")


def cmd_optimizer(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    names = ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov")
    given = {n: getattr(args, n) for n in names}
    if args.kind is None and all(v is None for v in given.values()):
        # Asked for nothing: the optimizer in place, unchanged. It replaced it with SGD at
        # lr 1.0, losing an Adam and its state to a look (found by a review of the CLI).
        listing = client.list_tensors()
        version, config, said = (
            listing.version,
            listing.optimizer,
            "; --keep-state changes the settings given: give one"
            if args.keep_state
            else "; --kind or a setting replaces it",
        )
    elif args.keep_state:  # the kind in place unless --kind says; the server checks it
        version, config = client._set_optimizer(args.kind, given, keep_state=True)
        said = ", its state kept"
    else:
        version, config = client._set_optimizer(_optimizer_kind(args, given, client), given)
        said = ""
    # Every setting of either kind, null where this kind has none: the shape of list
    # --json's "optimizer", which this had only the kind's of (found by a review of the CLI
    # as a researcher).
    _emit(
        out,
        args,
        {"version": version, **vars(config)},
        f"{_describe_optimizer(config)} (version {version}{said})",
    )


def _optimizer_kind(
    args: argparse.Namespace, given: dict[str, object], client: Client
) -> Literal["sgd", "adam"]:
    """The kind `optimizer` replaces the optimizer with: --kind; else the kind the settings
    given belong to (Adam's betas and eps, SGD's momentum and nesterov); else the kind in
    place. It was SGD whatever was in place: `--lr 0.01` turned an Adam into an SGD, and
    `--beta1 0.5` under Adam was refused as "a setting of Adam, not of SGD" (found by a
    review of the CLI)."""
    if args.kind is not None:
        return cast(Literal["sgd", "adam"], args.kind)  # argparse's choices
    if any(given[n] is not None for n in ("beta1", "beta2", "eps")):
        return "adam"
    if any(given[n] is not None for n in ("momentum", "nesterov")):
        return "sgd"
    return "adam" if client.list_tensors().optimizer.kind == "adam" else "sgd"


def cmd_health(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    status = client.health(args.service)
    _emit(out, args, {"status": status}, status)
    if status != "SERVING":
        raise CommandError(f"the server at {args.target} is {status}")


#: How to get the server side: gradwire is not on PyPI, so from a checkout (or its wheel).
SERVER_EXTRA = "install gradwire's server extra (in a checkout: pip install '.[server]')"


def cmd_replay(args: argparse.Namespace, client: Client | None, out: TextIO) -> None:
    from gradwire.replay import SessionInUse, WrongModel, replay

    if args.seed is not None and args.init != "random":  # dropped without a word (a review)
        raise UsageError(
            "--seed seeds --init random; --init fill sets every parameter to 0.1 and draws "
            "nothing: add --init random, or leave --seed out"
        )
    seed = 0 if args.seed is None else args.seed

    def run(c: Client) -> None:
        lines: list[str] = []

        def write(line: str) -> None:
            if args.json:
                lines.append(line)
            else:
                out.write(line + "\n")

        # The tutorial's calls, one after another: on one stream (a server without the
        # Calls RPC gets calls of their own).
        c.stream_calls = True
        try:
            result = replay(c, init=args.init, seed=seed, write=write)
        except (WrongModel, SessionInUse) as e:
            raise CommandError(str(e)) from None
        if args.json:
            out.write(
                _json_line(
                    {
                        "init": result.init,
                        "seed": seed if result.init == "random" else None,
                        "output_shape": list(result.output_shape),
                        "loss": result.loss,
                        "grad_before_backward": _jsonable(result.grad_before_backward),
                        "grad_slice": _jsonable(result.grad_slice),
                        "weight_slice_before": _jsonable(result.weight_slice_before),
                        "weight_slice_after": _jsonable(result.weight_slice_after),
                        "grad_after_zero": _jsonable(result.grad_after_zero),
                        # printed in the transcript (of --init fill), and left out here until
                        # a review of the replay
                        "linear_grad_rows": _jsonable(result.linear_grad_rows),
                        "identity_holds": result.identity_holds,
                        "transcript": lines,
                    }
                )
            )

    if client is not None:
        if args.device is not None:  # it was ignored: the replay ran on the server's device
            raise UsageError(
                "--device chooses the device of the server --embedded starts; a server "
                f"replayed against ({args.target}) keeps its own (gradwire serve --device)"
            )
        run(client)
        return
    # --embedded: a server in this process on a free port, for trying gradwire with one command.
    ignored = [name for name in _COMMON if name in args.given]
    if ignored:  # each would be ignored: the replay runs against a server of its own
        options = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise UsageError(
            f"--embedded replays against a server of its own, in this process: leave out "
            f"{options}, or leave out --embedded to replay against a server you name"
        )
    try:
        from gradwire_server.app import start
        from gradwire_server.errors import InvalidInput
        from gradwire_server.trainer import Trainer, resolve_device
    except ImportError as err:
        raise UsageError(
            f"--embedded needs the server side (torch): {SERVER_EXTRA} ({err})"
        ) from None
    try:
        device = resolve_device(args.device or "auto")
    except InvalidInput as e:
        raise UsageError(e.message) from None
    running = start(Trainer(device=device), "127.0.0.1", 0)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=args.timeout) as embedded:
            run(embedded)
    finally:
        running.stop(grace=None)


def _asks_json_log(words: Sequence[str]) -> bool:
    """Whether a command line says `--log-format json` (or `--log-format=json`, or an
    abbreviation argparse takes for it: `--log-f json`)."""

    def log_format(option: str) -> bool:
        return len(option) >= len("--log-f") and "--log-format".startswith(option)

    pairs = zip(words, [*words[1:], ""], strict=True)
    return any(
        (log_format(w) and n == "json") or (log_format(w.partition("=")[0]) and w.endswith("=json"))
        for w, n in pairs
    )


def _usage_error_logged(said: str, err: TextIO) -> None:
    """What argparse `said` refusing `serve --log-format json`'s options, as one JSON log line
    at CRITICAL (its last line: "gradwire serve: error: argument --port: ..."); as argparse
    said it where the server side, whose log format that is, is not installed."""
    lines = [line for line in said.splitlines() if line.strip()]
    try:
        from gradwire_server.logs import JsonFormatter
    except ImportError:
        err.write(said)
        return
    if not lines:
        return
    record = logging.LogRecord("gradwire.cli", logging.CRITICAL, __file__, 0, lines[-1], (), None)
    err.write(JsonFormatter().format(record) + "\n")


@contextlib.contextmanager
def _errors_logged(json_log: bool) -> Iterator[None]:
    """With `json_log`, a usage or command error is logged as the log's last line (one JSON
    object), and marked said, for main to add none in plain text."""
    try:
        yield
    except (UsageError, CommandError) as e:
        if json_log:
            logging.getLogger("gradwire.cli").critical("gradwire serve: error: %s", e)
            e.logged = True
        raise


def cmd_serve(args: argparse.Namespace, client: Client | None, out: TextIO) -> None:
    try:
        from gradwire_server.app import DeviceLost, ServingLost, serve
        from gradwire_server.auth import TlsFiles
        from gradwire_server.errors import InvalidInput, OverLimit
        from gradwire_server.logs import log_handler
    except ImportError as err:
        raise UsageError(f"serve needs the server side (torch): {SERVER_EXTRA} ({err})") from None
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), handlers=[log_handler(args.log_format)]
    )
    # A start that fails says so in the log's format: with --log-format json, a collector of
    # JSON lines read the two lines before it and not the one that mattered (an operator's
    # walkthrough).
    with _errors_logged(args.log_format == "json"):
        try:
            token = load_token(args.token_file)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
        tls = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise UsageError("TLS needs both --tls-cert and --tls-key")
            tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
        elif args.tls_client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        if args.keepalive and not args.keepalive_timeout:
            raise UsageError(
                "--keepalive-timeout must be more than 0 (--keepalive 0 turns pings off)"
            )
        if args.model and os.getcwd() not in sys.path and "" not in sys.path:
            # As `python -m` does: a module beside the user (mymodels.py) can be named by
            # --model even when gradwire runs as an installed script.
            sys.path.insert(0, os.getcwd())
        try:
            serve(
                host=args.host,
                port=args.port,
                device=args.device,
                seed=args.seed,
                max_concurrent=args.max_concurrent,
                port_file=args.port_file,
                grace=args.grace,
                token=token,
                tls=tls,
                state_dir=args.state_dir,
                max_sessions=args.max_sessions,
                session_idle_s=args.session_idle,
                model=args.model,
                metrics_port=args.metrics_port,
                keep_freed=not args.return_freed_memory,
                one_thread_for_small_work=args.one_thread_for_small_work,
                keepalive_s=args.keepalive,
                keepalive_timeout_s=args.keepalive_timeout,
            )
        except InvalidInput as e:
            raise UsageError(e.message) from None
        except OverLimit as e:  # a checkpoint that does not fit: nothing was served
            raise CommandError(e.message) from None
        except (OSError, DeviceLost, ServingLost) as e:  # a failed exit: a supervisor restarts it
            raise CommandError(str(e)) from None


# --- the parser ---------------------------------------------------------------------


#: A word argparse should take for a negative number, not an option: its own pattern takes
#: -3 and -0.5 alone, so `--low -1e-3`, `fill -1e-3` and `set W -inf` failed with "expected
#: one argument" or "the following arguments are required" (found by a review).
_NEGATIVE_NUMBER = re.compile(
    r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, taking -1e-3, -inf and -nan for values (`_NEGATIVE_NUMBER`); the
    commands' parsers are made of this class too (add_subparsers makes its parent's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER


def build_parser() -> argparse.ArgumentParser:
    # The options of every command that calls a server.
    common = _Parser(add_help=False)
    common.add_argument(
        "--target",
        # None: not given; main takes $GRADWIRE_TARGET, else DEFAULT_TARGET (_from_environment).
        help=f"server address host:port (default: ${TARGET_ENV} if set, else {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60.0,
        help="seconds each call may take (default %(default)s); not a limit on watch (see "
        "--count, --duration) or on train's steps",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts: one object, or one per line where there are many "
        "(watch's updates)",
    )
    common.add_argument(
        "--keepalive",
        type=_client_keepalive,
        default=limits.CLIENT_KEEPALIVE_S,
        metavar="SECONDS",
        help="during a call, ping a connection silent this long, so that a watch whose server "
        "vanished ends; a gradwire server takes one every 30 s at most; 0: never "
        "(default %(default)s)",
    )
    common.add_argument(
        "--session",
        metavar="ID",  # None: not given; main takes $GRADWIRE_SESSION (_from_environment)
        help="act on this session (from gradwire open-session, or Python's "
        "Client.open_session(): its .session) instead of the default one; it stays open "
        f"(default: ${SESSION_ENV} if set)",
    )
    common.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the server's bearer token (default: ${TOKEN_ENV} if set)",
    )
    common.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    common.add_argument("--tls-ca", type=Path, help="PEM file of the CA that signed the server")
    common.add_argument(
        "--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS, with --tls-key"
    )
    common.add_argument(
        "--tls-key", type=Path, help="client private key (PEM), for mutual TLS, with --tls-cert"
    )
    # The same names, for `serve`, from the server's side.
    serving = _Parser(add_help=False)
    serving.add_argument(
        "--token-file",
        type=Path,
        help="file holding the token every call must carry as 'authorization: Bearer TOKEN' "
        f"(default: ${TOKEN_ENV} if set, else no token is required)",
    )
    serving.add_argument(
        "--tls-cert", type=Path, help="the server's certificate chain (PEM): serve TLS"
    )
    serving.add_argument(
        "--tls-key", type=Path, help="the server's private key (PEM), with --tls-cert"
    )

    parser = _Parser(
        prog="gradwire",
        description="Drive a PyTorch model's training step on a (GPU) gradwire server over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"gradwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help: str, remote: bool = True) -> argparse.ArgumentParser:
        parents = [common if remote else serving]
        p = sub.add_parser(name, parents=parents, help=help, description=help)
        p.set_defaults(func=func, remote=remote, command_parser=p)
        return p

    p = add(
        "serve",
        cmd_serve,
        "run a server in the foreground (Ctrl-C or SIGTERM stops it)",
        remote=False,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; 0.0.0.0 exposes it to the network (default %(default)s)",
    )
    p.add_argument(
        "--port", type=_port, default=50051, help="port; 0 picks a free one (default %(default)s)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when there is one), cpu, cuda or cuda:N (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seed for the model's initialisation (default: none, other weights each start)",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:ATTR",
        help="serve your own model: a ModelSpec, or a function returning one, e.g. "
        "mymodels:SPEC or gradwire_server.models:TINY_MLP; the current folder is importable "
        "(default: the tutorial's Simple)",
    )
    p.add_argument(
        "--max-concurrent",
        type=_at_least(1, limits.MAX_COUNT),
        default=16,
        help="calls served at once; more are refused at once (RESOURCE_EXHAUSTED) "
        "(default %(default)s)",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write the bound port here once listening (a file left there by a server "
        "killed is removed at start); removed once the server has stopped",
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="seconds in-flight calls get at shutdown (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug adds one line per finished call: method, status, milliseconds (default info)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, with the call's method, request_id, session "
        "and peer when logged during one (default %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port "
        "(default: off)",
    )
    p.add_argument(
        "--max-sessions",
        type=_at_least(0, limits.MAX_COUNT),
        default=8,
        help="sessions open at once beside the default one, which calls without a session "
        "use; 0: none (default %(default)s)",
    )
    p.add_argument(
        "--session-idle",
        type=_positive_seconds_or_forever,
        default=600.0,
        metavar="SECONDS",
        help="seconds without calls before a session is closed, more than 0; inf: never "
        "(default %(default)s)",
    )
    p.add_argument(
        "--keepalive",
        type=_seconds,
        default=limits.KEEPALIVE_S,
        metavar="SECONDS",
        help="ping a connection silent this long, and drop it when no answer comes within "
        "--keepalive-timeout, ending its calls: a client gone without closing its "
        "connection lets go of its watch, its session and its place; 0: never "
        "(default %(default)s)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=_seconds,
        default=limits.KEEPALIVE_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a ping may go unanswered (default %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="restore the model and optimizer from here at start, save them here at a "
        "graceful stop (safetensors; default: none, nothing is saved)",
    )
    p.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="give the memory a step frees back to the system at once (the C library's "
        "default): less resident memory between steps, slower CPU steps; by default the "
        "server keeps it for the next step",
    )
    p.add_argument(
        "--one-thread-for-small-work",
        action="store_true",
        help="on the CPU, run steps of under 33.6 MFLOP (the tutorial's) on one thread: on a "
        "small machine, calls after idle time then do not wait milliseconds for OpenMP's "
        "workers to wake; results may differ from torch's defaults in the last bits",
    )
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        help="with --tls-cert and --tls-key: require client certificates signed by this CA",
    )

    p = add("forward", cmd_forward, "run the model and the loss on an input (Forward)")
    p.add_argument(
        "--input",
        help=f"the input: {SOURCE_HELP} (default: ones for 8 samples of the model's shape, "
        "ones:8,3,10,10 for the tutorial's)",
    )
    p.add_argument(
        "--targets",
        help="class indices for the loss (values, for an mse model), same syntax "
        "(default: one per sample of the input: class 1, or ones of the output's width for "
        "an mse model)",
    )
    p.add_argument("--no-targets", action="store_true", help="run the model only, no loss")
    p.add_argument(
        "--eval",
        action="store_true",
        help="run the model in evaluation mode (model.eval()): BatchNorm uses its running "
        "statistics and keeps them, Dropout passes through",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        help="seed for uniform, normal and randint sources (default 0); refused without one",
    )

    p = add("backward", cmd_backward, "backpropagate the last loss (Backward)")
    p.add_argument(
        "--retain-graph", action="store_true", help="keep the graph for another Backward"
    )

    add("step", cmd_step, "apply the optimizer (Step)")

    p = add("zero-grad", cmd_zero_grad, "clear gradients (ZeroGrad); to None unless --zeros")
    p.add_argument(
        "--zeros",
        action="store_true",
        help="zero the gradients in place instead of setting them to None (those that are "
        "None stay None, as in PyTorch)",
    )

    p = add(
        "get",
        cmd_get,
        "print a tensor or slice, or save it to a .npy file (--out): "
        "gradwire get 'conv1.weight.grad[0][0][0]'",
    )
    p.add_argument(
        "selector", help="a name and optional numpy basic index: conv1.weight[0, :, 1:3]"
    )
    p.add_argument("--shape-only", action="store_true", help="print the shape, fetch no values")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE.npy",
        help="save the values to this .npy file instead of printing them (dtype and shape "
        "as the Python client reads them; bfloat16 widened exactly to float32), and print "
        "what was written; gradwire set SELECTOR FILE.npy writes them back",
    )

    p = add(
        "plot",
        cmd_plot,
        "draw a tensor or slice into a PNG: gradwire plot conv1.weight --out conv1.png",
    )
    p.epilog = (
        "auto picks by shape: a 4-D conv weight or its gradient ([out, in, kh, kw], named "
        "*.weight or *.weight.grad) -> kernels, a 2-D slice -> heatmap, anything else -> "
        "histogram, binned on the server (GetStats) so that no values cross the wire. "
        "kernels: one tile per (output, input) channel pair, a column per output "
        f"channel (filter) and a row per input channel, at most {MAX_KERNEL_OUT} output x "
        f"{MAX_KERNEL_IN} input channels (the title says when more were left out). Signed "
        "values (weights, gradients) are drawn with a diverging colour map centred on 0: red "
        "positive, blue negative, white 0, one scale for every tile. The PNG is "
        f"{FIGSIZE[0]:g} x {FIGSIZE[1]:g} inches at --dpi "
        f"({FIGSIZE[0] * DEFAULT_DPI:.0f} x {FIGSIZE[1] * DEFAULT_DPI:.0f} pixels by default). "
        "Needs matplotlib: gradwire's plot extra (in a checkout: pip install '.[plot]')."
    )
    p.add_argument(
        "selector", help="a name and optional numpy basic index, as for get: linear.weight[:, :64]"
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="FILE.png", help="the PNG file to write"
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="kernels (4-D), heatmap (2-D), histogram (any), or auto (default %(default)s)",
    )
    p.add_argument(
        "--bins",
        type=int,
        help=f"a histogram's bins over the finite values (default {DEFAULT_BINS})",
    )
    p.add_argument("--title", help="the picture's title (default: the selector and its shape)")
    p.add_argument(
        "--dpi", type=int, default=DEFAULT_DPI, help="pixels per inch (default %(default)s)"
    )

    p = add(
        "stats",
        cmd_stats,
        "statistics of a tensor or slice, computed on the server (std is the population's, "
        "numpy's std(); torch.std() divides by n - 1): "
        "gradwire stats conv1.weight.grad --bins 10",
    )
    p.add_argument("selector", help="a name and optional index, as for get")
    p.add_argument(
        "--bins",
        type=_at_least(0, limits.MAX_HISTOGRAM_BINS),
        default=0,
        help="histogram bins (default: none)",
    )
    p.add_argument("--low", type=float, help="histogram's lower edge (default: the minimum)")
    p.add_argument("--high", type=float, help="histogram's upper edge (default: the maximum)")

    p = add(
        "watch",
        cmd_watch,
        "show tensors after every change, live (Ctrl-C stops): "
        "gradwire watch conv1.weight.grad loss --every-steps 10",
    )
    p.add_argument("selectors", nargs="+", help="names with optional indices, as for get")
    p.add_argument("--values", action="store_true", help="show values (default: statistics)")
    p.add_argument("--stats", action="store_true", help="with --values: statistics too")
    p.add_argument(
        "--bins",
        type=_at_least(0, limits.MAX_HISTOGRAM_BINS),
        default=0,
        help="histogram bins in the statistics: drawn under each tensor's row, or in each "
        "entry's stats with --json (default: none)",
    )
    p.add_argument(
        "--every-steps",
        type=_at_least(0, codec.INT64_MAX),
        default=0,
        help="an update every N optimizer steps; 0: after every change, Steps or not "
        "(default %(default)s)",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=0.1,
        help="at most one update per this many seconds: one that falls due sooner waits, "
        "then shows the state it finds, counting the updates due meanwhile as skipped "
        "(default %(default)s; 0: every update as it falls due)",
    )
    p.add_argument("--count", type=_at_least(1), help="stop after this many updates")
    p.add_argument(
        "--duration", type=_positive_seconds, help="stop after this many seconds (more than 0)"
    )

    p = add(
        "train",
        cmd_train,
        "run training steps with a progress bar, on random data made on the server "
        "(Ctrl-C stops between steps)",
    )
    p.add_argument(
        "--steps",
        type=_at_least(1, limits.MAX_TRAIN_STEPS),
        default=100,
        help="steps to run (default %(default)s)",
    )
    p.add_argument("--batch", type=_at_least(1), default=8, help="batch size (default %(default)s)")
    p.add_argument(
        "--every",
        type=_at_least(1, codec.INT64_MAX),
        default=1,
        help="show progress every K steps (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of step 0's data; step k uses seed + k (default %(default)s)",
    )
    p.add_argument(
        "--input-shape",
        type=_shape_option,
        help="one sample's shape, comma-separated (default: what the server's model takes)",
    )
    p.add_argument(
        "--input-high",
        type=_at_least(1),
        help="for a model of integer inputs (token ids): draw them from 0..N-1 (N: its "
        "vocabulary's size); a float model's inputs are drawn from a normal distribution",
    )
    p.add_argument(
        "--classes",
        type=_at_least(1),
        help="labels drawn from 0..N-1 (default: the model's output width)",
    )
    p.add_argument(
        "--server-side",
        action="store_true",
        help="one Train call runs every step on the server (default: a TrainStep call per step)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="run every step asked for, even past the first loss that is NaN or infinite "
        "(default: stop after that step, training having diverged)",
    )

    p = add(
        "set",
        cmd_set,
        "write a parameter or gradient, or a slice of one; the value broadcasts to the "
        "selection's shape and is cast to its dtype, as numpy's assignment does (the line "
        "written says when it did either)",
    )
    p.add_argument("selector", help="a name and optional index, as for get")
    p.add_argument("value", help=f"a number, a JSON list, {SOURCE_HELP}")

    p = add("fill", cmd_fill, "fill parameters with one value, as p.data.fill_(value)")
    p.add_argument(
        "value",
        type=_fill_value,
        help="a number, nan or inf; a negative one after --, as in: gradwire fill -- -inf",
    )
    # default=[]: without one, Python's argparse (before 3.13) calls a `*` positional required
    # in its error, "the following arguments are required: value, names".
    p.add_argument("names", nargs="*", default=[], help="parameters to fill (default: all)")

    add("list", cmd_list, "list every tensor with its kind, dtype and shape")

    p = add(
        "reset",
        cmd_reset,
        "re-initialise the model's parameters and start the optimizer's state afresh (its "
        "settings stay)",
    )
    p.add_argument("--seed", type=_seed, default=None, help="torch.manual_seed before initialising")

    checkpoint_name = (
        "the checkpoint's name, a file <name>.safetensors in the server's state directory "
        "(default: state, the one `gradwire serve --state-dir` restores at start and "
        "overwrites at a graceful stop: name one to keep; the default session's, so a "
        "--session saves under a name of its own)"
    )
    p = add(
        "save",
        cmd_save,
        "save the state (parameters, gradients, buffers, optimizer) as a checkpoint in the "
        "server's --state-dir",
    )
    p.add_argument("name", nargs="?", default="", help=checkpoint_name)
    p = add(
        "load",
        cmd_load,
        "replace the state with a checkpoint from the server's --state-dir (the version "
        "moves on by one)",
    )
    p.add_argument("name", nargs="?", default="", help=checkpoint_name)
    add(
        "checkpoints",
        cmd_checkpoints,
        "list the checkpoints in the server's --state-dir: name, the version saved, size, "
        "when, and the model, or why a load would refuse one (--json for a script)",
    )
    p = add(
        "delete-checkpoint",
        cmd_delete_checkpoint,
        "remove a checkpoint from the server's --state-dir, for room (a save refused for a "
        "full disk)",
    )
    p.add_argument(
        "name",
        help="the checkpoint's name, as gradwire checkpoints lists it ('state', the one the "
        "server restores at start, by that name alone)",
    )

    p = add(
        "open-session",
        cmd_open_session,
        "open a session: a model, optimizer and version of its own beside the default one; "
        'prints its id, and how to use it (--json: {"session": ID, ...} for a script)',
    )
    p.add_argument("--seed", type=_seed, default=None, help="seed for its model's initialisation")

    p = add(
        "close-session",
        cmd_close_session,
        "close a session and free its model (open Watches and Trains on it end)",
    )
    p.add_argument(
        "id", nargs="?", default=None, help=f"the session (default: --session, ${SESSION_ENV})"
    )

    add(
        "sessions",
        cmd_sessions,
        "list the sessions open beside the default one: id, version, age, idle time, calls",
    )

    add(
        "info",
        cmd_info,
        "the server's gradwire and PyTorch versions, its device, and the limits it keeps",
    )

    p = add(
        "optimizer",
        cmd_optimizer,
        "show the optimizer; with --kind or a setting, replace it (by one of the kind in "
        "place, unless --kind or a setting of the other kind says; the settings not given "
        "take their defaults; its state starts afresh); with --keep-state, change the "
        "settings given in place and keep the rest and its state",
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="change the settings given in the optimizer in place, as assigning to torch's "
        "param_groups does: the others keep their values, and its momentum buffers or "
        "Adam's moments stay (a learning rate lowered mid-training)",
    )
    p.add_argument(
        "--kind",
        choices=["sgd", "adam"],
        help="torch.optim.SGD or Adam (default: the kind a setting given belongs to, else the "
        "kind in place)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: 1.0 for SGD, as the tutorial; 0.001 for Adam)",
    )
    p.add_argument("--momentum", type=float, help="SGD's momentum (default 0)")
    p.add_argument("--weight-decay", type=float, help="L2 penalty (default 0)")
    p.add_argument("--beta1", type=float, help="Adam's first beta (default 0.9)")
    p.add_argument("--beta2", type=float, help="Adam's second beta (default 0.999)")
    p.add_argument("--eps", type=float, help="Adam's epsilon (default 1e-08)")
    p.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SGD with Nesterov momentum; --no-nesterov turns it off (with --keep-state)",
    )

    p = add("health", cmd_health, "ask the standard gRPC health check; exit 0 when SERVING")
    p.add_argument("--service", default="", help="service to ask about (default: the server)")

    p = add(
        "replay",
        cmd_replay,
        "replay the PyTorch tutorial over gRPC, printing what it computes; as the tutorial, it "
        "makes the model and the optimizer anew, replacing those of the session it acts on "
        "(the default one unless --session)",
    )
    p.add_argument(
        "--init",
        choices=["fill", "random"],
        default="fill",
        help="fill: every parameter 0.1, as the tutorial; "
        "random: PyTorch's default init after torch.manual_seed(--seed)",
    )
    p.add_argument("--seed", type=_seed, help="with --init random: the seed (default 0)")
    p.add_argument(
        "--embedded",
        action="store_true",
        help="start a server in this process on a free port (no --target)",
    )
    p.add_argument("--device", help="with --embedded: auto (the default), cpu, cuda or cuda:N")
    return parser


def _client(args: argparse.Namespace) -> Client:
    """A Client for the common options: target, timeout, token and TLS."""
    if bool(args.tls_cert) != bool(args.tls_key):  # gRPC's C core aborts on half a pair
        given = "--tls-cert" if args.tls_cert else "--tls-key"
        missing = "--tls-key" if args.tls_cert else "--tls-cert"
        raise UsageError(
            f"{given} without {missing}: mutual TLS needs the client's certificate "
            "(--tls-cert) and its private key (--tls-key); give both, or neither"
        )
    try:
        check_session(args.session, "--session")  # in the words of the command line
        return Client(
            args.target,
            timeout=args.timeout,
            token=load_token(args.token_file),
            tls=args.tls,
            ca=read_optional(args.tls_ca, "certificate", "--tls-ca"),
            cert=read_optional(args.tls_cert, "certificate", "--tls-cert"),
            key=read_optional(args.tls_key, "private key", "--tls-key"),
            session=args.session,
            keepalive=args.keepalive or None,
        )
    except (OSError, ValueError) as e:
        said = str(e)
        if getattr(args, "target_from_environment", False) and "target" in said:
            said += f" (the target came from ${TARGET_ENV})"
        if getattr(args, "session_from_environment", False) and "session" in said:
            said += f" (the session came from ${SESSION_ENV})"
        raise UsageError(said) from None


def _unreachable(error: RemoteError) -> bool:
    """Whether a call failed before reaching a server: nothing listening, or a plaintext call
    to a TLS port (gRPC's own words, as grpcio 1.85 has them)."""
    text = error.message.lower()
    return isinstance(error, Unavailable) and any(words in text for words in NEVER_REACHED)


#: Seconds a failed command waits to learn whether its channel ever connected: a connected
#: one says so at once.
READY_CHECK_S = 0.5


def _connected(client: Client) -> bool:
    """Whether the client's channel is connected: a server answered gRPC on it."""
    try:
        client.wait_ready(READY_CHECK_S)
    except Unavailable:
        return False
    return True


#: What a command on the server's files (not its state) that failed once its server had it
#: may have done all the same, for _connection_hint.
_ON_FILES = {
    "save": "; the checkpoint may have been written all the same (saving again replaces it)",
    "delete-checkpoint": "; the checkpoint may have been removed all the same (gradwire "
    "checkpoints shows whether it is there)",
}


def _connection_hint(args: argparse.Namespace, client: Client, error: RemoteError) -> str | None:
    """What to do about a call that never reached a gradwire server, from what the CLI can
    know: gRPC's words for the failure, the TLS options given and whether the channel ever
    connected. None for an error a server answered."""
    target = client.target
    tls = bool(args.tls or args.tls_ca or args.tls_cert)
    text = error.message.lower()
    # What the server may have done with a call that failed once it was reached: a command
    # reported as failed, then run again, would apply its change twice (found by a review).
    applied = (
        "; what this command asked may have been applied all the same (gradwire list shows "
        "the state version)"
        if error.changes_state
        else ""
    )
    if error.changes_state and args.command in _ON_FILES:  # the server's files, not its state
        applied = _ON_FILES[args.command]
    # A server that answered this command's earlier calls, or that its channel reached: gone
    # since, not never there (a stopped server's port refuses the retries that follow). A
    # stopping server cancels the calls it has taken in and not begun (CANCELLED), and cuts
    # its streams (UNAVAILABLE "Cancelling all calls"). Errors without a reason are gRPC's
    # own, not a gradwire server's (whose STOPPING and BUSY say what they are).
    reached = client.answered or client.reached
    if reached and isinstance(error, (Unavailable, Cancelled)) and not error.reason:
        seen = "answered earlier in this command" if client.answered else "was reached"
        return (
            f"the server at {target} {seen}, then stopped answering: it was stopped or "
            f"restarted, or the network to it went down (its log says which){applied}; "
            f"gradwire health --target {target} says when it is back"
        )
    if isinstance(error, DeadlineExceeded):
        if reached or _connected(client):  # the call took longer than --timeout
            if not applied:  # a read: nothing done, only the time to give (a review)
                if getattr(args, "duration", None) is not None:  # its own end, not --timeout
                    return None
                return (
                    f"no answer within --timeout {args.timeout:g}s: give this command a "
                    "longer --timeout"
                )
            look = "" if args.command in _ON_FILES else "look before running it again, and "
            return (
                f"no answer within --timeout {args.timeout:g}s, but the server may have run "
                f"the call after that{applied}: {look}give long calls a longer --timeout"
            )
        return (
            f"{target} did not answer as a gRPC server within {args.timeout:g}s (the "
            "connection never became ready): check that --target HOST:PORT names a gradwire "
            "server, not another program or a port a firewall drops"
        )
    if not _unreachable(error):
        return None
    if any(words in text for words in UNRESOLVED):
        return (
            f"{target} could not be resolved to an address: check the host name and the "
            "port in --target HOST:PORT (such as localhost:50051 or gpu-box:50051)"
        )
    if "parsing http/2" in text:  # a connection made, and answered in something else
        return (
            f"something that is not a gRPC server answers at {target} (a web server?): "
            "check the port in --target HOST:PORT"
        )
    if "certificate_verify_failed" in text and "certificate has expired" in text:
        # It said no server answered, and to start one (found by a review of deployment).
        return (
            f"{target} serves TLS with a certificate that has expired (or this machine's "
            "clock is wrong): the server needs a new one (gradwire serve --tls-cert, --tls-key)"
        )
    if "certificate_verify_failed" in text and (
        "local issuer" in text or "self signed" in text or "self-signed" in text
    ):
        signer = (
            f"the CA in {args.tls_ca}"
            if args.tls_ca
            else "any CA this machine trusts (--tls alone trusts the system's)"
        )
        return (
            f"{target} serves TLS with a certificate not signed by {signer}: pass --tls-ca "
            "with the CA that signed the server's certificate (PEM)"
        )
    if "hostname verification" in text:
        # It said no server answered, and to start one (found by an operator's walkthrough).
        host = target.rpartition(":")[0].strip("[]") or target
        return (
            f"{target} serves TLS with a certificate that does not name {host}: connect by a "
            "name the certificate holds (its subject alternative names), or give the server "
            f"a certificate that names {host}"
        )
    if "wrong_version_number" in text:  # the answer to TLS's first message was not TLS
        return (
            f"{target} does not answer in TLS: for a server without TLS, leave out --tls, "
            "--tls-ca, --tls-cert and --tls-key"
        )
    if args.tls_cert and "failed to create security handshaker" in text:
        # gRPC could not use the client's own pair (its log: "Invalid private key"); the
        # hint said no server answered, and to start one (found by a review of deployment).
        return (
            f"this client's TLS files could not be used together: is --tls-key "
            f"{args.tls_key} the private key that --tls-cert {args.tls_cert} was made with?"
        )
    if tls and "socket closed" in text:
        if args.tls_cert:
            # The server does not say why; an expired certificate was blamed on the CA.
            return (
                f"{target} closed the connection before it was ready: if it requires client "
                f"certificates, it refused {args.tls_cert}: one its client CA did not sign, "
                "or one that has expired or is not valid yet"
            )
        return (
            f"{target} closed the connection before it was ready: if it requires client "
            "certificates (mutual TLS), pass --tls-cert and --tls-key"
        )
    if tls:
        return (
            f"no gradwire server answered at {target}: start one (gradwire serve), or name "
            "yours with --target HOST:PORT"
        )
    return (
        f"no gradwire server answered at {target}: start one (gradwire serve), name yours "
        "with --target HOST:PORT, or add --tls if it serves TLS"
    )


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Runs one command; returns the exit code (0 ok, 1 remote error, 2 usage error)."""
    err = err or sys.stderr
    if out is None:
        if sys.stdout is None:  # `gradwire info >&-`: Python found no descriptor 1
            err.write("gradwire: error: the standard output is closed; send it somewhere "
                      "(> /dev/null to drop it)\n")  # fmt: skip
            return 1
        out = cast(TextIO, _Output(sys.stdout))
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    option = words[0].split("=", 1)[0] if words else ""
    if option in _AFTER_THE_COMMAND:
        # argparse took the option's value for the command: "invalid choice: 'gpu-box:50051'".
        err.write(
            f"gradwire: error: {option} goes after the command: gradwire COMMAND {option} ... "
            "(such as gradwire list --target HOST:PORT); gradwire -h lists the commands\n"
        )
        return 2
    # `serve --log-format json`: argparse's refusal of an option is the log's last line too,
    # as any other failed start's is (_errors_logged), not a usage in plain text after it.
    json_log = bool(words) and words[0] == "serve" and _asks_json_log(words)
    aside = io.StringIO()
    said: TextIO = aside if json_log else err
    try:
        # argparse prints usage, errors and --help itself: to this call's streams.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(said):
            args, extra = parser.parse_known_args(argv)
            if extra:
                # Refused by the command's parser, not the top one: its usage, its name
                # ("gradwire get: error: unrecognized arguments: --dtype float16"), where
                # argparse's own gave gradwire's usage (a newcomer's walkthrough).
                args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit:
        if json_log:
            _usage_error_logged(aside.getvalue(), err)
        return int(exit.code or 0)
    if json_log:
        err.write(aside.getvalue())
    if args.remote:
        _from_environment(args)
    hint = None  # for a remote error: what to do about it, when the CLI can tell
    try:
        if not args.remote or (args.command == "replay" and args.embedded):
            args.func(args, None, out)
        else:
            args.err = err  # for a command's word beside its output (_note_absent)
            with _client(args) as client:
                try:
                    args.func(args, client, out)
                except RemoteError as e:
                    hint = _connection_hint(args, client, e)  # before the channel closes
                    raise
    except (UsageError, SelectorError, codec.CodecError) as e:
        if not getattr(e, "logged", False):
            err.write(f"gradwire {args.command}: error: {e}\n")
        return 2
    except RemoteError as e:
        err.write(f"error: {e}\n")
        stale = getattr(args, "session_from_environment", False)  # a command that calls
        if hint is None and e.reason == "UNKNOWN_SESSION" and stale:
            # A stale export in the shell: nothing said where the id came from (a review).
            hint = (
                f"the session came from ${SESSION_ENV}, which names one closed or never "
                f"opened: unset it (unset {SESSION_ENV}), or export the id of one open now "
                "(gradwire sessions lists them)"
            )
        # Which server was reached matters to a hint about reaching it, a token or a
        # session, not to one about the order of calls (a newcomer's walkthrough found
        # "gradwire backward first ... (the target came from $GRADWIRE_TARGET)").
        about_the_server = True
        # A server that takes no sessions has none to list or close.
        no_sessions = e.reason == "TOO_MANY_SESSIONS" and e.metadata.get("max_sessions") == "0"
        if hint is None and not no_sessions:  # the server's words name RPCs; say the commands
            hint = _COMMAND_HINTS.get(e.reason)
            about_the_server = hint is None
        if (
            hint is None
            and e.reason == "BAD_TOKEN"
            and getattr(args, "token_file", None) is None
            and os.environ.get(TOKEN_ENV, "").strip()
        ):  # the error did not say where the wrong token came from (a review of the CLI)
            hint = (
                f"the token came from ${TOKEN_ENV}, which holds another server's or an old "
                f"one: export this server's (its --token-file), or give --token-file FILE"
            )
        if (
            hint is not None
            and about_the_server
            and getattr(args, "target_from_environment", False)
        ):
            hint += f" (the target came from ${TARGET_ENV})"
        if hint is not None:
            err.write(f"hint: {hint}\n")
        return 1
    except CommandError as e:
        if not e.logged:
            err.write(f"gradwire {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    except Interrupted:
        return 130  # stopped as asked, and the command has said where
    except BrokenPipeError:
        return BROKEN_PIPE  # the reader went away (`gradwire list | head -1`): nothing to say
    return 0


#: For errors whose message names the RPC or its argument to use ("pass retain_graph to
#: Backward", "close one (CloseSession)"), the command and option that do it (found by a
#: review of the CLI).
_COMMAND_HINTS = {
    "GRAPH_FREED": "gradwire forward again, or keep the graph with gradwire backward "
    "--retain-graph",
    "NO_GRADIENTS": "gradwire backward first; gradwire zero-grad removes the gradients, and "
    "zero-grad --zeros keeps them as zeros",
    "TOO_MANY_SESSIONS": "gradwire sessions lists them; gradwire close-session ID closes one",
}


def _from_environment(args: argparse.Namespace) -> None:
    """The target and session a command did not name, from $GRADWIRE_TARGET (else
    DEFAULT_TARGET) and $GRADWIRE_SESSION. `args.given` records which common options were
    given, and `args.target_from_environment` and `args.session_from_environment` where
    the others came from, for messages. Read here, not as argparse defaults, with which
    given and defaulted could not be told apart (an abbreviated --sess was taken for the
    environment's, found by a review)."""
    args.given = {name for name in _COMMON if getattr(args, name, None) not in (None, False)}
    target, session = os.environ.get(TARGET_ENV), os.environ.get(SESSION_ENV)
    args.target_from_environment = "target" not in args.given and bool(target)
    # close-session's ID names the session as --session does.
    named = "session" in args.given or getattr(args, "id", None) is not None
    args.session_from_environment = not named and bool(session)
    if "target" not in args.given:
        args.target = target or DEFAULT_TARGET
    if "session" not in args.given:
        args.session = session or None


#: Options of the commands, not of `gradwire` itself: written before the command, they are
#: refused saying where they go. Others (an abbreviated --help, a typo) are argparse's.
_AFTER_THE_COMMAND = frozenset(
    {
        "--target", "--timeout", "--json", "--keepalive", "--session", "--token-file", "--tls",
        "--tls-ca", "--tls-cert", "--tls-key", "--port", "--host", "--device", "--seed",
    }
)  # fmt: skip


#: The options every command that calls a server takes (build_parser's `common`) whose
#: absence means something: the environment's, or none.
_COMMON = ("target", "session", "token_file", "tls", "tls_ca", "tls_cert", "tls_key")


#: The exit code of a command whose output's reader went away: 128 + SIGPIPE, as the shell
#: reports a program that SIGPIPE ended.
BROKEN_PIPE = 141


def main_entry() -> None:
    code = main()
    unwritten = False  # output left that Python would try again to write at exit
    try:
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        code, unwritten = BROKEN_PIPE, True
    except OSError as e:  # the last of the output, to a full disk
        sys.stderr.write(f"gradwire: error: cannot write the output: {e.strerror or e}\n")
        code, unwritten = max(code, 1), True
    if code == BROKEN_PIPE or unwritten:
        # Python flushes stdout again at exit: send what is left nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if "torch" in sys.modules:
        # torch's teardown at the interpreter's exit (every operator it registered from
        # Python deregistered one by one, and collections over its objects) took 0.7-0.85 s
        # after `serve` logged "stopped", and gives back nothing that the exit does not. By
        # now the state is saved and synced, files are closed and stdout is flushed; the log
        # and stderr are flushed here. Then the process ends without that teardown.
        logging.shutdown()
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main_entry()
