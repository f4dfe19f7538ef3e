"""Tensors and indices to protobuf messages and back: numpy (and torch, when present) <-> wire.

No grpc here. Values never pass through a per-element Python loop. A packed fixed-width
field's wire bytes are the little-endian array itself, so encoding splices the array's
memory into the message (wire.py) and decoding views the received bytes as an array.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import numpy as np

from gradwire import wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.errors import GradwireError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_NAMES",
    "Assembler",
    "CodecError",
    "IndexKey",
    "chunk_pieces",
    "chunks",
    "decode",
    "decode_split",
    "decode_split_torch",
    "decode_torch",
    "encode",
    "encode_bytes",
    "format_index",
    "host_array",
    "index_from_proto",
    "index_to_proto",
    "indices_from_proto",
    "indices_to_proto",
    "numel",
    "sent_as",
    "tensor_pieces",
    "widened",
]


class CodecError(GradwireError, ValueError):
    """A tensor or index message that cannot be encoded or decoded, with the reason."""


@dataclass(frozen=True)
class _WireType:
    field: str  # the Tensor field that carries the values
    numpy: np.dtype[Any]  # the little-endian numpy dtype of those values on the wire
    torch_name: str  # attribute of the torch module


_WIRE: Final[dict[int, _WireType]] = {
    pb.DTYPE_FLOAT32: _WireType("float_values", np.dtype("<f4"), "float32"),
    pb.DTYPE_FLOAT64: _WireType("double_values", np.dtype("<f8"), "float64"),
    pb.DTYPE_FLOAT16: _WireType("raw_values", np.dtype("<f2"), "float16"),
    pb.DTYPE_BFLOAT16: _WireType("raw_values", np.dtype("<u2"), "bfloat16"),
    pb.DTYPE_INT32: _WireType("int32_values", np.dtype("<i4"), "int32"),
    pb.DTYPE_INT64: _WireType("int64_values", np.dtype("<i8"), "int64"),
    pb.DTYPE_BOOL: _WireType("bool_values", np.dtype("?"), "bool"),
}
_VALUE_FIELDS: Final = tuple(sorted({w.field for w in _WIRE.values()}))
_NUMBER: Final = {f: pb.Tensor.DESCRIPTOR.fields_by_name[f].number for f in _VALUE_FIELDS}
_FIELD_NAME: Final = {number: f for f, number in _NUMBER.items()}
_CHUNK_VALUES: Final = pb.TensorChunk.DESCRIPTOR.fields_by_name["values"].number

#: "float32", "bfloat16", ... by DType number: the names PyTorch and numpy use.
DTYPE_NAMES: Final[dict[int, str]] = {k: w.torch_name for k, w in _WIRE.items()}
_DTYPE_BY_NAME: Final = {w.torch_name: k for k, w in _WIRE.items()}

# numpy dtypes without a wire type of their own, widened without loss.
_WIDENED: Final[dict[np.dtype[Any], np.dtype[Any]]] = {
    np.dtype("int8"): np.dtype("<i4"),
    np.dtype("uint8"): np.dtype("<i4"),
    np.dtype("int16"): np.dtype("<i4"),
    np.dtype("uint16"): np.dtype("<i4"),
    np.dtype("uint32"): np.dtype("<i8"),
}
_NUMPY_TO_DTYPE: Final = {
    np.dtype("float32"): pb.DTYPE_FLOAT32,
    np.dtype("float64"): pb.DTYPE_FLOAT64,
    np.dtype("float16"): pb.DTYPE_FLOAT16,
    np.dtype("int32"): pb.DTYPE_INT32,
    np.dtype("int64"): pb.DTYPE_INT64,
    np.dtype("bool"): pb.DTYPE_BOOL,
}


def sent_as(name: str) -> str | None:
    """The wire dtype a tensor of dtype `name` ("uint8", "float32": numpy's or torch's
    names) travels as: its own, or the one it is widened to; None for one the wire cannot
    carry (complex, float8)."""
    if name in _DTYPE_BY_NAME:
        return name
    try:
        wide = _WIDENED.get(np.dtype(name))
    except TypeError:  # a name numpy does not know: float8_e4m3fn, say
        return None
    return None if wide is None else str(wide.newbyteorder("="))


def widened(value: Any) -> tuple[str, str] | None:
    """(the dtype given, the dtype sent) for a value that travels widened: int8, uint8,
    int16 and uint16 have no wire type and are sent as int32, uint32 as int64 (host_array),
    so that the server, seeing int32, names a dtype the caller never sent. None for a value
    sent in its own dtype."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    try:
        given = np.dtype(str(dtype).removeprefix("torch."))  # torch.int8 too
    except TypeError:
        return None
    wide = _WIDENED.get(given.newbyteorder("="))
    return None if wide is None else (str(given), str(wide.newbyteorder("=")))


