"""Full-batch objective values and closed-form gradients on the simulator's exact models.

The gradient of any objective is assembled from the loss library's closed-form weights
(``Objective.forget_weights``) and the models' count-based derivatives (docs/theory.md, "Mixtures of Markov chains"):

    grad forget  = (1/n_f) sum_y w(y) d logp(y)             (one weighted sum of count matrices)
    grad nll     = -(1/n_r) sum_y (1/|y|) d logp(y)
    grad kl      = (1/N_tokens) sum_{y,t} d KL(pi_ref(.|prefix) || pi_theta(.|prefix))

Autograd through ``objective_value`` is the test oracle for ``objective_value_and_gradient``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import SequenceSet
from .losses import NEEDS_REFERENCE, kl
from .objectives import Objective
from .tensor_checks import value_checks_skipped


@dataclass(frozen=True)
class ExactEvaluation:
    """One full-batch evaluation of an objective.

    Attributes:
        value: scalar objective.
        gradients: one tensor per model parameter (the order of ``model.parameters()``).
        forget_logps: (n_f,) response log-likelihoods on the forget set.
        forget_weights: (n_f,) closed-form gradient weights w(y).
        forget_value, retain_value: the two terms before weighting (retain None without one).
    """

    value: torch.Tensor
    gradients: tuple[torch.Tensor, ...]
    forget_logps: torch.Tensor
    forget_weights: torch.Tensor
    forget_value: torch.Tensor
    retain_value: torch.Tensor | None


def num_tokens_tensor(sequences: SequenceSet) -> torch.Tensor:
    """(n,) float64 response lengths |y|."""
    return torch.tensor(sequences.num_tokens, dtype=torch.float64)


def next_token_log_probs(model, sequences: SequenceSet) -> torch.Tensor:
    """log of the model's next-token predictive, (n, T-1, V), with 0 on padding so gradients stay finite."""
    return model.next_token_log_probs(sequences)


def retain_kl_value(model, retain: SequenceSet, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over all retain response tokens of ``KL(pi_ref || pi_theta)`` (docs/theory.md, "Retain terms and
    objectives")."""
    mask = torch.as_tensor(retain.transition_mask)
    per_sequence = kl(reference_log_probs, next_token_log_probs(model, retain), mask)  # (n,) token means
    num_tokens = num_tokens_tensor(retain)
    return (per_sequence * num_tokens).sum() / num_tokens.sum()


def _check_inputs(objective: Objective, forget: SequenceSet, retain, forget_ref_logps, retain_ref_log_probs) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a markovsim.losses.Objective, got {type(objective).__name__}")
    if not isinstance(forget, SequenceSet) or len(forget) == 0:
        raise ValueError("forget must be a non-empty SequenceSet")
    if objective.retain is not None and (not isinstance(retain, SequenceSet) or len(retain) == 0):
        raise ValueError(f"objective has retain term {objective.retain!r}: pass a non-empty retain SequenceSet")
    if objective.forget in NEEDS_REFERENCE and forget_ref_logps is None:
        raise ValueError(f"{objective.forget} needs forget_ref_logps (the reference model's response_logps on the "
                         f"forget set)")
    if objective.retain in NEEDS_REFERENCE and retain_ref_log_probs is None:
        raise ValueError(f"a {objective.retain} retain term needs retain_ref_log_probs "
                         f"(next_token_log_probs(reference, retain))")


def combined_value(objective: Objective, forget_value: torch.Tensor, retain_value: torch.Tensor | None = None):
    """``objective.total`` of terms computed here from checked inputs: a term that overflowed to inf is returned
    for the divergence rule to report ("loss is inf"), not raised as a bad input."""
    with value_checks_skipped():
        return objective.total(forget_value, retain_value)


def objective_value(model, objective: Objective, forget: SequenceSet, retain: SequenceSet | None = None,
                    forget_ref_logps: torch.Tensor | None = None,
                    retain_ref_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar objective ``forget_weight * mean_y L_f(y) + retain_weight * retain_term`` (autograd-able)."""
    _check_inputs(objective, forget, retain, forget_ref_logps, retain_ref_log_probs)
    forget_value = objective.forget_losses(model.response_logps(forget), num_tokens_tensor(forget),
                                           forget_ref_logps).mean()
    if objective.retain is None:
        return combined_value(objective, forget_value)
    if objective.retain == "nll":
        retain_value = (-model.response_logps(retain) / num_tokens_tensor(retain)).mean()
    else:
        retain_value = retain_kl_value(model, retain, retain_ref_log_probs)
    return combined_value(objective, forget_value, retain_value)


def objective_value_and_gradient(model, objective: Objective, forget: SequenceSet, retain: SequenceSet | None = None,
                                 forget_ref_logps: torch.Tensor | None = None,
                                 retain_ref_log_probs: torch.Tensor | None = None) -> ExactEvaluation:
    """Value and closed-form gradient of the objective on ``TabularMarkov`` or ``MixtureOfChains``."""
    _check_inputs(objective, forget, retain, forget_ref_logps, retain_ref_log_probs)
    with torch.no_grad():
        logps = model.response_logps(forget)  # (n_f,)
        num_tokens = num_tokens_tensor(forget)
        forget_value = objective.forget_losses(logps, num_tokens, forget_ref_logps).mean()
        weights = objective.forget_weights(logps, num_tokens, forget_ref_logps)  # (n_f,)
        forget_scale = objective.forget_weight / len(forget)
        gradients = model.response_logps_gradient(forget, weights * forget_scale)
        retain_value = None
        if objective.retain == "nll":
            retain_tokens = num_tokens_tensor(retain)
            retain_value = (-model.response_logps(retain) / retain_tokens).mean()
            scale = -objective.retain_weight / (len(retain) * retain_tokens)
            retain_gradients = model.response_logps_gradient(retain, scale)
        elif objective.retain == "kl":
            retain_value = retain_kl_value(model, retain, retain_ref_log_probs)
            mask = torch.as_tensor(retain.transition_mask)
            token_weights = mask.to(torch.float64) * (objective.retain_weight / float(mask.sum()))
            reference_probs = torch.exp(retain_ref_log_probs) * mask[..., None]
            retain_gradients = model.predictive_kl_gradient(retain, reference_probs, token_weights)
        if objective.retain is not None:
            gradients = tuple(g + h for g, h in zip(gradients, retain_gradients))
        value = combined_value(objective, forget_value, retain_value)
    return ExactEvaluation(value, gradients, logps, weights, forget_value, retain_value)
