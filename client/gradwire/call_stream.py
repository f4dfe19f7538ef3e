"""A client's Calls stream: its unary calls as messages on one open stream, one at a time.

The client (client.py) decides which calls go here and keeps its retries; this module keeps
the stream: it writes each call's CallRequest, waits for its CallResponse within the call's
timeout, and raises the same grpc.RpcError a unary call would have raised (the server's
status with its ErrorInfo, DEADLINE_EXCEEDED, or the stream's own end), so that errors reach
the caller as from a unary call. A stream that failed, or whose call timed out, is spent:
the client opens another.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.rpc import status_pb2

from gradwire import calls, limits, wire

__all__ = ["CallStream", "MessageError", "Spent"]

_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: How long a watchdog with no call to time waits for one before it ends its thread.
WATCHDOG_IDLE_S = 5.0
#: How often gRPC's thread that writes an idle stream's requests looks whether the stream
#: has ended under it.
IDLE_LOOK_S = 1.0
#: Timeouts past the most a gRPC deadline holds (and infinite or NaN ones, which
#: Client(timeout=) refuses) are no deadline on a stream: the watchdog's wait would overflow.
MAX_TIMEOUT_S = limits.MAX_GRPC_SECONDS
_END: Any = object()


class MessageError(grpc.RpcError):
    """A call on a Calls stream that failed: its status, as a failed unary call's RpcError
    carries it (code, details and the google.rpc.Status trailer with its ErrorInfo)."""

    def __init__(self, code: grpc.StatusCode, details: str, status: bytes | None = None) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailer: tuple[tuple[str, str | bytes], ...] = (
            ((calls.STATUS_TRAILER, status),) if status is not None else ()
        )

    @classmethod
    def from_status(cls, status: bytes) -> MessageError:
        parsed = status_pb2.Status.FromString(status)
        return cls(_CODES.get(parsed.code, grpc.StatusCode.UNKNOWN), parsed.message, status)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # grpc's stubs type the pairs as a class of their own; grpc returns plain pairs.
    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
        return self._trailer


#: What a Calls stream's server answers a CallRequest whose call it does not know (a call
#: newer than the server), INVALID_ARGUMENT, BAD_REQUEST: the call was not run. A Batch
#: answers such a call so too.
_NO_SUCH_CALL = "the CallRequest names no call this server knows"


def unknown_on_stream(error: grpc.RpcError) -> bool:
    """Whether a call on a Calls stream (or in a Batch) was refused as one the server does
    not know there."""
    return error.code() == grpc.StatusCode.INVALID_ARGUMENT and (error.details() or "").startswith(
        _NO_SUCH_CALL
    )


def garbled_answer(err: ValueError, kind: str = "answer", what: str = "the call") -> MessageError:
    """The error of a call whose answer (on a Calls stream, or in a Batch) a server garbled:
    out of order, or not an answer."""
    return MessageError(
        grpc.StatusCode.INTERNAL,
        f"a garbled {kind} ({err}): whether {what} ran is not known (read the state version)",
    )


class Spent(Exception):
    """The stream ended before the call could be written to it (closed by another thread,
    or its session left): the call was not sent, and goes as a call of its own."""


def _deadline_timeout(timeout: float | None) -> float | None:
    """`timeout`, or None for none: past MAX_TIMEOUT_S (or not finite) it is no deadline."""
    if timeout is not None and not (math.isfinite(timeout) and timeout <= MAX_TIMEOUT_S):
        return None
    return timeout


class CallStream:
    """One open Calls stream, for one session (`session`, as its metadata named it).

    Take `lock` (without waiting: a call that finds it taken goes as a unary call) around
    `call`. `spent` once the stream has ended, failed or a call on it timed out.
    """

    def __init__(
        self,
        open_stream: Callable[..., Any],
        metadata: Sequence[tuple[str, str]],
        session: str | None,
    ) -> None:
        self.session = session
        self.lock = threading.Lock()
        self.spent = False
        #: Whether a call has been answered on it: a stream refused at its start (a server
        #: without Calls) fails before that.
        self.answered = False
        # A request and the end are written under `_send`, each after a look at `spent`: a
        # call never follows the end into the queue, to fail unanswered.
        self._send = threading.Lock()
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses = open_stream(self._outgoing(), metadata=metadata)
        # The watchdog: cancels the stream when the call in progress passes its deadline
        # (`_due`, on time.monotonic). A thread of its own, started when a call first has a
        # deadline and ended after WATCHDOG_IDLE_S without one. It sleeps until the due it
        # saw (`_sleeping_until`), and is woken only for an earlier one: with one timeout for
        # every call, it wakes once per timeout, not once per call.
        self._watch = threading.Condition(threading.Lock())
        self._due: float | None = None
        self._watchdog: threading.Thread | None = None
        self._sleeping_until = math.inf
        self._timed_out = False

    def _outgoing(self) -> Iterator[Any]:
        """The requests, for gRPC's thread that writes them; it ends at the end marker, or
        once the stream has ended otherwise (a client dropped unclosed, its channel closed:
        else that thread would wait on the queue for ever)."""
        while True:
            try:
                request = self._requests.get(timeout=IDLE_LOOK_S)
            except queue.Empty:
                # (Set by __init__ once gRPC has started this thread: looked for, not assumed.)
                responses = getattr(self, "_responses", None)
                if responses is not None and responses.done():
                    return
                continue
            if request is _END:
                return
            yield request

    def call(
        self,
        method: str,
        request: Sequence[wire.Piece],
        request_id: str | None,
        expected: calls.Expected | None,
        timeout: float | None,
    ) -> memoryview:
        """`method`'s unary response bytes (a view of the message received), or the
        grpc.RpcError its unary call would have raised (a MessageError for the server's
        answer); Spent, the call unsent, when the stream ended before it was written."""
        self.send(method, request, request_id, expected, timeout)
        return self.receive(method, timeout)

    def send(
        self,
        method: str,
        request: Sequence[wire.Piece],
        request_id: str | None,
        expected: calls.Expected | None,
        timeout: float | None,
        if_previous_succeeded: bool = False,
    ) -> None:
        """Writes a call without waiting for its answer, which `receive` reads: answers come
        in the order the calls were sent. Spent, the call unsent, when the stream ended
        before it was written."""
        timeout = _deadline_timeout(timeout)
        timeout_ms = 0 if timeout is None else max(math.ceil(timeout * 1000), 1)
        envelope = wire.join(
            calls.request_pieces(
                method, request, request_id, expected, timeout_ms, if_previous_succeeded
            )
        )
        with self._send:
            if self.spent:
                raise Spent
            self._requests.put(envelope)

    def receive(self, method: str, timeout: float | None) -> memoryview:
        """The answer to the oldest call sent and not yet received, `method`'s: its unary
        response bytes, or the error its unary call would have raised. `timeout`: from now
        (the server starts a call's deadline once it has answered the ones before it)."""
        timeout = _deadline_timeout(timeout)
        if timeout is not None:
            self._time(time.monotonic() + timeout)
        try:
            data = next(self._responses)
        except StopIteration:  # the server ended the stream with a call unanswered: a bug
            self.spent = True
            raise MessageError(
                grpc.StatusCode.INTERNAL, "the server ended its stream of calls unanswered"
            ) from None
        except grpc.RpcError:
            self.spent = True
            if self._timed_out:
                raise MessageError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            raise
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt, an exception a signal raised):
            # the answer is still to come, and would be read as the next call's. A review
            # found a later call given an earlier one's answer, or every later call failing.
            self.cancel()
            raise
        finally:
            with self._watch:
                self._due = None
        if self._timed_out:  # the watchdog cancelled the stream as the answer came: it stands
            self.spent = True
        try:
            payload, error = calls.unwrap_response(data, method)
        except ValueError as err:
            self.spent = True  # the stream's order can no longer be trusted
            self._responses.cancel()
            raise garbled_answer(err) from None
        self.answered = True
        if error is not None:
            raise MessageError.from_status(error)
        assert payload is not None
        return payload

    def refused(self, error: grpc.RpcError) -> bool:
        """Whether `error` is the server refusing the stream at its start for want of the
        Calls RPC (a server from before it): nothing written on it ran."""
        return (
            not self.answered
            and not isinstance(error, MessageError)
            and error.code() == grpc.StatusCode.UNIMPLEMENTED
        )

    @property
    def usable(self) -> bool:
        """Neither spent nor ended by the server while idle (a server that stopped, a
        connection lost): a call written into an ended stream would fail unsent."""
        if self.spent:
            return False
        if self._responses.done():
            self.spent = True
            return False
        return True

    def close(self, wait: float | None = 1.0) -> None:
        """Ends the stream as after its last call: the server answers what was written
        before, then ends its side (OK). `wait`: seconds to wait for a call in progress on
        another thread and for that end, after which the stream is cancelled; None: no
        wait and no cancel (a call in progress still gets its answer)."""
        with self._send:
            if not self.spent:
                self.spent = True
                self._requests.put(_END)
        with self._watch:
            self._due = None
            self._watch.notify()  # a watchdog waiting ends now
        if wait is None:
            return
        done = threading.Event()
        if self._responses.add_callback(done.set) and not done.wait(wait):
            self._responses.cancel()

    def cancel(self) -> None:
        """Ends the stream at once, calls unanswered and all: spent."""
        self.spent = True
        self._responses.cancel()

    def _time(self, due: float) -> None:
        with self._watch:
            self._due = due
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch_calls, name="gradwire-call-deadline", daemon=True
                )
                self._watchdog.start()
            elif due < self._sleeping_until:  # asleep for a later due, or for none
                self._watch.notify()

    def _watch_calls(self) -> None:
        with self._watch:
            try:
                while not self.spent:
                    due = self._due
                    if due is None:  # no call with a deadline: wait for one, a while
                        self._sleeping_until = math.inf
                        self._watch.wait(WATCHDOG_IDLE_S)
                        if self._due is None:
                            return
                        continue
                    left = due - time.monotonic()
                    if left > 0:
                        self._sleeping_until = due
                        self._watch.wait(left)
                        continue
                    self._timed_out = self.spent = True
                    self._responses.cancel()
                    return
            finally:
                self._sleeping_until = math.inf
                self._watchdog = None
