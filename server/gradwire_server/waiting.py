"""The streams waiting for their client's next message, so that a stop can end them at once.

Why: a stream between two messages waits in gRPC's request iterator, which nothing but the
client's next message, its end or the call's cancellation wakes. Pipelines and
`stream_calls=True` keep a client's Calls stream open while its program does other things,
and a tool keeps its reflection stream open while it is connected, so every stop waited for
the whole grace period (5 s by default) for streams that had nothing in progress. A stream
in the middle of a call is left to finish it; it ends when it next comes back here, before
waiting again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from gradwire_server.errors import Stopping

#: Why a Calls stream ended at a stop: what ran on it and what did not.
STOPPED = (
    "the server is stopping: this stream of calls ends here, and no call written to it after "
    "its last answer was run; call again once the server is back"
)


class WaitingStreams:
    """The streams of one service open now that are waiting for a message, by their context.
    `stopped`: the message of the status they end with at a stop."""

    def __init__(self, stopped: str = STOPPED) -> None:
        self.stopped = stopped
        self._lock = threading.Lock()
        self._waiting: set[grpc.ServicerContext] = set()
        self._stopped = False

    def next_message(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any | None:
        """The stream's next message, None once its client has ended it. Raises Stopping
        once `stop` has been called, before waiting or for a message that came as it was:
        that message is not run."""
        with self._lock:
            if self._stopped:
                raise Stopping(self.stopped)
            self._waiting.add(context)
        try:
            message = next(requests, None)
        except grpc.RpcError:
            if self._stopped:  # the cancel of `stop`, not the client's
                raise Stopping(self.stopped) from None
            raise
        finally:
            with self._lock:
                self._waiting.remove(context)
        if self._stopped:
            raise Stopping(self.stopped)
        return message

    @property
    def count(self) -> int:
        """Streams waiting now."""
        with self._lock:
            return len(self._waiting)

    def stop(self) -> None:
        """Ends the streams waiting now (nothing was in progress on them), and each other
        stream the next time it would wait."""
        with self._lock:
            self._stopped = True
            waiting = list(self._waiting)
        for context in waiting:
            _cancel(context, self.stopped)


def _cancel(context: grpc.ServicerContext, details: str) -> None:
    """Cancels a waiting stream with UNAVAILABLE and `details` as its status. A client may
    have written a message as the stream was cancelled, which was not run: told
    UNAVAILABLE, it retries it, where told CANCELLED (the status of gRPC's public cancel) it
    took the call as cancelled on its own side, perhaps run, and did not retry (found by a
    review: 3 stops of 6 under a client making calls back to back). Only grpcio's call
    object cancels with a status (no ErrorInfo can go with it, so no reason); should
    another grpcio not have it, the public cancel."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(grpc.StatusCode.UNAVAILABLE.value[0], details)  # type: ignore[union-attr]
    except Exception:  # grpcio's internals changed: CANCELLED, as gRPC's API has it
        context.cancel()