_LITTLE_ENDIAN: Final = sys.byteorder == "little"

#: numpy's (and torch's) limit on the dimensions of an array.
MAX_DIMS = 64


def numel(shape: Iterable[int]) -> int:
    """Elements in a tensor of this shape (1 for a 0-d tensor); exact, never overflows."""
    return math.prod(int(d) for d in shape)


def dtype_from_name(name: str) -> int:
    """The DType number for "float32", "bfloat16", ...; CodecError for others."""
    try:
        return _DTYPE_BY_NAME[name]
    except KeyError:
        raise CodecError(
            f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPE_BY_NAME))}"
        ) from None


def _torch_module() -> Any:
    # torch is optional on the client: only look at it if the caller already imported it.
    return sys.modules.get("torch")


def _is_torch_tensor(value: object) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(value, torch.Tensor)


def host_array(value: Any) -> tuple[int, np.ndarray[Any, Any]]:
    """(DType, C-contiguous little-endian array of the wire's element type) for a value.

    Makes no copy when the value already is one (a contiguous float32 array, say).
    """
    if _is_torch_tensor(value):
        torch = _torch_module()
        # Only the calls needed: each torch op lets go of the GIL, and in a busy server
        # getting it back costs more than the op (a read of 3 values made 6 such calls).
        tensor = value.detach() if value.requires_grad else value
        if tensor.is_nested:  # torch raised "Internal error: NestedTensorImpl doesn't support"
            raise CodecError(
                "cannot send a nested tensor: only dense ones travel; pad it first "
                "(torch.nested.to_padded_tensor) or send its tensors one by one"
            )
        if tensor.layout is not torch.strided:  # torch raised RuntimeError or TypeError
            raise CodecError(
                f"cannot send a {str(tensor.layout).removeprefix('torch.')} tensor: only "
                "dense ones travel; make it dense first with .to_dense()"
            )
        if not tensor.is_cpu:
            if tensor.is_meta:  # torch raised NotImplementedError ("Cannot copy out of meta")
                raise CodecError(
                    "cannot send a tensor on the meta device: it has a shape but no values"
                )
            tensor = tensor.cpu()
        try:
            if tensor.dtype == torch.bfloat16:
                # bfloat16 has no numpy dtype: its 16-bit patterns travel as they are.
                bits = tensor.contiguous().view(torch.int16).numpy()
                return pb.DTYPE_BFLOAT16, np.asarray(bits.view("<u2"), order="C")
            value = tensor.numpy()
        except RuntimeError:
            # A lazy negation or conjugation (x.conj().imag, torch._neg_view(x)): values like
            # any others, but numpy() and view() refuse them ("Can't call numpy() on Tensor
            # that has negative bit set"). Looked for only then: each test is a torch call.
            if not (tensor.is_neg() or tensor.is_conj()):
                raise
            return host_array(tensor.resolve_neg().resolve_conj())
        except TypeError as err:
            raise CodecError(f"cannot send a torch tensor of dtype {tensor.dtype}: {err}") from err
        # torch's arrays are in native order: most need nothing more (a small read's
        # encoding runs cold in a server, where each step below costs microseconds).
        dtype = _NUMPY_TO_DTYPE.get(value.dtype) if _LITTLE_ENDIAN else None
        if dtype is not None and value.flags.c_contiguous:
            return dtype, value
    if value is None:  # numpy makes an array of dtype object of it
        raise CodecError("got None: give an array, a torch tensor, numbers or a Fill")
    try:
        array = np.asarray(value)
    except ValueError as err:  # a ragged list: "setting an array element with a sequence"
        raise CodecError(f"cannot make an array of this {type(value).__name__}: {err}") from None
    source = array.dtype
    wide = _WIDENED.get(source.newbyteorder("="), None)
    if wide is not None:
        array = array.astype(wide)
    dtype = _NUMPY_TO_DTYPE.get(array.dtype.newbyteorder("="))
    if dtype is None:
        names = ", ".join(sorted(str(d) for d in (*_NUMPY_TO_DTYPE, *_WIDENED)))
        why = ""
        if source.kind == "O":
            why = (
                f" (numpy made one of this {type(value).__name__}: values of mixed kinds, "
                "None among them, or an integer past 64 bits)"
            )
        raise CodecError(f"cannot send an array of dtype {source}{why}; supported: {names}")
    wire_type = _WIRE[dtype].numpy
    # np.asarray, not np.ascontiguousarray, which turns a 0-d array into shape (1,).
    return dtype, np.asarray(array, dtype=wire_type, order="C")


