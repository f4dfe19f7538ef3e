"""The floor every figure is measured against: bare gRPC calls carrying the same bytes, no codec.

Served by the same server process as gradwire (same threads, same loopback), with identity
serializers and outside gradwire's call log and metrics (`app.start`'s `extra_handlers`), so
the only difference left is what gradwire itself does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache

import grpc

SERVICE = "gradwire.bench.Floor"
#: What the small calls' echo carries (`FloorClient.small_echo`).
SMALL = b"\x00" * 16


@cache
def payload(size: int) -> bytes:
    """The bytes a floor call returns; made once, so the floor is transport alone.

    Random, not zeros: bytes(size) maps every page to the kernel's one zero page, which
    stays in cache and makes copying it unrealistically cheap (measured: about half the time).
    """
    return os.urandom(size)


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _blob(request: bytes, context: grpc.ServicerContext) -> bytes:
    return payload(int(request))


def _blob_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    size, chunk = (int(x) for x in request.split(b","))
    data = memoryview(payload(size))
    for start in range(0, size, chunk):
        yield bytes(data[start : start + chunk])


def _sink(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Blob": grpc.unary_unary_rpc_method_handler(_blob),
            "BlobStream": grpc.unary_stream_rpc_method_handler(_blob_stream),
            "Sink": grpc.stream_unary_rpc_method_handler(_sink),
        },
    )


class FloorClient:
    """Calls to the floor service on an existing channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.echo = channel.unary_unary(f"/{SERVICE}/Echo")
        self.blob = channel.unary_unary(f"/{SERVICE}/Blob")
        self.blob_stream = channel.unary_stream(f"/{SERVICE}/BlobStream")
        self.sink = channel.stream_unary(f"/{SERVICE}/Sink")

    def small_echo(self) -> None:
        """The small calls' floor: a bare unary call that carries 16 bytes each way."""
        self.echo(SMALL)

    def get(self, size: int) -> bytes:
        data: bytes = self.blob(str(size).encode())
        return data

    def get_stream(self, size: int, chunk: int) -> int:
        return sum(len(c) for c in self.blob_stream(f"{size},{chunk}".encode()))

    def put_stream(self, size: int, chunk: int) -> int:
        data = memoryview(payload(size))
        pieces = (bytes(data[s : s + chunk]) for s in range(0, size, chunk))
        return int(self.sink(pieces))
