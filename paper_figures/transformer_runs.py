"""The transformer side of the shared figures: the same scenario, data and objectives on a real LM.

For a scenario and a seed: sample its data (the simulator's ``MixtureSpec`` with that seed, so the
simulator sees the same sequences), pre-train a transformer on the pre-training components,
retrain a fresh one on retain only, then unlearn each method from a copy of the pre-trained model
with ``llm.unlearn``, evaluating after every step on the scenario's test sets with the simulator's
metrics (KL from the true chains, to the retrained and reference models).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from markovsim.scenarios import SCENARIOS

# Initialisation seed offset of the retrained model (the reference uses the run's seed itself).
RETRAINED_SEED_OFFSET = 1000


@dataclass(frozen=True)
class TransformerSettings:
    """The paper's synthetic setup (docs/theory.md, "The paper's synthetic experiment") by default.

    Pre-training and retraining: 5 epochs, batch 128, lr 5e-4. Unlearning: 50 steps of 4 forget
    sequences, lr 5e-4, evaluated after every step. Optimiser: the legacy ``transformers.AdamW``
    (``adamw_legacy``, eps 1e-6, no weight decay), no gradient clipping. ``seed`` sets the data,
    the initialisations (reference: seed, retrained: seed + 1000) and the batch order.
    ``diagnostics_max_sequences``: the forget-weight / power-share subsample per component.
    ``evaluation_subsample``: None (the paper's: every test sequence) or a fixed seeded subset of that many
    test sequences for the every-step metrics and the retrained levels (cheaper previews; the KLs are then
    estimates). Runs are float32 on every device (``mixed_precision="no"``).
    """

    preset: str = "paper-synthetic"
    pretrain_epochs: float = 5.0
    pretrain_batch_size: int = 128
    pretrain_learning_rate: float = 5e-4
    unlearn_steps: int = 50
    unlearn_batch_size: int = 4
    unlearn_learning_rate: float = 5e-4
    eval_every: int = 1
    optimizer: str = "adamw_legacy"
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    diagnostics_max_sequences: int | None = 256
    evaluation_subsample: int | None = None
    seed: int = 0


def train_configs(settings: TransformerSettings, device: str, progress: bool):
    from llm import TrainConfig

    # float32 on every device (a model this small gains nothing from bf16 autocast on a GPU), so single
    # runs, batched replicas (always float32) and CPU runs compute the same thing
    common = dict(device=device, progress=progress, num_threads=1 if device == "cpu" else None,
                  optimizer=settings.optimizer, adam_eps=settings.adam_eps, weight_decay=settings.weight_decay,
                  max_grad_norm=settings.max_grad_norm, seed=settings.seed, mixed_precision="no",
                  divergence_logp_per_token=None)  # the paper's runs never stop early (cached numbers rely on it)
    pretraining = TrainConfig(learning_rate=settings.pretrain_learning_rate, batch_size=settings.pretrain_batch_size,
                              epochs=settings.pretrain_epochs, **common)
    unlearning = TrainConfig(learning_rate=settings.unlearn_learning_rate, batch_size=settings.unlearn_batch_size,
                             steps=settings.unlearn_steps, eval_every=settings.eval_every,
                             diagnostics_max_sequences=settings.diagnostics_max_sequences, **common)
    return pretraining, unlearning


@dataclass(frozen=True)
class TransformerSetup:
    """One seed of a scenario on a transformer, ready to unlearn (the transformer's ``scenarios.Setup``)."""

    scenario: object
    forget: object
    retain: object
    reference: object
    retrained: object
    evaluator: object
    retrained_kl: dict
    unlearning_config: object


_FRESH: set[str] = set()  # model folders (re)trained by this process (``recompute`` retrains each once)


def kept_model(folder: str | None, recompute: bool = False):
    """The model kept in ``folder``, or None when there is none (or ``recompute`` asks to retrain it, once
    per process)."""
    from llm import load_model

    if folder is not None and os.path.isfile(os.path.join(folder, "config.json")) and \
            not (recompute and folder not in _FRESH):
        return load_model(folder)
    return None


def keep_model(model, folder: str | None, progress: bool) -> None:
    """Write ``model`` to ``folder`` (atomically: temporary folder + rename) and mark it as trained here."""
    from llm.models import save_model

    if folder is not None:
        save_model(model, folder, progress=progress)
        _FRESH.add(folder)


def _pretrained(preset: str, seed: int, sequences, config, vocab_size: int, max_length: int, folder: str | None,
                recompute: bool = False):
    """A model of ``preset`` pre-trained on ``sequences``; kept in ``folder`` and loaded from there next time,
    unless ``recompute`` (then retrained once per process)."""
    from llm import build_model, pretrain

    model = kept_model(folder, recompute)
    if model is None:
        model = build_model(preset, vocab_size, max_length, seed=seed)
        pretrain(model, sequences, config)
        keep_model(model, folder, config.progress)
    return model


@dataclass(frozen=True)
class SeedData:
    """One seed's sample of a scenario: what its transformer runs train and evaluate on."""

    scenario: object
    spec: object
    forget: object
    retain: object
    pretraining: object
    test: object
    vocab_size: int
    max_length: int


def seed_data(scenario_name: str, scale: float, seed: int) -> SeedData:
    """Sample the scenario at ``scale`` with data seed ``seed`` (the simulator sees the same sequences)."""
    scenario = SCENARIOS[scenario_name].scaled(scale)
    spec = dataclasses.replace(scenario.spec, seed=seed)
    train, test = spec.sample()
    return SeedData(scenario, spec, train.select(*spec.names_where(role="forget")),
                    train.select(*spec.names_where(role="retain")),
                    train.select(*spec.names_where(in_pretraining=True)), test, spec.num_states + 1,
                    train.max_length + 1)


def model_folder(model_dir: str | None, scenario_name: str, scale: float, device: str, preset: str, seed: int,
                 pretraining_config) -> str | None:
    """Where a seed's reference and retrained models are kept: ``model_dir/<hash of everything that determines
    them>`` (scenario, scale, preset, seed, pre-training settings, device), or None without ``model_dir``."""
    if model_dir is None:
        return None
    identity = {"scenario": scenario_name, "scale": scale, "device": device, "preset": preset, "seed": seed,
                "pretraining": dataclasses.asdict(dataclasses.replace(pretraining_config, progress=True))}
    return os.path.join(model_dir, hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12])


def finish_setup(data: SeedData, reference, retrained, unlearning_config,
                 evaluation_subsample: int | None = None) -> TransformerSetup:
    """The seed's evaluator (true chains, retrained and reference targets; on ``evaluation_subsample`` test
    sequences, None = all) and retrained levels."""
    from llm import Evaluator

    evaluator = Evaluator(data.test, true_chains={c.name: c.chain for c in data.spec.components},
                          retrained=retrained, reference=reference, batch_size=unlearning_config.eval_batch_size,
                          evaluation_subsample=evaluation_subsample, subsample_seed=data.spec.seed)
    retrained_kl = dict(zip(evaluator.component_names, np.asarray(evaluator.evaluate(retrained)["kl_true"]).tolist()))
    return TransformerSetup(data.scenario, data.forget, data.retain, reference, retrained, evaluator, retrained_kl,
                            unlearning_config)


def prepare_transformer(scenario_name: str, scale: float, settings: TransformerSettings, device: str = "cpu",
                        progress: bool = True, model_dir: str | None = None,
                        recompute: bool = False) -> TransformerSetup:
    """Sample the seed's data, pre-train the reference and retrain the retain-only model (or load them).

    ``model_dir``: a folder where both models are kept under a hash of everything that determines
    them (scenario, scale, preset, seed, pre-training settings, device), so figures share them.
    """
    data = seed_data(scenario_name, scale, settings.seed)
    pretraining_config, unlearning_config = train_configs(settings, device, progress)
    folder = model_folder(model_dir, scenario_name, scale, device, settings.preset, settings.seed, pretraining_config)
    reference = _pretrained(settings.preset, settings.seed, data.pretraining, pretraining_config, data.vocab_size,
                            data.max_length, None if folder is None else os.path.join(folder, "reference"), recompute)
    retrained = _pretrained(settings.preset, settings.seed + RETRAINED_SEED_OFFSET, data.retain, pretraining_config,
                            data.vocab_size, data.max_length,
                            None if folder is None else os.path.join(folder, "retrained"), recompute)
    return finish_setup(data, reference, retrained, unlearning_config, settings.evaluation_subsample)


def transformer_runs(scenario_name: str, scale: float, settings: TransformerSettings, device: str = "cpu",
                     methods=None, progress: bool = True, model_dir: str | None = None, recompute: bool = False):
    """One seed of a scenario on a transformer: ``({method: Trajectory}, {component: retrained kl_true})``,
    the methods one after another (:func:`paper_figures.seed_bands.seed_band_runs` runs them, and seeds, as
    replicas of one computation).
    """
    from llm import unlearn

    setup = prepare_transformer(scenario_name, scale, settings, device, progress, model_dir, recompute)
    objectives = setup.scenario.with_methods(methods or list(setup.scenario.methods))
    runs = {method: unlearn(copy.deepcopy(setup.reference), objective, setup.forget, setup.retain,
                            setup.unlearning_config, setup.evaluator)
            for method, objective in objectives.items()}
    return runs, setup.retrained_kl
