"""Minibatch unlearning (``DynamicsConfig(batch_size=...)``): the closed-form run against the autograd run, and
the transformer loop on the bridged tabular model against the simulator, batch for batch.

The simulator draws each step's rows with ``numpy`` (``markovsim.dynamics.Problem.batch``), the transformer loop
with ``llm.data.batch_indices``; here the loop is handed the rows the simulator drew, so both take the same
minibatch steps and must give the same trajectory (float64 both sides).
"""

import numpy as np
import pytest

from llm.bridge import TabularCausalLM
from llm.evaluate import Evaluator
from llm.train import TrainConfig
from llm.train import unlearn as llm_unlearn
from markovsim import dynamics
from markovsim.dynamics import DynamicsConfig, unlearn
from markovsim.evaluation import ExactEvaluator
from markovsim.objectives import OBJECTIVES, get_objective
from markovsim.scenarios import SCENARIOS, prepare

BATCH = 8  # of 40 forget (lengths 20 and 5) and 40 retain sequences at this scale


@pytest.fixture(scope="module", params=["tabular", "mixture"])
def setup(request):
    return prepare(SCENARIOS["paper_short_forget2"].scaled(0.005), request.param)


def objective(name: str):
    return get_objective(name, beta=0.5) if "NPO" in name else OBJECTIVES[name]


@pytest.mark.parametrize("method, optimizer", [("NPO+KL", "gd"), ("SimNPO+RT", "adamw"), ("GA", "adamw_legacy"),
                                               ("NPO", "gd")])
def test_minibatch_closed_form_runs_equal_autograd_runs(setup, method, optimizer):
    config = dict(steps=5, batch_size=BATCH, seed=3, optimizer=optimizer,
                  learning_rate=0.1 if optimizer == "gd" else 0.05)
    runs = [unlearn(setup.reference, objective(method), setup.forget, setup.retain, setup.reference,
                    DynamicsConfig(gradient=gradient, **config), setup.evaluator)
            for gradient in ("closed_form", "autograd")]
    closed, oracle = runs
    np.testing.assert_allclose(oracle.step_metrics["loss"], closed.step_metrics["loss"], rtol=1e-10)
    for name in ("kl_true", "logp_per_token", "mean_weight"):
        np.testing.assert_allclose(oracle.component_metrics[name], closed.component_metrics[name], rtol=1e-9,
                                   err_msg=name)
    full = unlearn(setup.reference, objective(method), setup.forget, setup.retain, setup.reference,
                   DynamicsConfig(**(config | {"batch_size": None})), setup.evaluator)
    assert not np.allclose(full.component_metrics["kl_true"][1:], closed.component_metrics["kl_true"][1:],
                           rtol=1e-6)  # minibatches took other steps than the full batch


class RecordingGenerator:
    """A ``numpy`` generator that records the rows each ``choice`` call returns (and draws as the original)."""

    def __init__(self, rng, calls: list):
        self.rng, self.calls = rng, calls

    def choice(self, *args, **kwargs):
        rows = self.rng.choice(*args, **kwargs)
        self.calls.append(np.array(rows))
        return rows


@pytest.mark.parametrize("method", ["NPO", "SimNPO+RT", "NPO+KL", "GradDiff"])
def test_minibatch_transformer_loop_on_the_bridged_tabular_model_follows_the_simulator(method, monkeypatch):
    from llm import unlearning
    from llm.data import FORGET_STREAM, RETAIN_STREAM

    setup = prepare(SCENARIOS["paper_short_forget2"].scaled(0.005), "tabular")
    steps, learning_rate, seed = 6, 0.05, 11
    drawn = []  # per step: [forget rows, retain rows]
    original_batch = dynamics.Problem.batch

    def recorded_batch(self, rng, batch_size):
        if rng is None or batch_size is None:  # the full batch (diagnostics)
            return original_batch(self, rng, batch_size)
        calls = []
        batch = original_batch(self, RecordingGenerator(rng, calls), batch_size)
        drawn.append(calls)
        return batch

    monkeypatch.setattr(dynamics.Problem, "batch", recorded_batch)
    exact = unlearn(setup.reference, objective(method), setup.forget, setup.retain, setup.reference,
                    DynamicsConfig(optimizer="adamw", learning_rate=learning_rate, steps=steps, eval_every=1,
                                   batch_size=BATCH, seed=seed),
                    evaluator=ExactEvaluator(setup.test, setup.true_chains, reference=setup.reference))
    assert len(drawn) == steps + 1 and all(len(calls) == 2 for calls in drawn)  # forget and retain rows each step
    assert len({tuple(calls[0]) for calls in drawn}) == steps + 1  # a different forget batch every step

    def simulator_rows(num_items, batch_size, step, seed_, stream=0):
        assert batch_size == BATCH and seed_ == seed
        rows = drawn[step][{FORGET_STREAM: 0, RETAIN_STREAM: 1}[stream]]
        assert num_items == (len(setup.forget) if stream == FORGET_STREAM else len(setup.retain))
        return rows

    monkeypatch.setattr(unlearning, "batch_indices", simulator_rows)
    config = TrainConfig(optimizer="adamw", learning_rate=learning_rate, batch_size=BATCH, retain_batch_size=BATCH,
                         steps=steps, eval_every=1, max_grad_norm=None, weight_decay=0.0, seed=seed, device="cpu",
                         progress=False)
    ours = llm_unlearn(TabularCausalLM(setup.reference), objective(method), setup.forget, setup.retain, config,
                       evaluator=Evaluator(setup.test, setup.true_chains))
    assert np.array_equal(ours.steps, exact.steps)
    np.testing.assert_allclose(ours.step_metrics["loss"], exact.step_metrics["loss"], rtol=1e-8, atol=1e-10)
    for metric in ("kl_true", "logp_per_token", "mean_weight", "power_share"):
        np.testing.assert_allclose(ours.component_metrics[metric], exact.component_metrics[metric], rtol=1e-8,
                                   atol=1e-10, err_msg=metric)
    np.testing.assert_allclose(ours.step_metrics["parameter_distance"], exact.step_metrics["parameter_distance"],
                               rtol=1e-8, atol=1e-12)
