"""The Python client: one channel, typed methods returning numpy arrays, typed exceptions.

Every unary RPC goes through `_call` (which retries), and every server stream through
`_stream`: both apply the timeout. A call's grpc.RpcError becomes the exception of its status
code in `_error_of`, for these and for the calls of pipelines and batches (pipeline.py).
Tensors travel through the fast path of wire.py: sent from their own memory, received as
views of the reply.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import math
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwire import calls, codec, limits, rewatch, transfer, unary, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.call_stream import CallStream, Spent, garbled_answer, unknown_on_stream
from gradwire.credentials import (
    HEADER_VALUE,
    PlaintextTokenWarning,
    check_pem,
    check_token,
    pem_bytes,
)
from gradwire.errors import (
    ClientClosed,
    DeadlineExceeded,
    GradwireError,
    InvalidArgument,
    NotFound,
    RemoteError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from gradwire.failures import (
    CLOSED,
    after_a_cut,
    closed_channel,
    connection_lost,
    cut_off,
    failed,
    grace_cut,
)
from gradwire.limits import (
    EXPECTED_INSTANCE,
    EXPECTED_VERSION,
    MAX_SESSION_CHARS,
    REQUEST_ID,
    SESSION,
    Real,
    Whole,
    channel_options,
)
from gradwire.memory import KeptMemory
from gradwire.newest import Cancellable, Newest
from gradwire.results import (
    CheckpointInfo,
    ForwardResult,
    Listing,
    LoadedCheckpoint,
    OptimizerConfig,
    SavedCheckpoint,
    ServerInfo,
    ServerLimits,
    SessionInfo,
    SessionListing,
    StepResult,
    TensorInfo,
    TensorRead,
    TrainStepResult,
)
from gradwire.selector import parse_selector
from gradwire.targets import DEFAULT_TARGET, loopback_target, with_default_port
from gradwire.updates import (
    TensorStats,
    TrainProgress,
    WatchUpdate,
    train_progress,
    watch_update,
)

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack

    from gradwire.pipeline import Batch, Pipeline
    from gradwire.remote import RemoteModel

# With what this module defined before its results moved to results.py and the metadata
# keys to limits.py: imported alone, mypy --strict refused `from gradwire.client import
# ServerInfo` ("does not explicitly export"), which ran as before (a review of the split).
__all__ = [
    "DEFAULT_TARGET",
    "EXPECTED_VERSION",
    "REQUEST_ID",
    "SESSION",
    "CheckpointInfo",
    "Client",
    "ForwardResult",
    "Listing",
    "LoadedCheckpoint",
    "OptimizerConfig",
    "SavedCheckpoint",
    "ServerInfo",
    "ServerLimits",
    "SessionInfo",
    "SessionListing",
    "StepResult",
    "TensorInfo",
    "TensorRead",
    "TrainStepResult",
    "connect",
]

DEFAULT_TIMEOUT_S = 60.0

R = TypeVar("R", bound=Message)
#: What a call's answer becomes (unary.Encoded, Client._run).
T = TypeVar("T")
IndexChain = Sequence[codec.IndexKey]


#: The version of each client's innermost `expecting` block in this thread or task, with the
#: instance it was given (None: the client's own).
_EXPECTED_VERSION: contextvars.ContextVar[dict[Client, tuple[int, str | None]]] = (
    contextvars.ContextVar(
        "expected_version",
        default={},  # noqa: B039  # never changed: each block sets a new dict
    )
)


#: What a server older than eval_mode does with a Forward asked to run in evaluation mode.
_TRAINING_MODE = "runs the model in training mode (Dropout on, BatchNorm's statistics moved)"
#: ... and one older than keep_state with a SetOptimizer asked to keep the optimizer's state.
_REPLACED = (
    "replaces the optimizer with a new one, its state lost and the settings not given at "
    "their defaults"
)


#: The fields `Client._needs_field` looks up, all in the contract before ServerLimits'
#: connection_idle_s and max_connections were (2026-12-05): a server that reports either
#: knows them, though its GetServerInfo is older than its list of the fields it knows
#: (2026-12-06), which would have had every server before it refused them (a review).
_OLDER_THAN_THE_IDLE_LIMITS = frozenset(
    {"ForwardRequest.eval_mode", "ForwardChunk.eval_mode", "SetOptimizerRequest.keep_state"}
)


def fields_known(info: ServerInfo) -> frozenset[str]:
    """The fields a server is known to know: those it lists, or, where it lists none, those
    its limits tell of its age (`_OLDER_THAN_THE_IDLE_LIMITS`); none for a server older."""
    if info.known_fields:
        return frozenset(info.known_fields)
    if info.limits.connection_idle_s or info.limits.max_connections:
        return _OLDER_THAN_THE_IDLE_LIMITS
    return frozenset()


def _expected_metadata(expected: calls.Expected) -> list[tuple[str, str]]:
    """A mutation's condition as its unary call's metadata."""
    metadata = [(EXPECTED_VERSION, str(expected.version))]
    if expected.instance:
        metadata.append((EXPECTED_INSTANCE, expected.instance))
    return metadata


def _close_left_open(box: list[CallStream | None]) -> None:
    """A collected client's Calls stream, closed without waiting."""
    stream = box[0]
    if stream is not None:
        stream.close(wait=None)


#: From Client._on_stream: the call is to go as a call of its own.
_UNARY: Any = object()


def _back_off(attempt: int) -> None:
    """The wait before retry `attempt + 1`: 0.05 s, doubling each time. One schedule for every
    retry the client makes (UNAVAILABLE, and streamed reads cut short)."""
    time.sleep(0.05 * 2**attempt)


#: The channels a client has closed (close() of the client that made it): the clients that
#: share one (session clients, `channel=`) tell by it that theirs is closed where gRPC
#: raises nothing of its own (wait_ready, a stream under way).
_CLOSED_CHANNELS: weakref.WeakSet[grpc.Channel] = weakref.WeakSet()


