"""The Python client and the remote view, through a real channel to an in-process server.

Every value is checked against plain PyTorch run here on the same weights, bit for bit.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import codec, errors, limits
from gradwire._pb import trainer_pb2 as pb
from gradwire.codec import CodecError
from gradwire.fill import Fill
from gradwire.selector import SelectorError
from gradwire.targets import with_default_port
from gradwire_server.app import Running, start
from gradwire_server.models import ModelSpec, Simple
from gradwire_server.trainer import Trainer
from tests.background import eventually
from tests.cli_run import run_main
from tests.relay import relay_to
from tests.serve_in_process import bare_server, old_trainer, recording_reads, serving

ONES_INPUT = Fill.ones(8, 3, 10, 10)
ONES_TARGET = Fill.ones(8, dtype="int64")
PARAMETERS = ("conv1.weight", "conv2.weight", "linear.weight")
SHAPES = {
    "conv1.weight": (16, 3, 3, 3),
    "conv2.weight": (32, 16, 3, 3),
    "linear.weight": (20, 3200),
}


def local_model(seed: int = 0) -> Simple:
    """`torch.manual_seed(seed); Simple()`, without disturbing this process's generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Simple()


def weights(model: nn.Module, name: str) -> np.ndarray[Any, Any]:
    return dict(model.named_parameters())[name].detach().numpy()


def local_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward and backward on the local model; returns the loss."""
    loss = nn.CrossEntropyLoss()(model(x), y)
    loss.backward()
    return loss


def ones_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(8, 3, 10, 10), torch.ones(8, dtype=torch.long)


def current_version(client: gradwire.Client) -> int:
    return client.list_tensors().version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- Forward ------------------------------------------------------------------------


def test_forward_with_fill_gives_output_shape_and_local_loss(client: gradwire.Client) -> None:
    result = client.forward(ONES_INPUT, ONES_TARGET)
    x, y = ones_batch()
    expected = nn.CrossEntropyLoss()(local_model()(x), y)
    assert result.output_shape == (8, 20)
    assert result.loss == expected.item()
    assert result.version == 1


def test_a_forward_whose_loss_is_zero_says_0_not_none(client: gradwire.Client) -> None:
    """A loss of exactly 0.0 (one class's logit far above the rest) is a loss, not the
    absent one of a Forward without a target."""
    client.fill_parameters(1.0, ["conv1.weight", "conv2.weight"])
    client.fill_parameters(0.0, ["linear.weight"])
    client.set("linear.weight[0]", 1.0)  # class 0's logit about 1e7, the others' 0
    result = client.forward(ONES_INPUT, Fill.zeros(8, dtype="int64"))
    assert result.loss == 0.0 and result.loss is not None
    assert client.forward(ONES_INPUT).loss is None


def test_forward_with_numpy_arrays_gives_local_loss(client: gradwire.Client) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 10, 10)).astype(np.float32)
    y = rng.integers(0, 20, size=5).astype(np.int64)
    result = client.forward(x, y)
    expected = nn.CrossEntropyLoss()(local_model()(torch.from_numpy(x)), torch.from_numpy(y))
    assert result.output_shape == (5, 20)
    assert result.loss == expected.item()


def test_forward_with_torch_tensors_gives_local_loss(client: gradwire.Client) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 10, 10, generator=gen)
    y = torch.tensor([4, 19])
    result = client.forward(x, y)
    expected = nn.CrossEntropyLoss()(local_model()(x), y)
    assert result.output_shape == (2, 20)
    assert result.loss == expected.item()


def test_forward_without_target_has_no_loss(client: gradwire.Client) -> None:
    result = client.forward(ONES_INPUT)
    assert result.output_shape == (8, 20)
    assert result.loss is None
    assert client.get("loss") is None


def test_forward_keeps_input_target_output_and_loss_readable(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    x, y = ones_batch()
    output = local_model()(x)
    loss = nn.CrossEntropyLoss()(output, y)
    assert np.array_equal(client.get("input"), x.numpy())
    assert np.array_equal(client.get("target"), y.numpy())
    assert np.array_equal(client.get("output"), output.detach().numpy())
    assert np.array_equal(client.get("loss"), loss.detach().numpy())


def test_the_target_reads_back_as_the_loss_took_it(client: gradwire.Client) -> None:
    """As the .proto documents (an integrator's review asked): int32 class indices read back
    as int64, float16 probabilities with a float32 input as float32, each with its values."""
    x = np.ones((2, 3, 10, 10), np.float32)
    indices = np.array([3, 19], np.int32)
    client.forward(x, indices)
    read = client.get("target")
    assert read.dtype == np.int64 and np.array_equal(read, indices)
    probabilities = np.full((2, 20), 0.05, np.float16)
    result = client.forward(x, probabilities)
    read = client.get("target")
    assert read.dtype == np.float32 and np.array_equal(read, probabilities.astype(np.float32))
    expected = nn.CrossEntropyLoss()(
        local_model()(torch.from_numpy(x)), torch.from_numpy(probabilities).float()
    )
    assert result.loss == expected.item()


# --- versions -----------------------------------------------------------------------


def test_each_mutation_adds_exactly_one_to_the_version(client: gradwire.Client) -> None:
    versions = [
        current_version(client),
        client.forward(ONES_INPUT, ONES_TARGET).version,
        client.backward(),
        client.step().version,
        client.zero_grad(),
        client.zero_grad(set_to_none=False),
        client.set("conv1.weight[0]", 0.5),
        client.fill_parameters(0.1),
        client.reset(1),
    ]
    client.set_optimizer("sgd", lr=0.5)  # answers the settings, not the version
    versions.append(current_version(client))
    assert versions == list(range(10))


def test_reads_do_not_change_the_version(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    before = current_version(client)
    client.get("conv1.weight[0]")
    client.read("output")
    client.shape("linear.weight")
    client.get("conv1.weight.grad")
    client.health()
    repr(client.remote.conv1.weight[0][0])
    dir(client.remote)
    assert client.read("loss").version == before
    assert current_version(client) == before


def test_a_failed_call_leaves_the_version_unchanged(client: gradwire.Client) -> None:
    with pytest.raises(errors.FailedPrecondition):
        client.backward()
    with pytest.raises(errors.NotFound):
        client.set("conv1.wieght", 1.0)
    assert current_version(client) == 0


# --- gradients, Step, ZeroGrad --------------------------------------------------------


def test_get_is_none_for_a_gradient_before_backward(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    assert client.get("conv1.weight.grad") is None


def test_backward_gradients_equal_local_torch_gradients(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    model = local_model()
    local_step(model, *ones_batch())
    for name, param in model.named_parameters():
        assert param.grad is not None
        assert torch.equal(client.get(f"{name}.grad", as_torch=True), param.grad), name


def test_step_applies_sgd_with_lr_one_bit_for_bit(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    before = client.get("conv1.weight")
    grad = client.get("conv1.weight.grad")
    result = client.step()
    assert result.parameters_updated == 3
    assert np.array_equal(client.get("conv1.weight"), before - grad)


def test_get_is_none_after_zero_grad(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    client.zero_grad()
    for name in PARAMETERS:
        assert client.get(f"{name}.grad") is None


def test_zero_grad_without_set_to_none_leaves_zero_tensors(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    client.zero_grad(set_to_none=False)
    for name in PARAMETERS:
        grad = client.get(f"{name}.grad")
        assert grad is not None
        assert grad.shape == SHAPES[name]
        assert not grad.any()


# --- read, shape, get -------------------------------------------------------------------


def test_read_reports_version_shapes_and_dtype(client: gradwire.Client) -> None:
    client.fill_parameters(0.25)
    read = client.read("conv1.weight[0, :, 1:3]")
    assert read.name == "conv1.weight"
    assert read.version == 1
    assert read.full_shape == (16, 3, 3, 3)
    assert read.shape == (3, 2, 3)
    assert read.dtype == "float32"
    assert read.present
    assert np.array_equal(read.value, np.full((3, 2, 3), 0.25, dtype=np.float32))


def test_read_of_an_absent_gradient_is_not_present(client: gradwire.Client) -> None:
    client.fill_parameters(0.25)  # version 1: the read says the version it was absent at
    read = client.read("conv1.weight.grad")
    assert not read.present
    assert (read.name, read.version) == ("conv1.weight.grad", 1)
    assert (read.value, read.shape, read.full_shape, read.dtype) == (None, None, None, None)


def test_read_with_a_separate_index_key(client: gradwire.Client) -> None:
    expected = weights(local_model(), "conv1.weight")[2][0, :, 1:3]
    value = client.get("conv1.weight[2]", (0, slice(None), slice(1, 3)))
    assert np.array_equal(value, expected)


def test_set_with_a_separate_index_of_0_writes_that_row_alone(client: gradwire.Client) -> None:
    """An index of 0 is an index, not one left out: a row written through it broadcast to
    every row if it were taken for none."""
    before = client.get("conv1.weight")
    row = np.full((3, 3, 3), 0.5, np.float32)
    client.set("conv1.weight", row, 0)
    after = client.get("conv1.weight")
    np.testing.assert_array_equal(after[0], row)
    np.testing.assert_array_equal(after[1:], before[1:])


def test_shape_without_values(client: gradwire.Client) -> None:
    assert client.shape("conv1.weight[0, :, 1:3]") == (3, 2, 3)
    assert client.shape("linear.weight") == (20, 3200)
    read = client.read("linear.weight", values=False)
    assert read.value is None and read.present  # present, its values not asked for
    assert read.shape == (20, 3200)
    assert read.dtype == "float32"
    client.forward(ONES_INPUT, ONES_TARGET)  # a tensor of another dtype says its own
    target = client.read("target[:3]", values=False)
    assert (target.value, target.shape, target.dtype) == (None, (3,), "int64")


def test_a_shape_only_read_carries_no_values_on_the_wire(client: gradwire.Client) -> None:
    """omit_values: the answer holds the shape and dtype, not 64,000 values that the client
    would throw away (the Python client's read(values=False) shows None either way)."""
    request = pb.GetTensorRequest(name="linear.weight", omit_values=True)
    answer = client._methods["GetTensor"](request.SerializeToString(), timeout=30)
    if isinstance(answer, bytes):
        answer = pb.GetTensorResponse.FromString(answer)
    assert list(answer.tensor.shape) == [20, 3200]
    assert answer.tensor.dtype == pb.DTYPE_FLOAT32
    assert len(answer.tensor.float_values) == 0 and answer.ByteSize() < 100


def test_shape_of_an_absent_gradient_is_none(client: gradwire.Client) -> None:
    assert client.shape("conv2.weight.grad") is None


def test_as_torch_without_torch_is_refused_before_anything_is_sent(
    client: gradwire.Client,
) -> None:
    """A client without torch ran a TrainStep asked for torch tensors, then lost its answer
    to torch's import (a bare ModuleNotFoundError, the step applied: run again, applied
    twice; a review of installing the client alone)."""
    before = client.list_tensors().version
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # as a Python without torch\n"
        "import gradwire\n"
        "from gradwire.fill import Fill\n"
        f"with gradwire.connect({client.target!r}, timeout=30) as client:\n"
        "    for call in (\n"
        "        lambda: client.train_step(Fill.ones(2, 3, 10, 10), Fill.zeros(2, dtype='int64'),\n"
        "                                  fetch=['loss'], as_torch=True),\n"
        "        lambda: client.get('conv1.weight[0]', as_torch=True),\n"
        "        lambda: client.remote.conv1.bias.torch(),\n"
        "    ):\n"
        "        try:\n"
        "            call()\n"
        "        except ModuleNotFoundError as err:\n"
        "            print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert (
        done.stdout.splitlines()
        == [
            "as_torch=True reads into torch tensors, and this Python has no torch (import of "
            "torch halted; None in sys.modules): install it, or leave as_torch out for numpy "
            "arrays (nothing was sent)"
        ]
        * 3
    )
    assert client.list_tensors().version == before


def test_get_as_torch_gives_a_torch_tensor(client: gradwire.Client) -> None:
    value = client.get("conv2.weight[1]", as_torch=True)
    assert isinstance(value, torch.Tensor)
    assert value.dtype == torch.float32
    assert torch.equal(value, local_model().conv2.weight[1].detach())


def test_get_gives_a_float32_numpy_array(client: gradwire.Client) -> None:
    value = client.get("linear.weight")
    assert isinstance(value, np.ndarray)
    assert value.dtype == np.float32
    assert np.array_equal(value, weights(local_model(), "linear.weight"))


Index = Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]
SELECTORS: list[tuple[str, Index]] = [
    ("conv1.weight[0][0][0]", lambda w: w[0][0][0]),
    ("conv1.weight[0, :, 1:3]", lambda w: w[0, :, 1:3]),
    ("conv1.weight[..., -1]", lambda w: w[..., -1]),
    ("conv1.weight[::-1]", lambda w: w[::-1]),
    ("conv1.weight[None]", lambda w: w[None]),
    ("conv1.weight[-1][1:, ::2]", lambda w: w[-1][1:, ::2]),
    ("conv1.weight[3:12:4, None, 0, ..., ::-2]", lambda w: w[3:12:4, None, 0, ..., ::-2]),
    ("conv1.weight[0][0][0][1]", lambda w: w[0][0][0][1]),
    ("conv1.weight[5:2]", lambda w: w[5:2]),
]


@pytest.mark.parametrize(("selector", "index"), SELECTORS, ids=[s for s, _ in SELECTORS])
def test_selector_reads_match_numpy_indexing(
    client: gradwire.Client, selector: str, index: Index
) -> None:
    expected = index(weights(local_model(), "conv1.weight"))
    value = client.get(selector)
    assert value is not None
    assert value.shape == expected.shape
    assert np.array_equal(value, expected)


def test_an_index_key_of_none_is_no_index_and_a_new_axis_is_a_tuple(
    client: gradwire.Client,
) -> None:
    """As read()'s docstring says: None is the argument left out, not numpy's x[None]."""
    w = weights(local_model(), "conv1.weight")
    assert np.array_equal(client.get("conv1.weight", None), w)
    for key in [(None,), (0, None, slice(1, 3))]:
        assert np.array_equal(client.get("conv1.weight", key), w[key])
    assert client.get("conv1.weight", (None,)).shape == (1, 16, 3, 3, 3)


# --- set, fill_parameters -----------------------------------------------------------------


def test_set_a_whole_tensor(client: gradwire.Client) -> None:
    new = np.random.default_rng(1).standard_normal((16, 3, 3, 3)).astype(np.float32)
    assert client.set("conv1.weight", new) == 1
    assert np.array_equal(client.get("conv1.weight"), new)


def test_set_a_slice_changes_only_that_slice(client: gradwire.Client) -> None:
    part = np.arange(18, dtype=np.float32).reshape(3, 2, 3)
    client.set("conv1.weight[0, :, 1:3]", part)
    expected = weights(local_model(), "conv1.weight").copy()
    expected[0, :, 1:3] = part
    assert np.array_equal(client.get("conv1.weight"), expected)


def test_set_a_scalar_broadcasts_over_the_slice(client: gradwire.Client) -> None:
    client.set("conv2.weight[1]", 0.25)
    expected = weights(local_model(), "conv2.weight").copy()
    expected[1] = 0.25
    assert np.array_equal(client.get("conv2.weight"), expected)


def test_set_a_torch_tensor_into_an_absent_gradient(client: gradwire.Client) -> None:
    client.set("linear.weight.grad[0]", torch.full((3200,), 2.0))
    grad = client.get("linear.weight.grad")
    assert grad is not None
    expected = np.zeros((20, 3200), dtype=np.float32)
    expected[0] = 2.0
    assert np.array_equal(grad, expected)


def test_set_with_the_wrong_shape_is_invalid_argument(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set("conv1.weight[0][0][0]", np.ones(2, dtype=np.float32))
    assert caught.value.reason == "SHAPE_MISMATCH"


def test_fill_parameters_fills_every_parameter(client: gradwire.Client) -> None:
    client.fill_parameters(0.1)
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), np.full(SHAPES[name], 0.1, dtype=np.float32))


