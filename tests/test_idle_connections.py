"""Idle connections: the server closes a connection that has had no call in progress for
--connection-idle seconds, so that clients that never close theirs, or connections that
sent HTTP/2's preface and nothing more, do not hold its open files for ever; a client's
next call reconnects, and an open stream is a call in progress however quiet. And the
limit on connections open at once (--max-connections), for those made faster than they go
idle."""

from __future__ import annotations

import re
import resource
import socket
import struct
import time
from collections.abc import Iterator, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradwire
from gradwire import limits
from gradwire.errors import Unavailable
from gradwire.results import ServerLimits
from gradwire_server.app import FILES_KEPT, Running, connections_within_open_files
from tests.background import Reader, eventually
from tests.cli_run import run_main
from tests.serve_in_process import running_server
from tests.serve_process import serving

IDLE_S = 0.5
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = struct.pack(">I", 0)[1:] + bytes([0x4, 0]) + struct.pack(">I", 0)
GOAWAY = 0x7
SETTINGS = 0x4


@pytest.fixture
def quick() -> Iterator[Running]:
    """A server that closes connections after half a second without calls."""
    with running_server(connections=limits.ServerConnections(idle_s=IDLE_S)) as running:
        yield running


def _port(log: str) -> int:
    """The port a `gradwire serve` said it listens on."""
    found = re.search(r"listening on \S+:(\d+)", log)
    assert found, log
    return int(found.group(1))


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """The HTTP/2 frames in `data` as (type, payload), in order."""
    frames, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        frames.append((data[at + 3], data[at + 9 : at + 9 + length]))
        at += 9 + length
    return frames


def _silent_connection(port: int, wait_s: float) -> tuple[bool, list[tuple[int, bytes]]]:
    """Opens a connection that sends HTTP/2's preface and empty settings and nothing more,
    as a client that made a channel and no call does; reads for up to `wait_s` seconds.
    Returns whether the server closed it, and the frames the server sent."""
    received = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(PREFACE + EMPTY_SETTINGS)
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    break
                if not data:
                    closed = True
                    break
                received += data
        except (ConnectionResetError, BrokenPipeError):
            # Closed with our bytes unread (a connection past the limit on connections):
            # the kernel answers them with a reset.
            closed = True
    return closed, _frames(received)


def test_a_connection_that_makes_no_call_is_closed_once_idle(quick: Running) -> None:
    closed, frames = _silent_connection(quick.port, wait_s=30)
    assert closed, "the server kept a connection without calls open"
    goaways = [payload for kind, payload in frames if kind == GOAWAY]
    assert goaways, f"closed without a GOAWAY: frames {[kind for kind, _ in frames]}"
    assert b"idle" in goaways[-1][8:]  # the debug data: gRPC's reason


def test_without_the_limit_a_connection_without_calls_stays_open() -> None:
    # The control for the test above: the same connection, watched six times as long.
    with running_server(connections=limits.ServerConnections(idle_s=None)) as running:
        closed, frames = _silent_connection(running.port, wait_s=6 * IDLE_S)
    assert not closed
    assert GOAWAY not in [kind for kind, _ in frames]


def test_a_client_reconnects_after_its_idle_connection_was_closed(quick: Running) -> None:
    """The next call goes through on a new connection, in the same session, with its state."""
    channel = grpc.insecure_channel(
        f"127.0.0.1:{quick.port}", options=limits.channel_options(keepalive_s=None)
    )
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append)
    with (
        gradwire.Client(f"127.0.0.1:{quick.port}", channel=channel, timeout=30) as opener,
        opener.open_session(seed=0) as client,
    ):
        client.fill_parameters(0.25)
        version = client.list_tensors().version
        # gRPC tells of a state on a thread of its own, after the calls that made it may
        # have returned: the count is waited for, not read at once (a CI run read 1 of 2).
        ready = grpc.ChannelConnectivity.READY
        eventually(lambda: ready in states, "the channel was never said to be ready")
        connected = states.count(ready)
        eventually(
            lambda: states[-1] == grpc.ChannelConnectivity.IDLE,
            "the server did not close the idle connection",
        )
        assert client.get("conv1.weight[0, 0, 0]").tolist() == [0.25] * 3
        assert client.list_tensors().version == version
        eventually(lambda: states.count(ready) == connected + 1, "no new connection")
    channel.unsubscribe(states.append)
    channel.close()


