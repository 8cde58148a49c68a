"""Scenarios (named and user-defined), sweeps, analysis helpers and the markovsim CLI at tiny scale."""

import copy
import json
import math

import numpy as np
import pytest

from markovsim.__main__ import main
from markovsim.analysis import fit_divergence_rates, value_at_progress
from markovsim.dynamics import unlearn
from markovsim.results import read_json
from markovsim.scenarios import SCENARIOS, load_scenario, prepare, scenario_from_dict
from markovsim.sweeps import final_rows, grid, run_sweep, summarize, write_csv
from markovsim.trajectory import Trajectory

USER_SPEC = {
    "name": "two_lengths", "question": "a user scenario", "num_states": 6, "leakage": 0.2, "seed": 1,
    "chains": {"r": "retain", "f": "forget1", "custom": {"initial_probs": [1 / 6] * 6,
                                                        "transition_matrix": (np.eye(6) * 0.5 + 0.5 / 6).tolist()}},
    "components": [{"name": "retain", "chain": "r", "length": 8, "num_train": 20, "num_test": 6},
                   {"name": "forget_long", "chain": "f", "length": 8, "num_train": 10, "num_test": 4, "role": "forget"},
                   {"name": "forget_new", "chain": "custom", "length": 3, "num_train": 10, "num_test": 4,
                    "role": "forget", "in_pretraining": False}],
    "methods": {"NPO": {"beta": 0.5}, "SimNPO": {"beta": 2.0}},
    "dynamics": {"optimizer": "adamw", "learning_rate": 0.05, "steps": 3},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("model_class", ["tabular", "mixture"])
def test_every_scenario_runs_at_tiny_scale(name, model_class):
    scenario = SCENARIOS[name].scaled(0.005)
    setup = prepare(scenario, model_class)
    assert scenario.question
    for method, objective in scenario.methods.items():
        trajectory = unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                             scenario.dynamics.__class__(steps=3), setup.evaluator)
        assert trajectory.diverged_at is None, method
        assert np.all(np.isfinite(trajectory.component_metrics["kl_true"]))


def test_unseen_component_is_not_in_the_reference():
    setup = prepare(SCENARIOS["paper_unseen_forget2"].scaled(0.02), "tabular")
    kl_true = dict(zip(setup.evaluator.component_names, setup.evaluator.evaluate(setup.reference)["kl_true"]))
    assert kl_true["forget2"] > 2 * kl_true["forget1"]


def test_user_scenario_from_dict_and_json(tmp_path):
    scenario = scenario_from_dict(USER_SPEC)
    assert scenario.spec.names_where(role="forget") == ("forget_long", "forget_new")
    assert scenario.methods["NPO"].beta == 0.5
    setup = prepare(scenario, "mixture")
    assert setup.reference.num_components == 2  # only the pre-training components
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(USER_SPEC))
    assert load_scenario(str(path)).name == "two_lengths"


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("chains"), "missing keys"),
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d["chains"].update(r="retainx"), "block name"),
    (lambda d: d["chains"].update(r={"initial_probs": [1.0]}), "must be a block name"),
    (lambda d: d["chains"].update(r={"initial_probs": [0.5, 0.5], "transition_matrix": [[1, 0], [0, 1]]}),
     "num_states"),
    (lambda d: d["components"][0].update(chain="nope"), "unknown chain"),
    (lambda d: d["components"][0].pop("length"), "must have keys"),
    (lambda d: d["components"][1].update(role="retain") or d["components"][2].update(role="retain"), "role 'forget'"),
    (lambda d: d["components"][1].update(name="retain"), "duplicate component names"),
    (lambda d: d["components"][0].update(length=1), "length"),
    (lambda d: d.update(methods={"NOPE": {}}), "valid names"),
    (lambda d: d.update(methods={"NPO": {"beta": -1}}), "beta"),
    (lambda d: d.update(dynamics={"optimiser": "adamw"}), "dynamics"),
    (lambda d: d.update(dynamics={"optimizer": "lbfgs"}), "optimizer"),
])
def test_bad_user_specs_raise_value_error(mutate, match):
    document = copy.deepcopy(USER_SPEC)
    mutate(document)
    with pytest.raises(ValueError, match=match):
        scenario_from_dict(document)


def test_unknown_scenario_name():
    with pytest.raises(ValueError, match="paper_short_forget2"):
        load_scenario("no_such_scenario")


