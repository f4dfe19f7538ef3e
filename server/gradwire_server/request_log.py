"""Retried mutations applied once: the answers of recent mutations by request id.

A client that lost a mutation's answer (its connection dropped as the answer started back)
sends the call again with the same request id (metadata `gradwire-request-id`); the server
answers it with the first attempt's answer rather than applying it twice. No grpc here:
the servicer keeps one RequestLog and passes each call's context as its `Caller`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gradwire_server.errors import AnswerNotKept, CallerGone, DeadlinePassed, shown

R = TypeVar("R")


#: At most this many bytes of answers are kept for retries. A TrainStep that fetches may
#: answer up to 64 MiB, and a log of 1,024 such answers would hold 64 GiB.
ANSWER_BYTES_KEPT = 256 * 1024 * 1024
#: A request id is kept this long at least (a retry after a minutes-long outage is still
#: applied once), or while it is among the last 1,024; and at most this many ids in all,
#: the oldest forgotten first (about 30 MB of ids, at most 128 characters each).
IDS_KEPT_S = 600.0
MAX_IDS_KEPT = 65_536


class RequestLog:
    """The answers of recent mutations by request id, so that a retried call is applied once.

    A retry that arrives while the first attempt runs waits for it, as long as its own
    caller does (`caller`: within its deadline, until it cancels). A failed attempt changed
    nothing, so it is forgotten and its retry runs anew. The ids of the last `size` requests
    are kept, and those used in the last `keep_s` seconds, `max_ids` at most; and the answers
    of the latest of them that fit in `max_bytes`: a retry of a request whose answer was let
    go is refused (AnswerNotKept), not applied again. A retry of an id forgotten is a new
    request (the contract says so, and how to be safe beyond: an expected version).
    """

    def __init__(
        self,
        size: int = 1024,
        max_bytes: int = ANSWER_BYTES_KEPT,
        *,
        keep_s: float = IDS_KEPT_S,
        max_ids: int = MAX_IDS_KEPT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self.max_ids = max(max_ids, size)
        self._clock = clock
        self._lock = threading.Lock()
        #: answers by key, least recently used first; _LET_GO where only the id is kept
        self._done: collections.OrderedDict[tuple[str, ...], Any] = collections.OrderedDict()
        #: when each key in _done was last used, on `clock`
        self._used: dict[tuple[str, ...], float] = {}
        #: the size of each answer still held, oldest first, and their sum
        self._held: collections.OrderedDict[tuple[str, ...], int] = collections.OrderedDict()
        self._bytes = 0
        self._running: set[tuple[str, ...]] = set()
        # Retries waiting for a first attempt to finish; rare, so no Event per call.
        self._finished = threading.Condition(self._lock)
        self._waiting = 0

    @property
    def held_bytes(self) -> int:
        """The bytes of answers held now."""
        return self._bytes

    def once(self, key: tuple[str, ...], run: Callable[[], R], caller: Caller | None = None) -> R:
        """run() once per key; `caller`, the call on whose behalf a retry waits."""
        with self._lock:
            if key in self._running:  # the first attempt is running: wait, then look again
                self._wait_for_first(key, caller)
            if key in self._done:
                self._done.move_to_end(key)
                self._used[key] = self._clock()
                answer: R = self._done[key]
                if answer is _LET_GO:
                    raise AnswerNotKept(
                        f"{key[0]} with request id {shown(key[-1])} was applied before, and "
                        f"its answer is no longer kept (the server keeps "
                        f"{self.max_bytes // (1024 * 1024)} MiB of answers for retries), so "
                        "this retry changes nothing: read the state to see the result, and "
                        "send a new request id for a new request",
                        metadata={"method": key[0]},
                    )
                return answer
            self._running.add(key)
        try:
            answer = run()
            size = _answer_bytes(answer)
        except BaseException:
            with self._lock:
                self._stop_running(key)
            raise
        with self._lock:
            if size > self.max_bytes:  # never held: it would push out every other answer
                self._done[key] = _LET_GO
            else:
                self._done[key] = answer
                self._held[key] = size
                self._bytes += size
            self._used[key] = now = self._clock()
            self._trim(now)
            self._stop_running(key)
        return answer

    def _wait_for_first(self, key: tuple[str, ...], caller: Caller | None) -> None:
        """With the lock held: waits until `key`'s first attempt has ended, or raises when
        the waiting call's caller has gone or its deadline has passed. Before, a retry
        waited however long the first attempt ran (an upload its client had stalled), its
        caller long gone, holding one of the server's call places all along: a client that
        sent 16 such retries left the server answering BUSY to everyone."""
        remaining = None if caller is None else caller.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        self._waiting += 1
        try:
            while key in self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlinePassed(
                        f"{key[0]}: the call's deadline passed while it waited for the first "
                        f"attempt with request id {shown(key[-1])}, which is still running; "
                        "this call changed nothing. Retry with the same id to get that "
                        "attempt's answer once it has one",
                        metadata={"method": key[0]},
                    )
                if caller is not None and not caller.is_active():
                    raise CallerGone(f"{key[0]}: the caller went away while it waited")
                self._finished.wait(RETRY_POLL_S if left is None else min(left, RETRY_POLL_S))
            if caller is not None and not caller.is_active():  # not to run anew for no one
                raise CallerGone(f"{key[0]}: the caller went away while it waited")
        finally:
            self._waiting -= 1

    def _trim(self, now: float) -> None:
        """With the lock held: forget the oldest ids past `max_ids`, and past `size` those
        `keep_s` old; then let go of the oldest answers past `max_bytes`, keeping
        their ids."""
        done, used = self._done, self._used
        while len(done) > self.max_ids or (
            len(done) > self.size and now - used[next(iter(done))] >= self.keep_s
        ):
            key, _ = done.popitem(last=False)
            del used[key]
            self._bytes -= self._held.pop(key, 0)
        while self._bytes > self.max_bytes:
            key, size = self._held.popitem(last=False)
            self._bytes -= size
            self._done[key] = _LET_GO  # keeps its place: a new value for a present key

    def _stop_running(self, key: tuple[str, ...]) -> None:
        """With the lock held: `key` has an answer kept, or failed and is run anew by the
        next attempt; either way, retries waiting for it look again."""
        self._running.discard(key)
        if self._waiting:
            self._finished.notify_all()


class Caller(Protocol):
    """What RequestLog asks of the call a retry waits on behalf of (a gRPC ServicerContext)."""

    def is_active(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


#: How often a retry waiting for its first attempt checks that its caller is still there.
RETRY_POLL_S = 0.1

#: In RequestLog: the request was applied, and its answer let go for room.
_LET_GO: Any = object()


def _answer_bytes(answer: object) -> int:
    """An answer's size: a reply already encoded (TrainStep's), or a message."""
    if isinstance(answer, bytes):
        return len(answer)
    size = getattr(answer, "ByteSize", None)
    return size() if size is not None else 0
