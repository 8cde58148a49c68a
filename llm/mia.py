"""Membership inference from answer-token log-probabilities: LOSS, ZLib, Min-K%, Min-K%++, AUC, PrivLeak.

Each attack gives every item a score; **higher = more likely a member** (an item the model was
trained on). For one item with scored tokens t = 1..n (answer + EOS, the tokens the TOFU loss
labels), token log-probabilities ``l_t = log p(x_t | x_<t)``, and the model's own next-token
distribution ``p_v`` at each position:

    LOSS      s = (1/n) sum_t l_t                         = -mean NLL (Yeom et al. 2018)
    ZLib      s = (1/n) sum_t l_t / zlib(answer)          zlib = len(zlib.compress(answer.encode("utf-8")))
                                                          bytes: -loss / zlib entropy (Carlini et al. 2021)
    Min-K%    s = mean of the m lowest l_t over t = 1..n',  m = max(1, floor(k n')),  k = 0.4 (Shi et al. 2024)
    Min-K%++  z_t = (l_t - mu_t) / sigma_t,  mu_t = sum_v p_v log p_v,
              sigma_t = sqrt(max(var_t, VARIANCE_FLOOR)),  var_t = sum_v p_v (log p_v)^2 - mu_t^2;
              s = mean of the m lowest z_t over t = 1..n'   (Zhang et al. 2025)

Min-K% and Min-K%++ follow open-unlearning by default (:data:`MIN_K_CONVENTIONS`,
``"open-unlearning"``): they leave out each item's last scored token (its EOS: n' = n - 1; LOSS and
ZLib keep it, as there) and clamp the variance at 1e-6 (a point-mass prediction would divide by 0).
``"all-tokens"`` is this package's earlier convention (n' = n, sigma floored at 1e-12, i.e. the
variance at 1e-24); on memorised answers, whose EOS is near-certain (var_t ~ 0), the two differ.

Scores of the members (forget items) against the non-members (holdout items) give

    AUC       = U / (n_m n_n),  U = R_m - n_m (n_m + 1) / 2       (Mann-Whitney U)
              R_m = sum of the members' ranks in the pooled scores, ties given their mean rank, so
              AUC = P(s_member > s_nonmember) + 1/2 P(s_member = s_nonmember)
    PrivLeak  = (AUC_retain - AUC_unlearned) / (1 - AUC_retain) x 100     (MUSE, Shi et al. 2024;
              open-unlearning)

AUC 1: the attack tells members apart perfectly; 0.5: it cannot (a model that never saw either set);
below 0.5: the members look *less* familiar than unseen data. PrivLeak is MUSE's: MUSE and
open-unlearning orient the AUC the other way (AUC' = 1 - AUC, the forget set as the non-member-like
class) and report (AUC'_unlearned - AUC'_retain) / AUC'_retain x 100, which is the formula above.
Sign convention: 0 = the unlearned model leaks as much as the retain model (the gold standard,
trained without the forget set); **negative = under-unlearning** (forget items still recognisable;
a model that memorised them scores about -100); positive = over-unlearning (forget items stand out
by being too unfamiliar, itself a signal of membership).

Arrays: per-token values are padded (N, T) with a boolean mask (N, T) of the real tokens; scores (N,).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ATTACKS", "MIN_K_FRACTION", "VARIANCE_FLOOR", "MinKConvention", "MIN_K_CONVENTIONS",
           "next_token_statistics", "loss_score", "zlib_length", "zlib_score", "min_k_score", "min_k_plus_plus_score",
           "attack_scores", "auc", "attack_aucs", "privleak"]

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
MIN_K_FRACTION = 0.4
VARIANCE_FLOOR = 1e-6  # open-unlearning's clamp of Min-K%++'s variance


@dataclass(frozen=True)
class MinKConvention:
    """Which tokens Min-K% / Min-K%++ read and how Min-K%++ floors its variance.

    Attributes:
        drop_eos: leave out each item's last scored token (its EOS).
        variance_floor: sigma_t = sqrt(max(var_t, variance_floor)), > 0.
    """

    drop_eos: bool
    variance_floor: float


MIN_K_CONVENTIONS: dict[str, MinKConvention] = {
    "open-unlearning": MinKConvention(drop_eos=True, variance_floor=VARIANCE_FLOOR),  # the default
    "all-tokens": MinKConvention(drop_eos=False, variance_floor=1e-24),  # EOS kept, sigma floored at 1e-12
}


def next_token_statistics(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                          chunk_size: int = 256):
    """Per labelled token: log p of the label and mu / sigma of log p under the model's next-token distribution.

    HF shift convention (position j predicts ``labels[:, j + 1]``); computed in float64 on the labelled
    positions only:

        log_probs[b, j] = log_softmax(logits[b, j])                        (B, T-1, V)
        token_logps[b, j] = log_probs[b, j, labels[b, j + 1]]
        mu[b, j]    = sum_v exp(log_probs[b, j, v]) log_probs[b, j, v]
        sigma[b, j] = sqrt(max(0, sum_v exp(log_probs) log_probs^2 - mu^2))

    Args:
        logits: (B, T, V) from the model; labels: (B, T) int64, ``ignore_index`` where no token is scored.
        chunk_size: labelled positions per float64 log-softmax (memory: a few chunk_size x V float64 arrays).
    Returns:
        token_logps, mu, sigma (B, T-1) float64 (0 where unlabelled) and mask (B, T-1) bool.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != ignore_index  # (B, T-1)
    rows, picked_ids = logits[:, :-1][mask], targets[mask]  # (M, V), (M,): labelled positions only
    parts = []
    for start in range(0, len(rows), chunk_size):  # float64 (chunk, V) temporaries: bounded memory
        log_probs = torch.log_softmax(rows[start:start + chunk_size].double(), dim=-1)  # (m, V)
        probs = log_probs.exp()  # (m, V)
        mu = (probs * log_probs).sum(-1)  # (m,)
        sigma = ((probs * log_probs.square()).sum(-1) - mu.square()).clamp_min(0.0).sqrt()  # (m,)
        picked = log_probs.gather(-1, picked_ids[start:start + chunk_size, None]).squeeze(-1)  # (m,)
        parts.append(torch.stack([picked, mu, sigma]))  # (3, m)
    values = torch.cat(parts, dim=1) if parts else torch.zeros((3, 0), dtype=torch.float64)  # (3, M)
    out = [torch.zeros(mask.shape, dtype=torch.float64, device=logits.device) for _ in range(3)]
    for tensor, row in zip(out, values):
        tensor[mask] = row
    return out[0], out[1], out[2], mask


