"""Thread starts refused as the kernel refuses them under a cap on tasks or memory."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest


class RefusedStarts:
    """From its making, and while `refusing`, the start of a thread whose name `matches`
    raises what `threading` raises when the kernel refuses one ("can't start new thread");
    other threads start. monkeypatch puts `Thread.start` back at the test's end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, matches: Callable[[str], bool]) -> None:
        self.refusing = True
        start = threading.Thread.start

        def refused(thread: threading.Thread) -> None:
            if self.refusing and matches(thread.name):
                raise RuntimeError("can't start new thread")
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", refused)
