"""Keeps the memory a training step frees for the next step, instead of giving it back.

With glibc's default settings, the CPU tensors of one step (activations, gradients, the
temporaries of the backward pass) go back to the operating system when the step ends, and
the next step faults the same pages in again: on the benchmark's 2-core VM, about 900-1,600
page faults and about 1 ms of a 6-7 ms step at batch 256 (docs/performance-history.md, "Page
faults in every step"). Two of glibc's habits do it:
- a block over the mmap threshold (128 KiB at first) gets a mapping of its own, unmapped
  when it is freed. glibc raises the threshold when it sees such a block freed, but only to
  that block's size, and a heap with more than twice that free at its top gives it back;
- the torch thread, like every thread outside the main arena, allocates from heaps of at
  most 64 MiB. When a step's blocks do not fit, glibc maps a new heap for them and unmaps it
  as soon as it is empty, at the end of the step: with the two thresholds below set but not
  the pad, strace still showed a heap mapped and unmapped in every step.

`keep_freed_memory()` sets four malloc parameters for the whole process:
- blocks under 32 MiB (glibc's ceiling) come from a heap, not from mappings of their own;
- a heap gives free memory at its top back only when more than 256 MiB is free there;
- a heap grows by 64 MiB more than asked (address space only: pages come when touched), and
  a heap left empty is kept: glibc unmaps one only when the heap before it has more room
  than that to spare, and no heap is bigger than 64 MiB;
- at most two arenas (glibc's pools of heaps: the main one and one more), which all the
  threads share; by default a thread gets one of its own, up to eight per CPU. With freed
  memory kept, each arena keeps what its threads held at their busiest: the 4 MiB chunks of
  a streamed write, received and freed on several of gRPC's threads, stayed in as many
  arenas, and a 512 MiB write grew the server by 1.11-1.48 times its size. In two, a chunk
  reuses memory the last ones freed in its arena: 1.03-1.09 times
  (docs/performance-history.md, "The thirty-first session"). glibc fixes the limit the
  first time a thread needs a new arena after it is set (or after the process has more than
  eight): the server sets it before its threads start; arenas made before stay, shared. Two
  arenas' locks are shared too: measured on 2 vCPUs, where steps and small calls took what
  they took with an arena a thread, not on a machine of many cores.

A setting the caller made already, in glibc's environment variable (`MALLOC_ARENA_MAX`,
`MALLOC_TRIM_THRESHOLD_`, ...) or its tunables (`GLIBC_TUNABLES=glibc.malloc.arena_max=4`,
...), stands. The price is resident memory: the process keeps what its busiest step used
(blocks of 32 MiB and more are still mapped and unmapped on their own, but for one that a
heap's free top holds: glibc looks there first). `gradwire serve
--return-freed-memory` leaves glibc's defaults alone. Other C libraries (musl, macOS) are
left alone too. Under a cap on the address space (`ulimit -v`, RLIMIT_AS), the main heap
grows by the 64 MiB pad or not at all: with less than that left under the cap, a small block
fails where it would have fit. `MALLOC_TOP_PAD_=0` in the server's environment lifts that
(tests/oom_server.py sets the pad to 0 for the same reason).

`release_freed_memory()` gives back the free memory of every arena, wherever in its heaps it
lies (glibc's `malloc_trim`): after requests of a size no training step frees, sent by
callers who need no token, once they stop (`ReleaseWhenQuiet`; health_service.py), since
glibc kept it for good, with these settings or its defaults.

`limit_onednn_cache()` caps oneDNN's cache of compiled CPU kernels (a convolution's, with
their scratch memory, per shape). Every new batch size adds about 18 of them for the
tutorial's model; at oneDNN's default capacity, 1,024, a server sent 200 different batch
sizes of 600-800 grew by 1.2 GiB, against 0.3 GiB at 128. A shape seen again after the
cache has turned over compiles its kernels again, once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: Blocks under this come from the heap. glibc refuses more than HEAP_MAX_SIZE / 2, 32 MiB
#: on 64-bit systems.
MMAP_THRESHOLD = 32 * MIB
#: A heap keeps up to this much free memory at its top.
TRIM_THRESHOLD = 256 * MIB
#: A heap grows by this much more than asked (address space; pages come when touched).
TOP_PAD = 64 * MIB
#: Arenas for all the process's threads: the main one and one more.
ARENA_MAX = 2

#: Each setting: mallopt's parameter, gradwire's value, and the environment variable and
#: tunable under which glibc takes the same setting from a caller.
SETTINGS = (
    (M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    (M_TOP_PAD, TOP_PAD, "MALLOC_TOP_PAD_", "glibc.malloc.top_pad"),
    (M_ARENA_MAX, ARENA_MAX, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
)


def _set_by_caller(variable: str, tunable: str) -> bool:
    if variable in os.environ:
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(item.split("=", 1)[0] == tunable for item in tunables.split(":"))


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Sets the process's malloc to keep freed memory (above), but for what the caller set
    already. False when the C library is not glibc (nothing changed) or glibc refused a
    setting."""
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: malloc settings left as they are")
        return False
    # All of them: setting the mmap or the trim threshold turns off glibc's adjustment of
    # both. The trim threshold alone sent every block over 128 KiB to a mapping of its own:
    # seven times the page faults.
    applied = True
    for param, value, variable, tunable in SETTINGS:
        if _set_by_caller(variable, tunable):
            log.info("malloc: %s as the environment sets it", tunable)
        else:
            applied = bool(libc.mallopt(param, value)) and applied
    return applied


