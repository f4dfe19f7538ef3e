"""A model whose tensors include some of a dtype the wire does not carry (complex ones): they
are left out of the listing and refused by name, NOT_FOUND saying why, and the rest of the
model is served as any other's. Each answered INTERNAL before (a model with a complex
parameter failed ListTensors, GetTensor, FillParameters and SetTensor; a complex module
output failed the listing once a pass had made it, and a TrainStep fetching it after its
step was applied)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors
from gradwire.fill import Fill
from gradwire_server import fills
from gradwire_server.app import start
from gradwire_server.errors import InvalidInput, OverLimit
from gradwire_server.fills import FillSpec
from gradwire_server.models import ModelSpec
from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.trainer import Trainer, described_bytes, shown_bytes
from tests.serve_in_process import DEVICES

CARRIED = "bfloat16, bool, float16, float32, float64, int32, int64"


class Phase(nn.Module):
    """A complex parameter first (so that messages must not cite it as the model's example
    name), and a module whose output is complex."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.ones(3, dtype=torch.complex64))
        self.lin = nn.Linear(4, 3)
        self.rot = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        turned: torch.Tensor = self.rot(self.lin(x) * self.phase)
        return turned.real


def _trainer(optimizer: OptimizerSettings | None = None, device: str = "cpu") -> Trainer:
    spec = ModelSpec("Phase", Phase, (4,), 3)
    return Trainer(spec, device=device, seed=0, optimizer=optimizer)


@pytest.fixture(params=DEVICES)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Trainer, gradwire.Client]]:
    """Phase served on each device in turn (DEVICES), stepped by SGD with momentum."""
    trainer = _trainer(OptimizerSettings(kind="sgd", lr=0.5, momentum=0.9), request.param)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            yield trainer, client
    finally:
        running.stop(grace=None)


X, Y = np.ones((2, 4), np.float32), np.array([0, 1])


def _refused(call: object, said: str) -> None:
    """`call()` is NOT_FOUND (UNKNOWN_TENSOR), its message saying `said` and which dtypes
    the wire carries."""
    assert callable(call)
    with pytest.raises(errors.NotFound) as caught:
        call()
    assert caught.value.reason == "UNKNOWN_TENSOR"
    assert said in caught.value.message, caught.value.message
    assert f"which the wire does not carry ({CARRIED})" in caught.value.message


def test_a_complex_parameter_is_not_listed_and_every_call_on_it_says_why(
    served: tuple[Trainer, gradwire.Client],
) -> None:
    trainer, client = served
    version = client.train_step(X, Y).version  # phase has a gradient, a change, momentum
    names = client.list_tensors().names()
    assert "lin.weight" in names and "optimizer.lin.weight.momentum_buffer" in names
    assert not [name for name in names if "phase" in name], names
    said = "phase is a parameter of complex64, which the wire does not carry"
    _refused(lambda: client.get("phase"), said)
    _refused(lambda: client.read("phase[0]", values=False), said)
    _refused(lambda: client.stats("phase"), said)  # it summed the real parts, with a warning
    _refused(lambda: client.set("phase", np.ones(3, np.float32)), said)
    _refused(lambda: client.set("phase", Fill.constant(0.5, 3)), said)
    _refused(lambda: next(iter(client.watch(["phase"], timeout=5))), said)
    _refused(lambda: client.train_step(X, Y, fetch=["phase"]), said)
    belongs = "belongs to phase, a parameter of complex64"
    for name in ("phase.grad", "phase.delta", "optimizer.phase.momentum_buffer"):
        _refused(lambda name=name: client.get(name), f"{name} {belongs}")  # type: ignore[misc]
    assert client.list_tensors().version == version  # the refused fetch changed nothing
    # Messages that cite a name of the model's cite one the wire carries.
    assert trainer.example_name == "lin.weight"
    with pytest.raises(InvalidInput, match=r"e\.g\. 'lin\.weight'"):
        trainer.read("")


