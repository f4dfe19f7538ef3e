"""Served models that do what their ModelSpec does not allow, or whose loss reaches no
parameter that trains: each call that meets it is refused with a reason and changes
nothing, and the session goes on serving. Found by a review of served models: a tuple
returned in evaluation mode broke the session (every later Forward, TrainStep and listing
INTERNAL until a Reset), a `squeeze()` at batch 1 failed a TrainStep's loss INTERNAL, a
loss on frozen layers alone failed Backward INTERNAL, and a TrainStep whose loss reached no
trainable parameter was refused only after its ZeroGrad, Forward and Backward had been
applied."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors
from gradwire_server.app import start
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer
from tests.serve_in_process import DEVICES

X, Y = np.ones((2, 4), np.float32), np.array([0, 1])


class EvalTuple(nn.Module):
    """Returns its attention too, in evaluation mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out: torch.Tensor = self.lin(x)
        return out if self.training else (out, out.softmax(-1))


class Squeezed(nn.Module):
    """`squeeze()` drops the batch dimension of a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x.unsqueeze(1)).squeeze()
        return out


class Counts(nn.Module):
    """Integer output for inputs whose first value is negative."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out.argsort(dim=1) if bool(x[0, 0] < 0) else out


class FrozenPath(nn.Module):
    """Fine-tuning gone wrong: the layers on the loss's path frozen, an unused one trains."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 8).requires_grad_(False)
        self.head = nn.Linear(8, 3).requires_grad_(False)
        self.adapter = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.backbone(x)))
        return out


class Saliency(nn.Module):
    """The loss needs a gradient (of the input), but reaches no parameter that trains."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3).requires_grad_(False)
        self.adapter = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.clone().requires_grad_())
        return out


