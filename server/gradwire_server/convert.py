"""Messages to trainer types and back; every malformed message becomes InvalidInput here.

Responses that carry tensors are written as bytes with the values spliced in (wire.py);
requests that carry them arrive split, their values uncopied views of the received bytes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from google.protobuf.message import Message

import gradwire
from gradwire import codec, wire
from gradwire import limits as gw_limits
from gradwire._pb import trainer_pb2 as pb
from gradwire_server import staging
from gradwire_server.checkpoint import Described
from gradwire_server.errors import (
    InvalidInput,
    OverLimit,
    device_memory,
    fewer_elements,
    out_of_memory,
)
from gradwire_server.fills import FillSpec, TensorInput
from gradwire_server.indexing import UNTRACKED
from gradwire_server.live import StreamedRead
from gradwire_server.optimizers import OptimizerSettings, check_settings_kind
from gradwire_server.results import ForwardResult, Listing, Selection, TrainResult
from gradwire_server.sessions import SessionView
from gradwire_server.stats import Summary
from gradwire_server.trainer import MAX_NAME_CHARS, Trainer

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
    "activation": pb.TENSOR_KIND_ACTIVATION,
    "optimizer_state": pb.TENSOR_KIND_OPTIMIZER_STATE,
    "delta": pb.TENSOR_KIND_DELTA,
    "buffer": pb.TENSOR_KIND_BUFFER,
}


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The DType a tensor of `dtype` travels as: widened for int8, uint8, int16, uint16
    (int32) and uint32 (int64), as its values are (a uint8 tensor was listed INTERNAL, its
    values read as int32: found by a review); CodecError for a dtype the wire cannot carry."""
    name = str(dtype).removeprefix("torch.")
    return codec.dtype_from_name(codec.sent_as(name) or name)


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
            # It named no dtype a fill could take (found by a review of the error catalogue).
            raise InvalidInput(
                f"{what}: fill dtype {message.dtype} is not supported; use one of "
                + ", ".join(pb.DType.Name(k) for k in codec.DTYPE_NAMES)  # type: ignore[arg-type]
                + ", or DTYPE_UNSPECIFIED for the default",
                reason="BAD_FILL",
            )
    if len(message.shape) > codec.MAX_DIMS:
        raise InvalidInput(
            f"{what}: a fill has at most {codec.MAX_DIMS} dimensions, got {len(message.shape)}",
            reason="BAD_FILL",
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


def no_room_for(what: str, shape: Sequence[int], dtype: int | None, sent: str) -> OverLimit:
    """OverLimit (OUT_OF_MEMORY) for a value sent to the server that its memory cannot take:
    the host copy it is decoded or assembled into could not be allocated."""
    name = "" if dtype is None else f" {codec.DTYPE_NAMES[dtype]}"
    size = "x".join(map(str, shape)) or "scalar"
    return OverLimit(
        f"{what}: out of memory on cpu for a {size}{name} value {sent}; send less, or free "
        "memory on the server",
        reason="OUT_OF_MEMORY",
    )


def no_room_to_answer(selection: Selection, what: str) -> OverLimit:
    """OverLimit (OUT_OF_MEMORY) for a read whose reply, the one copy of its values, could not
    be allocated (answered INTERNAL before: a 60 MiB unary read under 16-48 MiB of headroom)."""
    part = selection.part
    values = ""
    if part is not None:
        size = "x".join(map(str, part.shape)) or "scalar"
        mib = part.numel() * part.element_size() / (1 << 20)
        values = f" for the reply's {size} {str(part.dtype).removeprefix('torch.')} values"
        values += f" of {selection.name!r} ({mib:.1f} MiB)"
    return OverLimit(
        f"{what}: out of memory on cpu{values}; read them streamed (GetTensorStream), read a "
        "smaller slice, or free memory on the server",
        reason="OUT_OF_MEMORY",
    )


def tensor_from_split(
    split: wire.Split[Any], path: wire.Path, message: pb.Tensor, what: str
) -> torch.Tensor:
    """The Tensor at `path` of a split request (`message` is that Tensor), as torch."""
    try:
        return codec.decode_split_torch(split, path, message)
    except codec.CodecError as err:
        raise InvalidInput(f"{what}: {err}", reason="BAD_TENSOR") from err
    except MemoryError as err:
        # The copy torch needs (the request's bytes are read-only): numpy's MemoryError. It
        # was answered INTERNAL (a 30 MiB unary Forward under 20-28 MiB of headroom).
        raise no_room_for(what, message.shape, message.dtype, "sent in one message") from err


def source_from_split(
    split: wire.Split[Any], path: wire.Path, message: pb.TensorSource, what: str
) -> TensorInput | None:
    """The tensor or fill spec of the TensorSource at `path`; None when it names neither."""
    which = message.WhichOneof("source")
    if which == "tensor":
        return tensor_from_split(split, (*path, (_SOURCE_TENSOR, 0)), message.tensor, what)
    if which == "fill":
        return fill_from_proto(message.fill, what)
    return None


def field_path(message_type: type[Message], *names: str) -> wire.Path:
    """The wire.Path of a singular field chain, e.g. (ForwardRequest, "input")."""
    path: list[tuple[int, int]] = []
    descriptor: Any = message_type.DESCRIPTOR
    for name in names:
        f = descriptor.fields_by_name[name]
        path.append((f.number, 0))
        descriptor = f.message_type
    return tuple(path)


class Chunks:
    """Reassembles a tensor sent as TensorChunks, with the trainer's element limit.

    For a trainer on a GPU, the tensor is assembled there, each chunk crossing as it comes
    (_OnDevice), one stream at a time per trainer (Trainer.device_assemblies). Otherwise on
    the host; with `spare`, in reused memory: only for values that are copied elsewhere and
    then dropped (SetTensorStream), never for ones the trainer keeps. Call `release` when
    the stream ends, however it ends.
    """

    def __init__(
        self,
        what: str,
        max_elements: int,
        spare: SpareMemory | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        self._block: torch.Tensor | None = None
        self._spare = spare
        self._written = False
        self._slot: threading.BoundedSemaphore | None = None
        self._assembler: codec.Assembler
        if (
            trainer is not None
            and trainer.device.type == "cuda"
            and trainer.device_assemblies.acquire(blocking=False)
        ):
            self._slot = trainer.device_assemblies
            self._assembler = _OnDevice(what, max_elements, trainer.device, trainer.stream_buffer)
        else:
            allocate = None if spare is None else self._allocate
            self._assembler = codec.Assembler(what, max_elements, allocate)
        self.what = what

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        assert self._spare is not None
        self._block = self._spare.take(shape, _TORCH_OF[dtype], torch.device("cpu"))
        return self._block.numpy()

    def written(self) -> None:
        """The value was written: `release` keeps its memory (or what it replaced) for the
        next stream. A refused value's memory is let go instead: its size was the caller's
        choice, up to the element limit (2 GiB of float64 by default), and a refused stream
        left a block that large held for the server's lifetime."""
        self._written = True

    def replaced(self, old: torch.Tensor) -> None:
        """The tensor was kept as it is, in place of `old`: `release` gives back `old`'s memory,
        not the assembly's, which now belongs to the trainer."""
        self._block = old

    def release(self) -> None:
        """Gives the assembly memory back to the spare, once the tensor has been written (or
        what replaced() named instead), and the trainer's device assembly back; once the
        stream has ended, however (again: nothing)."""
        if isinstance(self._assembler, _OnDevice):
            self._assembler.close()
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        if self._spare is not None and self._block is not None and self._written:
            self._spare.give_back(self._block)
        self._block = None

    @property
    def started(self) -> bool:
        """Whether a chunk has come: a stream without one sent no value at all."""
        return self._assembler.shape is not None

    def add(
        self,
        split: wire.Split[Any],
        path: wire.Path,
        chunk: pb.TensorChunk,
        check: Callable[[tuple[int, ...], torch.dtype], None] | None = None,
    ) -> None:
        """Adds a chunk. `check(shape, dtype)`: the receiver's check of the whole tensor, at
        the first chunk, before the memory it is assembled in is taken: a shape the model
        refuses was answered OUT_OF_MEMORY when that memory (on a GPU, or a host capped)
        could not be had, where SHAPE_MISMATCH or BAD_INPUT_SHAPE was the point (found by a
        review)."""

        def checked(shape: tuple[int, ...], dtype: int) -> None:
            assert check is not None
            check(shape, getattr(torch, codec.DTYPE_NAMES[dtype]))

        try:
            self._assembler.add(split, path, chunk, None if check is None else checked)
        except codec.ChunkLimitError as err:
            raise OverLimit(
                f"{err}: {fewer_elements(self.what)}", reason="TOO_MANY_ELEMENTS"
            ) from err
        except codec.CodecError as err:
            raise InvalidInput(str(err), reason="BAD_CHUNK") from err
        except (MemoryError, RuntimeError) as err:
            # The host block the value is assembled in, taken at the first chunk (numpy's
            # MemoryError, or torch's "can't allocate memory" for a reused block); a GPU
            # assembly says so itself. It was answered INTERNAL (found by a review that
            # capped a server's memory).
            if not out_of_memory(err):
                raise
            # The first chunk's shape: the block is taken then.
            raise no_room_for(
                self.what, chunk.shape, self._assembler.dtype, "sent in chunks"
            ) from err

    def tensor(self) -> torch.Tensor:
        try:
            return self._assembler.torch()
        except codec.CodecError as err:
            raise InvalidInput(str(err), reason="BAD_CHUNK") from err


class _OnDevice(codec.Assembler):
    """Assembles a tensor on a GPU: each chunk's values cross as they arrive, through two
    pinned buffers (staging.Runs) for a value of staging.PINNED_MIN_BYTES or more, so that the
    host never holds the whole value and the copies to the device overlap the receiving. A
    512 MiB SetTensorStream to an H200 grew the server's host memory by 1.57x its size when it
    was assembled on the host first, by 0.30-0.43x this way, and ran at 0.92-0.97x a bare
    stream's rate (0.88x before; an idle device: each run waits behind the device's queue).

    `allocate(shape, dtype, what)` makes the device tensor (Trainer.stream_buffer), once the
    first chunk has been checked."""

    def __init__(
        self,
        what: str,
        max_elements: int,
        device: torch.device,
        allocate: Callable[[tuple[int, ...], torch.dtype, str], torch.Tensor],
        run_bytes: int = staging.RUN_BYTES,
    ) -> None:
        super().__init__(what, max_elements)
        self.device = device
        self._allocate_on_device = allocate
        self.run_bytes = run_bytes
        self._tensor: torch.Tensor | None = None
        self._runs: staging.Runs | None = None

    def _current(self) -> contextlib.AbstractContextManager[Any]:
        """The device the trainer's thread has current (a server on cuda:1): pinned memory
        and events follow it."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()  # the tests' CPU stand-in

    def _begin(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        assert self.dtype is not None
        tensor = self._allocate_on_device(
            shape, getattr(torch, codec.DTYPE_NAMES[self.dtype]), self.what
        )
        self._tensor = tensor
        # Bytes in, bytes out: the wire's little-endian values are the device's.
        nbytes = tensor.numel() * tensor.element_size()
        pinned = self.device.type == "cuda" and nbytes >= staging.PINNED_MIN_BYTES
        self._runs = staging.Runs(tensor.view(-1).view(torch.uint8), self.run_bytes, pinned)

    def _store(self, offset: int, values: np.ndarray[Any, Any]) -> None:
        assert self._runs is not None
        # Pinned memory, made at the first run, can run out too.
        with self._current(), device_memory(self.what, self.device):
            self._runs.write(offset * values.itemsize, values.view(np.uint8))

    def numpy(self) -> np.ndarray[Any, Any]:
        raise codec.CodecError(f"{self.what}: assembled on {self.device}: torch() only")

    def torch(self) -> torch.Tensor:
        self._check_done()
        assert self._tensor is not None
        return self._tensor

    def close(self) -> None:
        """Lets go of the tensor, which its taker now holds alone (a parameter it became)."""
        self._tensor = self._runs = None


def chain_from_proto(messages: list[pb.Index] | object) -> list[tuple[codec.IndexItem, ...]]:
    count = len(messages)  # type: ignore[arg-type]
    if count > gw_limits.MAX_INDEX_CHAIN:  # counted before any is read
        raise InvalidInput(
            f"bad index: a chain of {count:,} indexes (x[0][1]... is one per bracket), at most "
            f"{gw_limits.MAX_INDEX_CHAIN}, as many as a tensor may have dimensions: join them "
            "into one index, x[0, 1], or read the tensor and index it where you are",
            reason="BAD_INDEX",
            metadata={"limit": str(gw_limits.MAX_INDEX_CHAIN)},
        )
    try:
        return codec.indices_from_proto(messages)  # type: ignore[arg-type]
    except codec.CodecError as err:
        raise InvalidInput(f"bad index: {err}", reason="BAD_INDEX") from err


def optimizer_from_proto(message: pb.OptimizerConfig, check_kind: bool = True) -> OptimizerSettings:
    """The settings `message` sets (None where it sets none); an unspecified kind is SGD.
    Without `check_kind`, a setting of the other kind is left for the trainer to refuse
    (SetOptimizer, whose keep_state takes an unspecified kind for the one in place)."""
    if message.kind not in (
        pb.OPTIMIZER_KIND_UNSPECIFIED,
        pb.OPTIMIZER_KIND_SGD,
        pb.OPTIMIZER_KIND_ADAM,
    ):
        raise InvalidInput(
            f"optimizer kind {message.kind} is not SGD or ADAM", reason="BAD_OPTIMIZER"
        )
    kind: Literal["sgd", "adam"] = "adam" if message.kind == pb.OPTIMIZER_KIND_ADAM else "sgd"

    def opt(name: str) -> float | None:
        if not message.HasField(name):  # type: ignore[arg-type]
            return None
        value = float(getattr(message, name))
        # torch refuses a NaN lr for Adam, but SGD took NaN and infinite settings, and the
        # next Step filled every parameter with NaN.
        if not math.isfinite(value):
            raise InvalidInput(
                f"optimizer setting {name} must be a finite number, got {value}",
                reason="BAD_OPTIMIZER",
            )
        return value

    settings = OptimizerSettings(
        kind=kind,
        lr=opt("lr"),
        momentum=opt("momentum"),
        weight_decay=opt("weight_decay"),
        beta1=opt("beta1"),
        beta2=opt("beta2"),
        eps=opt("eps"),
        nesterov=message.nesterov if message.HasField("nesterov") else None,
    )
    if check_kind:
        check_settings_kind(settings)
    return settings


def optimizer_to_proto(settings: OptimizerSettings) -> pb.OptimizerConfig:
    message = pb.OptimizerConfig(
        kind=pb.OPTIMIZER_KIND_ADAM if settings.kind == "adam" else pb.OPTIMIZER_KIND_SGD
    )
    for name in ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov"):
        value = getattr(settings, name)
        if value is not None:
            setattr(message, name, value)
    return message


def forward_response(result: ForwardResult) -> pb.ForwardResponse:
    response = pb.ForwardResponse(
        version=result.version,
        output_shape=result.output_shape,
        nonfinite_inputs=result.nonfinite_inputs,
    )
    if result.loss is not None:
        response.loss = result.loss
    return response


def _too_large(selection: Selection, size: int, limit: int) -> OverLimit:
    return OverLimit(
        f"{selection.name}: {size} bytes of values is over the {limit} bytes one message may "
        "carry; read it with GetTensorStream (the Python client does so by itself) or in slices",
        reason="USE_STREAM",
        metadata={"bytes": str(size), "limit": str(limit)},
    )


def get_response_pieces(
    selection: Selection, *, values: bool = True, limit: int | None = None, align: bool = True
) -> list[wire.Piece]:
    """A GetTensorResponse for a selection, its values spliced from the tensor's memory and,
    with `align`, put at a multiple of wire.ALIGNMENT bytes from the message's start.

    Called under the trainer's lock: joining the pieces is the copy that keeps this version.
    """
    header = pb.GetTensorResponse(version=selection.version, name=selection.name)
    part = selection.part
    if part is None or selection.full_shape is None:
        return [header.SerializeToString()]  # absent: no tensor, no shape
    header.full_shape.extend(selection.full_shape)
    _set_shown(header, selection)
    if not values:
        header.tensor.dtype = dtype_to_proto(part.dtype)  # type: ignore[assignment]
        header.tensor.shape.extend(part.shape)
        return [header.SerializeToString()]
    size = part.numel() * part.element_size()
    if limit is not None and size > limit:
        raise _too_large(selection, size, limit)
    tensor = codec.tensor_pieces(selection.host())
    head = header.SerializeToString()
    body = wire.length_field(_RESPONSE_TENSOR, tensor)
    return [head, *(wire.aligned(_RESPONSE_ALIGNMENT, len(head), body) if align else body)]


#: GetTensorResponses inside a TrainStepResponse (`fetch`): aligned from the start of the
#: reply when it is put together (train_step_bytes), not from their own.
fetched_pieces = functools.partial(get_response_pieces, align=False)


class SpareMemory:
    """One block of memory kept between large transfers, to be reused by the next one.

    Fresh memory is paid for in page faults on first touch, which on our machines cost more
    than copying into it (512 MiB: about 1.4 s fresh). One block is kept at most, so the
    server holds at most one streamed tensor's size beyond its model between transfers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block: torch.Tensor | None = None

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised tensor, in the kept block when it has the same size and device."""
        nbytes = codec.numel(shape) * dtype.itemsize
        with self._lock:
            block, self._block = self._block, None
        if block is None or block.numel() != nbytes or block.device != device:
            del block  # the wrong size: let it go before taking new memory
            return torch.empty(shape, dtype=dtype, device=device)
        return block.view(dtype).view(shape)

    def give_back(self, tensor: torch.Tensor) -> None:
        """Keeps a tensor's host memory for the next transfer; the caller no longer uses it.
        A GPU's memory is not kept: torch's caching allocator keeps it for the device."""
        if tensor.is_cpu and tensor.is_contiguous() and tensor.numel():
            with self._lock:
                self._block = tensor.reshape(-1).view(torch.uint8)


def stream_chunks(
    selection: Selection, read: StreamedRead | None, chunk_bytes: int
) -> Iterator[bytes]:
    """GetTensorChunk messages for a streamed read (Trainer.stream_read), each encoding only
    its own run of values, inside the run's block (the values may be live there)."""
    header = pb.GetTensorChunk(version=selection.version, name=selection.name)
    if read is None or selection.full_shape is None:
        yield header.SerializeToString()
        return
    header.full_shape.extend(selection.full_shape)
    _set_shown(header, selection)
    first = header.SerializeToString()
    later = pb.GetTensorChunk(version=selection.version).SerializeToString()
    step = max(1, chunk_bytes // read.element_size)
    for offset in range(0, max(read.numel, 1), step):
        with read.run(offset, min(step, read.numel - offset)) as host:
            dtype, values = codec.host_array(host)
            shape = read.shape if offset == 0 else None
            chunk = codec.chunk_pieces(values, dtype, offset, shape)
            head = first if offset == 0 else later
            body = wire.aligned(_CHUNK_ALIGNMENT, len(head), wire.length_field(_CHUNK, chunk))
            data = wire.join([head, *body])
        yield data


def _set_shown(header: pb.GetTensorResponse | pb.GetTensorChunk, selection: Selection) -> None:
    """The read's fields that say how PyTorch shows the tensor: its device, unset on the CPU,
    and its autograd, all unset for an untracked tensor (a gradient's, say)."""
    if selection.device:
        header.device = selection.device
    autograd = selection.autograd.get()
    if autograd is not UNTRACKED:
        header.requires_grad = autograd.requires_grad
        header.grad_fn = autograd.grad_fn
        header.whole_parameter = autograd.whole_parameter


def train_step_bytes(result: TrainResult[list[wire.Piece]]) -> bytes:
    header = pb.TrainStepResponse(
        version=result.version,
        loss=result.loss,
        output_shape=result.output_shape,
        parameters_updated=result.parameters_updated,
        nonfinite_inputs=result.nonfinite_inputs,
    )
    return _with_repeated(header, _FETCHED, _FETCHED_ALIGNMENT, result.fetched)


def _with_repeated(
    header: Message, number: int, padding: int, items: Iterable[Sequence[wire.Piece]]
) -> bytes:
    """`header` serialized, then each item as one more entry of repeated field `number`, its
    values aligned from the reply's start by the item's bytes field `padding`."""
    pieces: list[wire.Piece] = [header.SerializeToString()]
    at = len(pieces[0])
    for item in items:
        field = wire.aligned_field(number, padding, at, item)
        pieces.extend(field)
        at += wire.size(field)
    return wire.join(pieces)


# The torch dtype that holds each wire dtype's numpy array (bfloat16 arrives as uint16 bits).
_TORCH_OF: dict[np.dtype[Any], torch.dtype] = {
    np.dtype("<f4"): torch.float32,
    np.dtype("<f8"): torch.float64,
    np.dtype("<f2"): torch.float16,
    np.dtype("<u2"): torch.int16,
    np.dtype("<i4"): torch.int32,
    np.dtype("<i8"): torch.int64,
    np.dtype("?"): torch.bool,
}
_SOURCE_TENSOR = pb.TensorSource.DESCRIPTOR.fields_by_name["tensor"].number
_RESPONSE_TENSOR = pb.GetTensorResponse.DESCRIPTOR.fields_by_name["tensor"].number
_CHUNK = pb.GetTensorChunk.DESCRIPTOR.fields_by_name["chunk"].number
_RESPONSE_ALIGNMENT = pb.GetTensorResponse.DESCRIPTOR.fields_by_name["alignment"].number
_CHUNK_ALIGNMENT = pb.GetTensorChunk.DESCRIPTOR.fields_by_name["alignment"].number
_FETCHED = pb.TrainStepResponse.DESCRIPTOR.fields_by_name["fetched"].number
_FETCHED_ALIGNMENT = _RESPONSE_ALIGNMENT  # the fetched are GetTensorResponses


def listing_to_proto(listing: Listing) -> pb.ListTensorsResponse:
    response = pb.ListTensorsResponse(
        version=listing.version,
        model=listing.model,
        device=listing.device,
        optimizer=optimizer_to_proto(listing.optimizer),
        sample_shape=listing.spec.sample_shape,
        input_dtype=dtype_to_proto(listing.spec.input_dtype),  # type: ignore[arg-type]
        outputs=listing.spec.num_classes,
        loss=listing.spec.loss,
    )
    for info in listing.tensors:
        response.tensors.add(
            name=info.name,
            kind=_KINDS[info.kind],
            dtype=dtype_to_proto(info.dtype),
            shape=info.shape,
            present=info.present,
            requires_grad=info.requires_grad,
        )
    return response


def sessions_to_proto(
    sessions: Sequence[SessionView], opening: int, max_sessions: int, idle_timeout_s: float
) -> pb.ListSessionsResponse:
    response = pb.ListSessionsResponse(
        max_sessions=max_sessions, idle_timeout_s=idle_timeout_s, opening=opening
    )
    for view in sessions:
        response.sessions.add(
            session=view.session,
            version=view.version,
            open_s=view.open_s,
            idle_s=view.idle_s,
            calls_in_progress=view.calls_in_progress,
        )
    return response


def checkpoints_to_proto(found: Iterable[Described]) -> pb.ListCheckpointsResponse:
    response = pb.ListCheckpointsResponse()
    for one in found:
        response.checkpoints.add(
            name=one.name,
            bytes=one.bytes,
            saved_unix_s=one.saved_unix_s,
            saved_version=one.saved_version,
            model=one.model,
            problem=one.problem,
        )
    return response


class RequestsKept(Protocol):
    """What a server keeps for retries (request_log.RequestLog): each request id for `keep_s`
    after its last use, and past that while among the last `size`; `max_ids` ids at most,
    and the latest answers that fit in `max_bytes`."""

    keep_s: float
    size: int
    max_ids: int
    max_bytes: int


def server_info(
    device: str,
    max_elements: int,
    max_concurrent: int,
    max_sessions: int,
    idle_timeout_s: float,
    connections: gw_limits.ServerConnections,
    *,
    streams: tuple[int, int],
    requests: RequestsKept,
    max_name_chars: int = MAX_NAME_CHARS,
    instance_id: str = "",
) -> pb.GetServerInfoResponse:
    """GetServerInfo's answer: the versions, the device, and the limits a server started with
    these settings keeps (`connections`: its pings, the clients' it takes and its idle close;
    `streams`: the health Watches and the reflection streams it keeps open at once;
    `requests`: what it keeps for retries), and the id it drew as it started."""
    pings = connections.keepalive_s
    idle_s = connections.idle_s
    health_watches, reflection_streams = streams
    limits = pb.ServerLimits(
        max_message_bytes=gw_limits.MAX_MESSAGE_BYTES,
        max_value_bytes=gw_limits.MAX_VALUE_BYTES,
        default_chunk_bytes=gw_limits.CHUNK_BYTES,
        max_elements=max_elements,
        max_dims=codec.MAX_DIMS,
        max_name_chars=max_name_chars,
        max_histogram_bins=gw_limits.MAX_HISTOGRAM_BINS,
        max_train_steps=gw_limits.MAX_TRAIN_STEPS,
        max_request_id_chars=gw_limits.MAX_REQUEST_ID_CHARS,
        max_concurrent=max_concurrent,
        max_sessions=max_sessions,
        session_idle_timeout_s=idle_timeout_s,
        # As gRPC has them: whole milliseconds (limits.ServerConnections.options), 0 for none.
        keepalive_s=gw_limits.in_force_s(pings) if pings else 0.0,
        keepalive_timeout_s=gw_limits.in_force_s(connections.keepalive_timeout_s) if pings else 0.0,
        min_client_ping_s=gw_limits.in_force_s(connections.min_client_ping_s),
        max_health_watches=health_watches,
        max_reflection_streams=reflection_streams,
        request_id_kept_s=requests.keep_s,
        last_request_ids_kept=requests.size,
        max_request_ids_kept=requests.max_ids,
        answer_bytes_kept=requests.max_bytes,
        max_batch_calls=gw_limits.MAX_BATCH_CALLS,
        max_selectors=gw_limits.MAX_SELECTORS,
        max_index_chain=gw_limits.MAX_INDEX_CHAIN,
        connection_idle_s=gw_limits.in_force_s(idle_s) if idle_s else 0.0,
        max_connections=connections.max_connections,
    )
    return pb.GetServerInfoResponse(
        version=gradwire.__version__,
        torch_version=torch.__version__,
        device=device,
        limits=limits,
        known_fields=known_fields(),
        instance_id=instance_id,
    )


def known_fields() -> list[str]:
    """Every field of the contract's messages, "Message.field", nested messages' under their
    parents' names: what this server knows, and a client may look for before it sends an
    option an older server would ignore (GetServerInfoResponse.known_fields)."""
    found: list[str] = []

    def walk(message: Any, prefix: str) -> None:
        name = prefix + message.name
        found.extend(f"{name}.{field.name}" for field in message.fields)
        for nested in message.nested_types:
            walk(nested, name + ".")

    for message in pb.DESCRIPTOR.message_types_by_name.values():
        walk(message, "")
    return found


def stats_to_proto(summary: Summary) -> pb.Stats:
    message = pb.Stats(
        count=summary.count,
        min=summary.min,
        max=summary.max,
        mean=summary.mean,
        std=summary.std,
        norm=summary.norm,
        nan_count=summary.nan_count,
        inf_count=summary.inf_count,
        zero_count=summary.zero_count,
    )
    if summary.histogram is not None:
        h = summary.histogram
        message.histogram.CopyFrom(pb.Histogram(low=h.low, high=h.high, counts=h.counts))
    return message


_WATCHED = pb.WatchUpdate.DESCRIPTOR.fields_by_name["tensors"].number
_WATCHED_TENSOR = pb.WatchedTensor.DESCRIPTOR.fields_by_name["tensor"].number
_WATCHED_ALIGNMENT = pb.WatchedTensor.DESCRIPTOR.fields_by_name["alignment"].number


def watched_pieces(selection: Selection, values: bool, summary: Summary | None) -> list[wire.Piece]:
    """A serialized WatchedTensor for a selection, as pieces: its values are views of the
    selection, to be joined (copied) before the lock that keeps them at one version is let go.
    """
    header = pb.WatchedTensor(name=selection.name)
    part = selection.part
    if part is None or selection.full_shape is None:
        return [header.SerializeToString()]
    header.full_shape.extend(selection.full_shape)
    if summary is not None:
        header.stats.CopyFrom(stats_to_proto(summary))
    if not values:
        return [header.SerializeToString()]
    tensor = codec.tensor_pieces(selection.host())
    return [header.SerializeToString(), *wire.length_field(_WATCHED_TENSOR, tensor)]


def watch_update_bytes(
    version: int, cause: str, skipped: int, steps: int, tensors: list[list[wire.Piece]]
) -> bytes:
    """A serialized WatchUpdate, its tensors' pieces joined: the one copy of their values."""
    header = pb.WatchUpdate(version=version, cause=cause, skipped=skipped, steps=steps)
    return _with_repeated(header, _WATCHED, _WATCHED_ALIGNMENT, tensors)