def test_fill_parameters_by_name_fills_only_those(client: gradwire.Client) -> None:
    client.fill_parameters(-0.5, ["conv1.weight", "linear.weight"])
    local = local_model()
    assert np.array_equal(client.get("conv1.weight"), np.full((16, 3, 3, 3), -0.5, np.float32))
    assert np.array_equal(client.get("linear.weight"), np.full((20, 3200), -0.5, np.float32))
    assert np.array_equal(client.get("conv2.weight"), weights(local, "conv2.weight"))


def test_fill_parameters_names_each_parameter_filled_once(client: gradwire.Client) -> None:
    """A name given twice was listed twice in `filled` (found by an integrator's review)."""
    request = pb.FillParametersRequest(
        value=0.5, names=["conv2.weight", "conv1.weight", "conv2.weight", "conv1.weight"]
    )
    answer = client._methods["FillParameters"](request.SerializeToString(), timeout=30)
    assert list(answer.filled) == ["conv2.weight", "conv1.weight"]
    assert answer.version == 1
    assert np.array_equal(client.get("conv1.weight"), np.full((16, 3, 3, 3), 0.5, np.float32))


def test_fill_parameters_of_an_unknown_name_is_not_found(client: gradwire.Client) -> None:
    with pytest.raises(errors.NotFound):
        client.fill_parameters(1.0, ["conv3.weight"])
    assert np.array_equal(client.get("conv1.weight"), weights(local_model(), "conv1.weight"))


# --- list_tensors -----------------------------------------------------------------------


def test_list_tensors_names_and_kinds(client: gradwire.Client) -> None:
    listing = client.list_tensors()
    grads = [f"{n}.grad" for n in PARAMETERS]
    outputs = ["conv1.output", "conv2.output", "linear.output"]
    deltas = [f"{n}.delta" for n in PARAMETERS]
    forward = ["input", "target", "output", "loss"]
    assert listing.names() == [*PARAMETERS, *grads, *forward, *outputs, *deltas]
    kinds = {t.name: t.kind for t in listing.tensors}
    assert [kinds[n] for n in outputs] == ["activation"] * 3
    assert [kinds[n] for n in deltas] == ["delta"] * 3
    assert [kinds[n] for n in PARAMETERS] == ["parameter"] * 3
    assert [kinds[n] for n in grads] == ["gradient"] * 3
    assert [kinds[n] for n in ("input", "target", "output", "loss")] == [
        "input",
        "target",
        "output",
        "loss",
    ]


def test_list_tensors_model_device_and_optimizer(client: gradwire.Client) -> None:
    listing = client.list_tensors()
    assert listing.model == "Simple"
    assert listing.device == "cpu"
    assert (listing.sample_shape, listing.input_dtype) == ((3, 10, 10), "float32")
    assert (listing.outputs, listing.loss) == (20, "cross_entropy")
    assert listing.optimizer == gradwire.OptimizerConfig(
        kind="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False
    )


def test_list_tensors_before_forward(client: gradwire.Client) -> None:
    info = {t.name: t for t in client.list_tensors().tensors}
    for name in PARAMETERS:
        assert (info[name].present, info[name].shape, info[name].dtype) == (
            True,
            SHAPES[name],
            "float32",
        )
        assert (info[f"{name}.grad"].present, info[f"{name}.grad"].shape) == (False, ())
    for name in ("input", "target", "output", "loss"):
        assert not info[name].present


def test_list_tensors_after_forward_and_backward(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    info = {t.name: t for t in client.list_tensors().tensors}
    assert {n: (info[n].present, info[n].shape) for n in ("input", "target", "output", "loss")} == {
        "input": (True, (8, 3, 10, 10)),
        "target": (True, (8,)),
        "output": (True, (8, 20)),
        "loss": (True, ()),
    }
    assert info["target"].dtype == "int64"
    assert not any(info[f"{n}.grad"].present for n in PARAMETERS)
    client.backward()
    info = {t.name: t for t in client.list_tensors().tensors}
    for name in PARAMETERS:
        assert (info[f"{name}.grad"].present, info[f"{name}.grad"].shape) == (True, SHAPES[name])


# --- reset, set_optimizer -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_reset_with_a_seed_reproduces_local_initialisation(
    client: gradwire.Client, seed: int
) -> None:
    client.fill_parameters(0.0)
    client.reset(seed)
    local = local_model(seed)
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), weights(local, name)), name


def test_reset_without_a_seed_is_not_seed_zero(client: gradwire.Client) -> None:
    """An unset seed draws a fresh initialisation; read as proto3's default it was seed 0,
    the same model at every reset."""
    client.reset()
    unseeded = client.get("conv1.weight")
    assert isinstance(unseeded, np.ndarray)
    assert not np.array_equal(unseeded, weights(local_model(0), "conv1.weight"))


def test_reset_forgets_forward_and_gradients(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    client.reset(0)
    assert client.get("conv1.weight.grad") is None
    assert client.get("output") is None
    with pytest.raises(errors.FailedPrecondition):
        client.backward()


def test_a_step_after_a_reset_trains_the_new_model(client: gradwire.Client) -> None:
    """Reset makes a new model and an optimizer over its parameters, with the settings
    kept: an optimizer left over the old model's parameters would step those, and the new
    model's weights would never move (nothing checked a Step after a Reset, with no
    SetOptimizer between to build the optimizer again)."""
    client.set_optimizer("sgd", lr=0.1)
    client.train_step(ONES_INPUT, ONES_TARGET)
    client.reset(0)
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    weight, grad = client.get("conv1.weight"), client.get("conv1.weight.grad")
    assert np.abs(grad).max() > 0
    client.step()
    np.testing.assert_allclose(client.get("conv1.weight"), weight - 0.1 * grad, rtol=1e-6)


def test_set_optimizer_sgd_with_momentum(client: gradwire.Client) -> None:
    config = client.set_optimizer("sgd", lr=0.1, momentum=0.9)
    expected = gradwire.OptimizerConfig(
        kind="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False
    )
    assert config == expected
    assert client.list_tensors().optimizer == expected


def _two_steps_match(
    client: gradwire.Client, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Two steps of the tutorial's batch on the server and on `model` by `optimizer`: every
    parameter after them bit for bit the same."""
    for _ in range(2):
        client.forward(ONES_INPUT, ONES_TARGET)
        client.backward()
        client.step()
        client.zero_grad()
        local_step(model, *ones_batch())
        optimizer.step()
        optimizer.zero_grad()
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), weights(model, name)), name


def test_sgd_momentum_steps_match_local_torch(client: gradwire.Client) -> None:
    client.set_optimizer("sgd", lr=0.1, momentum=0.9)
    model = local_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _two_steps_match(client, model, optimizer)


def test_set_optimizer_adam_takes_torch_defaults(client: gradwire.Client) -> None:
    config = client.set_optimizer("adam")
    torch_s = torch.optim.Adam([torch.zeros(1)]).defaults
    assert config == gradwire.OptimizerConfig(
        kind="adam",
        lr=torch_s["lr"],
        weight_decay=torch_s["weight_decay"],
        beta1=torch_s["betas"][0],
        beta2=torch_s["betas"][1],
        eps=torch_s["eps"],
    )


def test_adam_step_matches_local_torch_adam_bit_for_bit(client: gradwire.Client) -> None:
    client.set_optimizer("adam", lr=0.01)
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    client.step()
    model = local_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    local_step(model, *ones_batch())
    optimizer.step()
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), weights(model, name)), name


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda c: c.set_optimizer("rmsprop", lr=0.1), ValueError, "must be 'sgd' or 'adam'"),
        (lambda c: c.set_optimizer("ADAM"), ValueError, "got 'ADAM'"),
        (lambda c: c.open_session(optimizer="rmsprop"), ValueError, "must be 'sgd' or 'adam'"),
        (lambda c: c.open_session(bogus=1), TypeError, "'bogus' is not an optimizer setting"),
        (lambda c: c.set_optimizer(lr="0.1"), TypeError, "lr must be a number, got '0.1'"),
        (lambda c: c.set_optimizer(lr=True), TypeError, "lr must be a number"),
        (lambda c: c.set_optimizer(nesterov=1), TypeError, "nesterov must be True or False"),
    ],
)
def test_an_optimizer_the_client_cannot_send_is_refused_before_it_is_sent(
    client: gradwire.Client, call, error: type[Exception], text: str
) -> None:  # type: ignore[no-untyped-def]
    """Any kind but "adam" was sent as SGD, and unknown settings raised protobuf's own
    AttributeError or TypeError (found by the nineteenth session's review)."""
    version = client.list_tensors().version
    with pytest.raises(error, match=re.escape(text)):
        call(client)
    assert client.list_tensors().version == version
    assert client.list_tensors().optimizer.kind == "sgd"


def test_set_optimizer_refuses_an_sgd_setting_for_adam(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set_optimizer("adam", momentum=0.9)
    assert caught.value.reason == "BAD_OPTIMIZER"
    assert client.list_tensors().optimizer.kind == "sgd"


def _steps(client: gradwire.Client, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Two training steps on the server and the same two on the local model."""
    for _ in range(2):
        client.train_step(ONES_INPUT, ONES_TARGET, zero_grad=True)
        optimizer.zero_grad()
        local_step(model, *ones_batch())
        optimizer.step()


def test_keep_state_lowers_adams_lr_as_torchs_param_groups_do(client: gradwire.Client) -> None:
    """A learning rate lowered mid-training keeps Adam's moments and step counts and the
    other settings, as `group["lr"] = ...` does in PyTorch; without keep_state it is a new
    Adam, its moments gone and beta1 back to 0.9 (found by a newcomer's walkthrough)."""
    client.set_optimizer("adam", lr=0.01, beta1=0.8)
    model = local_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.999))
    _steps(client, model, optimizer)
    version = current_version(client)
    config = client.set_optimizer(lr=0.001, keep_state=True)
    assert config == gradwire.OptimizerConfig(
        kind="adam", lr=0.001, weight_decay=0.0, beta1=0.8, beta2=0.999, eps=1e-8
    )
    assert client.list_tensors().optimizer == config
    assert current_version(client) == version + 1
    optimizer.param_groups[0]["lr"] = 0.001
    _steps(client, model, optimizer)
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), weights(model, name)), name
        state = optimizer.state[dict(model.named_parameters())[name]]
        assert np.array_equal(client.get(f"optimizer.{name}.exp_avg"), state["exp_avg"]), name
        assert client.get(f"optimizer.{name}.step") == state["step"].item() == 4, name


@pytest.mark.parametrize(
    "changes",
    [
        [{"lr": 0.05, "nesterov": True}],
        # plain SGD (optim.py's own loop) to momentum (torch's), and momentum 0 in place
        # keeping the buffers, which a momentum raised again goes on from, as in torch
        [{"momentum": 0.0}, {"momentum": 0.5, "weight_decay": 0.01}],
    ],
    ids=["nesterov-on", "momentum-off-and-on"],
)
def test_keep_state_changes_sgd_in_place_as_torchs_param_groups_do(
    client: gradwire.Client, changes: list[dict[str, Any]]
) -> None:
    client.set_optimizer("sgd", lr=0.1, momentum=0.9)
    model = local_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(client, model, optimizer)
    for change in changes:
        config = client.set_optimizer(keep_state=True, **change)
        optimizer.param_groups[0].update(change)
        group = optimizer.param_groups[0]
        assert config == gradwire.OptimizerConfig(
            kind="sgd",
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
        )
        _steps(client, model, optimizer)
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), weights(model, name)), name
        buffer = optimizer.state[dict(model.named_parameters())[name]]["momentum_buffer"]
        assert np.array_equal(client.get(f"optimizer.{name}.momentum_buffer"), buffer), name


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"kind": "sgd", "lr": 0.1},
            "the optimizer is Adam, and keep_state (--keep-state) changes its settings in "
            "place: SGD needs a new optimizer (without keep_state, its state starts afresh)",
        ),
        ({"momentum": 0.9}, "momentum is a setting of SGD, not of Adam"),
        ({"lr": -1.0}, "optimizer settings refused: Invalid learning rate: -1.0"),
        ({"beta1": 1.5}, "optimizer settings refused: beta1 must be at least 0 and below 1"),
    ],
)
def test_keep_state_refuses_what_a_new_optimizer_would_and_changes_nothing(
    client: gradwire.Client, change: dict[str, Any], said: str
) -> None:
    client.set_optimizer("adam", lr=0.01)
    client.train_step(ONES_INPUT, ONES_TARGET)
    before = (current_version(client), client.list_tensors().optimizer)
    moments = client.get("optimizer.conv1.weight.exp_avg")
    with pytest.raises(errors.InvalidArgument, match=re.escape(said)) as caught:
        client.set_optimizer(keep_state=True, **change)
    assert caught.value.reason == "BAD_OPTIMIZER"
    assert (current_version(client), client.list_tensors().optimizer) == before
    assert np.array_equal(client.get("optimizer.conv1.weight.exp_avg"), moments)


def test_keep_state_checks_the_settings_as_a_whole_and_names_those_kept(
    client: gradwire.Client,
) -> None:
    """Momentum 0 is refused while nesterov, kept, stays on; the message named neither. It
    gave torch's words, which named dampening, a setting gradwire does not have."""
    client.set_optimizer("sgd", lr=0.1, momentum=0.9, nesterov=True)
    before = (current_version(client), client.list_tensors().optimizer)
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set_optimizer(momentum=0.0, keep_state=True)
    assert caught.value.reason == "BAD_OPTIMIZER"
    assert caught.value.message == (
        "optimizer settings refused: nesterov needs a momentum above 0, and momentum is "
        "0.0; keep_state (--keep-state) keeps the settings not given (lr=0.1, "
        "weight_decay=0.0, "
        "nesterov=True): give those that must change too, in the same call"
    )
    assert (current_version(client), client.list_tensors().optimizer) == before
    config = client.set_optimizer(momentum=0.0, nesterov=False, keep_state=True)
    assert (config.momentum, config.nesterov) == (0.0, False)


def test_keep_state_must_be_true_or_false(client: gradwire.Client) -> None:
    version = current_version(client)
    with pytest.raises(TypeError, match="keep_state= must be True or False, got 'no'"):
        client.set_optimizer(lr=0.1, keep_state="no")  # type: ignore[arg-type]
    assert current_version(client) == version


def test_keep_state_takes_numpy_s_bool(client: gradwire.Client) -> None:
    """np.bool_(True) is True, as nesterov takes it: the settings change in place."""
    client.set_optimizer("adam", lr=0.01, beta1=0.8)
    config = client.set_optimizer(lr=0.001, keep_state=np.bool_(True))
    assert (config.kind, config.lr, config.beta1) == ("adam", 0.001, 0.8)
    client.set_optimizer()


