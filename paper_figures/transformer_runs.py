"""The transformer side of the shared figures: the same scenario, data and objectives on a real LM.

For a scenario: sample its data (the simulator's ``MixtureSpec``, same seed), pre-train a
transformer on the pre-training components, retrain a fresh one on retain only, then unlearn each
method from a copy of the pre-trained model with ``llm.unlearn``, evaluating on the scenario's test
sets with the simulator's metrics (KL from the true chains, to the retrained and reference models).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from markovsim.scenarios import SCENARIOS


@dataclass(frozen=True)
class TransformerSettings:
    """Paper setup (THEORY.md section 5): paper-gpt2, 5 epochs batch 128 lr 5e-4; unlearning batch 4, lr 5e-4."""

    preset: str = "paper-gpt2"
    pretrain_epochs: float = 5.0
    pretrain_batch_size: int = 128
    pretrain_learning_rate: float = 5e-4
    unlearn_steps: int = 50
    unlearn_batch_size: int = 4
    unlearn_learning_rate: float = 5e-4
    eval_every: int = 1
    seed: int = 0


def transformer_runs(scenario_name: str, scale: float, settings: TransformerSettings, device: str = "cpu",
                     methods=None):
    """Returns ``({"transformer": {method: Trajectory}}, {"transformer": {component: retrained kl_true}})``."""
    from llm import Evaluator, TrainConfig, build_model, pretrain, retrain, unlearn

    scenario = SCENARIOS[scenario_name].scaled(scale)
    spec = dataclasses.replace(scenario.spec, seed=settings.seed)
    train, test = spec.sample()
    forget = train.select(*spec.names_where(role="forget"))
    retain = train.select(*spec.names_where(role="retain"))
    pretraining = train.select(*spec.names_where(in_pretraining=True))
    vocab_size, max_length = spec.num_states + 1, train.max_length + 1
    common = {"device": device, "progress": True, "num_threads": 1 if device == "cpu" else None}
    pretraining_config = TrainConfig(learning_rate=settings.pretrain_learning_rate, batch_size=settings.pretrain_batch_size,
                                     epochs=settings.pretrain_epochs, seed=settings.seed, **common)
    reference = build_model(settings.preset, vocab_size, max_length, seed=settings.seed)
    pretrain(reference, pretraining, pretraining_config)
    retrained = build_model(settings.preset, vocab_size, max_length, seed=settings.seed + 1)
    retrain(retrained, retain, pretraining_config)
    evaluator = Evaluator(test, true_chains={c.name: c.chain for c in spec.components}, retrained=retrained,
                          reference=reference)
    retrained_kl = dict(zip(evaluator.component_names, np.asarray(evaluator.evaluate(retrained)["kl_true"]).tolist()))
    unlearning_config = TrainConfig(learning_rate=settings.unlearn_learning_rate, batch_size=settings.unlearn_batch_size,
                                    steps=settings.unlearn_steps, eval_every=settings.eval_every, seed=settings.seed,
                                    **common)
    runs = {}
    for method, objective in scenario.with_methods(methods or list(scenario.methods)).items():
        runs[method] = unlearn(copy.deepcopy(reference), objective, forget, retain, unlearning_config, evaluator)
    return {"transformer": runs}, {"transformer": retrained_kl}