class Expanded(nn.Module):
    """A parameter made with `expand`: one value seen in three places (a stride of 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(1).expand(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.scale
        return out


@pytest.fixture(params=DEVICES)
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[[type[nn.Module]], gradwire.Client]]:
    """Serves a model of (4,) -> 3 classes on each device in turn (DEVICES)."""
    running = []

    def served(model: type[nn.Module]) -> gradwire.Client:
        spec = ModelSpec(model.__name__, model, (4,), 3)
        run = start(Trainer(spec, device=request.param, seed=0), "127.0.0.1", 0)
        running.append(run)
        return gradwire.connect(f"127.0.0.1:{run.port}")

    try:
        yield served
    finally:
        for run in running:
            run.stop(grace=None)


def _bad_output(call: Callable[[], object], said: str) -> None:
    with pytest.raises(errors.FailedPrecondition) as caught:
        call()
    assert caught.value.reason == "BAD_MODEL_OUTPUT"
    assert said in caught.value.message, caught.value.message
    assert "the call changed nothing but letting go of" in caught.value.message


def test_a_tuple_returned_in_evaluation_mode_is_refused_and_the_session_goes_on(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    client = serve(EvalTuple)
    trained = client.train_step(X, Y)
    said = "EvalTuple returned a tuple for an input of 2 samples, where its ModelSpec makes it"
    _bad_output(lambda: client.forward(X, eval_mode=True), said)
    _bad_output(lambda: client.forward(X, Y, eval_mode=True), said)
    listing = client.list_tensors()  # INTERNAL before: the tuple was kept as the output
    assert listing.version == trained.version
    assert client.get("output").shape == (2, 3)  # the last pass's, a tensor
    assert client.train_step(X, Y).version == trained.version + 4
    assert client.forward(X).output_shape == (2, 3)


def test_an_output_of_another_shape_or_dtype_is_refused_before_its_loss(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    client = serve(Squeezed)
    one, label = np.ones((1, 4), np.float32), np.array([2])
    said = "Squeezed returned shape [3] for an input of 1 sample, where its ModelSpec makes it "
    _bad_output(lambda: client.forward(one, label), said + "a floating-point tensor [1, 3]")
    _bad_output(lambda: client.train_step(one, label), said)  # INTERNAL, in the loss
    assert client.list_tensors().version == 0
    assert client.train_step(X, Y).version == 4  # a batch of two is fine
    counts = serve(Counts)
    _bad_output(lambda: counts.forward(-X), "Counts returned dtype int64 for an input of 2")
    assert counts.forward(X, Y).loss is not None


def test_a_write_to_a_parameter_that_views_one_value_in_several_places_is_refused(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    # torch refuses to copy into it, and the write, unary or streamed, was answered INTERNAL.
    client = serve(Expanded)
    version = client.list_tensors().version
    for stream_above in (client.stream_above_bytes, 0):
        client.stream_above_bytes = stream_above
        for selector in ("scale", "scale[1:]"):
            with pytest.raises(errors.InvalidArgument) as caught:
                client.set(selector, [2.0, 3.0, 4.0][: 3 if selector == "scale" else 2])
            assert caught.value.reason == "READ_ONLY", caught.value
            assert "views one value in several places" in caught.value.message
            # The command beside the RPC, for the command line's user (found by a review of
            # the error catalogue: a 'gradwire set' was sent to FillParameters alone).
            assert "FillParameters (gradwire fill) sets" in caught.value.message
    assert client.list_tensors().version == version
    np.testing.assert_array_equal(client.get("scale"), [1.0, 1.0, 1.0])
    # One place of it, and a fill, write the one value it holds, as torch does.
    client.set("scale[1]", 5.0)
    np.testing.assert_array_equal(client.get("scale"), [5.0, 5.0, 5.0])
    client.fill_parameters(2.0, ["scale"])
    np.testing.assert_array_equal(client.get("scale"), [2.0, 2.0, 2.0])


def test_a_parameter_that_views_one_value_in_several_places_has_its_gradients_as_in_pytorch(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    # Its gradient, copied into the parameter's strides (three values into one memory),
    # failed every Backward INTERNAL, where backward() makes it contiguous; and a streamed
    # write to it, absent, was refused as a write to the parameter, where a unary one made it
    # (both found by a mutation review).
    client = serve(Expanded)
    for stream_above in (client.stream_above_bytes, 0):
        client.stream_above_bytes = stream_above
        client.zero_grad()  # to None: absent
        client.set("scale.grad", np.array([1.0, 2.0, 3.0], np.float32))
        np.testing.assert_array_equal(client.get("scale.grad"), [1.0, 2.0, 3.0])
    client.zero_grad()
    local = Expanded()  # scale is ones, as the served one's
    local.lin.load_state_dict(
        {k: torch.from_numpy(client.get(f"lin.{k}")) for k in ("weight", "bias")}
    )
    client.forward(X, Y)
    client.backward()
    nn.CrossEntropyLoss()(local(torch.from_numpy(X)), torch.from_numpy(Y)).backward()
    assert local.scale.grad is not None
    np.testing.assert_allclose(client.get("scale.grad"), local.scale.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(client.get("lin.weight.grad"), local.lin.weight.grad, rtol=1e-6)


def test_a_step_of_a_parameter_that_views_one_value_in_several_places_is_refused_clearly(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    """No optimizer can update such a parameter in place, PyTorch's neither (its step
    raises "more than one element of the written-to tensor refers to a single memory
    location"): a Step, and a TrainStep, answered that INTERNAL, its words in the server's
    log alone. Refused before anything changes (a TrainStep's ZeroGrad, Forward and Backward
    undone), saying whose it is to fix and how."""
    local = Expanded()
    nn.CrossEntropyLoss()(local(torch.from_numpy(X)), torch.from_numpy(Y)).backward()
    with pytest.raises(RuntimeError, match="refers to a single memory location"):
        torch.optim.SGD(local.parameters(), lr=0.1).step()
    client = serve(Expanded)
    said = (
        "scale of Expanded views one value in several places (a stride of 0, as expand "
        "makes it): no optimizer can update it in place, PyTorch's neither, and nothing was "
        "changed. Its operator's to fix: expand(...).clone() in the model's __init__ gives "
        "it a place for each value, requires_grad=False freezes it"
    )
    client.forward(X, Y)
    client.backward()
    version, weight = client.list_tensors().version, client.get("lin.weight")
    grad = client.get("lin.weight.grad")
    with pytest.raises(errors.FailedPrecondition) as refused:
        client.step()
    assert (refused.value.reason, refused.value.message) == ("EXPANDED_PARAMETER", said)
    with pytest.raises(errors.FailedPrecondition) as refused:
        client.train_step(X, Y)
    assert (refused.value.reason, refused.value.message) == ("EXPANDED_PARAMETER", said)
    assert client.list_tensors().version == version
    np.testing.assert_array_equal(client.get("lin.weight"), weight)
    np.testing.assert_array_equal(client.get("lin.weight.grad"), grad)  # all undone


def test_a_loss_on_frozen_layers_alone_is_refused_by_backward_and_train_step(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    client = serve(FrozenPath)
    client.forward(X, Y)
    with pytest.raises(errors.FailedPrecondition, match="depends on no parameter that trains"):
        client.backward()  # INTERNAL before: "element 0 of tensors does not require grad"
    with pytest.raises(errors.FailedPrecondition) as caught:
        client.train_step(X, Y)
    assert caught.value.reason == "NO_GRADIENTS"
    assert client.list_tensors().version == 1  # the Forward's alone


def test_a_train_step_whose_loss_reaches_no_trainable_parameter_changes_nothing(
    serve: Callable[[type[nn.Module]], gradwire.Client],
) -> None:
    client = serve(Saliency)
    client.forward(X, Y)
    assert client.backward() == 2  # as loss.backward(): it makes no parameter's gradient
    with pytest.raises(errors.FailedPrecondition, match="call Backward first"):
        client.step()
    with pytest.raises(errors.FailedPrecondition) as caught:
        client.train_step(X, Y, zero_grad=True)
    assert caught.value.reason == "NO_GRADIENTS"
    assert "reached no parameter that trains" in caught.value.message
    # Its ZeroGrad, Forward and Backward stayed applied: version 2 -> 5.
    assert client.list_tensors().version == 2


def test_a_factory_that_returns_one_model_is_refused_a_second_trainer_and_a_reset() -> None:
    # Sessions trained the one model (the default session's weights moved at version 0),
    # and a Reset kept its trained weights (found by a review of served models).
    torch.manual_seed(1)
    loaded = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    running = start(Trainer(ModelSpec("Loaded", lambda: loaded, (4,), 3), seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            client.train_step(X, Y)
            weights = client.get("0.weight")
            for call in (client.reset, client.open_session):
                with pytest.raises(errors.FailedPrecondition) as caught:
                    call()
                assert caught.value.reason == "SHARED_MODEL"
                assert "the factory must build a new model each call" in caught.value.message
            assert client.list_tensors().version == 4
            assert np.array_equal(client.get("0.weight"), weights)
            assert client.list_sessions().sessions == ()
    finally:
        running.stop(grace=None)
