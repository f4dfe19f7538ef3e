"""The models the server can own: the tutorial's `Simple`, and what their inputs must look like."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class Simple(nn.Module):
    """The tutorial's network: two 3x3 convolutions and a linear layer, no biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1, bias=False)
        self.linear = nn.Linear(32 * 10 * 10, 20, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        out: torch.Tensor = self.linear(x.view(x.size(0), -1))
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A model and what its inputs must look like, so bad input is refused before it runs."""

    name: str
    factory: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # one input sample's shape; the batch dimension comes first
    num_classes: int  # width of the output, the number of classes of CrossEntropyLoss


SIMPLE = ModelSpec("Simple", Simple, sample_shape=(3, 10, 10), num_classes=20)
