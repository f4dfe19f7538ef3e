"""The health service, which answers callers without a token: open Watches hold no server
thread, names are bounded in length, a name is forgotten when its last Watch closes, and
at most `max_watches` Watches are open at once."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradwire
from gradwire import errors
from gradwire_server.app import DEFAULT_MAX_CONCURRENT, SPARE_THREADS, Running, start
from gradwire_server.health_service import (
    MAX_REQUEST_BYTES,
    MAX_SERVICE_NAME_CHARS,
    _ClosesIfEnded,
)
from gradwire_server.trainer import Trainer
from tests.background import eventually
from tests.serve_in_process import ended_contexts
from tests.test_auth import stalled_calls
from tests.test_metrics import calls, scrape

TOKEN = "s3cret"
SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def guarded(trainer: Trainer) -> Iterator[Running]:
    running = start(trainer, token=TOKEN, metrics_port=0)
    yield running
    running.stop(grace=None)


@pytest.fixture
def health(guarded: Running) -> Iterator[health_pb2_grpc.HealthStub]:
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)


def _watch(health: health_pb2_grpc.HealthStub, service: str = "") -> Any:
    """An open Watch, its first answer read. Within 30 s: a server with no thread to give
    would leave it waiting for ever."""
    call = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
    first = next(call)
    return call, first.status


def test_open_watches_hold_no_server_thread(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """More Watches than the server has threads, opened without a token: checks and
    gradwire's calls are still answered. (Each Watch held a thread; twenty froze the
    server for everyone, queueing every later call.)"""
    threads = DEFAULT_MAX_CONCURRENT + SPARE_THREADS
    watches = [_watch(health) for _ in range(threads + 10)]
    assert {status for _, status in watches} == {SERVING}
    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == SERVING
    with gradwire.connect(f"127.0.0.1:{guarded.port}", token=TOKEN, timeout=10) as client:
        assert client.list_tensors().version == 0
    assert guarded.health.open_watches == threads + 10
    for call, _ in watches:
        call.cancel()
    eventually(lambda: guarded.health.open_watches == 0)


@pytest.mark.parametrize("method", ["Check", "List"])
def test_checks_whose_request_never_comes_hold_no_server_thread(
    guarded: Running, health: health_pb2_grpc.HealthStub, method: str
) -> None:
    """Checks opened without a token, their request never sent (a slowloris), more than the
    server has threads: gradwire's calls and other checks are still answered. gRPC waits for
    a one-request call's message on a thread of the handler's pool: thirty such checks held
    all 20 of the server's, and every call went unanswered while they stayed open (found by
    a review of running the server for others, fifty-fourth session)."""
    threads = DEFAULT_MAX_CONCURRENT + SPARE_THREADS
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        release, stalled = stalled_calls(channel, f"/grpc.health.v1.Health/{method}", threads + 10)
        try:
            time.sleep(0.5)  # the calls' headers reach the server
            with gradwire.connect(f"127.0.0.1:{guarded.port}", token=TOKEN, timeout=10) as client:
                assert client.list_tensors().version == 0
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == SERVING
        finally:
            release.set()
        for future in stalled:  # half-closed without a request: gRPC's own refusal
            assert future.exception(timeout=30) is not None


def test_a_server_s_watches_outlive_another_server_of_the_process(trainer: Trainer) -> None:
    """grpc's health servicer keeps its Watches' pool on its class: every server of a
    process ran its Watches on the pool of the last one made, and once that one had
    stopped, a Watch on another failed to start and took that server's serving thread down
    with it: its Watches and checks then went unanswered (tests, `replay --embedded` and
    the benchmark run servers side by side)."""
    first = start(trainer, "127.0.0.1", 0)
    second = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0)
    second.stop(grace=None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            call, status = _watch(health)
            assert status == SERVING
            call.cancel()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    finally:
        first.stop(grace=None)


def test_a_name_is_forgotten_when_its_last_watch_closes(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """grpc's own servicer kept an entry for every name ever watched: names of up to 64 MiB
    each, from callers without a token."""
    before = guarded.health.watched_names()
    first, status = _watch(health, "not.a.Service")
    assert status == SERVICE_UNKNOWN
    second, _ = _watch(health, "not.a.Service")
    others = [_watch(health, f"other.Service{n}")[0] for n in range(5)]
    assert guarded.health.watched_names() == before + 6
    for call in others:
        call.cancel()
    first.cancel()
    eventually(lambda: guarded.health.watched_names() == before + 1)  # `second` still open
    second.cancel()
    eventually(lambda: guarded.health.watched_names() == before)


def test_a_watch_sees_not_serving_at_the_stop_and_then_ends(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    call, status = _watch(health, "gradwire.v1.Trainer")
    assert status == SERVING
    guarded.health.enter_graceful_shutdown()
    assert next(call).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert list(call) == []  # and no more: it held the stop for the whole grace period
    assert call.code() == grpc.StatusCode.OK
    eventually(lambda: guarded.health.open_watches == 0)


def test_a_watch_of_a_service_without_status_ends_at_the_stop(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    call, status = _watch(health, "no.such.Service")
    assert status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    guarded.health.enter_graceful_shutdown()
    assert list(call) == []  # its last status stands: no NOT_SERVING for it
    assert call.code() == grpc.StatusCode.OK


def test_a_watch_opened_as_the_stop_begins_says_not_serving_and_ends(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    guarded.health.enter_graceful_shutdown()  # gRPC still takes calls, as for a moment it does
    call, status = _watch(health)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_a_name_longer_than_any_service_is_refused(
    guarded: Running, health: health_pb2_grpc.HealthStub, method: str
) -> None:
    request = health_pb2.HealthCheckRequest(service="x" * (MAX_SERVICE_NAME_CHARS + 1))
    with pytest.raises(grpc.RpcError) as info:
        if method == "Check":
            health.Check(request, timeout=10)
        else:
            next(health.Watch(request, timeout=10))
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.InvalidArgument)
    assert error.reason == "BAD_SERVICE_NAME"
    assert f"at most {MAX_SERVICE_NAME_CHARS} characters" in error.message
    assert guarded.health.open_watches == 0
    ok = health_pb2.HealthCheckRequest(service="x" * MAX_SERVICE_NAME_CHARS)
    # The longest name allowed is looked up as any other.
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(ok, timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


class _Releases:
    """Stands for a health servicer's ReleaseWhenQuiet: counts the releases asked for."""

    def __init__(self) -> None:
        self.asked = 0

    def soon(self, size: int) -> None:
        assert size > MAX_REQUEST_BYTES
        self.asked += 1


