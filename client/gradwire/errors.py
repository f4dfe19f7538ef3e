"""Typed exceptions for remote errors: one class per gRPC status code, built from grpc.RpcError.

The server attaches a google.rpc.ErrorInfo to every error; its `reason` ("UNKNOWN_TENSOR",
"NO_LOSS", ...) and `metadata` are exposed so that callers can branch without parsing text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ClientClosed",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GradwireError",
    "GradwireWarning",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
]


class GradwireError(Exception):
    """Base of the errors gradwire raises for its own conditions: every error the server
    (or the channel) answers (RemoteError), a tensor or index that cannot be encoded or
    decoded (codec.CodecError), a bad selector (selector.SelectorError) and a closed client
    (ClientClosed); the last three are ValueErrors too. Arguments of the wrong type, or
    refused as Python refuses them (a bad `out=` array, an unknown optimizer), raise
    TypeError or ValueError."""


class GradwireWarning(UserWarning):
    """Base of the warnings gradwire gives (Python's `warnings`): something works, but not
    as safely as it should, such as a token sent in plain text over the network
    (credentials.PlaintextTokenWarning). The `gradwire` command shows each as one line,
    "gradwire COMMAND: warning: ..."; `serve` logs it."""


class ClientClosed(GradwireError, ValueError):
    """A call on a client that was closed, or whose session was closed (`close_session`,
    `close`, the end of its `with` block): raised before anything is sent; or a Watch or
    Train under way that the client's close cut off. A closed session client's calls went
    to the server's default session, on its model, unnoticed."""

    def __init__(self, message: str, *, changes_state: bool = False) -> None:
        super().__init__(message)
        #: As RemoteError's: True for a Train cut off under way (its steps taken stay
        #: applied) or a change cut off under way (it may have been applied); False for a
        #: call refused before it was sent, or a read or Watch cut off.
        self.changes_state = changes_state


class RemoteError(GradwireError):
    """The server (or the channel to it) answered with a non-OK status."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, reason: str = "", metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        #: stable machine-readable cause from google.rpc.ErrorInfo, "" when absent
        self.reason = reason
        #: ErrorInfo metadata, e.g. {"name": "conv1.wieght", "closest": "conv1.weight"}
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Whether the call that failed changes state (a mutation, OpenSession,
        #: CloseSession, a Train, a save; set by the Client): failed once its server had it (its
        #: deadline passed, the server stopped under it), it may have been applied all
        #: the same, and a retry with a new request id would apply it again.
        self.changes_state = False

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(RemoteError):
    code = grpc.StatusCode.CANCELLED


class Unknown(RemoteError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(RemoteError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RemoteError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(RemoteError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RemoteError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RemoteError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RemoteError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RemoteError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RemoteError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(RemoteError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(RemoteError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(RemoteError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(RemoteError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(RemoteError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(RemoteError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    cls.code: cls for cls in RemoteError.__subclasses__()
}


def _error_info(error: Any) -> tuple[str, dict[str, str]]:
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError, DecodeError):  # a trailer a server garbled
        return "", {}
    if status is None:
        return "", {}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        try:
            if detail.Unpack(info):
                return info.reason, dict(info.metadata)
        except DecodeError:  # a server's garbled detail: the status stands without it
            continue
    return "", {}


def from_rpc_error(error: grpc.RpcError) -> RemoteError:
    """The typed exception for a failed call, with the server's message and ErrorInfo."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else None
    reason, metadata = _error_info(error)
    cls = _BY_CODE.get(code, Unknown)
    return cls(details or code.name.lower().replace("_", " "), reason=reason, metadata=metadata)