def _closed_by_its_owner(channel: grpc.Channel) -> bool:
    """Whether `channel` was closed by whoever made it, a program's own `channel=` that no
    client closed. gRPC has no public way to ask: its readiness future, polling such a
    channel, died on a thread of its own printing "Cannot invoke RPC: Channel closed!" while
    wait_ready ran its whole timeout (found by the seventy-fourth session). Asked of the
    channel's C core, which refuses a closed channel's check; False where a channel has none
    (one of another kind, an intercepted channel)."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return False
    try:
        check(False)
    except ValueError:
        return True
    return False


#: The longest min_interval a Watch carries, in milliseconds (an int64 field).
_MAX_MS = codec.INT64_MAX


def _check_seconds(seconds: float | None, what: str, none: str = "") -> None:
    """ValueError naming `what` for a negative, NaN or infinite number of seconds (gRPC was
    given a negative interval without a word, and an infinite one raised OverflowError);
    TypeError for what is not a number. None passes where `none` says what it means."""
    if seconds is None and none:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} takes seconds, a number; got {seconds!r}")
    if not 0 <= seconds < math.inf:  # NaN too
        also = f"; {none}" if none else ""
        raise ValueError(f"{what} must be seconds, 0 or more and finite{also}; got {seconds!r}")


def _check_selectors(count: int, what: str) -> None:
    """ValueError past the selectors one call may name (the server's TOO_MANY_SELECTORS, said
    here, before the call: a watch's at its first update)."""
    if count > limits.MAX_SELECTORS:
        raise ValueError(
            f"{what} names {count} selectors; a server takes at most {limits.MAX_SELECTORS} in "
            "one call: select a slice ('conv1.weight[0, :4]') rather than its elements one by "
            "one, or watch in several calls"
        )


def _needs_target(method: str, target: object) -> None:
    """ValueError for a step given no target (None went on to "cannot send an array of
    dtype object")."""
    if target is None:
        raise ValueError(
            f"{method} needs a target: class indices, or values for a model trained with "
            "'mse' (an array, a torch tensor or a Fill)"
        )


def _check_stream_timeout(timeout: float | None) -> None:
    """A Watch's or Train's `timeout`: None (no limit), or seconds more than 0, up to what a
    gRPC deadline holds. A negative one fell back to the client's per-call timeout without a
    word, and inf, NaN or 1e10 ended the stream at once, DEADLINE_EXCEEDED (found by a
    review)."""
    _check_timeout(timeout, "timeout")


def _check_timeout(timeout: float | None, what: str) -> None:
    """A call's or stream's timeout: None (no limit), or seconds more than 0 and at most
    what a gRPC deadline holds. inf, NaN or 1e10 failed every call at once,
    DEADLINE_EXCEEDED; 0, which many read as no limit, failed some calls and not others."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} takes seconds, a number; got {timeout!r}")
    if not 0 < timeout <= limits.MAX_GRPC_SECONDS:  # NaN too
        raise ValueError(
            f"{what} must be more than 0 seconds and at most {limits.MAX_GRPC_SECONDS:,} "
            f"(about 24 days, the most a gRPC deadline holds); None: no limit; got {timeout!r}"
        )


class _OpenedSessions:
    """The sessions opened on one channel by open_session, and not closed or detached
    since: shared by the clients on that channel, for its owner to close them with it.
    Each is closed once, by whichever client claims it first: a session client closing
    its session while its channel's owner closes sent CloseSession twice, and the second
    got NOT_FOUND; or the owner closed the channel under the first, cancelling it."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._closing = 0  # claimed by a session client, its CloseSession in flight
        self._changed = threading.Condition()
        #: Set when the client that made this closes (claim_all): it and its session clients
        #: then raise ClientClosed, on a channel of their own (`channel=`), left open, as on
        #: one closed.
        self.closed = False
        #: The clients sharing this (the one that made it and its session clients), whose
        #: Calls streams close with it.
        self.clients: weakref.WeakSet[Client] = weakref.WeakSet()

    def add(self, session: str) -> bool:
        """Adds `session`; False once closed (claim_all has run), when it is not added."""
        with self._changed:
            if not self.closed:
                self._ids.add(session)
            return not self.closed

    def discard(self, session: str) -> None:
        with self._changed:
            self._ids.discard(session)

    @contextlib.contextmanager
    def claim(self, session: str) -> Iterator[bool]:
        """Claims `session` for the with block to close: False when it is not open here (or
        another client has claimed it). A close that fails gives it back, to try again."""
        with self._changed:
            claimed = session in self._ids
            if claimed:
                self._ids.remove(session)
                self._closing += 1
        if not claimed:
            yield False
            return
        closed = False
        try:
            yield True
            closed = True
        finally:
            with self._changed:
                self._closing -= 1
                if not closed:
                    self._ids.add(session)
                self._changed.notify_all()

    def claim_all(self, timeout: float | None) -> list[str]:
        """Every session still open, claimed, once the closes that session clients have in
        flight on the channel have ended (at most `timeout` seconds): the channel is about
        to close under them."""
        with self._changed:
            self._changed.wait_for(lambda: self._closing == 0, timeout)
            claimed = list(self._ids)
            self._ids.clear()
            self.closed = True  # in the same step: a session opened after it is not added
            return claimed


class _CutShort(Exception):
    """A streamed read that a mutation cut short after its first chunks (see _read_stream)."""

    def __init__(self, error: ResourceExhausted) -> None:
        super().__init__(str(error))
        self.error = error


def _merged(update: WatchUpdate, dropped: int) -> WatchUpdate:
    """`update`, counting in its `skipped` the `dropped` updates it replaced."""
    return dataclasses.replace(update, skipped=update.skipped + dropped) if dropped else update


def _update_weight(data: bytes) -> int:
    """The updates a WatchUpdate stands for: itself and those the server skipped."""
    return 1 + int(wire.split(data, pb.WatchUpdate).message.skipped)


def check_session(session: str | None, what: str) -> str | None:
    """`session`, or ValueError naming `what` unless it can be a session id: gRPC refused a
    non-ASCII one at every call (INTERNAL, "Invalid metadata", with its own log lines), and
    a 100,000-character one past the metadata's limit (found by a review of the CLI)."""
    if session is None:
        return None
    if not isinstance(session, str):
        raise TypeError(f"{what} must be a str, got {type(session).__name__}")
    if len(session) > MAX_SESSION_CHARS or not HEADER_VALUE.fullmatch(session):
        shown = (
            session if len(session) <= 40 else f"{session[:40]}... ({len(session):,} characters)"
        )
        raise ValueError(
            f"{what} {shown!r} is no session id: a server's are 32 hexadecimal characters "
            f"(gradwire open-session prints one; gradwire sessions lists those open), and an "
            f"id gRPC can send is printable ASCII, at most {MAX_SESSION_CHARS} characters"
        )
    return session


def _warn_plaintext_token(target: str) -> None:
    """PlaintextTokenWarning: the token is about to go to `target`, off this machine, with no
    TLS. Said, not refused: a network you trust (or a test's) needs no TLS. It went without
    a word (a security review, sixty-second session)."""
    warnings.warn(
        f"the bearer token goes to {target} without TLS, in plain text: anyone on the "
        "network between can read it and use it, and read every tensor; connect with TLS "
        "(Python: tls=True, ca=...; the command: --tls, --tls-ca), or on a network you trust, "
        "ignore this warning",
        PlaintextTokenWarning,
        stacklevel=_stacklevel_outside(),
    )


def _stacklevel_outside() -> int:
    """The stacklevel of the caller's first frame outside this module, for a warning that
    names the line that made the client (gradwire.connect(...), Client(...)) rather than
    gradwire's own."""
    level, frame = 1, sys._getframe(1)
    while frame.f_globals.get("__name__") == __name__ and frame.f_back is not None:
        level, frame = level + 1, frame.f_back
    return level


class Client:
    """A connection to a gradwire server: `gradwire.connect(target)`; close it, or use `with`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        ca: bytes | str | None = None,
        cert: bytes | str | None = None,
        key: bytes | str | None = None,
        keepalive: float | None = limits.CLIENT_KEEPALIVE_S,
        keepalive_timeout: float = limits.KEEPALIVE_TIMEOUT_S,
        session: str | None = None,
        stream_calls: bool = False,
    ) -> None:
        """`timeout`: seconds each call may take (None: no limit), past which it raises
        errors.DeadlineExceeded ("no answer within 60 s"), a change perhaps applied all the
        same (`changes_state`: read the version before sending it again); settable later
        (`.timeout`). Not a limit on watch() or train(), which take a timeout of their own.
        `token`: sent as a bearer token on every call, without the white space around
        it (a file's last newline); sent without TLS to a host that is not this machine's
        loopback, it gives a credentials.PlaintextTokenWarning as the client is made (shown
        once a line of code, as Python shows warnings). `tls`: connect with
        TLS, trusting `ca` (PEM, bytes or str; the system's roots when None); `cert` and
        `key` (PEM, bytes or str) for mutual TLS.
        `keepalive`: during a call, ping a connection silent this many seconds, so that a
        Watch or Train whose server vanished without closing the connection raises
        Unavailable once a ping goes `keepalive_timeout` seconds unanswered, instead of
        waiting for ever; None or 0: no pings (a negative, NaN or infinite value of either
        raises ValueError). The default (limits.CLIENT_KEEPALIVE_S, 5.5
        minutes) suits any gRPC server; a gradwire server takes pings every
        limits.MIN_CLIENT_PING_S seconds, and closes a connection pinged more often.
        `session`: act on a session opened elsewhere (another process's `open_session()`:
        its `.session`), to watch or read its training; closing this client leaves it open.
        An id that cannot be one (not printable ASCII, or past 256 characters) raises
        ValueError here, not at every call.
        `channel`: a gRPC channel of your own to call on (`target` then only names it in
        messages; `tls`, `ca`, `cert`, `key` and the keepalives are the channel's
        business), which close() leaves open for you to close.
        `stream_calls`: send the calls on a session (forward, backward, step, zero_grad,
        read, set, train_step, ...) as messages on one open stream (the Calls RPC), which
        saves each call the cost of a call of its own, 0.1-0.3 ms on a small machine:
        worth it for many small calls one after another. The stream holds one of the
        server's call places while this client is open; a call made while another thread's
        is on the stream goes as a call of its own. Errors, retries and timeouts are as
        without it; a server without Calls gets calls of their own. Settable later
        (`.stream_calls`)."""
        target = with_default_port(target)
        ca, cert, key = pem_bytes(ca, "ca="), pem_bytes(cert, "cert="), pem_bytes(key, "key=")
        if (cert is None) != (key is None):  # gRPC's C core aborts the process on half a pair
            given, missing = ("cert", "key") if cert is not None else ("key", "cert")
            raise ValueError(
                f"mutual TLS needs a client certificate and its private key: {given}= was "
                f"given without {missing}=; give both (PEM bytes), or neither"
            )
        _check_timeout(timeout, "timeout=")
        tls, stream_calls = unary.flag(tls, "tls="), unary.flag(stream_calls, "stream_calls=")
        _check_seconds(keepalive, "keepalive=", "0 or None: no pings")
        _check_seconds(keepalive_timeout, "keepalive_timeout=")
        if not keepalive_timeout:  # gRPC took 0 for a 1 ms wait for a ping's answer
            raise ValueError(
                "keepalive_timeout= must be more than 0 seconds (keepalive=None: no pings)"
            )
        check_pem(ca, "certificate", "ca=")
        check_pem(cert, "certificate", "cert=")
        check_pem(key, "private key", "key=")
        self.target = target
        self._timeout = timeout
        if token:  # gRPC refused a newline in it at every call: INTERNAL, "Invalid metadata"
            # White space around it goes, as around one in a file or GRADWIRE_TOKEN: a token
            # read with open(path).read() ends in the file's newline (found by a newcomer's
            # walkthrough of the README). One of white space alone is refused, not dropped.
            token = check_token(token.strip() if isinstance(token, str) else token, "token=")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._retries = 3
        self._session: str | None = check_session(session or None, "session=")
        #: The session this client acted on until it closed it: its calls then raise
        #: ClientClosed rather than act on the default session.
        self._closed_session: str | None = None
        self._owns_session = False  # opened by open_session: closing the client closes it
        #: For a session this client opened: the seconds without calls after which the
        #: server closes it (inf: never). None for the default session or one joined.
        self.session_idle_s: float | None = None
        self._owns_channel = channel is None  # made here: close() closes it
        self._opens_sessions = True  # not a session client: close() closes those it opened
        #: The ids of the sessions opened on this channel by open_session, at any depth
        #: (a session client's own open_session too), and not closed or detached since:
        #: the channel's owner closes them with it. Shared by those clients.
        self._opened = _OpenedSessions()
        self._keepalive = keepalive  # what "Too many pings" names
        options = channel_options(keepalive, keepalive_timeout)
        if channel is None and (tls or ca is not None or cert is not None):
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            channel = grpc.secure_channel(target, credentials, options=options)
        elif channel is None and token and not loopback_target(target):
            _warn_plaintext_token(target)
        self._channel = channel or grpc.insecure_channel(target, options=options)
        self._methods = self._bind(self._channel)
        self._stream_calls = stream_calls
        self._own_call_stream()
        self._no_calls = False  # no stream: the server has no Calls RPC, or this client closed
        self._closing = False  # close() has begun: a call it cuts off raises ClientClosed
        self._no_batch = False  # the server has no Batch RPC: a batch's calls go in a pipeline
        # Calls the server's Calls stream does not know (older than them): each goes unary.
        self._not_on_stream: set[str] = set()
        # The contract's fields the server knows (GetServerInfo), read when first needed.
        self._known_fields: frozenset[str] | None = None
        # The server instance this client's `expecting` blocks name: read before its first
        # call (_know_instance), and taken anew from a refusal naming another. None: not yet
        # read; "": the server has none (older than it).
        self._instance: str | None = None
        # Calls in one Batch: this client's limit until a server refuses a batch with its own
        # smaller one (BATCH_TOO_LONG), which is kept from then on.
        self._batch_calls = limits.MAX_BATCH_CALLS
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stream_above_bytes = limits.STREAM_ABOVE_BYTES
        self._chunk_bytes = limits.CHUNK_BYTES
        self._memory = KeptMemory()
        self._keep_memory = True
        #: Whether a call of the Trainer service on this client has succeeded: a server was
        #: there to answer (health() and wait_ready() leave it as it is). The `gradwire`
        #: command tells a server that went away mid-command by it.
        self.answered = False
        #: Whether a call of this client reached a server, answered or not: a failed
        #: attempt that was under way when the server cut it off (it stopped, cancelling
        #: its calls, or the connection was reset) may have been applied, where one that
        #: never connected was not. Retried, such a call fails on a closed port, which
        #: alone would read as no server ever there. Set with `answered` too.
        self.reached = False

    @property
    def session(self) -> str | None:
        """The session this client's calls act on; None: the server's default session, but
        for a client whose session is closed, whose calls raise ClientClosed (its repr says
        "session closed"). Setting it (None included) points the client there, closed
        session or not. A session client (open_session) pointed at another session acts on
        it as on one joined by its id (`session=`): close() leaves it open, close_session()
        closes it; the session it opened closes with the client that opened it."""
        return self._session

    @session.setter
    def session(self, session: str | None) -> None:
        session = check_session(session or None, "session")
        if session != self._session:
            # Its close_session() closed nothing, without a word: the client took the other
            # for the one it opened, and found it not among those opened (found by a review
            # of the client's API as a researcher uses it).
            self._owns_session = False
        self._session, self._closed_session = session, None

    # Settings a caller may change after connecting, checked as they are set: unchecked, a
    # timeout of "5" raised a TypeError from inside gRPC, -1 failed every call, and a
    # chunk_bytes of 0 sent a streamed tensor one value to a message (found by a review).

    @property
    def timeout(self) -> float | None:
        """Seconds each call may take before DEADLINE_EXCEEDED; None waits for ever."""
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        _check_timeout(timeout, "timeout")
        self._timeout = timeout

    @property
    def retries(self) -> int:
        """Attempts after the first, on UNAVAILABLE, for reads and mutations sent in one
        message (a mutation carries a request id, so the server applies it once); and for
        streamed reads that a concurrent mutation cut short (`read`). Streamed uploads,
        Watch, Train and health() are not retried, nor a change a stop cut off under way
        (the server restarted from the state the stop saved has forgotten its request id,
        and the change may be in that state). 0 or less: none."""
        return self._retries

    @retries.setter
    def retries(self, retries: int) -> None:
        self._retries = limits.whole(retries, "retries", -(2**31), 2**31)

    @property
    def stream_above_bytes(self) -> int:
        """A Forward's input or a set's value with more value bytes than this goes in chunks
        (ForwardStream, SetTensorStream); 0: every one. TrainStep and Train have no streamed
        form: a request of theirs past one message (64 MiB) raises ValueError before it is
        sent."""
        return self._stream_above_bytes

    @stream_above_bytes.setter
    def stream_above_bytes(self, size: int) -> None:
        self._stream_above_bytes = limits.whole(
            size, "stream_above_bytes", 0, codec.INT64_MAX, "every tensor in chunks"
        )

    @property
    def chunk_bytes(self) -> int:
        """Value bytes per chunk of a streamed tensor, either way (at least one value a
        chunk)."""
        return self._chunk_bytes

    @chunk_bytes.setter
    def chunk_bytes(self, size: int) -> None:
        self._chunk_bytes = limits.whole(size, "chunk_bytes", 1, limits.MAX_VALUE_BYTES)

    @property
    def keep_memory(self) -> bool:
        """Whether reads reuse the memory of the last large array they made once you have let
        it go (memory.py); on by default. Setting it False also lets that memory go."""
        return self._keep_memory

    @keep_memory.setter
    def keep_memory(self, keep: bool) -> None:
        self._keep_memory = unary.flag(keep, "keep_memory")
        if not keep:
            self._memory.release()

    @property
    def stream_calls(self) -> bool:
        """Whether calls on the session go on one open stream (see `stream_calls=`)."""
        return self._stream_calls

    @stream_calls.setter
    def stream_calls(self, on: bool) -> None:
        self._stream_calls = unary.flag(on, "stream_calls")

    @property
    def _allocate(self) -> codec.Allocate | None:
        """Where reads get the arrays they make."""
        return self._memory.empty if self._keep_memory else None

    @staticmethod
    def _bind(channel: grpc.Channel) -> dict[str, Any]:
        """A callable per RPC. Requests may be pre-serialized bytes; responses that carry
        tensors come back as bytes, to be split without copying their values."""
        methods = {}
        service = pb.DESCRIPTOR.services_by_name["Trainer"]
        for method in service.methods:
            deserialize = unary.PARSE_RESPONSE[method.name]
            kind = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(method.client_streaming, method.server_streaming)]
            methods[method.name] = kind(
                f"/{service.full_name}/{method.name}",
                request_serializer=unary.serialize,
                response_deserializer=deserialize,
            )
        return methods

    # --- plumbing -------------------------------------------------------------------

    def _call(
        self,
        method: str,
        request: Any,
        timeout: float | None = None,
        *,
        upload: transfer.Upload | None = None,
    ) -> Any:
        """One RPC. Mutations carry a fresh request id, so that retrying them is safe: the
        server applies an id once. Reads and mutations sent whole are retried on UNAVAILABLE
        (`retries` times, backing off); streamed uploads are not, their chunks being spent,
        nor a change a stop cut off (the next server may hold it, its id forgotten).
        `request`: a message, its bytes, or its pieces (wire.Piece) to be joined. With
        `stream_calls`, the calls a Calls stream carries go there. `upload`: a streamed
        upload's messages, counted for its progress."""
        if self._instance is None and method != "GetServerInfo":
            self._know_instance(method, timeout)
        metadata = [*self._metadata, *self._session_metadata(method)]
        retryable = method in unary.READS
        request_id, expected = self._once(method)
        if request_id is not None:
            metadata.append((REQUEST_ID, request_id))
            if expected is not None:
                metadata += _expected_metadata(expected)
            retryable = not isinstance(request, Iterator)
        on_stream = self._stream_calls and method in calls.METHODS and not self._no_calls
        if isinstance(request, list):
            unary.fits_one_message(method, request)
            pieces, request = request, None if on_stream else wire.join(request)
        elif on_stream:
            pieces = [unary.serialize(request)]
        retries = max(self.retries, 0)  # a negative count: no retry (it made no attempt)
        # The first attempt cut off in progress (a stop's grace period ending, or its
        # connection closing), which the error of the last attempt says first.
        cut: grpc.RpcError | None = None
        for attempt in range(retries + 1):
            try:
                if attempt and self._instance is None and method != "GetServerInfo":
                    self._know_instance(method, timeout)  # before the attempt that reads
                response = _UNARY
                if on_stream:
                    response = self._on_stream(method, pieces, request_id, expected, timeout)
                if response is _UNARY:
                    if request is None:
                        request = wire.join(pieces)
                    if upload is not None:
                        response = upload.run(
                            self._methods[method], request, timeout or self.timeout, metadata
                        )
                    else:
                        response = self._methods[method](
                            request, timeout=timeout or self.timeout, metadata=metadata
                        )
            except grpc.RpcError as err:
                # A change a stop cut off is not retried: it may be in the state the stop
                # saved, and its request id died with the server's memory, so the next
                # server, restored from that state, applied it again (a TrainStep twice: a
                # review of the error catalogue). The error says to read the version first.
                again = retryable and attempt < retries
                again &= not (method in unary.MAY_LAND and grace_cut(err))
                if not (again and err.code() == grpc.StatusCode.UNAVAILABLE):
                    # Raised, not kept in a local: the exception's traceback holds this
                    # frame, so a local holding the exception makes a cycle, which kept the
                    # frame and its callers' (f_back) alive until the cyclic collector ran:
                    # a get() that fell back to a stream kept its array, whose memory the
                    # next read was to reuse (seen in test_memory).
                    raise after_a_cut(
                        self._error_of(
                            err, method, method in unary.MAY_LAND, timeout or self.timeout
                        ),
                        cut,
                        method,
                    ) from None
                self.reached |= cut_off(err)
                if cut is None and (grace_cut(err) or connection_lost(err)):
                    cut = err
                _back_off(attempt)
            except ValueError as err:
                raise closed_channel(err) from None
            else:
                self.answered = self.reached = True
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, method: str) -> tuple[str | None, calls.Expected | None]:
        """What makes `method` safe to retry and conditional: a fresh request id for the
        calls that take one (unary.ONCE), and for mutations the condition of this client's
        innermost `expecting` block; None where there is none."""
        if method not in unary.ONCE:
            return None, None
        # 128 random bits in 32 hex digits. Not uuid.uuid4().hex: the same digits, but its
        # Python costs a remote Step 0.014-0.018 ms (docs/performance-history.md, eleventh session).
        request_id = os.urandom(16).hex()
        return request_id, self._expected() if method in unary.MUTATIONS else None

    def _run(self, encoded: unary.Encoded[T]) -> T:
        """The result of an encoded call, made now."""
        try:
            response = self._call(encoded.method, encoded.request)
        except InvalidArgument as err:
            if encoded.on_invalid is not None:
                encoded.on_invalid(err)
            raise
        return encoded.result(response)

    @property
    def _calls(self) -> CallStream | None:
        """This client's Calls stream, open or spent; None before its first call."""
        return self._calls_box[0]

    def _own_call_stream(self) -> None:
        """A place of this client's own for its Calls stream, which is closed (without
        waiting) when the client is collected unclosed: a stream left open holds a place on
        the server, and a gRPC thread here, for as long as its channel lives."""
        self._calls_box: list[CallStream | None] = [None]
        self._calls_guard = threading.Lock()  # for opening and replacing it
        weakref.finalize(self, _close_left_open, self._calls_box)
        self._opened.clients.add(self)

    def _on_stream(
        self,
        method: str,
        request: list[wire.Piece],
        request_id: str | None,
        expected: calls.Expected | None,
        timeout: float | None,
    ) -> Any:
        """`method`'s response, from a call on this client's Calls stream; _UNARY when the
        call is to go as a call of its own: another thread's call is on the stream, or the
        server has no Calls RPC (then none of this client's calls go there again)."""
        if method in self._not_on_stream:
            return _UNARY
        stream = self._call_stream()
        if stream is None or not stream.lock.acquire(blocking=False):
            return _UNARY
        try:
            payload = stream.call(
                method,
                request,
                request_id,
                expected,
                timeout or self.timeout,
            )
            try:
                return unary.decoded(method, payload)
            except ValueError as err:
                # A server that garbles one answer: the next is not trusted either. Under the
                # stream's lock, where no other thread's call is on it (a review).
                stream.cancel()
                raise garbled_answer(err) from None
        except Spent:  # ended by another thread meanwhile (closed, or another session)
            return _UNARY
        except grpc.RpcError as err:
            if stream.refused(err):
                self._no_calls = True  # the call never ran: it goes as a call of its own
                return _UNARY
            if unknown_on_stream(err):
                # A server older than the call's place on the stream refuses it there, not
                # run, INVALID_ARGUMENT, where the call of its own says UNIMPLEMENTED or does
                # it (a DeleteCheckpoint: a review of clients and servers of different
                # versions). Its calls go unary from now on.
                self._not_on_stream.add(method)
                return _UNARY
            raise
        finally:
            stream.lock.release()

    def _call_stream(self) -> CallStream | None:
        """This client's open Calls stream, for its session: opened now when there is none,
        the last one failed, or the client has moved to another session."""
        if self._opened.closed:  # a pipeline's: the stream is closed, or closing
            raise ClientClosed(CLOSED)
        stream = self._calls
        if stream is not None and stream.usable and stream.session == self._session:
            return stream
        with self._calls_guard:
            stream = self._calls
            if self._no_calls:
                return None
            if stream is None or not stream.usable or stream.session != self._session:
                if stream is not None:  # a call of another thread's on it still gets its answer
                    stream.close(wait=None)
                stream = self._calls_box[0] = self._open_call_stream()
            return stream

    def _open_call_stream(self) -> CallStream:
        """A new Calls stream on this client's session."""
        metadata = [*self._metadata, *self._session_metadata("Calls")]
        try:
            return CallStream(self._methods["Calls"], metadata, self._session)
        except ValueError as err:
            raise closed_channel(err) from None

    def _close_call_stream(self, wait: float | None = 1.0) -> None:
        """Ends this client's Calls stream, if it has one open, as after its last call."""
        with self._calls_guard:
            stream, self._calls_box[0] = self._calls, None
        if stream is not None:
            stream.close(wait)

    def _error_of(
        self,
        error: grpc.RpcError,
        method: str,
        changes_state: bool,
        timeout: float | None = None,
    ) -> ClientClosed | RemoteError:
        """The exception for a call that failed with `error` (`changes_state`: the call
        may have been applied), noting in `reached` a call cut off on its server.
        ClientClosed for a call under way (in another thread, or a stream being read) that
        gRPC cancelled as this client's channel closed: its "CANCELLED: Stream removed
        (Channel closed!)" read as the server's doing (a Train's steps taken stay
        applied). So too for a call on this client's Calls stream that its close() cut
        off, the channel given (`channel=`) and left open: it raised "CANCELLED: Locally
        cancelled by application!" (found by a review of call_stream.py). `timeout`: the
        call's, for a DeadlineExceeded to say."""
        cancelled = error.code() == grpc.StatusCode.CANCELLED
        if cancelled and (self._closing or self._channel in _CLOSED_CHANNELS):
            cut = f"{method} cut off"
            if method == "Train":
                cut += ", its steps taken staying applied (read the state version)"
            return ClientClosed(f"{cut}: {CLOSED}", changes_state=changes_state)
        self.reached |= cut_off(error)
        raised = failed(error, changes_state, self._keepalive, timeout, method)
        if raised.reason == "VERSION_MISMATCH" and self._instance:
            self._take_instance(raised.metadata.get("instance", ""))
        return raised

    @contextlib.contextmanager
    def expecting(
        self, version: int | np.integer[Any], *, instance: str | None = None
    ) -> Iterator[None]:
        """Mutations made through this client in this block (this thread or task), a
        Train's first step included, apply only if its session is still at `version`;
        otherwise they change nothing and raise gradwire.errors.Aborted (reason
        VERSION_MISMATCH). Other clients' calls, a session client's included, are not
        affected: each session has a version of its own.

        The condition names the server instance too (`instance_id`, read before this
        client's first call): a server started again counts its versions afresh, from 0
        or a checkpoint's, and its version 4 is not the state an earlier one was at at 4.
        A version this client read is so refused once the server has restarted since
        (Aborted, VERSION_MISMATCH, metadata "instance"), where it was applied to another
        state; after such a refusal the client names the new instance, so read the state
        again before you retry, in every thread that shares the client. `instance`: the
        instance `version` was read from, for a version another client or process read
        (its `instance_id`); by default this client's."""
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise TypeError(f"expecting takes a state version (an int), got {version!r}")
        if not 0 <= version < 2**63:
            raise ValueError(f"a state version is from 0 to 2**63 - 1, got {version}")
        if instance is not None and not limits.is_instance_id(instance):
            raise ValueError(
                "instance= is a server's instance id, 16 lowercase hex digits "
                f"(Client.instance_id, ServerInfo.instance_id), got {instance!r}"
            )
        token = _EXPECTED_VERSION.set({**_EXPECTED_VERSION.get(), self: (int(version), instance)})
        try:
            yield
        finally:
            _EXPECTED_VERSION.reset(token)

    def pipeline(self, *, stop_at_error: bool = True) -> Pipeline:
        """Calls written without waiting for their answers, run in order on the server:

            with client.pipeline() as p:
                out = p.forward(x, y)
                p.backward()
                p.step()
                weight = p.get("conv1.weight[0]")
            print(out.result().loss, weight.result())

        Each call returns a gradwire.Pending at once; `.result()` waits for its answer, and
        the block ends once every answer is in. The client waits once for all of them
        instead of once each: n calls cost about one round trip, not n. `stop_at_error`:
        a call whose predecessor failed is not run (errors.Aborted, reason
        PREVIOUS_FAILED), and the block raises the first failure not looked at (False:
        every call runs whatever came before). On this client's Calls stream, which the
        first pipeline opens if `stream_calls` has not, and which then stays open (holding
        one server place) until the client closes; while another thread's call is on it, on
        a stream of its own for the block. See gradwire.pipeline.Pipeline for what it
        carries."""
        from gradwire.pipeline import Pipeline  # it builds on this module

        return Pipeline(self, stop_at_error=stop_at_error)

    def batch(self, *, stop_at_error: bool = True) -> Batch:
        """Calls sent together in one unary call (the Batch RPC), run in order on the server:

            with client.batch() as b:
                out = b.forward(x, y)
                b.backward()
                b.step()
                weight = b.get("conv1.weight[0]")
            print(out.result().loss, weight.result())

        As a pipeline (the same calls, each returning a gradwire.Pending, and
        `stop_at_error`), but the calls go in one message when the block ends, or when a
        result is asked for inside it, and come back in one: the cheapest way to make calls
        that need no answer before the next, and one that needs no stream. See
        gradwire.pipeline.Batch."""
        from gradwire.pipeline import Batch  # it builds on this module

        return Batch(self, stop_at_error=stop_at_error)

    def _expected(self) -> calls.Expected | None:
        """The condition of this client's innermost `expecting` block; None outside one."""
        expected = _EXPECTED_VERSION.get().get(self)
        if expected is None:
            return None
        version, instance = expected
        return calls.Expected(version, (self._instance or "") if instance is None else instance)

    @property
    def instance_id(self) -> str | None:
        """The id of the server instance this client's `expecting` blocks name: the one it
        read before its first call, or the one a refusal named since (the server started
        again). None before the first call, or from a server older than the id."""
        return self._instance or None

    def _know_instance(self, method: str, timeout: float | None) -> None:
        """Reads the server's instance id (GetServerInfo) before this client's first call,
        `method`: the versions its calls then read are of that instance or of one started
        after it, and a mutation expecting one of them is refused, not applied, once the
        server has restarted (refused needlessly if it restarted between the two reads: the
        error says to read again). One attempt, within the call's timeout: a failure leaves
        it to the next call, this one going on to meet whatever failed it, but for the
        timeout, which is the call's (a server that never answers: the call would have
        waited as long again); a server older than GetServerInfo, or than the id, has none
        ("": no instance is sent)."""
        timeout = timeout or self.timeout
        try:
            metadata = [*self._metadata, *self._session_metadata("GetServerInfo")]
            response = self._methods["GetServerInfo"](
                pb.GetServerInfoRequest(), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._instance = ""
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._error_of(err, method, False, timeout) from None
            self.reached |= cut_off(err)
            return
        except (GradwireError, ValueError):  # closed: the call itself says so
            return
        self.answered = self.reached = True
        if self._instance is None:
            self._instance = response.instance_id

    def _take_instance(self, named: str) -> None:
        """The instance a refusal of an expected version named (VERSION_MISMATCH, metadata
        "instance"), where it is not the one this client names: the server started again,
        and the versions read from now on are of the new one."""
        if limits.is_instance_id(named) and named != self._instance:
            self._instance = named

    def _stream(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = -1.0,
        metadata: Sequence[tuple[str, str]] = (),
        on_call: Callable[[grpc.Call], object] | None = None,
    ) -> Generator[Any, None, None]:
        """A server stream, with errors raised as the exception of their status code.

        `timeout`: for the whole stream; the client's per-call timeout unless given (None:
        no limit). `metadata`: more, besides the token's and the session's. Closing the
        iterator early cancels the call; so does cancelling the call `on_call` is given.
        """
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        if self._instance is None:
            self._know_instance(method, timeout)
        metadata = [*self._metadata, *self._session_metadata(method), *metadata]
        try:
            call = self._methods[method](request, timeout=timeout, metadata=metadata)
        except ValueError as err:
            raise closed_channel(err) from None
        if on_call is not None:
            on_call(call)
        try:
            for message in call:
                self.answered = self.reached = True
                yield message
        except grpc.RpcError as err:
            # A read's timeout is the client's, named in its error as a unary call's is: a
            # streamed read past it on a slow link said gRPC's words alone (found by a
            # review of a researcher on a slow, distant link). A Watch's or a Train's is the
            # caller's own end.
            named = timeout if method == "GetTensorStream" else None
            raise self._error_of(err, method, method == "Train", named) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    def close(self) -> None:
        """Closes the channel; a session client (open_session) closes its session instead.
        A session joined (`session=`) stays open. Every session opened on this client's
        channel (by it, its session clients, theirs...) and not closed or detached is
        closed with the channel, its client object kept or not: it would stay open on the
        server until it expired, no client left to close it. A channel given (`channel=`)
        is left open, for its owner to close: the sessions are closed all the same, and
        this client's calls, and its session clients', raise ClientClosed from then on
        (calls already under way on that channel go on, but for one of this client's on
        its Calls stream, `stream_calls`, which is cut off, ClientClosed, if it has not
        been answered within a second)."""
        try:
            self._closing = True
            self._no_calls = True  # a call after close() opens no stream that nothing closes
            self._close_call_stream()
            if self.session is not None and self._owns_session:
                self.close_session()
            if self._opens_sessions:
                # Before: a client given its channel left them open until they expired, and
                # went on calling (found by a review of the client). Its session clients'
                # streams each held a place on the server, open channel and closed session
                # or not (a review of that change).
                for session in self._opened.claim_all(self.timeout):
                    with contextlib.suppress(GradwireError):  # they expire in any case
                        self._call("CloseSession", pb.CloseSessionRequest(session=session))
                for client in list(self._opened.clients):
                    client._close_call_stream(wait=None)
            if self._owns_channel:
                _CLOSED_CHANNELS.add(self._channel)  # before: a stream it cuts off checks it
                self._channel.close()
        finally:
            self._memory.release()

    def _session_metadata(self, method: str) -> list[tuple[str, str]]:
        """The metadata naming this client's session; ClientClosed once it has closed it
        (but for opening another: OpenSession acts on none), or once the client that opened
        it has closed."""
        if self._opened.closed and method != "CloseSession":  # closing goes on
            raise ClientClosed(CLOSED)
        if self._session:
            return [(SESSION, self._session)]
        if self._closed_session is not None and method not in unary.SESSIONLESS:
            raise ClientClosed(
                f"this client's session {self._closed_session!r} is closed: open another "
                "(open_session()), or act on the server's default session through a client "
                "of no session (or set this one's .session = None)"
            )
        return []

    def open_session(
        self,
        seed: Whole | None = None,
        optimizer: Literal["sgd", "adam"] | None = None,
        **settings: Unpack[unary.OptimizerSettings],
    ) -> Client:
        """A client for a new session of its own (own model, optimizer and version), on this
        client's channel; `with` it, or close it, to close the session.

        `seed` seeds its model's initialisation, as in reset(); `optimizer` and `settings`
        (lr, momentum, ...) as in set_optimizer; unset: SGD, lr 1.0.
        """
        request = pb.OpenSessionRequest()
        if seed is not None:
            request.seed = limits.check_seed(seed)
        if optimizer is not None or settings:
            request.optimizer.CopyFrom(unary.optimizer_config(optimizer or "sgd", settings))
        response = self._call("OpenSession", request)
        other = copy.copy(self)
        other._own_call_stream()  # a stream of its own, for its session
        other.session = response.session
        other.session_idle_s = response.idle_timeout_s
        other._owns_session = True
        other._owns_channel = other._opens_sessions = False
        if not self._opened.add(response.session):  # shared with other
            # This client closed while the session opened: closed now, or it would stay
            # open until it expired (a review found it left so, its client's close failing).
            with contextlib.suppress(GradwireError):
                self._call("CloseSession", pb.CloseSessionRequest(session=response.session))
            raise ClientClosed(CLOSED)
        return other

    def detach(self) -> str:
        """Leaves this client's session open when this client, or the one that opened it,
        closes: for another process to use (`Client(target, session=id)`, the CLI's
        `--session`) and close (`close_session()`, `gradwire close-session`). The server
        closes it after `session_idle_s` without calls. Returns the session's id."""
        if self.session is None:
            if self._closed_session is not None:
                raise ClientClosed(f"this client's session {self._closed_session!r} is closed")
            raise ValueError("this client acts on the default session: there is none to detach")
        self._owns_session = False
        self._opened.discard(self.session)
        return self.session

    def close_session(self) -> None:
        """Closes this client's session on the server (its model is freed). A session this
        client opened that the server no longer has (it expired, another client closed it
        by its id, the server restarted) counts as closed; one joined by its id (`session=`),
        or detached (`detach()`), raises NotFound, the id being perhaps mistyped. A client
        without a session (it drives the server's default model, which no client closes; or
        its session is closed already) has nothing to close: this does nothing."""
        if self.session is None:
            return
        self._close_call_stream()  # it holds a place, on a session about to close
        if not self._owns_session:  # joined (session=) or detached
            self._call("CloseSession", pb.CloseSessionRequest(session=self.session))
        else:
            with self._opened.claim(self.session) as mine:  # else closed with its channel
                if mine:
                    try:
                        self._call("CloseSession", pb.CloseSessionRequest(session=self.session))
                    except NotFound as err:
                        # Opened here, gone there: it expired (idle), was closed by another
                        # client by its id, or the server restarted. What closing asked for
                        # is done. (An id joined is checked: it may be a typo.)
                        if err.reason != "UNKNOWN_SESSION":
                            raise
        closed, self.session = self.session, None
        self._closed_session = closed

    def __repr__(self) -> str:
        """The target and the session, and what stops the client calling: a notebook shows
        it so. A closed client printed as an open one, and a session client whose session
        is closed as a client of the default session, which its calls never fall back to
        (found by a review of the client as a researcher uses it in a notebook)."""
        session = self.session if self.session is not None else self._closed_session
        shown = f"gradwire.Client({self.target!r}" + (
            f", session={session!r})" if session is not None else ")"
        )
        if self._opened.closed or self._channel in _CLOSED_CHANNELS:
            return f"{shown} (closed)"
        if self._closed_session is not None:
            return f"{shown} (session closed)"
        return shown

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if error is None:
            self.close()
            return
        # The block's own error is the one to see: closing the client after it (the server
        # gone, say) must not put its error in the block's place.
        try:
            self.close()
        except GradwireError as failed:
            note = f"and closing the client after it failed: {failed}"
            if hasattr(error, "add_note"):  # Python 3.11 on; 3.10 shows no notes
                error.add_note(note)
            else:  # pragma: no cover - Python 3.10
                warnings.warn(note, RuntimeWarning, stacklevel=2)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel connects; gradwire.errors.Unavailable after `timeout` s,
        ClientClosed at once when the channel is closed (a session's client shares its
        parent's channel, which stays open when the session's client closes; a `channel=`
        its owner closed is closed too)."""
        # gRPC's readiness future polls a closed channel on a thread of its own, which died
        # printing "Cannot invoke RPC: Channel closed!", and the wait ran its whole timeout.
        _check_timeout(timeout, "wait_ready's timeout")  # -1 said no server answered
        if (
            self._channel in _CLOSED_CHANNELS
            or self._opened.closed
            or _closed_by_its_owner(self._channel)
        ):
            raise ClientClosed(CLOSED)
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                f"no gradwire server answered at {self.target} within {timeout}s"
            ) from None
        finally:
            # Left waiting (a timeout, Ctrl-C), the future kept a thread polling the channel,
            # and connecting to the absent server, until the client closed (found by a
            # review of the client's API as a researcher uses it). A no-op once ready.
            ready.cancel()

    def health(self, service: str = "") -> str:
        """The standard health check's answer: "SERVING", "NOT_SERVING", ...; `service`: ""
        for the server as a whole, or "gradwire.v1.Trainer"."""
        if not isinstance(service, str):  # protobuf took None for "", 5 for its own error
            raise TypeError(f"service is a str, such as 'gradwire.v1.Trainer'; got {service!r}")
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout,
                metadata=[*self._metadata, *self._session_metadata("Health")],
            )
        except grpc.RpcError as err:
            raise failed(err, False, self._keepalive) from None
        except ValueError as err:
            raise closed_channel(err) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # --- the training step ------------------------------------------------------------

    def forward(self, input: Any, target: Any = None, *, eval_mode: bool = False) -> ForwardResult:
        """model(input) and, with a target, the loss. Each is an array, a torch tensor or a Fill.

        `eval_mode` runs the model in evaluation mode for this call, as model.eval() does
        (BatchNorm uses its running statistics and leaves them be; Dropout passes through);
        the server's model trains otherwise. Backward still runs after it. A server older
        than eval_mode would ignore it and train: refused here, before anything is sent,
        errors.Unimplemented (FIELD_NOT_KNOWN), where GetServerInfo does not list it.

        An input larger than `stream_above_bytes` is sent in chunks (ForwardStream). Values
        of int8, uint8, int16 and uint16 travel as int32, and uint32 as int64 (the wire has
        no smaller integers): a refusal naming the dtype sent says what was given.
        """
        if unary.nbytes(input) <= self.stream_above_bytes:
            return self._run(self._forward(input, target, eval_mode))
        evaluating = unary.flag(eval_mode, "eval_mode")
        if evaluating:
            self._needs_field("ForwardChunk.eval_mode", "eval_mode=True", _TRAINING_MODE)
        chunks = self._forward_chunks(input, target, evaluating)
        try:
            response = self._call("ForwardStream", unary.begun(chunks))
        except InvalidArgument as err:
            unary.tell_widenings(err, unary.widenings(input=input, target=target))
            raise
        return unary.forward_result(response)

    def _forward(
        self, input: Any, target: Any, eval_mode: bool = False
    ) -> unary.Encoded[ForwardResult]:
        evaluating = unary.flag(eval_mode, "eval_mode")
        pieces = unary.source_pieces("ForwardRequest", "input", input)
        if target is not None:
            pieces += unary.source_pieces("ForwardRequest", "target", target)
        if evaluating:  # after the arguments' own checks, which make no call (a review)
            self._needs_field("ForwardRequest.eval_mode", "eval_mode=True", _TRAINING_MODE)
            pieces.append(pb.ForwardRequest(eval_mode=True).SerializeToString())
        return unary.Encoded(
            "Forward", pieces, unary.forward_result, unary.widening_teller(input, target)
        )

    def _forward_chunks(self, input: Any, target: Any, eval_mode: bool = False) -> Iterator[bytes]:
        number = unary.FIELD[("ForwardChunk", "input")]
        for i, (dtype, run, offset, shape) in enumerate(
            unary.chunks("input", input, self.chunk_bytes)
        ):
            pieces = wire.length_field(number, codec.chunk_pieces(run, dtype, offset, shape))
            if i == 0 and target is not None:
                pieces += unary.source_pieces("ForwardChunk", "target", target)
            if i == 0 and eval_mode:
                pieces.append(pb.ForwardChunk(eval_mode=True).SerializeToString())
            yield wire.join(pieces)

    # What it fetches follows as_torch, as read's value does.
    @overload
    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: Literal[False] = False,
    ) -> TrainStepResult[np.ndarray[Any, Any] | None]: ...

    @overload
    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: Literal[True],
    ) -> TrainStepResult[torch.Tensor | None]: ...

    @overload
    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: bool,
    ) -> TrainStepResult[np.ndarray[Any, Any] | torch.Tensor | None]: ...

    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: bool = False,
    ) -> TrainStepResult[Any]:
        """One training step in one call: [zero_grad,] forward, backward, step, then reads.

        `fetch` names what to read after the step, as selectors: "conv1.weight.grad[0]";
        `as_torch` reads them as torch tensors, as in read(). `zero_grad` (the default)
        zeroes the gradients first; False adds this step's to them.
        """
        return self._run(self._train_step(input, target, zero_grad, fetch, as_torch))

    def _train_step(
        self, input: Any, target: Any, zero_grad: bool, fetch: Iterable[str], as_torch: bool
    ) -> unary.Encoded[TrainStepResult]:
        _needs_target("train_step", target)
        request = pb.TrainStepRequest(zero_grad=unary.flag(zero_grad, "zero_grad"))
        unary.torch_flag(as_torch)
        pieces = unary.source_pieces("TrainStepRequest", "input", input)
        pieces += unary.source_pieces("TrainStepRequest", "target", target)
        for text in unary.tensor_names(fetch):
            selector = parse_selector(text)
            request.fetch.add(name=selector.name, index=codec.indices_to_proto(selector.index))
        _check_selectors(len(request.fetch), "train_step's fetch")
        pieces.append(request.SerializeToString())
        result = functools.partial(unary.train_step_result, as_torch=as_torch)
        return unary.Encoded("TrainStep", pieces, result, unary.widening_teller(input, target))

    def backward(self, *, retain_graph: bool = False) -> int:
        """loss.backward(retain_graph=retain_graph); returns the new state version.
        `retain_graph` keeps the graph for another Backward, as in torch."""
        return self._run(unary.backward(retain_graph))

    def step(self) -> StepResult:
        """optimizer.step(). Unlike PyTorch's, which then does nothing, a Step when no
        parameter has a gradient raises FailedPrecondition (NO_GRADIENTS)."""
        return self._run(unary.STEP)

    def zero_grad(self, *, set_to_none: bool = True) -> int:
        """optimizer.zero_grad(set_to_none); returns the new state version."""
        return self._run(unary.zero_grad(set_to_none))

    # --- tensors ------------------------------------------------------------------------

    # A read's value follows as_torch, as get's does: an array or a tensor, None when absent
    # (found by a review of the client as an IDE and a type checker show it).
    @overload
    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[False] = False,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead[np.ndarray[Any, Any] | None]: ...

    @overload
    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[True],
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead[torch.Tensor | None]: ...

    @overload
    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead[np.ndarray[Any, Any] | torch.Tensor | None]: ...

    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool = False,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead[Any]:
        """GetTensor: `read("conv1.weight.grad[0][0][0]")`, or a name and one index key.

        `index`: one numpy basic-indexing key taken after the selector's own,
        `read("conv1.weight", (0, slice(1, 3)))`. None, the default, is no index, where
        numpy's `x[None]` adds an axis: for that, give `(None,)` or `"conv1.weight[None]"`.
        So for `get` and `set`.

        `out`: a numpy array of the tensor's shape and dtype to read into, instead of a new
        one; worth it when watching a large tensor (fresh memory costs page faults).
        `as_torch`: the value as a CPU torch tensor in its own dtype (bfloat16 included),
        rather than a numpy array. `values=False` reads the rest alone (shape, dtype,
        version: `value` None), as shape() does.

        The numpy array may be a read-only view of the reply it came in (one of 16 KiB or
        more, not streamed): `w -= lr * g` on it raises ValueError ("output array is
        read-only"); take `.copy()` first, or read into an array of your own with `out=`.

        `progress`: a callable, `progress(bytes_done, bytes_total)`, told of the value's
        bytes as they come, for a read long enough to watch (a large tensor, a slow link).
        The read then streams (GetTensorStream: one state version, as a read in one message),
        a chunk of `chunk_bytes` at a time, and the callable is called after each, the last
        time with `(total, total)`; a value of one chunk is reported once, whole. Bytes are
        counted in the tensor's own dtype (a bfloat16 value read into float32 counts 2 a
        value). An exception it raises cancels the read and is raised here. Its time counts
        in the call's timeout, the chunks waiting while it runs. A read of no values
        (`values=False`, an absent gradient) calls it not at all. So for `get`.
        """
        request = unary.read_request_bytes(selector, index, values)
        return self._read_request(
            request, as_torch=as_torch, values=values, out=out, progress=progress
        )

    def _read(
        self,
        name: str,
        chain: IndexChain,
        *,
        as_torch: bool = False,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead:
        request = unary.tensor_request(name, chain, values)
        return self._read_request(
            request, as_torch=as_torch, values=values, out=out, progress=progress
        )

    def _read_request(
        self,
        request: bytes,
        *,
        as_torch: bool = False,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead:
        """GetTensor with this serialized request; GetTensorStream when the server says the
        value is too large for one message, or that it has no memory for the reply (a
        stream sends the values a chunk at a time, from the tensor's own memory on the CPU),
        and at once for a read of values with `progress`, which is told of each chunk."""
        encoded = self._get_tensor(request, as_torch, values, out)
        if transfer.check(progress) is not None and values:
            streamed = pb.GetTensorRequest.FromString(request)
            return self._read_stream(streamed, as_torch=as_torch, out=out, progress=progress)
        try:
            return self._run(encoded)
        except ResourceExhausted as err:
            if err.reason != "USE_STREAM" and not (values and err.reason == "OUT_OF_MEMORY"):
                raise
            streamed = pb.GetTensorRequest.FromString(request)
            return self._read_stream(streamed, as_torch=as_torch, out=out)

    def _get_tensor(
        self, request: bytes, as_torch: bool, values: bool, out: np.ndarray[Any, Any] | None
    ) -> unary.Encoded[TensorRead]:
        """GetTensor with this serialized request, whose answer is read as `read` reads it."""
        unary.torch_flag(as_torch)
        if out is not None and as_torch:
            raise ValueError("out= reads into a numpy array; it cannot go with as_torch")
        if out is not None and not values:
            raise ValueError("out= is filled with the values read; values=False reads none")

        def result(data: bytes) -> TensorRead:
            split = wire.split(data, pb.GetTensorResponse)
            return unary.read_result(
                split, unary.RESPONSE_TENSOR, split.message,
                as_torch=as_torch, values=values, out=out, allocate=self._allocate,
            )  # fmt: skip

        return unary.Encoded("GetTensor", request, result)

    def _read_stream(
        self,
        request: pb.GetTensorRequest,
        *,
        as_torch: bool,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> TensorRead:
        """GetTensorStream, read again (`retries` times, backing off) when a mutation cut it
        short: a read streams from the live tensor, and a mutation landing mid-read first
        copies what is left; a server without memory for that copy ends the read
        RESOURCE_EXHAUSTED (OUT_OF_MEMORY) after its first chunks and applies the mutation.
        The same status before any chunk (no memory to open the read) is raised at once.
        UNAVAILABLE is read again too, as a read in one message is: a read with `progress`
        streams from the start, and lost the retry its GetTensor had (found by the review
        that added progress). `progress` is told of each chunk, never of less than before."""
        request.chunk_bytes = self.chunk_bytes
        retries = max(self.retries, 0)
        report = None if progress is None else transfer.Reported(progress)
        for attempt in range(retries + 1):
            try:
                return self._read_stream_once(request, as_torch=as_torch, out=out, report=report)
            except _CutShort as cut:
                if attempt == retries:
                    raise cut.error from None
                _back_off(attempt)
            except Unavailable:
                if attempt == retries:
                    raise
                _back_off(attempt)
            except DeadlineExceeded as err:
                if report is not None:
                    report.tell_time(err)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_stream_once(
        self,
        request: pb.GetTensorRequest,
        *,
        as_torch: bool,
        out: np.ndarray[Any, Any] | None = None,
        report: transfer.Progress | None = None,
    ) -> TensorRead:
        """One GetTensorStream: chunks copied into one array (or `out`) as they come, each
        reported to `report` (bytes in, bytes in all); one that raises cancels the read."""
        first: pb.GetTensorChunk | None = None

        def into_out(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
            assert out is not None
            codec.check_out(out, shape, dtype)
            return out

        assembler = codec.Assembler(
            request.name, allocate=self._allocate if out is None else into_out, widen=not as_torch
        )
        try:
            # Closed at once when `report` raises: the read is cancelled, not left open.
            with contextlib.closing(self._stream("GetTensorStream", request)) as stream:
                for data in stream:
                    split = wire.split(data, pb.GetTensorChunk)
                    message = split.message
                    if first is None:
                        first = message
                    elif message.version != first.version:  # the server promises one version
                        raise GradwireError(f"{request.name}: chunks of one read from two versions")
                    if message.HasField("chunk"):
                        assembler.add(split, unary.STREAM_CHUNK, message.chunk)
                        if report is not None:
                            report(*assembler.progress())
        except ResourceExhausted as err:
            if first is not None and err.reason == "OUT_OF_MEMORY":
                raise _CutShort(err) from None
            raise
        if first is None or not first.HasField("chunk"):
            name = first.name if first else request.name
            return TensorRead(name, first.version if first else 0, None, None, None, None)
        value = assembler.torch() if as_torch else assembler.numpy()
        return unary.tensor_read(first, value, tuple(first.chunk.shape), assembler.dtype or 0)

    # The value's type follows as_torch, so that a type-checked caller gets an array or a
    # tensor, not either (found by a review of the client as a type-checked user's code sees
    # it).
    @overload
    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[False] = False,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> np.ndarray[Any, Any] | None: ...

    @overload
    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[True],
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> torch.Tensor | None: ...

    @overload
    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> np.ndarray[Any, Any] | torch.Tensor | None: ...

    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool = False,
        out: np.ndarray[Any, Any] | None = None,
        progress: transfer.Progress | None = None,
    ) -> np.ndarray[Any, Any] | torch.Tensor | None:
        """The values only: `get("conv1.weight.grad[0][0][0]")`; None for an absent gradient.
        `index`, `as_torch`, `out` and `progress` as in read(), and as there, the array may be
        read-only (`.copy()` it to change it)."""
        read = self.read(selector, index, as_torch=as_torch, out=out, progress=progress)
        return read.value

    def stats(
        self,
        selector: str,
        *,
        bins: Whole = 0,
        low: Real | None = None,
        high: Real | None = None,
    ) -> TensorStats:
        """GetStats: min, max, mean, std, norm, NaN/inf/zero counts and an optional `bins`-bin
        histogram (over [low, high], by default the finite values' range), computed on the
        server where the tensor lives: only the summary crosses the wire."""
        return self._run(unary.get_stats(selector, bins, low, high))

    def watch(
        self,
        selectors: Iterable[str],
        *,
        values: bool = False,
        stats: bool = True,
        bins: Whole = 0,
        every_steps: Whole = 0,
        min_interval: float = 0.0,
        timeout: float | None = None,
        latest: bool = True,
        reconnect: bool = False,
        on_lost: Callable[[Unavailable], object] | None = None,
    ) -> Generator[WatchUpdate, None, None]:
        """Watch: the state now, then an update after each applied mutation (or every
        `every_steps` Steps; at most one per `min_interval` seconds), until the iterator is
        closed or `timeout` seconds pass, which does not end it cleanly: the next update
        then raises gradwire.errors.DeadlineExceeded (None, the default: no limit). A
        `break` out of `for update in client.watch(...)` closes it; one held in a variable
        (`updates = client.watch(...)`) goes on after a `break`, its updates read as they
        come (`latest`) and one of the server's call places held, until `updates.close()`
        (or `with contextlib.closing(client.watch(...)) as updates:`). Each selector gets its
        values (`values`), its statistics (`stats`, with a `bins`-bin histogram), or both:
        neither, or `bins` without `stats`, raises ValueError.
        Training never waits for a reader, and `skipped` counts the updates one missed.

        `latest` (the default): updates are read as they come on a thread of the client's
        own, and each one taken is the newest received, those it replaced counted in its
        `skipped`: a loop slower than the updates sees the state as it is now. Else they are
        taken one by one from what gRPC buffered (hundreds of small updates), each as it
        was: a slow loop reads older and older states, until that buffer is full and the
        server merges what is due. Either way each update costs the server its reads, and
        read as they come, the server makes every one: `min_interval` bounds that cost
        however fast training runs. Bad arguments raise here, not at the first update; the
        call is made when the first update is asked for.

        `reconnect`: a server that answered (this watch, or an earlier call of this
        client) and then went away (UNAVAILABLE: stopped, restarted, the network down) is
        watched again once it is back, tried every second (gradwire.rewatch), `timeout`
        counting across the gap; the first update then is the state as it is (`cause`
        "Watch"), and `on_lost(error)`, when given, is called as the server goes. A server
        that never answered (a wrong target), a session the restart lost (NotFound) and any
        other error raise as without it.
        """
        # Each refused by the server at the first update, where a bad call went unnoticed
        # until then, or for ever when never iterated; an infinite min_interval raised
        # OverflowError (found by a review of the client).
        values, stats, latest = (
            unary.flag(values, "values"), unary.flag(stats, "stats"), unary.flag(latest, "latest")
        )  # fmt: skip
        every_steps = limits.whole(every_steps, "every_steps", 0, codec.INT64_MAX, "every mutation")
        bins = limits.whole(bins, "bins", 0, limits.MAX_HISTOGRAM_BINS, "no histogram")
        # The contract sends the statistics of an item asking for neither, and no histogram
        # without them: watch(stats=False) got them all the same, and bins were dropped
        # without a word (found by a review of the client's API as a researcher uses it).
        if not (values or stats):
            raise ValueError(
                "a watch sends each selector's values (values=True), its statistics "
                "(stats=True, the default) or both: stats=False needs values=True"
            )
        if bins and not stats:
            raise ValueError(
                "bins draws histograms in the statistics, which stats=False leaves out: keep "
                "stats=True, or leave bins out"
            )
        _check_seconds(min_interval, "min_interval")
        _check_stream_timeout(timeout)
        interval_ms = min(round(min(min_interval, _MAX_MS / 1000) * 1000), _MAX_MS)
        request = pb.WatchRequest(every_steps=every_steps, min_interval_ms=interval_ms)
        shown = []  # each as Python writes it, for the updates' `selector`
        for text in unary.tensor_names(selectors):
            parsed = parse_selector(text)
            shown.append(str(parsed))
            request.items.add(
                name=parsed.name,
                index=codec.indices_to_proto(parsed.index),
                values=values,
                stats=stats,
                histogram_bins=bins,
            )
        if not shown:  # none given, or an empty iterable
            raise ValueError("watch needs at least one selector, e.g. 'conv1.weight.grad'")
        _check_selectors(len(shown), "watch")
        if on_lost is not None and not callable(on_lost):
            raise TypeError(f"on_lost must be a function of the error, not {on_lost!r}")
        reconnect = unary.flag(reconnect, "reconnect")
        if on_lost is not None and not reconnect:  # it would never be called
            raise ValueError("on_lost is called when a watch reconnects: add reconnect=True")

        def opened(seconds: float | None) -> Generator[WatchUpdate, None, None]:
            if not latest:
                return self._updates(self._stream("Watch", request, timeout=seconds), shown)
            return self._newest_updates(
                lambda hold: self._stream("Watch", request, timeout=seconds, on_call=hold),
                shown,
            )

        if reconnect:
            return rewatch.reconnecting(opened, timeout, on_lost, lambda: self.answered)
        return opened(timeout)

    def _updates(
        self, stream: Iterator[bytes], selectors: Sequence[str]
    ) -> Generator[WatchUpdate, None, None]:
        for data in stream:
            yield watch_update(data, self._allocate, selectors)

    def _newest_updates(
        self,
        open_stream: Callable[[Callable[[Cancellable], None]], Iterator[bytes]],
        selectors: Sequence[str],
    ) -> Generator[WatchUpdate, None, None]:
        """The updates as `watch(latest=True)` gives them (newest.py)."""
        newest = Newest(open_stream, _update_weight)
        try:
            while (taken := newest.take()) is not None:
                data, dropped = taken
                # No local holds the update while it is out: its arrays' memory is reused
                # once the caller drops them (memory.py).
                yield _merged(watch_update(data, self._allocate, selectors), dropped)
        finally:
            newest.close()

    def train(
        self,
        input: Any,
        target: Any,
        steps: Whole,
        *,
        zero_grad: bool = True,
        every: Whole = 1,
        timeout: float | None = None,
        stop_at_nonfinite: bool = False,
    ) -> Generator[TrainProgress, None, None]:
        """Train: `steps` training steps run on the server, with progress after every
        `every` steps. A random Fill (Fill.uniform, Fill.normal, Fill.randint) takes
        seed + n - 1 at step n (counted from 1, as TrainProgress.step counts), so each step
        sees new data. Closing the iterator stops the run between two steps; the steps taken
        stay applied. The server runs on while the caller reads (its progress queues in
        between): a `break` out of a loop over the iterator held in a variable leaves the
        run going until it is closed (`run.close()`, or `with contextlib.closing(run)`), and
        a loop that reads slowly stops it steps past the progress it broke at (a review of
        training remotely found hundreds). `timeout`: seconds for the whole run (None, the
        default: no limit): the server ends a run its deadline would cut, between two steps,
        and the next progress raises gradwire.errors.DeadlineExceeded (reason
        DEADLINE_PASSED), its `metadata["steps_done"]` and `["version"]` saying the steps
        applied, which stay so (an older server's run, or an answer later than the
        deadline, ends without them: read the version). Bad arguments
        raise here; the run starts when the first progress is asked for (a Train never
        iterated runs nothing), with this client's `expecting` version as it is here.
        `zero_grad` (the default): each step's gradients start from zero; False adds them
        up across the steps, as train_step(zero_grad=False) does.
        `stop_at_nonfinite`: end the run at the first step whose loss is NaN or infinite
        (training diverged), that step applied; its progress is the last, with
        `stopped_at_nonfinite` set when steps asked for were left. A server from before it
        runs every step.
        """
        # Each refused by the server at the first progress, where a bad call went unnoticed
        # until then, or for ever when never iterated (found by a review of the client).
        steps = limits.whole(steps, "steps", 1, limits.MAX_TRAIN_STEPS)
        every = limits.whole(every, "every", 0, codec.INT64_MAX, "after every step")
        _check_stream_timeout(timeout)
        _needs_target("train", target)
        request = pb.TrainRequest(
            steps=steps,
            every=every,
            zero_grad=unary.flag(zero_grad, "zero_grad"),
            stop_at_nonfinite=unary.flag(stop_at_nonfinite, "stop_at_nonfinite"),
        )
        pieces = unary.source_pieces("TrainRequest", "input", input)
        pieces += unary.source_pieces("TrainRequest", "target", target)
        pieces.append(request.SerializeToString())
        unary.fits_one_message("Train", pieces)
        if self._instance is None:
            self._know_instance("Train", timeout if timeout is not None and timeout >= 0 else None)
        expected = self._expected()  # its first step's condition
        extra = [] if expected is None else _expected_metadata(expected)
        stream = self._stream("Train", wire.join(pieces), timeout=timeout, metadata=extra)
        return self._progress(stream, unary.widenings(input=input, target=target))

    @staticmethod
    def _progress(
        stream: Iterator[pb.TrainProgress], widenings: dict[str, tuple[str, str]]
    ) -> Generator[TrainProgress, None, None]:
        """The progress of a Train, a refusal naming a widened dtype told so."""
        try:
            for message in stream:
                yield train_progress(message)
        except InvalidArgument as err:
            unary.tell_widenings(err, widenings)
            raise

    def shape(self, selector: str) -> tuple[int, ...] | None:
        """The shape of a tensor or slice without fetching its values; None when absent."""
        return self.read(selector, values=False).shape

    def set(
        self,
        selector: str,
        value: Any,
        index: codec.IndexKey | None = None,
        *,
        progress: transfer.Progress | None = None,
    ) -> int:
        """SetTensor: `set("conv1.weight[0]", array)`; value broadcasts like numpy assignment,
        and is cast to the tensor's dtype (a float64 value past float32's range becomes inf,
        as in numpy). Writing to a gradient that is absent (None) creates it: zeros, then
        the value written. A write through a negative slice step (`"conv1.weight[::-1]"`) is
        refused, gradwire.errors.InvalidArgument (reason NEGATIVE_STEP_WRITE): write the
        value reversed through the positive step instead. `index` as in read(). Returns
        the new state version.

        `progress`: a callable, `progress(bytes_done, bytes_total)`, told of the value's bytes
        as they go. A value of more than one chunk (`chunk_bytes`, 4 MiB) then streams
        (SetTensorStream, written whole once every chunk has come, as a value in one message
        is) and the callable is called as each chunk is sent; the last call, `(total,
        total)`, comes with the server's answer, the value written, as does the one call for
        a value of one chunk. Bytes are counted in the value's own dtype, as sent (the server
        casts it). An exception it raises cancels the write, which then writes nothing, and
        is raised here; raised at the last call, the value has been written."""
        return self._set(*unary.set_target(selector, index), value, progress)

    def _set(
        self, name: str, chain: IndexChain, value: Any, progress: transfer.Progress | None = None
    ) -> int:
        size = unary.nbytes(value)
        whole = size <= self.stream_above_bytes
        if transfer.check(progress) is None and whole:
            return self._run(unary.set_tensor(name, chain, value))
        if progress is not None and whole and size <= self.chunk_bytes:
            version = self._run(unary.set_tensor(name, chain, value))
            sent = transfer.value_bytes(value, size)
            progress(sent, sent)
            return version
        header = pb.SetTensorRequest(name=name, index=codec.indices_to_proto(chain))
        if progress is None:
            chunks = unary.begun(self._set_chunks(header, value))
            return int(self._call("SetTensorStream", chunks).version)
        upload = transfer.Upload(progress)
        chunks = unary.begun(upload.messages(self._sized_chunks(header, value)))
        try:
            return int(self._call("SetTensorStream", chunks, upload=upload).version)
        except DeadlineExceeded as err:
            upload.tell_time(err)
            raise

    def _set_chunks(self, header: pb.SetTensorRequest, value: Any) -> Iterator[bytes]:
        """SetTensorStream's messages."""
        for message, _, _ in self._sized_chunks(header, value):
            yield message

    def _sized_chunks(
        self, header: pb.SetTensorRequest, value: Any
    ) -> Iterator[tuple[bytes, int, int]]:
        """SetTensorStream's messages, each with its value bytes and the value's in all."""
        first = pb.SetTensorChunk(name=header.name, index=header.index).SerializeToString()
        number = unary.FIELD[("SetTensorChunk", "chunk")]
        total = 0
        for dtype, run, offset, shape in unary.chunks("value", value, self.chunk_bytes):
            if shape is not None:
                total = math.prod(shape) * run.itemsize
            chunk = wire.length_field(number, codec.chunk_pieces(run, dtype, offset, shape))
            yield wire.join([first, *chunk] if offset == 0 else chunk), run.nbytes, total

    def fill_parameters(self, value: Real, names: Iterable[str] = ()) -> int:
        """`for p in model.parameters(): p.data.fill_(value)`, or only the parameters in
        `names`; returns the new state version."""
        return self._run(unary.fill_parameters(value, names))

    def list_tensors(self) -> Listing:
        """Every readable tensor with kind, dtype and shape, and the model, device and optimizer."""
        return self._run(unary.LIST_TENSORS)

    def list_sessions(self) -> SessionListing:
        """The sessions open on the server beside the default one, oldest first, whoever
        opened them, with the server's limit and idle timeout."""
        response: pb.ListSessionsResponse = self._call("ListSessions", pb.ListSessionsRequest())
        sessions = tuple(
            SessionInfo(s.session, s.version, s.open_s, s.idle_s, s.calls_in_progress)
            for s in response.sessions
        )
        return SessionListing(
            sessions, response.max_sessions, response.idle_timeout_s, response.opening
        )

    def server_info(self) -> ServerInfo:
        """The server's gradwire and PyTorch versions, its device and the limits it keeps:
        message sizes, elements per tensor, calls at once, sessions, keepalive."""
        response: pb.GetServerInfoResponse = self._call("GetServerInfo", pb.GetServerInfoRequest())
        kept = {f.name: getattr(response.limits, f.name) for f in dataclasses.fields(ServerLimits)}
        info = ServerInfo(
            response.version,
            response.torch_version,
            response.device,
            ServerLimits(**kept),
            tuple(response.known_fields),
            response.instance_id,
        )
        self._known_fields = fields_known(info)
        if self._instance is None:  # before any other call: none read a version yet
            self._instance = info.instance_id
        return info

    def _needs_field(self, field: str, option: str, otherwise: str) -> None:
        """Refuses, before anything is sent, an `option` ("eval_mode=True") whose request
        `field` the server does not list among those it knows: a server older than the field
        ignores it, as protobuf does an unknown field, and does `otherwise` (found by a
        review of clients and servers of different versions). The list is read once per
        client (GetServerInfo); a server older than GetServerInfo, or than its list, is
        refused too: it may predate the field. errors.Unimplemented (reason
        FIELD_NOT_KNOWN, metadata "field"), raised by the client."""
        if self._known_fields is None:
            try:
                self.server_info()
            except Unimplemented:  # older than GetServerInfo
                self._known_fields = frozenset()
        if field in (self._known_fields or ()):
            return
        why = (
            f"does not know {field}"
            if self._known_fields
            else f"lists no fields it knows (its GetServerInfo is older than the list, and "
            f"than the limits that tell a server of 2026-12-05 on), and may not know {field}"
        )
        raise Unimplemented(
            f"the server at {self.target} {why}, which {option} needs: a server older than "
            f"the field ignores it and {otherwise}; not sent. A newer gradwire serve "
            "takes it",
            reason="FIELD_NOT_KNOWN",
            metadata={"field": field},
        )

    def reset(self, seed: Whole | None = None) -> int:
        """A freshly initialised model (from `seed` when given, else a new draw) and a new
        optimizer of the kind and settings in force (set_optimizer's), its state afresh;
        no input, output, loss or gradients. Returns the new state version."""
        return self._run(unary.reset(seed))

    def save_checkpoint(self, name: str = "") -> SavedCheckpoint:
        """Writes the state as checkpoint `name` in the server's state directory
        (`gradwire serve --state-dir`): parameters, gradients, buffers, the optimizer and its
        state, the version. "" names the one the server restores at start ("state"), the
        default session's: a session of your own must name its checkpoint
        (errors.InvalidArgument, BAD_CHECKPOINT_NAME). Sessions share the directory's names.
        errors.FailedPrecondition (NO_STATE_DIR) on a server started without one. A save
        that fails once its server has it (its deadline passes) may land all the same: its
        error's `changes_state` is True, and saving again replaces the checkpoint."""
        return self._run(unary.save_checkpoint(name))

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """The checkpoints in the server's state directory, sorted by name, each with its
        size, time, the version and model it was saved with and, in `problem`, what would stop
        load_checkpoint() taking it, as far as its header tells (a load checks the rest).
        Every session sees the same directory. errors.FailedPrecondition (NO_STATE_DIR) on a
        server started without one."""
        request = pb.ListCheckpointsRequest()
        response: pb.ListCheckpointsResponse = self._call("ListCheckpoints", request)
        return [
            CheckpointInfo(c.name, c.bytes, c.saved_unix_s, c.saved_version, c.model, c.problem)
            for c in response.checkpoints
        ]

    def delete_checkpoint(self, name: str) -> int:
        """Removes checkpoint `name` from the server's state directory (for room, when a save
        is refused DISK_FULL); returns the bytes it freed. The name must be given: "state",
        the one the server restores at start, by that name, and only on the default session.
        errors.NotFound (NO_CHECKPOINT), naming those there, for one it does not hold."""
        return self._run(unary.delete_checkpoint(name))

    def load_checkpoint(self, name: str = "") -> LoadedCheckpoint:
        """Replaces the state with checkpoint `name` from the server's state directory. The
        version moves on by one, as for any change. errors.NotFound (NO_CHECKPOINT), naming
        the checkpoints there, for one it does not hold; errors.InvalidArgument
        (BAD_CHECKPOINT) for one of another model, with nothing changed."""
        return self._run(unary.load_checkpoint(name))

    def set_optimizer(
        self,
        kind: Literal["sgd", "adam"] | None = None,
        *,
        keep_state: bool = False,
        lr: Real | None = None,
        momentum: Real | None = None,
        weight_decay: Real | None = None,
        beta1: Real | None = None,
        beta2: Real | None = None,
        eps: Real | None = None,
        nesterov: bool | None = None,
    ) -> OptimizerConfig:
        """Replaces the optimizer with a new one of `kind` (None: SGD); its state starts
        afresh, and unset settings take PyTorch's defaults, but for SGD's lr: 1.0, the
        tutorial's (PyTorch's is 0.001; pass lr for a model of your own). The settings are
        torch's: `lr` and `weight_decay` for both, `momentum` and `nesterov` for SGD,
        `beta1` and `beta2` (torch's betas) and `eps` for Adam; one of the other kind is
        refused, errors.InvalidArgument (BAD_OPTIMIZER).

        With `keep_state`, changes the settings given in the optimizer in place instead, as
        assigning to torch's param_groups does: `set_optimizer(lr=1e-4, keep_state=True)`
        lowers the learning rate, and the other settings, the momentum buffers and Adam's
        moments stay. `kind` is then None (the kind in place) or the kind in place. A server
        older than keep_state would replace the optimizer: refused here, as eval_mode is
        (see forward). Returns the settings in force."""
        settings = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "beta1": beta1,
            "beta2": beta2,
            "eps": eps,
            "nesterov": nesterov,
        }
        return self._set_optimizer(kind, settings, keep_state)[1]

    def _set_optimizer(
        self,
        kind: Literal["sgd", "adam"] | None,
        settings: dict[str, Any],
        keep_state: bool = False,
    ) -> tuple[int, OptimizerConfig]:
        """set_optimizer's work: the state version it made, and the settings in force."""
        encoded = unary.set_optimizer(kind, settings, keep_state)
        self._needs_keep_state(keep_state)
        return self._run(encoded)

    def _needs_keep_state(self, keep_state: bool) -> None:
        if keep_state:
            self._needs_field("SetOptimizerRequest.keep_state", "keep_state=True", _REPLACED)

    @property
    def remote(self) -> RemoteModel:
        """The model as attributes: `client.remote.conv1.weight.grad[0][0][0]`."""
        from gradwire.remote import RemoteModel

        return RemoteModel(self)


def connect(
    target: str = DEFAULT_TARGET,
    *,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    token: str | None = None,
    tls: bool = False,
    ca: bytes | str | None = None,
    cert: bytes | str | None = None,
    key: bytes | str | None = None,
    keepalive: float | None = limits.CLIENT_KEEPALIVE_S,
    keepalive_timeout: float = limits.KEEPALIVE_TIMEOUT_S,
    session: str | None = None,
    stream_calls: bool = False,
) -> Client:
    """A client for the server at host:port; use it with `with` to close the channel.

    `timeout`: seconds each call may take (60 by default; None: no limit), as in Client;
    `token` for a server that requires one; `tls`, `ca`, `cert`, `key`, `keepalive`,
    `keepalive_timeout`, `session`, `stream_calls` as in Client.
    """
    return Client(
        target,
        timeout=timeout,
        token=token,
        tls=tls,
        ca=ca,
        cert=cert,
        key=key,
        keepalive=keepalive,
        keepalive_timeout=keepalive_timeout,
        session=session,
        stream_calls=stream_calls,
    )
