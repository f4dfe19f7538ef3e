"""The tutorial (the classic PyTorch one README.md names: two convolutions, a linear layer,
one training step) replayed over gRPC, printing what the model computes.

Every value shown is fetched from the server; none is written here. The blog's printed gradient
does not follow from its code (README.md, "What the demo shows, and why its numbers differ
from the blog's"), so the replay prints what PyTorch computes and checks the lesson itself:
with lr=1, SGD leaves exactly weight - grad.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradwire.client import Client
from gradwire.display import format_read, format_size
from gradwire.errors import Aborted
from gradwire.fill import Fill
from gradwire.limits import Whole
from gradwire.results import Listing, TensorRead

Init = Literal["fill", "random"]
LR = 1.0
FILL_VALUE = 0.1
BATCH = 8
MODEL = "Simple"
#: The tutorial's parameters and their shapes: a model of another name, or of the same
#: name with other layers (biases, a wider conv1), is not the tutorial's.
PARAMETERS = {
    "conv1.weight": (16, 3, 3, 3),
    "conv2.weight": (32, 16, 3, 3),
    "linear.weight": (20, 32 * 10 * 10),
}
#: One of the tutorial's images, torch.ones(8, 3, 10, 10): a model of its parameters may
#: take others (32 x 5 x 20 is 3,200 too).
SAMPLE = (3, 10, 10)
#: The tutorial's criterion, nn.CrossEntropyLoss, as a listing names it.
LOSS = "cross_entropy"


#: What to do about a server whose model is not the tutorial's.
_SERVE_SIMPLE = (
    "start one with the default model (gradwire serve without --model), or use replay --embedded"
)


class WrongModel(ValueError):
    """The server serves another model than the tutorial's; nothing was changed."""


class SessionInUse(RuntimeError):
    """Another client changed the session while the replay ran: the replay stopped at its
    next call, the calls before it applied."""


@dataclass(frozen=True)
class ReplayResult:
    """What the replay fetched, as numpy arrays, for checks against a local PyTorch run."""

    init: Init
    output_shape: tuple[int, ...]
    loss: float
    grad_before_backward: np.ndarray[Any, Any] | None  # None, as in PyTorch
    grad_slice: np.ndarray[Any, Any]  # conv1.weight.grad[0][0][0] after Backward
    weight_slice_before: np.ndarray[Any, Any]  # conv1.weight[0][0][0] before Step
    weight_slice_after: np.ndarray[Any, Any]  # conv1.weight[0][0][0] after Step
    grad_after_zero: np.ndarray[Any, Any] | None  # None: ZeroGrad sets gradients to None
    weight_before: np.ndarray[Any, Any]  # all of conv1.weight before Step
    grad: np.ndarray[Any, Any]  # all of conv1.weight.grad before Step
    weight_after: np.ndarray[Any, Any]  # all of conv1.weight after Step
    linear_grad_rows: np.ndarray[Any, Any]  # linear.weight.grad[:2, :3]
    # conv1.weight's dtype on the server: "bfloat16" arrives widened to float32 in the arrays
    dtype: str = "float32"

    @property
    def identity_holds(self) -> bool:
        """weight after Step == weight before - lr * grad, bit for bit, over all of conv1.weight,
        computed in the parameter's dtype (float32 alone said False of a float64 model's,
        which holds: found by a review of the replay), a bfloat16 one's rounded to bfloat16
        as the server's step rounds it (it said False of one: a review of the replay)."""
        dtype = self.weight_before.dtype
        expected = (self.weight_before - dtype.type(LR) * self.grad).astype(dtype)
        if self.dtype == "bfloat16":
            expected = _bfloat16(expected)
        return bool(np.array_equal(self.weight_after, expected))


