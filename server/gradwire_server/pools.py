"""The thread pools gRPC runs the server's handlers on, made to outlive a thread that cannot
start.

Why: grpc hands every call to its pool from the server's one serving thread, and an exception
there ends that thread. `ThreadPoolExecutor.submit` starts a thread when it finds none idle,
and a thread fails to start when the process may not map its stack (its address space
capped, memory exhausted) or may not make another thread (a container's limit on tasks).
The start's RuntimeError then ended the serving thread: every later call went unanswered,
health checks too, while the port stayed open (found by a scan of the out-of-memory tests'
caps: a fresh server capped at 2 MiB of headroom answered nothing again, even after the cap
was lifted).

Here a thread that cannot start is logged, and the call waits in the pool's queue, as a call
beyond the pool's size does, for the next of its threads that frees up or starts; a client's
deadline ends its wait. Once a thread starts again, that is logged too.
"""

from __future__ import annotations

import logging
from concurrent import futures

log = logging.getLogger("gradwire_server")


class ServingPool(futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor whose submit queues the call when no thread can be started for it,
    instead of raising; see the module's docstring."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._failing = False  # a start failed, and none has succeeded since

    def _adjust_thread_count(self) -> None:
        # Called by submit, under the pool's lock, after the call is queued. A failed start
        # leaves the pool as it was: the thread is added to it only once started.
        before = len(self._threads)
        try:
            super()._adjust_thread_count()
        except RuntimeError as error:
            if not self._failing:
                self._failing = True
                running = len(self._threads)
                log.warning(
                    "could not start a thread (%s_N) for a call: %s; the call waits for %s. "
                    "The process may be out of memory or at its limit on threads",
                    self._thread_name_prefix,
                    error,
                    f"one of the {running} running to be free"
                    if running
                    else "the next thread that starts: none runs calls yet",
                )
            return
        if self._failing and len(self._threads) > before:
            self._failing = False
            log.info("threads (%s_N) start again", self._thread_name_prefix)
