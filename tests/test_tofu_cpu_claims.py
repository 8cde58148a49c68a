"""The sentences of docs/tofu.md ("The CPU protocol's results"), README and docs/results.md about the committed
CPU protocol run (docs/results/tofu-cpu/results.json: ``make tofu-figures``, ``--preset cpu``, SmolLM2-135M,
forget01, one seed), each checked against that file. A rerun that changes a verdict fails here."""

from __future__ import annotations

import os

import pytest

from llm.tofu.protocol_config import DEFAULT_METHODS, PRESETS
from markovsim.results import read_json

RUN = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "results", "tofu-cpu", "results.json")
METHODS = {"GradDiff": "graddiff", "NPO+RT": "npo-rt", "SimNPO+RT": "simnpo-rt"}


@pytest.fixture(scope="module")
def run():
    return read_json(RUN)


def row(run, name):
    return run["models"][METHODS.get(name, name)]


def interval(run, name, key):
    return row(run, name)["intervals"][key]


def difference(run, pair, key):
    entry = run["differences"][pair][key]
    return entry["difference"], entry["interval"]


def test_the_committed_run_is_the_cpu_preset_with_the_default_methods(run):
    config = run["config"]
    for field, value in PRESETS["cpu"].items():
        assert config[field] == (list(value) if isinstance(value, tuple) else value), field
    assert tuple(config["methods"]) == DEFAULT_METHODS and config["seed"] == 0 and config["model"] == "smollm2"
    assert [row(run, m)["method"] for m in METHODS] == list(METHODS)


def test_every_method_closes_at_least_half_of_the_forget_probability_gap(run):
    """The CPU protocol's bar: the forget probability falls at least halfway from the target's to the retain
    model's, for every default method (and the whole interval above one half)."""
    for method in METHODS:
        assert row(run, method)["forget_gap_closed"] >= 0.5, method
        assert interval(run, method, "forget_gap_closed")[0] > 0.5, method


def test_npo_rt_and_graddiff_go_past_the_retain_model_simnpo_rt_stops_short(run):
    assert interval(run, "GradDiff", "forget_gap_closed")[0] > 1.2
    assert interval(run, "NPO+RT", "forget_gap_closed")[0] > 1.0
    low, high = interval(run, "SimNPO+RT", "forget_gap_closed")
    assert 0.5 < low and high < 0.75
    value, (low, high) = difference(run, "SimNPO+RT - NPO+RT", "forget_gap_closed")
    assert high < -0.4 and value == pytest.approx(-0.497, abs=0.0005)


def test_membership_inference_npo_rt_at_the_retain_model_simnpo_rt_recognised_graddiff_over_unlearned(run):
    retain_auc = row(run, "retain")["mia_auc/loss"]
    low, high = interval(run, "NPO+RT", "mia_auc/loss")
    assert low < retain_auc < high and low < 0.5 < high  # indistinguishable from the retain model and from chance
    assert interval(run, "SimNPO+RT", "mia_auc/loss")[0] > 0.9  # still recognised
    assert interval(run, "target", "mia_auc/loss")[0] > 0.95
    assert interval(run, "GradDiff", "mia_auc/loss")[1] < 0.25  # the forget pairs look less familiar than unseen
    low, high = interval(run, "NPO+RT", "privleak/loss")
    assert low < 0 < high
    assert interval(run, "SimNPO+RT", "privleak/loss")[1] < -80 and interval(run, "GradDiff", "privleak/loss")[0] > 40


def test_forget_quality_ordering_and_simnpo_rt_below_the_target(run):
    quality = {m: row(run, m)["forget_quality"] for m in (*METHODS, "target")}
    assert quality["GradDiff"] > quality["NPO+RT"] > quality["target"] > quality["SimNPO+RT"]
    assert quality["GradDiff"] < 0.2 and quality["NPO+RT"] < 0.05 and quality["SimNPO+RT"] < 0.001


def test_model_utility_does_not_separate_the_methods(run):
    for pair in run["differences"]:
        low, high = difference(run, pair, "model_utility")[1]
        assert low < 0 < high, pair


def test_the_retain_term_memorises_the_retain_pairs_it_trains_on(run):
    """At this scale the retain term trains on the 20 retain pairs that are also the retain evaluation items."""
    assert interval(run, "SimNPO+RT", "retain/probability")[0] > 0.95
    assert interval(run, "SimNPO+RT", "retain/probability")[0] > interval(run, "target", "retain/probability")[1]
    assert interval(run, "NPO+RT", "retain/probability")[1] < 0.6


