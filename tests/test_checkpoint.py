"""Checkpoints: safetensors round trips of the whole training state, and --state-dir across
a restart in the middle of a burst of steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import gradwire
from gradwire.fill import Fill
from gradwire_server.errors import InvalidInput
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import FillSpec, OptimizerSettings, Trainer

X, Y = FillSpec("uniform", (4, 3, 10, 10), low=-1, high=1, seed=3), FillSpec("ones", (4,))


def _train(trainer: Trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step(X, Y, zero_grad=True, use=lambda selection: selection)


def _state(trainer: Trainer) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {}
    for name in trainer.parameters:
        out[name] = trainer.read(name).value
        out[name + ".grad"] = trainer.read(name + ".grad").value
    return out


@pytest.mark.parametrize(
    "settings",
    [OptimizerSettings("sgd", lr=0.1, momentum=0.9), OptimizerSettings("adam", lr=0.01)],
    ids=["sgd-momentum", "adam"],
)
def test_a_loaded_checkpoint_trains_on_exactly_as_the_original(
    tmp_path: Path, settings: OptimizerSettings
) -> None:
    original = Trainer(seed=0, optimizer=settings)
    _train(original, 3)
    path = tmp_path / "state.safetensors"
    assert original.save(path) == original.version
    restored = Trainer(seed=1)  # other weights, the default optimizer
    assert restored.load(path) == original.version
    assert restored.optimizer_settings == original.optimizer_settings
    before = _state(original)
    for name, value in _state(restored).items():
        assert value is not None and before[name] is not None
        assert torch.equal(value, before[name]), name
    _train(original, 2)  # momentum / Adam's moments must have come back for these to agree
    _train(restored, 2)
    for name, value in _state(restored).items():
        assert torch.equal(value, _state(original)[name]), name  # type: ignore[arg-type]


def test_a_load_clears_the_deltas_of_the_steps_before_it(tmp_path: Path) -> None:
    # A delta is the last Step's change; after a load, the last Step was on other weights.
    trainer = Trainer(seed=0, track_deltas=True)
    path = tmp_path / "state.safetensors"
    trainer.save(path)
    _train(trainer, 1)
    assert trainer.read("conv1.weight.delta").value is not None
    trainer.load(path)
    assert trainer.read("conv1.weight.delta").value is None
    _train(trainer, 1)  # and the next Step records its own
    assert trainer.read("conv1.weight.delta").value is not None


def test_a_checkpoint_of_another_model_or_no_checkpoint_is_refused(tmp_path: Path) -> None:
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

    other = Trainer(ModelSpec("Other", Other, (3,), 3))
    path = tmp_path / "other.safetensors"
    other.save(path)
    with pytest.raises(InvalidInput, match="holds a Other"):
        Trainer().load(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(InvalidInput, match="cannot load"):
        Trainer().load(garbage)


def test_state_dir_survives_sigterm_in_a_burst_of_steps(tmp_path: Path) -> None:
    def serve() -> tuple[subprocess.Popen[str], str]:
        port_file = tmp_path / "port"
        port_file.unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "gradwire.cli", "serve", "--port", "0", "--device", "cpu",
             "--state-dir", str(tmp_path / "state"), "--port-file", str(port_file),
             "--grace", "5"],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert process.stderr is not None
        for line in process.stderr:
            if "listening on" in line:
                return process, f"127.0.0.1:{port_file.read_text().strip()}"
        raise AssertionError("the server did not start")

    process, address = serve()
    acknowledged: list[int] = []
    stopped = threading.Event()

    def burst() -> None:
        with gradwire.connect(address, timeout=10) as client:
            client.retries = 0
            x, y = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")
            while not stopped.is_set():
                try:
                    acknowledged.append(client.train_step(x, y).version)
                except gradwire.RemoteError:
                    return

    thread = threading.Thread(target=burst)
    thread.start()
    while len(acknowledged) < 20:
        thread.join(timeout=0.05)  # let the burst run; bounded by the server's pace
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0  # within the grace period
    stopped.set()
    thread.join(timeout=30)
    assert process.stderr is not None
    log = process.stderr.read()
    assert "saved state version" in log
    process, address = serve()
    try:
        with gradwire.connect(address) as client:
            restored = client.list_tensors().version
        assert restored == max(acknowledged)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
