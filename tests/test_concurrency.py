"""Many clients at once: every acknowledged step applied exactly once, no torn reads, a bound
on calls in progress answered at once with RESOURCE_EXHAUSTED while health stays answered."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors
from gradwire.fill import Fill
from gradwire_server import places
from gradwire_server.app import start
from gradwire_server.errors import OverLimit
from gradwire_server.models import ModelSpec
from gradwire_server.places import Slots
from gradwire_server.trainer import Trainer
from tests.background import eventually

WRITERS, READERS, STEPS = 4, 12, 25  # 16 clients


def test_sixteen_clients_steps_applied_once_and_reads_whole(trainer: Trainer) -> None:
    running = start(trainer, "127.0.0.1", 0, max_concurrent=32)
    address = f"127.0.0.1:{running.port}"
    try:
        with gradwire.connect(address) as setup:
            setup.fill_parameters(0.0)
            for name in ("conv1.weight", "conv2.weight", "linear.weight"):
                setup.set(f"{name}.grad", -1.0)  # with lr=1 every Step adds exactly 1
            base = setup.list_tensors().version
        problems: list[str] = []
        acknowledged: list[int] = []
        done = threading.Event()

        def write() -> None:
            with gradwire.connect(address) as client:
                for _ in range(STEPS):
                    acknowledged.append(client.step().version)

        versions_read: list[int] = []

        def read(selector: str) -> None:
            try:
                with gradwire.connect(address) as client:
                    while not done.is_set():
                        got = client.read(selector)
                        versions_read.append(got.version)
                        values = np.unique(got.value)
                        if len(values) != 1 or values[0] != got.version - base:
                            problems.append(f"{selector} at v{got.version}: {values[:5]}")
            except Exception as err:  # pragma: no cover - reported below
                problems.append(f"{selector}: {err!r}")

        readers = [
            threading.Thread(target=read, args=(s,))
            for s in ["conv1.weight", "linear.weight", "conv2.weight[3]"] * (READERS // 3)
        ]
        writers = [threading.Thread(target=write) for _ in range(WRITERS)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(timeout=120)
        done.set()
        for t in readers:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in readers + writers), "a client hung"
        assert not problems, problems[:5]
        # The reads saw the steps go on: states between the first and the last.
        assert any(base < v < base + WRITERS * STEPS for v in versions_read), versions_read[-5:]
        assert sorted(acknowledged) == list(range(base + 1, base + 1 + WRITERS * STEPS))
        with gradwire.connect(address) as check:
            final = check.read("linear.weight")
        assert final.version == base + WRITERS * STEPS
        assert np.all(final.value == WRITERS * STEPS)
    finally:
        running.stop(grace=None)


class Gate(nn.Module):
    """A real model whose forward waits for the test, to hold a call in progress."""

    entered = threading.Event()
    release = threading.Event()

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Gate.entered.set()
        Gate.release.wait(timeout=60)
        return x * self.weight


def hold_forward(address: str) -> threading.Thread:
    """A Forward of a client of its own that Gate holds: its thread, once the server's torch
    thread is busy with it. Set Gate.release to let it finish."""
    holder = threading.Thread(
        target=lambda: gradwire.connect(address).forward(Fill.ones(1, 2)), daemon=True
    )
    holder.start()
    assert Gate.entered.wait(timeout=60)
    return holder


@pytest.fixture
def gated() -> Iterator[str]:
    Gate.entered.clear()
    Gate.release.clear()
    spec = ModelSpec("Gate", Gate, sample_shape=(2,), num_classes=2)
    running = start(Trainer(spec), "127.0.0.1", 0, max_concurrent=1)
    yield f"127.0.0.1:{running.port}"
    Gate.release.set()
    running.stop(grace=None)


def test_calls_over_the_bound_are_refused_at_once_and_health_answers(gated: str) -> None:
    result: list[object] = []

    def slow() -> None:
        with gradwire.connect(gated) as client:
            result.append(client.forward(Fill.ones(1, 2)))

    holder = threading.Thread(target=slow)
    holder.start()
    assert Gate.entered.wait(timeout=60)
    with gradwire.connect(gated, timeout=10) as client:
        with pytest.raises(errors.ResourceExhausted) as info:
            client.list_tensors()
        assert info.value.reason == "BUSY"
        assert "busy: 1 call in progress; retry shortly" in info.value.message
        assert client.health() == "SERVING"
        Gate.release.set()
        holder.join(timeout=60)
        assert result and client.list_tensors().version == 1  # the held call completed


def test_slots_refuse_over_the_limit_at_once_and_come_back() -> None:
    slots = Slots(2)
    with slots, slots:
        with pytest.raises(OverLimit) as info, slots:
            pass
        assert info.value.reason == "BUSY" and "2 calls in progress" in info.value.message
    with contextlib.suppress(ValueError), slots:
        raise ValueError("a call that failed gives its slot back")
    with slots, slots:  # both free again
        pass


class _Ending:
    """A Reclaimer whose stream, once ended, gives its place back from another thread, as a
    stream's handler does when gRPC wakes it from its send; or one that finds none."""

    unread_s = 30.0

    def __init__(self, slots: Slots, ends: bool = True, gives_back: bool = True) -> None:
        self.slots, self.ends, self.gives_back = slots, ends, gives_back
        self.asked = 0

    def end_one_unread(self) -> bool:
        self.asked += 1
        if self.ends and self.gives_back:
            unwinds = threading.Timer(0.05, self.slots.stream.__exit__, (None, None, None))
            unwinds.start()
        return self.ends


