"""Show fetched values the way PyTorch prints them, with or without torch.

A torch tensor prints as its own repr; an array, as the torch tensor holding its values would
(tensor_repr.py), so that a client without torch, and the command line, which does not import
torch for it (a second of every `gradwire get`), print what a local run prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwire.tensor_repr import tensor_repr

if TYPE_CHECKING:
    from gradwire.results import TensorRead


def listed(words: Sequence[str]) -> str:
    """Words as a sentence lists them: "a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


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


def format_read(read: TensorRead) -> str:
    """A read as PyTorch prints the selection on the server: its values, and what the print
    shows there besides (`device='cuda:0'` for a tensor on a GPU; `grad_fn=<SelectBackward0>`
    after a slice of a parameter; "Parameter containing:" above a whole parameter,
    `requires_grad=True` after it); `None` for an absent tensor. A read as torch tensors
    prints the same: its tensor, made on this side, on its CPU, has no autograd of its own
    to show. A read made with values=False has no values to print: ValueError."""
    value = read.value
    if value is None:
        if read.present:  # a shape without values: "None" would say the tensor is absent
            raise ValueError(
                f"{read.name} was read with values=False (shape {read.shape}, no values) "
                "and prints only with its values: read it with values=True, or print read.shape"
            )
        return "None"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        # bfloat16 as float32, which holds each value exactly; `read.dtype` still names it.
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy(force=True)
    text = tensor_repr(
        np.asarray(value),
        read.dtype,
        device=read.device,
        grad_fn=read.grad_fn,
        requires_grad=read.requires_grad,
    )
    return f"Parameter containing:\n{text}" if read.whole_parameter else text


def format_size(shape: Sequence[int]) -> str:
    """`torch.Size([8, 20])`, as PyTorch prints a shape."""
    return f"torch.Size({list(shape)})"