def test_an_open_watch_keeps_its_connection(quick: Running) -> None:
    """A Watch with nothing to send for many idle times is a call in progress: it still gets
    the next update."""
    address = f"127.0.0.1:{quick.port}"
    with (
        gradwire.connect(address, timeout=None) as watcher,
        gradwire.connect(address, timeout=30) as writer,
    ):
        watch = watcher.watch(["conv1.weight[0, 0, 0]"])
        reader = Reader(watch, until=lambda update: update.version > 0)
        assert reader.started().messages
        time.sleep(6 * IDLE_S)  # the watch's connection carries nothing meanwhile
        writer.fill_parameters(0.5)
        reader.thread.join(timeout=30)
        assert not reader.errors, reader.errors
        assert reader.messages[-1].version > 0


def test_the_server_reports_its_idle_limit() -> None:
    for setting, reported in [(IDLE_S, IDLE_S), (None, 0.0), (0.0, 0.0), (0.0004, 0.001)]:
        with (
            running_server(connections=limits.ServerConnections(idle_s=setting)) as running,
            gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client,
        ):
            assert client.server_info().limits.connection_idle_s == reported, setting


def _served(*args: str, under: Sequence[str] = ()) -> tuple[ServerLimits, list[str], str]:
    """`gradwire serve ARGS` (run under `under`): the limits GetServerInfo reports, the lines
    `gradwire info` writes of it, and its log up to its listening."""
    with serving(*args, under=under) as (_, log):
        address = f"127.0.0.1:{_port(log)}"
        with gradwire.connect(address, timeout=30) as client:
            reported = client.server_info().limits
        lines = run_main("info", "--target", address).out.splitlines()
    return reported, lines, log


def test_serve_closes_idle_connections_after_five_minutes_by_default() -> None:
    reported, lines, _ = _served()
    assert reported.connection_idle_s == 300.0
    assert any(
        line.startswith("connections      one without calls closed after 300 s") for line in lines
    ), lines


def test_serve_takes_connection_idle() -> None:
    with serving("--connection-idle", "0.5") as (_, log):
        closed, _ = _silent_connection(_port(log), wait_s=30)
    assert closed
    reported, lines, _ = _served("--connection-idle", "0")
    assert reported.connection_idle_s == 0.0
    assert any(
        line.startswith("connections      one without calls stays open;") for line in lines
    ), lines


@pytest.mark.parametrize("seconds", ["-1", "nan", "inf", "soon"])
def test_a_connection_idle_time_grpc_cannot_hold_is_a_usage_error(seconds: str) -> None:
    result = run_main("serve", "--connection-idle", seconds)
    assert result.code == 2
    assert f"bad duration {seconds!r}" in result.err


def test_serve_help_names_connection_idle() -> None:
    text = " ".join(run_main("serve", "--help").out.split())
    assert "--connection-idle SECONDS" in text
    assert "(default 300.0)" in text


def _answered(port: int) -> bool:
    """Whether a connection that sends HTTP/2's preface gets the server's SETTINGS (True) or
    is closed at once (False)."""
    closed, frames = _silent_connection(port, wait_s=1)
    assert closed or frames, "neither answered nor closed in 1 s"
    return not closed and frames[0][0] == SETTINGS


