"""Bootstrap intervals for the protocol's per-model numbers: every per-item metric, model utility, the
share of the forget-probability gap that unlearning closed, the membership-inference AUCs and PrivLeak.

All intervals are 95% percentile bootstraps over the evaluation items (:mod:`llm.tofu.metrics`:
B = 10,000 resamples, fixed seeds). Each evaluation set has its own resamples ``counts[set]`` (B, n_set),
drawn once and shared by every model, so a statistic that compares two models (the gap closed, PrivLeak)
is resampled *paired*: the same items for both. Per model and set s (n_s items, per-item values v_i):

    s/probability, s/rouge_l     mean_i v_i                            the per-item values of the eval stage
    s/truth_ratio                mean_i t_i, t_i = min(TR_i, 1/TR_i) on forget, max(0, 1 - TR_i) elsewhere
                                 (the TOFU aggregates are exactly these means)
    model_utility                harmonic mean of the 9 means of (probability, ROUGE-L, truth ratio) on
                                 retain, real_authors and world_facts, each recomputed per resample
    forget_gap_closed            (P_target - P_model) / (P_target - P_retain) of the mean forget
                                 probabilities: 0 = still the target, 1 = at the retain model (the model
                                 that never saw the forget set), above 1 = below it; paired over items
    mia_auc/<attack>             Mann-Whitney AUC of the forget scores against the holdout scores, forget
                                 and holdout pairs resampled independently (a stratified bootstrap; the
                                 member scores have their own resamples, ``counts["members"]``)
    privleak/<attack>            (AUC_retain - AUC) / (1 - AUC_retain) x 100 with both AUCs from the same
                                 resamples (NaN where a resample gives AUC_retain = 1)

Between two models, :func:`paired_differences` gives the difference of any of these statistics with the
interval of its paired resamples. Forget quality (a KS p-value over the whole forget set) has no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from llm.mia import ATTACKS

from .evaluate import EVAL_SETS
from .metrics import BOOTSTRAP_RESAMPLES, UTILITY_SETS, bootstrap_counts, forget_truth_ratio_scores, percentile_interval

__all__ = ["MEMBERS", "HOLDOUT", "PER_ITEM_METRICS", "item_values", "resample_counts", "resampled_means",
           "forget_gap_closed", "resampled_aucs", "resampled_statistics", "interval_or_none", "model_intervals",
           "paired_differences"]

MEMBERS, HOLDOUT = "members", "holdout"  # the membership-inference scores of the forget and holdout pairs
PER_ITEM_METRICS = ("probability", "rouge_l", "truth_ratio")
_STREAMS = {name: index for index, name in enumerate((*EVAL_SETS, MEMBERS, HOLDOUT))}  # one seed stream per set


def item_values(set_result: Mapping, kind: str) -> dict[str, np.ndarray]:
    """Per-item values (n,) of one evaluation set whose means are the set's three TOFU numbers.

    ``set_result``: an eval stage's ``result["sets"][kind]`` (``probability_per_item``,
    ``rouge_l_per_item``, ``truth_ratios``); ``kind``: the set's name (the truth-ratio score depends on it).
    """
    if kind not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {kind!r}; choose one of {', '.join(EVAL_SETS)}")
    missing = [k for k in ("probability_per_item", "rouge_l_per_item", "truth_ratios") if k not in set_result]
    if missing:
        raise ValueError(f"the {kind} result lacks its per-item values {missing}: evaluate the model again")
    ratios = np.asarray(set_result["truth_ratios"], dtype=np.float64)
    truth = forget_truth_ratio_scores(ratios) if kind == "forget" else np.maximum(0.0, 1.0 - ratios)
    values = {"probability": np.asarray(set_result["probability_per_item"], dtype=np.float64),
              "rouge_l": np.asarray(set_result["rouge_l_per_item"], dtype=np.float64), "truth_ratio": truth}
    if len({len(v) for v in values.values()}) != 1:
        raise ValueError(f"the {kind} result's per-item lists differ in length: "
                         f"{ {k: len(v) for k, v in values.items()} }")
    return values


def resample_counts(sizes: Mapping[str, int], num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) \
        -> dict[str, np.ndarray]:
    """``{set: (B, n_set) counts}``: each set's bootstrap resamples, seeded by (seed, the set's stream)."""
    unknown = sorted(set(sizes) - set(_STREAMS))
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose among {', '.join(_STREAMS)}")
    return {name: bootstrap_counts(int(n), num_resamples, seed=(seed, _STREAMS[name])) for name, n in sizes.items()}


def resampled_means(values, counts: np.ndarray) -> np.ndarray:
    """(B,) means of the per-item ``values`` (n,) under the resamples ``counts`` (B, n)."""
    values = np.asarray(values, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != len(values):
        raise ValueError(f"counts must be (B, {len(values)}), got shape {counts.shape}")
    return counts @ values / len(values)


def forget_gap_closed(model_probability: float, target_probability: float, retain_probability: float) -> float:
    """(P_target - P_model) / (P_target - P_retain): the share of the forget-probability gap closed; NaN if
    the target and the retain model tie."""
    gap = target_probability - retain_probability
    return math.nan if gap == 0 else (target_probability - model_probability) / gap


def _harmonic(means: np.ndarray) -> np.ndarray:
    """Row-wise harmonic mean of (B, k) non-negative values; 0 where any is 0."""
    with np.errstate(divide="ignore"):
        result = means.shape[1] / np.sum(1.0 / means, axis=1)
    return np.where(np.any(means <= 0, axis=1), 0.0, result)


def resampled_aucs(members, nonmembers, member_counts: np.ndarray, nonmember_counts: np.ndarray) -> np.ndarray:
    """(B,) Mann-Whitney AUCs (ties 1/2) of (n,) member against (m,) non-member scores under the resamples.

    AUC_b = c_b^T K d_b / (n m), K[i, j] = 1 if s_i > h_j, 1/2 if equal, 0 otherwise; c_b, d_b the counts.
    """
    members, nonmembers = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    comparison = (members[:, None] > nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
    return np.einsum("bm,bm->b", member_counts @ comparison, nonmember_counts) / (len(members) * len(nonmembers))


def interval_or_none(estimates: np.ndarray) -> list[float] | None:
    """[lo, hi] percentile interval of (B,) resampled estimates; None where any is NaN (undefined)."""
    low, high = percentile_interval(estimates)
    return None if math.isnan(low) else [low, high]


def _privleaks(aucs: np.ndarray, retain_aucs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(retain_aucs < 1, (retain_aucs - aucs) / (1.0 - retain_aucs) * 100.0, np.nan)


def resampled_statistics(evaluations: Mapping[str, Mapping], memberships: Mapping[str, Mapping] | None = None,
                         num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``{model: {key: (1 + B,) estimates}}``: row 0 the statistic of the sample itself, rows 1.. its B resamples.

    ``evaluations``: ``{model: eval-stage result}`` with ``"target"`` and ``"retain"`` among the models;
    ``memberships``: ``{model: {"forget": {attack: scores}, "holdout": {attack: scores}}}`` (optional).
    Keys: ``<set>/<metric>``, ``model_utility``, ``forget_gap_closed`` and, with ``memberships``,
    ``mia_auc/<attack>`` and ``privleak/<attack>`` (NaN where undefined). Every model uses the same resamples,
    so the difference of two models' rows is the paired bootstrap of their difference.
    """
    for name in ("target", "retain"):
        if name not in evaluations:
            raise ValueError(f"evaluations need the {name!r} model (the reference points of the gap)")
    values = {model: {kind: item_values(result["sets"][kind], kind) for kind in EVAL_SETS}
              for model, result in evaluations.items()}
    sizes = {kind: len(values["target"][kind]["probability"]) for kind in EVAL_SETS}
    for model, per_set in values.items():
        for kind, per_metric in per_set.items():
            if len(per_metric["probability"]) != sizes[kind]:
                raise ValueError(f"model {model!r} has {len(per_metric['probability'])} {kind} items, the target "
                                 f"{sizes[kind]}: every model must be evaluated on the same items")
    if memberships is not None:
        for side, name in (("forget", MEMBERS), ("holdout", HOLDOUT)):
            sizes[name] = len(next(iter(memberships["target"][side].values())))
    counts = {name: np.vstack([np.ones((1, c.shape[1]), dtype=c.dtype), c])  # row 0: every item once
              for name, c in resample_counts(sizes, num_resamples, seed).items()}
    out = {model: {f"{kind}/{metric}": resampled_means(v, counts[kind]) for kind, per_metric in per_set.items()
                   for metric, v in per_metric.items()} for model, per_set in values.items()}
    target, retain = out["target"]["forget/probability"], out["retain"]["forget/probability"]
    for model, statistics in out.items():
        utility = np.stack([statistics[f"{s}/{m}"] for s in UTILITY_SETS for m in PER_ITEM_METRICS], axis=1)
        statistics["model_utility"] = _harmonic(utility)
        with np.errstate(divide="ignore", invalid="ignore"):
            closed = (target - statistics["forget/probability"]) / (target - retain)
        statistics["forget_gap_closed"] = np.where(np.isfinite(closed), closed, np.nan)
    if memberships is not None:
        aucs = {model: {a: resampled_aucs(scores["forget"][a], scores["holdout"][a], counts[MEMBERS],
                                          counts[HOLDOUT]) for a in ATTACKS} for model, scores in memberships.items()}
        for model in out:
            for attack in ATTACKS:
                out[model][f"mia_auc/{attack}"] = aucs[model][attack]
                out[model][f"privleak/{attack}"] = _privleaks(aucs[model][attack], aucs["retain"][attack])
    return out


