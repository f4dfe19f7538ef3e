"""The server process: health, reflection, one port per server, `gradwire serve`, graceful stop."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.fill import Fill
from gradwire.limits import ServerConnections
from gradwire_server import serving as serving_watch
from gradwire_server.app import DEFAULT_MAX_CONCURRENT, SERVICE_NAME, Running, start
from gradwire_server.errors import InvalidInput
from gradwire_server.reflection_service import (
    MAX_STREAMS,
    SPARE_THREADS,
    ReflectionServicer,
    add_to_server,
)
from gradwire_server.trainer import Trainer
from gradwire_server.waiting import SendingStreams
from tests.background import Reader, eventually
from tests.serve_in_process import UNPROBED, sends_waiting, unread_reads
from tests.serve_process import CLI, serving
from tests.signals import signal_another_thread
from tests.test_calls import _Cancellable
from tests.thread_starts import RefusedStarts


def test_health_reports_serving_then_not_serving(trainer: Trainer) -> None:
    running = start(trainer, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    running.health.enter_graceful_shutdown()
    answer = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    running.stop(grace=None)
    channel.close()


def test_the_server_s_serving_thread_is_found_and_let_go_at_the_stop(trainer: Trainer) -> None:
    # serving.py finds gRPC's serving thread by the name Python gives it ("Thread-N
    # (_serve)"): a grpcio that starts it otherwise fails here, rather than leave a server
    # whose serving thread has ended unnoticed (test_oom.py ends one for real).
    running = start(trainer, "127.0.0.1", 0)
    watched = running.serving
    assert watched is not None and watched.thread is not None
    assert watched.alive and watched.thread.name.endswith("(_serve)")
    assert watched.thread in serving_watch._watched
    running.stop(grace=None)
    watched.thread.join(timeout=10)
    assert not watched.thread.is_alive()
    assert watched.thread not in serving_watch._watched
    assert watched.error is None


def test_a_serving_thread_that_raised_is_said_dead_before_it_has_ended() -> None:
    """The hook runs on the ending thread, which is still alive as it runs: the watch says
    so from the error on (`serve` acts on `alive`), and reports the error once."""
    ended: list[BaseException] = []
    gate = threading.Event()
    thread = threading.Thread(target=gate.wait, args=(60,), name="Thread-0 (_serve)")
    watched = serving_watch.start_watched(thread.start, ended.append)
    try:
        assert watched.thread is thread and watched.alive
        error = MemoryError("a request grpc could not allocate")
        serving_watch._hook(threading.ExceptHookArgs((MemoryError, error, None, thread)))
        assert thread.is_alive() and not watched.alive
        assert ended == [error] and watched.error is error
        assert thread not in serving_watch._watched  # reported once
    finally:
        gate.set()
        thread.join(timeout=60)


def test_servers_started_one_after_another_put_the_hook_in_place_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Put in front of itself by a second server, the hook passed another thread's
    exception to itself, for ever: no report of it, a RecursionError instead."""
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    monkeypatch.setattr(serving_watch, "_previous_hook", None)
    gate = threading.Event()
    threads = [
        threading.Thread(target=gate.wait, args=(60,), name=f"Thread-{n} (_serve)")
        for n in range(2)
    ]
    try:
        for thread in threads:
            serving_watch.start_watched(thread.start, lambda error: None).forget()
        other = ValueError("another thread's")
        threading.excepthook(threading.ExceptHookArgs((ValueError, other, None, None)))
        assert reported == [other]
    finally:
        gate.set()
        for thread in threads:
            thread.join(timeout=60)


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_lists_the_services_and_describes_them(
    server: Running, address: str, version: str
) -> None:
    """Served as v1alpha, what grpcio-reflection serves, and as v1, whose messages are the
    same bytes: tools ask for v1 first, and some ask for nothing else. The errors' messages
    too, google.rpc.Status and ErrorInfo, by symbol: the .proto says so."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="google.rpc.Status"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="google.rpc.ErrorInfo"),
        ]
        listed, *described = list(call(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"gradwire.v1.Trainer", "grpc.health.v1.Health"} <= names
    for answer, file_name in zip(
        described,
        ["gradwire/v1/trainer.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"],
        strict=True,
    ):
        first = answer.file_descriptor_response.file_descriptor_proto[0]  # then its imports
        assert descriptor_pb2.FileDescriptorProto.FromString(first).name == file_name


@pytest.mark.parametrize(
    "symbol",
    [
        "gradwire.v1.Trainer.Forward",
        "gradwire.v1.Trainer.Calls",
        "grpc.health.v1.Health.Check",
        "grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo",
    ],
)
def test_reflection_finds_the_file_of_a_method(server: Running, address: str, symbol: str) -> None:
    """The reflection protocol names a method a symbol (`<package>.<service>[.<method>]`),
    and `grpcurl describe gradwire.v1.Trainer.Forward` asks for it so; grpcio-reflection
    looks only for types and services, and answered NOT_FOUND (grpc/grpc#34743: found by a
    review of the contract from another language)."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        question = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (answer,) = list(stub.ServerReflectionInfo(iter([question]), timeout=5))
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    first = answer.file_descriptor_response.file_descriptor_proto[0]
    service, method = symbol.rsplit(".", 1)
    described = descriptor_pb2.FileDescriptorProto.FromString(first)
    assert [
        m.name
        for s in described.service
        if f"{described.package}.{s.name}" == service
        for m in s.method
        if m.name == method
    ] == [method]


@pytest.mark.parametrize(
    "symbol", ["gradwire.v1.Trainer.Nope", "gradwire.v1.Tensor.Nope", "gradwire.v1.Nope.Forward"]
)
def test_reflection_answers_not_found_for_a_method_no_service_has(
    server: Running, address: str, symbol: str
) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        question = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (answer,) = list(stub.ServerReflectionInfo(iter([question]), timeout=5))
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], answer


def _reflection_stream(channel: grpc.Channel, release: threading.Event) -> Any:
    """A reflection stream, its first answer read, kept open until `release` is set (as a
    tool left connected keeps it). Within 10 s: a server with no thread to give would
    leave it waiting for ever."""

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(60)

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(requests(), timeout=60)
    next(call)
    return call


def test_open_reflection_streams_hold_no_server_thread(trainer: Trainer) -> None:
    """Each open reflection stream held a thread of the server's pool, outside the call
    limit: four beside a full call limit of Watches (or 20 alone) left no thread for any
    call, health checks included, which waited unanswered (found by a review of the
    server's concurrency). Now they wait on a pool of their own, and one past their limit
    is refused at once."""
    running = start(trainer, "127.0.0.1", 0)
    address = f"127.0.0.1:{running.port}"
    release = threading.Event()
    try:
        with grpc.insecure_channel(address) as channel:
            trainer_stub = pb_grpc.TrainerStub(channel)
            watches = []
            for _ in range(DEFAULT_MAX_CONCURRENT):  # every call place held
                watch = trainer_stub.Watch(
                    pb.WatchRequest(items=[pb.WatchItem(name="conv1.weight")]), timeout=60
                )
                next(watch)
                watches.append(watch)
            streams = [_reflection_stream(channel, release) for _ in range(MAX_STREAMS)]
            assert running.reflection is not None
            assert running.reflection.open_streams == MAX_STREAMS
            with pytest.raises(grpc.RpcError) as refused:
                _reflection_stream(channel, release)
            error = errors.from_rpc_error(refused.value)
            assert isinstance(error, errors.ResourceExhausted)
            assert error.reason == "TOO_MANY_REFLECTION_STREAMS"
            assert f"{MAX_STREAMS} reflection streams are open" in error.message
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as busy:
                trainer_stub.ListTensors(pb.ListTensorsRequest(), timeout=10)
            assert errors.from_rpc_error(busy.value).reason == "BUSY"
            release.set()
            for call in [*watches, *streams]:
                call.cancel()
            eventually(lambda: running.reflection.open_streams == 0)  # type: ignore[union-attr]
            _reflection_stream(channel, release).cancel()  # a place again
    finally:
        release.set()
        running.stop(grace=None)


def test_a_reflection_servicer_keeps_the_limit_it_was_made_with() -> None:
    """`max_streams` above the default's pool (MAX_STREAMS + SPARE_THREADS): each of that
    many streams has a thread of its own, the next is refused at once, and the refusal
    names that limit, not the default's."""
    limit = MAX_STREAMS + SPARE_THREADS + 2
    servicer = ReflectionServicer([SERVICE_NAME], max_streams=limit)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            streams = [_reflection_stream(channel, release) for _ in range(limit)]
            assert servicer.open_streams == limit
            with pytest.raises(grpc.RpcError) as refused:
                _reflection_stream(channel, release)
            error = errors.from_rpc_error(refused.value)
            assert error.reason == "TOO_MANY_REFLECTION_STREAMS"
            assert error.message.startswith(f"{limit} reflection streams are open"), error
            assert error.metadata == {"max_streams": str(limit)}
            for call in streams:
                call.cancel()
    finally:
        release.set()
        server.stop(None)
        servicer.close()


def test_a_stop_lets_the_reflection_service_s_threads_go(trainer: Trainer) -> None:
    """Each reflection stream runs on a pool of the reflection service's own: a server
    stopped left its threads behind, for the life of the process."""
    before = set(threading.enumerate())
    running = start(trainer, "127.0.0.1", 0)
    release = threading.Event()
    release.set()  # each stream ends after its first question
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        _reflection_stream(channel, release)
    threads = [
        t for t in set(threading.enumerate()) - before if t.name.startswith("gradwire-reflection")
    ]
    assert threads  # the stream ran on one
    running.stop(grace=None)
    eventually(lambda: not any(t.is_alive() for t in threads), "still running", within=10)


