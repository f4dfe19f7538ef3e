"""Bring your own model: load_spec's checks, and other models served, checked against PyTorch."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.checkpoint import checkpoint

import gradwire
from gradwire import errors
from gradwire.cli import main
from gradwire_server.errors import InvalidInput, ModelFault
from gradwire_server.models import (
    SIMPLE,
    TINY_MLP,
    TINY_REGRESSOR,
    ModelSpec,
    TinyMLP,
    load_spec,
)
from gradwire_server.trainer import Trainer
from tests.serve_in_process import ON_EACH_DEVICE
from tests.serve_in_process import serving as serve_in_process
from tests.serve_process import serving as serve_process
from tests.test_auth import make_pki

SEED = 3
MLP_PARAMETERS = ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]


class LocalMLP(nn.Module):
    # Written out again on purpose: the reference must not share code with the server.
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))  # type: ignore[no-any-return]


class LocalRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))  # type: ignore[no-any-return]


def seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    return factory()


@contextmanager
def serving(spec: ModelSpec, device: str = "cpu") -> Iterator[gradwire.Client]:
    """A real server for `spec` in this process, on `device`, seeded with SEED, and a client
    of it."""
    with serve_in_process(spec, SEED, device) as (_, client):
        yield client


@pytest.fixture
def mlp() -> Iterator[gradwire.Client]:
    with serving(TINY_MLP) as client:
        yield client


@pytest.fixture
def regressor() -> Iterator[gradwire.Client]:
    with serving(TINY_REGRESSOR) as client:
        yield client


def parameters_equal(
    client: gradwire.Client, model: nn.Module, grads: bool = False, device: str = "cpu"
) -> None:
    """The served model's parameters (or gradients) are the local CPU model's: to the bit
    when it is served on the CPU, within float32's rounding when on a GPU, whose kernels
    sum in another order."""
    for name, p in model.named_parameters():
        local = p.grad if grads else p.detach()
        assert local is not None, name
        remote = client.read(f"{name}.grad" if grads else name, as_torch=True).value
        same(remote, local, device, name)


def same(remote: torch.Tensor, local: torch.Tensor, device: str, what: str = "") -> None:
    if device == "cpu":
        assert torch.equal(remote, local), what
    else:
        torch.testing.assert_close(remote, local, msg=what or None)


# A loss computed on the server against a local CPU run's, relatively.
LOSS_TOLERANCE = {"cpu": 1e-6, "cuda": 1e-5}


# --- load_spec ------------------------------------------------------------------------


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Writes a module of the given source where Python finds it; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"gw_test_models_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


HEADER = "from torch import nn\nfrom gradwire_server.models import ModelSpec, TinyMLP\n"


def refused(text: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        load_spec(text)
    assert caught.value.reason == "BAD_MODEL"
    return caught.value.message


def test_load_spec_takes_a_spec_or_a_function_returning_one(module: Callable[[str], str]) -> None:
    assert load_spec("gradwire_server.models:TINY_MLP") is TINY_MLP
    assert load_spec(" gradwire_server.models : SIMPLE ") is SIMPLE
    name = module(HEADER + "def make():\n    return ModelSpec('Made', TinyMLP, (16,), 4)\n")
    spec = load_spec(f"{name}:make")
    assert (spec.name, spec.sample_shape, spec.num_classes, spec.loss) == (
        "Made",
        (16,),
        4,
        "cross_entropy",
    )


def test_load_spec_needs_a_colon() -> None:
    assert "expected package.module:attr" in refused("gradwire_server.models")
    assert "expected package.module:attr" in refused("gradwire_server.models:")
    assert "expected package.module:attr" in refused(":TINY_MLP")


def test_load_spec_says_which_module_is_missing_and_why(module: Callable[[str], str]) -> None:
    message = refused("no_such_module_gw:SPEC")
    assert "cannot import module 'no_such_module_gw'" in message
    assert "there is no module 'no_such_module_gw'" in message
    assert "PYTHONPATH" in message
    message = refused("gradwire_server.no_such_submodule:SPEC")
    assert "there is no module 'gradwire_server.no_such_submodule'" in message
    message = refused("no_such_package_gw.models:SPEC")  # the package is the one missing
    assert "there is no module 'no_such_package_gw': install it" in message
    broken = module("import not_installed_dependency_gw\n")
    message = refused(f"{broken}:SPEC")
    assert f"cannot import module {broken!r}: importing it raised ModuleNotFoundError" in message
    assert "not_installed_dependency_gw" in message
    # A dependency whose name begins the module's own, but is no package of it: the module
    # is there, its import failed (gw_test_models is not gw_test_models_<id>'s package).
    prefixed = module("import gw_test_models\n")
    message = refused(f"{prefixed}:SPEC")
    assert f"cannot import module {prefixed!r}: importing it raised ModuleNotFoundError" in message
    failing = module("raise RuntimeError('no GPU driver here')\n")
    assert "importing it raised RuntimeError: no GPU driver here" in refused(f"{failing}:SPEC")


def test_load_spec_says_what_to_write_for_a_researcher_s_slips(
    module: Callable[[str], str],
) -> None:
    """Each got a message beside the point (found by the forty-fourth session's walkthrough
    as a researcher): "'int' object is not iterable", "run from the folder that holds it"
    run from that folder, and "no floating-point parameters" of float32 ones."""
    name = module(HEADER + "SPEC = ModelSpec('Bad', TinyMLP, (16), 4)\n")
    assert "sample_shape must be a tuple of whole numbers, got the number 16: write (16,)" in (
        refused(f"{name}:SPEC")
    )
    name = module(HEADER + "SPEC = ModelSpec('Good', TinyMLP, (16,), 4)\n")
    assert (
        f"{name + '.py'!r} is a file name, and --model takes a module's: write --model {name}:SPEC"
        in (refused(f"{name}.py:SPEC"))
    )
    assert f"--model {name}:SPEC" in refused(f"/some/folder/{name}.py:SPEC")
    frozen = module(
        HEADER + "def frozen():\n    return nn.Linear(16, 4).requires_grad_(False)\n"
        "SPEC = ModelSpec('Frozen', frozen, (16,), 4)\n"
    )
    assert "Frozen has no parameters to train: every floating-point one is frozen" in refused(
        f"{frozen}:SPEC"
    )


def test_load_spec_names_a_missing_attribute_and_the_specs_there() -> None:
    from gradwire_server import models

    message = refused("gradwire_server.models:NOPE")
    where = f"(imported from {models.__file__})"
    assert f"module 'gradwire_server.models' {where} has no attribute 'NOPE'" in message
    assert "SIMPLE, TINY_MLP, TINY_REGRESSOR" in message


def test_load_spec_names_the_public_specs_only_and_leaves_sys_path_as_it_was(
    module: Callable[[str], str], tmp_path: Path
) -> None:
    """A private spec (a leading underscore) is not offered; and a folder already on
    sys.path (the fixture put it first) stays where it was, not moved to the end."""
    name = module(HEADER + "SPEC = ModelSpec('M', TinyMLP, (16,), 4)\n_HIDDEN = SPEC\n")
    before = list(sys.path)
    assert "(its ModelSpecs: SPEC)" in refused(f"{name}:NOPE")
    assert load_spec(f"{name}:SPEC", tmp_path).name == "M"
    assert sys.path == before


def test_load_spec_builds_in_training_mode_and_leaves_the_process_s_generator_alone(
    module: Callable[[str], str],
) -> None:
    """Checked as the server runs it: a model its factory left in evaluation mode is run
    in training mode, where this one fails; and the build's draws (its initial weights)
    come from a generator of their own, the process's left as it was."""
    name = module(
        HEADER + "class OnlyEval(TinyMLP):\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            raise RuntimeError('fails in training')\n"
        "        return super().forward(x)\n"
        "SPEC = ModelSpec('OnlyEval', lambda: OnlyEval().eval(), (16,), 4)\n"
    )
    assert "failed on zeros of shape [2, 16]" in refused(f"{name}:SPEC")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_spec("gradwire_server.models:TINY_MLP")
    assert torch.equal(torch.rand(3), expected)


