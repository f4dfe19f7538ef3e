"""Clients and servers of different versions: a newer client's options that an older server
would ignore, and calls newer than the server (found by a review of clients and servers of
different versions, run against the project's own older commits). The older servers here are
the real server with what it tells of itself cut back to what an older one told, or a bare
gRPC server answering as an older one did; the refusals are the client's, made before
anything is sent, so the version never moves."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire.fill import Fill
from gradwire_server.app import Running
from tests.cli_run import run_main
from tests.serve_in_process import bare_server, old_trainer, running_server

INPUT, TARGET = Fill.ones(2, 3, 10, 10), Fill.zeros(2, dtype="int64")


@pytest.fixture
def older() -> Iterator[Running]:
    """A real server; each test cuts its known_fields back to an older server's."""
    with running_server() as running:
        yield running


def _knowing(running: Running, *without: str, limits_of_12_05: bool = False) -> str:
    """`running` telling of itself what a server older than the fields `without` told
    (none: older than the list itself; and, unless `limits_of_12_05`, older than the
    limits added on 2026-12-05, connection_idle_s and max_connections); its address."""
    info = running.servicer.info
    kept = [f for f in info.known_fields if f not in without] if without else []
    del info.known_fields[:]
    info.known_fields.extend(kept)
    if not without and not limits_of_12_05:
        info.limits.ClearField("connection_idle_s")
        info.limits.ClearField("max_connections")
    return f"127.0.0.1:{running.port}"


def test_a_server_lists_every_field_of_the_contract_it_knows(address: str) -> None:
    with gradwire.connect(address) as client:
        known = client.server_info().known_fields
    for field in (
        "ForwardRequest.eval_mode",
        "ForwardChunk.eval_mode",
        "SetOptimizerRequest.keep_state",
        "TrainRequest.stop_at_nonfinite",
        "CallRequest.delete_checkpoint",
        "GetServerInfoResponse.known_fields",
        "Tensor.float_values",
    ):
        assert field in known, field
    assert len(known) == len(set(known))
    for message in (pb.ForwardRequest, pb.CallRequest, pb.ServerLimits):
        for field in message.DESCRIPTOR.fields:
            assert f"{message.DESCRIPTOR.name}.{field.name}" in known


def test_eval_mode_is_refused_where_the_server_does_not_know_it(older: Running) -> None:
    """A server from before eval_mode ran an eval_mode Forward in training mode, its loss
    the training mode's (a BatchNorm model: 1.664 where evaluation gives 1.549)."""
    address = _knowing(older, "ForwardRequest.eval_mode", "ForwardChunk.eval_mode")
    with gradwire.connect(address) as client:
        with pytest.raises(errors.Unimplemented) as refused:
            client.forward(INPUT, TARGET, eval_mode=True)
        assert refused.value.reason == "FIELD_NOT_KNOWN"
        assert refused.value.metadata == {"field": "ForwardRequest.eval_mode"}
        assert str(refused.value) == (
            f"UNIMPLEMENTED: the server at {address} does not know ForwardRequest.eval_mode, "
            "which eval_mode=True needs: a server older than the field ignores it and runs "
            "the model in training mode (Dropout on, BatchNorm's statistics moved); not "
            "sent. A newer gradwire serve takes it"
        )
        # The streamed Forward's field too, and in a pipeline.
        client.stream_above_bytes = 1024
        with pytest.raises(errors.Unimplemented, match=r"ForwardChunk\.eval_mode"):
            client.forward(np.ones((8, 3, 10, 10), np.float32), TARGET, eval_mode=True)
        with (
            pytest.raises(errors.Unimplemented, match=r"ForwardRequest\.eval_mode"),
            client.pipeline() as pipe,
        ):
            pipe.forward(INPUT, TARGET, eval_mode=True)
        assert client.list_tensors().version == 0  # nothing was sent
        assert client.forward(INPUT, TARGET).version == 1  # training mode: known to all


def test_keep_state_is_refused_where_the_server_does_not_know_it(older: Running) -> None:
    """A server from before keep_state replaced the optimizer with a fresh SGD (momentum 0,
    Adam's moments gone) and the CLI said "its state kept"."""
    address = _knowing(older, "SetOptimizerRequest.keep_state")
    with gradwire.connect(address) as client:
        client.set_optimizer("sgd", lr=0.5, momentum=0.9)
        with pytest.raises(errors.Unimplemented, match=r"SetOptimizerRequest\.keep_state") as got:
            client.set_optimizer(lr=0.05, keep_state=True)
        assert "replaces the optimizer with a new one, its state lost" in str(got.value)
        with (
            pytest.raises(errors.Unimplemented, match="keep_state"),
            client.pipeline() as pipe,
        ):
            pipe.set_optimizer(lr=0.05, keep_state=True)
        optimizer = client.list_tensors().optimizer
        assert (optimizer.lr, optimizer.momentum) == (0.5, 0.9)
    result = run_main("optimizer", "--keep-state", "--lr", "0.05", "--target", address)
    assert result.code == 1 and result.out == ""
    assert result.err.startswith(
        f"error: UNIMPLEMENTED: the server at {address} does not know "
        "SetOptimizerRequest.keep_state, which keep_state=True needs"
    )


