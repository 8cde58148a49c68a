"""docs/theory.md, "Divergence speed" (NPO paper, Theorem 2), on the ``npo_divergence`` scenario itself.

Under full-batch gradient descent GA's parameters and forget log-likelihood move linearly in the step count
(the per-step increments settle at a constant), NPO's only logarithmically (the increments decay like 1/t,
so t x increment settles at a constant). Checked on the exact tabular model at 0.5% scale, 400 steps, from
the increments themselves; the fitted rates (``markovsim.analysis.fit_divergence_rates``) must agree.
"""

import dataclasses

import numpy as np
import pytest

from markovsim.analysis import fit_divergence_rates
from markovsim.dynamics import unlearn
from markovsim.scenarios import SCENARIOS, prepare

STEPS, EVAL_EVERY = 400, 20


@pytest.fixture(scope="module")
def runs():
    scenario = SCENARIOS["npo_divergence"].scaled(0.005)
    assert scenario.dynamics.optimizer == "gd" and set(scenario.methods) == {"GA", "NPO"}
    setup = prepare(scenario, "tabular")
    dynamics = dataclasses.replace(scenario.dynamics, steps=STEPS, eval_every=EVAL_EVERY)
    return {method: unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference, dynamics,
                            setup.evaluator) for method, objective in scenario.methods.items()}


def curves(trajectory) -> dict:
    """``{quantity: (steps, values)}``: the parameter distance and the mean forget log-likelihood per token."""
    assert trajectory.diverged_at is None and trajectory.steps[-1] == STEPS
    forget = np.mean([trajectory.metric("logp_per_token", name) for name in ("forget1", "forget2")], axis=0)
    return {"distance": trajectory.step_metrics["parameter_distance"], "forget_logp": forget}


def increments(steps, values) -> tuple[np.ndarray, np.ndarray]:
    """Per-step change between evaluations and the step at which each interval ends."""
    return np.diff(values) / np.diff(steps), steps[1:]


def test_ga_moves_linearly_in_the_step_count(runs):
    trajectory = runs["GA"]
    for quantity, values in curves(trajectory).items():
        rate, _ = increments(trajectory.steps, values)
        late = rate[len(rate) // 2:]  # steps 200-400
        assert np.all(np.abs(late) > 0) and np.ptp(late) < 0.05 * np.abs(late).mean(), (quantity, rate)
        assert np.abs(rate[-1]) >= np.abs(rate[:len(rate) // 2]).max(), (quantity, rate)  # it never slows down
        fit = fit_divergence_rates(trajectory.steps[len(rate) // 2:], values[len(rate) // 2:])
        assert fit["linear"]["r2"] > 0.999, (quantity, fit)
    assert curves(trajectory)["forget_logp"][-1] < curves(trajectory)["forget_logp"][0] - 10  # it keeps going


def test_npo_moves_logarithmically_in_the_step_count(runs):
    trajectory = runs["NPO"]
    for quantity, values in curves(trajectory).items():
        rate, at = increments(trajectory.steps, values)
        assert np.abs(rate[-1]) < 0.05 * np.abs(rate[0]), (quantity, rate)  # it slows down ...
        scaled = np.abs(rate * at)[len(rate) // 2:]  # ... like 1 / t: t x increment settles (steps 200-400)
        assert np.ptp(scaled) < 0.25 * scaled.mean(), (quantity, scaled)
        fit = fit_divergence_rates(trajectory.steps, values)
        assert fit["better"] == "logarithmic" and fit["logarithmic"]["r2"] > 0.99, (quantity, fit)
        assert fit["linear"]["r2"] < 0.9, (quantity, fit)


def test_ga_ends_far_beyond_npo(runs):
    """Linear against logarithmic: after 400 steps GA has moved far more than NPO, on both measures."""
    ga, npo = curves(runs["GA"]), curves(runs["NPO"])
    assert ga["distance"][-1] > 10 * npo["distance"][-1]
    assert ga["forget_logp"][-1] - ga["forget_logp"][0] < 10 * (npo["forget_logp"][-1] - npo["forget_logp"][0])
