"""Show fetched values the way PyTorch prints them, with or without torch.

A torch tensor prints as its own repr; an array, as the torch tensor holding its values would
(tensor_repr.py), so that a client without torch, and the command line, which does not import
torch for it (a second of every `gradwire get`), print what a local run prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwire.tensor_repr import tensor_repr


def format_tensor(value: Any, dtype: str | None = None) -> str:
    """`tensor([0.1000, 0.1000, 0.1000])` for a tensor or array; `None` for an absent one.
    `dtype`: the torch dtype an array's values are of, where it is not the array's own (a
    bfloat16 tensor's values, read as float32)."""
    if value is None:
        return "None"
    torch = sys.modules.get("torch")  # a torch tensor comes only from a process that has it
    if torch is not None and isinstance(value, torch.Tensor):
        return repr(value)
    return tensor_repr(np.asarray(value), dtype)


def format_size(shape: Sequence[int]) -> str:
    """`torch.Size([8, 20])`, as PyTorch prints a shape."""
    return f"torch.Size({list(shape)})"