def release_freed_memory() -> bool:
    """Gives the system back the pages of the memory every arena holds free (glibc's
    `malloc_trim(0)`), wherever in its heaps it lies: the thresholds above only ever give
    back a heap's free top, and glibc's defaults no more. True when glibc gave some back;
    False when it had none to give, or the C library is not glibc (nothing done). It takes
    each arena's lock in turn while it runs (tens of milliseconds for a gigabyte), and the
    next training step faults in again the pages it had kept."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))


class ReleaseWhenQuiet:
    """Calls `release` (release_freed_memory) on a thread of its own once requests of
    `least_bytes` or more in all have been read (`soon(size)` for each) and then
    `quiet_s` have passed without one, or `most_s` since those bytes were reached, whichever
    comes first: once after a burst, not once a call.

    For memory that a caller can make the process hold and free in a way no training step
    does, where glibc would keep it for good (health requests of 60 MiB, which gRPC
    reads whole: health_service.py). During the burst the memory is in use anyway; a
    release then would only fault the same pages in again. The longest wait, `most_s`,
    is there for a trickle of such requests, each of which put the release off again
    for ever; the least bytes for small ones, each of which (4 KiB, any caller) made the
    next training step fault in every page the server keeps (both found by a review of the
    change)."""

    def __init__(
        self,
        quiet_s: float = 1.0,
        most_s: float = 5.0,
        least_bytes: int = 16 << 20,
        release: Callable[[], object] = release_freed_memory,
    ) -> None:
        self.quiet_s = quiet_s
        self.most_s = most_s
        self.least_bytes = least_bytes
        self.release = release
        self._lock = threading.Lock()
        self._last = 0.0  # when soon() was last called, under self._lock
        self._since = 0.0  # when the bytes read reached least_bytes, under self._lock
        self._bytes = 0  # read since the last release, under self._lock
        self._waiting = False  # a thread waits to release, under self._lock

    def soon(self, size: int) -> None:
        """A request of `size` bytes was read that no training step would have freed."""
        with self._lock:
            self._last = time.monotonic()
            self._bytes += size
            if self._waiting or self._bytes < self.least_bytes:
                return
            self._waiting, self._since = True, self._last
        try:
            threading.Thread(target=self._wait, name="gradwire-release", daemon=True).start()
        except RuntimeError as error:  # no thread can start (out of memory): none released
            with self._lock:
                self._waiting = False
            log.debug("freed memory not released: %s", error)

    def _wait(self) -> None:
        while True:
            with self._lock:
                due = min(self._last + self.quiet_s, self._since + self.most_s)
                left = due - time.monotonic()
                if left <= 0:
                    self._waiting, self._bytes = False, 0
                    break
            time.sleep(left)
        start = time.perf_counter()
        try:
            released = self.release()
            log.debug(
                "freed memory released (%s) in %.0f ms",
                released,
                (time.perf_counter() - start) * 1000,
            )
        except Exception:  # not the process's end: said, and the next burst tries again
            log.warning("could not release freed memory", exc_info=True)


#: oneDNN's own variable, read once, when its first kernel is made.
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
#: Kernels kept: those of about seven shapes of the tutorial's model.
ONEDNN_CACHE_CAPACITY = 128


def limit_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> str:
    """Caps oneDNN's kernel cache at `capacity`, unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set
    already (the caller's choice stands). Call it before the process's first CPU
    convolution: oneDNN reads the variable then, once. Returns the capacity in force."""
    return os.environ.setdefault(ONEDNN_CACHE_VARIABLE, str(capacity))
