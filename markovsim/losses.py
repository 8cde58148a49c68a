"""Unlearning losses: the single implementation shared by the simulator and the LLM side.

Everything here is a pure torch function of per-sequence tensors (docs/theory.md, "Forget losses ..." and
"Retain terms and objectives"):

    logps       (B,)  sum of response-token log-probs, logp_theta(y|x)
    ref_logps   (B,)  the same under the reference model pi_ref (the model before unlearning)
    num_tokens  (B,)  |y|, the number of response tokens (> 0)

Each forget loss returns per-sequence losses (B,); a batch loss is their mean. Minimising a forget
loss lowers logps on forget data. Functions never change dtype or device: they compute in the
input dtype (float64 in the simulator, bf16/fp32 on GPU), following torch type promotion when
inputs differ (an integer ``num_tokens`` keeps the dtype of ``logps``).

For the sequence-level losses (ga, ga_sum, npo, simnpo, npo_ave, simnpo_sum) the gradient is a per-sequence weight
times the gradient of logps, d loss / d theta = w(y) * d logp_theta(y) / d theta, and
``markovsim.loss_weights.gradient_weights`` gives w in closed form. No model code here: ``llm`` imports this module.

Naming: ``gamma`` is always SimNPO's reward margin (SimNPO paper). The weights of the forget and
retain terms are ``forget_weight`` and ``retain_weight`` (open-unlearning calls the forget weight
"gamma" and the official WMDP code calls the retain weight "gamma"; we do not).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .tensor_checks import (
    check_beta,
    check_float,
    check_mask,
    check_nonempty,
    check_num_tokens,
    check_number,
    check_per_sequence,
    check_token_values,
)

__all__ = [
    "reduce_token_logps",
    "ga",
    "ga_sum",
    "npo",
    "simnpo",
    "npo_ave",
    "simnpo_sum",
    "dpo",
    "wga",
    "masked_ga",
    "nll",
    "kl",
    "LOSSES",
    "RETAIN_TERMS",
    "SEQUENCE_LOSSES",
    "NEEDS_REFERENCE",
    "USES_BETA",
    "USES_GAMMA",
    "USES_ALPHA",
    "INGREDIENTS",
]
# Objective, OBJECTIVES and get_objective live in markovsim.objectives; re-exported lazily (module __getattr__).


# --- Token log-probs -> per-sequence log-likelihood ------------------------------------------------------


def reduce_token_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence logps and response length from per-token logps (docs/theory.md, "Names").

    logps_b = sum_t mask_bt * token_logps_bt = logp_theta(y|x),  num_tokens_b = sum_t mask_bt = |y|.

    Args:
        token_logps: (B, T) float, log pi_theta(y_t | x, y_<t) at each position.
        mask: (B, T) bool or 0/1, True on response tokens. Padding (mask False) may hold any value,
            including -inf or NaN: it is selected away with ``torch.where``, so it reaches neither
            the result nor the gradient (which is exactly 0 there).

    Returns:
        logps (B,) and num_tokens (B,), both in the dtype of ``token_logps``. The count is exact
        in int64 before the cast (bf16 represents integers exactly only up to 256). A row with no
        response tokens gives logps 0 and num_tokens 0, which the losses reject.
    """
    mask = _check_token_batch(token_logps, mask, nonempty=False)
    logps = torch.where(mask, token_logps, 0.0).sum(-1)  # (B,)
    num_tokens = mask.sum(-1).to(token_logps.dtype)  # (B,)
    return logps, num_tokens


def _check_token_batch(token_logps: torch.Tensor, mask, nonempty: bool = True) -> torch.Tensor:
    """Check (B, T) float ``token_logps`` (finite on response tokens) and its mask; the mask as bool.

    ``nonempty``: every row needs at least one response token (the token-level losses divide by it).
    """
    check_float("token_logps", token_logps)
    if token_logps.ndim != 2:
        raise ValueError(f"token_logps must have shape (B, T), got {tuple(token_logps.shape)}")
    mask = check_mask(mask, token_logps.shape)
    check_token_values("token_logps", token_logps, mask, allow_neg_inf=False)
    if nonempty:
        check_nonempty(mask)
    return mask


