"""The one power-share rule (markovsim.diagnostics.power_shares) and the shared Evaluator protocol."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from markovsim.diagnostics import power_shares
from markovsim.dynamics import DynamicsConfig, unlearn
from markovsim.evaluation import Evaluator, ExactEvaluator
from markovsim.objectives import get_objective
from markovsim.scenarios import SCENARIOS, prepare


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1e6), st.booleans()), min_size=1, max_size=8))
def test_power_shares_sum_to_one_over_components_with_data_and_are_nan_elsewhere(pairs):
    norms, has_data = (np.array(column) for column in zip(*pairs))
    shares = power_shares(norms, has_data)
    assert np.all(np.isnan(shares[~has_data]))
    if norms[has_data].sum() > 0:
        assert shares[has_data].sum() == pytest.approx(1.0)
        assert np.all(shares[has_data] >= 0)
        np.testing.assert_allclose(shares[has_data], norms[has_data] / norms[has_data].sum())
    else:
        assert np.all(np.isnan(shares))


def test_a_component_with_data_but_no_gradient_has_share_zero_and_one_without_data_nan():
    np.testing.assert_array_equal(power_shares([3.0, 0.0, 7.0], [True, True, False]), [1.0, 0.0, np.nan])
    with pytest.raises(ValueError, match="shape"):
        power_shares([1.0, 2.0], [True])


@pytest.fixture(scope="module")
def setup():
    return prepare(SCENARIOS["paper_short_forget2"].scaled(0.01), "tabular")


def test_simulator_gives_nan_power_share_to_a_component_without_training_data(setup):
    trajectory = unlearn(setup.reference, get_objective("NPO"), setup.forget, None, setup.reference,
                         DynamicsConfig(steps=1), setup.evaluator)
    shares = trajectory.component_metrics["power_share"][0]
    retain = setup.test.component_names.index("retain")
    assert np.isnan(shares[retain])
    assert np.nansum(shares) == pytest.approx(1.0)


def test_evaluators_follow_the_protocol_and_its_construction_order(setup):
    from llm.evaluate import Evaluator as TransformerEvaluator

    exact = ExactEvaluator(setup.test, setup.true_chains, setup.retrained, setup.reference)
    assert isinstance(exact, Evaluator)
    metrics = exact.evaluate(setup.reference)
    assert set(metrics) >= {"kl_true", "kl_retrained", "kl_reference", "logp_per_token"}
    assert all(values.shape == (len(exact.component_names),) for values in metrics.values())
    assert np.allclose(metrics["kl_reference"], 0.0, atol=1e-12)
    only_test = ExactEvaluator(setup.test).evaluate(setup.reference)
    assert np.all(np.isnan(only_test["kl_true"])) and np.all(np.isnan(only_test["kl_reference"]))
    assert isinstance(TransformerEvaluator(setup.test, setup.true_chains), Evaluator)


def test_resolve_device(monkeypatch):
    import torch

    from markovsim.runtime import resolve_device

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda"
