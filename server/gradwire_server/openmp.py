"""How many OpenMP threads the calling thread's torch ops use, set for that thread alone.

Why: torch runs an op over more than 32,768 values on its OpenMP team. The team's workers
spin for a few milliseconds after an op, then sleep; an op that finds them asleep wakes them
and waits for them at its end. On a small VM the woken worker can wait behind its own master,
which spins on the same vCPU: on the 2-core VM of docs/PERFORMANCE.md, the tutorial's
optimizer step took 5.1 ms after 10 ms of idle time on two threads and 0.18 ms on one, and a
whole batch-1 step 7.2 ms against 0.9 ms. `gradwire serve
--one-thread-for-small-work` runs small steps on the torch thread alone (`Trainer`'s
`one_thread_for_small_work`). It is not the default: results can differ in the last bits
from torch's defaults (a sum split over threads rounds differently), and on that VM tiny
calls back to back got about 0.2 ms slower, because no spinning worker keeps the second
vCPU awake for gRPC's threads.

Why not `torch.set_num_threads`: it sets a process-wide default, clears oneDNN's cache of
compiled kernels and sets MKL's threads too. OpenMP's own `omp_set_num_threads` changes only
the calling thread's team (libgomp and LLVM's runtime keep it per thread), and torch reads
it before each parallel op (`torch.get_num_threads()` is OpenMP's `omp_get_max_threads()`).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: The OpenMP runtimes torch's builds load: GNU's (Linux wheels), Intel's and LLVM's.
_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([-.][\w.-]*)?\.(so[\w.]*|dylib)$")


def _mapped_runtimes() -> list[Path]:
    """The OpenMP runtimes mapped into this process, torch's first (Linux: /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    # A line: address, permissions, offset, device, inode, and the file, when there is one.
    files = {fields[5] for fields in (line.split(maxsplit=5) for line in maps.splitlines())
             if len(fields) == 6}  # fmt: skip
    found = sorted(Path(f) for f in files if _RUNTIME.search(f))
    torch_dir = Path(torch.__file__).resolve().parent
    # torch/lib/ holds the runtime of the pip wheels; torch.libs/ that of some older ones.
    ours = {torch_dir, torch_dir.with_name("torch.libs")}
    return sorted(found, key=lambda path: not any(p in ours for p in path.resolve().parents))


#: OpenMP's omp_set_num_threads(n): the calling thread's team size for the ops that follow.
SetThreads = Callable[[int], None]


def _find() -> SetThreads | None:
    for path in _mapped_runtimes():
        try:
            set_threads = ctypes.CDLL(str(path)).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        set_threads.argtypes = [ctypes.c_int]
        set_threads.restype = None
        if _drives_torch(set_threads):
            return set_threads
    return None


def _drives_torch(set_threads: SetThreads) -> bool:
    """Whether this runtime's team size is torch's, checked on a thread of its own so that
    no other thread's setting moves."""
    answer: list[bool] = []

    def check() -> None:
        before = torch.get_num_threads()  # also lets torch set up this thread first
        set_threads(1)
        answer.append(torch.get_num_threads() == 1)
        set_threads(before)

    checker = threading.Thread(target=check, name="gradwire-openmp-check")
    checker.start()
    checker.join()
    return answer == [True]


_runtime: SetThreads | None = None
_looked = False
_looking = threading.Lock()


def runtime() -> SetThreads | None:
    """The OpenMP runtime torch uses, when it can be found and drives torch; None otherwise
    (torch built without OpenMP, a platform without /proc)."""
    global _runtime, _looked
    with _looking:
        if not _looked:
            _runtime = _find()
            _looked = True
            if _runtime is None:
                log.debug("no OpenMP runtime found that sets torch's threads")
        return _runtime


def available() -> bool:
    """Whether `one_thread()` can do what it says here."""
    return runtime() is not None


@contextmanager
def one_thread(when: bool = True) -> Iterator[None]:
    """Runs the block's torch ops on the calling thread alone (no OpenMP team), when `when`
    and the runtime is found; the thread's team size is put back after."""
    found = runtime() if when else None
    if found is None:
        yield
        return
    before = torch.get_num_threads()
    found(1)
    try:
        yield
    finally:
        found(before)


#: torch's grain: an op over fewer values than this per thread runs on fewer threads.
_GRAIN = 32768


def start_team() -> None:
    """Starts the calling thread's OpenMP team, every thread torch would use, with one small
    op. libgomp ends the process ("Thread creation failed") when it cannot start a worker,
    and it starts them at the thread's first parallel op: a server's first step under
    exhausted memory, or at a limit on tasks, ended the process with no answer to anyone
    and nothing in the log (found by a review that capped a server's memory). Once
    started, the team is reused."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.empty(_GRAIN * threads, dtype=torch.uint8).fill_(0)
