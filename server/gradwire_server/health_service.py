"""grpc's health service, bounded: it answers callers that hold no token.

grpc's own servicer keeps an entry for every service name a Watch has asked about, for as
long as the server runs, and takes names as long as a whole message (64 MiB here). This one
refuses names longer than any service's, forgets a name when its last Watch closes, and
keeps at most `max_watches` Watches open at once. Watches stay non-blocking: an open one
holds no server thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from gradwire_server.servicer import abort

#: Longer than any service's full name ("gradwire.v1.Trainer").
MAX_SERVICE_NAME_CHARS = 256
#: Health Watches open at once; more are refused RESOURCE_EXHAUSTED.
MAX_WATCHES = 64


class HealthServicer(health.HealthServicer):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, max_watches: int = MAX_WATCHES) -> None:
        super().__init__()  # non-blocking Watch, grpc's default
        self.max_watches = max_watches
        self._watches = 0  # open now, under self._lock

    @property
    def open_watches(self) -> int:
        return self._watches

    def watched_names(self) -> int:
        """The service names grpc's servicer keeps an entry for."""
        with self._lock:
            return len(self._send_response_callbacks)

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        _check_name(request.service, context)
        answer: health_pb2.HealthCheckResponse = super().Check(request, context)
        return answer

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
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
            return super().Watch(request, context, send_response_callback)
        except BaseException:
            with self._lock:
                self._watches -= 1
            raise

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


def _check_name(service: str, context: grpc.ServicerContext) -> None:
    if len(service) > MAX_SERVICE_NAME_CHARS:
        abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a service name is at most {MAX_SERVICE_NAME_CHARS} characters, got "
            f'{len(service)}: ask by its full name, such as "gradwire.v1.Trainer", or "" for '
            "the whole server",
            "BAD_SERVICE_NAME",
            {},
        )