def test_sweep_table_is_tidy_and_reproducible(tmp_path):
    scenario = SCENARIOS["paper_short_forget2"].scaled(0.005)
    points = grid(["GA", "NPO", "SimNPO"], betas=[0.2, 2.0], seeds=[0, 1])
    assert len(points) == 2 + 4 + 4  # GA ignores beta
    rows = run_sweep(scenario, points, steps=2, progress=False)
    assert len(rows) == len(points) * 3
    assert len(final_rows(rows)) == len(points)
    assert {"kl_true/forget1", "power_share/forget2", "step", "beta", "seed"} <= set(rows[0])
    def same(a, b):  # NaN-aware equality
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    assert same(run_sweep(scenario, points[:3], steps=2, progress=False), rows[:9])
    assert same(run_sweep(scenario, points[:4], steps=2, processes=2, progress=False), rows[:12])
    summary = summarize(rows, "kl_true/forget2")
    assert len(summary) == 5 and all(np.isfinite(mean) for mean, _ in summary.values())
    write_csv(rows, tmp_path / "sweep.csv")
    assert (tmp_path / "sweep.csv").read_text().count("\n") == len(rows) + 1


def test_fit_divergence_rates_tells_linear_from_logarithmic():
    steps = np.arange(0, 400, 4.0)
    assert fit_divergence_rates(steps, -1 - 0.05 * steps)["better"] == "linear"
    logarithmic = fit_divergence_rates(steps, -1 - 2 * np.log1p(steps / 3.0))
    assert logarithmic["better"] == "logarithmic" and logarithmic["logarithmic"]["r2"] > 0.999
    assert logarithmic["logarithmic"]["tau"] == pytest.approx(3.0, rel=0.1)


def test_value_at_progress_interpolates():
    names = ("retain", "forget")
    metrics = {"kl_true": np.array([[0.0, 0.1], [0.2, 0.3], [0.4, 0.5]])}
    trajectory = Trajectory(np.arange(3), names, metrics, {"loss": np.zeros(3)})
    assert value_at_progress(trajectory, "kl_true", "forget", 0.4, "kl_true", "retain") == pytest.approx(0.3)
    assert np.isnan(value_at_progress(trajectory, "kl_true", "forget", 0.9, "kl_true", "retain"))


def test_cli_run_and_list(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "paper_unseen_forget2" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["run", "paper_short_forget2", "--scale", "0.005", "--steps", "3", "--methods", "NPO", "SimNPO",
                 "--betas", "NPO=0.3", "SimNPO=3", "--out", str(out), "--no-progress"]) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["config"]["methods"]["NPO"]["beta"] == 0.3
    assert document["package_version"] and set(document["summaries"]) == {
        "tabular/NPO", "tabular/SimNPO", "mixture/NPO", "mixture/SimNPO"}
    with np.load(out / "trajectories.npz") as arrays:
        assert arrays["tabular/NPO/kl_true"].shape == (4, 3)
    assert (out / "plot.png").stat().st_size > 10000 and (out / "divergence.png").stat().st_size > 10000
    assert sorted(p.name for p in out.iterdir()) == ["divergence.png", "plot.png", "results.json", "trajectories.npz"]
    equal = document["retain_kl_at_equal_forget_logp"]["tabular"]["forget2"]
    assert set(equal) == {"forget_logp_per_token", "NPO", "SimNPO"} and all(np.isfinite(v) for v in equal.values())


def test_cli_rejects_bad_input_with_status_2_and_one_error_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, named in ((["run", "no_such_scenario", "--out", str(tmp_path)], "no_such_scenario"),
                        (["run", "paper_short_forget2", "--methods", "NOPE", "--out", str(tmp_path)], "NOPE"),
                        (["run", "paper_short_forget2", "--betas", "NPO=x", "--out", str(tmp_path)], "--betas"),
                        (["run", "paper_short_forget2", "--lr", "-1", "--out", str(tmp_path)], "learning_rate"),
                        (["run", "paper_short_forget2", "--out", str(a_file)], "--out")):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and named in error, error
    with pytest.raises(ValueError):
        main(["--debug", "run", "no_such_scenario", "--out", str(tmp_path)])


def _raise_on_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def test_a_diverged_run_writes_strict_json_with_null_and_the_reason(tmp_path):
    out = tmp_path / "diverged"
    assert main(["run", "paper_short_forget2", "--scale", "0.005", "--steps", "20", "--methods", "GA",
                 "--models", "tabular", "--optimizer", "gd", "--lr", "1e4", "--out", str(out), "--no-progress"]) == 0
    text = (out / "results.json").read_text()
    document = json.loads(text, parse_constant=_raise_on_constant)
    summary = document["summaries"]["tabular/GA"]
    assert summary["diverged_at"] is not None and "fell below" in summary["divergence_reason"]
    non_finite = document["non_finite_values"]
    assert non_finite and set(non_finite.values()) <= {"nan", "inf", "-inf"}
    pointer = "/summaries/tabular~1GA/final/kl_true/forget1"
    assert summary["final"]["kl_true"]["forget1"] is None and non_finite[pointer] == "nan"
    restored = read_json(out / "results.json")  # read_json puts the floats back
    assert math.isnan(restored["summaries"]["tabular/GA"]["final"]["kl_true"]["forget1"])
    assert "non_finite_values" not in restored
