"""GetServerInfo: the versions, the device and the limits a server keeps, each checked
against the limit the server enforces, on a real server on loopback."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire.cli.state import INFO_COLUMNS
from gradwire.fill import Fill
from gradwire.limits import (
    CHUNK_BYTES,
    MAX_GRPC_INT,
    MAX_MESSAGE_BYTES,
    MAX_VALUE_BYTES,
    ServerConnections,
)
from gradwire.results import ServerInfo, ServerLimits
from gradwire_server.app import Running, start
from gradwire_server.convert import known_fields
from gradwire_server.trainer import Trainer
from tests.cli_run import run_main
from tests.serve_in_process import bare_server, running_server

INPUT = Fill.ones(8, 3, 10, 10)
TARGET = Fill.ones(8, dtype="int64")


@pytest.fixture
def small() -> Iterator[Running]:
    """A server started with none of the defaults: every setting it reports is its own."""
    trainer = Trainer(device="cpu", seed=0, max_elements=1000)
    running = start(
        trainer,
        "127.0.0.1",
        0,
        max_concurrent=2,
        max_sessions=1,
        session_idle_s=42.5,
        connections=ServerConnections(
            keepalive_s=7.0,
            keepalive_timeout_s=3.0,
            min_client_ping_s=11.0,
            idle_s=13.0,
            max_connections=5,
        ),
    )
    yield running
    running.stop(grace=None)


def _raw(address: str, method: str, request: Any, metadata: Any = ()) -> bytes:
    """A call as a client in another language makes it: the request's bytes, our metadata."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/gradwire.v1.Trainer/{method}")
        answer: bytes = call(request.SerializeToString(), metadata=metadata, timeout=30)
        return answer


def _refused(address: str, method: str, request: Any, metadata: Any = ()) -> errors.RemoteError:
    with pytest.raises(grpc.RpcError) as info:
        _raw(address, method, request, metadata)
    return errors.from_rpc_error(info.value)


#: `gradwire info`'s last row, of the fields of the .proto the server knows.
CONTRACT = (
    f"contract         {len(known_fields())} fields of the .proto known (info --json lists them)"
)


def test_the_server_reports_the_settings_it_was_started_with(small: Running) -> None:
    with gradwire.connect(f"127.0.0.1:{small.port}", timeout=30) as client:
        info = client.server_info()
    assert info == ServerInfo(
        version=gradwire.__version__,
        torch_version=torch.__version__,
        device="cpu",
        limits=ServerLimits(
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_value_bytes=MAX_VALUE_BYTES,
            default_chunk_bytes=CHUNK_BYTES,
            max_elements=1000,
            max_dims=64,
            max_name_chars=256,
            max_histogram_bins=4096,
            max_train_steps=2**40,
            max_request_id_chars=128,
            max_concurrent=2,
            max_sessions=1,
            session_idle_timeout_s=42.5,
            keepalive_s=7.0,
            keepalive_timeout_s=3.0,
            min_client_ping_s=11.0,
            max_health_watches=64,
            max_reflection_streams=8,
            request_id_kept_s=600.0,
            last_request_ids_kept=1024,
            max_request_ids_kept=65_536,
            answer_bytes_kept=256 * 1024 * 1024,
            max_batch_calls=1024,
            max_selectors=1024,
            connection_idle_s=13.0,
            max_connections=5,
            max_index_chain=64,
        ),
        known_fields=tuple(known_fields()),
        instance_id=small.servicer.instance_id,
    )


def test_limits_made_without_the_later_fields_hold_zero_for_each() -> None:
    """Code that made a ServerLimits (or a ServerInfo) before a field was added still does,
    each field added since 0 ("not reported"), and the known fields none."""
    first = [f for f in dataclasses.fields(ServerLimits) if f.default is dataclasses.MISSING]
    limits = ServerLimits(*range(1, len(first) + 1))
    later = [f.name for f in dataclasses.fields(ServerLimits)][len(first) :]
    assert later and first[-1].name == "min_client_ping_s"
    assert all(getattr(limits, name) == 0 for name in later)
    assert ServerInfo("0.1", "2.5", "cpu", limits).known_fields == ()


def _limits(**settings: Any) -> ServerLimits:
    """What a server started with `settings` (app.start's) reports of its limits."""
    with (
        running_server(**settings) as running,
        gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client,
    ):
        return client.server_info().limits


