"""The optimizers a trainer can use, torch's SGD and Adam: their settings and defaults, which
settings belong to which kind, the state each keeps per parameter, and the optimizer made
from them. No trainer state here: the trainer holds one optimizer and its settings
(Trainer.set_optimizer); optim.py runs its step and zero_grad.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from gradwire_server.errors import InvalidInput

#: The optimizer state torch keeps per parameter, by optimizer kind and by torch's own keys,
#: in the order ListTensors lists them: Adam all three once a Step has made any; SGD its
#: momentum buffer, with momentum (None: made from the gradient).
STATE_KEYS = {
    "sgd": ("momentum_buffer",),
    "adam": ("step", "exp_avg", "exp_avg_sq"),
}
#: When each kind keeps its state, for a name of state the optimizer in use does not keep:
#: torch's SGD makes a parameter's buffer, and Adam its three entries, in the first Step
#: that finds the parameter's gradient; SGD with momentum 0 makes none.
STATE_KEPT = {
    "sgd": "SGD keeps a momentum_buffer only with momentum, from the first Step that finds "
    "the parameter's gradient",
    "adam": "Adam keeps step, exp_avg and exp_avg_sq, from the first Step that finds the "
    "parameter's gradient",
}


@dataclass(frozen=True)
class OptimizerSettings:
    """An optimizer and its settings; None means PyTorch's default for that optimizer."""

    kind: Literal["sgd", "adam"] = "sgd"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    nesterov: bool | None = None

    def resolved(self) -> OptimizerSettings:
        """Every field set: SGD's lr defaults to 1.0 as in the tutorial, the rest as in PyTorch."""
        if self.kind == "sgd":
            return OptimizerSettings(
                kind="sgd",
                lr=1.0 if self.lr is None else self.lr,
                momentum=self.momentum or 0.0,
                weight_decay=self.weight_decay or 0.0,
                nesterov=bool(self.nesterov),
            )
        return OptimizerSettings(
            kind="adam",
            lr=1e-3 if self.lr is None else self.lr,
            weight_decay=self.weight_decay or 0.0,
            beta1=0.9 if self.beta1 is None else self.beta1,
            beta2=0.999 if self.beta2 is None else self.beta2,
            eps=1e-8 if self.eps is None else self.eps,
        )


#: The settings only one kind of optimizer has.
_ONLY = {"sgd": ("momentum", "nesterov"), "adam": ("beta1", "beta2", "eps")}
KIND_NAMES = {"sgd": "SGD", "adam": "Adam"}


def check_settings_kind(settings: OptimizerSettings, *, in_place: bool = False) -> None:
    """Refuses a setting that belongs to the other kind of optimizer (BAD_OPTIMIZER); with
    `in_place`, for a change to the optimizer in place (SetOptimizer's keep_state)."""
    other = "adam" if settings.kind == "sgd" else "sgd"
    for name in _ONLY[other]:
        if getattr(settings, name) is not None:
            this, that = KIND_NAMES[settings.kind], KIND_NAMES[other]
            instead = (
                f"replace the optimizer with {that} (without keep_state, --keep-state)"
                if in_place
                else f"ask for {that}"
            )
            raise InvalidInput(
                f"{name} is a setting of {that}, not of {this}: leave it out, or {instead}",
                reason="BAD_OPTIMIZER",
            )


def build(parameters: Iterable[torch.Tensor], s: OptimizerSettings) -> torch.optim.Optimizer:
    """torch's optimizer of `s` (every field set: OptimizerSettings.resolved) over
    `parameters`; InvalidInput (BAD_OPTIMIZER) for settings torch refuses."""
    if s.kind == "sgd" and s.nesterov and not s.momentum:
        # torch's words: "Nesterov momentum requires a momentum and zero dampening", a
        # setting gradwire does not have (always 0).
        raise InvalidInput(
            f"optimizer settings refused: nesterov needs a momentum above 0, and momentum is "
            f"{float(s.momentum or 0.0)}",
            reason="BAD_OPTIMIZER",
        )
    if s.kind == "adam":
        # torch's words: "Invalid beta parameter at index 0", its betas tuple, which gradwire
        # has as beta1 and beta2 (found by a review of the error catalogue).
        for name, beta in (("beta1", s.beta1), ("beta2", s.beta2)):
            if beta is not None and not 0.0 <= beta < 1.0:
                raise InvalidInput(
                    f"optimizer settings refused: {name} must be at least 0 and below 1, "
                    f"got {float(beta)}",
                    reason="BAD_OPTIMIZER",
                )
    try:
        if s.kind == "sgd":
            return torch.optim.SGD(
                parameters,
                lr=float(s.lr or 0.0),
                momentum=float(s.momentum or 0.0),
                weight_decay=float(s.weight_decay or 0.0),
                nesterov=bool(s.nesterov),
                # torch's foreach SGD, its default for CUDA parameters, adds the momentum
                # buffer into each .grad in place under Nesterov: a gradient read after
                # the Step would not be the one Backward made (found by a review).
                foreach=False if s.nesterov else None,
            )
        return torch.optim.Adam(
            parameters,
            lr=float(s.lr or 0.0),
            betas=(float(s.beta1 or 0.0), float(s.beta2 or 0.0)),
            eps=float(s.eps or 0.0),
            weight_decay=float(s.weight_decay or 0.0),
        )
    except ValueError as err:  # torch's own checks: a negative lr, a beta past 1, ...
        raise InvalidInput(f"optimizer settings refused: {err}", reason="BAD_OPTIMIZER") from err
