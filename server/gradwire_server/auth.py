"""Who gets in: a bearer token checked on every call (health exempt), and TLS credentials.

The token is compared in constant time. Without a token the server trusts everyone who can
reach it, which is why it binds to localhost unless told otherwise.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from gradwire.credentials import check_token
from gradwire_server.errors import InvalidInput
from gradwire_server.servicer import HANDLER_KINDS, abort

# Health checks answer without a token: orchestrators probe before they hold secrets.
_OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        """ValueError for a token no client could send (a newline in it)."""
        self._expected = f"Bearer {check_token(token, 'the server token')}".encode()

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(_OPEN_SERVICES):
            return continuation(details)
        tokens = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        given = tokens[0] if len(tokens) == 1 else ""
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without a token
        if len(tokens) > 1:
            # Which one counts would be a guess: the last, before, so a right token after a
            # wrong one got in, and a proxy that adds its own before the caller's decided.
            message = f"authorization is given {len(tokens)} times; send one token"
            return _refusal(handler, message, "BAD_TOKEN")
        if not given:
            message = (
                "this server needs a token: send 'authorization: Bearer <token>' "
                "(gradwire.connect(token=...) in Python; --token-file or the GRADWIRE_TOKEN "
                "environment variable on the command line)"
            )
            return _refusal(handler, message, "NO_TOKEN")
        return _refusal(handler, "the token sent is not this server's", "BAD_TOKEN")


def _refusal(handler: grpc.RpcMethodHandler[Any, Any], message: str, reason: str) -> Any:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED, with an
    ErrorInfo as every other error of the server has."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, grpc.StatusCode.UNAUTHENTICATED, message, reason, {})

    make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS; with `client_ca`, clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Refuses, saying what is wrong, files with which gRPC would only fail to listen
        ("failed to bind", as for a port in use): a certificate and key that do not belong
        together, a file that is not PEM or cannot be read, a client CA with no certificate.
        InvalidInput (BAD_TLS)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Python's OpenSSL also refuses keys and signatures below its security level (an
        # RSA-1024 key, a SHA-1 signature), which gRPC's BoringSSL serves with: only whether
        # the files are what they should be is checked here.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        try:
            # A key protected by a passphrase is refused too (gRPC cannot read one): the
            # callback stops OpenSSL from asking for it on the terminal.
            context.load_cert_chain(self.cert, self.key, password=_no_passphrase)
        except (ssl.SSLError, OSError, ValueError) as err:
            raise InvalidInput(
                f"--tls-cert {self.cert} and --tls-key {self.key} are not a certificate and "
                f"its unencrypted private key, in PEM ({_why(err)}): give the server's "
                "certificate and the key it was made with",
                reason="BAD_TLS",
            ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError, ValueError) as err:
                raise InvalidInput(
                    f"--tls-client-ca {self.client_ca} is not a CA certificate in PEM "
                    f"({_why(err)}): give the certificate of the CA that signs the clients'",
                    reason="BAD_TLS",
                ) from None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted with a passphrase")


def _why(err: Exception) -> str:
    """OpenSSL's or the system's reason, without its codes."""
    if isinstance(err, ssl.SSLError):
        if err.reason:
            return err.reason.lower().replace("_", " ")
        return "a file is not the PEM it should be: are the two swapped?"  # "PEM lib"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err)