def test_a_server_that_sends_no_pings_reports_zeros_and_no_idle_limit_as_infinity() -> None:
    limits = _limits(connections=ServerConnections(keepalive_s=None), session_idle_s=float("inf"))
    assert (limits.keepalive_s, limits.keepalive_timeout_s) == (0.0, 0.0)
    assert limits.session_idle_timeout_s == float("inf")


def test_each_limit_reported_is_the_one_the_server_enforces(
    client: gradwire.Client, address: str
) -> None:
    """At each limit a call goes through, one past it is refused with the reason the .proto
    names: a client that sizes its calls from GetServerInfo is not refused."""
    limits = client.server_info().limits
    names = limits.max_name_chars
    at = _refused(address, "GetTensor", pb.GetTensorRequest(name="x" * names))
    assert at.reason == "UNKNOWN_TENSOR"  # a name the server would look up
    past = _refused(address, "GetTensor", pb.GetTensorRequest(name="x" * (names + 1)))
    assert past.reason == "BAD_NAME"
    # Counted in code points, as the .proto says: not in UTF-8 bytes (two and four each
    # here), nor in UTF-16 units (two for a character past the BMP, as Java counts).
    for character in ("é", "\U0001d465"):
        at = _refused(address, "GetTensor", pb.GetTensorRequest(name=character * names))
        assert at.reason == "UNKNOWN_TENSOR"
        past = _refused(address, "GetTensor", pb.GetTensorRequest(name=character * (names + 1)))
        assert past.reason == "BAD_NAME"

    ids = limits.max_request_id_chars
    _raw(address, "ZeroGrad", pb.ZeroGradRequest(), [("gradwire-request-id", "a" * ids)])
    past = _refused(
        address, "ZeroGrad", pb.ZeroGradRequest(), [("gradwire-request-id", "b" * (ids + 1))]
    )
    assert past.reason == "BAD_METADATA"

    bins = limits.max_histogram_bins
    stats = pb.GetStatsRequest(name="conv1.weight", histogram_bins=bins)
    answer = pb.GetStatsResponse.FromString(_raw(address, "GetStats", stats))
    assert len(answer.stats.histogram.counts) == bins
    stats.histogram_bins = bins + 1
    assert _refused(address, "GetStats", stats).reason == "BAD_BINS"

    # conv1.weight has 4 dimensions; new axes take a selection to the limit and past it.
    axes = limits.max_dims - 4
    assert client.get(f"conv1.weight[{', '.join(['None'] * axes)}]").ndim == limits.max_dims
    with pytest.raises(errors.InvalidArgument) as info:
        client.get(f"conv1.weight[{', '.join(['None'] * (axes + 1))}]")
    assert info.value.reason == "BAD_INDEX"

    # A Train of the most steps starts (and is cancelled after its first); one more is refused.
    train = pb.TrainRequest(steps=limits.max_train_steps, every=1)
    train.input.fill.CopyFrom(pb.Fill(kind=pb.Fill.KIND_ONES, shape=[8, 3, 10, 10]))
    train.target.fill.CopyFrom(pb.Fill(kind=pb.Fill.KIND_ONES, shape=[8], dtype=pb.DTYPE_INT64))
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream("/gradwire.v1.Trainer/Train")
        running = call(train.SerializeToString(), timeout=60)
        assert pb.TrainProgress.FromString(next(running)).step == 1
        running.cancel()
        train.steps += 1
        with pytest.raises(grpc.RpcError) as refused:
            next(call(train.SerializeToString(), timeout=60))
    assert errors.from_rpc_error(refused.value).reason == "BAD_REQUEST"