def test_a_module_the_model_imports_is_found_where_python_finds_it_before_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving folder is looked in last while the model loads: its colorsys.py does
    not stand in for Python's, which the model's module imports."""
    (tmp_path / "colorsys.py").write_text("raise ImportError('the folder's colorsys ran')\n")
    name = f"gw_test_folder_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import colorsys\nfrom gradwire_server.models import TINY_MLP as SPEC\n"
    )
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    try:
        assert load_spec(f"{name}:SPEC", tmp_path) is TINY_MLP
    finally:
        sys.modules.pop(name, None)


def test_load_spec_refuses_what_is_not_a_spec(module: Callable[[str], str]) -> None:
    assert "is an nn.Module class; name a ModelSpec that wraps it" in refused(
        "gradwire_server.models:TinyMLP"
    )
    assert "is a tuple; expected a ModelSpec" in refused("gradwire_server.models:LOSSES")
    name = module(HEADER + "def module():\n    return TinyMLP()\n\ndef boom():\n    1 / 0\n")
    assert "returned a TinyMLP; it must return a ModelSpec" in refused(f"{name}:module")
    assert "calling it (with no arguments) failed: ZeroDivisionError" in refused(f"{name}:boom")
    # A model is callable: it was called, and its forward's missing argument was the message
    # (found by a review of serving one's own model).
    name = module(HEADER + "MODEL = TinyMLP()\n")
    assert "is a model (TinyMLP); name a ModelSpec whose factory builds one instead" in refused(
        f"{name}:MODEL"
    )
    with pytest.raises(TypeError, match=r"factory is a model \(TinyMLP\), where it is to build"):
        ModelSpec("X", TinyMLP(), (16,), 4)


def test_load_spec_builds_the_model_once_and_checks_its_output(
    module: Callable[[str], str],
) -> None:
    name = module(
        "import torch\n"
        + HEADER
        + "def fails():\n    raise OSError('weights.bin not found')\n"
        + "def not_a_module():\n    return 'mlp'\n"
        + "FAILS = ModelSpec('Fails', fails, (16,), 4)\n"
        + "NOT_A_MODULE = ModelSpec('Str', not_a_module, (16,), 4)\n"
        + "NO_PARAMETERS = ModelSpec('Relu', nn.ReLU, (4,), 4)\n"
        + "WIDE = ModelSpec('Wide', TinyMLP, (16,), 5)\n"
        + "NARROW_INPUT = ModelSpec('Narrow', TinyMLP, (15,), 4)\n"
        + "class IntOut(TinyMLP):\n"
        + "    def forward(self, x):\n        return super().forward(x).long()\n"
        + "class IntParameters(nn.Module):\n"
        + "    def __init__(self):\n"
        + "        super().__init__()\n"
        + "        self.p = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)\n"
        + "    def forward(self, x):\n        return x[:, :4]\n"
        + "class Pooled(TinyMLP):\n"
        + "    def forward(self, x):\n        return super().forward(x).mean(0, keepdim=True)\n"
        + "POOLED = ModelSpec('Pooled', Pooled, (16,), 4)\n"
        + "class Pairs(TinyMLP):\n"
        + "    def forward(self, x):\n        return super().forward(x), x\n"
        + "PAIRS = ModelSpec('Pairs', Pairs, (16,), 4)\n"
        + "INT_OUTPUT = ModelSpec('IntOut', IntOut, (16,), 4)\n"
        + "INT_PARAMETERS = ModelSpec('IntParameters', IntParameters, (16,), 4)\n"
    )
    assert "building Fails failed: OSError: weights.bin not found" in refused(f"{name}:FAILS")
    assert "factory returned a str, not an nn.Module" in refused(f"{name}:NOT_A_MODULE")
    assert "Relu has no parameters to train: it has none at all" in refused(f"{name}:NO_PARAMETERS")
    message = refused(f"{name}:WIDE")
    assert "Wide returned [2, 4] for an input of shape [2, 16]" in message
    assert "[N, num_classes] = [2, 5]" in message
    message = refused(f"{name}:NARROW_INPUT")
    assert "Narrow failed on zeros of shape [2, 15] (float32): RuntimeError" in message
    assert "check the spec's sample_shape and input_dtype" in message
    assert "Pooled returned [1, 4] for an input of shape [2, 16]" in refused(f"{name}:POOLED")
    assert refused(f"{name}:PAIRS").endswith(  # what to do: it said what the spec wants alone
        "Pairs returned tuple for an input of shape [2, 16]; the spec says [N, num_classes] = "
        "[2, 4]: its forward must return that tensor alone (of a layer that returns a tuple, "
        "as nn.LSTM and nn.MultiheadAttention do, the part the loss is taken of)"
    )
    assert "IntOut's output is torch.int64; a loss needs floats" in refused(f"{name}:INT_OUTPUT")
    assert "IntParameters has no parameters to train: none is floating-point" in refused(
        f"{name}:INT_PARAMETERS"
    )


EXITING = (
    "import sys\n"
    + HEADER
    + "def exits():\n    sys.exit(3)\n"
    + "class ExitsOnForward(TinyMLP):\n    def forward(self, x):\n        sys.exit('bye')\n"
    + "EXITS_BUILDING = ModelSpec('ExitsBuilding', exits, (16,), 4)\n"
    + "EXITS_RUNNING = ModelSpec('ExitsRunning', ExitsOnForward, (16,), 4)\n"
    + "def __getattr__(name):\n    sys.exit(4)\n"
)


def test_load_spec_turns_the_models_sys_exit_into_a_message(
    module: Callable[[str], str],
) -> None:
    # SystemExit is no Exception: it went through load_spec, and `gradwire serve` exited 0
    # with no word of why.
    at_import = module("import sys\nsys.exit(0)\n")
    message = refused(f"{at_import}:SPEC")
    assert f"cannot import module {at_import!r}: importing it raised SystemExit(0)" in message
    assert 'if __name__ == "__main__":' in message
    name = module(EXITING)
    assert "calling it (with no arguments) failed: SystemExit(3) (it called sys.exit()" in (
        refused(f"{name}:exits")
    )
    assert "building ExitsBuilding failed: SystemExit(3)" in refused(f"{name}:EXITS_BUILDING")
    assert "ExitsRunning failed on zeros of shape [2, 16] (float32): SystemExit('bye')" in (
        refused(f"{name}:EXITS_RUNNING")
    )
    assert f"looking up 'NOPE' in module {name!r} raised SystemExit(4)" in refused(f"{name}:NOPE")


def test_load_spec_lets_a_keyboard_interrupt_through(module: Callable[[str], str]) -> None:
    interrupted = module("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_spec(f"{interrupted}:SPEC")
    name = module(HEADER + "def make():\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_spec(f"{name}:make")


def test_a_spec_refuses_bad_fields_when_made() -> None:
    with pytest.raises(ValueError, match="loss must be one of cross_entropy, mse, got 'l1'"):
        ModelSpec("X", TinyMLP, (16,), 4, loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_shape must be positive"):
        ModelSpec("X", TinyMLP, (0,), 4)
    with pytest.raises(ValueError, match="num_classes"):
        ModelSpec("X", TinyMLP, (16,), 0)
    with pytest.raises(ValueError, match="name must be a non-empty string, got ''"):
        ModelSpec("", TinyMLP, (16,), 4)
    scalars = ModelSpec("Scalars", TinyMLP, (), 4)  # a sample of no dimensions: input [N]
    scalars.check_input_shape((5,))
    with pytest.raises(
        InvalidInput, match=r"input has shape \[\]; Scalars takes \[N\] with"
    ) as scalar:
        scalars.check_input_shape(())
    assert scalar.value.reason == "BAD_INPUT_SHAPE"
    with pytest.raises(TypeError, match="input_dtype must be a torch"):
        ModelSpec("X", TinyMLP, (16,), 4, input_dtype="float32")  # type: ignore[arg-type]
    assert ModelSpec("X", TinyMLP, [16], 4).sample_shape == (16,)  # type: ignore[arg-type]
    one = ModelSpec("One", TinyMLP, (1, 1), 1)  # the least: one feature, one value out
    assert (one.sample_shape, one.num_classes) == ((1, 1), 1)
    assert (SIMPLE.loss, SIMPLE.input_dtype) == ("cross_entropy", torch.float32)
    assert isinstance(SIMPLE.criterion(), nn.CrossEntropyLoss)
    assert isinstance(TINY_REGRESSOR.criterion(), nn.MSELoss)


# --- another model, served ----------------------------------------------------------------


def test_list_tensors_shows_every_parameter_biases_and_norm_included(
    mlp: gradwire.Client,
) -> None:
    listing = mlp.list_tensors()
    assert listing.model == "TinyMLP"
    params = [t for t in listing.tensors if t.kind == "parameter"]
    assert [t.name for t in params] == MLP_PARAMETERS
    shapes = {t.name: t.shape for t in params}
    assert shapes["fc1.bias"] == (32,) and shapes["norm.weight"] == (32,)
    assert shapes["fc2.weight"] == (4, 32)
    assert f"{MLP_PARAMETERS[0]}.grad" in listing.names()
    # BatchNorm's buffers are not parameters: listed as buffers, read-only, never trained.
    buffers = {t.name: t.kind for t in listing.tensors if "running" in t.name}
    assert buffers == {"norm.running_mean": "buffer", "norm.running_var": "buffer"}


def test_the_mlp_trains_as_pytorch_does_bit_for_bit(mlp: gradwire.Client) -> None:
    model = seeded(LocalMLP)
    parameters_equal(mlp, model)
    mlp.set_optimizer("sgd", lr=0.1, momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        optimizer.zero_grad()
        output = model(x)
        loss = criterion(output, y)
        loss.backward()
        optimizer.step()
        if step == 0:  # the separate calls, checked one by one
            mlp.zero_grad()
            result = mlp.forward(x.numpy(), y.numpy())
            assert result.output_shape == (8, 4)
            assert result.loss == loss.item()
            assert torch.equal(mlp.read("output", as_torch=True).value, output.detach())
            mlp.backward()
            parameters_equal(mlp, model, grads=True)
            assert mlp.step().parameters_updated == len(MLP_PARAMETERS)
        else:
            assert mlp.train_step(x.numpy(), y.numpy()).loss == loss.item()
        parameters_equal(mlp, model)


def test_the_mlp_refuses_an_input_of_another_shape(mlp: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        mlp.forward(np.zeros((2, 3, 10, 10), np.float32), np.zeros(2, np.int64))
    assert caught.value.reason == "BAD_INPUT_SHAPE"
    assert "input has shape [2, 3, 10, 10]; TinyMLP takes [N, 16] with N >= 1" in str(caught.value)
    with pytest.raises(errors.InvalidArgument, match="holds class 4; classes run from 0 to 3"):
        mlp.forward(np.zeros((2, 16), np.float32), np.array([0, 4]))
    with pytest.raises(errors.InvalidArgument, match="holds class 5; "):  # the first
        mlp.forward(np.zeros((3, 16), np.float32), np.array([5, 0, 9]))
    with pytest.raises(errors.InvalidArgument, match=r"input has shape \[0, 16\]") as empty:
        mlp.forward(np.zeros((0, 16), np.float32), np.zeros(0, np.int64))
    assert empty.value.reason == "BAD_INPUT_SHAPE"


def test_an_input_the_model_itself_refuses_is_invalid_argument(mlp: gradwire.Client) -> None:
    # BatchNorm in training mode cannot normalise one sample: its ValueError is the caller's.
    with pytest.raises(errors.InvalidArgument) as caught:
        mlp.forward(np.ones((1, 16), np.float32), np.array([0]))
    assert caught.value.reason == "MODEL_REFUSED"
    assert caught.value.message.startswith("TinyMLP refused this input: Expected more than 1")
    # and what to do about it, which torch's words do not say (an integrator's probe)
    assert caught.value.message.endswith(
        "; a BatchNorm layer in training mode needs 2 or more samples a batch: send more, "
        "or, for a Forward, ask for evaluation mode (eval_mode, forward --eval)"
    )
    assert mlp.list_tensors().version == 0
    assert mlp.forward(np.ones((1, 16), np.float32), eval_mode=True).version == 1


class Silent(nn.Module):
    """Refuses every input with a ValueError that says nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError()


