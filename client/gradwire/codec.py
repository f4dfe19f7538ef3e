"""Tensors and indices to protobuf messages and back: numpy (and torch, when present) <-> wire.

No grpc here. Values never pass through a per-element Python loop: encoding writes the
array's little-endian bytes into a bytes-typed twin of `Tensor` (a packed fixed-width
repeated field and a bytes field carry identical wire bytes) and decoding reads the packed
field through numpy's array protocol.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from gradwire._pb import trainer_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_NAMES",
    "CodecError",
    "IndexKey",
    "decode",
    "decode_torch",
    "encode",
    "encode_bytes",
    "format_index",
    "index_from_proto",
    "index_to_proto",
    "indices_from_proto",
    "indices_to_proto",
    "numel",
]


class CodecError(ValueError):
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


def _bytes_twin() -> type[Any]:
    """A message class wire-identical to `Tensor`, whose value fields are `bytes`.

    Derived from the generated descriptor at import time, so it cannot drift from the
    contract. Packed fixed-width fields and bytes fields share the length-delimited wire
    type; the enum becomes int32, which shares the varint wire type.
    """
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="gradwire/v1/_tensor_bytes.proto", package="gradwire.v1._wire", syntax="proto3"
    )
    message = file_proto.message_type.add()
    pb.Tensor.DESCRIPTOR.CopyToProto(message)
    for field in message.field:
        if field.name in _VALUE_FIELDS:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            field.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            field.ClearField("options")
        elif field.name == "dtype":
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
            field.ClearField("type_name")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("gradwire.v1._wire.Tensor"))


_TensorBytes: Final = _bytes_twin()


def numel(shape: Sequence[int]) -> int:
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


def _host_array(value: Any) -> tuple[int, np.ndarray[Any, Any]]:
    """(DType, C-contiguous little-endian array of the wire's element type) for a value."""
    if _is_torch_tensor(value):
        torch = _torch_module()
        tensor = value.detach()
        if tensor.dtype == torch.bfloat16:
            # bfloat16 has no numpy dtype: its 16-bit patterns travel as they are.
            bits = tensor.to("cpu").contiguous().view(torch.int16).numpy()
            return pb.DTYPE_BFLOAT16, np.asarray(bits.view("<u2"), order="C")
        try:
            value = tensor.to("cpu").numpy()
        except TypeError as err:
            raise CodecError(f"cannot send a torch tensor of dtype {tensor.dtype}: {err}") from err
    array = np.asarray(value)
    source = array.dtype
    wide = _WIDENED.get(source.newbyteorder("="), None)
    if wide is not None:
        array = array.astype(wide)
    dtype = _NUMPY_TO_DTYPE.get(array.dtype.newbyteorder("="))
    if dtype is None:
        names = ", ".join(sorted(str(d) for d in (*_NUMPY_TO_DTYPE, *_WIDENED)))
        raise CodecError(f"cannot send an array of dtype {source}; supported: {names}")
    wire = _WIRE[dtype].numpy
    # np.asarray, not np.ascontiguousarray, which turns a 0-d array into shape (1,).
    return dtype, np.asarray(array, dtype=wire, order="C")


def encode_bytes(value: Any) -> bytes:
    """The serialized `Tensor` message for a numpy array, torch tensor or array-like."""
    dtype, array = _host_array(value)
    fields: dict[str, Any] = {"dtype": dtype, "shape": array.shape}
    if array.size:
        fields[_WIRE[dtype].field] = array.tobytes()
    data: bytes = _TensorBytes(**fields).SerializeToString()
    return data


def encode(value: Any) -> pb.Tensor:
    """A `Tensor` message holding a numpy array, torch tensor or array-like."""
    return pb.Tensor.FromString(encode_bytes(value))


def _check(message: pb.Tensor) -> tuple[_WireType, tuple[int, ...]]:
    wire = _WIRE.get(message.dtype)
    if wire is None:
        raise CodecError(
            f"tensor dtype {message.dtype} is not supported; use one of "
            + ", ".join(pb.DType.Name(k) for k in _WIRE)  # type: ignore[arg-type]
        )
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"tensor shape {list(shape)} has a negative dimension")
    for field in _VALUE_FIELDS:
        if field != wire.field and len(getattr(message, field)):
            raise CodecError(
                f"a {DTYPE_NAMES[message.dtype]} tensor carries its values in {wire.field}, "
                f"but {field} is set"
            )
    count = numel(shape)
    have = len(getattr(message, wire.field))
    if wire.field == "raw_values":
        if have != 2 * count:
            raise CodecError(
                f"a {DTYPE_NAMES[message.dtype]} tensor of shape {list(shape)} needs "
                f"{2 * count} bytes in raw_values, got {have}"
            )
    elif have != count:
        raise CodecError(
            f"a tensor of shape {list(shape)} needs {count} values in {wire.field}, got {have}"
        )
    return wire, shape


def _wire_array(message: pb.Tensor) -> tuple[int, np.ndarray[Any, Any]]:
    wire, shape = _check(message)
    values = getattr(message, wire.field)
    if wire.field == "raw_values":
        flat = np.frombuffer(values, dtype=wire.numpy)
    else:
        flat = np.asarray(values, dtype=wire.numpy)  # the container's buffer, one copy
    return message.dtype, flat.reshape(shape)


def decode(message: pb.Tensor) -> np.ndarray[Any, Any]:
    """A numpy array from a `Tensor` message; bfloat16 is widened to float32 exactly."""
    dtype, array = _wire_array(message)
    if dtype == pb.DTYPE_BFLOAT16:
        # A bfloat16 is the upper half of a float32 with the same value.
        return (array.astype("<u4") << 16).view("<f4")
    return array


def decode_torch(message: pb.Tensor) -> torch.Tensor:
    """A torch tensor (CPU) from a `Tensor` message, in its own dtype, bfloat16 included."""
    import torch

    dtype, array = _wire_array(message)
    if dtype == pb.DTYPE_BFLOAT16:
        return torch.from_numpy(array.view("<i2").copy()).view(torch.bfloat16)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


# --- indices -------------------------------------------------------------------------

IndexItem: TypeAlias = "int | slice | EllipsisType | None"
#: What Python's x[...] receives for numpy basic indexing: one item or a tuple of them.
IndexKey: TypeAlias = (
    "int | slice | EllipsisType | tuple[int | slice | EllipsisType | None, ...] | None"
)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CodecError(f"{what} must be an integer, got {value!r}")
    return int(value)


def index_to_proto(key: IndexKey) -> pb.Index:
    """An `Index` message for one numpy basic-indexing key, e.g. (0, slice(None), ...)."""
    items = key if isinstance(key, tuple) else (key,)
    message = pb.Index()
    for item in items:
        entry = message.items.add()
        if item is Ellipsis:
            entry.ellipsis.SetInParent()
        elif item is None:
            entry.new_axis.SetInParent()
        elif isinstance(item, slice):
            entry.slice.SetInParent()
            for part in ("start", "stop", "step"):
                bound = getattr(item, part)
                if bound is not None:
                    setattr(entry.slice, part, _as_int(bound, f"slice {part}"))
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


def _format_item(item: IndexItem) -> str:
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


def format_index(keys: Sequence[tuple[IndexItem, ...]]) -> str:
    """The index chain as Python writes it: "[0][0][0]", "[0, :, 1:3]"."""
    return "".join("[" + ", ".join(_format_item(i) for i in key) + "]" for key in keys)