def test_a_connection_past_the_limit_is_closed_as_it_opens() -> None:
    few = limits.ServerConnections(max_connections=3)
    with running_server(connections=few) as running:
        address = f"127.0.0.1:{running.port}"
        held = [socket.create_connection(("127.0.0.1", running.port), 10) for _ in range(3)]
        try:
            for connection in held:  # each taken as a connection: the server's SETTINGS
                connection.sendall(PREFACE + EMPTY_SETTINGS)
                assert _frames(connection.recv(65536))[0][0] == SETTINGS
            assert not _answered(running.port)
            # A client's call on a connection past the limit: gRPC's own UNAVAILABLE.
            check = health_pb2.HealthCheckRequest()
            with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(check, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            # The CLI says why a server that is there did not answer.
            said = run_main("list", "--target", address, "--timeout", "3").err.splitlines()
            assert said[-1] == (
                f"hint: {address} closed the connection as it opened: it serves TLS (add "
                "--tls, and --tls-ca for a CA of your own), or it has as many connections "
                "open as it keeps (gradwire serve --max-connections; gradwire info says how "
                "many): try again once some close"
            ), said
            held.pop().close()
            # Once one closes, a client gets through (its channel waits for a connection).
            with gradwire.connect(address, timeout=30) as client:
                eventually(lambda: _listed(client), "no place freed after a connection closed")
        finally:
            for connection in held:
                connection.close()


def _listed(client: gradwire.Client) -> bool:
    try:
        return bool(client.list_tensors().names())
    except Unavailable:
        return False


def test_without_a_limit_on_connections_each_is_answered() -> None:
    # The control for the test above: the same connections, and two more.
    unlimited = limits.ServerConnections(max_connections=0)
    with running_server(connections=unlimited) as running:
        assert all(_answered(running.port) for _ in range(5))


def test_the_server_reports_its_limit_on_connections() -> None:
    for setting in (2, 3, 0):  # 2: the client's connection and the CLI's
        with (
            running_server(connections=limits.ServerConnections(max_connections=setting)) as r,
            gradwire.connect(f"127.0.0.1:{r.port}", timeout=30) as client,
        ):
            assert client.server_info().limits.max_connections == setting
            lines = run_main("info", "--target", client.target).out.splitlines()
        said = "at most 3 open at once, one more closed as it opens (UNAVAILABLE)"
        assert (said in " ".join(" ".join(lines).split())) == (setting == 3), lines
    with pytest.raises(ValueError, match="max_connections must be from 0"):
        limits.ServerConnections(max_connections=-1)
    with pytest.raises(TypeError, match="max_connections must be a whole number"):
        limits.ServerConnections(max_connections=2.5)  # type: ignore[arg-type]


def test_serve_keeps_a_thousand_connections_by_default_and_takes_max_connections() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # serve raises its soft limit to it
    fits = hard == resource.RLIM_INFINITY or hard >= 1000 + FILES_KEPT
    assert _served()[0].max_connections == (1000 if fits else hard - FILES_KEPT)
    reported, _, log = _served("--max-connections", "2")
    assert reported.max_connections == 2
    assert "lowered" not in log


def test_serve_lowers_the_limit_to_fit_its_open_files() -> None:
    """Under a limit of 200 open files (soft and hard, so that serve cannot raise it), 1,000
    connections would take every file before the limit was reached: it keeps FILES_KEPT."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 200:
        pytest.skip(f"a hard limit of {hard} open files is below the test's")
    under = ("sh", "-c", 'ulimit -n 200 && exec "$@"', "sh")
    reported, _, log = _served(under=under)
    assert reported.max_connections == 200 - FILES_KEPT
    assert (
        "--max-connections 1,000 lowered to 72: this process may open 200 files, 128 of them "
        "kept for the server's own" in log
    ), log
    assert "open files: up to" not in log  # soft and hard alike: nothing raised, nothing said


def test_serve_under_fewer_open_files_than_it_keeps_still_takes_one_connection() -> None:
    """Under 120 open files, fewer than FILES_KEPT: one connection, not none or no limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 120:
        pytest.skip(f"a hard limit of {hard} open files is below the test's")
    under = ("sh", "-c", 'ulimit -n 120 && exec "$@"', "sh")
    reported, _, log = _served(under=under)
    assert reported.max_connections == 1
    assert "--max-connections 1,000 lowered to 1: this process may open 120 files" in log, log
    reported, _, log = _served("--max-connections", "0", under=under)  # no limit: none made
    assert reported.max_connections == 0
    assert "lowered" not in log


def test_a_limit_on_connections_that_just_fits_the_open_files_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 2**31 or soft < FILES_KEPT + 2:
        pytest.skip(f"a soft limit of {soft} open files")
    fits = limits.ServerConnections(max_connections=soft - FILES_KEPT)
    assert connections_within_open_files(fits) == fits
    assert "lowered" not in caplog.text  # not said to be lowered to what it was
    over = limits.ServerConnections(max_connections=soft - FILES_KEPT + 1)
    assert connections_within_open_files(over) == fits
    assert f"lowered to {soft - FILES_KEPT:,}" in caplog.text


@pytest.mark.parametrize("count", ["-1", "2.5", "many", str(2**31)])
def test_a_connection_limit_grpc_cannot_hold_is_a_usage_error(count: str) -> None:
    result = run_main("serve", "--max-connections", count)
    assert result.code == 2
    assert f"bad number {count!r}" in result.err
