"""What every method of the registry shares: its kind, its spec, the fine-tuning settings and the exact step.

docs/theory.md, "Other unlearning methods". A method is one of three kinds:

* ``objective``: a loss over forget / retain (/ extra) batches, minimised by gradient steps
  (GA+Mismatch, WHP, KGA, SeUL);
* ``update_rule``: a closed-form edit of the parameters, no optimisation loop (TaskNegation);
* ``wrapper``: changes how an existing :class:`~markovsim.objectives.Objective` is optimised
  (AdvGA / AdvNPO: an inner adversary before each outer step).

Each method's hyperparameters are a frozen dataclass validated on construction (errors name the field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..config import OPTIMIZERS, check_integer, check_real

__all__ = ["KINDS", "MethodSpec", "FineTuneConfig", "ExactStep", "ExactProblem", "check_choice"]

KINDS = ("objective", "update_rule", "wrapper")


def check_choice(name: str, value, choices: tuple) -> str:
    """``value`` must be one of ``choices`` (ValueError naming the field otherwise)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


@dataclass(frozen=True)
class FineTuneConfig:
    """How an auxiliary model is trained on a data set by minimising its token-mean NLL
    (WHP's reinforced model, KGA's A_f and A_n, TaskNegation's theta_ft).

    Attributes:
        steps: optimisation steps, >= 1.
        learning_rate: > 0.
        optimizer: one of ``markovsim.config.OPTIMIZERS`` (gd, adamw, adamw_legacy).
    """

    steps: int = 20
    learning_rate: float = 0.05
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        check_integer("steps", self.steps, 1)
        check_real("learning_rate", self.learning_rate, minimum=0.0, exclusive=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    Attributes:
        name: the registry name (e.g. ``"WHP"``).
        kind: one of ``KINDS``.
        config: the default hyperparameters (a frozen dataclass instance).
        paper: the citation.
        equation: the method's defining equation, in one line (docs/theory.md has the derivation).
        exact: builds the simulator counterpart, ``exact(config, reference, forget, retain, unseen, rng)``
            (see :mod:`markovsim.methods.exact`), or None where the method has no exact analogue.
        exact_note: what the simulator counterpart is, and what of the method it cannot represent.
    """

    name: str
    kind: str
    config: Any
    paper: str
    equation: str
    exact: Callable[..., Any] | None
    exact_note: str

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        if not dataclasses.is_dataclass(self.config) or not self.config.__dataclass_params__.frozen:
            raise TypeError(f"config of {self.name!r} must be a frozen dataclass instance")

    def with_config(self, **overrides) -> Any:
        """The default config with fields replaced (ValueError for an unknown field)."""
        fields = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown {type(self.config).__name__} fields {unknown}; valid fields: {sorted(fields)}")
        return dataclasses.replace(self.config, **overrides)


@dataclass(frozen=True)
class ExactStep:
    """A method's objective and closed-form gradient at one point of an exact model.

    Attributes:
        value: scalar objective.
        gradients: one tensor per model parameter (the order of ``model.parameters()``).
        forget_logps: (n_f,) response log-likelihoods of the forget set at the model (the divergence rule).
    """

    value: torch.Tensor
    gradients: tuple[torch.Tensor, ...]
    forget_logps: torch.Tensor


class ExactProblem(Protocol):
    """A method's simulator objective with everything it needs precomputed (targets, auxiliary models).

    ``value(model)`` is differentiable through ``model.with_parameters`` (autograd is the test oracle);
    ``step(model)`` gives the same value with the closed-form gradient; ``forget_gradient(model, component)``
    is the forget-side term's gradient from one forget component's sequences (they add up to the whole
    forget-side gradient; the per-component "unlearning power"). ``forget`` / ``retain`` are the data sets
    (``retain`` None without a retain term), ``reference`` the model before unlearning.
    """

    forget: Any
    retain: Any
    reference: Any

    def value(self, model) -> torch.Tensor: ...

    def step(self, model) -> ExactStep: ...

    def forget_gradient(self, model, component: str) -> tuple[torch.Tensor, ...]: ...
