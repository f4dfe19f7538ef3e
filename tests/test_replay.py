"""The tutorial replayed over gRPC equals the tutorial run locally in PyTorch, bit for bit (CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import gradwire
from gradwire.replay import SessionInUse, WrongModel, replay
from gradwire_server.errors import AnswerNotKept
from gradwire_server.models import ModelSpec
from tests.reference import Simple, run_tutorial
from tests.serve_in_process import serving


def _prints(lines: list[str]) -> list[tuple[str, str]]:
    """The transcript's prints: each `>>> print(...)` line with the lines it wrote, up to
    the next line of code or note."""
    prints = []
    for at, line in enumerate(lines):
        if line.startswith(">>> print("):
            written = []
            for after in lines[at + 1 :]:
                if after.startswith((">>> ", "# ")):
                    break
                written.append(after)
            prints.append((line.removeprefix(">>> "), "\n".join(written)))
    return prints


def _same(remote: np.ndarray | None, local: torch.Tensor | None) -> bool:
    if remote is None or local is None:
        return remote is None and local is None
    return remote.dtype == local.numpy().dtype and np.array_equal(remote, local.numpy())


@pytest.mark.parametrize(("init", "seed"), [("fill", 0), ("random", 0), ("random", 7)])
def test_replay_equals_local_pytorch(client: gradwire.Client, init: str, seed: int) -> None:
    lines: list[str] = []
    result = replay(client, init=init, seed=seed, write=lines.append)  # type: ignore[arg-type]
    local = run_tutorial(init, seed)

    assert result.output_shape == local.output_shape == (8, 20)
    assert result.loss == local.loss
    assert result.grad_before_backward is None and local.grad_before_backward is None
    for name in (
        "grad_slice",
        "weight_slice_before",
        "weight_slice_after",
        "weight_before",
        "grad",
        "weight_after",
        "linear_grad_rows",
    ):
        assert _same(getattr(result, name), getattr(local, name)), name
    assert result.grad_after_zero is None and local.grad_after_zero is None
    assert result.identity_holds
    # Every print of the tutorial's code writes what it writes run locally, line for line
    # and in order, `grad_fn=<SelectBackward0>` after a slice of a parameter included,
    # though the replay does not import torch to print.
    assert _prints(lines) == local.printed
    # the lesson, checked here independently of the replay's own check
    np.testing.assert_array_equal(result.weight_after, result.weight_before - result.grad)


def test_fill_replay_prints_what_pytorch_computes(client: gradwire.Client) -> None:
    lines: list[str] = []
    result = replay(client, init="fill", write=lines.append)
    text = "\n".join(lines)
    assert "torch.Size([8, 20])" in text
    assert text.count("\nNone\n") + text.endswith("None") >= 1
    # The real gradient is rounding noise: tiny, its corners alike and its middle larger. Its
    # last bits depend on the CPU's kernels (on an Intel host the corners differ by one unit
    # in the last place; on an AMD one they were equal): test_replay_equals_local_pytorch
    # checks every bit against PyTorch on the machine at hand.
    noise = result.grad_slice
    assert np.all(np.abs(noise) < 1e-5)
    np.testing.assert_allclose(noise[0], noise[2], rtol=1e-5)
    assert abs(noise[1]) > max(abs(noise[0]), abs(noise[2]))
    # Printed as PyTorch prints the gradient it computes here, on the same inputs.
    local = run_tutorial("fill")
    assert repr(local.grad_slice) in text
    # linear's gradient is not zero
    np.testing.assert_array_equal(result.linear_grad_rows, local.linear_grad_rows.numpy())
    assert np.all(np.abs(result.linear_grad_rows) > 0.1)
    assert "bit for bit: True" in text
    # The note on why the fill's gradient is noise, each of its lines a comment.
    assert (
        "# reaching conv1 is zero in exact arithmetic: what prints is rounding noise, not the"
        in lines
    )


def test_random_replay_shows_visible_gradients(client: gradwire.Client) -> None:
    lines: list[str] = []
    result = replay(client, init="random", seed=0, write=lines.append)
    np.testing.assert_array_equal(result.grad_slice, run_tutorial("random", 0).grad_slice)
    assert np.all(np.abs(result.grad_slice) > 1e-3)  # unlike the fill's rounding noise
    assert not np.array_equal(result.weight_slice_after, result.weight_slice_before)
    # The fill's note on rounding noise is not the random init's: its gradient is no noise.
    assert not any("rounding noise" in line for line in lines)


def test_identity_holds_only_bit_for_bit(client: gradwire.Client) -> None:
    """The lesson is exact: a weight one unit in the last place off weight - lr * grad is
    no identity, however close."""
    result = replay(client, init="random", seed=0, write=lambda line: None)
    assert result.identity_holds
    off = result.weight_after.copy()
    off.flat[0] = np.nextafter(off.flat[0], np.float32(np.inf))
    assert not dataclasses.replace(result, weight_after=off).identity_holds


def test_an_init_that_is_neither_fill_nor_random_is_refused_before_any_call(
    client: gradwire.Client,
) -> None:
    """Any init but "fill" ran PyTorch's default init: replay(client, init="Fill") replaced
    the model with a seeded random one and printed torch.manual_seed(0) as the tutorial's
    (found by a review of the tutorial's replay)."""
    before = client.list_tensors().version
    lines: list[str] = []
    with pytest.raises(ValueError, match=r"init must be 'fill' or 'random', got 'Fill'"):
        replay(client, init="Fill", write=lines.append)  # type: ignore[arg-type]
    assert lines == [] and client.list_tensors().version == before


def test_replay_is_repeatable_on_one_server(client: gradwire.Client) -> None:
    first = replay(client, init="random", seed=3, write=lambda line: None)
    second = replay(client, init="random", seed=3, write=lambda line: None)
    np.testing.assert_array_equal(first.weight_after, second.weight_after)


class _WithBiases(Simple):
    """Named Simple, as the tutorial's model, but with biases and a ReLU of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.relu(x))


def _conv1_frozen() -> torch.nn.Module:
    model = Simple()
    model.conv1.weight.requires_grad_(False)
    return model


_DIFFERS_IN_A_BIAS = (
    r"parameters conv1\.weight \[16, 3, 3, 3\], conv2\.weight \[32, 16, 3, 3\], "
    r"linear\.weight \[20, 3200\]\), and this server's Simple differs in conv1\.bias: "
)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        # Its name alone was checked: a Simple with biases and a ReLU was replayed, its
        # gradients printed as the tutorial's (found by a review of the replay).
        pytest.param(
            ModelSpec("Simple", _WithBiases, (3, 10, 10), 20), _DIFFERS_IN_A_BIAS, id="biases"
        ),
        # Trained with a mean squared error, it passed, and the replay reset, filled and set
        # SGD on it before its Forward failed, telling the user to send float targets the
        # replay has no option for (a review of the tutorial's replay).
        pytest.param(
            ModelSpec("Simple", Simple, (3, 10, 10), 20, loss="mse"),
            r"trains its Simple with a cross-entropy loss \(nn\.CrossEntropyLoss\), and "
            r"this server's Simple is trained with a mean squared error: start one with",
            id="mse",
        ),
        # Taking [N, 3, 5, 20] (32 x 5 x 20 is 3,200 too), it passed, and was changed before
        # its Forward was refused the tutorial's images (a review of the tutorial's replay).
        pytest.param(
            ModelSpec("Simple", Simple, (3, 5, 20), 20),
            r"the tutorial's Simple takes images of \[3, 10, 10\], and this server's "
            r"Simple takes \[3, 5, 20\]: start one with",
            id="images",
        ),
        # With conv1 frozen, it passed, and the replay changed the model, printed None as
        # conv1's gradient and failed with a TypeError from the lesson's check (a review of
        # the tutorial's replay).
        pytest.param(
            ModelSpec("Simple", _conv1_frozen, (3, 10, 10), 20),
            r"the tutorial trains every parameter of its Simple, and this server's Simple "
            r"has conv1\.weight frozen \(requires_grad=False\): start one with",
            id="frozen",
        ),
    ],
)
def test_a_simple_that_is_not_the_tutorial_s_is_refused_before_any_change(
    spec: ModelSpec, match: str
) -> None:
    """The tutorial's Simple: its name, its parameters by name and shape, each trained, its
    images and its loss, checked before anything changes."""
    with serving(spec, seed=0) as (_, client):
        before = client.list_tensors().version
        with pytest.raises(WrongModel, match=match):
            replay(client, write=lambda line: None)
        assert client.list_tensors().version == before  # nothing changed


def test_a_server_older_than_the_listing_s_loss_and_images_is_replayed(
    client: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server from before ListTensors told the loss, the images' shape and whether a
    parameter trains lists none of them ("", (), None): its Simple is the tutorial's, and
    the checks of those are not to refuse it."""
    listing = client.list_tensors

    def as_an_older_server_lists() -> gradwire.client.Listing:
        old = listing()
        tensors = tuple(dataclasses.replace(t, requires_grad=None) for t in old.tensors)
        return dataclasses.replace(old, loss="", sample_shape=(), tensors=tensors)

    monkeypatch.setattr(client, "list_tensors", as_an_older_server_lists)
    assert replay(client, write=lambda line: None).identity_holds


def _double() -> torch.nn.Module:
    return Simple().double()


def test_a_float64_simple_s_lesson_is_checked_in_float64() -> None:
    """identity_holds computed in float32 said False of a float64 model's step, whose
    weight after is exactly weight before - grad (found by a review of the replay)."""
    spec = ModelSpec("Simple", _double, (3, 10, 10), 20, input_dtype=torch.float64)
    with serving(spec, seed=0) as (_, client):
        lines: list[str] = []
        result = replay(client, init="random", seed=0, write=lines.append)
    assert result.weight_before.dtype == np.float64
    np.testing.assert_array_equal(result.weight_after, result.weight_before - result.grad)
    assert result.identity_holds
    assert "bit for bit: True" in "\n".join(lines)


def _bfloat16() -> torch.nn.Module:
    return Simple().to(torch.bfloat16)


def test_a_bfloat16_simple_s_lesson_is_checked_in_bfloat16() -> None:
    """bfloat16 arrives widened to float32, and weight - lr * grad computed in float32 is not
    rounded to bfloat16 as the server's step is: the replay said "bit for bit: False" of a
    bfloat16 model whose step leaves exactly weight - grad in bfloat16, as PyTorch's does
    locally (found by a review of the replay)."""
    spec = ModelSpec("Simple", _bfloat16, (3, 10, 10), 20, input_dtype=torch.bfloat16)
    with serving(spec, seed=0) as (_, client):
        lines: list[str] = []
        result = replay(client, init="random", seed=0, write=lines.append)
    before, grad, after = (
        torch.from_numpy(a).to(torch.bfloat16)
        for a in (result.weight_before, result.grad, result.weight_after)
    )
    assert torch.equal(after, before - grad)  # it holds, in the parameter's dtype
    assert result.identity_holds
    assert "bit for bit: True" in "\n".join(lines)
    off = result.weight_after.copy()
    off.view(np.uint32).flat[0] += 1 << 16  # one bfloat16 unit in the last place off: no identity
    assert not dataclasses.replace(result, weight_after=off).identity_holds


def test_a_change_after_the_replays_last_stops_it_before_it_prints() -> None:
    """A change another client makes between the replay's ZeroGrad and its last read (here
    a second zero_grad on the server, right after the replay's) is seen by that read's
    version: the replay stops rather than print the transcript as the tutorial's."""
    with serving(ModelSpec("Simple", Simple, (3, 10, 10), 20), seed=0) as (trainer, client):
        zero_grad = trainer.zero_grad

        def and_another(set_to_none: bool = True) -> int:
            zero_grad(set_to_none)
            return zero_grad(set_to_none)  # another client's, right after the replay's

        trainer.zero_grad = and_another  # type: ignore[method-assign]
        lines: list[str] = []
        with pytest.raises(SessionInUse, match="another client changed the server's default"):
            replay(client, write=lines.append)
        assert lines == []


def test_an_abort_for_another_reason_than_the_version_is_raised_as_it_is() -> None:
    """Only VERSION_MISMATCH is another client's change: an Aborted of another reason (here
    a retry's ANSWER_NOT_KEPT) is raised as the server said it, not blamed on a client."""
    with serving(ModelSpec("Simple", Simple, (3, 10, 10), 20), seed=0) as (trainer, client):

        def not_kept(seed: int | None = None) -> int:
            raise AnswerNotKept("the answer to this retried reset is no longer kept")

        trainer.reset = not_kept  # type: ignore[method-assign]
        with pytest.raises(gradwire.errors.Aborted) as aborted:
            replay(client, write=lambda line: None)
    assert aborted.value.reason == "ANSWER_NOT_KEPT"


def test_another_client_s_change_to_the_session_stops_the_replay(
    client: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A train loop on the same session made the replay print "bit for bit: False", or
    blame a Backward it had not made (found by a review of the replay). Here the other
    client's call falls between the replay's look at the session and its first change."""
    other = gradwire.Client(client.target, timeout=30)
    listing = client.list_tensors

    def listed_then_changed() -> gradwire.client.Listing:
        seen = listing()
        other.zero_grad()  # another client's call on the default session, in between
        return seen

    monkeypatch.setattr(client, "list_tensors", listed_then_changed)
    before = listing().version
    with pytest.raises(SessionInUse, match="another client changed the server's default"):
        replay(client, write=lambda line: None)
    assert listing().version == before + 1  # the other client's alone: the replay's refused
    other.close()
