"""With --one-thread-for-small-work, small work runs on the torch thread alone and large work
on torch's threads (openmp.py); without it, everything on torch's threads.

What each op saw is read inside the model and the optimizer (`torch.get_num_threads()`, which
is OpenMP's team size for the calling thread); nothing here is timed.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import gradwire
from gradwire_server import openmp, optim
from gradwire_server.app import describe_threads, start
from gradwire_server.models import SIMPLE, ModelSpec
from gradwire_server.trainer import (
    _SHAPES_REMEMBERED,
    ONE_THREAD_MAX_FLOPS,
    ONE_THREAD_MAX_VALUES,
    Trainer,
)
from tests.cli_run import run_main
from tests.serve_process import serving

DEFAULT = torch.get_num_threads()

needs_two = pytest.mark.skipif(
    DEFAULT < 2, reason="torch runs on one thread here: nothing to tell apart"
)


def test_torch_s_openmp_runtime_is_found_on_linux() -> None:
    if sys.platform != "linux":
        pytest.skip("found through /proc/self/maps")
    assert openmp.available()
    assert openmp.runtime() is openmp.runtime()  # looked for once
    assert not openmp._drives_torch(lambda threads: None)  # a runtime that is not torch's


@pytest.mark.parametrize(
    ("path", "found"),
    [
        ("/usr/lib/x86_64-linux-gnu/libgomp.so.1", True),
        ("/venv/lib/python3.11/site-packages/torch/lib/libgomp-a34b3233.so.1", True),  # wheels'
        ("/opt/intel/lib/libiomp5.so", True),
        ("/opt/homebrew/opt/libomp/lib/libomp.dylib", True),
        ("/usr/lib/llvm-17/lib/libomp.so.5", True),
        ("/usr/lib/libgomp.a", False),  # a static archive: never mapped, never loadable
        ("/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so", False),
        ("/usr/lib/libgompx.so.1", False),
        ("/usr/lib/libgomp.so~", False),  # an editor's copy
        ("/usr/lib/llvm-17/lib/libomptarget.so", False),  # offloading's, not a runtime
    ],
)
def test_the_runtimes_looked_for_are_openmp_s_by_their_file_names(path: str, found: bool) -> None:
    assert bool(openmp._RUNTIME.search(path)) is found


def test_start_team_starts_every_worker_of_the_calling_thread_s_team() -> None:
    """libgomp starts a thread's workers at its first parallel op, and ends the process
    when one cannot start: start_team's op must be large enough to take every thread torch
    would use, or the rest start later, at a step, where none may be left."""
    if sys.platform != "linux" or not openmp.available():
        pytest.skip("counts the process's threads in /proc/self/task")
    set_threads = openmp.runtime()
    assert set_threads is not None
    started: list[int] = []

    def fresh() -> None:  # a thread of its own: its own team, none started yet
        torch.get_num_threads()  # torch sets a thread's team size at its first call
        set_threads(3)  # more than one, on any machine
        before = len(os.listdir("/proc/self/task"))
        openmp.start_team()
        started.append(len(os.listdir("/proc/self/task")) - before)

    worker = threading.Thread(target=fresh)
    worker.start()
    worker.join()
    assert started == [2]  # the team's other two threads; the calling one is the third


@needs_two
def test_one_thread_sets_the_calling_thread_only_and_puts_it_back() -> None:
    inside = threading.Event()
    leave = threading.Event()
    seen: dict[str, int] = {}

    def small() -> None:
        with openmp.one_thread():
            seen["inside"] = torch.get_num_threads()
            inside.set()
            leave.wait(timeout=60)
        seen["after"] = torch.get_num_threads()

    worker = threading.Thread(target=small)
    worker.start()
    assert inside.wait(timeout=60)
    seen["other thread meanwhile"] = torch.get_num_threads()
    leave.set()
    worker.join()
    assert seen == {"inside": 1, "after": DEFAULT, "other thread meanwhile": DEFAULT}
    with openmp.one_thread(when=False):
        assert torch.get_num_threads() == DEFAULT


class Recorder:
    """What torch's team size was in each part of a step, on real (not meta) tensors."""

    def __init__(self, trainer: Trainer) -> None:
        self.seen: list[tuple[str, int]] = []
        self._trainer = trainer
        trainer._model.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
        if out.device.type == "meta":  # the trainer counting a pass's operations
            return
        self.seen.append(("forward", torch.get_num_threads()))
        out.register_hook(lambda grad: self.seen.append(("backward", torch.get_num_threads())))

    def _step(self, *args: object) -> None:
        self.seen.append(("step", torch.get_num_threads()))

    def __enter__(self) -> Recorder:
        self._hook = register_optimizer_step_pre_hook(self._step)
        # Optimizers have no zero_grad hook: the trainer's zeroing, seen on its way in.
        self._zero_grad = zero_grad = optim.zero_grad

        def seen_zero_grad(optimizer: torch.optim.Optimizer, set_to_none: bool) -> None:
            if optimizer is self._trainer._optimizer:
                self.seen.append(("zero_grad", torch.get_num_threads()))
            zero_grad(optimizer, set_to_none)

        optim.zero_grad = seen_zero_grad
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        optim.zero_grad = self._zero_grad

    def take(self) -> list[tuple[str, int]]:
        seen, self.seen = self.seen, []
        return seen


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, 10, 10, generator=gen), torch.randint(0, 20, (n,), generator=gen)


