"""The server keeps the memory a step frees for the next step (allocator.py).

Counted in page faults, never timed: a step that reuses the last step's memory faults none in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gradwire_server import allocator
from tests.background import eventually
from tests.serve_process import serving
from tests.thread_starts import RefusedStarts

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="malloc settings are glibc's")

#: A training step in miniature, without the noise of a server: a thread (as the torch
#: thread) holding tensors that live on, and a "step" of 4 MiB temporaries freed at its end.
#: Prints the page faults per step. With glibc's defaults the temporaries are mapped anew
#: every step. (What the top pad prevents, a heap mapped and unmapped every step, showed
#: only inside the server: strace, docs/performance-history.md.)
STEPS = """
import resource, sys, threading
import torch
from gradwire_server import allocator

torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
faults = []

def thread():
    def block():
        return torch.ones(1 << 20)  # 4 MiB

    block()  # freed at once
    live = [block() for _ in range(15)]

    def step():
        temporaries = [block() for _ in range(3)]
        del temporaries

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)

t = threading.Thread(target=thread)
t.start()
t.join()
print(faults[0])
"""
PAGES_PER_STEP = 3 * 4 * 1024 * 1024 // 4096


def faults_per_step(setting: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", STEPS, setting], capture_output=True, text=True, check=True
    )
    return float(done.stdout)


@pytest.mark.memory
@glibc_only
def test_a_thread_keeps_the_memory_its_last_step_freed() -> None:
    kept = faults_per_step("keep")
    returned = faults_per_step("default")
    assert kept < PAGES_PER_STEP / 100, f"{kept:.0f} page faults a step with freed memory kept"
    # Every page, every step, with glibc's defaults (3,040 of 3,072 on the benchmark's VM).
    assert returned > PAGES_PER_STEP / 2, (
        f"only {returned:.0f} page faults a step with glibc's defaults: does the server still "
        "need its malloc settings?"
    )


#: gRPC's threads in miniature: twelve threads, alive throughout as a pool's are, each in
#: turn holding 32 MiB in 4 MiB blocks from malloc, as a streamed write's chunks are, and
#: freeing them. Prints how much the process grew, in MiB.
TURNS = """
import threading
import numpy as np
from gradwire_server import allocator

assert allocator.keep_freed_memory()

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

turns = [threading.Event() for _ in range(12)]
done = [threading.Event() for _ in turns]
finish = threading.Event()

def thread(i):
    turns[i].wait()
    blocks = [np.ones(1 << 20, dtype=np.float32) for _ in range(8)]
    del blocks
    done[i].set()
    finish.wait()

threads = [threading.Thread(target=thread, args=(i,)) for i in range(len(turns))]
for t in threads:
    t.start()
before = resident()
for turn, ended in zip(turns, done):
    turn.set()
    ended.wait()
print((resident() - before) / 2**20)
finish.set()
for t in threads:
    t.join()
