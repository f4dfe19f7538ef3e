"""A torch optimizer's step and zero_grad, without the profiler range torch opens around them,
and plain SGD on the CPU without torch's Python around its update.

Why: `Optimizer.step` and `Optimizer.zero_grad` open a `record_function` range on every call,
whether a profiler runs or not. That is two dispatcher calls, each letting go of the GIL,
which a server's other threads then take. On the 2-core VM of docs/PERFORMANCE.md, in three
alternations, a remote Step took 0.73-0.80 ms without the range against 0.74-0.94 ms with it
(the middle of the three: 0.75 and 0.88 ms), and an in-place ZeroGrad 0.60-0.62 ms against
0.76-0.85 ms.
On the torch thread, back to back, `optimizer.step()` took 34-44 us with it, 13-18 us without;
`zero_grad(set_to_none=True)` 13 us with it, 0.5 us without.

Plain SGD (no momentum, decay or other setting; the server's default optimizer) on the CPU is
one `param.add_(grad, alpha=-lr)` per parameter, which is all torch's `_single_tensor_sgd`
does for it; torch wraps that loop in five Python functions, an import and two dynamo graph
breaks. In the server, with caches cold after a gRPC call, that Python took over a quarter of
the step: `optimizer.step` 90 us through torch, 65 us here (docs/performance-history.md, tenth
session).

What is kept:
- the optimizer's step hooks, global or its own: when any is registered, `step` goes through
  torch's own wrapper, which runs them;
- the profiler's view: while torch's profiler runs, both go through torch's own methods, so
  that a trace shows every step and zero_grad as usual;
- the arithmetic: the function torch's wrapper calls is the one called here (or, for plain
  SGD, the loop that function runs, held to it bit for bit), and zeroing
  does what `zero_grad(set_to_none=False)` does (with foreach, torch's default for CUDA
  parameters, torch zeroes the same gradients in fewer kernels). `tests/test_optim.py`
  holds both to torch's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import optimizer as _torch_optimizer

#: Whether torch's profiler runs: torch's own check, in C, not exported by name. A torch
#: without it gets torch's own methods every time.
_profiling: Callable[[], bool] = getattr(torch.autograd, "_profiler_enabled", lambda: True)


def _hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any step hook would run around this optimizer's step."""
    return bool(
        getattr(optimizer, "_optimizer_step_pre_hooks", None)
        or getattr(optimizer, "_optimizer_step_post_hooks", None)
        or getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
        or getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    )


def step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(), without torch's profiler range when nothing needs it."""
    # The optimizer's own step, as torch's wrapper (Optimizer.profile_hook_step) calls it.
    unwrapped: Callable[[Any], Any] | None = getattr(type(optimizer).step, "__wrapped__", None)
    if unwrapped is None or _hooked(optimizer) or _profiling():
        optimizer.step()
        return
    if _plain_sgd(optimizer):
        _sgd_update(optimizer)
    else:
        unwrapped(optimizer)
    # A no-op that torch's wrapper calls after each step, for tools that hook it.
    getattr(optimizer, "_optimizer_step_code", lambda: None)()


#: A plain SGD group's settings, each at the value that makes torch's step `p -= lr * grad`.
#: A group with any other setting, or with one torch adds later, takes torch's own path.
_PLAIN_SGD = {
    "momentum": 0,
    "dampening": 0,
    "weight_decay": 0,
    "nesterov": False,
    "maximize": False,
    "differentiable": False,
    "fused": None,
}


_PLAIN_SGD_KEYS = _PLAIN_SGD.keys() | {"params", "lr", "foreach"}


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch would step this optimizer with its single-tensor loop of
    `param.add_(grad, alpha=-lr)` and nothing else: torch.optim.SGD itself with a float lr,
    no momentum, decay, maximize or fused kernel, and its gradients on the CPU, where torch
    chooses that loop over foreach. Plain loops, no generators: this runs on every Step."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    # GradScaler's, which torch's single-tensor loop refuses: torch's step says so.
    if getattr(optimizer, "grad_scale", None) is not None:
        return False
    if getattr(optimizer, "found_inf", None) is not None:
        return False
    for group in optimizer.param_groups:
        if group.keys() != _PLAIN_SGD_KEYS or group["foreach"]:
            return False
        if type(group["lr"]) not in (float, int):
            return False
        for key, value in _PLAIN_SGD.items():
            if group[key] != value:
                return False
        for p in group["params"]:
            if p.grad is not None and not p.is_cpu:
                return False
    return True


def _sgd_update(optimizer: torch.optim.Optimizer) -> None:
    """torch's plain SGD step without the Python around it: `_single_tensor_sgd` does
    exactly this for each parameter that has a gradient, under no_grad, in this order."""
    enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        for group in optimizer.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
    finally:
        torch.set_grad_enabled(enabled)


def zero_grad(optimizer: torch.optim.Optimizer, set_to_none: bool) -> None:
    """optimizer.zero_grad(set_to_none), without torch's profiler range when no profiler runs."""
    defaults = optimizer.defaults
    if defaults.get("foreach") or defaults.get("fused") or _profiling():
        optimizer.zero_grad(set_to_none=set_to_none)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
                continue
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()
