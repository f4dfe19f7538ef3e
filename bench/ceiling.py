"""The ceiling of the step figures: bare gRPC calls whose handlers run the trainer's own work.

A floor (bench/floor.py) carries bytes and does nothing; the step targets compare gradwire
with the same step run in-process, so no floor tells how much of a remote step's extra time
any gRPC call would pay and how much is gradwire's. Each method here reads what its call
needs (a batch size, a tensor's name, whether to zero in place) as plain text, calls the
same `Trainer` method the servicer calls, through the same hand-off to the torch thread,
and answers nothing (a read: its values' bytes). Around it, none of gradwire's code:
served beside the floor (`app.start`'s `extra_handlers`), which gradwire's call
interceptor passes through unwrapped; no request parsing, session, slot, request log,
version guard or reply encoding in the server; no deadline, request id or metadata in the
client. Plain generic handlers and calls, where gradwire's server registers its methods
(registering either end made no difference in loops: docs/performance-history.md,
eighteenth session). Its time against the in-process step is what a bare grpcio call
around that step gets on the machine at hand; gradwire's time against it is what gradwire
itself costs.
"""

from __future__ import annotations

from typing import Any

import grpc

from gradwire_server.fills import FillSpec
from gradwire_server.results import Selection
from gradwire_server.trainer import Trainer

SERVICE = "gradwire.bench.Ceiling"
#: What the tutorial's calls read: conv1.weight[0][0][0], as the benchmark's client does.
READ = ("conv1.weight", [(0,), (0,), (0,)])


def batch(size: int) -> tuple[FillSpec, FillSpec]:
    """The benchmark's step data: ones, an image batch of `size` and its class indices."""
    return FillSpec("ones", (size, 3, 10, 10)), FillSpec("ones", (size,))


def _identity(selection: Selection) -> Selection:
    return selection


def handler(trainer: Trainer) -> grpc.GenericRpcHandler:
    """The ceiling's methods, each running `trainer`'s own method as the servicer does."""

    def train_step(request: bytes, context: grpc.ServicerContext) -> bytes:
        trainer.train_step(*batch(int(request)), zero_grad=True, use=_identity)
        return b""

    def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
        trainer.forward(*batch(int(request)))
        return b""

    def backward(request: bytes, context: grpc.ServicerContext) -> bytes:
        trainer.backward()
        return b""

    def step(request: bytes, context: grpc.ServicerContext) -> bytes:
        trainer.step()
        return b""

    def zero_grad(request: bytes, context: grpc.ServicerContext) -> bytes:
        trainer.zero_grad(set_to_none=request != b"zeros")
        return b""

    def read(request: bytes, context: grpc.ServicerContext) -> bytes:
        name, index = READ
        value = trainer.read(request.decode() or name, index).value
        return b"" if value is None else value.numpy().tobytes()

    methods = {
        "TrainStep": train_step,
        "Forward": forward,
        "Backward": backward,
        "Step": step,
        "ZeroGrad": zero_grad,
        "Read": read,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(m) for name, m in methods.items()}
    )


class CeilingClient:
    """Calls to the ceiling service on an existing channel, bare: no deadline, no metadata."""

    def __init__(self, channel: grpc.Channel) -> None:
        def method(name: str) -> Any:
            return channel.unary_unary(f"/{SERVICE}/{name}")

        self._train_step, self._forward = method("TrainStep"), method("Forward")
        self._backward, self._step = method("Backward"), method("Step")
        self._zero_grad, self._read = method("ZeroGrad"), method("Read")

    def train_step(self, size: int) -> None:
        self._train_step(str(size).encode())

    def forward(self, size: int) -> None:
        self._forward(str(size).encode())

    def backward(self) -> None:
        self._backward(b"")

    def step(self) -> None:
        self._step(b"")

    def zero_grad(self, *, set_to_none: bool = True) -> None:
        self._zero_grad(b"" if set_to_none else b"zeros")

    def read(self, name: str = "") -> None:
        """READ's index of `name` (READ's tensor when empty)."""
        self._read(name.encode())

    def tutorial(self) -> None:
        """The tutorial's five calls, as the benchmark's client makes them through gradwire."""
        self.forward(8)
        self.backward()
        self.step()
        self.zero_grad()
        self.read()
