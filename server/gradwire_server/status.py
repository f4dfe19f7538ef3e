"""How a refusal becomes a gRPC status: the error table (each DomainError's status code),
and the google.rpc.Status with its ErrorInfo (reason, domain, metadata) that every service
of the server ends a refused call with, cut to sizes every gRPC client takes. No handler
here: the servicer, the token check and the health and reflection services call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradwire import limits
from gradwire_server.errors import (
    AnswerNotKept,
    CallerGone,
    DeadlinePassed,
    DomainError,
    IndexOutOfRange,
    InvalidInput,
    ModelCodeError,
    ModelFault,
    NoSuchCheckpoint,
    NotConfigured,
    OverLimit,
    PreviousFailed,
    Stopping,
    UnknownTensor,
    VersionMismatch,
    WrongOrder,
)

#: The error table (README.md's "Errors", and the .proto's header), in code.
STATUS_OF: dict[type[DomainError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownTensor: grpc.StatusCode.NOT_FOUND,
    IndexOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    WrongOrder: grpc.StatusCode.FAILED_PRECONDITION,
    OverLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    VersionMismatch: grpc.StatusCode.ABORTED,
    AnswerNotKept: grpc.StatusCode.ABORTED,
    PreviousFailed: grpc.StatusCode.ABORTED,
    DeadlinePassed: grpc.StatusCode.DEADLINE_EXCEEDED,
    CallerGone: grpc.StatusCode.CANCELLED,
    Stopping: grpc.StatusCode.UNAVAILABLE,
    NoSuchCheckpoint: grpc.StatusCode.NOT_FOUND,
    NotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    ModelFault: grpc.StatusCode.FAILED_PRECONDITION,
    ModelCodeError: grpc.StatusCode.INTERNAL,
}


@dataclass(frozen=True)
class Malformed:
    """What the deserializer hands on for bytes that are not the request message."""

    type_name: str
    error: str
    #: The bytes, for a Calls stream to say which call they meant to carry.
    data: bytes = field(default=b"", repr=False)


#: The most characters of an error's message, and of each ErrorInfo metadata value, sent.
#: The message travels twice (grpc-message, and base64 inside grpc-status-details-bin), and
#: the trailers past 8 KiB are refused by the caller's gRPC, which then sees a transport
#: error and no ErrorInfo: a message that quotes a caller's input (a fill of 3,000
#: dimensions, an index chain 2,500 long) could reach that (found by a review).
MAX_MESSAGE_CHARS = 1000
MAX_METADATA_CHARS = 256


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + f" ... ({len(text)} chars)"


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
) -> None:
    """Ends the call with `code`, `message` and an ErrorInfo, all cut to sizes whose
    trailers every gRPC client takes."""
    context.abort_with_status(rpc_status.to_status(error_status(code, message, reason, metadata)))


def error_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]
) -> status_pb2.Status:
    """The google.rpc.Status `abort` sends: the message and an ErrorInfo, cut to size."""
    message = _cut(message, MAX_MESSAGE_CHARS)
    metadata = {k: _cut(v, MAX_METADATA_CHARS) for k, v in metadata.items()}
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(reason=reason, domain=limits.ERROR_DOMAIN, metadata=metadata)
    )
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])


def status_of(error: DomainError) -> grpc.StatusCode:
    """`error`'s status code: its class's in STATUS_OF, or the nearest base class's there;
    INTERNAL for a DomainError the table does not know."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def well_formed(request: Any) -> Any:
    """`request`, or InvalidInput (MALFORMED_REQUEST) for a Malformed one."""
    if isinstance(request, Malformed):
        raise InvalidInput(
            f"the request is not a valid {request.type_name}: {request.error}",
            reason="MALFORMED_REQUEST",
        )
    return request
