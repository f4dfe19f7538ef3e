"""A server stopped and started again at its address: the clients of it in a process, the ones
made before and the ones made after, get through as soon as it is back (limits.channel_options
says what gRPC's defaults did instead)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch

import gradwire
from gradwire import limits, rewatch
from gradwire._pb import trainer_pb2 as pb
from gradwire.errors import ClientClosed, NotFound, Unavailable
from gradwire_server.app import start
from gradwire_server.models import TINY_MLP, ModelSpec
from gradwire_server.trainer import Trainer
from tests.background import Reader, eventually
from tests.serve_in_process import bare_server, old_trainer, running_server, sends_waiting


def _answers(client: gradwire.Client) -> bool:
    try:
        client.list_tensors()
    except Unavailable:
        return False
    return True


def test_a_client_made_after_a_restart_gets_through_at_once() -> None:
    # Found by a CI run of the suite: a test's fresh server had a port an earlier test's
    # server had had, an earlier client still held a channel to it, and the test's first
    # call failed at once, UNAVAILABLE "failed to connect to all addresses".
    later = Trainer(device="cpu", seed=0)  # made first: it is the slow part of a start
    with running_server() as first:
        port = first.port
        older = gradwire.Client(f"127.0.0.1:{port}")
        assert _answers(older)
    # The server gone, the older client's connection fails, and gRPC waits about a second
    # before trying it again.
    assert not _answers(older)
    again = start(later, "127.0.0.1", port)
    try:
        with gradwire.Client(f"127.0.0.1:{port}") as newer:
            newer.retries = 0  # its first attempt, not a retry after the older's wait
            assert _answers(newer)
    finally:
        again.stop(grace=None)
        older.close()


#: Long enough for gRPC's default wait between two attempts to have grown past 4 s.
OUTAGE_S = 10.0


def test_a_client_gets_through_soon_after_a_long_outage() -> None:
    # With gRPC's defaults the wait between two attempts to reconnect grows by 1.6 times
    # from 1 s, to 2 minutes: after a 10 s outage the client got through 4.8-6.8 s after
    # the server was back. Now it tries at least every MAX_RECONNECT_WAIT_S (and gRPC's
    # jitter, 20%). Two seconds more to connect and answer a call on a busy machine, which
    # still tells the two apart: a second was tight (found by a review of the tests).
    with running_server() as first:
        port = first.port
        client = gradwire.Client(f"127.0.0.1:{port}")
        assert _answers(client)
    end = time.monotonic() + OUTAGE_S
    while time.monotonic() < end:  # a script watching the server, as it would
        assert not _answers(client)
        time.sleep(0.5)
    within = limits.MAX_RECONNECT_WAIT_S * 1.2 + 2.0
    try:
        with running_server(port=port):
            eventually(
                lambda: _answers(client), f"not through in {within} s", within=within, every=0.05
            )
    finally:
        client.close()


# --- A watch told to reconnect (watch(reconnect=True), gradwire.rewatch) ---


@pytest.mark.parametrize("latest", [True, False], ids=["latest", "each"])
def test_a_watch_told_to_reconnect_goes_on_once_a_restarted_server_is_back(latest: bool) -> None:
    """A researcher's watch ended with UNAVAILABLE when the server was restarted: told to
    reconnect, it says so through on_lost and goes on with the state of the server that
    came back, then its changes. One told nothing ends with the error, as before."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as first:
        port = first.port
        client = gradwire.Client(f"127.0.0.1:{port}")
        plain = Reader(client.watch(["loss"], latest=latest)).started()
        watch = Reader(
            client.watch(["loss"], latest=latest, reconnect=True, on_lost=lost.append),
            until=lambda update: update.cause == "Reset",
        ).started()
    try:
        eventually(lambda: len(lost) == 1, "on_lost not called")
        with pytest.raises(Unavailable):
            plain.join()
        with running_server(TINY_MLP, port=port) as second:
            eventually(lambda: len(watch.messages) == 2, "no update once back")
            with gradwire.Client(f"127.0.0.1:{second.port}") as other:
                other.reset(seed=1)
            updates = watch.join()
    finally:
        client.close()
    assert [(u.cause, u.version) for u in updates] == [("Watch", 0), ("Watch", 0), ("Reset", 1)]
    assert len(lost) == 1 and isinstance(lost[0], Unavailable), lost  # once, however many tries


