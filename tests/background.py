"""A server stream read on a thread of its own, for tests that act while it is open."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Reader:
    """Reads `stream` to its end on a daemon thread, keeping what it raised."""

    def __init__(self, stream: Iterable[object]) -> None:
        self.first = threading.Event()  # set at the first message, or when the stream ends
        self.errors: list[BaseException] = []
        self._stream = stream
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in self._stream:
                self.first.set()
        except BaseException as e:  # the test reads it
            self.errors.append(e)
        self.first.set()

    def started(self, timeout: float = 30) -> Reader:
        """Waits for the first message; fails the test if none came."""
        assert self.first.wait(timeout), "the stream sent nothing"
        assert not self.errors, self.errors
        return self
