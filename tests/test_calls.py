"""The Calls stream: unary calls as messages on one open stream, answered in order.

Each call on the stream must do what its unary call does (the same state, the same answers,
the same errors with their ErrorInfo), and the stream must outlive a call's error. Checked
through a real server on loopback: with the Python client (`stream_calls=True`), whose unary
methods are made to fail so that nothing goes around the stream unseen, and with raw
CallRequests, as a client in another language writes them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

import gradwire
from gradwire import call_stream, calls, errors, limits, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire.call_stream import CallStream, Spent
from gradwire.fill import Fill
from gradwire.replay import replay
from gradwire_server.app import Running, start
from gradwire_server.errors import Stopping
from gradwire_server.message_context import MessageContext
from gradwire_server.models import ModelSpec
from gradwire_server.servicer import SERVICE, TrainerServicer, method_handlers
from gradwire_server.sessions import UnknownSession
from gradwire_server.trainer import Trainer
from gradwire_server.waiting import WaitingStreams
from tests.background import eventually
from tests.reference import run_tutorial
from tests.serve_in_process import bare_server, calls_only, ended_contexts, running_server
from tests.test_concurrency import Gate, hold_forward
from tests.test_metrics import TRAINER, scrape
from tests.test_metrics import calls as counted

CALLS = "/gradwire.v1.Trainer/Calls"
ONES = Fill.ones(8, 3, 10, 10)
TARGET = np.ones(8, dtype=np.int64)


def _unary_refused(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a call that the Calls stream carries went as a call of its own")


def streaming(address: str, **options: Any) -> gradwire.Client:
    """A client whose calls on its session can only go on its Calls stream."""
    client = gradwire.connect(address, stream_calls=True, **options)
    client._methods = {
        name: _unary_refused if name in calls.METHODS else method
        for name, method in client._methods.items()
    }
    return client


@pytest.fixture
def streamed(address: str) -> Iterator[gradwire.Client]:
    with streaming(address, timeout=30) as client:
        yield client


class Raw:
    """A Calls stream written by hand, as from the .proto alone."""

    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.responses = channel.stream_stream(CALLS)(
            iter(self._requests.get, None), metadata=metadata, timeout=60
        )

    def send(self, data: bytes) -> pb.CallResponse:
        self._requests.put(data)
        return pb.CallResponse.FromString(next(self.responses))

    def call(self, request: pb.CallRequest) -> pb.CallResponse:
        return self.send(request.SerializeToString())

    def close(self) -> grpc.StatusCode:
        self._requests.put(None)
        assert list(self.responses) == []
        return self.responses.code()


def error_of(response: pb.CallResponse) -> tuple[int, str, str, dict[str, str]]:
    """(code, message, reason, metadata) of an answer that must be an error."""
    assert response.WhichOneof("result") == "error", response
    status = status_pb2.Status.FromString(response.error)
    info = error_details_pb2.ErrorInfo()
    assert len(status.details) == 1 and status.details[0].Unpack(info)
    return status.code, status.message, info.reason, dict(info.metadata)


def _forward() -> pb.CallRequest:
    fill = pb.Fill(kind=pb.Fill.KIND_ONES, shape=[8, 3, 10, 10])
    target = pb.Fill(kind=pb.Fill.KIND_ONES, shape=[8])
    return pb.CallRequest(
        forward=pb.ForwardRequest(
            input=pb.TensorSource(fill=fill), target=pb.TensorSource(fill=target)
        )
    )


# --- the same work as unary calls --------------------------------------------------------


@pytest.mark.parametrize(("init", "seed"), [("fill", 0), ("random", 7)])
def test_the_tutorial_on_the_stream_equals_local_pytorch(
    streamed: gradwire.Client, init: str, seed: int
) -> None:
    result = replay(streamed, init=init, seed=seed, write=lambda *_: None)  # type: ignore[arg-type]
    local = run_tutorial(init, seed)
    assert result.loss == local.loss
    for name in ("grad_slice", "weight_before", "grad", "weight_after", "linear_grad_rows"):
        np.testing.assert_array_equal(getattr(result, name), getattr(local, name).numpy())
    assert result.grad_after_zero is None and local.grad_after_zero is None
    assert streamed._calls is not None and not streamed._calls.spent


def test_every_call_on_the_stream_answers_as_its_unary_call() -> None:
    """Two servers, one seed: each call made on the stream of one and as a call of its own
    on the other; every answer and the weights they leave are equal."""
    with running_server() as a, running_server() as b:
        on_stream = streaming(f"127.0.0.1:{a.port}", timeout=30)
        unary = gradwire.connect(f"127.0.0.1:{b.port}", timeout=30)
        big = np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32)
        wide = np.random.default_rng(1).standard_normal((40, 3, 10, 10)).astype(np.float32)
        with on_stream, unary:
            for client in (on_stream, unary):
                client.set_optimizer("sgd", lr=0.5, momentum=0.9)
            steps = [
                lambda c: c.reset(seed=3),
                lambda c: c.forward(ONES, TARGET),
                lambda c: c.backward(retain_graph=True),
                lambda c: c.backward(),
                lambda c: c.step(),
                lambda c: c.zero_grad(set_to_none=False),
                lambda c: c.set("conv1.weight", big),  # 1.7 KiB
                lambda c: c.set("conv1.weight.grad", big),
                lambda c: c.step(),
                lambda c: c.fill_parameters(0.01, ["linear.weight"]),
                lambda c: c.forward(wide, np.arange(40) % 20),  # 48 KiB: its values cut out
                lambda c: c.train_step(wide, np.arange(40) % 20, fetch=["conv1.weight[0]"]),
                lambda c: c.train_step(ONES, TARGET, zero_grad=False, fetch=["linear.weight"]),
                lambda c: c.read("conv2.weight.grad[1:3]").value,
                lambda c: c.read("optimizer.conv1.weight.momentum_buffer").value,
                lambda c: c.stats("conv2.weight", bins=5),
                lambda c: c.list_tensors(),
            ]
            for k, step in enumerate(steps):
                mine, theirs = step(on_stream), step(unary)
                if isinstance(mine, np.ndarray):
                    np.testing.assert_array_equal(mine, theirs, err_msg=f"step {k}")
                elif hasattr(mine, "fetched"):
                    assert replace(mine, fetched=()) == replace(theirs, fetched=())
                    for x, y in zip(mine.fetched, theirs.fetched, strict=True):
                        assert (x.name, x.version, x.shape) == (y.name, y.version, y.shape)
                        np.testing.assert_array_equal(x.value, y.value)
                        assert x.value.flags.aligned
                else:
                    assert mine == theirs, f"step {k}"
            for name in ("conv1.weight", "conv2.weight", "linear.weight"):
                np.testing.assert_array_equal(on_stream.get(name), unary.get(name))


def test_values_on_the_stream_travel_uncopied_and_land_aligned(streamed: gradwire.Client) -> None:
    """A 120 KB input and its read back: past the size where tensors' values are cut out of
    a message, both ways; the arrays read are aligned, as a unary answer's are."""
    inputs = np.random.default_rng(2).standard_normal((100, 3, 10, 10)).astype(np.float32)
    target = np.arange(100, dtype=np.int64) % 20
    streamed.forward(inputs, target)
    for name, sent in (("input", inputs), ("target", target)):
        got = streamed.read(name).value
        assert got.flags.aligned and got.dtype == sent.dtype
        np.testing.assert_array_equal(got, sent)


