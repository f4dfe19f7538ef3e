"""Whether a forward pass on the CPU fits in the memory the host has left, asked before it
runs: a pass that does not fit is refused RESOURCE_EXHAUSTED (OUT_OF_MEMORY), where running
it would have left the server to the kernel's out-of-memory killer (host_memory.py says
why the allocation itself does not fail). A new model (a session's, a Reset's, on any
device: it is built on the host) and a checkpoint's load are checked the same way, by their
bytes (`check_model`).

What a pass takes is estimated once per input shape, from the run on meta tensors the
trainer makes already (shapes and dtypes, no memory, no arithmetic; 2-6 ms of the
tutorial's model, kept for 64 shapes, so a caller cycling through more batch sizes pays it
every call): the bytes of every tensor an operation of the pass makes (`MadeBytes`), times
a factor for what meta tensors do not show, the scratch memory of the CPU's kernels (a
convolution's unfolded input) and the backward pass's gradients. Measured on this
project's models at their peak (the process's highest resident memory, a pass of 20,000
samples of the tutorial's model and of 2,000,000 of the two small ones; `python -m
bench.pass_memory` measures them again), against the bytes their forward pass's operations
made:

| pass | Simple (two convolutions) | TinyMLP, TinyRegressor |
| --- | --- | --- |
| a forward pass | 1.58x | 0.86-0.91x |
| a training step (forward, backward, step) | 2.87x | 1.44-1.52x |

So a pass that will be followed by a backward pass (it has a target) counts three times
what it makes (`TRAINING`), and besides what its backward pass and step hold for the
parameters (Trainer._update_bytes, measured: a new set of gradients every step, beside the
set a step keeps to put back, the optimizer state not made yet and the optimizer's
temporaries); one without a target twice (`FORWARD`). An estimate, not a
bound: a model whose kernels take more scratch than a convolution's may pass the check and
still not fit, and one that takes less is refused early (a small MLP's forward pass from
under half of what is left); the refusal says how many samples fit.

A GPU's memory running out is refused by torch itself (errors.device_memory): only CPU
passes are checked here. A model that does not run on meta tensors has no estimate: its
passes are checked by their input's bytes alone. CPU passes run one at a time in the process
(torch_thread.py), so two sessions' passes cannot both find the same memory free; another
process can.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gradwire_server.errors import OverLimit

#: What a pass is estimated to take, as a multiple of what its operations make on meta
#: tensors: with a target (a backward pass to come) and without one (the table above).
TRAINING = 3
FORWARD = 2

#: Passes estimated to take less than this are not checked: what the host has left is read
#: from /proc and /sys (0.3 ms on the benchmark's VM), which a small step would feel. A pass
#: of this size takes tens of milliseconds.
CHECKED_FROM_BYTES = 64 << 20


class MadeBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch: untyped
    """Counts the bytes of the tensors the operations run under it make: not their views,
    nor the results of in-place operations, which alias an input (their schema says so)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.total = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        # An operation that returns nothing (torch._assert_async, an in-place _foreach_) gives
        # None: taken for a sequence, it raised, and the model lost its whole run on meta tensors
        # (its fetches' checks, its one-thread choice) with its estimate.
        parts = [out] if len(returns) == 1 else list(out or ())
        for ret, part in zip(returns, parts, strict=False):
            if ret.alias_info is None:
                for t in tree_leaves(part):
                    if isinstance(t, torch.Tensor):
                        self.total += t.numel() * t.element_size()
        return out


def check(
    what: str,
    made: int,
    samples: int,
    factor: int,
    available: Callable[[], int | None],
    fixed: int = 0,
) -> None:
    """Refuses (OverLimit, OUT_OF_MEMORY) a pass of `samples` samples whose operations make
    `made` bytes on meta tensors, when `factor` times that, and `fixed` bytes whatever the
    batch (what a step holds for the parameters: Trainer._update_bytes), is more than the
    host has left (`available()`, read only for a need of CHECKED_FROM_BYTES or more)."""
    need = made * factor + fixed
    if need < CHECKED_FROM_BYTES:
        return
    room = available()
    if room is None or need <= room:
        return
    fit = max(0, room - fixed) * samples // (need - fixed) if samples and need > fixed else 0
    advice = f"send at most {fit:,} samples a call" if fit else "no batch of this model fits now"
    raise OverLimit(
        f"{what} of {samples:,} samples would take about {_size(need)} of the server's "
        f"memory, and the host has {_size(room)} left: {advice}",
        reason="OUT_OF_MEMORY",
        metadata={"bytes": str(need), "limit": str(room), "samples": str(fit)},
    )


def check_model(what: str, need: int, advice: str, available: Callable[[], int | None]) -> None:
    """Refuses (OverLimit, OUT_OF_MEMORY) what takes `need` bytes of the host at once (a
    session's or a Reset's new model, a checkpoint read to be loaded) when the host has less
    than that left; `advice`, what the caller can do."""
    room = available()
    if room is not None and need > room:
        raise OverLimit(
            f"{what} would take about {_size(need)} of the server's memory, and the host has "
            f"{_size(room)} left: {advice}",
            reason="OUT_OF_MEMORY",
            metadata={"bytes": str(need), "limit": str(room)},
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
