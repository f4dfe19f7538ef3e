"""Shared fixtures: a real gradwire server in this process on 127.0.0.1, a free port, no sleeps."""

from __future__ import annotations

import _thread
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

import gradwire
from gradwire_server.app import Running, start
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer
from tests.cli_run import Result, Run, run_main


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    if os.environ.get("COVERAGE_RUN"):  # set by `coverage run` (`make coverage`)
        skips["memory"] = pytest.mark.skip(
            reason="measures a process's own memory, which coverage's tracer changes"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's environment variables as a fresh shell has them, whatever the shell running
    the tests exports: a GRADWIRE_TARGET or GRADWIRE_SESSION left set there would change
    what the commands under test call. Tests that want one set it."""
    for name in ("GRADWIRE_TARGET", "GRADWIRE_SESSION", "GRADWIRE_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def trainer() -> Trainer:
    """A fresh CPU trainer, seeded so every test starts from the same weights."""
    return Trainer(device="cpu", seed=0)


@pytest.fixture
def server(trainer: Trainer) -> Iterator[Running]:
    running = start(trainer, "127.0.0.1", 0)
    yield running
    running.stop(grace=None)


@pytest.fixture
def gated_server() -> Iterator[Running]:
    """A server whose model's forward waits until the test sets Gate.release
    (tests/test_concurrency.py): a call held in progress, on the server's torch thread."""
    from tests.test_concurrency import Gate

    Gate.entered.clear()
    Gate.release.clear()
    running = start(Trainer(ModelSpec("Gate", Gate, (2,), 2)), "127.0.0.1", 0)
    yield running
    Gate.release.set()
    running.stop(grace=None)


@pytest.fixture
def address(server: Running) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def raw(address: str) -> Iterator[Any]:
    """A Calls stream on the server, written by hand (tests/test_calls.py's Raw)."""
    from tests.test_calls import Raw

    with grpc.insecure_channel(address) as channel:
        yield Raw(channel)


@pytest.fixture
def client(address: str) -> Iterator[gradwire.Client]:
    with gradwire.connect(address, timeout=30) as c:
        yield c


@pytest.fixture
def cli(address: str) -> Run:
    """Runs one `gradwire` command in this process against the fixture server."""

    def run(*argv: str) -> Result:
        return run_main(*argv, "--target", address)

    return run


@pytest.fixture
def ctrl_c() -> Iterator[Callable[[float], None]]:
    """Presses Ctrl-C in `seconds`: KeyboardInterrupt in the main thread, as in a terminal.
    SIGINT is handled as Python's default for the test: a test run started in the
    background (CI's, `make test &`) ignores it, and _thread.interrupt_main does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timers: list[threading.Timer] = []

    def press(seconds: float) -> None:
        timers.append(threading.Timer(seconds, _thread.interrupt_main))
        timers[-1].start()

    try:
        yield press
    finally:
        for timer in timers:
            timer.cancel()
        signal.signal(signal.SIGINT, previous)