def test_the_envelope_keeps_values_aligned_whatever_its_header() -> None:
    """CallResponse's alignment field brings the response to a multiple of 8 bytes from the
    message's first byte, for every length of the length's varint."""
    for size in (0, 5, 200, 20_000, 3_000_000):  # lengths of 1 to 4 varint bytes
        message = pb.GetTensorResponse(name="x" * size)
        response = message.SerializeToString()
        data = calls.response_bytes("GetTensor", response)
        assert data.endswith(response)
        assert (len(data) - len(response)) % wire.ALIGNMENT == 0
        payload, error = calls.unwrap_response(data, "GetTensor")
        assert error is None and payload is not None and bytes(payload) == response
        assert pb.CallResponse.FromString(data).get_tensor == message
    # An answer that holds no tensors has no alignment field: its call's field alone.
    step = pb.StepResponse(version=1).SerializeToString()
    field = wire.varint(calls.METHODS["Step"][0] << 3 | wire.LEN) + wire.varint(len(step))
    assert calls.response_bytes("Step", step) == field + step


def test_an_answer_for_another_call_or_no_call_is_refused() -> None:
    answer = calls.response_bytes("Step", pb.StepResponse(version=1).SerializeToString())
    with pytest.raises(ValueError, match="a Step response came for Backward"):
        calls.unwrap_response(answer, "Backward")
    with pytest.raises(ValueError, match="neither a response nor an error"):
        calls.unwrap_response(b"", "Step")
    with pytest.raises(ValueError, match="not a CallResponse"):
        calls.unwrap_response(b"\x0a\x05ab", "Step")


def test_the_stream_carries_every_unary_call_on_a_session() -> None:
    """What METHODS lists comes from the contract: each unary call with a session's state,
    but Batch, which carries such calls itself."""
    on_session = {
        m.name
        for m in SERVICE.methods
        if not (m.client_streaming or m.server_streaming)
        and m.name != "Batch"
        and not getattr(TrainerServicer, m.name).sessionless
    }
    assert set(calls.METHODS) == on_session


# --- errors -------------------------------------------------------------------------------


def test_an_error_answers_its_call_and_the_stream_goes_on(
    streamed: gradwire.Client, client: gradwire.Client
) -> None:
    with pytest.raises(errors.NotFound) as on_stream:
        streamed.read("conv1.wieght")
    with pytest.raises(errors.NotFound) as unary:
        client.read("conv1.wieght")
    assert on_stream.value.reason == unary.value.reason == "UNKNOWN_TENSOR"
    assert on_stream.value.metadata == unary.value.metadata
    assert str(on_stream.value) == str(unary.value)
    stream = streamed._calls
    with pytest.raises(errors.OutOfRange) as past:
        streamed.read("conv1.weight[16]")
    assert past.value.metadata == {"index": "16", "dimension": "0", "size": "16"}
    with pytest.raises(errors.FailedPrecondition, match="call Forward first"):
        streamed.backward()
    # INVALID_ARGUMENT is the call's own refusal, answered there, not a sign that the stream
    # does not know the call (which sends that method as a call of its own for good).
    with pytest.raises(errors.InvalidArgument, match=r"cannot be written to conv1\.weight"):
        streamed.set("conv1.weight", np.zeros((16, 3, 3, 4), np.float32))
    assert not streamed._not_on_stream
    assert streamed.forward(ONES, TARGET).version == 1
    assert streamed._calls is stream and not stream.spent  # one stream all along


def test_a_retry_with_the_same_request_id_is_applied_once(raw: Raw, address: str) -> None:
    raw.call(_forward())
    raw.call(pb.CallRequest(backward=pb.BackwardRequest()))
    first = raw.call(pb.CallRequest(step=pb.StepRequest(), request_id="step-1"))
    again = raw.call(pb.CallRequest(step=pb.StepRequest(), request_id="step-1"))
    assert first == again and first.step.version == 3
    with grpc.insecure_channel(address) as channel:  # a unary retry of it too
        step = channel.unary_unary(
            f"{TRAINER}Step", response_deserializer=pb.StepResponse.FromString
        )
        unary = step(b"", metadata=(("gradwire-request-id", "step-1"),), timeout=30)
    assert unary == first.step
    assert raw.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest())).list_tensors.version == 3


def test_an_expected_version_makes_a_call_conditional(streamed: gradwire.Client) -> None:
    streamed.forward(ONES, TARGET)
    with streamed.expecting(0), pytest.raises(errors.Aborted) as caught:
        streamed.backward()
    assert caught.value.reason == "VERSION_MISMATCH" and caught.value.metadata["version"] == "1"
    with streamed.expecting(1):
        assert streamed.backward() == 2


def test_bad_messages_are_answered_in_order_and_the_stream_goes_on(raw: Raw) -> None:
    code, message, reason, _ = error_of(raw.send(b"\xff\xff"))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "MALFORMED_REQUEST")
    assert "not a valid gradwire.v1.CallRequest" in message
    for nothing in (b"", b"\xfa\x06\x00"):  # no call; field 111, a newer client's call
        code, message, reason, _ = error_of(raw.send(nothing))
        assert (code, reason) == (3, "BAD_REQUEST") and "names no call" in message
    # A Step's request of bytes that are no StepRequest: refused as the unary Step's.
    broken = wire.varint(calls.METHODS["Step"][0] << 3 | wire.LEN) + b"\x02\xff\xff"
    code, message, reason, _ = error_of(raw.send(broken))
    assert (code, reason) == (3, "MALFORMED_REQUEST")
    assert "not a valid gradwire.v1.StepRequest" in message
    # ... even where the envelope breaks off after it: the call's field still names it.
    code, message, reason, _ = error_of(raw.send(broken + b"\xff"))
    assert (reason, "not a valid gradwire.v1.StepRequest" in message) == ("MALFORMED_REQUEST", True)
    # Two call fields, a whole Step's then a broken ZeroGrad's: the last names the call.
    zero_grad = wire.varint(calls.METHODS["ZeroGrad"][0] << 3 | wire.LEN) + b"\x02\xff\xff"
    step_then = wire.varint(calls.METHODS["Step"][0] << 3 | wire.LEN) + b"\x00" + zero_grad
    code, message, reason, _ = error_of(raw.send(step_then))
    assert (reason, "not a valid gradwire.v1.ZeroGradRequest" in message) == (
        "MALFORMED_REQUEST",
        True,
    )
    # A Step's field written as 8 fixed bytes, in an envelope that breaks off, names no
    # call: the envelope is at fault.
    as_number = wire.varint(calls.METHODS["Step"][0] << 3 | 1) + b"\xff" * 8
    code, message, reason, _ = error_of(raw.send(as_number + b"\xff\xff"))
    assert (reason, "not a valid gradwire.v1.CallRequest" in message) == ("MALFORMED_REQUEST", True)
    # A Step's field that is a whole StepRequest, in an envelope that breaks off after it:
    # the envelope is at fault, not the Step.
    whole = wire.varint(calls.METHODS["Step"][0] << 3 | wire.LEN) + b"\x00"
    code, message, reason, _ = error_of(raw.send(whole + b"\xff\xff"))
    assert (reason, "not a valid gradwire.v1.CallRequest" in message) == ("MALFORMED_REQUEST", True)
    # A mutation's request id and expected version are refused as their metadata would be.
    longest = pb.CallRequest(zero_grad=pb.ZeroGradRequest(), request_id="x" * 128)
    assert raw.call(longest).WhichOneof("result") == "zero_grad"
    too_long = pb.CallRequest(step=pb.StepRequest(), request_id="x" * 129)
    assert error_of(raw.call(too_long))[1:3] == (
        "request_id is over 128 characters",
        "BAD_METADATA",
    )
    past = pb.CallRequest(step=pb.StepRequest(), expected_version=2**63)
    _, message, reason, _ = error_of(raw.call(past))
    assert reason == "BAD_METADATA"
    assert message == (
        f"expected_version must be a state version, from 0 to {2**63 - 1}, got {2**63}"
    )
    # A read ignores both, as a unary read ignores that metadata.
    listing = raw.call(
        pb.CallRequest(
            list_tensors=pb.ListTensorsRequest(), request_id="x" * 200, expected_version=2**63
        )
    )
    assert listing.WhichOneof("result") == "list_tensors"
    assert listing.list_tensors.version == 1  # the ZeroGrad above
    assert raw.close() == grpc.StatusCode.OK


