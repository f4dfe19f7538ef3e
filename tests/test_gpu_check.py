"""scripts/gpu_check.sh, the GPU machine's one run, tried on the CPU: its wiring, not the GPU.

The script runs where no test runs (a lent GPU machine, a few minutes at a time), so a
renamed flag or a moved file would show only there. Here it runs with DEVICE=cpu and the
benchmark's small calls and steps only; nothing is timed or compared, only that every step
ran and left its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check(out: Path, wheels: Path, **env: str) -> subprocess.CompletedProcess[str]:
    wheels.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "BENCH_ARGS": "--only small steps --repeats 3",
        "WHEELS": str(wheels),
        **env,
    }
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_gpu_check_runs_every_step_and_keeps_their_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _gpu_check(out, tmp_path / "no-wheels")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.md",
        "bench.txt",
        "machine.txt",
        "replay.txt",
    ]
    assert "torch" in (out / "machine.txt").read_text()
    assert "bit for bit: True" in (out / "replay.txt").read_text()
    table = (out / "bench.md").read_text()
    assert "| Step vs echo |" in table
    assert "|   (ceiling) the same step in a bare gRPC call, vs in-process, rate |" in table
    assert "| Train RPC batch 256 (steps looped on the server) vs in-process, rate |" in table
    assert "all GPU checks ran" in done.stdout


def test_a_step_past_its_limit_fails_by_name_and_the_others_still_run(tmp_path: Path) -> None:
    # The device's minutes are few: a hung step must not take the other steps' output.
    out = tmp_path / "out"
    done = _gpu_check(out, tmp_path / "no-wheels", LIMIT_REPLAY="1")
    assert done.returncode == 1
    assert "failed: replay" in done.stdout
    assert "| Step vs echo |" in (out / "bench.md").read_text()


def test_on_a_machine_where_torch_sees_no_cuda_device_it_fails(tmp_path: Path) -> None:
    """Not passes with every CUDA test skipped: a lent machine whose torch was built for the
    CPU, or whose driver it cannot use, would have looked checked."""
    out = tmp_path / "out"
    done = _gpu_check(out, tmp_path / "no-wheels", DEVICE="cuda", LIMIT_BENCH="60")
    assert done.returncode == 1
    failed = done.stdout.strip().splitlines()[-1]
    assert failed.startswith("failed: ") and "cuda-visible" in failed.split(), failed
    assert "torch sees no CUDA device" in (out / "cuda-visible.txt").read_text()
