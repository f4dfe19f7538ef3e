"""Show fetched values the way PyTorch prints them: torch's own repr when torch is importable.

The thin client works without torch; then values print through numpy in a close likeness.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np


@cache
def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def format_tensor(value: Any) -> str:
    """`tensor([0.1000, 0.1000, 0.1000])` for a tensor or array; `None` for an absent one."""
    if value is None:
        return "None"
    if torch_available():
        import torch

        if not isinstance(value, torch.Tensor):
            value = torch.from_numpy(np.array(value))
        return repr(value)
    array = np.asarray(value)
    body = np.array2string(array, separator=", ", precision=4, floatmode="fixed", prefix="tensor(")
    suffix = "" if array.dtype in (np.float32, np.int64, np.bool_) else f", dtype={array.dtype}"
    return f"tensor({body}{suffix})"


def format_size(shape: Sequence[int]) -> str:
    """`torch.Size([8, 20])`, as PyTorch prints a shape."""
    return f"torch.Size({list(shape)})"