@pytest.mark.parametrize("kept", ["train_step", "forward"])
def test_a_message_of_two_calls_is_the_last_one_alone(raw: Raw, kept: str) -> None:
    """Protobuf keeps the last of a oneof's fields: the values of a Forward before it must
    not fill the TrainStep kept (found by a review: a TrainStep sent without values took
    the Forward's, where its unary call is refused); nor a TrainStep's, of a higher field
    number, the Forward kept after it."""
    values = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[16, 3, 10, 10])
    values.float_values.extend(np.ones(4800, dtype=np.float32))  # 19.2 KB: its values cut out
    empty = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[16, 3, 10, 10])
    target = pb.TensorSource(fill=pb.Fill(kind=pb.Fill.KIND_ONES, shape=[16]))

    def call(field: str, tensor: pb.Tensor) -> pb.CallRequest:
        request = pb.TrainStepRequest if field == "train_step" else pb.ForwardRequest
        made = pb.CallRequest()
        getattr(made, field).CopyFrom(request(input=pb.TensorSource(tensor=tensor), target=target))
        return made

    other = "forward" if kept == "train_step" else "train_step"
    both = call(other, values).SerializeToString() + call(kept, empty).SerializeToString()
    assert len(both) >= wire.SMALL_MESSAGE_BYTES
    code, message, _, _ = error_of(raw.send(both))
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "4800 values" in message, message
    assert raw.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest())).list_tensors.version == 0


def test_a_malformed_call_on_an_unknown_session_is_answered_as_its_unary_call(
    address: str,
) -> None:
    """The session first, then the request's form: the unary call's order."""
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel, metadata=(("gradwire-session", "no-such-session"),))
        broken = wire.varint(calls.METHODS["Step"][0] << 3 | wire.LEN) + b"\x02\xff\xff"
        assert error_of(stream.send(broken))[2] == "UNKNOWN_SESSION"


def test_request_id_or_expected_version_in_the_streams_metadata_is_refused(address: str) -> None:
    """The refusal names the CallRequest field each call carries the value in instead."""
    for key, field in (
        ("gradwire-request-id", "request_id"),
        ("gradwire-expected-version", "expected_version"),
    ):
        with grpc.insecure_channel(address) as channel:
            stream = Raw(channel, metadata=((key, "1"),))
            with pytest.raises(grpc.RpcError) as caught:
                stream.call(pb.CallRequest(step=pb.StepRequest()))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").endswith(
                f"cannot carry {key}: each call in it carries its own, as CallRequest.{field}"
            )
            assert errors.from_rpc_error(caught.value).reason == "BAD_METADATA"


def test_an_empty_request_id_in_the_streams_metadata_is_none(address: str) -> None:
    """As for a unary call: a client that always sends the header, empty when it has no id,
    had every stream refused."""
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel, metadata=(("gradwire-request-id", ""),))
        fill = pb.CallRequest(
            request_id="fill-1", fill_parameters=pb.FillParametersRequest(value=2.0)
        )
        answer, again = stream.call(fill), stream.call(fill)  # the retry answered as the first
    assert answer.fill_parameters.version == again.fill_parameters.version == 1


def test_a_session_closed_under_a_stream_ends_it_not_found(
    client: gradwire.Client, address: str
) -> None:
    """The stream, waiting for a call, ends with its session: left open it answered every
    call NOT_FOUND and held one of the server's places for as long as its client lived."""
    session = client.open_session(seed=0)
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel, metadata=(("gradwire-session", session.session or ""),))
        listed = stream.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest()))
        assert listed.list_tensors.version == 0
        default = Raw(channel)  # the default session's stream, waiting too, goes on
        assert default.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest())).list_tensors
        session.close()
        with pytest.raises(grpc.RpcError) as ended:
            next(stream.responses)
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert "this stream of calls on it ends here" in (ended.value.details() or "")
        # What to do next: the stream cannot be moved, a session can be opened.
        assert (ended.value.details() or "").endswith(
            "open a session (OpenSession, gradwire open-session)"
        )
        again = default.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest()))
        assert again.list_tensors.model == "Simple"
        default.close()


def test_streams_ended_by_a_session_s_close_or_a_stop_are_counted_as_their_clients_saw() -> None:
    """Counted and logged with the status the client got (NOT_FOUND, UNAVAILABLE), not as
    streams their callers cancelled."""
    listing = pb.CallRequest(list_tensors=pb.ListTensorsRequest())
    with running_server(metrics_port=0) as running:
        address = f"127.0.0.1:{running.port}"
        with gradwire.connect(address, timeout=30) as client, grpc.insecure_channel(address) as ch:
            session = client.open_session(seed=0)
            closed = Raw(ch, metadata=(("gradwire-session", session.session or ""),))
            assert closed.call(listing).list_tensors.version == 0
            eventually(lambda: running.servicer.waiting.count == 1)
            session.close()
            with pytest.raises(grpc.RpcError):
                next(closed.responses)
            eventually(lambda: counted(scrape(running), CALLS, "NOT_FOUND") == 1)
            stopped = Raw(ch)
            assert stopped.call(listing).list_tensors.version == 0
            eventually(lambda: running.servicer.waiting.count == 1)
            running.servicer.stop()
            with pytest.raises(grpc.RpcError) as ended:
                next(stopped.responses)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            eventually(lambda: counted(scrape(running), CALLS, "UNAVAILABLE") == 1)
            assert counted(scrape(running), CALLS, "CANCELLED") == 0


def test_a_stream_whose_session_closes_before_its_first_call_is_counted_not_found() -> None:
    """A stream opened on an open session that closes before any call is written ends
    NOT_FOUND for its client, and is counted so: not OK, as a stream its client ended
    itself (a stream is bound to its session from the start, not from its first answer)."""
    with running_server(metrics_port=0) as running:
        address = f"127.0.0.1:{running.port}"
        with gradwire.connect(address, timeout=30) as client, grpc.insecure_channel(address) as ch:
            session = client.open_session(seed=0)
            stream = Raw(ch, metadata=(("gradwire-session", session.session or ""),))
            eventually(lambda: running.servicer.waiting.count == 1)
            session.close()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream.responses)
            assert ended.value.code() == grpc.StatusCode.NOT_FOUND
            eventually(lambda: counted(scrape(running), CALLS, "NOT_FOUND") == 1)
            assert counted(scrape(running), CALLS, "OK") == 0


