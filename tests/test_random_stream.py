"""Each model's own random stream (random_stream.py): dropout's masks follow the model's seed,
as in a local PyTorch run, whatever sessions and the process draw between; checkpoints keep it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import gradwire
from gradwire import errors
from gradwire_server import random_stream
from gradwire_server.errors import InvalidInput
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer
from tests.checkpoint_files import resave
from tests.serve_in_process import ON_EACH_DEVICE, serving


class Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.fc(x))))  # type: ignore[no-any-return]


SPEC = ModelSpec("Dropping", Dropping, (8,), 3)


class _FailsBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this backward pass fails")


class Failing(Dropping):
    """Draws its masks, then refuses an input starting 99, or fails in the backward pass of
    one starting 77."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if x[0, 0] == 99:
            raise ValueError("an input starting 99 is refused")
        if x[0, 0] == 77:
            out = _FailsBackward.apply(out)
        return out


X = torch.linspace(-1, 1, 4 * 8).reshape(4, 8)
Y = torch.tensor([0, 1, 2, 1])


def local_outputs(
    seed: int, passes: int, factory: Callable[[], nn.Module] = Dropping, device: str = "cpu"
) -> list[torch.Tensor]:
    """What a local run on `device` computes: torch.manual_seed(seed) (which seeds a GPU's
    generator too), the model moved there, then training steps (forward, loss, backward, SGD
    at lr 1.0, zero_grad), each step's output kept, on the CPU."""
    torch.manual_seed(seed)
    model = factory().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = X.to(device), Y.to(device)
    outputs = []
    for _ in range(passes):
        output = model(x)
        nn.functional.cross_entropy(output, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(output.detach().cpu())
    return outputs


def remote_step(client: gradwire.Client, fused: bool) -> torch.Tensor:
    """A training step of local_outputs' on (X, Y) over gRPC, as one TrainStep or as
    Forward, Backward, Step and ZeroGrad; the step's output."""
    if fused:
        client.train_step(X.numpy(), Y.numpy())
        return client.read("output", as_torch=True).value  # type: ignore[no-any-return]
    client.forward(X.numpy(), Y.numpy())
    output = client.read("output", as_torch=True).value
    client.backward()
    client.step()
    client.zero_grad()
    return output  # type: ignore[no-any-return]


def assert_same_masks(got: torch.Tensor, want: torch.Tensor, device: str) -> None:
    """The same masks drawn: equal to the bit on the CPU; on a GPU equal but for the last
    bits a kernel may round differently (a mask of its own changes a value by its whole
    size)."""
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def rewritten(path: Path, name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint `path`, named `name` beside it, its tensors changed by `change`."""
    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata()
    tensors = load_file(str(path))
    change(tensors)
    copy = path.with_name(name)
    resave(tensors, copy, metadata)
    return copy


def test_dropout_masks_are_a_local_run_s_of_the_same_seed_whatever_else_draws() -> None:
    expected = local_outputs(5, 3)
    assert not torch.equal(expected[0], expected[1])  # the masks differ from pass to pass
    with serving(SPEC, seed=5) as (_, client), client.open_session(seed=11) as other:
        for step, want in enumerate(expected):
            # Another session's passes and the process's own draws fall between this
            # model's passes: they drew from the same generator, and moved its masks.
            other.forward(X.numpy())
            torch.rand(17)
            got = remote_step(client, fused=step == 1)  # each form draws from the one stream
            assert torch.equal(got, want), step


@ON_EACH_DEVICE
def test_a_failed_call_leaves_the_stream_where_it_was(device: str) -> None:
    # A failed call changes nothing (the contract): the masks its pass drew are drawn again
    # by the next pass, as if it had not been made.
    expected = local_outputs(5, 1, device=device)[0]
    refused, fails_later = X.clone(), X.clone()
    refused[0, 0], fails_later[0, 0] = 99, 77
    spec = ModelSpec("Failing", Failing, (8,), 3)
    with serving(spec, seed=5, device=device) as (_, client):
        with pytest.raises(errors.InvalidArgument):
            client.forward(refused.numpy())
        # a TrainStep's forward pass done, its backward pass failing: the step is undone
        with pytest.raises(errors.Internal):
            client.train_step(fails_later.numpy(), Y.numpy())
        assert client.list_tensors().version == 0
        client.forward(X.numpy(), Y.numpy())
        assert_same_masks(client.read("output", as_torch=True).value, expected, device)


@ON_EACH_DEVICE
def test_two_sessions_of_one_seed_draw_the_same_masks(device: str) -> None:
    with (
        serving(SPEC, seed=0, device=device) as (_, client),
        client.open_session(seed=7) as first,
        client.open_session(seed=7) as second,
    ):
        first.forward(X.numpy())
        one = first.get("output", as_torch=True)
        first.forward(X.numpy())  # the first session is a pass ahead now
        second.forward(X.numpy())
        assert_same_masks(second.get("output", as_torch=True), one, device)
        assert not torch.allclose(first.get("output", as_torch=True), one)


def test_a_reset_with_a_seed_starts_the_stream_again() -> None:
    expected = local_outputs(5, 1)[0]
    with serving(SPEC, seed=5) as (_, client):
        client.forward(X.numpy())
        client.forward(X.numpy())
        client.reset(seed=5)
        client.forward(X.numpy(), Y.numpy())
        assert torch.equal(client.read("output", as_torch=True).value, expected)


def test_the_process_s_generator_is_left_as_it_was() -> None:
    # An embedded trainer (gradwire serve --embedded, a notebook's Trainer) shares the process
    # with code of its caller's that draws too.
    trainer = Trainer(SPEC, seed=5)
    before = torch.get_rng_state()
    trainer.forward(X)
    assert torch.equal(torch.get_rng_state(), before)


class NoisyGradients(Dropping):
    """Adds noise to a gradient in its backward pass (a hook), as some regularisers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(torch.relu(self.fc(x)))
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: grad + 0.1 * torch.randn_like(grad))
        return self.out(hidden)  # type: ignore[no-any-return]


def test_a_backward_pass_draws_from_the_model_s_stream_too() -> None:
    """Its draws came from the process's generator: the weights after a step followed no
    seed, and the process's own draws moved (found by a review of the streams)."""
    expected = local_outputs(5, 3, NoisyGradients)
    with serving(ModelSpec("NoisyGradients", NoisyGradients, (8,), 3), seed=5) as (_, client):
        for step, want in enumerate(expected):
            torch.rand(17)  # the process draws between the model's passes
            process = torch.get_rng_state()
            got = remote_step(client, fused=step == 1)
            assert torch.equal(torch.get_rng_state(), process), step
            assert torch.equal(got, want), step


class Noisy(nn.Module):
    """Adds CPU noise of its own making (torch.rand without a device) to its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.rand(x.shape[0], 1)  # type: ignore[no-any-return]


def test_a_run_on_meta_tensors_leaves_the_process_s_generator_alone() -> None:
    # A TrainStep fetching a module's output first runs the model on meta tensors, to check
    # the fetch against its shape: the noise drawn there came from the process's generator.
    trainer = Trainer(ModelSpec("Noisy", Noisy, (8,), 3), seed=5)
    before = torch.get_rng_state()
    trainer.train_step(X, Y, fetch=[("fc.output", ())], use=lambda selection: None)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.timeout(120)
def test_a_model_whose_forward_runs_another_trainer_s_runs() -> None:
    """A student whose forward pass asks a teacher, a CPU trainer of the same process, for
    its output: the two streams nest (the swap's lock, taken twice on the one torch thread,
    stopped every CPU trainer of the process: found by a review)."""
    teacher = Trainer(SPEC, seed=1)

    class Student(Dropping):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            teacher.forward(x)
            return super().forward(x) + teacher.read("output").value

    student = Trainer(ModelSpec("Student", Student, (8,), 3), seed=5)
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(student.forward(X)), daemon=True)
    thread.start()
    thread.join(60)
    assert done, "the student's forward pass did not end"
    # each drew from its own stream, as a local run of each seed draws
    torch.manual_seed(1)
    from_teacher = Dropping()(X)
    torch.manual_seed(5)
    expected = (Dropping()(X) + from_teacher).detach()
    assert torch.equal(student.read("output").value, expected)


def test_a_checkpoint_keeps_the_stream_and_an_old_one_leaves_it_alone(tmp_path: Path) -> None:
    trainer = Trainer(SPEC, seed=5)
    trainer.forward(X)
    path = tmp_path / "state.safetensors"
    trainer.save(path)
    trainer.forward(X)
    after_save = trainer.read("output").value
    trainer.forward(X)
    trainer.load(path)
    trainer.forward(X)
    assert torch.equal(trainer.read("output").value, after_save)
    # A checkpoint written before checkpoints kept the stream loads, and the stream goes on
    # from where it is, not from the checkpoint's.
    old = rewritten(path, "old.safetensors", lambda tensors: tensors.pop("random/cpu"))
    fresh = Trainer(SPEC, seed=5)
    fresh.forward(X)
    fresh.load(old)
    torch.manual_seed(0)  # the process's generator, which the trainer's stream is not
    fresh.forward(X)
    assert torch.equal(fresh.read("output").value, after_save)


def _kept_normal(state: torch.Tensor, value: float) -> torch.Tensor:
    """`state` with the normal sample it keeps for the next draw set to `value`, and marked
    kept (where torch 2.13 lays them out: three doubles at byte 5016, a flag at 5040)."""
    damaged = state.clone()
    damaged[5016:5040] = torch.tensor([value] * 3, dtype=torch.float64).view(torch.uint8)
    damaged[5040] = 1
    return damaged


def _nan_normal(state: torch.Tensor) -> torch.Tensor:
    damaged = _kept_normal(state, float("nan"))
    probe = torch.Generator()
    probe.set_state(damaged)
    assert torch.randn(1, dtype=torch.float64, generator=probe).isnan().all()  # as laid out
    return damaged


def _huge_normal(state: torch.Tensor) -> torch.Tensor:
    """A kept normal sample finite as a double but not as a float: a float32 draw is inf."""
    damaged = _kept_normal(state, 1e300)
    probe = torch.Generator()
    probe.set_state(damaged)
    assert torch.randn(1, dtype=torch.float64, generator=probe).isfinite().all()
    probe.set_state(damaged)
    assert torch.randn(1, dtype=torch.float32, generator=probe).isinf().all()
    return damaged


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda state: torch.zeros(3, dtype=torch.uint8), "is not one of a cpu generator"),
        # torch's TypeError, not its RuntimeError: "RNG state must be a torch.ByteTensor".
        (lambda state: state.to(torch.int64), "is not one of a cpu generator"),
        # Loaded, it made a pass adding torch.randn(1) answer NaN (found by a review).
        (_nan_normal, "draws a normal sample that is not finite"),
        # Every float32 model's next normal draw would have been inf.
        (_huge_normal, "draws a normal sample that is not finite"),
    ],
    ids=["short", "not-bytes", "nan-normal", "huge-normal"],
)
def test_a_damaged_random_state_is_refused_and_nothing_changes(
    tmp_path: Path, damage: Callable[[torch.Tensor], torch.Tensor], said: str
) -> None:
    trainer = Trainer(SPEC, seed=5)
    path = tmp_path / "state.safetensors"
    trainer.save(path)

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["random/cpu"] = damage(tensors["random/cpu"])
        tensors["param/fc.weight"] = tensors["param/fc.weight"] + 1

    damaged = rewritten(path, "damaged.safetensors", change)
    weight = trainer.read("fc.weight").value.clone()
    with pytest.raises(InvalidInput) as refused:
        trainer.load(damaged)
    assert refused.value.reason == "BAD_CHECKPOINT"
    assert refused.value.message.startswith(f"cannot load {damaged}: its random state {said}")
    assert torch.equal(trainer.read("fc.weight").value, weight)
    trainer.forward(X)  # and the stream still draws


def test_a_stream_from_a_checkpoint_is_a_copy_of_its_own() -> None:
    """Not a view of the checkpoint's tensor: a view of a mapped checkpoint kept the whole
    file mapped for as long as the server ran (found by a review, serving a 1.4 GB model)."""
    state = torch.Generator().manual_seed(5).get_state()
    stream = random_stream.from_checkpoint(state, torch.device("cpu"))
    assert isinstance(stream, torch.Tensor) and torch.equal(stream, state)
    assert stream.untyped_storage().data_ptr() != state.untyped_storage().data_ptr()


def test_a_model_on_a_device_without_streams_starts_none() -> None:
    """Devices other than the CPU and CUDA's keep no stream: their passes draw from the
    process's generator, which a CPU state put in around them would move no further."""
    assert random_stream.built_state(torch.device("meta"), 5) is None


def test_a_generator_stream_is_kept_as_its_device_s_type_and_state() -> None:
    generator = torch.Generator().manual_seed(5)
    kind, state = random_stream.for_checkpoint(generator)
    assert kind == "cpu" and isinstance(state, torch.Tensor)
    assert torch.equal(state, generator.get_state())


def test_a_block_without_a_stream_draws_from_the_process_s_generator() -> None:
    want = torch.rand(8, generator=torch.Generator().manual_seed(3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        with random_stream.drawing(None) as drawn:
            got = torch.rand(4)
        assert drawn.state is None
        got = torch.cat([got, torch.rand(4)])  # and the process's draws go on from there
    assert torch.equal(got, want)


def test_a_block_s_stream_keeps_another_thread_s_block_out_until_it_ends() -> None:
    """Two threads drawing from streams of their own, the second starting while the first's
    is in the process's generator: it waits for the first's block to end (the swap's lock),
    so that each draws its own stream's numbers."""
    first_state = torch.Generator().manual_seed(1).get_state()
    second_state = torch.Generator().manual_seed(2).get_state()
    entered, go = threading.Event(), threading.Event()
    drawn: dict[str, torch.Tensor] = {}

    def second() -> None:
        with random_stream.drawing(second_state):
            entered.set()
            go.wait(30)
            drawn["second"] = torch.rand(4)

    thread = threading.Thread(target=second, daemon=True)
    with random_stream.drawing(first_state):
        thread.start()
        assert not entered.wait(0.5)  # held out
        drawn["first"] = torch.rand(4)
    go.set()
    thread.join(30)
    assert torch.equal(drawn["first"], torch.rand(4, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(drawn["second"], torch.rand(4, generator=torch.Generator().manual_seed(2)))


def test_a_cpu_stream_is_not_set_aside() -> None:
    """set_aside is for streams in GPU generators: in a CPU stream's block no stream is
    held, and setting aside leaves the CPU's stream where it is."""
    state = torch.Generator().manual_seed(4).get_state()
    with random_stream.drawing(state):
        assert not random_stream.held_here()
        with random_stream.set_aside():
            got = torch.rand(4)
    assert torch.equal(got, torch.rand(4, generator=torch.Generator().manual_seed(4)))


def test_a_trainer_lock_taken_without_blocking_as_an_rlock_is() -> None:
    lock = random_stream.TrainerLock()
    assert lock.acquire(blocking=False)
    assert lock.acquire(blocking=False)  # re-entrant
    taken: list[bool] = []
    other = threading.Thread(target=lambda: taken.append(lock.acquire(blocking=False)))
    other.start()
    other.join(30)
    assert taken == [False]  # held by this thread: another's try fails at once
    lock.release()
    lock.release()