def test_requests_over_the_limit_are_refused_unread_and_their_memory_released(
    guarded: Running,
) -> None:
    """A health request over MAX_REQUEST_BYTES is refused by its length, before protobuf
    parses it: bytes that are no request at all are refused as too long, not as malformed,
    and a name of a mebibyte is counted in bytes, never decoded into characters. Each asks
    for the memory its reading took to be given back. Parsed, 66 requests of 60 MiB at once
    (no token needed) took the server from 326 MB to 2.16 GB, 1.59 GB of which stayed for
    good (a security review, sixty-second session)."""
    releases = _Releases()
    guarded.health.release = releases  # type: ignore[assignment]
    name = health_pb2.HealthCheckRequest(service="x" * 2**20).SerializeToString()
    # The name's tag and a length of 2**20 that no bytes follow: not a health request.
    truncated = b"\x0a\x80\x80\x40" + b"x" * MAX_REQUEST_BYTES
    cases = [
        ("Check", name, "BAD_SERVICE_NAME", "a service name is at most 256 characters"),
        ("Check", truncated, "BAD_SERVICE_NAME", "a service name is at most 256 characters"),
        ("Watch", name, "BAD_SERVICE_NAME", "a service name is at most 256 characters"),
        ("List", truncated, "MALFORMED_REQUEST", "not a valid grpc.health.v1.HealthListRequest"),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        for method, request, reason, words in cases:
            path = f"/grpc.health.v1.Health/{method}"
            streams = method == "Watch"
            call = channel.unary_stream(path) if streams else channel.unary_unary(path)
            with pytest.raises(grpc.RpcError) as info:
                answer = call(request, timeout=10)
                if streams:
                    next(answer)
            error = errors.from_rpc_error(info.value)
            assert isinstance(error, errors.InvalidArgument), (method, error)
            assert error.reason == reason, (method, error)
            assert words in error.message
            assert f"is {len(request)} bytes" in error.message, error.message
            assert f"{MAX_REQUEST_BYTES} at most; refused unread" in error.message
        assert releases.asked == len(cases)
        # Requests within the limit are parsed as before, and release nothing.
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        longest = "\U0001f600" * MAX_SERVICE_NAME_CHARS  # 4 bytes each in UTF-8
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service=longest), timeout=10)
        assert errors.from_rpc_error(unknown.value).reason == "UNKNOWN_SERVICE"
        with pytest.raises(grpc.RpcError) as long_name:
            stub.Check(health_pb2.HealthCheckRequest(service="x" * 1000), timeout=10)
        assert "got 1000:" in errors.from_rpc_error(long_name.value).message  # characters
        # A request of MAX_REQUEST_BYTES exactly is within the limit: parsed, its name counted.
        at_limit = health_pb2.HealthCheckRequest(service="x" * (MAX_REQUEST_BYTES - 3))
        assert at_limit.ByteSize() == MAX_REQUEST_BYTES  # the tag, 2 bytes of length, the name
        with pytest.raises(grpc.RpcError) as parsed:
            stub.Check(at_limit, timeout=10)
        assert f"got {MAX_REQUEST_BYTES - 3}:" in errors.from_rpc_error(parsed.value).message
        with pytest.raises(grpc.RpcError) as malformed:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"\x0a\xff", timeout=10)
        assert errors.from_rpc_error(malformed.value).reason == "MALFORMED_REQUEST"
        assert stub.List(health_pb2.HealthListRequest(), timeout=10).statuses[""].status == SERVING
        assert releases.asked == len(cases)
        assert guarded.health.open_watches == 0