def test_a_stream_on_no_open_session_answers_its_call_then_ends(address: str) -> None:
    """Its call is answered as its unary call would be (UNKNOWN_SESSION), then the stream
    ends, with the reason: it could never run another."""
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel, metadata=(("gradwire-session", "no-such-session"),))
        answer = stream.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest()))
        assert error_of(answer)[2] == "UNKNOWN_SESSION"
        with pytest.raises(grpc.RpcError) as ended:
            next(stream.responses)
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    assert errors.from_rpc_error(ended.value).reason == "UNKNOWN_SESSION"


def test_a_stream_on_a_long_unknown_session_names_it_as_its_call_did(address: str) -> None:
    """The stream's end names the session in its metadata as the call's answer before it
    does, its first 64 characters: a client matches the two, and a header of hundreds of
    characters is not sent back whole."""
    session = "s" * 100
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel, metadata=(("gradwire-session", session),))
        answer = stream.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest()))
        assert error_of(answer)[3] == {"session": session[:64]}
        with pytest.raises(grpc.RpcError) as ended:
            next(stream.responses)
    assert errors.from_rpc_error(ended.value).metadata == {"session": session[:64]}


def test_a_stream_with_an_empty_session_header_runs_on_the_default_session(address: str) -> None:
    """An empty header is no session's, as for a unary call: the stream stays open after
    its first answer, and runs the calls written after it."""
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel, metadata=(("gradwire-session", ""),))
        for _ in range(3):
            answer = stream.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest()))
            assert answer.WhichOneof("result") == "list_tensors", answer
        assert stream.close() == grpc.StatusCode.OK


def test_an_idle_stream_does_not_keep_its_session_open_as_the_contract_says(
    trainer: Trainer,
) -> None:
    """A Calls stream keeps its session open while one of its calls runs, not while it waits
    for the next: the session expires under it and the stream ends NOT_FOUND. The contract
    said a call in progress (a Watch, a Train) keeps a session open, and that an open Calls
    stream is a call in progress however quiet, for its connection: an integrator in
    another language kept a stream open to keep its session, and lost it (found by a review
    of the contract from another language)."""
    proto = Path(__file__).resolve().parents[1] / "proto" / "gradwire" / "v1" / "trainer.proto"
    said = " ".join(line.strip("/ ") for line in proto.read_text().splitlines())
    assert "A Calls stream waiting for its next message does not, open as it is" in said
    assert "a Calls stream counts while one of its calls runs" in said

    running = start(trainer, session_idle_s=1.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            opened = channel.unary_unary(
                "/gradwire.v1.Trainer/OpenSession",
                request_serializer=pb.OpenSessionRequest.SerializeToString,
                response_deserializer=pb.OpenSessionResponse.FromString,
            )(pb.OpenSessionRequest(), timeout=30)
            stream = Raw(channel, metadata=(("gradwire-session", opened.session),))
            answer = stream.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest()))
            assert answer.WhichOneof("result") == "list_tensors", answer
            listed = running.servicer.sessions.describe()[0]
            assert [view.calls_in_progress for view in listed] == [0]  # waiting: no call
            with pytest.raises(grpc.RpcError) as ended:
                next(stream.responses)  # the session expires after 1 s, the stream with it
            assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize("how", ["closed by its id", "expired"])
def test_session_clients_streams_let_go_of_their_places_with_their_sessions(
    trainer: Trainer, how: str
) -> None:
    """Session clients kept after a pipeline each held a place with their Calls stream:
    once their sessions were closed (gradwire close-session, as the BUSY message advises)
    or expired, every other call was still BUSY (found by a review of several users at
    once). Their next calls say their session is gone."""
    running = start(trainer, max_concurrent=2, session_idle_s=0.5 if how == "expired" else 600)
    address = f"127.0.0.1:{running.port}"
    try:
        with gradwire.connect(address, timeout=30) as client:
            kept = [client.open_session(seed=0) for _ in range(2)]
            for session in kept:
                with session.pipeline() as p:
                    p.list_tensors()
            with pytest.raises(errors.ResourceExhausted):  # both places held
                next(client.watch(["loss"]))
            if how == "closed by its id":
                for session in kept:
                    with gradwire.connect(address, session=session.session) as other:
                        other.close_session()

            def watched() -> bool:
                try:
                    with contextlib.closing(client.watch(["loss"])) as updates:
                        next(updates)
                except errors.ResourceExhausted:
                    return False
                return True

            eventually(watched, "the places were not let go", within=10)
            with pytest.raises(errors.NotFound) as gone:
                kept[0].get("conv1.weight[0, 0, 0]")
            assert gone.value.reason == "UNKNOWN_SESSION"
    finally:
        running.stop(grace=None)


def test_a_session_clients_calls_go_on_a_stream_of_its_own(
    streamed: gradwire.Client, server: Running
) -> None:
    assert streamed.list_tensors().version == 0
    with streamed.open_session(seed=0) as session:
        assert session.forward(ONES, TARGET).version == 1
        assert streamed.list_tensors().version == 0  # the default session, untouched
        assert session._calls is not None and session._calls is not streamed._calls
        assert session._calls.session == session.session
        assert server.servicer.slots.taken == 2  # a place for each stream
    eventually(lambda: server.servicer.slots.taken == 1)  # closing it gave its place back


def test_a_closed_session_client_of_a_detached_session_opens_no_stream_again(
    address: str, server: Running
) -> None:
    """close() of a session client whose session was detached leaves the session open, and
    its later calls go as calls of their own: a Calls stream opened after the close would
    hold one of the server's places that nothing closes."""
    with gradwire.connect(address, timeout=30) as client:
        session = client.open_session(seed=0)
        session.stream_calls = True
        assert session.list_tensors().version == 0  # on its stream
        ident = session.detach()
        session.close()
        eventually(lambda: server.servicer.slots.taken == 0)
        assert session.list_tensors().version == 0  # a call of its own
        assert session._calls is None and server.servicer.slots.taken == 0
        with gradwire.connect(address, session=ident) as joined:
            joined.close_session()


def test_a_token_is_checked_for_the_stream() -> None:
    with running_server(token="s3cret") as running:
        address = f"127.0.0.1:{running.port}"
        with streaming(address, token="s3cret", timeout=30) as client:
            assert client.forward(ONES, TARGET).version == 1
        with (
            streaming(address, token="wrong", timeout=30) as client,
            pytest.raises(errors.Unauthenticated),
        ):
            client.step()


# --- deadlines, places and the server stopping ----------------------------------------------


def test_a_call_past_its_timeout_raises_and_the_next_goes_on_a_new_stream(
    gated_server: Running,
) -> None:
    with streaming(f"127.0.0.1:{gated_server.port}", timeout=0.5) as client:
        client.retries = 0
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded) as caught:
            client.forward(Fill.ones(1, 2))  # held in the model until released
        assert time.monotonic() - started < 10
        assert "Deadline Exceeded" in str(caught.value)  # gRPC's words for a unary call's
        first = client._calls
        assert first is not None and first.spent
        Gate.release.set()
        client.timeout = 30
        eventually(lambda: client.list_tensors().version == 1)  # the Forward ran to its end
        assert client._calls is not first


