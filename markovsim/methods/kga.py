"""KGA, knowledge gap alignment (Wang et al., ACL 2023, Sec. 3; docs/theory.md, "Other unlearning methods").

Models: A_D the original (trained on D), A_f trained on the forget set D_f, A_n trained on a set D_n of
unseen data (not in D), A* the unlearned model, initialised at A_D. The *knowledge gap* between two
models on data is the distance of their output distributions, here the token-mean KL. Unlearning makes
A*'s gap to A_f on D_f match A_D's gap to A_n on D_n (how a model differs from one trained on data it
never saw), while staying close to A_D on the retain set D_r:

    L_a = | dis_{D_f}(A*, A_f) - dis_{D_n}(A_D, A_n) |
    L_r = dis_{D_r}(A_D, A*)
    L   = L_a + retain_weight * L_r

with dis_D(A, B) = mean over D's response tokens of KL(p_B(.|ctx) || p_A(.|ctx)) for the gap terms, and
L_r the KL retain term KL(p_{A_D} || p_{A*}). The paper writes L_a as a sum over (forget, unseen) example
pairs of |gap difference|; its public code (as we read it) takes batch means of the two gaps, which is
what :func:`gap_alignment` does when given the batch-mean gaps. The KL direction inside dis (the auxiliary
model's distribution as the first argument) follows our reading of the code's ``kl_div(log p_A*, p_A_f)``
and is marked uncertain. dis_{D_n}(A_D, A_n) does not depend on A*: it is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_real
from ..data import SequenceSet
from ..exact_gradients import next_token_log_probs, retain_kl_value
from ..tabular import TabularMarkov
from ..tensor_checks import check_float
from .base import ExactStep, FineTuneConfig, check_choice
from .exact import component_rows, fine_tune, token_kl_step

__all__ = ["KGAConfig", "gap_alignment", "kga_loss", "ExactKGA", "build_exact"]


@dataclass(frozen=True)
class KGAConfig:
    """KGA hyperparameters.

    Attributes:
        retain_weight: the weight of L_r (the paper's alpha), >= 0.
        auxiliary_from: how A_f and A_n are trained on D_f and D_n: "scratch" (the paper's models trained on
            that data alone; in the simulator a tabular model's closed-form MLE, add-``smoothing``) or
            "reference" (fine-tuned from the original with ``auxiliary``).
        auxiliary: fine-tuning settings for "reference" (also the transformer's two auxiliary runs).
        smoothing: > 0, the add-smoothing of the "scratch" MLE (keeps every KL finite).
    """

    retain_weight: float = 1.0
    auxiliary_from: str = "scratch"
    auxiliary: FineTuneConfig = FineTuneConfig()
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        check_real("retain_weight", self.retain_weight, minimum=0.0)
        check_choice("auxiliary_from", self.auxiliary_from, ("scratch", "reference"))
        check_real("smoothing", self.smoothing, minimum=0.0, exclusive=True)
        if not isinstance(self.auxiliary, FineTuneConfig):
            raise TypeError(f"auxiliary must be a FineTuneConfig, got {type(self.auxiliary).__name__}")


def gap_alignment(forget_gaps: torch.Tensor, unseen_gaps: torch.Tensor) -> torch.Tensor:
    """|dis(A*, A_f) - dis(A_D, A_n)| per (forget, unseen) pair: (B,) and (B,) (or a scalar) -> (B,).

    Pass (B,) per-example gaps for the paper's pairwise sum, or the two batch means for the code's form.
    """
    check_float("forget_gaps", forget_gaps)
    check_float("unseen_gaps", unseen_gaps)
    if unseen_gaps.ndim != 0 and unseen_gaps.shape != forget_gaps.shape:
        raise ValueError(f"unseen_gaps must be a scalar or shaped like forget_gaps {tuple(forget_gaps.shape)}, "
                         f"got {tuple(unseen_gaps.shape)}")
    return (forget_gaps - unseen_gaps.detach()).abs()


def kga_loss(forget_gap: torch.Tensor, unseen_gap: torch.Tensor, retain_kl: torch.Tensor,
             retain_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = |forget_gap - unseen_gap| + retain_weight * retain_kl (all scalars) and its terms (detached)."""
    retain_weight = check_real("retain_weight", retain_weight, minimum=0.0)
    for name, value in (("forget_gap", forget_gap), ("unseen_gap", unseen_gap), ("retain_kl", retain_kl)):
        if check_float(name, value).ndim != 0:
            raise ValueError(f"{name} must be a scalar (a batch-mean KL), got shape {tuple(value.shape)}")
    alignment = gap_alignment(forget_gap, unseen_gap)
    terms = {"alignment": alignment.detach(), "forget_gap": forget_gap.detach(), "unseen_gap": unseen_gap.detach(),
             "retain": retain_kl.detach()}
    return alignment + retain_weight * retain_kl, terms


@dataclass(frozen=True, eq=False)
class ExactKGA:
    """KGA on an exact model; A_f's predictive on D_f, the unseen gap and A_D's retain predictive built once."""

    config: KGAConfig
    forget: SequenceSet
    retain: SequenceSet
    reference: object
    forget_model: object
    unseen_model: object
    forget_aux_log_probs: torch.Tensor  # (n_f, T-1, V) A_f on D_f
    retain_ref_log_probs: torch.Tensor  # (n_r, T-1, V) A_D on D_r
    unseen_gap: torch.Tensor  # scalar dis_{D_n}(A_D, A_n)

    def value(self, model) -> torch.Tensor:
        total, _ = kga_loss(retain_kl_value(model, self.forget, self.forget_aux_log_probs), self.unseen_gap,
                            retain_kl_value(model, self.retain, self.retain_ref_log_probs), self.config.retain_weight)
        return total

    def step(self, model) -> ExactStep:
        with torch.no_grad():
            gap, gap_gradients = token_kl_step(model, self.forget, self.forget_aux_log_probs)
            retain, retain_gradients = token_kl_step(model, self.retain, self.retain_ref_log_probs,
                                                     self.config.retain_weight)
            sign = torch.sign(gap - self.unseen_gap)  # d|a - c|/da (0 at the kink, as autograd)
            gradients = tuple(sign * g + h for g, h in zip(gap_gradients, retain_gradients))
            return ExactStep((gap - self.unseen_gap).abs() + retain, gradients, model.response_logps(self.forget))

    def forget_gradient(self, model, component: str) -> tuple[torch.Tensor, ...]:
        """sign(gap difference) times the forget gap's gradient from component's sequences."""
        with torch.no_grad():
            rows = component_rows(self.forget, component)
            gap, gradients = token_kl_step(model, self.forget, self.forget_aux_log_probs, rows=rows)
            return tuple(torch.sign(gap - self.unseen_gap) * g for g in gradients)


def _auxiliary(config: KGAConfig, reference, data: SequenceSet):
    """A model trained on ``data``: the tabular MLE on it alone, or the reference fine-tuned on it."""
    if config.auxiliary_from == "scratch":
        return TabularMarkov.fit(data, smoothing=config.smoothing)
    return fine_tune(reference, data, config.auxiliary)


def build_exact(config: KGAConfig, reference, forget: SequenceSet, retain: SequenceSet | None,
                unseen: SequenceSet | None) -> ExactKGA:
    """Train A_f on ``forget`` and A_n on ``unseen`` (``config.auxiliary_from``); needs ``retain`` and ``unseen``."""
    for name, value in (("retain", retain), ("unseen", unseen)):
        if not isinstance(value, SequenceSet) or len(value) == 0:
            raise ValueError(f"KGA needs a non-empty {name} SequenceSet (D_r and D_n of the paper)")
    forget_model, unseen_model = (_auxiliary(config, reference, data) for data in (forget, unseen))
    with torch.no_grad():
        unseen_gap = retain_kl_value(reference, unseen, next_token_log_probs(unseen_model, unseen))
        return ExactKGA(config, forget, retain, reference, forget_model, unseen_model,
                        next_token_log_probs(forget_model, forget), next_token_log_probs(reference, retain),
                        unseen_gap)