def test_the_element_limit_calls_and_sessions_reported_are_enforced(small: Running) -> None:
    address = f"127.0.0.1:{small.port}"
    with gradwire.connect(address, timeout=30) as client:
        limits = client.server_info().limits
        # A target of exactly the limit gets past the size check to the shape check.
        with pytest.raises(errors.InvalidArgument) as at:
            client.forward(Fill.ones(2, 3, 10, 10), Fill.ones(limits.max_elements, dtype="int64"))
        assert at.value.reason == "BAD_TARGET_SHAPE"
        with pytest.raises(errors.ResourceExhausted) as past:
            client.forward(
                Fill.ones(2, 3, 10, 10), Fill.ones(limits.max_elements + 1, dtype="int64")
            )
        assert past.value.reason == "TOO_MANY_ELEMENTS"

        opened = [client.open_session(seed=0) for _ in range(limits.max_sessions)]
        with pytest.raises(errors.ResourceExhausted) as more:
            client.open_session(seed=0)
        assert more.value.reason == "TOO_MANY_SESSIONS"
        for session in opened:
            session.close()

        watches = [client.watch(["loss"]) for _ in range(limits.max_concurrent)]
        for watch in watches:
            next(watch)
        with pytest.raises(errors.ResourceExhausted) as busy:
            client.list_tensors()
        assert busy.value.reason == "BUSY"
        for watch in watches:
            watch.close()


def test_the_bin_limit_has_the_type_of_the_bins_it_bounds() -> None:
    """A client compares a request's histogram_bins with max_histogram_bins: of one type,
    a typed language needs no cast (it was uint32 against the requests' int32)."""
    bins = pb.ServerLimits.DESCRIPTOR.fields_by_name["max_histogram_bins"].type
    for request in (pb.GetStatsRequest, pb.WatchItem):
        assert request.DESCRIPTOR.fields_by_name["histogram_bins"].type == bins


def _held(calls: list[Any]) -> None:
    for call in calls:
        call.cancel()


def test_the_health_and_reflection_stream_limits_reported_are_enforced(small: Running) -> None:
    """At the number of health Watches and reflection streams reported, each is open; one
    more is refused with the reason the .proto names."""
    address = f"127.0.0.1:{small.port}"
    with gradwire.connect(address, timeout=30) as client:
        limits = client.server_info().limits
    release = threading.Event()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches: list[Any] = []
        try:
            for _ in range(limits.max_health_watches):
                watches.append(health.Watch(health_pb2.HealthCheckRequest(), timeout=60))
                assert next(watches[-1]).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(), timeout=60))
            assert errors.from_rpc_error(refused.value).reason == "TOO_MANY_WATCHES"
        finally:
            _held(watches)

        def questions() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            release.wait(60)

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        streams: list[Any] = []
        try:
            for _ in range(limits.max_reflection_streams):
                streams.append(reflection.ServerReflectionInfo(questions(), timeout=60))
                assert next(streams[-1]).HasField("list_services_response")
            with pytest.raises(grpc.RpcError) as refused:
                next(reflection.ServerReflectionInfo(questions(), timeout=60))
            error = errors.from_rpc_error(refused.value)
            assert error.reason == "TOO_MANY_REFLECTION_STREAMS"
            assert error.metadata == {"max_streams": str(limits.max_reflection_streams)}
        finally:
            release.set()
            _held(streams)


def test_what_is_kept_for_retries_is_reported_as_the_server_keeps_it(small: Running) -> None:
    """The request-id and answer retention reported are the request log's own settings (its
    behaviour at them: tests/test_retries.py)."""
    with gradwire.connect(f"127.0.0.1:{small.port}", timeout=30) as client:
        limits = client.server_info().limits
    kept = small.servicer.requests
    assert (
        limits.request_id_kept_s,
        limits.last_request_ids_kept,
        limits.max_request_ids_kept,
        limits.answer_bytes_kept,
    ) == (kept.keep_s, kept.size, kept.max_ids, kept.max_bytes)


def test_a_client_refused_busy_can_still_read_the_limit(small: Running) -> None:
    """GetServerInfo has the operator's place beyond the limit, as ListSessions: with every
    place held by open watches it was BUSY too (found by a review)."""
    with gradwire.connect(f"127.0.0.1:{small.port}", timeout=30) as client:
        watches = [client.watch(["loss"]) for _ in range(2)]
        for watch in watches:
            next(watch)
        with pytest.raises(errors.ResourceExhausted):
            client.list_tensors()
        assert client.server_info().limits.max_concurrent == 2
        for watch in watches:
            watch.close()


def test_durations_are_reported_as_grpc_keeps_them() -> None:
    """gRPC takes whole milliseconds, at least 1: a 0.4 ms keepalive is 1 ms, and clients'
    pings allowed every 0 s are allowed every 1 ms (found by a review)."""
    limits = _limits(connections=ServerConnections(keepalive_s=0.0004, min_client_ping_s=0.0))
    assert (limits.keepalive_s, limits.min_client_ping_s) == (0.001, 0.001)
    assert limits.keepalive_timeout_s == 20.0


