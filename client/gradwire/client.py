"""The Python client: one channel, typed methods returning numpy arrays, typed exceptions.

Every RPC goes through `_call`, the one place that applies the timeout and turns
grpc.RpcError into the exception of its status code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwire import codec
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.errors import from_rpc_error
from gradwire.fill import Fill
from gradwire.limits import channel_options
from gradwire.selector import parse_selector

if TYPE_CHECKING:
    import torch

    from gradwire.remote import RemoteModel

__all__ = [
    "DEFAULT_TARGET",
    "Client",
    "ForwardResult",
    "Listing",
    "OptimizerConfig",
    "StepResult",
    "TensorInfo",
    "TensorRead",
    "connect",
]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 60.0

R = TypeVar("R", bound=Message)
IndexChain = Sequence[codec.IndexKey]
_KIND_NAMES = {
    pb.TENSOR_KIND_PARAMETER: "parameter",
    pb.TENSOR_KIND_GRADIENT: "gradient",
    pb.TENSOR_KIND_INPUT: "input",
    pb.TENSOR_KIND_TARGET: "target",
    pb.TENSOR_KIND_OUTPUT: "output",
    pb.TENSOR_KIND_LOSS: "loss",
}


@dataclass(frozen=True)
class ForwardResult:
    version: int  # state version after the Forward
    output_shape: tuple[int, ...]  # e.g. (8, 20)
    loss: float | None  # None when no target was given


@dataclass(frozen=True)
class StepResult:
    version: int  # state version after the Step
    parameters_updated: int  # parameters that had a gradient


@dataclass(frozen=True)
class TensorRead:
    """One GetTensor: the values (None when the tensor is absent) and what the server saw."""

    name: str
    version: int
    value: Any  # numpy array, torch tensor when asked, or None when absent
    shape: tuple[int, ...] | None  # shape of the selected part; None when absent
    full_shape: tuple[int, ...] | None  # shape of the whole tensor; None when absent
    dtype: str | None  # "float32", ...; None when absent

    @property
    def present(self) -> bool:
        return self.shape is not None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str  # "parameter", "gradient", "input", "target", "output", "loss"
    dtype: str
    shape: tuple[int, ...]
    present: bool


@dataclass(frozen=True)
class OptimizerConfig:
    kind: str  # "sgd" or "adam"
    lr: float
    momentum: float | None = None
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    nesterov: bool | None = None


@dataclass(frozen=True)
class Listing:
    version: int
    model: str
    device: str
    optimizer: OptimizerConfig
    tensors: tuple[TensorInfo, ...]

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def _optimizer_from_proto(message: pb.OptimizerConfig) -> OptimizerConfig:
    fields = {
        name: getattr(message, name)
        for name in ("momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov")
        if message.HasField(name)
    }
    kind = "adam" if message.kind == pb.OPTIMIZER_KIND_ADAM else "sgd"
    return OptimizerConfig(kind=kind, lr=message.lr, **fields)


def _put_source(destination: pb.TensorSource, value: Any) -> None:
    """Writes a value into a TensorSource field in place.

    The tensor's encoded bytes are parsed into place: copying a built message (CopyFrom,
    or a constructor argument) would walk its values one by one.
    """
    if isinstance(value, Fill):
        destination.fill.CopyFrom(value.to_proto())
    else:
        destination.tensor.ParseFromString(codec.encode_bytes(value))


class Client:
    """A connection to a gradwire server: `gradwire.connect(target)`; close it, or use `with`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        #: Seconds each call may take before DEADLINE_EXCEEDED; None waits for ever.
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(target, options=channel_options())
        self._stub = pb_grpc.TrainerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # --- plumbing -------------------------------------------------------------------

    def _call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel connects; gradwire.errors.Unavailable after `timeout` s."""
        from gradwire.errors import Unavailable

        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                f"no gradwire server answered at {self.target} within {timeout}s"
            ) from None

    def health(self, service: str = "") -> str:
        """The standard health check's answer: "SERVING", "NOT_SERVING", ..."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # --- the training step ------------------------------------------------------------

    def forward(self, input: Any, target: Any = None) -> ForwardResult:
        """model(input) and, with a target, the loss. Each is an array, a torch tensor or a Fill."""
        request = pb.ForwardRequest()
        _put_source(request.input, input)
        if target is not None:
            _put_source(request.target, target)
        response: pb.ForwardResponse = self._call("Forward", request)
        loss = response.loss if response.HasField("loss") else None
        return ForwardResult(response.version, tuple(response.output_shape), loss)

    def backward(self, *, retain_graph: bool = False) -> int:
        """loss.backward(); returns the new state version."""
        response = self._call("Backward", pb.BackwardRequest(retain_graph=retain_graph))
        return int(response.version)

    def step(self) -> StepResult:
        """optimizer.step()."""
        response = self._call("Step", pb.StepRequest())
        return StepResult(response.version, response.parameters_updated)

    def zero_grad(self, *, set_to_none: bool = True) -> int:
        """optimizer.zero_grad(set_to_none); returns the new state version."""
        response = self._call("ZeroGrad", pb.ZeroGradRequest(set_to_none=set_to_none))
        return int(response.version)

    # --- tensors ------------------------------------------------------------------------

    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool = False,
        values: bool = True,
    ) -> TensorRead:
        """GetTensor: `read("conv1.weight.grad[0][0][0]")`, or a name and one index key."""
        parsed = parse_selector(selector)
        chain: list[codec.IndexKey] = list(parsed.index)
        if index is not None:
            chain.append(index)
        return self._read(parsed.name, chain, as_torch=as_torch, values=values)

    def _read(
        self, name: str, chain: IndexChain, *, as_torch: bool = False, values: bool = True
    ) -> TensorRead:
        request = pb.GetTensorRequest(name=name, omit_values=not values)
        request.index.extend(codec.indices_to_proto(chain))
        response: pb.GetTensorResponse = self._call("GetTensor", request)
        if not response.HasField("tensor"):
            return TensorRead(response.name, response.version, None, None, None, None)
        tensor = response.tensor
        value: Any = None
        if values:
            value = codec.decode_torch(tensor) if as_torch else codec.decode(tensor)
        return TensorRead(
            name=response.name,
            version=response.version,
            value=value,
            shape=tuple(tensor.shape),
            full_shape=tuple(response.full_shape),
            dtype=codec.DTYPE_NAMES.get(tensor.dtype),
        )

    def get(
        self, selector: str, index: codec.IndexKey | None = None, *, as_torch: bool = False
    ) -> np.ndarray[Any, Any] | torch.Tensor | None:
        """The values only: `get("conv1.weight.grad[0][0][0]")`; None for an absent gradient."""
        return self.read(selector, index, as_torch=as_torch).value  # type: ignore[no-any-return]

    def shape(self, selector: str) -> tuple[int, ...] | None:
        """The shape of a tensor or slice without fetching its values; None when absent."""
        return self.read(selector, values=False).shape

    def set(self, selector: str, value: Any, index: codec.IndexKey | None = None) -> int:
        """SetTensor: `set("conv1.weight[0]", array)`; value broadcasts like numpy assignment."""
        parsed = parse_selector(selector)
        chain: list[codec.IndexKey] = list(parsed.index)
        if index is not None:
            chain.append(index)
        return self._set(parsed.name, chain, value)

    def _set(self, name: str, chain: IndexChain, value: Any) -> int:
        request = pb.SetTensorRequest(name=name)
        _put_source(request.value, value)
        request.index.extend(codec.indices_to_proto(chain))
        return int(self._call("SetTensor", request).version)

    def fill_parameters(self, value: float, names: Sequence[str] = ()) -> int:
        """`for p in model.parameters(): p.data.fill_(value)`, or only the named ones."""
        request = pb.FillParametersRequest(value=value, names=list(names))
        return int(self._call("FillParameters", request).version)

    def list_tensors(self) -> Listing:
        """Every readable tensor with kind, dtype and shape, and the model, device and optimizer."""
        response: pb.ListTensorsResponse = self._call("ListTensors", pb.ListTensorsRequest())
        tensors = tuple(
            TensorInfo(
                name=t.name,
                kind=_KIND_NAMES.get(t.kind, "unknown"),
                dtype=codec.DTYPE_NAMES.get(t.dtype, "unknown"),
                shape=tuple(t.shape),
                present=t.present,
            )
            for t in response.tensors
        )
        return Listing(
            response.version,
            response.model,
            response.device,
            _optimizer_from_proto(response.optimizer),
            tensors,
        )

    def reset(self, seed: int | None = None) -> int:
        """A freshly initialised model (seeded when asked) and optimizer."""
        request = pb.ResetRequest()
        if seed is not None:
            request.seed = seed
        return int(self._call("Reset", request).version)

    def set_optimizer(
        self,
        kind: Literal["sgd", "adam"] = "sgd",
        *,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        beta1: float | None = None,
        beta2: float | None = None,
        eps: float | None = None,
        nesterov: bool | None = None,
    ) -> OptimizerConfig:
        """Replaces the optimizer; unset settings take PyTorch's defaults (SGD's lr: 1.0)."""
        config = pb.OptimizerConfig(
            kind=pb.OPTIMIZER_KIND_ADAM if kind == "adam" else pb.OPTIMIZER_KIND_SGD
        )
        settings = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "beta1": beta1,
            "beta2": beta2,
            "eps": eps,
            "nesterov": nesterov,
        }
        for name, value in settings.items():
            if value is not None:
                setattr(config, name, value)
        response = self._call("SetOptimizer", pb.SetOptimizerRequest(config=config))
        return _optimizer_from_proto(response.config)

    @property
    def remote(self) -> RemoteModel:
        """The model as attributes: `client.remote.conv1.weight.grad[0][0][0]`."""
        from gradwire.remote import RemoteModel

        return RemoteModel(self)


def connect(target: str = DEFAULT_TARGET, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> Client:
    """A client for the server at host:port; use it with `with` to close the channel."""
    return Client(target, timeout=timeout)
