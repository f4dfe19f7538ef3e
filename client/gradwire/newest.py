"""The newest message of a stream, read on a thread of its own: for a reader slower than the
stream, each message it takes is the latest one, not the oldest one waiting.

gRPC buffers a stream's messages that its reader has not taken yet, up to the connection's
flow-control window: hundreds of small watch updates. A reader slower than the updates took
them one by one, each as it was, and so read states further and further behind the server's
(a review read updates hundreds of steps old). Read here as they come, each message replaces
the one not yet taken, and the reader learns how many were dropped.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

#: How often `take`, waiting, wakes to run the handlers of signals received (Ctrl-C).
SIGNAL_POLL_S = 0.1

#: How long `close` waits for the reading thread to end, once the call is cancelled.
CLOSE_WAIT_S = 10.0


class Cancellable(Protocol):
    def cancel(self) -> object: ...


class Newest(Generic[T]):
    """Reads the stream `open_stream` makes on a thread of its own, keeping only the newest
    message not yet taken. `open_stream` is called on that thread with a function to hand
    it the call to cancel on `close`. `weight(message)`: how many messages it stands for
    (a watch update: itself and those the server skipped), summed over those dropped."""

    def __init__(
        self,
        open_stream: Callable[[Callable[[Cancellable], None]], Iterator[T]],
        weight: Callable[[T], int],
    ) -> None:
        self._weight = weight
        self._cond = threading.Condition()
        self._pending: list[T] = []  # at most one
        self._dropped = 0
        self._error: BaseException | None = None
        self._ended = False
        self._closed = False
        self._call: Cancellable | None = None
        # In the reader's context: the call is made as if by the reader (contextvars).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._read, open_stream),
            name="gradwire-newest",
            daemon=True,
        )
        self._thread.start()

    def _hold(self, call: Cancellable) -> None:
        with self._cond:
            self._call = call
            closed = self._closed
        if closed:  # closed before the call was made: it ends at once
            call.cancel()

    def _read(self, open_stream: Callable[[Callable[[Cancellable], None]], Iterator[T]]) -> None:
        try:
            for message in open_stream(self._hold):
                with self._cond:
                    if self._closed:
                        return
                    if self._pending:
                        self._dropped += self._weight(self._pending.pop())
                    self._pending.append(message)
                    self._cond.notify()
        except BaseException as err:  # the stream's end, for the reader after its messages
            with self._cond:
                self._error = err
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify()

    def take(self) -> tuple[T, int] | None:
        """The newest message not taken yet, waiting for one, and the weight of those dropped
        before it; None once the stream has ended. The error that ended the stream is raised
        once every message before it has been taken."""
        with self._cond:
            while not (self._pending or self._ended):
                # Woken now and then: a Ctrl-C the kernel hands another thread interrupts no
                # wait of this one's, and Python runs its handler here only.
                self._cond.wait(SIGNAL_POLL_S)
            if self._pending:
                dropped, self._dropped = self._dropped, 0
                return self._pending.pop(), dropped
            error, self._error = self._error, None
        if error is not None:
            raise error
        return None

    def close(self) -> None:
        """Cancels the call and lets go of what is pending; waits a little for the thread."""
        with self._cond:
            self._closed = True
            call, self._call = self._call, None
            self._pending.clear()
        if call is not None:
            call.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join(CLOSE_WAIT_S)