@contextmanager
def recording(
    spec: ModelSpec = SIMPLE, one_thread: bool = True
) -> Iterator[tuple[Trainer, Recorder]]:
    trainer = Trainer(spec, seed=0, one_thread_for_small_work=one_thread)
    try:
        with Recorder(trainer) as recorder:
            yield trainer, recorder
    finally:
        trainer.close()


@pytest.fixture
def recorded() -> Iterator[tuple[Trainer, Recorder]]:
    with recording() as both:
        yield both


def separate_calls(trainer: Trainer, n: int, step: bool = True) -> None:
    x, y = batch(n)
    assert trainer.forward(x, y).loss is not None
    trainer.backward()
    if step:
        trainer.step()


def test_the_tutorial_s_step_is_small_and_batch_64_is_not() -> None:
    # The thresholds, against what torch's counter says of the tutorial's model: batch 8's
    # three passes fit under the line, batch 64's forward pass alone does not; and the
    # model's 69,040 values are one small update.
    trainer = Trainer(seed=0, one_thread_for_small_work=True)
    try:
        small, large = (trainer._meta_run(batch(n)[0].shape, torch.float32) for n in (8, 64))
        assert small is not None and large is not None
        assert 3 * small.flops <= ONE_THREAD_MAX_FLOPS
        assert large.flops > ONE_THREAD_MAX_FLOPS
        assert sum(p.numel() for p in trainer._model.parameters()) <= ONE_THREAD_MAX_VALUES
    finally:
        trainer.close()


@needs_two
def test_small_steps_run_on_one_thread(recorded: tuple[Trainer, Recorder]) -> None:
    trainer, recorder = recorded
    separate_calls(trainer, 8)
    trainer.zero_grad(set_to_none=False)
    trainer.train_step(*batch(8), use=lambda s: s)
    assert recorder.take() == [
        ("forward", 1),
        ("backward", 1),
        ("step", 1),
        ("zero_grad", 1),
        ("forward", 1),
        ("backward", 1),
        ("step", 1),
    ]


@needs_two
def test_large_passes_run_on_torch_s_threads(recorded: tuple[Trainer, Recorder]) -> None:
    trainer, recorder = recorded
    separate_calls(trainer, 64)  # the update alone, Step, is small
    trainer.train_step(*batch(64), use=lambda s: s)
    assert recorder.take() == [
        ("forward", DEFAULT),
        ("backward", DEFAULT),
        ("step", 1),
        ("forward", DEFAULT),
        ("backward", DEFAULT),
        ("step", DEFAULT),
    ]


