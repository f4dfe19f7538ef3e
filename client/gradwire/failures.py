"""A failed call read: whether it reached a server, whether a stop cut it off, whether this
client had closed; and the exception raised for it, with words that say what happened and
what to do where gRPC's own say only a status's name ("CANCELLED", "Cancelling all calls").
Shared by the client's calls and streams (client.py) and pipelines and batches
(pipeline.py).
"""

from __future__ import annotations

import grpc

from gradwire import limits
from gradwire.errors import (
    Cancelled,
    ClientClosed,
    DeadlineExceeded,
    RemoteError,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)

#: What a call on a closed client raises (ClientClosed).
CLOSED = (
    "this client is closed (close(), or the end of its with block; a session client "
    "closes with the client that opened it): make a new one (gradwire.connect)"
)


def closed_channel(error: ValueError) -> Exception:
    """ClientClosed for grpc's ValueError on a closed channel ("Cannot invoke RPC on closed
    channel!"): the client, or the one whose channel it shares, was closed. Any other
    ValueError is returned as it is, to be raised."""
    if not str(error).startswith("Cannot invoke RPC"):
        return error
    return ClientClosed(CLOSED)


#: gRPC's words for a target it could not resolve to an address: "DNS resolution failed" in
#: earlier gRPC, "errors resolving ...: [... hostname lookup error ...]" in grpcio 1.85.
#: Taken for a call cut off mid-way, it was said to be "reached" and perhaps applied (found
#: by a review of the CLI).
UNRESOLVED = ("resolution", "errors resolving", "hostname lookup")

#: gRPC's words (grpcio 1.85) for an UNAVAILABLE call that never reached a server: nothing
#: listening, a name that did not resolve, or a plain-text call that a TLS port closed
#: ("failed to connect to all addresses; ...: Socket closed").
NEVER_REACHED = ("failed to connect", "connection refused", "socket closed", *UNRESOLVED)

#: gRPC's words (grpcio 1.85) for a call whose connection closed while the call was open,
#: "Stream removed (Socket closed)": the call was sent, and may have run. Its "Socket closed"
#: read as NEVER_REACHED's, a `gradwire save` whose server was killed mid-save was told
#: that the server serves TLS, nothing said that the save may have been written, and a
#: change cut off so, then retried against a port that refused, said only "Connection
#: refused".
STREAM_REMOVED = "stream removed"


#: gRPC's words (grpcio 1.85) for a call whose deadline passed with its messages under way,
#: an answer arriving or a request still being sent (lower case).
_DEADLINE_UNDER_WAY = "stream removed (deadline exceeded)"


def under_way(error: RemoteError) -> bool:
    """Whether `error` is a DEADLINE_EXCEEDED whose time ran out with the call's messages
    still crossing the network (gRPC's words kept in the message `failed` gives)."""
    return isinstance(error, DeadlineExceeded) and _DEADLINE_UNDER_WAY in error.message.lower()


def never_reached(message: str) -> bool:
    """Whether gRPC's message for an UNAVAILABLE call says it never reached a server."""
    text = message.lower()
    return STREAM_REMOVED not in text and any(words in text for words in NEVER_REACHED)


def cut_off(error: grpc.RpcError) -> bool:
    """Whether a call failed UNAVAILABLE after it was under way on a server ("Cancelling
    all calls" from a stopping server, "Connection reset by peer", "Stream removed")."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return not never_reached(error.details() or "")


def connection_lost(error: grpc.RpcError) -> bool:
    """Whether `error` is gRPC's UNAVAILABLE for a call whose connection closed while the
    call was open (the server died or was killed, or a proxy or the network dropped it)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and (
        STREAM_REMOVED in (error.details() or "").lower()
    )


#: The message of a call its server cancelled with gRPC's status alone, no words of its own.
SERVER_CANCELLED = "the server cancelled the call: it was stopping, or it closed the connection"


#: gRPC's whole message for the calls a stopping server still had in progress when its grace
#: period ended (grpc_server_cancel_all_calls).
_GRACE_ENDED = "cancelling all calls"