def test_a_short_timeout_after_a_long_one_is_kept(gated_server: Running) -> None:
    """The watchdog, asleep until a long call's deadline, is woken for a shorter one (found
    by a review: the short call was cut off only at the long one's deadline)."""
    with streaming(f"127.0.0.1:{gated_server.port}", timeout=300) as client:
        client.retries = 0
        assert client.list_tensors().version == 0  # answered; its 300 s deadline remains
        client.timeout = 0.5
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            client.forward(Fill.ones(1, 2))  # held in the model until released
        assert time.monotonic() - started < 60


def a_held_forward_is_cut_off_at_its_deadline(client: gradwire.Client, release_s: float) -> None:
    """A Forward held in the gated model is cut off at a timeout of 0.5 s, well before the
    gate opens `release_s` after it is sent (its end, were it not cut off)."""
    release = threading.Timer(release_s, Gate.release.set)
    release.start()
    try:
        client.timeout = 0.5
        with pytest.raises(errors.DeadlineExceeded):
            client.forward(Fill.ones(1, 2))  # held in the model until released
        assert not release.finished.is_set()
    finally:
        release.cancel()


def test_a_deadline_after_the_watchdog_went_idle_is_kept(
    gated_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog, woken at an answered call's deadline, waits with none to time: a later
    call's deadline wakes it, though later than the past one it last slept until (were it
    taken as asleep until that one, the call was cut off only WATCHDOG_IDLE_S later)."""
    monkeypatch.setattr(call_stream, "WATCHDOG_IDLE_S", 600.0)
    with streaming(f"127.0.0.1:{gated_server.port}", timeout=1.0) as client:
        client.retries = 0
        assert client.list_tensors().version == 0
        time.sleep(1.5)  # past its deadline: the watchdog woke, and waits for another
        a_held_forward_is_cut_off_at_its_deadline(client, release_s=20.0)


def test_a_call_on_the_stream_carries_its_timeout_in_milliseconds_rounded_up(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CallRequest.timeout_ms: the client's timeout rounded up, the longest a gRPC deadline
    holds as itself (not as 0, which is no deadline)."""
    sent: list[int] = []
    envelope = calls.request_pieces

    def recorded(*args: Any) -> Any:
        pieces = envelope(*args)
        sent.append(pb.CallRequest.FromString(b"".join(map(bytes, pieces))).timeout_ms)
        return pieces

    monkeypatch.setattr(calls, "request_pieces", recorded)
    with streaming(address, timeout=2.0004) as client:
        assert client.list_tensors().version == 0
        client.timeout = limits.MAX_GRPC_SECONDS
        assert client.list_tensors().version == 0
    assert sent == [2001, limits.MAX_GRPC_SECONDS * 1000]


def test_a_stream_closed_before_a_call_is_written_sends_it_as_a_call_of_its_own(
    address: str,
) -> None:
    with gradwire.connect(address, stream_calls=True, timeout=30) as client:
        assert client.list_tensors().version == 0
        stream = client._calls
        assert stream is not None
        stream.close()
        with pytest.raises(Spent):  # never written after the end: it would go unanswered
            stream.call("ListTensors", [b""], None, None, 30)
        assert client.list_tensors().version == 0  # and the client's next call goes on


def test_moving_to_another_session_lets_a_call_in_progress_finish(gated_server: Running) -> None:
    """Another thread's call on the stream of the session left gets its answer (found by a
    review: the old stream was cancelled under it, its caller told CANCELLED though the
    call was applied)."""
    address = f"127.0.0.1:{gated_server.port}"
    with gradwire.connect(address, stream_calls=True, timeout=30) as client:
        other = client.open_session(seed=0).detach()
        assert client.list_tensors().version == 0  # the default session's stream is open
        first = client._calls
        answers: dict[str, object] = {}
        held = threading.Thread(target=lambda: answers.update(held=client.forward(Fill.ones(1, 2))))
        held.start()
        assert Gate.entered.wait(timeout=60)  # the Forward is on the stream, in progress
        client.session = other
        moved = threading.Thread(target=lambda: answers.update(moved=client.list_tensors()))
        moved.start()  # opens the other session's stream, ending the first
        eventually(lambda: client._calls is not first)
        Gate.release.set()
        held.join(timeout=60)
        moved.join(timeout=60)
        assert getattr(answers.get("held"), "version", None) == 1
        assert getattr(answers.get("moved"), "version", None) == 0


@pytest.mark.parametrize(
    "call",
    [
        pb.CallRequest(fill_parameters=pb.FillParametersRequest(value=7.0)),  # torch thread
        pb.CallRequest(zero_grad=pb.ZeroGradRequest()),  # to None: under the lock, here
        pb.CallRequest(set_optimizer=pb.SetOptimizerRequest()),  # under the lock too
    ],
    ids=["fill_parameters", "zero_grad", "set_optimizer"],
)
def test_a_mutation_queued_past_its_message_deadline_is_answered_at_it(
    gated_server: Running, call: pb.CallRequest
) -> None:
    """It was answered only once the Forward ahead of it ended (2.8 s late for a 200 ms
    timeout in the forty-fourth session's walkthrough of the contract). Now answered while
    that Forward is still held, and never run after it, whether it waits for the torch
    thread or for the trainer's lock (a review found the second kind still waiting)."""
    address = f"127.0.0.1:{gated_server.port}"
    holder = hold_forward(address)  # the torch thread is busy with that Forward
    with grpc.insecure_channel(address) as channel:
        stream = Raw(channel)
        fill = pb.CallRequest()
        fill.CopyFrom(call)
        fill.timeout_ms = 200
        answers: queue.SimpleQueue[pb.CallResponse] = queue.SimpleQueue()
        threading.Thread(target=lambda: answers.put(stream.call(fill)), daemon=True).start()
        answer = answers.get(timeout=60)  # raises queue.Empty if it waits for the Forward
        assert not Gate.release.is_set() and holder.is_alive()
        code, message, reason, _ = error_of(answer)
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "DEADLINE_PASSED")
        assert "nothing was changed" in message
        Gate.release.set()
        holder.join(timeout=60)
        weight = stream.call(pb.CallRequest(get_tensor=pb.GetTensorRequest(name="weight")))
        assert list(weight.get_tensor.tensor.float_values) == [1.0, 1.0]
        assert weight.get_tensor.version == 1  # only the Forward was applied


def test_a_message_s_context_answers_from_the_message_and_its_stream() -> None:
    """What a unary handler asks of a message's context: the metadata the message carries,
    the time to the sooner of its own timeout (milliseconds) and its stream's deadline,
    never below 0, and whether its stream's caller is still there. The streams' contexts
    are real ones, of calls ended: no longer active, with and without a deadline."""
    unbounded, hour = ended_contexts(None, 3600)  # gRPC says a few seconds more for the hour
    context = MessageContext(unbounded, {"gradwire-session": "s1"})
    carried = {"gradwire-session": "s1", "gradwire-request-id": "r1"}
    context.carry(carried, 0)  # no timeout of its own: the stream's (none to speak of)
    assert context.invocation_metadata() == tuple(carried.items())
    assert cast(float, context.time_remaining()) > 10**9
    assert not context.is_active()  # its stream's call has ended
    context.carry(carried, 250)
    assert 0.0 < cast(float, context.time_remaining()) <= 0.25
    context.carry(carried, 1)
    time.sleep(0.01)
    assert context.time_remaining() == 0.0  # past: 0, as gRPC's own, never negative
    bounded = MessageContext(hour, {})
    bounded.carry({}, 0)
    assert 3000 < cast(float, bounded.time_remaining()) < 3700  # the stream's deadline
    bounded.carry({}, 7_200_000)  # two hours: the stream's hour comes first
    assert 3000 < cast(float, bounded.time_remaining()) < 3700


