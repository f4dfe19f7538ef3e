"""Each model's own random stream: what its passes draw (dropout's masks, a gradient's noise)
follows its seed, whatever else the process draws between its calls.

PyTorch draws dropout's masks from the process's one generator, and a server holds several
models (sessions), so a model's masks depended on what the others, and the server itself, had
drawn before: two runs of one seed came out different, and none matched a local run. A CPU
trainer keeps its stream's state instead and puts it in the generator around each of its
forward and backward passes (`drawing`), the process's own put back after; a pass that fails
leaves the stream where it was, as a failed call leaves the rest. A draw made on another
thread while a pass runs (an embedding caller's) still takes its numbers from the model's
stream: PyTorch has no way to give dropout a generator of its own.

A stream starts where the model's build left the seeded generator (`built_state`), so that a
model without lazy layers draws the masks a local run of `torch.manual_seed(seed); model =
factory()` draws in the same passes. A checkpoint keeps the state (`checkpoint.py`), so a load
goes on with the masks a run would have drawn from it.

Built for the CPU. A model on a GPU draws from its device's generator, shared by the sessions
there, as before: swapping a CUDA generator's state resets cuDNN's RNN dropout state at each
swap (a device synchronisation, and masks no local run draws), and the sessions on one device
would wait for each other's passes; neither could be measured without a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: Held while a stream is in the generator. Every CPU trainer runs on one thread
#: (torch_thread.py), so it is contended only by callers of an embedded trainer; re-entrant
#: for a model whose forward pass runs another CPU trainer's (a teacher's), whose stream is
#: swapped in and out inside its own.
_LOCK = threading.RLock()


@dataclass
class Drawn:
    """Where a block's draws left a stream (`drawing`)."""

    state: torch.Tensor | None


def built_state(device: torch.device) -> torch.Tensor | None:
    """Where the stream of a model built for `device` starts: called inside the build's
    seeded, forked generator once the build is done, the state it left there; None where
    models keep no stream of their own (a GPU: module doc)."""
    return torch.default_generator.get_state() if device.type == "cpu" else None


def check_state(state: torch.Tensor) -> None:
    """ValueError when `state` is not a state of the CPU's generator (a damaged checkpoint):
    put in place, it would fail every forward pass after, or, its normal sample kept for the
    next draw not a number, make the next normal draw NaN (found by a review: a forward
    pass adding torch.randn(1) answered NaN)."""
    try:
        for dtype in (torch.float32, torch.float64):
            generator = torch.Generator()
            generator.set_state(state)
            if not torch.randn(1, dtype=dtype, generator=generator).isfinite().all():
                raise ValueError("its random state draws a normal sample that is not finite")
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"its random state is not one of a cpu generator: {err}") from None


@contextmanager
def drawing(state: torch.Tensor | None) -> Iterator[Drawn]:
    """The block draws from the stream at `state` (None: from the process's generator);
    where it left the stream is in what it yields once the block ends, however it ends, and
    the process's generator is as it was before."""
    drawn = Drawn(state)
    if state is None:
        yield drawn
        return
    generator = torch.default_generator
    with _LOCK:
        process = generator.get_state()
        generator.set_state(state)
        try:
            yield drawn
        finally:
            drawn.state = generator.get_state()
            generator.set_state(process)
