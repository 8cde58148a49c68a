"""The ablation ladder (paper_figures.ablation_ladder): learning-rate selection, pairing and the table's numbers,
each against an independent computation."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
from reach_scan import reach_by_scan  # tests/reach_scan.py

from markovsim.optimizers import ADAM_DEFAULTS
from markovsim.sweeps import SweepPoint, run_point
from paper_figures import ablation_ladder as ladder
from paper_figures.runs import retrained_levels, seeded_scenario

SMALL = ladder.Config(scale=0.02, steps=30, optimizers=("adamw_legacy", "gd"),
                      multipliers=(("adamw_legacy", (1.0, 3.0)), ("gd", (1.0, 10.0))),
                      default_learning_rates=(("adamw_legacy", 0.02), ("gd", 10.0)),
                      selection_seeds=(100,), report_seeds=(0, 1, 2))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ladder")
    stem = ladder.compute(SMALL, str(folder / "cache" / "ablation_ladder_small"), jobs=1)
    paths = ladder.plot(stem, str(folder / "ablation_ladder"))
    document, rows = ladder.load_rows(stem)
    return document, rows, paths


def _row(lr, component, seed, value, method="NPO"):
    return {"source": "tabular", "case": "paper_short_forget2", "optimizer": "gd", "method": method,
            "learning_rate": lr, "component": component, "seed": seed, "phase": "select",
            "retain_kl_at_reach": value}


def test_best_learning_rate_by_hand():
    nan = math.nan
    rows = []
    # lr 1: medians 0.3 + 0.2 = 0.5; lr 2: 0.1 + 0.1 = 0.2 but forget2 reached on 1 of 3 seeds (ineligible);
    # lr 3: 0.2 + 0.25 = 0.45 (forget2 reached on 2 of 3: eligible, median of the two) -> best 3.
    for seed, (a1, a2, b1, b2, c1, c2) in enumerate([(0.3, 0.2, 0.1, 0.1, 0.2, 0.2), (0.2, 0.1, 0.1, nan, 0.2, 0.3),
                                                     (0.4, 0.3, 0.1, nan, 0.2, nan)]):
        rows += [_row(1.0, "forget1", seed, a1), _row(1.0, "forget2", seed, a2), _row(2.0, "forget1", seed, b1),
                 _row(2.0, "forget2", seed, b2), _row(3.0, "forget1", seed, c1), _row(3.0, "forget2", seed, c2)]
    rows += [_row(1.0, component, seed, nan, method="GA") for component in ("forget1", "forget2") for seed in range(3)]
    best = ladder.best_learning_rates(rows)
    assert best[("tabular", "paper_short_forget2", "gd", "NPO")] == 3.0
    assert best[("tabular", "paper_short_forget2", "gd", "GA")] is None


def test_config_rejects_shared_seeds_and_unknown_names():
    with pytest.raises(ValueError, match="disjoint"):
        ladder.Config(selection_seeds=(0,), report_seeds=(0, 1))
    with pytest.raises(ValueError, match="optimizers"):
        ladder.Config(optimizers=("sgd",))
    with pytest.raises(ValueError, match="methods"):
        ladder.Config(methods=("NPO", "DPO"))
    with pytest.raises(ValueError, match="multipliers"):
        ladder.Config(multipliers=(("adamw", (1.0,)),))


def test_grids_span_ten_times_either_side_of_the_shared_learning_rate():
    config = ladder.CONFIGS["paper"]
    for optimizer in config.optimizers:
        for source in config.sources:
            grid, shared = config.grid(source, optimizer), config.shared_learning_rate(source, optimizer)
            assert len(grid) >= 5 and shared in grid
            assert min(grid) <= shared / 10 * (1 + 1e-12) and max(grid) >= shared * 10 * (1 - 1e-12)
    assert set(config.selection_seeds).isdisjoint(config.report_seeds) and len(config.report_seeds) >= 10


def test_rows_are_phased_on_their_own_seeds_and_report_the_shared_and_best_lr(small_run):
    document, rows, _ = small_run
    assert {r["seed"] for r in rows if r["phase"] == "select"} == set(SMALL.selection_seeds)
    assert {r["seed"] for r in rows if r["phase"] == "report"} == set(SMALL.report_seeds)
    choices = ladder.chosen(document)
    assert len(choices) == len(SMALL.sources) * 2 * len(SMALL.optimizers) * len(SMALL.methods)
    for (source, case, optimizer, method), choice in choices.items():
        grid = SMALL.grid(source, optimizer)
        assert choice["best_learning_rate"] is None or choice["best_learning_rate"] in grid
        for key in ("shared_learning_rate", "best_learning_rate"):
            if choice[key] is not None:
                values = ladder.report_values(rows, source, case, optimizer, method, choice[key], "forget1")
                assert sorted(values) == list(SMALL.report_seeds)


def test_a_report_row_equals_the_same_run_through_the_sweep_driver(small_run):
    """One cell recomputed by markovsim.sweeps.run_point (its own dynamics and objective assembly) and its reach
    value found by a linear scan of the KL columns."""
    _, rows, _ = small_run
    case, seed, method, optimizer, lr = "paper_short_forget2", 1, "NPO-ave", "adamw_legacy", 0.02
    scenario = seeded_scenario(case, SMALL.scale, seed)
    defaults = ADAM_DEFAULTS[optimizer]
    scenario = dataclasses.replace(scenario, dynamics=dataclasses.replace(
        scenario.dynamics, optimizer=optimizer, adam_eps=defaults["eps"], weight_decay=defaults["weight_decay"]))
    sweep_rows = run_point(scenario, "tabular", SweepPoint(method, None, None, lr, seed), steps=SMALL.steps)
    from markovsim.scenarios import prepare

    level = retrained_levels(prepare(scenario, "tabular"))
    for component in ("forget1", "forget2"):
        forget = [r[f"kl_true/{component}"] for r in sweep_rows]
        expected = reach_by_scan(forget, [r["kl_true/retain"] for r in sweep_rows], level[component])
        (got,) = [r["retain_kl_at_reach"] for r in rows if (r["phase"], r["case"], r["seed"], r["method"],
                  r["optimizer"], r["component"]) == ("report", case, seed, method, optimizer, component)
                  and math.isclose(r["learning_rate"], lr)]
        assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected, rel_tol=1e-9)


def test_table_and_csv_hold_the_cached_numbers(small_run):
    document, rows, paths = small_run
    csv_path = next(p for p in paths if p.endswith("_reach.csv"))
    with open(csv_path, newline="") as file:
        read = list(csv.DictReader(file))
    assert len(read) == len(rows) and tuple(read[0]) == ladder.CSV_COLUMNS
    for row, line in zip(rows, read):
        value = float(line["retain_kl_at_reach"] or "nan")
        assert (math.isnan(value) and math.isnan(row["retain_kl_at_reach"])) or value == row["retain_kl_at_reach"]
    table = open(next(p for p in paths if p.endswith("_table.md"))).read()
    choices = ladder.chosen(document)
    # every ingredient difference the table prints is the mean of per-seed differences recomputed from the CSV
    checked = 0
    for source, case, optimizer in {key[:3] for key in choices}:
        for _, a, b in ladder.INGREDIENT_STEPS:
            for component in ("forget1", "forget2"):
                cells = {}
                for name in (a, b):
                    lr = choices[(source, case, optimizer, name)]["best_learning_rate"]
                    cells[name] = {int(r["seed"]): float(r["retain_kl_at_reach"] or "nan") for r in read
                                   if lr is not None and r["phase"] == "report"
                                   and math.isclose(float(r["learning_rate"]), lr)
                                   and (r["source"], r["case"], r["optimizer"], r["method"], r["component"])
                                   == (source, case, optimizer, name, component)}
                both = [s for s in cells[a] if s in cells[b] and np.isfinite(cells[a][s]) and np.isfinite(cells[b][s])]
                if len(both) >= 2:
                    mean = np.mean([cells[a][s] - cells[b][s] for s in both])
                    assert f"{mean:+.4f} [" in table
                    checked += 1
    assert checked >= 4


def test_cpu_skips_the_transformer_sources_unless_asked(tmp_path, monkeypatch):
    from paper_figures.transformer_runs import TransformerSettings

    config = dataclasses.replace(SMALL, steps=2, optimizers=("adamw_legacy",), methods=("GA",),
                                 transformers=(TransformerSettings(preset="tiny-synthetic"),))
    ran = []
    monkeypatch.setattr(ladder, "_run_unit", lambda task: ran.append(task["kind"]) or [])
    stem = ladder.compute(config, str(tmp_path / "c"), device="cpu")
    document, _ = ladder.load_rows(stem)
    assert set(ran) == {"simulator"} and document["skipped_sources"] == ["tiny-synthetic"]
    assert document["config"]["transformers"]  # the requested config is recorded, the skip beside it


def test_a_transformer_report_row_equals_the_figures_transformer_run(tmp_path):
    """The ladder's transformer unit (its own unlearning config per optimiser and lr) against
    paper_figures.transformer_runs (the settings' own optimiser and lr), from the same cached pre-trained models."""
    from paper_figures.reach_statistics import reach_point
    from paper_figures.transformer_runs import TransformerSettings, transformer_runs

    settings = TransformerSettings(preset="tiny-synthetic", pretrain_epochs=1.0, unlearn_steps=3,
                                   diagnostics_max_sequences=4)
    config = ladder.Config(scale=0.005, steps=3, simulator_sources=(), transformers=(settings,),
                           optimizers=("adamw_legacy",), multipliers=(("adamw_legacy", (1.0,)),),
                           selection_seeds=(100,), report_seeds=(0,), methods=("NPO", "NPO-ave"),
                           transformers_on_cpu=True)
    stem = ladder.compute(config, str(tmp_path / "cache" / "ladder"), device="cpu")
    _, rows = ladder.load_rows(stem)
    case = "paper_short_forget2"
    runs, levels = transformer_runs(case, 0.005, dataclasses.replace(settings, seed=0), "cpu", ["NPO-ave"], False,
                                    str(tmp_path / "cache" / "models"))
    for component in ("forget1", "forget2"):
        expected, _ = reach_point(runs["NPO-ave"], component, levels[component])
        (got,) = [r["retain_kl_at_reach"] for r in rows if (r["phase"], r["case"], r["method"], r["component"])
                  == ("report", case, "NPO-ave", component)]
        assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected, rel_tol=1e-6)
    assert any(np.isfinite(r["retain_kl_at_reach"]) for r in rows)  # the comparison is not all n.r.