def test_an_open_stream_holds_a_place_until_its_client_closes() -> None:
    with running_server(max_concurrent=1) as running:
        address = f"127.0.0.1:{running.port}"
        holder = streaming(address, timeout=30)
        with pytest.raises(errors.FailedPrecondition):
            holder.step()
        with gradwire.connect(address, timeout=30) as other:
            with pytest.raises(errors.ResourceExhausted) as busy:
                other.list_tensors()
            assert busy.value.reason == "BUSY" and "streams of calls" in busy.value.message
            holder.close()
            eventually(lambda: running.servicer.slots.taken == 0)
            assert other.list_tensors().version == 0


def test_a_stopping_server_ends_an_idle_stream_and_runs_no_message_after(
    raw: Raw, server: Running
) -> None:
    assert raw.call(pb.CallRequest(list_tensors=pb.ListTensorsRequest())).list_tensors
    eventually(lambda: server.servicer.waiting.count == 1)  # back to wait for a message
    server.servicer.stop()
    with pytest.raises(grpc.RpcError) as caught:
        raw.call(pb.CallRequest(fill_parameters=pb.FillParametersRequest(value=7.0)))
    # Not CANCELLED, which a client could take for its own cancel of a call that ran.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no call written to it after its last answer was run" in (caught.value.details() or "")
    assert server.trainer.version == 0


class _Cancellable:
    """What WaitingStreams asks of a stream's ServicerContext: its cancel."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_message_that_comes_as_the_stop_begins_is_not_run() -> None:
    waiting, context = WaitingStreams(), _Cancellable()

    def requests() -> Iterator[str]:
        yield "first"
        waiting.stop()  # the stop begins while the stream waits, and its message comes
        yield "second"

    messages = requests()
    assert waiting.next_message(messages, cast(grpc.ServicerContext, context)) == "first"
    with pytest.raises(Stopping) as stopped:
        waiting.next_message(messages, cast(grpc.ServicerContext, context))
    assert "no call written to it after its last answer was run" in stopped.value.message
    assert context.cancelled
    with pytest.raises(Stopping):  # and a stream that comes back to wait does not
        waiting.next_message(iter(["third"]), cast(grpc.ServicerContext, context))


def _cancelled_stream(cancel: Callable[[], None], raising: bool) -> Iterator[str]:
    """A request iterator whose call is cancelled as it waits (`cancel`), then raises as
    gRPC does, or ends as if its client had ended it (gRPC does either)."""
    cancel()
    if raising:
        raise grpc.RpcError("cancelled")
    yield from ()


@pytest.mark.parametrize("raising", [True, False], ids=["raising", "ending"])
def test_a_stream_ended_as_it_waits_ends_with_why_however_grpc_ends_it(raising: bool) -> None:
    """A stream its session's close ended was counted OK when the iterator ended, one run
    in two, where its client saw NOT_FOUND; one a stop ended is STOPPING either way, not
    a stream its caller cancelled."""
    waiting, context = WaitingStreams(), _Cancellable()
    closed: list[str] = []

    def gone() -> UnknownSession | None:
        return UnknownSession("closed") if closed else None

    def close() -> None:
        closed.append("s1")
        waiting.end_session("s1", "closed")

    with pytest.raises(UnknownSession):
        waiting.next_message(
            _cancelled_stream(close, raising), cast(grpc.ServicerContext, context), "s1", gone
        )
    assert context.cancelled
    # A client that ends its stream while its session is open ends it as before.
    still_open = cast(grpc.ServicerContext, _Cancellable())
    assert waiting.next_message(iter([]), still_open, "s2", lambda: None) is None
    with pytest.raises(Stopping):
        waiting.next_message(_cancelled_stream(waiting.stop, raising), still_open, "s2")


def test_a_stream_the_server_ended_while_idle_is_not_written_to() -> None:
    """The server restarted between two calls, its end cancelling the idle stream: the next
    call goes on a new stream instead of failing, unsent, with the old one's end."""
    with running_server() as first:
        port = first.port
        client = streaming(f"127.0.0.1:{port}", timeout=30)
        client.retries = 0  # no retry to hide a call failed unsent
        assert client.list_tensors().version == 0
        stream = client._calls
    with client, running_server(port=port) as second:
        assert second.port == port
        assert stream is not None
        eventually(lambda: stream._responses.done())
        assert client.fill_parameters(1.0) == 1
        assert client._calls is not stream


def test_a_call_that_finds_the_stream_busy_goes_as_a_call_of_its_own(address: str) -> None:
    with gradwire.connect(address, stream_calls=True, timeout=30) as client:
        assert client.list_tensors().version == 0
        stream = client._calls
        assert stream is not None
        unary: list[str] = []
        own = client._methods["ListTensors"]
        client._methods["ListTensors"] = lambda *a, **k: unary.append("ListTensors") or own(*a, **k)
        with stream.lock:  # as while another thread's call is on it
            assert client.list_tensors().version == 0
        assert unary == ["ListTensors"]
        assert client.list_tensors().version == 0
        assert unary == ["ListTensors"] and client._calls is stream  # back on the stream


def test_calls_from_two_threads_at_once_are_all_answered(address: str) -> None:
    """One stream, two threads, each call on the stream or beside it."""
    with gradwire.connect(address, stream_calls=True, timeout=30) as client:
        client.forward(ONES, TARGET)
        weight = client.get("conv1.weight")

        def reads(_: int) -> bool:
            return all(np.array_equal(client.get("conv1.weight"), weight) for _ in range(50))

        with futures.ThreadPoolExecutor(2) as pool:
            assert all(pool.map(reads, range(4)))


@contextmanager
def serving_without_calls(*methods: str) -> Iterator[str]:
    """A server from before the Calls RPC (or before `methods`: "Batch", ...), the Gate
    model, never held: its address."""
    trainer = Trainer(ModelSpec("Gate", Gate, (2,), 2), device="cpu", seed=0)
    handlers = method_handlers(TrainerServicer(trainer))
    for method in methods or ("Calls",):
        del handlers[method]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Gate.release.set()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
        trainer.close()


def test_a_server_without_calls_gets_calls_of_their_own() -> None:
    """A server from before the Calls RPC: the client finds it has none at its first call,
    which then goes as a call of its own, as all later ones do."""
    with (
        serving_without_calls() as address,
        gradwire.connect(address, stream_calls=True, timeout=30) as client,
    ):
        assert client.fill_parameters(2.0) == 1
        assert client._no_calls
        assert client.get("weight").tolist() == [2.0, 2.0]


# --- what operators see -----------------------------------------------------------------------