def model_intervals(evaluations: Mapping[str, Mapping], memberships: Mapping[str, Mapping] | None = None,
                    num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """``{model: {"forget_gap_closed": value, "intervals": {key: [lo, hi] or None}}}`` for every model, from
    :func:`resampled_statistics` (same arguments); an interval is None where a resample is undefined."""
    statistics = resampled_statistics(evaluations, memberships, num_resamples, seed)
    return {model: {"forget_gap_closed": float(rows["forget_gap_closed"][0]),
                    "intervals": {key: interval_or_none(estimates[1:]) for key, estimates in rows.items()}}
            for model, rows in statistics.items()}


def paired_differences(statistics: Mapping[str, Mapping[str, np.ndarray]], pairs, keys) -> dict[str, dict]:
    """``{"<b> - <a>": {key: {"difference": value, "interval": [lo, hi] or None}}}`` for each (a, b) of ``pairs``:
    the statistic of model b minus model a, its 95% interval from the paired resamples of
    :func:`resampled_statistics` (every model resampled on the same items)."""
    out = {}
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in statistics]
        if missing:
            raise ValueError(f"no statistics for model(s) {missing}; models: {list(statistics)}")
        differences = {key: statistics[b][key] - statistics[a][key] for key in keys}
        out[f"{b} - {a}"] = {key: {"difference": float(d[0]), "interval": interval_or_none(d[1:])}
                             for key, d in differences.items()}
    return out