def test_relearning_brings_back_more_than_a_model_learning_fresh_after_npo_rt_and_simnpo_rt(run):
    curves = run["relearning"]
    assert curves["retain"]["steps"] == [0, 10]
    for method in ("NPO+RT", "SimNPO+RT"):
        assert curves[method]["beyond_fresh_interval"]["forget_probability"][1][0] > 0.05, method
    assert curves["SimNPO+RT"]["recovery"]["forget_probability"][1] > curves["NPO+RT"]["recovery"][
        "forget_probability"][1]
    low, high = curves["GradDiff"]["beyond_fresh_interval"]["forget_probability"][1]
    assert low < 0 < high  # GradDiff's probability stays near 0 ...
    assert curves["GradDiff"]["beyond_fresh_interval"]["forget_rouge_l"][1][0] > 0  # ... its ROUGE-L returns
    low, high = curves["retain"]["recovery_interval"]["forget_probability"][1]
    assert 0 < low and high < 0.02  # learning fresh: the retain model gains little in 10 steps


TABLE_KEYS = ("forget_gap_closed", "forget/probability", "forget/rouge_l", "forget_quality", "model_utility",
              "mia_auc/loss", "privleak/loss")


def _numbers(cell: str) -> list[str]:
    import re

    return re.findall(r"[-+]?\d+(?:\.\d+)?", cell)


def _matches(printed: str, value: float) -> bool:
    """``printed`` is ``value`` rounded to the printed digits (half a unit of the last digit)."""
    digits = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10 ** -digits + 1e-12


ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
README_KEYS = ("forget_gap_closed", "forget_quality", "model_utility", "mia_auc/loss")
TABLES = [("docs/tofu.md", "| model | forget gap closed | forget prob |", TABLE_KEYS),
          ("benchmarks/RESULTS.md", "| model | forget gap closed | forget prob |", TABLE_KEYS),
          ("README.md", "| model | forget gap closed | forget quality |", README_KEYS)]


@pytest.mark.parametrize("path, header, keys", TABLES, ids=[t[0] for t in TABLES])
def test_each_results_table_prints_the_committed_numbers_and_intervals(run, path, header, keys):
    lines = open(os.path.join(ROOT, path)).read().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(header)))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    assert [r.split("|")[1].strip() for r in rows] == ["target", "retain", *METHODS]
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        entry = row(run, cells[0])
        for key, cell in zip(keys, cells[1:], strict=True):
            printed = _numbers(cell)
            assert _matches(printed[0], entry[key]), (path, cells[0], key, cell)
            if len(printed) == 3:  # value [low, high]
                low, high = entry["intervals"][key]
                assert _matches(printed[1], low) and _matches(printed[2], high), (path, cells[0], key, cell)


BIAS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "results", "tofu-cpu", "bias", "results.json")
SHORT, MEDIUM, LONG = LOW, MID, HIGH = 0, 1, 2  # group order of llm.tofu.bias: short / low first


@pytest.fixture(scope="module")
def bias():
    return read_json(BIAS)


def share(bias, method, grouping, record, group):
    diagnostics = bias["methods"][method]["diagnostics"][grouping]
    return diagnostics["power_share"][record][group], diagnostics["power_share_interval"][record][group]


def weight(bias, method, grouping, record, group):
    diagnostics = bias["methods"][method]["diagnostics"][grouping]
    return diagnostics["mean_weight"][record][group], diagnostics["mean_weight_interval"][record][group]


def separate(a, b) -> bool:
    """Interval a lies wholly above interval b."""
    return a[1][0] > b[1][1]


def test_the_bias_run_is_the_documented_one(bias):
    config = bias["config"]
    assert (config["methods"], config["steps"], config["record_every"], config["batch_size"],
            config["learning_rate"], config["max_items"]) == (["NPO", "SimNPO"], 10, 5, 8, 5e-5, None)
    assert bias["methods"]["NPO"]["steps"] == [0, 5, 10] and bias["num_items"] == 40


def test_npo_first_step_power_goes_to_long_and_poorly_learned_answers(bias):
    assert separate(share(bias, "NPO", "length", 0, LONG), share(bias, "NPO", "length", 0, SHORT))
    assert separate(share(bias, "NPO", "memorisation", 0, LOW), share(bias, "NPO", "memorisation", 0, HIGH))
    assert round(share(bias, "NPO", "length", 0, LONG)[0], 2) == 0.45
    assert round(share(bias, "NPO", "memorisation", 0, LOW)[0], 2) == 0.47


