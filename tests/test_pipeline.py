"""Pipelines: calls written without waiting for their answers, run in order on the server.

A pipeline's calls must leave the state and return the results that the same calls made one
by one do (checked against local PyTorch and against a second server), stop at the first
failure unless told not to, and leave the client's Calls stream in order whatever happens
to them. Through a real server on loopback, with the client's unary methods made to fail so
that no call goes around the pipeline unseen.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import gradwire
from gradwire import calls, errors, limits
from gradwire._pb import trainer_pb2 as pb
from gradwire.fill import Fill
from gradwire_server.app import Running
from tests.reference import run_tutorial
from tests.relay import relay_to
from tests.serve_in_process import bare_server, calls_only, recording_reads, running_server
from tests.test_calls import TARGET, Raw, error_of, serving_without_calls, streaming
from tests.test_concurrency import Gate
from tests.test_streaming import lower_value_limit

ONES = Fill.ones(8, 3, 10, 10)


@pytest.fixture
def piped(address: str) -> Iterator[gradwire.Client]:
    """A client whose calls on its session can only go on its Calls stream."""
    with streaming(address, timeout=30) as client:
        yield client


def test_the_tutorial_in_a_pipeline_equals_local_pytorch(piped: gradwire.Client) -> None:
    """The tutorial's steps, each group written at once: every value equals PyTorch's."""
    piped.reset()
    piped.fill_parameters(0.1)
    piped.set_optimizer("sgd", lr=1.0)
    with piped.pipeline() as p:
        made = tutorial_made_at_once(p)
    equals_local_tutorial(made)


def tutorial_made_at_once(p: gradwire.Pipeline) -> dict[str, gradwire.Pending[Any]]:
    """The tutorial's calls after its set-up, made on a pipeline or a batch, by name."""
    made = {"forward": p.forward(ONES, Fill.ones(8, dtype="int64"))}
    made["before"] = p.get("conv1.weight.grad")
    p.backward()
    made["grad_slice"] = p.get("conv1.weight.grad[0][0][0]")
    made["rows"] = p.get("linear.weight.grad[:2, :3]")
    made["weight_before"] = p.get("conv1.weight")
    made["grad"] = p.get("conv1.weight.grad")
    made["step"] = p.step()
    made["weight_after"] = p.get("conv1.weight")
    p.zero_grad()
    made["after_zero"] = p.read("conv1.weight.grad")
    return made


def equals_local_tutorial(made: dict[str, gradwire.Pending[Any]]) -> None:
    """`made` (tutorial_made_at_once's) holds what local PyTorch computes, bit for bit."""
    got = {name: pending.result() for name, pending in made.items()}
    local = run_tutorial("fill")
    assert got["forward"].loss == local.loss
    assert got["forward"].output_shape == local.output_shape
    assert got["before"] is None
    np.testing.assert_array_equal(got["grad_slice"], local.grad_slice.numpy())
    np.testing.assert_array_equal(got["rows"], local.linear_grad_rows.numpy())
    np.testing.assert_array_equal(got["weight_before"], local.weight_before.numpy())
    np.testing.assert_array_equal(got["grad"], local.grad.numpy())
    np.testing.assert_array_equal(got["weight_after"], local.weight_after.numpy())
    assert got["step"].parameters_updated == 3
    assert got["after_zero"].value is None
    # Versions count the mutations, in the order they were made.
    assert got["step"].version == got["forward"].version + 2


def every_call() -> list[Callable[[Any], Any]]:
    """Every call a pipeline or a batch carries, each a function of a client or of a
    pipeline or batch, in an order in which each succeeds."""
    wide = np.random.default_rng(1).standard_normal((40, 3, 10, 10)).astype(np.float32)
    labels = np.arange(40) % 20
    value = np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32)
    return [
        lambda c: c.reset(seed=3),
        lambda c: c.set_optimizer("sgd", lr=0.5, momentum=0.9),
        lambda c: c.forward(ONES, TARGET),
        lambda c: c.backward(retain_graph=True),
        lambda c: c.backward(),
        lambda c: c.step(),
        lambda c: c.set_optimizer(lr=0.25, keep_state=True),  # the momentum buffers stay
        lambda c: c.zero_grad(set_to_none=False),
        lambda c: c.set("conv1.weight", value),
        lambda c: c.set("conv1.weight.grad[0]", value[0] * 2),
        lambda c: c.step(),
        lambda c: c.forward(wide, labels),  # 48 KiB: its values cut out of the message
        lambda c: c.train_step(wide, labels, fetch=["conv1.weight[0]", "linear.weight"]),
        lambda c: c.read("conv2.weight.grad[1:3]"),
        lambda c: c.read("conv2.weight", values=False),
        lambda c: c.get("linear.weight"),
        lambda c: c.stats("conv2.weight", bins=5),
        lambda c: c.fill_parameters(0.01, ["linear.weight"]),
        lambda c: c.list_tensors(),
    ]


