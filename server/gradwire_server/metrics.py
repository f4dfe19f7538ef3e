"""What operators watch: Prometheus metrics per RPC and gauges of the model, and an access log.

`CallInterceptor` wraps the handler of every method of gradwire's services (Trainer, health,
reflection; others served beside them, such as the benchmark's bare-gRPC floor, pass as they
are): while a call runs it is the current call of the log lines (logs.py); when it ends
its status code and duration are counted in `Metrics` (when the server has them) and, at DEBUG,
logged on "gradwire_server.access". Each server has its own registry, so that servers in one
process do not collide, and `MetricsServer` exposes it over HTTP.

The cost per call is one small object, a contextvar set and reset, two clock reads and the
Prometheus updates, on children cached per method and code; no lock is held across the call. A
failure to record never fails the call: it is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from gradwire_server.logs import CURRENT_CALL, Call
from gradwire_server.places import Slots
from gradwire_server.servicer import HANDLER_KINDS
from gradwire_server.sessions import Sessions
from gradwire_server.waiting import SendingStreams

log = logging.getLogger(__name__)
access_log = logging.getLogger("gradwire_server.access")

#: Seconds: from a sub-millisecond read to a long upload or a big training step.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
#: The method label of calls to methods no service has (answered UNIMPLEMENTED by grpc): the
#: name is the caller's to choose, so it is not a label value.
UNKNOWN_METHOD = "unknown"


def device_memory_bytes(device: torch.device) -> float:
    """Memory in use for the model: allocated by PyTorch on a CUDA device, else the process's
    resident set size."""
    try:
        if device.type == "cuda":
            return float(torch.cuda.memory_allocated(device))
        with open("/proc/self/statm", encoding="ascii") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except Exception:  # not Linux, or no device: the gauge says so instead of failing a scrape
        return float("nan")


class _MethodStats:
    """The labelled children of one method, so that a call does no label lookup once warm."""

    __slots__ = ("_calls", "_codes", "_method", "seconds")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self._calls = metrics.calls
        self._method = method
        self._codes: dict[str, Any] = {}
        self.seconds = metrics.seconds.labels(method)

    def count(self, code: str) -> None:
        self.child(code).inc()

    def child(self, code: str) -> Any:
        """The counter of this method's calls answered `code`, at 0 until one is."""
        child = self._codes.get(code)
        if child is None:  # a race creates the same child twice: labels() returns one object
            child = self._codes[code] = self._calls.labels(self._method, code)
        return child


