"""The one thread a trainer's torch calls run on, and the hand-off to it.

Why one thread: with OpenMP, each thread that calls torch gets its own team of workers, which
spin after each op; teams from several gRPC threads fight for the cores (measured on 2 cores:
a batch-8 step 2.1 ms from one thread, 4.4 ms once other threads had run steps). One thread
also keeps one CUDA context current.

Why one thread for every CPU trainer in the process, sessions included: a team outlives its
last op for as long as its thread lives, and once libgomp manages more threads than there
are CPUs it all but stops spinning between parallel regions, in every team: each region then
wakes its workers from sleep. On the 2-core VM of docs/PERFORMANCE.md, a session that had
taken one step and then sat idle made the default session's TrainStep 41% slower at batch 256
and 70% slower at batch 8, until it was closed. CPU trainers therefore share one thread (their
calls queue in the order they come, each under its own trainer's lock); a trainer on a GPU
keeps a thread of its own, where OpenMP does little and one session's wait for its device
should not hold up another's.

Why not a ThreadPoolExecutor: every remote Step, Backward and Forward pays the hand-off, and
`submit().result()` builds a Future, a Condition and its locks per call. A queue put and one
plain lock do the same job: a no-op call handed over in 23-33 us against 106-136 us on the
2-core VM of docs/PERFORMANCE.md. Through a real server the gain is lost in the noise: what
is left there is the two thread wake-ups, which the VM makes slow.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from gradwire_server.errors import DeadlinePassed, WrongOrder

T = TypeVar("T")


class Closed(WrongOrder):
    """A call that reached a trainer after it was closed (its session ended)."""

    reason = "CLOSED"


class _Call:
    """One call handed to the thread: what to run, and where its answer goes."""

    __slots__ = ("args", "claim", "done", "error", "fn", "kwargs", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Lock()
        self.done.acquire()  # released by the thread once result or error is set
        self.result: Any = None
        self.error: BaseException | None = None
        # A call with a deadline: taken by the thread as it starts the call, or by the caller
        # whose deadline passed first, which withdraws it (see run_until). None: no deadline.
        self.claim: threading.Lock | None = None


class _Worker:
    """A thread that runs the calls put on its queue one at a time, in order, until a None."""

    def __init__(self, name: str) -> None:
        self.queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # The thread holds the queue, not this object or a TorchThread, so that dropping
        # the TorchThread that owns it can end it.
        self.thread = threading.Thread(target=_serve, args=(self.queue,), name=name, daemon=True)
        self.thread.start()


_shared: _Worker | None = None
_shared_lock = threading.Lock()


def _shared_worker() -> _Worker:
    """The process's one thread for CPU trainers, started on first use (again in a child
    process after a fork, where the parent's thread does not run)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.thread.is_alive():
            _shared = _Worker("gradwire-torch")
        return _shared


