"""HTTP/2 keepalive: a peer that vanishes without closing its connection (a network cut,
made here by a relay that stops relaying) does not hold the other end's calls for ever."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import gradwire
from gradwire import limits
from gradwire._pb import trainer_pb2 as pb
from gradwire.errors import NotFound, ResourceExhausted, Unavailable
from gradwire.limits import ServerConnections
from gradwire_server.app import Running
from tests.background import Reader, eventually
from tests.cli_run import run_main
from tests.relay import Relay, relay_to
from tests.serve_in_process import running_server

# Pings after 0.3 s of silence, answered within 0.5 s: a cut is noticed within a second.
QUICK_S = (0.3, 0.5)
QUICK = ServerConnections(keepalive_s=QUICK_S[0], keepalive_timeout_s=QUICK_S[1])


@pytest.fixture
def one_place() -> Iterator[Running]:
    """A server that serves one call at a time, pinging quickly."""
    with running_server(max_concurrent=1, connections=QUICK) as running:
        yield running


def _watch_in_background(client: gradwire.Client) -> list[BaseException]:
    """Starts a Watch and waits for its first update; returns where its error will go."""
    return Reader(client.watch(["conv1.weight[0,0,0]"])).started().errors


def server_address(server: Running) -> str:
    return f"127.0.0.1:{server.port}"


def _busy(client: gradwire.Client) -> bool:
    try:
        client.list_tensors()
    except ResourceExhausted as e:
        assert e.reason == "BUSY"
        return True
    return False


@contextlib.contextmanager
def _place_taken_by_a_cut_watch(server: Running) -> Iterator[gradwire.Client]:
    """Yields a direct client once a Watch through a relay holds the server's one place and
    the relay has been cut."""
    with relay_to(server.port) as relay, gradwire.connect(relay.address, timeout=None) as far:
        _watch_in_background(far)
        with gradwire.connect(server_address(server), timeout=10) as near:
            assert _busy(near)  # the watch holds the one place
            relay.cut()
            yield near


def test_a_watch_cut_off_from_its_client_lets_go_of_its_place(one_place: Running) -> None:
    with _place_taken_by_a_cut_watch(one_place) as near:
        eventually(lambda: not _busy(near), "the cut watch still holds its place", every=0.1)
        assert near.list_tensors().names()  # served


def test_without_keepalive_a_cut_watch_holds_its_place() -> None:
    # The control: the relay's cut closes nothing, so only the server's pings end the watch.
    no_pings = ServerConnections(keepalive_s=None)
    with (
        running_server(max_concurrent=1, connections=no_pings) as running,
        _place_taken_by_a_cut_watch(running) as near,
    ):
        time.sleep(3 * sum(QUICK_S))
        assert _busy(near)


def test_a_watch_in_a_session_lets_go_of_the_session_when_cut_off() -> None:
    # A call in progress holds its session against --session-idle; a cut one must not.
    with (
        running_server(session_idle_s=0.5, connections=QUICK) as running,
        relay_to(running.port) as relay,
        gradwire.connect(relay.address) as far,
    ):
        watcher = far.open_session()
        watcher.timeout = None
        _watch_in_background(watcher)
        relay.cut()
        with gradwire.connect(server_address(running), timeout=10) as near:
            near.session = watcher.session
            deadline = time.monotonic() + 30
            while True:
                time.sleep(1)  # longer than the idle time: each probe is a call on it
                try:
                    near.list_tensors()
                except NotFound as e:
                    assert e.reason == "UNKNOWN_SESSION"
                    break
                assert time.monotonic() < deadline, "the cut watch still holds its session"
            near.session = None


def test_a_client_whose_server_is_cut_off_stops_watching(server: Running) -> None:
    with (
        relay_to(server.port) as relay,
        gradwire.connect(
            relay.address, timeout=None, keepalive=0.3, keepalive_timeout=0.5
        ) as client,
    ):
        errors = _watch_in_background(client)
        relay.cut()
        eventually(lambda: bool(errors), "the watch still waits on a cut connection", every=0.1)
    assert isinstance(errors[0], Unavailable), errors[0]
    assert "ping timeout" in str(errors[0])  # the keepalive ping ended it, nothing else


def test_a_client_without_keepalive_keeps_waiting(server: Running) -> None:
    # The control for the test above: the relay's cut alone ends nothing on the client.
    with (
        relay_to(server.port) as relay,
        gradwire.connect(relay.address, timeout=None, keepalive=None) as client,
    ):
        errors = _watch_in_background(client)
        relay.cut()
        time.sleep(3)
        assert not errors


def test_keepalive_options_are_checked() -> None:
    result = run_main("serve", "--keepalive", "-1")
    assert result.code == 2
    assert "bad duration '-1'" in result.err
    result = run_main("serve", "--keepalive", "nan")
    assert result.code == 2
    result = run_main("serve", "--keepalive", "5", "--keepalive-timeout", "0")
    assert result.code == 2
    assert "--keepalive-timeout must be more than 0" in result.err


def test_serve_help_names_keepalive() -> None:
    text = " ".join(run_main("serve", "--help").out.split())
    assert "--keepalive SECONDS" in text
    assert "--keepalive-timeout SECONDS" in text
    assert "(default 60.0)" in text


def test_relay_relays_until_cut(server: Running) -> None:
    # The tests above rely on the relay carrying calls before the cut.
    relay = Relay(server.port)
    try:
        with gradwire.connect(relay.address, timeout=10) as client:
            assert client.list_tensors().names()
    finally:
        relay.close()


def test_a_client_pinging_too_often_is_told_so(server: Running) -> None:
    # The .proto's rule: pings closer than limits.MIN_CLIENT_PING_S on a connection that
    # carries no data get it closed, as gRPC does for any server.
    # gRPC's "Too many pings" alone did not say that the interval was the client's own
    # keepalive= (found by a review of the client): the error now names it.
    said = (
        r"(?i)too many pings.*the server closed the connection for pinging too often: .* "
        r"every 0\.2 s, keepalive=0\.2; a gradwire server takes a ping every 30 s by default"
    )
    with (
        gradwire.connect(server_address(server), keepalive=0.2, keepalive_timeout=5) as client,
        pytest.raises(Unavailable, match=said),
    ):
        for _ in client.watch(["conv1.weight[0,0,0]"], timeout=30):
            pass  # no step is taken: the watch sends its first update, then nothing


@pytest.mark.parametrize("seconds", [-1, -0.5, math.nan, math.inf])
@pytest.mark.parametrize("keyword", ["keepalive", "keepalive_timeout"])
def test_a_negative_or_nan_keepalive_is_refused(address: str, keyword: str, seconds: float) -> None:
    """keepalive=-1 was taken without a word (gRPC's option got a 1 ms interval); inf raised
    OverflowError. 0 and None stay no pings."""
    with pytest.raises(
        ValueError, match=f"{keyword}= must be seconds, 0 or more and finite"
    ) as got:
        gradwire.connect(address, **{keyword: seconds})
    # keepalive's refusal says how to ask for no pings; keepalive_timeout has no such value.
    assert ("; 0 or None: no pings; got" in str(got.value)) == (keyword == "keepalive")
    with pytest.raises(TypeError, match=f"{keyword}= takes seconds, a number; got '5'"):
        gradwire.connect(address, **{keyword: "5"})
    if keyword == "keepalive_timeout":  # None is no pings for keepalive alone
        with pytest.raises(TypeError, match="keepalive_timeout= takes seconds, a number; got None"):
            gradwire.connect(address, keepalive_timeout=None)  # type: ignore[arg-type]
    for none in (0, None):
        with gradwire.connect(address, keepalive=none, timeout=10) as client:
            assert client.list_tensors().names()
    with pytest.raises(ValueError, match="keepalive_timeout= must be more than 0 seconds"):
        gradwire.connect(address, keepalive_timeout=0)  # gRPC took it for 1 ms


def test_a_client_pinging_no_more_often_than_allowed_keeps_its_quiet_watch() -> None:
    # gRPC ignores an option it does not know: under a misspelt name the server kept gRPC's
    # 5-minute rule, and a quiet watch on default settings died at the client's third ping.
    with (
        running_server(connections=ServerConnections(min_client_ping_s=0.5)) as running,
        gradwire.connect(
            server_address(running), timeout=None, keepalive=1.0, keepalive_timeout=5
        ) as client,
    ):
        errors = _watch_in_background(client)
        time.sleep(6)  # five pings or more on a connection carrying no data
        assert not errors, errors


def test_the_clients_default_pings_are_taken_by_servers_on_grpcs_default_rule() -> None:
    # At 60 s, the first default, a server or proxy on gRPC's own rule (5 minutes, a review
    # found: a gradwire server from before the pings, say) closed a quiet watch at the
    # client's third ping. The scaled-down case runs above (1.0 s pings, 0.5 s allowed).
    assert limits.CLIENT_KEEPALIVE_S > limits.GRPC_DEFAULT_MIN_CLIENT_PING_S
    assert limits.CLIENT_KEEPALIVE_S > limits.MIN_CLIENT_PING_S


def test_the_clis_keepalive_reaches_its_channel(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pinging every 0.2 s is more often than the server takes: the connection is closed,
    # which shows the option set the channel's pings. (The command refuses so short an
    # interval: its check is moved out of the way.)
    monkeypatch.setattr(limits, "MIN_CLIENT_PING_S", 0.1)
    result = run_main(
        "watch", "loss", "--keepalive", "0.2", "--duration", "30",
        "--target", server_address(server),
    )  # fmt: skip
    assert result.code == 1
    assert "Too many pings" in result.err


def test_a_client_pinging_too_often_gets_grpcs_own_status_with_no_error_info(
    server: Running,
) -> None:
    """A client in another language pinging every 0.2 s, under the server's 30 s, has its
    connection closed (GOAWAY, too_many_pings) and its Watch ended with gRPC's own status,
    no ErrorInfo: UNAVAILABLE in grpcio, RESOURCE_EXHAUSTED in Node's grpc-js, which a review
    integrating from Node could take for BUSY (the .proto now says which it is)."""
    pinging = [
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    request = pb.WatchRequest(items=[pb.WatchItem(name="loss")]).SerializeToString()
    with grpc.insecure_channel(server_address(server), options=pinging) as channel:
        updates = channel.unary_stream("/gradwire.v1.Trainer/Watch")(request, timeout=30)
        next(updates)  # the first update; the watch then sends nothing while the pings come
        with pytest.raises(grpc.RpcError) as ended:
            next(updates)
    error: Any = ended.value
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, "Too many pings")
    assert "grpc-status-details-bin" not in dict(error.trailing_metadata() or ())


@pytest.mark.parametrize("server_pings", [None, 60.0], ids=["server-pings-off", "server-pings-on"])
def test_an_idle_connection_s_pings_are_taken_as_reported_whether_or_not_the_server_pings(
    server_pings: float | None,
) -> None:
    """A client in another language pinging an idle connection (no call in flight) at the
    interval GetServerInfo reports kept it only while the server pinged too: with --keepalive
    0, gRPC's own rule for connections without calls (a ping every 2 hours) applied, and the
    connection was closed at the third ping, too_many_pings (found by a review)."""
    with running_server(
        connections=ServerConnections(keepalive_s=server_pings, min_client_ping_s=0.5)
    ) as running:
        address = server_address(running)
        with gradwire.connect(address, timeout=10) as client:
            allowed = client.server_info().limits.min_client_ping_s
        assert allowed == 0.5
        pinging = [
            ("grpc.keepalive_time_ms", 1000),  # twice the interval allowed
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        with grpc.insecure_channel(address, options=pinging) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            states: list[grpc.ChannelConnectivity] = []
            channel.subscribe(states.append)
            time.sleep(5)  # four pings or more, no call in flight
            channel.unsubscribe(states.append)
    assert set(states) == {grpc.ChannelConnectivity.READY}, states


def test_a_server_without_keepalive_sends_no_pings_of_its_own() -> None:
    """--keepalive 0 is no pings: without an interval of its own, gRPC's server pings a
    connection after 2 hours of silence (too long to wait for here; the option is checked)."""
    options = dict(ServerConnections(keepalive_s=None).options())
    assert options["grpc.keepalive_time_ms"] == 2**31 - 1  # gRPC's largest: 24.8 days
    assert "grpc.keepalive_timeout_ms" not in options
    assert dict(ServerConnections(keepalive_s=60.0).options())["grpc.keepalive_time_ms"] == 60_000


def test_an_unanswered_ping_is_given_the_timeout_and_a_client_pings_during_calls_alone() -> None:
    """gRPC closes a connection whose ping goes unanswered after ping_timeout_ms, not
    keepalive_timeout_ms: both are the timeout, not the interval (a cut connection waits
    for the one as for the other). A client pings during a call alone (CLIENT_KEEPALIVE_S),
    its server pinging its idle connections itself."""
    server = dict(ServerConnections(keepalive_s=60.0, keepalive_timeout_s=5.0).options())
    assert (server["grpc.keepalive_timeout_ms"], server["grpc.http2.ping_timeout_ms"]) == (
        5000,
        5000,
    )
    client = dict(limits.channel_options(keepalive_s=60.0, keepalive_timeout_s=5.0))
    assert (client["grpc.keepalive_time_ms"], client["grpc.http2.ping_timeout_ms"]) == (
        60_000,
        5000,
    )
    assert client["grpc.keepalive_permit_without_calls"] == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keepalive_s": -1.0}, "keepalive_s must be 0 or more seconds, got -1.0"),
        ({"keepalive_timeout_s": math.nan}, "keepalive_timeout_s must be 0 or more seconds"),
        ({"min_client_ping_s": -0.5}, "min_client_ping_s must be 0 or more seconds"),
        ({"idle_s": math.inf}, "idle_s must be 0 or more seconds, got inf"),
        ({"keepalive_s": 5.0, "keepalive_timeout_s": 0.0}, "keepalive_timeout_s must be more"),
        ({"max_connections": -1}, r"max_connections must be from 0 \(no limit\) to "),
    ],
)
def test_a_library_caller_s_connection_settings_are_checked(
    settings: dict[str, float], message: str
) -> None:
    """app.start took -1 for gRPC's 1 ms, and inf or NaN raised OverflowError or ValueError
    from inside the option's arithmetic; the CLI checked its flags, a library caller nothing."""
    with pytest.raises(ValueError, match=message):
        ServerConnections(**settings)


@pytest.mark.parametrize("name", ["keepalive_timeout_s", "min_client_ping_s"])
def test_none_is_no_setting_for_a_timeout_or_the_pings_taken(name: str) -> None:
    """None means "never" for keepalive_s and idle_s alone: the others have no such value,
    and None is refused as what is not a number, not taken for one."""
    with pytest.raises(TypeError, match=f"{name} must be a number, got None"):
        ServerConnections(**{name: None})  # type: ignore[arg-type]


def test_connection_settings_that_turn_things_off_are_taken() -> None:
    # The control for the test above: None and 0 are "never" where the setting allows it.
    off = ServerConnections(keepalive_s=None, keepalive_timeout_s=0.0, idle_s=None)
    assert "grpc.max_connection_idle_ms" not in dict(off.options())
    assert "grpc.max_connection_idle_ms" not in dict(ServerConnections(idle_s=0.0).options())
    with pytest.raises(TypeError, match="idle_s must be a number, got '5'"):
        ServerConnections(idle_s="5")  # type: ignore[arg-type]
