"""llm.train.unlearn's ``power_share``: the simulator's definition (exact on the bridged tabular model),
no effect on the run, and a subsampled estimate on a real transformer."""

import copy

import numpy as np
import pytest
import torch

from llm.bridge import TabularCausalLM
from llm.evaluate import Evaluator
from llm.models import build_config, build_model
from llm.train import TrainConfig, unlearn
from markovsim.dynamics import DynamicsConfig
from markovsim.dynamics import unlearn as exact_unlearn
from markovsim.evaluation import ExactEvaluator
from markovsim.losses import OBJECTIVES
from markovsim.scenarios import SCENARIOS, prepare

CPU = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def tabular_setup():
    return prepare(SCENARIOS["paper_short_forget2"].scaled(0.005), "tabular")


def dropout_gpt2(seed: int = 0):
    """tiny-gpt2 with dropout, so a tracker that consumed the torch RNG would change the run."""
    from transformers import AutoModelForCausalLM

    config = build_config("tiny-gpt2", 11, 21)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", ["NPO", "SimNPO", "NPO+RT", "SimNPO+KL"])
def test_power_share_on_the_bridged_tabular_model_equals_the_simulators(tabular_setup, name):
    setup = tabular_setup
    objective, steps, learning_rate = OBJECTIVES[name], 4, 0.05
    exact = exact_unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                          DynamicsConfig(optimizer="adamw", learning_rate=learning_rate, steps=steps, eval_every=1),
                          evaluator=ExactEvaluator(setup.test, setup.true_chains, reference=setup.reference))
    config = TrainConfig(learning_rate=learning_rate, batch_size=len(setup.forget), retain_batch_size=len(setup.retain),
                         steps=steps, eval_every=1, max_grad_norm=None, weight_decay=0.0, eval_batch_size=7,
                         diagnostics_max_sequences=None, **CPU)
    ours = unlearn(TabularCausalLM(setup.reference), objective, setup.forget, setup.retain, config,
                   evaluator=Evaluator(setup.test, setup.true_chains))
    assert ours.component_names == exact.component_names and np.array_equal(ours.steps, exact.steps)
    expected = exact.component_metrics["power_share"]
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(ours.component_metrics["power_share"], expected, rtol=1e-8, atol=1e-12)
    retain = ours.component_names.index("retain")
    assert np.all(ours.component_metrics["power_share"][:, retain] > 0) == (objective.retain is not None)


@pytest.mark.parametrize("model_builder, name", [(dropout_gpt2, "NPO+KL"), (dropout_gpt2, "SimNPO+RT")])
def test_tracking_the_power_share_does_not_change_the_run(data, model_builder, name):
    start = model_builder()
    runs, models = [], []
    for track in (True, False):
        model = copy.deepcopy(start)
        config = TrainConfig(learning_rate=2e-3, batch_size=8, steps=4, eval_every=2, track_power_share=track,
                             diagnostics_max_sequences=16, eval_batch_size=10, **CPU)
        runs.append(unlearn(model, OBJECTIVES[name], data["forget"], data["retain"], config,
                            evaluator=Evaluator(data["test"], data["chains"])))
        models.append(model)
    tracked, untracked = runs
    np.testing.assert_array_equal(tracked.step_metrics["loss"], untracked.step_metrics["loss"])
    for metric in ("kl_true", "logp_per_token", "mean_weight"):
        np.testing.assert_array_equal(tracked.component_metrics[metric], untracked.component_metrics[metric])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert np.all(np.isfinite(tracked.component_metrics["power_share"]))
    assert np.all(np.isnan(untracked.component_metrics["power_share"]))


@pytest.mark.parametrize("name, forget_names, with_retain", [
    ("SimNPO+RT", ("forget1", "forget2"), True),  # every component present
    ("NPO+KL", ("forget1",), True),               # forget2 has no training sequences
    ("NPO", ("forget2",), False)])                # no retain set: forget2 holds all the power
def test_subsampled_power_share_on_a_transformer_is_a_distribution_over_present_components(data, name, forget_names,
                                                                                          with_retain):
    forget = data["forget"].select(*forget_names)
    retain = data["retain"] if with_retain else None
    config = TrainConfig(learning_rate=2e-3, batch_size=8, steps=2, eval_every=1, diagnostics_max_sequences=12,
                         eval_batch_size=5, **CPU)
    trajectory = unlearn(build_model("tiny-gpt2", 11, 21, seed=0), OBJECTIVES[name], forget, retain, config,
                         evaluator=Evaluator(data["test"], data["chains"]))
    shares = trajectory.component_metrics["power_share"]  # (E, C)
    present = np.array([n in forget_names or (with_retain and n == "retain") for n in trajectory.component_names])
    assert shares.shape == (3, len(present)) and present.all() == (len(forget_names) == 2 and with_retain)
    assert np.all(np.isnan(shares[:, ~present]))
    assert np.all(np.isfinite(shares[:, present]))
    assert np.all((shares[:, present] >= 0) & (shares[:, present] <= 1))
    np.testing.assert_allclose(shares[:, present].sum(1), 1.0, rtol=1e-6)
    assert np.all(shares[:, present] > 0)


def test_a_subsample_at_least_as_large_as_the_data_gives_the_exact_share(data):
    shares = []
    for limit in (None, 10_000):
        config = TrainConfig(learning_rate=2e-3, batch_size=8, steps=2, eval_every=1, diagnostics_max_sequences=limit,
                             eval_batch_size=64, **CPU)
        trajectory = unlearn(build_model("tiny-gpt2", 11, 21, seed=0), OBJECTIVES["NPO+RT"], data["forget"],
                             data["retain"], config)
        shares.append(trajectory.component_metrics["power_share"])
    np.testing.assert_allclose(shares[0], shares[1], rtol=1e-5)
    with pytest.raises(ValueError, match="diagnostics_max_sequences"):
        TrainConfig(diagnostics_max_sequences=0)


def test_subsampled_components_are_scaled_to_estimate_the_full_set_sum(tabular_setup):
    """forget1 (20 sequences) is subsampled to 8 and scaled by 20 / 8; forget2 (8) is used whole.

    Unscaled, forget1's share would fall from ~0.45 to ~0.25; scaled, it stays within sampling error."""
    setup = tabular_setup
    ids, names = np.asarray(setup.forget.component_ids), setup.forget.component_names
    forget2 = np.flatnonzero(ids == names.index("forget2"))[:8]
    forget = setup.forget.subset(np.sort(np.concatenate([np.flatnonzero(ids == names.index("forget1")), forget2])))
    assert forget.component_counts()["forget1"] == 20
    shares = {}
    for limit in (None, 8):
        config = TrainConfig(learning_rate=0.05, batch_size=8, steps=0, diagnostics_max_sequences=limit, **CPU)
        trajectory = unlearn(TabularCausalLM(setup.reference), OBJECTIVES["GA"], forget, None, config,
                             evaluator=Evaluator(setup.test, setup.true_chains))
        shares[limit] = trajectory.component_metrics["power_share"][0]
    column = trajectory.component_names.index("forget1")
    assert abs(shares[8][column] - shares[None][column]) < 0.1
