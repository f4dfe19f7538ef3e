"""wire: spliced messages are ordinary protobuf; split views values in place, or falls back."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from gradwire import codec, wire
from gradwire._pb import trainer_pb2 as pb

TENSOR: wire.Path = ((3, 0),)  # GetTensorResponse.tensor


@pytest.fixture(autouse=True)
def scan_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small messages normally skip the scan; these tests exercise it on small data."""
    monkeypatch.setattr(wire, "SMALL_MESSAGE_BYTES", 0)


def _address(array: np.ndarray[Any, Any]) -> int:
    return int(array.__array_interface__["data"][0])


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i4", "<i8", "<f2", "?"])
def test_spliced_tensor_is_byte_identical_to_protobufs_own(dtype: str) -> None:
    value = (np.arange(12) % 5 - 2).astype(dtype).reshape(3, 4)
    ordinary = pb.Tensor(dtype=codec.host_array(value)[0], shape=[3, 4])
    name = {
        "<f4": "float_values",
        "<f8": "double_values",
        "<i4": "int32_values",
        "<i8": "int64_values",
        "?": "bool_values",
    }.get(dtype)
    if name:  # what a client in another language does: set the values one by one
        getattr(ordinary, name).extend(value.reshape(-1).tolist())
    else:
        ordinary.raw_values = value.tobytes()
    assert wire.join(codec.tensor_pieces(value)) == ordinary.SerializeToString()
    # inside a response, spliced after the other fields: the same message to a parser
    header = pb.GetTensorResponse(version=7, name="x", full_shape=[3, 4]).SerializeToString()
    spliced = wire.join([header, *wire.length_field(3, codec.tensor_pieces(value))])
    expected = pb.GetTensorResponse(version=7, name="x", full_shape=[3, 4], tensor=ordinary)
    assert pb.GetTensorResponse.FromString(spliced) == expected


def test_split_views_the_values_in_the_received_bytes() -> None:
    value = np.arange(1000, dtype=np.float32).reshape(10, 100)
    response = pb.GetTensorResponse(version=3, name="w", full_shape=[10, 100])
    response.tensor.CopyFrom(codec.encode(value))
    data = response.SerializeToString()
    split = wire.split(data, pb.GetTensorResponse)
    assert split.message.version == 3 and split.message.name == "w"
    assert list(split.message.tensor.shape) == [10, 100]
    assert len(split.message.tensor.float_values) == 0  # cut out of the parsed message
    array = codec.decode_split(split, TENSOR, split.message.tensor)
    np.testing.assert_array_equal(array, value)
    start = _address(np.frombuffer(data, np.uint8))
    assert start <= _address(array) < start + len(data)  # a view: no copy was made
    assert not array.flags.writeable


def _unpacked_floats(values: list[float]) -> bytes:
    """A Tensor whose float_values are written unpacked: valid protobuf, not our fast path."""
    out = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[len(values)]).SerializeToString()
    for v in values:
        out += bytes([3 << 3 | 5]) + struct.pack("<f", v)
    return out


def test_unpacked_values_fall_back_to_the_ordinary_parser() -> None:
    tensor = _unpacked_floats([1.5, -2.0, 3.25])
    data = wire.join(
        [pb.GetTensorResponse(version=1).SerializeToString(), *wire.length_field(3, [tensor])]
    )
    split = wire.split(data, pb.GetTensorResponse)
    assert not split.cut
    np.testing.assert_array_equal(
        codec.decode_split(split, TENSOR, split.message.tensor), [1.5, -2.0, 3.25]
    )
    # One run under int64_values (sfixed64) that is a varint of 8 bytes: protobuf keeps it
    # as an unknown field, no value, and split does not view its bytes as one.
    number = pb.Tensor.DESCRIPTOR.fields_by_name["int64_values"].number
    header = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1]).SerializeToString()
    assert len(wire.varint(2**49)) == 8
    one = wire.join(wire.length_field(3, [header + wire.varint(number << 3) + wire.varint(2**49)]))
    assert len(pb.GetTensorResponse.FromString(one).tensor.int64_values) == 0
    split = wire.split(one, pb.GetTensorResponse)
    assert not split.cut
    with pytest.raises(codec.CodecError, match="needs 1 values in int64_values, got 0"):
        codec.decode_split(split, TENSOR, split.message.tensor)


