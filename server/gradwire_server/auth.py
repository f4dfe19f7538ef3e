"""Who gets in: a bearer token checked on every call (health exempt), and TLS credentials.

The token is compared in constant time. Without a token the server trusts everyone who can
reach it, which is why it binds to localhost unless told otherwise.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from gradwire.credentials import check_token
from gradwire_server.errors import InvalidInput
from gradwire_server.servicer import HANDLER_KINDS
from gradwire_server.status import abort

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

#: At most one log line about refused tokens in this many seconds: a client retrying with a
#: stale token, or someone trying tokens, writes a line a minute, not a line a call.
REFUSALS_LOG_S = 60.0

#: A certificate that expires within this is named in a warning at start.
EXPIRY_WARNING = datetime.timedelta(days=14)

# Health checks answer without a token: orchestrators probe before they hold secrets.
_OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)


class Refusals:
    """Logs refused calls, a WARNING at most every `every_s` seconds, counting those between.

    Without it a client with the wrong token left no trace in the log at INFO: the
    operator saw nothing (an operator's walkthrough). The metrics count every call."""

    def __init__(
        self, every_s: float = REFUSALS_LOG_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None  # when the last line was logged
        self._unlogged = 0  # refusals since then, this one included

    def note(self, reason: str, method: str, peer: str) -> None:
        with self._lock:
            self._unlogged += 1
            now = self._clock()
            if self._last is not None and now - self._last < self.every_s:
                return
            count, since = self._unlogged, self._last
            self._unlogged, self._last = 0, now
        if since is None:
            log.warning(
                "refused a call without this server's token (%s): %s from %s; more are counted "
                "here at most once a minute",
                reason,
                method,
                peer,
            )
        else:
            log.warning(
                "refused %d call%s without this server's token in the last %.0f s, the last "
                "(%s): %s from %s",
                count,
                "" if count == 1 else "s",
                now - since,
                reason,
                method,
                peer,
            )


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        """ValueError for a token no client could send (a newline in it)."""
        self._token = check_token(token, "the server token").encode()
        self.refusals = Refusals()

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(_OPEN_SERVICES):
            return continuation(details)
        tokens = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        given = tokens[0] if len(tokens) == 1 else ""
        # The scheme in any case, as HTTP's are ("bearer x" was refused BAD_TOKEN: found by a
        # review from another language's side); the token compared in constant time.
        if (
            isinstance(given, str)
            and given[:7].lower() == "bearer "
            and hmac.compare_digest(given[7:].lstrip(" ").encode(), self._token)
        ):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without a token

        def refusal(message: str, reason: str) -> Any:
            return _refusal(handler, message, reason, details.method, self.refusals)

        if len(tokens) > 1:
            # Which one counts would be a guess: the last, before, so a right token after a
            # wrong one got in, and a proxy that adds its own before the caller's decided.
            message = f"authorization is given {len(tokens)} times; send one token"
            return refusal(message, "BAD_TOKEN")
        if not given:
            message = (
                "this server needs a token: send 'authorization: Bearer <token>' "
                "(gradwire.connect(token=...) in Python; --token-file or the GRADWIRE_TOKEN "
                "environment variable on the command line)"
            )
            return refusal(message, "NO_TOKEN")
        return refusal(_wrong(given if isinstance(given, str) else ""), "BAD_TOKEN")


#: How a token is sent: what a refusal tells its caller to do.
_HOW = "send 'authorization: Bearer <token>'"


def _wrong(given: str) -> str:
    """What is wrong with `given`, an authorization that did not open: its scheme, a token
    left out, or the token itself. "the token sent is not this server's" was said of a
    'Basic ...' and of a 'Bearer' with no token, sending its reader to check a token that
    was right (found by a review of the contract from another language). Nothing of it is
    quoted: a token may hold spaces, and its first word read as a scheme would be a part of
    it."""
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer":
        return f"the authorization does not begin with 'Bearer ': {_HOW}"
    if not token.strip(" "):
        return f"no token after 'Bearer': {_HOW}"
    return "the token sent is not this server's"


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any],
    message: str,
    reason: str,
    method: str,
    refusals: Refusals,
) -> Any:
    """A handler that answers UNAUTHENTICATED at once, with an ErrorInfo as every other
    error of the server has, and tells `refusals`.

    It takes requests as a stream, whatever `handler` takes, and reads none: gRPC runs a
    one-request handler only once its request has come, on a thread of the server's pool
    that waits for it meanwhile, and then parses it. Calls without the token that never sent
    their request held every thread of the pool (30 of them stopped the owner's calls and
    health checks for as long as they stayed open), and a 60 MiB request of 20 million
    names took seconds of CPU and left the server 1 GB larger before its refusal (a review
    of running the server for others, fifty-fourth session)."""

    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        refusals.note(reason, method, context.peer())
        abort(context, grpc.StatusCode.UNAUTHENTICATED, message, reason, {})

    make = HANDLER_KINDS[(True, handler.response_streaming)]
    return make(refuse, response_serializer=handler.response_serializer)


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

    def valid_until(self) -> datetime.datetime | None:
        """When the server's certificate expires (UTC); None if it cannot be read."""
        certificate = _first_certificate(self.cert)
        return None if certificate is None else certificate.not_valid_after_utc

    def date_warnings(self, now: datetime.datetime | None = None) -> list[str]:
        """What is wrong with the certificates' dates, one sentence each: an expired or not
        yet valid certificate (gRPC serves it, and every handshake then fails), or one that
        expires within EXPIRY_WARNING."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        files = [
            (
                "--tls-cert",
                self.cert,
                "clients refuse the handshake (their error: certificate has expired)",
                "the server needs a new certificate",
            )
        ]
        if self.client_ca is not None:
            files.append(
                (
                    "--tls-client-ca",
                    self.client_ca,
                    "the server refuses every client certificate it signed (clients see the "
                    "connection closed)",
                    "the clients' CA needs renewing",
                )
            )
        warnings = []
        for flag, path, failing, remedy in files:
            certificate = _first_certificate(path)
            if certificate is None:
                continue
            after, before = certificate.not_valid_after_utc, certificate.not_valid_before_utc
            if now > after:
                warnings.append(
                    f"{flag} {path} expired on {_date(after)}: {failing}; {remedy}, then a restart"
                )
            elif now < before:
                warnings.append(
                    f"{flag} {path} is not valid before {_date(before)}, and this machine's "
                    f"clock reads {_date(now)}: is the clock wrong? Until then {failing}"
                )
            elif after - now < EXPIRY_WARNING:
                warnings.append(
                    f"{flag} {path} expires on {_date(after)}, in {_left(after - now)}: "
                    f"{remedy} before then, then a restart"
                )
        return warnings

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


def _first_certificate(path: Path) -> x509.Certificate | None:
    """The first certificate in a PEM file (a server's own comes first in its chain); None
    for a file that holds none (check() has said what is wrong with it)."""
    # Imported here: only TLS needs it, and a server without TLS runs without it (the GPU
    # machines of scripts/gpu_check.sh have no cryptography). With TLS and without it, the
    # dates go unchecked (said at start, `certificates_readable`): a traceback, exit 1,
    # where the README calls it needed for the dates alone (a review of installing).
    if not certificates_readable():
        return None
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError):
        return None


def certificates_readable() -> bool:
    """Whether the certificates' dates can be read: `cryptography` is installed (the server
    extra has it), and imports."""
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        return False
    return True


def _date(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _left(time: datetime.timedelta) -> str:
    """'3 days', '1 day'; under a day, hours ('5 hours', 'less than an hour')."""
    if time.days:
        return f"{time.days} day{'' if time.days == 1 else 's'}"
    hours = time.seconds // 3600
    if not hours:
        return "less than an hour"
    return f"{hours} hour{'' if hours == 1 else 's'}"


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
