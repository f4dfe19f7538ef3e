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
from gradwire_server.buffers import ALWAYS_COPIED_BYTES, Buffers
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
    """A large constant buffer (a mask) and a large one it changes in place each pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.mask: torch.Tensor
        self.seen: torch.Tensor
        self.register_buffer("mask", torch.ones(BIG), persistent=False)
        self.register_buffer("seen", torch.zeros(BIG))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add_(1)
        if x.shape[0] == 1:
            raise ValueError("one sample is refused")  # the model's own refusal
        out: torch.Tensor = self.lin(x * self.mask[0])
        return out


def test_a_large_buffer_is_copied_only_once_a_pass_has_changed_it() -> None:
    model = Masked()
    kept = Buffers(model)
    first = {k.key: k for k in kept.keep()}
    assert first["mask"].copy is None and first["seen"].copy is None  # neither seen to change
    model(torch.ones(2, 4))
    kept.learn(list(first.values()))
    second = {k.key: k for k in kept.keep()}
    assert second["mask"].copy is None  # a constant: never copied
    assert second["seen"].copy is not None and torch.equal(second["seen"].copy, model.seen)
    small = {k.key: k for k in Buffers(nn.BatchNorm1d(3)).keep()}
    assert all(k.copy is not None for k in small.values())


def test_a_large_buffer_changed_in_a_failed_pass_is_put_back_from_the_second_pass_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trainer = Trainer(ModelSpec("Masked", Masked, (4,), 3), seed=0)
    one, two = torch.ones(1, 4), torch.ones(2, 4)
    model = trainer._model
    assert isinstance(model, Masked)
    with caplog.at_level(logging.WARNING), pytest.raises(Exception, match="one sample"):
        trainer.forward(one)  # the first pass to change it: nothing to put it back from
    assert model.seen[0] == 1
    assert "buffer 'seen' changed in a failed forward pass" in caplog.text
    trainer.forward(two)
    with pytest.raises(Exception, match="one sample"):
        trainer.forward(one)
    assert model.seen[0] == 2 and bool((model.seen == 2).all())


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