class Wide(nn.Module):
    """A small pass over many values: 400,000 weights, more than one small update."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 10 * 10, 20 * 20 * 50, bias=False)
        self.head = nn.Linear(20 * 20 * 50, 20, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.linear(x.flatten(1)))
        return out


@needs_two
def test_updates_of_many_values_run_on_torch_s_threads() -> None:
    with recording(ModelSpec("Wide", Wide, (3, 10, 10), 20)) as (trainer, recorder):
        separate_calls(trainer, 1)
        trainer.zero_grad(set_to_none=False)  # zeros written over as many values
        assert recorder.take() == [
            ("forward", 1),
            ("backward", 1),
            ("step", DEFAULT),
            ("zero_grad", DEFAULT),
        ]


class AtTheLines(nn.Module):
    """One 512 by 512 layer whose bias is frozen: at batch 64 its forward pass is exactly
    ONE_THREAD_MAX_FLOPS, and its weight exactly ONE_THREAD_MAX_VALUES values that train, of
    ONE_THREAD_MAX_VALUES + 512 in all."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, 512)
        self.linear.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


@needs_two
def test_a_job_exactly_at_the_line_runs_on_one_thread() -> None:
    # The lines are inclusive, and an update counts the values that train alone: the
    # forward pass and the Step on one thread, the backward pass (twice the line) not.
    spec = ModelSpec("AtTheLines", AtTheLines, (512,), 512)
    with recording(spec) as (trainer, recorder):
        run = trainer._meta_run((64, 512), torch.float32)
        assert run is not None and run.flops == ONE_THREAD_MAX_FLOPS
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 512, generator=gen), torch.randint(0, 512, (64,), generator=gen)
        trainer.forward(x, y)
        trainer.backward()
        trainer.step()
        assert recorder.take() == [("forward", 1), ("backward", DEFAULT), ("step", 1)]