def test_a_refusal_with_no_words_is_named_by_its_type() -> None:
    # Its first line was read from an empty message: an IndexError, answered INTERNAL.
    with serving(ModelSpec("Silent", Silent, (4,), 3)) as client:
        with pytest.raises(errors.InvalidArgument) as caught:
            client.forward(np.ones((2, 4), np.float32))
        assert caught.value.message == "Silent refused this input: ValueError"


class Exiting(nn.Module):
    """Calls sys.exit() on a batch past 16 samples, as a script would; or, as `how` says,
    raises KeyboardInterrupt."""

    how = "exit"
    on_meta = True  # in the run on meta tensors that comes before the pass too

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 16 and (self.on_meta or x.device.type != "meta"):
            if self.how == "exit":
                sys.exit(3)
            raise KeyboardInterrupt
        out: torch.Tensor = self.lin(x)
        return out


class Interrupting(Exiting):
    how = "interrupt"


class ExitingInItsPass(Exiting):
    """Exits in the pass itself alone: its run on meta tensors goes through."""

    on_meta = False


@pytest.mark.parametrize(
    "model",
    [Exiting, Interrupting, ExitingInItsPass],
    ids=["sys.exit", "KeyboardInterrupt", "sys.exit-in-the-pass"],
)
def test_a_model_that_exits_in_its_forward_pass_is_answered_internal_at_once(
    model: type[Exiting], caplog: pytest.LogCaptureFixture
) -> None:
    # The call went unanswered until its deadline, nothing in the log: the torch thread
    # handed the SystemExit on, and gRPC's handler, which catches Exception, let it end the
    # handler (found by a review of serving one's own model). Then it was answered as the
    # server's own fault, reason INTERNAL, "internal error in Forward", where the catalogue
    # answers the model's own code's errors MODEL_ERROR, naming the model, the pass and the
    # error's type (found by a review of the error catalogue).
    with serving(ModelSpec(model.__name__, model, (4,), 3)) as client:
        client.timeout = 60
        big, small = np.ones((32, 4), np.float32), np.ones((4, 4), np.float32)
        weight = client.get("lin.weight")
        name = "KeyboardInterrupt" if model is Interrupting else "SystemExit"
        for call in (
            lambda: client.forward(big),
            lambda: client.train_step(big, np.zeros(32, np.int64)),
        ):
            with pytest.raises(errors.Internal) as caught:
                call()
            assert caught.value.reason == "MODEL_ERROR"
            assert caught.value.message == (
                f"{model.__name__}'s forward pass raised {name}; the server's log has its traceback"
            )
        assert client.list_tensors().version == 0
        assert np.array_equal(client.get("lin.weight"), weight)
        assert client.forward(small).version == 1
    assert name in caplog.text  # with its traceback


class Recomputing(nn.Module):
    """Its second layer run under torch.utils.checkpoint, reentrant or not (`reentrant`)."""

    reentrant = True

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        out: torch.Tensor = checkpoint(self.b, h, use_reentrant=self.reentrant)
        return out


class NotRecomputingTwice(Recomputing):
    reentrant = False


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")
def test_a_reentrant_checkpoint_is_refused_saying_what_to_pass_and_the_other_trains() -> None:
    """Its backward pass runs only through loss.backward(): every Backward, TrainStep and
    Train answered INTERNAL with no words, though the model trains locally (found by a
    review of serving one's own model)."""
    x, y = np.ones((2, 4), np.float32), np.array([0, 2])
    with serving(ModelSpec("Recomputing", Recomputing, (4,), 3)) as client:
        before = client.get("a.weight")
        for call in (
            lambda: (client.forward(x, y), client.backward()),
            lambda: client.train_step(x, y),
        ):
            with pytest.raises(errors.FailedPrecondition) as caught:
                call()
            assert caught.value.reason == "REENTRANT_CHECKPOINT"
            assert "pass use_reentrant=False to checkpoint()" in caught.value.message
        assert client.get("a.weight.grad") is None
        assert np.array_equal(client.get("a.weight"), before)
    with serving(ModelSpec("NotRecomputingTwice", NotRecomputingTwice, (4,), 3)) as client:
        local = seeded(NotRecomputingTwice)
        nn.functional.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        client.forward(x, y)
        client.backward()
        assert local.a.weight.grad is not None
        assert np.array_equal(client.get("a.weight.grad"), local.a.weight.grad.numpy())


