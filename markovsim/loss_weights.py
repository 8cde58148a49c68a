"""Closed-form gradient weights of the sequence-level losses of :mod:`markovsim.losses`.

For a sequence-level loss, d loss(y) / d theta = w(y) * d logp_theta(y) / d theta; :func:`gradient_weights`
gives w(y) (docs/theory.md, loss table), and ``sequence_kwargs`` picks the arguments each loss takes.
"""

from __future__ import annotations

from typing import Callable

import torch

from .losses import LOSSES, SEQUENCE_LOSSES
from .tensor_checks import check_beta, check_num_tokens, check_number, check_per_sequence

__all__ = ["gradient_weights", "sequence_kwargs"]


def _ga_weights(logps, num_tokens):
    return torch.ones_like(logps) / num_tokens  # (B,) 1/|y|


def _ga_sum_weights(logps):
    return torch.ones_like(logps)  # (B,) 1


def _npo_weights(logps, ref_logps, beta):
    return 2.0 * torch.sigmoid(beta * (logps - ref_logps))  # (B,)


def _simnpo_weights(logps, num_tokens, beta, gamma):
    return 2.0 * torch.sigmoid(beta * logps / num_tokens + gamma) / num_tokens  # (B,)


def _npo_ave_weights(logps, ref_logps, num_tokens, beta):
    return 2.0 * torch.sigmoid(beta * (logps - ref_logps) / num_tokens) / num_tokens  # (B,)


def _simnpo_sum_weights(logps, beta, gamma):
    return 2.0 * torch.sigmoid(beta * logps + gamma)  # (B,)


_WEIGHTS: dict[str, Callable[..., torch.Tensor]] = {
    "ga": _ga_weights,
    "ga_sum": _ga_sum_weights,
    "npo": _npo_weights,
    "simnpo": _simnpo_weights,
    "npo_ave": _npo_ave_weights,
    "simnpo_sum": _simnpo_sum_weights,
}

# The arguments (besides logps) each sequence-level loss and its weight take.
_SEQUENCE_ARGS: dict[str, tuple[str, ...]] = {
    "ga": ("num_tokens",),
    "ga_sum": (),
    "npo": ("ref_logps", "beta"),
    "simnpo": ("num_tokens", "beta", "gamma"),
    "npo_ave": ("ref_logps", "num_tokens", "beta"),
    "simnpo_sum": ("beta", "gamma"),
}


def sequence_kwargs(name: str, available: dict) -> dict:
    """The keyword arguments ``name`` needs, taken from ``available``; missing ones -> ValueError."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    if name not in SEQUENCE_LOSSES:
        raise ValueError(
            f"{name!r} is not a sequence-level-weight loss (dpo takes two responses per example; "
            f"wga weights each token); it is LLM-side only: call LOSSES[{name!r}] directly. "
            f"Sequence-level losses: {sorted(SEQUENCE_LOSSES)}"
        )
    missing = [arg for arg in _SEQUENCE_ARGS[name] if available.get(arg) is None]
    if missing:
        raise ValueError(f"loss {name!r} needs {missing}; pass them (got None)")
    return {arg: available[arg] for arg in _SEQUENCE_ARGS[name]}


def gradient_weights(
    name: str,
    logps: torch.Tensor,
    num_tokens: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float | None = None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Closed-form w(y) with d loss(y) / d theta = w(y) * d logp_theta(y) / d theta (docs/theory.md, loss table).

    ga: 1/|y|;  ga_sum: 1;  npo: 2 sigma(beta (logp_theta - logp_ref));
    simnpo: (2/|y|) sigma((beta/|y|) logp_theta + gamma);
    npo_ave: (2/|y|) sigma((beta/|y|) (logp_theta - logp_ref));  simnpo_sum: 2 sigma(beta logp_theta + gamma).
    dpo and wga have no sequence-level weight (ValueError).

    Args: name (a key of LOSSES); logps (B,); num_tokens (B,) for ga/simnpo/npo_ave; ref_logps (B,)
        for npo/npo_ave; beta for npo/simnpo/npo_ave/simnpo_sum; gamma for simnpo/simnpo_sum.
        Arguments a loss does not use are ignored.
    Returns: (B,) weights, detached from the graph.
    """
    kwargs = sequence_kwargs(
        name, dict(num_tokens=num_tokens, ref_logps=ref_logps, beta=beta, gamma=gamma)
    )
    check_per_sequence("logps", logps)
    if "num_tokens" in kwargs:
        check_num_tokens(num_tokens, logps)
    if "ref_logps" in kwargs:
        check_per_sequence("ref_logps", ref_logps, like=logps)
    if "beta" in kwargs:
        check_beta(beta)
    if "gamma" in kwargs:
        check_number("gamma", gamma)
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return _WEIGHTS[name](logps.detach(), **detached)
