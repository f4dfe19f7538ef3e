"""What a Trainer's calls return: frozen dataclasses of plain values and tensors, which the
servicer turns into messages (convert.py), and the kinds of tensor a name can stand for.
No lock and no model here; the trainer makes them under its lock (trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

from gradwire_server.indexing import UNTRACKED, Autograd, AutogradOf
from gradwire_server.models import SIMPLE, ModelSpec
from gradwire_server.optimizers import OptimizerSettings

T = TypeVar("T")

#: What a tensor name stands for: the .proto's TensorKind, as ListTensors lists it.
Kind = Literal[
    "parameter",
    "gradient",
    "input",
    "target",
    "output",
    "loss",
    "activation",
    "optimizer_state",
    "delta",
    "buffer",
]


@dataclass(frozen=True)
class ForwardResult:
    version: int
    output_shape: tuple[int, ...]
    loss: float | None
    nonfinite_inputs: int = 0  # NaN or infinite input values: allowed, and reported


@dataclass(frozen=True)
class TrainResult(Generic[T]):
    version: int
    loss: float
    output_shape: tuple[int, ...]
    parameters_updated: int
    fetched: list[T]
    nonfinite_inputs: int = 0


@dataclass(frozen=True)
class Read:
    """A tensor (or slice) as it was at `version`, copied to the host; None when absent."""

    version: int
    name: str
    value: torch.Tensor | None
    full_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class Selection:
    """A tensor or slice as seen under the trainer's lock; see Trainer.read_with."""

    version: int
    name: str
    part: torch.Tensor | None  # the selected values where they live; None when absent
    full_shape: tuple[int, ...] | None  # shape of the whole tensor; None when absent
    # What PyTorch's print of it shows of autograd: `.get()`, under the lock, as `use` runs.
    autograd: Autograd | AutogradOf = UNTRACKED
    device: str = ""  # where it lives, as PyTorch names it ("cuda:0"); "" on the CPU

    def host(self) -> torch.Tensor:
        """The selection, contiguous, on the CPU: a view of the live tensor when possible."""
        assert self.part is not None
        part = self.part
        if not part.is_cpu:
            return part.cpu()
        return part if part.is_contiguous() else part.contiguous()  # no torch op when it is


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """Several selections read at one version, for a watcher."""

    version: int
    cause: str  # the RPC of the mutation that led to this state ("Watch" when none yet)
    steps: int  # Steps applied to this model
    used: list[T]
    updates: int = 0  # updates due to the subscription read with it, this read included


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: Kind
    dtype: torch.dtype
    shape: tuple[int, ...]
    present: bool
    requires_grad: bool = False  # takes part in autograd now; a frozen parameter does not


@dataclass(frozen=True)
class Listing:
    version: int
    model: str
    device: str
    optimizer: OptimizerSettings
    tensors: list[TensorInfo] = field(default_factory=list)
    spec: ModelSpec = SIMPLE  # what the model takes and returns, and its loss