class _Refusing(torch.autograd.Function):
    """Doubles its input; its backward pass raises the error it was given."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, error: type[Exception]) -> torch.Tensor:
        ctx.error = error
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        raise ctx.error("no gradient for this batch")


class FailingBackward(nn.Module):
    """A linear layer whose output goes through a Function that fails its backward pass,
    with a ValueError, or (`error`) another error."""

    error: type[Exception] = ValueError

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Refusing.apply(self.lin(x), self.error)
        return out


class BuggyBackward(FailingBackward):
    error = KeyError


@pytest.mark.parametrize("model", [FailingBackward, BuggyBackward], ids=["ValueError", "KeyError"])
def test_an_error_in_the_model_s_backward_pass_is_answered_as_in_its_forward_pass(
    model: type[FailingBackward], caplog: pytest.LogCaptureFixture
) -> None:
    """A ValueError is the model's refusal, with its words, as the README says of any error
    of the model's; another error INTERNAL naming the pass and its type. Both were INTERNAL
    with no words, and the graph was taken for still there (found by a review of serving
    one's own model). Nothing changes."""
    x, y = np.ones((2, 4), np.float32), np.array([0, 2])
    with serving(ModelSpec(model.__name__, model, (4,), 3)) as client:
        weight = client.get("lin.weight")
        client.forward(x, y)
        for call in (client.backward, lambda: client.train_step(x, y)):
            with pytest.raises(errors.GradwireError) as caught:
                call()
            if model is FailingBackward:
                assert isinstance(caught.value, errors.InvalidArgument)
                assert caught.value.reason == "MODEL_REFUSED"
                assert caught.value.message == (
                    "FailingBackward refused this input in its backward pass: no gradient "
                    "for this batch"
                )
            else:
                assert isinstance(caught.value, errors.Internal)
                assert caught.value.reason == "MODEL_ERROR"
                assert caught.value.message == (
                    "BuggyBackward's backward pass raised KeyError; the server's log has its "
                    "traceback"
                )
        assert client.list_tensors().version == 1  # the Forward's
        assert client.get("lin.weight.grad") is None
        assert np.array_equal(client.get("lin.weight"), weight)
        with pytest.raises(errors.FailedPrecondition) as freed:
            client.backward()
        assert freed.value.reason == "GRAPH_FREED"
    if model is BuggyBackward:
        assert "no gradient for this batch" in caplog.text  # the traceback, in the log


class FailingBackwardOnIds(nn.Module):
    """An embedding of token ids whose output goes through a Function that fails its
    backward pass with an IndexError."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Refusing.apply(self.emb(x).sum(1), IndexError)
        return out


def test_an_index_error_in_the_backward_pass_of_a_model_taking_ids_is_its_refusal() -> None:
    """As in its forward pass (an id past an Embedding's table, on the CPU): an IndexError
    of a model taking integers is its refusal of the input, with its words, not INTERNAL."""
    spec = ModelSpec("FailingBackwardOnIds", FailingBackwardOnIds, (4,), 3, input_dtype=torch.int64)
    with serving(spec) as client:
        client.forward(np.ones((2, 4), np.int64), np.array([0, 2]))
        with pytest.raises(errors.InvalidArgument) as caught:
            client.backward()
        assert caught.value.reason == "MODEL_REFUSED"
        assert caught.value.message == (
            "FailingBackwardOnIds refused this input in its backward pass: no gradient for "
            "this batch"
        )


class FrozenBackbone(nn.Module):
    """A BatchNorm backbone and a head; built by `frozen_backbone`, which freezes the first."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def frozen_backbone() -> nn.Module:
    model = FrozenBackbone()
    model.backbone.eval()  # its statistics kept, as a fine-tuning script does
    model.backbone.requires_grad_(False)
    return model


def all_in_eval() -> nn.Module:
    return FrozenBackbone().eval()


def all_but_the_head_in_eval() -> nn.Module:
    model = FrozenBackbone().eval()
    model.head.train()  # "freeze everything but the head"
    return model


def test_modules_a_factory_left_in_evaluation_mode_stay_so_through_every_pass() -> None:
    """Every module was put in training mode after the build and after each Forward in
    evaluation mode: a frozen backbone's BatchNorm moved its statistics, and the losses
    were not a local run's (found by a review of serving one's own model)."""
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    for factory in (frozen_backbone, all_but_the_head_in_eval):
        local = seeded(factory)
        torch.manual_seed(SEED)
        factory()  # the draws the server's build made: its dropout stream starts after
        modes = [m.training for m in local.modules()]
        with serving(ModelSpec("FrozenBackbone", factory, (4,), 3)) as client:
            for eval_first in (False, True):
                if eval_first:
                    client.forward(x, eval_mode=True)
                    local.eval()
                    local(torch.from_numpy(x))
                    for module, mode in zip(local.modules(), modes, strict=True):
                        module.training = mode
                out = local(torch.from_numpy(x))
                loss = nn.functional.cross_entropy(out, torch.from_numpy(y))
                assert client.forward(x, y).loss == loss.item(), factory.__name__
            zeros = np.zeros(6, np.float32)
            assert np.array_equal(client.get("backbone.1.running_mean"), zeros)
    # a model handed over in evaluation mode whole trains in training mode, as before
    with serving(ModelSpec("AllInEval", all_in_eval, (4,), 3)) as client:
        client.forward(x, y)
        assert not np.array_equal(client.get("backbone.1.running_mean"), np.zeros(6))


class _Loaded:
    """A factory that loads a file, as one reading pretrained weights does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> nn.Module:
        model = nn.Linear(4, 3)
        model.weight.data.fill_(float(self.path.read_text()))
        return model


def test_a_factory_that_fails_at_a_reset_or_a_new_session_is_said_to_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its file removed after the start, the factory raised, and the Reset or OpenSession
    answered INTERNAL with no words (found by a review of serving one's own model)."""
    weights = tmp_path / "weights.txt"
    weights.write_text("0.5")
    with serving(ModelSpec("Loaded", _Loaded(weights), (4,), 3)) as client:
        client.forward(np.ones((2, 4), np.float32))
        weights.unlink()
        for call in (client.reset, client.open_session):
            with pytest.raises(errors.FailedPrecondition) as caught:
                call()
            assert caught.value.reason == "MODEL_BUILD_FAILED"
            assert caught.value.message == (
                "building a new Loaded failed: its factory raised FileNotFoundError (the "
                "server's log has its traceback); nothing was changed"
            )
        assert client.list_tensors().version == 1
        assert np.all(client.get("weight") == 0.5)
        assert client.list_sessions().sessions == ()  # none opened
    assert "weights.txt" in caplog.text  # the factory's own words, in the log


class _ExitsLater:
    """A factory that builds at the start, and then calls sys.exit() (`how` "exit") or raises
    KeyboardInterrupt, as a script's factory might on a file it can no longer find."""

    def __init__(self, how: str) -> None:
        self.how, self.builds = how, 0

    def __call__(self) -> nn.Module:
        self.builds += 1
        if self.builds > 1:
            if self.how == "exit":
                sys.exit(3)
            raise KeyboardInterrupt
        return nn.Linear(4, 3)


@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_a_factory_that_exits_at_a_reset_or_a_new_session_is_said_to_as_any_failure(
    how: str,
) -> None:
    """Answered INTERNAL, reason INTERNAL, "internal error in Reset", as the server's own
    fault, where any other failure of the factory is MODEL_BUILD_FAILED (found by a review
    of the error catalogue)."""
    with serving(ModelSpec("Exits", _ExitsLater(how), (4,), 3)) as client:
        raised = "SystemExit" if how == "exit" else "KeyboardInterrupt"
        for call in (client.reset, client.open_session):
            with pytest.raises(errors.FailedPrecondition) as caught:
                call()
            assert caught.value.reason == "MODEL_BUILD_FAILED"
            assert caught.value.message == (
                f"building a new Exits failed: its factory raised {raised} (the server's log "
                "has its traceback); nothing was changed"
            )
        assert client.list_tensors().version == 0
        assert client.list_sessions().sessions == ()


class Recurrent(nn.Module):
    """An LSTM (which returns its output sequence and its state) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.rnn(x)
        out: torch.Tensor = self.head(sequence[:, -1])
        return out


def test_a_module_returning_a_tuple_keeps_its_first_item_as_its_output() -> None:
    """An LSTM's `rnn.output` was listed and always absent, its read None (found by a review
    of serving one's own model): its output sequence now, listed with its shape, read,
    fetched by a TrainStep."""
    x = np.random.default_rng(1).standard_normal((2, 6, 4)).astype(np.float32)
    local = seeded(Recurrent)
    with serving(ModelSpec("Recurrent", Recurrent, (6, 4), 3)) as client:
        client.forward(x)
        listed = {t.name: t for t in client.list_tensors().tensors}["rnn.output"]
        assert (listed.shape, listed.present) == ((2, 6, 5), True)
        expected = local.rnn(torch.from_numpy(x))[0].detach().numpy()
        assert np.array_equal(client.get("rnn.output"), expected)
        fetched = client.train_step(x, np.array([0, 1]), fetch=["rnn.output[0, -1]"])
        assert np.array_equal(fetched.fetched[0].value, expected[0, -1])


class Halves(nn.Module):
    """Returns a list, its input's two halves: its output is the first."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.chunk(2, dim=1))


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.halves = Halves()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.halves(self.lin(x))
        return first + second  # type: ignore[no-any-return]


def test_a_module_returning_a_list_keeps_its_first_item_as_its_output() -> None:
    """As of a tuple: a list's first tensor, where it was listed and always absent."""
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    local = seeded(Split)
    assert isinstance(local, Split)
    with serving(ModelSpec("Split", Split, (4,), 2)) as client:
        client.forward(x)
        expected = local.lin(torch.from_numpy(x)).detach().numpy()[:, :2]
        kept = client.get("halves.output")
        assert kept is not None and np.array_equal(kept, expected)


def test_an_id_past_an_embedding_s_table_is_refused_as_the_input_s_fault() -> None:
    """Its IndexError was answered INTERNAL, "the server's log has the details", which the
    caller cannot act on (found by the twenty-first session's review of the contract)."""
    from tests.broken_models import TOKENS

    with serving(TOKENS) as client:
        for ids in ([[1, 2, 3, 10]], [[1, 2, 3, -1]]):
            with pytest.raises(errors.InvalidArgument) as caught:
                client.forward(np.array(ids), np.array([0]))
            assert caught.value.reason == "MODEL_REFUSED"
            assert caught.value.message == ("Tokens refused this input: index out of range in self")
        assert client.list_tensors().version == 0
        assert client.forward(np.array([[1, 2, 3, 9]]), np.array([0])).loss is not None
        # Ids given as uint32 travel as int64, which the model takes: a refusal of the
        # target that names int64 was blamed on them (found by a review).
        with pytest.raises(errors.InvalidArgument) as caught:
            client.forward(np.array([[1, 2, 3, 9]], np.uint32), np.array([True]))
        assert caught.value.message.startswith("target has dtype bool")
        assert "given as" not in caught.value.message


class Keyed(nn.Module):
    """Returns a dict, as many libraries' blocks do: no tensor to keep as its output."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": x * 2}


class UsesKeyed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.block = Keyed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(self.block(x)["hidden"])
        return out


def test_a_module_returning_no_tensor_trains_and_its_output_reads_absent() -> None:
    """Only a tensor (or a tuple's or list's first) is kept: a dict is not, and the pass
    and the step go on."""
    x, y = np.ones((2, 4), np.float32), np.array([0, 1])
    local = seeded(UsesKeyed)
    expected = nn.CrossEntropyLoss()(local(torch.from_numpy(x)), torch.from_numpy(y)).item()
    with serving(ModelSpec("UsesKeyed", UsesKeyed, (4,), 2)) as client:
        assert client.train_step(x, y).loss == expected
        assert client.get("block.output") is None


class Gathers(nn.Module):
    """Indexes a table of its own by a count it gets wrong: an IndexError on float input,
    the model's bug, not the caller's ids."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out[:, [0, 5]]


def test_an_index_error_on_float_input_is_the_model_s_error_not_a_refusal() -> None:
    """An IndexError is the input's fault only on integer input (ids past a table): on
    floats it is a bug of the model's, INTERNAL naming its pass, as any other error."""
    with serving(ModelSpec("Gathers", Gathers, (2,), 2)) as client:
        with pytest.raises(errors.Internal) as caught:
            client.forward(np.ones((1, 2), np.float32))
        assert caught.value.reason == "MODEL_ERROR"
        assert caught.value.message == (
            "Gathers's forward pass raised IndexError; the server's log has its traceback"
        )
        assert client.list_tensors().version == 0


def test_a_refused_forward_lets_go_of_the_layers_it_ran_and_of_the_last_pass() -> None:
    """fc1 ran before the BatchNorm refused: its output goes at once, not at the next
    Forward (on a GPU it could hold most of the memory). The last Forward's went as the
    pass began (since the fifty-seventh session: it was kept through it, two passes'
    outputs held at once)."""
    trainer = Trainer(TINY_MLP, seed=SEED)
    good = torch.ones(4, 16)
    trainer.forward(good, torch.zeros(4, dtype=torch.int64))
    assert trainer.read("fc1.output").value is not None
    with pytest.raises(InvalidInput, match="refused this input"):
        trainer.forward(torch.zeros(1, 16), torch.zeros(1, dtype=torch.int64))
    assert trainer._pending == {}
    assert trainer.read("fc1.output").value is None
    trainer.close()


def test_the_regressor_trains_with_a_float_target_as_pytorch_does(
    regressor: gradwire.Client,
) -> None:
    model = seeded(LocalRegressor)
    parameters_equal(regressor, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        x = torch.randn(4, 8, generator=gen)
        y = torch.randn(4, 2, generator=gen)
        optimizer.zero_grad()
        loss = nn.MSELoss()(model(x), y)
        loss.backward()
        optimizer.step()
        assert regressor.train_step(x.numpy(), y.numpy()).loss == loss.item()
        parameters_equal(regressor, model)
    # A fill target is made as floats for a mean squared error, not as class indices.
    result = regressor.forward(gradwire.Fill.ones(4, 8), gradwire.Fill.zeros(4, 2))
    assert result.loss is not None and result.loss > 0
    assert regressor.read("target").dtype == "float32"


def test_the_regressor_refuses_class_indices_and_a_target_of_another_shape(
    regressor: gradwire.Client,
) -> None:
    x = np.zeros((4, 8), np.float32)
    for target in (np.zeros((4, 2), np.int64), np.zeros(4, np.int64), np.zeros(4, np.int32)):
        with pytest.raises(errors.InvalidArgument) as caught:
            regressor.forward(x, target)
        assert caught.value.reason == "BAD_TARGET_DTYPE"
        # In its own dtype: integers are class indices only to a cross-entropy loss.
        assert caught.value.message.startswith(f"target has dtype {target.dtype}; ")
        assert (
            "TinyRegressor is trained with a mean squared error: send floats of shape [4, 2]"
            in (caught.value.message)
        )
    with pytest.raises(errors.InvalidArgument) as caught:
        regressor.forward(x, np.zeros((4,), np.float32))
    assert caught.value.reason == "BAD_TARGET_SHAPE"
    assert "must have the output's shape [4, 2]" in caught.value.message
    # A fill too large for any target, refused before it is made: no class indices offered.
    with pytest.raises(errors.InvalidArgument) as caught:
        regressor.forward(x, gradwire.Fill.zeros(100))
    assert caught.value.reason == "BAD_TARGET_SHAPE"
    assert caught.value.message == (
        "target has shape [100]; TinyRegressor takes a target of the output's shape [4, 2]"
    )


def test_a_target_of_the_batch_s_length_but_another_shape_is_refused() -> None:
    """Class indices are [N] and class probabilities [N, num_classes]: a target whose first
    dimension alone matches is refused by the spec, not left to the loss."""
    for target, said in [
        (torch.zeros((2, 4), dtype=torch.int64), "class indices must have shape [2]"),
        (torch.zeros((2, 3)), "class probabilities must have shape [2, 4]"),
        (torch.zeros((2, 4, 1)), "class probabilities must have shape [2, 4]"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            TINY_MLP.check_target(target, 2)
        assert caught.value.reason == "BAD_TARGET_SHAPE"
        assert said in caught.value.message
    TINY_MLP.check_target(torch.zeros(2, dtype=torch.int64), 2)
    TINY_MLP.check_target(torch.zeros((2, 4)), 2)


def test_an_input_dtype_the_wire_carries_as_it_is_takes_no_other() -> None:
    """float64 and int64 travel as themselves: a float32 input to a float64 model, or an
    int32 one to an int64 model, is refused, not narrowed or widened unseen; so is a
    float32 one to a model of a dtype the wire cannot carry (complex64: its own)."""
    for dtype, other in [
        (torch.float64, torch.float32),
        (torch.int64, torch.int32),
        (torch.complex64, torch.float32),
    ]:
        spec = ModelSpec("X", TinyMLP, (16,), 4, input_dtype=dtype)
        assert spec.input_sent_as == dtype
        spec.check_input_dtype(dtype)
        with pytest.raises(InvalidInput) as caught:
            spec.check_input_dtype(other)
        assert caught.value.reason == "BAD_INPUT_DTYPE"


class IdRegressor(nn.Module):
    """Token ids in, two floats out: a regression on integer input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embed(x).mean(1)
        return out


def test_a_float_target_of_a_regression_on_integer_input_stays_float() -> None:
    """A target is cast to the input's dtype only where both are floating-point: cast to
    int64 ids, 0.25 became 0 and the loss another."""
    ids, y = np.array([[1, 2, 3], [4, 5, 6]]), np.full((2, 2), 0.25, np.float32)
    local = seeded(IdRegressor)
    expected = nn.MSELoss()(local(torch.from_numpy(ids)), torch.from_numpy(y)).item()
    spec = ModelSpec("IdRegressor", IdRegressor, (3,), 2, loss="mse", input_dtype=torch.int64)
    with serving(spec) as client:
        assert client.forward(ids, y).loss == expected
        target = client.get("target")
        assert target is not None and target.dtype == np.float32
        assert np.array_equal(target, y)


class Tied(nn.Module):
    """An embedding and an output layer that share one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=False)
        self.head.weight = self.enc.weight  # tied: the forward reads it transposed
        scale = torch.ones(3)
        self.register_buffer("scale", scale)
        self.head.register_buffer("scale", scale)  # one buffer, two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.enc(x), self.head.weight.t())


def test_a_tied_weight_s_second_name_is_refused_naming_the_first() -> None:
    # NOT_FOUND, its closest names saying nothing of the tensor it is (a review; its
    # optimizer state, a review of serving real models).
    with serving(ModelSpec("Tied", Tied, (3,), 3)) as client:
        assert [t.name for t in client.list_tensors().tensors if t.kind == "parameter"] == [
            "enc.weight"
        ]
        client.set_optimizer("adam", lr=0.01)
        client.train_step(np.ones((2, 3), np.float32), np.array([0, 1]))
        for name, first in [
            ("head.weight", "enc.weight"),
            ("head.weight.grad", "enc.weight.grad"),
            ("head.weight.delta", "enc.weight.delta"),
            ("optimizer.head.weight.exp_avg", "optimizer.enc.weight.exp_avg"),
            ("head.scale", "scale"),
        ]:
            with pytest.raises(errors.NotFound) as caught:
                client.get(name)
            assert f"{name} is the same tensor as '{first}' (tied weights)" in caught.value.message
            assert caught.value.metadata["closest"] == first
        with pytest.raises(errors.NotFound) as caught:
            client.get("head.bias")
        assert "tied" not in caught.value.message


def lazy_model() -> nn.Module:
    """A lazy first layer (its input size left to its first call) and a BatchNorm."""
    return nn.Sequential(nn.LazyLinear(8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_a_model_with_lazy_layers_has_them_made_from_its_seed_before_any_call(
    tmp_path: Path,
) -> None:
    # Until a Forward, listing, reading or checkpointing its tensors answered INTERNAL (and
    # the command line, which lists first, could never send one); the values drawn at that
    # Forward came from the process's generator, not the seed (found by a review).
    spec = ModelSpec("Lazy", lazy_model, (4,), 3)
    torch.manual_seed(SEED)
    local = lazy_model()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = nn.functional.cross_entropy(local(x), y)  # the first call makes its layer
    loss.backward()
    torch.optim.SGD(local.parameters(), lr=0.1).step()
    with serving(spec) as client:
        assert client.shape("0.weight") == (8, 4)
        before = client.get("0.weight")
        assert client.get("1.num_batches_tracked") == 0  # the build's pass moved nothing
        client.set_optimizer("sgd", lr=0.1)
        result = client.train_step(x.numpy(), y.numpy())
        assert result.loss == loss.item()
        for name, p in local.named_parameters():
            assert np.array_equal(client.get(name), p.detach().numpy()), name
        assert not np.array_equal(client.get("0.weight"), before)
    trainer = Trainer(spec, seed=SEED)
    trainer.save(tmp_path / "lazy.safetensors")
    other = Trainer(spec, seed=SEED + 1)
    other.load(tmp_path / "lazy.safetensors")
    assert torch.equal(other.parameters["0.weight"], trainer.parameters["0.weight"])
    for made in (trainer, other):
        made.close()


class AuxHead(nn.Module):
    """A lazy auxiliary head that only training runs, as Inception's, beside a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LazyLinear(8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, 3)
        self.aux = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        out: torch.Tensor = self.head(h)
        return out + 0.3 * self.aux(h) if self.training else out


def test_a_lazy_layer_only_training_runs_is_made_from_the_seed_too() -> None:
    # The build's pass in evaluation mode left it lazy: reads failed INTERNAL, and a first
    # TrainStep drew its values from the process's generator (a review).
    spec = ModelSpec("AuxHead", AuxHead, (4,), 3)
    one, two = Trainer(spec, seed=SEED), Trainer(spec, seed=SEED)
    try:
        for trainer in (one, two):
            assert not any(nn.parameter.is_lazy(p) for p in trainer._model.parameters())
            assert int(trainer._model.get_buffer("body.1.num_batches_tracked")) == 0
            assert torch.equal(
                trainer._model.get_buffer("body.1.running_mean"), torch.zeros(8)
            )  # the training pass's statistics put back
        assert torch.equal(one.parameters["aux.weight"], two.parameters["aux.weight"])
        assert one.parameters["aux.weight"].shape == (3, 8)
    finally:
        one.close()
        two.close()


def lazy_tokens_model() -> nn.Module:
    """Token ids through an Embedding into a lazy layer: its first pass needs integer ids."""
    return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.LazyLinear(3))


def test_a_lazy_model_taking_token_ids_has_its_layers_made_from_ids() -> None:
    """The build's pass runs on zeros of the input's own dtype: float zeros into an
    Embedding fail, and the model could not be built."""
    spec = ModelSpec("LazyTokens", lazy_tokens_model, (5,), 3, input_dtype=torch.int64)
    trainer = Trainer(spec, seed=SEED)
    try:
        assert trainer.parameters["2.weight"].shape == (3, 20)
        result = trainer.forward(torch.ones(2, 5, dtype=torch.int64), torch.tensor([0, 2]))
        assert result.loss is not None
    finally:
        trainer.close()


def test_a_checkpoint_restores_into_the_same_model_only(tmp_path: Path) -> None:
    path = tmp_path / "mlp.safetensors"
    saved, restored = Trainer(TINY_MLP, seed=1), Trainer(TINY_MLP, seed=2)
    others = [Trainer(SIMPLE), Trainer(TINY_REGRESSOR)]
    try:
        saved.save(path)
        restored.load(path)
        for name, p in saved.parameters.items():
            assert torch.equal(restored.parameters[name], p), name
        for other in others:
            with pytest.raises(InvalidInput, match="holds a TinyMLP"):
                other.load(path)
    finally:
        for trainer in (saved, restored, *others):
            trainer.close()


# --- gradwire serve --model -------------------------------------------------------------


def test_serve_with_a_bad_model_exits_2_before_binding(capfd: pytest.CaptureFixture[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(["serve", "--model", "gradwire_server.models:NOPE", "--port", "0"], out, err)
    assert code == 2
    assert "listening on" not in capfd.readouterr().err  # the server's log: it never listened
    assert err.getvalue().startswith("gradwire serve: error: --model 'gradwire_server.models:NOPE'")
    assert "has no attribute 'NOPE'" in err.getvalue()
    err = io.StringIO()
    assert main(["serve", "--model", "no_colon_here", "--port", "0"], out, err) == 2
    assert "expected package.module:attr" in err.getvalue()


def test_serve_with_a_model_that_calls_sys_exit_exits_2_and_says_so(tmp_path: Path) -> None:
    # As an operator runs it: its own process, the module in the folder it is started from.
    (tmp_path / "exiting_model.py").write_text(EXITING)
    (tmp_path / "exiting_import.py").write_text("import sys\nsys.exit(0)\n")
    for model, said in [
        ("exiting_import:SPEC", "importing it raised SystemExit(0)"),
        ("exiting_model:EXITS_BUILDING", "building ExitsBuilding failed: SystemExit(3)"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "gradwire.cli", "serve", "--model", model, "--port", "0",
             "--device", "cpu"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "listening on" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"gradwire serve: error: --model {model!r}: "), done.stderr
        assert said in last


def test_files_in_the_serving_folder_do_not_take_the_place_of_installed_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model` put the serving folder first on sys.path, for the whole process: a
    cryptography.py there ran in place of the real one (TLS imports it), though --model
    named an installed module (a security review, sixty-second session). The folder is
    looked in last now, and a model there is still found. As the installed `gradwire`
    script runs: its folder, not the working one, is on sys.path (PYTHONSAFEPATH keeps
    `python -c` from putting the working folder first itself)."""
    pki = make_pki(tmp_path)
    (tmp_path / "cryptography.py").write_text("open('shadowed', 'w').close()\n")
    # Optional modules torch imports when first needed, not installed here: looked in last
    # for the whole process, the folder's stood in for them as the optimizer was built (a
    # review of the change). It is importable while the model loads alone now.
    for optional in ("gmpy2", "flint", "tabulate"):
        (tmp_path / f"{optional}.py").write_text("open('stood_in', 'w').close()\n")
    (tmp_path / "mymodels.py").write_text("from gradwire_server.models import TINY_MLP as SPEC\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    for model in ("gradwire_server.models:TINY_MLP", "mymodels:SPEC"):
        with serve_process("--model", model, *tls) as (_, log):
            pass
        assert "TLS on (any client; certificate valid until" in log, log
        assert "model TinyMLP on cpu" in log, log
        assert not (tmp_path / "shadowed").exists(), f"{model}: the folder's cryptography.py ran"
        assert not (tmp_path / "stood_in").exists(), f"{model}: an optional module's stand-in ran"


def test_a_model_file_named_as_a_standard_module_is_said_not_to_be_the_one_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's queue.py holding SPEC was told "module 'queue' has no attribute 'SPEC'",
    which read as their file lacking it: the module imported was Python's (a security
    review, sixty-second session). The message names the file imported and says to rename
    theirs; a module of the user's own that lacks the attribute is named, no more."""
    import queue

    monkeypatch.setattr(sys, "path", [*sys.path])  # as serve finds it, whatever it does
    monkeypatch.chdir(tmp_path)
    (tmp_path / "queue.py").write_text("from gradwire_server.models import TINY_MLP as SPEC\n")
    err = io.StringIO()
    assert main(["serve", "--model", "queue:SPEC", "--port", "0"], io.StringIO(), err) == 2
    assert err.getvalue() == (
        f"gradwire serve: error: --model 'queue:SPEC': module 'queue' (imported from "
        f"{queue.__file__}) has no attribute 'SPEC'; your {tmp_path / 'queue.py'} is not that "
        "module: one of that name, Python's own or installed, is found first; rename your "
        "file (as mymodels.py, then --model mymodels:SPEC)\n"
    )
    (tmp_path / "nospec.py").write_text("X = 1\n")
    with pytest.raises(InvalidInput) as info:
        load_spec("nospec:SPEC", tmp_path)
    assert info.value.message == (
        f"--model 'nospec:SPEC': module 'nospec' (imported from {tmp_path / 'nospec.py'}) has "
        "no attribute 'SPEC'"
    )
    with pytest.raises(InvalidInput, match=r"module 'sys' \(built into Python\) has no"):
        load_spec("sys:SPEC")
    # A folder without __init__.py, a namespace package: no file, and not built in either.
    (tmp_path / "gw_namespace_folder").mkdir()
    with pytest.raises(InvalidInput) as info:
        load_spec("gw_namespace_folder:SPEC", tmp_path)
    assert info.value.message == (
        "--model 'gw_namespace_folder:SPEC': module 'gw_namespace_folder' has no attribute 'SPEC'"
    )


def test_serve_model_serves_it(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    model = ("--model", "gradwire_server.models:TINY_MLP")
    with serve_process(*model, "--port-file", str(port_file), "--grace", "2") as (process, log):
        assert "model TinyMLP on cpu" in log, log
        with gradwire.connect(f"127.0.0.1:{int(port_file.read_text())}", timeout=10) as client:
            client.wait_ready(10)
            listing = client.list_tensors()
        assert listing.model == "TinyMLP"
        assert [t.name for t in listing.tensors if t.kind == "parameter"] == MLP_PARAMETERS
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def sequential_mlp() -> nn.Module:
    """The README's example model: an nn.Sequential, whose layers torch names "0", "1", ..."""
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


def test_a_sequential_model_s_numbered_parameters_are_read_and_written() -> None:
    """The name torch gives an nn.Sequential's first layer's weight, "0.weight", was refused
    as a selector by the client and the command alike (found by the nineteenth session's
    review of the README, whose own example model is such a one)."""
    spec = ModelSpec("SequentialMLP", sequential_mlp, sample_shape=(16,), num_classes=4)
    local = seeded(sequential_mlp)
    with serving(spec) as client:
        assert [t.name for t in client.list_tensors().tensors][:2] == ["0.weight", "0.bias"]
        expected = local.get_parameter("3.weight").detach()[1, :2].numpy()
        np.testing.assert_array_equal(client.get("3.weight[1, :2]"), expected)
        assert client.set("0.bias[0]", 2.5) == 1
        out = io.StringIO()
        assert main(["get", "0.bias[0]", "--json", "--target", client.target], out=out) == 0
        assert '"values": 2.5' in out.getvalue()


def test_messages_that_show_a_name_or_a_shape_show_the_served_model_s(
    mlp: gradwire.Client,
) -> None:
    # They showed the tutorial's ('conv1.weight', [8, 3, 10, 10]) whatever the model served.
    import grpc

    from gradwire._pb import trainer_pb2 as pb

    with grpc.insecure_channel(mlp.target) as channel:
        for method, request, said in [
            ("GetTensor", pb.GetTensorRequest(), "a tensor name is required, e.g. 'fc1.weight'"),
            ("Forward", pb.ForwardRequest(), "a fill such as ones of shape [8, 16]"),
            ("Watch", pb.WatchRequest(), "a tensor name, e.g. 'fc1.weight'"),
        ]:
            call = f"/gradwire.v1.Trainer/{method}"
            with pytest.raises(grpc.RpcError) as caught:
                if method == "Watch":
                    next(channel.unary_stream(call)(request.SerializeToString(), timeout=10))
                else:
                    channel.unary_unary(call)(request.SerializeToString(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert said in (caught.value.details() or ""), method


class Reticent(nn.Module):
    """Refuses every input with a ValueError whose first line is blank."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("\n  \nbatches need 2 samples")


def test_a_refusal_is_named_by_its_first_line_with_words() -> None:
    with serving(ModelSpec("Reticent", Reticent, (4,), 3)) as client:
        with pytest.raises(errors.InvalidArgument) as caught:
            client.forward(np.ones((2, 4), np.float32))
        assert caught.value.message == "Reticent refused this input: batches need 2 samples"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_load_spec_refuses_torchscript_and_serve_a_factory_that_returns_one_model(
    module: Callable[[str], str],
) -> None:
    # Both ended `gradwire serve` with a traceback (found by a review of served models).
    scripted = module(
        HEADER + "import torch\n"
        "def make():\n"
        "    return nn.Sequential(torch.jit.script(nn.Linear(16, 8)), nn.Linear(8, 4))\n"
        "SPEC = ModelSpec('Scripted', make, (16,), 4)\n"
    )
    said = refused(f"{scripted}:SPEC")
    assert "Scripted holds TorchScript (0)" in said and "before torch.jit.script" in said
    whole = module(
        HEADER + "import torch\n"
        "def make():\n"
        "    return torch.jit.script(nn.Linear(16, 4))\n"
        "def four():\n"
        "    return nn.Sequential(*[torch.jit.script(nn.Linear(16, 16)) for _ in range(4)])\n"
        "WHOLE = ModelSpec('Whole', make, (16,), 4)\n"
        "FOUR = ModelSpec('Four', four, (16,), 16)\n"
    )
    assert "Whole holds TorchScript (the model): " in refused(f"{whole}:WHOLE")
    assert "Four holds TorchScript (0, 1, 2): " in refused(f"{whole}:FOUR")  # three at most
    loaded_once = module(
        HEADER + "PRE = TinyMLP()\nSPEC = ModelSpec('Pre', lambda: PRE, (16,), 4)\n"
    )
    spec = load_spec(f"{loaded_once}:SPEC")  # it builds, runs and trains
    with pytest.raises(ModelFault) as caught:
        Trainer(spec, seed=0)
    assert caught.value.reason == "SHARED_MODEL"
    assert "return copy.deepcopy of it" in caught.value.message
    # `gradwire serve` says so as a usage error, exit 2, before it listens: nothing served.
    err = io.StringIO()
    served = ["serve", "--model", f"{loaded_once}:SPEC", "--port", "0", "--device", "cpu"]
    assert main(served, io.StringIO(), err) == 2
    assert err.getvalue().startswith("gradwire serve: error: ")
    assert "return copy.deepcopy of it" in err.getvalue()


def test_a_half_models_output_loss_and_module_outputs_are_listed_in_its_dtype() -> None:
    # Listed float32 until a pass had made them (found by a review of served models).
    spec = ModelSpec("Half", lambda: TinyMLP().half(), (16,), 4, input_dtype=torch.float16)
    trainer = Trainer(spec, seed=0)

    def made_by_a_pass() -> dict[str, torch.dtype]:
        listing = trainer.list_tensors().tensors
        return {t.name: t.dtype for t in listing if t.kind in ("output", "loss", "activation")}

    before = made_by_a_pass()
    trainer.forward(torch.ones(2, 16, dtype=torch.float16), torch.tensor([0, 1]))
    assert before == made_by_a_pass()
    assert set(before.values()) == {torch.float16} and len(before) > 2


class Pixels(nn.Module):
    """Takes uint8 images, as a camera's frames come, and scales them itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x.float().flatten(1) / 255)
        return out


@ON_EACH_DEVICE
def test_a_model_taking_uint8_input_is_fed_what_the_wire_widens_to_int32(device: str) -> None:
    # The client sends uint8 values as int32 (the wire has no uint8), which the server
    # refused: "input has dtype int32; Pixels takes uint8" (found by a review of served
    # models). It narrows them now, refusing what uint8 cannot hold.
    spec = ModelSpec("Pixels", Pixels, (3, 4, 4), 10, input_dtype=torch.uint8)
    frames = np.arange(96, dtype=np.uint8).reshape(2, 3, 4, 4) * 2
    labels = np.array([1, 7])
    local = seeded(Pixels)
    loss = nn.CrossEntropyLoss()(local(torch.from_numpy(frames)), torch.from_numpy(labels))
    rel = LOSS_TOLERANCE[device]
    with serving(spec, device) as client:
        assert client.list_tensors().input_dtype == "int32"  # as it travels
        assert client.forward(frames, labels).loss == pytest.approx(loss.item(), rel=rel)
        assert client.read("input", as_torch=True).value.dtype == torch.int32
        assert client.train_step(frames.astype(np.int32), labels).loss == pytest.approx(
            loss.item(), rel=rel
        )
        with pytest.raises(errors.InvalidArgument) as caught:
            client.forward(np.full((2, 3, 4, 4), 300, np.int32), labels)
        assert caught.value.reason == "BAD_VALUE"
        assert "300 does not fit input's dtype uint8" in caught.value.message
        # Another dtype is refused naming the one to send: "Pixels takes uint8" alone sent a
        # client in another language, or the CLI's fills, to a dtype the wire has not (found
        # by a review of the error catalogue).
        with pytest.raises(errors.InvalidArgument) as caught:
            client.forward(frames.astype(np.float32), labels)
        assert caught.value.reason == "BAD_INPUT_DTYPE"
        assert caught.value.message == (
            "input has dtype float32; Pixels takes uint8, which travels as int32 (the wire has "
            "no uint8): send int32 values from 0 to 255"
        )
        # A Train narrows its input once, as it stages it, and steps as TrainSteps do.
        client.set_optimizer("sgd", lr=0.0)
        once = client.train_step(frames, labels).loss
        assert [p.loss for p in client.train(frames, labels, steps=2)] == [once] * 2
        with pytest.raises(errors.InvalidArgument, match="300 does not fit"):
            next(iter(client.train(np.full((2, 3, 4, 4), 300, np.int32), labels, steps=2)))


def _clip(p: torch.Tensor) -> None:
    assert p.grad is not None
    p.grad.clamp_(-0.01, 0.01)


class Clipped(nn.Module):
    """Clips each gradient as it is accumulated, as loss.backward() runs such hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        for p in self.parameters():
            p.register_post_accumulate_grad_hook(_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


@ON_EACH_DEVICE
def test_hooks_run_after_a_gradient_is_accumulated_run_as_in_loss_backward(device: str) -> None:
    # The server computes gradients with autograd.grad, which runs no such hook: its max
    # gradient was 0.613 where a local run clipped it to 0.01 (a review of served models).
    x, y = torch.ones(2, 4) * 3, torch.tensor([0, 1])
    local = seeded(Clipped)
    nn.CrossEntropyLoss()(local(x), y).backward()
    with serving(ModelSpec("Clipped", Clipped, (4,), 3), device) as client:
        client.forward(x.numpy(), y.numpy())
        client.backward()
        parameters_equal(client, local, grads=True, device=device)
        assert float(np.abs(client.get("lin.weight.grad")).max()) == pytest.approx(0.01)


class ClippedWithSpare(Clipped):
    """Clipped, with a layer whose parameters have the hook too but its forward pass leaves
    out: the loss makes them no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(4, 3)
        for p in self.spare.parameters():
            p.register_post_accumulate_grad_hook(_clip)


def test_a_hook_of_a_parameter_the_loss_does_not_reach_is_not_run() -> None:
    # loss.backward() runs a post-accumulate hook only where a gradient was accumulated.
    x, y = torch.ones(2, 4) * 3, torch.tensor([0, 1])
    local = seeded(ClippedWithSpare)
    nn.CrossEntropyLoss()(local(x), y).backward()
    with serving(ModelSpec("ClippedWithSpare", ClippedWithSpare, (4,), 3)) as client:
        client.forward(x.numpy(), y.numpy())
        client.backward()
        assert client.get("spare.weight.grad") is None
        served = client.read("lin.weight.grad", as_torch=True).value
        assert isinstance(local, ClippedWithSpare) and local.lin.weight.grad is not None
        assert isinstance(served, torch.Tensor) and torch.equal(served, local.lin.weight.grad)


class Shifting(nn.Module):
    """Changes its input in place, as a model normalising its batch in place may."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x.sub_(1))
        return out


def test_a_train_run_gives_each_step_its_input_as_sent_when_the_model_changes_it() -> None:
    # Each step was given the last one's changed input: at lr 0, losses 1.377, 1.221, 1.171
    # and 1.232 where every TrainStep gave 1.377 (found by a review of served models).
    x, y = np.ones((2, 4), np.float32), np.array([0, 1])
    with serving(ModelSpec("Shifting", Shifting, (4,), 3)) as client:
        client.set_optimizer("sgd", lr=0.0)
        once = client.train_step(x, y).loss
        losses = [p.loss for p in client.train(x, y, steps=4)]
        assert losses == [once] * 4
        assert np.array_equal(client.get("input"), x - 1)  # as the model left the last step's


class LongNames(nn.Module):
    """A layer under a 240-character name, as deeply nested models' names grow."""

    def __init__(self) -> None:
        super().__init__()
        setattr(self, "layer" * 48, nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = getattr(self, "layer" * 48)(x)
        return out


def test_a_model_whose_own_names_are_long_is_listed_and_read_by_every_name() -> None:
    # Its optimizer state's names ran past the 256-character limit: ListTensors answered
    # BAD_NAME, and with it every CLI command (found by a review of served models).
    with serving(ModelSpec("LongNames", LongNames, (4,), 3)) as client:
        client.set_optimizer("sgd", lr=0.1, momentum=0.9)
        client.train_step(np.ones((2, 4), np.float32), np.array([0, 1]))
        names = client.list_tensors().names()
        longest = max(names, key=len)
        assert longest == f"optimizer.{'layer' * 48}.weight.momentum_buffer"
        assert client.get(longest).shape == (3, 4)
        limit = client.server_info().limits.max_name_chars
        assert limit >= len(longest) > 256
        with pytest.raises(errors.InvalidArgument, match=f"over the limit of {limit}"):
            client.get("x" * (limit + 1))


class LongOther(nn.Module):
    """A name past 256 characters on a module without parameters (`module`) or on a buffer,
    the parameters' own short."""

    def __init__(self, module: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.act_name = "act" * 90 if module else "act"
        self.table_name = "table" if module else "table" * 60
        setattr(self, self.act_name, nn.ReLU())
        self.register_buffer(self.table_name, torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = getattr(self, self.act_name)(self.lin(x))
        return out


@pytest.mark.parametrize("module", [True, False], ids=["module", "buffer"])
def test_a_long_name_of_a_module_without_parameters_or_of_a_buffer_is_read(module: bool) -> None:
    """The limit takes every name the model has, not its parameters' alone: the module
    output "actact...act.output" (277 characters), or the buffer (300), was BAD_NAME."""
    local = LongOther(module)
    with serving(ModelSpec("LongOther", lambda: LongOther(module), (4,), 3)) as client:
        client.forward(np.ones((2, 4), np.float32))
        output, table = client.get(local.act_name + ".output"), client.get(local.table_name)
        assert output is not None and output.shape == (2, 3)
        assert table is not None and table.tolist() == [1.0, 1.0, 1.0]


class Bag(nn.Module):
    """A bag of words whose table's gradient is sparse, as nn.Embedding(sparse=True) makes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(self.emb(x).mean(1))
        return out


@ON_EACH_DEVICE
def test_a_sparse_gradient_is_kept_dense_and_trains_as_locally(device: str) -> None:
    # Backward, TrainStep and Train answered INTERNAL, in the gradient's layout copy (found
    # by a review of served models).
    ids, y = np.array([[1, 2, 2, 5, 0], [3, 3, 9, 1, 4]]), np.array([0, 2])
    spec = ModelSpec("Bag", Bag, (5,), 3, input_dtype=torch.int64)
    local = seeded(Bag)
    torch.optim.SGD(local.parameters(), lr=0.5).zero_grad()
    nn.CrossEntropyLoss()(local(torch.from_numpy(ids)), torch.from_numpy(y)).backward()
    table = local.emb.weight.grad
    assert table is not None and table.is_sparse
    with serving(spec, device) as client:
        client.set_optimizer("sgd", lr=0.5)
        client.forward(ids, y)
        client.backward()
        same(client.read("emb.weight.grad", as_torch=True).value, table.to_dense(), device)
        client.step()
        torch.optim.SGD(local.parameters(), lr=0.5).step()
        # The local step adds the sparse gradient, summing repeated ids in another order.
        for name, p in local.named_parameters():
            remote = client.read(name, as_torch=True).value
            torch.testing.assert_close(remote, p.detach(), rtol=0, atol=1e-6)
        client.set_optimizer("adam")  # torch's Adam takes no sparse gradient: a dense one
        assert [p.loss for p in client.train(ids, y, steps=2)][-1] > 0


def test_a_read_of_a_parametrized_weight_names_the_parameters_it_is_made_from() -> None:
    # It was told "did you mean '2.weight'" (found by a review of served models).
    def normed() -> nn.Module:
        return nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 3))

    with serving(ModelSpec("Normed", normed, (4,), 3)) as client:
        with pytest.raises(errors.NotFound) as caught:
            client.get("0.weight")
        originals = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
        assert caught.value.metadata["closest"] == ",".join(originals)
        assert "0.weight is computed by a parametrization" in caught.value.message
        assert client.get(originals[1]).shape == (3, 4)
    # The model itself parametrized: its own weight, named without a module's path.
    with serving(ModelSpec("Normed", lambda: weight_norm(nn.Linear(4, 3)), (4,), 3)) as client:
        with pytest.raises(errors.NotFound) as caught:
            client.get("weight")
        originals = ["parametrizations.weight.original0", "parametrizations.weight.original1"]
        assert caught.value.metadata["closest"] == ",".join(originals)
        assert "weight is computed by a parametrization" in caught.value.message


def test_a_read_of_a_parametrized_weight_s_gradient_or_state_names_those_it_is_made_from() -> None:
    # "0.weight.grad" was told "did you mean '2.weight.grad'", another layer's (found by a
    # review of serving real models): the weight's own read named its parameters already.
    def normed() -> nn.Module:
        return nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 3))

    originals = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
    with serving(ModelSpec("Normed", normed, (4,), 3)) as client:
        client.set_optimizer("sgd", lr=0.1, momentum=0.9)
        client.train_step(np.ones((2, 4), np.float32), np.array([0, 1]))
        for name, theirs in [
            ("0.weight.grad", [f"{n}.grad" for n in originals]),
            ("0.weight.delta", [f"{n}.delta" for n in originals]),
            (
                "optimizer.0.weight.momentum_buffer",
                [f"optimizer.{n}.momentum_buffer" for n in originals],
            ),
        ]:
            with pytest.raises(errors.NotFound) as caught:
                client.get(name)
            assert caught.value.metadata["closest"] == ",".join(theirs)
            said = f"{name} belongs to 0.weight, which is computed by a parametrization"
            assert said in caught.value.message
            for their in theirs:  # each there (a delta absent until first asked for)
                client.get(their)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("hooked", "originals"),
    [
        (nn.utils.spectral_norm, ["0.weight_orig"]),
        (nn.utils.weight_norm, ["0.weight_g", "0.weight_v"]),
    ],
    ids=["spectral_norm", "weight_norm"],
)
def test_a_read_of_a_weight_an_older_norm_computes_names_the_parameters_it_is_made_from(
    hooked: Callable[[nn.Module], nn.Module], originals: list[str]
) -> None:
    # torch.nn.utils.spectral_norm (and the older weight_norm) compute 0.weight in a hook
    # before each pass: its read was told "did you mean '0.weight_v', '0.weight_u',
    # '2.weight'", buffers and another layer's weight, never 0.weight_orig, the one that
    # trains (found by a review of serving real models).
    def normed() -> nn.Module:
        return nn.Sequential(hooked(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 3))

    with serving(ModelSpec("Normed", normed, (4,), 3)) as client:
        client.train_step(np.ones((2, 4), np.float32), np.array([0, 1]))
        for name, theirs in [
            ("0.weight", originals),
            ("0.weight.grad", [f"{n}.grad" for n in originals]),
        ]:
            with pytest.raises(errors.NotFound) as caught:
                client.get(name)
            assert caught.value.metadata["closest"] == ",".join(theirs)
            assert "computed by a parametrization" in caught.value.message
            for their in theirs:
                assert client.get(their) is not None


class StepsInBackward(nn.Module):
    """Steps each parameter as its gradient lands and lets go of the gradient: PyTorch's
    pattern for an optimizer in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        for p in self.parameters():
            p.register_post_accumulate_grad_hook(_step_in_backward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


def _step_in_backward(p: torch.Tensor) -> None:
    assert p.grad is not None
    with torch.no_grad():
        p.add_(p.grad, alpha=-0.1)
    p.grad = None


@ON_EACH_DEVICE
def test_a_train_step_of_a_model_that_steps_in_backward_is_its_step(device: str) -> None:
    # Once its hooks ran, every TrainStep was refused NO_GRADIENTS, "nothing changed", its
    # version put back, the parameters moved all the same (found by a review).
    x, y = torch.ones(2, 4), torch.tensor([0, 1])
    local = seeded(StepsInBackward)
    for _ in range(2):
        nn.CrossEntropyLoss()(local(x), y).backward()
    # On a GPU its hooks run on autograd's thread for the device, not the trainer's.
    with serving(ModelSpec("StepsInBackward", StepsInBackward, (4,), 3), device) as client:
        assert client.train_step(x.numpy(), y.numpy()).version == 4
        result = client.train_step(x.numpy(), y.numpy())
        assert (result.version, result.parameters_updated) == (8, 2)
        parameters_equal(client, local, device=device)


def test_a_step_a_model_takes_in_backward_is_counted_and_keeps_no_change() -> None:
    # As a Step is: a watcher of every Step hears of it; and the change the last Step kept
    # goes, for it was made to weights the hooks have moved since.
    spec = ModelSpec("StepsInBackward", StepsInBackward, (4,), 3)
    x, y = np.ones((2, 4), np.float32), np.array([0, 1])
    with serve_in_process(spec, SEED) as (trainer, client):
        assert client.get("lin.weight.delta") is None  # asked for: a Step keeps it now
        client.set("lin.weight.grad", np.ones((3, 4), np.float32))
        client.step()
        assert client.get("lin.weight.delta") is not None
        subscription = trainer.subscribe(every_steps=1)
        try:
            client.train_step(x, y)
            assert subscription.take() == 1
        finally:
            trainer.unsubscribe(subscription)
        assert client.get("lin.weight.delta") is None


def test_a_train_narrows_a_uint8_models_input_once_not_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The staged tensor stayed int32, and every step narrowed it again (found by a review).
    spec = ModelSpec("Pixels", Pixels, (3, 4, 4), 10, input_dtype=torch.uint8)
    frames = np.arange(96, dtype=np.uint8).reshape(2, 3, 4, 4)
    with serve_in_process(spec, SEED) as (trainer, client):
        narrowed = []
        real = trainer._narrowed

        def counted(x: torch.Tensor) -> torch.Tensor:
            narrowed.append(x.shape)
            return real(x)

        monkeypatch.setattr(trainer, "_narrowed", counted)
        assert len(list(client.train(frames, np.array([1, 7]), steps=3))) == 3
        assert narrowed == [torch.Size([2, 3, 4, 4])]
