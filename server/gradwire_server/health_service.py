"""grpc's health service, bounded: it answers callers that hold no token.

grpc's own servicer keeps an entry for every service name a Watch has asked about, for as
long as the server runs, and takes names as long as a whole message (64 MiB here). This one
refuses names longer than any service's, forgets a name when its last Watch closes, and
keeps at most `max_watches` Watches open at once. A request over MAX_REQUEST_BYTES is
refused by its length, unparsed, and the memory its reading took is given back once such
requests stop (see `_bounded`).

Each open Watch waits on a thread of a pool of its own, never on one of the server's: a few
Watches, which need no token, would otherwise take every thread the server has. Checks and
Lists run there too: gRPC holds a thread while it waits for a call's request, and checks
whose request never comes would otherwise take the server's. Not grpc's
non-blocking Watch: it sends while holding the servicer's lock, and a send waits for grpc's
polling thread, which runs the close of another Watch, which takes that lock. Watches opened
and cancelled from eight threads deadlocked the server that way within a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from gradwire_server.allocator import ReleaseWhenQuiet
from gradwire_server.errors import InvalidInput
from gradwire_server.pools import ServingPool
from gradwire_server.servicer import deserializer, on_pool
from gradwire_server.status import abort, well_formed

#: Longer than any service's full name ("gradwire.v1.Trainer").
MAX_SERVICE_NAME_CHARS = 256
#: The most bytes of a health request parsed; longer ones are refused by their length. A
#: Check's or Watch's longest valid request is 1,027 bytes (a name of 256 characters of up to
#: 4 bytes in UTF-8, its tag and a 2-byte length); a List's has no fields.
MAX_REQUEST_BYTES = 4096
#: Health Watches open at once; more are refused RESOURCE_EXHAUSTED.
MAX_WATCHES = 64
#: Threads beyond MAX_WATCHES in the Watches' pool, so that a Watch over the limit is
#: refused at once rather than queued behind the open ones.
SPARE_THREADS = 2


class HealthServicer(health.HealthServicer):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, max_watches: int = MAX_WATCHES) -> None:
        self.pool = ServingPool(max_watches + SPARE_THREADS, thread_name_prefix="gradwire-health")
        # The pool travels with the handler (add_to_server), not on grpc's class.
        super().__init__(experimental_non_blocking=False)
        self.max_watches = max_watches
        self._watches = 0  # open now, under self._lock
        #: Gives back the memory that requests over MAX_REQUEST_BYTES took, once they stop.
        self.release = ReleaseWhenQuiet()

    @property
    def open_watches(self) -> int:
        return self._watches

    def watched_names(self) -> int:
        """The service names grpc's servicer keeps an entry for."""
        with self._lock:
            return len(self._send_response_callbacks)

    def close(self) -> None:
        """Lets the Watches' threads go once the server has stopped (its calls ended)."""
        self.pool.shutdown(wait=False)

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._check_parsed(request, context)
        _check_name(request.service, context)
        with self._lock:
            known = request.service in self._server_status
        if not known:
            # grpc's servicer answers NOT_FOUND with no message: the caller read "not found".
            with self._lock:
                names = sorted(self._server_status)
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no health status for service {request.service!r}; this server has one for "
                + ", ".join(repr(name) for name in names)
                + " ('' is the server as a whole)",
                "UNKNOWN_SERVICE",
                {"service": request.service},
            )
        answer: health_pb2.HealthCheckResponse = super().Check(request, context)
        return answer

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        self._check_parsed(request, context)
        _check_name(request.service, context)
        with self._lock:
            if self._watches >= self.max_watches:
                abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.max_watches} health Watches are open, the most this server keeps: "
                    "close one, or poll with Check",
                    "TOO_MANY_WATCHES",
                    {"limit": str(self.max_watches)},
                )
            self._watches += 1
        try:
            watcher = super().Watch(request, _ClosesIfEnded(context), send_response_callback)
        except BaseException:
            with self._lock:
                self._watches -= 1
            raise
        with self._lock:
            if self._gracefully_shutting_down and watcher is not None:
                watcher.close()  # opened as the stop began: NOT_SERVING, then the end
        return watcher

    def enter_graceful_shutdown(self) -> None:
        """As grpc's (every service NOT_SERVING, for good), and then each open Watch ends,
        OK, once it has sent its last status (NOT_SERVING, or SERVICE_UNKNOWN for a name
        with none): it has no other change to send, and an open Watch held the server's
        stop for the whole grace period (a client in another language that checks health
        on its channel keeps one open all the time)."""
        super().enter_graceful_shutdown()
        with self._lock:
            for callbacks in self._send_response_callbacks.values():
                for callback in callbacks:
                    callback(None)  # grpc's own end of a Watch: after the updates it holds

    def List(
        self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status, as Check answers each: grpcio-health-checking's servicer
        does not implement List (it raises NotImplementedError, which gRPC answered
        UNIMPLEMENTED and logged at ERROR with a traceback: anyone, with no token, could fill
        the log; found by a review of running the server for several users)."""
        self._check_parsed(request, context, names=False)
        with self._lock:
            statuses = dict(self._server_status)
        answer = health_pb2.HealthListResponse()
        for service, status in statuses.items():
            answer.statuses[service].status = status
        return answer

    def _check_parsed(
        self, request: Any, context: grpc.ServicerContext, names: bool = True
    ) -> None:
        """Refuses a request over MAX_REQUEST_BYTES (`names`: its method's request holds a
        service name) or bytes that are no health request, INVALID_ARGUMENT."""
        if isinstance(request, Oversized):
            self.release.soon(request.size)
            refused = (
                f"{request.size} bytes, more than any health request ({MAX_REQUEST_BYTES} at "
                "most; refused unread)"
            )
            if names:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a service name is at most {MAX_SERVICE_NAME_CHARS} characters, and this "
                    f"request is {refused}: {_ASK_BY_NAME}",
                    "BAD_SERVICE_NAME",
                    {},
                )
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {request.type_name}: it is {refused}, and a "
                "List request has no fields",
                "MALFORMED_REQUEST",
                {},
            )
        try:
            well_formed(request)
        except InvalidInput as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, err.message, err.reason, {})

    def _on_close_callback(
        self, send_response_callback: Callable[[Any], None], service: str
    ) -> Callable[[], None]:
        close: Callable[[], None] = super()._on_close_callback(send_response_callback, service)

        def closed() -> None:
            try:
                close()
            finally:
                with self._lock:
                    self._watches -= 1
                    if not self._send_response_callbacks.get(service, True):
                        del self._send_response_callbacks[service]  # its last Watch

        return closed


class _ClosesIfEnded:
    """A Watch's context whose `add_callback` runs the callback at once when the call has
    already ended. grpc's runs nothing then (and says so, returning False), which grpc's
    Watch does not look at: a Watch cancelled as it opened stayed registered and counted,
    its thread waiting for ever; 64 of them refused every Watch after."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if not self._context.add_callback(callback):
            callback()
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


_ASK_BY_NAME = 'ask by its full name, such as "gradwire.v1.Trainer", or "" for the whole server'


def _check_name(service: str, context: grpc.ServicerContext) -> None:
    if len(service) > MAX_SERVICE_NAME_CHARS:
        abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a service name is at most {MAX_SERVICE_NAME_CHARS} characters, got "
            f"{len(service)}: {_ASK_BY_NAME}",
            "BAD_SERVICE_NAME",
            {},
        )


