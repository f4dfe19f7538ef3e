"""A real server for a model spec in the test's own process, and a client of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

import gradwire
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.fill import Fill
from gradwire_server.app import Running, start
from gradwire_server.models import SIMPLE, ModelSpec
from gradwire_server.trainer import Trainer
from tests.background import eventually

# The devices a test of served behaviour runs on: the CPU and, with `pytest -m cuda` where
# there is one (scripts/gpu_check.sh), a CUDA device. ON_EACH_DEVICE marks a test so.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ON_EACH_DEVICE = pytest.mark.parametrize("device", DEVICES)


@contextmanager
def running_server(
    spec: ModelSpec = SIMPLE,
    seed: int | None = 0,
    port: int = 0,
    device: str = "cpu",
    **options: Any,
) -> Iterator[Running]:
    """A trainer for `spec` on `device` served on loopback (on `port`; 0: a free one),
    `options` passed to app.start (the call limit, keepalive, ...); the server stops when
    the block ends."""
    running = start(Trainer(spec, device=device, seed=seed), "127.0.0.1", port, **options)
    try:
        yield running
    finally:
        running.stop(grace=None)


@contextmanager
def serving(
    spec: ModelSpec, seed: int | None = None, device: str = "cpu"
) -> Iterator[tuple[Trainer, gradwire.Client]]:
    """A trainer for `spec` on `device` (seeded when asked) served on loopback, and a client
    of it; the server stops when the block ends."""
    with (
        running_server(spec, seed, device=device) as running,
        gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client,
    ):
        yield running.trainer, client


def old_trainer(version: int = 0, **methods: grpc.RpcMethodHandler) -> grpc.GenericRpcHandler:
    """A gradwire.v1.Trainer of `methods` alone, beside a ListTensors answering an empty
    listing at `version` (what the CLI asks first): a server from before something, or one
    that answers a call as no gradwire server would, for bare_server."""

    def listing(request: bytes, context: grpc.ServicerContext) -> bytes:
        return pb.ListTensorsResponse(version=version).SerializeToString()

    handlers = {"ListTensors": grpc.unary_unary_rpc_method_handler(listing), **methods}
    return grpc.method_handlers_generic_handler("gradwire.v1.Trainer", handlers)


def recording_reads(asked: list[bool]) -> grpc.GenericRpcHandler:
    """An old_trainer whose GetTensor answers a float32 tensor "w" of shape [2, 3] (its zeros
    only where asked for), noting in `asked` each request's omit_values: to see that a read
    of the shape alone asks for no values."""

    def get_tensor(request: bytes, context: grpc.ServicerContext) -> bytes:
        read = pb.GetTensorRequest.FromString(request)
        asked.append(read.omit_values)
        tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3])
        if not read.omit_values:
            tensor.float_values.extend([0.0] * 6)
        answer = pb.GetTensorResponse(name=read.name, tensor=tensor, full_shape=[2, 3])
        return answer.SerializeToString()

    return old_trainer(GetTensor=grpc.unary_unary_rpc_method_handler(get_tensor))


def calls_only(
    serve: Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]],
) -> grpc.GenericRpcHandler:
    """A gradwire.v1.Trainer with a Calls RPC alone, `serve` reading the raw requests and
    yielding raw answers (a server that answers as no gradwire server would), for
    bare_server."""
    return grpc.method_handlers_generic_handler(
        "gradwire.v1.Trainer", {"Calls": grpc.stream_stream_rpc_method_handler(serve)}
    )


@contextmanager
def bare_server(*handlers: grpc.GenericRpcHandler) -> Iterator[str]:
    """A gRPC server with no service at all but `handlers`, as a server from before a call
    answers it (UNIMPLEMENTED), or answers it as it did then; yields its address."""
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    bare.add_generic_rpc_handlers(handlers)
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        bare.stop(None)


def ended_contexts(*timeouts: float | None) -> list[grpc.ServicerContext]:
    """Real servicer contexts, one a call of each of `timeouts` (None: no deadline), of
    calls a bare server answered before it stopped: what a handler's context is once its
    call has ended, for the code that takes one (add_callback runs nothing on it,
    is_active is False, time_remaining counts to its deadline still)."""
    contexts: list[grpc.ServicerContext] = []

    def keep(request: bytes, context: grpc.ServicerContext) -> bytes:
        contexts.append(context)
        return b""

    handler = grpc.unary_unary_rpc_method_handler(keep)
    keeping = grpc.method_handlers_generic_handler("t.T", {"M": handler})
    with bare_server(keeping) as address, grpc.insecure_channel(address) as channel:
        call: Any = channel.unary_unary("/t.T/M")
        for timeout in timeouts:
            call(b"", timeout=timeout)
    return contexts


#: Without gRPC's bandwidth probe a client buffers 64 KiB of a stream it does not read, and
#: the server's next send waits for it; with it, megabytes.
UNPROBED = [("grpc.http2.bdp_probe", 0)]


def sends_waiting(running: Running, sends: int) -> None:
    """Waits until `sends` of `running`'s streams wait in a send for a client that does not
    read (waiting.SendingStreams)."""
    eventually(
        lambda: running.servicer.sending.under_way == sends,
        f"{sends} streams did not come to wait for their clients",
        within=60,
    )


@contextmanager
def unread_reads(running: Running, client: gradwire.Client, count: int = 1) -> Iterator[list[Any]]:
    """`count` GetTensorStreams of a 600 KiB input (`client` forwards it: 38 chunks of 16
    KiB) that their client does not read, each waiting in the server's send once the block
    runs; yields their calls, to read, or not, in the block."""
    client.forward(Fill.ones(512, 3, 10, 10), Fill.ones(512, dtype="int64"))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=UNPROBED) as channel:
        request = pb.GetTensorRequest(name="input", chunk_bytes=16 * 1024)
        read = pb_grpc.TrainerStub(channel).GetTensorStream
        reads = [read(request, timeout=60) for _ in range(count)]
        sends_waiting(running, count)
        yield reads
