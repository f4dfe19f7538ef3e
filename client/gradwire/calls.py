"""The Calls stream's envelopes (CallRequest, CallResponse): one unary call per message;
and Batch's (BatchRequest, BatchResponse), which carry several of them in one unary call.

Both are written around the unary call's own message, never parsed and built again: a
request is a small header (request id, expected version, timeout) and the unary request's
bytes as one field; a response is the unary response's bytes as one field, or a
google.rpc.Status's. So a call on the stream costs its unary form's encoding plus a few
bytes, and tensors keep the fast path of wire.py. Used by the client to write requests and
read responses, and by the server to read requests and write responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from gradwire import wire
from gradwire._pb import trainer_pb2 as pb

__all__ = [
    "ERROR_FIELD",
    "METHODS",
    "STATUS_TRAILER",
    "batch_answers",
    "batch_calls",
    "batch_request_pieces",
    "batch_response_bytes",
    "error_bytes",
    "named_call",
    "request_pieces",
    "response_bytes",
    "unwrap_request",
    "unwrap_response",
]

_SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"]
_CALL = pb.CallRequest.DESCRIPTOR.oneofs_by_name["call"]
_RESULTS = {f.number: f for f in pb.CallResponse.DESCRIPTOR.oneofs_by_name["result"].fields}
#: The trailer a failed unary call's google.rpc.Status travels in; CallResponse.error holds
#: the same bytes.
STATUS_TRAILER = "grpc-status-details-bin"
#: CallResponse's field for a call's error: a serialized google.rpc.Status.
ERROR_FIELD = pb.CallResponse.DESCRIPTOR.fields_by_name["error"].number
_ALIGNMENT_FIELD = pb.CallResponse.DESCRIPTOR.fields_by_name["alignment"].number


def _methods() -> dict[str, tuple[int, str]]:
    """The unary RPC each field of CallRequest.call stands for, by the RPC's name: (field
    number, field name). The contract's own descriptor says which: the field's message is
    the RPC's request, and the response's field of the same number is its response."""
    unary = {
        m.input_type.full_name: m
        for m in _SERVICE.methods
        if not (m.client_streaming or m.server_streaming)
    }
    found = {}
    for field in _CALL.fields:
        assert field.message_type is not None  # every call is a message
        method = unary[field.message_type.full_name]
        result = _RESULTS.get(field.number)
        if result is None or result.message_type is not method.output_type:
            raise AssertionError(f"CallResponse lacks {method.output_type.name} as {field.number}")
        found[method.name] = (field.number, field.name)
    return found


#: The RPCs a Calls stream carries, by name: (the field number in both envelopes, the
#: CallRequest field's name).
METHODS: dict[str, tuple[int, str]] = _methods()
_NAMES = {number: name for name, (number, _) in METHODS.items()}
_CALL_TYPES = {f.number: f.message_type.name for f in _CALL.fields if f.message_type is not None}
_BY_FIELD = {field: name for name, (_, field) in METHODS.items()}
#: The responses that carry tensors: their values stay aligned in the envelope.
_ALIGNED = frozenset(
    number
    for number, f in _RESULTS.items()
    if f.message_type is not None and wire.holds_tensors(getattr(pb, f.message_type.name))
)
_REQUEST_TENSORS = frozenset(
    f.name
    for f in _CALL.fields
    if f.message_type is not None and wire.holds_tensors(getattr(pb, f.message_type.name))
)


# --- the client's side -------------------------------------------------------------------


class Expected(NamedTuple):
    """A mutation's condition (Client.expecting): the state version its caller expects, and
    the server instance it read it from ("": none named)."""

    version: int
    instance: str


def request_pieces(
    method: str,
    request: Sequence[wire.Piece],
    request_id: str | None,
    expected: Expected | None,
    timeout_ms: int,
    if_previous_succeeded: bool = False,
) -> list[wire.Piece]:
    """A CallRequest for `method` holding `request` (the unary request's serialized pieces):
    its header, then the call's field, the pieces uncopied."""
    header = pb.CallRequest(
        request_id=request_id or "",
        timeout_ms=timeout_ms,
        if_previous_succeeded=if_previous_succeeded,
    )
    if expected is not None:
        header.expected_version = expected.version
        header.expected_instance = expected.instance
    return [header.SerializeToString(), *wire.length_field(METHODS[method][0], request)]


def unwrap_response(
    data: bytes | memoryview, method: str
) -> tuple[memoryview | None, bytes | None]:
    """(the unary response's bytes, None), or (None, a serialized google.rpc.Status) for an
    error; ValueError for bytes that are neither, or a response to another call than
    `method` (the server answers in order, so that would be a bug on one side)."""
    view = memoryview(data)
    result: tuple[memoryview | None, bytes | None] | None = None
    other = None  # a response to another call: anywhere in the message, a bug
    try:
        for number, wire_type, _, start, end in wire.fields(view, 0, len(view)):
            if number == ERROR_FIELD and wire_type == wire.LEN:
                result = None, bytes(view[start:end])
            elif number in _NAMES and wire_type == wire.LEN:
                if _NAMES[number] != method:
                    other = other or _NAMES[number]
                result = view[start:end], None
    except ValueError as err:
        raise ValueError(f"not a CallResponse: {err}") from None
    if other is not None:
        raise ValueError(f"a {other} response came for {method}")
    if result is None:
        raise ValueError(f"a CallResponse for {method} holds neither a response nor an error")
    if result[1] is not None:
        try:
            status_pb2.Status.FromString(result[1])
        except DecodeError as err:
            raise ValueError(f"its error is not a google.rpc.Status ({err})") from None
    return result


# --- the server's side -------------------------------------------------------------------


def unwrap_request(split: wire.Split[pb.CallRequest]) -> tuple[str | None, Any]:
    """(the RPC's name, its request as the unary handler takes it: a wire.Split for requests
    that carry tensors, with their values' paths from the call's own message); (None, None)
    when the message holds no call this server knows."""
    message = split.message
    field = message.WhichOneof("call")
    if field is None:
        return None, None
    request = getattr(message, field)
    if field in _REQUEST_TENSORS:
        # Only the kept call's values: a message of two call fields keeps the last, and the
        # values cut from an earlier one would be read as the kept one's (found by a review:
        # a TrainStep without values took a Forward's before it).
        number = pb.CallRequest.DESCRIPTOR.fields_by_name[field].number
        cut = {path[1:]: value for path, value in split.cut.items() if path[0][0] == number}
        request = wire.Split(request, cut)
    return _BY_FIELD[field], request


def named_call(data: bytes) -> tuple[str | None, str | None]:
    """For bytes that do not parse as a CallRequest: the call its last call field names
    (None when there is none to be found), and why that field's bytes are not that call's
    request (None when they are one: the fault lies elsewhere in the envelope)."""
    view = memoryview(data)
    found = None
    try:
        for number, wire_type, _, start, end in wire.fields(view, 0, len(view)):
            if number in _NAMES and wire_type == wire.LEN:
                found = number, start, end
    except ValueError:
        pass  # the envelope breaks off: a call field before the break still names its call
    if found is None:
        return None, None
    number, start, end = found
    request_type = getattr(pb, _CALL_TYPES[number])
    try:
        request_type.FromString(view[start:end])
    except DecodeError as err:
        return _NAMES[number], str(err)
    return _NAMES[number], None


def response_bytes(method: str, response: bytes) -> bytes:
    """The CallResponse holding `response` (the unary response's bytes), tensor values kept
    a multiple of wire.ALIGNMENT bytes from its first byte as they were from the response's:
    one copy of `response`."""
    number = METHODS[method][0]
    head = wire.varint(number << 3 | wire.LEN) + wire.varint(len(response))
    if number in _ALIGNED:
        return wire.join([*wire.alignment(_ALIGNMENT_FIELD, len(head)), head, response])
    return head + response


def error_bytes(status: bytes) -> bytes:
    """The CallResponse for a call that failed: `status`, a serialized google.rpc.Status."""
    return wire.varint(ERROR_FIELD << 3 | wire.LEN) + wire.varint(len(status)) + status


# --- Batch: several CallRequests in one unary call ---------------------------------------

_BATCH_CALLS = pb.BatchRequest.DESCRIPTOR.fields_by_name["calls"].number
_BATCH_ANSWERS = pb.BatchResponse.DESCRIPTOR.fields_by_name["answers"].number
_BATCH_ALIGNMENT = pb.BatchResponse.DESCRIPTOR.fields_by_name["alignment"].number


def batch_request_pieces(requests: Sequence[Sequence[wire.Piece]]) -> list[wire.Piece]:
    """A BatchRequest holding `requests` (each a CallRequest's pieces, request_pieces'),
    the pieces uncopied."""
    pieces: list[wire.Piece] = []
    for request in requests:
        pieces.extend(wire.length_field(_BATCH_CALLS, request))
    return pieces


def batch_calls(data: bytes | memoryview, most: int | None = None) -> list[memoryview]:
    """Each CallRequest's bytes in a BatchRequest, as views of `data`; ValueError for bytes
    that are no BatchRequest. Other fields (a newer client's) are passed over. `most`: stop
    at one call past it (the list then says there are too many), reading no further: a
    request of 2-byte calls holds millions."""
    return _messages(data, pb.BatchRequest, "calls", most)


def _messages(
    data: bytes | memoryview, message_type: type[Message], field: str, most: int | None = None
) -> list[memoryview]:
    """The views of `data`, a `message_type`, that its repeated message `field` holds, in
    order, at most `most` + 1; ValueError for bytes that are no such message, or that hold
    that field in another wire type."""
    wanted = message_type.DESCRIPTOR.fields_by_name[field].number
    view = memoryview(data)
    found = []
    try:
        for number, wire_type, _, start, end in wire.fields(view, 0, len(view)):
            if number == wanted:
                if wire_type != wire.LEN:
                    raise ValueError(f"field {field} has wire type {wire_type}, not a message")
                found.append(view[start:end])
                if most is not None and len(found) > most:
                    break
    except ValueError as err:
        raise ValueError(f"not a {message_type.DESCRIPTOR.name}: {err}") from None
    return found


def batch_response_bytes(answers: Sequence[bytes]) -> bytes:
    """The BatchResponse holding `answers` (each a CallResponse's bytes), each led by an
    alignment field as long as it takes to start it a multiple of wire.ALIGNMENT bytes from
    the first byte: the tensor values in it stay as aligned as in a CallResponse of its own.
    One copy of each answer."""
    pieces: list[wire.Piece] = []
    at = 0
    for answer in answers:
        head = wire.varint(_BATCH_ANSWERS << 3 | wire.LEN) + wire.varint(len(answer))
        pad = wire.alignment(_BATCH_ALIGNMENT, at + len(head))
        pieces += [*pad, head, answer]
        at += wire.size(pad) + len(head) + len(answer)
    return wire.join(pieces)


def batch_answers(data: bytes | memoryview) -> list[memoryview]:
    """Each CallResponse's bytes in a BatchResponse, as views of `data`, in order;
    ValueError for bytes that are no BatchResponse."""
    return _messages(data, pb.BatchResponse, "answers")
