"""The `progress=` of get, read and set: a callable told the bytes of a value that have crossed.

A read with progress streams (GetTensorStream), so that its value comes a chunk at a time;
a write with progress streams (SetTensorStream) when its value is more than one chunk. The
callable is called on the caller's thread, `progress(bytes_done, bytes_total)`: the value's
bytes as they cross the wire, in the tensor's own dtype (a bfloat16 read into numpy's float32
counts 2 bytes a value), `bytes_done` never going back, the last call `(total, total)` once
the value is whole. An exception it raises cancels the transfer and is raised by the call.
Its time counts in the call's timeout, the chunks waiting while it runs: a timeout that runs
out with much of it spent there says so (`Timed`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc

from gradwire import codec, failures
from gradwire.errors import DeadlineExceeded
from gradwire.fill import Fill

#: `progress(bytes_done, bytes_total)`; what it returns is ignored.
Progress: TypeAlias = Callable[[int, int], object]


def check(progress: Progress | None) -> Progress | None:
    """`progress`, or TypeError before anything is sent for one that cannot be called."""
    if progress is not None and not callable(progress):
        raise TypeError(
            "progress must be a callable taking (bytes_done, bytes_total), such as "
            f"lambda done, total: print(done, total), got {type(progress).__name__}"
        )
    return progress


def value_bytes(value: Any, counted: int) -> int:
    """The bytes a value sent whole carries: `counted` (unary.nbytes), or for a number, which
    it counts as none, its array's; a Fill carries none, the server making its values."""
    if counted or isinstance(value, Fill):
        return counted
    try:
        return int(codec.host_array(value)[1].nbytes)
    except (codec.CodecError, TypeError, ValueError):
        return counted


class Timed:
    """A transfer's progress callable, with the time its calls took (`spent`). They run on the
    caller's thread between two chunks, the chunks waiting, so their time counts in the
    call's timeout: one taking a second a chunk ran a read out of time, and its error said
    only that the messages were still crossing the network, a slow link's words for the
    caller's own callable (found by a review of this session's new features)."""

    #: The share of a transfer's time its callable must have taken for a timeout's error to
    #: say so: a print's or a progress bar's microseconds are not worth a word.
    NAMED_SHARE = 0.1

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._began = time.monotonic()
        #: Seconds spent in the callable so far.
        self.spent = 0.0

    def _call(self, done: int, total: int) -> None:
        started = time.monotonic()
        try:
            self._progress(done, total)
        finally:
            self.spent += time.monotonic() - started

    def tell_time(self, error: DeadlineExceeded) -> None:
        """Adds to `error`, the transfer's timeout run out, the time the callable took of it
        where that was a good share of the transfer's."""
        if self.spent < self.NAMED_SHARE * (time.monotonic() - self._began):
            return
        error.message += (
            f"; the progress callable took {self.spent:.1f} s of that time, the chunks waiting "
            "while it ran (it is called on your thread, between two chunks): make it quicker, "
            "or give a longer timeout"
        )
        error.args = (error.message,)


class Reported(Timed):
    """`progress`, called only with more done than before: a streamed read that a mutation
    cut short is read again from its start, and its calls wait until it passes the last."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(progress)
        self._done = -1

    def __call__(self, done: int, total: int) -> None:
        if done > self._done:
            self._done = done
            self._call(done, total)


class Upload(Timed):
    """A streamed write's messages, counted as gRPC takes them: gRPC draws them on a thread
    of its own (where an exception is gRPC's UNKNOWN, "Exception iterating requests!", and a
    logged traceback), so the callable is called on the caller's thread instead, and the next
    message is drawn only once it has returned: one that raises cancels the call before the
    value's last bytes go, and the server writes nothing. The last call, `(total, total)`,
    comes with the server's answer, the value written."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(progress)
        self._taken: queue.Queue[int | None] = queue.Queue()
        self._go = threading.Semaphore(0)
        self._over = threading.Event()
        self.total = 0
        #: Whether the value's last message has gone to gRPC: until then the server, which
        #: writes a value once its last chunk has come, has written nothing.
        self.last_sent = False

    def messages(self, sized: Iterator[tuple[bytes, int, int]]) -> Iterator[bytes]:
        """The messages of `sized` (message, its value bytes, the value's bytes in all), each
        after the one before was taken and reported."""
        done = 0
        for message, size, total in sized:
            self.total = total
            self.last_sent = done + size >= total
            yield message  # resumed when gRPC has sent it and asks for the next
            done += size
            self._taken.put(done)
            if done >= total:
                return
            self._go.acquire()
            if self._over.is_set():
                return

    def tell_time(self, error: DeadlineExceeded) -> None:
        """As Timed's, and where the value's last message had not gone, that nothing was
        written: the error said the change may have been applied, and its reader was sent to
        read the state version for a write the server cannot have made (found by a review of
        this session's new features)."""
        super().tell_time(error)
        if self.last_sent:
            return
        error.message = error.message.replace(
            failures.MAY_HAVE_APPLIED,
            "nothing was written: the value's last chunk had not been sent, and the server "
            "writes a value once all of it has come",
        )
        error.changes_state = False
        error.args = (error.message,)

    def run(
        self,
        call: grpc.StreamUnaryMultiCallable[Any, Any],
        request: Iterator[bytes],
        timeout: float | None,
        metadata: Any,
    ) -> Any:
        """The call's response, its messages' progress reported as they go."""
        future = call.future(request, timeout=timeout, metadata=metadata)
        future.add_done_callback(lambda _: self._taken.put(None))
        try:
            while (done := self._taken.get()) is not None:
                if done < self.total:
                    self._call(done, self.total)
                self._go.release()
        except BaseException:
            future.cancel()
            raise
        finally:
            self._over.set()
            self._go.release()  # a message waiting for its go ends the stream
        response = future.result()
        self._call(self.total, self.total)
        return response