def test_a_server_listing_no_fields_may_predate_any_and_is_refused_them(
    older: Running,
) -> None:
    """A server older than the list (or than GetServerInfo) may predate eval_mode."""
    address = _knowing(older)
    with gradwire.connect(address) as client:
        assert client.server_info().known_fields == ()
        with pytest.raises(errors.Unimplemented) as refused:
            client.forward(INPUT, TARGET, eval_mode=True)
        assert f"the server at {address} lists no fields it knows" in str(refused.value)
        assert client.list_tensors().version == 0
    with (
        bare_server(old_trainer()) as bare,
        gradwire.connect(bare) as client,
        pytest.raises(errors.Unimplemented, match="lists no fields it knows"),
    ):
        client.set_optimizer(lr=0.1, keep_state=True)
    described = " ".join(run_main("info", "--target", address).out.split())
    assert (
        "contract the fields of the .proto it knows unlisted: a server older than the list, "
        "its limits older than 2026-12-05 too (the client refuses it forward --eval and "
        "optimizer --keep-state, which it may predate)"
    ) in described, described


def test_a_server_listing_no_fields_but_reporting_the_limits_of_12_05_knows_them(
    older: Running,
) -> None:
    """Servers from before the list (2026-12-06) were all refused eval_mode and keep_state,
    those that take them included (2026-12-03 on): one reporting a limit added after both
    (connection_idle_s, max_connections: 2026-12-05) knows them (a review of the change)."""
    address = _knowing(older, limits_of_12_05=True)
    with gradwire.connect(address) as client:
        assert client.server_info().known_fields == ()
        assert client.forward(INPUT, TARGET, eval_mode=True).version == 1
        assert client.set_optimizer(lr=0.05, keep_state=True).lr == 0.05
    with gradwire.connect(address) as client:  # asked first, before server_info
        client.forward(INPUT, TARGET, eval_mode=True)
    # gradwire info says which: it said "the client refuses it forward --eval and optimizer
    # --keep-state unless its limits show it is of 2026-12-05 or later" of a server of
    # 2026-12-05 it sends them to, leaving the reader to find out (a review running this
    # CLI against that server).
    described = " ".join(run_main("info", "--target", address).out.split())
    assert (
        "contract the fields of the .proto it knows unlisted: a server older than the list, "
        "and its limits show it is of 2026-12-05 or later (the client sends it forward --eval "
        "and optimizer --keep-state)"
    ) in described, described
    # Either limit tells: one whose connections never idle out (0) but are limited in
    # number, and one the other way round.
    limits = older.servicer.info.limits
    reported = limits.connection_idle_s, limits.max_connections
    assert all(reported)
    for idle_s, most in ((0.0, reported[1]), (reported[0], 0)):
        limits.connection_idle_s, limits.max_connections = idle_s, most
        with gradwire.connect(address) as client:
            client.forward(INPUT, TARGET, eval_mode=True)


def test_a_bad_argument_is_refused_before_the_fields_are_asked(older: Running) -> None:
    address = _knowing(older)
    with gradwire.connect(address) as client:
        with pytest.raises(ValueError, match="input"):
            client.forward(None, eval_mode=True)
        with pytest.raises(ValueError, match="rmsprop"):
            client.set_optimizer("rmsprop", keep_state=True)  # type: ignore[arg-type]
        assert client._known_fields is None  # no call made


def test_a_failure_to_ask_the_fields_is_raised_and_they_are_asked_again() -> None:
    """Only UNIMPLEMENTED (a server older than GetServerInfo) counts as no fields known: a
    GetServerInfo that failed otherwise (the server restarting) raises its own error, and
    the next option that needs a field asks again."""
    asked: list[int] = []

    def restarting(request: bytes, context: grpc.ServicerContext) -> bytes:
        asked.append(1)
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    older = old_trainer(GetServerInfo=grpc.unary_unary_rpc_method_handler(restarting))
    with bare_server(older) as address, gradwire.connect(address, timeout=10) as client:
        client.retries = 0
        for _ in range(2):
            with pytest.raises(errors.Unavailable, match="restarting"):
                client.forward(INPUT, TARGET, eval_mode=True)
        assert client._known_fields is None and len(asked) == 2


