"""The devices a trainer can run on, as `gradwire serve --device` names them: the CPU, or a
CUDA device this machine has. torch knows others ("mps", "meta", "cpu:3") that a trainer
cannot serve from; they are refused here, with the forms that are taken.
"""

from __future__ import annotations

import re

import torch

from gradwire_server.errors import InvalidInput

#: The devices a Trainer runs on, as `--device` names them.
DEVICES = "auto (the GPU when there is one), cpu, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"cpu(?::0)?|cuda(?::(0|[1-9][0-9]*))?")


def check_device(device: torch.device | str, forms: str = "cpu, cuda or cuda:N") -> torch.device:
    """`device` when a Trainer can run there: the CPU, or a CUDA device this machine has.
    Anything else is a ValueError saying what to use: torch knows other devices ("mps",
    "meta", "cpu:3") that failed later, with a traceback or on every call."""
    name = str(device) if isinstance(device, (str, torch.device)) else repr(device)
    found = _DEVICE_NAME.fullmatch(name)
    if found is None:
        raise ValueError(f"unknown device {name!r}: use {forms}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
        count = torch.cuda.device_count()
        if int(found.group(1) or 0) >= count:
            raise ValueError(
                f"device {name!r} asked for, but this machine has {count} CUDA device(s): "
                f"cuda:0 to cuda:{count - 1}"
            )
    return torch.device("cpu" if name == "cpu:0" else name)  # cpu:0 is torch's one CPU


def resolve_device(spec: str) -> torch.device:
    """'auto' -> the first GPU when there is one, else the CPU; 'cpu', 'cuda', 'cuda:1' as
    given when this machine has it; anything else is InvalidInput naming the forms taken."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(spec, DEVICES)
    except ValueError as err:
        raise InvalidInput(str(err), reason="BAD_DEVICE") from None