def _array_pieces(dtype: int, array: np.ndarray[Any, Any]) -> list[wire.Piece]:
    """A serialized Tensor of a host_array result, its values a view of the array's memory."""
    header = pb.Tensor(dtype=dtype, shape=array.shape).SerializeToString()  # type: ignore[arg-type]
    if not array.size:
        return [header]
    # numpy's bools are the bytes 0 and 1: the packed varints of false and true.
    values = memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]
    return [header, *wire.length_field(_NUMBER[_WIRE[dtype].field], [values])]


def tensor_pieces(value: Any) -> list[wire.Piece]:
    """A serialized Tensor for an array or torch tensor, its values a view of their memory."""
    return _array_pieces(*host_array(value))


def encode_bytes(value: Any) -> bytes:
    """The serialized `Tensor` message for a numpy array, torch tensor or array-like."""
    return wire.join(tensor_pieces(value))


def encode(value: Any) -> pb.Tensor:
    """A `Tensor` message holding a numpy array, torch tensor or array-like."""
    return pb.Tensor.FromString(encode_bytes(value))


def check_shape(shape: tuple[int, ...], itemsize: int, what: str) -> None:
    """CodecError unless numpy can make an array of `shape` with items of `itemsize`
    bytes: no negative dimension, at most MAX_DIMS of them, and fewer than 2**63 bytes
    counting the nonzero dimensions alone (numpy refuses larger shapes even with a 0 among
    them, the product of the rest overflowing). `what` begins the message."""
    if any(d < 0 for d in shape):
        raise CodecError(f"{what} {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{what} has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    if numel(d for d in shape if d) * itemsize >= 1 << 63:
        raise CodecError(f"{what} {list(shape)} is too large for any array")


def _expect(message: pb.Tensor, field: str, have: int) -> tuple[_WireType, tuple[int, ...]]:
    """Checks dtype, shape and that `field` holds `have` values (bytes for raw_values)."""
    wire_type = _WIRE.get(message.dtype)
    if wire_type is None:
        # "tensor dtype 0 is not supported" was all a chunk whose values were never set got
        # (found by a walkthrough of the contract from the .proto alone).
        given = (
            "the tensor sets no dtype (DTYPE_UNSPECIFIED: were its values, or the tensor "
            "itself, left unset?)"
            if message.dtype == pb.DTYPE_UNSPECIFIED
            else f"tensor dtype {message.dtype} is not supported"
        )
        raise CodecError(
            f"{given}; use one of " + ", ".join(pb.DType.Name(k) for k in _WIRE)  # type: ignore[arg-type]
        )
    shape = tuple(message.shape)
    check_shape(shape, wire_type.numpy.itemsize, "tensor shape")
    name = DTYPE_NAMES[message.dtype]
    if field != wire_type.field:
        raise CodecError(
            f"a {name} tensor carries its values in {wire_type.field}, but {field} is set"
        )
    count = numel(shape)
    if wire_type.field == "raw_values":
        if have != 2 * count:
            raise CodecError(
                f"a {name} tensor of shape {list(shape)} needs {2 * count} bytes in "
                f"raw_values, got {have}"
            )
    elif have != count:
        raise CodecError(
            f"a tensor of shape {list(shape)} needs {count} values in {field}, got {have}"
        )
    return wire_type, shape


def _wire_array(message: pb.Tensor) -> tuple[int, np.ndarray[Any, Any]]:
    set_fields = [f for f in _VALUE_FIELDS if len(getattr(message, f))]
    expected = _WIRE[message.dtype].field if message.dtype in _WIRE else "raw_values"
    field = set_fields[0] if set_fields else expected
    if len(set_fields) > 1:
        raise CodecError(f"a tensor sets more than one values field: {', '.join(set_fields)}")
    values = getattr(message, field)
    wire_type, shape = _expect(message, field, len(values))
    if field == "raw_values":
        flat = np.frombuffer(values, dtype=wire_type.numpy)
    elif len(values) <= FROMITER_MAX:
        # A few values (a small read): numpy's iterator takes 0.5 us where its array
        # protocol takes 2, and 16-20 us less with the code gone cold between calls
        # (docs/performance-history.md, nineteenth session).
        flat = np.fromiter(values, dtype=wire_type.numpy, count=len(values))
    else:
        flat = np.asarray(values, dtype=wire_type.numpy)  # the container's buffer, one copy
    return message.dtype, flat.reshape(shape)


#: Up to this many values, a field still in the parsed message is read by iterating it.
FROMITER_MAX = 16


def _split_array(
    split: wire.Split[Any], path: wire.Path, message: pb.Tensor
) -> tuple[int, np.ndarray[Any, Any]]:
    found = split.cut.get(path)
    if found is None:  # values not cut out: still in the message
        return _wire_array(message)
    number, raw = found
    field = _FIELD_NAME[number]
    if any(len(getattr(message, f)) for f in _VALUE_FIELDS):
        raise CodecError(f"a tensor sets more than one values field, {field} among them")
    expected = _WIRE.get(message.dtype)
    itemsize = 1 if field == "raw_values" or expected is None else expected.numpy.itemsize
    if raw.nbytes % itemsize:
        raise CodecError(f"{field} holds {raw.nbytes} bytes, not a whole number of values")
    wire_type, shape = _expect(message, field, raw.nbytes // itemsize)
    return message.dtype, np.frombuffer(raw, dtype=wire_type.numpy).reshape(shape)


def chunk_pieces(
    flat: np.ndarray[Any, Any], dtype: int, offset: int, shape: Sequence[int] | None
) -> list[wire.Piece]:
    """A TensorChunk: values flat[...] (wire dtype, 1-D) starting at `offset`; `shape` first."""
    header = pb.TensorChunk(offset=offset, shape=shape or ()).SerializeToString()
    return [header, *wire.length_field(_CHUNK_VALUES, _array_pieces(dtype, flat))]


def chunks(
    value: Any, chunk_bytes: int
) -> Iterator[tuple[int, np.ndarray[Any, Any], int, tuple[int, ...] | None]]:
    """(dtype, flat run, offset, shape on the first run only) for sending value in chunks."""
    dtype, array = host_array(value)
    flat = array.reshape(-1)
    step = max(1, chunk_bytes // array.itemsize)
    for offset in range(0, max(flat.size, 1), step):
        yield dtype, flat[offset : offset + step], offset, array.shape if offset == 0 else None


#: Makes an uninitialised C-contiguous array of a shape and dtype (memory.KeptMemory.empty).
Allocate = Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray[Any, Any]]


def _empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    return np.empty(shape, dtype=dtype)


class ChunkLimitError(CodecError):
    """A chunked tensor whose announced shape is over the receiver's element limit."""


class Assembler:
    """Puts a tensor back together from TensorChunks, checking that they fit and are in order.

    `widen`: assemble what `numpy()` returns, bfloat16 widened to float32 chunk by chunk
    (`allocate` is then asked for float32), rather than the wire's values to widen at the
    end; `torch()` is then refused for bfloat16.
    """

    def __init__(
        self,
        what: str,
        max_elements: int | None = None,
        allocate: Allocate | None = None,
        *,
        widen: bool = False,
    ) -> None:
        self.what = what
        self.max_elements = max_elements
        #: makes the (uninitialised) array to assemble into; np.empty by default
        self.allocate = allocate or _empty
        self.widen = widen
        self.dtype: int | None = None
        self.shape: tuple[int, ...] | None = None  # from the first chunk
        self._size = 0  # values in all
        self._flat: np.ndarray[Any, Any] | None = None
        self._array: np.ndarray[Any, Any] | None = None
        self._filled = 0

    def add(
        self,
        split: wire.Split[Any],
        path: wire.Path,
        chunk: pb.TensorChunk,
        check: Callable[[tuple[int, ...], int], None] | None = None,
    ) -> None:
        """Adds the chunk at `path` of a split message (`chunk` is that sub-message).
        `check(shape, dtype)`, for a first chunk, is called with the whole tensor's shape and
        DType before its memory is taken: a receiver's refusal of that shape comes before an
        allocation as large as the shape says."""
        values_path = (*path, (_CHUNK_VALUES, 0))
        try:
            dtype, values = _split_array(split, values_path, chunk.values)
        except CodecError as err:
            # Named as every other refusal of a chunk is: "a tensor of shape [5] needs 5
            # values" alone named neither the stream's tensor nor the chunk (found by a review
            # of the error catalogue).
            raise CodecError(
                f"{self.what}: the values of the chunk at offset {chunk.offset}: {err}"
            ) from err
        if values.ndim == 0:  # values.shape left empty: one value, as the .proto says
            values = values.reshape(1)
        if values.ndim != 1:
            raise CodecError(
                f"{self.what}: chunk values must be 1-D, got shape {list(values.shape)}"
            )
        first = self.shape is None
        if first:
            shape = tuple(chunk.shape)
            item = _read_dtype(dtype) if self.widen else _WIRE[dtype].numpy
            check_shape(shape, item.itemsize, f"{self.what}: shape")
            size = numel(shape)
            if self.max_elements is not None and size > self.max_elements:
                raise ChunkLimitError(
                    f"{self.what}: {size} elements is over the limit of {self.max_elements}"
                )
            self.dtype = dtype
        else:
            if chunk.shape:
                raise CodecError(f"{self.what}: only the first chunk may carry a shape")
            shape, size = self.shape or (), self._size
        if dtype != self.dtype:
            raise CodecError(
                f"{self.what}: chunk dtype {DTYPE_NAMES[dtype]} differs from the first chunk's"
            )
        if chunk.offset != self._filled:
            raise CodecError(
                f"{self.what}: chunk at offset {chunk.offset}, expected {self._filled} "
                "(chunks must come in order)"
            )
        end = self._filled + values.size
        if end > size:
            # The likeliest cause from another language: a first chunk without its shape,
            # which reads as a scalar's empty shape.
            hint = (
                " (the first chunk carries the whole tensor's shape in TensorChunk.shape; "
                "without one it is a scalar's)"
                if shape == ()
                else ""
            )
            raise CodecError(
                f"{self.what}: chunks hold more than the {size} values of the shape{hint}"
            )
        if first:  # only once the first chunk is known to fit: the memory may be a GPU's
            if check is not None:
                check(shape, dtype)
            self._begin(shape, _read_dtype(dtype) if self.widen else _WIRE[dtype].numpy)
            self.shape, self._size = shape, size
        self._store(self._filled, values)
        self._filled = end

    def progress(self) -> tuple[int, int]:
        """(Value bytes assembled, value bytes in all), counted in the wire's dtype (2 a
        bfloat16 value widened or not); (0, 0) before the first chunk."""
        item = 0 if self.dtype is None else _WIRE[self.dtype].numpy.itemsize
        return self._filled * item, self._size * item

    def _begin(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        """Makes the memory the values go to, once the first chunk has been checked: an
        array from `allocate`. A subclass may put them elsewhere (the server: on a GPU)."""
        self._array = self.allocate(shape, dtype)
        self._flat = self._array.reshape(-1)

    def _store(self, offset: int, values: np.ndarray[Any, Any]) -> None:
        """Puts one chunk's checked values at `offset` (in values) of the flat tensor."""
        assert self._flat is not None
        end = offset + values.size
        if self._widening:
            # numpy's one thread: torch's threads, chunk by chunk, compete with gRPC's
            # receiving threads (128 MiB of bfloat16 streamed into out=: 161-163 ms with
            # torch, 126-150 ms with numpy).
            _widen_into(values, self._flat[offset:end], threads=False)
        else:
            self._flat[offset:end] = values

    @property
    def _widening(self) -> bool:
        """Widening as chunks come: asked to, and the values are bfloat16."""
        return self.widen and self.dtype == pb.DTYPE_BFLOAT16

    def _check_done(self) -> int:
        """The wire dtype, once every value has come."""
        if self.shape is None or self.dtype is None:
            raise CodecError(f"{self.what}: no chunk was sent")
        if self._filled != self._size:
            raise CodecError(
                f"{self.what}: the stream ended after {self._filled} of {self._size} values"
            )
        return self.dtype

    def _done(self) -> tuple[int, np.ndarray[Any, Any]]:
        dtype = self._check_done()
        assert self._array is not None
        return dtype, self._array

    def numpy(self) -> np.ndarray[Any, Any]:
        dtype, array = self._done()
        return array if self._widening else _widen(dtype, array)

    def torch(self) -> torch.Tensor:
        dtype, array = self._done()
        if self._widening:
            raise CodecError(f"{self.what}: assembled widened to float32, not as bfloat16")
        return _to_torch(dtype, array)


def _read_dtype(dtype: int) -> np.dtype[Any]:
    """The numpy dtype a read of this wire dtype gives: its own, bfloat16 widened to float32."""
    return np.dtype("<f4") if dtype == pb.DTYPE_BFLOAT16 else _WIRE[dtype].numpy


def _widen(
    dtype: int,
    array: np.ndarray[Any, Any],
    out: np.ndarray[Any, Any] | None = None,
    allocate: Allocate | None = None,
) -> np.ndarray[Any, Any]:
    """The array as numpy has it: bfloat16 widened to float32, exactly; into `out` when
    given (a C-contiguous array of the result's shape and dtype), else as it is or new
    (from `allocate`, np.empty by default)."""
    if dtype == pb.DTYPE_BFLOAT16:
        if out is None:
            out = (allocate or _empty)(array.shape, _read_dtype(dtype))
        _widen_into(array.reshape(-1), out.reshape(-1))
        return out
    if out is None:
        return array
    np.copyto(out, array)
    return out


#: From this many values on, bfloat16 is widened by torch when the caller has imported it.
TORCH_WIDEN_MIN = 1 << 16


def _widen_into(
    bits: np.ndarray[Any, Any], out: np.ndarray[Any, Any], *, threads: bool = True
) -> None:
    """bfloat16 bit patterns (1-D uint16) into a 1-D float32 array of the same length: a
    bfloat16 is the upper half of the float32 with the same value. One pass, no temporary.

    With `threads`, torch, when the caller has imported it, converts on all its threads with
    vector instructions: 8 M values in 1.5 ms on the benchmark's 2 cores, against 4.3 ms for
    numpy's cast and shift (docs/performance-history.md, "bfloat16 widened to float32").
    Both give the same bits.
    """
    torch = _torch_module() if threads else None
    if torch is None or bits.size < TORCH_WIDEN_MIN or not bits.flags.c_contiguous:
        np.left_shift(bits, 16, out=out.view("<u4"), dtype="<u4")
        return
    with warnings.catch_warnings():
        # The received bytes are read-only, and torch warns that it cannot promise that;
        # it only reads them here.
        warnings.simplefilter("ignore", UserWarning)
        source = torch.frombuffer(bits, dtype=torch.bfloat16)
    torch.from_numpy(out).copy_(source)


def _to_torch(
    dtype: int, array: np.ndarray[Any, Any], allocate: Allocate | None = None
) -> torch.Tensor:
    import torch

    if not array.flags.writeable:  # a view of received bytes; torch wants writable memory
        copy = (allocate or _empty)(array.shape, array.dtype)
        np.copyto(copy, array)
        array = copy
    if dtype == pb.DTYPE_BFLOAT16:
        return torch.from_numpy(array.view("<i2")).view(torch.bfloat16)
    return torch.from_numpy(array)


def decode(message: pb.Tensor) -> np.ndarray[Any, Any]:
    """A numpy array from a `Tensor` message; bfloat16 is widened to float32 exactly."""
    return _widen(*_wire_array(message))


def decode_torch(message: pb.Tensor) -> torch.Tensor:
    """A torch tensor (CPU) from a `Tensor` message, in its own dtype, bfloat16 included."""
    return _to_torch(*_wire_array(message))


def decode_split(
    split: wire.Split[Any],
    path: wire.Path,
    message: pb.Tensor,
    out: np.ndarray[Any, Any] | None = None,
    allocate: Allocate | None = None,
) -> np.ndarray[Any, Any]:
    """The array of the Tensor at `path` of a `wire.split` message (`message` is that Tensor).

    The array is a read-only view of the received bytes: no copy was made, except to widen
    bfloat16 to float32 (into an array from `allocate`, np.empty by default). With `out` (see
    check_out), the values are written there instead, in one pass, and `out` is returned.
    """
    dtype, array = _split_array(split, path, message)
    if out is not None:
        check_out(out, array.shape, _read_dtype(dtype))
    return _widen(dtype, array, out, allocate)


def check_out(out: np.ndarray[Any, Any], shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """TypeError unless `out` is a numpy array; ValueError unless it can take an array of
    this shape and dtype as it is, saying what is wrong with it."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out= must be a numpy array, got {type(out).__name__}")
    wrong = []
    if out.shape != tuple(shape):
        wrong.append(f"shape {out.shape}")
    if out.dtype != dtype.newbyteorder("="):
        byte_order = " (byte order)" if out.dtype.newbyteorder("=") == dtype else ""
        wrong.append(f"dtype {out.dtype.str if byte_order else out.dtype}{byte_order}")
    if not out.flags.c_contiguous:
        wrong.append("not C-contiguous")
    if not out.flags.writeable:
        wrong.append("read-only")
    if wrong:
        raise ValueError(
            f"out= must be a writable, C-contiguous {dtype} array of shape {tuple(shape)}; "
            f"this one is: {', '.join(wrong)}"
        )


def decode_split_torch(
    split: wire.Split[Any],
    path: wire.Path,
    message: pb.Tensor,
    allocate: Allocate | None = None,
) -> torch.Tensor:
    """As decode_split, as a CPU torch tensor (one copy, into an array from `allocate`:
    torch wants writable memory)."""
    return _to_torch(*_split_array(split, path, message), allocate)


# --- indices -------------------------------------------------------------------------

IndexItem: TypeAlias = "int | slice | EllipsisType | None"
#: What Python's x[...] receives for numpy basic indexing: one item or a tuple of them, its
#: integers Python's or numpy's (_as_int takes both; typed int alone, a type-checked
#: caller's remote.w[i] for i in np.arange(n) was refused: a review of the client as a
#: type-checked user's code sees it).
IndexKey: TypeAlias = "_KeyItem | tuple[_KeyItem, ...]"
#: One item of a key as given (IndexItem, once checked, has Python's ints alone).
_KeyItem: TypeAlias = "int | np.integer[Any] | slice | EllipsisType | None"


#: The range of an index (an Index message's int64 fields).
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CodecError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _as_int(value: Any, what: str) -> int:
    number = _integer(value, what)
    if not INT64_MIN <= number <= INT64_MAX:  # protobuf raised "Value out of range"
        raise CodecError(f"{what} {number} is outside int64's range: {INT64_MIN} to {INT64_MAX}")
    return number


def _as_bound(value: Any, what: str) -> int:
    """A slice bound, clipped to int64's range: no dimension is that long, so numpy's
    answer is the same (x[0:2**70] is x[0:], x[::2**70] its first element)."""
    return min(max(_integer(value, what), INT64_MIN), INT64_MAX)


def index_to_proto(key: IndexKey) -> pb.Index:
    """An `Index` message for one numpy basic-indexing key, e.g. (0, slice(None), ...)."""
    items = key if isinstance(key, tuple) else (key,)
    # Refused here as a selector's text is (the server refused them only once sent).
    if sum(item is Ellipsis for item in items) > 1:
        raise CodecError("an index can only have a single ellipsis ('...')")
    message = pb.Index()
    for item in items:
        entry = message.items.add()
        if item is Ellipsis:
            entry.ellipsis.SetInParent()
        elif item is None:
            entry.new_axis.SetInParent()
        elif isinstance(item, slice):
            if item.step is not None and not isinstance(item.step, bool) and item.step == 0:
                raise CodecError("slice step cannot be zero")
            entry.slice.SetInParent()
            for part in ("start", "stop", "step"):
                bound = getattr(item, part)
                if bound is not None:
                    setattr(entry.slice, part, _as_bound(bound, f"slice {part}"))
        else:
            entry.at = _as_int(item, "an index")
    return message


def index_from_proto(message: pb.Index) -> tuple[IndexItem, ...]:
    """The numpy basic-indexing tuple an `Index` message stands for, checked."""
    items: list[IndexItem] = []
    for position, entry in enumerate(message.items):
        kind = entry.WhichOneof("item")
        if kind == "at":
            items.append(entry.at)
        elif kind == "slice":
            s = entry.slice
            step = s.step if s.HasField("step") else None
            if step == 0:
                raise CodecError(f"index item {position}: slice step cannot be zero")
            items.append(
                slice(
                    s.start if s.HasField("start") else None,
                    s.stop if s.HasField("stop") else None,
                    step,
                )
            )
        elif kind == "ellipsis":
            items.append(Ellipsis)
        elif kind == "new_axis":
            items.append(None)
        else:
            raise CodecError(f"index item {position} is empty: set at, slice, ellipsis or new_axis")
    if sum(item is Ellipsis for item in items) > 1:
        raise CodecError("an index can only have a single ellipsis ('...')")
    return tuple(items)


def indices_to_proto(keys: Sequence[IndexKey]) -> list[pb.Index]:
    """Messages for a chain of keys, x[k0][k1]..."""
    return [index_to_proto(key) for key in keys]


def indices_from_proto(messages: Sequence[pb.Index]) -> list[tuple[IndexItem, ...]]:
    """The chain of checked keys that repeated `Index` messages stand for."""
    return [index_from_proto(message) for message in messages]


def _format_item(item: IndexItem | np.integer[Any]) -> str:
    if item is Ellipsis:
        return "..."
    if item is None:
        return "None"
    if isinstance(item, slice):
        text = ("" if item.start is None else str(item.start)) + ":"
        text += "" if item.stop is None else str(item.stop)
        if item.step is not None:
            text += f":{item.step}"
        return text
    return str(item)


def format_index(keys: Sequence[tuple[IndexItem | np.integer[Any], ...]]) -> str:
    """The index chain as Python writes it: "[0][0][0]", "[0, :, 1:3]"."""
    return "".join("[" + ", ".join(_format_item(i) for i in key) + "]" for key in keys)
