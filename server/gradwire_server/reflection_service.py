"""grpc's reflection service, bounded: its streams wait on threads of their own.

A reflection stream (grpcurl, Postman, an IDE's gRPC plugin) stays open as long as its
client keeps it, a thread waiting all along for the client's next question. grpc served
them on the server's pool, outside the call limit: 20 idle ones, or 4 beside 16 open
Watches, left no thread for any call, health checks included, and every later call
queued unanswered (found by a review of the server's concurrency). They now run on a pool
of their own, at most `max_streams` open at once; one more is refused at once,
RESOURCE_EXHAUSTED (TOO_MANY_REFLECTION_STREAMS). Bytes that are no reflection request
are answered INVALID_ARGUMENT (MALFORMED_REQUEST), as the Trainer's methods answer them,
where grpc answered INTERNAL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from gradwire_server.errors import InvalidInput, Stopping
from gradwire_server.pools import ServingPool
from gradwire_server.servicer import deserializer, on_pool
from gradwire_server.status import abort, well_formed
from gradwire_server.waiting import WaitingStreams

#: Reflection streams open at once; more are refused RESOURCE_EXHAUSTED.
MAX_STREAMS = 8
#: Threads beyond MAX_STREAMS in the streams' pool, so that a stream over the limit is
#: refused at once rather than queued behind the open ones.
SPARE_THREADS = 2


class ReflectionServicer(reflection.ReflectionServicer):  # type: ignore[misc]  # no types
    def __init__(self, service_names: Iterable[str], max_streams: int = MAX_STREAMS) -> None:
        super().__init__(tuple(service_names))
        self.max_streams = max_streams
        self.pool = ServingPool(
            max_streams + SPARE_THREADS, thread_name_prefix="gradwire-reflection"
        )
        self._lock = threading.Lock()
        self._open = 0
        #: The streams waiting for their client's next question, which `stop` ends.
        self.waiting = WaitingStreams(
            "the server is stopping: this reflection stream ends here; ask again once the "
            "server is back"
        )

    @property
    def open_streams(self) -> int:
        return self._open

    def stop(self) -> None:
        """The server begins to stop: its streams end now, each waiting for a question (an
        answer takes no time), rather than at the end of the grace period."""
        self.waiting.stop()

    def close(self) -> None:
        """Lets the streams' threads go once the server has stopped (its calls ended)."""
        self.pool.shutdown(wait=False)

    def ServerReflectionInfo(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        with self._lock:
            admitted = self._open < self.max_streams
            self._open += admitted
        if not admitted:
            abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} reflection streams are open, the most this server "
                "keeps: close one (a tool left connected?), or retry shortly",
                "TOO_MANY_REFLECTION_STREAMS",
                {"max_streams": str(self.max_streams)},
            )
        try:
            questions = _parsed(requests, context, self.waiting)
            yield from super().ServerReflectionInfo(questions, context)
        finally:
            with self._lock:
                self._open -= 1

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        """A method is a symbol too, as the reflection protocol names them
        (`<package>.<service>[.<method>]`: `grpcurl describe gradwire.v1.Trainer.Forward`
        asks so), and protobuf's pool finds types and services alone: grpcio-reflection
        answered a method NOT_FOUND (grpc/grpc#34743; found by a review of the contract
        from another language). Its service's file answers for it."""
        try:
            method = self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            pass  # not a method: a type, a service, or nothing this server has
        else:
            fully_qualified_name = method.containing_service.full_name
        return super()._file_containing_symbol(request, fully_qualified_name)


def _parsed(
    requests: Iterator[Any], context: grpc.ServicerContext, waiting: WaitingStreams
) -> Iterator[Any]:
    while True:
        try:
            request = waiting.next_message(requests, context)
            if request is None:
                return
            yield well_formed(request)
        except InvalidInput as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, err.message, err.reason, {})
        except Stopping as err:
            abort(context, grpc.StatusCode.UNAVAILABLE, err.message, err.reason, {})


#: The stable reflection service, which grpcio-reflection does not serve. Its messages are
#: v1alpha's, field for field, under another package's name: the same bytes on the wire.
#: Tools ask for v1 first (grpcurl, buf curl, Go's grpcreflect); some ask for v1 alone.
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
#: Its request's name, for a refusal of bytes that are none: they were called "not a valid
#: grpc.reflection.v1alpha.ServerReflectionRequest" on v1 too (found by a review
#: integrating from Node.js).
V1_REQUEST_NAME = "grpc.reflection.v1.ServerReflectionRequest"


def add_to_server(servicer: ReflectionServicer, server: grpc.Server) -> None:
    """grpc's add_ServerReflectionServicer_to_server, with the streams on the servicer's
    pool and gradwire's request deserializer; under v1's name as well as v1alpha's, one
    servicer and one limit of streams for both. ListServices names v1alpha alone, whose
    descriptors the server has to give."""

    behaviour = on_pool(servicer.ServerReflectionInfo, servicer.pool)
    for service, request_name in (
        (reflection.SERVICE_NAME, None),
        (V1_SERVICE_NAME, V1_REQUEST_NAME),
    ):
        handler = grpc.stream_stream_rpc_method_handler(
            behaviour,
            request_deserializer=deserializer(reflection_pb2.ServerReflectionRequest, request_name),
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
        server.add_registered_method_handlers(service, {"ServerReflectionInfo": handler})
