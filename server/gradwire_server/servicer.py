"""The gradwire.v1.Trainer service: decode the request, call the Trainer, encode the answer.

A decorator on each handler (rpc, mutation, rpc_stream and their kin) and one table
(status.STATUS_OF) turn domain errors into status codes; anything unexpected is logged with its
traceback and answered INTERNAL with a plain message, never UNKNOWN.
Requests that carry tensors arrive split (their values uncopied), and responses that carry
them leave as bytes with the values spliced in, so no tensor is walked value by value.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import functools
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from gradwire import calls, limits, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.limits import EXPECTED_INSTANCE, EXPECTED_VERSION, REQUEST_ID, SESSION
from gradwire_server import checkpoint, convert, stats
from gradwire_server.errors import (
    CallerGone,
    DeadlinePassed,
    DomainError,
    InvalidInput,
    ModelCodeError,
    NoSuchCheckpoint,
    NotConfigured,
    OverLimit,
    PreviousFailed,
    Stopping,
    VersionMismatch,
    device_lost,
    out_of_memory,
    shown,
)
from gradwire_server.fills import FillSpec, TensorInput
from gradwire_server.message_context import Answered, MessageContext
from gradwire_server.places import Slots
from gradwire_server.request_log import RequestLog
from gradwire_server.results import Selection, Snapshot
from gradwire_server.sessions import Sessions, UnknownSession
from gradwire_server.status import Malformed, abort, error_status, status_of, well_formed
from gradwire_server.torch_thread import Closed
from gradwire_server.trainer import Guard, Trainer, described_bytes, guarded
from gradwire_server.waiting import SendingStreams, WaitingStreams

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"]

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.ServicerContext], R]

_FORWARD_INPUT = convert.field_path(pb.ForwardRequest, "input")
_FORWARD_TARGET = convert.field_path(pb.ForwardRequest, "target")
_SET_VALUE = convert.field_path(pb.SetTensorRequest, "value")
_STEP_INPUT = convert.field_path(pb.TrainStepRequest, "input")
_STEP_TARGET = convert.field_path(pb.TrainStepRequest, "target")
_SET_CHUNK = convert.field_path(pb.SetTensorChunk, "chunk")
_FORWARD_CHUNK = convert.field_path(pb.ForwardChunk, "input")
_CHUNK_TARGET = convert.field_path(pb.ForwardChunk, "target")
_TRAIN_INPUT = convert.field_path(pb.TrainRequest, "input")
_TRAIN_TARGET = convert.field_path(pb.TrainRequest, "target")
#: How often a waiting watcher checks that its caller is still there.
WATCH_POLL_S = 0.5


def _release_frames(error: BaseException) -> None:
    """Lets go of what the frames in `error`'s chain hold, and of the frames themselves.

    gRPC sends the status while it still holds the exception, and a traceback keeps every
    frame it passed through alive: their locals, and through each frame its function and
    that function's closure (torch's Module.__call__ keeps its arguments in one). Without
    this, what a failed call had allocated (a Forward's input, when the next layer ran out
    of memory) outlives the answer, and a client that retries at once finds the memory still
    taken. Frames still running (this handler's callers) keep their locals.
    """
    seen: set[int] = set()
    chain: list[BaseException | None] = [error]
    while chain:
        link = chain.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        traceback.clear_frames(link.__traceback__)
        link.__traceback__ = None
        chain += (link.__cause__, link.__context__)


def _answer_error(context: grpc.ServicerContext, name: str, servicer: TrainerServicer) -> None:
    """Aborts the call for the exception being handled; never lets it reach gRPC raw."""
    try:
        raise
    except DomainError as err:
        if isinstance(err, ModelCodeError):  # the model's own fault: its traceback to the log
            log.error("%s: %s", name, err.message, exc_info=err.__cause__ or err)
        _release_frames(err)
        abort(context, status_of(err), err.message, err.reason, err.metadata)
    except grpc.RpcError as err:
        if context.is_active():  # not from the caller's request stream: a bug of ours
            _unexpected(context, name, servicer, err)
        else:
            # gRPC raises this from the request iterator when the caller cancels its request
            # stream or lets its deadline pass: no server error, and nothing to log.
            _release_frames(err)
            gone = f"{name}: the caller cancelled its request stream, or its deadline passed"
            abort(context, grpc.StatusCode.CANCELLED, gone, CallerGone.reason, {})
    except MemoryError as err:
        # Memory ran out where no narrower handler says what for (those answer with the
        # value's shape): still the caller's to retry with less, not an internal error.
        log.warning("%s: out of memory", name, exc_info=err)
        _release_frames(err)
        abort(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{name}: out of memory on the server; send or ask for less, or free memory on the "
            "server",
            "OUT_OF_MEMORY",
            {},
        )
    except Exception as err:
        _unexpected(context, name, servicer, err)


def _unexpected(
    context: grpc.ServicerContext, name: str, servicer: TrainerServicer, err: Exception
) -> None:
    """Logs `err` with its traceback and answers INTERNAL, saying where the details are."""
    log.error("unexpected error in %s", name, exc_info=err)
    if device_lost(err) and servicer.on_device_lost is not None:
        servicer.on_device_lost()
    _release_frames(err)
    abort(
        context,
        grpc.StatusCode.INTERNAL,
        f"internal error in {name}; the server's log has the details",
        "INTERNAL",
        {},
    )


_CURRENT: contextvars.ContextVar[Trainer | None] = contextvars.ContextVar("trainer", default=None)


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    pairs = context.invocation_metadata() or ()
    metadata = {k: v for k, v in pairs if isinstance(v, str)}
    if len(metadata) < len(pairs):  # a key given twice, or binary values: rare, so looked at
        _refuse_twice_given(pairs)
    return metadata


def _refuse_twice_given(pairs: Iterable[tuple[str, Any]]) -> None:
    """InvalidInput (BAD_METADATA) for one of gradwire's keys given more than once: which
    one counts would be a guess (the last, before: two expected versions in one order
    applied the call, in the other refused it)."""
    keys = [k for k, _ in pairs]
    for key in (SESSION, REQUEST_ID, EXPECTED_VERSION, EXPECTED_INSTANCE):
        if keys.count(key) > 1:
            raise InvalidInput(
                f"metadata {key} is given {keys.count(key)} times; give it once",
                reason="BAD_METADATA",
            )


class _Session:
    """The call's session's trainer as `servicer.trainer`, for the call's duration; a
    session does not expire while a call on it is in progress (an open Watch, a Train)."""

    __slots__ = ("_id", "_sessions", "_token")

    def __init__(self, servicer: TrainerServicer, metadata: dict[str, str]) -> None:
        self._sessions = servicer.sessions
        self._id = metadata.get(SESSION)

    def __enter__(self) -> None:
        self._token = _CURRENT.set(self._sessions.get(self._id, hold=True))

    def __exit__(self, *exc: object) -> None:
        try:
            if self._id:
                self._sessions.leave(self._id)  # first: a session left held never expires
        finally:
            _CURRENT.reset(self._token)


_NO_METADATA: dict[str, str] = {}


def rpc(method: Handler[R]) -> Handler[R]:
    """Maps DomainError to its status, anything else to INTERNAL with the traceback logged."""
    return _unary(method, mutates=False)


def rpc_sessionless(method: Handler[R]) -> Handler[R]:
    """`rpc` for the calls that act on no session the caller's metadata names: OpenSession
    opens a new one (and, through rpc_operator, CloseSession closes the session its
    request names, ListSessions lists them all and GetServerInfo describes the server).
    The metadata's session is not looked up.
    Looked up first, a stale one (a client joined to a session that has closed since) got
    NOT_FOUND for opening a new session; and the Python client sends the session it closes
    there too, so a retry of a close that went through was refused before the request log
    could answer it."""
    return _unary(method, mutates=False, sessionless=True)


def rpc_operator(method: Handler[R]) -> Handler[R]:
    """`rpc_sessionless` for ListSessions, CloseSession and GetServerInfo, which may take
    a place beyond the call limit (Slots.operator): what an operator needs when streams hold
    every place, and the limit itself."""
    return _unary(method, mutates=False, sessionless=True, operator=True)


def _unary(
    method: Handler[R], mutates: bool, sessionless: bool = False, operator: bool = False
) -> Handler[R]:
    # One flat wrapper, no generator-based context managers: this runs on every call, and in
    # the server its Python runs with caches gone cold (docs/performance-history.md, tenth session).
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            metadata = _metadata(context)
            place = self.slots.operator if operator else self.slots
            with place, _Session(self, _NO_METADATA if sessionless else metadata):
                if not isinstance(request, Iterator):
                    well_formed(request)
                if mutates:
                    return _mutate(self, method, request, context, metadata)
                return method(self, request, context)
        except Exception:
            _answer_error(context, name, self)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    # What a Calls stream runs for a message of this call, the stream holding the place.
    wrapper.unwrapped = method  # type: ignore[attr-defined]
    wrapper.mutates = mutates  # type: ignore[attr-defined]
    wrapper.sessionless = sessionless  # type: ignore[attr-defined]
    return wrapper


def _guard(context: grpc.ServicerContext, metadata: dict[str, str]) -> Guard:
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    return Guard(_expected_version(metadata), deadline)


def _expected_version(metadata: dict[str, str]) -> int | None:
    """The caller's expected state version (metadata), checked; None when not given."""
    expected = None
    if EXPECTED_VERSION in metadata:
        given = metadata[EXPECTED_VERSION]
        # Decimal digits only: Python's int() would also take " 5", "+5" and "1_0" (10), which
        # no other language's parser reads alike. At most 19 of them (int64), checked before
        # int(), which refuses over 4,300 digits with a ValueError of its own.
        if not (given.isascii() and given.isdigit() and len(given) <= 19 and int(given) < 2**63):
            raise InvalidInput(
                f"{EXPECTED_VERSION} must be a state version: decimal digits, from 0 to "
                f"{2**63 - 1}, got {shown(given)}",
                reason="BAD_METADATA",
            )
        expected = int(given)
    return expected


def _check_instance(
    servicer: TrainerServicer, metadata: dict[str, str], expected_version: int | None
) -> None:
    """Refuses a mutation meant for another server instance than this one (metadata
    gradwire-expected-instance): its caller read the state, and its version, from a server
    that has restarted since, and this one counts its versions afresh, so that the same
    number is another state. Nothing has changed yet; the instance never does while the
    server runs, so no lock is needed to compare it."""
    given = metadata.get(EXPECTED_INSTANCE)
    if not given or given == servicer.instance_id:  # empty: none, as for a request id
        return
    if not limits.is_instance_id(given):
        raise InvalidInput(
            f"{EXPECTED_INSTANCE} must be a server's instance id, 16 lowercase hex digits "
            f"(GetServerInfo's instance_id), got {shown(given)}",
            reason="BAD_METADATA",
        )
    version = servicer.trainer.version
    expected = (
        f"server instance {given}"
        if expected_version is None
        else f"state version {expected_version} of server instance {given}"
    )
    raise VersionMismatch(
        f"expected {expected}, but this is server instance {servicer.instance_id}: a server "
        f"started since, or another, whose versions count afresh (it is at {version}); "
        "nothing was changed: read the state again and retry",
        metadata={"version": str(version), "instance": servicer.instance_id},
    )


def mutation(method: Handler[R]) -> Handler[R]:
    """`rpc` for calls that change state: run only if the caller's expected version holds and
    its deadline has not passed, and once per request id."""
    return _unary(method, mutates=True)


def _mutate(
    servicer: TrainerServicer,
    method: Handler[R],
    request: Any,
    context: grpc.ServicerContext,
    metadata: dict[str, str],
) -> R:
    guard = _guard(context, metadata)
    _check_instance(servicer, metadata, guard.expected_version)

    def run() -> R:
        with guarded(guard):
            return method(servicer, request, context)

    return _once(servicer, method.__name__, metadata.get(SESSION, ""), context, metadata, run)


def _once(
    servicer: TrainerServicer,
    name: str,
    session: str,
    context: grpc.ServicerContext,
    metadata: dict[str, str],
    run: Callable[[], R],
) -> R:
    """run(); with a request id (metadata), once per (name, session, id): a retry gets the
    first attempt's answer, or AnswerNotKept once the log has let it go."""
    request_id = metadata.get(REQUEST_ID)
    if not request_id:  # none, or an empty one
        return run()
    if len(request_id) > limits.MAX_REQUEST_ID_CHARS:
        raise InvalidInput(
            f"{REQUEST_ID} is over {limits.MAX_REQUEST_ID_CHARS} characters", reason="BAD_METADATA"
        )
    return servicer.requests.once((name, session, request_id), run, context)


def rpc_stream(method: Handler[Iterable[R]]) -> Handler[Iterator[R]]:
    """`rpc` for server-streaming methods: errors while streaming are mapped too."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[R]:
        try:
            with self.slots.stream, _Session(self, _metadata(context)):
                well_formed(request)
                yield from method(self, request, context)
        except Exception:
            _answer_error(context, method.__name__, self)

    return wrapper


def sends_watched(
    stalled: str, then: str = ""
) -> Callable[[Handler[Iterator[R]]], Handler[Iterator[R]]]:
    """For a server stream (Watch, Train, GetTensorStream): sends its messages so that, while
    its client is not reading them (`SendingStreams`), a stop ends it (a Watch or Train also
    looks for the stop between its messages), and so does a call that finds every place taken
    once a message has waited UNREAD_S. UNAVAILABLE, `stalled` the stop's message where gRPC
    can still deliver it (behind messages the client has not read it mostly cannot, and the
    client reads gRPC's own: "Stream removed"); `then`, what the stream's end leaves, said
    in the message of one ended for a call (a Train's steps taken)."""

    def decorate(method: Handler[Iterator[R]]) -> Handler[Iterator[R]]:
        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[R]:
            with (
                self.sending.open(context, stalled, method.__name__, then) as stream,
                contextlib.closing(cast(Generator[R], method(self, request, context))) as messages,
            ):
                for message in messages:
                    yield from stream.send(message)

        return wrapper

    return decorate


#: What a Train ended while its client did not read its progress leaves (a stop, or a call
#: that found every place taken, ends it): a client told only that the stream was ended
#: could not know whether the server trained on, or half a step was applied (found by a
#: review of this session's new features).
_TRAIN_ENDED = (
    "training ended there, the steps taken applied, each whole (read the state version to "
    "know how far it went)"
)

#: How long a request stream that ended short waits to learn whether its caller cancelled
#: it (see _unless_caller_gone): the time between gRPC's two events of one cancellation,
#: on a busy machine, with room to spare. Spent only on a stream refused as short.
CANCELLATION_WAIT_S = 0.1


@contextlib.contextmanager
def _unless_caller_gone(context: grpc.ServicerContext) -> Iterator[None]:
    """The block's refusal of a request stream that ended short (InvalidInput: no value,
    missing chunks), or CallerGone when the caller in fact cancelled it. gRPC ends a
    cancelled stream's iteration as the cancellation's first event arrives, and marks the
    call inactive at its second: a handler that looked between the two refused the stream
    as the caller's fault, INVALID_ARGUMENT (14 and 11 of 300 cancelled ForwardStream and
    SetTensorStream uploads under two busy loops, thirty-ninth session; seen once in a
    `make test` run)."""
    try:
        yield
    except InvalidInput:
        ended = threading.Event()
        gone = not context.add_callback(ended.set) or ended.wait(CANCELLATION_WAIT_S)
        if gone and not context.is_active():  # ended, unanswered: cancelled, or out of time
            raise CallerGone(
                "the caller cancelled its request stream, or its deadline passed"
            ) from None
        raise


def _check_selectors(count: int, what: str) -> None:
    """InvalidInput (TOO_MANY_SELECTORS) past limits.MAX_SELECTORS: each selector is read
    under the session's lock, and training waits for it."""
    if count > limits.MAX_SELECTORS:
        raise InvalidInput(
            f"{what}: {count} selectors, more than the {limits.MAX_SELECTORS} one call may name "
            "(each is read under the session's lock, which training waits for): select a "
            "slice of a tensor rather than its elements one by one",
            reason="TOO_MANY_SELECTORS",
            metadata={"limit": str(limits.MAX_SELECTORS)},
        )


def _items(requests: Iterable[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    """A request stream's messages, each well formed. A stream that ends with its caller
    gone (it cancelled, or its deadline passed) raises CallerGone. gRPC mostly raises then,
    but on a busy machine it sometimes ended the iteration at the deadline with the call
    still active (`time_remaining()` 0): the short stream was refused as the caller's
    fault, INVALID_ARGUMENT, and counted so (seen in CI)."""
    for request in requests:
        yield well_formed(request)
    remaining = context.time_remaining()
    if not context.is_active() or (remaining is not None and remaining <= 0):
        raise CallerGone("the caller cancelled its request stream, or its deadline passed")


class TrainerServicer:
    """Adapts gradwire.v1.Trainer to the Trainer of each call's session."""

    @property
    def trainer(self) -> Trainer:
        """The trainer of the session of the call being served (see `rpc`)."""
        return _CURRENT.get() or self.sessions.default

    def __init__(
        self,
        trainer: Trainer,
        max_concurrent: int = 16,
        sessions: Sessions | None = None,
        on_device_lost: Callable[[], None] | None = None,
        connections: limits.ServerConnections = limits.ServerConnections(),
        streams: tuple[int, int] = (0, 0),
        state_dir: Path | None = None,
    ) -> None:
        self.sessions = sessions or Sessions(trainer)
        #: Where SaveCheckpoint and LoadCheckpoint keep checkpoints; None: not served.
        self.state_dir = state_dir
        self.requests = RequestLog()
        #: Drawn as the server starts: which server counted the versions a caller read (a
        #: server started again counts afresh, and comes to numbers the last one gave, of
        #: other states). A mutation meant for another is refused (_check_instance).
        self.instance_id = os.urandom(8).hex()
        #: GetServerInfo's answer: nothing in it changes while the server runs.
        #: `connections`: the settings `app.start` gives gRPC for its connections; `streams`:
        #: the health Watches and reflection streams the services beside it keep open at
        #: once (0: none served).
        self.info = convert.server_info(
            str(trainer.device),
            trainer.max_elements,
            max_concurrent,
            self.sessions.max_sessions,
            self.sessions.idle_s,
            connections,
            streams=streams,
            requests=self.requests,
            max_name_chars=trainer.max_name_chars,
            instance_id=self.instance_id,
        )
        #: Called when a call fails with an error the device does not recover from (the
        #: server turns its health NOT_SERVING, so that whatever supervises it restarts it).
        self.on_device_lost = on_device_lost
        self.spare = convert.SpareMemory()  # one block, shared by reads and writes that stream
        #: Set when the server begins to stop: open Watches and Trains end (UNAVAILABLE,
        #: STOPPING) instead of holding the grace period until it runs out.
        self.stopping = threading.Event()
        #: The Calls streams between two calls, which `stop` ends at once, and the close
        #: of their session.
        self.waiting = WaitingStreams()
        self.sessions.on_close = self._end_calls_of
        #: The Watches, Trains and streamed reads, which `stop` ends once a send has waited a
        #: second for a client that does not read, and a call that finds every place taken
        #: once one has waited UNREAD_S.
        self.sending = SendingStreams()
        self.slots = Slots(max_concurrent, self.sending)
        #: Counts and logs each call made as a message on a Calls stream, as the call
        #: interceptor does each RPC (app.start sets it); None: not counted.
        self.observer: CallObserver | None = None

    def _end_calls_of(self, session: str) -> None:
        """Ends the Calls streams on `session`, closed now, that wait for a call; one with a
        call in progress ends once it is answered (`Calls`)."""
        self.waiting.end_session(session, _calls_ended(session))

    def stop(self) -> None:
        """The server begins to stop: open Watches and Trains end at their next look
        (UNAVAILABLE, STOPPING), and they and streamed reads once a message of theirs has
        waited a second for a client that does not read (UNAVAILABLE); Calls streams at
        once when no call of theirs is in progress, else once it is answered (UNAVAILABLE;
        no call after it is run)."""
        self.waiting.stop()  # first: a Calls stream runs no message once `stopping` is set
        self.stopping.set()
        self.sending.stop()

    @mutation
    def Forward(
        self, request: wire.Split[pb.ForwardRequest], context: grpc.ServicerContext
    ) -> pb.ForwardResponse:
        message = request.message
        inputs = convert.source_from_split(request, _FORWARD_INPUT, message.input, "input")
        if inputs is None:
            raise InvalidInput(
                "Forward needs an input: a tensor, or a fill such as ones of shape "
                f"{self.trainer.example_input}",
                reason="MISSING_INPUT",
            )
        target = convert.source_from_split(request, _FORWARD_TARGET, message.target, "target")
        if target is None and message.HasField("target"):
            raise _empty_target("Forward")
        return convert.forward_response(
            self.trainer.forward(inputs, target, eval_mode=message.eval_mode)
        )

    @mutation
    def Backward(
        self, request: pb.BackwardRequest, context: grpc.ServicerContext
    ) -> pb.BackwardResponse:
        return pb.BackwardResponse(version=self.trainer.backward(request.retain_graph))

    @mutation
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        version, updated = self.trainer.step()
        return pb.StepResponse(version=version, parameters_updated=updated)

    @mutation
    def ZeroGrad(
        self, request: pb.ZeroGradRequest, context: grpc.ServicerContext
    ) -> pb.ZeroGradResponse:
        set_to_none = request.set_to_none if request.HasField("set_to_none") else True
        return pb.ZeroGradResponse(version=self.trainer.zero_grad(set_to_none))

    @rpc
    def GetTensor(self, request: pb.GetTensorRequest, context: grpc.ServicerContext) -> bytes:
        chain = convert.chain_from_proto(request.index)

        def encode(selection: Selection) -> bytes:
            try:
                pieces = convert.get_response_pieces(
                    selection, values=not request.omit_values, limit=limits.MAX_VALUE_BYTES
                )
                return wire.join(pieces)  # under the lock: this copy is what keeps the version
            except (MemoryError, RuntimeError) as err:  # numpy's, or torch's in words
                if not out_of_memory(err):
                    raise
                raise convert.no_room_to_answer(selection, "GetTensor") from err

        return self.trainer.read_with(request.name, chain, encode, copies_only=True)

    @rpc_stream
    @sends_watched(
        "the server is stopping, and this read's client had stopped reading its chunks: the "
        "read ends here; read again once the server is back"
    )
    def GetTensorStream(
        self, request: pb.GetTensorRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        chain = convert.chain_from_proto(request.index)
        if request.omit_values:
            raise InvalidInput(
                "omit_values asks for no values, so there is nothing to stream: use GetTensor",
                reason="BAD_REQUEST",
            )
        chunk_bytes = request.chunk_bytes or limits.CHUNK_BYTES
        if not 0 < chunk_bytes <= limits.MAX_VALUE_BYTES:
            raise InvalidInput(
                f"chunk_bytes must be between 1 and {limits.MAX_VALUE_BYTES}, got {chunk_bytes}",
                reason="BAD_CHUNK_SIZE",
            )
        selection, read = self.trainer.stream_read(request.name, chain, self.spare)
        try:
            yield from convert.stream_chunks(selection, read, chunk_bytes)
        finally:  # also when the client goes away mid-stream
            if read is not None:
                read.close()

    @mutation
    def SetTensor(
        self, request: wire.Split[pb.SetTensorRequest], context: grpc.ServicerContext
    ) -> pb.SetTensorResponse:
        message = request.message
        chain = convert.chain_from_proto(message.index)
        value = convert.source_from_split(request, _SET_VALUE, message.value, "value")
        if value is None:
            raise InvalidInput(
                "SetTensor needs a value: a tensor or a fill", reason="MISSING_VALUE"
            )
        return pb.SetTensorResponse(version=self.trainer.write(message.name, chain, value))

    @mutation
    def SetTensorStream(
        self, requests: Iterator[wire.Split[pb.SetTensorChunk]], context: grpc.ServicerContext
    ) -> pb.SetTensorResponse:
        trainer = self.trainer
        chunks = convert.Chunks("value", trainer.max_elements, self.spare, trainer)
        try:  # released however the stream ends: a GPU trainer assembles one at a time
            first: pb.SetTensorChunk | None = None
            chain = None  # the index to write, parsed at the first chunk
            items = _items(requests, context)
            for request in items:
                if first is None:
                    first = request.message
                    if not first.name and first.HasField("chunk"):
                        raise _unnamed(trainer.example_name, next(items, None))
                elif not first.name and (request.message.name or request.message.HasField("chunk")):
                    raise _unnamed(trainer.example_name, request)
                else:
                    _same_target(first, request.message)
                if request.message.HasField("chunk"):
                    check = None
                    if not chunks.started:  # refused now, not once every chunk has come
                        chain = convert.chain_from_proto(first.index)
                        check = functools.partial(_check_write, trainer, first.name, chain)
                    chunks.add(request, _SET_CHUNK, request.message.chunk, check)
            with _unless_caller_gone(context):
                if first is None or not chunks.started:  # as SetTensor without a value
                    raise InvalidInput(
                        "SetTensorStream needs a value: its chunks, the first with the value's "
                        f"shape{' and the name to write' if first is None else ''}",
                        reason="MISSING_VALUE",
                    )
                value = chunks.tensor()
            assert chain is not None  # parsed at the first chunk, which started the value
            # write() copies the value, or keeps it and hands back what it replaced
            version = trainer.write(first.name, chain, value, replaced=chunks.replaced)
            chunks.written()
        finally:
            chunks.release()
        return pb.SetTensorResponse(version=version)

    @mutation
    def ForwardStream(
        self, requests: Iterator[wire.Split[pb.ForwardChunk]], context: grpc.ServicerContext
    ) -> pb.ForwardResponse:
        trainer = self.trainer
        chunks = convert.Chunks("input", trainer.max_elements, trainer=trainer)
        try:  # released however the stream ends: a GPU trainer assembles one at a time
            target, eval_mode = None, False
            for request in _items(requests, context):
                message = request.message
                eval_mode = eval_mode or message.eval_mode
                if message.HasField("input"):
                    # The first chunk's shape refused now, not once every chunk has come
                    check = None if chunks.started else functools.partial(_check_input, trainer)
                    chunks.add(request, _FORWARD_CHUNK, message.input, check)
                if message.HasField("target"):
                    if target is not None:
                        raise InvalidInput(
                            "ForwardStream: a second message carried a target; the target "
                            "comes whole in one message, not in pieces: send the target once",
                            reason="BAD_CHUNK",
                        )
                    target = convert.source_from_split(
                        request, _CHUNK_TARGET, message.target, "target"
                    )
                    if target is None:  # answered OK with no loss (found by a review)
                        raise _empty_target("ForwardStream")
            with _unless_caller_gone(context):
                if not chunks.started:  # as Forward without an input
                    raise InvalidInput(
                        "ForwardStream needs an input: its chunks, the first with the input's "
                        "shape",
                        reason="MISSING_INPUT",
                    )
                tensor = chunks.tensor()
            return convert.forward_response(trainer.forward(tensor, target, eval_mode=eval_mode))
        finally:
            chunks.release()

    @mutation
    def TrainStep(
        self, request: wire.Split[pb.TrainStepRequest], context: grpc.ServicerContext
    ) -> bytes:
        message = request.message
        inputs, target = _step_data(request, _STEP_INPUT, _STEP_TARGET, "TrainStep")
        _check_selectors(len(message.fetch), "TrainStep's fetch")
        fetch = [(f.name, convert.chain_from_proto(f.index)) for f in message.fetch]
        # The fetched pieces are views of live tensors, which the next Step (another
        # caller's) changes in place: the reply is joined under the trainer's lock, in one
        # copy. Sizes were checked before the step.
        return self.trainer.train_step(
            inputs,
            target,
            zero_grad=message.zero_grad,
            fetch=fetch,
            use=convert.fetched_pieces,
            max_fetch_bytes=limits.MAX_VALUE_BYTES,
            finish=convert.train_step_bytes,
        )

    @mutation
    def FillParameters(
        self, request: pb.FillParametersRequest, context: grpc.ServicerContext
    ) -> pb.FillParametersResponse:
        version, filled = self.trainer.fill_parameters(request.value, list(request.names))
        return pb.FillParametersResponse(version=version, filled=filled)

    @rpc
    def ListTensors(
        self, request: pb.ListTensorsRequest, context: grpc.ServicerContext
    ) -> pb.ListTensorsResponse:
        return convert.listing_to_proto(self.trainer.list_tensors())

    @mutation
    def Reset(self, request: pb.ResetRequest, context: grpc.ServicerContext) -> pb.ResetResponse:
        seed = request.seed if request.HasField("seed") else None
        return pb.ResetResponse(version=self.trainer.reset(seed))

    @rpc
    def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.SaveCheckpointResponse:
        path = self._checkpoint_path(request.name)
        trainer = self.trainer
        self._not_the_default_s(
            path,
            "give this session's checkpoint a name of its own (SaveCheckpointRequest.name; "
            "gradwire save NAME)",
        )
        try:
            # Leaving the disk room for the rest of the host (the server's own save at a
            # stop does not: there, the training would be lost).
            version, size = trainer.save(path, keep_free=True)
        except OSError as err:
            log.warning("could not write checkpoint %s: %s", path, err)  # where: the operator's
            raise _unwritable(path, err) from err
        # Its size as every size in the log is written, "1,234 bytes" (exact, one form to
        # search for): a save said none, a removal "1234 bytes", a cleanup "1.2 MiB" (a
        # review of the server's log).
        log.info("saved state version %d to %s (%s bytes)", version, path, f"{size:,}")
        name = checkpoint.name_of(path)
        return pb.SaveCheckpointResponse(version=version, name=name, bytes=size)

    @mutation
    def LoadCheckpoint(
        self, request: pb.LoadCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.LoadCheckpointResponse:
        path = self._checkpoint_path(request.name)
        if not path.is_file():
            raise self._no_such(path)
        try:
            version, saved = self.trainer.restore(path)
        except InvalidInput as err:
            # Removed between the look above and the read (a DeleteCheckpoint of the name
            # from another client or session): not there, rather than "cannot be read: give
            # the server's user read access" or "a folder or a special file", INVALID_ARGUMENT
            # (a review: one load in twenty racing a delete-and-save loop).
            unread = err.reason == "BAD_CHECKPOINT" and "replaced" not in err.metadata
            if unread and not path.exists():
                raise self._no_such(path) from None
            raise
        log.info("loaded state version %d from %s, as version %d", saved, path, version)
        return pb.LoadCheckpointResponse(version=version, saved_version=saved)

    @rpc_sessionless
    def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> pb.ListCheckpointsResponse:
        # No session's lock: the files alone are read, their headers, never their tensors.
        state_dir = self._state_dir()
        found = checkpoint.described(state_dir, self.sessions.default.spec.name)
        return convert.checkpoints_to_proto(found)

    @rpc
    def DeleteCheckpoint(
        self, request: pb.DeleteCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.DeleteCheckpointResponse:
        if not request.name:  # "" is "state" elsewhere: too much to remove by leaving it out
            self._state_dir()
            raise InvalidInput(
                "DeleteCheckpoint removes the checkpoint its request names, and it named none: "
                f"give its name (gradwire checkpoints lists them; {checkpoint.DEFAULT_NAME!r} is "
                "the one the server restores at start)",
                reason="BAD_CHECKPOINT_NAME",
            )
        path = self._checkpoint_path(request.name)
        self._not_the_default_s(path, "only the default session may remove it")
        try:
            if not path.is_file():
                raise self._no_such(path)
            # The link's own size for a link: its target stays, and with it its room (the
            # target's size was said to be freed: a review).
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:  # removed by another call since
            raise self._no_such(path) from None
        except OSError as err:
            raise NotConfigured(
                f"could not remove checkpoint {checkpoint.name_of(path)!r}: "
                f"{err.strerror or err}; the server's user must be able to write its state "
                "directory",
                reason="STATE_DIR_UNWRITABLE",
            ) from err
        log.info("removed checkpoint %s (%s bytes)", path, f"{size:,}")
        return pb.DeleteCheckpointResponse(name=checkpoint.name_of(path), bytes=size)

    def _not_the_default_s(self, path: Path, instead: str) -> None:
        """Refuses, to a session other than the default one, the default session's checkpoint
        (`path` "state"): restored into it at start and written over at a graceful stop, so a
        session's save there would be lost at the stop, or, after a crash, taken for the
        default session's state. `instead`: what to do."""
        # Compared regardless of case: on a file system that ignores it (macOS's, by
        # default), "State" is the same file (a review).
        default = path.name.casefold() == checkpoint.FILE_NAME.casefold()
        if self.trainer is not self.sessions.default and default:
            given = checkpoint.name_of(path)
            same = (
                ""
                if given == checkpoint.DEFAULT_NAME
                else f"{given!r} is {checkpoint.DEFAULT_NAME!r} where case is not told apart "
                "(macOS's file systems): "
            )
            raise InvalidInput(
                f"{same}{checkpoint.DEFAULT_NAME!r} is the default session's checkpoint, which "
                f"the server restores at start and writes at a graceful stop: {instead}",
                reason="BAD_CHECKPOINT_NAME",
                metadata={"name": checkpoint.DEFAULT_NAME},
            )

    def _no_such(self, path: Path) -> NoSuchCheckpoint:
        """NOT_FOUND for a checkpoint the state directory does not hold, naming those it does."""
        assert self.state_dir is not None
        there = checkpoint.saved_names(self.state_dir)
        # The command beside the RPC, as for an unknown tensor: `gradwire load` was sent to
        # SaveCheckpoint alone (found by a review of the error catalogue).
        held = (
            f"it holds: {', '.join(there)}"
            if there
            else "it holds none yet: SaveCheckpoint (gradwire save NAME) writes one"
        )
        return NoSuchCheckpoint(
            f"no checkpoint named {checkpoint.name_of(path)!r} in the server's state "
            f"directory; {held}",
            metadata={"names": ",".join(there)},
        )

    def _state_dir(self) -> Path:
        if self.state_dir is None:
            raise NotConfigured(
                "this server keeps no checkpoints: start it with --state-dir DIR (gradwire "
                "serve) to save and load them there"
            )
        return self.state_dir

    def _checkpoint_path(self, name: str) -> Path:
        state_dir = self._state_dir()
        try:
            return checkpoint.path_for(state_dir, name)
        except ValueError as err:
            raise InvalidInput(str(err), reason="BAD_CHECKPOINT_NAME") from None

    @rpc_sessionless
    def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.ServicerContext
    ) -> pb.OpenSessionResponse:
        settings = None
        if request.HasField("optimizer"):
            settings = convert.optimizer_from_proto(request.optimizer)
        seed = request.seed if request.HasField("seed") else None

        def open_one() -> pb.OpenSessionResponse:
            session = self.sessions.open(seed, settings)
            return pb.OpenSessionResponse(session=session, idle_timeout_s=self.sessions.idle_s)

        # A retry with the request id of an attempt that opened a session gets that session,
        # rather than a second one that would hold a place until it expired.
        return _once(self, "OpenSession", "", context, _metadata(context), open_one)

    @rpc_operator
    def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.ServicerContext
    ) -> pb.CloseSessionResponse:
        # This call's own hold on the session it may be closing goes first: its memory is
        # freed before the answer (sessions.py), not at some later collection.
        _CURRENT.set(None)

        def close_one() -> pb.CloseSessionResponse:
            self.sessions.close(request.session)
            return pb.CloseSessionResponse()

        # A retry of a close that succeeded, its answer lost, is answered as the close was,
        # not NOT_FOUND (UNKNOWN_SESSION) for the session it closed.
        return _once(self, "CloseSession", request.session, context, _metadata(context), close_one)

    @rpc_operator
    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        views, opening = self.sessions.describe()
        return convert.sessions_to_proto(
            views, opening, self.sessions.max_sessions, self.sessions.idle_s
        )

    @rpc_operator  # one place beyond the limit: a client refused BUSY can read the limit
    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self.info

    @mutation
    def SetOptimizer(
        self, request: pb.SetOptimizerRequest, context: grpc.ServicerContext
    ) -> pb.SetOptimizerResponse:
        # The trainer checks the settings against the kind, once, under its lock: with
        # keep_state an unspecified kind is the kind in place, which only it can tell there.
        settings = convert.optimizer_from_proto(request.config, check_kind=False)
        kind_given = request.config.kind != pb.OPTIMIZER_KIND_UNSPECIFIED
        version, resolved = self.trainer.set_optimizer(
            settings, keep_state=request.keep_state, kind_given=kind_given
        )
        return pb.SetOptimizerResponse(version=version, config=convert.optimizer_to_proto(resolved))

    @rpc
    def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetStatsResponse:
        chain = convert.chain_from_proto(request.index)
        low = request.histogram_low if request.HasField("histogram_low") else None
        high = request.histogram_high if request.HasField("histogram_high") else None
        stats.check_bins(request.histogram_bins, low, high)

        def summarize(selection: Selection) -> pb.GetStatsResponse:
            response = pb.GetStatsResponse(version=selection.version, name=selection.name)
            if selection.part is None or selection.full_shape is None:
                return response
            summary = stats.summarize(selection.part, request.histogram_bins, low, high)
            response.stats.CopyFrom(convert.stats_to_proto(summary))
            response.shape.extend(selection.part.shape)
            response.full_shape.extend(selection.full_shape)
            return response

        return self.trainer.read_with(request.name, chain, summarize)

    @rpc_stream
    @sends_watched(
        "the server is stopping, and this watch's client had stopped reading its updates: "
        "the watch ends here; watch again once the server is back"
    )
    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        if not request.items:
            raise InvalidInput(
                f"Watch needs at least one item: a tensor name, e.g. {self.trainer.example_name!r}",
                reason="BAD_REQUEST",
            )
        if request.every_steps < 0 or request.min_interval_ms < 0:
            raise InvalidInput(
                "every_steps and min_interval_ms cannot be negative, got "
                f"{request.every_steps} and {request.min_interval_ms}",
                reason="BAD_REQUEST",
            )
        _check_selectors(len(request.items), "Watch's items")
        interval = request.min_interval_ms / 1000
        selectors = [(item.name, convert.chain_from_proto(item.index)) for item in request.items]
        for item in request.items:
            stats.check_bins(item.histogram_bins, None, None)
        trainer = self.trainer

        subscription = trainer.subscribe(request.every_steps)
        # A watcher that cancels (closes its iterator) is let go of at once, not at the next
        # poll: until then its call held one of the server's places (found by a review:
        # watches opened and closed in a loop made every call BUSY for half a second).
        context.add_callback(subscription.end)

        def update(first: bool = False) -> bytes:
            items = iter(request.items)  # read_many uses the selections in this order

            size = 0

            def take(selection: Selection) -> list[wire.Piece]:
                """One item's part of the update: views of the values, joined by `finish`."""
                nonlocal size
                item = next(items)
                part = selection.part
                # Neither values nor statistics asked for: statistics, the cheap default.
                wants_stats = item.stats or not item.values
                # The item's size: a bound on its name and shapes, the values when asked for,
                # and statistics (nine numbers of up to 11 bytes, a histogram's 10 a bin).
                shapes = (selection.full_shape or (), part.shape if part is not None else ())
                size += described_bytes(selection.name, *shapes)
                if part is not None and item.values:
                    size += part.numel() * part.element_size()
                if wants_stats:
                    size += 128 + 10 * item.histogram_bins
                if size > limits.MAX_VALUE_BYTES:  # nothing is copied before `finish`
                    raise OverLimit(
                        f"the watched tensors take more than {limits.MAX_VALUE_BYTES} bytes "
                        "with their names, shapes and statistics, the most one update may "
                        "carry: watch slices, fewer tensors, or statistics instead of values",
                        reason="WATCH_TOO_LARGE",
                        metadata={"bytes": str(size), "limit": str(limits.MAX_VALUE_BYTES)},
                    )
                summary = None
                if part is not None and wants_stats:
                    summary = stats.summarize(part, item.histogram_bins)
                return convert.watched_pieces(selection, item.values, summary)

            def finish(snapshot: Snapshot[list[wire.Piece]]) -> bytes:
                """The update, its values joined under the lock: one copy, one version."""
                return convert.watch_update_bytes(
                    snapshot.version,
                    "Watch" if first else snapshot.cause,
                    max(snapshot.updates - 1, 0),
                    snapshot.steps,
                    snapshot.used,
                )

            return trainer.read_many(selectors, take, finish, subscription)

        try:
            yield update(first=True)  # the state now; where bad names and indices are refused
            sent = time.monotonic()
            stopping = self.stopping
            while context.is_active() and not subscription.closed and not stopping.is_set():
                wait = sent + interval - time.monotonic()
                if wait > 0:  # too soon: changes meanwhile are counted, not sent
                    subscription.pause(min(wait, WATCH_POLL_S))
                    continue
                if subscription.wait(WATCH_POLL_S) and not subscription.closed:
                    yield update()
                    sent = time.monotonic()
            if stopping.is_set() and context.is_active():
                raise Stopping(
                    "the server is stopping: this watch ends here; watch again once it is back"
                )
            if subscription.closed and context.is_active():
                # Not a normal end: the watcher would take it for one (a review saw OK).
                raise Closed(
                    "the session this watch was on was closed (CloseSession): there is "
                    "nothing more to watch; open a session and watch it"
                )
        finally:
            trainer.unsubscribe(subscription)

    @rpc_stream
    @sends_watched(
        "the server is stopping, and this Train's client had stopped reading its progress: "
        + _TRAIN_ENDED,
        _TRAIN_ENDED,
    )
    def Train(
        self, request: wire.Split[pb.TrainRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TrainProgress]:
        message = request.message
        inputs, target = _step_data(request, _TRAIN_INPUT, _TRAIN_TARGET, "Train")
        if not 1 <= message.steps <= limits.MAX_TRAIN_STEPS:
            raise InvalidInput(
                f"steps must be between 1 and {limits.MAX_TRAIN_STEPS}, got {message.steps}",
                reason="BAD_REQUEST",
            )
        if message.every < 0:
            raise InvalidInput(
                f"every cannot be negative, got {message.every}", reason="BAD_REQUEST"
            )
        every = message.every or 1
        zero_grad = message.zero_grad if message.HasField("zero_grad") else True
        trainer = self.trainer
        # The caller's expected version is its first step's condition: the run starts from
        # the state the caller saw, or not at all.
        metadata = _metadata(context)
        first = Guard(_expected_version(metadata))
        _check_instance(self, metadata, first.expected_version)
        # A tensor sent once is the same every step: on a GPU it crosses to the device once.
        inputs, target = trainer.stage(inputs, "input"), trainer.stage(target, "target")
        sent = _AsSent(trainer, [inputs, target])
        started = time.perf_counter()
        diverged = 0  # the first step whose loss was not finite: between two progresses too
        # A session of the caller's own is closed at a stop, its state not saved: its steps
        # were said to stay applied, and went with it (a review of training remotely).
        lost = (
            ""
            if trainer is self.sessions.default
            else "; this session closes as the server stops, and only the default session's "
            "state is saved: they are lost with it"
        )
        clock = _RunClock(context)
        for k in range(message.steps):
            if not context.is_active():
                return  # cancelled: stop between steps
            if k and not clock.room_for_a_step():
                # Ended here, the count said, rather than by gRPC at the deadline, with no
                # word of the steps applied (the last training review's suggestion).
                raise DeadlinePassed(
                    f"the caller's deadline would pass during the next step: training "
                    f"stopped after {k} of {message.steps} steps, each applied whole",
                    metadata={"steps_done": str(k), "version": str(trainer.version)},
                )
            if self.stopping.is_set():
                raise Stopping(
                    f"the server is stopping: training stopped after {k} of {message.steps} "
                    f"steps, each applied whole{lost}",
                    metadata={"steps_done": str(k), "version": str(trainer.version)},
                )
            try:
                clock.step_begins()
                sent.put_back()
                with guarded(first if k == 0 else None):
                    result = trainer.train_step(
                        _reseeded(inputs, k),
                        _reseeded(target, k),
                        zero_grad=zero_grad,
                        use=_nothing,
                    )
            except DomainError as err:
                if k and isinstance(err, Closed):  # the session closed under the run
                    err.message += (
                        f" (step {k + 1} of {message.steps}: the {k} steps before it were "
                        "applied to the session, and are gone with it)"
                    )
                    err.metadata["steps_done"] = str(k)
                elif k:  # the caller must know that the steps before it stay applied
                    err.message += (
                        f" (step {k + 1} of {message.steps}: the {k} steps before it stay "
                        f"applied, state version {trainer.version})"
                    )
                    err.metadata["steps_done"] = str(k)
                    err.metadata["version"] = str(trainer.version)
                raise
            clock.step_ended()
            done = k + 1
            if not diverged and not math.isfinite(result.loss):
                diverged = done
            # Asked to, a run ends at its first loss that is not finite: a diverged model's
            # steps after it cost their time and change nothing useful (a run left to go on
            # for a researcher who had walked away: found by a review of the CLI).
            halted = diverged == done and message.stop_at_nonfinite
            if done % every == 0 or done == message.steps or halted:
                yield pb.TrainProgress(
                    step=done,
                    steps=message.steps,
                    loss=result.loss,
                    version=result.version,
                    steps_per_s=done / max(time.perf_counter() - started, 1e-9),
                    done=done == message.steps,
                    first_nonfinite_step=diverged,
                    stopped_at_nonfinite=halted and done < message.steps,
                )
            if halted:
                return

    def Calls(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Unary calls as messages on one open stream: each run as its unary call is (the
        session from the stream's metadata, read for each message; the request id, expected
        version and deadline from the message), and answered in order with its response or
        its error; an error ends the message's call, not the stream, and a message sent to
        run only after the one before it succeeded is not run after a failure. The stream
        holds one place while it is open. Once the server stops it ends UNAVAILABLE as soon
        as it has answered the call in progress, or at once if none is (`waiting`)."""
        try:
            with self.slots.stream:
                metadata = _carried_apart(_metadata(context), "a Calls stream's")
                session = metadata.get(SESSION) or None
                # A stream on a session that has closed ends, rather than hold its place
                # answering NOT_FOUND: as soon as it would wait once its session was open, or
                # once it has answered a call (on a session closed already, or never opened).
                bound = session is not None and self.sessions.is_open(session)

                def gone() -> UnknownSession | None:  # reads `bound` as the loop leaves it
                    if not bound or session is None or self.sessions.is_open(session):
                        return None
                    return UnknownSession(_calls_ended(session), metadata={"session": session[:64]})

                failed: str | None = None  # the message before, by its RPC, if it failed
                while (
                    request := self.waiting.next_message(requests, context, session, gone)
                ) is not None:
                    answer, failed = self._answer_message(request, context, metadata, failed)
                    bound = True
                    yield answer
        except Exception:
            _answer_error(context, "Calls", self)

    def Batch(self, request: Any, context: grpc.ServicerContext) -> bytes:
        """Several calls in one unary call: each run as its message on a Calls stream runs
        (`_answer_message`), one after another in the order given, and answered in that order
        in one BatchResponse. The batch holds one place. Once the server begins to stop, the
        calls not yet run are answered STOPPING without running; once the batch's caller is
        gone (its deadline passed, or it cancelled), they are not run at all."""
        try:
            with self.slots:
                metadata = _carried_apart(_metadata(context), "a Batch's")
                items = well_formed(request)
                most = limits.MAX_BATCH_CALLS
                if len(items) > most:  # the deserializer stopped counting one past it
                    raise InvalidInput(
                        f"a Batch carries at most {most} calls, this one more: none was run; "
                        "send them in several batches",
                        reason="BATCH_TOO_LONG",
                        metadata={"limit": str(most)},
                    )
                answers: list[bytes] = []
                # The answers go in one message: each call's answer is kept only if it
                # leaves room for every call after it to be answered (_ANSWER_RESERVE).
                room = limits.MAX_MESSAGE_BYTES - len(items) * _ANSWER_RESERVE
                failed: str | None = None
                for item in map(_CALL_REQUEST, items):
                    if not context.is_active():
                        break  # its caller is gone: no one to run the rest for
                    refuse = None
                    if self.stopping.is_set():
                        refuse = Stopping(
                            "not run: the server began to stop during this Batch; nothing "
                            "was changed: make it again once the server is back"
                        )
                    answer, failed = self._answer_message(
                        item, context, metadata, failed, refuse, "Batch"
                    )
                    if len(answer) + _FRAMING > room:
                        answer, failed = _too_large(item, answer, failed is None, room)
                    room -= len(answer) + _FRAMING - _ANSWER_RESERVE
                    answers.append(answer)
                return calls.batch_response_bytes(answers)
        except Exception:
            _answer_error(context, "Batch", self)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def _answer_message(
        self,
        request: Any,
        context: grpc.ServicerContext,
        stream_metadata: dict[str, str],
        failed: str | None,
        refuse: DomainError | None = None,
        rpc: str = "Calls",
    ) -> tuple[bytes, str | None]:
        """The CallResponse for one message of a Calls stream (or one call of a Batch), and
        the message's RPC name if it failed (None if it succeeded): the call run through the
        path of its unary call, in its order (session, then the request's form, then the
        request id and expected version a mutation carries), less the place, which the
        stream holds. `failed`: the message before it, by its RPC, if that failed: a message
        sent to run only after a success is then not run. `refuse`: the error to answer a
        call named in place of running it (its message is put after the call's name).
        `rpc`: the RPC the message came in (Calls, Batch), whose method counts and logs a
        message that names no call (a Batch's counted as Calls, no Calls stream opened, a
        review of the metrics as an operator runs them found)."""
        name = "Calls"  # until the message names its call
        observer, done = self.observer, None
        # Stands in for the ServicerContext of the unary call, which asks no more of it.
        message_context = MessageContext(context, stream_metadata)
        at = cast(grpc.ServicerContext, message_context)
        try:
            found, call, envelope = _named_call(request)
            if found is not None:
                name = found
                if observer is not None:
                    done = observer.begin(f"/{SERVICE.full_name}/{name}", at)
            if refuse is not None:
                refuse.message = f"{name} {refuse.message}"
                raise refuse
            if failed is not None and envelope is not None and envelope.if_previous_succeeded:
                raise PreviousFailed(
                    f"{name} not run: the call before it, {failed}, did not "
                    f"succeed, and this one was sent to run only after a success "
                    f"(if_previous_succeeded); nothing was changed",
                    metadata={"previous": failed},
                )
            with _Session(self, stream_metadata):
                if found is None:
                    well_formed(request)  # bytes that are no CallRequest at all
                    raise InvalidInput(
                        "the CallRequest names no call this server knows: set one of its "
                        "call fields (forward, step, get_tensor, ...)",
                        reason="BAD_REQUEST",
                    )
                well_formed(call)  # the call's own request, as its unary call checks it
                assert envelope is not None
                method, mutates = _ON_STREAM[name]
                metadata = _message_metadata(envelope, stream_metadata) if mutates else None
                message_context.carry(metadata or stream_metadata, envelope.timeout_ms)
                if metadata is not None:
                    response = _mutate(self, method, call, at, metadata)
                else:
                    response = method(self, call, at)
            answer, code = calls.response_bytes(name, _serialize(response)), "OK"
        except Exception:
            try:
                _answer_error(at, name, self)
            except Answered as answered:
                answer, code = calls.error_bytes(answered.status), answered.code.name
        if observer is not None:
            if done is None:  # no call named: counted and logged as its RPC's (Calls, Batch)
                done = observer.begin(f"/{SERVICE.full_name}/{rpc}", context)
            done(code)
        return answer, None if code == "OK" else name


def _calls_ended(session: str) -> str:
    """Why a Calls stream on `session` ended: the session closed under it."""
    return (
        f"no session {shown(session)} is open (it was closed, expired without calls, or was "
        "never opened): this stream of calls on it ends here, and no call written to it after "
        "its last answer was run; open a session (OpenSession, gradwire open-session)"
    )


class CallObserver(Protocol):
    """Counts and logs calls that are no RPC of their own (metrics.CallInterceptor)."""

    def begin(self, method: str, context: Any) -> Callable[[str], None]:
        """Makes the call current for log lines; the function returned ends it with the
        name of its status code, counting and logging it."""
        ...


#: The metadata a unary mutation reads that a call on a Calls stream carries in its message.
_MESSAGE_FIELDS = {
    REQUEST_ID: "request_id",
    EXPECTED_VERSION: "expected_version",
    EXPECTED_INSTANCE: "expected_instance",
}


def _carried_apart(metadata: dict[str, str], whose: str) -> dict[str, str]:
    """`metadata`, refused (BAD_METADATA) where it carries what each call of a Calls
    stream or a Batch carries in its CallRequest instead. An empty request id is none, as
    for a unary call: a client that always sends the header, empty when it has no id, would
    have had every stream and batch refused (found by a review of the contract). So is an
    empty expected instance (found by a review of the instance id as an integrator in another
    language meets it)."""
    empty = {key for key in (REQUEST_ID, EXPECTED_INSTANCE) if metadata.get(key) == ""}
    if empty:
        metadata = {key: value for key, value in metadata.items() if key not in empty}
    for key, carried in _MESSAGE_FIELDS.items():
        if key in metadata:
            raise InvalidInput(
                f"{whose} metadata cannot carry {key}: each call in it carries its own, as "
                f"CallRequest.{carried}",
                reason="BAD_METADATA",
            )
    return metadata


def _too_large(item: Any, answer: bytes, succeeded: bool, room: int) -> tuple[bytes, str]:
    """The answer in place of a call's `answer` (an error unless it `succeeded`) that would
    leave too little room in a Batch's answers for the calls after it (`room`: the bytes it
    could take), and the call's RPC name. At most _ANSWER_RESERVE bytes with its framing:
    its text names no input."""
    found, _, envelope = _named_call(item)
    name = found or "Calls"
    # A mutation that ran: its change stays, whatever its answer became.
    applied = succeeded and found is not None and _ON_STREAM[found][1]
    if not succeeded:
        what = "failed, and its error did not fit either (it changed nothing)"
    elif applied:
        what = "ran: the change it made stays applied"
        if envelope is not None and envelope.request_id:
            what += "; its answer is kept under its request id while the server keeps answers"
    else:
        what = "ran, and changed nothing"
    status = error_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{name} {what}, but its answer ({len(answer):,} bytes) did not fit in this Batch's "
        f"answers, one message in all (room left: {max(room - _FRAMING, 0):,} bytes); make "
        "calls with large answers on their own (large reads stream)",
        "BATCH_ANSWERS_TOO_LARGE",
        # For a client that reads no English: whether the call succeeded, and whether a
        # change it made stays applied (the contract's one failed call that changed state).
        {
            "bytes": str(len(answer)),
            "limit": str(max(room - _FRAMING, 0)),
            "succeeded": "true" if succeeded else "false",
            "applied": "true" if applied else "false",
        },
    )
    return calls.error_bytes(status.SerializeToString()), name


def _named_call(request: Any) -> tuple[str | None, Any, pb.CallRequest | None]:
    """(the call a message of a Calls stream names, its request as the unary handler takes
    it, the CallRequest); for bytes that are no CallRequest, the request is Malformed under
    its own type's name where the call's field can be found, so that the error names it."""
    if not isinstance(request, Malformed):
        found, call = calls.unwrap_request(request)
        return found, call, request.message
    found, error = calls.named_call(request.data)
    if found is None or error is None:  # the envelope itself is at fault
        return None, None, None
    request_type = SERVICE.methods_by_name[found].input_type
    return found, Malformed(request_type.full_name, error), None


def _message_metadata(envelope: pb.CallRequest, stream: dict[str, str]) -> dict[str, str]:
    """The metadata a mutation on a Calls stream runs with: the stream's, with the message's
    request id, expected version and expected instance as the unary call's metadata would
    carry them, refused where the metadata would be (BAD_METADATA). Reads take none of them,
    as unary reads ignore them."""
    has_version = envelope.HasField("expected_version")
    if not envelope.request_id and not has_version and not envelope.expected_instance:
        return stream
    metadata = dict(stream)
    if envelope.expected_instance:  # compared with this server's in _check_instance
        # Its form checked here, to name the field the caller sent, not the metadata key.
        if not limits.is_instance_id(envelope.expected_instance):
            raise InvalidInput(
                "expected_instance must be a server's instance id, 16 lowercase hex digits "
                f"(GetServerInfo's instance_id), got {shown(envelope.expected_instance)}",
                reason="BAD_METADATA",
            )
        metadata[EXPECTED_INSTANCE] = envelope.expected_instance
    if envelope.request_id:
        if len(envelope.request_id) > limits.MAX_REQUEST_ID_CHARS:
            raise InvalidInput(
                f"request_id is over {limits.MAX_REQUEST_ID_CHARS} characters",
                reason="BAD_METADATA",
            )
        metadata[REQUEST_ID] = envelope.request_id
    if has_version:
        if envelope.expected_version >= 2**63:
            raise InvalidInput(
                f"expected_version must be a state version, from 0 to {2**63 - 1}, got "
                f"{envelope.expected_version}",
                reason="BAD_METADATA",
            )
        metadata[EXPECTED_VERSION] = str(envelope.expected_version)
    return metadata


def _check_every_rpc_served() -> None:
    """Every RPC of the contract has its method in TrainerServicer, checked at import as
    docs/DEVELOPING.md says, before _on_stream looks the Calls stream's calls up: a new call
    on no session without its method let this module import and `gradwire serve` die at
    start with "AttributeError: 'TrainerServicer' object has no attribute" (a review
    of the fifty-fourth session's changes)."""
    for method in SERVICE.methods:
        assert hasattr(TrainerServicer, method.name), (
            f"the contract's service has rpc {method.name}, which TrainerServicer lacks: add a "
            f'method {method.name} (docs/DEVELOPING.md, "Adding a unary RPC")'
        )


_check_every_rpc_served()


def _on_stream() -> dict[str, tuple[Handler[Any], bool]]:
    """The unary calls a Calls stream carries: (the handler's own function, whether it is a
    mutation), by name."""
    found = {}
    for name in calls.METHODS:
        wrapper = getattr(TrainerServicer, name)
        assert not wrapper.sessionless, f"{name} acts on no session: not for a Calls stream"
        found[name] = (wrapper.unwrapped, wrapper.mutates)
    return found


_ON_STREAM = _on_stream()


def _same_target(first: pb.SetTensorChunk, later: pb.SetTensorChunk) -> None:
    """A later chunk of a SetTensorStream names what the first named, or nothing: one that
    named another tensor or part was ignored, the first one's written (found by a review)."""
    if (later.name and later.name != first.name) or (later.index and later.index != first.index):
        raise InvalidInput(
            f"SetTensorStream writes what its first message names ({first.name!r}); a later "
            f"message named {later.name or first.name!r} with another index or name: leave "
            "name and index unset after the first message, or repeat them",
            reason="BAD_CHUNK",
        )


def _unnamed(example: str, later: wire.Split[pb.SetTensorChunk] | None) -> InvalidInput:
    """BAD_NAME for a SetTensorStream whose first message named no tensor, once a value or
    a name comes (the name of `later`, the next message, when it has one). It was refused "a
    tensor name is required", which did not say where the name must be (found by a review
    integrating from Node.js, whose client named the tensor in the second message)."""
    given = later.message.name if later is not None else ""
    return InvalidInput(
        "SetTensorStream writes the tensor its first message names, and the first message "
        f"named none{f' (a later one named {given!r})' if given else ''}: name the tensor "
        f"(e.g. {example!r}) and the part to write in the first message, with or without "
        "the first chunk",
        reason="BAD_NAME",
    )


def _check_input(trainer: Trainer, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Trainer.check_input of a ForwardStream's first chunk. One with no shape is a 0-d
    input, which no model takes: its refusal says that the first chunk carries the shape,
    as a SetTensorStream's first message carries the name (a review integrating from
    Node.js sent the name later; a shape sent later was refused as a 0-d input alone)."""
    try:
        trainer.check_input(shape, dtype)
    except InvalidInput as err:
        if shape:
            raise
        raise InvalidInput(
            f"{err.message}: ForwardStream takes the whole input's shape from its first "
            "chunk (TensorChunk.shape), and the first chunk gave none; give it there",
            reason=err.reason,
            metadata=err.metadata,
        ) from err


def _check_write(
    trainer: Trainer, name: str, chain: Any, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Trainer.check_write of a streamed value's first chunk (its dtype is cast at the write)."""
    trainer.check_write(name, chain, shape)


def _unwritable(path: Path, err: OSError) -> DomainError:
    """The answer to a checkpoint that could not be written: RESOURCE_EXHAUSTED for a disk
    or quota that is full, FAILED_PRECONDITION (the state directory's fault) for the rest.
    Named as the caller named it, as a load's refusal is: where the server keeps its files
    is its operator's business, in the server's log."""
    why = err.strerror or str(err)
    name = f"checkpoint {checkpoint.name_of(path)!r}"
    if isinstance(err, checkpoint.StateDirChanged):  # it says what to do
        return NotConfigured(f"could not write {name}: {why}", reason="STATE_DIR_UNWRITABLE")
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OverLimit(
            f"could not write {name}: {why}; free space in the server's state "
            "directory (gradwire checkpoints lists those there, gradwire delete-checkpoint "
            "NAME removes one), then save again",
            reason="DISK_FULL",
        )
    return NotConfigured(
        f"could not write {name}: {why}; the server's state directory must be a "
        "folder it can write, with no folder of that name in it",
        reason="STATE_DIR_UNWRITABLE",
    )


def _empty_target(rpc: str) -> InvalidInput:
    """A target set but holding nothing: a caller that meant a target, not one that wants
    no loss."""
    return InvalidInput(
        f"{rpc}'s target is set but holds neither a tensor nor a fill: give one, or leave "
        "target unset for a Forward without a loss",
        reason="MISSING_INPUT",
    )


def _step_data(
    request: wire.Split[Any], input_path: wire.Path, target_path: wire.Path, rpc: str
) -> tuple[TensorInput, TensorInput]:
    """A training step's input and target from a request's `input` and `target` fields."""
    message = request.message
    inputs = convert.source_from_split(request, input_path, message.input, "input")
    target = convert.source_from_split(request, target_path, message.target, "target")
    if inputs is None or target is None:
        raise InvalidInput(
            f"{rpc} needs an input and a target (class indices, or the model's mse target): "
            "a step needs a loss",
            reason="MISSING_INPUT",
        )
    return inputs, target


class _AsSent:
    """A Train's tensors, given to each step as they were sent: "the same each step", as
    the .proto says. A model that changes its input in place (`x.sub_(1)`) was given its
    last step's result at the next: at lr 0, four steps' losses 1.377, 1.221, 1.171 and
    1.232 where four TrainSteps gave 1.377 each (found by a review of served models). Each
    is copied once, as the run begins (a batch's memory more while the run lasts), and
    copied back before a step only when a step has changed it (its version counter moved),
    both on the torch thread (Trainer.copy_of, Trainer.put_back)."""

    def __init__(self, trainer: Trainer, sources: list[TensorInput]) -> None:
        self._trainer = trainer
        kept: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for t in sources:  # once each: the input and the target may be one tensor
            if isinstance(t, torch.Tensor) and id(t) not in kept:
                kept[id(t)] = (t, trainer.copy_of(t, "a Train's data"), t._version)
        self._kept = list(kept.values())

    def put_back(self) -> None:
        for i, (tensor, copy, seen) in enumerate(self._kept):
            if tensor._version != seen:
                self._trainer.put_back(tensor, copy)
                self._kept[i] = (tensor, copy, tensor._version)


class _RunClock:
    """Whether a Train's next step can end before its caller's deadline, with time left
    for the answer to reach the caller: judged by the slowest of the last 8 steps but the
    first, and a tenth of the time the run was given for the way back, at least 50 ms and
    at most 0.5 s (the server's deadline is the caller's plus the request's way there). A
    run the deadline would cut is ended between two steps by the server, DEADLINE_EXCEEDED
    with the steps applied, where gRPC ended it at the deadline with no word of them. No
    deadline: always room. The first step is warm-up (a GPU's kernels chosen and compiled,
    the allocator's first blocks): judged by it, a run whose first step took 2 s of 3 s
    stopped there, where 18 more fit (a review of the change); the second step runs
    unjudged, and a deadline it passes ends the run as gRPC ends it."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        given = context.time_remaining()
        self._spare = None if given is None else min(max(given / 10, 0.05), 0.5)
        self._steps: collections.deque[float] = collections.deque(maxlen=8)
        self._began = 0.0
        self._first = True

    def step_begins(self) -> None:
        self._began = time.perf_counter()

    def step_ended(self) -> None:
        if self._first:  # warm-up: not what the next step takes
            self._first = False
            return
        self._steps.append(time.perf_counter() - self._began)

    def room_for_a_step(self) -> bool:
        if self._spare is None:
            return True
        remaining = self._context.time_remaining()
        step = max(self._steps, default=0.0)
        return remaining is None or remaining > step + self._spare


def _reseeded(source: TensorInput, step: int) -> TensorInput:
    """A run's data at step `step`: a fill reseeded, a tensor sent as it is."""
    return source.reseeded(step) if isinstance(source, FillSpec) else source


def _nothing(selection: Selection) -> None:
    return None


def _serialize(response: Message | bytes) -> bytes:
    # Responses with tensors are already bytes (their values spliced in); others are messages.
    return response if isinstance(response, bytes) else response.SerializeToString()


def deserializer(
    message_type: type[Message], type_name: str | None = None
) -> Callable[[bytes | memoryview], Any]:
    """A request deserializer that hands on Malformed for bytes that do not parse, for the
    method to answer INVALID_ARGUMENT (MALFORMED_REQUEST); gRPC answers INTERNAL for a
    deserializer that raises. Messages that carry tensors arrive split (wire.split).
    `type_name`: the request's name where it is served under another (v1 reflection's, read
    as v1alpha's), for the refusal."""
    splits = wire.holds_tensors(message_type)
    parsed_as = message_type.DESCRIPTOR.full_name
    name = type_name or parsed_as

    def parse(data: bytes | memoryview) -> Any:
        # A view: one call of a Batch, whose request holds it (upb parses any buffer).
        try:
            if splits:
                return wire.split(data, message_type)
            return message_type.FromString(cast(bytes, data))
        except DecodeError as err:
            # Answered INVALID_ARGUMENT by the method, instead of gRPC's own INTERNAL.
            return Malformed(name, str(err).replace(parsed_as, name), bytes(data))

    return parse


def on_pool(
    method: Callable[[Any, grpc.ServicerContext], R], pool: ThreadPoolExecutor
) -> Callable[[Any, grpc.ServicerContext], R]:
    """`method` as a function of its own, which grpc runs on `pool` (grpc reads a behaviour's
    `experimental_thread_pool`). grpc's health servicer sets that on its class's method
    instead, shared by every server of a process: each ran its Watches on the pool of the
    last one made, and once that server had stopped, another's Watch failed to start and
    took that server's serving thread down with it (every later call unanswered)."""

    def behaviour(request: Any, context: grpc.ServicerContext) -> R:
        return method(request, context)

    behaviour.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return behaviour


#: grpc's handler factory for each (request streaming, response streaming).
HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _batch_deserializer() -> Callable[[bytes], Any]:
    """Batch's request deserializer: each call's bytes, parsed later by the handler (after
    the token, the place and the call limit: a request of 2-byte calls holds millions, and
    gRPC deserializes a request it then refuses); at most one past MAX_BATCH_CALLS. Malformed
    for bytes that are no BatchRequest."""
    name = pb.BatchRequest.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return calls.batch_calls(data, most=limits.MAX_BATCH_CALLS)
        except ValueError as err:
            return Malformed(name, str(err), data)

    return parse


#: How a call of a Batch is parsed: as a Calls stream's message (a wire.Split, or Malformed,
#: answered as that call's error while the others run).
_CALL_REQUEST = deserializer(pb.CallRequest)
#: Bytes set aside in a Batch's answers for each call not yet answered: room for its
#: framing and, if its own answer does not fit, the short error that takes its place.
_ANSWER_RESERVE = 640
#: The most bytes around one answer in a BatchResponse: an alignment field (at most 9), the
#: answer's tag (1) and its length (at most 4 under 256 MiB).
_FRAMING = 16


def method_handlers(servicer: TrainerServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A handler for every method of the service, from the contract's own descriptor."""
    handlers = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        make = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        parse = _batch_deserializer() if method.name == "Batch" else deserializer(request_type)
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=parse,
            response_serializer=_serialize,
        )
    return handlers