def test_a_watch_told_to_reconnect_rides_out_one_restart_after_another() -> None:
    """Each time the server goes is told (on_lost), not only the first: a second restart
    is a second absence."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as first:
        port = first.port
        client = gradwire.Client(f"127.0.0.1:{port}")
        watch = Reader(client.watch(["loss"], reconnect=True, on_lost=lost.append)).started()
    try:
        eventually(lambda: len(lost) == 1, "on_lost not called")
        with running_server(TINY_MLP, port=port):
            eventually(lambda: len(watch.messages) == 2, "no update once back")
        eventually(lambda: len(lost) == 2, "on_lost not called for the second restart")
        with running_server(TINY_MLP, port=port):
            eventually(lambda: len(watch.messages) == 3, "no update once back again")
    finally:
        client.close()
    assert [u.cause for u in watch.messages] == ["Watch"] * 3


def test_a_watch_told_to_reconnect_ends_at_its_timeout_while_the_server_is_away() -> None:
    """`timeout` counts across the gap: passed while the server is away, the watch ends as
    it does in an update's place, DeadlineExceeded, the server's going its cause."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as server:
        client = gradwire.Client(f"127.0.0.1:{server.port}")
        start = time.monotonic()
        watch = Reader(
            client.watch(["loss"], timeout=3.0, reconnect=True, on_lost=lost.append)
        ).started()
    try:
        with pytest.raises(gradwire.errors.DeadlineExceeded, match=r"timeout \(3 s\) passed while"):
            watch.join()
        took = time.monotonic() - start
    finally:
        client.close()
    assert 3.0 <= took < 3.0 + rewatch.RETRY_S + 2.0, took  # not a try's wait past it
    assert len(watch.messages) == 1 and len(lost) == 1
    # The error the server went with, not the last try's (failed to connect).
    assert watch.errors[0].__cause__ is lost[0].__cause__  # the call's own error


def test_a_watch_told_to_reconnect_ends_at_its_timeout_not_at_the_end_of_a_try_s_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timeout that falls within the wait between two tries ends the watch then, not at
    the wait's end (here a minute)."""
    monkeypatch.setattr(rewatch, "RETRY_S", 60.0)
    with running_server(TINY_MLP) as server:
        client = gradwire.Client(f"127.0.0.1:{server.port}")
        start = time.monotonic()
        watch = Reader(client.watch(["loss"], timeout=2.0, reconnect=True)).started()
    try:
        with pytest.raises(gradwire.errors.DeadlineExceeded):
            watch.join(timeout=90)
        took = time.monotonic() - start
    finally:
        client.close()
    assert 2.0 <= took < 10.0, took


def test_a_watch_told_to_reconnect_ends_at_its_timeout_with_its_server_there_all_along(
    client: gradwire.Client,
) -> None:
    """The timeout holds for the first opening too, not only across a server's absence."""
    watch = Reader(client.watch(["loss"], timeout=1.0, reconnect=True)).started()
    with pytest.raises(gradwire.errors.DeadlineExceeded):
        watch.join()
    assert [u.cause for u in watch.messages] == ["Watch"]


def _watch_going_once(calls: list[float | None], *, back: bool) -> grpc.GenericRpcHandler:
    """An old_trainer whose Watch notes the seconds each call has left in `calls`; its first
    call answers an update and ends UNAVAILABLE, as a server that went away. Each later
    call, `back`: answers an update and ends (OK, as only another server would); else ends
    UNAVAILABLE at once, a server still away."""

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.append(context.time_remaining())
        if len(calls) == 1 or back:
            yield pb.WatchUpdate(version=len(calls)).SerializeToString()
        if len(calls) == 1 or not back:
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    return old_trainer(Watch=grpc.unary_stream_rpc_method_handler(watch))