def _bfloat16(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float32 `values` rounded to bfloat16 (to the nearest, ties to even, as torch rounds),
    widened back to float32 exactly; NaN stays NaN."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return np.where(np.isnan(values), values, rounded.view(np.float32))


def replay(
    client: Client, *, init: Init = "fill", seed: Whole = 0, write: Callable[[str], None] = print
) -> ReplayResult:
    """Runs the tutorial against `client`'s server and writes its transcript.

    As the tutorial makes its model and optimizer anew, this replaces the model and optimizer
    of `client`'s session (the server's default session unless `client` has one of its own);
    they stay as the tutorial leaves them, for reading and plotting. A server serving another
    model than the tutorial's Simple is refused first (WrongModel), changing nothing, as is
    an `init` other than "fill" and "random" (ValueError).

    `init`: "fill" (the default) sets every parameter to 0.1, as the tutorial's lesson does,
    and draws nothing, so `seed` is not used; "random" is PyTorch's default initialisation
    after torch.manual_seed(`seed`). `write` takes each line of the transcript (print, the
    default).
    """
    if init not in ("fill", "random"):  # any other ran the random init (a review)
        raise ValueError(f"init must be 'fill' or 'random', got {init!r}")
    listing = client.list_tensors()
    _check_model(listing)
    # Each mutation applies only at the version the one before it left (client.expecting):
    # another client's calls on the session between two of the replay's, which the replay
    # would have read as its own, stop it instead (a train loop on the same session made it
    # print "bit for bit: False", or blame a Backward it had not made: found by a review).
    versions = itertools.count(listing.version)  # each mutation's, then the last's after

    # Every call in one batch (client.batch): sent in one message, run in order, answered
    # in one, so that the replay waits for one round trip of the network, not seventeen.
    # The transcript is written once the answers are in.
    try:
        with client.batch() as p:
            with client.expecting(next(versions)):
                p.reset(None if init == "fill" else seed)
            if init == "fill":
                with client.expecting(next(versions)):
                    p.fill_parameters(FILL_VALUE)
            with client.expecting(next(versions)):
                p.set_optimizer("sgd", lr=LR)
            with client.expecting(next(versions)):
                forward = p.forward(Fill.ones(BATCH, 3, 10, 10), Fill.ones(BATCH, dtype="int64"))
            grad_before = p.read("conv1.weight.grad")
            with client.expecting(next(versions)):
                p.backward()
            grad_slice = p.read("conv1.weight.grad[0][0][0]")
            linear_rows = p.read("linear.weight.grad[:2, :3]")
            weight_slice_before = p.read("conv1.weight[0][0][0]")
            weight_before = p.get("conv1.weight")
            grad = p.get("conv1.weight.grad")
            with client.expecting(next(versions)):
                p.step()
            weight_slice_after = p.read("conv1.weight[0][0][0]")
            weight_after = p.get("conv1.weight")
            with client.expecting(next(versions)):
                p.zero_grad()
            last = p.read("conv1.weight.grad")
    except Aborted as err:
        if err.reason != "VERSION_MISMATCH":
            raise
        raise SessionInUse(_in_use(client)) from None
    if last.result().version != next(versions):  # a change after the replay's last
        raise SessionInUse(_in_use(client))
    grad_after_zero = last.result()

    def show(code: str, value: TensorRead | str | None = None, note: str = "") -> None:
        """The line of code, what it prints (a read as PyTorch prints it), and a note, each
        line written on its own (a print of two rows was one item of --json's transcript,
        with a newline inside: a review of the replay)."""
        write(f">>> {code}")
        if value is not None:
            for line in (value if isinstance(value, str) else format_read(value)).splitlines():
                write(line)
        if note:
            for line in note.splitlines():
                write(f"# {line}")

    def host(read: TensorRead) -> Any:
        return None if read.value is None else np.asarray(read.value)

    if init == "fill":
        show("model = Simple()")
        show(f"for m in model.parameters(): m.data.fill_({FILL_VALUE})")
    else:
        show(f"torch.manual_seed({seed}); model = Simple()  # PyTorch's default initialisation")
    show(f"optimizer = torch.optim.SGD(model.parameters(), lr={LR})")
    ran = forward.result()
    show(
        f"output = model(torch.ones({BATCH}, 3, 10, 10)); "
        f"loss = criterion(output, torch.ones({BATCH}, dtype=torch.long))"
    )
    show("print(output.shape)", format_size(ran.output_shape))
    show("print(loss.item())", repr(ran.loss))
    show("print(model.conv1.weight.grad)", grad_before.result())
    show("loss.backward()")
    note = ""
    if init == "fill":
        note = (
            "Every parameter is 0.1 and every input 1, so all logits are equal and the gradient\n"
            "reaching conv1 is zero in exact arithmetic: what prints is rounding noise, not the\n"
            "blog's printed numbers, which its code cannot produce. linear's gradient is not zero:"
        )
    show("print(model.conv1.weight.grad[0][0][0])", grad_slice.result(), note)
    if init == "fill":
        show("print(model.linear.weight.grad[:2, :3])", linear_rows.result())
    show("print(model.conv1.weight[0][0][0])", weight_slice_before.result())
    show("optimizer.step()")
    result = ReplayResult(
        init=init,
        output_shape=ran.output_shape,
        loss=float(ran.loss or 0.0),
        grad_before_backward=host(grad_before.result()),
        grad_slice=host(grad_slice.result()),
        weight_slice_before=host(weight_slice_before.result()),
        weight_slice_after=host(weight_slice_after.result()),
        grad_after_zero=host(grad_after_zero),
        weight_before=np.asarray(weight_before.result()),
        grad=np.asarray(grad.result()),
        weight_after=np.asarray(weight_after.result()),
        linear_grad_rows=host(linear_rows.result()),
        dtype=weight_slice_before.result().dtype or "float32",
    )
    show(
        "print(model.conv1.weight[0][0][0])",
        weight_slice_after.result(),
        f"weight after step == weight before - lr * grad, over all of conv1.weight, "
        f"bit for bit: {result.identity_holds}",
    )
    show("optimizer.zero_grad()")
    show(
        "print(model.conv1.weight.grad)",
        grad_after_zero,
        "zero_grad() sets gradients to None since PyTorch 2.0 (the blog's tensor([0., 0., 0.])\n"
        "is zero_grad(set_to_none=False)), so grad[0][0][0] would raise TypeError today.",
    )
    return result


def _check_model(listing: Listing) -> None:
    """WrongModel unless the server serves the tutorial's Simple: its name, its parameters,
    by name and shape, each trained, its images' shape and its loss. The name alone let a
    model called Simple with biases and a ReLU through, its gradients printed as the
    tutorial's (found by a review); a Simple trained with a mean squared error, or taking
    [3, 5, 20] images, was reset, filled and given SGD before the Forward failed, and one
    with conv1 frozen failed with a TypeError once it had printed None as conv1's gradient
    (a review of the replay)."""
    if listing.model != MODEL:
        raise WrongModel(
            f"the tutorial needs the {MODEL} model, and this server serves {listing.model}: "
            + _SERVE_SIMPLE
        )
    served = {t.name: t.shape for t in listing.tensors if t.kind == "parameter"}
    if served != PARAMETERS:
        differ = sorted(
            n for n in served.keys() | PARAMETERS.keys() if served.get(n) != PARAMETERS.get(n)
        )
        raise WrongModel(
            f"the tutorial needs its {MODEL} model (parameters "
            + ", ".join(f"{n} {list(shape)}" for n, shape in PARAMETERS.items())
            + f"), and this server's {MODEL} differs in {', '.join(differ)}: "
            + _SERVE_SIMPLE
        )
    if listing.sample_shape and listing.sample_shape != SAMPLE:  # () from an older server
        raise WrongModel(
            f"the tutorial's {MODEL} takes images of {list(SAMPLE)}, and this server's {MODEL} "
            f"takes {list(listing.sample_shape)}: " + _SERVE_SIMPLE
        )
    frozen = [t.name for t in listing.tensors if t.kind == "parameter" and t.requires_grad is False]
    if frozen:  # it has no gradient to show or step by (a Simple with conv1 frozen passed)
        raise WrongModel(
            f"the tutorial trains every parameter of its {MODEL}, and this server's {MODEL} "
            f"has {', '.join(frozen)} frozen (requires_grad=False): " + _SERVE_SIMPLE
        )
    # The tutorial's criterion (a Simple trained with MSE passed); "" from an older server
    if listing.loss and listing.loss != LOSS:
        losses = {"cross_entropy": "a cross-entropy loss", "mse": "a mean squared error"}
        raise WrongModel(
            f"the tutorial trains its {MODEL} with {losses[LOSS]} (nn.CrossEntropyLoss), and "
            f"this server's {MODEL} is trained with {losses.get(listing.loss, listing.loss)}: "
            + _SERVE_SIMPLE
        )


def _in_use(client: Client) -> str:
    where = f"session {client.session!r}" if client.session else "the server's default session"
    return (
        f"another client changed {where} while the replay ran, and the replay stopped rather "
        "than print that client's work as the tutorial's (the calls it had made stay "
        "applied): replay in a session of your own (gradwire open-session, then replay "
        "--session ID), or when nothing else trains on this one"
    )