def same_state_and_answers(
    on_a: gradwire.Client, pending: list[gradwire.Pending[Any]], on_b: gradwire.Client
) -> None:
    """`pending`, every_call() made on `on_a` in a pipeline or a batch, answered as the same
    calls made one by one on `on_b`, and the two models left equal."""
    for k, (step, mine) in enumerate(zip(every_call(), pending, strict=True)):
        _assert_same(mine.result(), step(on_b), f"call {k}, {mine.method}")
    for name in ("conv1.weight", "conv2.weight", "linear.weight"):
        np.testing.assert_array_equal(on_a.get(name), on_b.get(name))


def test_a_pipeline_answers_as_the_same_calls_made_one_by_one() -> None:
    """Two servers, one seed: every call the pipeline carries, in one pipeline on one and
    one by one on the other; every result and the weights they leave are equal."""
    with (
        running_server() as a,
        running_server() as b,
        streaming(f"127.0.0.1:{a.port}", timeout=30) as on_a,
        gradwire.connect(f"127.0.0.1:{b.port}", timeout=30) as on_b,
    ):
        with on_a.pipeline() as p:
            pending = [step(p) for step in every_call()]
        same_state_and_answers(on_a, pending, on_b)


def test_a_pipeline_and_a_batch_carry_every_call_the_calls_stream_carries(
    tmp_path: Path,
) -> None:
    """As their docstrings say: the checkpoint calls, which a Calls stream and a Batch carry
    (CallRequest.save_checkpoint, load_checkpoint, delete_checkpoint), had no method on
    them, AttributeError, so a save after a step went outside the block, a round trip of
    its own (found by a review of the client's API as a researcher uses it)."""
    named = {"GetTensor": "read", "SetTensor": "set", "GetStats": "stats"}
    for rpc in calls.METHODS:
        name = named.get(rpc) or re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()
        assert callable(getattr(gradwire.Pipeline, name, None)), rpc
    with (
        running_server(state_dir=tmp_path) as running,
        gradwire.connect(f"127.0.0.1:{running.port}", timeout=30) as client,
    ):
        for kind in ("pipeline", "batch"):
            version = client.list_tensors().version
            with getattr(client, kind)() as p:
                saved = p.save_checkpoint(kind)
                loaded = p.load_checkpoint(kind)
                deleted = p.delete_checkpoint(kind)
                error = p.load_checkpoint(kind).exception()  # looked at: not raised
            assert [c.method for c in (saved, loaded, deleted)] == [
                "SaveCheckpoint",
                "LoadCheckpoint",
                "DeleteCheckpoint",
            ]
            assert saved.result().name == kind and saved.result().version == version
            assert loaded.result() == gradwire.LoadedCheckpoint(version + 1, version)
            assert deleted.result() == saved.result().bytes > 0
            assert isinstance(error, errors.NotFound) and error.reason == "NO_CHECKPOINT"
        assert client.list_checkpoints() == []


