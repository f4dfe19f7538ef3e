"""The one thread a trainer's torch calls run on, and the hand-off to it.

Why one thread: with OpenMP, each thread that calls torch gets its own team of workers, which
spin after each op; teams from several gRPC threads fight for the cores (measured on 2 cores:
a batch-8 step 2.1 ms from one thread, 4.4 ms once other threads had run steps). One thread
also keeps one CUDA context current.

Why not a ThreadPoolExecutor: every remote Step, Backward and Forward pays the hand-off, and
`submit().result()` builds a Future, a Condition and its locks per call. A queue put and one
plain lock do the same job: a no-op call handed over in 23-33 us against 106-136 us on the
2-core VM of docs/PERFORMANCE.md. Through a real server the gain is lost in the noise: what
is left there is the two thread wake-ups, which the VM makes slow.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from gradwire_server.errors import WrongOrder

T = TypeVar("T")


class Closed(WrongOrder):
    """A call that reached a trainer after it was closed (its session ended)."""

    reason = "CLOSED"


class _Call:
    """One call handed to the thread: what to run, and where its answer goes."""

    __slots__ = ("args", "done", "error", "fn", "kwargs", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Lock()
        self.done.acquire()  # released by the thread once result or error is set
        self.result: Any = None
        self.error: BaseException | None = None


class TorchThread:
    """A thread that runs the calls handed to it one at a time, in order.

    `run` blocks the caller until its call is done and returns its result or raises its
    exception. `close` lets the calls already handed over finish, then ends the thread;
    later calls raise Closed. An instance dropped without `close` ends its thread too.
    """

    def __init__(self, name: str = "gradwire-torch") -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False
        # The thread holds the queue, not this object, so dropping the object ends it.
        self._thread = threading.Thread(target=_serve, args=(self._queue,), name=name, daemon=True)
        self._thread.start()
        self.ident = self._thread.ident
        self._finalizer = weakref.finalize(self, self._queue.put, None)

    def on_it(self) -> bool:
        """Whether the caller is this thread."""
        return threading.get_ident() == self.ident

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the thread; its result, or its exception raised here."""
        call = _Call(fn, args, kwargs)
        with self._closing:
            if self._closed:
                raise Closed(
                    "this trainer was closed (its session ended or the server is stopping); "
                    "open a new session"
                )
            self._queue.put(call)
        call.done.acquire()
        error = call.error
        if error is not None:
            # The call no longer holds the exception: only the raise below does, so what the
            # failed call allocated goes with it rather than at the next garbage collection.
            call.error = None
            try:
                raise error
            finally:
                del error, call
        result: T = call.result
        return result

    def close(self) -> None:
        """Lets the calls handed over finish, then ends the thread (idempotent)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._finalizer()  # puts the sentinel, once
        if not self.on_it():
            self._thread.join()


def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
    while True:
        call = calls.get()
        if call is None:
            return
        try:
            call.result = call.fn(*call.args, **call.kwargs)
        except BaseException as error:  # handed to the caller, who raises it
            call.error = error
        finally:
            call.fn = call.args = call.kwargs = None  # type: ignore[assignment]
            call.done.release()
            del call
