"""Each unary call, encoded: its request built and checked on the caller's side, and how its
answer becomes the result a `Client` method returns. `Client` runs them at once; a pipeline,
a Calls stream and a `Batch` (pipeline.py) later, in the same bytes. Also each RPC's kind
(read, mutation, sessionless), which decides its retries and what its errors say. No grpc.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypedDict, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from gradwire import codec, limits, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.errors import InvalidArgument
from gradwire.fill import Fill
from gradwire.results import (
    ForwardResult,
    Listing,
    LoadedCheckpoint,
    OptimizerConfig,
    SavedCheckpoint,
    StepResult,
    TensorInfo,
    TensorRead,
    TrainStepResult,
)
from gradwire.selector import parse_selector
from gradwire.updates import TensorStats, tensor_stats

#: What a call's answer becomes (Encoded).
T = TypeVar("T")
IndexChain = Sequence[codec.IndexKey]


_KIND_NAMES = {
    pb.TENSOR_KIND_PARAMETER: "parameter",
    pb.TENSOR_KIND_GRADIENT: "gradient",
    pb.TENSOR_KIND_INPUT: "input",
    pb.TENSOR_KIND_TARGET: "target",
    pb.TENSOR_KIND_OUTPUT: "output",
    pb.TENSOR_KIND_LOSS: "loss",
    pb.TENSOR_KIND_ACTIVATION: "activation",
    pb.TENSOR_KIND_OPTIMIZER_STATE: "optimizer_state",
    pb.TENSOR_KIND_DELTA: "delta",
    pb.TENSOR_KIND_BUFFER: "buffer",
}


def _optimizer_from_proto(message: pb.OptimizerConfig) -> OptimizerConfig:
    fields = {
        name: getattr(message, name)
        for name in ("momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov")
        if message.HasField(name)
    }
    kind = "adam" if message.kind == pb.OPTIMIZER_KIND_ADAM else "sgd"
    return OptimizerConfig(kind=kind, lr=message.lr, **fields)


_TENSOR = pb.TensorSource.DESCRIPTOR.fields_by_name["tensor"].number


FIELD = {
    (message.name, f.name): f.number
    for message in (
        pb.ForwardRequest.DESCRIPTOR,
        pb.SetTensorRequest.DESCRIPTOR,
        pb.TrainStepRequest.DESCRIPTOR,
        pb.ForwardChunk.DESCRIPTOR,
        pb.SetTensorChunk.DESCRIPTOR,
        pb.TrainRequest.DESCRIPTOR,
    )
    for f in message.fields
}


RESPONSE_TENSOR: wire.Path = ((pb.GetTensorResponse.DESCRIPTOR.fields_by_name["tensor"].number, 0),)


STREAM_CHUNK: wire.Path = ((pb.GetTensorChunk.DESCRIPTOR.fields_by_name["chunk"].number, 0),)


_FETCHED = pb.TrainStepResponse.DESCRIPTOR.fields_by_name["fetched"].number


def source_pieces(message: str, field: str, value: Any) -> list[wire.Piece]:
    """The TensorSource field `field` of `message`, the values spliced from their memory."""
    number = FIELD[(message, field)]
    if isinstance(value, Fill):
        source = pb.TensorSource(fill=value.to_proto()).SerializeToString()
        return wire.length_field(number, [source])
    try:
        pieces = codec.tensor_pieces(value)
    except codec.CodecError as err:  # naming the argument: input, target or value
        raise codec.CodecError(f"{field}: {err}") from None
    return wire.length_field(number, wire.length_field(_TENSOR, pieces))


def chunks(
    field: str, value: Any, chunk_bytes: int
) -> Iterator[tuple[int, np.ndarray[Any, Any], int, tuple[int, ...] | None]]:
    """codec.chunks(value, chunk_bytes), a value it cannot send named as source_pieces
    names it (the streamed path said "cannot send ..." without naming the argument)."""
    try:
        yield from codec.chunks(value, chunk_bytes)
    except codec.CodecError as err:
        raise codec.CodecError(f"{field}: {err}") from None


def begun(messages: Iterator[bytes]) -> Iterator[bytes]:
    """`messages` with its first made now, on the caller's thread. gRPC draws a streamed
    upload's messages on a thread of its own and answers an error raised there as UNKNOWN
    ("Exception iterating requests!"): a value the client cannot send (a complex array, a bad
    target) raised errors.Unknown, as if the server had failed, where a smaller one raises
    CodecError. Every check of the value is made before its first chunk."""
    first = next(messages, None)
    return messages if first is None else itertools.chain([first], messages)


#: What to do instead, for a call whose request does not fit in one message.
_TOO_LARGE_HINTS = {
    "TrainStep": "TrainStep has no streamed form: call forward(), backward() and step(), whose "
    "Forward sends a large input in chunks, or send a smaller batch",
    "Train": "Train has no streamed form: send a Fill, which the server makes, or a smaller batch",
}


def fits_one_message(method: str, pieces: Sequence[wire.Piece]) -> None:
    """ValueError, before anything is sent, for a request past the one message gRPC carries
    (it was gRPC's own RESOURCE_EXHAUSTED, "CLIENT: Sent message larger than max")."""
    size = wire.size(pieces)
    if size > limits.MAX_MESSAGE_BYTES:
        hint = _TOO_LARGE_HINTS.get(
            method, "lower stream_above_bytes, so that its tensor goes in chunks"
        )
        raise ValueError(
            f"{method}'s request is {size:,} bytes, more than the {limits.MAX_MESSAGE_BYTES:,} "
            f"one message carries: {hint}"
        )


def nbytes(value: Any) -> int:
    if isinstance(value, Fill):
        return 0
    if hasattr(value, "element_size"):  # torch tensors: a sparse one's nbytes raises
        return int(value.numel() * value.element_size())
    if isinstance(value, (list, tuple)):  # counted as 0, a large list never went in chunks
        with contextlib.suppress(ValueError):  # ragged: codec.host_array says why
            return int(np.asarray(value).nbytes)
    return int(getattr(value, "nbytes", None) or 0)  # numpy arrays


MUTATIONS = frozenset(
    {"Forward", "ForwardStream", "Backward", "Step", "ZeroGrad", "SetTensor", "SetTensorStream",
     "TrainStep", "FillParameters", "Reset", "SetOptimizer", "LoadCheckpoint"}
)  # fmt: skip


READS = frozenset(
    {"GetTensor", "ListTensors", "GetStats", "ListSessions", "GetServerInfo", "ListCheckpoints"}
)


#: Calls that take a request id besides the mutations: a retry gets the first answer (or,
#: when the server no longer keeps it, errors.Aborted ANSWER_NOT_KEPT; applied once either way).
ONCE = MUTATIONS | {"OpenSession", "CloseSession"}


#: Calls that may have taken effect though they failed once their server had them (a deadline
#: passed, the server stopped under them): what their errors' `changes_state` says. A save
#: or a delete changes the server's files, not its state: a save past its deadline still
#: landed, and its error did not say it might have (found by a review of the state's
#: handling).
MAY_LAND = ONCE | {"SaveCheckpoint", "DeleteCheckpoint"}


#: Calls that act on no session the caller's metadata names (the server reads none), and
#: the health check, which has no sessions: a client whose session is closed may make them.
SESSIONLESS = frozenset(
    {"OpenSession", "CloseSession", "ListSessions", "GetServerInfo", "Health", "ListCheckpoints"}
)


def serialize(request: Message | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _response_parsers() -> dict[str, Callable[[Any], Any] | None]:
    """Each RPC's response parser; None for those that carry tensors, which the client gets
    as bytes, to be split without copying their values."""
    parsers = {}
    for method in pb.DESCRIPTOR.services_by_name["Trainer"].methods:
        response_type = getattr(pb, method.output_type.name)
        splits = wire.holds_tensors(response_type)
        parsers[method.name] = None if splits else response_type.FromString
    return parsers


PARSE_RESPONSE = _response_parsers()


def decoded(method: str, payload: memoryview) -> Any:
    """`method`'s response from its bytes on a Calls stream or in a Batch: parsed, or the
    bytes themselves for one that carries tensors (split later, without copying); ValueError
    for bytes that are no such response (protobuf's DecodeError escaped: found by a review)."""
    parse = PARSE_RESPONSE[method]
    if parse is None:
        return payload
    try:
        return parse(payload)
    except DecodeError as err:
        raise ValueError(f"not a {method} response ({err})") from None


@dataclass(frozen=True)
class Encoded(Generic[T]):
    """One unary call of a client method, encoded, and how its answer becomes the method's
    result: the method runs it at once (Client._run), a pipeline later (pipeline.py)."""

    method: str
    request: list[wire.Piece] | bytes | Message
    #: The response (parsed, or bytes for responses with tensors) -> the method's result.
    result: Callable[[Any], T]
    #: Adds to an InvalidArgument what the client changed in the request (widened dtypes).
    on_invalid: Callable[[InvalidArgument], None] | None = None


@functools.lru_cache(maxsize=1024)
def _get_tensor_request(selector: str, values: bool) -> bytes:
    """The serialized GetTensorRequest for a selector's text. Reads repeat their selectors
    (a loop that watches a slice, the tutorial's), and building the message cost a small
    read about 25 us of its 0.7 ms, the client's code gone cold between calls
    (docs/performance-history.md, nineteenth session)."""
    parsed = parse_selector(selector)
    return tensor_request(parsed.name, parsed.index, values)


def tensor_request(name: str, chain: IndexChain, values: bool) -> bytes:
    """A serialized GetTensorRequest for a name and an index chain."""
    request = pb.GetTensorRequest(name=name, omit_values=not values)
    request.index.extend(codec.indices_to_proto(chain))
    return request.SerializeToString()


def tensor_names(names: Iterable[str]) -> list[str]:
    """Selectors or names given as any iterable, read once into a list (a generator, a
    dict's keys: watch's, train_step's fetch and fill_parameters' are typed so); one string
    is one of them. A string is an Iterable[str] too, and was taken letter by letter ("no
    tensor named 'l'" for watch("loss")). TypeError for what is neither (None, a number),
    or holds what is no string: protobuf's "bad argument type for built-in operation" said
    neither."""
    if isinstance(names, str):
        return [names]
    try:
        listed = list(names)
    except TypeError:
        listed = [names]  # type: ignore[list-item]
    for name in listed:
        if not isinstance(name, str):
            parse_selector(name)  # raises the TypeError that says what one is
    return listed


_OPTIMIZER_KINDS = {"sgd": pb.OPTIMIZER_KIND_SGD, "adam": pb.OPTIMIZER_KIND_ADAM}


_OPTIMIZER_SETTINGS = ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov")


class OptimizerSettings(TypedDict, total=False):
    """The keyword settings open_session() and a pipeline's set_optimizer() take, as
    Client.set_optimizer names them (None: unset). As `**settings: Any`, an IDE showed none,
    and a type checker took open_session(learning_rate=1e-3), refused only when run (found
    by a review of the client as a type-checked user's code sees it)."""

    lr: limits.Real | None
    momentum: limits.Real | None
    weight_decay: limits.Real | None
    beta1: limits.Real | None
    beta2: limits.Real | None
    eps: limits.Real | None
    nesterov: bool | None


def optimizer_config(kind: str | None, settings: Mapping[str, object]) -> pb.OptimizerConfig:
    """The OptimizerConfig for `kind` (None: unspecified) and the settings given (None:
    unset). Any other kind was sent as SGD, and an unknown setting raised protobuf's
    AttributeError."""
    if kind is not None and kind not in _OPTIMIZER_KINDS:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")
    config = pb.OptimizerConfig(
        kind=pb.OPTIMIZER_KIND_UNSPECIFIED if kind is None else _OPTIMIZER_KINDS[kind]
    )
    for name, value in settings.items():
        if name not in _OPTIMIZER_SETTINGS:
            raise TypeError(
                f"{name!r} is not an optimizer setting; they are: {', '.join(_OPTIMIZER_SETTINGS)}"
            )
        if value is None:
            continue
        truth = isinstance(value, (bool, np.bool_))
        wanted = (bool, np.bool_) if name == "nesterov" else (int, float, np.integer, np.floating)
        if truth != (name == "nesterov") or not isinstance(value, wanted):
            kind_of = "True or False" if name == "nesterov" else "a number"
            raise TypeError(f"optimizer setting {name} must be {kind_of}, got {value!r}")
        setattr(config, name, bool(value) if truth else limits.real(value, name))
    return config


def widenings(**values: Any) -> dict[str, tuple[str, str]]:
    """(the dtype given, the dtype sent) by argument, for the values that travel widened
    (codec.widened)."""
    found = {name: codec.widened(value) for name, value in values.items()}
    return {name: dtypes for name, dtypes in found.items() if dtypes is not None}


def tell_widenings(error: InvalidArgument, widenings: dict[str, tuple[str, str]]) -> None:
    """Adds to a refusal that names a dtype an argument was widened to what was given:
    forward(x.astype(np.int8)) was refused with "input has dtype int32", a dtype the caller
    never sent."""
    told = [
        f"{name} was given as {given}, sent as {sent}: the wire has no {given}"
        for name, (given, sent) in widenings.items()
        if f"{name} has dtype {sent}" in error.message  # the server's words for that argument
    ]
    if told:
        error.message += f" ({'; '.join(told)})"
        error.args = (error.message,)


def flag(value: object, what: str) -> bool:
    """`value` as a bool: True or False (numpy's too); TypeError naming `what` for anything
    else. Python takes any object for true or false, and protobuf takes None for False:
    train_step(zero_grad=None) kept the gradients, read(values="no") read them, tls="no"
    turned TLS on (found by a review)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{what} must be True or False, got {value!r}")


def torch_flag(value: object) -> bool:
    """`as_torch` as a bool (`flag`), refused before the call is sent where torch is not
    installed: the answer was read, a TrainStep's applied, and then lost to torch's import
    (a review of installing the client alone)."""
    wanted = flag(value, "as_torch")
    if wanted:
        try:  # imported now, as the answer would import it: one that fails to, fails here
            import torch  # noqa: F401
        except ImportError as err:
            raise ModuleNotFoundError(
                "as_torch=True reads into torch tensors, and this Python has no torch "
                f"({err}): install it, or leave as_torch out for numpy arrays (nothing was "
                "sent)",
                name="torch",
            ) from None
    return wanted


def read_result(
    split: wire.Split[Any], path: wire.Path, response: pb.GetTensorResponse,
    *, as_torch: bool, values: bool, out: np.ndarray[Any, Any] | None = None,
    allocate: codec.Allocate | None = None,
) -> TensorRead:  # fmt: skip
    if not response.HasField("tensor"):
        return TensorRead(response.name, response.version, None, None, None, None)
    tensor = response.tensor
    value: Any = None
    if values:
        if as_torch:
            value = codec.decode_split_torch(split, path, tensor, allocate)
        else:
            value = codec.decode_split(split, path, tensor, out, allocate)
    return tensor_read(response, value, tuple(tensor.shape), tensor.dtype)


def tensor_read(
    header: pb.GetTensorResponse | pb.GetTensorChunk,
    value: Any,
    shape: tuple[int, ...],
    dtype: int,
) -> TensorRead:
    """The TensorRead of a present tensor from its reply's header (a GetTensorResponse, or a
    stream's first GetTensorChunk, which say the same of it): `value`, of `shape` and wire
    `dtype`, read from the values that came with it."""
    return TensorRead(
        name=header.name,
        version=header.version,
        value=value,
        shape=shape,
        full_shape=tuple(header.full_shape),
        dtype=codec.DTYPE_NAMES.get(dtype),
        requires_grad=header.requires_grad,
        grad_fn=header.grad_fn,
        whole_parameter=header.whole_parameter,
        device=header.device,
    )


def read_request_bytes(selector: str, index: codec.IndexKey | None, values: bool) -> bytes:
    """The GetTensorRequest `read(selector, index, values=values)` sends."""
    flag(values, "values")
    if index is None and isinstance(selector, str):  # else parse_selector says why not
        return _get_tensor_request(selector, values)
    parsed = parse_selector(selector)
    return tensor_request(parsed.name, [*parsed.index, index], values)


def set_target(selector: str, index: codec.IndexKey | None) -> tuple[str, IndexChain]:
    """The name and index chain `set(selector, value, index)` writes to."""
    parsed = parse_selector(selector)
    chain: list[codec.IndexKey] = list(parsed.index)
    if index is not None:
        chain.append(index)
    return parsed.name, chain


def set_tensor(name: str, chain: IndexChain, value: Any) -> Encoded[int]:
    header = pb.SetTensorRequest(name=name, index=codec.indices_to_proto(chain))
    pieces = [header.SerializeToString(), *source_pieces("SetTensorRequest", "value", value)]
    return Encoded("SetTensor", pieces, _version)


def get_stats(
    selector: str, bins: limits.Whole, low: limits.Real | None, high: limits.Real | None
) -> Encoded[TensorStats]:
    parsed = parse_selector(selector)
    # Checked as watch() checks it: the server's refusal (BAD_BINS) named its own field,
    # histogram_bins, and protobuf's raised its own errors past an int32; a bound given
    # without bins was ignored.
    bins = limits.whole(bins, "bins", 0, limits.MAX_HISTOGRAM_BINS, "no histogram")
    request = pb.GetStatsRequest(name=parsed.name, histogram_bins=bins)
    request.index.extend(codec.indices_to_proto(parsed.index))
    if not bins and (low is not None or high is not None):
        raise ValueError("low and high bound the histogram: give bins too (bins=10, say)")
    for bound, what in ((low, "low"), (high, "high")):
        if bound is not None and not math.isfinite(limits.real(bound, what)):
            raise ValueError(f"{what} must be a finite number, got {bound!r}")
    if low is not None and high is not None and not low < high:
        raise ValueError(f"low must be below high, got low={low!r}, high={high!r}")
    if low is not None:
        request.histogram_low = float(low)
    if high is not None:
        request.histogram_high = float(high)
    return Encoded("GetStats", request, tensor_stats)


def fill_parameters(value: limits.Real, names: Iterable[str]) -> Encoded[int]:
    request = pb.FillParametersRequest(value=limits.real(value, "value"), names=tensor_names(names))
    return Encoded("FillParameters", request, _version)


def reset(seed: limits.Whole | None) -> Encoded[int]:
    request = pb.ResetRequest()
    if seed is not None:
        request.seed = limits.check_seed(seed)
    return Encoded("Reset", request, _version)


def set_optimizer(
    kind: Literal["sgd", "adam"] | None, settings: Mapping[str, object], keep_state: bool = False
) -> Encoded[tuple[int, OptimizerConfig]]:
    """SetOptimizer, answered with the state version it made and the settings in force.
    `kind` None: SGD for a new optimizer, the kind in place with `keep_state`."""
    if not isinstance(keep_state, (bool, np.bool_)):  # "no" or 0.5 read as true
        raise TypeError(f"keep_state= must be True or False, got {keep_state!r}")
    if kind is None and not keep_state:
        kind = "sgd"  # as the contract reads an unspecified kind, said outright
    request = pb.SetOptimizerRequest(
        config=optimizer_config(kind, settings), keep_state=bool(keep_state)
    )
    return Encoded(
        "SetOptimizer",
        request,
        lambda response: (int(response.version), _optimizer_from_proto(response.config)),
    )


def _listing(response: pb.ListTensorsResponse) -> Listing:
    tensors = tuple(
        TensorInfo(
            name=t.name,
            kind=_KIND_NAMES.get(t.kind, "unknown"),
            dtype=codec.DTYPE_NAMES.get(t.dtype, "unknown"),
            shape=tuple(t.shape),
            present=t.present,
            requires_grad=t.requires_grad if t.HasField("requires_grad") else None,
        )
        for t in response.tensors
    )
    return Listing(
        response.version,
        response.model,
        response.device,
        _optimizer_from_proto(response.optimizer),
        tensors,
        tuple(response.sample_shape),
        codec.DTYPE_NAMES.get(response.input_dtype, "unknown"),
        response.outputs,
        response.loss,
    )


def forward_result(response: pb.ForwardResponse) -> ForwardResult:
    loss = response.loss if response.HasField("loss") else None
    return ForwardResult(
        response.version, tuple(response.output_shape), loss, response.nonfinite_inputs
    )


def train_step_result(data: bytes, *, as_torch: bool) -> TrainStepResult:
    split = wire.split(data, pb.TrainStepResponse)
    response = split.message
    fetched = tuple(
        read_result(split, ((_FETCHED, i), *RESPONSE_TENSOR), read, as_torch=as_torch, values=True)
        for i, read in enumerate(response.fetched)
    )
    return TrainStepResult(
        response.version,
        response.loss,
        tuple(response.output_shape),
        response.parameters_updated,
        fetched,
        response.nonfinite_inputs,
    )


def widening_teller(input: Any, target: Any) -> Callable[[InvalidArgument], None]:
    """What adds to a refusal of a request the dtypes the client widened in it."""
    return lambda err: tell_widenings(err, widenings(input=input, target=target))


def _version(response: Any) -> int:
    return int(response.version)


def checkpoint_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a checkpoint's name must be a string, got {name!r}")
    return name


def save_checkpoint(name: str) -> Encoded[SavedCheckpoint]:
    request = pb.SaveCheckpointRequest(name=checkpoint_name(name))
    return Encoded(
        "SaveCheckpoint",
        request,
        lambda response: SavedCheckpoint(response.name, response.version, response.bytes),
    )


def load_checkpoint(name: str) -> Encoded[LoadedCheckpoint]:
    request = pb.LoadCheckpointRequest(name=checkpoint_name(name))
    return Encoded(
        "LoadCheckpoint",
        request,
        lambda response: LoadedCheckpoint(response.version, response.saved_version),
    )


def delete_checkpoint(name: str) -> Encoded[int]:
    """DeleteCheckpoint, answered with the bytes it freed."""
    request = pb.DeleteCheckpointRequest(name=checkpoint_name(name))
    return Encoded("DeleteCheckpoint", request, lambda response: int(response.bytes))


def backward(retain_graph: bool) -> Encoded[int]:
    request = pb.BackwardRequest(retain_graph=flag(retain_graph, "retain_graph"))
    return Encoded("Backward", request, _version)


def zero_grad(set_to_none: bool) -> Encoded[int]:
    request = pb.ZeroGradRequest(set_to_none=flag(set_to_none, "set_to_none"))
    return Encoded("ZeroGrad", request, _version)


LIST_TENSORS: Encoded[Listing] = Encoded(
    "ListTensors", pb.ListTensorsRequest().SerializeToString(), _listing
)


STEP: Encoded[StepResult] = Encoded(
    "Step",
    pb.StepRequest().SerializeToString(),
    lambda response: StepResult(response.version, response.parameters_updated),
)
