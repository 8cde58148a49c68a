"""Closed-form objective gradients on the exact models == autograd == central finite differences."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import exact_problems, random_chain

from markovsim.chains import block_chains
from markovsim.data import Component, MixtureSpec
from markovsim.exact_gradients import next_token_log_probs, objective_value, objective_value_and_gradient
from markovsim.models import MixtureOfChains, TabularMarkov
from markovsim.objectives import OBJECTIVES, Objective, get_objective


def small_problem(seed: int, num_states: int = 4, retain_length: int = 6, forget_lengths=(6, 3)):
    """Retain and two forget components of different lengths, plus a tabular and a mixture model."""
    rng = np.random.default_rng(seed)
    components = (Component("retain", random_chain(rng, num_states), retain_length, 6, 0),
                  Component("forget1", random_chain(rng, num_states), forget_lengths[0], 4, 0, role="forget"),
                  Component("forget2", random_chain(rng, num_states), forget_lengths[1], 4, 0, role="forget"))
    train, _ = MixtureSpec(components, seed=seed).sample()
    models = {
        "tabular": TabularMarkov(rng.normal(size=num_states), rng.normal(size=(num_states, num_states))),
        "mixture": MixtureOfChains(rng.normal(size=2), rng.normal(size=(2, num_states)),
                                   rng.normal(size=(2, num_states, num_states))),
    }
    reference = MixtureOfChains.from_components(components)
    return train.select("forget1", "forget2"), train.select("retain"), models, reference


def autograd_gradients(model, objective, *args):
    params = [p.clone().requires_grad_(True) for p in model.parameters()]
    value = objective_value(model.with_parameters(*params), objective, *args)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def directional_finite_difference(model, objective, direction, args, step=1e-5):
    shifted = [[p + sign * step * d for p, d in zip(model.parameters(), direction)] for sign in (1, -1)]
    values = [objective_value(model.with_parameters(*params), objective, *args) for params in shifted]
    return float(values[0] - values[1]) / (2 * step)


@settings(max_examples=12, deadline=None)
@given(exact_problems(), st.sampled_from(["tabular", "mixture"]), st.integers(0, 10**6))
def test_closed_form_equals_autograd_equals_finite_differences(problem, model_name, seed):
    forget, retain, models, reference = problem
    model = models[model_name]
    args = (forget, retain, reference.response_logps(forget), next_token_log_probs(reference, retain))
    rng = np.random.default_rng(seed)
    for name in OBJECTIVES:
        objective = get_objective(name, beta=0.7) if "NPO" in name else OBJECTIVES[name]
        evaluation = objective_value_and_gradient(model, objective, *args)
        value, autograd = autograd_gradients(model, objective, *args)
        assert float(evaluation.value) == pytest.approx(float(value), rel=1e-12), name
        for closed, oracle in zip(evaluation.gradients, autograd):
            torch.testing.assert_close(closed, oracle, rtol=1e-9, atol=1e-12, msg=name)
        for _ in range(2):
            direction = [torch.as_tensor(rng.normal(size=p.shape)) for p in model.parameters()]
            analytic = sum(float((g * d).sum()) for g, d in zip(evaluation.gradients, direction))
            numeric = directional_finite_difference(model, objective, direction, args)
            assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9), name


def test_paper_chains_with_variable_lengths_and_padding():
    chains = block_chains(6, 0.2)
    components = (Component("retain", chains["retain"], 8, 10, 0),
                  Component("forget1", chains["forget1"], 8, 5, 0, role="forget"),
                  Component("forget2", chains["forget2"], 3, 5, 0, role="forget"))
    train, _ = MixtureSpec(components, seed=1).sample()
    forget, retain = train.select("forget1", "forget2"), train.select("retain")
    reference = MixtureOfChains.from_components(components)
    model = TabularMarkov.fit(train)
    args = (forget, retain, reference.response_logps(forget), next_token_log_probs(reference, retain))
    for objective in (OBJECTIVES["NPO+KL"], OBJECTIVES["SimNPO+KL"], Objective("ga_sum", "nll", 0.3, 2.0)):
        evaluation = objective_value_and_gradient(model, objective, *args)
        _, autograd = autograd_gradients(model, objective, *args)
        for closed, oracle in zip(evaluation.gradients, autograd):
            torch.testing.assert_close(closed, oracle, rtol=1e-9, atol=1e-12)


def test_npo_weights_are_one_at_the_reference():
    forget, retain, _, reference = small_problem(3)
    ref_logps = reference.response_logps(forget)
    evaluation = objective_value_and_gradient(reference, OBJECTIVES["NPO"], forget, retain, ref_logps)
    torch.testing.assert_close(evaluation.forget_weights, torch.ones(len(forget), dtype=torch.float64))


def test_missing_inputs_raise_clear_errors():
    forget, retain, models, reference = small_problem(0)
    with pytest.raises(ValueError, match="forget_ref_logps"):
        objective_value_and_gradient(models["tabular"], OBJECTIVES["NPO"], forget)
    with pytest.raises(ValueError, match="retain SequenceSet"):
        objective_value_and_gradient(models["tabular"], OBJECTIVES["GradDiff"], forget)
    with pytest.raises(ValueError, match="retain_ref_log_probs"):
        objective_value_and_gradient(models["tabular"], OBJECTIVES["SimNPO+KL"], forget, retain)
    with pytest.raises(TypeError, match="Objective"):
        objective_value_and_gradient(models["tabular"], "NPO", forget)
