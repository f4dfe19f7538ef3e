"""The tutorial's code run locally in plain PyTorch: the reference for every replayed value."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Simple(nn.Module):
    # Written out again on purpose, as in the tutorial: the reference must not share code
    # with the server it checks.
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1, bias=False)
        self.linear = nn.Linear(32 * 10 * 10, 20, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        return self.linear(x.view(x.size(0), -1))  # type: ignore[no-any-return]


@dataclass
class TutorialRun:
    output_shape: tuple[int, ...]
    loss: float
    grad_before_backward: torch.Tensor | None
    grad_slice: torch.Tensor
    weight_slice_before: torch.Tensor
    weight_slice_after: torch.Tensor
    grad_after_zero: torch.Tensor | None
    weight_before: torch.Tensor
    grad: torch.Tensor
    weight_after: torch.Tensor
    linear_grad_rows: torch.Tensor
    # Each print of the tutorial's code, as (the code, what it prints), in order; with the
    # fill, the replay's own print of linear's gradient (which is not zero) after conv1's.
    printed: list[tuple[str, str]]


def run_tutorial(init: str = "fill", seed: int = 0) -> TutorialRun:
    """The tutorial's steps, as published, with its two initialisations."""
    if init == "fill":
        model = Simple()
        for m in model.parameters():
            m.data.fill_(0.1)
    else:
        torch.manual_seed(seed)
        model = Simple()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    images = torch.ones(8, 3, 10, 10)
    targets = torch.ones(8, dtype=torch.long)
    printed: list[tuple[str, str]] = []

    def prints(code: str, value: object) -> None:
        printed.append((f"print({code})", str(value)))  # what print() writes

    output = model(images)
    prints("output.shape", output.shape)
    loss = criterion(output, targets)
    prints("loss.item()", loss.item())
    grad_before = model.conv1.weight.grad
    prints("model.conv1.weight.grad", model.conv1.weight.grad)
    loss.backward()
    assert model.conv1.weight.grad is not None and model.linear.weight.grad is not None
    prints("model.conv1.weight.grad[0][0][0]", model.conv1.weight.grad[0][0][0])
    if init == "fill":
        prints("model.linear.weight.grad[:2, :3]", model.linear.weight.grad[:2, :3])
    prints("model.conv1.weight[0][0][0]", model.conv1.weight[0][0][0])
    grad_slice = model.conv1.weight.grad[0][0][0].clone()
    weight_slice_before = model.conv1.weight[0][0][0].detach().clone()
    weight_before = model.conv1.weight.detach().clone()
    grad = model.conv1.weight.grad.clone()
    linear_rows = model.linear.weight.grad[:2, :3].clone()
    optimizer.step()
    prints("model.conv1.weight[0][0][0]", model.conv1.weight[0][0][0])
    weight_slice_after = model.conv1.weight[0][0][0].detach().clone()
    weight_after = model.conv1.weight.detach().clone()
    optimizer.zero_grad()
    prints("model.conv1.weight.grad", model.conv1.weight.grad)
    return TutorialRun(
        output_shape=tuple(output.shape),
        loss=loss.item(),
        grad_before_backward=grad_before,
        grad_slice=grad_slice,
        weight_slice_before=weight_slice_before,
        weight_slice_after=weight_slice_after,
        grad_after_zero=model.conv1.weight.grad,
        weight_before=weight_before,
        grad=grad,
        weight_after=weight_after,
        linear_grad_rows=linear_rows,
        printed=printed,
    )