@dataclass(frozen=True)
class Oversized:
    """What a health request's deserializer hands on for bytes over MAX_REQUEST_BYTES: their
    length, not the bytes."""

    type_name: str
    size: int


def _bounded(message_type: type[Any]) -> Callable[[bytes], Any]:
    """gradwire's deserializer for `message_type`, which first refuses bytes over
    MAX_REQUEST_BYTES by their length (Oversized), unparsed.

    gRPC reads a request whole (up to the server's 64 MiB, which SetTensor needs) before
    any handler runs, and a health request needs no token: parsed, a 60 MiB name was copied
    twice more (protobuf's copy, then Python's string of it) before its refusal, and 66 of
    them at once, one for each thread of the health pool, took the server from 326 MB to
    2.16 GB, of which 1.59 GB stayed for good, 2.38 GB after a second round (glibc kept it
    free, in holes between what its heaps still hold, where no threshold gives it back;
    found by a security review, sixty-second session). gRPC's own buffer of the request, and
    its copy into the bytes handed here, cannot be avoided: the memory they took is given
    back once such requests stop (HealthServicer.release)."""
    parse = deserializer(message_type)
    name = message_type.DESCRIPTOR.full_name

    def parse_bounded(data: bytes) -> Any:
        if len(data) > MAX_REQUEST_BYTES:
            return Oversized(name, len(data))
        return parse(data)

    return parse_bounded


def add_to_server(servicer: HealthServicer, server: grpc.Server) -> None:
    """grpc's add_HealthServicer_to_server, with gradwire's request deserializer: bytes that
    are not a health request are answered INVALID_ARGUMENT (MALFORMED_REQUEST), as the
    Trainer's methods answer them. grpc's own answered INTERNAL ("Exception deserializing
    request!"), a status kept for the server's own faults."""
    check, listing = health_pb2.HealthCheckRequest, health_pb2.HealthListRequest
    answer, answers = health_pb2.HealthCheckResponse, health_pb2.HealthListResponse
    methods = {
        "Check": (grpc.unary_unary_rpc_method_handler, check, answer),
        "List": (grpc.unary_unary_rpc_method_handler, listing, answers),
        "Watch": (grpc.unary_stream_rpc_method_handler, check, answer),
    }
    # All three on the health service's own pool. Each open Watch waits on a thread; and
    # gRPC waits for a Check's or List's request on a thread of its handler's pool before
    # the handler runs: checks opened without a token whose request never came (30) held
    # every thread of the server's, and no call was answered while they stayed open (a
    # review of running the server for others, fifty-fourth session).
    behaviours = {
        name: on_pool(getattr(servicer, name), servicer.pool) for name in ("Check", "List", "Watch")
    }
    handlers = {
        name: make(
            behaviours[name],
            request_deserializer=_bounded(request_type),
            response_serializer=response_type.SerializeToString,
        )
        for name, (make, request_type, response_type) in methods.items()
    }
    service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
