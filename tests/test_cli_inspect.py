"""`gradwire stats`, `gradwire watch` and `gradwire train`, run in-process against real servers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import gradwire
from gradwire._pb import trainer_pb2 as pb
from gradwire.cli import main
from gradwire.fill import Fill
from gradwire.progress import ProgressBar, format_duration, format_loss, summary_cells
from gradwire.updates import Stats
from gradwire_server.app import Running, start
from gradwire_server.models import TINY_MLP, TINY_REGRESSOR, ModelSpec
from gradwire_server.trainer import Trainer
from tests.cli_run import Result, Run, run_main
from tests.serve_in_process import bare_server, old_trainer, serving
from tests.serve_process import CLI
from tests.serve_process import serving as serve_process
from tests.signals import signal_another_thread
from tests.test_cli import BF16_LINEAR

PARAMETERS = ("conv1.weight", "conv2.weight", "linear.weight")


@pytest.fixture
def second() -> Iterator[Running]:
    running = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0)
    yield running
    running.stop(grace=None)


def test_stats_prints_what_the_client_reads(cli: Run, client: gradwire.Client) -> None:
    result = cli("stats", "linear.weight[0]", "--bins", "4", "--json")
    assert result.code == 0, result.err
    data = result.json()
    read = client.stats("linear.weight[0]", bins=4)
    assert read.stats is not None
    assert (data["version"], data["present"], data["shape"]) == (0, True, [3200])
    # Which slice: get's and watch's JSON said, stats' did not (found by a review of the CLI).
    assert (data["name"], data["selector"]) == ("linear.weight", "linear.weight[0]")
    assert data["mean"] == read.stats.mean and data["norm"] == read.stats.norm
    assert data["histogram"]["counts"] == list(read.stats.histogram.counts)  # type: ignore[union-attr]
    text = cli("stats", "linear.weight[0]", "--bins", "4").out.splitlines()
    assert text[0] == "linear.weight[0] torch.Size([3200])"
    assert text[4].split() == ["mean", f"{read.stats.mean:.6g}"]
    assert len([line for line in text if line.startswith("  [")]) == 4
    # A bin without a bar ends at its count: it ended in a space (a newcomer's walkthrough).
    client.set("conv1.weight[0, 0, 0]", np.array([0, 0, 1], np.float32))
    rows = cli("stats", "conv1.weight[0, 0, 0]", "--bins", "3").out.splitlines()[-3:]
    assert [row.split()[3] for row in rows] == ["2", "0", "1"]
    assert rows[1].endswith(" 0") and rows[0].endswith("#")


def test_stats_json_names_its_selector_as_get_json_does(cli: Run) -> None:
    """`conv1.weight[0,1]` as given is `conv1.weight[0, 1]` in either's JSON: one key a
    script may match the two on."""
    stats = cli("stats", "conv1.weight[0,1]", "--json").json()
    got = cli("get", "conv1.weight[0,1]", "--json").json()
    assert stats["selector"] == got["selector"] == "conv1.weight[0, 1]"


def test_stats_of_values_none_finite_say_so(cli: Run, client: gradwire.Client) -> None:
    # min, max, mean, std and norm are over finite values: with none, there are none to show.
    client.set("conv1.weight[0, 0]", np.array([[np.nan, np.inf, -np.inf]] * 3, np.float32))
    data = cli("stats", "conv1.weight[0, 0]", "--json").json()
    assert (data["count"], data["nan_count"], data["inf_count"]) == (9, 3, 6)
    assert [data[k] for k in ("min", "max", "mean", "std", "norm")] == [None] * 5
    lines = cli("stats", "conv1.weight[0, 0]").out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["count", "finite", "nan", "inf", "zeros"]
    assert lines[2].split() == ["finite", "0"]
    # Nor anything to bin: it printed empty bins over [-0.5, 0.5], a range of the server's
    # choosing, read as data (found by a review of the CLI).
    binned = cli("stats", "conv1.weight[0, 0]", "--bins", "3").out.splitlines()
    assert binned[-1] == "histogram: no finite value to bin"
    watched = cli("watch", "conv1.weight[0, 0]", "--count", "1").out.splitlines()[1]
    assert watched.endswith("no finite values  nan 3  inf 6")
    update = json.loads(cli("watch", "conv1.weight[0, 0]", "--count", "1", "--json").out)
    assert update["tensors"][0]["stats"]["mean"] is None
    # Nor bins in a watch's table or JSON, nor in stats' JSON: the table drew three empty
    # bins over [-0.5, 0.5] under "no finite values" (found by a review of watching).
    argv = ("watch", "conv1.weight[0, 0]", "--bins", "3", "--count", "1")
    assert cli(*argv).out.splitlines()[2:] == ["    histogram: no finite value to bin"]
    update = json.loads(cli(*argv, "--json").out)
    assert update["tensors"][0]["stats"]["histogram"] is None
    assert cli("stats", "conv1.weight[0, 0]", "--bins", "3", "--json").json()["histogram"] is None
    # One finite value is enough for the summary.
    client.set("conv1.weight[0, 0, 0, 0]", 2.0)
    data = cli("stats", "conv1.weight[0, 0]", "--json").json()
    assert (data["min"], data["max"], data["mean"]) == (2.0, 2.0, 2.0)
    # and a watch's row gives the summary of those, then counts the rest
    row = cli("watch", "conv1.weight[0, 0]", "--count", "1").out.splitlines()[1].split()
    assert row[2:4] == ["mean", "2"] and row[-4:] == ["nan", "2", "inf", "6"]
    empty = cli("watch", "linear.weight[0:0]", "--count", "1").out.splitlines()[1]
    assert empty.split() == ["linear.weight[0:0]", "empty"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--low", "0"], "--low and --high are a histogram's edges: give --bins too"),
        (["--bins", "2", "--low", "1", "--high", "0"], "--low must be below --high, got --low 1"),
        (["--bins", "2", "--low", "1", "--high", "1"], "--low must be below --high, got --low 1 "),
    ],
)
def test_stats_refuses_histogram_edges_it_would_ignore_or_misname(
    cli: Run, args: list[str], said: str
) -> None:
    """--low without --bins was ignored without a word; edges the wrong way round were
    refused in the server's field names, histogram_low and histogram_high (found by a
    review of the CLI)."""
    result = cli("stats", "conv1.weight", *args)
    assert result.code == 2
    assert result.err.startswith(f"gradwire stats: error: {said}")


def test_stats_of_an_absent_tensor_and_of_an_unknown_one(cli: Run) -> None:
    assert cli("stats", "conv1.weight.grad").out == "None\n"
    assert cli("stats", "conv1.weight.grad[0]", "--json").json() == {
        "name": "conv1.weight.grad",
        "selector": "conv1.weight.grad[0]",
        "version": 0,
        "present": False,
    }
    result = cli("stats", "conv1.weigth")
    assert result.code == 1 and "NOT_FOUND" in result.err


def test_train_runs_steps_and_reports_them(cli: Run, client: gradwire.Client) -> None:
    result = cli("train", "--steps", "6", "--every", "3", "--batch", "4")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["3/6", "6/6"]
    assert lines[-1].startswith("trained 6 steps: loss ")
    assert lines[-1].endswith(f"version {6 * 4}")
    assert client.list_tensors().version == 24


def test_train_reports_its_last_step_though_every_does_not_divide_it(cli: Run) -> None:
    """--steps 3 --every 2: step 2's progress, then step 3's, the last, whose loss the
    summary gives; the bar otherwise ended at 2/3 above "trained 3 steps"."""
    result = cli("train", "--steps", "3", "--every", "2", "--batch", "4")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["2/3", "3/3"]
    assert lines[-1].startswith("trained 3 steps: loss ")


def test_train_on_the_server_equals_train_step_by_step(
    cli: Run, client: gradwire.Client, second: Running
) -> None:
    assert cli("train", "--steps", "5", "--seed", "3").code == 0
    other = run_main(
        "train", "--steps", "5", "--seed", "3", "--server-side", "--json",
        "--target", f"127.0.0.1:{second.port}",
    )  # fmt: skip
    assert other.code == 0, other.err
    assert other.json()["steps"] == 5 and other.json()["stopped"] is False
    with gradwire.connect(f"127.0.0.1:{second.port}") as remote:
        for name in PARAMETERS:
            assert np.array_equal(client.get(name), remote.get(name)), name


def test_ctrl_c_the_kernel_hands_another_thread_still_ends_a_watch(address: str) -> None:
    """The watch's main thread waits for the newest update while a thread of the client's
    own reads them; a Ctrl-C the kernel hands that thread (or gRPC's) interrupts no wait of
    the main thread's, where Python runs the handler: the wait wakes now and then to run
    it."""
    # As a shell's foreground command has it: Ctrl-C raises KeyboardInterrupt. A test run
    # started in the background (`make test &`) ignores SIGINT, and its children inherit
    # that: the watch ignored the signal and ran past the timeout (two fresh-clone CI runs).
    foreground = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'gradwire'; runpy.run_module('gradwire.cli', run_name='__main__')"
    )
    watch = subprocess.Popen(
        [sys.executable, "-c", foreground, "watch", "loss", "--target", address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline().startswith("version 0")  # the watch is open
        signal_another_thread(watch.pid, signal.SIGINT)
        # Ctrl-C ends a watch as asked, and says so in its exit code: 130, as any command
        # Ctrl-C ends, so that a script goes no further (it read 0 until a review of the CLI)
        assert watch.wait(timeout=30) == 130
        # and says where it stopped (a newcomer's walkthrough: the README said it did)
        last = watch.stdout.read().splitlines()[-1]
        assert last == "stopped after 1 update: the last at version 0"
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)


class _CtrlCAtFirstFlush(io.StringIO):
    """A terminal where Ctrl-C lands as the first line reaches the screen: its first flush
    raises KeyboardInterrupt, as Python raises it at whichever line runs when the signal
    comes."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def flush(self) -> None:
        super().flush()
        if not self.interrupted and self.getvalue():
            self.interrupted = True
            raise KeyboardInterrupt


def test_ctrl_c_as_an_update_reaches_the_screen_counts_that_update(address: str) -> None:
    """An update on screen is an update seen. The watch counted it only after showing it,
    so a Ctrl-C just after its line appeared said "stopped after 0 updates" (a fresh-clone
    CI run of the test above, whose signal came in that gap)."""
    out, err = _CtrlCAtFirstFlush(), io.StringIO()
    assert main(["watch", "loss", "--target", address], out, err) == 130, err.getvalue()
    assert out.interrupted
    assert out.getvalue().splitlines()[-1] == "stopped after 1 update: the last at version 0"


def test_ctrl_c_on_a_json_watch_leaves_lines_of_json_alone(address: str) -> None:
    """The text's "stopped after 1 update" line, written into --json's output, made a
    reader's last line no JSON: a --json reader has each update's version already."""
    out, err = _CtrlCAtFirstFlush(), io.StringIO()
    assert main(["watch", "loss", "--json", "--target", address], out, err) == 130, err.getvalue()
    assert out.interrupted
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["version"] == 0


def _without_unbuffered() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _watch_read_once(address: str, *options: str) -> subprocess.Popen[str]:
    """`gradwire watch loss --json OPTIONS` in a process of its own, its output read as `head
    -1` reads it: its first line (the state now, which it checks), then the pipe closed. The
    process is left to end; if it has not within 60 s, the test fails with every thread's
    stack (faulthandler, on SIGABRT). One such run hung once in a full suite, and 1,360
    runs under load and injected delays, and 8,000 in one process, did not (the fifty-fifth
    session): the stacks say where, the next time."""
    command = ["watch", "loss", "--json", *options, "--target", address]
    watch = subprocess.Popen(
        [sys.executable, "-m", "gradwire.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Buffered as a user's shell leaves it: PYTHONUNBUFFERED hid a line left unflushed.
        env={**_without_unbuffered(), "PYTHONFAULTHANDLER": "1"},
    )
    try:
        assert watch.stdout is not None
        ready, _, _ = select.select([watch.stdout], [], [], 30)
        assert ready, "no first line within 30 s: the watch left it unflushed"
        assert json.loads(watch.stdout.readline())["cause"] == "Watch"
        watch.stdout.close()
        try:
            watch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            watch.send_signal(signal.SIGABRT)
            _, stacks = watch.communicate(timeout=10)
            pytest.fail(f"the watch had not ended 60 s after its reader went:\n{stacks}")
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)
    return watch


def test_a_watch_whose_reader_goes_ends_without_waiting_for_an_update(address: str) -> None:
    """`gradwire watch loss | head -1` on a server where nothing changes: the watch noticed
    the reader gone only at its next write, which never came, and held a server place for
    ever (found by a review of watching training remotely). It ends now, 141, as at a write."""
    watch = _watch_read_once(address)
    assert watch.returncode == 141
    assert watch.stderr is not None and watch.stderr.read() == ""


def test_a_watch_that_ended_as_asked_exits_0_when_its_reader_goes_after(address: str) -> None:
    """`gradwire watch W --count 1 | head -1`: the first version interrupted the main thread
    once the reader went, which could land after the watch had ended as asked: exit 130,
    "interrupted", in 10 runs of 15 (a review)."""
    for _ in range(5):
        watch = _watch_read_once(address, "--count", "1")
        assert watch.stderr is not None
        assert watch.returncode == 0, watch.stderr.read()


def _pipes_open() -> set[int]:
    """The descriptors of this process that are pipes."""
    pipes = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (another thread's)
            if stat.S_ISFIFO(os.fstat(int(name)).st_mode):
                pipes.add(int(name))
    return pipes


def test_a_watch_to_a_pipe_leaves_no_pipe_of_its_own_open(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch whose output is a pipe opens one of its own, to wake the thread that waits
    for the reader to go; it is closed on the way out, both ends: a program that runs
    main() a watch after another would keep two descriptors for each."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb"), os.fdopen(write_end, "w") as piped:
        monkeypatch.setattr(sys, "stdout", piped)
        before = _pipes_open()
        code = main(["watch", "loss", "--target", address, "--count", "1"], err=io.StringIO())
        after = _pipes_open()
        monkeypatch.undo()
        piped.flush()
    assert code == 0
    assert after == before, after - before


@contextlib.contextmanager
def _ctrl_c_at(*seconds: float) -> Iterator[None]:
    """Ctrl-C (SIGINT to this process) at each of `seconds` after the block starts, unless
    it has ended by then."""
    presses = [threading.Timer(t, os.kill, (os.getpid(), signal.SIGINT)) for t in seconds]
    for press in presses:
        press.start()
    try:
        yield
    finally:
        for press in presses:
            press.cancel()


def test_ctrl_c_stops_train_between_two_steps(cli: Run, client: gradwire.Client) -> None:
    with _ctrl_c_at(1.0):
        result = cli("train", "--steps", "1000000", "--every", "1000", "--json", "--keep-going")
    # The summary says where it stopped, and 130 says it was stopped: `gradwire train ...
    # && next` ran next on 0 (found by a review of the CLI).
    assert result.code == 130, result.err
    data = result.json()
    assert data["stopped"] is True and 1 <= data["steps"] < 1_000_000
    assert client.list_tensors().version == data["version"] == 4 * data["steps"]


@pytest.mark.parametrize("side", [(), ("--server-side",)], ids=["client-side", "server-side"])
def test_train_gives_back_the_ctrl_c_handler_it_found(cli: Run, side: tuple[str, ...]) -> None:
    """Its own handler, which stops a run between two steps, is the run's alone: left in
    place, a Ctrl-C after the command (a notebook's, a program's that called main) set an
    event no one read, and a second press raised KeyboardInterrupt where none was asked."""
    found = signal.getsignal(signal.SIGINT)
    assert cli("train", "--steps", "2", *side).code == 0
    assert signal.getsignal(signal.SIGINT) is found


def test_ctrl_c_on_a_server_side_train_reports_the_servers_version(
    cli: Run, client: gradwire.Client
) -> None:
    # Its summary reported the last progress's version; the server had run on past it.
    with _ctrl_c_at(1.0):
        result = cli(
            "train",
            "--steps",
            "1000000",
            "--every",
            "50",
            "--server-side",
            "--json",
            "--keep-going",
        )
    assert result.code == 130, result.err
    data = result.json()
    assert data["stopped"] is True and data["steps"] % 50 == 0  # as the progresses said
    assert data["version"] == client.list_tensors().version
    assert data["version"] >= 4 * data["steps"]


def test_ctrl_c_stops_a_server_side_train_before_its_next_progress(
    cli: Run, client: gradwire.Client
) -> None:
    # The run went on to its last step: the command looked at Ctrl-C only at a progress
    # (44 s after the press in a review, with --every as large as --steps).
    with _ctrl_c_at(1.0):
        result = cli(
            "train",
            "--steps",
            "20000",
            "--every",
            "20000",
            "--server-side",
            "--json",
            "--keep-going",
        )
    assert result.code == 130, result.err
    data = result.json()
    assert data["stopped"] is True and data["steps"] == 0 and data["loss"] is None
    assert data["version"] == client.list_tensors().version < 4 * 20000


def test_a_second_ctrl_c_stops_train_inside_a_step() -> None:
    # A step's call was waited for whatever Ctrl-C said: against a server that had stopped
    # answering, until its deadline, a second Ctrl-C doing no more than the first (a review).
    with serve_process("--model", "tests.broken_models:SLOW") as (_, log):
        port = re.findall(r"listening on 127\.0\.0\.1:(\d+)", log)[0]
        started = time.monotonic()
        with _ctrl_c_at(1.0, 2.0):  # a batch of one sample: the model takes a minute over it
            result = run_main("train", "--batch", "1", "--target", f"127.0.0.1:{port}")
        waited = time.monotonic() - started
    assert result.code == 130, result.err
    assert "stopping after this step (Ctrl-C again to stop at once)" in result.err
    assert waited < 45, "the second Ctrl-C waited for the step"  # the step takes 60 s
    # and it sums up, as the first Ctrl-C's stop does: it ended "interrupted" with nothing
    # said of the steps applied (a review of training remotely). The step cut into is still
    # running on the server, not yet applied.
    assert result.out.endswith(
        "stopped after 0 steps (the step Ctrl-C cut into may yet be applied on the server): no "
        "loss reported, version 0\n"
    ), result.out


def test_train_interrupted_by_the_server_stopping_still_sums_up() -> None:
    running = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0)
    timer = threading.Timer(1.0, running.stop, kwargs={"grace": 5})
    timer.start()
    try:
        target = f"127.0.0.1:{running.port}"
        result = run_main(
            "train", "--steps", "1000000", "--server-side", "--keep-going", "--target", target
        )
    finally:
        timer.join()
    assert result.code == 1
    assert "stopped after " in result.out
    assert result.err.startswith("error: UNAVAILABLE: the server is stopping: training stopped")


def _strict_json(text: str) -> dict[str, object]:
    """Parses as a parser without Python's NaN extension would: any bare NaN fails."""

    def refuse(constant: str) -> object:
        raise AssertionError(f"not JSON: {constant}")

    data: dict[str, object] = json.loads(text, parse_constant=refuse)
    return data


def test_json_output_is_strict_json_when_values_are_not_finite(cli: Run) -> None:
    assert cli("fill", "nan").code == 0
    assert _strict_json(cli("forward", "--json").out)["loss"] == "nan"
    assert _strict_json(cli("train", "--steps", "2", "--json").out)["loss"] == "nan"
    assert _strict_json(cli("get", "conv1.weight[0][0][0]", "--json").out)["values"] == [
        "nan",
        "nan",
        "nan",
    ]


def test_train_says_when_the_loss_stops_being_finite(cli: Run) -> None:
    assert cli("optimizer", "--lr", "100").code == 0  # diverges within a few steps
    result = cli("train", "--steps", "20", "--every", "5", "--keep-going")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[-2] == "trained 20 steps: loss nan, version 81"  # 1 SetOptimizer, 20 x 4
    step = int(lines[-1].split(" by step ")[1].split(":")[0])
    assert 1 <= step <= 20
    assert lines[-1].endswith(
        "training diverged, and the parameters may have too. To start again: gradwire reset "
        "(--seed N for seeded weights), then gradwire optimizer --keep-state --lr 10 (a tenth "
        "of lr 100, its other settings kept)"
    )
    data = _strict_json(cli("train", "--steps", "2", "--json", "--keep-going").out)
    assert data["loss"] == "nan" and data["diverged_at"] == 1
    assert data["steps"] == 2 and not data["stopped_at_nonfinite"]
    assert data["session_gone"] is False  # no session: the default's steps stay applied
    # The advice, followed, changes the lr alone: it replaced the optimizer, its momentum
    # and weight decay dropped (found by a review of training remotely).
    assert cli("optimizer", "--keep-state", "--momentum", "0.9").code == 0
    assert cli("reset").code == 0
    assert cli("optimizer", "--keep-state", "--lr", "10").code == 0
    settings = _strict_json(cli("optimizer", "--json").out)
    assert (settings["lr"], settings["momentum"]) == (10, 0.9), settings


def test_the_advice_after_a_session_s_run_diverged_names_the_session(
    cli: Run, client: gradwire.Client
) -> None:
    """A run in a session given by --session that diverged said "To start again: gradwire
    reset ..., then gradwire optimizer --keep-state --lr ...": copied, both act on the
    default session, another user's model reset and its lr cut, and the session's run left
    as it was (found by a review of two researchers sharing one server)."""
    mine = client.open_session(seed=0)
    assert mine.session is not None
    session = ("--session", mine.session)
    assert cli("optimizer", "--lr", "100", *session).code == 0
    result = cli("train", "--steps", "20", *session)
    assert result.code == 0, result.err
    assert result.out.splitlines()[-1].endswith(
        f"To start again: gradwire reset --session {mine.session} (--seed N for seeded "
        f"weights), then gradwire optimizer --session {mine.session} --keep-state --lr 10 "
        "(a tenth of lr 100, its other settings kept)"
    )
    before = client.list_tensors().version
    advice = result.out.splitlines()[-1].split("To start again: ")[1]
    reset = advice.split(" (--seed")[0].split()[1:]  # as a user copies it
    assert cli(*reset).code == 0
    assert client.list_tensors().version == before  # the default session left alone
    assert mine.list_tensors().version > 0


@pytest.mark.parametrize("side", [(), ("--server-side",)], ids=["client-side", "server-side"])
def test_train_stops_at_the_first_loss_not_finite(cli: Run, side: tuple[str, ...]) -> None:
    """It ran every step asked for, each after the divergence wasted (found by a review of
    the CLI as a researcher): it now stops after that step, and says so."""
    assert cli("optimizer", "--lr", "100").code == 0
    start = _strict_json(cli("reset", "--seed", "0", "--json").out)["version"]
    result = cli("train", "--steps", "1000", "--every", "300", *side)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    step = int(lines[-1].split(" by step ")[1].split(":")[0])
    assert 1 < step < 1000
    version = start + 4 * step
    assert lines[-2] == f"stopped after {step} steps: loss nan, version {version}"
    assert "may have too; the run stopped there (--keep-going runs on)." in lines[-1]
    assert _strict_json(cli("list", "--json").out)["version"] == version  # no step more
    start = _strict_json(cli("reset", "--seed", "0", "--json").out)["version"]
    data = _strict_json(cli("train", "--steps", "1000", "--json", *side).out)
    assert data["stopped_at_nonfinite"] and data["stopped"]
    assert data["steps"] == data["diverged_at"] == step and data["version"] == start + 4 * step


def test_train_on_the_server_names_the_step_it_diverged_at_between_progresses(
    cli: Run,
) -> None:
    """Server-side, the first progress with a loss not finite gave the step: "by step 10"
    of a run that diverged at step 8, with a progress every 5 steps (found by a review of
    the CLI). The server now counts it, and the same run on either side names one step."""
    assert cli("optimizer", "--lr", "100").code == 0
    assert cli("reset", "--seed", "0").code == 0
    here = _strict_json(cli("train", "--steps", "20", "--json").out)["diverged_at"]
    assert isinstance(here, int) and 1 < here < 20
    assert cli("reset", "--seed", "0").code == 0
    there = cli("train", "--steps", "20", "--every", "20", "--server-side", "--json")
    assert _strict_json(there.out)["diverged_at"] == here
    assert cli("reset", "--seed", "0").code == 0
    text = cli("train", "--steps", "20", "--every", "20", "--server-side").out
    assert f"the loss was no longer finite by step {here}:" in text


def test_train_on_an_older_server_takes_the_first_loss_reported_not_finite() -> None:
    """A server from before TrainProgress counted it sends first_nonfinite_step 0: the
    first progress whose loss is not finite gives the step, as before."""

    def train(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for step, loss in ((5, 2.5), (10, math.nan), (15, math.nan)):
            progress = pb.TrainProgress(step=step, steps=15, loss=loss, version=step * 4)
            yield progress.SerializeToString()

    handler = old_trainer(Train=grpc.unary_stream_rpc_method_handler(train))
    with bare_server(handler) as address:
        argv = ("train", "--steps", "15", "--every", "5", "--server-side", "--target", address)
        data = _strict_json(run_main(*argv, "--json").out)
    assert data["diverged_at"] == 10
    # It has no stop_at_nonfinite: the run is closed at that progress, as it asks.
    assert data["steps"] == 10 and data["stopped_at_nonfinite"]


def test_train_against_a_server_that_runs_on_says_where_it_stopped_the_run() -> None:
    """A server from before stop_at_nonfinite, which counts the step (8) but sends the
    next progress at step 10: the run is stopped there, and its hint said "stopped there"
    of step 8 (a review of the change)."""

    def train(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for step, loss, first in ((5, 2.5, 0), (10, math.nan, 8), (15, math.nan, 8)):
            progress = pb.TrainProgress(
                step=step, steps=15, loss=loss, version=step * 4, first_nonfinite_step=first
            )
            yield progress.SerializeToString()

    handler = old_trainer(40, Train=grpc.unary_stream_rpc_method_handler(train))
    with bare_server(handler) as address:
        argv = ("train", "--steps", "15", "--every", "5", "--server-side", "--target", address)
        text = run_main(*argv).out
        data = _strict_json(run_main(*argv, "--json").out)
    assert "by step 8: " in text
    assert "the run was stopped at step 10, the first progress to show it" in text
    assert (data["diverged_at"], data["steps"], data["stopped_at_nonfinite"]) == (8, 10, True)


@pytest.mark.parametrize(
    ("loss", "shown"),
    [
        (2.99123, "2.9912"),
        (0.0, "0.0000"),
        (123456.7, "123456.7000"),
        (3.7e12, "3.7e+12"),
        (1.2e-7, "1.2e-07"),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
        (999_999.5, "999999.5000"),  # the last shown with four decimals
        (1e6, "1e+06"),  # and the first shown in short
    ],
)
def test_a_loss_shows_what_it_is(loss: float, shown: str) -> None:
    assert format_loss(loss) == shown


def test_a_watch_cell_names_infinite_values_without_nans() -> None:
    """A scalar that is infinite, and a tensor with infinities and no NaN, say so: each
    check was of NaN and infinity both, and one alone missed the other."""
    nan = math.nan
    infinite = Stats(1, nan, nan, nan, nan, nan, 0, 1, 0, None)
    assert summary_cells(infinite) == "value infinite"
    some = Stats(4, 1.0, 2.0, 1.5, 0.5, 2.2, 0, 1, 0, None)
    assert summary_cells(some).endswith("norm 2.2  nan 0  inf 1")


def test_the_progress_line_shows_the_bar_the_rate_and_the_time_left() -> None:
    """train's progress line, its bar a 30th of the steps per #, and the time left in the
    largest units that say it: seconds under a minute, minutes under an hour."""
    bar = ProgressBar(io.StringIO(), 1000)
    assert bar.line(120, 2.99123, rate=85.3) == (
        "step 120/1000 [###" + "-" * 27 + "]  12%  85.3 steps/s  loss 2.9912  eta 10s"
    )
    # No rate yet, no steps asked: the time left is unknown, nothing divides by 0.
    assert (
        ProgressBar(io.StringIO(), 0)
        .line(0, 1.0, rate=0.0)
        .endswith("   0%  0.0 steps/s  loss 1.0000  eta ?")
    )
    assert "[" + "#" * 30 + "] 100%" in ProgressBar(io.StringIO(), 1).line(1, 1.0, rate=1.0)
    shown = [format_duration(s) for s in (59.4, 60, 3599, 3600, 7500)]
    assert shown == ["59s", "1m00s", "59m59s", "1h00m", "2h05m"]


def test_a_finite_run_reports_no_divergence(cli: Run) -> None:
    data = _strict_json(cli("train", "--steps", "3", "--json").out)
    assert data["diverged_at"] is None and isinstance(data["loss"], float)
    assert "diverged" not in cli("train", "--steps", "3").out


def test_train_refuses_bad_numbers(cli: Run) -> None:
    for argv in (["--steps", "0"], ["--every", "0"], ["--batch", "0"]):
        result = cli("train", *argv)
        assert result.code == 2, argv
        assert re.search(
            "bad number '0': expected a whole number(, 1 or more| from 1 to)", result.err
        )


def test_watch_prints_one_entry_per_update(cli: Run, address: str) -> None:
    results: list[Result] = []
    thread = threading.Thread(
        target=lambda: results.append(
            cli("watch", "conv1.weight[0, 0, 0]", "loss", "--values", "--count", "3", "--json")
        )
    )
    thread.start()
    with gradwire.connect(address) as driver:
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            driver.set_optimizer("sgd", lr=0.1)  # a mutation each time, until the watch ends
            time.sleep(0.05)
    thread.join(10)
    assert not thread.is_alive()
    result = results[0]
    assert result.code == 0, result.err
    updates = [json.loads(line) for line in result.out.splitlines()]
    assert len(updates) == 3
    assert updates[0]["cause"] == "Watch" and updates[1]["cause"] == "SetOptimizer"
    assert [t["name"] for t in updates[0]["tensors"]] == ["conv1.weight", "loss"]
    assert len(updates[0]["tensors"][0]["value"]) == 3
    assert updates[0]["tensors"][1] == {"name": "loss", "selector": "loss", "present": False}


class _Watching:
    """`gradwire ARGS` (a watch) run by main on a thread, its output read as it comes."""

    def __init__(self, *args: str) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.code: int | None = None
        self._thread = threading.Thread(target=self._run, args=(args,), daemon=True)
        self._thread.start()

    def _run(self, args: tuple[str, ...]) -> None:
        self.code = main(list(args), self.out, self.err)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def wait_for(self, what: Callable[[], bool], failure: str) -> None:
        deadline = time.monotonic() + 30
        while not what():
            assert self._thread.is_alive(), f"ended: {self.err.getvalue()}"
            assert time.monotonic() < deadline, f"{failure}: {self.err.getvalue()}"
            time.sleep(0.01)

    def join(self) -> int:
        self._thread.join(30)
        assert not self._thread.is_alive() and self.code is not None, "still watching"
        return self.code


def test_watch_reconnect_watches_on_once_a_restarted_server_is_back() -> None:
    """A researcher's watch ended when the server was restarted (a deploy, a crash and a
    supervisor's restart), and had to be started again by hand: with --reconnect it says on
    stderr that the server went away, waits, and watches on, --count counting across the
    gap. Without it the watch ends with the error, as before."""
    first = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    port = first.port
    target = f"127.0.0.1:{port}"
    plain = _Watching("watch", "loss", "--target", target, "--json")
    watch = _Watching("watch", "loss", "--target", target, "--json", "--reconnect", "--count", "3")
    try:
        for each in (plain, watch):
            each.wait_for(lambda e=each: len(e.lines()) == 1, "no first update")
        first.stop(grace=None)
        watch.wait_for(lambda: "went away" in watch.err.getvalue(), "no word of the stop")
        assert plain.join() == 1  # the error, as before, and the option that waits
        assert "UNAVAILABLE" in plain.err.getvalue()
        hints = [line for line in plain.err.getvalue().splitlines() if line.startswith("hint: ")]
        assert any("gradwire watch --reconnect watches again" in h for h in hints), hints
        second = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", port)
        try:
            with gradwire.connect(target) as client:
                watch.wait_for(lambda: len(watch.lines()) == 2, "no update once back")
                client.reset(seed=1)  # the third update: the count spans the restart
                assert watch.join() == 0, watch.err.getvalue()
        finally:
            second.stop(grace=None)
    finally:
        first.stop(grace=None)
    assert [u["version"] for u in watch.lines()] == [0, 0, 1]
    assert [u["cause"] for u in watch.lines()] == ["Watch", "Watch", "Reset"]
    said = watch.err.getvalue().splitlines()
    # The stop's own words, its gist alone: "the server is stopping", or with no grace
    # period "the server stopped with this call in progress".
    assert re.fullmatch(
        r"the server went away \(the server (is stopping|stopped with this call in "
        r"progress)\); the last update showed version 0; watching again once it is back "
        r"\(Ctrl-C stops\)",
        said[0],
    ), said
    assert said[1:] == ["the server is back, at version 0: watching again"], said


def _suspended_watch_ended(trainer: Trainer, *options: str) -> tuple[int, str]:
    """`gradwire watch OPTIONS` suspended (SIGSTOP, as Ctrl-Z) until its updates wait for it
    and the server ends it for a call that found every place taken, then resumed: its exit
    status and stderr."""
    running = start(trainer, "127.0.0.1", 0, max_concurrent=2)
    target = f"127.0.0.1:{running.port}"
    watch = subprocess.Popen(
        [
            *CLI,
            *("watch", "linear.weight", "--values", "--json", "--interval", "0"),
            *(*options, "--duration", "15", "--target", target),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert watch.stdout is not None
    reading = threading.Thread(target=lambda: lines.extend(watch.stdout or ()), daemon=True)
    reading.start()
    try:
        with gradwire.connect(target, timeout=60) as client:
            deadline = time.monotonic() + 60
            while not lines:  # its first update shown
                assert time.monotonic() < deadline, "no first update"
                time.sleep(0.05)
            watch.send_signal(signal.SIGSTOP)
            x, y = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")
            while True:  # its updates pile up, unread, until its send waits for it
                assert time.monotonic() < deadline, "the watch never waited for its reader"
                client.train_step(x, y)
                sends = running.servicer.sending.under_way
                time.sleep(0.5)
                if sends == running.servicer.sending.under_way == 1:
                    break
            read = client.watch(["loss"])  # the other place, read
            next(read)
            running.servicer.sending.unread_s = 0.2
            time.sleep(0.3)
            client.train_step(x, y)  # in the suspended watch's place
            read.close()
            watch.send_signal(signal.SIGCONT)
            _, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
        running.stop(grace=None)
    return watch.returncode, err


def test_watch_reconnect_says_the_server_ended_a_watch_left_unread_not_that_it_went_away(
    trainer: Trainer,
) -> None:
    """A watch suspended (Ctrl-Z) past UNREAD_S, ended for a call that found every place
    taken, said on resuming "the server went away (...)" and "the server is back", of a
    server that had gone nowhere: one looked for a restart in its log (found by a review of
    this session's new features)."""
    code, err = _suspended_watch_ended(trainer, "--reconnect")
    assert code == 0, err
    said = err.splitlines()
    assert re.fullmatch(
        r"the server ended this watch \(this Watch's client had left a message unread for "
        r"[\d.]+ s when a call found every place of the server taken\); the last update "
        r"showed version \d+; watching again \(Ctrl-C stops\)",
        said[0],
    ), said
    assert re.fullmatch(r"watching again, at version \d+", said[1]), said
    assert "went away" not in err and "is back" not in err


def test_a_watch_the_server_ended_left_unread_is_not_hinted_at_as_a_server_gone(
    trainer: Trainer,
) -> None:
    """Without --reconnect its error's hint said the server "stopped answering: it was
    stopped or restarted, or the network to it went down", of a server that answered on
    (found by a review of this session's new features)."""
    code, err = _suspended_watch_ended(trainer)
    assert code == 1, err
    said = err.splitlines()
    assert said[0].startswith("error: UNAVAILABLE: this Watch's client had left a message "), said
    assert said[1] == (
        "hint: the server ended this command's stream, its messages left unread for that long "
        "(a process suspended, Ctrl-Z, or stopped in a debugger) when a call found every "
        "place of the server taken: run it again, and leave it running; gradwire watch "
        "--reconnect watches again by itself"
    ), said
    assert "stopped answering" not in err


def test_watch_reconnect_says_the_server_came_back_with_an_older_state() -> None:
    """A server killed (SIGKILL, the out-of-memory killer) comes back from its last save, or
    from fresh weights without one: the watch said only "the server is back, at version 0"
    under updates at version 2, and went on showing versions it had shown before, now of
    other states, the training since the save lost without a word (found by a review of
    restarts and recovery)."""
    first = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    port = first.port
    target = f"127.0.0.1:{port}"
    watch = _Watching("watch", "loss", "--target", target, "--json", "--reconnect", "--count", "4")
    try:
        watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
        with gradwire.connect(target) as client:
            for seed in (1, 2):
                client.reset(seed=seed)
                watch.wait_for(lambda s=seed: len(watch.lines()) == s + 1, "no update")
        first.stop(grace=None)
        watch.wait_for(lambda: "went away" in watch.err.getvalue(), "no word of the stop")
        second = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", port)  # nothing was saved
        try:
            assert watch.join() == 0, watch.err.getvalue()
        finally:
            second.stop(grace=None)
    finally:
        first.stop(grace=None)
    assert [u["version"] for u in watch.lines()] == [0, 1, 2, 0]
    said = watch.err.getvalue().splitlines()
    assert said[1:] == [
        "the server is back, at version 0, 2 versions before the last update it sent (2): "
        "it came back with an older state, and what was applied after its last save (or "
        "since it started, without one) is lost; watching again"
    ], said


@pytest.mark.parametrize("in_a_session", [False, True], ids=["default", "session"])
def test_a_watch_its_server_stopped_under_names_the_option_that_waits_for_it(
    in_a_session: bool,
) -> None:
    """A graceful stop's own words ("watch again once it is back") said nothing of
    --reconnect, which does that by itself (found by a review of watching training
    remotely): said as the hint. A session's watch (`--session ID`) was told the same, and
    so copied watched the default session, another user's model, as if it were the
    session's (a review of two researchers sharing one server): the session is named, and
    that a restart closes it."""
    server = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    try:
        target = f"127.0.0.1:{server.port}"
        on: list[str] = []
        if in_a_session:
            with gradwire.connect(target) as client:
                on = ["--session", client.open_session().detach()]
        watch = _Watching("watch", "loss", "--target", target, *on, "--json")
        watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
        server.stop(grace=5.0)
        assert watch.join() == 1
    finally:
        server.stop(grace=None)
    said = watch.err.getvalue().splitlines()
    assert said[0].startswith("error: UNAVAILABLE: the server is stopping"), said
    kept = ", if it kept the session (a restart closes it: open another)" if on else ""
    assert said[1:] == [
        f"hint: gradwire watch{''.join(' ' + word for word in on)} --reconnect watches again "
        f"by itself once the server is back{kept}"
    ], said


def test_watch_reconnect_of_a_session_the_restart_lost_ends_not_found() -> None:
    """A session lives in its server's memory: watched again on the restarted server, which
    does not know it, the watch ends with NOT_FOUND rather than waiting on, saying the
    restart lost it: it said "it was never opened, was closed, or expired", none of which
    the researcher did (found by a review of watching training remotely)."""
    first = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    port = first.port
    target = f"127.0.0.1:{port}"
    try:
        with gradwire.connect(target) as client:
            session = client.open_session().detach()
        watch = _Watching("watch", "loss", "--target", target, "--session", session,
                          "--json", "--reconnect", "--duration", "30")  # fmt: skip
        watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
        first.stop(grace=None)
        watch.wait_for(lambda: "went away" in watch.err.getvalue(), "no word of the stop")
        second = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", port)
        try:
            assert watch.join() == 1
        finally:
            second.stop(grace=None)
    finally:
        first.stop(grace=None)
    error = watch.err.getvalue().split("error: ", 1)[-1]
    assert error.startswith("NOT_FOUND: the server came back without this watch's session"), error
    assert "the server is back" not in watch.err.getvalue()


def test_watch_reconnect_ends_at_its_duration_while_the_server_is_away() -> None:
    """--duration is the whole command's: reached while the server is away, the watch ends
    as it does with --duration, exit 0, rather than waiting on."""
    first = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    try:
        watch = _Watching(
            "watch", "loss", "--target", f"127.0.0.1:{first.port}", "--json", "--reconnect",
            "--duration", "3",
        )  # fmt: skip
        watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
        first.stop(grace=None)
        assert watch.join() == 0, watch.err.getvalue()
    finally:
        first.stop(grace=None)
    # Said once, however many tries found it still away (one a second).
    assert watch.err.getvalue().count("went away") == 1, watch.err.getvalue()
    assert len(watch.lines()) == 1


def test_watch_reconnect_does_not_wait_for_a_server_that_never_answered() -> None:
    """A server never reached (nothing listening: a wrong --target) is the error it was, at
    once: --reconnect waits only for a server that answered and went away."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    result = run_main("watch", "loss", "--target", target, "--reconnect", "--duration", "20")
    assert result.code == 1
    assert "went away" not in result.err
    assert "no gradwire server answered" in result.err


def test_only_a_watch_whose_server_answered_and_went_away_is_told_of_reconnect() -> None:
    """--reconnect waits for a server that answered and went away: a watch that never
    reached one (a wrong --target, where --reconnect waits for nothing) is not told of it,
    nor one that ended otherwise once answered (its session closed by another client),
    which no waiting mends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    never = run_main("watch", "loss", "--target", f"127.0.0.1:{port}")
    assert never.code == 1
    assert "hint: no gradwire server answered" in never.err
    assert "--reconnect" not in never.err, never.err
    server = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    try:
        target = f"127.0.0.1:{server.port}"
        with gradwire.connect(target) as client:
            session = client.open_session().detach()
            watch = _Watching("watch", "loss", "--target", target, "--session", session, "--json")
            watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
            client.session = session
            client.close_session()
            assert watch.join() == 1
    finally:
        server.stop(grace=None)
    assert watch.err.getvalue().startswith("error: "), watch.err.getvalue()
    assert "--reconnect" not in watch.err.getvalue(), watch.err.getvalue()


def test_ctrl_c_while_the_server_is_away_ends_a_reconnecting_watch() -> None:
    """A --reconnect watch waiting for its server (in the wait between two tries) stops at
    Ctrl-C as any watch does: 130, and where it stopped (a review of watching training
    remotely: nothing checked Ctrl-C in that wait). Run as the installed command is
    (gradwire_cli), whose stderr gRPC's own log lines do not reach."""
    foreground = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'gradwire'; runpy.run_module('gradwire_cli', run_name='__main__')"
    )
    server = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    watch = subprocess.Popen(
        [sys.executable, "-c", foreground, "watch", "loss", "--reconnect",
         "--target", f"127.0.0.1:{server.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None and watch.stderr is not None
        assert watch.stdout.readline().startswith("version 0")  # the watch is open
        server.stop(grace=None)
        assert "went away" in watch.stderr.readline()  # and waiting for the server
        time.sleep(1.5)  # past a try or two
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=30) == 130
        last = watch.stdout.read().splitlines()[-1]
        assert last == "stopped after 1 update: the last at version 0"
        assert "Traceback" not in watch.stderr.read()
    finally:
        server.stop(grace=None)
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)


def test_a_reconnecting_watch_whose_reader_goes_while_the_server_is_away_ends() -> None:
    """`gradwire watch loss --reconnect | head -1`-like, the reader gone while the watch
    waits for its server: the watch ends, 141, rather than wait on for a server that may
    never come back (a review of watching training remotely: nothing checked that wait)."""
    server = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    command = ["watch", "loss", "--json", "--reconnect", "--target", f"127.0.0.1:{server.port}"]
    watch = subprocess.Popen(
        [sys.executable, "-m", "gradwire_cli", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_without_unbuffered(),
    )  # fmt: skip
    try:
        assert watch.stdout is not None and watch.stderr is not None
        assert json.loads(watch.stdout.readline())["cause"] == "Watch"
        server.stop(grace=None)
        assert "went away" in watch.stderr.readline()
        watch.stdout.close()
        assert watch.wait(timeout=60) == 141
    finally:
        server.stop(grace=None)
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)


def test_watch_reconnect_to_a_server_back_without_the_tensor_ends_not_found() -> None:
    """The server back with another model (a deploy of the next experiment), one without
    the watched tensor: the watch ends NOT_FOUND, naming it, exit 1, rather than waiting
    on or printing a traceback."""
    first = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    port = first.port
    target = f"127.0.0.1:{port}"
    watch = _Watching("watch", "norm.running_mean", "--target", target, "--json", "--reconnect")
    try:
        watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
        first.stop(grace=None)
        watch.wait_for(lambda: "went away" in watch.err.getvalue(), "no word of the stop")
        second = start(Trainer(TINY_REGRESSOR, seed=0), "127.0.0.1", port)  # LayerNorm's
        try:
            assert watch.join() == 1
        finally:
            second.stop(grace=None)
    finally:
        first.stop(grace=None)
    said = watch.err.getvalue()
    assert "error: NOT_FOUND: no tensor named 'norm.running_mean'" in said, said
    assert "the server is back" not in said and "Traceback" not in said, said
    assert len(watch.lines()) == 1


class _Screen(io.StringIO):
    """A terminal: what the command writes to its output and to its error stream, on one
    screen."""

    def isatty(self) -> bool:
        return True


class _WatchingOnAScreen(_Watching):
    """`gradwire ARGS` (a watch) on a terminal, its output and its errors on one screen."""

    def __init__(self, *args: str) -> None:
        self.screen = _Screen()
        super().__init__(*args)

    def _run(self, args: tuple[str, ...]) -> None:
        self.code = main(list(args), self.screen, self.screen)

    def shown(self) -> str:
        """What is on the screen now: what came after its last clear."""
        return self.screen.getvalue().rsplit("\x1b[2J", 1)[-1]


def test_watch_reconnect_on_a_terminal_leaves_word_that_the_server_is_back_on_screen() -> None:
    """The README: "the watch says so on stderr, tries again every second, says when the
    server is back". On a terminal it said so, then cleared the screen at once to draw the
    update it came back with: the word, and that of the server's going, were gone before
    anyone could read them, and the table read as though nothing had happened (found by a
    review of watching training remotely)."""
    first = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", 0)
    port = first.port
    target = f"127.0.0.1:{port}"
    watch = _WatchingOnAScreen("watch", "loss", "--target", target, "--reconnect", "--count", "2")
    try:
        watch.wait_for(lambda: "version 0" in watch.shown(), "no first update")
        first.stop(grace=None)
        watch.wait_for(lambda: "went away" in watch.screen.getvalue(), "no word of the stop")
        second = start(Trainer(TINY_MLP, seed=0), "127.0.0.1", port)
        try:
            assert watch.join() == 0, watch.screen.getvalue()  # the update back, the second
        finally:
            second.stop(grace=None)
    finally:
        first.stop(grace=None)
    shown = watch.shown()
    assert shown.startswith("version 0  steps 0  after Watch"), repr(shown)  # it was drawn
    assert "the server is back, at version 0" in shown, repr(shown)


def test_watch_text_table_and_duration(cli: Run) -> None:
    result = cli("watch", "conv2.weight.grad", "linear.weight", "--duration", "0.5")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "version 0  steps 0  after Watch"
    assert lines[1].split() == ["conv2.weight.grad", "absent"]
    assert lines[2].split()[:2] == ["linear.weight", "mean"]


def test_watch_shows_a_scalar_as_its_value(cli: Run, client: gradwire.Client) -> None:
    loss = client.forward(Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64")).loss
    weight = client.get("conv1.weight")[0, 0, 0, 0]
    result = cli("watch", "loss", "conv1.weight[0, 0, 0, 0]", "--count", "1")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[1].split() == ["loss", "value", f"{loss:.6g}"]
    assert lines[2].endswith(f"  value {weight:.6g}")
    assert cli("fill", "nan").code == 0
    client.forward(Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64"))
    result = cli("watch", "loss", "--count", "1")
    assert result.out.splitlines()[1].split() == ["loss", "value", "nan"]


@pytest.mark.parametrize("command", ["stats", "watch", "train"])
def test_help_explains_each_command(command: str) -> None:
    result = run_main(command, "--help")
    assert result.code == 0
    assert "usage: gradwire " + command in result.out
    flags = {"stats": "--bins", "watch": "--every-steps", "train": "--server-side"}
    assert flags[command] in result.out


# BF16_LINEAR takes bfloat16 inputs, floats drawn from a normal distribution: no
# --input-high, which a model of ids needs.
@pytest.mark.parametrize("spec", [TINY_MLP, TINY_REGRESSOR, BF16_LINEAR], ids=lambda s: s.name)
def test_train_makes_data_for_the_model_the_server_serves(spec: ModelSpec) -> None:
    running = start(Trainer(spec, device="cpu", seed=0), "127.0.0.1", 0)
    try:
        target = f"127.0.0.1:{running.port}"
        with gradwire.connect(target) as client:
            listing = client.list_tensors()
            assert (listing.sample_shape, listing.outputs, listing.loss) == (
                spec.sample_shape,
                spec.num_classes,
                spec.loss,
            )
            result = run_main("train", "--steps", "3", "--batch", "4", "--json", "--target", target)
            assert result.code == 0, result.err
            assert result.json()["version"] == client.list_tensors().version == 12
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize("spec", [TINY_MLP, TINY_REGRESSOR], ids=lambda s: s.name)
def test_forward_by_default_sends_ones_shaped_for_the_model(spec: ModelSpec) -> None:
    # A bare `gradwire forward` sent the tutorial's [8, 3, 10, 10] to any model.
    with serving(spec, seed=0) as (_, client):
        result = run_main("forward", "--json", "--target", client.target)
        assert result.code == 0, result.err
        assert result.json()["output_shape"] == [8, spec.num_classes]
        np.testing.assert_array_equal(client.get("input"), np.ones((8, *spec.sample_shape)))
        expected = np.ones((8, spec.num_classes)) if spec.loss == "mse" else np.ones(8)
        np.testing.assert_array_equal(client.get("target"), expected)


def test_forward_by_default_targets_the_inputs_batch(cli: Run, tmp_path: Path) -> None:
    # Four samples from a file and no --targets: the default targets were 8, refused.
    path = tmp_path / "x.npy"
    np.save(path, np.ones((4, 3, 10, 10), dtype=np.float32))
    result = cli("forward", "--input", str(path), "--json")
    assert result.code == 0, result.err
    assert result.json()["output_shape"] == [4, 20]
    assert result.json()["loss"] is not None


def test_watch_values_of_a_large_tensor_fit_on_a_line(cli: Run, client: gradwire.Client) -> None:
    # conv1.weight's 432 values made a line 7 KB long.
    argv = ("conv1.weight", "conv1.weight[0,0,0]", "conv1.weight[0, :2, :2]")  # 432, 3, 12
    result = cli("watch", *argv, "--values", "--count", "1")
    assert result.code == 0, result.err
    whole, part, twelve = result.out.splitlines()[1:4]
    weight = client.get("conv1.weight").reshape(-1)
    assert whole.split()[1] == f"[{weight[0]:.4g},"
    assert whole.endswith("of torch.Size([16, 3, 3, 3]) (--json for every value)")
    assert len(whole) < 200
    assert part.split(maxsplit=1)[1].startswith("tensor([")  # a slice of 3: every value
    assert "  tensor([[[" in twelve and "of torch.Size" not in twelve  # CELL_VALUES: every value


def test_watch_values_of_a_bfloat16_slice_say_their_dtype() -> None:
    """Its values arrive as float32: the cell printed them as a float32 tensor's, and
    --json said nothing of the dtype (get --json does)."""
    with serving(BF16_LINEAR, seed=0) as (_, client):
        expected = client.get("weight[0, :3]", as_torch=True)
        assert isinstance(expected, torch.Tensor) and expected.dtype == torch.bfloat16
        argv = ("watch", "weight[0, :3]", "--values", "--count", "1", "--target", client.target)
        result = run_main(*argv)
        watched_json = run_main(*argv, "--json")
    assert (result.code, result.err) == (0, "")
    assert (watched_json.code, watched_json.err) == (0, "")
    selector, cell = result.out.splitlines()[1].strip().split("  ", maxsplit=1)
    assert selector == "weight[0, :3]"
    assert cell == " ".join(repr(expected).split())
    assert cell.endswith("dtype=torch.bfloat16)")
    (item,) = json.loads(watched_json.out)["tensors"]
    assert item["dtype"] == "bfloat16" and item["value"] == expected.float().tolist()


def test_forward_by_default_fits_a_model_of_scalar_samples() -> None:
    # Token ids of shape [N]: sample_shape () read as "not described", and the tutorial's
    # [8, 3, 10, 10] went to it.
    from torch import nn

    tokens = ModelSpec(
        "Tokens",
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)),
        (),
        3,
        input_dtype=torch.int64,
    )
    with serving(tokens, seed=0) as (_, client):
        result = run_main("forward", "--json", "--target", client.target)
        assert result.code == 0, result.err
        assert result.json()["output_shape"] == [8, 3]


def test_train_draws_the_ids_of_a_model_of_integer_inputs_below_input_high() -> None:
    # It refused such a model ("train makes random floats") and sent the user to Python.
    from torch import nn

    from tests.broken_models import TOKENS

    with serving(TOKENS, seed=0) as (_, client):
        refused = run_main("train", "--steps", "2", "--target", client.target)
        assert refused.code == 2
        assert "Tokens takes int64 inputs (ids, say): give --input-high N" in refused.err
        result = run_main(
            "train", "--steps", "3", "--input-high", "10", "--json", "--target", client.target
        )
        assert result.code == 0, result.err
        assert result.json()["steps"] == 3
        ids = client.get("input")
        assert ids.dtype == np.int64 and ids.shape == (8, 4)
        assert ids.min() == 0 and ids.max() < 10  # 0 drawn too (seeded: the same each run)
        past = run_main("train", "--steps", "1", "--input-high", "11", "--target", client.target)
        assert past.code == 1 and "Tokens refused this input" in past.err  # id 10: past its rows
    with serving(ModelSpec("Floats", lambda: nn.Linear(4, 3), (4,), 3), seed=0) as (_, other):
        wrong = run_main("train", "--input-high", "5", "--target", other.target)
        assert wrong.code == 2
        assert "--input-high is for a model of integer inputs; Floats takes float32" in wrong.err


def test_a_server_that_does_not_describe_its_model_gets_the_tutorials_input() -> None:
    # Before ListTensors described the model, a server sent no outputs and no input dtype
    # ("unknown" here); forward then asked for dtype 'unknown' and stopped.
    from gradwire.cli.tensors import model_input
    from gradwire.results import Listing, OptimizerConfig

    old = Listing(0, "Simple", "cpu", OptimizerConfig("sgd", 1.0), (), (), "unknown", 0, "")
    assert model_input(old) == ((3, 10, 10), None)
    # A model described without its input's dtype: the server's float32, not 'unknown'.
    unsaid = Listing(0, "M", "cpu", OptimizerConfig("sgd", 1.0), (), (16,), "unknown", 4, "")
    assert model_input(unsaid) == ((16,), None)


# --- found by a review ------------------------------------------------------------------------


def test_watch_json_names_each_selector(cli: Run) -> None:
    # Two slices of one tensor were both just "conv1.weight".
    result = cli("watch", "conv1.weight[0]", "conv1.weight[ 1 ]", "--json", "--count", "1")
    assert result.code == 0, result.err
    tensors = json.loads(result.out)["tensors"]
    assert [(t["name"], t["selector"]) for t in tensors] == [
        ("conv1.weight", "conv1.weight[0]"),
        ("conv1.weight", "conv1.weight[1]"),  # as get --json writes it
    ]
    assert all(t["present"] and t["stats"]["count"] == 27 for t in tensors)


def test_watch_bins_with_values_alone_is_a_usage_error_naming_the_options(cli: Run) -> None:
    """--values leaves the statistics out, and with them --bins' histograms: the refusal
    names the command line's options, where the client's own said "stats=False"."""
    result = cli("watch", "loss", "--values", "--bins", "3", "--count", "1")
    assert result.code == 2
    assert result.err == (
        "gradwire watch: error: --bins draws histograms in the statistics, which --values "
        "alone leaves out: add --stats, or leave --bins out\n"
    )


def test_watch_bins_shows_a_histogram_in_text(cli: Run, client: gradwire.Client) -> None:
    result = cli("watch", "conv1.weight", "loss", "--bins", "3", "--count", "1")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[1].split()[:2] == ["conv1.weight", "mean"]
    bars = lines[2:5]
    assert all(line.startswith("      [") for line in bars)
    read = client.stats("conv1.weight", bins=3).stats
    assert read is not None and read.histogram is not None
    found = [re.search(r"[)\]] +(\d+) ", line) for line in bars]  # the count after each bin
    assert [int(m.group(1)) for m in found if m] == list(read.histogram.counts)
    assert lines[5].split() == ["loss", "absent"]
    assert len(lines) == 6


def test_stats_histogram_columns_line_up(cli: Run) -> None:
    # Edges of unlike widths (0 beside 0.025) pushed the counts and bars out of line.
    result = cli("stats", "conv1.weight", "--bins", "4", "--low", "0", "--high", "0.1")
    assert result.code == 0, result.err
    bars = [line for line in result.out.splitlines() if line.startswith("  [")]
    assert len(bars) == 4
    assert len({line.index(",") for line in bars}) == 1
    assert len({line.index(")") if ")" in line else line.index("]") for line in bars}) == 1
    assert bars[0].startswith("  [     0,  0.025)")


@pytest.mark.parametrize("mode", [[], ["--server-side"]], ids=["steps", "server-side"])
def test_train_that_runs_no_step_prints_no_summary(cli: Run, mode: list[str]) -> None:
    # It printed "stopped after 0 steps: loss nan" before the error.
    result = cli("train", "--steps", "3", "--input-shape", "3,8,8", *mode)
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("error: INVALID_ARGUMENT: input has shape [8, 3, 8, 8]")


def test_an_absent_step_change_says_when_it_will_be_there(cli: Run, tmp_path: Path) -> None:
    """get and stats of a delta not yet recorded printed a bare None, read as "the step
    changed nothing", and plot said it would exist "after gradwire forward" (found by the
    forty-fourth session's walkthrough as a researcher)."""
    assert cli("forward").code == 0
    assert cli("backward").code == 0
    assert cli("step").code == 0
    for command in ("get", "stats"):
        result = cli(command, "conv1.weight.delta")
        assert (result.code, result.out) == (0, "None\n")
        assert result.err == (
            "hint: conv1.weight.delta is absent; it is there after the next `gradwire step`: "
            "a parameter's change is recorded from the first time it is asked for, as now\n"
        )
        assert cli(command, "conv1.weight.delta", "--json").err == ""
    assert cli("get", "conv1.weight.grad").err == ""  # present: no word
    drawn = cli("plot", "linear.weight.delta", "--out", str(tmp_path / "d.png"))
    assert drawn.code == 1
    assert "it exists after the next `gradwire step`" in drawn.err
    assert cli("forward").code == 0 and cli("backward").code == 0 and cli("step").code == 0
    present = cli("get", "conv1.weight.delta[0, 0, 0]")
    assert (present.code, present.err) == (0, "")
    assert present.out.startswith("tensor([")  # the change, recorded since the first ask


def _watch_while_training(cli: Run, address: str, *argv: str) -> list[dict[str, Any]]:
    """`gradwire watch loss --json ARGV` run while another client trains, one step after
    another, until the watch ends: its updates."""
    results: list[Result] = []
    thread = threading.Thread(target=lambda: results.append(cli("watch", "loss", "--json", *argv)))
    thread.start()
    with gradwire.connect(address) as driver:
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            driver.train_step(Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64"))
            time.sleep(0.01)
    thread.join(10)
    assert not thread.is_alive()
    assert results[0].code == 0, results[0].err
    return [json.loads(line) for line in results[0].out.splitlines()]


def test_watch_json_says_the_model_s_steps_and_the_updates_merged(
    cli: Run, client: gradwire.Client, address: str
) -> None:
    """Each line's "steps" is the model's count of steps, and "skipped" the updates merged
    into it by --interval: neither was checked (a mutation test of the command line)."""
    for _ in range(5):
        client.train_step(Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64"))
    result = cli("watch", "loss", "--json", "--count", "1")
    first = json.loads(result.out)
    assert (first["steps"], first["skipped"]) == (5, 0) and first["version"] != 5, first
    # Steps every 10 ms, at most one update a second: the second stands for several (a
    # step a second after the first update, none before it, would be needed to fail).
    updates = _watch_while_training(cli, address, "--interval", "1", "--count", "2")
    assert updates[1]["cause"] == "TrainStep" and updates[1]["skipped"] >= 1, updates


def test_watch_every_steps_sends_an_update_only_every_so_many_steps(
    client: gradwire.Client, address: str
) -> None:
    """--every-steps reached the server: after the first update, the next comes at the
    third step, standing for no update skipped, not at the first (a mutation test: the
    option could be dropped, unseen)."""
    watch = _Watching(
        "watch", "loss", "--target", address, "--json", "--every-steps", "3", "--count", "2"
    )
    watch.wait_for(lambda: len(watch.lines()) == 1, "no first update")
    for _ in range(3):
        client.train_step(Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64"))
    assert watch.join() == 0, watch.err.getvalue()
    first, second = watch.lines()
    assert (first["steps"], second["cause"], second["steps"], second["skipped"]) == (
        0,
        "TrainStep",
        3,
        0,
    ), watch.lines()


def test_watch_interval_holds_back_the_updates_it_asks_to(cli: Run, address: str) -> None:
    """--interval reached the server: an hour's interval lets no update follow the first
    within the watch's second, however many steps are taken (a mutation test: it could be
    dropped, unseen)."""
    updates = _watch_while_training(cli, address, "--interval", "3600", "--duration", "1")
    assert [u["cause"] for u in updates] == ["Watch"]
