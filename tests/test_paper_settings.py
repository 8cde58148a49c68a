"""The paper's synthetic setup, pinned number by number against docs/theory.md ("The paper's synthetic
experiment", checked against the official code): a changed default would silently change every Fig. 5 number."""

import numpy as np
import pytest

from markovsim.chains import block_chains
from markovsim.scenarios import SCENARIOS

# docs/theory.md: V = 10, eps = 0.2; 10000 retain, 5000 forget1, 5000 forget2, 80/20 train/test
COUNTS = {"retain": (8000, 2000), "forget1": (4000, 1000), "forget2": (4000, 1000)}
CASES = {  # scenario: (lengths, forget2 pre-trained, NPO beta, SimNPO beta)
    "paper_short_forget2": ({"retain": 20, "forget1": 20, "forget2": 5}, True, 0.2, 4.0),
    "paper_unseen_forget2": ({"retain": 20, "forget1": 20, "forget2": 20}, False, 1.0, 4.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_two_cases_are_the_papers(name):
    lengths, forget2_pretrained, npo_beta, simnpo_beta = CASES[name]
    scenario = SCENARIOS[name]
    components = {c.name: c for c in scenario.spec.components}
    assert list(components) == ["retain", "forget1", "forget2"] and scenario.spec.num_states == 10
    for component_name, component in components.items():
        assert (component.num_train, component.num_test) == COUNTS[component_name]
        assert component.length == lengths[component_name]
        assert component.role == ("retain" if component_name == "retain" else "forget")
    assert components["forget2"].in_pretraining is forget2_pretrained
    assert components["retain"].in_pretraining and components["forget1"].in_pretraining
    chains = block_chains(num_states=10, leakage=0.2)
    assert list(chains) == ["retain", "forget1", "forget2"]
    for component_name, chain in chains.items():
        np.testing.assert_array_equal(components[component_name].chain.transition_matrix, chain.transition_matrix)
        np.testing.assert_array_equal(components[component_name].chain.initial_probs, chain.initial_probs)
    methods = scenario.methods
    assert (methods["NPO"].forget, methods["NPO"].beta, methods["NPO"].retain) == ("npo", npo_beta, None)
    assert (methods["SimNPO"].forget, methods["SimNPO"].beta, methods["SimNPO"].gamma) == ("simnpo", simnpo_beta, 0.0)
    assert methods["SimNPO"].retain is None and methods["GA"].forget == "ga"


def test_the_paper_presets_are_the_official_optimiser_settings():
    """Pre-training 5 epochs of batch 128 at lr 5e-4; unlearning 50 steps of batch 4 at lr 5e-4, every step
    evaluated; the legacy transformers.AdamW (eps 1e-6, no weight decay), no clipping, constant schedule."""
    from llm import PAPER_PRETRAINING, PAPER_UNLEARNING
    from paper_figures.transformer_runs import TransformerSettings, train_configs

    for config in (PAPER_PRETRAINING, PAPER_UNLEARNING):
        assert (config.optimizer, config.adam_eps, config.weight_decay, config.max_grad_norm) == \
            ("adamw_legacy", 1e-6, 0.0, None)
        assert (config.learning_rate, config.adam_betas, config.schedule, config.warmup_steps) == \
            (5e-4, (0.9, 0.999), "constant", 0)
    assert (PAPER_PRETRAINING.epochs, PAPER_PRETRAINING.batch_size, PAPER_PRETRAINING.steps) == (5.0, 128, None)
    assert (PAPER_UNLEARNING.steps, PAPER_UNLEARNING.batch_size, PAPER_UNLEARNING.eval_every) == (50, 4, 1)
    pretraining, unlearning = train_configs(TransformerSettings(), "cpu", progress=False)  # the figures' runs
    for ours, paper in ((pretraining, PAPER_PRETRAINING), (unlearning, PAPER_UNLEARNING)):
        for field in ("optimizer", "adam_eps", "weight_decay", "max_grad_norm", "learning_rate", "batch_size",
                      "epochs", "steps", "eval_every"):
            assert getattr(ours, field) == getattr(paper, field), field


def test_the_paper_scale_figure_runs_the_paper_setup():
    from paper_figures.markov_tradeoff import CASES, CONFIGS

    config = CONFIGS["paper"]
    assert list(CASES) == ["paper_short_forget2", "paper_unseen_forget2"]
    assert config.scale == 1.0 and config.simulator_steps == 50
    for settings in config.transformers:
        assert (settings.pretrain_epochs, settings.unlearn_steps, settings.unlearn_batch_size, settings.eval_every,
                settings.evaluation_subsample) == (5.0, 50, 4, 1, None)