def test_a_tensor_field_of_another_wire_type_is_left_as_protobuf_leaves_it() -> None:
    """A varint under the number of TrainStepResponse.fetched (a sender on another schema):
    protobuf keeps it as an unknown field, not as one more (empty) fetched tensor."""
    number = pb.TrainStepResponse.DESCRIPTOR.fields_by_name["fetched"].number
    response = pb.TrainStepResponse(version=2)
    response.fetched.add().tensor.CopyFrom(codec.encode(np.arange(4, dtype=np.float32)))
    data = response.SerializeToString() + wire.varint(number << 3) + wire.varint(5)
    assert len(pb.TrainStepResponse.FromString(data).fetched) == 1
    split = wire.split(data, pb.TrainStepResponse)
    assert split.cut and len(split.message.fetched) == 1
    path = ((number, 0), *TENSOR)
    np.testing.assert_array_equal(
        codec.decode_split(split, path, split.message.fetched[0].tensor), np.arange(4)
    )


def test_values_in_several_runs_fall_back_and_join() -> None:
    first = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[4], int64_values=[1, 2]).SerializeToString()
    second = pb.Tensor(int64_values=[3, 4]).SerializeToString()
    data = wire.join(wire.length_field(3, [first + second]))
    split = wire.split(data, pb.GetTensorResponse)
    np.testing.assert_array_equal(
        codec.decode_split(split, TENSOR, split.message.tensor), [1, 2, 3, 4]
    )


def test_a_singular_message_sent_twice_is_merged_as_protobuf_merges() -> None:
    part1 = wire.length_field(3, [pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2]).SerializeToString()])
    part2 = wire.length_field(3, [pb.Tensor(float_values=[5.0, 6.0]).SerializeToString()])
    split = wire.split(wire.join([*part1, *part2]), pb.GetTensorResponse)
    np.testing.assert_array_equal(codec.decode_split(split, TENSOR, split.message.tensor), [5, 6])


def test_nested_and_repeated_tensors_are_found() -> None:
    response = pb.TrainStepResponse(version=9, loss=1.5)
    values = [
        np.arange(3, dtype=np.float32),
        np.arange(4, dtype=np.float64),
        np.arange(5, dtype=np.float32),  # the third: each occurrence counted, not only the first
    ]
    for i, value in enumerate(values):
        fetched = response.fetched.add(version=9, name=f"t{i}")
        fetched.tensor.CopyFrom(codec.encode(value))
    split = wire.split(response.SerializeToString(), pb.TrainStepResponse)
    assert set(split.cut) == {((5, i), (3, 0)) for i in range(3)}
    for i, value in enumerate(values):
        path = ((5, i), (3, 0))
        got = codec.decode_split(split, path, split.message.fetched[i].tensor)
        np.testing.assert_array_equal(got, value)
        assert got.dtype == value.dtype
    assert split.message.loss == 1.5


def test_requests_split_too() -> None:
    request = pb.ForwardRequest()
    request.input.tensor.CopyFrom(codec.encode(torch.ones(2, 3, 10, 10)))
    request.target.fill.kind = pb.Fill.KIND_ONES
    split = wire.split(request.SerializeToString(), pb.ForwardRequest)
    x = codec.decode_split_torch(split, ((1, 0), (1, 0)), split.message.input.tensor)
    assert torch.equal(x, torch.ones(2, 3, 10, 10))
    assert split.message.target.fill.kind == pb.Fill.KIND_ONES


def test_messages_without_tensors_are_parsed_whole() -> None:
    assert not wire.holds_tensors(pb.StepRequest)
    assert wire.holds_tensors(pb.TrainStepResponse) and wire.holds_tensors(pb.ForwardChunk)


def test_values_in_the_wrong_field_for_the_dtype_are_refused() -> None:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2], float_values=[1, 2])
    response = pb.GetTensorResponse(tensor=tensor)
    split = wire.split(response.SerializeToString(), pb.GetTensorResponse)
    with pytest.raises(codec.CodecError, match="carries its values in double_values"):
        codec.decode_split(split, TENSOR, split.message.tensor)


def test_cut_values_beside_another_values_field_are_refused() -> None:
    """Bools are never cut (they stay in the parsed message): a float32 tensor whose
    float_values are cut and which sets bool_values as well is two tensors' values in one."""
    value = np.arange(4, dtype=np.float32)
    pieces = [*codec.tensor_pieces(value), pb.Tensor(bool_values=[True]).SerializeToString()]
    split = wire.split(wire.join(wire.length_field(3, pieces)), pb.GetTensorResponse)
    assert TENSOR in split.cut and list(split.message.tensor.bool_values) == [True]
    with pytest.raises(codec.CodecError, match="more than one values field, float_values"):
        codec.decode_split(split, TENSOR, split.message.tensor)


def test_packed_values_with_a_partial_value_are_refused() -> None:
    """A float32 field of 4 values and 1 byte (from a broken writer): a CodecError that says
    so, not numpy's ValueError from viewing the bytes."""
    header = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4]).SerializeToString()
    number = pb.Tensor.DESCRIPTOR.fields_by_name["float_values"].number
    tensor = [header, *wire.length_field(number, [bytes(4 * 4 + 1)])]
    split = wire.split(wire.join(wire.length_field(3, tensor)), pb.GetTensorResponse)
    assert TENSOR in split.cut
    with pytest.raises(codec.CodecError, match="17 bytes, not a whole number of values"):
        codec.decode_split(split, TENSOR, split.message.tensor)


