"""A real server for a model spec in the test's own process, and a client of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gradwire
from gradwire_server.app import start
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer


@contextmanager
def serving(spec: ModelSpec, seed: int | None = None) -> Iterator[tuple[Trainer, gradwire.Client]]:
    """A CPU trainer for `spec` (seeded when asked) served on loopback, and a client of it;
    the server stops when the block ends."""
    trainer = Trainer(spec, device="cpu", seed=seed)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client:
            yield trainer, client
    finally:
        running.stop(grace=None)
