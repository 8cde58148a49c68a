"""The protocol's bootstrap intervals against a brute-force reference: each resample expanded into its items
and the TOFU numbers recomputed with the metric functions themselves (``llm.tofu.metrics``, ``llm.mia``)."""

import numpy as np
import pytest

from llm import mia
from llm.tofu import metrics
from llm.tofu.evaluate import EVAL_SETS
from llm.tofu.result_intervals import (
    HOLDOUT,
    MEMBERS,
    forget_gap_closed,
    item_values,
    model_intervals,
    paired_differences,
    resample_counts,
    resampled_aucs,
    resampled_statistics,
)

SIZES = {"forget": 9, "retain": 6, "real_authors": 5, "world_facts": 4, MEMBERS: 20, HOLDOUT: 16}
MODELS = ("target", "retain", "npo")
RESAMPLES = 300


def fake_result(rng: np.random.Generator, shift: float) -> dict:
    """An eval-stage result with random per-item values (ties in ROUGE-L, truth ratios on both sides of 1)."""
    sets = {}
    for kind in EVAL_SETS:
        n = SIZES[kind]
        sets[kind] = {"probability_per_item": np.clip(rng.uniform(0.05, 0.9, n) - shift, 0.01, 1).tolist(),
                      "rouge_l_per_item": rng.choice([0.0, 0.25, 0.5, 1.0], n).tolist(),
                      "truth_ratios": np.exp(rng.normal(0, 0.8, n)).tolist()}
    return {"sets": sets}


def fake_scores(rng: np.random.Generator, shift: float) -> dict:
    forget = {a: np.round(rng.normal(shift, 1, SIZES[MEMBERS]), 1).tolist() for a in mia.ATTACKS}  # ties
    holdout = {a: np.round(rng.normal(0, 1, SIZES[HOLDOUT]), 1).tolist() for a in mia.ATTACKS}
    return {"forget": forget, "holdout": holdout}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    shifts = {"target": 0.0, "retain": 0.3, "npo": 0.15}
    evaluations = {m: fake_result(rng, shifts[m]) for m in MODELS}
    memberships = {m: fake_scores(rng, {"target": 2.0, "retain": 0.0, "npo": 1.0}[m]) for m in MODELS}
    return evaluations, memberships


def expand(values, counts_row):
    return np.repeat(np.asarray(values, dtype=np.float64), counts_row)


def brute_force(evaluations, memberships, counts):
    """Per model, key: the (B,) resampled statistics, each resample's items written out and scored with the
    metric functions (truth_ratio_aggregate, model_utility, mia.auc, mia.privleak)."""
    out = {m: {} for m in MODELS}
    for b in range(RESAMPLES):
        per_model_auc = {}
        for m in MODELS:
            per_set = {}
            for kind in EVAL_SETS:
                s, row = evaluations[m]["sets"][kind], counts[kind][b]
                per_set[kind] = {"probability": expand(s["probability_per_item"], row).mean(),
                                 "rouge_l": expand(s["rouge_l_per_item"], row).mean(),
                                 "truth_ratio": metrics.truth_ratio_aggregate(expand(s["truth_ratios"], row),
                                                                              forget=kind == "forget")}
                for metric, value in per_set[kind].items():
                    out[m].setdefault(f"{kind}/{metric}", []).append(value)
            out[m].setdefault("model_utility", []).append(metrics.model_utility(per_set))
            per_model_auc[m] = {a: mia.auc(expand(memberships[m]["forget"][a], counts[MEMBERS][b]),
                                           expand(memberships[m]["holdout"][a], counts[HOLDOUT][b]))
                                for a in mia.ATTACKS}
        for m in MODELS:
            p = {k: out[k]["forget/probability"][-1] for k in MODELS}
            out[m].setdefault("forget_gap_closed", []).append(forget_gap_closed(p[m], p["target"], p["retain"]))
            for a in mia.ATTACKS:
                out[m].setdefault(f"mia_auc/{a}", []).append(per_model_auc[m][a])
                retain_auc = per_model_auc["retain"][a]
                out[m].setdefault(f"privleak/{a}", []).append(
                    mia.privleak(per_model_auc[m][a], retain_auc) if retain_auc < 1 else np.nan)
    return out


def test_every_interval_matches_the_brute_force_bootstrap(data):
    evaluations, memberships = data
    got = model_intervals(evaluations, memberships, num_resamples=RESAMPLES, seed=5)
    counts = resample_counts(SIZES, RESAMPLES, seed=5)
    reference = brute_force(evaluations, memberships, counts)
    for m in MODELS:
        assert set(got[m]["intervals"]) == set(reference[m]), m
        for key, estimates in reference[m].items():
            expected = metrics.percentile_interval(estimates)
            assert not np.isnan(expected[0]), (m, key)  # the data keep every statistic defined
            assert got[m]["intervals"][key] == pytest.approx(list(expected), abs=1e-12), (m, key)


