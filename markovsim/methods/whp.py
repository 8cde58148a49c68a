"""WHP, "Who's Harry Potter?" (Eldan & Russinovich 2023, Sec. 3, the generic-prediction equation;
docs/theory.md, "Other unlearning methods").

A *reinforced* model (the original further trained on the forget data) predicts with logits v_r; the
baseline (the original) with v_b. Tokens the reinforced model boosts are the ones the forget data made
likely, so the *generic* prediction pushes them down:

    v_g = v_b - alpha * ReLU(v_r - v_b)

and the model is fine-tuned on the forget texts towards the generic predictions: with ``target="soft"``
the loss is the token mean of KL(softmax(v_g) || pi_theta) (= cross-entropy to softmax(v_g) up to a
constant); with ``target="hard"`` the cross-entropy to the one-hot argmax of v_g (the paper's "generic
labels"; which of the two the paper trains on is our uncertain reading, so both are offered). The
anchored-term replacement step is text-specific and left to the TOFU side.

Logits are defined only up to a constant per position, and ReLU(v_r - v_b) is not invariant to it. On a
transformer v are the raw logits; in the simulator they are the exact models' next-token LOG-PROBABILITIES
(the normalised logits, the only canonical choice there). The paper's alpha is not restated here
(uncertain); the default 1 is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_real
from ..data import SequenceSet
from ..exact_gradients import next_token_log_probs, retain_kl_value
from ..tensor_checks import check_float
from .base import ExactStep, FineTuneConfig, check_choice
from .exact import component_rows, fine_tune, token_kl_step

__all__ = ["WHPConfig", "generic_logits", "generic_target_log_probs", "ExactWHP", "build_exact"]

TARGETS = ("soft", "hard")


@dataclass(frozen=True)
class WHPConfig:
    """WHP hyperparameters.

    Attributes:
        alpha: >= 0, how hard boosted tokens are pushed down (alpha = 0: the generic prediction is the baseline).
        target: "soft" (KL to softmax(v_g)) or "hard" (cross-entropy to argmax v_g).
        reinforce: how the reinforced model is trained on the forget data (simulator; on a transformer the
            same steps/learning rate/optimizer apply to its fine-tuning run).
    """

    alpha: float = 1.0
    target: str = "soft"
    reinforce: FineTuneConfig = FineTuneConfig()

    def __post_init__(self) -> None:
        check_real("alpha", self.alpha, minimum=0.0)
        check_choice("target", self.target, TARGETS)
        if not isinstance(self.reinforce, FineTuneConfig):
            raise TypeError(f"reinforce must be a FineTuneConfig, got {type(self.reinforce).__name__}")


def generic_logits(baseline_logits: torch.Tensor, reinforced_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """v_g = v_b - alpha * ReLU(v_r - v_b), elementwise; shapes (..., V) alike. Equal to v_b when v_r <= v_b."""
    check_float("baseline_logits", baseline_logits)
    check_float("reinforced_logits", reinforced_logits)
    if baseline_logits.shape != reinforced_logits.shape:
        raise ValueError(f"baseline_logits {tuple(baseline_logits.shape)} and reinforced_logits "
                         f"{tuple(reinforced_logits.shape)} must have the same shape (..., V)")
    alpha = check_real("alpha", alpha, minimum=0.0)
    return baseline_logits - alpha * torch.relu(reinforced_logits - baseline_logits)  # (..., V)


def generic_target_log_probs(baseline_logits: torch.Tensor, reinforced_logits: torch.Tensor, alpha: float,
                             target: str = "soft") -> torch.Tensor:
    """The training target's log-probabilities (..., V): log_softmax(v_g), or log of onehot(argmax v_g) (0 / -inf)."""
    check_choice("target", target, TARGETS)
    logits = generic_logits(baseline_logits, reinforced_logits, alpha)  # (..., V)
    if target == "soft":
        return torch.log_softmax(logits, dim=-1)
    onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)  # (..., V)
    return torch.log(onehot)  # 0 at the argmax, -inf elsewhere


@dataclass(frozen=True, eq=False)
class ExactWHP:
    """WHP on an exact model: the reinforced model and the generic targets on the forget set, built once.

    Objective: mean over all forget response tokens of KL(p_g(.|prefix) || pi_theta(.|prefix)).
    """

    config: WHPConfig
    forget: SequenceSet
    reference: object
    reinforced: object
    target_log_probs: torch.Tensor  # (n_f, T-1, V)

    retain = None

    def value(self, model) -> torch.Tensor:
        return retain_kl_value(model, self.forget, self.target_log_probs)

    def step(self, model) -> ExactStep:
        with torch.no_grad():
            value, gradients = token_kl_step(model, self.forget, self.target_log_probs)
            return ExactStep(value, gradients, model.response_logps(self.forget))

    def forget_gradient(self, model, component: str) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            rows = component_rows(self.forget, component)
            return token_kl_step(model, self.forget, self.target_log_probs, rows=rows)[1]


def build_exact(config: WHPConfig, reference, forget: SequenceSet, retain: SequenceSet | None = None,
                unseen: SequenceSet | None = None) -> ExactWHP:
    """Reinforce the reference on the forget set (:func:`~markovsim.methods.exact.fine_tune`), then the targets."""
    reinforced = fine_tune(reference, forget, config.reinforce)
    with torch.no_grad():
        mask = torch.as_tensor(forget.transition_mask)[..., None]  # (n_f, T-1, 1)
        baseline = next_token_log_probs(reference, forget)  # (n_f, T-1, V)
        boosted = next_token_log_probs(reinforced, forget)
        targets = generic_target_log_probs(baseline, boosted, config.alpha, config.target)
        targets = torch.where(mask, targets, 0.0)  # padding: any finite value (masked away)
    return ExactWHP(config, forget, reference, reinforced, targets)