#: What a call on the server's files, not its state, may have done all the same, and how to
#: look: "read the state version" cannot show whether a checkpoint landed (found by a review
#: of restarts and recovery); the command line's hints say as much in its words.
_ON_FILES = {
    "SaveCheckpoint": ("written", " (saving again replaces it)"),
    "DeleteCheckpoint": ("removed", ""),
}


def _on_files(method: str, when: str = "") -> str:
    """What a call on the server's files (a key of _ON_FILES) may have done, and how to look."""
    done, after = _ON_FILES[method]
    return (
        f"the checkpoint may have been {done} all the same: list_checkpoints() shows "
        f"whether{when}{after}"
    )


def _then(changes_state: bool, aside: str = "", method: str | None = None) -> str:
    """What to do about a call cut off in progress, `aside` saying why a change may stand."""
    if changes_state and method in _ON_FILES:
        return _on_files(method, " once the server is back")
    if changes_state:
        return (
            f"its change may have been applied all the same{aside}: read the state version "
            "once the server is back before making it again"
        )
    return "make it again once the server is back"


def _grace_ended(changes_state: bool, method: str | None = None) -> str:
    """The message of a call cut off so: what happened, and what to do."""
    then = _then(changes_state, " (a step runs to its end)", method)
    return (
        "the server stopped with this call in progress: its grace period (gradwire serve "
        f'--grace) ended before the call did, and gRPC cancelled it ("Cancelling all '
        f'calls"); {then}'
    )


def _lost(changes_state: bool, said: str, method: str | None = None) -> str:
    """The message of a call whose connection closed while it was open: what happened,
    and what to do (gRPC's `said` kept, for a search of its words)."""
    then = _then(changes_state, method=method)
    return (
        "the connection to the server closed with this call in progress: the server stopped "
        f"or failed (its log says which), or the network to it went down; {then} (gRPC: "
        f"{said!r})"
    )


