"""Argument values: option types argparse calls (durations, seeds, ports, shapes, counts),
and the tensors a command line names (`ones:8,3,10,10`, `full:0.5:4`, a .npy file, a value
or a list of values).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradwire import codec, limits
from gradwire.cli.errors import UsageError
from gradwire.fill import Fill

SOURCE_HELP = (
    "ones:SHAPE, zeros:SHAPE, full:VALUE:SHAPE, uniform:SHAPE, normal:SHAPE, "
    "randint:HIGH:SHAPE (0 <= x < HIGH), each with an optional :DTYPE at the end "
    "(float32, float64, int64, ...); or a .npy file. SHAPE is comma-separated: 8,3,10,10"
)


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


def shape_option(text: str) -> tuple[int, ...]:
    """_shape as an option's type: argparse reports an ArgumentTypeError as a usage error
    (exit 2); any other exception escapes it as a traceback."""
    try:
        return _shape(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def duration(text: str) -> float:
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


def seed_value(text: str) -> int:
    """A seed as the wire carries it (uint64). Out of range, each --seed gave a traceback
    from protobuf or torch (found by a review of the CLI)."""
    try:
        return limits.check_seed(int(text))
    except ValueError:  # int()'s too
        raise argparse.ArgumentTypeError(
            f"bad seed {text!r}: expected a whole number from 0 to {limits.MAX_SEED}"
        ) from None


def client_keepalive(text: str) -> float:
    """A client's ping interval: 0 (no pings), or at least what a gradwire server takes.
    Closer, the server closed the connection ("too_many_pings"), ending a healthy watch
    with gRPC's own log line and a hint that blamed the network (found by a review)."""
    seconds = duration(text)
    if 0 < seconds < limits.MIN_CLIENT_PING_S:
        raise argparse.ArgumentTypeError(
            f"bad interval {text!r}: a gradwire server takes a ping every "
            f"{limits.MIN_CLIENT_PING_S:g} s at most and closes a connection pinged more "
            f"often: give {limits.MIN_CLIENT_PING_S:g} or more, or 0 for no pings"
        )
    return seconds


def _more_than_zero(text: str, parse: Callable[[str], float], also: str = "") -> float:
    """`parse(text)`, refused unless more than 0, with one message for every refusal (a
    duration's own range starts at 0); `also` ends it."""
    try:
        seconds = parse(text)
    except argparse.ArgumentTypeError:
        seconds = math.nan
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: expected seconds more than 0 (up to "
            f"{limits.MAX_GRPC_SECONDS:,}){also}"
        )
    return seconds


def positive_duration(text: str) -> float:
    """A duration that must be more than 0: a call's deadline, say. Refused, it gave the
    range of duration, which starts at 0 (found by a review of the CLI)."""
    return _more_than_zero(text, duration)


def _seconds_or_forever(text: str) -> float:
    """A duration that may be for ever: inf, or as duration."""
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    return duration(text)


def positive_duration_or_forever(text: str) -> float:
    """A duration that may be for ever (inf) and must be more than 0: a session's idle time,
    where 0 closed every session as soon as it was opened."""
    return _more_than_zero(text, _seconds_or_forever, ", or inf for never")


def file_path(text: str) -> Path:
    """A file or folder an option names. An empty name is refused: Path("") is ".", the
    working folder, and the command went on to name "." in its own error (`get --out ''`:
    "--out .: get --out writes a .npy file"; `serve --state-dir ''` kept checkpoints in ".")."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give the name of a file or folder")
    return Path(text)


def port_number(text: str) -> int:
    """A TCP port for an option: 0 (a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: expected 0 (a free one) to 65535")
    return port


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
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


def random_source(text: str) -> bool:
    """Whether a source, as parse_source reads it, draws random values (takes a seed)."""
    return not text.endswith(".npy") and text.split(":")[0] in ("uniform", "normal", "randint")


#: The kinds of source parse_source reads.
_SOURCE_KINDS = ("ones", "zeros", "full", "uniform", "normal", "randint")


def names_a_source(text: str) -> bool:
    """Whether `text` (given as --target) is a source as parse_source reads it, and no
    host:port: a .npy file, or a kind with a shape of more than one dimension, a second part
    or a :DTYPE (`ones:8` and `ones`, a host named ones, stay targets)."""
    kind, colon, rest = text.partition(":")
    return text.endswith(".npy") or (
        kind in _SOURCE_KINDS and bool(colon) and (":" in rest or "," in rest or not rest)
    )


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


def fill_value(text: str) -> float:
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
    fractions, until `narrowed` puts them in the tensor's dtype. A number no float holds
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
    except RecursionError:  # a thousand lists deep: a traceback (found by a review)
        raise UsageError(_TOO_DEEP.format(text[:40])) from None
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
    if _depth(value) > codec.MAX_DIMS:  # numpy's own refusal read as ragged lists below
        raise UsageError(_TOO_DEEP.format(text[:40]))
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


_TOO_DEEP = (
    f"bad value {{!r}}...: lists more than {codec.MAX_DIMS} deep, where a tensor has at most "
    f"{codec.MAX_DIMS} dimensions"
)


def _depth(value: Any) -> int:
    """How deep `value`'s first elements nest lists: the dimensions it would make."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


def narrowed(array: np.ndarray[Any, Any], text: str, dtype: str | None) -> Any:
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