def _check_tokens(token_logps, mask) -> tuple[np.ndarray, np.ndarray]:
    """float64 (N, T) values and bool (N, T) mask, same shape, >= 1 token per row, finite where masked."""
    values, mask = np.asarray(token_logps, dtype=np.float64), np.asarray(mask)
    if values.ndim != 2 or mask.shape != values.shape:
        raise ValueError(f"token values must be (N, T) with a mask of the same shape; got {values.shape} and "
                         f"{mask.shape}")
    if mask.dtype != bool:
        raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
    if values.shape[0] == 0:
        raise ValueError("no items: token values are empty")
    if not mask.any(axis=1).all():
        raise ValueError(f"every item needs at least one token; rows {np.flatnonzero(~mask.any(axis=1)).tolist()} "
                         f"have none")
    if not np.isfinite(values[mask]).all():
        raise ValueError("token values hold NaN/inf at real (masked-in) tokens")
    return values, mask


def loss_score(token_logps, mask) -> np.ndarray:
    """LOSS: mean token log-probability (= -mean NLL) per item; (N, T), (N, T) -> (N,)."""
    values, mask = _check_tokens(token_logps, mask)
    return np.where(mask, values, 0.0).sum(axis=1) / mask.sum(axis=1)


def zlib_length(text: str) -> int:
    """Bytes of ``zlib.compress(text.encode("utf-8"))`` (level 6, the default)."""
    if not isinstance(text, str):
        raise TypeError(f"zlib_length needs a string, got {type(text).__name__}")
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(token_logps, mask, texts: Sequence[str]) -> np.ndarray:
    """ZLib: :func:`loss_score` / zlib-compressed byte length of each item's text; (N, T), (N, T), N texts -> (N,)."""
    scores = loss_score(token_logps, mask)
    if isinstance(texts, str) or len(texts) != len(scores):
        raise ValueError(f"texts must be a list of {len(scores)} strings (one per item), got "
                         f"{'a string' if isinstance(texts, str) else len(texts)}")
    return scores / np.array([zlib_length(text) for text in texts], dtype=np.float64)


def _without_eos(mask: np.ndarray) -> np.ndarray:
    """The mask without each row's last real token (the EOS); (N, T) -> (N, T). Rows need >= 2 tokens."""
    short = np.flatnonzero(mask.sum(axis=1) < 2)
    if short.size:
        raise ValueError(f"Min-K leaves out each item's last token (its EOS), so every item needs at least two "
                         f"tokens; rows {short.tolist()} have one (or use the 'all-tokens' convention)")
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # (N,): column of the last True
    kept = mask.copy()
    kept[np.arange(len(mask)), last] = False
    return kept


