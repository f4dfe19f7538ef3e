"""The tutorial (shared/seed/tutorial.md) replayed over gRPC, printing what the model computes.

Every value shown is fetched from the server; none is written here. The blog's printed gradient
does not follow from its code (see the tutorial's "What the code really computes"), so the
replay prints what PyTorch computes and checks the lesson itself: with lr=1, SGD leaves exactly
weight - grad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradwire.client import Client
from gradwire.display import format_size, format_tensor, torch_available
from gradwire.fill import Fill
from gradwire.remote import RemoteTensor

Init = Literal["fill", "random"]
LR = 1.0
FILL_VALUE = 0.1
BATCH = 8
MODEL = "Simple"


class WrongModel(ValueError):
    """The server serves another model than the tutorial's; nothing was changed."""


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

    @property
    def identity_holds(self) -> bool:
        """weight after Step == weight before - lr * grad, bit for bit, over all of conv1.weight."""
        expected = (self.weight_before - np.float32(LR) * self.grad).astype(np.float32)
        return bool(np.array_equal(self.weight_after, expected))


def replay(
    client: Client, *, init: Init = "fill", seed: int = 0, write: Callable[[str], None] = print
) -> ReplayResult:
    """Runs the tutorial against `client`'s server and writes a transcript line by line.

    As the tutorial makes its model and optimizer anew, this replaces the model and optimizer
    of `client`'s session (the server's default session unless `client` has one of its own);
    they stay as the tutorial leaves them, for reading and plotting. A server serving another
    model than the tutorial's Simple is refused first (WrongModel), changing nothing.
    """
    model = client.list_tensors().model
    if model != MODEL:
        raise WrongModel(
            f"the tutorial needs the {MODEL} model, and this server serves {model}: start one "
            "with the default model (gradwire serve without --model), or use replay --embedded"
        )
    as_torch = torch_available()
    remote = client.remote

    def show(code: str, value: Any = ..., note: str = "") -> None:
        write(f">>> {code}")
        if value is not ...:
            write(value if isinstance(value, str) else format_tensor(value))
        if note:
            for line in note.splitlines():
                write(f"# {line}")

    def fetch(view: RemoteTensor) -> Any:
        return view.torch() if as_torch else view.numpy()

    def host(value: Any) -> Any:
        return None if value is None else np.asarray(value)

    if init == "fill":
        client.reset()
        show("model = Simple()")
        client.fill_parameters(FILL_VALUE)
        show(f"for m in model.parameters(): m.data.fill_({FILL_VALUE})")
    else:
        client.reset(seed)
        show(f"torch.manual_seed({seed}); model = Simple()  # PyTorch's default initialisation")
    client.set_optimizer("sgd", lr=LR)
    show(f"optimizer = torch.optim.SGD(model.parameters(), lr={LR})")

    forward = client.forward(Fill.ones(BATCH, 3, 10, 10), Fill.ones(BATCH, dtype="int64"))
    show(
        f"output = model(torch.ones({BATCH}, 3, 10, 10)); "
        f"loss = criterion(output, torch.ones({BATCH}, dtype=torch.long))"
    )
    show("print(output.shape)", format_size(forward.output_shape))
    show("print(loss.item())", repr(forward.loss))

    grad_before = fetch(remote.conv1.weight.grad)
    show("print(model.conv1.weight.grad)", grad_before)

    client.backward()
    show("loss.backward()")
    grad_slice = fetch(remote.conv1.weight.grad[0][0][0])
    linear_rows = fetch(remote.linear.weight.grad[:2, :3])
    note = ""
    if init == "fill":
        note = (
            "Every parameter is 0.1 and every input 1, so all logits are equal and the gradient\n"
            "reaching conv1 is zero in exact arithmetic: what prints is rounding noise, not the\n"
            "blog's printed numbers, which its code cannot produce. linear's gradient is not zero:"
        )
    show("print(model.conv1.weight.grad[0][0][0])", grad_slice, note)
    if init == "fill":
        show("print(model.linear.weight.grad[:2, :3])", linear_rows)

    weight_slice_before = fetch(remote.conv1.weight[0][0][0])
    show("print(model.conv1.weight[0][0][0])", weight_slice_before)
    weight_before = remote.conv1.weight.numpy()
    grad = remote.conv1.weight.grad.numpy()

    client.step()
    show("optimizer.step()")
    weight_slice_after = fetch(remote.conv1.weight[0][0][0])
    weight_after = remote.conv1.weight.numpy()
    assert weight_before is not None and grad is not None and weight_after is not None

    client.zero_grad()
    result = ReplayResult(
        init=init,
        output_shape=forward.output_shape,
        loss=float(forward.loss or 0.0),
        grad_before_backward=host(grad_before),
        grad_slice=host(grad_slice),
        weight_slice_before=host(weight_slice_before),
        weight_slice_after=host(weight_slice_after),
        grad_after_zero=host(fetch(remote.conv1.weight.grad)),
        weight_before=weight_before,
        grad=grad,
        weight_after=weight_after,
        linear_grad_rows=host(linear_rows),
    )
    show(
        "print(model.conv1.weight[0][0][0])",
        weight_slice_after,
        f"weight after step == weight before - lr * grad, over all of conv1.weight, "
        f"bit for bit: {result.identity_holds}",
    )
    show("optimizer.zero_grad()")
    show(
        "print(model.conv1.weight.grad)",
        result.grad_after_zero,
        "zero_grad() sets gradients to None since PyTorch 2.0 (the blog's tensor([0., 0., 0.])\n"
        "is zero_grad(set_to_none=False)), so grad[0][0][0] would raise TypeError today.",
    )
    return result
