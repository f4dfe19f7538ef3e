"""The streams waiting on their client, for its next message or for it to read what was
sent, so that a stop can end them at once.

Why: a stream between two messages waits in gRPC's request iterator, which nothing but the
client's next message, its end or the call's cancellation wakes. Pipelines and
`stream_calls=True` keep a client's Calls stream open while its program does other things,
and a tool keeps its reflection stream open while it is connected, so every stop waited for
the whole grace period (5 s by default) for streams that had nothing in progress. A stream
in the middle of a call is left to finish it; it ends when it next comes back here, before
waiting again (`WaitingStreams`).

Likewise a Watch or a Train whose client has stopped reading waits in gRPC's send of its
next message until the client reads on (flow control), and so missed the stop it looks for
between messages: a stop waited the whole grace period for it (a watcher paused in a
debugger, a notebook that read one update and went on). At a stop, such a stream still in
the same send a second later is ended (`SendingStreams`). And such a stream holds one of the
server's places for calls for as long as it lives (a client that drops a stream without
cancelling it, as grpc-java's blocking iterators and C++'s readers do, left every other call
BUSY): when a call finds every place taken, the stream whose send has waited longest, for
UNREAD_S or more, is ended and its place given to that call (`end_one_unread`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from gradwire.limits import ENDED_UNREAD
from gradwire_server.errors import Stopping

T = TypeVar("T")
log = logging.getLogger("gradwire_server")

#: How long, at a stop, a stream's send may wait for its client to read before the stream is
#: ended. A second: a client reading as fast as a watch's updates come takes them in far
#: less on loopback or a LAN; the stop, which would end the stream anyway, is not held.
STALLED_S = 1.0

#: How long a stream's send must have waited for its client to read before the stream may be
#: ended for a call that finds every place taken. Half a minute: a client reading on a slow
#: link takes a 16 MiB update in 13 s at 10 Mbit/s, and a message of a streamed read (4 MiB
#: unless it asks for larger) in 4 s; a paused watcher, or a stream its client dropped,
#: never takes it. Only a call that would otherwise be refused BUSY ends one.
UNREAD_S = 30.0

#: Why a Calls stream ended at a stop: what ran on it and what did not.
STOPPED = (
    "the server is stopping: this stream of calls ends here, and no call written to it after "
    "its last answer was run; call again once the server is back"
)


class WaitingStreams:
    """The streams of one service open now that are waiting for a message, by their context,
    each with the session it acts on (None: the default one, or none). `stopped`: the
    message of the status they end with at a stop."""

    def __init__(self, stopped: str = STOPPED) -> None:
        self.stopped = stopped
        self._lock = threading.Lock()
        self._waiting: dict[grpc.ServicerContext, str | None] = {}
        self._stopped = False

    def next_message(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        session: str | None = None,
        gone: Callable[[], Exception | None] | None = None,
    ) -> Any | None:
        """The stream's next message, None once its client has ended it. Raises Stopping
        once `stop` has been called, before waiting or for a message that came as it was:
        that message is not run. `session`: the session the stream acts on, whose close
        (`end_session`) ends the stream while it waits; `gone`: the error to end the stream
        with, instead of waiting, when that session has closed already (None while open),
        asked once the stream is among the waiting, so that a close either finds it there
        or is seen here."""
        with self._lock:
            if self._stopped:
                raise Stopping(self.stopped)
            self._waiting[context] = session
        try:
            if gone is not None and (error := gone()) is not None:
                raise error
            message = next(requests, None)
        except grpc.RpcError:
            if self._stopped:  # the cancel of `stop`, not the client's
                raise Stopping(self.stopped) from None
            if gone is not None and (error := gone()) is not None:  # end_session's cancel
                raise error from None
            raise
        finally:
            with self._lock:
                del self._waiting[context]
        if self._stopped:
            raise Stopping(self.stopped)
        # end_session's cancel may end the iterator as a client's end would, not raise.
        if message is None and gone is not None and (error := gone()) is not None:
            raise error
        return message

    @property
    def count(self) -> int:
        """Streams waiting now."""
        with self._lock:
            return len(self._waiting)

    def stop(self) -> None:
        """Ends the streams waiting now (nothing was in progress on them), and each other
        stream the next time it would wait."""
        with self._lock:
            self._stopped = True
            waiting = list(self._waiting)
        for context in waiting:
            _cancel(context, self.stopped)

    def end_session(self, session: str, details: str) -> None:
        """Ends the streams of `session` waiting now (nothing is in progress on them), NOT_FOUND
        with `details`: the session has closed, and every call they carried would be refused
        for it. Left open, such a stream held one of the server's places for as long as its
        client lived: sessions closed (CloseSession) or expired left every other call BUSY,
        the BUSY message's advice to close them included (found by a review of several users
        at once)."""
        with self._lock:
            ending = [context for context, on in self._waiting.items() if on == session]
        for context in ending:
            _cancel(context, details, grpc.StatusCode.NOT_FOUND)


class _Sending:
    """One stream that `SendingStreams` watches: its method, what to tell its client if a stop
    ends it, and what its end leaves, its sends so far (odd while one is under way), when the
    last began, and whether it was ended."""

    __slots__ = ("context", "ended", "method", "sends", "since", "stalled", "then")

    def __init__(
        self, context: grpc.ServicerContext, stalled: str, method: str, then: str = ""
    ) -> None:
        self.context = context
        self.stalled = stalled
        self.method = method
        self.then = then
        self.sends = 0
        self.since = 0.0
        self.ended = False

    def send(self, message: T) -> Iterator[T]:
        """Yields `message` to gRPC (`yield from stream.send(message)`), counted under way
        until gRPC asks for the next: until then it is being sent, or waits for the client
        to read (flow control)."""
        self.since = time.monotonic()
        self.sends += 1
        try:
            yield message
        finally:
            self.sends += 1


class SendingStreams:
    """The open server streams that end at a stop (Watch, Train) and their sends, so that a
    stop can end those whose client has stopped reading: their handler waits in gRPC's send
    and cannot look for the stop until the client reads on."""

    def __init__(self, stalled_s: float = STALLED_S, unread_s: float = UNREAD_S) -> None:
        self.stalled_s = stalled_s
        self.unread_s = unread_s
        #: Called for each stream `end_one_unread` ends (metrics.Metrics counts them).
        self.on_reclaimed: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._open: set[_Sending] = set()
        self._stopped = False
        self._looking = False  # the stop's thread runs

    @contextlib.contextmanager
    def open(
        self, context: grpc.ServicerContext, stalled: str, method: str = "stream", then: str = ""
    ) -> Iterator[_Sending]:
        """A stream, watched while the block runs: it sends its messages through the
        `_Sending` given (`send`). `stalled`: the status message it ends with if a stop finds
        its client not reading (UNAVAILABLE; no ErrorInfo can go with a cancel, and the
        message only where gRPC can still deliver it behind the messages not read);
        `method`: the RPC's name, for the message and log line of `end_one_unread`, and
        `then` what the stream's end leaves, for that message (a Train's steps)."""
        stream = _Sending(context, stalled, method, then)
        with self._lock:
            self._open.add(stream)
            # A stream whose handler starts after the stop (it waited for a thread, or came
            # as the stop began) may send once before it looks for the stop.
            self._look_if_stopped()
        try:
            yield stream
        finally:
            with self._lock:
                self._open.discard(stream)

    def stop(self) -> None:
        """Begins ending, on a thread of its own, each stream whose send is still under way
        `stalled_s` after it was first seen under way, while streams are open (the streams
        end themselves at the stop, or gRPC ends them at the grace period). A client that
        reads, but too slowly to take one message in that time (a large update on a slow
        link, a loop slower than a second an update), is ended the same way: its stream was
        ending anyway, and it loses what it had not read and the STOPPING reason."""
        with self._lock:
            self._stopped = True
            self._look_if_stopped()

    def _look_if_stopped(self) -> None:
        """Starts the stop's thread, once stopped, unless it runs (under the lock)."""
        if self._stopped and not self._looking:
            self._looking = True
            thread = threading.Thread(
                target=self._end_stalled, name="gradwire-stalled", daemon=True
            )
            try:
                thread.start()
            except RuntimeError as err:  # memory exhausted, a limit on tasks: the stop goes on
                self._looking = False
                log.warning(
                    "could not start the thread that ends stalled streams at a stop (%s): "
                    "those whose client has stopped reading end with the grace period",
                    err,
                )

    def end_one_unread(self) -> bool:
        """Ends the stream whose send has waited longest for its client to read, if it has
        waited `unread_s` or more, for a call that found every place taken (places.Slots):
        UNAVAILABLE, as a stop's (a watch --reconnect watches again), a message saying why
        (rarely delivered: gRPC puts it behind the messages not read), and a WARNING line.
        True when one was ended; its place comes back as its handler unwinds, which gRPC
        wakes from the send at once."""
        now = time.monotonic()
        with self._lock:
            unread = [
                stream
                for stream in self._open
                if stream.sends % 2 and not stream.ended and now - stream.since >= self.unread_s
            ]
            if not unread:
                return False
            stream = min(unread, key=lambda stream: stream.since)
            stream.ended = True
        waited = now - stream.since
        log.warning(
            "ended a %s whose client had left a message unread for %.1f s, to give its place "
            "to a call that found all of them taken (peer %s)",
            stream.method,
            waited,
            stream.context.peer(),
        )
        _cancel(
            stream.context,
            f"this {stream.method}'s client {ENDED_UNREAD} {waited:.1f} s when "
            "a call found every place of the server taken: the server ended it to give that "
            f"call its place{', and ' + stream.then if stream.then else ''}; read a stream as "
            "its messages come, and cancel one you stop reading",
        )
        if self.on_reclaimed is not None:
            self.on_reclaimed()
        return True

    def _end_stalled(self) -> None:
        before: dict[_Sending, int] = {}
        while True:
            with self._lock:
                if not self._open:  # the next stream to open starts it again
                    self._looking = False
                    return
                now = {stream: stream.sends for stream in self._open if not stream.ended}
            for stream, sends in now.items():
                if sends % 2 and before.get(stream) == sends:  # the same send, still under way
                    stream.ended = True
                    _cancel(stream.context, stream.stalled)
            before = now
            time.sleep(self.stalled_s)

    @property
    def under_way(self) -> int:
        """Streams open now with a send under way (being sent, or waiting for the client)."""
        with self._lock:
            return sum(stream.sends % 2 for stream in self._open)


