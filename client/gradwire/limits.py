"""Wire limits and metadata keys shared by the server and the client, so both ends agree from
one constant."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import TYPE_CHECKING, Any, Final, TypeAlias

if TYPE_CHECKING:
    import numpy as np

#: The largest message either end sends or accepts: 64 MiB. Larger tensors travel in
#: chunks (GetTensorStream, SetTensorStream, ForwardStream); the Python client picks
#: the streamed call by itself.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

#: Tensor values one unary message may carry; the rest of the message gets the remainder.
MAX_VALUE_BYTES: Final = MAX_MESSAGE_BYTES - 64 * 1024

#: gRPC's default limit on a received message, in every language's gRPC library.
GRPC_DEFAULT_RECEIVE_BYTES: Final = 4 * 1024 * 1024

#: Values per message when a tensor is streamed (GetTensorStream, SetTensorStream,
#: ForwardStream): 4 MiB less 4 KiB for the rest of the message (its name, shapes and
#: padding take under 2 KiB), so that a default stream's messages stay under gRPC's default
#: receive limit and a client in another language reads them without raising it. A multiple
#: of 8: whole values of every dtype.
CHUNK_BYTES: Final = GRPC_DEFAULT_RECEIVE_BYTES - 4 * 1024

#: The Python client streams a Forward's input or a written value when its values exceed this.
STREAM_ABOVE_BYTES: Final = 32 * 1024 * 1024

#: Words of the status (UNAVAILABLE, which can carry no reason) that a server ends a Watch,
#: Train or streamed read with for a call that found every place taken, its client having
#: left a message unread: by them a client tells that end from its server going away, which
#: `gradwire watch --reconnect` said it was, and that the server was back.
ENDED_UNREAD = "had left a message unread for"

#: Domain of the google.rpc.ErrorInfo attached to every error the server sends.
ERROR_DOMAIN: Final = "gradwire.dev"


#: The server pings a connection that carries nothing for this long (idle ones too), and
#: closes one whose ping brings no answer in KEEPALIVE_TIMEOUT_S: so a client gone without
#: closing its connection (a network cut, a machine that vanished) ends its calls, and its
#: Watch or Train lets go of its session and its place.
KEEPALIVE_S: Final = 60.0
KEEPALIVE_TIMEOUT_S: Final = 20.0

#: The server closes a connection that has had no call in progress for this long (HTTP/2
#: GOAWAY, gRPC's max_connection_idle): a client's channel opens a new one at its next call,
#: a session and its state stay (they are named by id, not held by a connection), and an open
#: Watch, Train or Calls stream is a call in progress however quiet. Keepalive alone keeps a
#: connection whose peer answers pings for ever, and each takes one of the server's open
#: files: clients that open a channel a request and never close it, or connections that sent
#: HTTP/2's preface and nothing more, would hold them until the server could accept no more.
CONNECTION_IDLE_S: Final = 300.0

#: Connections the server keeps open at once; one more is closed as it opens, before any
#: handshake (gRPC's max_allowed_incoming_connections), and its client told UNAVAILABLE
#: ("Socket closed") until a connection closes. Each takes one of the server's open files,
#: and connections made faster than CONNECTION_IDLE_S closes them would otherwise take them
#: all: then the server could accept no connection, and open no file of its own (a
#: checkpoint, a metrics scrape) either. Each client channel, and each CLI command, opens one.
MAX_CONNECTIONS: Final = 1000

#: The shortest interval at which the server takes a client's pings on a connection that
#: carries no data. gRPC counts a closer ping as a strike, and closes the connection at the
#: third ("too_many_pings").
MIN_CLIENT_PING_S: Final = 30.0

#: gRPC's own interval for that rule, kept by any server or proxy that does not set it:
#: 5 minutes.
GRPC_DEFAULT_MIN_CLIENT_PING_S: Final = 300.0

#: The Python client pings a connection silent this long during a call, so that a Watch or
#: Train whose server vanished ends (UNAVAILABLE) instead of waiting for ever. Longer than
#: gRPC's default rule above, so that servers and proxies that keep it (a gradwire server
#: before these pings, an Envoy left as it comes) take the pings rather than closing a
#: quiet watch at the third; ask for more often with Client(keepalive=...) against a
#: gradwire server, which takes one every MIN_CLIENT_PING_S.
CLIENT_KEEPALIVE_S: Final = GRPC_DEFAULT_MIN_CLIENT_PING_S + 30

#: The longest a client waits between two attempts to reconnect to a server gone (gRPC's
#: default grows to 120 s), so that a client gets through within about this long (plus
#: gRPC's 20% jitter) of a restarted server's return.
MAX_RECONNECT_WAIT_S: Final = 2.0

#: The largest value of a gRPC option: they are C ints.
MAX_GRPC_INT: Final = 2**31 - 1

#: The longest a gRPC duration option holds: milliseconds in a 32-bit int, about 24.8 days.
MAX_GRPC_SECONDS: Final = MAX_GRPC_INT // 1000


#: The most histogram bins a GetStats or a Watch may ask for: the client checks it, and the
#: server (stats.check_bins) refuses more.
MAX_HISTOGRAM_BINS: Final = 4096

#: The most calls at once, or sessions, a server may be set to keep: what the .proto's
#: uint32 counts of them hold (GetServerInfo, ListSessions).
MAX_COUNT: Final = 2**32 - 1

#: Metadata a caller may send with a mutation: the id of this logical request (a retry sends
#: the same id and gets the first answer, or ANSWER_NOT_KEPT: applied once), the state
#: version it expects, and the server instance that version is of (GetServerInfo's
#: instance_id: a server started again counts afresh). On a Calls stream, CallRequest's
#: fields of the same meaning.
REQUEST_ID: Final = "gradwire-request-id"
EXPECTED_VERSION: Final = "gradwire-expected-version"
EXPECTED_INSTANCE: Final = "gradwire-expected-instance"
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def is_instance_id(value: object) -> bool:
    """Whether `value` is a server's instance id (GetServerInfoResponse.instance_id): 16
    lowercase hex digits, as a server draws it at start. The client checks one given to
    `expecting` or named by a refusal, the server one a mutation expects."""
    return isinstance(value, str) and len(value) == 16 and set(value) <= _HEX_DIGITS


#: Metadata naming the session a call acts on; absent: the default session.
SESSION: Final = "gradwire-session"

#: The most characters of a "gradwire-request-id" a server takes.
MAX_REQUEST_ID_CHARS: Final = 128
#: The longest session id a client sends ("gradwire-session"): a server's are 32 characters
#: (hex). A server's text log shows no more of one.
MAX_SESSION_CHARS: Final = 256

#: The most steps one Train may ask for: the client checks it, and the server refuses more.
MAX_TRAIN_STEPS: Final = 1 << 40

#: The most calls one Batch may carry: the client sends more in several, and the server
#: refuses more (BATCH_TOO_LONG). A batch holds one of the server's places while its calls
#: run.
MAX_BATCH_CALLS: Final = 1024

#: Items in one Watch, selectors in one TrainStep's fetch (TOO_MANY_SELECTORS). Each is read
#: under the session's lock at every update: one Watch of 20,000 items (of one value each)
#: took 3.7 s an update, and another client's TrainSteps fell from about 530 a second to 1
#: while it was read. At this limit an update takes about 0.17 s: a watcher that reads
#: every update still slows training to a few steps a second (min_interval bounds that),
#: but no single call holds the lock for seconds. A model's every parameter, gradient and
#: delta fits (the limit of calls in a Batch, too).
MAX_SELECTORS: Final = 1024

#: Indexes in one selector's chain, x[0][1]... one per bracket (BAD_INDEX, metadata "limit"):
#: as many as a tensor may have dimensions, so x[0][0]... of the largest tensor fits. Each
#: is applied in turn under the session's lock, a Watch's at every update, and cost nothing
#: to send: a GetTensor of 3,000,000 empty ones (6 MB) took 13 s and 1.5 GB, another
#: client's ZeroGrad waiting seconds (a security review, seventy-sixth session). At this
#: limit a Watch of MAX_SELECTORS items, 65,536 indexes, took 0.6-0.7 s an update (0.06 s
#: with one index each): bounded, where a 64 MiB request of 33 million held the lock minutes.
MAX_INDEX_CHAIN: Final = 64

#: Seeds travel as uint64: from 0 to MAX_SEED (2**64 - 1).
MAX_SEED: Final = (1 << 64) - 1


#: A whole number as whole() takes it: Python's or numpy's (np.int64 from np.arange). Typed
#: int alone, a type-checked caller's np.int64 seed or count of steps was refused (found by
#: a review of the client as a type-checked user's code sees it).
Whole: TypeAlias = "int | np.integer[Any]"

#: A real number as real() takes it: Python's or numpy's (np.float32, np.int64).
Real: TypeAlias = "float | np.floating[Any] | np.integer[Any]"


def whole(value: object, what: str, low: int, high: int, low_means: str = "") -> int:
    """`value` as an int from `low` to `high` (`low_means`: what `low` asks for, shown in
    the message): ValueError naming `what` and the range outside it, TypeError for what is
    not a whole number (a float, a bool; an int, numpy's or a 0-d integer tensor is)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a whole number, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        means = f" ({low_means})" if low_means else ""
        raise ValueError(f"{what} must be from {low}{means} to {high}, got {number}")
    return number


def real(value: object, what: str) -> float:
    """`value` as a float: TypeError naming `what` for what is not a real number (None, a
    bool, a string, an array), ValueError for an int past a double's range. Protobuf took
    None for 0.0 (fill_parameters(None) filled every weight with zeros), a bool for 1.0
    or 0.0, and raised its own errors for the rest (found by a review)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{what} is past the range of a double: {value!r}") from None


def check_seed(seed: Whole, what: str = "seed") -> int:
    """`seed` as the wire carries it, a uint64 (`whole`'s errors). Out of range, protobuf
    raised its own "Value out of range: -1". One check for every seed the client sends:
    Client.reset, open_session, Fill's, the CLI's --seed."""
    return whole(seed, what, 0, MAX_SEED)


def _size_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def _ms(seconds: float) -> int:
    """Milliseconds for a gRPC option, which takes a 32-bit int: 1 to MAX_GRPC_SECONDS."""
    return min(max(1, round(seconds * 1000)), MAX_GRPC_INT)


def in_force_s(seconds: float) -> float:
    """The seconds gRPC keeps of a duration option given `seconds`: whole milliseconds, from
    1 ms to MAX_GRPC_SECONDS (what GetServerInfo reports of the server's)."""
    return _ms(seconds) / 1000


def _keepalive(keepalive_s: float, timeout_s: float) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", _ms(keepalive_s)),
        ("grpc.keepalive_timeout_ms", _ms(timeout_s)),
        # gRPC core 1.85 closes a connection whose ping goes unanswered after this one, not
        # keepalive_timeout_ms: with the latter alone, a cut connection was still open 15 s
        # after a 1 s timeout (tests/test_keepalive.py). Its default is a minute.
        ("grpc.http2.ping_timeout_ms", _ms(timeout_s)),
        # A Watch sends nothing after its request: ping all the same.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(
    keepalive_s: float | None = CLIENT_KEEPALIVE_S,
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
) -> list[tuple[str, int]]:
    """A client channel's gRPC options: the message-size limit, a connection of its own,
    reconnecting at least every MAX_RECONNECT_WAIT_S while its server is gone, and a ping
    every `keepalive_s` seconds of silence during a call (None or 0: no pings).

    Why the two in the middle: a server stopped and started again at its address, an
    older client of it calling every 0.5 s meanwhile, and a client made once the server
    was back, in one process. With gRPC's defaults both clients got through 4.8-6.8 s
    after the server's return from a 10 s outage (four runs) and 11.2 s after a 30 s one
    (two), and could wait up to 2 minutes after longer ones, every call until then failing
    at once with "failed to connect to all addresses". The new client waited as long as
    the older, for gRPC shares one connection, and its backoff, among all the channels of
    a process with the same target and options. With both options the new client got
    through at once and the older within 0.6-0.8 s (tests/test_reconnect.py).
    """
    options = _size_options()
    options += [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_reconnect_backoff_ms", _ms(MAX_RECONNECT_WAIT_S)),
    ]
    if keepalive_s:
        options += _keepalive(keepalive_s, keepalive_timeout_s)
        options.append(("grpc.keepalive_permit_without_calls", 0))
    return options


@dataclasses.dataclass(frozen=True)
class ServerConnections:
    """How a server treats its clients' connections, one setting of each for the four places
    that need them (app.serve and app.start, gRPC's options, GetServerInfo's answer):

    `keepalive_s`: ping a connection silent this long, and close it when no answer comes in
    `keepalive_timeout_s`, ending its calls (None or 0: no pings; see KEEPALIVE_S).
    `min_client_ping_s`: clients' pings closer together on a connection carrying no data get
    it closed (GOAWAY, too_many_pings; see MIN_CLIENT_PING_S).
    `idle_s`: close a connection once it has had no call in progress this long (GOAWAY; a
    client reconnects at its next call; None or 0: never; see CONNECTION_IDLE_S).
    `max_connections`: connections kept open at once, one more closed as it opens (0: no
    limit; see MAX_CONNECTIONS).

    gRPC keeps each in whole milliseconds, from 1 ms to MAX_GRPC_SECONDS (`in_force_s`).
    """

    keepalive_s: float | None = KEEPALIVE_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    min_client_ping_s: float = MIN_CLIENT_PING_S
    idle_s: float | None = CONNECTION_IDLE_S
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        whole(self.max_connections, "max_connections", 0, MAX_GRPC_INT, "no limit")
        # gRPC took -1 for a 1 ms interval without a word, and inf or NaN raised from deep
        # inside the server's start.
        for name in ("keepalive_s", "keepalive_timeout_s", "min_client_ping_s", "idle_s"):
            value = getattr(self, name)
            if value is None and name in ("keepalive_s", "idle_s"):
                continue
            if not 0 <= real(value, name) < math.inf:
                raise ValueError(f"{name} must be 0 or more seconds, got {value!r}")
        if self.keepalive_s and not self.keepalive_timeout_s:
            raise ValueError(
                "keepalive_timeout_s must be more than 0 when the server pings (keepalive_s)"
            )

    def options(self) -> list[tuple[str, int]]:
        """The server's gRPC options: the message-size limit, clients' pings taken every
        `min_client_ping_s`, with or without calls in flight, a ping of its own every
        `keepalive_s` of silence on any connection, the idle close and the connections'
        limit."""
        options = [
            *_size_options(),
            # gRPC's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS. Its string, not
            # its name: "min_recv_..." is not an option, and gRPC ignores what it does not
            # know.
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_client_ping_s)),
            # Also what lets clients ping a connection with no call in flight at that
            # interval: without it gRPC takes one such ping every 2 hours, and closes the
            # connection at the third closer one (too_many_pings), whatever the interval
            # above says.
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.keepalive_s:
            options += _keepalive(self.keepalive_s, self.keepalive_timeout_s)
        else:
            # No pings of its own: gRPC's servers otherwise ping after 2 hours of silence.
            options.append(("grpc.keepalive_time_ms", MAX_GRPC_INT))
        if self.idle_s:  # gRPC's default: never
            options.append(("grpc.max_connection_idle_ms", _ms(self.idle_s)))
        if self.max_connections:  # gRPC's default: no limit
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        return options
