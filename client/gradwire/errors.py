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
    """CANCELLED: a call in a pipeline or a batch whose answer will not be read, its
    stream cancelled or closed (whether it ran is not known: read the state version before
    making it again), or a call a stopping server cancelled before it began ("the server
    cancelled the call": call again once it is back). The server's CALLER_GONE, for a caller
    that went away, reaches no one: it is for the server's metrics."""

    code = grpc.StatusCode.CANCELLED


class Unknown(RemoteError):
    """UNKNOWN: no gradwire server answers it; gRPC's own status for an error in its
    machinery, or another server's or a proxy's at the target, its message theirs."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(RemoteError):
    """INVALID_ARGUMENT: a request the server refuses as written: a malformed tensor,
    a bad dtype, shape, fill, index or setting (BAD_TENSOR, BAD_FILL, BAD_INPUT_SHAPE,
    BAD_INDEX, BAD_BINS, READ_ONLY, NOT_A_PARAMETER, ...), an input the model itself refuses
    (MODEL_REFUSED), a Batch, a Watch or a fetch over its limit (BATCH_TOO_LONG,
    TOO_MANY_SELECTORS, metadata "limit"). Change the request as the message says;
    `reason` tells them apart (every one: the comment at the top of the .proto)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RemoteError):
    """DEADLINE_EXCEEDED: the call's timeout ran out (the client's `timeout`, or
    the call's own: the message names it; a large value over a slow link needs a longer
    one), a mutation whose deadline passed before it could run (DEADLINE_PASSED: not
    applied), or a Train the server ended before its deadline would cut a step
    (DEADLINE_PASSED, metadata "steps_done" and "version": what stays applied). A change
    that ran out once its server had it may have been applied (`changes_state`): read the
    version before sending it again."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(RemoteError):
    """NOT_FOUND: an unknown tensor name (UNKNOWN_TENSOR, metadata "name" and
    "closest", the nearest names; `list_tensors()` lists them all), an unknown or expired
    session (UNKNOWN_SESSION: open another), or a checkpoint the server's state directory
    does not hold (NO_CHECKPOINT, metadata "names": those it does)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RemoteError):
    """ALREADY_EXISTS: no gradwire server answers it; another gRPC server's at the
    target, or a proxy's between, its message theirs."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RemoteError):
    """PERMISSION_DENIED: no gradwire server answers it (a missing or wrong token is
    Unauthenticated); another gRPC server's at the target, or a proxy's between, its
    message theirs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RemoteError):
    """RESOURCE_EXHAUSTED: past a limit, or out of memory: too many elements
    (TOO_MANY_ELEMENTS), a value past one message (USE_STREAM: read and get stream it
    themselves), a fetch or a watch whose reply would be too large (FETCH_TOO_LARGE,
    WATCH_TOO_LARGE: ask for less), a device's or the host's memory (OUT_OF_MEMORY), too
    many calls at once (BUSY: retry shortly) or sessions (TOO_MANY_SESSIONS: close one), a
    Batch's answers past one message (BATCH_ANSWERS_TOO_LARGE), a full disk (DISK_FULL).
    `metadata` gives the bytes and the limit where it has them."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RemoteError):
    """FAILED_PRECONDITION: a call the state does not allow yet: Backward before
    Forward (NO_LOSS), on a freed or stale graph (GRAPH_FREED, GRAPH_STALE: Forward again),
    Step without gradients (NO_GRADIENTS), a session closed as the call reached it
    (CLOSED), a checkpoint call to a server without --state-dir (NO_STATE_DIR) or one its
    state directory could not take (STATE_DIR_UNWRITABLE); or a served model its operator
    is to fix (BAD_MODEL_OUTPUT, SHARED_MODEL, MODEL_BUILD_FAILED, REENTRANT_CHECKPOINT,
    EXPANDED_PARAMETER). The message says what to call first."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RemoteError):
    """ABORTED: a conditional mutation whose expected version is stale
    (VERSION_MISMATCH, metadata "version": read the state again before deciding), a retry
    of a mutation applied before whose answer the server no longer keeps (ANSWER_NOT_KEPT:
    read the state), or a call in a pipeline or a batch after one that failed, not run
    (PREVIOUS_FAILED, metadata "previous")."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(RemoteError):
    """OUT_OF_RANGE: an index past the end of a dimension (INDEX_OUT_OF_RANGE,
    metadata "index", "dimension" and that dimension's "size")."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(RemoteError):
    """UNIMPLEMENTED: what the server is older than: an RPC it lacks (the message
    names it: the server predates this client's gradwire, or is another gRPC server), an
    option it would ignore, refused by the client before sending (FIELD_NOT_KNOWN,
    metadata "field"), or a call in a pipeline or a batch that it refused there, not run
    (CALL_NOT_KNOWN, metadata "call": make it as a call of its own). Update the server, or
    leave the option out."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(RemoteError):
    """INTERNAL: an error the served model's own code raised (MODEL_ERROR: the message
    names the model, the pass and the error's type; the server's log has the traceback),
    anything else unexpected on the server (INTERNAL: its log has the details), or an
    answer the client could not read (whether the call ran is not known: read the state
    version)."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(RemoteError):
    """UNAVAILABLE: the server cannot be reached, or stopped: nothing answering at the
    target, a Watch, Train or Calls stream open as it stopped, or a Batch's call not run
    then (STOPPING: call again once it is back), a call cut off by a stop (a change then
    may have been applied: `changes_state`), or a connection closed for pinging too often.
    A read is retried first (`retries`); a change is not."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(RemoteError):
    """DATA_LOSS: no gradwire server answers it; another gRPC server's at the target,
    or a proxy's between, its message theirs."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(RemoteError):
    """UNAUTHENTICATED: no token, or the wrong one, for a server that requires one
    (NO_TOKEN, BAD_TOKEN): connect with the server's token (`token=`)."""

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