def grace_cut(error: grpc.RpcError) -> bool:
    """Whether `error` is gRPC's cancel of a call its stopping server still had in progress
    when the stop's grace period ended."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and (
        (error.details() or "").strip().lower() == _GRACE_ENDED
    )


def after_a_cut(
    raised: RemoteError | ClientClosed, cut: grpc.RpcError | None, method: str | None = None
) -> RemoteError | ClientClosed:
    """`raised`, the error of a call's last attempt, saying first what cut off an attempt
    before it (`cut`: a stop's grace period ending, or the connection closing, with the
    call in progress), which the retries that followed, refused by no server ("Connection
    refused"), hid, and with it that a change may have been applied (found by a review of
    the operator's path)."""
    if cut is not None and isinstance(raised, Unavailable):
        changes = raised.changes_state
        first = (
            _grace_ended(changes, method)
            if grace_cut(cut)
            else _lost(changes, cut.details() or "", method)
        )
        raised.message = f"{first}; retried: {raised.message}"
        raised.args = (raised.message,)
    return raised


def _bare_cancel(message: str) -> bool:
    """Whether a CANCELLED call's message is gRPC's name of the status alone (what a server's
    cancel gives; from_rpc_error's "cancelled" for none at all)."""
    return message.strip().lower() in ("cancelled", "")


#: What a change that ran out of time may have done, in its DeadlineExceeded's message.
MAY_HAVE_APPLIED = (
    "its change may have been applied all the same (read the state version before making it again)"
)


def failed(
    error: grpc.RpcError,
    changes_state: bool,
    keepalive: float | None = None,
    timeout: float | None = None,
    method: str | None = None,
) -> RemoteError:
    """The exception for a failed call, saying whether the call changes state; for a
    connection closed for "Too many pings" by a client pinging every `keepalive` seconds,
    more often than a gradwire server takes, what to give instead; and for a call that ran
    past its `timeout` (seconds, where the caller knows it), that time. `method`: the RPC,
    for what a cut-off call on the server's files leaves to check."""
    raised = from_rpc_error(error)
    raised.changes_state = changes_state
    bare_deadline = raised.message.strip().lower()
    if (
        isinstance(raised, DeadlineExceeded)
        and not raised.reason
        and timeout is not None
        and bare_deadline in ("deadline exceeded", _DEADLINE_UNDER_WAY)
    ):
        # gRPC's two words alone: a notebook's train_step of a large batch on a CPU said
        # neither the time it had had nor that its change may have landed (found by a
        # review of the Python client as a researcher uses it in a notebook).
        then = ""
        if changes_state and method in _ON_FILES:
            then = f": {_on_files(method)}"
        elif changes_state:
            then = f": {MAY_HAVE_APPLIED}"
        if bare_deadline == _DEADLINE_UNDER_WAY:
            # The time ran out with the call's bytes still crossing: a large read or write
            # over a slow link (a 16 MiB read takes 13 s at 10 Mbit/s). gRPC's words alone
            # named no timeout (found by a review of a researcher on a slow, distant link).
            raised.message = (
                f"Deadline Exceeded: the call's timeout of {timeout:g} s ran out with its "
                "messages still crossing the network: a large value over a slow link needs "
                f"a longer timeout (timeout= in gradwire.connect, or client.timeout){then} "
                f"(gRPC: '{raised.message.strip()}')"
            )
        else:
            raised.message += f": no answer within {timeout:g} s, the call's timeout{then}"
        raised.args = (raised.message,)
    if isinstance(raised, Cancelled) and not raised.reason and _bare_cancel(raised.message):
        # gRPC's word alone ("CANCELLED: CANCELLED") for a call its server cancelled: a stop
        # (the calls it had taken in and not begun), or a connection it closed. This
        # client's own cancels say so ("Locally cancelled by application!", "Channel
        # closed!"), and Ctrl-C is KeyboardInterrupt (found by a review of the CLI as a
        # researcher).
        raised.message = SERVER_CANCELLED
        raised.args = (raised.message,)
    if isinstance(raised, Unavailable) and not raised.reason and grace_cut(error):
        # gRPC's words alone ("UNAVAILABLE: Cancelling all calls") for a call in a pipeline
        # or a batch, or a stream, that a stop cut off: they said neither that the server
        # had stopped nor that the call may have run (found by a review of several users at
        # once). A unary call is retried, and then fails to connect.
        raised.message = _grace_ended(changes_state, method)
        raised.args = (raised.message,)
    if isinstance(raised, Unavailable) and not raised.reason and connection_lost(error):
        # gRPC's "Stream removed (Socket closed)" alone: nothing said that the call had
        # been sent, nor that its change may have run.
        raised.message = _lost(changes_state, error.details() or "", method)
        raised.args = (raised.message,)
    if (
        isinstance(raised, Unimplemented)
        and not raised.reason
        and method
        and raised.message.strip().lower() == "method not found!"
    ):
        # gRPC's three words alone for an RPC the server lacks: a client's save_checkpoint
        # against a server older than SaveCheckpoint said neither which call nor why, where
        # the CLI says "predates" (found by a review of clients and servers of different
        # versions). The client's own RPCs only: it names no other.
        raised.message = (
            f"the server has no {method} RPC: it predates this client's gradwire (a newer "
            "gradwire serve has it; server_info().version says the server's), or is a gRPC "
            "server other than gradwire's (gRPC: 'Method not found!')"
        )
        raised.args = (raised.message,)
    if (
        isinstance(raised, Unavailable)
        and "too many pings" in raised.message.lower()
        and keepalive
        and keepalive < limits.MIN_CLIENT_PING_S
    ):
        # gRPC's two words alone, the ping interval being the client's own setting.
        raised.message += (
            f" (the server closed the connection for pinging too often: this client pings "
            f"a silent connection every {keepalive:g} s, keepalive={keepalive:g}; a gradwire "
            f"server takes a ping every {limits.MIN_CLIENT_PING_S:g} s by default: give "
            f"keepalive={limits.MIN_CLIENT_PING_S:g} or more, or None for no pings)"
        )
        raised.args = (raised.message,)
    return raised
