"""Model-based: random sequences of calls against the server and against plain PyTorch.

Hypothesis drives Reset / Forward / Backward / Step / ZeroGrad / GetTensor (unary, or
streamed with a write landing after its first chunk) / SetTensor (a number, or a whole
parameter in chunks) / TrainStep in any order, on a real server and on a
local model run as the tutorial runs it, in the default session and in sessions it opens and
closes, each with a local model of its own. After every call the answers agree (values,
versions, and which calls are refused and why), and every session's version and weights are
its own reference's: a call in one session changes no other. After every sequence all
parameters and gradients are equal bit for bit; a closed session's id is refused
(NOT_FOUND), never taken for the default session.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from torch import nn

import gradwire
from gradwire import codec, errors, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.fill import Fill
from gradwire_server.app import Running, start
from gradwire_server.trainer import Trainer
from tests.reference import Simple
from tests.test_streaming import CHUNK_PATH

#: Sequences per run; the issue asks for at least 1000 in CI.
SEQUENCES = int(os.environ.get("GRADWIRE_MODEL_SEQUENCES", "1000"))
PARAMETERS = ("conv1.weight", "conv2.weight", "linear.weight")
#: Sessions a sequence keeps open at most besides the default one (the server allows 8).
MAX_OPENED = 3
#: Which session a call acts on: an index into the open ones, the default session first.
WHICH = st.integers(0, MAX_OPENED)


def same(a: np.ndarray | None, b: torch.Tensor | None) -> bool:
    """Equal bit for bit (so NaN equals NaN: lr=1 steps may diverge, identically)."""
    if a is None or b is None:
        return a is None and b is None
    local = b.detach().numpy()
    return a.dtype == local.dtype and a.shape == local.shape and a.tobytes() == local.tobytes()


def same_loss(a: float | None, b: float) -> bool:
    return a is not None and (a == b or (math.isnan(a) and math.isnan(b)))


class Reference:
    """The tutorial's objects in plain PyTorch, with gradwire's rules for refused calls."""

    def __init__(self, seed: int) -> None:
        self.version = 0
        self.reset(seed)

    def reset(self, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = Simple()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.loss: torch.Tensor | None = None
        self.graph_alive = False
        self.changed = False
        self.version += 1

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.loss = nn.CrossEntropyLoss()(self.model(x), y)
        self.graph_alive, self.changed = True, False
        self.version += 1
        return float(self.loss.item())

    def backward(self, retain: bool) -> str | None:
        if self.loss is None:
            return "NO_LOSS"
        if not self.graph_alive:
            return "GRAPH_FREED"
        if self.changed:
            return "GRAPH_STALE"
        self.loss.backward(retain_graph=retain)
        self.graph_alive = retain
        self.version += 1
        return None

    def step(self) -> str | None:
        if all(p.grad is None for p in self.model.parameters()):
            return "NO_GRADIENTS"
        self.optimizer.step()
        self.changed = True
        self.version += 1
        return None

    def zero_grad(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.version += 1

    def fill(self, name: str, value: float) -> None:
        with torch.no_grad():
            dict(self.model.named_parameters())[name].fill_(value)
        self.changed = True
        self.version += 1

    def write(self, name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            dict(self.model.named_parameters())[name].copy_(value)
        self.changed = True
        self.version += 1

    def tensor(self, name: str) -> torch.Tensor | None:
        params = dict(self.model.named_parameters())
        if name.endswith(".grad"):
            return params[name.removesuffix(".grad")].grad
        return params[name].detach()


@dataclass
class Session:
    """A session on the server (the default one, or one opened) and its own reference."""

    client: gradwire.Client  # a client whose calls act on this session
    local: Reference
    base: int  # the server's count of this session's versions when the reference's began

    def check_version(self, remote: int) -> None:
        assert remote - self.base == self.local.version


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    running = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0)
    yield running
    running.stop(grace=None)


def _fills(batch: int, seed: int) -> tuple[Fill, Fill, torch.Tensor, torch.Tensor]:
    x = Fill.uniform(batch, 3, 10, 10, low=-1.0, high=1.0, seed=seed)
    y = Fill.randint(0, 20, batch, seed=seed + 1)
    local_x = torch.empty(batch, 3, 10, 10).uniform_(
        -1.0, 1.0, generator=torch.Generator().manual_seed(seed)
    )
    local_y = torch.randint(0, 20, (batch,), generator=torch.Generator().manual_seed(seed + 1))
    return x, y, local_x, local_y


def test_random_sequences_agree_with_pytorch(server: Running) -> None:
    client = gradwire.connect(f"127.0.0.1:{server.port}", timeout=30)

    class Sequences(RuleBasedStateMachine):
        @initialize(seed=st.integers(0, 3), seeds=st.lists(st.integers(0, 3), max_size=1))
        def begin(self, seed: int, seeds: list[int]) -> None:
            # The server's default session counts versions across sequences; it is first.
            default = Session(client, Reference(seed), client.reset(seed) - 1)
            default.check_version(default.base + 1)
            self.sessions = [default]
            for opened in seeds:  # sessions open from the start: more calls to act on them
                self.open_session(opened)

        def at(self, which: int) -> Session:
            return self.sessions[which % len(self.sessions)]

        def agree(self, s: Session, call: Callable[[], object], reason: str | None) -> None:
            """Runs the call the reference ran (reason None) or refused, and checks the server
            did the same: the same state version after it, or the same refusal."""
            if reason is None:
                call()
                s.check_version(s.client.list_tensors().version)
                return
            with pytest.raises(errors.FailedPrecondition) as info:
                call()
            assert info.value.reason == reason

        @rule(which=WHICH, batch=st.integers(1, 4), seed=st.integers(0, 2**16))
        def forward(self, which: int, batch: int, seed: int) -> None:
            s = self.at(which)
            x, y, lx, ly = _fills(batch, seed)
            result = s.client.forward(x, y)
            assert same_loss(result.loss, s.local.forward(lx, ly))
            s.check_version(result.version)

        @rule(which=WHICH, batch=st.integers(1, 4), seed=st.integers(0, 2**16), zero=st.booleans())
        def train_step(self, which: int, batch: int, seed: int, zero: bool) -> None:
            s = self.at(which)
            x, y, lx, ly = _fills(batch, seed)
            if zero:
                s.local.zero_grad(set_to_none=True)
            loss = s.local.forward(lx, ly)
            assert s.local.backward(retain=False) is None
            assert s.local.step() is None
            result = s.client.train_step(x, y, zero_grad=zero, fetch=["conv2.weight.grad[0, 0]"])
            assert same_loss(result.loss, loss)
            grad = s.local.tensor("conv2.weight.grad")
            assert grad is not None and same(result.fetched[0].value, grad[0, 0])
            s.check_version(result.version)

        @rule(which=WHICH, retain=st.booleans())
        def backward(self, which: int, retain: bool) -> None:
            s = self.at(which)
            self.agree(s, lambda: s.client.backward(retain_graph=retain), s.local.backward(retain))

        @rule(which=WHICH)
        def step(self, which: int) -> None:
            s = self.at(which)
            self.agree(s, s.client.step, s.local.step())

        @rule(which=WHICH, set_to_none=st.booleans())
        def zero_grad(self, which: int, set_to_none: bool) -> None:
            s = self.at(which)
            s.local.zero_grad(set_to_none)
            s.check_version(s.client.zero_grad(set_to_none=set_to_none))

        @rule(which=WHICH, name=st.sampled_from(PARAMETERS), value=st.floats(-1, 1, width=32))
        def set_tensor(self, which: int, name: str, value: float) -> None:
            s = self.at(which)
            s.local.fill(name, value)
            s.check_version(s.client.set(name, np.float32(value)))

        @rule(which=WHICH, name=st.sampled_from(PARAMETERS), seed=st.integers(0, 2**16))
        def set_tensor_streamed(self, which: int, name: str, seed: int) -> None:
            """A whole parameter sent in chunks: the server may keep the memory it came in."""
            s = self.at(which)
            local = s.local.tensor(name)
            assert local is not None
            value = np.random.default_rng(seed).standard_normal(local.shape).astype(np.float32)
            s.local.write(name, torch.from_numpy(value))
            above = s.client.stream_above_bytes
            s.client.stream_above_bytes = 0
            try:
                s.check_version(s.client.set(name, value))
            finally:
                s.client.stream_above_bytes = above

        @rule(which=WHICH, name=st.sampled_from([*PARAMETERS, *(p + ".grad" for p in PARAMETERS)]))
        def get_tensor(self, which: int, name: str) -> None:
            s = self.at(which)
            read = s.client.read(f"{name}[0]")
            local = s.local.tensor(name)
            assert same(read.value, None if local is None else local[0])
            s.check_version(read.version)

        @rule(
            which=WHICH,
            name=st.sampled_from([*PARAMETERS, *(p + ".grad" for p in PARAMETERS)]),
            interrupt=st.booleans(),
        )
        def get_tensor_streamed(self, which: int, name: str, interrupt: bool) -> None:
            """A whole tensor read through GetTensorStream in small chunks, sent from the
            server's live memory; with `interrupt`, a write to that tensor (a fill, or
            zeroing the gradients) lands after the first chunk. The read still gives the
            values it started with, at its version."""
            s = self.at(which)
            local = s.local.tensor(name)
            before = None if local is None else local.clone()
            version = s.local.version
            request = pb.GetTensorRequest(name=name, chunk_bytes=4096)
            stream = s.client._stream("GetTensorStream", request)
            messages = [next(stream)]
            if interrupt and name.endswith(".grad"):
                s.local.zero_grad(set_to_none=False)
                s.check_version(s.client.zero_grad(set_to_none=False))
            elif interrupt:
                s.local.fill(name, 0.5)
                s.check_version(s.client.set(name, np.float32(0.5)))
            messages.extend(stream)
            splits = [wire.split(data, pb.GetTensorChunk) for data in messages]
            assert {split.message.version - s.base for split in splits} == {version}
            if before is None:
                assert not splits[0].message.HasField("chunk")
                return
            assembler = codec.Assembler(name)
            for split in splits:
                assembler.add(split, CHUNK_PATH, split.message.chunk)
            assert same(assembler.numpy(), before)

        @rule(which=WHICH, seed=st.integers(0, 3))
        def reset(self, which: int, seed: int) -> None:
            s = self.at(which)
            s.local.reset(seed)
            s.check_version(s.client.reset(seed))

        @precondition(lambda self: len(self.sessions) <= MAX_OPENED)
        @rule(seed=st.integers(0, 3))
        def open_session(self, seed: int) -> None:
            # A new session's versions start at 0, its reference's at 1 (its first reset);
            # the invariant reads its version and weights.
            self.sessions.append(Session(client.open_session(seed=seed), Reference(seed), -1))

        # Only while two or more are open: sequences are short, and a lone session closed at
        # once would leave little to act on (every sequence's teardown closes the rest).
        @precondition(lambda self: len(self.sessions) > 2)
        @rule(which=WHICH)
        def close_session(self, which: int) -> None:
            self.close(self.sessions.pop(1 + which % (len(self.sessions) - 1)))

        def close(self, s: Session) -> None:
            """Closes the session, then checks that a call with its id is refused, not run
            in some other session (the invariant and teardown check the others)."""
            closed = s.client.session
            s.client.close_session()
            s.client.session = closed
            try:
                with pytest.raises(errors.NotFound) as info:
                    s.client.zero_grad()
                assert info.value.reason == "UNKNOWN_SESSION"
            finally:
                s.client.session = None

        @invariant()
        def every_session_agrees(self) -> None:
            """Each session's version and first weights are its own reference's, whichever
            session the last call acted on."""
            for s in getattr(self, "sessions", ()):
                read = s.client.read("conv1.weight[0][0]")
                local = s.local.tensor("conv1.weight")
                assert local is not None and same(read.value, local[0][0])
                s.check_version(read.version)

        def teardown(self) -> None:
            sessions = getattr(self, "sessions", [])
            try:
                for s in sessions:
                    for name in (*PARAMETERS, *(p + ".grad" for p in PARAMETERS)):
                        assert same(s.client.get(name), s.local.tensor(name)), name
            except BaseException:
                for s in sessions[1:]:  # the server's limit holds across sequences
                    s.client.close_session()
                raise
            for s in sessions[1:]:
                self.close(s)
            if len(sessions) > 1:  # the calls with closed ids changed nothing here
                sessions[0].check_version(client.list_tensors().version)

    Sequences.TestCase.settings = settings(
        max_examples=SEQUENCES,
        stateful_step_count=8,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    try:
        Sequences.TestCase().runTest()
    finally:
        client.close()
