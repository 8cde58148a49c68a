"""Unlearning objectives: forget_weight * forget loss + retain_weight * retain term, and the paper's named ones.

The per-sequence losses themselves are in :mod:`markovsim.losses` (docs/theory.md, "Retain terms and
objectives"). ``OBJECTIVES`` maps the paper's method names (GA, NPO, SimNPO, with retain terms) to
:class:`Objective` values; :func:`get_objective` returns one with fields replaced.
"""

from __future__ import annotations

import dataclasses

import torch

from .losses import LOSSES, NEEDS_REFERENCE, RETAIN_TERMS, _sequence_kwargs, gradient_weights
from .tensor_checks import check_beta, check_number, check_tensor

__all__ = ["Objective", "OBJECTIVES", "get_objective"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """An unlearning objective: forget_weight * forget_loss + retain_weight * retain_term.

    Attributes:
        forget: a key of LOSSES.
        retain: a key of RETAIN_TERMS, or None for a forget-only objective.
        forget_weight, retain_weight: finite, >= 0 (open-unlearning's "gamma" / "alpha";
            the WMDP code's "gamma" is the retain weight).
        beta: inverse temperature of npo / simnpo / dpo, > 0.
        gamma: SimNPO's reward margin (= beta * delta of the official code / open-unlearning).
        alpha: WGA's weight exponent, >= 0.
    """

    forget: str
    retain: str | None = None
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    beta: float = 0.1
    gamma: float = 0.0
    alpha: float = 1.0

    def __post_init__(self):
        if not isinstance(self.forget, str) or self.forget not in LOSSES:
            raise ValueError(f"unknown forget loss {self.forget!r}; valid names: {sorted(LOSSES)}")
        if self.retain is not None and (not isinstance(self.retain, str) or self.retain not in RETAIN_TERMS):
            raise ValueError(
                f"unknown retain term {self.retain!r}; valid names: {sorted(RETAIN_TERMS)} or None"
            )
        for name in ("forget_weight", "retain_weight", "alpha"):
            check_number(name, getattr(self, name), nonnegative=True)
        check_beta(self.beta)
        check_number("gamma", self.gamma)

    @property
    def needs_reference(self) -> bool:
        """Whether the objective needs the reference model (a forget loss or retain term in NEEDS_REFERENCE)."""
        return self.forget in NEEDS_REFERENCE or self.retain in NEEDS_REFERENCE

    def forget_losses(
        self, logps: torch.Tensor, num_tokens: torch.Tensor, ref_logps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sequence forget losses (B,) for ga, ga_sum, npo (needs ref_logps) and simnpo."""
        available = dict(num_tokens=num_tokens, ref_logps=ref_logps, beta=self.beta, gamma=self.gamma)
        return LOSSES[self.forget](logps, **_sequence_kwargs(self.forget, available))

    def forget_weights(
        self, logps: torch.Tensor, num_tokens: torch.Tensor, ref_logps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Closed-form gradient weights (B,) of the forget loss (see ``gradient_weights``)."""
        return gradient_weights(
            self.forget, logps, num_tokens, ref_logps, beta=self.beta, gamma=self.gamma
        )

    def total(self, forget_loss_mean: torch.Tensor, retain_value: torch.Tensor | None = None) -> torch.Tensor:
        """forget_weight * forget_loss_mean + retain_weight * retain_value (retain iff self.retain)."""
        check_tensor("forget_loss_mean", forget_loss_mean)
        if self.retain is None:
            if retain_value is not None:
                raise ValueError("this objective has no retain term; pass retain_value=None")
            return self.forget_weight * forget_loss_mean
        if retain_value is None:
            raise ValueError(f"objective has retain term {self.retain!r}; pass its value as retain_value")
        check_tensor("retain_value", retain_value)
        return self.forget_weight * forget_loss_mean + self.retain_weight * retain_value


# Paper names. NPO: beta 0.1 (official configs). SimNPO: TOFU forget05 (beta 2.5, gamma 0); with a
# retain term the official forget05 weights (forget 0.1375, retain 1).
_SIMNPO = dict(beta=2.5, gamma=0.0)
_SIMNPO_RETAIN = dict(_SIMNPO, forget_weight=0.1375, retain_weight=1.0)
OBJECTIVES: dict[str, Objective] = {
    "GA": Objective("ga"),
    "GradDiff": Objective("ga", "nll"),
    "NPO": Objective("npo", beta=0.1),
    "NPO+RT": Objective("npo", "nll", beta=0.1),
    "NPO+KL": Objective("npo", "kl", beta=0.1),
    "SimNPO": Objective("simnpo", **_SIMNPO),
    "SimNPO+RT": Objective("simnpo", "nll", **_SIMNPO_RETAIN),
    "SimNPO+KL": Objective("simnpo", "kl", **_SIMNPO_RETAIN),
}


def get_objective(name: str, **overrides) -> Objective:
    """The named objective of OBJECTIVES with fields replaced, e.g. get_objective("NPO", beta=0.2)."""
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {list(OBJECTIVES)}")
    fields = {f.name for f in dataclasses.fields(Objective)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown Objective fields {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(OBJECTIVES[name], **overrides)
