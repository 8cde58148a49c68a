"""AdvGA / AdvNPO: latent adversarial unlearning, LAU (Yuan et al. 2024, "Towards Robust Knowledge Unlearning:
An Adversarial Framework for Assessing and Improving Unlearning Robustness in LLMs"; docs/theory.md,
"Other unlearning methods").

A min-max problem: an adversary adds a perturbation delta, ||delta|| <= epsilon, to one layer's hidden
states so as to RESTORE the forget data's likelihood; the model minimises its unlearning loss under it:

    delta*(theta) ~ argmax_{||delta|| <= eps} (1/n_f) sum_y logp_{theta, delta}(y) / |y|     (inner, K steps)
    theta <- theta - lr * grad_theta [ forget_weight * L_f(theta, delta*) + retain_weight * R(theta) ]

with L_f = GA (AdvGA) or NPO (AdvNPO) and the retain term R, if any, on the unperturbed model. The inner
loop is K steps of normalised projected gradient ascent from delta = 0,
delta <- Proj_eps(delta + eta g / ||g||); the outer gradient treats delta* as fixed (Danskin; no
differentiation through the inner loop). The adversary's objective (the forget log-likelihood, for both
AdvGA and AdvNPO), the zero start and the normalised step are our reading and marked uncertain.

Simulator: delta in R^V is added to every next-token logit vector of the exact model (the transition
logits of every state, and of every component of a mixture): a hidden-state perturbation of the last
layer seen through the unembedding. With epsilon = 0 AdvGA/AdvNPO are exactly GA/NPO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import check_integer, check_real
from ..data import SequenceSet
from ..exact_gradients import next_token_log_probs, objective_value, objective_value_and_gradient
from ..losses import NEEDS_REFERENCE, SEQUENCE_LOSSES
from ..objectives import Objective
from ..tensor_checks import check_float
from .base import ExactStep
from .exact import component_rows

__all__ = ["LAUConfig", "project_to_ball", "adversarial_perturbation", "autograd_ascent_direction",
           "perturb_logits", "ExactLAU", "build_exact"]


@dataclass(frozen=True)
class LAUConfig:
    """LAU hyperparameters.

    Attributes:
        objective: the outer unlearning objective (AdvGA: ``Objective("ga")``; AdvNPO: ``Objective("npo")``).
        epsilon: >= 0, the radius of the L2 ball of each perturbation vector (0: plain ``objective``).
        inner_steps: K >= 0 ascent steps of the adversary per outer step.
        inner_learning_rate: eta > 0, the adversary's (normalised) step size.
    """

    objective: Objective = Objective("ga")
    epsilon: float = 0.5
    inner_steps: int = 5
    inner_learning_rate: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise TypeError(f"objective must be a markovsim.objectives.Objective, got {type(self.objective).__name__}")
        check_real("epsilon", self.epsilon, minimum=0.0)
        check_integer("inner_steps", self.inner_steps, 0)
        check_real("inner_learning_rate", self.inner_learning_rate, minimum=0.0, exclusive=True)


def project_to_ball(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each vector along the last axis scaled into the L2 ball of radius epsilon: delta * min(1, eps / ||delta||)."""
    check_float("delta", delta)
    epsilon = check_real("epsilon", epsilon, minimum=0.0)
    norms = delta.norm(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(norms > epsilon, delta * (epsilon / norms.clamp_min(1e-300)), delta)


def adversarial_perturbation(ascent_direction: Callable[[torch.Tensor], torch.Tensor], initial: torch.Tensor,
                             epsilon: float, steps: int, step_size: float) -> torch.Tensor:
    """K steps of normalised projected gradient ascent: delta <- Proj_eps(delta + eta g / ||g||).

    Args:
        ascent_direction: delta -> g, the gradient of the adversary's objective at delta (same shape);
            e.g. :func:`autograd_ascent_direction` of a loss, or a closed form. Vectors with g = 0 stay put.
        initial: the starting delta (usually zeros), shape (..., d); the ball is per vector along the last axis.
        epsilon, steps, step_size: radius >= 0, K >= 0, eta > 0.
    Returns: delta (detached), within the ball.
    """
    steps = check_integer("steps", steps, 0)
    step_size = check_real("step_size", step_size, minimum=0.0, exclusive=True)
    delta = project_to_ball(initial.detach(), epsilon)
    for _ in range(steps):
        gradient = ascent_direction(delta).detach()  # (..., d)
        norms = gradient.norm(dim=-1, keepdim=True)  # (..., 1)
        direction = torch.where(norms > 0, gradient / norms.clamp_min(1e-300), 0.0)
        delta = project_to_ball(delta + step_size * direction, epsilon)
    return delta


def autograd_ascent_direction(objective: Callable[[torch.Tensor], torch.Tensor]):
    """delta -> d objective(delta) / d delta by autograd, for a scalar ``objective`` (e.g. a hooked forward pass)."""
    def direction(delta: torch.Tensor) -> torch.Tensor:
        delta = delta.detach().requires_grad_(True)
        return torch.autograd.grad(objective(delta), delta)[0]
    return direction


def perturb_logits(model, delta: torch.Tensor):
    """The exact model with ``delta`` (V,) added to every next-token logit vector (its last parameter,
    ``transition_logits``, broadcast over states and components)."""
    params = model.parameters()
    return model.with_parameters(*params[:-1], params[-1] + delta)


def _logit_gradient(gradients: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """d/d delta from d/d transition_logits: summed over every axis but the last (V,)."""
    transition = gradients[-1]
    return transition.reshape(-1, transition.shape[-1]).sum(0)


@dataclass(frozen=True, eq=False)
class ExactLAU:
    """AdvGA / AdvNPO on an exact model (reference quantities built once)."""

    config: LAUConfig
    forget: SequenceSet
    retain: SequenceSet | None
    reference: object
    forget_ref_logps: torch.Tensor | None
    retain_ref_log_probs: torch.Tensor | None

    @property
    def forget_objective(self) -> Objective:
        return dataclasses.replace(self.config.objective, retain=None)

    def perturbation(self, model) -> torch.Tensor:
        """The adversary's delta* (V,) at ``model``: it ascends the forget set's token-mean log-likelihood."""
        def ascent(delta):
            with torch.no_grad():
                gradients = objective_value_and_gradient(perturb_logits(model, delta), Objective("ga"),
                                                         self.forget).gradients
            return _logit_gradient(gradients)
        c = self.config
        start = torch.zeros(self.forget.num_states, dtype=torch.float64)
        return adversarial_perturbation(ascent, start, c.epsilon, c.inner_steps, c.inner_learning_rate)

    def _retain_args(self):
        return (self.forget, self.retain, self.forget_ref_logps, self.retain_ref_log_probs)

    def value(self, model) -> torch.Tensor:
        delta = self.perturbation(model.with_parameters(*[p.detach() for p in model.parameters()]))
        forget = objective_value(perturb_logits(model, delta), self.forget_objective, self.forget, None,
                                 self.forget_ref_logps)
        if self.config.objective.retain is None:
            return forget
        retain = objective_value(model, self.config.objective, *self._retain_args()) - objective_value(
            model, self.forget_objective, self.forget, None, self.forget_ref_logps)
        return forget + retain

    def step(self, model) -> ExactStep:
        delta = self.perturbation(model)
        perturbed = objective_value_and_gradient(perturb_logits(model, delta), self.forget_objective, self.forget,
                                                 None, self.forget_ref_logps)
        if self.config.objective.retain is None:
            with torch.no_grad():
                logps = model.response_logps(self.forget)
            return ExactStep(perturbed.value, perturbed.gradients, logps)
        full = objective_value_and_gradient(model, self.config.objective, *self._retain_args())
        clean = objective_value_and_gradient(model, self.forget_objective, self.forget, None, self.forget_ref_logps)
        gradients = tuple(p + f - c for p, f, c in zip(perturbed.gradients, full.gradients, clean.gradients))
        return ExactStep(perturbed.value + full.value - clean.value, gradients, full.forget_logps)

    def forget_gradient(self, model, component: str) -> tuple[torch.Tensor, ...]:
        """The perturbed forget term's gradient from component's sequences: their mean's gradient times n_c / n_f
        (exact: a sequence-level loss's weight does not depend on the batch); delta* from the full batch."""
        rows = component_rows(self.forget, component).to(torch.bool).numpy()
        if not rows.any():
            return tuple(torch.zeros_like(p) for p in model.parameters())
        subset = self.forget.subset(rows)
        ref = None if self.forget_ref_logps is None else self.forget_ref_logps[torch.as_tensor(rows)]
        part = objective_value_and_gradient(perturb_logits(model, self.perturbation(model)), self.forget_objective,
                                            subset, None, ref)
        return tuple(g * (len(subset) / len(self.forget)) for g in part.gradients)


def build_exact(config: LAUConfig, reference, forget: SequenceSet, retain: SequenceSet | None = None,
                unseen: SequenceSet | None = None) -> ExactLAU:
    """The outer objective's reference quantities (npo's ref logps, a kl retain term's predictive) cached once."""
    objective = config.objective
    if objective.forget not in SEQUENCE_LOSSES:
        raise ValueError(f"the simulator's LAU needs a sequence-level forget loss {sorted(SEQUENCE_LOSSES)}, "
                         f"got {objective.forget!r}")
    if objective.retain is not None and (not isinstance(retain, SequenceSet) or len(retain) == 0):
        raise ValueError(f"objective has retain term {objective.retain!r}: pass a non-empty retain SequenceSet")
    with torch.no_grad():
        forget_ref = reference.response_logps(forget) if objective.forget in NEEDS_REFERENCE else None
        retain_ref = next_token_log_probs(reference, retain) if objective.retain in NEEDS_REFERENCE else None
    return ExactLAU(config, forget, retain if objective.retain is not None else None, reference, forget_ref,
                    retain_ref)
