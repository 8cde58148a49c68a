"""The TOFU metrics (Maini et al. 2024; open-unlearning's definitions), from per-item log-likelihoods.

Inputs are per-item answer log-likelihoods ``logps`` (summed over the answer tokens, EOS included)
and token counts ``num_tokens`` from :mod:`llm.tofu.scoring`; ``p = exp(logps / num_tokens)`` is the
length-normalised probability, i.e. exp(-mean NLL). Shapes: (N,) per item, (N, K) for K perturbed
answers per item. Ratios of probabilities are computed from the per-token mean log-likelihoods
(TOFU's own formula), never from exponentiated probabilities: a mean log-likelihood below about -745
underflows exp to 0, but a ratio of two such answers stays finite.

    probability         P_i = exp(logps_i / n_i)                                           (N,)
    truth ratio         TR_i = (prod_k P_pert[i, k])^(1/K) / P_ref_i                       (N,)
                             = exp(mean_k logps_pert[i, k] / n_pert[i, k] - logps_ref_i / n_ref_i)
                        P_ref = paraphrased answer (forget/retain) or true answer (real_authors/world_facts)
    TR aggregate        forget: mean(min(TR, 1/TR));  others: mean(max(0, 1 - TR))
    normalised prob.    P_true / (P_true + sum_k P_pert)           (real_authors, world_facts)
                        = 1 / (1 + sum_k exp(log P_pert[:, k] - log P_true))
    ROUGE-L recall      LCS(generation, answer) / |answer| (rouge_score, rougeL, Porter stemmer)
    forget quality      scipy.stats.ks_2samp(TR_unlearned, TR_retain_model).pvalue   over forget items
    model utility       harmonic mean of 9 numbers: (probability, ROUGE-L, TR aggregate) on retain,
                        real_authors, world_facts (probability normalised on the last two)

Intervals: the percentile bootstrap over items (Efron & Tibshirani 1993, ch. 13). A resample draws
n items with replacement; ``counts[b, i]`` says how often item i is drawn in resample b, so the
resampled mean of per-item values v is ``counts[b] @ v / n``; the 95% interval is the 2.5% and 97.5%
percentiles of the B resampled statistics (B = 10,000 and a fixed seed by default: reproducible).

    bootstrap_counts    (B, n) int, each row a multinomial(n, 1/n) draw
    bootstrap_interval  (lo, hi) of the mean of (N,) per-item values (a paired difference: pass the
                        per-item differences; every TOFU metric above except forget quality is such a mean)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from scipy.special import logsumexp

__all__ = ["UTILITY_SETS", "probability", "mean_logps", "log_truth_ratio", "truth_ratio", "truth_ratio_aggregate",
           "forget_truth_ratio_scores", "normalised_probability", "rouge_l_recall", "forget_quality", "harmonic_mean",
           "utility_components", "model_utility", "BOOTSTRAP_RESAMPLES", "CONFIDENCE", "bootstrap_counts",
           "percentile_interval", "bootstrap_interval"]

UTILITY_SETS = ("retain", "real_authors", "world_facts")
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


def mean_logps(logps, num_tokens) -> np.ndarray:
    """Per-token mean log-likelihood logps / n per item, (N,) or (N, K) like the inputs (= log :func:`probability`)."""
    logps, num_tokens = np.asarray(logps, dtype=np.float64), np.asarray(num_tokens, dtype=np.float64)
    if np.any(num_tokens <= 0):
        raise ValueError("every answer needs at least one scored token")
    return logps / num_tokens


def probability(logps, num_tokens) -> np.ndarray:
    """Length-normalised answer probability exp(logps / n) per item, (N,) or (N, K) like the inputs."""
    return np.exp(mean_logps(logps, num_tokens))


def log_truth_ratio(perturbed_logps, perturbed_tokens, reference_logps, reference_tokens) -> np.ndarray:
    """log TR_i = mean_k logps_pert[i, k] / n_pert[i, k] - logps_ref[i] / n_ref[i]; (N, K), (N,) -> (N,)."""
    log_pert = mean_logps(perturbed_logps, perturbed_tokens)  # (N, K)
    log_ref = mean_logps(reference_logps, reference_tokens)  # (N,)
    if log_pert.ndim != 2 or log_ref.shape != log_pert.shape[:1]:
        raise ValueError(f"perturbed must be (N, K) and reference (N,); got {log_pert.shape} and {log_ref.shape}")
    return log_pert.mean(axis=1) - log_ref


def truth_ratio(perturbed_logps, perturbed_tokens, reference_logps, reference_tokens) -> np.ndarray:
    """TR_i = geometric mean over k of P_pert[i, k], divided by P_ref[i]; (N, K), (N,) -> (N,).

    exp(:func:`log_truth_ratio`), as TOFU computes it: finite whenever |log TR| < ~709, however low the
    log-likelihoods themselves (0 or inf beyond that, where TOFU's exp overflows too).
    """
    with np.errstate(over="ignore"):
        return np.exp(log_truth_ratio(perturbed_logps, perturbed_tokens, reference_logps, reference_tokens))


def forget_truth_ratio_scores(ratios) -> np.ndarray:
    """min(TR_i, 1/TR_i) per item, (N,) -> (N,) in [0, 1]: the forget set's per-item truth-ratio score.

    TR = 0 or inf (an overflowed ratio) scores 0.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.minimum(ratios, 1.0 / ratios)


def truth_ratio_aggregate(ratios, forget: bool) -> float:
    """Forget set: mean(min(TR, 1/TR)) (1 = can't tell true from false); others: mean(max(0, 1 - TR))."""
    if forget:
        return float(np.mean(forget_truth_ratio_scores(ratios)))
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def normalised_probability(true_logps, true_tokens, perturbed_logps, perturbed_tokens) -> np.ndarray:
    """P_true / (P_true + sum_k P_pert[:, k]) per item, (N,) and (N, K) -> (N,), from log-probability gaps."""
    log_true = mean_logps(true_logps, true_tokens)  # (N,)
    log_pert = mean_logps(perturbed_logps, perturbed_tokens)  # (N, K)
    if log_pert.ndim != 2 or log_true.shape != log_pert.shape[:1]:
        raise ValueError(f"perturbed must be (N, K) and true (N,); got {log_pert.shape} and {log_true.shape}")
    # 1 / (1 + sum_k exp(gap_k)) = exp(-logsumexp([0, gap_1..K])): no 0/0 when every P underflows
    gaps = np.concatenate([np.zeros((len(log_true), 1)), log_pert - log_true[:, None]], axis=1)  # (N, K+1)
    return np.exp(-logsumexp(gaps, axis=1))


def rouge_l_recall(generations: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each generation against its answer (rouge_score, ``rougeL``, stemmer on), (N,)."""
    from rouge_score import rouge_scorer  # optional extra "tofu"

    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations for {len(answers)} answers")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(answer, generation)["rougeL"].recall  # score(target, prediction)
                     for generation, answer in zip(generations, answers)])


def forget_quality(unlearned_ratios, retain_model_ratios) -> float:
    """p-value of the two-sample KS test between the forget-set truth ratios of the two models."""
    return float(stats.ks_2samp(np.asarray(unlearned_ratios), np.asarray(retain_model_ratios)).pvalue)


def harmonic_mean(values) -> float:
    """n / sum(1 / v); 0 if any value is 0 (values must be >= 0)."""
    values = np.asarray(values, dtype=np.float64)
    if np.any(values < 0):
        raise ValueError(f"harmonic mean of negative values: {values}")
    if np.any(values == 0):
        return 0.0
    return float(len(values) / np.sum(1.0 / values))


def utility_components(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The 9 numbers of model utility, flat: ``{"retain/probability": ..., "world_facts/truth_ratio": ...}``.

    ``per_set[s]`` holds the set's ``probability`` (normalised for real_authors/world_facts),
    ``rouge_l`` and ``truth_ratio`` (the aggregate mean(max(0, 1 - TR))), for each s in UTILITY_SETS.
    """
    missing = [s for s in UTILITY_SETS if s not in per_set]
    if missing:
        raise ValueError(f"model utility needs the sets {', '.join(missing)}")
    return {f"{s}/{m}": float(per_set[s][m]) for s in UTILITY_SETS for m in ("probability", "rouge_l", "truth_ratio")}


def model_utility(per_set: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of the 9 :func:`utility_components`."""
    return harmonic_mean(list(utility_components(per_set).values()))


def bootstrap_counts(num_items: int, num_resamples: int = BOOTSTRAP_RESAMPLES, seed=0) -> np.ndarray:
    """(B, n) int64: how often each of n items is drawn in each of B resamples of n draws with replacement.

    ``seed``: an int or a sequence of ints (``numpy.random.default_rng``); the same seed, the same resamples.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"the bootstrap needs at least one item, got {num_items!r}")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, (int, np.integer)) or num_resamples < 1:
        raise ValueError(f"num_resamples must be an int >= 1, got {num_resamples!r}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_items, np.full(num_items, 1.0 / num_items), size=num_resamples)


def percentile_interval(estimates, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """((1 - confidence) / 2, (1 + confidence) / 2) percentiles of (B,) resampled estimates; NaN if any is NaN."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    estimates = np.asarray(estimates, dtype=np.float64)
    if estimates.size == 0 or np.isnan(estimates).any():
        return math.nan, math.nan
    low, high = np.quantile(estimates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_interval(values, num_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE, seed=0,
                       counts: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-item values (N,); NaN if any value is NaN.

    Resampled means are mean(v) + counts @ (v - mean(v)) / N, so a constant sample gives exactly
    (v, v). ``counts``: resamples to reuse, (B, N) from :func:`bootstrap_counts` (the same resamples for
    several statistics of the same items); otherwise drawn from ``num_resamples`` and ``seed``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be (N,), got shape {values.shape}")
    counts = bootstrap_counts(len(values), num_resamples, seed) if counts is None else np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(values):
        raise ValueError(f"counts must be (B, {len(values)}), got shape {counts.shape}")
    if np.isnan(values).any():
        return math.nan, math.nan
    centre = values.mean()
    return percentile_interval(centre + counts @ (values - centre) / len(values), confidence)