def _cancel(
    context: grpc.ServicerContext,
    details: str,
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
) -> None:
    """Cancels a stream waiting on its client (for its next message, or for it to read)
    with `code` (UNAVAILABLE unless given) and `details` as its status. A client may
    have written a message as the stream was cancelled, which was not run: told
    UNAVAILABLE, it retries it, where told CANCELLED (the status of gRPC's public cancel) it
    took the call as cancelled on its own side, perhaps run, and did not retry (found by a
    review: 3 stops of 6 under a client making calls back to back). Only grpcio's call
    object cancels with a status (no ErrorInfo can go with it, so no reason); should
    another grpcio not have it, the public cancel. The context is given the status too,
    which the call's count and log line read (metrics.CallInterceptor): a stream ended here
    unwinds as one its client closed, and was counted CANCELLED, a call its caller
    cancelled, where its client saw `code` (found by a review of this session's new
    features: 16 streams ended for a call read as 16 cancels)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    # Before the cancel, which wakes the handler to unwind and be counted at once.
    _set_status(context, code, details)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:  # grpcio's internals changed: CANCELLED, as gRPC's API has it
        _set_status(context, grpc.StatusCode.CANCELLED, details)
        context.cancel()


def _set_status(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Gives `context` the status its call ends with, for its count and log line."""
    with contextlib.suppress(Exception):  # a context without them: counted as before
        context.set_code(code)
        context.set_details(details)