def test_simnpo_puts_less_power_on_long_answers_than_npo_but_no_ordering_within(bias):
    assert separate(share(bias, "NPO", "length", 0, LONG), share(bias, "SimNPO", "length", 0, LONG))
    short, long = share(bias, "SimNPO", "length", 0, SHORT), share(bias, "SimNPO", "length", 0, LONG)
    assert short[0] > long[0] and not separate(short, long)


def test_npo_weight_decays_where_it_pushed_and_its_power_swings(bias):
    assert separate(weight(bias, "NPO", "memorisation", 2, HIGH), weight(bias, "NPO", "memorisation", 2, LOW))
    short, long = weight(bias, "NPO", "length", 2, SHORT), weight(bias, "NPO", "length", 2, LONG)
    assert short[0] > long[0] and not separate(short, long)  # overlapping
    assert separate(share(bias, "NPO", "memorisation", 2, HIGH), share(bias, "NPO", "memorisation", 2, LOW))
    assert separate(share(bias, "NPO", "length", 2, SHORT), share(bias, "NPO", "length", 2, LONG))


def test_after_unlearning_simnpo_takes_the_best_memorised_answers_lower_than_npo(bias):
    after = {m: (bias["after"][m]["memorisation"]["probability"][HIGH],
                 bias["after"][m]["memorisation"]["probability_interval"][HIGH]) for m in bias["after"]}
    assert separate(after["target"], after["NPO"]) and separate(after["NPO"], after["SimNPO"])
    assert after["retain"][1][0] < after["NPO"][0] < after["retain"][1][1]  # NPO within the retain model's interval


LADDER_RUN = os.path.join(ROOT, "docs", "results", "tofu-cpu-2x2", "results.json")
CELLS = ("NPO+RT", "SimNPO-sum+RT", "NPO-ave+RT", "SimNPO+RT")


@pytest.fixture(scope="module")
def ladder():
    return read_json(LADDER_RUN)


def cell_difference(ladder, later, earlier, key):
    """later - earlier with its paired interval, whichever order the run lists the pair in."""
    if f"{later} - {earlier}" in ladder["differences"]:
        entry = ladder["differences"][f"{later} - {earlier}"][key]
        return entry["difference"], entry["interval"]
    entry = ladder["differences"][f"{earlier} - {later}"][key]
    return -entry["difference"], [-entry["interval"][1], -entry["interval"][0]]


def test_the_2x2_run_extends_the_committed_run_with_the_official_cell_settings(run, ladder):
    assert ladder["config"]["methods"] == ["GradDiff", *CELLS[:1], "SimNPO+RT", "NPO-ave+RT", "SimNPO-sum+RT"]
    assert ladder["config"]["relearn_steps"] == [] and ladder["relearning"] == {}
    for name in ("target", "retain", "npo-rt", "simnpo-rt", "graddiff"):  # the same models and numbers
        for key in ("forget_gap_closed", "model_utility", "mia_auc/loss"):
            assert ladder["models"][name][key] == run["models"][name][key], (name, key)
    assert ladder["stages"]["unlearn-npo-ave-rt"]["objective"]["forget_weight"] == 0.1375
    assert ladder["stages"]["unlearn-simnpo-sum-rt"]["objective"]["beta"] == 0.1


def test_dropping_the_reference_matters_only_on_the_normalised_scale(ladder):
    value, (low, high) = cell_difference(ladder, "SimNPO-sum+RT", "NPO+RT", "forget_gap_closed")
    assert low < 0 < high and round(value, 3) == 0.013
    assert cell_difference(ladder, "SimNPO-sum+RT", "NPO+RT", "mia_auc/loss")[1][0] < 0
    value, (low, high) = cell_difference(ladder, "SimNPO+RT", "NPO-ave+RT", "forget_gap_closed")
    assert high < -0.25 and round(value, 2) == -0.30
    assert cell_difference(ladder, "SimNPO+RT", "NPO-ave+RT", "mia_auc/loss")[1][0] > 0


def test_normalising_closes_less_and_keeps_the_pairs_recognisable_with_and_without_the_reference(ladder):
    for normalised, summed, bound in (("NPO-ave+RT", "NPO+RT", -0.15), ("SimNPO+RT", "SimNPO-sum+RT", -0.4)):
        assert cell_difference(ladder, normalised, summed, "forget_gap_closed")[1][1] < bound
        assert cell_difference(ladder, normalised, summed, "mia_auc/loss")[1][0] > 0.2


def test_utility_separates_no_two_cells(ladder):
    for i, a in enumerate(CELLS):
        for b in CELLS[i + 1:]:
            low, high = cell_difference(ladder, b, a, "model_utility")[1]
            assert low < 0 < high, (a, b)