# --- health, lifetime -----------------------------------------------------------------------


def test_health_is_serving(client: gradwire.Client) -> None:
    assert client.health() == "SERVING"


def test_context_manager_closes_the_channel(address: str) -> None:
    with gradwire.connect(address, timeout=30) as client:
        assert client.health() == "SERVING"
    with pytest.raises(errors.ClientClosed, match="this client is closed"):
        client.health()


def test_a_client_s_repr_says_when_it_can_call_no_more(address: str) -> None:
    """A notebook shows a client by its repr: a closed one printed as an open one, and a
    session client whose session is closed as a client of the default session, which its
    calls never fall back to (found by a review of the client as a researcher uses it in a
    notebook)."""
    with gradwire.connect(address, timeout=30) as client:
        with client.open_session() as mine:
            session = mine.session
        assert repr(mine) == f"gradwire.Client({address!r}, session={session!r}) (session closed)"
        assert repr(client) == f"gradwire.Client({address!r})"
    assert repr(client) == f"gradwire.Client({address!r}) (closed)"
    assert repr(mine) == f"gradwire.Client({address!r}, session={session!r}) (closed)"
    joined = gradwire.connect(address, session=session)
    joined.close()
    assert repr(joined) == f"gradwire.Client({address!r}, session={session!r}) (closed)"


def test_wait_ready_returns_for_a_live_server(address: str) -> None:
    with gradwire.connect(address, timeout=30) as client:
        client.wait_ready(timeout=10)
        assert client.list_tensors().version == 0


# --- typed errors -----------------------------------------------------------------------------


def test_unknown_name_is_not_found_with_the_closest_names(client: gradwire.Client) -> None:
    with pytest.raises(errors.NotFound) as caught:
        client.get("conv1.wieght")
    error = caught.value
    assert isinstance(error, gradwire.RemoteError)
    assert error.code.name == "NOT_FOUND"
    assert error.reason == "UNKNOWN_TENSOR"
    assert error.metadata["name"] == "conv1.wieght"
    assert "conv1.weight" in error.metadata["closest"].split(",")
    assert str(error).startswith("NOT_FOUND: no tensor named 'conv1.wieght'")


def test_index_past_the_end_is_out_of_range(client: gradwire.Client) -> None:
    with pytest.raises(errors.OutOfRange) as caught:
        client.get("conv1.weight[16]")
    assert caught.value.reason == "INDEX_OUT_OF_RANGE"
    assert caught.value.metadata == {"index": "16", "dimension": "0", "size": "16"}