def test_a_call_that_finds_every_place_taken_takes_that_of_a_stream_ended_for_it() -> None:
    """Streams a client stopped reading without cancelling them held every place until their
    deadlines: 17 unread GetTensorStreams left every other call BUSY (found by a review of
    the server's security). A call, a stream or an operator's call that finds every place
    taken has the reclaimer end one and takes the place it gives back."""
    slots = Slots(2)
    slots.reclaimer = reclaimer = _Ending(slots)
    for place in (slots, slots.stream, slots.operator):
        slots.stream.__enter__()
        slots.stream.__enter__()
        if place is slots.operator:
            slots.__enter__()  # the operator's place beyond the limit taken too
        with place:
            assert slots.taken == (3 if place is slots.operator else 2)
        if place is slots.operator:
            slots.__exit__()
        slots.stream.__exit__()
        assert slots.taken == 0
    assert reclaimer.asked == 3


def test_a_call_is_busy_at_once_when_no_stream_was_left_unread_long_enough() -> None:
    slots = Slots(1)
    slots.reclaimer = reclaimer = _Ending(slots, ends=False)
    with slots.stream, pytest.raises(OverLimit) as refused, slots:
        pass
    assert reclaimer.asked == 1
    assert refused.value.reason == "BUSY"
    assert refused.value.message.endswith(
        "the default session's streams end only when their clients close them, or, for a "
        "Watch, Train or streamed read, once its client has left a message unread for 30 s "
        "and a call finds no place)"
    )


def test_a_call_whose_reclaimed_place_another_took_is_busy_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(places, "RECLAIM_WAIT_S", 0.2)
    slots = Slots(1)
    slots.reclaimer = _Ending(slots, gives_back=False)
    with slots.stream:
        started = time.monotonic()
        with pytest.raises(OverLimit, match="busy"), slots:
            pass
        assert time.monotonic() - started >= 0.2  # it waited for the place
    with slots:  # the waiter counted out again: a place comes back as before
        assert slots.taken == 1


def test_busy_counts_the_streams_alone_among_the_places_held() -> None:
    """A unary call and an operator's call beside a stream: BUSY says the limit's calls, of
    them one stream; a stream refused at the limit is BUSY too."""
    slots = Slots(2)
    with slots.stream, slots, slots.operator:
        with pytest.raises(OverLimit) as info, slots:
            pass
        assert info.value.reason == "BUSY"
        assert info.value.message.startswith(
            "the server is busy: 2 calls in progress, 1 of them streams (Watch,"
        )
    with slots, slots, pytest.raises(OverLimit) as refused, slots.stream:
        pass
    assert refused.value.reason == "BUSY"
    assert refused.value.message.endswith("in progress; retry shortly")  # it holds none


def test_an_operator_sees_and_closes_the_sessions_whose_streams_hold_every_place(
    trainer: Trainer,
) -> None:
    """ListSessions and CloseSession take a place beyond the limit: with every place held
    by watches left open, both were BUSY, and the operator could neither see which
    sessions held them nor close those (found by a review from another language's side)."""
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=10) as client:
            left_open = client.open_session(seed=0).detach()
            with gradwire.connect(f"127.0.0.1:{running.port}", session=left_open) as theirs:
                watches = [theirs.watch(["loss"]) for _ in range(2)]
                for watch in watches:
                    next(watch)
                with pytest.raises(errors.ResourceExhausted):
                    client.list_tensors()  # every place held
                (listed,) = client.list_sessions().sessions
                assert (listed.session, listed.calls_in_progress) == (left_open, 2)
                operator = gradwire.connect(f"127.0.0.1:{running.port}", session=left_open)
                with operator:
                    operator.close_session()  # its watches end: their places are free
                for watch in watches:
                    with pytest.raises(errors.FailedPrecondition):
                        next(watch)
                eventually(lambda: running.servicer.slots.taken == 0)
                assert client.list_tensors().model == "Simple"
        # One place beyond the limit, no more: an operator's call with every place and the
        # operator's own taken is BUSY too.
        slots = running.servicer.slots
        with slots, slots, slots.operator, pytest.raises(OverLimit), slots.operator:
            pass
    finally:
        running.stop(grace=None)


def test_busy_says_when_open_streams_hold_the_places(trainer: Trainer) -> None:
    """Watches left open held every place, and BUSY said "retry shortly", which never helped
    (found by a review of watching)."""
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}", timeout=10) as client:
            watches = [client.watch(["loss"]) for _ in range(2)]
            for watch in watches:
                next(watch)
            with pytest.raises(errors.ResourceExhausted) as info:
                client.list_tensors()
            assert info.value.reason == "BUSY"
            assert info.value.message == (
                "the server is busy: 2 calls in progress, 2 of them streams (Watch, Train, "
                "streamed reads, streams of calls), which hold their places until they end: "
                "retry once some end, or close the watches and clients you no longer use "
                "(ListSessions, gradwire sessions, shows which sessions opened beside the "
                "default one hold calls, and CloseSession, gradwire close-session, ends theirs, "
                "each answered beyond the limit; the default session's streams end only when "
                "their clients close them, or, for a Watch, Train or streamed read, once its "
                "client has left a message unread for 30 s and a call finds no place)"
            )
            watches[0].close()
            eventually(lambda: running.servicer.slots.taken == 1)
            assert client.list_tensors().model == "Simple"
            watches[1].close()
        eventually(lambda: running.servicer.slots.taken == 0)
        slots = running.servicer.slots  # taken by unary calls: no streams to speak of
        with slots, slots, pytest.raises(OverLimit, match=r"in progress; retry shortly$"), slots:
            pass
    finally:
        running.stop(grace=None)