@pytest.mark.parametrize("algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_are_refused_undecompressed(
    guarded: Running, algorithm: grpc.Compression
) -> None:
    """gRPC decompresses a request whole before any handler sees it, up to the 64 MiB
    message limit: a health Check of a 60 MiB name gzipped to 61 KB, sent with no token, took
    the server 96 MB higher each, 20 at once from 0.35 to 1.7 GB, for 1.2 MB sent (a
    security review, seventy-sixth session). The bound on health requests is their length
    once read; the server takes no compressed request at all, gradwire's calls neither."""
    releases = _Releases()
    guarded.health.release = releases  # type: ignore[assignment]
    name = health_pb2.HealthCheckRequest(service="x" * 2**20)
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(name, compression=algorithm, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value
        assert "is disabled" in (info.value.details() or "")
        assert releases.asked == 0  # never read, so nothing to give back
        with pytest.raises(grpc.RpcError) as trainer_call:
            channel.unary_unary("/gradwire.v1.Trainer/GetServerInfo")(
                b"", metadata=[("authorization", f"Bearer {TOKEN}")], compression=algorithm
            )
        assert trainer_call.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Uncompressed, as every gradwire client sends, all is answered as before.
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    with gradwire.connect(f"127.0.0.1:{guarded.port}", token=TOKEN) as client:
        assert client.server_info().version == gradwire.__version__


def test_the_contract_says_a_compressed_request_is_refused(guarded: Running) -> None:
    """The refusal above, UNIMPLEMENTED from gRPC itself, was in README.md alone: the
    .proto, an integrator's only docs, listed UNIMPLEMENTED for a method the server does not
    have, so a Go client that turned on grpc.UseCompressor(gzip.Name) for every call took the
    answer for a server without the method (found by a review of the .proto as the only
    contract, compiled and called from Go)."""
    with (
        grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        channel.unary_unary("/gradwire.v1.Trainer/ListTensors")(
            b"",
            metadata=[("authorization", f"Bearer {TOKEN}")],
            compression=grpc.Compression.Gzip,
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    said_by_grpc = refused.value.details() or ""
    root = Path(__file__).resolve().parents[1]
    contract = (root / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert said_by_grpc.rstrip(".") in said, said_by_grpc
    assert "a request sent compressed" in said
    assert "grpc.UseCompressor" in said


def test_the_request_bound_is_the_4_kib_the_readme_gives(guarded: Running) -> None:
    """README: a health request "over 4 KiB" is refused. The test above reads the bound from
    MAX_REQUEST_BYTES, and would pass whatever it were; here it is counted in bytes sent."""
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        for name_chars, words in [
            (4093, "at most 256 characters, got 4093:"),  # 4,096 bytes: parsed
            (4094, "this request is 4097 bytes, more than any health request (4096 at most"),
        ]:
            request = health_pb2.HealthCheckRequest(service="x" * name_chars).SerializeToString()
            with pytest.raises(grpc.RpcError) as info:
                check(request, timeout=10)
            error = errors.from_rpc_error(info.value)
            assert error.reason == "BAD_SERVICE_NAME"
            assert words in error.message, error.message


def test_watches_past_the_limit_are_refused(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    guarded.health.max_watches = 3
    watches = [_watch(health)[0] for _ in range(3)]
    with pytest.raises(grpc.RpcError) as info:
        _watch(health)
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.ResourceExhausted)
    assert error.reason == "TOO_MANY_WATCHES"
    assert "3 health Watches are open" in error.message
    assert error.metadata == {"limit": "3"}
    assert guarded.health.open_watches == 3  # the refused one is not counted
    watches.pop().cancel()
    eventually(lambda: guarded.health.open_watches == 2)
    watches.append(_watch(health)[0])  # a place again
    for call in watches:
        call.cancel()
    eventually(lambda: guarded.health.open_watches == 0)


def test_watches_are_counted_in_the_metrics(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """Non-blocking, a Watch still passes the call log and metrics: counted when it ends."""
    watch = "/grpc.health.v1.Health/Watch"
    call, _ = _watch(health)
    assert calls(scrape(guarded), watch, "CANCELLED") == 0  # open: not counted yet
    call.cancel()
    eventually(lambda: calls(scrape(guarded), watch, "CANCELLED") == 1)
    with pytest.raises(grpc.RpcError):
        _watch(health, "x" * (MAX_SERVICE_NAME_CHARS + 1))
    eventually(lambda: calls(scrape(guarded), watch, "INVALID_ARGUMENT") == 1)


def test_watches_opened_and_closed_from_many_threads_leave_the_server_serving(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """A review found grpc's non-blocking Watch deadlocking the server within a second of
    this: a send made under the servicer's lock waited for grpc's polling thread, which
    waited for that lock to close another Watch. Every call stopped, and so did stop()."""
    stop = threading.Event()
    done: list[int] = []
    address = f"127.0.0.1:{guarded.port}"

    def churn() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            count = 0
            while not stop.is_set():
                call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
                with contextlib.suppress(grpc.RpcError):
                    next(call)
                call.cancel()
                count += 1
            done.append(count)

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(done) == 8 and sum(done) > 8, done  # every thread ran, none hung
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    with gradwire.connect(address, token=TOKEN, timeout=10) as client:
        assert client.list_tensors().version == 0
    eventually(lambda: guarded.health.open_watches == 0)


def test_watches_cancelled_as_they_open_are_not_kept(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """A Watch whose call ended before it registered stays registered in grpc's servicer
    (its close callback is never run), counted, its thread waiting: a review's client that
    opened and cancelled Watches in a loop took all 64 places within seconds."""
    guarded.health.max_watches = 8
    for _ in range(400):
        health.Watch(health_pb2.HealthCheckRequest(), timeout=10).cancel()
    eventually(lambda: guarded.health.open_watches == 0)
    assert guarded.health.watched_names() == 0
    call, status = _watch(health)  # a place for a new one
    assert status == SERVING
    call.cancel()


@pytest.mark.parametrize(
    ("method", "streams"), [("Check", False), ("List", False), ("Watch", True)]
)
def test_bytes_that_are_no_health_request_are_invalid_argument(
    guarded: Running, method: str, streams: bool
) -> None:
    """grpc's own deserializer answered INTERNAL ("Exception deserializing request!"), a
    status kept for the server's own faults, where gradwire's methods answer such bytes
    INVALID_ARGUMENT (found by the nineteenth session's review of the contract)."""
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        path = f"/grpc.health.v1.Health/{method}"
        call = channel.unary_stream(path) if streams else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as info:
            answer = call(b"\x0a\xff", timeout=10)
            if streams:
                next(answer)
        error = errors.from_rpc_error(info.value)
        assert isinstance(error, errors.InvalidArgument), error
        assert error.reason == "MALFORMED_REQUEST"
        assert "not a valid grpc.health.v1." in error.message
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert guarded.health.open_watches == 0


def test_a_check_of_an_unknown_service_says_which_it_knows(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """grpc's servicer answered NOT_FOUND with no message, and `gradwire health --service
    nope` printed "error: NOT_FOUND: not found" (found by the nineteenth session's review)."""
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.NotFound)  # as the health protocol says
    assert (error.reason, error.metadata) == ("UNKNOWN_SERVICE", {"service": "nope"})
    assert "no health status for service 'nope'" in error.message
    assert "'gradwire.v1.Trainer'" in error.message
    guarded.health.set("a.Service", SERVING)  # set last: named in order all the same
    with pytest.raises(grpc.RpcError) as again:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert errors.from_rpc_error(again.value).message.endswith(
        "this server has one for '', 'a.Service', 'gradwire.v1.Trainer' ('' is the server as a "
        "whole)"
    )


def test_list_answers_every_service_s_status_without_a_token_and_logs_nothing(
    guarded: Running, health: health_pb2_grpc.HealthStub, caplog: pytest.LogCaptureFixture
) -> None:
    """grpcio-health-checking's servicer leaves List unimplemented: it answered UNIMPLEMENTED
    and gRPC logged an ERROR with a traceback for each call, which anyone could make, with
    no token (found by a review of running the server for several users)."""
    for _ in range(3):
        listing = health.List(health_pb2.HealthListRequest(), timeout=10)
    statuses = {name: answer.status for name, answer in listing.statuses.items()}
    for name in statuses:
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == statuses[name]
    assert statuses == {"": SERVING, "gradwire.v1.Trainer": SERVING}
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    samples = scrape(guarded)
    method = "/grpc.health.v1.Health/List"
    assert calls(samples, method, "OK") == 3
    assert calls(samples, method, "UNIMPLEMENTED") == 0
    guarded.health.set("gradwire.v1.Trainer", NOT_SERVING)  # each status as it is
    listing = health.List(health_pb2.HealthListRequest(), timeout=10)
    assert listing.statuses["gradwire.v1.Trainer"].status == NOT_SERVING
    assert listing.statuses[""].status == SERVING


def test_a_callback_added_once_a_watch_s_call_has_ended_runs_at_once() -> None:
    """grpc runs nothing added to a call that has ended (add_callback returns False), and
    grpc's Watch does not look: a Watch cancelled as it opened stayed registered and
    counted, its thread waiting for ever, until 64 of them refused every Watch after. The
    context here is a real one, of a call its server has answered and then stopped."""
    (ended,) = ended_contexts(10)
    ran: list[str] = []
    assert not ended.add_callback(lambda: ran.append("grpc's"))  # grpc's own: runs nothing
    assert _ClosesIfEnded(ended).add_callback(lambda: ran.append("ours"))
    assert ran == ["ours"]


def test_a_stop_lets_the_health_service_s_threads_go(trainer: Trainer) -> None:
    """Each Watch, Check and List runs on a pool of the health service's own: a server
    stopped left its threads behind, for the life of the process."""
    before = set(threading.enumerate())
    running = start(trainer, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    threads = [
        t for t in set(threading.enumerate()) - before if t.name.startswith("gradwire-health")
    ]
    assert threads  # the Check ran on one
    running.stop(grace=None)
    eventually(lambda: not any(t.is_alive() for t in threads), "still running", within=10)


def test_the_contract_names_the_services_health_answers_for_and_when_they_change(
    guarded: Running, health: health_pb2_grpc.HealthStub
) -> None:
    """trainer.proto, an integrator's only documentation, said what health refuses but not
    which names it has a status for, nor when that status changes, nor that it answers List:
    a team writing a readiness probe in C++ from the .proto alone had to guess the service
    name, and could not tell NOT_SERVING from a server that never started (found by a review
    of the .proto as the only contract, compiled and called from C++)."""
    root = Path(__file__).resolve().parents[1]
    contract = (root / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    listing = health.List(health_pb2.HealthListRequest(), timeout=10)
    assert sorted(listing.statuses) == ["", "gradwire.v1.Trainer"]
    assert 'a status for two names, "" (the server as a whole) and "gradwire.v1.Trainer"' in said
    assert "SERVING while the server takes calls, NOT_SERVING once it begins to stop" in said
    assert "List answers both" in said
    guarded.health.enter_graceful_shutdown()
    for name in listing.statuses:
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == NOT_SERVING