def test_a_stop_closes_the_sessions_left_open_and_lets_their_expiry_thread_go(
    trainer: Trainer,
) -> None:
    """Sessions still open at the stop are closed with it (said in the log: their state goes
    with them), and the thread that closes idle ones ends: a server stopped left it behind,
    for the life of the process, holding every session's model."""
    before = set(threading.enumerate())
    running = start(trainer, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        pb_grpc.TrainerStub(channel).OpenSession(pb.OpenSessionRequest(), timeout=30)
    sessions = running.servicer.sessions
    assert sessions.open_count == 1
    threads = [
        t for t in set(threading.enumerate()) - before if t.name.startswith("gradwire-sessions")
    ]
    assert threads  # the server's expiry thread
    running.stop(grace=None)
    assert sessions.open_count == 0
    eventually(lambda: not any(t.is_alive() for t in threads), "still running", within=10)


def test_a_stopped_server_s_trainer_takes_no_more_calls(trainer: Trainer) -> None:
    """The stop closes the trainer once the calls handed to its torch thread are done (the
    save after them): a call on it then, from code that kept it, is refused, not run on a
    model whose server has gone."""
    from gradwire_server.torch_thread import Closed

    running = start(trainer, "127.0.0.1", 0)
    running.stop(grace=None)
    with pytest.raises(Closed, match="model is gone"):
        trainer.forward(torch.ones(1, 3, 10, 10))


def test_a_stop_lets_the_health_service_s_threads_go(trainer: Trainer) -> None:
    """Health Watches run on a pool of the health service's own, as reflection streams do:
    a server stopped must not leave its threads behind for the life of the process."""
    before = set(threading.enumerate())
    running = start(trainer, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    threads = [
        t for t in set(threading.enumerate()) - before if t.name.startswith("gradwire-health")
    ]
    assert threads  # the watch ran on one
    running.stop(grace=None)
    eventually(lambda: not any(t.is_alive() for t in threads), "still running", within=10)


def test_a_stop_ends_reflection_streams_at_once(trainer: Trainer) -> None:
    # A tool left connected (grpcurl in a loop, an IDE) held every stop for the whole grace
    # period.
    running = start(trainer, "127.0.0.1", 0)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            idle = _reflection_stream(channel, release)
            assert running.reflection is not None
            eventually(lambda: running.reflection.waiting.count == 1)  # type: ignore[union-attr]
            started = time.monotonic()
            running.stop(grace=30)
            assert time.monotonic() - started < 10  # well inside the grace period
            with pytest.raises(grpc.RpcError) as ended:
                next(idle)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the server is stopping" in (ended.value.details() or "")
    finally:
        release.set()


def test_a_reflection_question_that_comes_as_the_stop_begins_is_unavailable(
    trainer: Trainer,
) -> None:
    running = start(trainer, "127.0.0.1", 0)
    release = threading.Event()
    try:
        assert running.reflection is not None
        running.reflection.stop()  # gRPC still takes calls, as for a moment it does
        with (
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            _reflection_stream(channel, release)
        error = errors.from_rpc_error(refused.value)
        assert isinstance(error, errors.Unavailable), error
        assert error.reason == "STOPPING"
        assert error.message.startswith(
            "the server is stopping: this reflection stream ends here"
        ), error.message
    finally:
        release.set()
        running.stop(grace=None)


@pytest.mark.parametrize(("version", "other"), [("v1alpha", "v1"), ("v1", "v1alpha")])
def test_bytes_that_are_no_reflection_request_are_invalid_argument(
    server: Running, address: str, version: str, other: str
) -> None:
    """grpc's reflection servicer answered INTERNAL, a status kept for the server's faults.
    The refusal names the request of the version it came on: on v1 it named v1alpha's, which
    the server reads v1's as (found by a review integrating from Node.js)."""
    with grpc.insecure_channel(address) as channel:
        method = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(method(iter([b"\xff\xff\xff"]), timeout=10))
    error = errors.from_rpc_error(refused.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert error.message.startswith(
        f"the request is not a valid grpc.reflection.{version}.ServerReflectionRequest: "
    ), error.message
    assert f"grpc.reflection.{other}." not in error.message


def test_a_second_server_cannot_take_the_same_port(
    server: Running, trainer: Trainer, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    with pytest.raises(OSError, match=f"port {server.port} is in use") as refused:
        start(trainer, "127.0.0.1", server.port)
    assert refused.value.errno == errno.EADDRINUSE
    assert str(refused.value) == (
        f"cannot listen on 127.0.0.1:{server.port}: port {server.port} is in use (another "
        "server on it?); choose another --port (0 picks a free one)"
    )
    # Found before gRPC tries: gRPC would log a line of its own on stderr first.
    assert "add port" not in capfd.readouterr().err.lower()


def test_start_takes_its_limits_over_the_range_get_server_info_reports(trainer: Trainer) -> None:
    """GetServerInfo reports both limits as uint32: at least one call at a time, and from no
    sessions (0) up; a value outside is refused before anything is bound."""
    from gradwire.limits import MAX_COUNT

    for limits, said in [
        ({"max_concurrent": 0}, f"max_concurrent must be from 1 to {MAX_COUNT}, got 0"),
        ({"max_sessions": -1}, f"max_sessions must be from 0 to {MAX_COUNT}, got -1"),
        ({"max_sessions": MAX_COUNT + 1}, f"max_sessions must be from 0 to {MAX_COUNT}, got"),
    ]:
        with pytest.raises(ValueError, match=re.escape(said)):
            start(trainer, "127.0.0.1", 0, **limits)
    running = start(trainer, "127.0.0.1", 0, max_concurrent=1, max_sessions=MAX_COUNT)
    running.stop(grace=None)
    running = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0, max_sessions=0)
    running.stop(grace=None)


def test_a_server_s_port_cannot_be_shared_by_a_socket_that_asks_to_share_it(
    server: Running,
) -> None:
    """gRPC sets SO_REUSEPORT by default, which lets a second socket that sets it too, a
    second gRPC server among them, bind the same port and take a share of its connections,
    silently: the server turns it off."""
    with (
        socket.socket() as sharer,
        pytest.raises(OSError) as refused,
    ):
        sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sharer.bind(("127.0.0.1", server.port))
    assert refused.value.errno == errno.EADDRINUSE


def test_a_server_restarted_on_its_port_takes_it_while_old_connections_linger(
    trainer: Trainer,
) -> None:
    """A connection the server closed itself (past its limit on connections, an idle one,
    those open at its stop) leaves the port's side of it in TIME_WAIT for a minute: gRPC
    binds past it (SO_REUSEADDR), and so must the check made before it, or a restart on the
    same port was refused "in use (another server on it?)" though none listened."""
    running = start(trainer, "127.0.0.1", 0, connections=ServerConnections(max_connections=1))
    port = running.port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            kept.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            assert kept.recv(65536)  # the server's settings: the one connection it keeps
            with socket.create_connection(("127.0.0.1", port), timeout=10) as past:
                assert past.recv(65536) == b""  # closed by the server, the first to close
    finally:
        running.stop(grace=None)
    again = start(Trainer(device="cpu", seed=0), "127.0.0.1", port)
    try:
        assert again.port == port
    finally:
        again.stop(grace=None)


@pytest.mark.parametrize("port", [50123, 0])
def test_an_address_not_of_this_machine_is_named(
    trainer: Trainer, port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    with pytest.raises(OSError, match=r"192\.0\.2\.1 is not an address of this machine"):
        start(trainer, "192.0.2.1", port)  # TEST-NET-1: never a local address
    assert "add port" not in capfd.readouterr().err.lower()  # gRPC was not asked


def test_a_privileged_port_and_a_bind_only_grpc_refused_are_said_with_what_to_do() -> None:
    """Root, as CI runs, binds a port under 1024 (refused EACCES to others); gRPC may
    refuse a bind its probe made, saying only "failed to bind"."""
    from gradwire_server.app import _cannot_listen

    refused = OSError(errno.EACCES, "Permission denied")
    assert _cannot_listen("0.0.0.0:80", "0.0.0.0", 80, refused) == (
        "cannot listen on 0.0.0.0:80: port 80 needs privileges to listen on; choose one above 1023"
    )
    assert _cannot_listen("127.0.0.1:5", "127.0.0.1", 5, None) == (
        "cannot listen on 127.0.0.1:5: the port is in use or the address is not this "
        "machine's; choose another --port (0 picks a free one) or --host"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="says what it found on a GPU machine")
def test_the_log_says_no_gpu_was_found_only_when_the_server_chose_the_device() -> None:
    from gradwire_server.app import describe_device

    cpu = torch.device("cpu")
    assert describe_device(cpu, "auto") == "cpu (no CUDA device found)"
    assert describe_device(cpu, "cpu") == "cpu"
    assert describe_device(cpu, "cpu:0") == "cpu"  # a CPU named, in any spelling


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`gradwire serve` as its own process, as a user starts it."""
    port_file = tmp_path / "port"
    with serving("--port-file", str(port_file), "--grace", "2") as (process, log):
        # With the versions an operator asks for; no word of CUDA after --device cpu (an
        # operator's walkthrough found "(no CUDA device found)" there).
        assert f"model Simple on cpu (gradwire {gradwire.__version__}, torch " in log, log
        assert re.search(r", instance [0-9a-f]{16}\)\n", log), log
        assert "CUDA" not in log
        yield process, int(port_file.read_text())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_gracefully_on_a_signal(
    served: tuple[subprocess.Popen[str], int], signum: signal.Signals, tmp_path: Path
) -> None:
    process, port = served
    with gradwire.connect(f"127.0.0.1:{port}", timeout=10) as client:
        client.wait_ready(10)
        version = client.fill_parameters(0.1)
    assert (tmp_path / "port").read_text() == f"{port}\n"
    process.send_signal(signum)
    assert process.wait(timeout=20) == 0
    assert process.stderr is not None
    rest = process.stderr.read()
    assert (
        f"{signal.Signals(signum).name} received: stopping (grace 2.0s; a step running then is "
        "finished; a second signal exits at once)"  # no state dir: no save said, nor none
    ) in rest
    assert f"stopped at state version {version}" in rest
    # The port file goes with the port: it sent its next reader to a dead one (an
    # operator's walkthrough).
    assert not (tmp_path / "port").exists()


#: `gradwire serve` with an exit handler of its own, which stands for the interpreter's teardown.
WITH_A_TEARDOWN = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("the interpreter's teardown ran\\n"))
from gradwire.cli import main_entry
main_entry()
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_ends_without_the_interpreter_s_teardown_and_loses_no_output(
    tmp_path: Path, log_format: str
) -> None:
    """After "stopped", the interpreter's teardown took 0.7-0.85 s (most of it torch
    deregistering, one by one, the operators it registered from Python) and gave back
    nothing the exit does not; a review saw a process linger seconds after "stopped". A
    process that imported torch now ends at once, once its log and output are flushed."""
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", WITH_A_TEARDOWN, "serve", "--port", "0", "--device", "cpu"),
            *("--port-file", str(port_file), "--log-format", log_format),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Until the port file is written: the server is up (its log is read after the exit).
        eventually(
            lambda: port_file.exists() and port_file.read_text().endswith("\n"),
            "the server wrote no port file",
            within=60,
        )
        with gradwire.connect(f"127.0.0.1:{port_file.read_text().strip()}", timeout=10) as client:
            client.wait_ready(10)
            version = client.fill_parameters(0.1)
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, log
    assert "the interpreter's teardown ran" not in log
    last = log.splitlines()[-1]  # written whole, and last: nothing of it lost
    assert f"stopped at state version {version}" in last
    if log_format == "json":
        assert json.loads(last)["message"] == f"stopped at state version {version}"


def test_serve_exits_failed_after_an_error_the_device_does_not_recover_from(
    tmp_path: Path,
) -> None:
    """So that a supervisor that restarts failed processes (docker compose's `restart:
    unless-stopped`, which ignores health) gets a fresh device context; nothing is saved."""
    port_file = tmp_path / "port"
    state = tmp_path / "state"
    args = ("--model", "tests.broken_models:LOST", "--port-file", str(port_file))
    with serving(*args, "--state-dir", str(state), "--grace", "1") as (process, _):
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        with gradwire.connect(address, timeout=10) as client, pytest.raises(errors.Internal):
            client.forward(np.ones((1, 2), np.float32))
        assert process.wait(timeout=30) == 1
        assert process.stderr is not None
        rest = process.stderr.read()
    assert "health is NOT_SERVING now, restart the server" in rest
    assert "error: stopped after an error the device does not recover from" in rest
    assert not (state / "state.safetensors").exists()


def test_serve_refuses_a_device_it_does_not_have() -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run(
        [sys.executable, "-m", "gradwire.cli", "serve", "--port", "0", "--device", "cuda:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr


WEIGHTS = ["conv1.weight", "conv2.weight", "linear.weight"]


def _stop_under(running: Running, stream: Iterator[object]) -> tuple[float, BaseException]:
    """Stops `running` (grace 30 s) once `stream` has sent its first message; returns how long
    the stop took and what the stream raised."""
    reader = Reader(stream).started()
    started = time.monotonic()
    running.stop(grace=30)
    took = time.monotonic() - started
    reader.thread.join(30)
    assert reader.errors, "the stream ended without an error"
    return took, reader.errors[0]


def test_a_stop_ends_open_watches_at_once(trainer: Trainer) -> None:
    # An open watch never finishes by itself: it held every stop for the whole grace period.
    running = start(trainer, "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=None) as client:
        took, raised = _stop_under(running, client.watch(["conv1.weight[0, 0, 0]"]))
    assert took < 10  # well inside the 30 s grace: the watch looks every 0.5 s
    assert isinstance(raised, errors.Unavailable), raised
    assert raised.reason == "STOPPING"
    assert "watch again once it is back" in raised.message


def test_a_stop_ends_a_server_side_train_between_steps(trainer: Trainer) -> None:
    running = start(trainer, "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=None) as client:
        x, y = gradwire.Fill.ones(8, 3, 10, 10), gradwire.Fill.ones(8, dtype="int64")
        took, raised = _stop_under(running, client.train(x, y, steps=10**9))
    assert took < 10
    assert isinstance(raised, errors.Unavailable), raised
    assert raised.reason == "STOPPING"
    steps = int(raised.message.split("training stopped after ")[1].split()[0])
    assert trainer.version == 4 * steps  # each step applied whole: 4 mutations
    # Both also for a client to read, not parse: how far it went, and the state's version.
    assert raised.metadata == {"steps_done": str(steps), "version": str(trainer.version)}


def _stop_while_not_read(running: Running, stream: Iterator[object]) -> float:
    """Stops `running` (grace 30 s) while `stream`'s client reads nothing; returns how long
    the stop took. The stream, read after, has ended UNAVAILABLE."""
    started = time.monotonic()
    running.stop(grace=30)
    took = time.monotonic() - started
    with pytest.raises(errors.Unavailable):
        for _ in stream:
            pass
    return took


def test_a_stop_ends_a_watch_whose_client_stopped_reading(trainer: Trainer) -> None:
    """Its handler waited in gRPC's send for the client to read on, where it cannot look for
    the stop: every stop waited the whole grace period for it (8 s of 8, seen)."""
    running = start(trainer, "127.0.0.1", 0)
    address = f"127.0.0.1:{running.port}"
    with (
        gradwire.connect(address, timeout=None) as watcher,
        gradwire.connect(address, timeout=60) as stepper,
    ):
        # Read one by one as gRPC buffered them, and then not at all.
        updates = watcher.watch(WEIGHTS, values=True, latest=False)
        next(updates)
        x, y = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")
        for _ in range(400):  # training does not wait for the watcher: 400 updates are due
            stepper.train_step(x, y)
        assert running.servicer.sending.under_way == 1  # the watch's send waits for it
        took = _stop_while_not_read(running, updates)
    assert 0.9 < took < 10  # a second to read on, then ended, well inside the grace


def test_a_stop_ends_a_train_whose_client_stopped_reading(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Train whose progress its client does not read waits to send it, taking no step;
    the stop ends it there, each step taken applied whole."""
    _unprobed(monkeypatch)
    running = start(trainer, "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=None) as client:
        progress = _train_left_unread(running, trainer, client)
        took = _stop_while_not_read(running, progress)
    assert 0.9 < took < 10
    assert trainer.version % 4 == 0  # each step applied whole: 4 mutations


def _unprobed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients connected in the test without gRPC's bandwidth probe: its window grows to
    megabytes on a fast link, and without it a client buffers 64 KiB of a stream it does not
    read (a Train's progress waits for it within seconds)."""
    options = gradwire.client.channel_options
    monkeypatch.setattr(
        gradwire.client, "channel_options", lambda *a, **k: [*options(*a, **k), *UNPROBED]
    )


def _train_left_unread(
    running: Running, trainer: Trainer, client: gradwire.Client
) -> Iterator[Any]:
    """A Train of steps without end on `client` (unprobed), its first progress read and no
    more: returned once it waits to send its progress, taking no step."""
    progress = client.train(Fill.ones(1, 3, 10, 10), Fill.ones(1, dtype="int64"), steps=10**9)
    next(progress)

    def waits() -> bool:
        # Its send under way and no step for a second: a server the machine's load
        # starves for 0.3 s takes no step either, and its stop then took 0.04 s.
        version = trainer.version
        time.sleep(1.0)
        return trainer.version == version and running.servicer.sending.under_way == 1

    eventually(waits, "the Train did not come to wait for its client", within=120)
    return progress


def test_a_stop_ends_a_streamed_read_whose_client_stopped_reading(trainer: Trainer) -> None:
    """Its handler waited in gRPC's send, and the stop waited the whole grace period."""
    running = start(trainer, "127.0.0.1", 0)
    with (
        gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client,
        unread_reads(running, client) as (read,),
    ):
        started = time.monotonic()
        running.stop(grace=30)
        took = time.monotonic() - started
        with pytest.raises(grpc.RpcError):
            for _ in read:
                pass
        assert read.code() == grpc.StatusCode.UNAVAILABLE
    assert 0.9 < took < 10  # a second to read on, then ended, well inside the grace


def test_a_stop_ends_only_the_sends_that_wait_past_the_patience() -> None:
    # The server's patience (1 s): the quick send is taken 0.05 s after the stop, and must be
    # well before the patience runs out on a busy machine too (at the 0.2 s this test used,
    # a test thread held 0.15 s would have seen it ended; found by a review of the tests).
    patience = 1.0
    sending = SendingStreams(stalled_s=patience)
    stuck, quick, idle = _Cancellable(), _Cancellable(), _Cancellable()
    with (
        sending.open(cast(grpc.ServicerContext, stuck), "stuck") as first,
        sending.open(cast(grpc.ServicerContext, quick), "quick") as second,
        sending.open(cast(grpc.ServicerContext, idle), "idle"),
    ):
        waiting, sent = first.send("a"), second.send("b")
        next(waiting), next(sent)  # both under way: handed to gRPC, not yet taken
        assert sending.under_way == 2
        sending.stop()
        time.sleep(0.05)
        assert next(sent, None) is None  # gRPC asks for the next: it was sent in time
        eventually(lambda: stuck.cancelled, "the send that waited was not ended")
        time.sleep(2 * patience)  # two more looks
        assert not quick.cancelled and not idle.cancelled
    eventually(
        lambda: "gradwire-stalled" not in {t.name for t in threading.enumerate()},
        "the stop's thread outlived the streams",
    )


def test_a_stream_whose_handler_starts_after_the_stop_is_looked_at_too() -> None:
    """Its call waited for a thread, or came as the stop began: the stop's thread, ended for
    want of streams, starts again (found by a review)."""
    sending, late = SendingStreams(stalled_s=0.1), _Cancellable()
    sending.stop()
    eventually(lambda: "gradwire-stalled" not in {t.name for t in threading.enumerate()})
    with sending.open(cast(grpc.ServicerContext, late), "late") as stream:
        first = stream.send("first")  # the first update, sent before it looks for the stop
        next(first)
        eventually(lambda: late.cancelled, "the late stream's send was not ended")


def test_a_stop_whose_thread_could_not_start_starts_it_for_the_next_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No thread could start at the stop (out of memory): a stream opened after, once one
    can, is looked at, rather than the stop taking its thread for one that runs."""
    sending, late = SendingStreams(stalled_s=0.1), _Cancellable()
    starts = RefusedStarts(monkeypatch, lambda name: name == "gradwire-stalled")
    sending.stop()
    starts.refusing = False
    with sending.open(cast(grpc.ServicerContext, late), "late") as stream:
        first = stream.send("first")  # under way until gRPC asks for the next
        next(first)
        eventually(lambda: late.cancelled, "the late stream's send was not ended")


class _Ended:
    """What SendingStreams asks of a stream's ServicerContext to end it and name its peer:
    grpcio's call object, whose cancel takes a status."""

    def __init__(self) -> None:
        self.status: tuple[int, str] | None = None
        self._rpc_event = self  # grpcio's context holds its call under _rpc_event.call
        self.call = self

    def cancel(self, code: int, details: str) -> None:
        self.status = (code, details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5"


def test_a_call_without_a_place_ends_the_stream_left_unread_longest_past_unread_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sending = SendingStreams(unread_s=20)
    older, newer, read, recent = _Ended(), _Ended(), _Ended(), _Ended()
    with (
        sending.open(cast(grpc.ServicerContext, older), "stop", "Watch") as first,
        sending.open(cast(grpc.ServicerContext, newer), "stop", "GetTensorStream") as second,
        sending.open(cast(grpc.ServicerContext, read), "stop", "Train") as third,
        sending.open(cast(grpc.ServicerContext, recent), "stop", "Watch") as fourth,
    ):
        sends = [
            stream.send(message)
            for stream, message in zip((first, second, third, fourth), "abcd", strict=True)
        ]
        for send in sends:
            next(send)  # each handed to gRPC
        assert next(sends[2], None) is None  # its client read it: between two sends
        first.since -= 60  # waited a minute, the longest
        second.since -= 30
        third.since -= 90  # before it was read
        # The most recent waits under unread_s: not ended.
        assert sending.end_one_unread()
        assert older.status is not None and newer.status is None
        code, details = older.status
        assert code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert details.startswith("this Watch's client had left a message unread for 60.0 s")
        assert sending.end_one_unread()  # the next call, the next longest
        assert newer.status is not None
        assert newer.status[1].startswith("this GetTensorStream's client had left")
        assert not sending.end_one_unread()  # each ended once; the others not due
        assert read.status is None and recent.status is None
    assert "ended a Watch whose client had left a message unread for 60.0 s" in caplog.text
    assert "(peer ipv4:127.0.0.1:5)" in caplog.text


def test_a_call_that_finds_every_place_taken_ends_a_read_its_client_stopped_reading(
    trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    """Streams their client stopped reading without cancelling them (a dropped blocking
    iterator in grpc-java, a reader left unfinished in C++) held every place until their
    deadlines: 17 unread GetTensorStreams left every other call BUSY (found by a review of
    the server's security)."""
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    try:
        with (
            gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client,
            unread_reads(running, client, 2) as reads,
        ):
            # Left unread for less than UNREAD_S (30 s): the call is refused, as before.
            with pytest.raises(errors.ResourceExhausted, match="unread for 30 s") as busy:
                client.list_tensors()
            assert busy.value.reason == "BUSY"
            running.servicer.sending.unread_s = 0.2
            time.sleep(0.3)
            assert client.list_tensors().model == "Simple"  # in the place of one read
            ended = []
            for stream in reads:
                with contextlib.suppress(grpc.RpcError):
                    chunks = list(stream)
                    assert len(chunks) == 38  # 153,600 values, 4,096 a chunk: the whole read
                ended.append(stream.code())
            assert sorted(code.name for code in ended) == ["OK", "UNAVAILABLE"]
        assert "ended a GetTensorStream whose client had left a message unread" in caplog.text
    finally:
        running.stop(grace=None)


def test_a_watch_that_is_read_keeps_its_place_when_one_left_unread_is_ended(
    trainer: Trainer,
) -> None:
    """Only a stream whose send waits for its client is ended: a watch read as its updates
    come, waiting for the next, keeps its place and its updates."""
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    address = f"127.0.0.1:{running.port}"
    try:
        with (
            gradwire.connect(address, timeout=None) as watcher,
            gradwire.connect(address, timeout=60) as stepper,
        ):
            unread = watcher.watch(WEIGHTS, values=True, latest=False)
            next(unread)
            x, y = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")
            for _ in range(400):  # 400 updates due, the watcher reading none
                stepper.train_step(x, y)
            sends_waiting(running, 1)
            read = watcher.watch(["loss"])
            first = next(read)
            running.servicer.sending.unread_s = 0.2
            time.sleep(0.3)
            # Every place taken (the two watches): the unread one is ended for the step.
            stepper.train_step(x, y)
            assert next(read).version > first.version  # the read watch had it
            with pytest.raises(errors.Unavailable):
                for _ in unread:
                    pass
            read.close()
    finally:
        running.stop(grace=None)


def test_a_train_ended_for_a_call_without_a_place_tells_its_client_how_far_it_went(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Train whose client stopped reading its progress, ended for a call that found every
    place taken, says, as a stop's end of it does, that training ended there, each step
    taken applied whole: its message said only that the stream was ended, and left its
    client to guess whether the server trained on or half a step was applied (found by a
    review of this session's new features)."""
    _unprobed(monkeypatch)
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=None) as client:
            progress = _train_left_unread(running, trainer, client)
            read = client.watch(["loss"])  # the second place, read
            next(read)
            running.servicer.sending.unread_s = 0.2
            assert client.list_tensors().model == "Simple"  # in the Train's place
            with pytest.raises(errors.Unavailable) as ended:
                for _ in progress:
                    pass
            read.close()
        assert "the server ended it to give that call its place" in ended.value.message
        assert (
            "training ended there, the steps taken applied, each whole (read the state "
            "version to know how far it went)" in ended.value.message
        )
        assert trainer.version % 4 == 0  # each step applied whole: 4 mutations
    finally:
        running.stop(grace=None)


def test_a_stop_ends_open_health_watches_once_they_say_not_serving(trainer: Trainer) -> None:
    running = start(trainer, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        running.stop(grace=30)
        assert time.monotonic() - started < 10  # well inside the grace period
        assert [update.status for update in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_a_stop_ends_an_idle_calls_stream_at_once(trainer: Trainer) -> None:
    # A pipeline keeps its client's Calls stream open between calls: an idle stream held
    # every stop for the whole grace period.
    running = start(trainer, "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client:
        with client.pipeline() as p:
            listed = p.list_tensors()
        assert listed.result().version == 0
        stream = client._calls
        assert stream is not None and stream.usable
        started = time.monotonic()
        running.stop(grace=30)
        assert time.monotonic() - started < 10  # well inside the grace period
        eventually(lambda: not stream.usable, "the client did not see its stream end")


def _stop_during_held_forward(running: Running, caller: threading.Thread) -> float:
    """Starts `caller`, whose first call is a Forward the Gate holds; stops `running` (grace
    30 s) while it is held, then lets it go. Returns how long the stop took."""
    from tests.test_concurrency import Gate

    caller.start()
    assert Gate.entered.wait(timeout=60)  # the Forward is in progress on the stream
    started = time.monotonic()
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 30}, daemon=True)
    stopper.start()
    eventually(running.servicer.stopping.is_set)
    Gate.release.set()
    caller.join(timeout=60)
    stopper.join(timeout=60)
    return time.monotonic() - started


def test_a_stop_ends_a_calls_stream_once_its_call_in_progress_is_answered(
    gated_server: Running,
) -> None:
    # A stream busy with a call, with nothing written after it, waited after the answer for
    # a next message that did not come, holding the stop for the whole grace period.
    running = gated_server
    answers: dict[str, Any] = {}
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=60, stream_calls=True) as client:
        held = threading.Thread(
            target=lambda: answers.update(held=client.forward(Fill.ones(1, 2))), daemon=True
        )
        assert _stop_during_held_forward(running, held) < 10  # well inside the grace period
        assert getattr(answers.get("held"), "version", None) == 1  # answered, not cut off
        stream = client._calls
        assert stream is not None
        eventually(lambda: not stream.usable, "the client did not see its stream end")


def test_a_stop_lets_a_calls_streams_call_finish_and_runs_none_after_it(
    gated_server: Running,
) -> None:
    running = gated_server
    answers: dict[str, Any] = {}

    def calls() -> None:
        try:
            with client.pipeline() as p:
                answers["held"], answers["after"] = p.forward(Fill.ones(1, 2)), p.list_tensors()
        except errors.Unavailable as raised:  # the block raises the failure not looked at
            answers["raised"] = raised

    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
        assert _stop_during_held_forward(running, threading.Thread(target=calls, daemon=True)) < 10
    assert answers["held"].result().version == 1  # the call in progress was answered
    after = answers["after"].exception()
    assert isinstance(after, errors.Unavailable), after
    assert answers["raised"] is after
    assert after.reason == "STOPPING"
    assert "no call written to it after its last answer was run" in after.message
    assert running.trainer.version == 1


def test_a_stop_whose_grace_thread_could_not_start_still_waits_for_the_call_in_progress(
    gated_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's thread for the grace period could not start (out of memory): the stop waits
    out the grace period itself, and the call in progress is answered, not cut off."""
    running = gated_server
    RefusedStarts(monkeypatch, lambda name: "cancel_all_calls_after_grace" in name)
    answers: dict[str, Any] = {}

    def held() -> None:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=60) as client:
            answers["held"] = client.forward(Fill.ones(1, 2))

    assert _stop_during_held_forward(running, threading.Thread(target=held, daemon=True)) < 10
    assert getattr(answers.get("held"), "version", None) == 1


def _end_the_serving_thread(running: Running) -> None:
    """Ends gRPC's real serving thread as a MemoryError in its own code would (test_oom.py
    does it so, under a cap): the exception is raised there as it next wakes (once a second
    at most, gRPC's poll timeout), and the thread ends with it."""
    import ctypes

    assert running.serving is not None and running.serving.thread is not None
    thread = running.serving.thread
    assert thread.ident is not None
    raised = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(MemoryError)
    )
    assert raised == 1
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_serving_thread_that_ends_during_the_grace_period_ends_the_stop_once(
    gated_server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC's serving thread ended while the stop waited out the grace period for a call in
    progress: gRPC's own stop is finished by that thread, so the stop goes on without it,
    once, and saves; waiting on gRPC's, it waited for ever."""
    running = gated_server

    def held() -> None:
        with contextlib.suppress(errors.GradwireError):  # its answer may never be sent
            gradwire.connect(f"127.0.0.1:{running.port}", timeout=30).forward(Fill.ones(1, 2))

    holder = threading.Thread(target=held, daemon=True)
    with caplog.at_level(logging.INFO, logger="gradwire_server"):
        from tests.test_concurrency import Gate

        holder.start()
        assert Gate.entered.wait(timeout=60)
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 60}, daemon=True)
        started = time.monotonic()
        stopper.start()
        eventually(running.servicer.stopping.is_set)
        _end_the_serving_thread(running)
        Gate.release.set()
        stopper.join(timeout=30)
        assert not stopper.is_alive(), "the stop waited on gRPC's, whose thread had ended"
        assert time.monotonic() - started < 30  # well inside the grace period
    said = [r.getMessage() for r in caplog.records]
    assert (
        "gRPC's serving thread ended (MemoryError): this server answers no call again, health "
        "checks neither; restart it"  # no on_serving_lost: nothing here stops it
    ) in said, said
    assert (
        said.count("stopping without gRPC's serving thread: calls in progress are not waited for")
        == 1
    ), said


# --- found by a review of the server as an operator runs it ---------------------------------


def _serve_refused(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradwire.cli", "serve", "--port", "0", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_start_that_fails_says_so_in_the_json_log(tmp_path: Path) -> None:
    """With --log-format json, a failed start's error was the one plain-text line after
    the log's JSON ones, which a collector of JSON lines reads or drops as garbage (an
    operator's walkthrough): it is the log's last JSON line now, and the only error line."""
    state = tmp_path / "a-file"
    state.write_text("")
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use
        port = taken.getsockname()[1]
        # The server's reason, where it gave one: docs/RELIABILITY.md names the refusals by
        # them, and no line carried them (found by an audit of its claims).
        for args, code, said, reason in [
            (("--device", "gpu"), 2, "gradwire serve: error: unknown device 'gpu'", "BAD_DEVICE"),
            (
                ("--state-dir", str(state)),
                2,
                f"gradwire serve: error: --state-dir {state}",
                "BAD_STATE_DIR",
            ),
            (
                ("--port", str(port), "--metrics-port", str(port)),
                2,
                f"gradwire serve: error: --metrics-port {port} is the port gRPC listens on",
                "BAD_METRICS_PORT",
            ),
            (
                ("--port", str(port)),
                1,
                f"gradwire serve: error: cannot listen on 127.0.0.1:{port}",
                None,
            ),
            # The command line's own refusal, before the server: no reason of the server's.
            (
                ("--tls-cert", str(state)),
                2,
                "gradwire serve: error: TLS needs both --tls-cert and --tls-key",
                None,
            ),
            # Refused by argparse: its usage and error in plain text (a review)
            (
                ("--port", "70000"),
                2,
                "gradwire serve: error: argument --port: bad port '70000'",
                None,
            ),
            (("--grace", "-1"), 2, "gradwire serve: error: argument --grace: bad duration", None),
            (("--bogus",), 2, "gradwire serve: error: unrecognized arguments: --bogus", None),
        ]:
            done = _serve_refused(*args, "--log-format", "json")
            assert done.returncode == code, done.stderr
            lines = [json.loads(line) for line in done.stderr.splitlines()]
            assert lines[-1]["level"] == "CRITICAL", lines
            assert lines[-1]["message"].startswith(said), lines
            assert lines[-1].get("reason") == reason, lines[-1]
            assert sum("error" in line["message"] for line in lines) == 1
            plain = _serve_refused(*args)  # in text, as before
            assert plain.stderr.splitlines()[-1].startswith(said), plain.stderr


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "a-read-only-folder"])
def test_a_state_dir_the_stop_could_not_save_into_is_refused_at_start(
    tmp_path: Path, where: str
) -> None:
    # Found only at the stop, it lost the whole run's training: the server trained, then
    # failed to save with a traceback. /sys/kernel takes no new file, even from root.
    if where == "a-read-only-folder" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs /sys (Linux)")
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    state = {"a-file": afile, "under-a-file": afile / "state"}.get(where, Path("/sys/kernel"))
    out = _serve_refused("--state-dir", str(state))
    why = {
        "a-file": "it is a file, not a folder",
        "under-a-file": "a folder on its path is a file",
    }.get(where, "Permission denied")
    assert out.returncode == 2
    assert out.stderr.endswith(
        f"gradwire serve: error: --state-dir {state}: the state could not be saved there "
        f"({why}); choose a folder this user can write to\n"
    )
    assert "listening on" not in out.stderr


def test_a_file_where_the_state_dir_s_saving_folder_goes_is_refused_with_what_to_do(
    tmp_path: Path,
) -> None:
    """Its refusal says to remove it, or to choose another folder: not to choose one this
    user can write to, which this one is."""
    from gradwire_server.app import check_state_dir

    state = tmp_path / "state"
    state.mkdir()
    (state / ".saving").write_text("not a folder\n")
    with pytest.raises(InvalidInput) as refused:
        check_state_dir(state)
    assert refused.value.reason == "BAD_STATE_DIR"
    assert str(refused.value) == (
        f"--state-dir {state}: the state could not be saved there (.saving in the state "
        "directory, where saves write before renaming, is a file, not a folder of its own: "
        "remove it); or choose another folder"
    )


def test_a_state_dir_whose_saving_folder_takes_no_file_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """Saves are written in the state dir's .saving folder, then renamed into place: one
    left by another user (a first run as root, the folder then chown'ed without -R) passed
    the start's check, which wrote in the state dir alone, and the save at the stop failed,
    the run's training lost (a review of running the server, as an operator)."""
    prefix: list[str] = []
    if os.geteuid() == 0:  # root writes in any folder: without its capabilities it does not
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root writes in any folder, and setpriv is not here to drop that")
        prefix = [setpriv, "--bounding-set", "-all", "--inh-caps", "-all"]
    state = tmp_path / "state"
    (state / ".saving").mkdir(parents=True)
    (state / ".saving").chmod(0o555)
    serve = [sys.executable, "-m", "gradwire.cli", "serve", "--port", "0", "--device", "cpu"]
    out = subprocess.run(
        [*prefix, *serve, "--state-dir", str(state)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.endswith(
        f"gradwire serve: error: --state-dir {state}: the state could not be saved there "
        "(Permission denied in .saving, where saves are written before they are renamed into "
        "place); choose a folder this user can write to\n"
    ), out.stderr
    assert "listening on" not in out.stderr


def test_a_state_dir_is_made_at_start_and_holds_no_trace_of_the_check(tmp_path: Path) -> None:
    from gradwire_server.app import check_state_dir

    state = tmp_path / "runs" / "state"
    check_state_dir(state)
    assert state.is_dir()
    assert [p.name for p in state.iterdir()] == [".saving"]  # where saves are written
    assert list((state / ".saving").iterdir()) == []


def test_one_state_dir_serves_one_server_and_sighup_stops_it_saving(tmp_path: Path) -> None:
    """Two servers on one state dir each saved there at their stop, the last to stop
    overwriting the other's training; and SIGHUP, which a terminal sends as it closes,
    killed the server at once, unsaved (both found by a review of deployment)."""
    from gradwire_server.app import hold_state_dir

    port_file, state = tmp_path / "port", tmp_path / "state"
    (state / ".saving").mkdir(parents=True)  # what a save cut short left: cleared, and said
    (state / ".saving" / "state.safetensors.0a1b.partial").write_bytes(b"x" * 3 * 2**19)
    args = ("--port-file", str(port_file), "--state-dir", str(state), "--grace", "1")
    with serving(*args) as (process, log):
        assert f"removed 1 unfinished checkpoint file(s), 1,572,864 bytes, left in {state}" in log
        # A fresh folder is said to be one: only a restore was logged (an operator's
        # walkthrough: a fresh volume and a wrong mount read alike).
        assert f"no saved state in {state}: fresh weights, saved there at a graceful stop" in log
        out = _serve_refused("--state-dir", str(state))
        assert out.returncode == 2
        assert out.stderr.endswith(
            f"gradwire serve: error: --state-dir {state} is in use by another gradwire server "
            f"(process {process.pid}): each server needs a folder of its own, or one would "
            "overwrite the other's state\n"
        )
        assert "listening on" not in out.stderr
        with gradwire.connect(f"127.0.0.1:{port_file.read_text().strip()}", timeout=10) as client:
            version = client.fill_parameters(0.1)
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
    assert "SIGHUP received: stopping" in rest
    assert f"saved state version {version}" in rest
    with (
        hold_state_dir(state),  # free once its server has stopped
        pytest.raises(InvalidInput, match="in use by another gradwire server"),
    ):
        hold_state_dir(state)


def test_a_state_dir_held_by_a_server_still_saving_at_its_stop_is_said_so(
    tmp_path: Path,
) -> None:
    """A server started on the state dir of one still stopping (`kill PID; gradwire serve`,
    a large model's save taking 22 s) was told to find "a folder of its own", exit 2: a
    new folder would have started from fresh weights, and a supervisor that retries exit 1
    alone gave up (found by a review of restarts). It is told the holder is stopping and to
    start once it has exited, an OSError: exit 1, which may pass, as a port still held."""
    from gradwire_server.app import hold_state_dir

    state = tmp_path / "state"
    args = ("--model", "tests.slow_save_model:SPEC", "--state-dir", str(state), "--grace", "0")
    with serving(*args) as (process, _):
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        assert any("saving state version" in line for line in iter(process.stderr.readline, ""))
        with pytest.raises(OSError) as held:  # the save takes 2 s more
            hold_state_dir(state)
        assert process.wait(timeout=60) == 0
    assert str(held.value) == (
        f"--state-dir {state} is held by gradwire server process {process.pid}, which is "
        "stopping (saving its state there): start this one once that process has exited"
    )
    with hold_state_dir(state):  # free once its server has stopped
        pass


def test_the_lock_file_names_this_server_s_process_alone(tmp_path: Path) -> None:
    """A lock file left longer than this server's process id is written over whole: what
    was left after the id made a second server's refusal say "another process" where it
    names this one's."""
    from gradwire_server.app import LOCK_FILE, hold_state_dir

    (tmp_path / LOCK_FILE).write_text(f"{os.getpid()}0123456789\n")
    with hold_state_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_lock_file_refused_or_taken_again_leaves_no_file_open(tmp_path: Path) -> None:
    """A lock file refused (a second name of another file) is closed with the refusal, and
    the lock on a state dir removed meanwhile is let go as it is taken again in the one
    made in its place: each left a file open for the life of the process."""
    from gradwire_server.app import LOCK_FILE, _lock_file, hold_state_dir

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc (Linux)")
    state, other = tmp_path / "state", tmp_path / "other"
    state.mkdir()
    other.write_text("")
    os.link(other, state / LOCK_FILE)
    before = open_files()
    with pytest.raises(InvalidInput, match="a second name of another file"):
        _lock_file(state)
    assert open_files() == before
    (state / LOCK_FILE).unlink()
    with hold_state_dir(state) as hold:
        held = open_files()
        shutil.rmtree(state)
        cast(Any, hold).keep()  # made again, its lock taken again there
        assert (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert open_files() == held


def test_a_state_dir_whose_lock_names_no_process_is_said_held_by_another_process(
    tmp_path: Path,
) -> None:
    import fcntl

    from gradwire_server.app import LOCK_FILE, hold_state_dir

    with (tmp_path / LOCK_FILE).open("w") as other:  # held, its process id not yet written
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("starting\n")
        other.flush()
        with pytest.raises(InvalidInput) as held:
            hold_state_dir(tmp_path)
    assert f"{tmp_path} is in use by another gradwire server (another process): " in (
        held.value.message
    )


def test_a_server_started_under_nohup_outlives_a_hangup() -> None:
    """nohup ignores SIGHUP so that its command outlives the terminal; serve's handler
    replaced nohup's, and a hang-up (the terminal closing, an SSH session ending) stopped
    a server started so as to outlive it (found by a review of running the server for
    others). SIGTERM still stops it."""
    nohup = shutil.which("nohup")
    if nohup is None:
        pytest.skip("needs nohup")
    with serving("--grace", "1", under=[nohup]) as (process, log):
        assert "SIGHUP is ignored, as it was at start (nohup)" in log, log
        process.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
    assert "SIGHUP received" not in rest
    assert "SIGTERM received: stopping" in rest


def test_a_sigterm_ignored_by_the_server_s_starter_still_stops_it() -> None:
    """Only nohup's SIGHUP stays ignored: a SIGTERM or Ctrl-C that the starter ignored still
    stops the server gracefully."""
    from gradwire_server.app import stop_signals

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert signal.SIGTERM in stop_signals()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_the_kernel_hands_another_thread_still_stops_the_server(
    tmp_path: Path,
) -> None:
    """The kernel may give a signal sent to the process to any thread that does not block
    it, and Python runs its handler on the main thread, which waited on an Event with no
    timeout: serve missed the SIGTERM and ran on (a CI run's server, still up ten minutes
    later, its main thread in that wait)."""
    state = tmp_path / "state"
    with serving("--state-dir", str(state), "--grace", "1") as (process, _):
        signal_another_thread(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
    assert "SIGTERM received: stopping" in rest
    assert "saved state version 0" in rest


#: A `gradwire serve` whose SIGTERM comes the moment its port is bound, before it says it
#: listens: what a supervisor that watches the port (or a loaded machine) may do.
_SIGTERM_AT_BIND = """
import os, signal, sys
from gradwire_server import app
real = app.start
def start(*args, **kwargs):
    running = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return running
app.start = start
from gradwire.cli import main
sys.exit(main(sys.argv[1:], sys.stdout, sys.stderr))
"""


def test_a_sigterm_as_the_server_starts_stops_it_gracefully(tmp_path: Path) -> None:
    """The stop signals' handlers were installed after the server said it listened (and
    wrote its port file): a SIGTERM in between found Python's default and killed the
    process, its state unsaved (a CI run under load, in the test above)."""
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT_BIND, "serve", "--port", "0", "--device", "cpu",
         "--state-dir", str(state), "--grace", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "SIGTERM received: stopping" in done.stderr
    assert "saved state version 0" in done.stderr


#: `serve` called in a program of its own (as an embedding one would), stopped by a SIGTERM
#: once ready; then what handles the stop signals.
# The handlers before, not Python's defaults: a test run started in the background (CI's,
# `make test &`) ignores SIGINT, and Python then installs no handler of its own for it.
_SERVE_THEN_SIGNALS = """
import os, signal
from gradwire_server.app import serve
before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
serve(port=0, device="cpu", keep_freed=False,
      ready=lambda running: os.kill(os.getpid(), signal.SIGTERM))
print(signal.getsignal(signal.SIGTERM) is before[0], signal.getsignal(signal.SIGINT) is before[1])
"""


def test_serve_gives_the_stop_signals_back_to_their_handlers_once_it_returns() -> None:
    """Its handlers are for its own stop: left in place after it returned, a program that
    called it went on with a Ctrl-C or SIGTERM that only logged "received: stopping" and
    stopped nothing."""
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_THEN_SIGNALS],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True True\n", done.stderr


def test_serving_on_0_0_0_0_says_it_listens_on_ipv6_too() -> None:
    """gRPC binds 0.0.0.0 on both families, and the log said 0.0.0.0 only: an operator whose
    firewall covers IPv4 left the port open on IPv6 (found by a review of deployment)."""
    until = "(health and reflection on)"
    with serving("--host", "0.0.0.0", until=until) as (_, log):
        said = next(line for line in log.splitlines() if until in line)
        port = int(said.split("listening on 0.0.0.0:")[1].split()[0])
        assert said.endswith(
            f"listening on 0.0.0.0:{port} (IPv6 too, where this machine has it) {until}"
        )
        if _has_ipv6_loopback():
            with gradwire.connect(f"[::1]:{port}", timeout=10) as client:  # it does
                assert client.health() == "SERVING"


def test_serving_on_the_ipv6_wildcard_says_it_listens_on_ipv4_too() -> None:
    """gRPC binds :: on both families too, and the log said "IPv6 too" of an IPv6 address,
    IPv4 unmentioned: an operator whose firewall covers IPv6 only left the port open on
    IPv4 (found by a review of running the server for others)."""
    if not _has_ipv6_loopback():
        pytest.skip("needs IPv6")
    until = "(health and reflection on)"
    with serving("--host", "::", until=until) as (_, log):
        said = next(line for line in log.splitlines() if until in line)
        port = int(said.split("listening on [::]:")[1].split()[0])
        assert said.endswith(f"listening on [::]:{port} (IPv4 too) {until}")
        with gradwire.connect(f"127.0.0.1:{port}", timeout=10) as client:  # it does
            assert client.health() == "SERVING"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_the_start_checks_refuse_with_their_reasons(tmp_path: Path) -> None:
    """What `gradwire serve` shows as a usage error, `start` (and these checks) raise as
    InvalidInput with a reason of its own, for a program that starts a server itself."""
    from gradwire_server.app import check_port_file, check_state_dir

    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    for check, path, reason in [
        (check_state_dir, afile, "BAD_STATE_DIR"),
        (check_state_dir, afile / "state", "BAD_STATE_DIR"),
        (check_port_file, tmp_path / "nope" / "port", "BAD_PORT_FILE"),
        (check_port_file, tmp_path, "BAD_PORT_FILE"),
    ]:
        with pytest.raises(InvalidInput) as refused:
            check(path)
        assert refused.value.reason == reason, path
    # A file where its folder should be is no folder, as a missing one is.
    with pytest.raises(InvalidInput, match=r"there is no folder .*afile to write it in$"):
        check_port_file(afile / "port")


def test_a_port_file_left_by_a_server_killed_is_removed_at_start(tmp_path: Path) -> None:
    """A server killed (SIGKILL, out of memory) leaves its port file, naming a dead port: a
    reader waiting for the file took it for the new server's for the seconds its start
    took (found by a review of running the server for others)."""
    from gradwire_server.app import check_port_file

    with socket.create_server(("127.0.0.1", 0)) as probe:
        dead = probe.getsockname()[1]  # free once closed: the killed server's
    port_file = tmp_path / "port"
    port_file.write_text(f"{dead}\n")
    check_port_file(port_file)
    assert not port_file.exists()
    assert list(tmp_path.iterdir()) == []
    check_port_file(port_file)  # none there: nothing to remove, and no refusal


@pytest.mark.parametrize("named", ["", "x\n", "0\n", "-1\n", "65536\n", "99999999999999999999\n"])
def test_a_port_file_that_names_no_port_is_removed_at_start(tmp_path: Path, named: str) -> None:
    """Anything in a port file but a port something listens on is a dead server's, or no
    server's: removed, whatever it holds (past 65535, the port check would raise gRPC's
    OverflowError, not a refusal)."""
    from gradwire_server.app import check_port_file

    port_file = tmp_path / "port"
    port_file.write_text(named)
    check_port_file(port_file)
    assert list(tmp_path.iterdir()) == []


def test_a_port_file_is_judged_on_the_host_the_server_listens_on(tmp_path: Path) -> None:
    """A port in use somewhere else is not this host's server: one that cannot be bound on
    the host for another reason (not this machine's address) left the file behind."""
    from gradwire_server.app import check_port_file

    with socket.create_server(("127.0.0.1", 0)) as listening:
        port_file = tmp_path / "port"
        port_file.write_text(f"{listening.getsockname()[1]}\n")
        check_port_file(port_file, "192.0.2.1")  # TEST-NET-1: never a local address
        assert not port_file.exists()


def test_a_port_file_that_cannot_be_written_leaves_nothing_beside_it(tmp_path: Path) -> None:
    """Written under another name, then renamed into place: a rename that fails (a folder
    there) leaves no partial file behind, nor does a stop's removal raise on a file that
    names no port."""
    from gradwire_server.app import forget_port, write_port_file

    port_file = tmp_path / "port"
    port_file.mkdir()
    with pytest.raises(OSError):
        write_port_file(port_file, 50123)
    assert [p.name for p in tmp_path.iterdir()] == ["port"]
    other = tmp_path / "other"
    other.write_text("not a port\n")
    forget_port(other, 50123)  # not this server's: left, and nothing raised
    assert other.read_text() == "not a port\n"


def test_a_start_that_fails_leaves_the_port_file_of_the_server_that_listens(
    tmp_path: Path,
) -> None:
    """A second `serve` given a running server's --port-file and --port (started twice by
    mistake, or a supervisor's retries) removed the file at start, then found the port in
    use and exited: the server that wrote the file went on serving with no file naming its
    port, and its readers found none (a review of running the server, as an operator)."""
    port_file = tmp_path / "port"
    with serving("--port-file", str(port_file)) as (process, _):
        port = port_file.read_text()
        second = _serve_refused("--port", port.strip(), "--port-file", str(port_file))
        assert second.returncode == 1, second.stderr
        assert "is in use" in second.stderr
        assert port_file.read_text() == port
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert not port_file.exists()  # removed by the server that wrote it, at its stop


def test_a_start_on_ipv6_leaves_the_port_file_of_the_server_listening_there(
    tmp_path: Path,
) -> None:
    """The port file's port is looked for on the host given (--host ::1), not on IPv4's
    loopback, where nothing listens: the running server's file was removed by a second
    start, which then failed on the port in use."""
    if not _has_ipv6_loopback():
        pytest.skip("needs IPv6")
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as listening:
        port = str(listening.getsockname()[1])
        port_file = tmp_path / "port"
        port_file.write_text(f"{port}\n")
        second = _serve_refused("--host", "::1", "--port", port, "--port-file", str(port_file))
        assert second.returncode == 1, second.stderr
        assert f"port {port} is in use" in second.stderr
        assert port_file.read_text() == f"{port}\n"


def test_the_stop_removes_the_port_file_only_where_it_names_this_server_s_port(
    tmp_path: Path,
) -> None:
    """A file another server has written since, or that names no port, is left."""
    from gradwire_server.app import forget_port

    port_file = tmp_path / "port"
    for text in ["50052\n", "not a port\n"]:
        port_file.write_text(text)
        forget_port(port_file, 50051)
        assert port_file.read_text() == text
    port_file.write_text("50051\n")
    forget_port(port_file, 50051)
    assert not port_file.exists()
    forget_port(port_file, 50051)  # gone already: nothing to do


def test_a_reader_waiting_for_the_port_file_never_finds_it_without_its_port(
    tmp_path: Path,
) -> None:
    """The port file appears whole: written in place, it was there empty for a moment, and
    a reader waiting for it to exist (what the file is for) could read no port (the
    seventy-third session's review of running the server, as an operator)."""
    from gradwire_server.app import write_port_file

    port_file = tmp_path / "port"
    seen: set[str] = set()
    writing = True

    def read_while_written() -> None:
        while writing:
            with contextlib.suppress(FileNotFoundError):
                seen.add(port_file.read_text())

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for _ in range(3000):
            write_port_file(port_file, 50051)
            port_file.unlink()
    finally:
        writing = False
        reader.join()
    assert seen <= {"50051\n"}, seen
    write_port_file(port_file, 50052)
    assert port_file.read_text() == "50052\n"
    assert [path.name for path in tmp_path.iterdir()] == ["port"]  # nothing left beside it


def test_a_log_level_that_hides_the_start_lines_still_says_the_port_port_0_picked(
    tmp_path: Path,
) -> None:
    """`--port 0 --log-level warning`, no port file: the only line saying the port was an
    INFO line the level hid, and the operator had no way to reach the server (the
    seventy-third session's review of running the server, as an operator)."""
    with serving("--log-level", "warning", "--metrics-port", "0", until="picked by") as (
        _,
        log,
    ):
        said = re.search(
            r"listening on port (\d+), picked by --port 0; metrics on port (\d+), picked by "
            r"--metrics-port 0; the log level hides the other start lines",
            log,
        )
        assert said is not None, log
        assert "model Simple on cpu" not in log  # an INFO line, hidden as asked
        with gradwire.connect(f"127.0.0.1:{said[1]}", timeout=10) as client:
            client.wait_ready(10)
        with urllib.request.urlopen(f"http://127.0.0.1:{said[2]}/metrics", timeout=10) as got:
            assert got.status == 200
    # Where the port is said otherwise, no warning: the INFO lines shown, or a port file.
    with serving("--grace", "0") as (process, _):
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    assert "picked by" not in rest and "stopped" in rest, rest
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            *(*CLI, "serve", "--port", "0", "--device", "cpu", "--log-level", "warning"),
            *("--port-file", str(port_file)),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(port_file.exists, "the server wrote no port file", within=60)
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0 and "picked by" not in log, log


def test_a_metrics_port_given_is_not_said_to_be_picked_by_metrics_port_0() -> None:
    """The warning names the ports 0 picked alone: a metrics port given is the operator's
    own, and said "picked by --metrics-port 0" it sent them looking for an option not
    given."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        metrics = probe.getsockname()[1]  # free once closed
    with serving("--log-level", "warning", "--metrics-port", str(metrics), until="picked by") as (
        _,
        log,
    ):
        said = next(line for line in log.splitlines() if "picked by" in line)
        assert re.search(
            r"listening on port \d+, picked by --port 0; the log level hides the other start "
            r"lines",
            said,
        ), said


def test_a_metrics_port_that_is_the_grpc_port_is_refused_as_an_option(tmp_path: Path) -> None:
    """`--metrics-port` the same as `--port`: the metrics server took the port first, and
    gRPC was refused it, "port N is in use (another server on it?)", exit 1 (what may pass,
    for a supervisor to retry): no other server was there, and every retry failed alike (a
    review of running the server, as an operator)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free once closed
    out = _serve_refused("--port", str(port), "--metrics-port", str(port))
    assert out.returncode == 2, out.stderr
    assert out.stderr.endswith(
        f"gradwire serve: error: --metrics-port {port} is the port gRPC listens on (--port): "
        "give the metrics another port (0 picks a free one)\n"
    ), out.stderr
    assert "in use" not in out.stderr
    assert "listening on" not in out.stderr


def test_a_port_file_without_its_folder_is_refused_at_start(tmp_path: Path) -> None:
    port_file = tmp_path / "nope" / "port"
    out = _serve_refused("--port-file", str(port_file))
    assert out.returncode == 2
    assert f"--port-file {port_file}: there is no folder {port_file.parent}" in out.stderr
    assert "listening on" not in out.stderr


@pytest.mark.parametrize("where", ["a-folder", "a-read-only-folder"])
def test_a_port_file_that_could_not_be_written_is_refused_at_start(
    tmp_path: Path, where: str
) -> None:
    # Found only once the server listened: a failed exit (1), where a missing folder is
    # refused at start as a usage error (2), so a supervisor could not tell them apart from
    # a server that failed later. /proc takes no new file, even from root.
    if where == "a-read-only-folder" and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (Linux)")
    port_file = tmp_path if where == "a-folder" else Path("/proc/gradwire-port")
    why = "it is a folder; name a file" if where == "a-folder" else "cannot write in /proc ("
    out = _serve_refused("--port-file", str(port_file))
    assert out.returncode == 2, out.stderr
    assert f"gradwire serve: error: --port-file {port_file}: {why}" in out.stderr
    assert "listening on" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no trace of the check


@pytest.mark.parametrize("host", ["nosuch.invalid", "999.1.1.1", "a..b", "a" * 64 + ".example"])
@pytest.mark.parametrize("port", [50123, 0])
def test_a_host_that_resolves_to_nothing_is_named(
    trainer: Trainer, host: str, port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    # It was said to be a port in use, or an address not of this machine; with port 0,
    # after a line of gRPC's own on stderr. An empty label or one over 63 characters ended
    # `gradwire serve` with a traceback (UnicodeError, from the idna codec: a review).
    capfd.readouterr()
    with pytest.raises(OSError, match=re.escape(f"the host name {host!r} resolves to no address")):
        start(trainer, host, port)  # .invalid: never resolves (RFC 2606)
    assert "add port" not in capfd.readouterr().err.lower()
    with pytest.raises(OSError, match=r"\); check --host$"):  # and what to do
        start(trainer, host, port)


def test_serve_on_a_host_it_cannot_bind_exits_1_saying_why() -> None:
    """Only binding finds it out: a failure to start (exit 1), not a usage error (exit 2,
    which RELIABILITY.md said until a review of the docs)."""
    out = _serve_refused("--host", "nosuch.invalid")
    assert out.returncode == 1, out.stderr
    assert "the host name 'nosuch.invalid' resolves to no address" in out.stderr


def test_a_save_that_fails_at_the_stop_is_one_line_and_a_failed_exit(tmp_path: Path) -> None:
    port_file, state = tmp_path / "port", tmp_path / "state"
    args = ("--port-file", str(port_file), "--state-dir", str(state), "--grace", "1")
    with serving(*args) as (process, log):
        # A fresh folder is said to be one: only a restore was logged (an operator's
        # walkthrough: a fresh volume and a wrong mount read alike).
        assert f"no saved state in {state}: fresh weights" in log, log
        assert "unfinished checkpoint" not in log, log  # none to remove: nothing said
        with gradwire.connect(f"127.0.0.1:{port_file.read_text().strip()}", timeout=10) as client:
            version = client.fill_parameters(0.1)
        shutil.rmtree(state)  # its lock file in it
        state.write_text("the folder replaced by a file while the server ran\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 1
        assert process.stderr is not None
        rest = process.stderr.read()
    assert f"gradwire serve: error: could not save state version {version} to {state}" in rest
    assert "Traceback" not in rest


def test_a_failed_save_is_an_error_record_and_sessions_closed_are_said(tmp_path: Path) -> None:
    """The failed save was only serve's own line, outside the log: a pipeline alerting on
    ERROR records missed the training lost. Sessions open at the stop went without a word
    (both found by a review of deployment)."""
    port_file, state = tmp_path / "port", tmp_path / "state"
    args = ("--port-file", str(port_file), "--state-dir", str(state), "--log-format", "json")
    with serving(*args) as (process, _):
        client = gradwire.connect(f"127.0.0.1:{port_file.read_text().strip()}", timeout=10)
        session = client.open_session()
        session.fill_parameters(0.1)
        version = client.list_tensors().version
        shutil.rmtree(state)
        state.write_text("the folder replaced by a file while the server ran\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 1
        assert process.stderr is not None
        records = [json.loads(line) for line in process.stderr if line.startswith("{")]
    lost = f"could not save state version {version} to {state}"
    assert [r["level"] for r in records if r["message"].startswith(lost)] == ["ERROR"]
    closing = "closing the 1 session(s) still open; only the default session's state is saved"
    assert [r["level"] for r in records if r["message"] == closing] == ["INFO"]


def test_sessions_closed_at_a_stop_without_a_save_are_said_without_one(
    trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    running = start(trainer, "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=10) as client:
        client.open_session(seed=0).detach()
    with caplog.at_level(logging.INFO, logger="gradwire_server"):
        running.stop(grace=None)
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing")]
    assert closing == ["closing the 1 session(s) still open"]


def test_a_stop_s_long_save_is_said_as_a_save_not_as_a_call_waited_for(tmp_path: Path) -> None:
    """A large model's save at the stop took 22 s, and the log said a call in progress was
    waited for, with none (a review of serving a big model): the notice is for calls; the
    save is said as it begins, and how long it took."""
    state = tmp_path / "state"
    args = ("--model", "tests.slow_save_model:SPEC", "--state-dir", str(state), "--grace", "0")
    with serving(*args) as (process, _):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
    assert f"saving state version 0 to {state / 'state.safetensors'}\n" in rest, rest
    took = re.search(r"saved state version 0 to \S+ \(([0-9,]+) bytes in ([0-9.]+) s\)", rest)
    assert took is not None, rest
    assert float(took[2]) >= 2.0 and int(took[1].replace(",", "")) > 0
    assert "still stopping" not in rest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_the_model_is_built_is_said_before_the_process_ends_by_it(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM (a supervisor's stop, `docker stop`) or SIGHUP while the model is built or
    its state restored: the process ended by it without a word, and the operator could not
    tell a server stopped while starting from one that had never started (the seventy-third
    session's review of running the server, as an operator). It still ends by the signal, as
    a supervisor expects, and leaves no port file."""
    port_file = tmp_path / "port"
    args = ("--model", "tests.broken_models:SLOW_TO_BUILD", "--port-file", str(port_file))
    with serving(*args, until="slow build started") as (process, _):
        process.send_signal(signum)
        assert process.wait(timeout=30) == -signum  # not the minute's build
        assert process.stderr is not None
        rest = process.stderr.read()
    assert (
        f"{signum.name} received while starting, before listening: exiting; nothing was "
        "served or saved\n"
    ) in rest, rest
    assert not port_file.exists()


def test_a_stop_signal_while_starting_ends_the_first_process_of_a_container(
    tmp_path: Path,
) -> None:
    """As the first process of its PID namespace (a container's, Docker's CMD: PID 1), the
    kernel drops a signal whose action is the default: the server said "exiting; nothing was
    served or saved", then went on to build, listen and serve, and `docker stop` waited its
    whole stop_grace_period before killing it (found by a review of restarts). It exits now,
    128 + the signal, as a shell reports a process ended by one."""
    under = _first_process_of_a_container()
    port_file = tmp_path / "port"
    args = ("--model", "tests.broken_models:SLOW_TO_BUILD", "--port-file", str(port_file))
    with serving(*args, until="slow build started", under=under) as (process, _):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        os.kill(int(children.split()[0]), signal.SIGTERM)  # the server, PID 1 inside
        assert process.wait(timeout=30) == 128 + signal.SIGTERM  # not the minute's build
        assert process.stderr is not None
        rest = process.stderr.read()
    assert "SIGTERM received while starting, before listening: exiting" in rest, rest
    assert "listening on" not in rest
    assert not port_file.exists()


def _first_process_of_a_container() -> tuple[str, ...]:
    """The command that runs another as the first process (PID 1) of a PID namespace of its
    own, as a container's is, killed with it; skips the test where none can be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux's unshare")
    under = (unshare, "--user", "--map-root-user", "--pid", "--fork", "--kill-child")
    if subprocess.run([*under, "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine lets no PID namespace be made (unshare refused)")
    return under


def _slow_import(module: str, side: str, entry: str) -> str:
    """A script that runs `entry` as `gradwire` with the import of `module` three seconds
    longer, as on a busy host, saying "importing the SIDE side" as it begins: for a signal
    that must come during it."""
    return f"""
import runpy, sys, time
class Slow:
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            print("importing the {side} side", file=sys.stderr, flush=True)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                time.sleep(0.05)
sys.meta_path.insert(0, Slow())
runpy.run_module({entry!r}, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("module", "side", "entry"),
    [
        # serve's import of the server side (torch's, seconds): kept until the log is set up
        # (found by a review of restarts, seventy-fifth session).
        ("gradwire_server", "server", "gradwire.cli"),
        # The command's first imports (grpc's, numpy's: a third of a second, before its
        # arguments are parsed), kept by the entry point (left by the seventy-fifth session).
        ("gradwire", "client", "gradwire_cli"),
    ],
)
def test_a_stop_signal_during_serve_s_imports_is_said_and_ends_it(
    tmp_path: Path, module: str, side: str, entry: str
) -> None:
    """SIGTERM while `gradwire serve` imports, as a container's first process (PID 1): the
    kernel dropped it, there being no handler yet, and the server went on to listen and
    serve until `docker stop` killed it; elsewhere it ended the process without a word. It
    is said, and the process ends by it: 128 + the signal where it cannot (PID 1)."""
    under = _first_process_of_a_container()
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [*under, sys.executable, "-c", _slow_import(module, side, entry), "serve", "--port",
         "0", "--device", "cpu", "--port-file", str(port_file)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        assert process.stderr.readline() == f"importing the {side} side\n"
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        os.kill(int(children.read_text().split()[0]), signal.SIGTERM)  # PID 1 inside
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        rest = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert "SIGTERM received while starting, before listening: exiting" in rest, rest
    assert "listening on" not in rest
    assert not port_file.exists()


def test_a_second_signal_exits_at_once_without_waiting_for_the_stop(tmp_path: Path) -> None:
    # A Forward of a minute held the stop, and further signals were only logged.
    port_file, state = tmp_path / "port", tmp_path / "state"
    args = ("--model", "tests.broken_models:SLOW", "--port-file", str(port_file))
    with serving(*args, "--state-dir", str(state), "--grace", "1") as (process, _):
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        client = gradwire.connect(address, timeout=120)
        client.retries = 0

        def forward() -> None:
            with contextlib.suppress(errors.GradwireError):  # the server goes away under it
                client.forward(np.ones((1, 2), np.float32))

        calling = threading.Thread(target=forward, daemon=True)
        calling.start()
        assert process.stderr is not None
        lines = iter(process.stderr.readline, "")
        assert any("slow forward started" in line for line in lines)  # a stop now waits
        process.send_signal(signal.SIGTERM)
        assert any("SIGTERM received: stopping" in line for line in lines)
        # Past the grace period (1 s) and a second more, the stop says what it waits for.
        assert any("still stopping 1s after the grace period" in line for line in lines)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 128 + signal.SIGINT  # not the minute's Forward
        rest = process.stderr.read()
        calling.join(timeout=30)
        client.close()
    assert "SIGINT received again: exiting now" in rest
    assert "the state is NOT saved" in rest
    assert not (state / "state.safetensors").exists()
    # Its port is no one's: the file was left naming it (a review of running the server).
    assert not port_file.exists()


def test_open_files_already_at_the_hard_limit_are_not_said_to_be_raised() -> None:
    """Raised only where there is room: a soft limit at the hard one (ulimit -n set so, as
    a container may start) logged "up to 20,000 ... (was 20,000)", a raise that was none."""
    from gradwire_server.app import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # raising the soft: allowed
    try:
        assert raise_open_files_limit() is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_up_to_the_hard_limit_on_open_files_leave_the_server_serving(
    tmp_path: Path,
) -> None:
    # Each connection takes a file descriptor, token or not, and gRPC holds a connection
    # that spoke HTTP/2 until keepalive finds it dead (80 s) or for ever if it answers pings.
    # Under a soft limit of 256 open files (systemd's default soft limit is 1,024), 300
    # connections that sent HTTP/2's preface and nothing more left the owner's calls
    # unanswered until they closed, gRPC logging "File descriptor limit reached. Retrying."
    # The hard limit was 20,000 (found by a review of running the server for others,
    # fifty-fourth session).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"a hard limit of {hard} open files leaves no room to raise")
    port_file = tmp_path / "port"
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    under = ("sh", "-c", 'ulimit -Sn 256 && exec "$@"', "sh")
    with serving("--port-file", str(port_file), under=under) as (_, log):
        port = int(port_file.read_text())
        raised = "unlimited" if hard == resource.RLIM_INFINITY else f"{hard:,}"
        assert f"open files: up to {raised}, each client connection takes one (was 256)" in log
        idle = []
        try:
            for _ in range(300):
                connection = socket.create_connection(("127.0.0.1", port), timeout=10)
                connection.sendall(preface)
                idle.append(connection)
            with gradwire.connect(f"127.0.0.1:{port}", timeout=10) as client:
                assert client.list_tensors().version == 0
        finally:
            for connection in idle:
                connection.close()