@pytest.mark.parametrize("kind", ["pipeline", "batch"])
def test_a_pipeline_or_a_batch_passes_on_the_arguments_every_call_leaves_at_their_defaults(
    address: str, kind: str
) -> None:
    """train_step(zero_grad=False) on a pipeline or a batch adds its gradients to those
    there, as the client's does (with lr 0, the second step's are twice the first's);
    as_torch=True fetches and gets torch tensors; a stats' low and high bound its
    histogram. every_call() leaves these at their defaults, and any of them dropped on the
    way to the client's encoding went unnoticed (found by a review of pipeline.py, third
    pass)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((4, 3, 10, 10)).astype(np.float32)
    labels = np.arange(4)
    fetch = ["linear.weight.grad"]
    with gradwire.connect(address, timeout=30) as client:
        client.reset(seed=3)
        client.set_optimizer("sgd", lr=0.0)
        with getattr(client, kind)() as p:
            steps = [
                p.train_step(x, labels, zero_grad=False, fetch=fetch, as_torch=True)
                for _ in range(2)
            ]
            again = p.train_step(x, labels, fetch=fetch)
            got = p.get("linear.weight", as_torch=True)
            stats = p.stats("linear.weight", bins=4, low=-0.5, high=0.25)
        assert stats.result() == client.stats("linear.weight", bins=4, low=-0.5, high=0.25)
        summary = stats.result().stats
        assert summary is not None and summary.histogram is not None
        assert (summary.histogram.low, summary.histogram.high) == (-0.5, 0.25)
        weight = client.get("linear.weight")
    first, second = (s.result().fetched[0].value for s in steps)
    assert isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
    np.testing.assert_array_equal(second.numpy(), 2 * first.numpy())
    np.testing.assert_array_equal(again.result().fetched[0].value, first.numpy())
    assert isinstance(got.result(), torch.Tensor)
    np.testing.assert_array_equal(got.result().numpy(), weight)


def _assert_same(mine: Any, theirs: Any, where: str) -> None:
    if isinstance(mine, np.ndarray):
        np.testing.assert_array_equal(mine, theirs, err_msg=where)
        assert mine.flags.aligned, where
    elif hasattr(mine, "fetched"):  # a TrainStepResult: all but the arrays, then those
        assert replace(mine, fetched=()) == replace(theirs, fetched=()), where
        for x, y in zip(mine.fetched, theirs.fetched, strict=True):
            _assert_same(x, y, where)
    elif hasattr(mine, "value") and hasattr(mine, "full_shape"):  # a TensorRead
        assert (mine.name, mine.version, mine.shape) == (theirs.name, theirs.version, theirs.shape)
        if mine.value is None:
            assert theirs.value is None, where
        else:
            np.testing.assert_array_equal(mine.value, theirs.value, err_msg=where)
    else:
        assert mine == theirs, where


def test_a_pipeline_stops_at_its_first_failure(piped: gradwire.Client) -> None:
    """A Backward with no Forward fails; the Step and read after it are not run, and say
    why; the block raises the Backward's error; the stream goes on."""
    piped.reset()
    version = piped.list_tensors().version
    with (
        pytest.raises(errors.FailedPrecondition, match="Forward") as raised,
        piped.pipeline() as p,
    ):
        backward = p.backward()
        step = p.step()
        read = p.get("conv1.weight")
    assert raised.value is backward.exception()
    for skipped, previous in ((step, "Backward"), (read, "Step")):
        error = skipped.exception()
        assert isinstance(error, errors.Aborted) and error.reason == "PREVIOUS_FAILED"
        assert error.metadata == {"previous": previous}
        assert error.changes_state == (skipped is step)  # as RemoteError has it: a mutation
        assert "not run" in error.message and "nothing was changed" in error.message
        with pytest.raises(errors.Aborted):
            skipped.result()
    assert piped.list_tensors().version == version  # nothing applied
    assert piped.zero_grad() == version + 1  # the stream goes on
    assert piped._calls is not None and not piped._calls.spent


def test_a_failure_looked_at_in_the_block_is_not_raised_again(piped: gradwire.Client) -> None:
    piped.reset()
    with piped.pipeline() as p:
        backward = p.backward()
        step = p.step()
        with pytest.raises(errors.FailedPrecondition):
            backward.result()
    assert isinstance(step.exception(), errors.Aborted)  # skipped: it follows the failure


def test_without_stop_at_error_every_call_runs(piped: gradwire.Client) -> None:
    piped.reset()
    with pytest.raises(errors.FailedPrecondition), piped.pipeline(stop_at_error=False) as p:
        p.backward()
        forward = p.forward(ONES, TARGET)
        backward = p.backward()
    assert forward.result().loss is not None
    assert backward.result() == forward.result().version + 1


def test_the_first_call_of_a_pipeline_runs_after_an_earlier_failure(
    piped: gradwire.Client,
) -> None:
    """The message before a pipeline's first call on the client's stream is not its own."""
    piped.reset()
    with pytest.raises(errors.FailedPrecondition):
        piped.backward()  # fails, on the same stream
    with piped.pipeline() as p:
        forward = p.forward(ONES, TARGET)
    assert forward.result().loss is not None


def test_results_can_be_read_inside_the_block(piped: gradwire.Client) -> None:
    """result() waits for its call and those before it, and no more; a call made is not
    waited for until its result is asked for."""
    piped.reset()
    with piped.pipeline() as p:
        forward = p.forward(ONES, TARGET)
        backward = p.backward()
        assert not forward.done() and not backward.done()
        assert repr(forward) == "<Pending Forward pending>"
        assert forward.result().loss is not None and forward.done()
        assert repr(forward) == "<Pending Forward done>"
        assert not backward.done()
        assert backward.result() == forward.result().version + 1


def test_a_pipeline_is_used_once_and_takes_calls_only_in_its_block(
    piped: gradwire.Client,
) -> None:
    pipeline = piped.pipeline()
    with pytest.raises(RuntimeError, match="inside its with block"):
        pipeline.step()
    with pipeline as p:
        p.zero_grad()
        # Nor again inside its block: nothing entered one twice (found by a review of
        # pipeline.py, third pass).
        with pytest.raises(RuntimeError, match="used once"), p:
            pass
    with pytest.raises(RuntimeError, match="inside its with block"):
        p.step()
    with pytest.raises(RuntimeError, match="used once"), pipeline:
        pass