class TorchThread:
    """Runs the calls handed to it one at a time, in order, on one thread: a thread of its
    own, or with `shared` the process's one thread for CPU trainers, whose calls queue with
    every other shared TorchThread's.

    `run` blocks the caller until its call is done and returns its result or raises its
    exception. `close` lets the calls already handed over finish, then ends a thread of its
    own; later calls raise Closed. An instance dropped without `close` ends its own thread
    too. The shared thread lives as long as the process.
    """

    def __init__(self, name: str = "gradwire-torch", *, shared: bool = False) -> None:
        self._worker = _shared_worker() if shared else _Worker(name)
        self.shared = shared
        self._thread = self._worker.thread
        self.ident = self._thread.ident
        self._closing = threading.Lock()
        self._closed = False
        self._finalizer = None if shared else weakref.finalize(self, self._worker.queue.put, None)

    def on_it(self) -> bool:
        """Whether the caller is this thread."""
        return threading.get_ident() == self.ident

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the thread; its result, or its exception raised here."""
        call = _Call(fn, args, kwargs)
        self._hand_over(call)
        result: T = _answer(call)
        return result

    def _hand_over(self, call: _Call) -> None:
        """Queues `call` for the thread; Closed once this trainer is closed."""
        with self._closing:
            if self._closed:
                # Said in a caller's words: "trainer" is the server's, and which call ends a
                # session is what a client can act on (a review of two researchers sharing
                # one server).
                raise Closed(
                    "the session's model is gone: the session was closed (CloseSession, or "
                    "idle too long) or the server is stopping; open a new session"
                )
            self._worker.queue.put(call)

    def run_until(self, deadline: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """run(), for a call that must not start after `deadline` (time.monotonic()): if it is
        still waiting for the thread then (behind another caller's Forward, say), it is
        withdrawn and DeadlinePassed raised at once. Once started, it is answered when it
        ends. A Calls message's timeout_ms was kept only in deciding whether it ran, and the
        answer came when the work ahead of it ended (found by a walkthrough of the contract)."""
        call = _Call(fn, args, kwargs)
        call.claim = threading.Lock()
        self._hand_over(call)
        if not call.done.acquire(timeout=time_left(deadline)):
            if call.claim.acquire(blocking=False):  # not started: it never will be
                # What it holds (a value to write, a Forward's input) goes now, not when the
                # thread reaches it: withdrawn calls are bounded by no --max-concurrent, and
                # 30 of 4 MiB each held 120 MiB behind one Forward (found by a review).
                call.fn = call.args = call.kwargs = None  # type: ignore[assignment]
                raise waited_past(deadline)
            call.done.acquire()  # started: answered when it ends
        result: T = _outcome(call)
        return result

    def close(self) -> None:
        """Lets the calls handed over finish, then ends a thread of its own (idempotent)."""
        with self._closing:
            self._closed = True
            if self._finalizer is not None:
                self._finalizer()  # puts the sentinel, once
        if self.on_it():
            return  # a call closing its own trainer: the calls queued after it still run
        if self._finalizer is not None:
            self._thread.join()
        else:  # shared: the calls handed over are ahead of this one in the queue
            done = _Call(_nothing, (), {})
            self._worker.queue.put(done)
            _answer(done)


def time_left(deadline: float) -> float:
    """Seconds a lock may wait until `deadline` (time.monotonic()): 0 once past, and no more
    than a lock can wait (gRPC gives a call without a deadline about 2^63 ns)."""
    return min(max(deadline - time.monotonic(), 0.0), threading.TIMEOUT_MAX)


def waited_past(deadline: float) -> DeadlinePassed:
    """The refusal of a call whose `deadline` passed while it waited for other work."""
    return DeadlinePassed(
        "the call's deadline passed while it waited for the server's other work to finish; "
        "nothing was changed"
    )


def _answer(call: _Call) -> Any:
    """Waits for the call to be done; its result, or its exception raised here."""
    call.done.acquire()
    return _outcome(call)


def _outcome(call: _Call) -> Any:
    """A done call's result, or its exception raised here."""
    error = call.error
    if error is not None:
        # The call no longer holds the exception: only the raise below does, so what the
        # failed call allocated goes with it rather than at the next garbage collection.
        call.error = None
        try:
            raise error
        finally:
            del error, call
    return call.result


def _nothing() -> None:
    return None


def _exited(error: BaseException) -> Exception:
    """A SystemExit or KeyboardInterrupt raised on this thread, by a model's own code
    (`sys.exit()` in its forward pass), as an error like any other: raised as it is by a
    caller that catches Exception (a gRPC handler), it left the call unanswered until its
    deadline, and nothing in the log (found by a review of serving one's own model). No
    signal raises one here: Python delivers those to the main thread."""
    said = f" ({error})" if str(error) else ""
    wrapped = RuntimeError(f"{type(error).__name__}{said} raised on the torch thread")
    wrapped.__cause__ = error
    return wrapped


def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
    while True:
        call = calls.get()
        if call is None:
            return
        if call.claim is not None and not call.claim.acquire(blocking=False):
            del call  # withdrawn: its caller's deadline passed while it waited
            continue
        try:
            call.result = call.fn(*call.args, **call.kwargs)
        except Exception as error:  # handed to the caller, who raises it
            call.error = error
        except BaseException as error:
            call.error = _exited(error)
        finally:
            call.fn = call.args = call.kwargs = None  # type: ignore[assignment]
            call.done.release()
            del call