def test_each_call_on_the_stream_is_counted_as_its_method() -> None:
    with running_server(metrics_port=0) as running:
        with streaming(f"127.0.0.1:{running.port}", timeout=30) as client:
            client.forward(ONES, TARGET)
            client.backward()
            with pytest.raises(errors.FailedPrecondition):
                client.backward()
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            raw = Raw(channel)
            broken = wire.varint(calls.METHODS["Step"][0] << 3 | wire.LEN) + b"\x02\xff\xff"
            assert error_of(raw.send(broken))[2] == "MALFORMED_REQUEST"  # a Step's
            assert error_of(raw.send(b""))[2] == "BAD_REQUEST"  # no call's: the stream's
            assert raw.close() == grpc.StatusCode.OK
        samples = scrape(running)
        assert counted(samples, TRAINER + "Forward", "OK") == 1
        assert counted(samples, TRAINER + "Backward", "OK") == 1
        assert counted(samples, TRAINER + "Backward", "FAILED_PRECONDITION") == 1
        assert counted(samples, TRAINER + "Step", "INVALID_ARGUMENT") == 1
        assert counted(samples, CALLS, "INVALID_ARGUMENT") == 1
        eventually(lambda: counted(scrape(running), CALLS, "OK") == 2)  # the two streams


def test_a_stream_s_first_chunk_is_checked_while_a_forward_runs(gated_server: Running) -> None:
    """The first chunk's check reads names and shapes without the trainer's lock: under it,
    an upload stalled behind a Forward in progress (a review measured 17 of 64 chunks
    received during a 2 s Forward). A shape the Gate's weight [2] cannot take is refused
    while the Forward is still held."""
    address = f"127.0.0.1:{gated_server.port}"
    holder = hold_forward(address)
    values = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], float_values=[0.5])
    first = pb.SetTensorChunk(name="weight", chunk=pb.TensorChunk(shape=[3], values=values))
    try:
        with grpc.insecure_channel(address) as channel:
            call = channel.stream_unary("/gradwire.v1.Trainer/SetTensorStream")
            with pytest.raises(grpc.RpcError) as refused:
                call(iter([first.SerializeToString()]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot be written to weight of shape [2]" in str(refused.value.details())
            assert not Gate.release.is_set() and holder.is_alive()
    finally:
        Gate.release.set()
        holder.join(timeout=60)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (pb.CallResponse(step=pb.StepResponse()), "a garbled answer (a Step response came for"),
        (b"\x0a\x05\xff", "a garbled answer (not a CallResponse"),
        (pb.CallResponse(error=b"\xff\xff"), "a garbled answer (its error is not a google.rpc"),
        # CallResponse.zero_grad (field 19: tag 0x9a 0x01) holding bytes no ZeroGradResponse is
        (b"\x9a\x01\x02\x08\xff", "a garbled answer (not a ZeroGrad response"),
        (None, "the server ended its stream of calls unanswered"),
    ],
    ids=[
        "another-calls-answer",
        "not-a-message",
        "undecodable-error",
        "undecodable-response",
        "no-answer",
    ],
)
def test_a_garbled_answer_on_the_stream_fails_its_call_and_the_stream(
    answer: pb.CallResponse | bytes | None, said: str
) -> None:
    """A server's bug: the call fails INTERNAL, perhaps applied, and the stream, whose order
    can no longer be trusted, is not used again: the next call opens another."""
    opened: list[int] = []

    def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        opened.append(1)
        for _ in requests:
            if answer is None:
                return
            yield answer if isinstance(answer, bytes) else answer.SerializeToString()

    handler = calls_only(serve)
    with bare_server(handler) as address, streaming(address) as client:
        for tried in (1, 2):
            with pytest.raises(errors.Internal) as caught:
                client.zero_grad()
            assert str(caught.value).startswith(f"INTERNAL: {said}")
            if said.startswith("a garbled"):  # what to do about it
                assert "whether the call ran is not known (read the state version)" in str(
                    caught.value
                )
            assert caught.value.changes_state
            assert len(opened) == tried  # each call on a stream of its own


@pytest.mark.parametrize(
    "fields",
    [
        [pb.CallResponse(step=pb.StepResponse()), pb.CallResponse(error=b"")],
        [pb.CallResponse(step=pb.StepResponse()), pb.CallResponse(zero_grad=pb.ZeroGradResponse())],
        # Two other calls' answers: the first is named.
        [pb.CallResponse(step=pb.StepResponse()), pb.CallResponse(backward=pb.BackwardResponse())],
    ],
    ids=[
        "another-calls-answer-then-an-error",
        "another-calls-answer-then-its-own",
        "two-other-calls-answers",
    ],
)
def test_an_answer_naming_another_call_anywhere_is_refused(fields: list[pb.CallResponse]) -> None:
    # Protobuf keeps the last field of a oneof: a Step response followed by an error or a
    # ZeroGrad response was read as ZeroGrad's (a review of the forty-sixth session's change).
    data = b"".join(f.SerializeToString() for f in fields)
    with pytest.raises(ValueError, match="a Step response came for ZeroGrad"):
        calls.unwrap_response(data, "ZeroGrad")


def test_an_answer_of_a_response_and_an_error_is_read_as_protobuf_reads_it() -> None:
    """Both results of the oneof in one answer: the last is the one, as protobuf keeps it."""
    status = status_pb2.Status(code=5, message="gone").SerializeToString()
    response = pb.CallResponse(zero_grad=pb.ZeroGradResponse(version=3)).SerializeToString()
    error = pb.CallResponse(error=status).SerializeToString()
    payload, failed = calls.unwrap_response(error + response, "ZeroGrad")
    assert failed is None and payload is not None
    assert pb.ZeroGradResponse.FromString(bytes(payload)).version == 3
    assert calls.unwrap_response(response + error, "ZeroGrad") == (None, status)


def test_a_call_or_error_field_of_another_wire_type_is_no_answer() -> None:
    """A CallResponse's result fields are messages: one written as a number (a varint, or
    8 fixed bytes that happen to read as a google.rpc.Status) is neither a response nor an
    error, and the answer is refused, not read as one."""
    step = calls.METHODS["Step"][0]
    as_varint = wire.varint(step << 3) + b"\x05"
    status = status_pb2.Status(code=5, message="abcd").SerializeToString()
    assert len(status) == 8
    as_fixed = wire.varint(calls.ERROR_FIELD << 3 | 1) + status
    for data in (as_varint, as_fixed):
        with pytest.raises(ValueError, match="neither a response nor an error"):
            calls.unwrap_response(data, "Step")


def test_an_error_answer_of_a_code_grpc_lacks_is_unknown() -> None:
    """A server newer than this client answering with a status code gRPC has no name for:
    the call fails UNKNOWN, its message kept, as a unary call's unknown code would."""
    status = status_pb2.Status(code=99, message="a code from the future")

    def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield pb.CallResponse(error=status.SerializeToString()).SerializeToString()

    handler = calls_only(serve)
    with (
        bare_server(handler) as address,
        streaming(address) as client,
        pytest.raises(errors.Unknown, match="a code from the future"),
    ):
        client.zero_grad()


def test_an_answered_calls_deadline_does_not_cut_the_idle_stream_after_it(
    streamed: gradwire.Client,
) -> None:
    """The watchdog times the call in progress only: once answered, its deadline passing
    while the stream is idle leaves the stream open for the next call."""
    streamed.timeout = 1.0  # room for a loaded machine: a cut-off call would fail the test
    assert streamed.list_tensors().version == 0
    stream = streamed._calls
    assert stream is not None
    time.sleep(1.5)  # past the answered call's deadline
    assert stream.usable
    streamed.timeout = 30
    assert streamed.list_tensors().version == 0
    assert streamed._calls is stream


