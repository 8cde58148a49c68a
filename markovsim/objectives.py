"""Unlearning objectives: forget_weight * forget loss + retain_weight * retain term, and the paper's named ones.

The per-sequence losses themselves are in :mod:`markovsim.losses` (docs/theory.md, "Retain terms and
objectives"). ``OBJECTIVES`` maps the paper's method names (GA, NPO, SimNPO, with retain terms, and the
2x2 cells NPO-ave and SimNPO-sum) to :class:`Objective` values; :func:`get_objective` returns one with
fields replaced; :func:`ingredient_ladder` builds the 2x2 from one NPO and one SimNPO setting.
"""

from __future__ import annotations

import dataclasses

import torch

from .loss_weights import gradient_weights, sequence_kwargs
from .losses import LOSSES, NEEDS_REFERENCE, RETAIN_TERMS
from .tensor_checks import check_beta, check_finite_tensor, check_number

__all__ = ["Objective", "OBJECTIVES", "LADDER", "get_objective", "ingredient_ladder"]


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
        """Per-sequence forget losses (B,) of a sequence-level loss (npo and npo_ave need ref_logps)."""
        available = dict(num_tokens=num_tokens, ref_logps=ref_logps, beta=self.beta, gamma=self.gamma)
        return LOSSES[self.forget](logps, **sequence_kwargs(self.forget, available))

    def forget_weights(
        self, logps: torch.Tensor, num_tokens: torch.Tensor, ref_logps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Closed-form gradient weights (B,) of the forget loss (see ``gradient_weights``)."""
        return gradient_weights(
            self.forget, logps, num_tokens, ref_logps, beta=self.beta, gamma=self.gamma
        )

    def total(self, forget_loss_mean: torch.Tensor, retain_value: torch.Tensor | None = None) -> torch.Tensor:
        """forget_weight * forget_loss_mean + retain_weight * retain_value (retain iff self.retain); both finite
        tensors (ValueError naming the one with NaN/inf)."""
        check_finite_tensor("forget_loss_mean", forget_loss_mean)
        if self.retain is None:
            if retain_value is not None:
                raise ValueError("this objective has no retain term; pass retain_value=None")
            return self.forget_weight * forget_loss_mean
        if retain_value is None:
            raise ValueError(f"objective has retain term {self.retain!r}; pass its value as retain_value")
        check_finite_tensor("retain_value", retain_value)
        return self.forget_weight * forget_loss_mean + self.retain_weight * retain_value


# Paper names. NPO: beta 0.1 (official configs). SimNPO: TOFU forget05 (beta 2.5, gamma 0); with a
# retain term the official forget05 weights (forget 0.1375, retain 1).
# The two cells that separate SimNPO's changes (docs/theory.md, "Which ingredient"): NPO-ave is SimNPO's
# settings with the reference kept, SimNPO-sum is NPO's settings with the reference dropped, so each pair
# {NPO, SimNPO-sum} and {NPO-ave, SimNPO} differs in the reference alone.
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
    "NPO-ave": Objective("npo_ave", beta=2.5),
    "NPO-ave+RT": Objective("npo_ave", "nll", beta=2.5, forget_weight=0.1375, retain_weight=1.0),
    "SimNPO-sum": Objective("simnpo_sum", beta=0.1, gamma=0.0),
    "SimNPO-sum+RT": Objective("simnpo_sum", "nll", beta=0.1, gamma=0.0),
}

# The 2x2 of ingredients as method names, with GA as the baseline: (label, reference kept, length-normalised).
LADDER: tuple[tuple[str, bool | None, bool | None], ...] = (
    ("GA", None, None), ("NPO", True, False), ("SimNPO-sum", False, False), ("NPO-ave", True, True),
    ("SimNPO", False, True))


def ingredient_ladder(npo: Objective, simnpo: Objective, ga: Objective | None = None) -> dict[str, Objective]:
    """GA and the 2x2 {reference kept, dropped} x {summed, length-normalised}, from one NPO and one SimNPO setting.

    The summed cells take ``npo``'s beta, weights and retain term (SimNPO-sum adds ``simnpo``'s gamma); the
    length-normalised cells take ``simnpo``'s (NPO-ave drops the gamma): so NPO vs SimNPO-sum and NPO-ave vs
    SimNPO each differ in the reference alone, and NPO vs NPO-ave / SimNPO-sum vs SimNPO in the length
    normalisation (with the beta that goes with it: beta on the sequence scale for the summed cells, on the
    per-token scale for the normalised ones).

    Args:
        npo: an Objective with forget loss "npo"; simnpo: one with forget loss "simnpo"; ga: the baseline
            (default: GA with ``npo``'s retain term and weights).
    Returns: {"GA", "NPO", "SimNPO-sum", "NPO-ave", "SimNPO"} -> Objective, in :data:`LADDER` order.
    """
    for name, objective, forget in (("npo", npo, "npo"), ("simnpo", simnpo, "simnpo")):
        if not isinstance(objective, Objective) or objective.forget != forget:
            raise ValueError(f"{name} must be an Objective with forget loss {forget!r}, got {objective!r}")
    if ga is None:
        ga = dataclasses.replace(npo, forget="ga", beta=OBJECTIVES["GA"].beta)
    elif not isinstance(ga, Objective):
        raise TypeError(f"ga must be an Objective or None, got {type(ga).__name__}")
    return {"GA": ga, "NPO": npo, "SimNPO-sum": dataclasses.replace(npo, forget="simnpo_sum", gamma=simnpo.gamma),
            "NPO-ave": dataclasses.replace(simnpo, forget="npo_ave", gamma=0.0), "SimNPO": simnpo}


def get_objective(name: str, **overrides) -> Objective:
    """The named objective of OBJECTIVES with fields replaced, e.g. get_objective("NPO", beta=0.2)."""
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {list(OBJECTIVES)}")
    fields = {f.name for f in dataclasses.fields(Objective)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown Objective fields {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(OBJECTIVES[name], **overrides)