def test_a_server_that_pings_needs_a_time_to_wait_for_the_answer() -> None:
    """A keepalive timeout of 0 with pings on: gRPC would close every connection at its
    first ping."""
    with pytest.raises(ValueError, match="keepalive_timeout_s must be more than 0"):
        ServerConnections(keepalive_s=60.0, keepalive_timeout_s=0.0)
    assert ServerConnections(keepalive_s=None, keepalive_timeout_s=0.0).keepalive_s is None


def test_durations_past_grpc_s_32_bits_are_reported_as_the_most_it_keeps() -> None:
    """gRPC's duration options are 32-bit milliseconds: a longer one is the longest, about
    24.8 days, not a number past an int32 handed to gRPC."""
    longest = MAX_GRPC_INT / 1000
    limits = _limits(connections=ServerConnections(keepalive_s=10**7, idle_s=10**8))
    assert (limits.keepalive_s, limits.connection_idle_s) == (longest, longest)


@pytest.mark.parametrize(
    ("setting", "value", "said"),
    [
        ("max_concurrent", 0, "max_concurrent must be from 1 to 4294967295, got 0"),
        ("max_concurrent", 2**32, "max_concurrent must be from 1 to 4294967295, got 4294967296"),
        ("max_sessions", -1, "max_sessions must be from 0 to 4294967295, got -1"),
        ("max_sessions", 2**32, "max_sessions must be from 0 to 4294967295, got 4294967296"),
    ],
)
def test_a_server_is_not_started_with_counts_its_info_cannot_hold(
    trainer: Trainer, setting: str, value: int, said: str
) -> None:
    """GetServerInfo's counts are uint32: a server set past them failed at start with
    protobuf's "Value out of range" (found by a review)."""
    with pytest.raises(ValueError, match=said):
        start(trainer, "127.0.0.1", 0, **{setting: value})


def test_a_server_is_started_with_counts_at_the_most_its_info_holds() -> None:
    assert _limits(max_sessions=2**32 - 1).max_sessions == 2**32 - 1


def test_a_server_started_without_an_element_limit_takes_2_to_the_28(
    client: gradwire.Client,
) -> None:
    """The .proto's documented default: a tensor has at most 2^28 elements (1 GiB of
    float32)."""
    assert client.server_info().limits.max_elements == 1 << 28


def test_a_client_whose_session_closed_may_still_ask(client: gradwire.Client) -> None:
    """GetServerInfo reads no session, as ListSessions."""
    mine = client.open_session(seed=0)
    mine.close()
    assert mine.server_info() == client.server_info()


def test_server_info_prints_the_contract_s_fields_it_knows_as_their_count(
    client: gradwire.Client,
) -> None:
    """A notebook shows `client.server_info()` by its repr: the versions, the device and the
    limits came first and then every field of the contract the server knows, some 300 names
    (12,000 characters) burying them (found by a review of the client as a researcher uses
    it in a notebook)."""
    info = client.server_info()
    shown = repr(info)
    assert len(info.known_fields) > 100
    assert shown == (
        f"ServerInfo(version={info.version!r}, torch_version={info.torch_version!r}, "
        f"device={info.device!r}, limits={info.limits!r}, "
        f"known_fields=<{len(info.known_fields)} names>, instance_id={info.instance_id!r})"
    )
    shown = repr(dataclasses.replace(info, known_fields=()))
    assert shown.endswith(f", known_fields=(), instance_id={info.instance_id!r})")
    assert "ForwardRequest.eval_mode" in info.known_fields  # the names are all there


def test_the_cli_says_no_instance_of_a_server_older_than_it(small: Running) -> None:
    """A server from before the instance id answers none: `gradwire info`'s first line ends
    with the device, as before, not with an instance of nothing."""
    small.servicer.info.instance_id = ""
    try:
        text = run_main("info", "--target", f"127.0.0.1:{small.port}")
    finally:
        small.servicer.info.instance_id = small.servicer.instance_id
    assert text.code == 0, text.err
    assert text.out.splitlines()[0].endswith(", models on cpu"), text.out


