"""The server's places for calls in progress: at most `--max-concurrent` at once, a call
past the limit answered BUSY at once rather than queued, with a message that says what holds
the places (streams hold theirs until they end). An operator's calls (ListSessions,
CloseSession, GetServerInfo) have a place beyond the limit. A call that finds every place
taken may have one given back: a stream whose client has left a message unread for long is
ended for it (`Reclaimer`, which waiting.SendingStreams is). No grpc here: the
servicer enters a place around each call (servicer.py).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from gradwire_server.errors import OverLimit

#: How long a call that found every place taken waits for the place of a stream ended for it
#: (`Reclaimer`): the stream's handler gives it back as soon as gRPC wakes it from its
#: send, within milliseconds; a call that another took the place from is answered BUSY.
RECLAIM_WAIT_S = 1.0


class Reclaimer(Protocol):
    """What ends, for a call that finds every place taken, a stream whose client has stopped
    reading it (waiting.SendingStreams)."""

    #: How long a stream's message must have waited for its client to read it.
    unread_s: float

    def end_one_unread(self) -> bool:
        """Ends the stream whose message has waited longest, if for `unread_s` or more:
        True when one was ended (its place comes back as its handler unwinds)."""
        ...


class Slots:
    """At most `limit` calls in progress: each call enters once (`with servicer.slots:`), from
    any thread. Entering never waits: a server at its limit answers BUSY at once. A lock and
    a count, cheaper than a semaphore, whose condition variable is Python code."""

    def __init__(self, limit: int, reclaimer: Reclaimer | None = None) -> None:
        self.limit = limit
        #: Asked, with every place taken, to end a stream whose client has stopped reading
        #: it, so that the call takes its place. Without it, or when it ends none, the call is
        #: answered BUSY at once.
        self.reclaimer = reclaimer
        self._taken = 0
        self._streams = 0  # of those taken, by server streams (Watch, Train, streamed reads)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # notified for `_waiting` calls only
        self._waiting = 0  # calls waiting for a reclaimed place
        #: A place for a server stream: counted apart in BUSY's message.
        self.stream = _Place(self, stream=True)
        #: A place for ListSessions, CloseSession and GetServerInfo, beyond the limit
        #: (OPERATOR_PLACES).
        self.operator = _Place(self, beyond=OPERATOR_PLACES)

    @property
    def taken(self) -> int:
        """Calls in progress now."""
        return self._taken

    def __enter__(self) -> None:
        # Written out, not shared with _Place: every unary call runs it.
        with self._lock:
            if self._taken < self.limit:
                self._taken += 1
                return
        self._enter_full(self.limit, 0)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._taken -= 1
            if self._waiting:
                self._freed.notify()

    def _enter_full(self, limit: int, stream: int) -> None:
        """Takes a place for a call that found all `limit` of them taken, if `reclaimer` ends a
        stream whose client stopped reading it and the place it gives back comes within
        RECLAIM_WAIT_S; else raises BUSY. Before, a client that stopped reading streams
        without cancelling them (a dropped iterator in grpc-java, a reader left unfinished in
        C++, a watcher paused) held their places until their deadlines, or while its
        connection lived: 17 unread GetTensorStreams left every other call BUSY (found by a
        review of the server's security)."""
        reclaimed = self.reclaimer is not None and self.reclaimer.end_one_unread()
        deadline = time.monotonic() + RECLAIM_WAIT_S
        with self._lock:
            if reclaimed:
                self._waiting += 1
                try:
                    while self._taken >= limit and (left := deadline - time.monotonic()) > 0:
                        self._freed.wait(left)
                finally:
                    self._waiting -= 1
            if self._taken >= limit:
                raise OverLimit(self._busy(), reason="BUSY")
            self._taken += 1
            self._streams += stream

    def _busy(self) -> str:
        """BUSY's message: with open streams, that they hold their places until they end
        (16 watches left open made every call BUSY, and "retry shortly" never helped)."""
        calls = f"{self.limit} call{'s' if self.limit != 1 else ''} in progress"
        if not self._streams:
            return f"the server is busy: {calls}; retry shortly"
        # The default session is in no listing and cannot be closed: said, as the listing
        # showed no session while a watch of the default session held the place (found by
        # a review of the CLI).
        unread = ""
        if self.reclaimer is not None:
            unread = (
                ", or, for a Watch, Train or streamed read, once its client has left a message "
                f"unread for {self.reclaimer.unread_s:g} s and a call finds no place"
            )
        return (
            f"the server is busy: {calls}, {self._streams} of them "
            "streams (Watch, Train, streamed reads, streams of calls), which hold their places "
            "until they end: retry once some end, or close the watches and clients you no "
            "longer use (ListSessions, gradwire sessions, shows which sessions opened beside "
            "the default one hold calls, and CloseSession, gradwire close-session, ends "
            "theirs, each answered beyond the limit; the default session's streams end only "
            f"when their clients close them{unread})"
        )


#: Places beyond the call limit for ListSessions, CloseSession and GetServerInfo: with every
#: place held by streams (watches left open), an operator could neither see which sessions
#: held them nor close those sessions (found by a review from another language's side), nor
#: a client read the limit it was refused at. Served by one of the server's spare threads.
OPERATOR_PLACES = 1


class _Place:
    """A place in Slots of another kind than a unary call's: a server stream's (counted
    apart in BUSY's message), or an operator's call's (beyond the limit)."""

    __slots__ = ("_beyond", "_slots", "_stream")

    def __init__(self, slots: Slots, *, beyond: int = 0, stream: bool = False) -> None:
        self._slots = slots
        self._beyond = beyond  # places it may take past the limit
        self._stream = int(stream)

    def __enter__(self) -> None:
        slots = self._slots
        with slots._lock:
            if slots._taken < slots.limit + self._beyond:
                slots._taken += 1
                slots._streams += self._stream
                return
        slots._enter_full(slots.limit + self._beyond, self._stream)

    def __exit__(self, *exc: object) -> None:
        slots = self._slots
        with slots._lock:
            slots._taken -= 1
            slots._streams -= self._stream
            if slots._waiting:
                slots._freed.notify()
