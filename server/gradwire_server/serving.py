"""gRPC's serving thread, watched: a server whose serving thread has ended answers nothing.

Why: grpc runs every event of a server (a call arriving, a message received, a reply sent)
on one thread of its own (`grpc._server._serve`), and an exception there ends it. Found
under a capped address space: a request message whose bytes grpc's Cython code cannot
allocate raises MemoryError there (a 60 MiB unary Forward under 40-160 MiB of headroom),
where no code of gradwire's runs to catch it. From then on no call was answered, health
checks neither, the port stayed open, and a stop waited for ever for that thread to finish
the shutdown, so the state was never saved.

Here the thread is found as the server starts it, and `threading.excepthook` reports its
end at once: `on_end` is called with the exception, and `alive` turns False. `serve` then
saves the state without waiting on gRPC's stop and exits 1, for a supervisor to restart it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("gradwire_server")

#: How Python names the thread grpc starts for `_serve` ("Thread-N (_serve)", since 3.10).
_SERVE_SUFFIX = "(_serve)"

_lock = threading.Lock()
#: The serving threads watched, each with its ServingThread (whose `on_end` is to be called).
_watched: dict[threading.Thread, ServingThread] = {}
_previous_hook: Callable[[threading.ExceptHookArgs], object] | None = None


class ServingThread:
    """The serving thread a grpc server started (`thread` None: not found, so never reported)."""

    def __init__(self, thread: threading.Thread | None, on_end: Callable[[BaseException], None]):
        self.thread = thread
        self._on_end = on_end
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        """False once the thread has ended while the server was not stopping; True when it
        was not found (nothing is known)."""
        return self.error is None and (self.thread is None or self.thread.is_alive())

    def forget(self) -> None:
        """Stops watching: the server is stopping, and the thread ends with its shutdown."""
        with _lock:
            if self.thread is not None:
                _watched.pop(self.thread, None)

    def _ended(self, error: BaseException) -> None:
        self.error = error
        self._on_end(error)


def start_watched(
    start: Callable[[], None], on_end: Callable[[BaseException], None]
) -> ServingThread:
    """Calls `start` (a grpc server's start) and watches the serving thread it starts:
    `on_end(error)` is called on that thread, as it ends with `error`. A grpc that names
    its thread otherwise is logged, and then nothing is watched."""
    before = set(threading.enumerate())
    start()
    found = [t for t in threading.enumerate() if t not in before and t.name.endswith(_SERVE_SUFFIX)]
    thread = found[0] if len(found) == 1 else None
    watch = ServingThread(thread, on_end)
    if thread is None:
        log.warning(
            "gRPC's serving thread not found among the threads the server started (%d named "
            "*%s): if it ends, this server will not notice",
            len(found),
            _SERVE_SUFFIX,
        )
        return watch
    with _lock:
        _install_hook()
        _watched[thread] = watch
    return watch


def _install_hook() -> None:
    """Puts `_hook` in front of threading.excepthook, once per process (under _lock)."""
    global _previous_hook
    if _previous_hook is None:
        _previous_hook = threading.excepthook
        threading.excepthook = _hook


def _hook(args: threading.ExceptHookArgs) -> None:
    with _lock:
        watch = None if args.thread is None else _watched.pop(args.thread, None)
    if watch is None or args.exc_value is None:
        assert _previous_hook is not None
        _previous_hook(args)
        return
    try:
        watch._ended(args.exc_value)
    except BaseException:  # out of memory again, most likely: Python's own report at least
        assert _previous_hook is not None
        _previous_hook(args)
