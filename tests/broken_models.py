"""Models that fail the way a device does, run out of memory, or take their time, for tests that
start `gradwire serve --model` or a Trainer of their own."""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from gradwire_server.models import ModelSpec

#: What torch raises for a CUDA error (torch.AcceleratorError, torch 2.8 on): a lost device is
#: told by it, or by its words once the process has used CUDA, which a CPU server has not.
CUDA_ERROR: type[RuntimeError] = getattr(torch, "AcceleratorError", RuntimeError)


class DeviceLost(nn.Module):
    """Fails as a GPU does after a device-side assert, where every later CUDA call fails too;
    on an input of zeros (the check `gradwire serve` makes of a model at start) it works."""

    #: what it raises: torch's error for a CUDA error
    error: type[RuntimeError] = CUDA_ERROR

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.any()):
            raise self.error("CUDA error: device-side assert triggered")
        return x * self.weight


class CudaWords(DeviceLost):
    """CUDA's words for a lost device in a RuntimeError of the model's own, on the CPU: the
    model's error, no device's."""

    error = RuntimeError


#: `gradwire serve --model tests.broken_models:LOST`
LOST = ModelSpec("Lost", DeviceLost, sample_shape=(2,), num_classes=2)


class Slow(nn.Module):
    """A model whose Forward of one sample takes a minute: a call still running when the
    server stops. Others, the server's check at start of a batch of 2 included, are quick."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            print("slow forward started", file=sys.stderr, flush=True)  # for a test to wait on
            time.sleep(60)
        out: torch.Tensor = self.linear(x)
        return out


SLOW = ModelSpec("Slow", Slow, sample_shape=(2,), num_classes=2)


class Tokens(nn.Module):
    """Token ids into an Embedding of 10 rows: an id of 10 or more, or negative, is past its
    table (IndexError on the CPU, a device-side assert on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.embed(x).mean(1))
        return out


#: `gradwire serve --model tests.broken_models:TOKENS`: ids of shape [N, 4].
TOKENS = ModelSpec("Tokens", Tokens, sample_shape=(4,), num_classes=3, input_dtype=torch.int64)


class Hungry(nn.Module):
    """Asks numpy for a petabyte in each Forward of an input not all zeros: the MemoryError
    of a model that builds something too large outside torch (torch's own allocations fail
    as RuntimeErrors, which the server's narrower handlers name). Refused at once, with
    nothing allocated; on zeros (the check at start) it works."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.any()):
            np.empty(2**50, np.uint8)
        out: torch.Tensor = self.linear(x)
        return out


HUNGRY = ModelSpec("Hungry", Hungry, sample_shape=(2,), num_classes=2)


class Warns(nn.Module):
    """Gives a UserWarning as it is built, as torch's own layers do (nn.TransformerEncoder
    of layers without batch_first: "enable_nested_tensor is True, but ...")."""

    def __init__(self) -> None:
        super().__init__()
        warnings.warn("a warning of the model's own", UserWarning, stacklevel=1)
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


#: `gradwire serve --model tests.broken_models:WARNS`
WARNS = ModelSpec("Warns", Warns, sample_shape=(2,), num_classes=2)


class SlowToBuild(nn.Module):
    """A model whose build takes a minute: a server still starting when a signal comes."""

    def __init__(self) -> None:
        super().__init__()
        print("slow build started", file=sys.stderr, flush=True)  # for a test to wait on
        time.sleep(60)
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


SLOW_TO_BUILD = ModelSpec("SlowToBuild", SlowToBuild, sample_shape=(2,), num_classes=2)