"""


def growth_mib(**environment: str) -> float:
    """TURNS's growth, run with glibc's malloc settings given by `environment` alone."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
    }
    done = subprocess.run(
        [sys.executable, "-c", TURNS],
        capture_output=True,
        text=True,
        env={**inherited, **environment},
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@glibc_only
def test_memory_freed_on_many_threads_is_kept_per_arena_not_per_thread() -> None:
    """Each thread held 32 MiB at its busiest. With an arena a thread, every arena kept
    that: a 512 MiB streamed write grew the server by up to 1.48 times its size
    (allocator.py). In the two arenas the server's threads share, a thread reuses what the
    ones before it freed."""
    shared = growth_mib()
    assert shared < 3 * 32, f"{shared:.0f} MiB kept after twelve threads each held 32 MiB in turn"


@glibc_only
@pytest.mark.parametrize(
    "environment",
    [{"MALLOC_ARENA_MAX": "64"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=64"}],
    ids=["variable", "tunable"],
)
def test_an_arena_limit_the_caller_set_stands(environment: dict[str, str]) -> None:
    """64 arenas, one for each thread: each keeps its 32 MiB (384 MiB in all, seen)."""
    assert growth_mib(**environment) > 6 * 32


def test_a_tunable_the_caller_set_is_found_wherever_it_stands_in_the_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GLIBC_TUNABLES holds several settings, colon-separated: the caller's arena limit
    stands after another tunable too, and another tunable is not it."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    for tunables, set_by_caller in [
        ("glibc.malloc.arena_max=4", True),
        ("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4", True),
        ("glibc.malloc.arena_test=4", False),
        ("", False),
    ]:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
        found = allocator._set_by_caller("MALLOC_ARENA_MAX", "glibc.malloc.arena_max")
        assert found is set_by_caller, tunables


@glibc_only
def test_gradwire_serve_keeps_freed_memory_unless_told_not_to() -> None:
    with serving() as (_, log):
        assert "memory a step frees is kept for the next step" in log
    with serving("--return-freed-memory") as (_, log):
        assert "memory a step frees goes back to the system (--return-freed-memory)" in log


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False


@glibc_only
def test_a_setting_glibc_refuses_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gradwire serve` says freed memory goes back to the system when glibc refuses a
    setting: here a fast-bin size over glibc's largest (M_MXFAST, 160 bytes on 64-bit),
    which is refused and sets nothing."""
    monkeypatch.delenv("MALLOC_MXFAST_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    refused = (1, 1 << 20, "MALLOC_MXFAST_", "glibc.malloc.mxfast")  # M_MXFAST
    monkeypatch.setattr(allocator, "SETTINGS", (refused,))
    assert allocator.keep_freed_memory() is False
    # Told though a setting after it was taken (glibc's default fast-bin size, 128 bytes).
    taken = (1, 128, "MALLOC_MXFAST_", "glibc.malloc.mxfast")
    monkeypatch.setattr(allocator, "SETTINGS", (refused, taken))
    assert allocator.keep_freed_memory() is False


#: A step at batch 8, then at 20 other batch sizes, then at batch 8 again, with oneDNN
#: saying whether each kernel it makes came from its cache. Prints hits and misses of the
#: last step.
KERNELS = """
import sys
from gradwire_server import allocator
from gradwire_server.trainer import Trainer
from gradwire_server.fills import FillSpec

print(allocator.limit_onednn_cache(), file=sys.stderr)
trainer = Trainer(device="cpu", seed=0)

def step(batch):
    x, y = FillSpec("ones", (batch, 3, 10, 10)), FillSpec("zeros", (batch,))
    trainer._run(trainer.train_step, x, y, zero_grad=True, use=lambda selection: None)

for batch in [8, *range(9, 29)]:
    step(batch)
print("--- batch 8 again", flush=True)
step(8)
"""


def kernels_made_again(capacity: str | None) -> tuple[int, int]:
    """(hits, misses) of oneDNN's kernel cache in the last step of KERNELS, with
    ONEDNN_PRIMITIVE_CACHE_CAPACITY set to `capacity` beforehand, or unset."""
    environment = {k: v for k, v in os.environ.items() if k != allocator.ONEDNN_CACHE_VARIABLE}
    if capacity is not None:
        environment[allocator.ONEDNN_CACHE_VARIABLE] = capacity
    done = subprocess.run(
        [sys.executable, "-c", KERNELS],
        capture_output=True,
        text=True,
        check=True,
        env={**environment, "ONEDNN_VERBOSE": "all"},
    )
    last = done.stdout.split("--- batch 8 again", 1)[1]
    return last.count("create:cache_hit"), last.count("create:cache_miss")


def test_onednn_keeps_the_kernels_of_a_few_shapes_only() -> None:
    """At oneDNN's default capacity every shape's kernels are kept: a server sent 200 batch
    sizes grew by 1.2 GiB (0.3 GiB at 128; allocator.py). With gradwire's cap, 20 other
    shapes turn the cache over; a capacity the caller set stands."""
    hits, misses = kernels_made_again(None)
    assert misses > 0, f"batch 8's kernels still cached after 20 other shapes ({hits} hits)"
    hits, misses = kernels_made_again("1024")
    assert hits > 0 and misses == 0, (hits, misses)


def test_gradwire_serve_caps_onednn_s_cache() -> None:
    with serving() as (_, log):
        assert f"oneDNN keeps at most {allocator.ONEDNN_CACHE_CAPACITY} compiled CPU kernels" in log


def test_the_onednn_capacity_returned_is_the_one_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's capacity stands, and is the one `gradwire serve` logs."""
    monkeypatch.setenv(allocator.ONEDNN_CACHE_VARIABLE, "1024")
    assert allocator.limit_onednn_cache() == "1024"
    monkeypatch.delenv(allocator.ONEDNN_CACHE_VARIABLE)
    assert allocator.limit_onednn_cache(64) == "64"
    assert os.environ[allocator.ONEDNN_CACHE_VARIABLE] == "64"


#: 64 blocks of 1 MiB, each with a small block after it that stays, written and freed: holes
#: in the heap that glibc keeps (no threshold gives back the middle of a heap). Prints how
#: many MiB of the process's pages release_freed_memory() let go.
HOLES = """
import ctypes
from gradwire_server import allocator

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

assert allocator.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks, kept = [], []
for _ in range(64):
    blocks.append(libc.malloc(1 << 20))
    ctypes.memset(blocks[-1], 1, 1 << 20)
    kept.append(libc.malloc(64))
for block in blocks:
    libc.free(block)
before = resident()
assert allocator.release_freed_memory()
print((before - resident()) / 2**20)
"""


@glibc_only
def test_freed_memory_in_the_middle_of_a_heap_is_given_back_when_asked() -> None:
    """What a burst of 60 MiB health requests left behind stayed in the heaps for good
    (health_service.py); glibc gives it back when asked. (The process's own pages, which
    no other process's load changes.)"""
    done = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True)
    assert float(done.stdout) >= 48, f"{done.stdout.strip()} MiB of 64 MiB of holes let go"


def test_freed_memory_is_released_once_calls_stop() -> None:
    """Not during a burst of calls (its memory is in use), once after it."""
    released: list[float] = []
    release = allocator.ReleaseWhenQuiet(
        quiet_s=2.0, most_s=60.0, least_bytes=10, release=lambda: released.append(1)
    )
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        release.soon(5)
        time.sleep(0.005)
    assert released == []
    eventually(lambda: released == [1])
    release.soon(10)  # another burst, another release
    eventually(lambda: released == [1, 1])


def test_a_trickle_of_calls_puts_the_release_off_no_longer_than_its_longest_wait() -> None:
    """Each call put it off again: one request a half second, with no token, kept what a
    burst had taken for good (found by a review of the change)."""
    released: list[float] = []
    release = allocator.ReleaseWhenQuiet(
        quiet_s=1.0, most_s=1.5, least_bytes=10, release=lambda: released.append(1)
    )
    deadline = time.monotonic() + 30
    while not released and time.monotonic() < deadline:
        release.soon(10)
        time.sleep(0.2)  # never a quiet second
    assert released == [1]


def test_by_default_a_release_waits_for_16_mib_read_then_a_quiet_second() -> None:
    """The health service's settings: requests of 4 KiB from any caller released nothing
    until 16 MiB had been read, and none is released during a burst."""
    released: list[float] = []
    release = allocator.ReleaseWhenQuiet(release=lambda: released.append(1))
    release.soon((16 << 20) - 1)
    time.sleep(1.2)
    assert released == []
    release.soon(1)
    time.sleep(0.3)
    assert released == []  # a quiet second first
    eventually(lambda: released == [1])


def test_a_release_whose_thread_could_not_start_is_tried_by_the_next_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No thread could start (out of memory): nothing released, and the next request
    starts one, rather than finding a release waiting that never will."""
    released: list[float] = []
    release = allocator.ReleaseWhenQuiet(
        quiet_s=0.05, most_s=0.1, least_bytes=10, release=lambda: released.append(1)
    )
    starts = RefusedStarts(monkeypatch, lambda name: name == "gradwire-release")
    release.soon(10)
    time.sleep(0.3)
    assert released == []
    starts.refusing = False
    release.soon(10)
    eventually(lambda: released == [1])


def test_small_calls_release_nothing_until_their_bytes_add_up() -> None:
    """A release makes the next training step fault in every page the server keeps: one
    for each request just over the health limit (any caller's, a second apart) was a
    release a second (found by a review of the change)."""
    released: list[float] = []
    release = allocator.ReleaseWhenQuiet(
        quiet_s=0.05, most_s=0.1, least_bytes=100, release=lambda: released.append(1)
    )
    for _ in range(9):
        release.soon(10)
    time.sleep(0.5)
    assert released == []
    release.soon(10)  # 100 bytes in all
    eventually(lambda: released == [1])
    for _ in range(9):  # counted again from the release
        release.soon(10)
    time.sleep(0.5)
    assert released == [1]
    release.soon(10)
    eventually(lambda: released == [1, 1])
