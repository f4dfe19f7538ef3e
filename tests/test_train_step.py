"""The fused TrainStep through a real channel, checked against plain PyTorch bit for bit.

Also against the separate calls (ZeroGrad, Forward, Backward, Step) on a second server, and
for the rule that a refused step changes nothing.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors, limits
from gradwire._pb import trainer_pb2 as pb
from gradwire.fill import Fill
from gradwire_server import servicer
from gradwire_server.app import start
from gradwire_server.errors import OverLimit
from gradwire_server.indexing import MAX_GRAD_FN_BYTES
from gradwire_server.models import TINY_MLP, ModelSpec
from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.trainer import Trainer, described_bytes
from tests.reference import Simple
from tests.serve_in_process import serving

ONES_INPUT = Fill.ones(8, 3, 10, 10)
ONES_TARGET = Fill.ones(8, dtype="int64")
PARAMETERS = ("conv1.weight", "conv2.weight", "linear.weight")
FETCH = ["conv1.weight.grad[0][0][0]", "conv1.weight", "loss"]


def local_model(seed: int = 0) -> Simple:
    """`torch.manual_seed(seed); Simple()`, without disturbing this process's generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Simple()


def ones_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(8, 3, 10, 10), torch.ones(8, dtype=torch.long)


def random_batch(n: int, seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 10, 10)).astype(np.float32)
    y = rng.integers(0, 20, size=n).astype(np.int64)
    return x, y


def local_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    zero_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's loop body: [zero_grad,] forward, loss, backward, step; (output, loss)."""
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    output = model(x)
    loss = nn.CrossEntropyLoss()(output, y)
    loss.backward()
    optimizer.step()
    return output.detach(), loss.detach()


def local(model: nn.Module, name: str) -> np.ndarray[Any, Any]:
    """A parameter ("conv1.weight") or gradient ("conv1.weight.grad") of the local model."""
    params = dict(model.named_parameters())
    if name.endswith(".grad"):
        grad = params[name.removesuffix(".grad")].grad
        assert grad is not None
        return grad.numpy()
    return params[name].detach().numpy()


def version(client: gradwire.Client) -> int:
    return client.list_tensors().version


def snapshot(client: gradwire.Client) -> dict[str, Any]:
    """Everything a refused step must leave alone: version, parameters, gradients, forward."""
    state: dict[str, Any] = {"version": version(client)}
    for name in [*PARAMETERS, *(f"{p}.grad" for p in PARAMETERS)]:
        state[name] = client.get(name)
    for name in ("input", "target", "output", "loss"):
        state[name] = client.get(name)
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if value is None or isinstance(value, int):
            assert after[name] == value, name
        else:
            assert after[name] is not None, name
            assert np.array_equal(after[name], value), name


def _fresh_server_client() -> Iterator[gradwire.Client]:
    """A client of a server of its own on a fresh Trainer(seed=0), stopped after."""
    running = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
            yield client
    finally:
        running.stop(grace=None)


@pytest.fixture
def second_client() -> Iterator[gradwire.Client]:
    """A client of a second, independent server on a fresh Trainer(seed=0)."""
    yield from _fresh_server_client()


# --- one step: against local PyTorch and against the separate calls -------------------------


def test_train_step_equals_a_local_torch_step_bit_for_bit(client: gradwire.Client) -> None:
    result = client.train_step(ONES_INPUT, ONES_TARGET, zero_grad=True, fetch=FETCH)
    model = local_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _, loss = local_train_step(model, optimizer, *ones_batch(), zero_grad=True)
    assert result.loss == loss.item()
    assert result.output_shape == (8, 20)
    assert result.parameters_updated == 3
    assert result.version == 4
    grad_row, weight, fetched_loss = result.fetched
    assert [f.name for f in result.fetched] == ["conv1.weight.grad", "conv1.weight", "loss"]
    assert {f.version for f in result.fetched} == {4}
    assert (grad_row.shape, grad_row.full_shape, grad_row.dtype) == ((3,), (16, 3, 3, 3), "float32")
    assert np.array_equal(grad_row.value, local(model, "conv1.weight.grad")[0][0][0])
    assert (weight.shape, weight.full_shape) == ((16, 3, 3, 3), (16, 3, 3, 3))
    assert np.array_equal(weight.value, local(model, "conv1.weight"))
    assert (fetched_loss.shape, fetched_loss.full_shape) == ((), ())
    assert np.array_equal(fetched_loss.value, loss.numpy())
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), local(model, name)), name
        assert np.array_equal(client.get(f"{name}.grad"), local(model, f"{name}.grad")), name


def test_a_request_past_one_message_is_refused_before_it_is_sent(client: gradwire.Client) -> None:
    """TrainStep and Train have no streamed form: a batch past 64 MiB failed with gRPC's own
    "CLIENT: Sent message larger than max", which said nothing of what to do (found by a
    review of the client's docstrings, which said such tensors went in chunks)."""
    x, y = np.ones((60000, 3, 10, 10), np.float32), np.zeros(60000, np.int64)  # 72 MB
    with pytest.raises(
        ValueError,
        match=r"TrainStep's request is 72,480,046 bytes, more than .*: TrainStep has no streamed "
        r"form: call forward\(\), backward\(\) and step\(\)",
    ):
        client.train_step(x, y)
    with pytest.raises(ValueError, match="Train has no streamed form: send a Fill"):
        list(client.train(x, y, steps=1))
    client.stream_above_bytes = 1 << 30  # a Forward told not to stream it
    with pytest.raises(ValueError, match="lower stream_above_bytes"):
        client.forward(x, y)
    assert client.list_tensors().version == 0  # nothing was sent


