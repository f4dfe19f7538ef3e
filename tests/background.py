"""A server stream read on a thread of its own, for tests that act while it is open; and a
wait for what happens in the background."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


class Reader:
    """Reads `stream` on a daemon thread, keeping its messages and what it raised, until it
    ends or `until` a message says so (the stream is closed then)."""

    def __init__(
        self, stream: Iterable[Any], until: Callable[[Any], bool] = lambda message: False
    ) -> None:
        self.messages: list[Any] = []
        self.errors: list[BaseException] = []
        self.first = threading.Event()  # set at the first message, or when the stream ends
        self._stream = stream
        self._until = until
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self._stream:
                self.messages.append(message)
                self.first.set()
                if self._until(message):
                    break
        except BaseException as e:  # the test reads it
            self.errors.append(e)
        finally:
            self.first.set()
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()

    def started(self, timeout: float = 30) -> Reader:
        """Waits for the first message; fails the test if none came."""
        assert self.first.wait(timeout), "the stream sent nothing"
        assert not self.errors, self.errors
        return self

    def join(self, timeout: float = 30) -> list[Any]:
        """The messages, once the stream has ended; what it raised, raised here."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        if self.errors:
            raise self.errors[0]
        return self.messages


def eventually(
    condition: Callable[[], bool],
    failure: str = "not within 30 s",
    *,
    within: float = 30.0,
    every: float = 0.01,
) -> None:
    """Waits until `condition()` holds, looking every `every` seconds; fails the test with
    `failure` once `within` seconds have passed."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(every)
