"""A state version names a state only on the server instance that counted it: a server started
again counts afresh, from 0 or a checkpoint's version, and comes to numbers the last one gave,
of other states. A mutation expecting a version read before a restart is refused, not applied
to the other state (the carry item "version checks pass wrongly across a crash": a client read
4, the server was killed, restored at 3 and stepped to 4, and the client's conditional write
applied). Real servers on loopback, one stopped and another started on its port."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import status_pb2

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.fill import Fill
from gradwire.limits import EXPECTED_INSTANCE, EXPECTED_VERSION, REQUEST_ID
from gradwire_server import checkpoint
from gradwire_server.app import Running, start
from gradwire_server.trainer import Trainer
from tests.cli_run import run_main
from tests.relay import relay_to
from tests.serve_in_process import bare_server, old_trainer, running_server
from tests.test_metrics import calls, scrape

INPUT, TARGET = Fill.ones(2, 3, 10, 10), Fill.zeros(2, dtype="int64")
NAME = "linear.weight"


@contextmanager
def _restarts() -> Iterator[tuple[gradwire.Client, Callable[[], Running]]]:
    """A client of a server, and what stops that server and starts another on its port,
    fresh (version 0, as a server started again without a checkpoint), returned."""
    with contextlib.ExitStack() as servers:
        running = [servers.enter_context(running_server())]
        port = running[0].port

        def restart() -> Running:
            running[-1].stop(grace=None)
            running.append(servers.enter_context(running_server(port=port)))
            return running[-1]

        with gradwire.connect(f"127.0.0.1:{port}", timeout=30) as client:
            yield client, restart


def _at(running: Running, version: int) -> None:
    """Brings a fresh server's default session to `version`, by another client's steps."""
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as other:
        while other.list_tensors().version < version:
            other.zero_grad()
        assert other.list_tensors().version == version


def _value(running: Running) -> Any:
    with gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as other:
        return other.read(NAME).value


def test_a_server_names_its_instance_and_a_client_reads_it_before_its_first_call() -> None:
    with running_server() as first, running_server() as second:
        ids = [r.servicer.instance_id for r in (first, second)]
        assert all(re.fullmatch("[0-9a-f]{16}", i) for i in ids) and ids[0] != ids[1]
        with gradwire.connect(f"127.0.0.1:{first.port}") as client:
            assert client.instance_id is None  # nothing asked yet
            assert client.list_tensors().version == 0
            assert client.instance_id == ids[0]
            assert client.server_info().instance_id == ids[0]


def test_a_version_read_before_a_restart_is_refused_on_the_next_server_at_that_number() -> None:
    with _restarts() as (client, restart):
        client.zero_grad()
        client.zero_grad()
        read = client.read(NAME)
        assert read.version == 2
        before = client.instance_id
        after = restart()
        _at(after, read.version)  # the same number, another state
        kept = _value(after)
        with client.expecting(read.version), pytest.raises(errors.Aborted) as refused:
            client.set(NAME, np.full_like(read.value, 7.0))
        err = refused.value
        assert err.reason == "VERSION_MISMATCH"
        assert err.metadata == {"version": "2", "instance": after.servicer.instance_id}
        assert f"state version 2 of server instance {before}" in err.message
        assert f"this is server instance {after.servicer.instance_id}" in err.message
        assert "read the state again and retry" in err.message
        assert after.trainer.version == 2  # nothing was changed
        np.testing.assert_array_equal(_value(after), kept)
        # The client names the new instance from then on: read again, and the retry applies.
        assert client.instance_id == after.servicer.instance_id
        again = client.read(NAME)
        with client.expecting(again.version):
            assert client.set(NAME, np.full_like(read.value, 7.0)) == 3


def test_a_version_of_this_instance_still_applies_and_a_stale_one_is_refused_as_before() -> None:
    with running_server() as running, gradwire.connect(f"127.0.0.1:{running.port}") as client:
        version = client.list_tensors().version
        with client.expecting(version + 1), pytest.raises(errors.Aborted) as refused:
            client.zero_grad()
        assert refused.value.metadata == {"version": str(version)}  # no instance: the same one
        assert client.instance_id == running.servicer.instance_id  # still named, not dropped
        with client.expecting(version):
            assert client.zero_grad() == version + 1


def test_a_refusal_names_the_version_the_new_server_is_at_not_the_one_expected() -> None:
    with _restarts() as (client, restart):
        client.zero_grad()
        client.zero_grad()
        after = restart()
        _at(after, 5)
        with client.expecting(2), pytest.raises(errors.Aborted) as refused:
            client.zero_grad()
        assert refused.value.metadata == {"version": "5", "instance": after.servicer.instance_id}
        assert "(it is at 5)" in refused.value.message
        assert after.trainer.version == 5


@pytest.mark.parametrize("how", ["pipeline", "batch"])
def test_a_client_whose_first_call_is_a_pipeline_or_batch_reads_the_instance(how: str) -> None:
    """Pipelines and batches call the server other than through the client's unary calls:
    a client used through them alone names the instance too, as one reads it first."""
    with _restarts() as (client, restart):
        if how == "pipeline":
            with client.pipeline() as p:
                read = p.list_tensors()
        else:
            with client.batch() as b:
                read = b.list_tensors()
        version = read.result().version
        before = client.instance_id
        assert before is not None
        after = restart()
        _at(after, version)
        with (
            client.expecting(version),
            pytest.raises(errors.Aborted) as refused,
            client.pipeline() as p,
        ):
            p.zero_grad().result()
        assert refused.value.metadata["instance"] == after.servicer.instance_id
        assert after.trainer.version == version


@pytest.mark.parametrize("how", ["pipeline", "batch", "stream_calls", "train"])
def test_every_way_of_sending_a_mutation_names_the_instance(how: str) -> None:
    with _restarts() as (client, restart):
        client.stream_calls = how == "stream_calls"
        version, before = client.list_tensors().version, client.instance_id
        after = restart()
        _at(after, version)
        with client.expecting(version), pytest.raises(errors.Aborted) as refused:
            if how == "pipeline":
                with client.pipeline() as p:
                    p.zero_grad().result()
            elif how == "batch":
                with client.batch() as b:
                    pending = b.zero_grad()
                pending.result()
            elif how == "train":
                list(client.train(INPUT, TARGET, steps=2))
            else:
                client.zero_grad()
        assert refused.value.reason == "VERSION_MISMATCH"
        assert refused.value.metadata["instance"] == after.servicer.instance_id
        assert f"state version {version} of server instance {before}" in refused.value.message
        assert after.trainer.version == version


def test_a_version_read_by_another_client_names_its_instance() -> None:
    with _restarts() as (client, restart):
        version, instance = client.list_tensors().version, client.instance_id
        assert instance is not None
        after = restart()
        _at(after, version)
        with gradwire.connect(f"127.0.0.1:{after.port}") as fresh:
            # Read after the restart, this client knows only the new instance: the version
            # another client read before it is refused when it says whose it is.
            with fresh.expecting(version, instance=instance), pytest.raises(errors.Aborted):
                fresh.zero_grad()
            with fresh.expecting(version, instance=after.servicer.instance_id):
                assert fresh.zero_grad() == version + 1


@pytest.mark.parametrize("instance", ["", "0123", "0123456789ABCDEF", "x" * 16, 16])
def test_expecting_refuses_what_is_no_instance_id(instance: Any) -> None:
    client = gradwire.Client("127.0.0.1:1")
    with (
        pytest.raises(ValueError, match="16 lowercase hex digits"),
        client.expecting(0, instance=instance),
    ):
        pass
    client.close()


def _raw(running: Running) -> tuple[grpc.Channel, pb_grpc.TrainerStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return channel, pb_grpc.TrainerStub(channel)


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def test_the_metadata_as_another_language_sends_it() -> None:
    with running_server() as running:
        channel, stub = _raw(running)
        mine = stub.GetServerInfo(pb.GetServerInfoRequest()).instance_id
        assert mine == running.servicer.instance_id
        other = "0" * 16 if mine != "0" * 16 else "1" * 16
        step = pb.ZeroGradRequest()
        # The instance alone is a condition too; and the right one with the right version.
        alone = _refused(lambda: stub.ZeroGrad(step, metadata=[(EXPECTED_INSTANCE, other)]))
        assert alone.code() == grpc.StatusCode.ABORTED
        assert f"expected server instance {other}, but this is server instance {mine}" in (
            alone.details() or ""
        )
        answer = stub.ZeroGrad(step, metadata=[(EXPECTED_INSTANCE, mine), (EXPECTED_VERSION, "0")])
        assert answer.version == 1
        assert stub.ZeroGrad(step, metadata=[(EXPECTED_INSTANCE, "")]).version == 2  # none
        for bad in ("0123", mine.upper(), mine + "0", " " + mine[1:]):
            given = [(EXPECTED_INSTANCE, bad)]
            err = _refused(lambda given=given: stub.ZeroGrad(step, metadata=given))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "16 lowercase hex digits" in (err.details() or "")
        twice = [(EXPECTED_INSTANCE, mine), (EXPECTED_INSTANCE, mine)]
        err = _refused(lambda: stub.ZeroGrad(step, metadata=twice))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "given 2 times" in (err.details() or "")
        # Reads take no condition, as they take no expected version.
        assert stub.ListTensors(pb.ListTensorsRequest(), metadata=[(EXPECTED_INSTANCE, other)])
        # A refused attempt is not kept: its retry with the right instance applies.
        once = [(REQUEST_ID, "r1")]
        err = _refused(lambda: stub.ZeroGrad(step, metadata=[*once, (EXPECTED_INSTANCE, other)]))
        assert err.code() == grpc.StatusCode.ABORTED
        assert stub.ZeroGrad(step, metadata=[*once, (EXPECTED_INSTANCE, mine)]).version == 3
        assert running.trainer.version == 3
        channel.close()


def _answers(stub: pb_grpc.TrainerStub, *requests: pb.CallRequest, **kw: Any) -> list[Any]:
    return list(stub.Calls(iter(requests), **kw))


def test_the_calls_stream_and_batch_fields_as_another_language_sends_them() -> None:
    with running_server() as running:
        channel, stub = _raw(running)
        mine = running.servicer.instance_id
        other = "0" * 16 if mine != "0" * 16 else "1" * 16
        step = pb.ZeroGradRequest()
        wrong = pb.CallRequest(zero_grad=step, expected_instance=other)
        right = pb.CallRequest(zero_grad=step, expected_instance=mine, expected_version=0)
        bad = pb.CallRequest(zero_grad=step, expected_instance="nope")
        read = pb.CallRequest(list_tensors=pb.ListTensorsRequest(), expected_instance=other)
        first, second, third, fourth = _answers(stub, wrong, right, bad, read)
        assert first.WhichOneof("result") == "error"
        assert b"VERSION_MISMATCH" in first.error and other.encode() in first.error
        assert second.zero_grad.version == 1
        assert third.WhichOneof("result") == "error" and b"BAD_METADATA" in third.error
        assert fourth.WhichOneof("result") == "list_tensors"
        right.expected_version = 1
        batch = stub.Batch(pb.BatchRequest(calls=[wrong, right]))
        assert batch.answers[0].WhichOneof("result") == "error"
        assert batch.answers[1].zero_grad.version == 2
        # On a stream or batch, each call carries its own: the metadata may not.
        for call in (
            lambda: _answers(stub, right, metadata=[(EXPECTED_INSTANCE, mine)]),
            lambda: stub.Batch(
                pb.BatchRequest(calls=[right]), metadata=[(EXPECTED_INSTANCE, mine)]
            ),
        ):
            err = _refused(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "CallRequest.expected_instance" in (err.details() or "")
        assert running.trainer.version == 2
        channel.close()


def test_an_empty_instance_on_a_streams_or_batchs_metadata_is_none_as_on_a_unary_call() -> None:
    """An empty gradwire-expected-instance is no condition on a unary call: a client that sends
    the header always, empty before it has read the instance, had every Calls stream and Batch
    refused BAD_METADATA, where an empty request id there is none (found by a review of the
    instance id as an integrator in another language meets it)."""
    with running_server() as running:
        channel, stub = _raw(running)
        empty = [(EXPECTED_INSTANCE, "")]
        assert stub.ZeroGrad(pb.ZeroGradRequest(), metadata=empty).version == 1
        step = pb.CallRequest(zero_grad=pb.ZeroGradRequest())
        [answer] = _answers(stub, step, metadata=empty)
        assert answer.zero_grad.version == 2
        batch = stub.Batch(pb.BatchRequest(calls=[step]), metadata=empty)
        assert batch.answers[0].zero_grad.version == 3
        channel.close()


def test_a_calls_bad_expected_instance_is_named_by_its_field() -> None:
    """A CallRequest whose expected_instance is no instance id is refused naming the field it
    sent, as its request_id and expected_version are, not the metadata key it never sent
    (found by a review of the instance id as an integrator in another language meets it)."""
    with running_server() as running:
        channel, stub = _raw(running)
        bad = pb.CallRequest(zero_grad=pb.ZeroGradRequest(), expected_instance="nope")
        [answer] = _answers(stub, bad)
        status = status_pb2.Status.FromString(answer.error)
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert status.message.startswith("expected_instance must be"), status.message
        assert EXPECTED_INSTANCE not in status.message
        batch = stub.Batch(pb.BatchRequest(calls=[bad]))
        status = status_pb2.Status.FromString(batch.answers[0].error)
        assert status.message.startswith("expected_instance must be"), status.message
        assert running.trainer.version == 0
        channel.close()


class _Asked(grpc.GenericRpcHandler):
    """Records the methods called, leaving each to the handlers after it."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def service(self, details: grpc.HandlerCallDetails) -> None:
        self.methods.append(details.method.rsplit("/", 1)[-1])


