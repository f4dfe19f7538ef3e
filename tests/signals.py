"""A signal for one thread of another process, as the kernel may deliver one sent to the
process: Python runs handlers on the main thread only, and such a signal interrupts no wait
of the main thread's."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import pytest

#: tgkill's system call number, by machine.
_TGKILL = {"x86_64": 234, "aarch64": 131}


def signal_another_thread(pid: int, sig: signal.Signals) -> None:
    """Sends `sig` to a thread of process `pid` other than its main one, one that does not
    block it; skips the test where that cannot be done (not Linux, another machine)."""
    number = _TGKILL.get(os.uname().machine)
    tasks = Path(f"/proc/{pid}/task")
    if number is None or not tasks.is_dir():
        pytest.skip("needs Linux's tgkill on x86_64 or aarch64")
    bit = 1 << (sig - 1)
    for task in sorted(tasks.iterdir()):
        tid = int(task.name)
        status = (task / "status").read_text()
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        if tid != pid and not blocked & bit:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(number, pid, tid, int(sig)) != 0:
                raise OSError(ctypes.get_errno(), "tgkill failed")
            return
    pytest.skip("no thread but the main one takes the signal")
