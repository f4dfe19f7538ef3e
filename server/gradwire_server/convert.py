"""Messages to trainer types and back; every malformed message becomes InvalidInput here."""

from __future__ import annotations

from typing import Literal, cast

import torch
from gradwire import codec
from gradwire._pb import trainer_pb2 as pb

from gradwire_server.errors import InvalidInput
from gradwire_server.trainer import FillSpec, Listing, OptimizerSettings, Read, TensorInput

_FILL_KINDS: dict[int, str] = {
    pb.Fill.KIND_ZEROS: "zeros",
    pb.Fill.KIND_ONES: "ones",
    pb.Fill.KIND_CONSTANT: "constant",
    pb.Fill.KIND_UNIFORM: "uniform",
    pb.Fill.KIND_NORMAL: "normal",
    pb.Fill.KIND_RANDINT: "randint",
}
_KINDS = {
    "parameter": pb.TENSOR_KIND_PARAMETER,
    "gradient": pb.TENSOR_KIND_GRADIENT,
    "input": pb.TENSOR_KIND_INPUT,
    "target": pb.TENSOR_KIND_TARGET,
    "output": pb.TENSOR_KIND_OUTPUT,
    "loss": pb.TENSOR_KIND_LOSS,
}


def dtype_to_proto(dtype: torch.dtype) -> int:
    return codec.dtype_from_name(str(dtype).removeprefix("torch."))


def fill_from_proto(message: pb.Fill, what: str) -> FillSpec:
    kind = _FILL_KINDS.get(message.kind)
    if kind is None:
        raise InvalidInput(
            f"{what}: fill kind {message.kind} is not one of "
            + ", ".join(pb.Fill.Kind.Name(k) for k in _FILL_KINDS),  # type: ignore[arg-type]
            reason="BAD_FILL",
        )
    dtype = None
    if message.dtype != pb.DTYPE_UNSPECIFIED:
        dtype = codec.DTYPE_NAMES.get(message.dtype)
        if dtype is None:
            raise InvalidInput(
                f"{what}: fill dtype {message.dtype} is not supported", reason="BAD_FILL"
            )
    return FillSpec(
        kind=cast(Literal["zeros", "ones", "constant", "uniform", "normal", "randint"], kind),
        shape=tuple(message.shape),
        dtype=dtype,
        value=message.value,
        low=message.low,
        high=message.high,
        std=message.std,
        seed=message.seed,
    )


def tensor_from_proto(message: pb.Tensor, what: str) -> torch.Tensor:
    try:
        return codec.decode_torch(message)
    except codec.CodecError as err:
        raise InvalidInput(f"{what}: {err}", reason="BAD_TENSOR") from err


def source_from_proto(message: pb.TensorSource, what: str) -> TensorInput | None:
    """The tensor or fill spec a TensorSource names; None when it names neither."""
    which = message.WhichOneof("source")
    if which == "tensor":
        return tensor_from_proto(message.tensor, what)
    if which == "fill":
        return fill_from_proto(message.fill, what)
    return None


def chain_from_proto(messages: list[pb.Index] | object) -> list[tuple[codec.IndexItem, ...]]:
    try:
        return codec.indices_from_proto(messages)  # type: ignore[arg-type]
    except codec.CodecError as err:
        raise InvalidInput(f"bad index: {err}", reason="BAD_INDEX") from err


def optimizer_from_proto(message: pb.OptimizerConfig) -> OptimizerSettings:
    if message.kind not in (
        pb.OPTIMIZER_KIND_UNSPECIFIED,
        pb.OPTIMIZER_KIND_SGD,
        pb.OPTIMIZER_KIND_ADAM,
    ):
        raise InvalidInput(
            f"optimizer kind {message.kind} is not SGD or ADAM", reason="BAD_OPTIMIZER"
        )
    kind: Literal["sgd", "adam"] = "adam" if message.kind == pb.OPTIMIZER_KIND_ADAM else "sgd"
    sgd_only = ("momentum", "nesterov")
    adam_only = ("beta1", "beta2", "eps")
    for name in adam_only if kind == "sgd" else sgd_only:
        if message.HasField(name):  # type: ignore[arg-type]
            raise InvalidInput(f"{name} is not a setting of {kind.upper()}", reason="BAD_OPTIMIZER")

    def opt(name: str) -> float | None:
        return float(getattr(message, name)) if message.HasField(name) else None  # type: ignore[arg-type]

    return OptimizerSettings(
        kind=kind,
        lr=opt("lr"),
        momentum=opt("momentum"),
        weight_decay=opt("weight_decay"),
        beta1=opt("beta1"),
        beta2=opt("beta2"),
        eps=opt("eps"),
        nesterov=message.nesterov if message.HasField("nesterov") else None,
    )


def optimizer_to_proto(settings: OptimizerSettings) -> pb.OptimizerConfig:
    message = pb.OptimizerConfig(
        kind=pb.OPTIMIZER_KIND_ADAM if settings.kind == "adam" else pb.OPTIMIZER_KIND_SGD
    )
    for name in ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov"):
        value = getattr(settings, name)
        if value is not None:
            setattr(message, name, value)
    return message


def read_to_proto(read: Read) -> pb.GetTensorResponse:
    response = pb.GetTensorResponse(version=read.version, name=read.name)
    if read.full_shape is None:
        return response  # absent: no tensor, no shape
    response.full_shape.extend(read.full_shape)
    if read.value is not None:
        # Parsing the encoded bytes copies them once; CopyFrom would walk the values.
        response.tensor.ParseFromString(codec.encode_bytes(read.value))
    else:
        assert read.dtype is not None and read.shape is not None
        response.tensor.dtype = dtype_to_proto(read.dtype)  # type: ignore[assignment]
        response.tensor.shape.extend(read.shape)
    return response


def listing_to_proto(listing: Listing) -> pb.ListTensorsResponse:
    response = pb.ListTensorsResponse(
        version=listing.version,
        model=listing.model,
        device=listing.device,
        optimizer=optimizer_to_proto(listing.optimizer),
    )
    for info in listing.tensors:
        response.tensors.add(
            name=info.name,
            kind=_KINDS[info.kind],
            dtype=dtype_to_proto(info.dtype),
            shape=info.shape,
            present=info.present,
        )
    return response