class ManyValues(nn.Module):
    """A small pass, and one value more than a small update: a parameter that only adds
    its sum to the output (a sum is no operation torch's counter counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 10 * 10, 20, bias=False)
        self.many = nn.Parameter(torch.zeros(ONE_THREAD_MAX_VALUES + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(x.flatten(1)) + self.many.sum()
        return out


@needs_two
def test_a_train_step_counts_its_three_passes_and_its_update() -> None:
    # At batch 32 AtTheLines's pass is half the line: two passes fit under it, a
    # TrainStep's three (a forward, a backward of two) do not. ManyValues's passes are small
    # and its update is not. Either runs the whole TrainStep on torch's threads.
    spec = ModelSpec("AtTheLines", AtTheLines, (512,), 512)
    with recording(spec) as (trainer, recorder):
        run = trainer._meta_run((32, 512), torch.float32)
        assert run is not None and 2 * run.flops == ONE_THREAD_MAX_FLOPS
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 512, generator=gen), torch.randint(0, 512, (32,), generator=gen)
        trainer.train_step(x, y, use=lambda s: s)
        assert recorder.take() == [("forward", DEFAULT), ("backward", DEFAULT), ("step", DEFAULT)]
    with recording(ModelSpec("ManyValues", ManyValues, (3, 10, 10), 20)) as (trainer, recorder):
        trainer.train_step(*batch(1), use=lambda s: s)
        assert recorder.take() == [("forward", DEFAULT), ("backward", DEFAULT), ("step", DEFAULT)]


class NotOnMeta(nn.Module):
    """A model whose pass needs real values (`.item()`): its operations cannot be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(300, 20, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if x.abs().max().item() < 1e6 else 1e-6
        out: torch.Tensor = self.linear(x.flatten(1)) * scale
        return out


@needs_two
def test_a_pass_that_cannot_be_counted_runs_on_torch_s_threads() -> None:
    with recording(ModelSpec("NotOnMeta", NotOnMeta, (3, 10, 10), 20)) as (trainer, recorder):
        separate_calls(trainer, 8, step=False)
        assert recorder.take() == [("forward", DEFAULT), ("backward", DEFAULT)]


@needs_two
def test_by_default_every_op_runs_on_torch_s_threads() -> None:
    assert Trainer.__init__.__kwdefaults__["one_thread_for_small_work"] is False
    with recording(one_thread=False) as (trainer, recorder):
        separate_calls(trainer, 8)
        trainer.zero_grad(set_to_none=False)
        assert recorder.take() == [
            ("forward", DEFAULT),
            ("backward", DEFAULT),
            ("step", DEFAULT),
            ("zero_grad", DEFAULT),
        ]


def local_step(threads: str) -> tuple[float, dict[str, torch.Tensor]]:
    """The tutorial's step in plain PyTorch, on the trainer's seed and batch(8): loss and
    weights after, on one thread or on torch's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SIMPLE.factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = batch(8)
    with openmp.one_thread(when=threads == "one"):
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        optimizer.step()
    return loss.item(), {n: p.detach() for n, p in model.named_parameters()}


def test_a_small_step_on_one_thread_is_pytorch_s_on_one_thread_bit_for_bit() -> None:
    trainer = Trainer(seed=0, one_thread_for_small_work=True)
    try:
        x, y = batch(8)
        loss = trainer.train_step(x, y, use=lambda s: s).loss
        weights = {n: p.detach().clone() for n, p in trainer._parameters.items()}
    finally:
        trainer.close()
    one_loss, one_weights = local_step("one")
    assert loss == one_loss
    for name, weight in weights.items():
        assert torch.equal(weight, one_weights[name]), name
    # Against torch's threads, the same to float32's rounding.
    all_loss, all_weights = local_step("all")
    assert loss == pytest.approx(all_loss, rel=1e-6)
    for name, weight in weights.items():
        torch.testing.assert_close(weight, all_weights[name])


def test_sessions_use_threads_as_the_server_s_trainer_does() -> None:
    running = start(Trainer(seed=0, one_thread_for_small_work=True), "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{running.port}"
        with gradwire.Client(address) as client, client.open_session(seed=0) as session:
            trainer = running.servicer.sessions.get(session.session)
            assert trainer.one_thread_for_small_work is True
    finally:
        running.stop(grace=None)


def test_gradwire_serve_says_how_steps_use_threads() -> None:
    with serving() as (_, log):
        assert f"steps run on torch's {DEFAULT} threads" in log
    with serving("--one-thread-for-small-work") as (_, log):
        expected = f"steps under {ONE_THREAD_MAX_FLOPS / 1e6:.1f} MFLOP run on one thread"
        assert expected in log


def test_the_flag_without_an_openmp_runtime_is_said_to_use_torch_s_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openmp, "available", lambda: False)
    threads = torch.get_num_threads()
    assert describe_threads(True, torch.device("cpu")) == (
        f"steps run on torch's {threads} threads (OpenMP runtime not found)"
    )


def test_the_flag_is_said_to_change_nothing_on_a_gpu() -> None:
    cuda = torch.device("cuda:0")  # a device named, not used: no GPU needed
    assert describe_threads(True, cuda) == (
        "--one-thread-for-small-work changes nothing on cuda:0: steps run there"
    )
    assert describe_threads(False, cuda) is None


def test_serve_s_help_quotes_the_line_the_trainer_draws() -> None:
    # The client's CLI does not import the server, so its help states the threshold itself.
    result = run_main("serve", "--help")
    assert result.code == 0
    help_text = " ".join(result.out.split())  # argparse wraps lines
    assert "--one-thread-for-small-work" in help_text
    assert f"{ONE_THREAD_MAX_FLOPS / 1e6:.1f} MFLOP" in help_text


def test_a_shape_seen_again_reuses_its_run_on_meta_tensors() -> None:
    """A run on meta tensors is made once per input shape and dtype and kept, not made
    again (the model copied onto meta tensors and run) at each TrainStep of that shape."""
    trainer = Trainer(seed=0, one_thread_for_small_work=True)
    try:
        first = trainer._meta_run((4, 3, 10, 10), torch.float32)
        assert first is not None
        assert trainer._meta_run((4, 3, 10, 10), torch.float32) is first
        assert trainer._meta_run((4, 3, 10, 10), torch.float64) is not first
    finally:
        trainer.close()


def test_operation_counts_are_kept_for_a_bounded_number_of_shapes() -> None:
    trainer = Trainer(seed=0, one_thread_for_small_work=True)
    try:
        runs = [trainer._meta_run((n, 3, 10, 10), torch.float32) for n in range(1, 71)]
        assert len(trainer._meta_runs) == _SHAPES_REMEMBERED
        assert (70, 3, 10, 10) in {shape for shape, _ in trainer._meta_runs}
        assert (1, 3, 10, 10) not in {shape for shape, _ in trainer._meta_runs}  # the oldest went
        # A pass's count grows with the batch, exactly: the counter counts, it does not time.
        counts = [run.flops for run in runs if run is not None]
        assert len(counts) == 70 and all(c == counts[0] * n for n, c in enumerate(counts, 1))
    finally:
        trainer.close()