def test_unimplemented_after_an_answer_is_the_calls_error_not_a_server_without_calls() -> None:
    """Only a refusal at the stream's start says that the server has no Calls RPC, nothing
    on it run. Once a call was answered, UNIMPLEMENTED ending the stream is the call's
    error, and the call is not made again as a call of its own: it may have run."""

    def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        next(requests)
        yield pb.CallResponse(zero_grad=pb.ZeroGradResponse(version=1)).SerializeToString()
        next(requests)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "gone")

    handler = calls_only(serve)
    with bare_server(handler) as address, streaming(address, timeout=30) as client:
        client.retries = 0
        assert client.zero_grad() == 1
        with pytest.raises(errors.Unimplemented, match="gone"):
            client.zero_grad()  # made as a call of its own, it would fail AssertionError
        assert not client._no_calls


def test_unimplemented_answering_the_first_call_is_its_error_not_a_server_without_calls() -> None:
    """A server with the Calls RPC that answers the stream's first call UNIMPLEMENTED in
    its answer (a server in another language, lacking that call): the stream was not
    refused, it answered. The call fails with its answer's status, the server is still
    one with Calls, and the call is not made again as a call of its own."""
    status = status_pb2.Status(code=grpc.StatusCode.UNIMPLEMENTED.value[0], message="no ZeroGrad")

    def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield pb.CallResponse(error=status.SerializeToString()).SerializeToString()

    handler = calls_only(serve)
    with bare_server(handler) as address, streaming(address, timeout=30) as client:
        client.retries = 0
        with pytest.raises(errors.Unimplemented, match="no ZeroGrad"):
            client.zero_grad()  # made as a call of its own, it would fail AssertionError
        assert not client._no_calls
        assert client._calls is not None and client._calls.usable  # the stream goes on


def test_an_idle_watchdog_ends_and_the_next_deadline_starts_another(
    gated_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread that times a stream's calls ends once no call has had a deadline for
    WATCHDOG_IDLE_S; a later call with one starts a new thread, and is cut off at it."""
    monkeypatch.setattr(call_stream, "WATCHDOG_IDLE_S", 0.05)
    with streaming(f"127.0.0.1:{gated_server.port}", timeout=1.0) as client:
        client.retries = 0
        assert client.list_tensors().version == 0  # its watchdog sleeps until 1 s
        stream = client._calls
        assert stream is not None
        first = stream._watchdog
        assert first is not None
        eventually(lambda: not first.is_alive(), "the idle watchdog did not end")
        a_held_forward_is_cut_off_at_its_deadline(client, release_s=10.0)


def test_closing_a_stream_ends_its_watchdog_at_once(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not after WATCHDOG_IDLE_S, nor at the deadline it sleeps until."""
    monkeypatch.setattr(call_stream, "WATCHDOG_IDLE_S", 600.0)
    with streaming(address, timeout=600) as client:
        assert client.list_tensors().version == 0
        stream = client._calls
        assert stream is not None
        watchdog = stream._watchdog
        assert watchdog is not None and watchdog.is_alive()
        assert client.list_tensors().version == 0
        assert stream._watchdog is watchdog  # one thread times every call, not one each
    eventually(lambda: not watchdog.is_alive(), "the closed stream's watchdog still waits")


def test_a_close_cuts_off_a_call_its_wait_did_not_see_end_on_a_channel_given(
    gated_server: Running,
) -> None:
    """close() waits a second for a call in progress on the Calls stream, then cancels the
    stream. With the channel given (channel=), which close() leaves open, nothing else cuts
    the call off: left, it held the stream, and its place on the server, until the call
    ended of itself. Its caller is told the call was cut off by the close."""
    address = f"127.0.0.1:{gated_server.port}"
    channel = grpc.insecure_channel(address)
    try:
        client = gradwire.Client(address, channel=channel, stream_calls=True, timeout=60)
        client.retries = 0
        failed: list[BaseException] = []

        def forward() -> None:
            try:
                client.forward(Fill.ones(1, 2))  # held in the model until released
            except errors.GradwireError as err:
                failed.append(err)

        held = threading.Thread(target=forward, daemon=True)
        held.start()
        assert Gate.entered.wait(timeout=60)
        client.close()
        held.join(timeout=10)
        assert not held.is_alive(), "the call outlived its client's close"
        assert len(failed) == 1 and isinstance(failed[0], errors.ClientClosed)
        assert str(failed[0]).startswith("Forward cut off")
    finally:
        Gate.release.set()
        channel.close()


def test_the_thread_writing_a_cancelled_streams_requests_ends(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream ended with no end marker written (cancelled; a client dropped unclosed):
    gRPC's thread that waits on its requests sees the end and stops waiting."""
    monkeypatch.setattr(call_stream, "IDLE_LOOK_S", 0.05)
    writing: set[int] = set()  # the streams whose requests a thread waits on
    outgoing = CallStream._outgoing

    def tracked(self: CallStream) -> Iterator[Any]:
        # Marked by the generator itself, not found by walking other threads' frames
        # (reading a running frame's f_locals from another thread is not safe in 3.11).
        writing.add(id(self))
        try:
            yield from outgoing(self)
        finally:
            writing.discard(id(self))

    monkeypatch.setattr(CallStream, "_outgoing", tracked)
    with streaming(address, timeout=30) as client:
        assert client.list_tensors().version == 0
        stream = client._calls
        assert stream is not None
        eventually(lambda: id(stream) in writing, "no thread waits for the stream's requests")
        stream.cancel()
        eventually(lambda: id(stream) not in writing, "the writing thread still waits")


def test_moving_to_another_session_lets_go_of_the_left_stream_s_place() -> None:
    """A client that moves to another session (.session = id) holds one stream, on the
    session it acts on: the stream of the session it left ends as its next call opens the
    other's, letting go of its place on the server. Left open, it held a place for as long
    as the client lived, one more for each move."""
    with running_server() as running:
        address = f"127.0.0.1:{running.port}"
        with gradwire.connect(address, stream_calls=True, timeout=30) as client:
            other = client.open_session(seed=0).detach()
            assert client.list_tensors().version == 0  # the default session's stream
            eventually(lambda: running.servicer.slots.taken == 1)
            client.session = other
            assert client.list_tensors().version == 0  # the other session's
            eventually(lambda: running.servicer.slots.taken == 1)
            client.close_session()


def test_the_contract_says_how_go_decodes_a_calls_error(address: str) -> None:
    """CallResponse.error is a google.rpc.Status, and the contract said to decode it with
    googleapis' status.proto. A Go client that generated its own code from that file, as
    read, panicked as it started, "proto: file "google/rpc/status.proto" is already
    registered": grpc-go's status package imports genproto's. The contract now names
    genproto's package, googleapis' own go_package for the file, and status.FromProto,
    with which a Go client decoded this very answer (found by a review of the .proto as the
    only contract, compiled and called from Go)."""
    with grpc.insecure_channel(address) as channel:
        raw = Raw(channel)
        answer = raw.call(pb.CallRequest(backward=pb.BackwardRequest()))
        assert raw.close() == grpc.StatusCode.OK
    code, _, reason, _ = error_of(answer)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], "NO_LOSS")
    googleapis = Path(status_pb2.__file__).with_name("status.proto").read_text()
    go_package = googleapis.split('option go_package = "')[1].split(";")[0]
    assert go_package == "google.golang.org/genproto/googleapis/rpc/status"
    root = Path(__file__).resolve().parents[1]
    contract = (root / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert f"a Status of {go_package}" in said
    assert "status.FromProto(s).Details()" in said
    assert "already registered" in said
