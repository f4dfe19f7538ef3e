"""Parse what people type (`conv1.weight.grad[0][0][0]`, `output[0, :, 1:3]`) into name and index.

Python's own parser reads the brackets, so every form Python accepts for basic indexing
(negative numbers, empty slice bounds, steps, `...`, `None`) reads the same way here.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from typing import Any

from gradwire.codec import INT64_MAX, INT64_MIN, IndexItem, format_index
from gradwire.errors import GradwireError

__all__ = ["Selector", "SelectorError", "parse_selector"]

#: Dotted parts, each of any characters but dots, brackets and control characters, as
#: PyTorch names modules: an nn.Sequential's layers "0", "1", ... ("0.weight"), and a
#: ModuleDict's keys as given, "blocks.in-proj.weight", which a pattern of letters, digits
#: and "_" refused, so that such a model's parameters could not be read (found by a
#: walkthrough as a researcher).
_PART = r"[^.\[\]\x00-\x1f\x7f-\x9f]+"
_NAME = re.compile(rf"{_PART}(\.{_PART})*")


#: The longest selector taken: more than any index of MAX_DIMS dimensions needs. Longer
#: ones were parsed whole, and their errors quoted them whole (a 100,000-character
#: selector made a 200 KB message).
MAX_SELECTOR_CHARS = 1024


class SelectorError(GradwireError, ValueError):
    """Text that is not `name` or `name[...]...` with basic indexing."""


@dataclass(frozen=True)
class Selector:
    """A tensor name and the chain of index keys applied to it, in order."""

    name: str
    index: tuple[tuple[IndexItem, ...], ...] = field(default=())

    def __str__(self) -> str:
        return self.name + format_index(self.index)


def _integer(node: ast.expr, text: str) -> int | None:
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _integer(node.operand, text)
        if inner is None:
            raise SelectorError(f"{text!r}: a sign needs a number after it")
        return -inner if isinstance(node.op, ast.USub) else inner
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int)
        and not isinstance(node.value, bool)
    ):
        return node.value
    raise SelectorError(f"{text!r}: {ast.unparse(node)!r} is not an integer")


def _in_range(value: int | None, text: str) -> int | None:
    """`value`, which an Index message carries as an int64: protobuf raised its own
    ValueError ("Value out of range") for one outside that range."""
    if value is not None and not INT64_MIN <= value <= INT64_MAX:
        raise SelectorError(
            f"{text!r}: index {value} is outside the range of an index, int64's: "
            f"{INT64_MIN} to {INT64_MAX}"
        )
    return value


def _item(node: ast.expr, text: str) -> IndexItem:
    if isinstance(node, ast.Slice):
        # Bounds past int64 are clipped as the index is sent, as numpy clips them.
        parts: list[int | None] = [
            None if part is None else _integer(part, text)
            for part in (node.lower, node.upper, node.step)
        ]
        if parts[2] == 0:
            raise SelectorError(f"{text!r}: slice step cannot be zero")
        return slice(*parts)
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return Ellipsis
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.Name) and node.id == "newaxis":
        return None
    value = _in_range(_integer(node, text), text)
    if value is None:  # pragma: no cover - None constants are caught above
        return None
    return value


def parse_selector(text: str) -> Selector:
    """`"conv1.weight.grad[0][0][0]"` -> Selector("conv1.weight.grad", ((0,), (0,), (0,))).
    Anything but a str raises TypeError (get(123) raised "'int' object has no attribute
    'strip'", a list "unhashable type")."""
    if not isinstance(text, str):
        view = getattr(text, "selector", None)
        # A remote view's repr reads its values from the server: a whole weight was read
        # to be printed in this error, which named no way out (found by a review of the
        # client's API as a researcher uses it).
        got = (
            f"a remote view: give its selector, {view!r} (view.selector)"
            if isinstance(view, str)
            else f"{type(text).__name__} {text!r}"
        )
        raise TypeError(
            "a selector is a str naming a tensor, with an index if you like, such as "
            f"'conv1.weight[0]' or 'loss'; got {got}"
        )
    start = f"{text[:60]!r}{'...' if len(text) > 60 else ''}"
    if len(text) > MAX_SELECTOR_CHARS:
        raise SelectorError(
            f"{start}: a selector of {len(text):,} characters; at most "
            f"{MAX_SELECTOR_CHARS:,} are taken"
        )
    try:
        return _parse(text)
    except RecursionError:  # "[----1]", or 300 keys: Python's parser, or ours, went too deep
        raise SelectorError(
            f"{start}: the index is nested too deeply to be read (signs or brackets by the hundred)"
        ) from None


@functools.lru_cache(maxsize=1024)  # selectors repeat in loops; parsing them is not free
def _parse(text: str) -> Selector:
    text = text.strip()
    bracket = text.find("[")
    name = text if bracket < 0 else text[:bracket].strip()
    if not _NAME.fullmatch(name):
        raise SelectorError(
            f"{text!r}: expected a tensor name such as 'conv1.weight.grad', "
            "optionally followed by an index such as '[0][0][0]' or '[0, :, 1:3]'"
        )
    if bracket < 0:
        return Selector(name)
    try:
        tree: Any = ast.parse("_" + text[bracket:], mode="eval").body
    except SyntaxError as err:
        # (Python's own limit, 4,301 digits, lies past MAX_SELECTOR_CHARS.)
        raise SelectorError(f"{text!r}: the index is not valid Python: {err.msg}") from None
    keys: list[tuple[IndexItem, ...]] = []
    while isinstance(tree, ast.Subscript):
        node = tree.slice
        elements = node.elts if isinstance(node, ast.Tuple) else [node]
        keys.append(tuple(_item(element, text) for element in elements))
        tree = tree.value
    if not (isinstance(tree, ast.Name) and tree.id == "_"):
        raise SelectorError(f"{text!r}: only [...] may follow the name")
    keys.reverse()
    for key in keys:
        if sum(item is Ellipsis for item in key) > 1:
            raise SelectorError(f"{text!r}: an index can only have a single ellipsis ('...')")
    return Selector(name, tuple(keys))
