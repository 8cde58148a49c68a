"""The hyperparameter sweep figure (paper_figures.hyperparameter_sweep): its cells against an independent run."""

from __future__ import annotations

import math

import pytest
from reach_scan import reach_by_scan  # tests/reach_scan.py

from markovsim.scenarios import prepare
from markovsim.sweeps import SweepPoint, run_point
from paper_figures import hyperparameter_sweep as sweep
from paper_figures.reach_statistics import summarise
from paper_figures.runs import retrained_levels, seeded_scenario

SMALL = sweep.Config(scale=0.02, steps=25, seeds=(0, 1), simnpo_betas=(2.5, 8.0), simnpo_gammas=(0.0, 2.0),
                     npo_betas=(0.2,))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    stem = sweep.compute(SMALL, str(folder / "cache" / "sweep"))
    return stem, sweep.plot(stem, str(folder / "sweep"))


def test_every_configuration_runs_on_every_seed_and_case(small_run):
    stem, _ = small_run
    from paper_figures.cache import load_cache

    rows = load_cache(stem)[0]["rows"]
    expected = {(case, seed, method, beta, gamma, component) for case in sweep.CASES for seed in SMALL.seeds
                for method, beta, gamma in SMALL.configurations() for component in ("forget1", "forget2")}
    assert {(r["case"], r["seed"], r["method"], r["beta"], r["gamma"], r["component"]) for r in rows} == expected
    assert len(rows) == len(expected)


@pytest.mark.parametrize("method,beta,gamma", [("SimNPO", 8.0, 2.0), ("NPO", 0.2, None)])
def test_a_cell_equals_the_sweep_driver_and_the_table_prints_its_median(small_run, method, beta, gamma):
    """markovsim.sweeps.run_point (its own objective assembly) and a linear scan for the crossing."""
    stem, paths = small_run
    from paper_figures.cache import load_cache

    rows = load_cache(stem)[0]["rows"]
    case, seed = "paper_short_forget2", 1
    scenario = seeded_scenario(case, SMALL.scale, seed)
    sweep_rows = run_point(scenario, "tabular", SweepPoint(method, beta, gamma, 0.02, seed), steps=SMALL.steps)
    assert sweep_rows[0]["beta"] == beta and (gamma is None or sweep_rows[0]["gamma"] == gamma)
    level = retrained_levels(prepare(scenario, "tabular"))
    for component in ("forget1", "forget2"):
        forget = [r[f"kl_true/{component}"] for r in sweep_rows]
        expected = reach_by_scan(forget, [r["kl_true/retain"] for r in sweep_rows], level[component])
        got = sweep.cell_values(rows, "tabular", case, method, beta, gamma, component)[seed]
        assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected, rel_tol=1e-9)
    table = open(next(p for p in paths if p.endswith("_table.md"))).read()
    summary = summarise(sweep.cell_values(rows, "tabular", case, method, beta, gamma, "forget2"))
    assert summary.median is None or f"{summary.median:.4f} [" in table


def test_config_rejects_unknown_sources():
    with pytest.raises(ValueError, match="sources"):
        sweep.Config(sources=("paper-synthetic",))
