"""`gradwire serve` as its own process, as a user starts it: for the tests that need one."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence

import pytest

#: `python -m gradwire.cli` with SIGHUP at its default first, as a terminal's shell starts a
#: command: serve keeps ignoring a SIGHUP ignored at start (nohup), and a test run itself
#: started under nohup (a CI job, a run left going in the background) passed its ignore on,
#: so that a test's SIGHUP no longer stopped the server.
CLI = (
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "runpy.run_module('gradwire.cli', run_name='__main__', alter_sys=True)",
)


@contextlib.contextmanager
def serving(
    *args: str,
    until: str = "listening on",
    under: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`gradwire serve --port 0 --device cpu ARGS`, once it has logged a line holding `until`;
    yields the process and its log up to there. `under`: a command it runs under (nohup);
    `env`: variables set for it on top of the test's own.
    The server is killed at the end if it still runs: a test never leaves one behind,
    failing or not."""
    process = subprocess.Popen(
        [
            *under,
            *((sys.executable, "-m", "gradwire.cli") if under else CLI),
            *("serve", "--port", "0", "--device", "cpu"),
            *args,
        ],
        # nohup, given a terminal, would write nohup.out and say so on stderr.
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if under else None,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stderr is not None
        log = []
        for line in process.stderr:  # blocks until the server logs the line: no sleeps
            log.append(line)
            if until in line:
                break
        else:
            pytest.fail(f"the server exited before logging {until!r}:\n" + "".join(log))
        yield process, "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
