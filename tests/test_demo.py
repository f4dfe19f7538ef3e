"""`make demo`, the README's first command, run as the Makefile runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: A line of gRPC's C core's own log ("I1130 09:47:06.728486 6148 chttp2_transport.cc:1403]").
GRPC_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)


def test_the_demo_starts_a_server_replays_both_lessons_and_stops_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    # Both lessons: the tutorial's init, then PyTorch's default init, each checked on the
    # server's values, fetched over gRPC.
    checks = re.findall(r"^# weight after step == .*bit for bit: (\w+)$", done.stdout, re.MULTILINE)
    assert checks == ["True", "True"], done.stdout
    assert ">>> print(model.conv1.weight.grad[0][0][0])" in done.stdout
    # The server's log, relayed, from listening to its graceful stop.
    assert "[server]" in done.stderr and "listening on 127.0.0.1:" in done.stderr
    assert "stopped at state version" in done.stderr
    # gRPC's own lines stay off, in the demo's process and the server's, as in the command.
    assert not GRPC_LOG_LINE.search(done.stderr), done.stderr