# --- Forget losses, per sequence (B,) --------------------------------------------------------------------


def ga(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Gradient ascent, token mean (the usual implementation; docs/theory.md, loss table, row ``ga``).

    L_GA(y) = logp_theta(y) / |y|;  gradient weight w = 1/|y|.

    Args: logps (B,), num_tokens (B,) > 0.  Returns: (B,) per-sequence losses.
    """
    check_per_sequence("logps", logps)
    check_num_tokens(num_tokens, logps)
    return logps / num_tokens  # (B,)


def ga_sum(logps: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the summed log-likelihood (docs/theory.md, loss table, row ``ga_sum``).

    L(y) = logp_theta(y);  gradient weight w = 1.

    Args: logps (B,).  Returns: (B,) per-sequence losses.
    """
    check_per_sequence("logps", logps)
    return logps.clone()  # (B,) a new tensor, so callers may modify it in place


def npo(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization (NPO paper, Sec. 3, eq. for L_NPO,beta).

    L_NPO(y) = -(2/beta) log sigma( -beta (logp_theta(y) - logp_ref(y)) )
    gradient weight w = 2 sigma( beta (logp_theta - logp_ref) )
                      = 2 pi_theta^beta / (pi_theta^beta + pi_ref^beta),
    so w = 1 at theta = ref and 0 < w < 2. As beta -> 0, L - (2/beta) log 2 -> logp_theta - logp_ref (GA).

    Args:
        logps: (B,) sequence log-likelihood under pi_theta (summed over response tokens).
        ref_logps: (B,) the same under the reference model (no gradient needed).
        beta: inverse temperature > 0 (official configs: 0.1).

    Returns: (B,) per-sequence losses.
    """
    check_per_sequence("logps", logps)
    check_per_sequence("ref_logps", ref_logps, like=logps)
    beta = check_beta(beta)
    log_ratio = logps - ref_logps  # (B,)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)  # (B,)


def simnpo(logps: torch.Tensor, num_tokens: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """Simple NPO, reference-free and length-normalised (SimNPO paper, Sec. 4, eq. for L_SimNPO).

    L_SimNPO(y) = -(2/beta) log sigma( -(beta/|y|) logp_theta(y) - gamma )
    gradient weight w = (2/|y|) sigma( (beta/|y|) logp_theta(y) + gamma ), so 0 < |y| w < 2, and with
    gamma = 0, w -> 1/|y| (length-normalised GA) as beta -> 0.

    Mapping to other code: the official SimNPO code and open-unlearning write
    -(2/beta) log sigma( beta (NLL/|y| - delta) ) with NLL = -logp_theta(y); their margin ``delta``
    (called ``gamma`` in the official TOFU code) equals our ``gamma / beta``, i.e.
    gamma = beta * delta. Our ``gamma`` is the paper's reward margin (>= 0 in the paper; any finite
    value is accepted). It is NOT open-unlearning's ``gamma`` (the forget weight, our
    ``forget_weight``) nor the WMDP code's ``gamma`` (the retain weight, our ``retain_weight``).

    Args:
        logps: (B,) sequence log-likelihood under pi_theta.
        num_tokens: (B,) response lengths |y| > 0.
        beta: inverse temperature > 0 (TOFU forget05: 2.5; forget10: 4.5).
        gamma: reward margin (TOFU: 0).

    Returns: (B,) per-sequence losses.
    """
    check_per_sequence("logps", logps)
    check_num_tokens(num_tokens, logps)
    beta = check_beta(beta)
    gamma = check_number("gamma", gamma)
    margin = -beta * logps / num_tokens - gamma  # (B,) the reward -(beta/|y|) logp_theta - gamma
    return -(2.0 / beta) * F.logsigmoid(margin)  # (B,)


def npo_ave(logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO on the length-normalised log-ratio: the reference kept, the length normalisation added.

    L(y) = -(2/beta) log sigma( -(beta/|y|) (logp_theta(y) - logp_ref(y)) )
    gradient weight w = (2/|y|) sigma( (beta/|y|) (logp_theta - logp_ref) ), so w = 1/|y| at theta = ref,
    0 < |y| w < 2, and w -> 1/|y| (length-normalised GA) as beta -> 0. With |y| = 1 it is ``npo``.

    The official SimNPO code carries it commented out as ``NPO_AVE``. With ``npo``, ``simnpo`` and
    ``simnpo_sum`` it completes a 2x2 {reference, no reference} x {summed, length-normalised}
    (docs/theory.md, "Which ingredient: the 2x2 of NPO and SimNPO").

    Args:
        logps: (B,) sequence log-likelihood under pi_theta.
        ref_logps: (B,) the same under the reference model.
        num_tokens: (B,) response lengths |y| > 0.
        beta: inverse temperature > 0 (on the per-token scale, like SimNPO's).

    Returns: (B,) per-sequence losses.
    """
    check_per_sequence("logps", logps)
    check_per_sequence("ref_logps", ref_logps, like=logps)
    check_num_tokens(num_tokens, logps)
    beta = check_beta(beta)
    mean_log_ratio = (logps - ref_logps) / num_tokens  # (B,)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_log_ratio)  # (B,)