@pytest.mark.parametrize("latest", [True, False], ids=["latest", "each"])
def test_a_watch_told_to_reconnect_ends_with_its_stream_and_counts_its_timeout_across(
    latest: bool,
) -> None:
    """A watch opened again is given the seconds its timeout has left, not the whole timeout
    again; and once a stream of it ends cleanly, the watch ends, rather than reading the
    ended stream again and again."""
    calls: list[float | None] = []
    lost: list[Unavailable] = []
    with (
        bare_server(_watch_going_once(calls, back=True)) as address,
        gradwire.connect(address, timeout=10) as client,
    ):
        watch = client.watch("w", timeout=30, latest=latest, reconnect=True, on_lost=lost.append)
        updates = Reader(watch).join()
    assert [u.version for u in updates] == [1, 2]
    assert len(lost) == 1
    first, second = calls
    assert first is not None and second is not None
    assert second < first - rewatch.RETRY_S / 2, calls  # a try's wait at least has gone


def test_a_watch_told_to_reconnect_waits_between_its_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server away is tried again once each RETRY_S, not over and over: with the timeout
    passing within the first wait, the server is called once, at the first opening."""
    monkeypatch.setattr(rewatch, "RETRY_S", 60.0)
    calls: list[float | None] = []
    with (
        bare_server(_watch_going_once(calls, back=False)) as address,
        gradwire.connect(address, timeout=10) as client,
    ):
        watch = Reader(client.watch("w", timeout=2.0, reconnect=True))
        with pytest.raises(gradwire.errors.DeadlineExceeded):
            watch.join()
    assert len(calls) == 1 and len(watch.messages) == 1


def test_a_watch_told_to_reconnect_does_not_wait_for_a_server_that_never_answered() -> None:
    """Nothing listening (a wrong target) is the error it was, at once: only a server that
    answered and went away is waited for."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lost: list[Unavailable] = []
    with gradwire.Client(f"127.0.0.1:{port}") as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            next(client.watch(["loss"], reconnect=True, on_lost=lost.append))
    assert time.monotonic() - start < rewatch.RETRY_S + 10.0  # its retries', not ours
    assert lost == []


def test_a_watch_told_to_reconnect_to_a_session_the_restart_lost_ends_not_found() -> None:
    """A session lives in its server's memory: the restarted server does not know it, and
    the watch ends with NotFound rather than waiting on."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as first:
        port = first.port
        client = gradwire.Client(f"127.0.0.1:{port}")
        session = client.open_session()
        watch = Reader(session.watch(["loss"], reconnect=True, on_lost=lost.append)).started()
    try:
        eventually(lambda: len(lost) == 1, "on_lost not called")
        with running_server(TINY_MLP, port=port), pytest.raises(NotFound):
            watch.join()
    finally:
        session.detach()  # its server is gone: nothing to close
        client.close()
    assert len(watch.messages) == 1


def test_a_watch_told_to_reconnect_ends_when_its_client_closes_while_the_server_is_away() -> None:
    """Closing the client ends a watch waiting for its server, ClientClosed, rather than
    leaving it trying for ever."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as server:
        client = gradwire.Client(f"127.0.0.1:{server.port}")
        watch = Reader(client.watch(["loss"], reconnect=True, on_lost=lost.append)).started()
    eventually(lambda: len(lost) == 1, "on_lost not called")
    client.close()
    with pytest.raises(ClientClosed):
        watch.join(timeout=rewatch.RETRY_S + 10.0)