class OnlyPhase(nn.Module):
    """A complex parameter alone: no parameter's name the wire carries."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.ones(3, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :3] * self.phase).real


def test_a_model_without_a_parameter_the_wire_carries_cites_its_output() -> None:
    trainer = Trainer(ModelSpec("OnlyPhase", OnlyPhase, (4,), 3), seed=0)
    try:
        assert trainer.example_name == "output"
        with pytest.raises(InvalidInput, match=r"e\.g\. 'output'"):
            trainer.read("")
    finally:
        trainer.close()


def test_a_complex_parameter_trains_is_filled_and_kept_by_a_checkpoint(
    served: tuple[Trainer, gradwire.Client], tmp_path: Path
) -> None:
    trainer, client = served
    phase = trainer.parameters["phase"]

    def holds() -> torch.Tensor:
        return phase.detach().to("cpu", copy=True)

    before = holds()
    client.train_step(X, Y)
    assert not torch.equal(holds(), before)  # stepped with the rest
    client.fill_parameters(0.25)  # every parameter, the complex one too
    assert bool((trainer.parameters["lin.weight"] == 0.25).all())
    assert torch.equal(holds(), torch.full((3,), 0.25, dtype=torch.complex64))
    client.fill_parameters(2.0, ["phase"])
    assert torch.equal(holds(), torch.full((3,), 2.0, dtype=torch.complex64))
    with pytest.raises(errors.InvalidArgument, match="past its range") as caught:
        client.fill_parameters(1e39, ["phase"])  # as for a float32 parameter
    assert caught.value.reason == "BAD_VALUE"
    saved = trainer.save(tmp_path / "state.safetensors")
    client.fill_parameters(0.0)
    assert trainer.load(tmp_path / "state.safetensors") == saved.version
    assert torch.equal(holds(), torch.full((3,), 2.0, dtype=torch.complex64))


def test_a_complex_module_output_is_refused_before_a_step_that_would_fetch_it(
    served: tuple[Trainer, gradwire.Client],
) -> None:
    _, client = served
    # Before any pass its dtype is not known: listed, absent, as any module output is.
    assert "rot.output" in client.list_tensors().names()
    said = "rot.output, rot's output, is complex64 in this pass"
    _refused(lambda: client.train_step(X, Y, fetch=["rot.output"]), said)
    assert client.list_tensors().version == 0  # refused before the step
    client.train_step(X, Y, fetch=["lin.output"])
    listing = client.list_tensors()
    assert "rot.output" not in listing.names() and "lin.output" in listing.names()
    said = "rot.output, rot's output, is complex64 in the last pass"
    _refused(lambda: client.get("rot.output"), said)
    _refused(lambda: client.train_step(X, Y, fetch=["rot.output"]), said)
    assert client.list_tensors().version == listing.version


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_fills_of_a_complex_dtype_take_real_values_and_refuse_what_they_cannot_hold(
    dtype: torch.dtype,
) -> None:
    cpu = torch.device("cpu")
    made = fills.make(FillSpec("constant", (2,), value=0.5), dtype, cpu, "value")
    assert made.dtype == dtype and torch.equal(made, torch.full((2,), 0.5, dtype=dtype))
    for kind in ("normal", "uniform"):  # torch draws both parts
        spec = FillSpec(kind, (4,), low=0.0, high=1.0, seed=1)  # type: ignore[arg-type]
        drawn = fills.make(spec, dtype, cpu, "value")
        assert drawn.dtype == dtype and bool((drawn.imag != 0).any())
    with pytest.raises(InvalidInput) as caught:  # an integer range looked up: TypeError
        fills.make(FillSpec("randint", (2,), low=0, high=3), dtype, cpu, "value")
    assert caught.value.reason == "BAD_FILL"
    # the fill named, its dtype as the wire names it ("complex64", not "torch.complex64"),
    # then torch's own reason, which says what dtypes would do
    said = f"value: cannot make a randint fill of {fills.dtype_name(dtype)}: "
    assert caught.value.message.startswith(said) and len(caught.value.message) > len(said)
    value, why = fills.scalar_for(3.7, dtype)  # the real part, rounded as its parts are
    assert why == "" and value == pytest.approx(3.7, rel=1e-7)
    _, why = fills.scalar_for(1e39, dtype)
    assert bool(why) == (dtype == torch.complex64)  # past float32's range, not float64's


def test_a_fetch_bound_counts_the_output_in_the_dtype_the_model_computes_in() -> None:
    # The output's and the loss's dtype was taken from the first parameter, here complex:
    # twice the bytes, so that a fetch that fit an answer could be refused.
    trainer = _trainer()
    x, y = torch.ones(2, 4), torch.tensor([0, 1])
    need = 2 * 3 * 4 + described_bytes("output", (2, 3), (2, 3)) + shown_bytes("output", True)
    assert trainer._check_fetch([("output", ())], x, y, need)
    with pytest.raises(OverLimit):
        trainer._check_fetch([("output", ())], x, y, need - 1)
