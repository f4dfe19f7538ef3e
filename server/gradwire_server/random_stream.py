"""Each model's own random stream: what its forward passes draw (dropout's masks) follows its
seed, whatever else the process draws.

PyTorch draws dropout's masks from the process's one generator per device, and a server holds
several models (sessions), so a model's masks depended on what the others, and the server
itself, had drawn before: two runs of one seed came out different, and none matched a local
run. A trainer keeps its generator's state here instead and puts it in the generator around
each of its forward passes (`DeviceGenerator.drawing`), the process's own put back after;
a pass that fails leaves the stream where it was, as a failed call leaves the rest.

Where a stream starts (`built_state`): on the CPU, where the model's build left the seeded
generator, so that a model without lazy layers draws the masks a local run of
`torch.manual_seed(seed); model = factory()` draws in the same passes; on a GPU, at a CUDA
generator seeded with the seed, as `torch.manual_seed` leaves it. A checkpoint keeps the state
(`checkpoint.py`), so a load goes on with the masks a run would have drawn from it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: One lock per generator: on the CPU every trainer runs on one thread (torch_thread.py), so
#: it is never contended there; on a GPU each trainer has a thread of its own, and two models
#: on one device swapping that device's generator at once would draw from each other's state.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _generator(device: torch.device) -> tuple[str, torch.Generator]:
    """The process's generator that operations on `device` draw from, and a name for it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}", torch.cuda.default_generators[index]
    return "cpu", torch.default_generator


def built_state(device: torch.device, seed: int) -> torch.Tensor:
    """Where the stream of a model built with `seed` starts. Called on the CPU inside the
    build's forked generator, after the build: the state it left there."""
    if device.type == "cuda":
        return torch.Generator(device=device).manual_seed(seed).get_state()
    return torch.default_generator.get_state()


def check_state(device: torch.device, state: torch.Tensor) -> None:
    """ValueError when `state` is not a state of `device`'s generator (a damaged checkpoint):
    put in place, it would fail every forward pass after."""
    try:
        torch.Generator(device=device).set_state(state)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"its random state is not one of a {device.type} generator: {err}"
        ) from None


@dataclass
class Drawn:
    """Where a block's draws left a stream (`DeviceGenerator.drawing`)."""

    state: torch.Tensor


class DeviceGenerator:
    """The process's generator for one device, through which models draw from their own
    streams (module doc). A stream's state is its model's: a trainer keeps it beside the
    rest of its state, so that a call that fails, whose changes a trainer puts back, puts
    back what its passes drew too."""

    def __init__(self, device: torch.device) -> None:
        name, self._generator = _generator(device)
        with _LOCKS_GUARD:
            self._lock = _LOCKS.setdefault(name, threading.Lock())

    @contextmanager
    def drawing(self, state: torch.Tensor) -> Iterator[Drawn]:
        """The block draws from the stream at `state`; where it left the stream is in what
        it yields once the block ends (however it ends), and the process's generator is as
        it was before."""
        drawn = Drawn(state)
        with self._lock:
            process = self._generator.get_state()
            self._generator.set_state(state)
            try:
                yield drawn
            finally:
                drawn.state = self._generator.get_state()
                self._generator.set_state(process)