def test_paired_differences_match_the_brute_force_bootstrap_of_the_differences(data):
    evaluations, memberships = data
    statistics = resampled_statistics(evaluations, memberships, num_resamples=RESAMPLES, seed=5)
    keys = ["forget_gap_closed", "model_utility", "forget/truth_ratio", "mia_auc/zlib"]
    got = paired_differences(statistics, [("target", "npo"), ("npo", "retain")], keys)
    reference = brute_force(evaluations, memberships, resample_counts(SIZES, RESAMPLES, seed=5))
    rows = model_intervals(evaluations, memberships, num_resamples=RESAMPLES, seed=5)
    assert list(got) == ["npo - target", "retain - npo"]
    for a, b in (("target", "npo"), ("npo", "retain")):
        for key in keys:
            estimates = np.asarray(reference[b][key]) - np.asarray(reference[a][key])
            assert got[f"{b} - {a}"][key]["interval"] == pytest.approx(list(metrics.percentile_interval(estimates)),
                                                                       abs=1e-12), (a, b, key)
    # the point difference: the two samples' own statistics (row 0 of the resampled statistics)
    assert got["npo - target"]["forget_gap_closed"]["difference"] == pytest.approx(rows["npo"]["forget_gap_closed"])
    scores = {m: metrics.truth_ratio_aggregate(evaluations[m]["sets"]["forget"]["truth_ratios"], forget=True)
              for m in ("target", "npo")}
    assert got["npo - target"]["forget/truth_ratio"]["difference"] == pytest.approx(scores["npo"] - scores["target"])
    with pytest.raises(ValueError, match="no statistics"):
        paired_differences(statistics, [("npo", "simnpo")], keys)


def test_point_values_and_paired_identities(data):
    evaluations, memberships = data
    got = model_intervals(evaluations, memberships, num_resamples=RESAMPLES)
    p = {m: np.mean(evaluations[m]["sets"]["forget"]["probability_per_item"]) for m in MODELS}
    assert got["npo"]["forget_gap_closed"] == pytest.approx((p["target"] - p["npo"]) / (p["target"] - p["retain"]))
    # paired resampling: the target closes none of its own gap and the retain model all of it, on every resample
    assert got["target"]["intervals"]["forget_gap_closed"] == [0.0, 0.0]
    assert got["retain"]["intervals"]["forget_gap_closed"] == pytest.approx([1.0, 1.0], abs=1e-12)
    for attack in mia.ATTACKS:
        assert got["retain"]["intervals"][f"privleak/{attack}"] == [0.0, 0.0]
    # the interval of a mean holds the mean of the per-item values
    for m in MODELS:
        for kind in EVAL_SETS:
            for metric, values in item_values(evaluations[m]["sets"][kind], kind).items():
                low, high = got[m]["intervals"][f"{kind}/{metric}"]
                assert low <= values.mean() <= high, (m, kind, metric)


def test_constant_items_give_a_zero_width_interval_at_the_harmonic_mean():
    result = {"sets": {kind: {"probability_per_item": [0.5] * 3, "rouge_l_per_item": [0.25] * 3,
                              "truth_ratios": [0.5] * 3} for kind in EVAL_SETS}}
    got = model_intervals({"target": result, "retain": result}, num_resamples=50)
    # truth-ratio score off the forget set: max(0, 1 - 0.5) = 0.5; harmonic mean of (0.5, 0.25, 0.5) x 3 = 0.375
    assert got["target"]["intervals"]["retain/truth_ratio"] == [0.5, 0.5]
    assert got["target"]["intervals"]["model_utility"] == pytest.approx([0.375, 0.375], abs=1e-15)
    assert got["target"]["intervals"]["forget_gap_closed"] is None  # target and retain tie: undefined
    assert np.isnan(got["target"]["forget_gap_closed"])
    assert not any(key.startswith("mia_auc") for key in got["target"]["intervals"])  # no membership scores given


def test_resampled_aucs_with_all_ones_is_the_auc():
    members, nonmembers = [0.3, 0.1, 0.3, 0.9], [0.3, 0.0, 0.5]
    aucs = resampled_aucs(members, nonmembers, np.ones((1, 4)), np.ones((1, 3)))
    # pairs: 0.3 beats 0.0, ties 0.3, loses to 0.5 (x2 = 3); 0.1 beats 0.0 (1); 0.9 beats all (3): 7 / 12
    assert aucs[0] == pytest.approx(7 / 12) == mia.auc(members, nonmembers)


def test_same_seed_same_intervals_other_seed_other_intervals(data):
    evaluations, memberships = data
    a = model_intervals(evaluations, memberships, num_resamples=100, seed=1)
    b = model_intervals(evaluations, memberships, num_resamples=100, seed=1)
    c = model_intervals(evaluations, memberships, num_resamples=100, seed=2)
    assert a == b and a != c


def test_bad_inputs_name_the_problem(data):
    evaluations, _ = data
    with pytest.raises(ValueError, match="'retain'"):
        model_intervals({"target": evaluations["target"]})
    missing = {"sets": {k: dict(v) for k, v in evaluations["npo"]["sets"].items()}}
    del missing["sets"]["world_facts"]["rouge_l_per_item"]
    with pytest.raises(ValueError, match="world_facts.*rouge_l_per_item"):
        model_intervals({**evaluations, "npo": missing})
    short = {"sets": {k: dict(v) for k, v in evaluations["npo"]["sets"].items()}}
    short["sets"]["retain"] = {k: v[:-1] for k, v in short["sets"]["retain"].items()}
    with pytest.raises(ValueError, match="same items"):
        model_intervals({**evaluations, "npo": short})
    with pytest.raises(ValueError, match="unknown sets"):
        resample_counts({"paraphrase": 3})
    with pytest.raises(ValueError, match="unknown evaluation set"):
        item_values(evaluations["npo"]["sets"]["retain"], "holdout")
