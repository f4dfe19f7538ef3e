"""The gradwire.v1.Trainer service: decode the request, call the Trainer, encode the answer.

One decorator and one table turn domain errors into status codes; anything unexpected is
logged with its traceback and answered INTERNAL with a plain message, never UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.limits import ERROR_DOMAIN
from grpc_status import rpc_status

from gradwire_server import convert
from gradwire_server.errors import (
    DomainError,
    IndexOutOfRange,
    InvalidInput,
    OverLimit,
    UnknownTensor,
    WrongOrder,
)
from gradwire_server.trainer import Trainer

log = logging.getLogger(__name__)

#: The error table of shared/DESIGN.md, in code.
STATUS_OF: dict[type[DomainError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownTensor: grpc.StatusCode.NOT_FOUND,
    IndexOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    WrongOrder: grpc.StatusCode.FAILED_PRECONDITION,
    OverLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.ServicerContext], Response]


def _abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
) -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


def _status_of(error: DomainError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def rpc(method: Handler[Response]) -> Handler[Response]:
    """Maps DomainError to its status, anything else to INTERNAL with the traceback logged."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Response:
        try:
            return method(self, request, context)
        except DomainError as err:
            _abort(context, _status_of(err), err.message, err.reason, err.metadata)
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            _abort(
                context,
                grpc.StatusCode.INTERNAL,
                f"internal error in {method.__name__}; the server's log has the details",
                "INTERNAL",
                {},
            )
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return wrapper


class TrainerServicer(pb_grpc.TrainerServicer):
    """Adapts gradwire.v1.Trainer to a Trainer; holds no state of its own."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @rpc
    def Forward(
        self, request: pb.ForwardRequest, context: grpc.ServicerContext
    ) -> pb.ForwardResponse:
        inputs = convert.source_from_proto(request.input, "input")
        if inputs is None:
            raise InvalidInput(
                "Forward needs an input: a tensor, or a fill such as ones of shape [8, 3, 10, 10]",
                reason="MISSING_INPUT",
            )
        target = convert.source_from_proto(request.target, "target")
        result = self.trainer.forward(inputs, target)
        response = pb.ForwardResponse(version=result.version, output_shape=result.output_shape)
        if result.loss is not None:
            response.loss = result.loss
        return response

    @rpc
    def Backward(
        self, request: pb.BackwardRequest, context: grpc.ServicerContext
    ) -> pb.BackwardResponse:
        return pb.BackwardResponse(version=self.trainer.backward(request.retain_graph))

    @rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        version, updated = self.trainer.step()
        return pb.StepResponse(version=version, parameters_updated=updated)

    @rpc
    def ZeroGrad(
        self, request: pb.ZeroGradRequest, context: grpc.ServicerContext
    ) -> pb.ZeroGradResponse:
        set_to_none = request.set_to_none if request.HasField("set_to_none") else True
        return pb.ZeroGradResponse(version=self.trainer.zero_grad(set_to_none))

    @rpc
    def GetTensor(
        self, request: pb.GetTensorRequest, context: grpc.ServicerContext
    ) -> pb.GetTensorResponse:
        chain = convert.chain_from_proto(request.index)
        read = self.trainer.read(request.name, chain, values=not request.omit_values)
        return convert.read_to_proto(read)

    @rpc
    def SetTensor(
        self, request: pb.SetTensorRequest, context: grpc.ServicerContext
    ) -> pb.SetTensorResponse:
        chain = convert.chain_from_proto(request.index)
        value = convert.source_from_proto(request.value, "value")
        if value is None:
            raise InvalidInput(
                "SetTensor needs a value: a tensor or a fill", reason="MISSING_VALUE"
            )
        return pb.SetTensorResponse(version=self.trainer.write(request.name, chain, value))

    @rpc
    def FillParameters(
        self, request: pb.FillParametersRequest, context: grpc.ServicerContext
    ) -> pb.FillParametersResponse:
        version, filled = self.trainer.fill_parameters(request.value, list(request.names))
        return pb.FillParametersResponse(version=version, filled=filled)

    @rpc
    def ListTensors(
        self, request: pb.ListTensorsRequest, context: grpc.ServicerContext
    ) -> pb.ListTensorsResponse:
        return convert.listing_to_proto(self.trainer.list_tensors())

    @rpc
    def Reset(self, request: pb.ResetRequest, context: grpc.ServicerContext) -> pb.ResetResponse:
        seed = request.seed if request.HasField("seed") else None
        return pb.ResetResponse(version=self.trainer.reset(seed))

    @rpc
    def SetOptimizer(
        self, request: pb.SetOptimizerRequest, context: grpc.ServicerContext
    ) -> pb.SetOptimizerResponse:
        settings = convert.optimizer_from_proto(request.config)
        version, resolved = self.trainer.set_optimizer(settings)
        return pb.SetOptimizerResponse(version=version, config=convert.optimizer_to_proto(resolved))