def test_a_torch_tensor_read_from_the_received_bytes_is_its_own_memory() -> None:
    """decode_split_torch copies: the received bytes are read-only (a bytes object), and a
    tensor over them would write into them (and make later reads of them wrong)."""
    value = np.arange(64, dtype=np.float32)
    data = pb.GetTensorResponse(tensor=codec.encode(value)).SerializeToString()
    split = wire.split(data, pb.GetTensorResponse)
    assert TENSOR in split.cut
    tensor = codec.decode_split_torch(split, TENSOR, split.message.tensor)
    tensor.add_(1)  # the caller's to change
    np.testing.assert_array_equal(tensor.numpy(), value + 1)
    np.testing.assert_array_equal(codec.decode_split(split, TENSOR, split.message.tensor), value)
    assert pb.GetTensorResponse.FromString(data).tensor.float_values == value.tolist()


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"\xff", "truncated varint"),
        (b"\x1a\x10\x00", "field runs past the end of its message"),
        (b"\x0f\x00", "wire type 7 does not exist"),
        (b"\x1a" + b"\xff" * 10, "varint too long"),
    ],
)
def test_garbage_is_a_decode_error(data: bytes, said: str) -> None:
    with pytest.raises(DecodeError, match=f"^not a GetTensorResponse: {said}$"):
        wire.split(data, pb.GetTensorResponse)


def test_varint() -> None:
    assert wire.varint(0) == b"\x00"
    assert wire.varint(300) == b"\xac\x02"
    assert wire.varint(2**63) == bytes([0x80] * 9 + [0x01])
    # protobuf's own (canonical) encoding, at each length's ends: a length spliced by
    # wire.length_field is then byte for byte what protobuf writes
    for value in (1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**35, 2**63 - 1):
        assert wire.varint(value) == pb.TensorChunk(offset=value).SerializeToString()[1:], value


def test_a_varint_past_ten_bytes_is_a_decode_error() -> None:
    """A tensor's length written in 11 bytes: protobuf refuses it, and so does split (it
    took one, re-encoding it, where protobuf would have refused the message)."""
    tensor = codec.encode_bytes(np.arange(4, dtype=np.float32))
    data = b"\x1a" + bytes([0x80 | len(tensor)]) + b"\x80" * 9 + b"\x00" + tensor
    with pytest.raises(DecodeError):
        pb.GetTensorResponse.FromString(data)
    with pytest.raises(DecodeError, match="varint too long"):
        wire.split(data, pb.GetTensorResponse)
    # Ten bytes, protobuf's longest (a negative int64), are read.
    response = pb.GetTensorResponse(version=-1, tensor=codec.encode(np.arange(4, dtype=np.int64)))
    split = wire.split(response.SerializeToString(), pb.GetTensorResponse)
    assert split.message.version == -1 and TENSOR in split.cut


def test_bytes_past_a_messages_last_field_are_a_decode_error() -> None:
    """A key with no value after a tensor, or a tensor's last field that runs one byte past
    the tensor's end (into the field after it): protobuf refuses both, and so does split,
    which neither drops the stray byte nor lends the tensor its neighbour's."""
    tensor = codec.encode_bytes(np.arange(4, dtype=np.float32))
    data = wire.join(wire.length_field(3, [tensor]))
    with pytest.raises(DecodeError):
        pb.GetTensorResponse.FromString(data + b"\x08")
    with pytest.raises(DecodeError):
        wire.split(data + b"\x08", pb.GetTensorResponse)
    values = wire.length_field(
        pb.Tensor.DESCRIPTOR.fields_by_name["float_values"].number, [bytes(16)]
    )
    shape = pb.Tensor(shape=[4]).SerializeToString()  # its length one more than it holds
    overrun = wire.join([*values, shape[:1], bytes([shape[1] + 1]), shape[2:]])
    version = pb.GetTensorResponse(version=5).SerializeToString()
    outer = wire.join([*wire.length_field(3, [overrun]), version])
    with pytest.raises(DecodeError):
        pb.GetTensorResponse.FromString(outer)
    with pytest.raises(DecodeError):
        wire.split(outer, pb.GetTensorResponse)


def test_small_messages_skip_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SMALL_MESSAGE_BYTES", 1 << 20)
    response = pb.GetTensorResponse(tensor=codec.encode(np.arange(5, dtype=np.float32)))
    split = wire.split(response.SerializeToString(), pb.GetTensorResponse)
    assert not split.cut and len(split.message.tensor.float_values) == 5
    np.testing.assert_array_equal(codec.decode_split(split, TENSOR, split.message.tensor), range(5))


