"""The model's buffers kept across a forward pass (buffers.py), and over gRPC: a failed call
puts them back, whether a module changes one in place or replaces it; large constant ones are
not copied each pass."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors
from gradwire_server.app import start
from gradwire_server.buffers import ALWAYS_COPIED_BYTES, LEARNING_PASSES, Buffers
from gradwire_server.errors import InvalidInput
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer

BIG = ALWAYS_COPIED_BYTES // 4 + 1  # float32 values: just over the size always copied


class Counting(nn.Module):
    """Replaces a buffer each pass (`self.count = self.count + 1`), has BatchNorm, and reads a
    value (so it cannot run on meta tensors: fetches are checked after the forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.count: torch.Tensor
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count = self.count + 1
        out: torch.Tensor = self.bn(self.lin(x))
        if out.abs().max() > 1e9:
            out = out.clamp(-1e9, 1e9)
        return out


@pytest.fixture
def counting() -> Iterator[gradwire.Client]:
    running = start(Trainer(ModelSpec("Counting", Counting, (4,), 3), seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            yield client
    finally:
        running.stop(grace=None)


STATE = ["lin.weight", "lin.weight.grad", "bn.running_mean", "bn.num_batches_tracked", "count"]


def test_a_refused_train_step_puts_back_a_buffer_its_model_replaced(
    counting: gradwire.Client,
) -> None:
    client = counting
    x, y = np.random.default_rng(0).random((2, 4), dtype=np.float32), np.array([0, 1])
    client.train_step(x, y)
    before = {name: client.get(name) for name in STATE}
    version = client.list_tensors().version
    with pytest.raises(errors.OutOfRange):  # found after the forward pass
        client.train_step(x * 3, y, fetch=["lin.output[5]"])
    with pytest.raises(errors.InvalidArgument) as refused:  # BatchNorm: one sample
        client.forward(x[:1], y[:1])
    assert refused.value.reason == "MODEL_REFUSED"
    assert client.list_tensors().version == version
    for name, value in before.items():  # the count was 2 and 3 after them (a review)
        assert np.array_equal(client.get(name), value), name
    client.forward(x, y)
    assert client.get("count") == 2


class Masked(nn.Module):
    """A large constant buffer (a mask), which a refused batch of one sample changes (as no
    model should: the case a constant's copy is not there for), and a large one the model
    changes through `.data` each pass, which moves no version counter (an EMA's way)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.mask: torch.Tensor
        self.usage: torch.Tensor
        self.register_buffer("mask", torch.ones(BIG), persistent=False)
        self.register_buffer("usage", torch.zeros(BIG))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.usage.data.mul_(0.5).add_(1)
        if x.shape[0] == 1:
            self.mask.add_(1)
            raise ValueError("one sample is refused")  # the model's own refusal
        out: torch.Tensor = self.lin(x * self.mask[0])
        return out


def _copied(kept: Buffers) -> set[str]:
    return {k.key for k in kept.keep().kept if k.copy is not None}


def test_a_large_buffer_is_copied_until_its_first_passes_show_it_constant() -> None:
    model = Masked()
    kept = Buffers(model)
    for _ in range(LEARNING_PASSES):  # each compared after its pass
        record = kept.keep()
        assert {k.key for k in record.kept if k.copy is not None} == {"mask", "usage"}
        model(torch.ones(2, 4))
        kept.learn(record)
    # the mask unchanged by them all: a constant, copied no more; the usage changed by
    # them, through .data, with no version counter moving: copied before every pass
    assert _copied(kept) == {"usage"}
    record = kept.keep()  # a pass after: the constant, not copied, is learnt no more
    model(torch.ones(2, 4))
    kept.learn(record)
    assert _copied(kept) == {"usage"}
    assert _copied(Buffers(nn.BatchNorm1d(300_000))) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }  # a norm layer's, however large: its kernel moves no version counter


class Edges(nn.Module):
    """A buffer of exactly the size always copied, and two large ones changed through
    `.data` (no version counter moving) by one pass only: the first, and the second."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = 0
        self.edge: torch.Tensor
        self.first: torch.Tensor
        self.second: torch.Tensor
        self.register_buffer("edge", torch.zeros(ALWAYS_COPIED_BYTES // 4))
        self.register_buffer("first", torch.zeros(BIG))
        self.register_buffer("second", torch.zeros(BIG))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        if self.passes == 1:
            self.first.data.fill_(1)
        if self.passes == 2:
            self.second.data.fill_(1)
        return x


def _learn(kept: Buffers, model: nn.Module, x: torch.Tensor, passes: int) -> None:
    for _ in range(passes):
        record = kept.keep()
        model(x)
        kept.learn(record)


def test_a_buffer_changed_by_any_learning_pass_or_of_the_size_always_copied_stays_copied() -> None:
    """Unchanged by every pass after, a buffer one learning pass changed is still no
    constant, and one of exactly ALWAYS_COPIED_BYTES is copied whatever the passes show."""
    model = Edges()
    kept = Buffers(model)
    _learn(kept, model, torch.ones(2, 4), LEARNING_PASSES + 3)
    assert _copied(kept) == {"edge", "first", "second"}
    # A norm layer's statistics, however large, even after passes that left them as they were
    # (evaluation mode): a training pass's kernel changes them with no version counter moving.
    norm = nn.BatchNorm1d(300_000).eval()
    kept = Buffers(norm)
    _learn(kept, norm, torch.ones(2, 300_000), LEARNING_PASSES + 1)
    assert _copied(kept) == {"running_mean", "running_var", "num_batches_tracked"}
    # InstanceNorm's too, keeping running statistics: a norm layer as BatchNorm is.
    instance = nn.InstanceNorm1d(300_000, track_running_stats=True).eval()
    kept = Buffers(instance)
    _learn(kept, instance, torch.ones(1, 300_000, 2), LEARNING_PASSES + 1)
    assert _copied(kept) == {"running_mean", "running_var", "num_batches_tracked"}


def test_large_buffers_changed_in_a_failed_pass_are_put_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trainer = Trainer(ModelSpec("Masked", Masked, (4,), 3), seed=0)
    one, two = torch.ones(1, 4), torch.ones(2, 4)
    model = trainer._model
    assert isinstance(model, Masked)
    usage = model.usage.clone()
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(one)  # a first pass: both copied, both put back
    assert torch.equal(model.usage, usage) and bool((model.mask == 1).all())
    for _ in range(LEARNING_PASSES):
        trainer.forward(two)
    usage = model.usage.clone()
    with caplog.at_level(logging.WARNING), pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(one)  # the mask, a constant now, is not copied: it cannot be put back
    assert torch.equal(model.usage, usage)  # changed through .data, and put back
    assert bool((model.mask == 2).all())
    assert "buffer 'mask' changed in a failed forward pass and could not be put back" in (
        caplog.text
    )
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(one)  # seen changing: copied from then on, and put back
    assert bool((model.mask == 2).all())


class Cached(nn.Module):
    """Registers a buffer of positions when first needed, in its forward pass, and refuses a
    batch of one sample after that."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "positions" not in self._buffers:
            self.register_buffer("positions", torch.arange(4.0), persistent=False)
        if x.shape[0] == 1:
            raise ValueError("one sample is refused")
        out: torch.Tensor = self.lin(x + self.positions)
        return out


def test_a_buffer_registered_in_a_failed_pass_is_taken_away() -> None:
    # It stayed: listed, read and watched though no call that made it succeeded.
    trainer = Trainer(ModelSpec("Cached", Cached, (4,), 3), seed=0)
    model = trainer._model
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(torch.ones(1, 4))
    assert "positions" not in model._buffers
    assert "positions" not in model._non_persistent_buffers_set
    assert not any(t.name == "positions" for t in trainer.list_tensors().tensors)
    trainer.forward(torch.ones(2, 4))  # made again, and kept by a pass that succeeds
    assert torch.equal(model.positions, torch.arange(4.0))
    assert any(t.name == "positions" for t in trainer.list_tensors().tensors)


class Growing(nn.Module):
    """Makes a layer with running statistics when first needed, in its forward pass, and
    refuses a batch of one sample, or of three, after that layer has run."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "norm" not in self._modules:
            self.norm = nn.BatchNorm1d(3)
        out: torch.Tensor = self.norm(self.lin(x)) if x.shape[0] > 1 else self.lin(x)
        if x.shape[0] in (1, 3):
            raise ValueError(f"{x.shape[0]} samples are refused")
        return out


def test_a_layer_made_in_a_failed_pass_is_taken_away_and_one_made_before_put_back() -> None:
    # A layer a failed pass made stayed, with its buffers; once made, a failed pass left its
    # running statistics changed, for the buffers walked were the modules the model was made
    # with (the forty-fifth and forty-sixth sessions' reviews).
    trainer = Trainer(ModelSpec("Growing", Growing, (4,), 3), seed=0)
    model = trainer._model
    with pytest.raises(InvalidInput, match="1 samples"):
        trainer.forward(torch.ones(1, 4))
    assert "norm" not in model._modules
    assert list(model.state_dict()) == ["lin.weight", "lin.bias"]
    x = torch.arange(8.0).reshape(2, 4)
    trainer.forward(x)  # made again, and kept by a pass that succeeds
    norm = model.get_submodule("norm")
    assert isinstance(norm, nn.BatchNorm1d)
    statistics = {k: v.clone() for k, v in norm.state_dict().items()}
    assert int(statistics["num_batches_tracked"]) == 1
    with pytest.raises(InvalidInput, match="3 samples"):
        trainer.forward(torch.arange(12.0).reshape(3, 4))
    assert model.get_submodule("norm") is norm
    for key, value in norm.state_dict().items():
        assert torch.equal(value, statistics[key]), key


class Swapping(nn.Module):
    """Replaces its layer with a new one of the same name, then refuses a batch of one
    sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin = nn.Linear(4, 3)
        if x.shape[0] == 1:
            raise ValueError("one sample is refused")
        out: torch.Tensor = self.lin(x)
        return out


def test_a_layer_a_failed_pass_replaced_under_its_name_is_put_back() -> None:
    trainer = Trainer(ModelSpec("Swapping", Swapping, (4,), 3), seed=0)
    model = trainer._model
    lin = model.get_submodule("lin")
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(torch.ones(1, 4))
    assert model.get_submodule("lin") is lin


class Replacing(nn.Module):
    """Replaces a large buffer each pass, and deletes a buffer it holds no tensor in (as a
    model might that sets one up lazily), then refuses a batch of one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.total: torch.Tensor
        self.register_buffer("total", torch.zeros(BIG))
        self.register_buffer("spare", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.total = self.total + 1
        if x.shape[0] == 1:
            del self.spare
            raise ValueError("one sample is refused")
        out: torch.Tensor = self.lin(x)
        return out


def test_a_large_buffer_its_model_replaces_is_copied_every_pass_and_put_back() -> None:
    trainer = Trainer(ModelSpec("Replacing", Replacing, (4,), 3), seed=0)
    model = trainer._model
    assert isinstance(model, Replacing)
    for _ in range(LEARNING_PASSES + 1):
        trainer.forward(torch.ones(2, 4))
    assert _copied(trainer._buffers_kept) == {"total"}  # never taken for a constant
    total = model.total
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(torch.ones(1, 4))
    assert model.total is total and bool((total == LEARNING_PASSES + 1).all())
    assert "spare" in model._buffers and model._buffers["spare"] is None


class Dropping(nn.Module):
    """Deletes its cache (a buffer not persistent, registered first) in its forward pass,
    and refuses a batch of one sample after that."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("cache", torch.ones(4), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        del self.cache
        if x.shape[0] == 1:
            raise ValueError("one sample is refused")
        out: torch.Tensor = self.lin(x)
        return out


@pytest.mark.parametrize("run", ["failed pass", "meta run"])
def test_a_buffer_deleted_comes_back_as_it_was_not_persistent_in_its_place(run: str) -> None:
    # It came back persistent, and last: listed in another order, and in checkpoints, which
    # a new model then refused (a review).
    trainer = Trainer(ModelSpec("Dropping", Dropping, (4,), 3), seed=0)
    model = trainer._model
    cache = model.get_buffer("cache")
    if run == "failed pass":
        with pytest.raises(InvalidInput, match="one sample"):
            trainer.forward(torch.ones(1, 4))
    else:
        trainer._run_on_meta((2, 4), torch.float32)
    assert list(model._buffers) == ["cache", "count"]
    assert model._non_persistent_buffers_set == {"cache"}
    assert model.get_buffer("cache") is cache
    assert list(model.state_dict()) == ["count", "lin.weight", "lin.bias"]


class Reordering(nn.Module):
    """Registers its cache again (deleted, then registered anew: last now), then refuses a
    batch of one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("cache", torch.ones(4), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.get_buffer("cache")
        del self.cache
        self.register_buffer("cache", cache, persistent=False)
        if x.shape[0] == 1:
            raise ValueError("one sample is refused")
        out: torch.Tensor = self.lin(x)
        return out


def test_buffers_a_failed_pass_reordered_come_back_in_their_order() -> None:
    trainer = Trainer(ModelSpec("Reordering", Reordering, (4,), 3), seed=0)
    model = trainer._model
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(torch.ones(1, 4))
    assert list(model._buffers) == ["cache", "count"]


class Inference(nn.Module):
    """A table made under torch.inference_mode: it has no version counter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.table: torch.Tensor
        with torch.inference_mode():
            self.register_buffer("table", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x + self.table)
        return out


def test_a_model_with_an_inference_tensor_for_a_buffer_trains() -> None:
    # Reading its version counter failed every Forward and TrainStep INTERNAL (a review).
    trainer = Trainer(ModelSpec("Inference", Inference, (4,), 3), seed=0)
    result = trainer.train_step(torch.ones(2, 4), torch.tensor([0, 1]), use=lambda s: s)
    assert result.version == 3 and result.loss == result.loss  # a number, not NaN
    assert torch.equal(trainer.read("table").value, torch.arange(4.0))  # type: ignore[arg-type]


class LargeInference(nn.Module):
    """A large table made under torch.inference_mode, then a count it changes in place, and
    a layer slot left empty (None); refuses a batch of one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.table: torch.Tensor
        self.count: torch.Tensor
        with torch.inference_mode():
            self.register_buffer("table", torch.zeros(BIG))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_module("spare", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if x.shape[0] == 1:
            raise ValueError("one sample is refused")
        out: torch.Tensor = self.lin(x + self.table[:4])
        return out


def test_a_large_inference_tensor_and_an_empty_layer_slot_pass_and_fail_as_others() -> None:
    """A large buffer with no version counter is neither learnt nor checked after a failed
    pass (reading its counter raised, and the buffers after it were not put back), and a
    layer slot holding None is walked past, not into."""
    trainer = Trainer(ModelSpec("LargeInference", LargeInference, (4,), 3), seed=0)
    model = trainer._model
    assert isinstance(model, LargeInference)
    for _ in range(LEARNING_PASSES + 1):
        trainer.forward(torch.ones(2, 4))
    count = int(model.count)
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(torch.ones(1, 4))
    assert int(model.count) == count == LEARNING_PASSES + 1  # put back
    assert "spare" in model._modules and model._modules["spare"] is None


class Rotary(nn.Module):
    """A complex table, as rotary embeddings keep theirs: a dtype the wire does not carry."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.freqs: torch.Tensor
        self.register_buffer("freqs", torch.polar(torch.ones(3), torch.arange(3.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.freqs.real
        return out


def test_a_buffer_of_a_dtype_the_wire_does_not_carry_is_named_not_listed() -> None:
    # Listed, it made ListTensors INTERNAL, and a TrainStep fetching it applied its step and
    # then answered INTERNAL (found by a review).
    trainer = Trainer(ModelSpec("Rotary", Rotary, (4,), 3), seed=0)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            assert "freqs" not in client.list_tensors().names()
            with pytest.raises(errors.NotFound) as caught:
                client.get("freqs")
            assert "freqs is a buffer of complex64, which the wire does not carry" in (
                caught.value.message
            )
            x, y = np.ones((2, 4), np.float32), np.array([0, 1])
            with pytest.raises(errors.NotFound):
                client.train_step(x, y, fetch=["freqs"])
            assert client.list_tensors().version == 0  # refused before the step
    finally:
        running.stop(grace=None)


class NamedLoss(nn.Module):
    """A buffer under the name of one of a Forward's tensors ("loss")."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("loss", torch.full((2,), 7.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


def test_a_buffer_named_as_a_forward_s_tensor_is_listed_once_as_that_tensor() -> None:
    """The name reads the last Forward's loss, so it is listed once, as that: not a second
    time for the buffer, which no read can reach."""
    running = start(Trainer(ModelSpec("NamedLoss", NamedLoss, (4,), 3), seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            client.forward(np.ones((2, 4), np.float32), np.array([0, 1]))
            listed = [t for t in client.list_tensors().tensors if t.name == "loss"]
            assert [(t.kind, t.shape) for t in listed] == [("loss", ())]
            loss = client.get("loss")
            assert loss is not None and loss.shape == ()
    finally:
        running.stop(grace=None)


class Narrow(nn.Module):
    """Buffers of the integer dtypes the wire carries widened: uint8 and int16 (as int32)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("levels", torch.arange(4, dtype=torch.uint8))
        self.register_buffer("offsets", torch.arange(4, dtype=torch.int16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


def test_buffers_of_dtypes_sent_widened_are_listed_as_sent_and_read() -> None:
    # Taken for dtypes the wire does not carry, they were left out and said to be so; before
    # that, they made ListTensors INTERNAL (a review).
    running = start(Trainer(ModelSpec("Narrow", Narrow, (4,), 3), seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            listed = {t.name: t.dtype for t in client.list_tensors().tensors}
            assert listed["levels"] == listed["offsets"] == "int32"
            assert client.get("levels").tolist() == [0, 1, 2, 3]
            assert client.get("offsets[1:]").tolist() == [1, 2, 3]
    finally:
        running.stop(grace=None)


class CountsInTraining(nn.Module):
    """A large buffer that training passes alone change (as BatchNorm's statistics), in
    place; a batch of one sample is refused in training, after the change."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen: torch.Tensor
        self.register_buffer("seen", torch.zeros(BIG))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.add_(1)
            if x.shape[0] == 1:
                raise ValueError("one sample is refused in training")
        out: torch.Tensor = self.lin(x)
        return out


def test_passes_in_evaluation_mode_do_not_make_a_buffer_training_changes_a_constant() -> None:
    """Evaluation-mode Forwards leave such a buffer as it is: learnt from, they made it a
    constant, no longer copied, and a failed training pass then left it changed."""
    trainer = Trainer(ModelSpec("CountsInTraining", CountsInTraining, (4,), 3), seed=0)
    model = trainer._model
    assert isinstance(model, CountsInTraining)
    for _ in range(LEARNING_PASSES + 1):
        trainer.forward(torch.ones(2, 4), eval_mode=True)
    with pytest.raises(InvalidInput, match="one sample"):
        trainer.forward(torch.ones(1, 4))
    assert bool((model.seen == 0).all())  # put back
    trainer.forward(torch.ones(2, 4))
    assert bool((model.seen == 1).all())