def min_k_score(token_values, mask, k: float = MIN_K_FRACTION, drop_eos: bool = True) -> np.ndarray:
    """Min-K%: mean of the m = max(1, floor(k n_i)) lowest values of each item's n_i tokens; (N, T) -> (N,).

    ``drop_eos`` (open-unlearning's default): the tokens are the real ones but each item's last (its EOS).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    values, mask = _check_tokens(token_values, mask)
    if drop_eos:
        mask = _without_eos(mask)
    ordered = np.sort(np.where(mask, values, np.inf), axis=1)  # (N, T): real tokens first, ascending
    kept = np.maximum(1, np.floor(k * mask.sum(axis=1)).astype(np.int64))  # (N,)
    return np.array([ordered[i, :m].mean() for i, m in enumerate(kept)])


def min_k_plus_plus_score(token_logps, mu, sigma, mask, k: float = MIN_K_FRACTION, drop_eos: bool = True,
                          variance_floor: float = VARIANCE_FLOOR) -> np.ndarray:
    """Min-K%++: :func:`min_k_score` of z = (log p - mu) / sqrt(max(sigma^2, variance_floor)); (N, T) x 4 -> (N,)."""
    values, mask = _check_tokens(token_logps, mask)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.shape != values.shape or sigma.shape != values.shape:
        raise ValueError(f"mu and sigma must have the shape of token_logps {values.shape}; got {mu.shape} and "
                         f"{sigma.shape}")
    if not (np.isfinite(mu[mask]).all() and np.isfinite(sigma[mask]).all()) or (sigma[mask] < 0).any():
        raise ValueError("mu and sigma must be finite (and sigma >= 0) at real tokens")
    if isinstance(variance_floor, bool) or not isinstance(variance_floor, (int, float)) \
            or not 0 < variance_floor < math.inf:
        raise ValueError(f"variance_floor must be a number > 0, got {variance_floor!r}")
    scale = np.maximum(sigma, math.sqrt(variance_floor))  # = sqrt(max(var, floor)): sigma = sqrt(max(var, 0))
    standardised = np.where(mask, (values - mu) / scale, 0.0)  # (N, T)
    return min_k_score(standardised, mask, k, drop_eos)


def attack_scores(token_logps, mu, sigma, mask, texts: Sequence[str], k: float = MIN_K_FRACTION,
                  convention: str = "open-unlearning") -> dict[str, np.ndarray]:
    """Every attack's per-item scores: ``{"loss": (N,), "zlib": (N,), "min_k": (N,), "min_k_plus_plus": (N,)}``.

    ``convention``: a key of :data:`MIN_K_CONVENTIONS` (Min-K% / Min-K%++ only; LOSS and ZLib read every token).
    """
    if convention not in MIN_K_CONVENTIONS:
        raise ValueError(f"unknown Min-K convention {convention!r}; choose one of {', '.join(MIN_K_CONVENTIONS)}")
    rule = MIN_K_CONVENTIONS[convention]
    return {"loss": loss_score(token_logps, mask), "zlib": zlib_score(token_logps, mask, texts),
            "min_k": min_k_score(token_logps, mask, k, rule.drop_eos),
            "min_k_plus_plus": min_k_plus_plus_score(token_logps, mu, sigma, mask, k, rule.drop_eos,
                                                     rule.variance_floor)}


def _scores(name: str, values) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list of scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} holds NaN/inf scores (positions {np.flatnonzero(~np.isfinite(scores)).tolist()})")
    return scores


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of members against non-members from the Mann-Whitney U statistic (ties count 1/2).

    AUC = (R_m - n_m (n_m + 1) / 2) / (n_m n_n), R_m = sum of the members' mid-ranks in the pooled sample.
    """
    from scipy.stats import rankdata

    members, nonmembers = _scores("member_scores", member_scores), _scores("nonmember_scores", nonmember_scores)
    ranks = rankdata(np.concatenate([members, nonmembers]))  # mid-ranks, 1-based
    n_m, n_n = len(members), len(nonmembers)
    u = ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0
    return float(u / (n_m * n_n))


def attack_aucs(member: dict, nonmember: dict) -> dict[str, float]:
    """:func:`auc` per attack of two ``{attack: scores}`` dicts (members: forget items; non-members: holdout)."""
    missing = [name for name in ATTACKS if name not in member or name not in nonmember]
    if missing:
        raise ValueError(f"scores of the attack(s) {', '.join(missing)} are missing")
    return {name: auc(member[name], nonmember[name]) for name in ATTACKS}


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """PrivLeak = (AUC_retain - AUC_unlearned) / (1 - AUC_retain) x 100 (percent; MUSE's sign convention).

    0 = as private as the retain model; negative = under-unlearned (about -100 for a model that
    memorised the forget set, against a retain model at 0.5); positive = over-unlearned. MUSE's AUC is
    1 - ours, so this is their (AUC'_unlearned - AUC'_retain) / AUC'_retain x 100. Undefined (ValueError)
    when AUC_retain = 1.
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retain", auc_retain)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value!r}")
    if auc_retain == 1:
        raise ValueError("auc_retain is 1: PrivLeak divides by 1 - auc_retain and is undefined")
    return (auc_retain - auc_unlearned) / (1.0 - auc_retain) * 100.0