class Metrics:
    """The metrics of one server, in a registry of its own.

    gradwire_rpc_total{method, code}   calls finished, by status code name (a call made as a
                                        message on a Calls stream, or in a Batch, counts as
                                        its own method, and the stream or batch once more,
                                        as Calls or Batch, as does a message that names no
                                        call); at 0 from the start for the methods given
                                        (`start_at_zero`)
    gradwire_rpc_seconds{method}        histogram of call durations (a stream: all of it)
    gradwire_rpc_created, gradwire_rpc_seconds_created
                                        prometheus_client's: when each series above began
    gradwire_calls_in_progress          places taken: calls in progress, streams included
    gradwire_calls_limit                --max-concurrent: one more call is answered BUSY
    gradwire_streams_reclaimed_total    streams ended for a call that found every place taken
                                        (`watch_places`)
    gradwire_model_version              state version of the default session's model
    gradwire_sessions_open              sessions open beside the default one
    gradwire_device_memory_bytes{device} CUDA memory allocated, or the process's RSS on CPU
    process_*                           the process collector's CPU, memory and file counts
    """

    def __init__(self, sessions: Sessions, methods: Iterable[str] = ()) -> None:
        """`methods`: the full names whose gradwire_rpc_total series begin at 0 for every
        status code, rather than at the first call answered it (`start_at_zero`)."""
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "gradwire_rpc",
            "RPCs finished, by method and status code",
            ("method", "code"),
            registry=self.registry,
        )
        self.seconds = Histogram(
            "gradwire_rpc_seconds",
            "RPC duration in seconds, by method (server streams: until the last message)",
            ("method",),
            buckets=BUCKETS,
            registry=self.registry,
        )
        Gauge(
            "gradwire_model_version",
            "State version of the default session's model",
            registry=self.registry,
        ).set_function(lambda: sessions.default.version)
        Gauge(
            "gradwire_sessions_open",
            "Sessions open beside the default one",
            registry=self.registry,
        ).set_function(lambda: sessions.open_count)
        device = sessions.default.device
        Gauge(
            "gradwire_device_memory_bytes",
            "Memory in use: allocated by PyTorch on a CUDA device, the process's RSS on CPU",
            ("device",),
            registry=self.registry,
        ).labels(str(device)).set_function(functools.partial(device_memory_bytes, device))
        ProcessCollector(registry=self.registry)
        self._methods: dict[str, _MethodStats] = {}
        self.start_at_zero(methods)

    def watch_places(self, slots: Slots, sending: SendingStreams) -> None:
        """Gauges of the places for calls (`slots`): taken, and the limit, whose ratio is the
        server's saturation, where BUSY's count told only of the calls already refused; and a
        count of the streams `sending` ended for a call that found every place taken."""
        Gauge(
            "gradwire_calls_in_progress",
            "Calls in progress, streams included (an operator's call may take one place "
            "beyond gradwire_calls_limit)",
            registry=self.registry,
        ).set_function(lambda: slots.taken)
        Gauge(
            "gradwire_calls_limit",
            "Calls served at once (--max-concurrent): one more is answered BUSY",
            registry=self.registry,
        ).set(slots.limit)
        reclaimed = Counter(
            "gradwire_streams_reclaimed",
            "Watches, Trains and streamed reads ended for a call that found every place "
            "taken, their client having left a message unread",
            registry=self.registry,
        )
        sending.on_reclaimed = reclaimed.inc

    def start_at_zero(self, methods: Iterable[str]) -> None:
        """Shows a gradwire_rpc_total series at 0 for each of `methods` and each status code.
        A series first seen at 1 is one whose first call Prometheus's increase() and rate()
        cannot see (they need two samples): an alert on a Step answered FAILED_PRECONDITION,
        or on any INTERNAL, stayed silent on the first after every start (one error gave
        increase() 0 on a real Prometheus; found by a review of the metrics as an operator
        runs them). Prometheus's own advice: initialize the label values known in advance.
        27 methods and 17 codes: 459 series, and as many _created."""
        for method in methods:
            stats = self.method(method)
            for code in grpc.StatusCode:
                stats.child(code.name)

    def method(self, method: str) -> _MethodStats:
        stats = self._methods.get(method)
        if stats is None:
            stats = self._methods[method] = _MethodStats(self, method)
        return stats


#: Connections the metrics port serves at once; one more is closed at once. A scraper
#: needs one; the port needs no token, and each connection is a thread of the server's.
MAX_METRICS_CONNECTIONS = 16
#: Seconds a metrics connection may send nothing before it is closed.
METRICS_IDLE_S = 10.0
#: Seconds a metrics connection may stay open in all, however it sends: a scrape takes
#: milliseconds, and a connection serves one. Longer than METRICS_IDLE_S, so that a silent
#: connection is closed for its silence, as the log then says ("timed out").
METRICS_CONNECTION_S = 30.0