def test_the_fields_a_server_knows_are_asked_once(address: str) -> None:
    with gradwire.connect(address) as client:
        client.forward(INPUT, TARGET, eval_mode=True)
        known = client._known_fields
        assert known is not None and "ForwardRequest.eval_mode" in known
        client.forward(INPUT, TARGET, eval_mode=True)
        assert client._known_fields is known  # not read again


#: The calls _no_such_call has refused.
_refused_on_stream: list[int] = []


def _no_such_call(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """A Calls stream as a server older than a call answered it: not run, BAD_REQUEST."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="BAD_REQUEST", domain="gradwire.dev"))
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="the CallRequest names no call this server knows: set one of its call "
        "fields (forward, step, get_tensor, ...)",
        details=[detail],
    )
    for _ in requests:
        _refused_on_stream.append(1)
        yield pb.CallResponse(error=status.SerializeToString()).SerializeToString()


def test_a_call_newer_than_a_server_s_calls_stream_goes_as_a_call_of_its_own() -> None:
    """On a stream, a DeleteCheckpoint a server from before it did not know was refused
    INVALID_ARGUMENT, where the call of its own says UNIMPLEMENTED, which the CLI turns
    into "predates DeleteCheckpoint"."""
    calls = grpc.stream_stream_rpc_method_handler(_no_such_call)
    with (
        bare_server(old_trainer(Calls=calls)) as address,
        gradwire.connect(address, stream_calls=True) as client,
    ):
        with pytest.raises(errors.Unimplemented):
            client.delete_checkpoint("a1")
        assert client._not_on_stream == {"DeleteCheckpoint"}
        refused = len(_refused_on_stream)
        with pytest.raises(errors.Unimplemented):  # unary at once from now on
            client.delete_checkpoint("a1")
        assert len(_refused_on_stream) == refused  # not tried on the stream again
    for command, rpc in (("save", "SaveCheckpoint"), ("load", "LoadCheckpoint")):
        with bare_server(old_trainer()) as address:
            result = run_main(command, "a1", "--target", address)
        assert result.code == 1
        assert result.err.startswith(
            f"gradwire {command}: error: the server at {address} predates {rpc} and cannot "
        ), result.err


def test_a_call_the_server_lacks_says_the_server_may_predate_it() -> None:
    """gRPC's "Method not found!" alone was what save_checkpoint, load_checkpoint,
    list_checkpoints and delete_checkpoint raised against a server older than them, where the
    CLI says "predates" (found by a review of clients and servers of different versions)."""
    with bare_server(old_trainer()) as address, gradwire.connect(address) as client:
        for call, rpc in (
            (lambda: client.save_checkpoint("a1"), "SaveCheckpoint"),
            (lambda: client.load_checkpoint("a1"), "LoadCheckpoint"),
            (client.list_checkpoints, "ListCheckpoints"),
            (lambda: client.delete_checkpoint("a1"), "DeleteCheckpoint"),
        ):
            with pytest.raises(errors.Unimplemented) as lacking:
                call()
            assert lacking.value.message.startswith(
                f"the server has no {rpc} RPC: it predates this client's gradwire (a newer "
                "gradwire serve has it"
            ), lacking.value
            assert lacking.value.message.endswith("(gRPC: 'Method not found!')")
            assert lacking.value.args == (lacking.value.message,)  # repr() says it too
        # The health check is no call of the client's own: gRPC's words as they were, not a
        # call named None (a server other than gradwire's may have no health service).
        with pytest.raises(errors.Unimplemented) as no_health:
            client.health()
        assert str(no_health.value) == "UNIMPLEMENTED: Method not found!"


def _no_such_call_in_a_batch(request: bytes, context: grpc.ServicerContext) -> bytes:
    """A Batch as a server older than a call answered it: each call refused as
    _no_such_call refuses it on the stream."""
    calls = pb.BatchRequest.FromString(request).calls
    refusals = _no_such_call(iter([b""] * len(calls)), context)
    answers = [pb.CallResponse.FromString(answer) for answer in refusals]
    return pb.BatchResponse(answers=answers).SerializeToString()


@pytest.mark.parametrize("kind", ["pipeline", "batch"])
def test_a_call_newer_than_a_server_s_stream_in_a_pipeline_or_batch_says_so(kind: str) -> None:
    """A pipeline's or a batch's DeleteCheckpoint (they carry it since 2026-12-07) on a
    server of 2026-12-03, which had Calls and Batch but not DeleteCheckpoint, was refused
    INVALID_ARGUMENT "the CallRequest names no call this server knows: set one of its call
    fields", which the call had set (a review running this client against that server)."""
    handlers = old_trainer(
        Calls=grpc.stream_stream_rpc_method_handler(_no_such_call),
        Batch=grpc.unary_unary_rpc_method_handler(_no_such_call_in_a_batch),
    )
    with (
        bare_server(handlers) as address,
        gradwire.connect(address) as client,
        pytest.raises(errors.Unimplemented) as refused,
        getattr(client, kind)() as calls,
    ):
        calls.delete_checkpoint("a1")
    assert str(refused.value) == (
        f"UNIMPLEMENTED: the server at {address} predates DeleteCheckpoint in a {kind} (on its "
        "Calls stream and in a Batch), and did not run it: make it as a call of its own, "
        "client.delete_checkpoint(...), outside the " + kind + "; a server that has the "
        "DeleteCheckpoint RPC runs it, an older one answers UNIMPLEMENTED"
    )
    assert refused.value.reason == "CALL_NOT_KNOWN"
    assert refused.value.metadata == {"call": "DeleteCheckpoint"}
    assert not refused.value.changes_state


def test_train_says_when_an_older_server_ran_past_the_progress_it_was_stopped_at() -> None:
    """A server from before stop_at_nonfinite runs on until the client's stop reaches it:
    "steps" counts the reported alone, and the hint said "the run stopped there" of a run
    that went on (8 steps counted, about 10 applied, in a review of clients and servers of
    different versions). Here it ran 2 steps past its progress at step 10 (version 40)."""

    def train(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for step, loss in ((5, 2.5), (10, math.nan), (15, math.nan)):
            progress = pb.TrainProgress(step=step, steps=15, loss=loss, version=step * 4)
            yield progress.SerializeToString()

    handler = old_trainer(48, Train=grpc.unary_stream_rpc_method_handler(train))
    with bare_server(handler) as address:
        argv = ("train", "--steps", "15", "--every", "5", "--server-side", "--target", address)
        text = run_main(*argv).out
        data = json.loads(run_main(*argv, "--json").out)
    assert (data["steps"], data["ran_on"], data["version"]) == (10, True, 48)
    assert "10 steps reported (the server may have run more" in text
    assert "the run was stopped once step 10's progress showed it, the server running on" in text
    assert "the run stopped there" not in text


def _listing_of_a_newer_server(request: bytes, context: grpc.ServicerContext) -> bytes:
    """A listing naming a tensor kind and dtypes added after this client was made (an
    enum's value it has no name for)."""
    response = pb.ListTensorsResponse(version=1, input_dtype=99)
    response.tensors.add(name="w", kind=99, dtype=99, present=True)
    return response.SerializeToString()


def test_a_listing_of_a_kind_or_dtype_newer_than_the_client_says_unknown() -> None:
    """Not a blank, nor a failure to read the listing: a newer server may add either."""
    handler = grpc.unary_unary_rpc_method_handler(_listing_of_a_newer_server)
    with bare_server(old_trainer(ListTensors=handler)) as address, gradwire.connect(address) as c:
        listing = c.list_tensors()
    (w,) = listing.tensors
    assert (w.name, w.kind, w.dtype, w.present) == ("w", "unknown", "unknown", True)
    assert listing.input_dtype == "unknown"


def _listing_without_requires_grad(request: bytes, context: grpc.ServicerContext) -> bytes:
    """A listing of a parameter whose requires_grad is unset, as a server from before the
    field sends it, and of a frozen one."""
    response = pb.ListTensorsResponse(version=3)
    response.tensors.add(name="w", kind=pb.TENSOR_KIND_PARAMETER, present=True)
    response.tensors.add(name="frozen", kind=pb.TENSOR_KIND_PARAMETER, requires_grad=False)
    return response.SerializeToString()


def test_a_listing_from_a_server_older_than_requires_grad_says_none() -> None:
    """TensorInfo.requires_grad is optional: a server from before it sets none, which the
    listing tells as None, unknown, not as False (a frozen parameter's)."""
    handler = grpc.unary_unary_rpc_method_handler(_listing_without_requires_grad)
    with bare_server(old_trainer(ListTensors=handler)) as address, gradwire.connect(address) as c:
        w, frozen = c.list_tensors().tensors
    assert (w.name, w.requires_grad) == ("w", None)
    assert (frozen.name, frozen.requires_grad) == ("frozen", False)


def test_list_of_a_server_older_than_requires_grad_calls_no_parameter_frozen() -> None:
    """`gradwire list` marks a parameter frozen where the server says requires_grad is
    false, and not where a server from before the field says nothing."""
    handler = grpc.unary_unary_rpc_method_handler(_listing_without_requires_grad)
    with bare_server(old_trainer(ListTensors=handler)) as address:
        result = run_main("list", "--target", address)
    assert result.code == 0, result.err
    rows = {line.split()[0]: line for line in result.out.splitlines() if line.startswith("  ")}
    assert "parameter (frozen)" not in rows["w"] and "parameter" in rows["w"], rows
    assert "parameter (frozen)" in rows["frozen"], rows
