"""The benchmark's account of the CPU time a run shared the machine with (bench/load.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import load

#: Seconds of its own CPU time the burner below spends before it ends.
BURN_S = 0.5

#: A process that is not the test's child by the time it burns: its parent exits at once,
#: so it is nobody's to wait for, as another user's process is not the benchmark's. It
#: burns argv[3] seconds of CPU, touching argv[1] as it starts and argv[2] as it ends.
BURNER = """
import os, sys, time
if os.fork():
    os._exit(0)
open(sys.argv[1], "w").close()
start = time.process_time()
while time.process_time() - start < float(sys.argv[3]):
    pass
open(sys.argv[2], "w").close()
"""


def _burn(tmp_path: Path, seconds: float) -> tuple[Path, Path]:
    """Starts a burner of `seconds` of CPU; (its start file, its end file)."""
    started, done = tmp_path / "started", tmp_path / "done"
    subprocess.run(
        [sys.executable, "-c", BURNER, str(started), str(done), str(seconds)],
        check=True,
        timeout=60,
    )
    return started, done


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"the burner did not write {path.name}"
        time.sleep(0.02)


def test_the_first_line_of_proc_stat_gives_busy_and_steal_seconds() -> None:
    stat = "cpu  300 20 100 5000 40 7 9 50 0 0\ncpu0 150 10 50 2500 20 3 4 25 0 0\n"
    assert load.cpu_seconds(stat, 100) == (4.2, 0.5)  # user + nice + system; steal
    old = "cpu  300 20 100 5000\n"  # before kernels had a steal column
    assert load.cpu_seconds(old, 100) == (4.2, 0.0)
    with pytest.raises(ValueError, match="not /proc/stat"):
        load.cpu_seconds("intr 12 0 0\n", 100)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_another_process_s_cpu_time_is_counted_as_others_not_the_benchmark_s(
    tmp_path: Path,
) -> None:
    before = load.snapshot()
    assert before is not None
    _, done = _burn(tmp_path, BURN_S)
    _wait_for(done)  # the burner's own end: its CPU time spent
    after = load.snapshot()
    assert after is not None
    wall = after.wall - before.wall
    own = after.own - before.own
    others = after.busy - before.busy - own
    # The burner's half second, less the ticks' rounding (100 a second, on each CPU).
    assert others >= BURN_S - 0.1, (others, own, wall)
    assert own < BURN_S, own  # this process slept while it burned
    line = load.summary(before, after)
    assert "other processes" in line and line.startswith("CPU during the run")


def test_a_run_beside_other_work_says_its_ratios_are_open_to_doubt() -> None:
    def at(wall: float, busy: float, own: float, steal: float = 0.0) -> load.Snapshot:
        return load.Snapshot(wall=wall, busy=busy, steal=steal, own=own)

    quiet = load.summary(at(0, 0, 0), at(100, 150.0, 148.0, 1.0))
    assert quiet == (
        "CPU during the run (100 s, in cores on average): this benchmark 1.48, "
        "other processes 0.02, the hypervisor (steal) 0.01"
    )
    busy = load.summary(at(0, 0, 0), at(100, 190.0, 150.0))
    assert "other processes 0.40" in busy and "open to doubt" in busy
    stolen = load.summary(at(0, 0, 0), at(100, 150.0, 150.0, 30.0))
    assert "(steal) 0.30" in stolen and "open to doubt" in stolen
    # rusage counts finer than the ticks: a small negative difference is none
    assert "other processes 0.00" in load.summary(at(0, 0, 0), at(10, 14.9, 15.0))
    assert load.summary(None, at(1, 1, 1)) == ""  # no /proc/stat: nothing said


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_a_run_started_beside_a_busy_process_says_so_before_it_runs(tmp_path: Path) -> None:
    started, done = _burn(tmp_path, 2.0)  # longer than the look, at a core at most
    _wait_for(started)
    try:
        said = load.busy_before(0.5)
    finally:
        _wait_for(done)  # not left burning into the next test
    assert said.startswith("note: other processes are using ") and "Ctrl-C" in said