class _Handler(WSGIRequestHandler):
    """Serves one connection (one request), logging nothing, closed after METRICS_IDLE_S of
    silence or METRICS_CONNECTION_S in all.

    Why both: silence alone let a client that sends its request a byte at a time, each
    within the idle time, keep its connection for ever; 16 such kept every scrape out (a
    review of running the server for others, fifty-fourth session; mended in the
    fifty-seventh)."""

    timeout = METRICS_IDLE_S

    def setup(self) -> None:
        super().setup()
        # A thread of its own, beside the handler's: two a connection, 32 at most.
        self._deadline = threading.Timer(METRICS_CONNECTION_S, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        """Ends the connection where it stands: a read or write under way fails, and the
        handler ends (handle_error logs it at debug)."""
        with contextlib.suppress(OSError):  # already closed
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line a scrape would drown the server's log (Prometheus's own handler's way)


class _BoundedServer(ThreadingWSGIServer):
    """Prometheus's threading HTTP server, a thread a connection, at most
    MAX_METRICS_CONNECTIONS at once.

    Why: prometheus_client's start_http_server gives each connection a thread of the
    server's process, with no limit and no time limit: 600 connections that sent nothing
    (the port needs no token) held 600 threads, and 4.8 GB of address space for their
    stacks, for as long as they stayed open (a review of running the server for others,
    fifty-fourth session)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._places = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._places.acquire(blocking=False):
            self.shutdown_request(request)  # closed: a scraper retries at its next interval
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._places.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's end, in the log. socketserver's own printed "Exception occurred
        during processing of request" and a traceback to stderr, outside the log's format,
        for each connection closed for its silence or reset by its client: two put 43 lines
        that were not JSON in a `--log-format json` log (a review of the fifty-fourth
        session's changes)."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # timed out, reset, broken pipe: the client's doing
            log.debug("metrics connection from %s closed: %s", client_address, err)
        else:
            log.exception("metrics: could not serve a connection from %s", client_address)


class MetricsServer:
    """Prometheus's HTTP exposition of a registry, on a thread of its own."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            # The address's own family (an IPv6 host needs an IPv6 socket), as Prometheus's
            # start_http_server picks it.
            family, _, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            server_class = type("_Server", (_BoundedServer,), {"address_family": family})
            self._httpd: WSGIServer = make_server(
                str(address[0]), port, make_wsgi_app(registry), server_class, _Handler
            )
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({err.strerror or err}): choose another "
                "--metrics-port (0 picks a free one)"
            ) from err
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="gradwire-metrics", daemon=True
        )
        self._thread.start()
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


_warned = threading.Event()


def _warn_once() -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning("recording a call's metrics failed; calls go on unrecorded", exc_info=True)


def _raised(context: grpc.ServicerContext) -> str:
    """The status of a call whose handler raised an exception that set none: UNKNOWN, as
    grpc answers it, unless the caller had gone (cancelled, or its deadline passed), whose
    request stream then raises into the handler: it saw CANCELLED or DEADLINE_EXCEEDED,
    and counted UNKNOWN, a cancelled reflection stream (grpcurl's, an IDE's) made an alert
    on UNKNOWN fire (found by a review of running the server for several users)."""
    return "UNKNOWN" if context.is_active() else "CANCELLED"


def _code_of(context: grpc.ServicerContext, default: str) -> str:
    """The status the handler set (abort sets it too); `default` where it set none."""
    try:
        code = context.code()  # type: ignore[attr-defined]  # grpc has it; its stubs do not
    except Exception:
        return default
    return code.name if isinstance(code, grpc.StatusCode) else default