def test_a_request_of_exactly_one_message_is_sent(
    client: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC carries a message of max_message_length bytes and refuses one more: so does the
    client's check before sending (a request of exactly the limit was sent, not refused)."""
    x, y = np.ones((8, 3, 10, 10), np.float32), np.zeros(8, np.int64)
    monkeypatch.setattr(servicer.limits, "MAX_MESSAGE_BYTES", 1024)
    with pytest.raises(ValueError) as caught:
        client.train_step(x, y, zero_grad=True)  # refused before it is sent, saying its size
    said = re.search(r"request is ([\d,]+) bytes", str(caught.value))
    assert said is not None
    size = int(said[1].replace(",", ""))
    # a server and client whose messages may hold exactly that many bytes
    monkeypatch.setattr(servicer.limits, "MAX_MESSAGE_BYTES", size)
    with contextlib.contextmanager(_fresh_server_client)() as exact:
        model = local_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        x_, y_ = torch.from_numpy(x), torch.from_numpy(y)
        _, loss = local_train_step(model, optimizer, x_, y_, zero_grad=True)
        assert exact.train_step(x, y, zero_grad=True).loss == loss.item()
        monkeypatch.setattr(servicer.limits, "MAX_MESSAGE_BYTES", size - 1)
        with pytest.raises(
            ValueError, match=f"request is {size:,} bytes, more than the {size - 1:,}"
        ):
            exact.train_step(x, y, zero_grad=True)
        assert exact.list_tensors().version == 4  # the one step, not the refused one


def test_train_step_equals_the_separate_calls_on_a_second_server(
    client: gradwire.Client, second_client: gradwire.Client
) -> None:
    fused = client.train_step(ONES_INPUT, ONES_TARGET, zero_grad=True, fetch=FETCH)
    second_client.zero_grad()
    forward = second_client.forward(ONES_INPUT, ONES_TARGET)
    second_client.backward()
    step = second_client.step()
    assert fused.version == step.version == version(second_client) == version(client) == 4
    assert fused.loss == forward.loss
    assert fused.output_shape == forward.output_shape
    assert fused.parameters_updated == step.parameters_updated
    for selector, read in zip(FETCH, fused.fetched, strict=True):
        assert np.array_equal(read.value, second_client.get(selector)), selector
    for name in [*PARAMETERS, *(f"{p}.grad" for p in PARAMETERS), "input", "output", "loss"]:
        assert np.array_equal(client.get(name), second_client.get(name)), name


def test_train_step_version_rises_by_four_with_zero_grad_and_three_without(
    client: gradwire.Client,
) -> None:
    first = client.train_step(ONES_INPUT, ONES_TARGET, zero_grad=True)
    assert first.version == 4
    second = client.train_step(ONES_INPUT, ONES_TARGET, zero_grad=False)
    assert second.version == 7
    third = client.train_step(ONES_INPUT, ONES_TARGET, zero_grad=True)
    assert third.version == 11
    assert version(client) == 11
    assert client.read("conv1.weight").version == 11


def test_a_fetched_slice_with_a_negative_step_equals_local_torch(client: gradwire.Client) -> None:
    result = client.train_step(
        ONES_INPUT, ONES_TARGET, fetch=["linear.weight.grad[::-3, -5:]", "conv2.weight[None, 1]"]
    )
    model = local_model()
    local_train_step(
        model, torch.optim.SGD(model.parameters(), lr=1.0), *ones_batch(), zero_grad=True
    )
    grad, weight = result.fetched
    assert np.array_equal(grad.value, local(model, "linear.weight.grad")[::-3, -5:])
    assert grad.full_shape == (20, 3200)
    assert np.array_equal(weight.value, local(model, "conv2.weight")[None, 1])


# --- several steps ---------------------------------------------------------------------


@pytest.mark.parametrize("zero_grad", [False, True], ids=["accumulate", "zero-each-step"])
def test_several_train_steps_equal_a_local_loop(client: gradwire.Client, zero_grad: bool) -> None:
    model = local_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for i in range(3):
        x, y = random_batch(4, seed=i)
        result = client.train_step(
            x, y, zero_grad=zero_grad, fetch=["linear.weight.grad", "output"]
        )
        output, loss = local_train_step(
            model, optimizer, torch.from_numpy(x), torch.from_numpy(y), zero_grad=zero_grad
        )
        assert result.loss == loss.item(), i
        grad, fetched_output = result.fetched
        assert np.array_equal(grad.value, local(model, "linear.weight.grad")), i
        assert np.array_equal(fetched_output.value, output.numpy()), i
        for name in PARAMETERS:
            assert np.array_equal(client.get(name), local(model, name)), (i, name)
            assert np.array_equal(client.get(f"{name}.grad"), local(model, f"{name}.grad"))
    assert version(client) == 3 * (4 if zero_grad else 3)


def test_accumulated_gradients_are_the_sum_of_each_steps_gradient(
    client: gradwire.Client,
) -> None:
    # lr 0: the weights never move, so each step's own gradient is the same; without zeroing
    # the gradient after k steps is k times it (exact: doubling, then 3x of a float32 sum).
    client.set_optimizer("sgd", lr=0.0)
    once = client.train_step(ONES_INPUT, ONES_TARGET, fetch=["conv1.weight.grad"]).fetched[0]
    twice = client.train_step(
        ONES_INPUT, ONES_TARGET, zero_grad=False, fetch=["conv1.weight.grad"]
    ).fetched[0]
    assert np.array_equal(twice.value, once.value + once.value)
    again = client.train_step(ONES_INPUT, ONES_TARGET, fetch=["conv1.weight.grad"]).fetched[0]
    assert np.array_equal(again.value, once.value)


def test_three_adam_train_steps_equal_three_local_adam_steps(client: gradwire.Client) -> None:
    client.set_optimizer("adam", lr=0.01)
    model = local_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for i in range(3):
        x, y = random_batch(6, seed=10 + i)
        fetch = ["conv2.weight", "optimizer.conv2.weight.step", "optimizer.conv2.weight.exp_avg"]
        result = client.train_step(x, y, zero_grad=True, fetch=fetch)
        _, loss = local_train_step(
            model, optimizer, torch.from_numpy(x), torch.from_numpy(y), zero_grad=True
        )
        assert result.loss == loss.item(), i
        weight, step, moment = (f.value for f in result.fetched)
        assert np.array_equal(weight, local(model, "conv2.weight")), i
        # Adam's state as the step left it: its step count a float32 scalar, as torch keeps it
        state = optimizer.state[model.get_parameter("conv2.weight")]
        assert step.shape == () and step.dtype == np.float32 and step == i + 1
        assert np.array_equal(moment, state["exp_avg"].numpy()), i
    for name in PARAMETERS:
        assert np.array_equal(client.get(name), local(model, name)), name
    assert version(client) == 1 + 3 * 4  # SetOptimizer, then three fused steps


# --- what a step fetches -----------------------------------------------------------------


def test_fetch_of_input_target_output_and_loss_has_this_steps_batch(
    client: gradwire.Client, trainer: Trainer
) -> None:
    client.train_step(ONES_INPUT, ONES_TARGET)  # an earlier batch of 8, to be replaced
    result = client.train_step(
        Fill.uniform(5, 3, 10, 10, low=-1.0, high=1.0, seed=3),
        Fill.randint(0, 20, 5, seed=4),
        fetch=["input", "target", "output", "loss", "output[-1]", "input[4, 2, ::-1]"],
    )
    x, y, output, loss, last_row, flipped = result.fetched
    assert result.output_shape == (5, 20)
    assert (x.shape, x.dtype) == ((5, 3, 10, 10), "float32")
    assert (y.shape, y.dtype) == ((5,), "int64")
    assert (output.shape, output.dtype) == ((5, 20), "float32")
    assert (loss.shape, loss.dtype) == ((), "float32")
    assert (last_row.shape, last_row.full_shape) == ((20,), (5, 20))
    assert (flipped.shape, flipped.full_shape) == ((10, 10), (5, 3, 10, 10))
    assert np.all((x.value >= -1.0) & (x.value < 1.0))
    assert np.unique(x.value).size > 100  # uniform values, not a constant
    assert np.all((y.value >= 0) & (y.value < 20))
    for read in (x, y, output, loss):
        server = trainer.read(read.name).value
        assert server is not None
        assert np.array_equal(read.value, server.numpy()), read.name
    assert np.array_equal(last_row.value, output.value[-1])
    assert np.array_equal(flipped.value, x.value[4, 2, ::-1])
    assert float(loss.value) == np.float32(result.loss)
    # The output is the Forward's, before the step moved the weights: the first step's
    # weights applied to this step's batch.
    model = local_model()
    local_train_step(
        model, torch.optim.SGD(model.parameters(), lr=1.0), *ones_batch(), zero_grad=True
    )
    expected = model(torch.from_numpy(x.value.copy()))
    assert np.array_equal(output.value, expected.detach().numpy())
    expected_loss = nn.CrossEntropyLoss()(expected, torch.from_numpy(y.value.copy()))
    assert result.loss == expected_loss.item()


def test_as_torch_fetches_are_torch_tensors(client: gradwire.Client) -> None:
    plain = client.train_step(ONES_INPUT, ONES_TARGET, fetch=[*FETCH, "target"])
    client.reset(0)
    result = client.train_step(ONES_INPUT, ONES_TARGET, fetch=[*FETCH, "target"], as_torch=True)
    dtypes = [torch.float32, torch.float32, torch.float32, torch.int64]
    for read, numpy_read, dtype in zip(result.fetched, plain.fetched, dtypes, strict=True):
        assert isinstance(read.value, torch.Tensor), read.name
        assert read.value.dtype == dtype, read.name
        assert tuple(read.value.shape) == read.shape
        assert torch.equal(read.value, torch.from_numpy(np.array(numpy_read.value))), read.name
    assert result.loss == plain.loss


def test_a_step_without_fetch_fetches_nothing(client: gradwire.Client) -> None:
    result = client.train_step(ONES_INPUT, ONES_TARGET)
    assert result.fetched == ()
    assert result.parameters_updated == 3


# --- refused steps change nothing -------------------------------------------------------


@pytest.fixture
def stepped(client: gradwire.Client) -> dict[str, Any]:
    """One step taken (so gradients, output and loss exist), and the state it left."""
    client.train_step(ONES_INPUT, ONES_TARGET)
    return snapshot(client)


@pytest.mark.parametrize(
    ("selector", "error", "reason"),
    [
        ("conv1.wieght", errors.NotFound, "UNKNOWN_TENSOR"),
        ("outputs", errors.NotFound, "UNKNOWN_TENSOR"),
        ("conv1.weight[16]", errors.OutOfRange, "INDEX_OUT_OF_RANGE"),
        ("conv1.weight.grad[0][3]", errors.OutOfRange, "INDEX_OUT_OF_RANGE"),
        ("output[5]", errors.OutOfRange, "INDEX_OUT_OF_RANGE"),  # this step's batch is 5
        ("input[0, 3]", errors.OutOfRange, "INDEX_OUT_OF_RANGE"),
        ("target[-6]", errors.OutOfRange, "INDEX_OUT_OF_RANGE"),
        ("loss[0]", errors.InvalidArgument, "TOO_MANY_INDICES"),
        ("linear.weight[0, 0, 0]", errors.InvalidArgument, "TOO_MANY_INDICES"),
    ],
)
def test_a_bad_fetch_is_refused_before_anything_changes(
    client: gradwire.Client,
    stepped: dict[str, Any],
    selector: str,
    error: type[errors.RemoteError],
    reason: str,
) -> None:
    with pytest.raises(error) as caught:
        client.train_step(
            Fill.uniform(5, 3, 10, 10, seed=1),
            Fill.randint(0, 20, 5, seed=2),
            zero_grad=True,
            fetch=["conv1.weight", selector],
        )
    assert caught.value.reason == reason
    assert_same_state(stepped, snapshot(client))


def test_fetch_of_output_at_the_last_row_of_this_batch_is_accepted(
    client: gradwire.Client, stepped: dict[str, Any]
) -> None:
    # The previous batch had 8 rows; this one has 5: output[4] is valid, output[5] is not.
    result = client.train_step(
        Fill.uniform(5, 3, 10, 10, seed=1), Fill.randint(0, 20, 5, seed=2), fetch=["output[4]"]
    )
    assert result.fetched[0].shape == (20,)
    assert result.version == stepped["version"] + 4


def test_a_step_without_a_target_is_invalid_argument(
    client: gradwire.Client, stepped: dict[str, Any]
) -> None:
    request = pb.TrainStepRequest(input=pb.TensorSource(fill=ONES_INPUT.to_proto()), zero_grad=True)
    request.fetch.add(name="conv1.weight")
    with pytest.raises(errors.InvalidArgument) as caught:
        client._call("TrainStep", request)
    assert caught.value.reason == "MISSING_INPUT"
    assert caught.value.message == (
        "TrainStep needs an input and a target (class indices, or the model's mse target): "
        "a step needs a loss"
    )
    assert_same_state(stepped, snapshot(client))


def test_a_step_with_a_bad_target_is_invalid_argument(
    client: gradwire.Client, stepped: dict[str, Any]
) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        client.train_step(ONES_INPUT, np.full(8, 20), fetch=["conv1.weight"])
    assert caught.value.reason == "BAD_TARGET_CLASS"
    assert_same_state(stepped, snapshot(client))


def test_a_fetch_over_the_value_limit_is_refused_before_anything_changes(
    client: gradwire.Client, stepped: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 100_000)  # linear.weight: 256000
    client.chunk_bytes = 10_000  # the snapshot's reads of linear.weight stream under the limit
    with pytest.raises(errors.ResourceExhausted) as caught:
        client.train_step(ONES_INPUT, ONES_TARGET, fetch=["linear.weight"])
    assert caught.value.reason == "FETCH_TOO_LARGE"
    assert_same_state(stepped, snapshot(client))


def test_a_fetch_of_exactly_the_value_limit_is_taken_and_one_byte_over_refused(
    client: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is the most a fetch may count: at it, to the byte, the step runs; one byte
    under it, refused, saying what it counted."""
    fetch = ["conv1.weight[0]"]
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 1)
    with pytest.raises(errors.ResourceExhausted) as caught:
        client.train_step(ONES_INPUT, ONES_TARGET, fetch=fetch)
    counted = int(caught.value.metadata["bytes"])
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", counted)
    assert client.train_step(ONES_INPUT, ONES_TARGET, fetch=fetch).fetched[0].shape == (3, 3, 3)
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", counted - 1)
    version = client.list_tensors().version
    with pytest.raises(errors.ResourceExhausted) as caught:
        client.train_step(ONES_INPUT, ONES_TARGET, fetch=fetch)
    assert caught.value.reason == "FETCH_TOO_LARGE"
    assert caught.value.metadata["bytes"] == str(counted)
    assert client.list_tensors().version == version


def test_fetched_values_are_of_the_step_they_answer_while_others_step(
    client: gradwire.Client, address: str
) -> None:
    # Every step uses the same batch, so the weights after k steps are the same whichever
    # client made them: a fetch answered at version 4k must hold the local weights after k
    # steps, not those of a step another client made meanwhile.
    x, y = random_batch(8, 21)
    client.set_optimizer("sgd", lr=0.01)
    model = local_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trajectory = []
    for _ in range(40):
        local_train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y), zero_grad=True)
        trajectory.append(local(model, "linear.weight").copy())
    answers: list[tuple[int, np.ndarray[Any, Any]]] = []

    def steps(c: gradwire.Client) -> None:
        for _ in range(20):
            result = c.train_step(x, y, zero_grad=True, fetch=["linear.weight"])
            answers.append((result.version, result.fetched[0].value))

    with gradwire.connect(address) as other:
        thread = threading.Thread(target=steps, args=(other,))
        thread.start()
        steps(client)
        thread.join(60)
    assert len(answers) == 40
    for version, value in answers:
        assert np.array_equal(value, trajectory[(version - 1) // 4 - 1]), version


def test_finish_makes_the_answer_under_the_lock_while_the_fetched_views_are_the_steps() -> None:
    # The servicer's `use` keeps views of live tensors and its `finish` joins them into the
    # reply: that is one version only if no other call can run in between. The race is too
    # short to catch through a channel, so this asks the lock itself.
    trainer = Trainer(device="cpu", seed=0)
    taken_elsewhere: list[bool] = []

    def finish(result: Any) -> Any:
        def try_lock() -> None:
            got = trainer._lock.acquire(blocking=False)
            taken_elsewhere.append(got)
            if got:
                trainer._lock.release()

        other = threading.Thread(target=try_lock)
        other.start()
        other.join(10)
        return result.fetched[0].clone()  # the copy a reply is made of

    x, y = ones_batch()
    after = trainer.train_step(
        x, y, fetch=[("linear.weight", ())], use=lambda s: s.part, finish=finish
    )
    assert taken_elsewhere == [False]
    assert torch.equal(after, trainer.read("linear.weight").value)
    trainer.close()


@pytest.fixture
def small_messages(monkeypatch: pytest.MonkeyPatch) -> Iterator[gradwire.Client]:
    """A server and client whose messages may hold 36 KiB (16 KiB of it values): many small
    fetched tensors then take more room in the answer with their names and shapes than with
    their values, as 2,150 slices do under the real 64 MiB. (Fewer than
    limits.MAX_SELECTORS: more are refused whatever their size.)"""
    monkeypatch.setattr(servicer.limits, "MAX_MESSAGE_BYTES", 36 * 1024)
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 16 * 1024)
    yield from _fresh_server_client()  # started after the limits change: its gRPC takes them


def test_many_fetched_tensors_are_counted_with_their_names_and_shapes(
    small_messages: gradwire.Client,
) -> None:
    client = small_messages
    version = client.list_tensors().version
    # 1,000 values of 4 bytes: 4,000 bytes, under the values' 16 KiB; their answer would
    # take 40 KB (2,000 took 80,020 bytes), over the message's 36 KiB. Refused before the
    # step, not after it with a transport error for a step that was applied.
    with pytest.raises(errors.ResourceExhausted) as caught:
        client.train_step(ONES_INPUT, ONES_TARGET, fetch=["conv1.weight[0, 0, 0, 0]"] * 1000)
    assert caught.value.reason == "FETCH_TOO_LARGE"
    assert "names and shapes" in caught.value.message
    assert client.list_tensors().version == version
    done = client.train_step(ONES_INPUT, ONES_TARGET, fetch=["conv1.weight[0, 0, 0, 0]"] * 100)
    assert len(done.fetched) == 100


def test_a_fetched_tensor_s_bound_counts_its_name_in_utf_8_and_both_its_shapes() -> None:
    """What a fetched tensor takes besides its values: its name's bytes (not characters),
    a varint's most for each dimension of its whole shape and of its selection's, 64 more."""
    assert described_bytes("conv1.weight", (16, 3, 3, 3), (3, 3)) == 12 + 10 * (4 + 2) + 64
    assert described_bytes("couche_é.output", (), ()) == 16 + 64


def test_a_watch_of_many_tensors_is_counted_with_their_names_and_shapes(
    small_messages: gradwire.Client,
) -> None:
    client = small_messages
    # Each item is counted at a bound of its size (116 bytes for these, besides the values),
    # not at its size (about 40): 900 of them are refused though they would fit.
    with pytest.raises(errors.ResourceExhausted) as caught:
        next(client.watch(["conv1.weight[0, 0, 0, 0]"] * 900, values=True, stats=False))
    assert caught.value.reason == "WATCH_TOO_LARGE"
    # As USE_STREAM and FETCH_TOO_LARGE say it (it said neither, found by a review): the
    # bytes of the items counted until the limit was passed.
    limit = int(caught.value.metadata["limit"])
    assert limit < int(caught.value.metadata["bytes"]) <= limit + 116 + 4
    # Statistics count too: 40 items of 100 bins each.
    with pytest.raises(errors.ResourceExhausted):
        next(client.watch(["conv1.weight"] * 40, bins=100))
    update = next(client.watch(["conv1.weight[0, 0, 0, 0]"] * 100, values=True, stats=False))
    assert len(update.tensors) == 100


def test_a_watch_exactly_at_the_value_limit_is_sent_and_one_item_more_is_refused(
    small_messages: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each scalar slice of conv1.weight counts 120 bytes: its name (12), a varint's most
    for each of its whole shape's 4 dimensions (40), 64 more, and its value (4). Ten take
    the limit to the byte, and are sent; eleven are refused, counted at 1,320. Statistics
    alone count no values (conv1.weight's 1,728 bytes), and a bound of their own: 128
    bytes and 10 a bin, with the name and both shapes, 12 + 80 + 64 + 128 + 100 = 384 for
    conv1.weight's with 10 bins."""
    client = small_messages
    monkeypatch.setattr(limits, "MAX_VALUE_BYTES", 1200)  # read at each call
    items = ["conv1.weight[0, 0, 0, 0]"] * 10
    update = next(client.watch(items, values=True, stats=False))
    assert len(update.tensors) == 10
    with pytest.raises(errors.ResourceExhausted) as caught:
        next(client.watch([*items, items[0]], values=True, stats=False))
    assert caught.value.metadata == {"bytes": "1320", "limit": "1200"}
    monkeypatch.setattr(limits, "MAX_VALUE_BYTES", 384)
    update = next(client.watch(["conv1.weight"], values=False, stats=True, bins=10))
    assert update["conv1.weight"].stats is not None
    monkeypatch.setattr(limits, "MAX_VALUE_BYTES", 383)
    with pytest.raises(errors.ResourceExhausted) as caught:
        next(client.watch(["conv1.weight"], values=False, stats=True, bins=10))
    assert caught.value.metadata == {"bytes": "384", "limit": "383"}


def test_a_step_the_model_refuses_leaves_its_zero_grad_undone() -> None:
    # TinyMLP's BatchNorm refuses a batch of one in training: the Forward fails after the
    # step's ZeroGrad ran, which must be undone with the rest (it once stayed: gradients gone,
    # version one up, on an answer that said nothing changed).
    with serving(TINY_MLP, seed=0) as (_, client):
        client.train_step(Fill.uniform(4, 16, seed=1), Fill.randint(0, 4, 4, seed=2))
        kinds = ("parameter", "gradient", "input", "output", "loss")
        names = [t.name for t in client.list_tensors().tensors if t.kind in kinds]
        before = {name: client.get(name) for name in names}
        version_before = version(client)
        with pytest.raises(errors.InvalidArgument) as caught:
            client.train_step(
                Fill.uniform(1, 16, seed=3), Fill.randint(0, 4, 1, seed=4), zero_grad=True
            )
        assert caught.value.reason == "MODEL_REFUSED"
        assert version(client) == version_before
        for name, value in before.items():
            assert value is not None, name
            assert np.array_equal(client.get(name), value), name


def test_a_train_that_fails_midway_says_how_many_steps_stay_applied(
    client: gradwire.Client,
) -> None:
    """A Train whose 27th step drew class 20 of 20 ended with that step's error alone,
    though the 26 steps before it stayed applied (the version had moved by 104), where a
    Train stopped by the server says how far it got (found by the nineteenth session's
    review). Step 1 draws a valid class with this seed; some later step does not."""
    start = client.list_tensors().version
    target = Fill.randint(0, 21, 1, seed=3)
    with pytest.raises(errors.InvalidArgument) as info:
        for _ in client.train(Fill.ones(1, 3, 10, 10), target, 200, every=1000):
            pass
    found = re.search(
        r"\(step (\d+) of 200: the (\d+) steps before it stay applied, state version (\d+)\)$",
        info.value.message,
    )
    assert found, info.value.message
    step, done, version = map(int, found.groups())
    assert "classes run from 0 to 19" in info.value.message
    assert done == step - 1 >= 1 and info.value.metadata["steps_done"] == str(done)
    assert version == client.list_tensors().version > start
    assert info.value.metadata["version"] == str(version)  # for a client to read, not parse
    # A first step that fails says nothing of steps before it: there were none.
    with pytest.raises(errors.InvalidArgument) as info:
        list(client.train(Fill.ones(1, 3, 10, 10), Fill.randint(20, 21, 1), 200, every=1000))
    assert "classes run from 0 to 19" in info.value.message
    assert "steps before it" not in info.value.message
    assert "steps_done" not in info.value.metadata
    assert client.list_tensors().version == version


@pytest.mark.parametrize("every", [1, 7, 100])
def test_a_train_asked_to_ends_at_its_first_loss_not_finite(
    client: gradwire.Client, every: int
) -> None:
    """stop_at_nonfinite: the run ends at the step whose loss is NaN or infinite, that step
    applied and reported whatever `every` says; without it the run goes on to its end (a
    run left going for a researcher who had walked away: found by a review of the CLI)."""
    data = Fill.normal(8, 3, 10, 10, seed=0), Fill.randint(0, 20, 8, seed=1)
    client.set_optimizer(lr=100.0)  # diverges within a few steps
    start = client.reset(seed=0)
    on = list(client.train(*data, 100, every=100))[-1]
    assert on.done and on.step == 100 and 1 < on.first_nonfinite_step < 100
    diverged = on.first_nonfinite_step
    start = client.reset(seed=0)
    progress = list(client.train(*data, 100, every=every, stop_at_nonfinite=True))
    last = progress[-1]
    assert last.stopped_at_nonfinite and not last.done
    assert last.step == last.first_nonfinite_step == diverged
    assert not any(p.stopped_at_nonfinite for p in progress[:-1])
    assert math.isnan(last.loss) or math.isinf(last.loss)
    assert last.version == start + 4 * diverged == client.list_tensors().version
    if every == 7:  # a run whose last step is its first not finite ends done, not short
        client.reset(seed=0)
        exact = list(client.train(*data, diverged, every=every, stop_at_nonfinite=True))[-1]
        assert exact.done and exact.first_nonfinite_step == exact.step == diverged
        assert not exact.stopped_at_nonfinite


def test_a_zero_grad_that_leaves_set_to_none_unset_sets_the_gradients_to_none(
    client: gradwire.Client, address: str, trainer: Trainer
) -> None:
    """ZeroGradRequest.set_to_none unset is True, as torch's default (a client in another
    language may leave it out)."""
    with grpc.insecure_channel(address) as channel:
        zero = channel.unary_unary(
            "/gradwire.v1.Trainer/ZeroGrad",
            request_serializer=pb.ZeroGradRequest.SerializeToString,
            response_deserializer=pb.ZeroGradResponse.FromString,
        )
        for request, to_none in [
            (pb.ZeroGradRequest(set_to_none=False), False),
            (pb.ZeroGradRequest(), True),
        ]:
            client.forward(ONES_INPUT, ONES_TARGET)
            client.backward()
            zero(request, timeout=10)
            grads = [p.grad for p in trainer.parameters.values()]
            if to_none:
                assert all(g is None for g in grads)
            else:
                assert all(g is not None and not g.any() for g in grads)


def test_a_reset_and_a_session_without_a_seed_draw_fresh_weights(client: gradwire.Client) -> None:
    """No seed is a fresh draw each time, not seed 0 (or any one seed)."""
    client.reset()
    first = client.get("conv1.weight")
    client.reset()
    assert not np.array_equal(client.get("conv1.weight"), first)
    one, other = client.open_session(), client.open_session()
    try:
        assert not np.array_equal(one.get("conv1.weight"), other.get("conv1.weight"))
    finally:
        one.close_session()
        other.close_session()


def test_a_train_request_leaving_zero_grad_unset_zeroes_each_step_and_may_take_the_most_steps(
    client: gradwire.Client,
) -> None:
    """TrainRequest.zero_grad unset is True: four versions a step, as a TrainStep with
    zero_grad. And steps may be limits.MAX_TRAIN_STEPS (the run cancelled after its first)."""
    source = pb.TensorSource(fill=ONES_INPUT.to_proto())
    target = pb.TensorSource(fill=ONES_TARGET.to_proto())
    request = pb.TrainRequest(input=source, target=target, steps=2)
    progress = list(client._stream("Train", request, timeout=30))
    assert [p.version for p in progress] == [4, 8]
    # Each step's gradients are its own, not added to the last one's: at lr 0, those of
    # one TrainStep, where two steps' would be twice them.
    client.set_optimizer("sgd", lr=0.0)
    client.train_step(ONES_INPUT, ONES_TARGET)
    one_step = np.asarray(client.get("conv1.weight.grad"))
    list(client._stream("Train", request, timeout=30))
    two_steps = np.asarray(client.get("conv1.weight.grad"))
    np.testing.assert_allclose(two_steps, one_step, rtol=1e-5, atol=1e-7)
    request.steps = limits.MAX_TRAIN_STEPS
    run = client._stream("Train", request, timeout=30)
    assert next(run).steps == limits.MAX_TRAIN_STEPS
    run.close()  # type: ignore[attr-defined]
    # One more is refused as the client would send it unchecked, naming the steps asked.
    request.steps = limits.MAX_TRAIN_STEPS + 1
    with pytest.raises(errors.InvalidArgument) as refused:
        next(client._stream("Train", request, timeout=30))
    assert refused.value.message == (
        f"steps must be between 1 and {limits.MAX_TRAIN_STEPS}, got {limits.MAX_TRAIN_STEPS + 1}"
    )


def test_a_fetch_is_counted_at_each_tensor_s_bound_of_its_answer() -> None:
    """Each fetched tensor counts its values, its name, 10 bytes for each dimension of its
    two shapes, 64 for the rest of its fields, and how PyTorch shows it (7, and 32 for a
    parameter's autograd node or MAX_GRAD_FN_BYTES for another's): the bytes a refusal
    reports, which a caller sizes its fetches by."""

    def bound(name: str, dims: int, grad_fn_bytes: int) -> int:
        """A fetch of one float32 value of `name`, its two shapes of `dims` dimensions in all."""
        return 4 + len(name) + 10 * dims + 64 + 7 + grad_fn_bytes

    trainer = Trainer(device="cpu", seed=0)
    x, y = ones_batch()
    one_value = bound("conv1.weight", 4 + 0, 32)
    loss = bound("loss", 0 + 0, MAX_GRAD_FN_BYTES)
    for fetch, counted in (
        ([("conv1.weight", ((0, 0, 0, 0),))] * 10, 10 * one_value),
        ([("loss", ())], loss),
        # the labels' own dtype, int64: 8 bytes a value, not the input's 4
        ([("target", ((0,),))], bound("target", 1 + 0, MAX_GRAD_FN_BYTES) + 4),
    ):
        with pytest.raises(OverLimit) as refused:
            trainer.train_step(x, y, fetch=fetch, use=repr, max_fetch_bytes=counted - 1)
        assert refused.value.metadata["bytes"] == str(counted)
        trainer.train_step(x, y, fetch=fetch, use=repr, max_fetch_bytes=counted)
    # Adam's step count: one float32 value, whatever its parameter's shape.
    trainer.set_optimizer(OptimizerSettings(kind="adam"))
    name = "optimizer.conv1.weight.step"
    step = bound(name, 0 + 0, MAX_GRAD_FN_BYTES)
    with pytest.raises(OverLimit) as refused:
        trainer.train_step(x, y, fetch=[(name, ())], use=repr, max_fetch_bytes=step - 1)
    assert refused.value.metadata["bytes"] == str(step)
    trainer.close()


class _DoubleHead(nn.Module):
    """A float64 layer on a float32 input, cast inside: the model computes in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(x.double())
        return out


def test_a_fetch_is_counted_in_the_model_s_dtype_and_the_output_s_whole_shape() -> None:
    """The output's bound before the pass is [N, num_classes] in the dtype the model
    computes in, here float64 on a float32 input, not the input's; a float64 parameter and
    its Step change count 8 bytes a value, not float32's 4."""
    spec = ModelSpec("DoubleHead", _DoubleHead, (4,), 3)
    trainer = Trainer(spec, device="cpu", seed=0)
    x, y = torch.ones(5, 4), torch.zeros(5, dtype=torch.long)

    def counted(name: str, values: int, dims: int, grad_fn_bytes: int) -> int:
        return 8 * values + len(name) + 10 * dims + 64 + 7 + grad_fn_bytes

    for fetch, bound in (
        ([("output", ())], counted("output", 5 * 3, 2 + 2, MAX_GRAD_FN_BYTES)),
        ([("head.weight", ())], counted("head.weight", 3 * 4, 2 + 2, 32)),
        ([("head.weight.delta", ())], counted("head.weight.delta", 12, 2 + 2, MAX_GRAD_FN_BYTES)),
    ):
        with pytest.raises(OverLimit) as refused:
            trainer.train_step(x, y, fetch=fetch, use=repr, max_fetch_bytes=bound - 1)
        assert refused.value.metadata["bytes"] == str(bound)
        trainer.train_step(x, y, fetch=fetch, use=repr, max_fetch_bytes=bound)
    trainer.close()


def test_a_fetch_bound_of_zero_bytes_refuses_any_fetch() -> None:
    """max_fetch_bytes=0 is a bound like any other, not "no bound" (None is that)."""
    trainer = Trainer(device="cpu", seed=0)
    x, y = ones_batch()
    with pytest.raises(OverLimit) as refused:
        trainer.train_step(x, y, fetch=[("loss", ())], use=repr, max_fetch_bytes=0)
    assert refused.value.reason == "FETCH_TOO_LARGE"
    assert trainer.train_step(x, y, fetch=[("loss", ())], use=repr, max_fetch_bytes=None)
    trainer.close()


class _FrozenBody(nn.Module):
    """A frozen body under a head that trains: the body's parameters get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.body(x)))
        return out


def test_a_step_of_a_model_with_frozen_parameters_steps_those_that_train() -> None:
    """Parameters without a gradient (frozen ones) are left as they are, and the step of the
    others is PyTorch's: a step is taken as done in backward (by the model's hooks) only
    where no parameter holds a gradient."""
    spec = ModelSpec("FrozenBody", _FrozenBody, (4,), 3)
    trainer = Trainer(spec, seed=0, optimizer=OptimizerSettings(lr=0.01))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _FrozenBody()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.linspace(-1, 1, 8).reshape(2, 4), torch.tensor([0, 2])
    for _ in range(2):
        result = trainer.train_step(x, y, zero_grad=True, use=lambda s: s)
        local_train_step(model, optimizer, x, y, zero_grad=True)
        assert result.parameters_updated == 2
    for name, p in model.named_parameters():
        value = trainer.read(name).value
        assert value is not None and torch.equal(value, p.detach()), name
    trainer.close()


def test_train_without_zero_grad_adds_up_each_step_s_gradients(client: gradwire.Client) -> None:
    """train(zero_grad=False) sends zero_grad False: three versions a step, no ZeroGrad, and
    at lr 0 two steps' gradients are twice one TrainStep's, where train() (zero_grad, the
    default) takes four versions a step."""
    assert [p.version for p in client.train(ONES_INPUT, ONES_TARGET, 2)] == [4, 8]
    assert [p.version for p in client.train(ONES_INPUT, ONES_TARGET, 2, zero_grad=False)] == [
        11,
        14,
    ]
    client.set_optimizer("sgd", lr=0.0)
    client.train_step(ONES_INPUT, ONES_TARGET)
    one_step = np.asarray(client.get("conv1.weight.grad"))
    list(client.train(ONES_INPUT, ONES_TARGET, 2, zero_grad=False))
    three_steps = np.asarray(client.get("conv1.weight.grad"))
    np.testing.assert_allclose(three_steps, 3 * one_step, rtol=1e-4, atol=1e-6)