@pytest.mark.parametrize("before", range(0, 17))
def test_aligned_puts_the_values_at_a_multiple_of_eight(before: int) -> None:
    value = np.arange(5, dtype=np.float64)
    body = wire.length_field(3, codec.tensor_pieces(value))
    pieces = wire.aligned(15, before, body)
    at = before
    for piece in pieces:
        if isinstance(piece, memoryview):
            break
        at += len(piece)
    assert at % wire.ALIGNMENT == 0
    added = sum(len(p) for p in pieces) - sum(len(p) for p in body)
    assert added in {0, *range(2, 10)}  # a bytes field is two bytes at least
    # Still the message, the padding an ordinary bytes field of zeros.
    header = pb.GetTensorResponse(version=1, name="x" * before).SerializeToString()
    message = pb.GetTensorResponse.FromString(
        wire.join([header, *wire.aligned(15, len(header), body)])
    )
    assert list(message.tensor.double_values) == value.tolist()
    assert set(message.alignment) <= {0}


def test_aligned_leaves_pieces_without_an_array_alone() -> None:
    body = [b"\x08\x01", b"\x12\x00"]
    assert wire.aligned(15, 3, body) == body


@pytest.mark.parametrize("at", range(0, 9))
def test_bools_get_no_padding(at: int) -> None:
    """A byte per value sits as well at any address: no alignment field for bools."""
    value = np.array([True, False, True])
    body = wire.length_field(3, codec.tensor_pieces(value))
    assert wire.aligned(15, at, body) == body
    head = pb.GetTensorResponse(version=1, name="flags").SerializeToString()
    item = [head, *body]
    assert wire.aligned_field(5, 15, at, item) == wire.length_field(5, item)
    reply = pb.TrainStepResponse.FromString(wire.join(wire.aligned_field(5, 15, at, item)))
    assert list(reply.fetched[0].tensor.bool_values) == [True, False, True]
    assert not reply.fetched[0].alignment


@pytest.mark.parametrize("count", [10, 13, 14, 15, 16, 17, 2000])
@pytest.mark.parametrize("at", range(0, 9))
def test_aligned_field_aligns_from_the_outer_messages_start(count: int, at: int) -> None:
    # Items of about 128 bytes: the padding can make the field's length take another byte.
    value = np.arange(count, dtype=np.float64)
    head = pb.GetTensorResponse(version=1, name="doubles").SerializeToString()
    item = [head, *wire.length_field(3, codec.tensor_pieces(value))]
    pieces = [b"\x00" * at, *wire.aligned_field(5, 15, at, item)]
    assert wire._to_array(pieces) is not None
    assert wire._to_array(pieces) % wire.ALIGNMENT == 0  # type: ignore[operator]
    reply = pb.TrainStepResponse.FromString(wire.join(pieces[1:]))
    assert list(reply.fetched[0].tensor.double_values) == value.tolist()
    assert set(reply.fetched[0].alignment) <= {0}


#: An unknown field 9 as an empty group (start-group key 0x4b, end-group key 0x4c): valid
#: protobuf, kept by the parser as an unknown field.
GROUP = b"\x4b\x4c"


@pytest.mark.parametrize("where", ["message", "tensor"])
def test_a_message_with_an_unknown_group_field_is_parsed_as_protobuf_parses_it(
    where: str,
) -> None:
    """A request of 16 KiB or more with a group among its unknown fields was refused as
    malformed ("wire type 3 is not used by gradwire messages"), where protobuf's parser
    reads it, as it does a small one (found by the nineteenth session's review)."""
    values = np.arange(8 * 3 * 10 * 10, dtype=np.float32)
    tensor = codec.encode_bytes(values.reshape(8, 3, 10, 10))
    if where == "tensor":
        tensor += GROUP
    source = pb.TensorSource.FromString(b"\x0a" + _varint(len(tensor)) + tensor)
    data = pb.ForwardRequest(input=source).SerializeToString()
    if where == "message":
        data += GROUP
    split = wire.split(data, pb.ForwardRequest)  # scanned: see scan_every_message
    assert split.message == pb.ForwardRequest.FromString(data)
    assert split.cut == {}  # left to the parser whole
    assert np.array_equal(codec.decode(split.message.input.tensor).reshape(-1), values)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_fields_says_a_group_is_no_gradwire_field() -> None:
    """wire.fields reads a Calls stream's and a Batch's envelopes (calls.py), whose callers
    catch ValueError: a group in one is a ValueError, not split's internal signal."""
    data = memoryview(b"\x08\x01" + GROUP)
    with pytest.raises(ValueError, match="a group field, which no gradwire message has"):
        list(wire.fields(data, 0, len(data)))