class CallInterceptor(grpc.ServerInterceptor):
    """Makes each call current for the log lines, and counts and times it into `metrics`."""

    def __init__(
        self, metrics: Metrics | None = None, services: Iterable[str] | None = None
    ) -> None:
        """`services`: the full names of the services whose calls it counts and logs; None:
        all. Calls to any other service pass unwrapped (a method that no service has is
        still counted, as "unknown")."""
        self.metrics = metrics
        self._services = None if services is None else frozenset(services)
        # method -> (the handler wrapped, its wrapper): handlers are built once per method.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        method = details.method
        if handler is None:
            self._finish(UNKNOWN_METHOD, "UNIMPLEMENTED", time.perf_counter())
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        service = method[1 : method.rfind("/")]  # "/package.Service/Method"
        if self._services is None or service in self._services:
            wrapped = self._wrap(method, handler)
        else:
            wrapped = handler
        self._wrapped[method] = (handler, wrapped)  # keys: methods that exist, so bounded
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        behavior = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[(streaming_in, streaming_out)]
        if getattr(behavior, "experimental_non_blocking", False):
            return handler  # sends through a callback grpc passes it: not ours to wrap
        wrap = self._stream if streaming_out else self._unary
        wrapped = wrap(method, behavior)
        # A handler run on a pool of its own (the health Watch's) stays there: grpc looks
        # for the pool on the function it calls.
        wrapped.experimental_thread_pool = getattr(  # type: ignore[attr-defined]
            behavior, "experimental_thread_pool", None
        )
        return HANDLER_KINDS[(streaming_in, streaming_out)](
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            token = CURRENT_CALL.set(Call(method, context))
            default = "UNKNOWN"  # an exception that is no abort: grpc answers UNKNOWN
            try:
                response = behavior(request, context)
                # Answered, unless its caller cancelled it (or its deadline passed) meanwhile:
                # grpc then sends nothing, and the caller saw CANCELLED or DEADLINE_EXCEEDED.
                default = "OK" if context.is_active() else "CANCELLED"
                return response
            except Exception:
                default = _raised(context)
                raise
            finally:
                self._finish(method, _code_of(context, default), start)
                CURRENT_CALL.reset(token)

        return call

    def _stream(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # A generator: grpc iterates it on the call's thread. The call is made current
            # around each step only, so that a stream closed elsewhere resets nothing wrongly.
            start = time.perf_counter()
            current = Call(method, context)
            default = "UNKNOWN"
            responses: Iterator[Any] | None = None
            try:
                while True:
                    token = CURRENT_CALL.set(current)
                    try:
                        if responses is None:
                            responses = iter(behavior(request, context))
                        response = next(responses)
                    except StopIteration:
                        # Ended by the client going away (a health Watch then ends quietly,
                        # its close callback run), or at its end.
                        default = "OK" if context.is_active() else "CANCELLED"
                        return
                    finally:
                        CURRENT_CALL.reset(token)
                    yield response
            except GeneratorExit:  # closed before its end: the client went away
                default = "CANCELLED"
                raise
            except Exception:
                default = _raised(context)
                raise
            finally:
                token = CURRENT_CALL.set(current)
                try:
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()  # the handler's own cleanup, as part of the call
                finally:
                    self._finish(method, _code_of(context, default), start)
                    CURRENT_CALL.reset(token)

        return call

    def begin(self, method: str, context: Any) -> Callable[[str], None]:
        """For a call that is no RPC of its own, a message on a Calls stream: makes it current
        for the log lines until the function returned is called with the name of its
        status code, which counts, times and logs it as `method` (a Forward on a stream
        counts as a Forward)."""
        start = time.perf_counter()
        token = CURRENT_CALL.set(Call(method, context))

        def done(code: str) -> None:
            try:
                self._finish(method, code, start)
            finally:
                CURRENT_CALL.reset(token)

        return done

    def _finish(self, method: str, code: str, start: float) -> None:
        """Counts and times a finished call, and logs it at DEBUG; never raises."""
        seconds = time.perf_counter() - start
        try:
            if self.metrics is not None:
                stats = self.metrics.method(method)
                stats.count(code)
                stats.seconds.observe(seconds)
        except Exception:
            _warn_once()
        if access_log.isEnabledFor(logging.DEBUG):
            try:
                ms = seconds * 1000
                access_log.debug(
                    "%s %s %.2f ms",
                    method,
                    code,
                    ms,
                    extra={"code": code, "duration_ms": round(ms, 3)},
                )
            except Exception:
                _warn_once()
