"""Each model's own random stream on a CUDA device (random_stream.py): dropout's masks follow
the model's seed as in a local run on the GPU, whatever sessions and the process draw between;
failed calls, checkpoints and a teacher's passes as on the CPU (test_random_stream.py, where
the tests of a failed call and of two sessions of one seed run on each device).

Skipped where there is no CUDA (conftest.py); run on a GPU machine with `pytest -m cuda`
(scripts/gpu_check.sh does).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from gradwire_server.errors import InvalidInput
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer
from tests.serve_in_process import serving
from tests.test_random_stream import (
    SPEC,
    Dropping,
    NoisyGradients,
    X,
    Y,
    assert_same_masks,
    local_outputs,
    remote_step,
    rewritten,
)

pytestmark = pytest.mark.cuda


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same masks, as a GPU draws them (its kernels may round the last bits apart)."""
    assert_same_masks(got, want, "cuda")


@pytest.mark.parametrize("factory", [Dropping, NoisyGradients], ids=["dropout", "noisy-backward"])
def test_masks_on_a_gpu_are_a_local_gpu_run_s_whatever_else_draws(
    factory: Callable[[], nn.Module],
) -> None:
    # NoisyGradients draws in its backward pass, which autograd runs on a thread of its own
    # for the device: the stream is in the device's generator, whichever thread draws.
    expected = local_outputs(5, 3, factory, device="cuda")
    assert not torch.equal(expected[0], expected[1])  # the masks differ from pass to pass
    spec = ModelSpec(factory.__name__, factory, (8,), 3)
    with serving(spec, seed=5, device="cuda") as (_, client), client.open_session(seed=11) as other:
        for step, want in enumerate(expected):
            # Another session's passes and the process's own draws on the device fall between
            # this model's passes: before, they drew from the same generator.
            other.forward(X.numpy())
            torch.rand(17, device="cuda")
            got = remote_step(client, fused=step == 1)
            same(got, want)


def test_the_process_s_gpu_generator_is_left_as_it_was() -> None:
    trainer = Trainer(SPEC, device="cuda", seed=5)
    try:
        before = torch.cuda.get_rng_state()
        trainer.train_step(X, Y, use=lambda selection: None)
        trainer.forward(X)
        assert torch.equal(torch.cuda.get_rng_state(), before)
    finally:
        trainer.close()


def test_a_gpu_checkpoint_keeps_the_stream_and_refuses_a_damaged_one(tmp_path: Path) -> None:
    trainer = Trainer(SPEC, device="cuda", seed=5)
    try:
        trainer.forward(X)
        path = tmp_path / "state.safetensors"
        trainer.save(path)
        trainer.forward(X)
        after_save = trainer.read("output").value.cpu()
        trainer.forward(X)
        trainer.load(path)
        trainer.forward(X)
        same(trainer.read("output").value.cpu(), after_save)

        def damage(tensors: dict[str, torch.Tensor]) -> None:
            assert tensors["random/cuda"].shape == (16,)  # CUDA's: its seed and offset
            tensors["random/cuda"][8] = 1  # an offset no CUDA generator takes
            tensors["param/fc.weight"] = tensors["param/fc.weight"] + 1

        damaged = rewritten(path, "damaged.safetensors", damage)
        weight = trainer.read("fc.weight").value.clone()
        with pytest.raises(InvalidInput) as refused:
            trainer.load(damaged)
        assert refused.value.reason == "BAD_CHECKPOINT"
        assert refused.value.message.startswith(
            f"cannot load {damaged}: its random state is not one of a cuda generator"
        )
        assert torch.equal(trainer.read("fc.weight").value, weight)
        trainer.forward(X)  # and the stream still draws
    finally:
        trainer.close()


@pytest.mark.timeout(120)
def test_a_gpu_model_whose_forward_runs_a_gpu_teacher_s_runs() -> None:
    """The student's pass holds the device's stream lock and waits for the teacher's
    thread, whose pass needs that lock: without `set_aside`, each waited for the other."""
    teacher = Trainer(SPEC, device="cuda", seed=1)

    class Student(Dropping):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            teacher.forward(x)
            return super().forward(x) + teacher.read("output").value.to(x.device)

    student = Trainer(ModelSpec("Student", Student, (8,), 3), device="cuda", seed=5)
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(student.forward(X)), daemon=True)
    thread.start()
    thread.join(60)
    assert done, "the student's forward pass did not end"
    # each drew from its own stream, as a local run of each seed on the GPU draws
    x = X.to("cuda")
    torch.manual_seed(1)
    from_teacher = Dropping().to("cuda")(x)
    torch.manual_seed(5)
    expected = (Dropping().to("cuda")(x) + from_teacher).detach().cpu()
    same(student.read("output").value.cpu(), expected)
    student.close()
    teacher.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ask", ["read", "list_tensors"])
def test_a_gpu_student_asking_its_teacher_while_the_teacher_is_in_a_pass_runs(ask: str) -> None:
    """The student's pass holds the device's stream lock and waits for the teacher's lock
    (a read and a listing take it on the caller's thread), which the teacher's own Forward
    holds while it waits for the stream lock: without the trainer's lock setting the
    student's streams aside, each waited for the other, and every pass on the device after
    them (found by a review)."""
    teacher = Trainer(SPEC, device="cuda", seed=1)
    teacher.forward(X)
    in_pass = threading.Event()

    class Student(Dropping):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            in_pass.set()
            time.sleep(0.5)  # the teacher's Forward, started meanwhile, waits for the stream
            if ask == "list_tensors":
                teacher.list_tensors()
                return super().forward(x)
            return super().forward(x) + teacher.read("output").value.to(x.device)

    student = Trainer(ModelSpec("Student", Student, (8,), 3), device="cuda", seed=5)
    done: list[object] = []
    passes = [
        threading.Thread(target=lambda: done.append(student.forward(X)), daemon=True),
        threading.Thread(
            target=lambda: in_pass.wait(30) and done.append(teacher.forward(X)), daemon=True
        ),
    ]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join(60)
    assert len(done) == 2, "the two passes waited for each other"
    # The student read the teacher's output once its Forward was done, and drew its own masks.
    torch.manual_seed(5)
    own = Dropping().to("cuda")(X.to("cuda")).detach().cpu()
    if ask == "read":
        own = own + teacher.read("output").value.cpu()
    same(student.read("output").value.cpu(), own)
    student.close()
    teacher.close()