def test_the_cli_describes_the_server(small: Running) -> None:
    address = f"127.0.0.1:{small.port}"
    text = run_main("info", "--target", address)
    assert text.code == 0, text.err
    assert text.out.splitlines() == [
        f"gradwire {gradwire.__version__} with PyTorch {torch.__version__}, models on cpu, "
        f"instance {small.servicer.instance_id}",
        "message size     at most 67,108,864 bytes (64.0 MiB) each way",
        "tensor values    at most 67,043,328 bytes (63.9 MiB) in one message; larger ones stream,",
        "                 4,190,208 bytes (4.0 MiB) a chunk by default",
        "elements         at most 1,000 in a tensor sent or made",
        "dimensions       at most 64",
        "names            at most 256 characters",
        "histogram bins   at most 4,096",
        "steps per Train  at most 1,099,511,627,776",
        "request ids      at most 128 characters; a retry is matched to its "
        "first attempt while its id is",
        "                 kept: 600 s after its last use, or while among the "
        "last 1,024 (65,536 ids at most)",
        "retry answers    the latest 268,435,456 bytes (256.0 MiB) kept; a "
        "retry whose answer was let go is",
        "                 refused (ANSWER_NOT_KEPT), not applied again",
        "calls at once    2 (an open watch or stream holds one)",
        "batches          at most 1,024 calls in one Batch",
        "selectors        at most 1,024 in one watch or one step's fetch",
        "index chains     at most 64 indexes in one selector, x[0][1]..., one a bracket",
        "health watches   at most 64 open at once; past that, poll (gradwire health)",
        "reflection       at most 8 streams open at once (grpcurl, an IDE); one more is refused",
        "sessions         1 beside the default one; each closed after 42.5 s without calls",
        "keepalive        a ping after 7 s of silence, the connection closed "
        "when it goes unanswered for 3 s;",
        "                 a client may ping a quiet connection every 11 s at most, or it is closed",
        "connections      one without calls closed after 13 s (a client reconnects at its next "
        "call; an open",
        "                 watch or stream is a call); at most 5 open at once, one more closed "
        "as it opens",
        "                 (UNAVAILABLE)",
        CONTRACT,
    ]
    data = json.loads(run_main("info", "--target", address, "--json").out)
    assert (data["version"], data["torch_version"], data["device"]) == (
        gradwire.__version__,
        torch.__version__,
        "cpu",
    )
    assert data["limits"]["max_elements"] == 1000
    assert data["limits"]["session_idle_timeout_s"] == 42.5
    assert set(data["limits"]) == {f.name for f in pb.ServerLimits.DESCRIPTOR.fields}
    assert data["known_fields"] == known_fields()


def test_the_cli_describes_unusual_settings_plainly() -> None:
    """No pings, sessions that never expire, long and fractional durations: `:g` printed
    1234567 s as 1.23457e+06 (found by a review)."""

    def described(**settings: Any) -> list[str]:
        with running_server(**settings) as running:
            lines: list[str] = run_main(
                "info", "--target", f"127.0.0.1:{running.port}"
            ).out.splitlines()
            return lines[[line.startswith("sessions ") for line in lines].index(True) :]

    assert described(
        max_sessions=0,
        session_idle_s=float("inf"),
        connections=ServerConnections(
            keepalive_s=None, min_client_ping_s=0.25, idle_s=None, max_connections=0
        ),
    ) == [
        "sessions         0 beside the default one; none is closed for want of calls",
        "keepalive        no pings from the server; a client may ping a quiet "
        "connection every 0.25 s at",
        "                 most, or it is closed",
        "connections      one without calls stays open",
        CONTRACT,
    ]
    assert described(
        session_idle_s=1234567.0,
        connections=ServerConnections(keepalive_s=2147483.0, idle_s=1234567.0),
    ) == [
        "sessions         8 beside the default one; each closed after 1,234,567 s without calls",
        "keepalive        a ping after 2,147,483 s of silence, the connection "
        "closed when it goes unanswered",
        "                 for 20 s; a client may ping a quiet connection every "
        "30 s at most, or it is closed",
        "connections      one without calls closed after 1,234,567 s (a client reconnects at "
        "its next call;",
        "                 an open watch or stream is a call); at most 1,000 open at once, one "
        "more closed as",
        "                 it opens (UNAVAILABLE)",
        CONTRACT,
    ]