def test_ctrl_c_while_a_watch_waits_for_its_server_is_a_keyboard_interrupt_alone(
    ctrl_c: Callable[[float], None],
) -> None:
    """Ctrl-C while a watch told to reconnect waited between two tries raised
    KeyboardInterrupt "during handling of" the last try's error: a notebook's cell printed
    first the traceback of an UNAVAILABLE, "failed to connect ... Connection refused", as if
    the watch had failed (found by a review of the client as a researcher uses it in a
    notebook)."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as server:
        client = gradwire.Client(f"127.0.0.1:{server.port}")
        updates = client.watch(["loss"], reconnect=True, on_lost=lost.append)
        assert next(updates).cause == "Watch"
    try:
        ctrl_c(rewatch.RETRY_S * 2.5)  # in a wait between two tries, most likely
        with pytest.raises(KeyboardInterrupt) as pressed:
            next(updates)
    finally:
        client.close()
    assert len(lost) == 1
    assert pressed.value.__context__ is None, repr(pressed.value.__context__)


def test_a_watch_s_reconnect_arguments_are_checked_when_it_is_made() -> None:
    """An on_lost that would never be called, or could not be, and a reconnect that is
    not a bool, are refused at once, before any call."""
    client = gradwire.Client("127.0.0.1:1")  # never called
    try:
        with pytest.raises(ValueError, match="add reconnect=True"):
            client.watch(["loss"], on_lost=print)
        with pytest.raises(TypeError, match="on_lost must be a function"):
            client.watch(["loss"], reconnect=True, on_lost="print")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="reconnect"):
            client.watch(["loss"], reconnect="yes")  # type: ignore[arg-type]
    finally:
        client.close()


def test_a_watch_told_to_reconnect_opened_while_a_server_its_client_reached_is_away_waits() -> None:
    """The docstring says a server "that answered and then went away" is watched again once
    it is back, and one "that never answered (a wrong target)" raises: a notebook's client
    whose server had answered (`client.answered`) and was being restarted as the watch's cell
    ran raised Unavailable at once, as for a wrong target (found by a review of watching
    training remotely)."""
    with running_server(TINY_MLP) as first:
        port = first.port
        client = gradwire.Client(f"127.0.0.1:{port}")
        client.list_tensors()
    try:
        assert client.answered
        watch = Reader(client.watch(["loss"], reconnect=True))
        time.sleep(rewatch.RETRY_S * 2)  # the restart under way: a server still loading
        with running_server(TINY_MLP, port=port):
            eventually(lambda: bool(watch.messages or watch.errors), "no update once back")
            assert not watch.errors, watch.errors  # raised UNAVAILABLE at once
            assert watch.messages[0].cause == "Watch"
    finally:
        client.close()


def test_what_on_lost_is_given_does_not_say_the_watch_ends() -> None:
    """The README's `on_lost=print` printed "UNAVAILABLE: the server is stopping: this watch
    ends here; watch again once it is back" and the watch went on, watched again by itself:
    the error's advice is for a watch that ends, which a reconnecting one does not (the CLI
    cuts it off: "not its advice, which --reconnect follows"). Found by a review of
    watching training remotely."""
    lost: list[Unavailable] = []
    with running_server(TINY_MLP) as server:
        client = gradwire.Client(f"127.0.0.1:{server.port}")
        watch = Reader(client.watch(["loss"], reconnect=True, on_lost=lost.append)).started()
        server.stop(grace=1.0)  # a graceful stop: "the server is stopping"
        eventually(lambda: len(lost) == 1, "on_lost not called")
    try:
        said = str(lost[0])
        assert "ends here" not in said, said
        assert "watch again" not in said, said
    finally:
        client.close()
        with pytest.raises(ClientClosed):
            watch.join()


def test_a_watch_told_to_reconnect_that_comes_back_to_a_full_server_waits_for_a_place(
    trainer: Trainer,
) -> None:
    """A watch the server ended for another call, its updates left unread (a notebook busy
    elsewhere, a process suspended), was opened again onto a server whose places that call's
    stream now held: it ended BUSY, a refusal that passes, where --reconnect was to ride
    such things out (found by a review of this session's new features). It tries again
    until a place frees."""
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    running.servicer.sending.unread_s = 0.2
    address = f"127.0.0.1:{running.port}"
    lost: list[Unavailable] = []
    try:
        with (
            gradwire.connect(address, timeout=None) as watcher,
            gradwire.connect(address, timeout=30) as other,
        ):
            updates = watcher.watch(
                ["conv1.weight", "conv2.weight", "linear.weight"],
                values=True,
                latest=False,
                reconnect=True,
                on_lost=lost.append,
            )
            next(updates)
            x, y = gradwire.Fill.ones(8, 3, 10, 10), gradwire.Fill.ones(8, dtype="int64")
            for _ in range(400):  # 400 updates due, the watcher reading none
                other.train_step(x, y)
            sends_waiting(running, 1)
            held = [other.watch(["loss"]) for _ in range(2)]  # the second ends the unread watch
            for watch in held:
                next(watch)
            # Reads what was sent, then opens the watch again, refused BUSY; it stops at the
            # first update after that.
            came = Reader(updates, until=lambda update: bool(lost))
            eventually(lambda: bool(lost), "the watch was not ended for the other watch")
            time.sleep(1.5)  # tries refused BUSY, waited out
            assert came.thread.is_alive() and not came.errors, came.errors
            held[0].close()  # a place frees
            came.thread.join(timeout=30)
            assert not came.errors and not came.thread.is_alive()
            assert came.messages[-1].version == trainer.version  # the state, watched again
            cause = lost[0].__cause__
            assert isinstance(cause, Unavailable) and rewatch.ended_unread(cause)
            held[1].close()
    finally:
        running.stop(grace=None)


#: Seconds each pass of _SlowStep's model takes once slowed: a large model's step.
STEP_S = 6.0


class _SlowStep(torch.nn.Module):
    """A model whose passes take STEP_S seconds once `slow` is set, as a large model's
    steps do; `started` is set as such a pass begins."""

    slow = threading.Event()
    started = threading.Event()

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _SlowStep.slow.is_set():
            _SlowStep.started.set()
            time.sleep(STEP_S)
        out: torch.Tensor = self.linear(x)
        return out


def test_a_watch_is_told_the_server_is_stopping_while_a_long_step_runs() -> None:
    """The README: a stop "ends gradwire's open Watch and Train streams at once,
    UNAVAILABLE (STOPPING)". With a step in progress (a large model's takes seconds) the
    watch heard nothing until that step ended, while its server already took no new call:
    on_lost came, and `gradwire watch` said the server went away, a whole step late (6 s
    here; found by a review of watching training remotely)."""
    lost: list[float] = []
    spec = ModelSpec("SlowStep", _SlowStep, sample_shape=(2,), num_classes=2)
    _SlowStep.slow.clear()
    _SlowStep.started.clear()
    with running_server(spec) as server:
        client = gradwire.Client(f"127.0.0.1:{server.port}")
        other = gradwire.Client(f"127.0.0.1:{server.port}")
        _forward_one(other)  # quick: a first Forward runs the model on "meta" too
        _SlowStep.slow.set()
        watch = Reader(
            client.watch(["loss"], reconnect=True, on_lost=lambda _: lost.append(time.monotonic()))
        ).started()
        step = threading.Thread(target=_forward_one, args=(other,), daemon=True)
        step.start()
        assert _SlowStep.started.wait(30), "the step did not start"
        stopping = time.monotonic()
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 30.0}, daemon=True)
        stopper.start()
        try:
            eventually(lambda: bool(lost), "on_lost not called", within=STEP_S * 3)
        finally:
            stopper.join(STEP_S * 3)
            _SlowStep.slow.clear()
            client.close()
            other.close()
    told = lost[0] - stopping
    assert told < STEP_S / 2, f"told {told:.1f} s after the stop began"
    with pytest.raises(ClientClosed):
        watch.join()


def _forward_one(client: gradwire.Client) -> None:
    """A Forward of one sample, whatever it ends with (the server stops under it)."""
    with contextlib.suppress(gradwire.errors.GradwireError):
        client.forward(np.zeros((1, 2), dtype=np.float32), np.zeros(1, dtype=np.int64))
