"""A call that came as a message on a Calls stream, as the servicer's unary handlers see it.

The handlers ask a grpc.ServicerContext for four things: the caller's metadata, whether the
caller is still there, the time left, and a way to end with an error. A message's context
answers them from its stream (the caller, the stream's own deadline) and from the message
(its request id, expected version and timeout), and turns the error into an exception the
stream answers as the message's CallResponse, instead of ending the stream.
"""

from __future__ import annotations

import time
from typing import NoReturn

import grpc

from gradwire import calls


class Answered(Exception):
    """The call ended with an error: `status`, a serialized google.rpc.Status, to answer."""

    def __init__(self, code: grpc.StatusCode, status: bytes) -> None:
        super().__init__(code.name)
        self.code = code
        self.status = status


class MessageContext:
    """What a unary handler asks of its context, for one message of a Calls stream."""

    __slots__ = ("_deadline", "_metadata", "_stream")

    def __init__(self, stream: grpc.ServicerContext, metadata: dict[str, str]) -> None:
        self._stream = stream
        self._metadata = metadata
        self._deadline: float | None = None

    def carry(self, metadata: dict[str, str], timeout_ms: int) -> None:
        """What the message itself says, once read: its metadata (the stream's, with the
        message's request id and expected version) and its timeout (0: none)."""
        self._metadata = metadata
        self._deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The stream's metadata, with the message's request id and expected version."""
        return tuple(self._metadata.items())

    def peer(self) -> str:
        return self._stream.peer()

    def is_active(self) -> bool:
        """Whether the caller is still there: its stream is open."""
        return self._stream.is_active()

    def time_remaining(self) -> float | None:
        """Seconds to the sooner of the message's deadline and the stream's; None: none."""
        stream = self._stream.time_remaining()
        if self._deadline is None:
            return stream
        left = max(self._deadline - time.monotonic(), 0.0)
        return left if stream is None else min(left, stream)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """Raises Answered with the status's google.rpc.Status, to be the message's answer."""
        for key, value in status.trailing_metadata or ():
            if key == calls.STATUS_TRAILER and isinstance(value, bytes):
                raise Answered(status.code, value)
        raise AssertionError("status.abort always sends a google.rpc.Status")
