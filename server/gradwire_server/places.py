"""The server's places for calls in progress: at most `--max-concurrent` at once, a call
past the limit answered BUSY at once rather than queued, with a message that says what holds
the places (streams hold theirs until they end). An operator's calls (ListSessions,
CloseSession, GetServerInfo) have a place beyond the limit. No grpc here: the servicer enters
a place around each call (servicer.py).
"""

from __future__ import annotations

import threading

from gradwire_server.errors import OverLimit


class Slots:
    """At most `limit` calls in progress: each call enters once (`with servicer.slots:`), from
    any thread. Entering never waits: a server at its limit answers BUSY at once. A lock and
    a count, cheaper than a semaphore, whose condition variable is Python code."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._taken = 0
        self._streams = 0  # of those taken, by server streams (Watch, Train, streamed reads)
        self._lock = threading.Lock()
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
            if self._taken >= self.limit:
                raise OverLimit(self._busy(), reason="BUSY")
            self._taken += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._taken -= 1

    def _busy(self) -> str:
        """BUSY's message: with open streams, that they hold their places until they end
        (16 watches left open made every call BUSY, and "retry shortly" never helped)."""
        calls = f"{self.limit} call{'s' if self.limit != 1 else ''} in progress"
        if not self._streams:
            return f"the server is busy: {calls}; retry shortly"
        # The default session is in no listing and cannot be closed: said, as the listing
        # showed no session while a watch of the default session held the place (found by
        # a review of the CLI).
        return (
            f"the server is busy: {calls}, {self._streams} of them "
            "streams (Watch, Train, streamed reads, streams of calls), which hold their places "
            "until they end: retry once some end, or close the watches and clients you no "
            "longer use (ListSessions, gradwire sessions, shows which sessions opened beside "
            "the default one hold calls, and CloseSession, gradwire close-session, ends "
            "theirs, each answered beyond the limit; the default session's streams end only "
            "when their clients close them)"
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
            if slots._taken >= slots.limit + self._beyond:
                raise OverLimit(slots._busy(), reason="BUSY")
            slots._taken += 1
            slots._streams += self._stream

    def __exit__(self, *exc: object) -> None:
        slots = self._slots
        with slots._lock:
            slots._taken -= 1
            slots._streams -= self._stream
