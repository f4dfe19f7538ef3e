"""Protobuf wire format for the tensor fast path: tensor values are copied once, never walked.

Writing: a message is serialized without its tensor values, and each value field is spliced
in as a tag, a length and the array's own memory (`Piece`s, joined once). Protobuf parsers
accept fields in any order, so the result is an ordinary message to every reader.

Reading: `split` scans a received message and cuts every Tensor's packed value field out of
it, uncopied, parsing the rest as the ordinary message. A value field in any other valid
encoding (not packed, or in several runs) stays in the message for the ordinary parser.
No torch and no numpy here: codec.py turns the cut fields into arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from gradwire._pb import trainer_pb2 as pb

__all__ = [
    "LEN",
    "Path",
    "Piece",
    "Split",
    "alignment",
    "fields",
    "holds_tensors",
    "join",
    "length_field",
    "split",
    "varint",
]

M = TypeVar("M", bound=Message)
#: A part of a message being written: bytes, or a view of an array's memory.
Piece = bytes | memoryview
#: Where a Tensor sits in a message: (field number, occurrence) for each level down.
Path = tuple[tuple[int, int], ...]

_LEN = 2  # wire type of length-delimited fields
#: The wire type of length-delimited fields (bytes, strings, messages, packed values).
LEN = _LEN
#: Below this size, `split` leaves a message to the ordinary parser: copying a few values
#: costs less than scanning for them in Python.
SMALL_MESSAGE_BYTES = 16 * 1024
_TENSOR = pb.Tensor.DESCRIPTOR
# Value fields read in place. Bools stay with the ordinary parser: a packed bool may be
# any varint, not only the bytes 0 and 1 that numpy reads.
_CUT_NUMBERS = frozenset(
    f.number for f in _TENSOR.fields if f.name.endswith("_values") and f.name != "bool_values"
)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def size(pieces: Sequence[Piece]) -> int:
    """The bytes the pieces hold."""
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)


def length_field(number: int, pieces: Sequence[Piece]) -> list[Piece]:
    """A length-delimited field holding `pieces`: its tag and length, then the pieces."""
    return [varint(number << 3 | _LEN) + varint(size(pieces)), *pieces]


#: Where the server puts a read's values: a multiple of this many bytes after the first byte
#: of the reply that carries them (a GetTensorResponse or GetTensorChunk; for TrainStep's
#: fetched tensors and Watch's values, the whole TrainStepResponse or WatchUpdate), the size
#: of the largest value (float64, int64). CPython keeps a bytes object's data 32 bytes into a
#: 16-aligned block, so the client's arrays in place are aligned too. numpy and BLAS are
#: slower on unaligned arrays: over 16 MiB, a sum took twice as long, a dot product 4
#: (float32) to 20 (float64) times as long (docs/performance-history.md, "The twelfth
#: session").
ALIGNMENT = 8


def _to_array(pieces: Sequence[Piece]) -> int | None:
    """Bytes ahead of the first array piece (a memoryview); None when there is none, or when
    its values are single bytes (bools), which sit as well at any address."""
    at = 0
    for piece in pieces:
        if isinstance(piece, memoryview):
            # The pieces are byte views (cast "B") of an array: its own item size is the one
            # that matters.
            return at if getattr(piece.obj, "itemsize", ALIGNMENT) > 1 else None
        at += len(piece)
    return None


def _padding(number: int, size: int) -> list[Piece]:
    """A bytes field `number` (at most 15: a one-byte tag) of zeros, `size` bytes in all: 0,
    or 2 and more (its tag and length take two)."""
    return [bytes((number << 3 | _LEN, size - 2)) + bytes(size - 2)] if size else []


#: The sizes a padding field can take, smallest first: every remainder modulo ALIGNMENT.
_GAPS = (0, *range(2, 2 + ALIGNMENT))


def alignment(number: int, before: int) -> list[Piece]:
    """A bytes field `number` (at most 15) that brings `before` bytes to a multiple of
    ALIGNMENT: what goes ahead of them; nothing when they are one already."""
    return _padding(number, next(g for g in _GAPS if (before + g) % ALIGNMENT == 0))


def aligned(number: int, before: int, pieces: Sequence[Piece]) -> list[Piece]:
    """`pieces`, the rest of a message that has `before` bytes ahead of them, led by a bytes
    field `number` as long as it takes to make the first array piece start at a multiple of
    ALIGNMENT. Unchanged when no piece is an array of values wider than a byte, or the array
    starts aligned already."""
    into = _to_array(pieces)
    if into is None:
        return list(pieces)
    gap = next(g for g in _GAPS if (before + g + into) % ALIGNMENT == 0)
    return [*_padding(number, gap), *pieces]


def aligned_field(number: int, padding: int, at: int, pieces: Sequence[Piece]) -> list[Piece]:
    """`length_field(number, pieces)` for a field that starts `at` bytes into its message, with
    a bytes field `padding` after the first piece (the inner message's header) as long as it
    takes to make the first array piece start at a multiple of ALIGNMENT from the outer
    message's first byte.

    The padding's size counts in the field's length, whose varint may take one more byte
    from some size on. Sizes are tried in turn, 0 and then 2 to 2 + 2 * ALIGNMENT - 1: the
    varint grows at most once in that run (its steps are 128 times apart), so one side of
    that point holds ALIGNMENT consecutive sizes, one for every remainder."""
    into = _to_array(pieces[1:])
    if into is None:
        return length_field(number, pieces)
    head, length, tag = pieces[0], size(pieces), varint(number << 3 | _LEN)
    for gap in (0, *range(2, 2 + 2 * ALIGNMENT)):
        prefix = tag + varint(length + gap)
        if (at + len(prefix) + len(head) + gap + into) % ALIGNMENT == 0:
            return [prefix, head, *_padding(padding, gap), *pieces[1:]]
    raise AssertionError("unreachable: a full round of sizes covers every remainder")


def join(pieces: Sequence[Piece]) -> bytes:
    """The message as one bytes object: the only copy of the tensor values on the way out."""
    return b"".join(pieces)


# --- reading --------------------------------------------------------------------------


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
            value_start = pos
        elif wire_type == 1:
            value_start, pos = pos, pos + 8
        elif wire_type == _LEN:
            size, value_start = _read_varint(buf, pos)
            pos = value_start + size
        elif wire_type == 5:
            value_start, pos = pos, pos + 4
        elif wire_type in (3, 4):
            # A group: no gradwire field is one, but an unknown field may be (a sender on a
            # newer or other schema), and the parser keeps unknown fields. Refused here, a
            # valid message of 16 KiB or more was answered MALFORMED_REQUEST.
            raise _LeftToParser
        else:
            raise ValueError(f"wire type {wire_type} does not exist")
        if pos > end:
            raise ValueError("field runs past the end of its message")
        yield number, wire_type, first, value_start, pos


def fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field in
    buf[start:end]; ValueError for bytes that are no message, or hold a group."""
    try:
        yield from _fields(buf, start, end)
    except _LeftToParser:
        raise ValueError("a group field, which no gradwire message has") from None


@cache
def _tensor_fields(descriptor: Descriptor) -> dict[int, bool]:
    """Fields of a message type that hold Tensors, directly (True) or further down (False)."""
    found: dict[int, bool] = {}
    for f in descriptor.fields:
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if f.message_type is _TENSOR:
            found[f.number] = True
        elif _tensor_fields(f.message_type):  # gradwire has no recursive messages
            found[f.number] = False
    return found


class _LeftToParser(Exception):
    """A message the fast path leaves to protobuf's parser whole: a singular field that
    occurs more than once (the parser merges its parts), or a group (an unknown field)."""


def holds_tensors(message_type: type[Message]) -> bool:
    """Whether messages of this type can carry Tensors, and so are worth `split`ting."""
    return bool(_tensor_fields(message_type.DESCRIPTOR))


@dataclass
class Split(Generic[M]):
    """A received message with each Tensor's value field cut out of it, uncopied.

    `cut` maps a Tensor's path to (value field number, the field's bytes as a view of the
    received data); `codec.decode_split` turns them into arrays.
    """

    message: M
    cut: dict[Path, tuple[int, memoryview]] = field(default_factory=dict)


def _cut_tensor(
    buf: memoryview, start: int, end: int, path: Path, cut: dict[Path, tuple[int, memoryview]]
) -> list[Piece]:
    fields = list(_fields(buf, start, end))
    runs = [f for f in fields if f[0] in _CUT_NUMBERS]
    if len(runs) != 1 or runs[0][1] != _LEN:
        # No values, or values in another valid encoding: the ordinary parser reads them.
        return [buf[start:end]]
    number, _, first, value_start, value_end = runs[0]
    cut[path] = (number, buf[value_start:value_end])
    return [buf[f[2] : f[4]] for f in fields if f[2] != first]


def _cut(
    buf: memoryview,
    start: int,
    end: int,
    descriptor: Any,
    path: Path,
    cut: dict[Path, tuple[int, memoryview]],
) -> list[Piece]:
    holders = _tensor_fields(descriptor)
    if not holders:
        return [buf[start:end]]
    rest: list[Piece] = []
    seen: dict[int, int] = {}
    for number, wire_type, first, value_start, value_end in _fields(buf, start, end):
        direct = holders.get(number)
        if direct is None or wire_type != _LEN:
            rest.append(buf[first:value_end])
            continue
        occurrence = seen.get(number, 0)
        seen[number] = occurrence + 1
        repeated = descriptor.fields_by_number[number].is_repeated
        if occurrence and not repeated:
            raise _LeftToParser  # a singular message sent in parts: the parser merges them
        here = (*path, (number, occurrence))
        if direct:
            inner = _cut_tensor(buf, value_start, value_end, here, cut)
        else:
            sub = descriptor.fields_by_number[number].message_type
            inner = _cut(buf, value_start, value_end, sub, here, cut)
        rest.extend(length_field(number, inner))
    return rest


def split(data: bytes | memoryview, message_type: type[M]) -> Split[M]:
    """Parses `data` as `message_type`, each Tensor's packed values cut out uncopied.

    Raises google.protobuf.message.DecodeError for data that is not such a message. `data`:
    bytes, or a view of bytes (one call of a Batch's request).
    """
    whole = cast(bytes, data)  # protobuf's parser (upb) takes any buffer
    if len(data) < SMALL_MESSAGE_BYTES:
        return Split(message_type.FromString(whole))  # too small for scanning to pay
    buf = memoryview(data)
    cut: dict[Path, tuple[int, memoryview]] = {}
    try:
        rest = _cut(buf, 0, len(buf), message_type.DESCRIPTOR, (), cut)
    except _LeftToParser:
        return Split(message_type.FromString(whole))
    except ValueError as err:
        raise DecodeError(f"not a {message_type.DESCRIPTOR.name}: {err}") from err
    if not cut:
        return Split(message_type.FromString(whole))
    return Split(message_type.FromString(join(rest)), cut)