def test_the_cli_wraps_its_description_to_a_terminal_s_width(small: Running) -> None:
    """Rows ran to 168 characters; now none is wider than the CLI's columns, and a number
    stays on the line of its unit."""
    lines = run_main("info", "--target", f"127.0.0.1:{small.port}").out.splitlines()
    assert max(len(line) for line in lines[1:]) <= INFO_COLUMNS
    continued = [line.split()[0] for line in lines if line.startswith(" ")]
    assert continued and not any(word in ("s", "s;", "bytes", "MiB)") for word in continued)


def test_the_cli_leaves_out_what_an_older_server_does_not_report(small: Running) -> None:
    """A server from before the stream and retry limits were reported answers 0 for them:
    no row says "at most 0"."""
    older = pb.GetServerInfoResponse()
    older.CopyFrom(small.servicer.info)
    for name in (
        "max_health_watches",
        "max_reflection_streams",
        "request_id_kept_s",
        "last_request_ids_kept",
        "max_request_ids_kept",
        "answer_bytes_kept",
        "max_batch_calls",
        "max_selectors",
        "max_index_chain",
    ):
        older.limits.ClearField(name)
    answer = grpc.unary_unary_rpc_method_handler(lambda request, context: older.SerializeToString())
    handler = grpc.method_handlers_generic_handler("gradwire.v1.Trainer", {"GetServerInfo": answer})
    with bare_server(handler) as address:
        lines = run_main("info", "--target", address).out.splitlines()
    assert "request ids      at most 128 characters" in lines
    assert not any(
        line.startswith(
            ("retry answers", "health watches", "reflection", "batches", "index chains")
        )
        for line in lines
    )
    assert not any("at most 0 " in line or "0 ids" in line for line in lines)


def test_the_cli_says_a_server_that_lists_no_fields_may_predate_the_list(small: Running) -> None:
    """A server from before it listed the contract's fields it knows sends none: its
    contract row says so, and (its limits being of 2026-12-05) that the client sends it the
    options it would refuse an older one, words and dates unbroken at their hyphens."""
    older = pb.GetServerInfoResponse()
    older.CopyFrom(small.servicer.info)
    older.ClearField("known_fields")
    answer = grpc.unary_unary_rpc_method_handler(lambda request, context: older.SerializeToString())
    handler = grpc.method_handlers_generic_handler("gradwire.v1.Trainer", {"GetServerInfo": answer})
    with bare_server(handler) as address:
        lines = run_main("info", "--target", address).out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("contract "))
    assert [line[17:] for line in lines[at:]] == [
        "the fields of the .proto it knows unlisted: a server older than the list, and its",
        "limits show it is of 2026-12-05 or later (the client sends it forward --eval and",
        "optimizer --keep-state)",
    ]


def test_the_cli_never_wraps_a_size_between_its_number_and_mib(small: Running) -> None:
    """Sizes of 1,024 bytes put the row's wrap between "(0.0" and "MiB)": the two stay on
    one line, as a number and its bytes or s do."""
    sized = pb.GetServerInfoResponse()
    sized.CopyFrom(small.servicer.info)
    sized.limits.max_value_bytes = sized.limits.default_chunk_bytes = 1024
    answer = grpc.unary_unary_rpc_method_handler(lambda request, context: sized.SerializeToString())
    handler = grpc.method_handlers_generic_handler("gradwire.v1.Trainer", {"GetServerInfo": answer})
    with bare_server(handler) as address:
        lines = run_main("info", "--target", address).out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("tensor values "))
    assert lines[at : at + 2] == [
        "tensor values    at most 1,024 bytes (0.0 MiB) in one message; larger ones stream, "
        "1,024 bytes",
        "                 (0.0 MiB) a chunk by default",
    ]


def test_the_cli_says_a_server_without_get_server_info_cannot_describe_itself() -> None:
    """A server from before GetServerInfo answers UNIMPLEMENTED: here a bare gRPC server."""
    with bare_server() as address:
        result = run_main("info", "--target", address)
    assert result.code == 1
    assert result.err == (
        f"gradwire info: error: the server at {address} predates GetServerInfo and "
        "cannot describe itself: a newer gradwire serve can (gradwire list shows its model "
        "and device)\n"
    )
