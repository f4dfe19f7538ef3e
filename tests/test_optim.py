"""optim.py: a torch optimizer's step and zero_grad without torch's profiler range, held to
torch's own methods: the same values, the same hooks, and the range back while profiling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import adam as torch_adam
from torch.optim import sgd as torch_sgd
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from gradwire_server import optim
from gradwire_server.fills import FillSpec
from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.trainer import Trainer
from tests.reference import Simple

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd-momentum-nesterov-decay": lambda params: torch.optim.SGD(
        params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.01),
}


def model() -> nn.Module:
    """The same weights every time, leaving torch's global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 300), nn.ReLU(), nn.Linear(300, 3))


def backward(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 7, generator=gen)
    net(x).square().mean().backward()


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_steps_change_parameters_and_state_exactly_as_torch_s_own(kind: str) -> None:
    ours, theirs = model(), model()
    our_opt, their_opt = OPTIMIZERS[kind](ours.parameters()), OPTIMIZERS[kind](theirs.parameters())
    for seed in range(4):
        backward(ours, seed)
        backward(theirs, seed)
        optim.step(our_opt)
        their_opt.step()
        optim.zero_grad(our_opt, set_to_none=seed % 2 == 0)
        their_opt.zero_grad(set_to_none=seed % 2 == 0)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None)  # to None as torch sets them
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad) and not a.grad.requires_grad
    ours_state, theirs_state = our_opt.state_dict()["state"], their_opt.state_dict()["state"]
    assert ours_state.keys() == theirs_state.keys()
    assert bool(ours_state) == (kind != "sgd")  # momentum buffers, Adam's moments
    for key, state in ours_state.items():
        for name, value in state.items():
            other = theirs_state[key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_zeroing_detaches_a_gradient_that_has_a_graph() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(3, requires_grad=True) * 2  # a gradient with a grad_fn
    optim.zero_grad(opt, set_to_none=False)
    assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
    assert torch.equal(p.grad, torch.zeros(3))


def counting_ranges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the profiler ranges opened from now on (torch.autograd.profiler)."""
    opened: list[str] = []
    real = torch.autograd.profiler.record_function

    class Counted(real):  # type: ignore[misc,valid-type]
        def __init__(self, name: str, args: str | None = None) -> None:
            opened.append(name)
            super().__init__(name, args)

    monkeypatch.setattr(torch.autograd.profiler, "record_function", Counted)
    return opened


def test_no_range_is_opened_while_no_profiler_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    backward(net, 0)
    opened = counting_ranges(monkeypatch)
    optim.step(opt)
    optim.zero_grad(opt, set_to_none=False)
    optim.zero_grad(opt, set_to_none=True)
    assert opened == []
    backward(net, 1)
    opt.step()  # torch's own, for contrast: the check above can fail
    opt.zero_grad()
    assert opened == ["Optimizer.step#SGD.step", "Optimizer.zero_grad#SGD.zero_grad"]


def test_a_running_profiler_sees_every_step_and_zero_grad() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    backward(net, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optim.step(opt)
        optim.zero_grad(opt, set_to_none=False)
    names = {event.name for event in prof.events()}
    assert {"Optimizer.step#SGD.step", "Optimizer.zero_grad#SGD.zero_grad"} <= names


def test_step_hooks_still_run_their_own_and_global() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen: list[str] = []
    handles = [
        opt.register_step_pre_hook(lambda *_: seen.append("pre")),
        opt.register_step_post_hook(lambda *_: seen.append("post")),
    ]
    backward(net, 0)
    optim.step(opt)
    assert seen == ["pre", "post"]
    for handle in handles:
        handle.remove()
    handle = register_optimizer_step_post_hook(lambda *_: seen.append("global"))
    try:
        optim.step(opt)
    finally:
        handle.remove()
    assert seen == ["pre", "post", "global"]
    optim.step(opt)  # no hooks left: nothing more runs
    assert seen == ["pre", "post", "global"]


def test_an_optimizer_whose_step_torch_did_not_wrap_is_stepped_as_it_is() -> None:
    class Plain(torch.optim.SGD):
        pass

    calls: list[int] = []

    def plain_step(self: Plain, closure: Any = None) -> None:
        calls.append(1)

    net = model()
    opt = Plain(net.parameters(), lr=0.1)
    Plain.step = plain_step  # type: ignore[method-assign,assignment]
    optim.step(opt)
    assert calls == [1]


def test_a_trainer_steps_and_zeroes_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(device="cpu", seed=0)
    reference = Simple()  # written out apart from the server's, as the tutorial has it
    reference.load_state_dict(trainer._model.state_dict())
    reference_opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    x, y = torch.ones(4, 3, 10, 10), torch.tensor([0, 1, 2, 3])
    trainer.forward(FillSpec("ones", (4, 3, 10, 10)), y)
    trainer.backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    opened = counting_ranges(monkeypatch)
    trainer.step()
    trainer.zero_grad(set_to_none=False)
    assert opened == []
    reference_opt.step()
    reference_opt.zero_grad(set_to_none=False)
    for name, p in trainer._model.named_parameters():
        q = dict(reference.named_parameters())[name]
        assert torch.equal(p, q) and p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad)


def _refuse_torch_s_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes torch's own SGD step fail, so a test sees which path a step took."""

    def refused(self: torch.optim.Optimizer, closure: Any = None) -> None:
        raise AssertionError("torch's own SGD step ran")

    monkeypatch.setattr(torch.optim.SGD.step, "__wrapped__", refused)


def test_plain_sgd_skips_torch_s_python_and_matches_it_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = model(), model()
    frozen = nn.Parameter(torch.ones(2))  # never gets a gradient: left alone

    def groups(net: nn.Module) -> list[dict[str, Any]]:
        first, *rest = net.parameters()
        return [{"params": [first, frozen], "lr": 2}, {"params": rest}]  # an int lr too

    our_opt = torch.optim.SGD(groups(ours), lr=0.1)
    their_opt = torch.optim.SGD(groups(theirs), lr=0.1)
    for seed in range(3):
        backward(ours, seed)
        backward(theirs, seed)
        with monkeypatch.context() as patched:
            _refuse_torch_s_step(patched)
            optim.step(our_opt)
        their_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b) and a.requires_grad
    assert torch.equal(frozen, torch.ones(2)) and our_opt.state_dict()["state"] == {}
    assert torch.is_grad_enabled()  # put back after the update


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True),
        lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.1)),
        lambda ps: type("Mine", (torch.optim.SGD,), {})(ps, lr=0.1),
    ],
    ids=["momentum", "decay", "maximize", "foreach", "tensor-lr", "subclass"],
)
def test_any_other_sgd_takes_torch_s_own_step(
    make: Callable[[Any], torch.optim.Optimizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    net = model()
    opt = make(net.parameters())
    backward(net, 0)
    _refuse_torch_s_step(monkeypatch)
    with pytest.raises(AssertionError, match="torch's own SGD step ran"):
        optim.step(opt)


def test_a_setting_torch_adds_later_or_a_gradient_off_the_cpu_takes_torch_s_step() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, foreach=False)
    backward(net, 0)
    assert optim._plain_sgd(opt)
    opt.param_groups[0]["some_new_option"] = True  # unknown here: not assumed harmless
    assert not optim._plain_sgd(opt)
    on_meta = nn.Parameter(torch.empty(3, device="meta"))
    on_meta.grad = torch.empty(3, device="meta")
    assert not optim._plain_sgd(torch.optim.SGD([on_meta], lr=0.1))


@pytest.mark.parametrize(
    "settings",
    [
        OptimizerSettings("sgd", lr=0.1, momentum=0.9, nesterov=True),
        OptimizerSettings("sgd", lr=0.1, momentum=0.9),
        OptimizerSettings("adam", lr=0.01),
    ],
    ids=["sgd-nesterov", "sgd-momentum", "adam"],
)
def test_a_step_leaves_the_gradients_as_backward_made_them_with_cuda_s_defaults(
    monkeypatch: pytest.MonkeyPatch, settings: OptimizerSettings
) -> None:
    """On CUDA parameters torch defaults to its foreach implementations, and foreach SGD with
    Nesterov momentum adds the momentum buffer into every .grad. Simulated here on the CPU."""
    as_on_cuda = lambda *args, **kwargs: (False, True)  # noqa: E731 (fused, foreach)
    for module in (torch_sgd, torch_adam):
        monkeypatch.setattr(module, "_default_to_fused_or_foreach", as_on_cuda)
    trainer = Trainer(device="cpu", seed=0, optimizer=settings)
    x = FillSpec("uniform", (8, 3, 10, 10), low=-1, high=1, seed=1)
    y = FillSpec("randint", (8,), low=0, high=20, seed=2)
    for _ in range(2):  # the second Step has a momentum buffer to add
        trainer.train_step(x, y, zero_grad=True, use=lambda s: s)
        grads = {n: p.grad.clone() for n, p in trainer._parameters.items() if p.grad is not None}
        assert grads
        trainer.step()
        for name, grad in grads.items():
            assert torch.equal(trainer._parameters[name].grad, grad), name


def _register(kind: str, opt: torch.optim.Optimizer, seen: list[str]) -> Any:
    """One step hook of the given kind, which appends its kind to `seen` when it runs."""
    hook = lambda *_: seen.append(kind)  # noqa: E731
    if kind == "own-pre":
        return opt.register_step_pre_hook(hook)
    if kind == "own-post":
        return opt.register_step_post_hook(hook)
    if kind == "global-pre":
        return register_optimizer_step_pre_hook(hook)
    return register_optimizer_step_post_hook(hook)


@pytest.mark.parametrize("kind", ["own-pre", "own-post", "global-pre", "global-post"])
def test_each_kind_of_step_hook_alone_still_runs(kind: str) -> None:
    """Each of the four kinds alone is enough to send the step through torch's wrapper."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen: list[str] = []
    handle = _register(kind, opt, seen)
    try:
        backward(net, 0)
        optim.step(opt)
    finally:
        handle.remove()
    assert seen == [kind]


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_step_calls_the_no_op_that_torch_s_wrapper_calls_after_each_step(kind: str) -> None:
    """Tools hook `_optimizer_step_code` to see each step; torch's own step calls it, so must
    this one, on the plain SGD path and on torch's unwrapped step alike."""
    net = model()
    opt = OPTIMIZERS[kind](net.parameters())
    calls: list[int] = []
    opt._optimizer_step_code = lambda: calls.append(1)  # type: ignore[method-assign]
    backward(net, 0)
    optim.step(opt)
    assert calls == [1]


def test_a_step_under_no_grad_leaves_grad_mode_off() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    backward(net, 0)
    assert optim._plain_sgd(opt)
    with torch.no_grad():
        optim.step(opt)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("attribute", ["grad_scale", "found_inf"])
def test_an_sgd_given_a_grad_scale_or_found_inf_is_refused_as_torch_refuses_it(
    attribute: str,
) -> None:
    """torch's single-tensor SGD refuses a `grad_scale` or a `found_inf` (GradScaler's, meant
    for fused kernels); the plain path must not step past either (it checked grad_scale
    alone: a mutation pass's helper read it in torch's source)."""
    ours, theirs = model(), model()
    for net in (ours, theirs):
        backward(net, 0)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    their_opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for opt in (our_opt, their_opt):
        setattr(opt, attribute, torch.tensor(1.0))
    with pytest.raises(AssertionError, match="grad_scale") as theirs_raised:
        their_opt.step()
    with pytest.raises(AssertionError, match="grad_scale") as ours_raised:
        optim.step(our_opt)
    assert str(ours_raised.value) == str(theirs_raised.value)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_parameter_off_the_cpu_without_a_gradient_leaves_sgd_plain() -> None:
    """Only the parameters that have a gradient are stepped, so only theirs decide the path."""
    on_cpu = nn.Parameter(torch.ones(3))
    on_cpu.grad = torch.ones(3)
    on_meta = nn.Parameter(torch.empty(3, device="meta"))  # frozen: no gradient
    assert optim._plain_sgd(torch.optim.SGD([on_cpu, on_meta], lr=0.1))


@pytest.mark.parametrize("setting", ["foreach", "fused"])
def test_a_foreach_or_fused_optimizer_zeroes_through_torch_s_own(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch zeroes a foreach or fused optimizer's gradients in fewer kernels: its own
    zero_grad (and so its range) is taken for them, while no profiler runs too."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, **{setting: True})
    backward(net, 0)
    opened = counting_ranges(monkeypatch)
    optim.zero_grad(opt, set_to_none=False)
    assert opened == ["Optimizer.zero_grad#SGD.zero_grad"]
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_zeroing_leaves_a_parameter_without_a_gradient_without_one() -> None:
    p, frozen = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p, frozen], lr=0.1)
    optim.zero_grad(opt, set_to_none=False)
    assert frozen.grad is None and p.grad is not None and torch.equal(p.grad, torch.zeros(3))


def test_zeroing_a_leaf_gradient_that_requires_grad_stops_it_requiring_grad() -> None:
    """As torch's zero_grad does: a gradient with no graph is not detached but no longer
    requires grad."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(3, requires_grad=True)  # a leaf: no grad_fn
    optim.zero_grad(opt, set_to_none=False)
    assert p.grad is not None and not p.grad.requires_grad
    assert torch.equal(p.grad, torch.zeros(3))