def test_too_many_indices_is_invalid_argument(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.get("linear.weight[0, 0, 0]")
    assert caught.value.reason == "TOO_MANY_INDICES"


def test_backward_before_forward_is_failed_precondition(client: gradwire.Client) -> None:
    with pytest.raises(errors.FailedPrecondition) as caught:
        client.backward()
    assert caught.value.reason == "NO_LOSS"
    assert "call Forward first" in caught.value.message


def test_backward_twice_is_failed_precondition(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    with pytest.raises(errors.FailedPrecondition) as caught:
        client.backward()
    assert caught.value.reason == "GRAPH_FREED"


def test_backward_with_retain_graph_can_run_twice(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward(retain_graph=True)
    once = client.get("conv1.weight.grad")
    client.backward()
    assert once is not None
    assert np.array_equal(client.get("conv1.weight.grad"), once + once)


def test_step_before_backward_is_failed_precondition(client: gradwire.Client) -> None:
    with pytest.raises(errors.FailedPrecondition) as caught:
        client.step()
    assert caught.value.reason == "NO_GRADIENTS"


def test_a_wrong_input_shape_is_invalid_argument(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.forward(Fill.ones(8, 3, 9, 9), ONES_TARGET)
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert caught.value.reason == "BAD_INPUT_SHAPE"


def test_a_target_class_out_of_range_is_invalid_argument(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.forward(Fill.ones(2, 3, 10, 10), np.array([0, 20]))
    assert caught.value.reason == "BAD_TARGET_CLASS"


def test_writing_the_output_is_invalid_argument(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set("output", 0.0)
    assert caught.value.reason == "READ_ONLY"


def test_writing_with_a_negative_step_is_invalid_argument(client: gradwire.Client) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set("conv1.weight[::-1]", 0.0)
    assert caught.value.reason == "NEGATIVE_STEP_WRITE"


def test_a_step_far_beyond_the_size_reads_what_numpy_reads(client: gradwire.Client) -> None:
    # torch would multiply such a step into a stride that overflows: INTERNAL, before the fix
    # (found by test_fuzz with a step near 2**58).
    weight = np.asarray(client.get("conv1.weight"))
    for text in ("[1::4611686018427387904]", "[:, ::-9223372036854775807]"):
        got = np.asarray(client.get(f"conv1.weight{text}"))
        np.testing.assert_array_equal(got, eval(f"weight{text}", {"weight": weight}))


def test_a_tensor_over_the_element_limit_is_resource_exhausted(client: gradwire.Client) -> None:
    with pytest.raises(errors.ResourceExhausted) as caught:
        client.forward(Fill.ones(1 << 22, 3, 10, 10), ONES_TARGET)
    assert caught.value.reason == "TOO_MANY_ELEMENTS"


def test_an_unreachable_server_is_unavailable() -> None:
    with (
        gradwire.connect(f"127.0.0.1:{free_port()}", timeout=2) as client,
        pytest.raises(errors.Unavailable) as caught,
    ):
        client.list_tensors()
    assert caught.value.code.name == "UNAVAILABLE"


def test_wait_ready_on_an_unreachable_server_is_unavailable() -> None:
    with (
        gradwire.connect(f"127.0.0.1:{free_port()}", timeout=2) as client,
        pytest.raises(errors.Unavailable),
    ):
        client.wait_ready(timeout=0.5)


def test_a_wait_ready_that_times_out_leaves_no_thread_polling() -> None:
    """gRPC's readiness future, left waiting past the timeout, kept a thread polling the
    channel five times a second, and connecting to the absent server, until the client
    closed, one more waiter for each wait_ready that timed out (found by a review of the
    client's API as a researcher uses it: a notebook waiting for its server to start)."""
    before = set(threading.enumerate())
    with gradwire.connect(f"127.0.0.1:{free_port()}", timeout=2) as client:
        for _ in range(2):
            with pytest.raises(errors.Unavailable):
                client.wait_ready(timeout=0.3)
        eventually(
            lambda: not [t for t in threading.enumerate() if t not in before],
            "a thread left polling the channel after wait_ready timed out",
            within=5,
        )


# --- the remote view --------------------------------------------------------------------------


def trained_client_and_model(client: gradwire.Client) -> Simple:
    """One Forward and Backward on the server and on a local model; returns the local model."""
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    model = local_model()
    local_step(model, *ones_batch())
    return model


def test_remote_gradient_slice_repr_is_torch_repr(client: gradwire.Client) -> None:
    model = trained_client_and_model(client)
    assert model.conv1.weight.grad is not None
    view = client.remote.conv1.weight.grad[0][0][0]
    assert repr(view) == repr(model.conv1.weight.grad[0][0][0])


def test_remote_gradient_slice_numpy_and_torch(client: gradwire.Client) -> None:
    model = trained_client_and_model(client)
    assert model.conv1.weight.grad is not None
    expected = model.conv1.weight.grad[0][0][0]
    view = client.remote.conv1.weight.grad[0][0][0]
    as_numpy = view.numpy()
    as_torch = view.torch()
    assert isinstance(as_numpy, np.ndarray)
    assert np.array_equal(as_numpy, expected.numpy())
    assert isinstance(as_torch, torch.Tensor)
    assert torch.equal(as_torch, expected)


def test_remote_slice_shape_and_selector(client: gradwire.Client) -> None:
    trained_client_and_model(client)
    view = client.remote.conv1.weight.grad[0][0][0]
    assert view.shape == (3,)
    assert view.selector == "conv1.weight.grad[0][0][0]"
    assert client.remote.conv1.weight[0, :, 1:3].shape == (3, 2, 3)


def test_remote_slice_set_writes_only_that_slice(client: gradwire.Client) -> None:
    trained_client_and_model(client)
    before = client.get("conv1.weight.grad")
    assert before is not None
    version = client.remote.conv1.weight.grad[0][0][0].set([1.0, 2.0, 3.0])
    expected = before.copy()
    expected[0][0][0] = [1.0, 2.0, 3.0]
    assert version == 3
    assert np.array_equal(client.get("conv1.weight.grad"), expected)


def test_remote_by_name(client: gradwire.Client) -> None:
    view = client.remote["conv1.weight"]
    assert np.array_equal(view.numpy(), weights(local_model(), "conv1.weight"))
    assert np.array_equal(view[1:3].numpy(), weights(local_model(), "conv1.weight")[1:3])


class _Named(nn.Module):
    """Modules named as PyTorch lets them be: by number, and by a key that is no identifier."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4))
        self.blocks = nn.ModuleDict({"in-proj": nn.Linear(4, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks["in-proj"](self.layers(x))


def test_modules_named_as_pytorch_names_them_are_read_and_written() -> None:
    """ "blocks.in-proj.weight" was refused by the client's selector, and
    remote.blocks["in-proj"] raised "an index must be an integer": a ModuleDict's parameters
    could not be read at all (found by the forty-fourth session's walkthrough as a
    researcher)."""
    from gradwire_server.app import start
    from gradwire_server.models import ModelSpec
    from gradwire_server.trainer import Trainer

    running = start(Trainer(ModelSpec("Named", _Named, (4,), 3), seed=0), "127.0.0.1", 0)
    torch.manual_seed(0)
    local = _Named()
    want = local.blocks["in-proj"].weight.detach().numpy()
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client:
        assert np.array_equal(client.get("blocks.in-proj.weight"), want)
        assert np.array_equal(client.get("blocks.in-proj.weight[1, :2]"), want[1, :2])
        assert np.array_equal(client.remote.blocks["in-proj"].weight[1].numpy(), want[1])
        bias = local.blocks["in-proj"].bias.detach().numpy()
        assert np.array_equal(client.remote["blocks.in-proj.bias"].numpy(), bias)
        client.set("blocks.in-proj.weight[0]", 2.0)
        stats = client.stats("blocks.in-proj.weight[0]").stats
        assert stats is not None and stats.min == stats.max == 2.0
        # an nn.Sequential served as the model: its layers by number, as model[0].weight
        assert client.remote[0].weight.selector == "0.weight"
        # and one inside the model, as model.layers[0].weight (it read [0] as an index into
        # a tensor "layers", and said to write remote.layers.weight[0])
        layer = client.remote.layers[0].weight
        assert layer.selector == "layers.0.weight"
        assert np.array_equal(layer[1].numpy(), local.layers[0].weight.detach().numpy()[1])
        assert client.remote.layers[-1].weight.selector == "layers.0.weight"  # from the end
        assert client.remote.layers[np.int64(0)].bias.selector == "layers.0.bias"
        with pytest.raises(AttributeError, match="attributes come before its index"):
            client.remote.layers[5].weight  # no such layer: an index after all  # noqa: B018
    running.stop(grace=None)


def _sequential() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_a_served_sequential_s_layers_count_from_the_end_too() -> None:
    """remote[-1], as model[-1] in PyTorch: it raised TypeError, "a selector is a str ...;
    got int -1", though remote[2] worked (found by a review of the client)."""
    from gradwire_server.app import start
    from gradwire_server.models import ModelSpec
    from gradwire_server.trainer import Trainer

    running = start(Trainer(ModelSpec("Layers", _sequential, (4,), 3), seed=0), "127.0.0.1", 0)
    torch.manual_seed(0)
    local = _sequential()
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client:
        assert np.array_equal(client.remote[-1].bias.numpy(), local[-1].bias.detach().numpy())
        assert client.remote[-1].weight.selector == "2.weight"
        assert client.remote[np.int64(-3)].weight.selector == "0.weight"
        assert client.remote[0].weight.selector == "0.weight"  # 0 counts from the start
        assert {"weight", "bias"} <= set(dir(client.remote[-1]))  # a layer's names
        with pytest.raises(TypeError):  # a bool is refused, not taken for layer 1
            client.remote[True]
        with pytest.raises(
            IndexError, match=r"remote\[-4\]: the served model has 3 numbered layers \(0 to 2\)$"
        ):
            client.remote[-4]
    running.stop(grace=None)


def test_a_negative_layer_of_a_model_with_none_is_refused(client: gradwire.Client) -> None:
    with pytest.raises(IndexError, match="has no numbered layers"):
        client.remote[-1]


class _Nested(nn.Module):
    """Numbered layers a lookup could confuse: a Sequential in a Sequential, two Sequentials
    whose names are of one length ("a" and "b"), and a ModuleDict's key that only begins with
    a digit."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
        self.b = nn.Sequential(nn.Linear(4, 3))
        self.c = nn.ModuleDict({"1st": nn.Linear(3, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c["1st"](self.b(self.a(x)))


def test_each_number_of_a_view_s_index_is_a_layer_of_the_module_before_it() -> None:
    """remote.a[1][0], as model.a[1][0] in PyTorch: the second number is a layer of a.1, not
    of a; b's layers are b's alone, though a's names read as b's past their first two
    characters; and where a number names no layer ("1st" is no number, b.0 has no layers,
    a slice is no layer's number) the view is an index, and an attribute after it refused."""
    with serving(ModelSpec("Nested", _Nested, (4,), 3), seed=0) as (_, client):
        remote = client.remote
        assert remote.a[1][0].weight.selector == "a.1.0.weight"
        np.testing.assert_array_equal(remote.a[1][-1].bias.numpy(), client.get("a.1.1.bias"))
        assert remote.b[-1].weight.selector == "b.0.weight"  # b has one layer, a two
        # None of c.weight, b.weight is a tensor: the refusal says so, where it said to
        # write remote.c.weight[0] (found by a review of the client's API).
        for view, moved in ((remote.c[0], "c"), (remote.b[0][-1], "b"), (remote.b[0:1], "b")):
            with pytest.raises(AttributeError, match=f"has no tensor '{moved}.weight'"):
                _ = view.weight


def test_an_attribute_written_after_an_index_points_to_the_view_that_takes_set() -> None:
    """`remote.a.weight[0].grad = x` pointed to remote.a.weight[0].grad.set(value), which
    reading refuses (a name's attributes come before its index): it points to
    remote.a.weight.grad[0].set(value). A layer's number is no index: `remote.a[0].weight = x`
    points to remote.a[0].weight.set(value), as written (a view that reads a.0.weight)."""
    with serving(ModelSpec("Nested", _Nested, (4,), 3), seed=0) as (_, client):
        remote = client.remote
        with pytest.raises(AttributeError) as info:
            remote.b.weight[0, 1:].grad = 1.0
        assert str(info.value) == (
            "remote.b.weight[0, 1:].grad = ...: a view is written with set(): "
            "remote.b.weight.grad[0, 1:].set(value)"
        )
        assert remote.b.weight.grad[0, 1:].selector == "b.weight.grad[0, 1:]"  # a view
        with pytest.raises(AttributeError) as info:
            remote.a[0].weight = 1.0
        assert str(info.value) == (
            "remote.a[0].weight = ...: a view is written with set(): remote.a[0].weight.set(value)"
        )
        assert remote.a[0].weight.selector == "a.0.weight"


def test_a_name_that_begins_with_an_underscore_is_no_view(client: gradwire.Client) -> None:
    """Such names are Python's and its tools' (IPython asks an object for _repr_html_): a
    view answered for them would read a tensor of that name when called."""
    for view in (client.remote, client.remote.conv1, client.remote.conv1.weight):
        assert not hasattr(view, "_repr_html_")


def test_np_asarray_of_a_remote_tensor(client: gradwire.Client) -> None:
    array = np.asarray(client.remote.conv1.weight)
    assert array.dtype == np.float32
    assert np.array_equal(array, weights(local_model(), "conv1.weight"))
    as_double = np.asarray(client.remote.linear.weight[0], dtype=np.float64)
    assert as_double.dtype == np.float64


def test_numpy_s_copy_argument_is_kept_by_a_remote_tensor(client: gradwire.Client) -> None:
    """It was ignored (found by the twenty-first session's review of the client)."""
    weight = client.remote.linear.weight  # a reply of 16 KiB or more: read-only values
    assert not np.asarray(weight).flags.writeable
    copied = np.array(weight, copy=True)
    assert copied.flags.writeable  # it was the reply's read-only view
    copied[0, 0] = 5.0
    np.testing.assert_array_equal(np.asarray(weight, copy=False), client.get("linear.weight"))
    with pytest.raises(ValueError, match="copy=False forbids"):
        np.asarray(weight, dtype=np.float64, copy=False)
    assert np.asarray(weight, dtype=np.float64).dtype == np.float64


def test_a_remote_tensor_iterates_and_has_a_length_as_torch_s_does(
    client: gradwire.Client,
) -> None:
    """Iterating one asked for w[0], w[1], ... for ever: it had __getitem__ and no
    __len__ or __iter__ (found by the nineteenth session's review)."""
    weight = client.remote.conv1.weight
    model = local_model()
    assert len(weight) == len(model.conv1.weight) == 16
    rows = list(weight)
    assert [r.selector for r in rows[:2]] == ["conv1.weight[0]", "conv1.weight[1]"]
    assert len(rows) == 16 and len(list(weight[3][1])) == 3
    expected = model.conv1.weight[3][1][2].detach().numpy()
    assert np.array_equal(list(weight[3][1])[2].numpy(), expected)
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d tensor"):
        len(weight[0][0][0][0])
    with pytest.raises(ValueError, match="absent"):
        len(client.remote.conv1.weight.grad)


def test_the_remote_model_is_not_iterated_for_ever(client: gradwire.Client) -> None:
    """`for x in client.remote`, `list(client.remote)` and `"conv1" in client.remote` went
    on making remote[0], remote[1], ... for ever (a list of them filling the memory): a
    model's __getitem__ takes a layer's number, any number, and Python iterates by it
    where there is no __iter__ (found by a review of the client's API as a researcher uses
    it). They raise TypeError, saying where the names are."""
    remote = client.remote
    said = r"client\.list_tensors\(\)\.names\(\).*dir\(client\.remote\)"
    with pytest.raises(TypeError, match=said):
        iter(remote)
    with pytest.raises(TypeError, match=said):
        "conv1" in remote  # noqa: B015
    assert "conv1" in dir(remote) and "conv1.weight" in client.list_tensors().names()


def test_remote_forward_tensors(client: gradwire.Client) -> None:
    client.forward(ONES_INPUT, ONES_TARGET)
    x, y = ones_batch()
    loss = nn.CrossEntropyLoss()(local_model()(x), y)
    assert np.array_equal(client.remote.loss.numpy(), loss.detach().numpy())
    assert client.remote.output.shape == (8, 20)


def test_repr_of_an_absent_gradient_is_none(client: gradwire.Client) -> None:
    view = client.remote.conv1.weight.grad
    assert repr(view) == "None"
    assert view.numpy() is None
    assert view.torch() is None
    assert view.shape is None


def test_np_asarray_of_an_absent_gradient_raises(client: gradwire.Client) -> None:
    with pytest.raises(ValueError, match=r"conv1\.weight\.grad is absent"):
        np.asarray(client.remote.conv1.weight.grad)


def test_dir_of_the_remote_model_lists_its_modules(client: gradwire.Client) -> None:
    names = dir(client.remote)
    assert {"conv1", "conv2", "linear"} <= set(names)
    assert names == sorted(names)
    assert len(names) == len(set(names))  # conv1 once, though it has a weight and a bias


def test_dir_of_a_remote_view_lists_the_names_under_it(client: gradwire.Client) -> None:
    """The module docstring says dir() asks for the tensors' names: it did for the model
    alone, so a notebook completed remote.<tab> with conv1 and remote.conv1.<tab> with no
    weight, remote.conv1.weight.<tab> with no grad (found by a review of the client's API as
    a researcher uses it). A view's own methods stay listed; an indexed one has no names."""
    remote = client.remote
    assert {"weight", "fetch", "numpy", "set", "shape"} <= set(dir(remote.conv1))
    assert {"grad", "delta", "torch"} <= set(dir(remote.conv1.weight))
    assert "weight" not in dir(remote.conv1.weight[0])  # attributes come before the index
    names = dir(remote.conv1.weight)
    assert names == sorted(set(names))


class _Counting(dict[str, Any]):
    """A client's RPC methods, noting each one that is looked up to be called."""

    def __init__(self, methods: dict[str, Any]) -> None:
        super().__init__(methods)
        self.called: list[str] = []

    def __getitem__(self, method: str) -> Any:
        self.called.append(method)
        return super().__getitem__(method)


def _counting(client: gradwire.Client) -> list[str]:
    """The RPCs `client` calls from now on, in order (every call goes through _methods), its
    server's instance read first, as its first call would (GetServerInfo)."""
    client.server_info()
    client._methods = counting = _Counting(client._methods)
    return counting.called


def test_the_remote_view_is_lazy(client: gradwire.Client) -> None:
    called = _counting(client)
    view = client.remote.conv1.wieght[0]  # building the view calls nothing
    assert called == []
    with pytest.raises(errors.NotFound):
        view.numpy()
    assert called == ["GetTensor"]


def test_the_remote_view_refuses_an_attribute_after_an_index(client: gradwire.Client) -> None:
    """It raised AttributeError("grad"), which said nothing of where the attribute goes
    (found by a review of the client)."""
    said = "conv1.weight[0].grad: a name's attributes come before its index; write "
    with pytest.raises(AttributeError, match=re.escape(said + "remote.conv1.weight.grad[0]")):
        _ = client.remote.conv1.weight[0].grad
    with pytest.raises(AttributeError, match=r"write remote\.conv1\.weight\.grad\[0, 1:3\]\[-1\]$"):
        _ = client.remote.conv1.weight[0, 1:3][-1].grad
    # A tensor's own attribute, or a name the server has not, is not sent on to a name that
    # is not there either: w[0].dtype said to write remote.conv1.weight.dtype[0], and
    # output[0].grad remote.output.grad[0] (found by a review of the client's API).
    for view, moved in (
        (lambda: client.remote.conv1.weight[0].dtype, "conv1.weight.dtype"),
        (lambda: client.remote.output[0, 1:3].grad, "output.grad"),
    ):
        with pytest.raises(AttributeError, match="has no tensor '" + re.escape(moved)) as raised:
            view()
        assert "write remote" not in str(raised.value) and ".fetch()" in str(raised.value)
    assert not hasattr(client.remote.conv1.weight[0], "__array_interface__")
    said = "conv1.weight[0]['x']: a name's parts come before its index; write "
    with pytest.raises(TypeError, match=re.escape(said + "remote['conv1.weight.x'] and index")):
        _ = client.remote.conv1.weight[0]["x"]


def test_the_remote_view_refuses_advanced_indexing_at_once(client: gradwire.Client) -> None:
    with pytest.raises(CodecError):
        _ = client.remote.conv1.weight[[0, 1]]  # type: ignore[index]


@pytest.mark.parametrize("call", ["set", "forward"])
def test_a_streamed_value_the_client_cannot_send_raises_codec_error(
    client: gradwire.Client, call: str
) -> None:
    """As a value sent whole does: gRPC draws a streamed upload's messages on a thread of its
    own, and answered the client's own error there as UNKNOWN, as if the server had failed
    (found by a review)."""
    client.stream_above_bytes = 0  # every value streams
    value = np.zeros((2, 3, 10, 10), np.complex64)
    before = client.list_tensors().version
    with pytest.raises(CodecError, match="complex64"):
        if call == "set":
            client.set("conv1.weight", value)
        else:
            client.forward(value)
    assert client.list_tensors().version == before  # nothing was sent


def test_a_fill_goes_whole_whatever_stream_above_bytes(client: gradwire.Client) -> None:
    """A Fill carries no values (the server makes them): it goes in one message even where
    every value streams, as a streamed upload has no Fill to carry."""
    fill, target = Fill.uniform(2, 3, 10, 10, seed=1), Fill.ones(2, dtype="int64")
    client.forward(fill, target)
    whole = client.get("output")
    client.stream_above_bytes = 0  # every value streams
    assert client.forward(fill, target).output_shape == (2, 20)
    assert np.array_equal(client.get("output"), whole)
    version = client.set("conv1.weight", Fill.constant(0.5, 16, 3, 3, 3))
    assert version == client.list_tensors().version
    assert np.array_equal(client.get("conv1.weight"), np.full((16, 3, 3, 3), 0.5, np.float32))


# --- found by a review: bad targets and half a TLS pair, refused before connecting -----------


@pytest.mark.parametrize(
    "target",
    ["localhost:0", "localhost:-1", "localhost:", "[::1]:70000", "dns:///localhost:70000",
     "dns:localhost:70000", "localhost:50051x", "[::1]:5005 1", "localhost:abc",
     "dns:///localhost:ssh", "localhost: 50051", "host:HTTP", "localhost:65536",
     # digits of another script: int() reads 50051, gRPC's resolver fails them
     "localhost:\uff15\uff10\uff10\uff15\uff11"],
)  # fmt: skip
def test_a_port_outside_1_to_65535_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match=r"bad port .* expected host:port with a port from 1 "):
        gradwire.connect(target)


@pytest.mark.parametrize(
    ("target", "said"),
    [("", "the target is empty"), ("  ", "the target is empty"),
     ("http://localhost:50051", "take no URL scheme"), ("grpc://host:7000", "take no URL scheme"),
     ("HTTPS://localhost:50051", "take no URL scheme"),
     # gRPC's resolver failed these UNAVAILABLE, exit 1, as if no server answered (found by a
     # review of the CLI as a researcher).
     (" localhost:50051", "bad target ' localhost:50051': white space around it"),
     ("localhost:50051\n", "white space around it"), ("localhost:abc", "bad port 'abc'"),
     (":50611", "no host before the port; give host:port, such as localhost:50611"),
     ("dns:///:7000", "no host before the port"),
     ("localhost:50611/x", "a path after host:port ('/x'); gRPC targets take none: give "
      "host:port, such as localhost:50611"), ("[::1]:50051/", "such as [::1]:50051"),
     ("dns:///localhost:50051/v1", "('/v1'); gRPC targets take none: give host:port, such as "
      "dns:///localhost:50051"), ("dns:localhost:50051/v1", "such as dns:localhost:50051"),
     ("passthrough:///localhost:50051/", "such as passthrough:///localhost:50051"),
     ("dns://8.8.8.8:53/gpu-box:7000/x", "such as dns://8.8.8.8:53/gpu-box:7000")],
)  # fmt: skip
def test_a_target_grpc_would_refuse_in_its_own_words_is_refused_in_ours(
    target: str, said: str
) -> None:
    """gRPC's resolver refused them saying nothing of what to write instead; the CLI
    answered exit 1, as for a server's error (found by a review of the CLI)."""
    with pytest.raises(ValueError, match=re.escape(said)):
        gradwire.connect(target)
    result = run_main("list", "--target", target)
    assert result.code == 2
    assert said in result.err


@pytest.mark.parametrize(
    ("target", "sent"),
    [("localhost", "localhost:50051"), ("::1", "[::1]:50051"), ("[::1]", "[::1]:50051"),
     ("host:7000", "host:7000"), ("[::1]:7000", "[::1]:7000"), ("dns:///host:7000", None),
     ("dns://8.8.8.8:53/host:7000", None), ("dns:host", None), ("dns:[::1]", None),
     ("dns:///2001:db8::1", None), ("host:http", None), ("dns:///host:https", None),
     ("unix:/run/gw.sock", None), ("ipv4:127.0.0.1:1,127.0.0.2:2", None),
     ("xds:///svc:8080", None), ("xds:svc", None), ("unix:/run/gw sock ", None),
     # a name of the scheme's own after its path, not host:port (refused: found by a review)
     ("xds:///svc:grpc", None), ("google-c2p:///svc:x", None), ("google-c2p:svc", None),
     ("localhost:65535", None), ("localhost:1", None)],
)  # fmt: skip
def test_every_target_form_grpc_takes_is_taken(target: str, sent: str | None) -> None:
    # The port check refused some (dns:host, named ports, a bare IPv6 address after dns:///),
    # found by a review of the check; a host alone still gets gradwire's port.
    assert with_default_port(target) == (sent or target)


def test_a_service_s_name_for_a_port_is_taken_with_grpc_s_native_resolver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its default resolver takes http and https alone, and "host:ssh" is refused; its
    native one reads the system's names (22 for ssh), and the check refused what it takes
    (a review of the check)."""
    with pytest.raises(ValueError, match="bad port 'ssh'"):
        with_default_port("localhost:ssh")
    monkeypatch.setenv("GRPC_DNS_RESOLVER", "native")
    assert with_default_port("localhost:ssh") == "localhost:ssh"
    monkeypatch.setenv("GRPC_DNS_RESOLVER", "NATIVE")  # gRPC reads its name in any case
    assert with_default_port("localhost:ssh") == "localhost:ssh"
    # a name's first character is a letter; its others need not be
    assert with_default_port("localhost:http-alt") == "localhost:http-alt"
    with pytest.raises(ValueError, match="bad port '0'"):
        with_default_port("localhost:0")


@pytest.mark.parametrize(
    ("target", "given"),
    [("localhost:50611/x", "localhost:50611"),
     ("dns://8.8.8.8:53/gpu-box:7000/v1/x", "dns://8.8.8.8:53/gpu-box:7000")],
)  # fmt: skip
def test_a_target_with_a_path_is_answered_with_the_target_without_it(
    target: str, given: str
) -> None:
    """The suggestion is the target with its path cut off, the path alone named."""
    path = target.removeprefix(given)
    with pytest.raises(ValueError) as raised:
        with_default_port(target)
    assert str(raised.value) == (
        f"bad target {target!r}: a path after host:port ({path!r}); gRPC targets take none: "
        f"give host:port, such as {given}"
    )


def test_a_port_past_65535_does_not_wrap_round_to_another_server(address: str) -> None:
    # gRPC took port P + 65536 for P: this client reached the fixture's server.
    port = int(address.rpartition(":")[2])
    with pytest.raises(ValueError, match=f"bad port '{port + 65536}'"):
        gradwire.Client(f"127.0.0.1:{port + 65536}")


@pytest.mark.parametrize(
    ("pair", "said"),
    [("cert=b'x'", "cert= was given without key="), ("key=b'x'", "key= was given without cert=")],
)
def test_half_a_client_certificate_pair_raises_value_error(pair: str, said: str) -> None:
    # gRPC's C core aborted the whole process (SIGABRT) on half a pair: run it in a child.
    code = (
        "import gradwire\n"
        "try:\n"
        f"    gradwire.connect('127.0.0.1:{free_port()}', ca=b'x', {pair})\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert said in done.stdout


def test_one_selector_given_as_a_string_is_one_selector(client: gradwire.Client) -> None:
    """A string is a Sequence[str], and was taken letter by letter: watch("loss") said
    "no tensor named 'l'" (found by the nineteenth session's review)."""
    client.forward(ONES_INPUT, ONES_TARGET)
    update = next(client.watch("loss", values=True))
    assert [watched.name for watched in update.tensors] == ["loss"]
    result = client.train_step(ONES_INPUT, ONES_TARGET, fetch="conv1.weight[0][0][0]")
    assert [read.name for read in result.fetched] == ["conv1.weight"]
    client.fill_parameters(0.25, "linear.weight")
    assert np.all(client.get("linear.weight") == 0.25)
    assert not np.all(client.get("conv1.weight") == 0.25)


def test_gradwire_s_own_conditions_are_gradwire_errors(client: gradwire.Client) -> None:
    """errors.GradwireError said it was the base of every error the package raises, but a
    bad selector or a tensor that cannot be sent was a ValueError alone."""
    with pytest.raises(errors.GradwireError, match="is not an integer"):
        client.get("conv1.weight[[0]]")
    with pytest.raises(errors.GradwireError, match="cannot send"):
        client.set("conv1.weight", np.array(["a"], dtype=object))
    with pytest.raises(ValueError):  # still ValueErrors too
        client.get("conv1.weight[[0]]")


def test_a_watch_update_is_indexed_by_the_selectors_it_was_asked_for(
    client: gradwire.Client,
) -> None:
    """update["conv1.weight[0,0]"] was a KeyError (a Watched kept the name alone), and two
    slices of one tensor could not be told apart (found by the nineteenth session's
    review)."""
    update = next(client.watch(["conv1.weight[0,0]", "conv1.weight[1, 0]"], values=True))
    first, second = client.get("conv1.weight[0, 0]"), client.get("conv1.weight[1, 0]")
    np.testing.assert_array_equal(update["conv1.weight[0, 0]"].value, first)
    np.testing.assert_array_equal(update["conv1.weight[1,0]"].value, second)
    assert [w.selector for w in update.tensors] == ["conv1.weight[0, 0]", "conv1.weight[1, 0]"]
    assert update["conv1.weight"] is update.tensors[0]  # by name: the first
    with pytest.raises(KeyError):
        update["conv1.weight[2, 0]"]


def test_a_watch_kept_in_a_variable_runs_on_after_a_break_until_closed(
    client: gradwire.Client,
) -> None:
    """As watch()'s docstring and the README say: its docstring said a `break` closed the
    watch, true only of a loop over client.watch(...) itself (found by a review of the
    client as a researcher uses it in a notebook)."""
    updates = client.watch(["loss"])
    for update in updates:
        first = update.version
        break
    version = client.zero_grad()
    assert next(updates).version == version > first  # still open
    updates.close()
    assert next(updates, None) is None


def test_a_watched_scalar_with_stats_alone_is_present(client: gradwire.Client) -> None:
    """A scalar's shape is (), sent as no dimensions at all: watched without its values,
    its statistics are what say it is there (the loss after a Forward, one element)."""
    client.forward(Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64"))
    loss, element = next(client.watch(["loss", "conv1.weight[0, 0, 0, 0]"])).tensors
    assert (loss.present, loss.full_shape, loss.value) == (True, (), None)
    assert (element.present, element.full_shape) == (True, (16, 3, 3, 3))
    assert loss.stats is not None and loss.stats.count == 1


def test_watch_and_train_refuse_bad_arguments_when_called(client: gradwire.Client) -> None:
    """They raised at the first next(), so a bad call went unnoticed until then, or for
    ever when never iterated (found by the nineteenth session's review)."""
    with pytest.raises(ValueError, match="at least one selector"):
        client.watch([])
    with pytest.raises(errors.GradwireError, match="is not an integer"):
        client.watch(["conv1.weight[[0]]"])
    with pytest.raises(errors.GradwireError, match="cannot send"):
        client.train(np.array(["a"], dtype=object), ONES_TARGET, 3)
    # Until a later review found these still raised at the first next(), by the server.
    top = "9223372036854775807"
    refused: list[tuple[Callable[[], object], str]] = [
        (lambda: client.watch("loss", every_steps=-1), r"every_steps .* \(every mutation\)"),
        (lambda: client.watch("loss", bins=-1), r"bins must be from 0 \(no histogram\) to 4096"),
        (lambda: client.watch("loss", bins=4097), "bins must be from 0 .* got 4097"),
        (lambda: client.watch("loss", min_interval=-1), "min_interval must be seconds, 0 or"),
        (lambda: client.watch("loss", min_interval=math.nan), "min_interval must be seconds"),
        (lambda: client.watch("loss", min_interval=math.inf), "min_interval must be .* finite"),
        (lambda: client.train(ONES_INPUT, ONES_TARGET, 0), "steps must be from 1 to 1099511627776"),
        (lambda: client.train(ONES_INPUT, ONES_TARGET, -1), "steps must be from 1 .* got -1"),
        (lambda: client.train(ONES_INPUT, ONES_TARGET, 2**40 + 1), "steps must be from 1"),
        (lambda: client.train(ONES_INPUT, ONES_TARGET, 3, every=-1), rf"every .* to {top}, got -1"),
        (lambda: client.train(ONES_INPUT, None, 3), "train needs a target: class indices"),
    ]  # fmt: skip
    for timeout in (0, -1, math.inf, math.nan, 1e10):  # the client's 60 s; or over at once
        refused.append((lambda t=timeout: client.watch("loss", timeout=t), "timeout must be"))
        refused.append(
            (lambda t=timeout: client.train(ONES_INPUT, ONES_TARGET, 3, timeout=t), "timeout")
        )
    for call, said in refused:
        with pytest.raises(ValueError, match=said):
            call()
    with pytest.raises(TypeError, match=r"steps must be a whole number, got 2\.5"):
        client.train(ONES_INPUT, ONES_TARGET, 2.5)  # type: ignore[arg-type]
    slow = client.watch("loss", min_interval=1e300, every_steps=2**63 - 1, bins=4096)
    assert next(slow).tensors[0].name == "loss"  # the ends of the ranges are taken
    slow.close()
    version = client.list_tensors().version
    run = client.train(ONES_INPUT, ONES_TARGET, 2)  # nothing is sent until it is iterated
    assert client.list_tensors().version == version
    with client.expecting(version + 99):
        stale = client.train(ONES_INPUT, ONES_TARGET, 2)  # the block's version, taken now
    with pytest.raises(errors.Aborted):
        next(stale)
    assert [p.step for p in run] == [1, 2]
    # every=0, the low end of its range: progress after every step, as every=1.
    assert [p.step for p in client.train(ONES_INPUT, ONES_TARGET, 2, every=0)] == [1, 2]


def test_a_watch_s_minimum_interval_goes_in_milliseconds_rounded_and_capped_at_int64() -> None:
    """What the Watch request carries of min_interval: the nearest millisecond (1.5 ms is 2,
    not 1), and int64's largest for an interval past it."""
    sent: list[pb.WatchRequest] = []

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        sent.append(pb.WatchRequest.FromString(request))
        yield pb.WatchUpdate(version=1).SerializeToString()

    older = old_trainer(Watch=grpc.unary_stream_rpc_method_handler(watch))
    with bare_server(older) as address, gradwire.connect(address, timeout=10) as client:
        for interval in (0.0015, 0.0026, 1e300):
            updates = client.watch("w", min_interval=interval, latest=False)
            assert next(updates).version == 1
            updates.close()
    assert [request.min_interval_ms for request in sent] == [2, 3, 2**63 - 1]


def test_a_shape_only_read_and_a_view_s_shape_and_length_ask_for_no_values() -> None:
    """read(values=False), shape(), and a view's shape, len() and iteration, read the shape
    alone: a large tensor's values never cross the wire for them."""
    asked: list[bool] = []
    with (
        bare_server(recording_reads(asked)) as address,
        gradwire.connect(address, timeout=10) as client,
    ):
        view = client.remote.w
        assert (view.shape, len(view), [row.selector for row in view]) == (
            (2, 3),
            2,
            ["w[0]", "w[1]"],
        )
        assert client.read("w", values=False).shape == (2, 3)
        client.read("w", 0, values=False)  # an index given apart: another way to the request
        assert client.shape("w") == (2, 3)
    assert asked == [True] * 6


def test_reads_of_one_selector_share_its_request_and_get_what_each_asks(
    client: gradwire.Client,
) -> None:
    """The serialized request is kept by the selector's text (unary._get_tensor_request):
    a shape-only read and a read of values, or a read with an index argument, still get
    what each asks for."""
    expected = local_model().conv1.weight.detach().numpy()
    shape_only = client.read("conv1.weight[1]", values=False)
    assert (shape_only.shape, shape_only.value) == ((3, 3, 3), None)
    np.testing.assert_array_equal(client.get("conv1.weight[1]"), expected[1])
    np.testing.assert_array_equal(client.get("conv1.weight[1]", (0, 2)), expected[1][0, 2])
    np.testing.assert_array_equal(client.get("conv1.weight[1]"), expected[1])
    client.set("conv1.weight[1]", 0.5)  # a new value, read through the kept request
    assert np.all(client.get("conv1.weight[1]") == 0.5)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "bool", "float16"])
@pytest.mark.parametrize("count", [1, 3, 16, 17, 40])
def test_small_reads_of_every_dtype_decode_exactly(dtype: str, count: int) -> None:
    """Values left in the parsed message (replies under 16 KiB) are read with np.fromiter up
    to codec.FROMITER_MAX values and through numpy's array protocol above: both exact."""
    values = (np.arange(count) % 7 - 3).astype(dtype)
    message = pb.Tensor.FromString(codec.encode_bytes(values))
    decoded = codec.decode(message)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == (count,)
    np.testing.assert_array_equal(decoded, values)


def test_expecting_blocks_of_two_clients_nest(client: gradwire.Client) -> None:
    """Each client's innermost block holds for its calls: entering a session's block inside
    the default client's dropped the outer one (found by the review of this session's
    changes)."""
    version = client.list_tensors().version
    with (
        client.open_session() as session,
        client.expecting(version + 100),
        session.expecting(0),  # entered inside the client's
    ):
        with pytest.raises(errors.Aborted):
            client.zero_grad()  # still its own block's version
        assert session.zero_grad() == 1
    assert client.list_tensors().version == version


def test_a_closed_session_client_set_to_no_session_acts_on_the_default_one(
    client: gradwire.Client,
) -> None:
    session = client.open_session()
    session.close()
    session.session = None  # asked for in so many words
    assert session.list_tensors().version == client.list_tensors().version


def test_the_remote_model_s_repr_names_its_client_without_a_call(
    client: gradwire.Client, address: str
) -> None:
    """`client.remote` in a notebook showed <gradwire.remote.RemoteModel object at 0x...>:
    neither the server nor where its names are (found by a review of the client as a
    researcher uses it in a notebook)."""
    called = _counting(client)
    assert repr(client.remote) == (
        f"<the model served to gradwire.Client({address!r}): dir() lists its names>"
    )
    assert called == []


def test_a_remote_view_is_true_without_a_read(client: gradwire.Client) -> None:
    """bool() of a view would call __len__ (a read of the shape, raising for an absent
    tensor or a module's name): a view is true, as any object."""
    called = _counting(client)
    assert client.remote.loss and client.remote.conv1 and client.remote.conv1.weight[0][0][0]
    assert called == []


def test_a_watch_update_given_a_key_of_another_type_raises_key_error(
    client: gradwire.Client,
) -> None:
    update = next(client.watch("conv1.weight[0][0][0]"))
    with pytest.raises(KeyError):
        update[0]  # type: ignore[index]


def test_a_watch_update_s_key_error_says_what_the_update_holds(client: gradwire.Client) -> None:
    """update["conv1.weight"] of a watch of its gradient raised KeyError('conv1.weight')
    alone, and update[0] KeyError(0): in a notebook nothing said what to ask for (found by a
    review of the client as a researcher uses it in a notebook)."""
    update = next(client.watch(["conv1.weight.grad[0]", "loss"]))
    with pytest.raises(KeyError) as missing:
        update["conv1.weight"]
    assert missing.value.args == (
        "'conv1.weight' was not watched: this update holds conv1.weight.grad[0] and loss "
        "(by selector, or by a tensor's name)",
    )
    with pytest.raises(KeyError) as by_position:
        update[0]  # type: ignore[index]
    assert by_position.value.args == (
        "0: an update holds conv1.weight.grad[0] and loss, by selector (or by a tensor's "
        "name); update.tensors[0] is the first watched",
    )


def test_nesterov_takes_numpy_s_bool(client: gradwire.Client) -> None:
    config = client.set_optimizer(lr=0.1, momentum=0.9, nesterov=np.bool_(True))
    assert config.nesterov is True
    client.set_optimizer()


def test_optimizer_settings_take_numpy_s_numbers(client: gradwire.Client) -> None:
    """A numpy integer or float32 (no Python float) is a number as the settings read it."""
    config = client.set_optimizer(lr=np.int64(1), momentum=np.float32(0.5))
    assert (config.lr, config.momentum) == (1.0, 0.5)
    client.set_optimizer()


def test_an_error_says_whether_its_call_changes_state() -> None:
    """So that a caller, the CLI's hints among them, knows a failed change may have been
    applied, where a failed read changed nothing. Against a server that never answers: a
    timeout of a nanosecond let a quick Step through to a real one, once."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes the handshakes; nothing ever answers
        with gradwire.Client(f"127.0.0.1:{mute.getsockname()[1]}", timeout=0.2) as client:
            client._instance = ""  # as known: the first call is the Step itself, sent
            with pytest.raises(errors.DeadlineExceeded) as change:
                client.step()
            with pytest.raises(errors.DeadlineExceeded) as read:
                client.get("conv1.weight[0][0][0]")
            with pytest.raises(errors.DeadlineExceeded) as save:
                client.save_checkpoint("epoch1")
            with pytest.raises(errors.DeadlineExceeded) as delete:
                client.delete_checkpoint("epoch1")
    assert change.value.changes_state and not read.value.changes_state
    assert not errors.NotFound("made here").changes_state
    # The time the call had, and for a change what to do: gRPC's two words alone left a
    # notebook's researcher with nothing to find timeout= by (a review of the client in a
    # notebook).
    assert change.value.message == (
        "Deadline Exceeded: no answer within 0.2 s, the call's timeout: its change may have "
        "been applied all the same (read the state version before making it again)"
    )
    assert read.value.message == "Deadline Exceeded: no answer within 0.2 s, the call's timeout"
    # A checkpoint's call is on the server's files: the state version cannot show whether it
    # landed (found by a review of restarts and recovery).
    assert save.value.message.endswith(
        "the call's timeout: the checkpoint may have been written all the same: "
        "list_checkpoints() shows whether (saving again replaces it)"
    )
    assert delete.value.message.endswith(
        "the checkpoint may have been removed all the same: list_checkpoints() shows whether"
    )


def test_a_timeout_that_ran_out_with_the_answer_under_way_says_so(server: Running) -> None:
    """gRPC says "Stream removed (Deadline Exceeded)" where the time ran out with the call's
    bytes still crossing the network: a read of a large tensor over a slow link. Nothing
    said which timeout it was, nor what to do (found by a review of a researcher on a slow,
    distant link: a 16 MiB read takes 13 s at 10 Mbit/s)."""
    with relay_to(server.port) as relay, gradwire.connect(relay.address, timeout=30) as client:
        client.get("linear.weight[0, 0]")  # connected at full speed
        relay.slow(4_000)  # linear.weight's 256 KB take a minute
        client.timeout = 0.5
        with pytest.raises(errors.DeadlineExceeded) as read:
            client.get("linear.weight")
    assert read.value.message == (
        "Deadline Exceeded: the call's timeout of 0.5 s ran out with its messages still "
        "crossing the network: a large value over a slow link needs a longer timeout "
        "(timeout= in gradwire.connect, or client.timeout) (gRPC: 'Stream removed "
        "(Deadline Exceeded)')"
    )
    assert not read.value.changes_state


def test_progress_over_a_slow_link_comes_as_the_bytes_do(server: Running) -> None:
    """Over a slow link a large read was silence until its last byte (a 64 MiB read: a minute
    at 10 Mbit/s), a hung server and a slow one alike (same review): `progress` is told of
    each chunk as it comes, the first long before the last, and the value is the same."""
    with relay_to(server.port) as relay, gradwire.connect(relay.address, timeout=30) as client:
        client.get("linear.weight[0, 0]")  # connected at full speed
        client.chunk_bytes = 32_000
        relay.slow(200_000)  # linear.weight's 256 KB take 1.3 s
        started = time.perf_counter()
        calls: list[tuple[float, int, int]] = []
        value = client.get(
            "linear.weight",
            progress=lambda d, t: calls.append((time.perf_counter() - started, d, t)),
        )
    np.testing.assert_array_equal(value, server.servicer.trainer.read("linear.weight").value)
    assert [(d, t) for _, d, t in calls] == [(32_000 * i, 256_000) for i in range(1, 9)]
    assert calls[0][0] < calls[-1][0] / 3, calls  # the first chunk long before the last
    assert calls[-1][0] > 0.8  # the link was slow


def test_a_change_whose_answer_was_under_way_at_its_timeout_may_have_been_applied(
    server: Running,
) -> None:
    """A TrainStep fetching a large tensor over a slow link, its timeout running out as the
    answer crosses: the step ran, so the error says its change may have been applied, as
    that of a change the server had not answered in time says."""
    with relay_to(server.port) as relay, gradwire.connect(relay.address, timeout=30) as client:
        client.get("linear.weight[0, 0]")  # connected at full speed
        relay.slow(4_000)  # linear.weight's 256 KB take a minute
        client.timeout = 3  # the step takes milliseconds: its answer is crossing by then
        with pytest.raises(errors.DeadlineExceeded) as step:
            client.train_step(ONES_INPUT, ONES_TARGET, fetch=["linear.weight"])
    assert step.value.message == (
        "Deadline Exceeded: the call's timeout of 3 s ran out with its messages still "
        "crossing the network: a large value over a slow link needs a longer timeout "
        "(timeout= in gradwire.connect, or client.timeout): its change may have been applied "
        "all the same (read the state version before making it again) (gRPC: 'Stream "
        "removed (Deadline Exceeded)')"
    )
    assert step.value.args == (step.value.message,)  # repr() says it too
    assert step.value.changes_state


def test_a_streamed_read_past_its_timeout_says_which_timeout(server: Running) -> None:
    """A read past one message (64 MiB: 54 s at 10 Mbit/s) streams in chunks, all within
    the client's timeout; past it the read said gRPC's words alone, where a read in one
    message named the timeout (same review). Here a small tensor in small chunks."""
    request = pb.GetTensorRequest(name="linear.weight", chunk_bytes=16_000)
    with relay_to(server.port) as relay, gradwire.connect(relay.address, timeout=30) as client:
        client.get("linear.weight[0, 0]")  # connected at full speed
        relay.slow(4_000)  # linear.weight's 256 KB take a minute
        client.timeout = 0.5
        with pytest.raises(errors.DeadlineExceeded) as read:
            client._read_stream(request, as_torch=False)
    assert read.value.message.startswith(
        "Deadline Exceeded: the call's timeout of 0.5 s ran out with its messages still "
        "crossing the network: a large value over a slow link needs a longer timeout "
        "(timeout= in gradwire.connect, or client.timeout)"
    )


# --- found by a review of the client: wrong input refused in words that say what to give ------


@pytest.mark.parametrize("streamed", [False, True])
def test_a_torch_tensor_without_values_to_send_is_refused_saying_why(
    client: gradwire.Client, streamed: bool
) -> None:
    """A meta tensor raised torch's NotImplementedError ("Cannot copy out of meta tensor"),
    a sparse one a RuntimeError from the client's own size check."""
    if streamed:
        client.stream_above_bytes = 0
    before = client.list_tensors().version
    target = torch.ones(4, dtype=torch.int64)
    with pytest.raises(CodecError, match="on the meta device: it has a shape but no values"):
        client.forward(torch.empty(4, 3, 10, 10, device="meta"), target)
    with pytest.raises(CodecError, match="meta device"):
        client.set("conv1.weight", torch.empty(16, 3, 3, 3, device="meta"))
    sparse = torch.ones(4, 3, 10, 10).to_sparse()
    with pytest.raises(CodecError, match=r"sparse_coo tensor: .* with \.to_dense\(\)"):
        client.forward(sparse, target)
    with pytest.raises(CodecError, match=r"with \.to_dense\(\)"):
        client.set("conv1.weight", torch.ones(16, 3, 3, 3).to_sparse())
    assert client.list_tensors().version == before


@pytest.mark.parametrize("streamed", [False, True])
def test_a_lazily_negated_torch_tensor_is_sent_with_its_values(
    client: gradwire.Client, streamed: bool
) -> None:
    """x.conj().imag has its negative bit set, and numpy() refuses it: the client raised
    torch's RuntimeError ("Can't call numpy() on Tensor that has negative bit set")."""
    if streamed:
        client.stream_above_bytes = 0
    generator = torch.Generator().manual_seed(0)
    negated = torch.randn(4, 3, 10, 10, dtype=torch.complex64, generator=generator).conj().imag
    assert negated.is_neg()
    target = torch.ones(4, dtype=torch.int64)
    sent = client.forward(negated, target)
    np.testing.assert_array_equal(client.get("input"), negated.resolve_neg().numpy())
    assert client.forward(negated.resolve_neg(), target).loss == sent.loss
    weight = torch.randn(16, 3, 3, 3, dtype=torch.complex64, generator=generator).conj().imag
    client.set("conv1.weight", weight)
    np.testing.assert_array_equal(client.get("conv1.weight"), weight.resolve_neg().numpy())
    half = torch._neg_view(torch.full((16, 3, 3, 3), 0.5, dtype=torch.bfloat16))
    client.set("conv1.weight", half)
    assert np.all(client.get("conv1.weight") == -0.5)


def test_a_selector_that_is_not_a_str_is_refused_saying_what_one_is(
    client: gradwire.Client,
) -> None:
    """get(123) raised "'int' object has no attribute 'strip'"; get(["loss"]) "unhashable
    type: 'list'"."""
    said = r"a selector is a str .* such as 'conv1.weight\[0\]' or 'loss'; got int 123"
    calls: list[Callable[[], object]] = [
        lambda: client.get(123),  # type: ignore[arg-type]
        lambda: client.read(123, 0),  # type: ignore[arg-type]
        lambda: client.set(123, 0.5),  # type: ignore[arg-type]
        lambda: client.stats(123),  # type: ignore[arg-type]
        lambda: client.watch([123]),  # type: ignore[list-item]
    ]
    for call in calls:
        with pytest.raises(TypeError, match=said):
            call()
    with pytest.raises(TypeError, match=r"got list \['loss'\]"):
        client.get(["loss"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "selector", ["linear.weight[99999999999999999999]", "linear.weight[-9223372036854775809]"]
)
def test_an_integer_index_past_int64_is_a_selector_error_naming_the_range(
    client: gradwire.Client, selector: str
) -> None:
    """protobuf raised its own ValueError, "Value out of range: 99999999999999999999"."""
    number = re.search(r"-?[0-9]{19,}", selector)
    assert number is not None
    said = rf"index {number[0]} is outside .* -9223372036854775808 to 9223372036854775807"
    with pytest.raises(SelectorError, match=said):
        client.get(selector)
    with pytest.raises(SelectorError, match=said):
        client.set(selector, 0.0)
    with pytest.raises(CodecError, match="outside int64's range"):
        client.get("linear.weight", 2**63)
    np.testing.assert_array_equal(  # the ends of the range are indices as any others
        client.get("linear.weight[0][-9223372036854775808:9223372036854775807]"),
        client.get("linear.weight[0]"),
    )


@pytest.mark.parametrize(
    "index",
    [np.s_[0, :99999999999999999999], np.s_[0, ::-99999999999999999999],
     np.s_[1, -(2**64) :], np.s_[1, 3 : 2**70 : 2**65], np.s_[:, -(2**80) : 2**80 : 3]],
)  # fmt: skip
def test_slice_bounds_past_int64_are_clipped_as_numpy_clips_them(
    client: gradwire.Client, index: Any
) -> None:
    """They were refused, "outside the range of an index", where numpy reads them (no
    dimension is that long, so a bound past int64 means what int64's end means)."""
    local = client.get("linear.weight")
    np.testing.assert_array_equal(client.get("linear.weight", index), local[index])
    text = "linear.weight" + "".join(f"[{_typed(item)}]" for item in index)
    np.testing.assert_array_equal(client.get(text), local[index[0]][index[1]])
    np.testing.assert_array_equal(client.remote.linear.weight[index].numpy(), local[index])


def _typed(item: Any) -> str:
    """One item of a numpy index as a selector's text has it."""
    if isinstance(item, slice):
        parts = ["" if p is None else str(p) for p in (item.start, item.stop, item.step)]
        return ":".join(parts)
    return str(item)


def test_a_seed_outside_uint64_is_refused_naming_it_and_the_range(
    client: gradwire.Client,
) -> None:
    """reset(seed=-1), open_session(seed=-1) and Fill.normal(..., seed=-1) raised protobuf's
    ValueError, "Value out of range: -1"; a float seed its TypeError."""
    said = r"seed must be from 0 to 18446744073709551615, got "
    before = client.list_tensors().version
    calls: list[Callable[[int], object]] = [
        lambda seed: client.reset(seed=seed),
        lambda seed: client.open_session(seed=seed),
        lambda seed: Fill.normal(8, 3, 10, 10, seed=seed),
        lambda seed: Fill.uniform(8, 3, 10, 10, seed=seed),
        lambda seed: Fill.randint(0, 20, 8, seed=seed),
    ]
    for call in calls:
        for seed in (-1, 2**64):
            with pytest.raises(ValueError, match=said + str(seed)):
                call(seed)
        with pytest.raises(TypeError, match=r"seed must be a whole number, got 1\.5"):
            call(1.5)  # type: ignore[arg-type]
    assert client.list_tensors().version == before
    assert client.reset(seed=np.uint64(2**64 - 1)) == before + 1  # type: ignore[arg-type]
    client.forward(Fill.normal(8, 3, 10, 10, seed=2**64 - 1), ONES_TARGET)
    numpy_seeded = Fill.uniform(2, seed=np.uint64(2**64 - 1))  # type: ignore[arg-type]
    assert type(numpy_seeded.seed) is int  # a numpy one overflowed in reseeded()
    assert numpy_seeded.reseeded(1).seed == 0
    assert Fill.uniform(2, seed=2**63).reseeded(5).seed == 2**63 + 5  # wraps at 2**64 alone


def test_on_the_cpu_a_seed_counts_its_low_32_bits_as_the_contract_says(
    client: gradwire.Client,
) -> None:
    """trainer.proto's Fill.seed and ResetRequest.seed: PyTorch's CPU generator keeps a
    seed's low 32 bits, so seeds that differ only above bit 31 give the same fill and the
    same model (found by a review of the contract from another language's side). Should a
    torch keep all 64, this fails and the contract's words go stale."""
    inputs = []
    for seed in (5, 2**32 + 5, (7 << 40) | 5, 6):
        client.forward(Fill.normal(8, 3, 10, 10, seed=seed), ONES_TARGET)
        inputs.append(client.get("input"))
    assert all(np.array_equal(inputs[0], other) for other in inputs[1:3])
    assert not np.array_equal(inputs[0], inputs[3])
    models = []
    for seed in (5, 2**32 + 5, 6):
        client.reset(seed)
        models.append(client.get("conv1.weight"))
    assert np.array_equal(models[0], models[1]) and not np.array_equal(models[0], models[2])


def test_a_fill_takes_its_shape_as_one_tuple_as_torch_does(client: gradwire.Client) -> None:
    """Fill.ones((8, 3, 10, 10)), as torch.ones takes it, raised protobuf's TypeError from
    inside to_proto ("'tuple' object cannot be interpreted as an integer"), when it was
    sent."""
    shape = (8, 3, 10, 10)
    made = [
        (Fill.ones(shape), Fill.ones(*shape)),
        (Fill.zeros(list(shape)), Fill.zeros(*shape)),
        (Fill.constant(0.5, torch.Size(shape)), Fill.constant(0.5, *shape)),
        (Fill.uniform(shape, low=-1.0, seed=3), Fill.uniform(*shape, low=-1.0, seed=3)),
        (Fill.normal(shape, std=2.0, seed=3), Fill.normal(*shape, std=2.0, seed=3)),
        (Fill.randint(0, 5, np.zeros(shape).shape, seed=3), Fill.randint(0, 5, *shape, seed=3)),
    ]
    for as_one, one_by_one in made:
        assert as_one == one_by_one and as_one.shape == shape
        client.forward(as_one, ONES_TARGET)
        sent = client.get("input")
        client.forward(one_by_one, ONES_TARGET)
        np.testing.assert_array_equal(client.get("input"), sent)
    assert Fill.ones(np.int64(8), 3).shape == (8, 3)
    # Any sequence, as the constructors are typed (a range was refused).
    assert Fill.ones(range(8, 10)).shape == Fill.zeros(np.zeros((8, 9)).shape).shape == (8, 9)
    for bad in [((8, 3), 10), (8.0, 3), (True, 3), ("83",)]:
        with pytest.raises(TypeError, match="a Fill's shape is whole numbers"):
            Fill.ones(*bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refusal_of_a_widened_dtype_names_the_dtype_given(
    client: gradwire.Client, streamed: bool
) -> None:
    """forward(x.astype(np.int8), y) was refused with "input has dtype int32": the client
    widens int8 (uint8, int16, uint16) to int32, the wire having no smaller integer, and
    the server named a dtype the caller never sent."""
    if streamed:
        client.stream_above_bytes = 0
    x = np.ones((8, 3, 10, 10), np.float32)
    y = np.ones(8, np.int64)
    said = r"input has dtype int32; .* \(input was given as int8, sent as int32: the wire has no"
    with pytest.raises(errors.InvalidArgument, match=said) as widened:
        client.forward(x.astype(np.int8), y)
    assert widened.value.args == (widened.value.message,)  # repr() says it too
    with pytest.raises(errors.InvalidArgument, match="input was given as int8, sent as int32"):
        client.forward(torch.ones(8, 3, 10, 10, dtype=torch.int8), y)
    with pytest.raises(errors.InvalidArgument, match="input was given as uint16, sent as int32"):
        client.train_step(x.astype(np.uint16), y)
    with pytest.raises(errors.InvalidArgument, match="input was given as int16, sent as int32"):
        next(client.train(x.astype(np.int16), y, 2))
    with pytest.raises(errors.InvalidArgument) as plain:  # nothing widened: nothing added
        client.forward(x.astype(np.int32), y)
    assert "given as" not in str(plain.value)
    assert plain.value.message.endswith("computes in float32")  # not even an empty " ()"
    with pytest.raises(errors.InvalidArgument) as other:  # widened, refused for another reason
        client.forward(x[:, :2], y.astype(np.uint8))
    assert "given as" not in str(other.value)
    assert other.value.message.endswith("with N >= 1")
    assert client.forward(x, y.astype(np.uint8)).loss == client.forward(x, y).loss  # taken


def test_a_watch_or_a_train_past_its_timeout_raises_deadline_exceeded(
    client: gradwire.Client,
) -> None:
    """As their docstrings now say: they read as if the stream ended cleanly at the
    timeout (found by a review of the client)."""
    # Read to the end, however far the deadline lets each get: nothing changes after the
    # watch's first update, and the run asks for far more steps than the time allows.
    with pytest.raises(errors.DeadlineExceeded) as watched:
        for _ in client.watch("loss", timeout=0.5):
            pass
    with pytest.raises(errors.DeadlineExceeded) as caught:
        for _ in client.train(ONES_INPUT, ONES_TARGET, 10**9, every=10**9, timeout=0.5):
            pass
    assert caught.value.changes_state  # the steps taken, if any, stay applied
    # Each timeout is the caller's own end, not one that ran out on them: not named as "the
    # call's timeout" to raise, as a read past the client's timeout is.
    for said in (watched.value.message, caught.value.message):
        assert "timeout" not in said, said


def test_expecting_takes_a_numpy_integer(client: gradwire.Client) -> None:
    """It did at run time, but its hint said int alone, and mypy refused np.int64."""
    version = np.int64(client.list_tensors().version)
    with client.expecting(version):
        client.zero_grad()
    with client.expecting(version), pytest.raises(errors.Aborted):
        client.zero_grad()  # the version has moved on


def test_numpy_s_true_and_false_are_flags(client: gradwire.Client) -> None:
    """A flag takes numpy's bools as Python's (np.all(...) makes one), as it refuses what is
    neither: set_to_none=np.False_ keeps the gradients, zeroed, as torch's zero_grad does."""
    client.forward(ONES_INPUT, Fill.randint(0, 20, 8))
    client.backward(retain_graph=np.True_)
    client.zero_grad(set_to_none=np.False_)
    grad = client.get("conv1.weight.grad")
    assert grad is not None and grad.shape == (16, 3, 3, 3) and not grad.any()
    assert client.read("loss", values=np.bool_(False)).value is None


def test_a_whole_tensor_written_is_the_tensor_not_a_slice_of_it(client: gradwire.Client) -> None:
    """set() without an index sends none: the server writes the whole tensor (a parameter's
    may be adopted as it is), and a value that does not fit is refused naming the tensor,
    not a slice of it (an index of [None] was a slice of shape [1, 16, 3, 3, 3])."""
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set("conv1.weight", np.zeros((16, 3, 3, 4), np.float32))
    assert caught.value.message.startswith(
        "a value of shape [16, 3, 3, 4] cannot be written to conv1.weight of shape [16, 3, 3, 3]"
    )
    value = np.full((16, 3, 3, 3), 0.5, np.float32)
    client.set("conv1.weight", value)
    np.testing.assert_array_equal(client.get("conv1.weight"), value)


# --- arguments refused before anything is sent (found by a review of the client's API) ---

_X, _Y = ONES_INPUT, Fill.randint(0, 20, 8)

# Each: a call with a bad argument, the error, and words of its message. Before the review,
# zero_grad=None sent False (the gradients accumulated, unasked), None filled weights with
# 0.0, a timeout of 0 failed some calls and not others, chunk_bytes=0 sent a streamed
# tensor one value to a message, and the rest raised errors from protobuf, numpy, torch or
# Python's parser that named no argument.
BAD_ARGUMENTS: list[tuple[Callable[[gradwire.Client], Any], type[Exception], str]] = [
    (lambda c: c.train_step(_X, _Y, zero_grad=None), TypeError, "zero_grad must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.train_step(_X, None), ValueError, "train_step needs a target"),
    (lambda c: c.train(_X, _Y, 2, zero_grad="no"), TypeError, "zero_grad must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.backward(retain_graph="yes"), TypeError, "retain_graph must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.zero_grad(set_to_none=0), TypeError, "set_to_none must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.read("loss", values="no"), TypeError, "values must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.read("loss", as_torch=1), TypeError, "as_torch must be True or False"),  # type: ignore[arg-type]
    (
        lambda c: c.read("conv1.weight", values=False, out=np.zeros((16, 3, 3, 3), np.float32)),
        ValueError,
        "values=False reads none",
    ),
    (
        lambda c: c.read("conv1.weight", as_torch=True, out=np.zeros((16, 3, 3, 3), np.float32)),
        ValueError,
        "out= reads into a numpy array; it cannot go with as_torch",
    ),
    (lambda c: c.save_checkpoint(5), TypeError, "a checkpoint's name must be a string, got 5"),  # type: ignore[arg-type]
    (lambda c: c.load_checkpoint(b"x"), TypeError, "a checkpoint's name must be a string"),  # type: ignore[arg-type]
    (lambda c: setattr(c, "session", 7), TypeError, "session must be a str, got int"),
    (lambda c: c.watch("loss", latest="no"), TypeError, "latest must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.watch(iter([])), ValueError, "watch needs at least one selector"),
    # A view given for a selector was refused with its repr, which read its values from the
    # server (a whole weight, to print in an error) and named no way out (found by a review
    # of the client's API as a researcher uses it).
    (
        lambda c: c.get(c.remote.conv1.weight[0]),
        TypeError,
        r"got a remote view: give its selector, 'conv1\.weight\[0\]' \(view\.selector\)",
    ),
    (lambda c: c.watch([c.remote.linear.weight]), TypeError, "got a remote view"),
    # A watch of neither sent the statistics stats=False asked to leave out, and bins
    # without them were dropped without a word, where `gradwire watch --values --bins 4` is
    # refused (found by a review of the client's API as a researcher uses it).
    (lambda c: c.watch("loss", stats=False), ValueError, "stats=False needs values=True"),
    (
        lambda c: c.watch("loss", values=True, stats=False, bins=4),
        ValueError,
        "bins draws histograms in the statistics, which stats=False leaves out",
    ),
    (lambda c: c.pipeline(stop_at_error="no"), TypeError, "stop_at_error must be True or False"),  # type: ignore[arg-type]
    (lambda c: c.fill_parameters(None), TypeError, "value must be a number, got None"),  # type: ignore[arg-type]
    (lambda c: c.fill_parameters(True), TypeError, "value must be a number, got True"),
    (lambda c: c.fill_parameters("0.1"), TypeError, "value must be a number"),  # type: ignore[arg-type]
    (lambda c: c.fill_parameters(0.1, None), TypeError, "a selector is a str"),  # type: ignore[arg-type]
    (lambda c: c.fill_parameters(0.1, [1]), TypeError, "a selector is a str .* got int 1"),  # type: ignore[list-item]
    (lambda c: c.set_optimizer(lr=10**400), ValueError, "lr is past the range of a double"),
    (lambda c: c.stats("conv1.weight", bins=True), TypeError, "bins must be a whole number"),
    (lambda c: c.stats("conv1.weight", bins=2**40), ValueError, "bins must be from"),
    # The server's refusals named its own fields (histogram_bins, histogram_low).
    (
        lambda c: c.stats("loss", bins=-1),
        ValueError,
        r"bins must be from 0 \(no histogram\) to 4096",
    ),
    (lambda c: c.stats("loss", bins=4097), ValueError, "bins must be from 0 .* got 4097"),
    (lambda c: c.stats("loss", bins=4, low=1.0, high=1.0), ValueError, "low must be below high"),
    (lambda c: c.stats("loss", bins=4, low=math.nan), ValueError, "low must be a finite number"),
    (lambda c: c.stats("loss", bins=4, high=-math.inf), ValueError, "high must be a finite"),
    (lambda c: c.stats("conv1.weight", low=0.0, high=1.0), ValueError, "give bins too"),
    (lambda c: c.stats("conv1.weight", high=1.0), ValueError, "give bins too"),  # one bound
    (lambda c: c.stats("conv1.weight", bins=4, low="0"), TypeError, "low must be a number"),  # type: ignore[arg-type]
    (lambda c: c.forward(None), codec.CodecError, "input: got None"),
    (lambda c: c.forward(_X, "abc"), codec.CodecError, "target: cannot send an array of dtype <U3"),
    (
        lambda c: c.set("conv1.weight[0,0,0,0]", 2**64),
        codec.CodecError,
        r"value: cannot send an array of dtype object \(numpy made one of this int",
    ),
    (lambda c: c.forward([[1.0, 2.0], [3.0]]), codec.CodecError, "input: cannot make an array"),
    (
        lambda c: c.read("conv1.weight", slice(None, None, 0)),
        codec.CodecError,
        "slice step cannot be zero",
    ),
    (lambda c: c.read("conv1.weight", (..., ...)), codec.CodecError, "a single ellipsis"),
    (
        lambda c: c.get("conv1.weight[" + "-" * 1000 + "1]"),
        errors.GradwireError,
        "nested too deeply",
    ),
    (
        lambda c: c.get("conv1.weight" + "[0]" * 400),
        errors.GradwireError,
        "a selector of 1,212 characters; at most 1,024",
    ),
    (lambda c: c.wait_ready(-1), ValueError, "wait_ready.s timeout must be more than 0"),
    (lambda c: c.health(5), TypeError, "service is a str"),  # type: ignore[arg-type]
    (lambda c: c.remote[1.5], TypeError, "a selector is a str"),  # type: ignore[index]
    (lambda c: c.remote.conv1[0]["weight"], TypeError, "a name's parts come before its index"),
    (
        lambda c: setattr(c.remote.conv1, "weight", 1.0),
        AttributeError,
        r"a view is written with set\(\): remote.conv1.weight.set\(value\)",
    ),
    (
        lambda c: setattr(c.remote, "conv1", 1.0),
        AttributeError,
        r"^remote\.conv1 = \.\.\.: a view is written with set\(\): remote\.conv1\.set\(value\)$",
    ),
    (lambda c: setattr(c, "timeout", 0), ValueError, "timeout must be more than 0 seconds"),
    (lambda c: setattr(c, "timeout", "5"), TypeError, "timeout takes seconds"),
    (lambda c: setattr(c, "timeout", -1), ValueError, "timeout must be more than 0 seconds"),
    (lambda c: setattr(c, "chunk_bytes", 0), ValueError, "chunk_bytes must be from 1"),
    (lambda c: setattr(c, "stream_above_bytes", None), TypeError, "must be a whole number"),
    (lambda c: setattr(c, "retries", 2.5), TypeError, "retries must be a whole number"),
    (lambda c: setattr(c, "keep_memory", "no"), TypeError, "keep_memory must be True or False"),
    # Taken as it came, "no" being true: the calls went on a Calls stream, holding a server
    # place, where stream_calls="no" given to connect() is refused (a review of the client's
    # API as a researcher uses it).
    (lambda c: setattr(c, "stream_calls", "no"), TypeError, "stream_calls must be True or False"),
]


@pytest.mark.parametrize(("call", "error", "said"), BAD_ARGUMENTS)
def test_a_bad_argument_is_refused_before_anything_is_sent(
    client: gradwire.Client,
    call: Callable[[gradwire.Client], Any],
    error: type[Exception],
    said: str,
) -> None:
    settings = (client.timeout, client.retries, client.chunk_bytes, client.stream_above_bytes)
    called = _counting(client)
    with pytest.raises(error, match=said):
        call(client)
    assert called == []
    # A setting refused is left as it was.
    assert (
        client.timeout,
        client.retries,
        client.chunk_bytes,
        client.stream_above_bytes,
    ) == settings


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda c, x: c.forward(x), "input: cannot send an array of dtype datetime64"),
        (lambda c, x: c.set("conv1.weight", x), "value: cannot send an array of dtype datetime64"),
    ],
    ids=["forward", "set"],
)
def test_a_value_refused_on_the_streamed_path_is_named_as_on_the_unary_one(
    client: gradwire.Client, call: Callable[[gradwire.Client, Any], Any], said: str
) -> None:
    """The streamed path said "cannot send ..." without naming the argument (found by a
    review of the client)."""
    client.stream_above_bytes = 0
    called = _counting(client)
    with pytest.raises(codec.CodecError, match=said):
        call(client, np.zeros((4, 3, 10, 10), "datetime64[s]"))
    assert called == []


@pytest.mark.parametrize(
    ("make", "error", "said"),
    [
        (lambda: gradwire.connect(None), TypeError, "the target is a str.*; got None$"),  # type: ignore[arg-type]
        (lambda: gradwire.connect("localhost:1", timeout=0), ValueError, "more than 0 seconds"),
        (
            lambda: gradwire.connect("localhost:1", tls="no"),
            TypeError,
            "tls= must be True or False",
        ),  # type: ignore[arg-type]
        (lambda: Fill.constant(None, 8), TypeError, "value must be a number, got None"),  # type: ignore[arg-type]
        (lambda: Fill.normal(8, mean=None), TypeError, "mean must be a number"),  # type: ignore[arg-type]
        # The contract reads a std of 0 as 1: Fill.normal(std=0) drew values of std 1.
        (lambda: Fill.normal(8, std=0), ValueError, r"std must be more than 0 .* got 0\.0"),
        (lambda: Fill.normal(8, std=-1), ValueError, "std must be more than 0 and finite"),
        (lambda: Fill("normal", (8,), std=math.inf), ValueError, "Fill.constant"),
        (lambda: Fill.randint(False, True, 8), TypeError, "low must be a number, got False"),
        (lambda: Fill.ones(2**63, 3), ValueError, "a Fill's dimension"),
        (lambda: Fill("bogus", (8,)), ValueError, "a Fill's kind is one of zeros"),  # type: ignore[arg-type]
        (lambda: Fill.ones(8, dtype=object()), TypeError, "a Fill's dtype is a name"),  # type: ignore[arg-type]
        # Taken as given, and refused when sent, "unknown dtype 'uint8'", naming neither the
        # Fill nor the argument it was (found by a review of the client's API).
        (lambda: Fill.ones(8, dtype="foo"), codec.CodecError, "a Fill's dtype is one the wire"),
        (lambda: Fill.zeros(8, dtype=np.uint8), codec.CodecError, r"got 'uint8' \(an array"),
        # A tensor where its dtype was meant: numpy's ValueError, naming no Fill, until mended.
        (lambda: Fill.ones(8, dtype=torch.ones(1)), TypeError, r"dtype is a name .* got tensor"),  # type: ignore[arg-type]
        (lambda: Fill.uniform(3).reseeded(1.5), TypeError, "step must be a whole number"),  # type: ignore[arg-type]
        (
            lambda: codec.tensor_pieces(torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])),
            codec.CodecError,
            "cannot send a nested tensor",
        ),
    ],
)
def test_a_bad_argument_to_connect_or_a_fill_is_refused_as_given(
    make: Callable[[], Any], error: type[Exception], said: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        with pytest.raises(error, match=said):
            make()


def test_a_fill_takes_any_int64_dimension_for_the_server_to_judge() -> None:
    """A negative dimension, or one past any memory, is the server's to refuse, saying which;
    the client refuses only what the wire cannot carry (past int64, above)."""
    shape = [-8, 2**63 - 1, -(2**63)]
    assert list(Fill.ones(*shape).to_proto().shape) == shape


def test_a_timeout_of_the_longest_grpc_deadline_is_taken_and_one_past_it_refused(
    address: str,
) -> None:
    """limits.MAX_GRPC_SECONDS (about 24 days) is a timeout a call takes; a second more is
    refused, the message naming the most, for connect, the setting and wait_ready alike."""
    most = limits.MAX_GRPC_SECONDS
    with gradwire.connect(address, timeout=most) as client:
        assert client.timeout == most
        assert client.list_tensors().version == 0
        client.wait_ready(most)
        said = rf"timeout must be more than 0 seconds and at most {most:,} .* got {most + 1}"
        with pytest.raises(ValueError, match=said):
            client.timeout = most + 1
        assert client.timeout == most
        with pytest.raises(ValueError, match=said):
            client.wait_ready(most + 1)
    with pytest.raises(ValueError, match=rf"timeout= must be more .* got {most + 1}"):
        gradwire.connect(address, timeout=most + 1)


def test_a_remote_view_takes_a_selector_with_its_index(client: gradwire.Client) -> None:
    np.testing.assert_array_equal(
        client.remote["conv1.weight[0][1]"].numpy(), client.get("conv1.weight[0][1]")
    )
    with pytest.raises(TypeError, match=r"for its value: .numpy\(\), .torch\(\)"):
        len(client.remote.conv1.weight[0, 0, 0, 0])


def test_a_large_list_goes_in_chunks(client: gradwire.Client) -> None:
    """A list was counted as 0 bytes, never sent in chunks, and a large one was refused
    with advice to lower stream_above_bytes, which changed nothing."""
    client.stream_above_bytes = 0
    called = _counting(client)
    values = np.full((16, 3, 3, 3), 0.25, np.float32)
    client.set("conv1.weight", values.tolist())
    assert called == ["SetTensorStream"]
    np.testing.assert_array_equal(client.get("conv1.weight"), values)


def test_a_torch_tensor_or_a_tuple_goes_in_chunks_by_its_bytes(client: gradwire.Client) -> None:
    """What sends a value in chunks is its bytes past stream_above_bytes: a torch tensor's
    elements times their size, a tuple's bytes as a list's, as numpy counts them."""
    values = np.full((16, 3, 3, 3), 0.25, np.float32)
    client.stream_above_bytes = values.nbytes - 1
    called = _counting(client)
    client.set("conv1.weight", torch.from_numpy(values))
    client.set("conv1.weight", tuple(values.tolist()))
    assert called == ["SetTensorStream", "SetTensorStream"]
    client.stream_above_bytes = values.nbytes  # a value of just that many bytes goes whole
    client.set("conv1.weight", torch.from_numpy(values))
    assert called[2:] == ["SetTensor"]
    np.testing.assert_array_equal(client.get("conv1.weight"), values)


def test_a_numpy_array_goes_in_chunks_by_its_bytes_not_its_elements(
    client: gradwire.Client,
) -> None:
    """A float32 array of 432 values is 1,728 bytes: past a stream_above_bytes of 1,727 it
    goes in chunks, though its element count is far below it."""
    values = np.full((16, 3, 3, 3), 0.75, np.float32)
    client.stream_above_bytes = values.nbytes - 1
    called = _counting(client)
    client.set("conv1.weight", values)
    assert called == ["SetTensorStream"]
    np.testing.assert_array_equal(client.get("conv1.weight"), values)


def test_a_fill_takes_numpy_s_and_torch_s_dtypes(client: gradwire.Client) -> None:
    """As torch.ones(..., dtype=torch.float64) does: they were sent as an unknown dtype."""
    assert Fill.ones(8, dtype=np.float64) == Fill.ones(8, dtype=torch.float64)
    assert Fill.ones(8, dtype=np.dtype("float64")).dtype == "float64"
    # A name is taken as the wire names it, numpy's or not (numpy has no bfloat16); a torch
    # object that is no dtype is refused as any other.
    assert Fill.ones(8, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(TypeError, match="a Fill's dtype is a name"):
        Fill.ones(8, dtype=torch.device("cpu"))  # type: ignore[arg-type]
    client.forward(Fill.ones(8, 3, 10, 10, dtype=torch.float32), Fill.ones(8, dtype=torch.int64))
    assert client.get("target").dtype == np.int64


ROOT = Path(__file__).resolve().parent.parent

#: A user's module, as written against gradwire.client before its result types moved to
#: results.py: every name it imports was defined there, and mypy --strict took them.
USERS_IMPORTS = """
from gradwire.client import (
    EXPECTED_VERSION, REQUEST_ID, SESSION, CheckpointInfo, Client, LoadedCheckpoint,
    SavedCheckpoint, ServerInfo, ServerLimits, SessionInfo, SessionListing,
)


def summary(client: Client) -> str:
    info: ServerInfo = client.server_info()
    limits: ServerLimits = info.limits
    saved: SavedCheckpoint = client.save_checkpoint("typed")
    listed: list[CheckpointInfo] = list(client.list_checkpoints())
    loaded: LoadedCheckpoint = client.load_checkpoint("typed")
    with client.open_session():
        sessions: SessionListing = client.list_sessions()
    session: SessionInfo = sessions.sessions[0]
    keys = (REQUEST_ID, EXPECTED_VERSION, SESSION)
    return f"{limits.max_concurrent} {saved.name} {len(listed)} {loaded.version} " + (
        f"{session.session != ''} {len(sessions.sessions)} {keys}"
    )
"""


def test_what_gradwire_client_defined_still_imports_from_it_for_mypy(tmp_path: Path) -> None:
    # The split of client.py (results.py, unary.py) left these names imported into
    # gradwire.client but not exported: `from gradwire.client import ServerInfo` still ran,
    # but mypy --strict, reading the package's py.typed, refused it ("does not explicitly
    # export attribute"), for seven result types and the three metadata keys (found by a
    # review of the fifty-fourth session's changes).
    module = tmp_path / "users_module.py"
    module.write_text(USERS_IMPORTS)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--ignore-missing-imports", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         str(module)],
        env={**os.environ, "MYPYPATH": str(ROOT / "client")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    namespace: dict[str, Any] = {}
    exec(compile(USERS_IMPORTS, str(module), "exec"), namespace)
    running = start(Trainer(seed=0), "127.0.0.1", 0, state_dir=tmp_path)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            assert namespace["summary"](client).endswith(
                "('gradwire-request-id', 'gradwire-expected-version', 'gradwire-session')"
            )
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize(
    ("kind", "given", "in_force"),
    [
        ("sgd", {}, {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}),
        ("sgd", {"lr": 0.0}, {"lr": 0.0, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}),
        (
            "sgd",
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
        ),
        (
            "adam",
            {"lr": 0.0, "beta1": 0.0, "eps": 0.0, "weight_decay": 0.01},
            {"lr": 0.0, "weight_decay": 0.01, "beta1": 0.0, "beta2": 0.999, "eps": 0.0},
        ),
        (
            "adam",
            {"beta1": 0.5, "beta2": 0.75},
            {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.5, "beta2": 0.75, "eps": 1e-8},
        ),
        (
            "adam",
            {"beta2": 0.0},  # no memory of past squares: torch takes it
            {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.0, "eps": 1e-8},
        ),
    ],
)
def test_set_optimizer_keeps_a_setting_of_0_and_defaults_only_the_unset(
    client: gradwire.Client, kind: str, given: dict[str, Any], in_force: dict[str, Any]
) -> None:
    """0 is a setting (lr 0 freezes the weights; Adam's beta1 0 is RMSprop-like), not "unset":
    taken for the default, an lr of 0 stepped at 1.0. The settings answered are the ones the
    Step uses: with lr 0, a Step changes no weight."""
    config = client.set_optimizer(kind, **given)  # type: ignore[arg-type]
    assert config == gradwire.OptimizerConfig(kind=kind, **in_force)
    if in_force["lr"] == 0.0:
        before = client.get("conv1.weight")
        client.forward(ONES_INPUT, ONES_TARGET)
        client.backward()
        client.step()
        assert np.array_equal(client.get("conv1.weight"), before)


@pytest.mark.parametrize(
    ("kind", "setting", "value", "other"),
    [
        ("adam", "nesterov", True, "SGD"),
        ("adam", "momentum", 0.9, "SGD"),
        ("sgd", "eps", 1e-6, "Adam"),
        ("sgd", "beta2", 0.9, "Adam"),
    ],
)
def test_a_setting_of_the_other_optimizer_is_refused_by_the_server(
    client: gradwire.Client, kind: str, setting: str, value: object, other: str
) -> None:
    """Not ignored: Adam has no nesterov, SGD no eps. Replacing says to ask for the other
    kind; a change in place, to replace the optimizer."""
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set_optimizer(kind, **{setting: value})  # type: ignore[arg-type]
    assert caught.value.reason == "BAD_OPTIMIZER"
    assert f"{setting} is a setting of {other}" in caught.value.message
    assert caught.value.message.endswith(f"ask for {other}")
    client.set_optimizer(kind)
    with pytest.raises(errors.InvalidArgument) as caught:
        client.set_optimizer(keep_state=True, **{setting: value})  # type: ignore[arg-type]
    assert f"replace the optimizer with {other}" in caught.value.message


def test_adam_steps_with_every_setting_given(client: gradwire.Client) -> None:
    """beta1 the first moment's, beta2 the second's, eps and weight_decay as given: each
    reaches torch's Adam, whose Steps the server's match bit for bit."""
    client.set_optimizer("adam", lr=0.01, beta1=0.5, beta2=0.75, eps=1e-3, weight_decay=0.1)
    model = local_model()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=0.01, betas=(0.5, 0.75), eps=1e-3, weight_decay=0.1
    )
    _two_steps_match(client, model, optimizer)


@pytest.mark.parametrize(
    ("kind", "settings", "keys"),
    [
        ("adam", {}, ["step", "exp_avg", "exp_avg_sq"]),
        ("sgd", {"momentum": 0.9}, ["momentum_buffer"]),
    ],
)
def test_an_optimizer_s_state_is_listed_in_torch_s_order_after_a_step(
    client: gradwire.Client, kind: str, settings: dict[str, Any], keys: list[str]
) -> None:
    """ListTensors names each parameter's state as torch keeps it, in torch's order."""
    client.set_optimizer(kind, **settings)  # type: ignore[arg-type]
    client.forward(ONES_INPUT, ONES_TARGET)
    client.backward()
    client.step()
    listed = [t.name for t in client.list_tensors().tensors]
    state = [n for n in listed if n.startswith("optimizer.conv1.weight.")]
    assert state == [f"optimizer.conv1.weight.{key}" for key in keys]


# --- the docstrings a researcher reads with help() (a review of the client's API) ---------

#: Named in every docstring's example or first line, where they need no words of their own.
_PLAIN_PARAMETERS = frozenset({"self", "selector", "selectors", "input", "target"})


@pytest.mark.parametrize(
    "name",
    sorted(
        f"{cls.__name__}.{n}"
        for cls in (gradwire.Client, gradwire.RemoteTensor)
        for n, f in inspect.getmembers(cls, inspect.isfunction)
        if not n.startswith("_")
    ),
)
def test_each_client_method_s_docstring_names_each_of_its_parameters(name: str) -> None:
    """help(client.read) said nothing of `values` or `as_torch`, help(client.train) of
    `zero_grad`, help(client.set_optimizer) of `beta1` (torch's betas[0]), and so on for
    backward's `retain_graph`, get's and set's `index`, open_session's `seed`, a remote
    view's fetch() of `as_torch`."""
    cls, _, name = name.partition(".")
    method = getattr(getattr(gradwire, cls), name)
    doc = inspect.getdoc(method) or ""
    unnamed = [
        p
        for p in inspect.signature(method).parameters
        if p not in _PLAIN_PARAMETERS and not re.search(rf"\b{p}\b", doc)
    ]
    assert unnamed == [], f"{cls}.{name}'s docstring does not name {unnamed}"


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n, f in inspect.getmembers(gradwire.Pipeline, inspect.isfunction)
        if not n.startswith("_")
    ),
)
def test_each_pipeline_method_is_the_client_s_of_its_name(name: str) -> None:
    """A pipeline's (and a batch's) methods say "As Client.x": each takes what the client's
    takes, with the same defaults (set_optimizer its settings as keywords), but `progress`
    (get, read, set): a pipeline's value crosses in one message, with nothing to report."""
    mine, theirs = getattr(gradwire.Pipeline, name), getattr(gradwire.Client, name)
    assert (inspect.getdoc(mine) or "").startswith(f"As Client.{name}")
    mine_parameters = dict(inspect.signature(mine).parameters)
    theirs_parameters = dict(inspect.signature(theirs).parameters)
    theirs_parameters.pop("progress", None)
    if "settings" in mine_parameters:  # set_optimizer: **settings for lr, momentum, ...
        del mine_parameters["settings"]
        theirs_parameters = {
            k: p for k, p in theirs_parameters.items() if k in ("self", "kind", "keep_state")
        }
    described = [(p.name, p.kind, p.default) for p in mine_parameters.values()]
    assert described == [(p.name, p.kind, p.default) for p in theirs_parameters.values()]


@pytest.mark.parametrize("name", ["ones", "zeros", "constant", "uniform", "normal", "randint"])
def test_each_fill_s_docstring_names_each_of_its_parameters(name: str) -> None:
    """help(Fill.randint) said nothing: not that `high` is left out, nor that a seed draws
    the same values every call, nor what the dtype is by default."""
    made = getattr(Fill, name)
    doc = inspect.getdoc(made) or ""
    unnamed = [
        p
        for p in inspect.signature(made).parameters
        if p != "shape" and not re.search(rf"\b{p}\b", doc)
    ]
    assert doc and unnamed == []


def test_connect_gives_the_client_each_of_its_arguments(address: str) -> None:
    """connect(...) makes Client(...) of the same arguments, each passed on: stream_calls=True
    dropped on the way sent every call as a call of its own, unsaid."""
    with gradwire.connect(address, timeout=7.5, keepalive=None, stream_calls=True) as client:
        assert (client.timeout, client._keepalive, client.stream_calls) == (7.5, None, True)
        assert client.list_tensors().model == "Simple"
        assert client._calls is not None  # the call went on the Calls stream
    with gradwire.connect(address) as client:
        assert (client.timeout, client.stream_calls) == (60.0, False)
        client.list_tensors()
        assert client._calls is None
