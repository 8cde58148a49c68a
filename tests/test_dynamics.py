"""Exact unlearning dynamics: determinism, step-0 invariants, oracles (autograd, solve_ivp), divergence."""


import numpy as np
import pytest

from markovsim.dynamics import DynamicsConfig, gradient_flow, unlearn
from markovsim.metrics import component_kl
from markovsim.objectives import OBJECTIVES, get_objective
from markovsim.scenarios import SCENARIOS, prepare
from markovsim.trajectory import Trajectory


@pytest.fixture(scope="module", params=["tabular", "mixture"])
def setup(request):
    return prepare(SCENARIOS["paper_short_forget2"].scaled(0.01), request.param)


def run(setup, objective, **config):
    return unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                   DynamicsConfig(**config), setup.evaluator)


def test_same_seed_gives_identical_trajectories(setup):
    objective = get_objective("NPO", beta=0.2)
    for config in ({"steps": 5}, {"steps": 5, "batch_size": 3, "seed": 4}):
        first, second = run(setup, objective, **config), run(setup, objective, **config)
        for name in first.component_metrics:
            np.testing.assert_array_equal(first.component_metrics[name], second.component_metrics[name])
    other = run(setup, objective, steps=5, batch_size=3, seed=5)
    assert not np.array_equal(other.step_metrics["loss"], second.step_metrics["loss"])


def test_step_zero_matches_metrics_and_npo_weights_are_one(setup):
    trajectory = run(setup, get_objective("NPO", beta=0.2), steps=2)
    direct = {"kl_true": component_kl(setup.true_chains, setup.reference, setup.test),
              "kl_retrained": component_kl(setup.retrained, setup.reference, setup.test)}
    for metric, values in direct.items():
        for name, value in values.items():
            assert trajectory.metric(metric, name)[0] == pytest.approx(value, rel=1e-10, abs=1e-14)
    for name in ("retain", "forget1", "forget2"):
        assert trajectory.metric("kl_reference", name)[0] == pytest.approx(0.0, abs=1e-12)
    assert trajectory.metric("mean_weight", "forget1")[0] == 1.0
    assert trajectory.metric("mean_weight", "forget2")[0] == 1.0
    assert np.isnan(trajectory.metric("mean_weight", "retain")[0])
    shares = trajectory.component_metrics["power_share"][0]
    assert shares.sum() == pytest.approx(1.0) and shares[setup.test.component_names.index("retain")] == 0.0


def test_simnpo_weights_differ_between_lengths(setup):
    """Each forget component's mean weight against SimNPO's formula, w(y) = (2/|y|) sigmoid(beta logp(y)/|y| + gamma)
    (docs/theory.md, loss table), averaged by hand over the component's sequences."""
    objective = get_objective("SimNPO", beta=4.0, gamma=0.5)
    trajectory = run(setup, objective, steps=0)
    expected = {}
    for name, length in (("forget1", 20), ("forget2", 5)):
        sequences = setup.forget.select(name)
        assert set(sequences.lengths.tolist()) == {length}
        logps = setup.reference.response_logps(sequences).numpy()
        weights = 2 / (length - 1) / (1 + np.exp(-(4.0 * logps / (length - 1) + 0.5)))
        expected[name] = weights.mean()
        assert trajectory.metric("mean_weight", name)[0] == pytest.approx(expected[name], rel=1e-12), name
    assert expected["forget2"] > 2 * expected["forget1"]  # the short responses weigh more (1/|y|)


@pytest.mark.parametrize("optimizer", ["gd", "adamw", "adamw_legacy"])
@pytest.mark.parametrize("method", ["NPO+KL", "SimNPO+RT", "GA"])
def test_closed_form_runs_equal_autograd_runs(setup, optimizer, method):
    objective = get_objective(method, beta=0.5) if "NPO" in method else OBJECTIVES[method]
    config = dict(steps=4, optimizer=optimizer, learning_rate=0.1 if optimizer == "gd" else 0.05)
    closed = run(setup, objective, **config)
    oracle = run(setup, objective, gradient="autograd", **config)
    np.testing.assert_allclose(oracle.step_metrics["loss"], closed.step_metrics["loss"], rtol=1e-10)
    for name in ("kl_true", "logp_per_token"):
        np.testing.assert_allclose(oracle.component_metrics[name], closed.component_metrics[name], rtol=1e-9)


def test_small_step_gradient_descent_follows_the_gradient_flow(setup):
    """GD with step eta for k steps approximates the flow at t = k eta, with an O(eta) error."""
    objective = get_objective("NPO", beta=0.5)
    horizon, names = 20.0, ("forget1", "forget2")
    flow = gradient_flow(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                         np.linspace(0, horizon, 5), setup.evaluator)
    change = min(np.ptp(flow.metric("logp_per_token", name)) for name in names)
    assert change > 0.1
    errors = []
    for learning_rate in (0.1, 0.05):
        steps = int(round(horizon / learning_rate))
        descent = run(setup, objective, optimizer="gd", learning_rate=learning_rate, steps=steps, eval_every=steps // 4)
        np.testing.assert_allclose(descent.steps * learning_rate, flow.steps)
        errors.append(max(np.abs(descent.metric("logp_per_token", n) - flow.metric("logp_per_token", n)).max()
                          for n in names))
    assert errors[0] < 0.02 * change
    assert 1.7 < errors[0] / errors[1] < 2.3  # first order: halving the step halves the error


def test_divergent_run_stops_and_records_the_step(setup):
    trajectory = run(setup, OBJECTIVES["GA"], optimizer="gd", learning_rate=1e4, steps=50,
                     divergence_logp_per_token=-30.0)
    assert trajectory.diverged_at is not None and trajectory.diverged_at < 50
    assert "fell below" in trajectory.divergence_reason
    assert trajectory.steps[-1] == trajectory.diverged_at


def test_overflow_to_inf_or_nan_is_reported_not_raised(setup):
    trajectory = run(setup, OBJECTIVES["GA"], optimizer="gd", learning_rate=1e307, steps=40,
                     divergence_logp_per_token=None)
    assert trajectory.diverged_at is not None and trajectory.diverged_at < 40
    assert "inf" in trajectory.divergence_reason.lower() or "nan" in trajectory.divergence_reason.lower()
    assert np.all(np.isnan(trajectory.component_metrics["kl_true"][-1]))
    assert np.all(np.isfinite(trajectory.component_metrics["kl_true"][0]))


def test_trajectory_round_trip(setup, tmp_path):
    trajectory = run(setup, get_objective("SimNPO"), steps=3)
    trajectory.save(tmp_path / "run", config=DynamicsConfig(steps=3))
    loaded = Trajectory.load(tmp_path / "run")
    assert loaded.component_names == trajectory.component_names
    for name, values in trajectory.component_metrics.items():
        np.testing.assert_array_equal(loaded.component_metrics[name], values)
    assert len(trajectory.rows()) == len(trajectory.steps) * len(trajectory.component_names)


def test_bad_configs():
    with pytest.raises(ValueError, match="optimizer"):
        DynamicsConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="learning_rate"):
        DynamicsConfig(learning_rate=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        DynamicsConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        DynamicsConfig(batch_size=0)
    with pytest.raises(ValueError, match="gradient"):
        DynamicsConfig(gradient="numeric")