def test_a_value_too_large_for_one_message_is_refused_before_sending(
    piped: gradwire.Client,
) -> None:
    piped.stream_above_bytes = 1000
    big = np.zeros((10, 3, 10, 10), dtype=np.float32)  # 12,000 bytes
    with piped.pipeline() as p:
        with pytest.raises(ValueError, match="stream_above_bytes"):
            p.forward(big, np.zeros(10, dtype=np.int64))
        # TrainStep has no streamed form: the client sends it in one message, whatever
        # stream_above_bytes says, and so does a pipeline. It was refused here, "it goes in
        # chunks, as a stream of its own", which it does not (found by a review of the
        # client's API as a researcher uses it); past one message, with the client's words.
        stepped = p.train_step(big, np.zeros(10, dtype=np.int64))
        past = np.zeros(limits.MAX_MESSAGE_BYTES // 4 + 1, dtype=np.float32)
        with pytest.raises(ValueError, match="TrainStep has no streamed form"):
            p.train_step(past, np.zeros(1, dtype=np.int64))
        with pytest.raises(ValueError, match="outside the pipeline"):
            p.set("conv1.weight", np.zeros((16, 3, 3, 3, 2), dtype=np.float32))
        zeroed = p.zero_grad()  # the pipeline goes on
        piped.stream_above_bytes = big.nbytes  # not larger: it goes in the pipeline
        exact = p.forward(big, np.zeros(10, dtype=np.int64))
    assert zeroed.result() > 0
    assert stepped.result().output_shape == exact.result().output_shape == (10, 20)


def test_an_answer_read_into_an_out_of_the_wrong_shape_fails_its_call_alone(
    piped: gradwire.Client,
) -> None:
    """The failure comes in reading the answer, on the client, after the calls behind it
    were sent: it stops none of them, and the block raises it."""
    with pytest.raises(ValueError, match="out= must be"), piped.pipeline() as p:
        unread = p.get("conv1.weight", out=np.empty(3, np.float32))
        after = p.zero_grad()
    assert isinstance(unread.exception(), ValueError)
    assert after.result() == 1


def test_a_read_too_large_for_one_message_says_so(
    piped: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's USE_STREAM refusal reaches the caller: a pipeline reads no stream."""
    lower_value_limit(monkeypatch, 1000)
    with pytest.raises(errors.ResourceExhausted) as raised, piped.pipeline() as p:
        p.get("linear.weight")  # 256,000 bytes
    assert raised.value.reason == "USE_STREAM"


def test_an_invalid_argument_names_the_widened_dtype(piped: gradwire.Client) -> None:
    with piped.pipeline() as p:
        bad = p.forward(np.ones((8, 3, 10, 10), dtype=np.uint8), TARGET)
        error = bad.exception()
    assert isinstance(error, errors.InvalidArgument)
    assert "given as uint8, sent as int32" in error.message


def test_mutations_in_a_pipeline_carry_request_ids_and_the_expected_version(
    piped: gradwire.Client,
) -> None:
    """Under `expecting`, a pipeline's mutations are conditional as the client's are: the
    second of two Steps at the same expected version is refused."""
    piped.reset()
    version = piped.list_tensors().version
    with piped.expecting(version), pytest.raises(errors.Aborted) as raised, piped.pipeline() as p:
        first = p.zero_grad()
        p.zero_grad()
    assert first.result() == version + 1
    assert raised.value.reason == "VERSION_MISMATCH"


def test_a_call_from_another_thread_during_a_pipeline_goes_as_its_own(address: str) -> None:
    """The pipeline holds the client's stream; another thread's call is not held up by it,
    and the pipeline's answers stay in order."""
    with gradwire.connect(address, stream_calls=True, timeout=30) as client:
        client.reset()
        with client.pipeline() as p:
            forward = p.forward(ONES, TARGET)
            other: list[Any] = []
            thread = threading.Thread(target=lambda: other.append(client.list_tensors()))
            thread.start()
            thread.join(30)
            backward = p.backward()
        assert other and other[0].model == "Simple"
        assert backward.result() == forward.result().version + 1


def test_a_client_without_stream_calls_keeps_the_stream_a_pipeline_opened(
    address: str,
) -> None:
    with gradwire.connect(address, timeout=30) as client:
        assert not client.answered
        with client.pipeline() as p:
            first = p.zero_grad()
        # A server was there: said by a pipeline's answers too, as by a batch's (the
        # command line tells a server gone mid-command by it; found by a review of
        # pipeline.py, third pass).
        assert client.answered and client.reached
        stream = client._calls
        assert stream is not None and not stream.spent
        with client.pipeline() as p:
            second = p.zero_grad()
        assert client._calls is stream
        assert second.result() == first.result() + 1
        assert client.zero_grad() == second.result() + 1  # a call of its own, as before


def test_a_pipeline_while_another_thread_holds_the_stream_gets_one_of_its_own(
    address: str,
) -> None:
    """The stream of its own is ended with the block (every answer read): one left open
    held a place on the server for the life of the client, and no test looked (found by a
    review of pipeline.py, third pass)."""
    with gradwire.connect(address, stream_calls=True, timeout=30) as client:
        client.zero_grad()
        shared = client._calls
        assert shared is not None
        with shared.lock:  # as while another thread's call is on it
            with client.pipeline() as p:
                own = p._stream
                assert own is not None and own is not shared
                zeroed = p.zero_grad()
            assert zeroed.result() == 2
            assert own.spent
        assert client._calls is shared and not shared.spent


def test_a_broken_stream_fails_every_call_not_yet_answered(gated_server: Running) -> None:
    """The stream cancelled under a pipeline (its client's timeout passed in the first,
    held call): the first fails DEADLINE_EXCEEDED and those after it with the same cause,
    their changes unknown; the client's next call goes on a new stream."""
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", stream_calls=True, timeout=0.5) as c:
        with pytest.raises(errors.DeadlineExceeded), c.pipeline() as p:
            held = p.forward(Fill.ones(1, 2))  # held in the model until released
            step = p.step()
        assert isinstance(held.exception(), errors.DeadlineExceeded)
        error = step.exception()
        assert isinstance(error, errors.RemoteError) and error.changes_state
        Gate.release.set()
        c.timeout = 30
        assert c.zero_grad() > 0


@pytest.mark.parametrize("kind", ["pipeline", "batch"])
def test_a_read_in_a_pipeline_past_its_timeout_names_the_timeout(
    server: Running, kind: str
) -> None:
    """A large read in a pipeline or a batch over a slow link, the client's timeout passing
    as its answer crosses: it said "Deadline Exceeded" alone, where the same read made on
    its own named the timeout (found by a review of a researcher on a slow, distant link)."""
    with relay_to(server.port) as relay, gradwire.connect(relay.address, timeout=30) as c:
        c.get("linear.weight[0, 0]")  # connected at full speed
        relay.slow(4_000)  # linear.weight's 256 KB take a minute
        c.timeout = 0.5
        with pytest.raises(errors.DeadlineExceeded), getattr(c, kind)() as p:
            read = p.get("linear.weight")
    error = read.exception()
    assert isinstance(error, errors.DeadlineExceeded)
    assert error.message.startswith(
        "Deadline Exceeded: no answer within 0.5 s, the call's timeout"
        if kind == "pipeline"  # the stream's watchdog: gRPC's words for it are the client's
        else "Deadline Exceeded: the call's timeout of 0.5 s ran out with its messages still "
        "crossing the network"
    )


def test_a_call_made_after_the_stream_broke_is_not_sent(gated_server: Running) -> None:
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", timeout=0.5) as c:
        with pytest.raises(errors.DeadlineExceeded), c.pipeline() as p:
            held = p.forward(Fill.ones(1, 2))  # held in the model past the timeout
            with pytest.raises(errors.DeadlineExceeded):
                held.result()
            late = p.zero_grad()
            assert late.done()
        error = late.exception()
        assert isinstance(error, errors.DeadlineExceeded) and not error.changes_state
        assert error.message.startswith("ZeroGrad not sent, the stream having ended")
        Gate.release.set()
        c.timeout = 30
        assert c.zero_grad() == 2  # after the held Forward's 1: the late ZeroGrad never ran


def test_a_call_made_after_the_client_closed_is_not_sent_and_says_why(address: str) -> None:
    """The client closed inside the block (another thread's doing, say): a call made then
    is not sent, and says that the client closed the stream, which nothing read (found by
    a review of pipeline.py, third pass)."""
    client = gradwire.connect(address, timeout=30)
    with (
        pytest.raises(errors.ClientClosed, match="the client closed") as raised,
        client.pipeline() as p,
    ):
        p.zero_grad().result()
        client.close()
        late = p.zero_grad()
    assert raised.value is late.exception()
    assert str(raised.value) == "ZeroGrad not sent: the client closed the pipeline's stream"


def test_a_shape_only_read_on_a_pipeline_or_a_batch_asks_for_no_values() -> None:
    """read(values=False) on a pipeline or a batch asks for the shape alone, as on the
    client: every_call()'s shape-only read was answered equal with the values sent and
    dropped, and nothing looked at the request (found by a review of pipeline.py, third
    pass)."""
    asked: list[bool] = []
    with (
        bare_server(recording_reads(asked)) as address,
        gradwire.connect(address, timeout=10) as client,
    ):
        for kind in ("pipeline", "batch"):
            with getattr(client, kind)() as p:
                read = p.read("w", values=False)
            assert read.result().shape == (2, 3) and read.result().value is None
    assert asked == [True, True]  # omit_values


def test_a_server_without_calls_runs_a_pipeline_as_calls_of_their_own() -> None:
    """Found at the first answer: the calls sent were not run, and are made again, each as
    a call of its own, stopping at a failure as the server would."""
    with serving_without_calls() as address, gradwire.connect(address, timeout=30) as client:
        with pytest.raises(errors.FailedPrecondition), client.pipeline() as p:
            first = p.zero_grad()
            backward = p.backward()
            step = p.step()
            listing = p.list_tensors()
        assert first.result() == 1
        assert isinstance(backward.exception(), errors.FailedPrecondition)
        assert repr(backward) == "<Pending Backward failed>"
        skipped = step.exception()
        assert isinstance(skipped, errors.Aborted) and skipped.reason == "PREVIOUS_FAILED"
        assert skipped.changes_state and skipped.metadata == {"previous": "Backward"}
        # Why it was not run, in full, which nothing read (found by a review of
        # pipeline.py, third pass).
        assert skipped.message == (
            "Step not run: the call before it in this pipeline, Backward, did not succeed, "
            "and this one was to run only after a success; nothing was changed"
        )
        assert listing.exception().metadata == {"previous": "Step"}  # type: ignore[union-attr]
        assert client._no_calls
        # Found before: at once, as calls of their own.
        with pytest.raises(ValueError, match="out= must be"), client.pipeline() as p:
            again = p.zero_grad()
            assert again.done()
            # A failure in reading an answer (an out= of the wrong shape) stops nothing.
            unread = p.get("weight", out=np.empty(3, np.float32))
            after = p.zero_grad()
        assert again.result() == 2
        assert isinstance(unread.exception(), ValueError) and after.result() == 3
        # Nor does a call the client did not send (its session closed): each after it is
        # refused for that itself, not skipped as if the one before it had failed on the
        # server. Nothing made a call on a closed session there (found by a review of
        # pipeline.py, third pass).
        session = client.open_session()
        session.close_session()
        with pytest.raises(errors.ClientClosed), session.pipeline() as p:
            unsent = [p.zero_grad(), p.list_tensors()]
        for pending in unsent:
            error = pending.exception()
            assert isinstance(error, errors.ClientClosed), error
            assert "is closed" in str(error), error
        with pytest.raises(errors.FailedPrecondition), client.pipeline(stop_at_error=False) as p:
            failed = p.backward()
            ran = p.zero_grad()
        assert isinstance(failed.exception(), errors.FailedPrecondition) and ran.result() == 4


# --- the contract, as another language's client sees it -------------------------------------


def test_if_previous_succeeded_on_raw_messages(raw: Raw) -> None:
    """As the .proto says: a message with if_previous_succeeded after a failure is not run;
    a message without it is; a skipped message counts as failed for the next."""
    backward = pb.CallRequest(backward=pb.BackwardRequest(), if_previous_succeeded=True)
    assert error_of(raw.call(backward))[2] == "NO_LOSS"  # the stream's first: it runs
    step = pb.CallRequest(step=pb.StepRequest(), if_previous_succeeded=True)
    code, message, reason, metadata = error_of(raw.call(step))
    assert (code, reason) == (grpc.StatusCode.ABORTED.value[0], "PREVIOUS_FAILED")
    assert metadata == {"previous": "Backward"} and "Step not run" in message
    read = pb.CallRequest(get_tensor=pb.GetTensorRequest(name="conv1.weight"))
    read.if_previous_succeeded = True
    assert error_of(raw.call(read))[3] == {"previous": "Step"}
    read.if_previous_succeeded = False
    assert raw.call(read).WhichOneof("result") == "get_tensor"  # unconditional: it runs
    read.if_previous_succeeded = True
    assert raw.call(read).WhichOneof("result") == "get_tensor"  # after a success: it runs
    assert raw.close() == grpc.StatusCode.OK


def test_each_mutation_carries_a_fresh_request_id_and_each_call_after_the_first_its_condition(
    piped: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pipeline writes: a request id on each mutation (a read takes none), and
    if_previous_succeeded on each call but its first, none with stop_at_error=False; and
    each the client's timeout as its deadline."""
    sent: list[tuple[str, str | None, bool]] = []
    timeouts: list[int] = []  # each call's deadline: the client's timeout, 30 s
    envelope = calls.request_pieces

    def recorded(method: str, request: Any, request_id: str | None, *rest: Any) -> Any:
        pieces = envelope(method, request, request_id, *rest)
        parsed = pb.CallRequest.FromString(b"".join(map(bytes, pieces)))
        assert parsed.WhichOneof("call") == calls.METHODS[method][1]
        sent.append((method, parsed.request_id or None, parsed.if_previous_succeeded))
        timeouts.append(parsed.timeout_ms)
        return pieces

    monkeypatch.setattr(calls, "request_pieces", recorded)
    with piped.pipeline() as p:
        p.zero_grad()
        p.get("conv1.weight[0]")
        p.zero_grad()
    with piped.pipeline(stop_at_error=False) as p:
        p.zero_grad()
        p.zero_grad()
    assert [(m, condition) for m, _, condition in sent] == [
        ("ZeroGrad", False), ("GetTensor", True), ("ZeroGrad", True),
        ("ZeroGrad", False), ("ZeroGrad", False),
    ]  # fmt: skip
    ids = [request_id for method, request_id, _ in sent if method == "ZeroGrad"]
    assert all(re.fullmatch("[0-9a-f]{32}", i or "") for i in ids) and len(set(ids)) == 4
    assert sent[1][1] is None
    assert timeouts == [30_000] * 5


def test_calls_are_written_without_waiting_for_the_answers_before_them(
    gated_server: Running,
) -> None:
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", timeout=30) as client:
        with client.pipeline() as p:
            held = p.forward(Fill.ones(1, 2))  # held in the model until released
            assert Gate.entered.wait(30)
            zeroed = p.zero_grad()  # written while the Forward is still running
            assert not held.done() and not zeroed.done()
            Gate.release.set()
        assert zeroed.result() == held.result().version + 1


def test_an_error_in_the_block_still_reads_the_answers_in_order(piped: gradwire.Client) -> None:
    piped.reset()
    with pytest.raises(RuntimeError, match="the caller's own"), piped.pipeline() as p:
        forward = p.forward(ONES, TARGET)
        backward = p.backward()
        raise RuntimeError("the caller's own")
    assert forward.done() and backward.result() == forward.result().version + 1
    assert piped._calls is not None and not piped._calls.spent
    assert piped.zero_grad() == backward.result() + 1  # its own answer, on the same stream


def test_an_interrupt_while_waiting_cancels_the_stream(
    gated_server: Running, ctrl_c: Callable[[float], None]
) -> None:
    """Ctrl-C while a pipeline waits: the calls unanswered raise Cancelled, their running
    unknown, and the stream is cancelled, so that no later call is given their answers (a
    review found a later call answered with an earlier one's, or every later call failing
    "Internal gRPC call error 8")."""
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", stream_calls=True, timeout=30) as c:
        with pytest.raises(errors.Cancelled) as raised, c.pipeline() as p:
            held = p.forward(Fill.ones(1, 2))  # held in the model until released
            after = p.zero_grad()
            listed = p.list_tensors()
            assert Gate.entered.wait(30)
            ctrl_c(0.3)
            with pytest.raises(KeyboardInterrupt):
                held.result()
        assert raised.value is held.exception()  # the block's end raises what was not seen
        for pending in (held, after):
            error = pending.exception()
            assert isinstance(error, errors.Cancelled) and error.changes_state
            # What was interrupted, which nothing read (found by a review of pipeline.py,
            # third pass).
            assert error.message == (
                f"{pending.method} not answered: the wait for its answer or an earlier one "
                "was interrupted, and the pipeline's stream was cancelled; whether the call "
                "ran is not known (read the state version)"
            )
        read = listed.exception()  # a read changes nothing, run or not
        assert isinstance(read, errors.Cancelled) and not read.changes_state
        Gate.release.set()
        zeroed = c.zero_grad()  # on a new stream, answered with its own answer
        assert c.list_tensors().version == zeroed


def test_an_interrupt_in_the_block_cancels_the_stream_without_waiting(
    gated_server: Running,
) -> None:
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", stream_calls=True, timeout=30) as c:
        with pytest.raises(KeyboardInterrupt), c.pipeline() as p:
            held = p.forward(Fill.ones(1, 2))  # held in the model until released
            assert Gate.entered.wait(30)
            raise KeyboardInterrupt  # as from Ctrl-C in the caller's own code
        cancelled = held.exception()
        assert isinstance(cancelled, errors.Cancelled)  # not waited for
        # Why it was not answered, and what that leaves unknown: nothing read the message.
        assert cancelled.message == (
            "Forward not answered: the pipeline ended with answers unread, and the "
            "pipeline's stream was cancelled; whether the call ran is not known (read the "
            "state version)"
        )
        assert cancelled.changes_state
        Gate.release.set()
        zeroed = c.zero_grad()
        assert c.list_tensors().version == zeroed


def test_an_interrupted_call_on_the_stream_leaves_the_next_call_its_own_answer(
    gated_server: Running, ctrl_c: Callable[[float], None]
) -> None:
    """The same for a call of the client's own on its Calls stream (stream_calls)."""
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", stream_calls=True, timeout=30) as c:
        ctrl_c(0.5)
        with pytest.raises(KeyboardInterrupt):
            c.forward(Fill.ones(1, 2))  # held in the model until released
        assert c._calls is not None and c._calls.spent
        Gate.release.set()
        zeroed = c.zero_grad()
        assert c.list_tensors().version == zeroed


def _two_zero_grads_answered(
    garbled: bytes,
) -> tuple[gradwire.Pending[int], gradwire.Pending[int], gradwire.Pending[int]]:
    """Two ZeroGrads in a pipeline, on a Calls stream that answers the first with `garbled`
    (so the pipeline's block raises INTERNAL) and the second as it should; and a third
    made once the first's answer was read."""
    fine = pb.CallResponse(zero_grad=pb.ZeroGradResponse(version=2)).SerializeToString()

    def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for answer, _ in zip((garbled, fine), requests, strict=False):
            yield answer

    handler = calls_only(serve)
    with (
        bare_server(handler) as address,
        gradwire.connect(address) as client,
        pytest.raises(errors.Internal, match="a garbled answer"),
        client.pipeline() as p,
    ):
        first, second = p.zero_grad(), p.zero_grad()
        first.exception()
        late = p.zero_grad()
    return first, second, late


def test_an_answer_that_does_not_decode_fails_its_call_and_the_calls_after_it() -> None:
    """The first ZeroGrad's answer names its call but holds bytes no ZeroGradResponse is:
    that call fails INTERNAL, garbled, and the stream, no longer trusted, fails the second,
    whose answer was well formed. Protobuf's DecodeError escaped the pipeline before (a
    review of the forty-sixth session's change)."""
    garbled = b"\x9a\x01\x02\x08\xff"  # CallResponse.zero_grad (19) holding no response
    first, second, late = _two_zero_grads_answered(garbled)
    assert str(first.exception()).startswith("INTERNAL: a garbled answer (not a ZeroGrad")
    assert "a garbled answer" in str(second.exception())
    _not_sent_after_a_garbled_answer(late)


def _not_sent_after_a_garbled_answer(late: gradwire.Pending[int]) -> None:
    """`late`, made after a garbled answer was read, was not sent: the stream, no longer
    trusted, was cancelled then, not at the block's end, which ran a call made in between
    and said it might have (found by a review of pipeline.py, third pass)."""
    error = late.exception()
    assert isinstance(error, errors.Internal) and not error.changes_state
    assert error.message.startswith("ZeroGrad not sent, the stream having ended: "), error


@pytest.mark.parametrize("kind", ["pipeline", "batch"])
def test_a_call_cut_off_at_the_stops_grace_says_the_server_stopped(
    gated_server: Running, kind: str
) -> None:
    """A call still running when a stop's grace period ended failed with gRPC's words alone,
    "UNAVAILABLE: Cancelling all calls", which said neither that the server had stopped nor
    that the call may have run (found by a review of several users at once)."""
    stopper = threading.Thread(target=lambda: gated_server.stop(grace=0.2))
    with gradwire.connect(f"127.0.0.1:{gated_server.port}", timeout=30) as client:
        try:
            with (
                pytest.raises(errors.Unavailable) as cut,
                getattr(client, kind)(stop_at_error=False) as calls_,
            ):
                calls_.forward(Fill.ones(1, 2), Fill.ones(1, dtype="int64"))
                read = calls_.get("weight")
                if kind == "pipeline":
                    assert Gate.entered.wait(timeout=60)
                    stopper.start()
                else:  # its calls go at the block's end, and wait there for the answers
                    threading.Thread(
                        target=lambda: Gate.entered.wait(timeout=60) and stopper.start(),
                        daemon=True,
                    ).start()
            with pytest.raises(errors.Unavailable) as unread:
                read.result()
        finally:
            Gate.release.set()
            stopper.join(timeout=60)
    assert "the server stopped with this call in progress" in str(cut.value), cut.value
    assert "may have been applied" in str(cut.value) and cut.value.changes_state
    assert "make it again once the server is back" in str(unread.value), unread.value


@pytest.mark.parametrize(
    ("ending", "error_type", "said"),
    [
        ("unanswered", errors.Internal, "ended its stream of calls unanswered"),
        ("failed", errors.Unavailable, "the stream failed"),
    ],
)
def test_a_call_made_after_the_server_ended_the_stream_is_not_sent(
    ending: str, error_type: type[errors.RemoteError], said: str
) -> None:
    """The server ends its side with the first call unanswered (a bug), or fails it: that
    call fails, perhaps applied; a call made after it is not written into the ended stream,
    and says so, nothing changed."""

    def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        next(requests)
        if ending == "failed":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the stream failed")
        yield from ()

    handler = calls_only(serve)
    with (
        bare_server(handler) as address,
        gradwire.connect(address, timeout=30) as client,
        pytest.raises(error_type, match=said),
        client.pipeline() as p,
    ):
        first = p.zero_grad()
        assert first.exception() is not None
        late = p.zero_grad()
        assert late.done()
    error = late.exception()
    assert isinstance(error, error_type) and not error.changes_state
    assert error.message.startswith("ZeroGrad not sent, the stream having ended")


def test_an_answer_to_another_call_fails_its_call_and_the_calls_after_it() -> None:
    """The first ZeroGrad is answered as a Step: that call fails INTERNAL, garbled, and the
    stream, whose order can no longer be trusted, fails the second with the same cause,
    though its answer was well formed."""
    step = pb.CallResponse(step=pb.StepResponse(version=1)).SerializeToString()
    first, second, late = _two_zero_grads_answered(step)
    assert str(first.exception()).startswith("INTERNAL: a garbled answer (a Step response")
    error = second.exception()
    assert isinstance(error, errors.Internal) and "a garbled answer" in str(error)
    assert error.changes_state
    _not_sent_after_a_garbled_answer(late)