def simnpo_sum(logps: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO without the length normalisation: no reference, summed log-likelihood, margin gamma.

    L(y) = -(2/beta) log sigma( -beta logp_theta(y) - gamma )
    gradient weight w = 2 sigma( beta logp_theta(y) + gamma ), so 0 < w < 2, and with gamma = 0,
    w -> 1 (GA on the summed log-likelihood, ``ga_sum``) as beta -> 0. It is ``npo`` with the
    reference replaced by the constant logp_ref = -gamma/beta, and ``simnpo`` with |y| = 1.

    Args:
        logps: (B,) sequence log-likelihood under pi_theta.
        beta: inverse temperature > 0 (on the sequence scale, like NPO's).
        gamma: reward margin (any finite value).

    Returns: (B,) per-sequence losses.
    """
    check_per_sequence("logps", logps)
    beta = check_beta(beta)
    gamma = check_number("gamma", gamma)
    return -(2.0 / beta) * F.logsigmoid(-beta * logps - gamma)  # (B,)


def dpo(
    logps_w: torch.Tensor,
    ref_logps_w: torch.Tensor,
    logps_l: torch.Tensor,
    ref_logps_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO for unlearning: a refusal as the preferred answer y_w, the forget answer as y_l.

    L_DPO = -(2/beta) log sigma( beta [ (logp_theta(y_w) - logp_ref(y_w))
                                       - (logp_theta(y_l) - logp_ref(y_l)) ] )
    (DPO paper eq. 7, scaled by 2 as in the NPO paper). Not a sequence-level-weight loss (it has two
    responses per example); used on the LLM side only.

    Args: logps_w, ref_logps_w, logps_l, ref_logps_l: (B,) each; beta > 0.
    Returns: (B,) per-example losses.
    """
    check_per_sequence("logps_w", logps_w)
    for name, x in (("ref_logps_w", ref_logps_w), ("logps_l", logps_l), ("ref_logps_l", ref_logps_l)):
        check_per_sequence(name, x, like=logps_w)
    beta = check_beta(beta)
    margin = (logps_w - ref_logps_w) - (logps_l - ref_logps_l)  # (B,)
    return -(2.0 / beta) * F.logsigmoid(beta * margin)  # (B,)


def wga(token_logps: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Weighted gradient ascent (WGA; Wang et al. 2025, "Rethinking LLM Unlearning Objectives").

    L_WGA(y) = (1/|y|) sum_t sg(p_t^alpha) log p_t,  p_t = pi_theta(y_t | x, y_<t),
    sg = stop-gradient (the weights exp(alpha * token_logps) are detached). Token-level, so it has
    no sequence-level weight: d L / d token_logps_t = p_t^alpha / |y| on response tokens, 0 on padding.

    Args:
        token_logps: (B, T) float log p_t; padding (mask False) may hold any value.
        mask: (B, T) bool or 0/1, True on response tokens; every row needs at least one.
        alpha: weight exponent >= 0 (alpha = 0 is token-mean GA).

    Returns: (B,) per-sequence losses.
    """
    mask = _check_token_batch(token_logps, mask)
    alpha = check_number("alpha", alpha, nonnegative=True)
    kept = torch.where(mask, token_logps, 0.0)  # (B, T), padding -> 0
    weights = torch.exp(alpha * kept).detach()  # (B, T) sg(p_t^alpha); 1 on padding, times 0 below
    num_tokens = mask.sum(-1)  # (B,) int64
    return (weights * kept).sum(-1) / num_tokens  # (B,)


def masked_ga(token_logps: torch.Tensor, mask: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Token-level gradient ascent on a subset of the response tokens (SeUL's forget term; docs/theory.md,
    "Other unlearning methods").

    L(y) = (1/|S_y|) sum_{t in S_y} log p_t,  S_y = {t : mask_t and selected_t},  p_t = pi_theta(y_t | x, y_<t);
    L(y) = 0 for a row with no selected token (it contributes no gradient). With ``selected`` all true this is
    ``ga`` (logps / |y|) exactly. d L / d token_logps_t = 1/|S_y| on selected tokens, 0 elsewhere.

    Args:
        token_logps: (B, T) float log p_t; padding (mask False) may hold any value.
        mask: (B, T) bool or 0/1, True on response tokens; every row needs at least one.
        selected: (B, T) bool or 0/1, True on the tokens to unlearn (SeUL's sensitive spans); only its
            intersection with ``mask`` counts.

    Returns: (B,) per-sequence losses.
    """
    mask = _check_token_batch(token_logps, mask)
    if not isinstance(selected, torch.Tensor) or selected.shape != token_logps.shape:
        got = tuple(selected.shape) if isinstance(selected, torch.Tensor) else type(selected).__name__
        raise ValueError(f"selected must be a (B, T) tensor shaped like token_logps "
                         f"{tuple(token_logps.shape)}, got {got}")
    selected = check_mask(selected, token_logps.shape) & mask  # (B, T)
    kept = torch.where(selected, token_logps, 0.0)  # (B, T)
    count = selected.sum(-1)  # (B,) int64 |S_y|
    return kept.sum(-1) / count.clamp_min(1)  # (B,), 0 where nothing is selected


# --- Retain terms, per sequence (B,) ---------------------------------------------------------------------


def nll(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Retain negative log-likelihood, token mean (docs/theory.md, "Retain terms and objectives", nll_retain).

    nll(y) = -logp_theta(y) / |y|.

    Args: logps (B,), num_tokens (B,) > 0.  Returns: (B,) per-sequence values.
    """
    check_per_sequence("logps", logps)
    check_num_tokens(num_tokens, logps)
    return -logps / num_tokens  # (B,)


def kl(ref_log_probs: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain KL to the reference, per-sequence mean over response tokens (docs/theory.md, "Retain terms and
    objectives").

    kl(y) = (1/|y|) sum_{t in response} KL( pi_ref(.|ctx_t) || pi_theta(.|ctx_t) ),
    KL(p || q) = sum_v p_v (log p_v - log q_v), with 0 log 0 = 0: vocabulary entries where the
    reference probability is 0 (ref log-prob -inf, or exp underflows) contribute exactly 0. If
    pi_theta gives probability 0 where pi_ref does not, the KL is +inf (the true value).

    The batch mean of these per-sequence means equals docs/theory.md's token mean over all retain
    tokens only when all sequences have the same length.

    Args:
        ref_log_probs: (B, T, V) reference log-probabilities over the vocabulary (may hold -inf).
        log_probs: (B, T, V) current model log-probabilities (e.g. log_softmax of the logits).
        mask: (B, T) bool or 0/1, True on response tokens; padding may hold any value.

    Returns: (B,) per-sequence mean token KL.
    """
    check_float("ref_log_probs", ref_log_probs)
    check_float("log_probs", log_probs)
    if ref_log_probs.ndim != 3 or log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"ref_log_probs and log_probs must both have shape (B, T, V), got "
            f"{tuple(ref_log_probs.shape)} and {tuple(log_probs.shape)}"
        )
    mask = check_mask(mask, ref_log_probs.shape[:2])
    check_token_values("ref_log_probs", ref_log_probs, mask, allow_neg_inf=True)
    check_token_values("log_probs", log_probs, mask, allow_neg_inf=True)
    check_nonempty(mask)
    ref_probs = ref_log_probs.exp()  # (B, T, V)
    keep = mask[..., None] & (ref_probs > 0)  # (B, T, V) response tokens x reference support
    ref_probs = torch.where(keep, ref_probs, 0.0)  # (B, T, V)
    log_ratio = torch.where(keep, ref_log_probs - log_probs, 0.0)  # (B, T, V)
    token_kl = (ref_probs * log_ratio).sum(-1)  # (B, T), 0 on padding
    return token_kl.sum(-1) / mask.sum(-1)  # (B,)


# --- Registries ------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ga": ga,
    "ga_sum": ga_sum,
    "npo": npo,
    "simnpo": simnpo,
    "npo_ave": npo_ave,
    "simnpo_sum": simnpo_sum,
    "dpo": dpo,
    "wga": wga,
}

RETAIN_TERMS: dict[str, Callable[..., torch.Tensor]] = {"nll": nll, "kl": kl}

# Loss traits, the one place that says which loss (a name of LOSSES or RETAIN_TERMS) has which property;
# tests/test_losses.py checks each against the functions' behaviour.
# SEQUENCE_LOSSES: gradient = a per-sequence weight w(y) times d logp(y) (``gradient_weights`` takes exactly
#   these; dpo has two responses, wga a weight per token). NEEDS_REFERENCE: needs pi_ref (its logps, or for
#   kl its next-token log_probs). USES_BETA / USES_GAMMA / USES_ALPHA: takes that hyperparameter.
SEQUENCE_LOSSES: frozenset[str] = frozenset({"ga", "ga_sum", "npo", "simnpo", "npo_ave", "simnpo_sum"})
NEEDS_REFERENCE: frozenset[str] = frozenset({"npo", "npo_ave", "dpo", "kl"})
USES_BETA: frozenset[str] = frozenset({"npo", "simnpo", "npo_ave", "simnpo_sum", "dpo"})
USES_GAMMA: frozenset[str] = frozenset({"simnpo", "simnpo_sum"})
# The 2x2 that separates SimNPO's two changes to NPO: (uses the reference, length-normalised) -> loss.
INGREDIENTS: dict[tuple[bool, bool], str] = {
    (True, False): "npo", (True, True): "npo_ave", (False, False): "simnpo_sum", (False, True): "simnpo"}
USES_ALPHA: frozenset[str] = frozenset({"wga"})


_MOVED_TO_OBJECTIVES = ("Objective", "OBJECTIVES", "get_objective")


def __getattr__(name: str):
    """Backwards-compatible re-export of the objective API, now in :mod:`markovsim.objectives`.

    Lazy (PEP 562) because ``markovsim.objectives`` imports this module.
    """
    if name in _MOVED_TO_OBJECTIVES:
        from . import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
