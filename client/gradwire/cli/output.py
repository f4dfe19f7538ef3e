"""What a command writes: text, or one JSON object a line with --json, to a standard output
whose errors say what failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from gradwire.cli.errors import CommandError

#: The most characters written at once: at 4 bytes each in UTF-8, within the 8,192 bytes of
#: Python's write buffer (io.DEFAULT_BUFFER_SIZE), so that every write goes through it.
_PIECE = 2048


class Output:
    """The standard output a command writes to, whose errors say what failed: writing to a
    full disk (`gradwire list > /dev/full`) ended in a traceback (found by a review of the
    CLI). A reader gone away stays a BrokenPipeError, which ends a command quietly."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with self._failing():
            if len(text) <= _PIECE:
                return self._stream.write(text)
            # In pieces: Python's buffered writer hands a write larger than its buffer to
            # the pipe whole, and when the pipe's reader left part-way (`gradwire get W
            # --json | head -c 10`), it dropped the rest and raised nothing, so the command
            # exited 0, not 141 (found by a review of the CLI).
            for start in range(0, len(text), _PIECE):
                self._stream.write(text[start : start + _PIECE])
            return len(text)

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


def jsonable(value: Any) -> Any:
    """A tensor's values as nested lists; `json_line` spells those that are not finite.
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


def json_line(data: Any) -> str:
    """One line of strict JSON, which every parser reads (Python's json writes bare NaN)."""
    return json.dumps(_finite(data), allow_nan=False) + "\n"


#: Values a `get --json` line's list is written in at once: a whole tensor's list, made and
#: then copied for its non-finite values, took 11 times a 1 GiB tensor's size.
VALUES_AT_ONCE = 1 << 16


def json_line_with_values(out: TextIO, data: dict[str, Any], values: Any) -> None:
    """`json_line(data)` with a last key "values" holding `values` (an array) as nested
    lists, the same text, written a piece at a time: a `gradwire get --json` of a 1 GiB
    tensor took 11.7 GB as one list (a review of serving a big model)."""
    head = json.dumps(_finite(data), allow_nan=False)
    out.write(head[:-1] + (', "values": ' if data else '"values": '))
    if values is None:
        out.write("null")
    else:
        _write_values(out, np.asarray(values))
    out.write("}\n")


def _write_values(out: TextIO, array: np.ndarray[Any, Any]) -> None:
    """`array` as nested JSON lists: runs of its first axis of about VALUES_AT_ONCE values
    each as one list, a row larger than that a piece at a time. Row by row, a tensor of a
    million short rows took twice as long as one list (a review of the change)."""
    if array.ndim == 0:
        out.write(json.dumps(_finite(array.item()), allow_nan=False))
        return
    row = array[0].size if len(array) else 1
    if array.ndim > 1 and row > VALUES_AT_ONCE:  # each row alone is too large a list
        out.write("[")
        for i, each in enumerate(array):
            out.write(", " if i else "")
            _write_values(out, each)
        out.write("]")
        return
    rows = max(VALUES_AT_ONCE // max(row, 1), 1)
    out.write("[")
    for start in range(0, len(array), rows):
        piece = array[start : start + rows].tolist()
        out.write((", " if start else "") + json.dumps(_finite(piece), allow_nan=False)[1:-1])
    out.write("]")


def emit(out: TextIO, args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        out.write(json_line(data))
    else:
        out.write(text + "\n")