def test_a_server_older_than_the_instance_is_sent_none() -> None:
    seen: list[list[str]] = []

    def zero_grad(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append([key for key, _ in context.invocation_metadata()])
        return pb.ZeroGradResponse(version=1).SerializeToString()

    def info(request: bytes, context: grpc.ServicerContext) -> bytes:
        return pb.GetServerInfoResponse(version="0.1.0").SerializeToString()  # no instance

    unary = grpc.unary_unary_rpc_method_handler
    for methods in (
        {"ZeroGrad": unary(zero_grad), "GetServerInfo": unary(info)},
        {"ZeroGrad": unary(zero_grad)},  # older than GetServerInfo too
    ):
        seen.clear()
        asked = _Asked()
        with (
            bare_server(asked, old_trainer(0, **methods)) as address,
            gradwire.connect(address) as client,
        ):
            with client.expecting(0):
                client.zero_grad()
                client.zero_grad()
            assert client.instance_id is None
        assert len(seen) == 2
        # Asked once: an answer without the id, or UNIMPLEMENTED, is not asked again.
        assert asked.methods == ["GetServerInfo", "ZeroGrad", "ZeroGrad"]
        assert all(EXPECTED_VERSION in keys and EXPECTED_INSTANCE not in keys for keys in seen)


def test_a_first_call_that_fails_fails_as_it_did_and_the_next_reads_the_instance() -> None:
    with running_server() as running:
        port = running.port
    # Nothing listens: the call's own error, the instance left to the next call.
    with gradwire.connect(f"127.0.0.1:{port}", timeout=2) as client:
        client.retries = 0
        with pytest.raises(errors.Unavailable) as raised:
            client.zero_grad()
        assert "Connection refused" in str(raised.value)
        assert client.instance_id is None
        client.retries = 5  # the channel backs off after a refused connection
        with running_server(port=port) as again:
            assert client.zero_grad() == 1
            assert client.instance_id == again.servicer.instance_id


def test_an_instance_the_server_fails_to_give_is_asked_once_a_call() -> None:
    """A GetServerInfo that fails (not UNIMPLEMENTED) is asked again before the next call,
    once, the call going on without it."""

    def info(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.INTERNAL, "no info")

    def zero_grad(request: bytes, context: grpc.ServicerContext) -> bytes:
        return pb.ZeroGradResponse(version=1).SerializeToString()

    unary = grpc.unary_unary_rpc_method_handler
    asked = _Asked()
    methods = {"ZeroGrad": unary(zero_grad), "GetServerInfo": unary(info)}
    with bare_server(asked, old_trainer(0, **methods)) as address, gradwire.connect(address) as c:
        c.zero_grad()
        c.zero_grad()
        assert c.instance_id is None
    assert asked.methods == ["GetServerInfo", "ZeroGrad"] * 2


def test_the_crash_restored_from_a_checkpoint_at_3_and_stepped_to_4(tmp_path: Path) -> None:
    """The case as it was found: a client read 4, the server was killed, restarted from its
    checkpoint of version 3, and another client's step took it to 4."""
    with contextlib.ExitStack() as servers:
        first = servers.enter_context(running_server(state_dir=tmp_path))
        client = servers.enter_context(gradwire.connect(f"127.0.0.1:{first.port}", timeout=30))
        for _ in range(3):
            client.zero_grad()
        assert client.save_checkpoint("at3").version == 3
        client.zero_grad()
        read = client.read(NAME)
        assert read.version == 4
        first.stop(grace=None)
        restored = Trainer(seed=0)
        assert restored.load(checkpoint.path_for(tmp_path, "at3")) == 3  # as serve's start
        second = servers.enter_context(_started(restored, first.port, tmp_path))
        _at(second, 4)
        with client.expecting(read.version), pytest.raises(errors.Aborted) as refused:
            client.set(NAME, np.zeros_like(read.value))
        assert refused.value.metadata["instance"] == second.servicer.instance_id
        assert second.trainer.version == 4


@contextmanager
def _started(trainer: Trainer, port: int, state_dir: Path) -> Iterator[Running]:
    running = start(trainer, "127.0.0.1", port, state_dir=state_dir)
    try:
        yield running
    finally:
        running.stop(grace=None)


def test_a_first_call_to_a_server_that_never_answers_takes_its_timeout_once() -> None:
    """Its instance is read within the call's timeout, which the call does not then wait
    out again: DEADLINE_EXCEEDED for the call, nothing sent."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        with gradwire.connect(f"127.0.0.1:{mute.getsockname()[1]}", timeout=0.5) as client:
            began = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded) as raised:
                client.step()
            took = time.monotonic() - began
        assert not raised.value.changes_state
        said = str(raised.value)
        assert "no answer within 0.5 s, the call's timeout" in said and "applied" not in said
        assert took < 0.9, took  # one timeout, not two
        assert client.instance_id is None


_INFO = "/gradwire.v1.Trainer/GetServerInfo"


def test_a_client_reads_the_instance_once_and_the_command_line_not_at_all() -> None:
    """One GetServerInfo before a client's first call, none after; the CLI, which makes no
    conditional mutation, makes none (a call more per command, in the server's log and
    counts), but for `replay`, which does."""
    with running_server(metrics_port=0) as running:
        address = f"127.0.0.1:{running.port}"
        with gradwire.connect(address) as client:
            for _ in range(3):
                client.zero_grad()
                client.read(NAME)
        assert calls(scrape(running), _INFO, "OK") == 1
        with gradwire.connect(address) as client:  # its first call the one that reads it
            assert client.server_info().instance_id == running.servicer.instance_id
            client.zero_grad()
        assert calls(scrape(running), _INFO, "OK") == 2
        assert run_main("list", "--target", address).code == 0
        assert run_main("zero-grad", "--target", address).code == 0
        assert calls(scrape(running), _INFO, "OK") == 2
        assert run_main("replay", "--target", address).code == 0
        assert calls(scrape(running), _INFO, "OK") == 3


@pytest.mark.parametrize("first", ["watch", "streamed read"])
def test_a_client_whose_first_call_is_a_stream_reads_the_instance(first: str) -> None:
    """A Watch or a GetTensorStream as a client's first call reads the instance before it,
    as a unary call does: the versions they carry are then of a known instance."""
    with running_server() as running, gradwire.connect(f"127.0.0.1:{running.port}") as client:
        if first == "watch":
            watch = client.watch([NAME])
            assert next(watch).version == 0
            watch.close()
        else:
            assert client.read(NAME, progress=lambda done, total: None).version == 0
        assert client.instance_id == running.servicer.instance_id


def test_a_first_call_whose_instance_read_was_cut_off_notes_the_server_was_reached() -> None:
    """The read of the instance is a call to the server: cut off in progress (a server
    killed mid-call, its port refusing after), it tells `reached`, as the call would have,
    that a server was there (the CLI's hints tell a server gone from one never reached)."""
    with (
        running_server() as running,
        relay_to(running.port) as relay,
        gradwire.connect(relay.address) as client,
    ):
        client.retries = 0
        relay.lose_next_answer(then_refuse=True)
        with pytest.raises(errors.Unavailable):
            client.list_tensors()
        assert relay.answers_lost == 1
        assert client.reached and not client.answered
        assert client.instance_id is None
