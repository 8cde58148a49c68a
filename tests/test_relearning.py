"""Simulator relearning (markovsim.relearning): exact gradient, fixed points, descent, agreement with unlearn()."""

import dataclasses

import numpy as np
import pytest
import torch

from markovsim.dynamics import DynamicsConfig, unlearn
from markovsim.objectives import get_objective
from markovsim.relearning import (
    RelearningConfig,
    relearn,
    relearning_curves,
    relearning_loss,
    relearning_loss_and_gradient,
    relearning_subset,
    unlearned_model,
)
from markovsim.scenarios import SCENARIOS, prepare


@pytest.fixture(scope="module", params=["tabular", "mixture"])
def setup(request):
    return prepare(SCENARIOS["paper_short_forget2"].scaled(0.01), request.param)


def _perturbed(model, seed: int):
    rng = np.random.default_rng(seed)
    noise = [torch.as_tensor(rng.normal(scale=0.5, size=p.shape)) for p in model.parameters()]
    return model.with_parameters(*[p + n for p, n in zip(model.parameters(), noise)])


def test_closed_form_gradient_equals_autograd(setup):
    subset = relearning_subset(setup.forget, 5, seed=3)
    model = _perturbed(setup.reference, 0)
    params = [p.clone().requires_grad_(True) for p in model.parameters()]
    oracle_value = relearning_loss(model.with_parameters(*params), subset)
    oracle = torch.autograd.grad(oracle_value, params, allow_unused=True)
    value, gradients = relearning_loss_and_gradient(model, subset)
    assert float(value) == pytest.approx(float(oracle_value.detach()), rel=1e-12)
    for closed, reference in zip(gradients, oracle):
        reference = torch.zeros_like(closed) if reference is None else reference
        torch.testing.assert_close(closed, reference, rtol=1e-9, atol=1e-12)


def test_subset_takes_the_asked_rows_of_each_forget_component(setup):
    subset = relearning_subset(setup.forget, 4, seed=0)
    assert {k: v for k, v in subset.component_counts().items() if v} == {"forget1": 4, "forget2": 4}
    again = relearning_subset(setup.forget, 4, seed=0)
    np.testing.assert_array_equal(subset.tokens, again.tokens)
    assert not np.array_equal(subset.tokens, relearning_subset(setup.forget, 4, seed=1).tokens)
    # more than a component holds: all of it
    everything = relearning_subset(setup.forget, 10**6, seed=0)
    assert len(everything) == len(setup.forget)


def test_relearning_from_the_reference_starts_at_zero_kl_to_the_reference(setup):
    subset = relearning_subset(setup.forget, 4, seed=0)
    trajectory = relearn(setup.reference, subset, setup.evaluator, RelearningConfig(steps=3))
    np.testing.assert_allclose(trajectory.component_metrics["kl_reference"][0], 0.0, atol=1e-12)
    assert trajectory.component_metrics["kl_reference"][-1].max() > 0  # then it moves away (overfits S)


def test_gradient_descent_lowers_the_relearning_loss_monotonically(setup):
    subset = relearning_subset(setup.forget, 4, seed=0)
    model = unlearned_model(setup.reference, get_objective("GA"), setup.forget, None,
                            DynamicsConfig(optimizer="adamw", learning_rate=0.05, steps=10))
    trajectory = relearn(model, subset, setup.evaluator, RelearningConfig(steps=30, learning_rate=0.5))
    losses = trajectory.metric("loss")
    assert np.all(np.diff(losses) < 0)
    # the loss is the one relearn() minimises: it equals relearning_loss at the start
    assert losses[0] == pytest.approx(float(relearning_loss(model, subset)), rel=1e-12)


def test_unlearned_model_is_the_end_of_unlearn(setup):
    objective = get_objective("NPO", beta=0.5)
    config = DynamicsConfig(optimizer="adamw", learning_rate=0.05, steps=6)
    model = unlearned_model(setup.reference, objective, setup.forget, None, config)
    trajectory = unlearn(setup.reference, objective, setup.forget, None, setup.reference, config, setup.evaluator)
    np.testing.assert_allclose(setup.evaluator.evaluate(model)["kl_true"], trajectory.component_metrics["kl_true"][-1],
                               rtol=1e-10)


def test_relearning_pulls_unlearned_models_back_toward_the_reference(setup):
    scenario = SCENARIOS["paper_short_forget2"]
    objectives = scenario.with_methods(["GA", "NPO", "SimNPO"])
    curves = relearning_curves(setup, objectives, dataclasses.replace(scenario.dynamics, steps=20),
                               RelearningConfig(steps=20, eval_every=5))
    assert set(curves) == {"reference", "GA", "NPO", "SimNPO"}
    for method in ("GA", "NPO", "SimNPO"):
        for name in ("forget1", "forget2"):
            kl = curves[method].metric("kl_reference", name)
            assert kl[0] > 0.05 and kl[-1] < kl[0], (method, name)
        assert list(curves[method].steps) == [0, 5, 10, 15, 20]


@pytest.mark.parametrize("kwargs, error", [
    ({"steps": -1}, ValueError), ({"sequences_per_component": 0}, ValueError), ({"eval_every": 0}, ValueError),
    ({"learning_rate": 0.0}, ValueError), ({"optimizer": "sgd"}, ValueError), ({"steps": 1.5}, TypeError),
])
def test_bad_config_raises(kwargs, error):
    with pytest.raises(error):
        RelearningConfig(**kwargs)


def test_bad_input_raises(setup):
    subset = relearning_subset(setup.forget, 2, seed=0)
    with pytest.raises(TypeError, match="RelearningConfig"):
        relearn(setup.reference, subset, setup.evaluator, DynamicsConfig())
    with pytest.raises(ValueError, match="non-empty SequenceSet"):
        relearn(setup.reference, subset.subset(np.array([], dtype=np.int64)), setup.evaluator)
    with pytest.raises(TypeError, match="ExactEvaluator"):
        relearn(setup.reference, subset, object())
    with pytest.raises(ValueError, match="sequences_per_component"):
        relearning_subset(setup.forget, 0, seed=0)
    with pytest.raises(ValueError, match="batch_size=None"):
        unlearned_model(setup.reference, get_objective("GA"), setup.forget, None, DynamicsConfig(batch_size=4))
    with pytest.raises(ValueError, match="at least one method"):
        relearning_curves(setup, {}, DynamicsConfig())
