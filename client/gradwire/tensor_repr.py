"""PyTorch's repr of a tensor, `tensor([0.1000, 0.2000])`, made from a numpy array without
importing torch.

The command line prints what it reads as PyTorch prints it, so that a remote run reads as a
local one (and the tutorial's replay as the tutorial). Importing torch for its repr cost every
`gradwire get` about a second, and a client without torch printed numpy's rounding instead.
This follows torch/_tensor_str.py (torch 2.x) for dense tensors of the dtypes the wire carries
under torch's default print options (precision 4, threshold 1000, edge items 3, line width
80); tests/test_tensor_repr.py checks it against torch's own repr over 947 tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PRECISION = 4
#: Tensors of more elements than this are summarised: their first and last EDGEITEMS rows.
THRESHOLD = 1000
EDGEITEMS = 3
LINEWIDTH = 80
_PREFIX = "tensor("
#: torch's default dtypes, which its repr does not name: float32 (torch.get_default_dtype())
#: and those a tensor of Python ints or bools has.
_UNNAMED = frozenset({"float32", "int64", "bool"})
_FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})


def tensor_repr(
    array: Any,
    dtype: str | None = None,
    *,
    device: str = "",
    grad_fn: str = "",
    requires_grad: bool = False,
) -> str:
    """repr() of the torch tensor of dtype `dtype` (a torch dtype's name: "bfloat16",
    "int32"; default: the array's own) holding `array`'s values: a bfloat16 tensor's values
    come as float32, which holds each exactly. `device`, a device other than the CPU
    ("cuda:0"), is named first after the values, as torch names it; `grad_fn`, the name of
    the node that made the tensor, ends it with `grad_fn=<...>`; else `requires_grad` with
    `requires_grad=True`, as torch's repr of a leaf that requires grad."""
    values = np.asarray(array)
    name = dtype or values.dtype.name
    suffixes = [f"device='{device}'"] if device else []
    if values.size == 0:
        # torch shows an empty tensor's shape when it is not (0,), and its dtype unless it is
        # the default: there are no values to tell it by.
        if values.ndim != 1:
            suffixes.append(f"size={tuple(values.shape)}")
        if name != "float32":
            suffixes.append(f"dtype=torch.{name}")
        body = "[]"
    else:
        if name not in _UNNAMED:
            suffixes.append(f"dtype=torch.{name}")
        body = _tensor_str(values, len(_PREFIX), name in _FLOATING)
    if grad_fn:
        suffixes.append(f"grad_fn=<{grad_fn}>")
    elif requires_grad:
        suffixes.append("requires_grad=True")
    return _add_suffixes(_PREFIX + body, suffixes, len(_PREFIX))


class _Formatter:
    """torch's _Formatter: one width for every element, and how floats are written (as
    integers with a point, in fixed or in scientific notation), chosen from the values."""

    def __init__(self, values: np.ndarray[Any, Any], floating: bool) -> None:
        self.floating = floating
        self.int_mode = True
        self.sci_mode = False
        self.max_width = 1
        flat = values.reshape(-1)
        if not floating:
            self.max_width = max([1, *(len(str(v)) for v in flat.tolist())])
            return
        shown = flat[np.isfinite(flat) & (flat != 0)]
        if shown.size == 0:
            return
        magnitudes = np.abs(shown.astype(np.float64))
        low, high = float(magnitudes.min()), float(magnitudes.max())
        self.int_mode = bool(np.all(shown == np.ceil(shown)))
        self.sci_mode = high / low > 1000.0 or high > 1.0e8 or low < 1.0e-4
        numbers = shown.tolist()
        if self.sci_mode:
            self.max_width = max(len(f"{v:.{PRECISION}e}") for v in numbers)
        elif self.int_mode:
            self.max_width = max(len(f"{v:.0f}") + 1 for v in numbers)
        else:
            self.max_width = max(len(f"{v:.{PRECISION}f}") for v in numbers)
        self.max_width = max(self.max_width, 1)

    def format(self, value: Any) -> str:
        if not self.floating:
            text = f"{value}"
        elif self.sci_mode:
            text = f"{value:{self.max_width}.{PRECISION}e}"
        elif self.int_mode:
            text = f"{value:.0f}"
            if not (math.isinf(value) or math.isnan(value)):
                text += "."
        else:
            text = f"{value:.{PRECISION}f}"
        return (self.max_width - len(text)) * " " + text


def _summarised(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The values a summarised tensor shows (torch's get_summarized_data), flat: only which
    values they are matters to the formatter."""
    if values.ndim == 0:
        return values.reshape(-1)
    if values.shape[0] > 2 * EDGEITEMS:
        rows = [*values[:EDGEITEMS], *values[-EDGEITEMS:]]
    else:
        rows = list(values)
    if values.ndim == 1:
        return np.asarray(rows, dtype=values.dtype)
    parts = [_summarised(row) for row in rows]
    return np.concatenate(parts) if parts else values.reshape(-1)[:0]


def _tensor_str(values: np.ndarray[Any, Any], indent: int, floating: bool) -> str:
    summarize = values.size > THRESHOLD
    formatter = _Formatter(_summarised(values) if summarize else values, floating)
    return _with_formatter(values, indent, summarize, formatter)


def _with_formatter(
    values: np.ndarray[Any, Any], indent: int, summarize: bool, formatter: _Formatter
) -> str:
    if values.ndim == 0:
        return formatter.format(values.item())
    if values.ndim == 1:
        return _vector_str(values, indent, summarize, formatter)
    if summarize and values.shape[0] > 2 * EDGEITEMS:
        rows = [*range(EDGEITEMS), None, *range(len(values) - EDGEITEMS, len(values))]
    else:
        rows = list(range(values.shape[0]))
    slices = [
        "..." if i is None else _with_formatter(values[i], indent + 1, summarize, formatter)
        for i in rows
    ]
    joiner = "," + "\n" * (values.ndim - 1) + " " * (indent + 1)
    return "[" + joiner.join(slices) + "]"


def _vector_str(
    values: np.ndarray[Any, Any], indent: int, summarize: bool, formatter: _Formatter
) -> str:
    element_length = formatter.max_width + 2  # with the comma and space after each
    per_line = max(1, math.floor((LINEWIDTH - indent) / element_length))
    if summarize and values.shape[0] > 2 * EDGEITEMS:
        data = [
            *(formatter.format(v) for v in values[:EDGEITEMS].tolist()),
            " ...",
            *(formatter.format(v) for v in values[-EDGEITEMS:].tolist()),
        ]
    else:
        data = [formatter.format(v) for v in values.tolist()]
    lines = [", ".join(data[i : i + per_line]) for i in range(0, len(data), per_line)]
    return "[" + ("," + "\n" + " " * (indent + 1)).join(lines) + "]"


def _add_suffixes(text: str, suffixes: list[str], indent: int) -> str:
    """`dtype=...`, `size=...` and `grad_fn=<...>` after the values, on a line of their own
    where the last line has no room, as torch's _add_suffixes."""
    parts = [text]
    last_line_len = len(text) - text.rfind("\n") + 1
    for suffix in suffixes:
        if last_line_len + len(suffix) + 2 > LINEWIDTH:
            parts.append(",\n" + " " * indent + suffix)
            last_line_len = indent + len(suffix)
        else:
            parts.append(", " + suffix)
            last_line_len += len(suffix) + 2
    parts.append(")")
    return "".join(parts)
