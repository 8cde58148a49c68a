"""Several seeds of a transformer source as batched replicas: a figure's seed band in one computation.

For seeds s_1..s_S of one scenario and preset (each seed its own sampled data, as
:func:`paper_figures.transformer_runs.transformer_runs`):

1. the S reference models pre-train as replicas of one computation (``llm.pretrain_replicas``,
   replica k on seed s_k's pre-training sequences, initialisation seed s_k), then the S retrained
   models likewise on the retain sequences (initialisation seed s_k + 1000); models already kept in
   the model folder are loaded instead;
2. every (seed, method) pair unlearns as one replica of one computation (``llm.unlearn_replicas``
   with each replica's own forget and retain sets and its seed's evaluator).

Replicas run in float32, so each seed's numbers equal its float32 single runs to rounding (the
``llm`` replica tests; here the test compares with ``transformer_runs`` seed by seed). On a GPU this
is what makes a seed band cost about one run (benchmarks/RESULTS.md, "Batched replicas"); on a CPU
the runs are compute-bound and the figures run seeds one by one. The figures call this for the
transformer jobs of ``--device cuda`` (:func:`paper_figures.runs.precompute_runs`).
"""

from __future__ import annotations

import copy
import dataclasses
import os

from .transformer_runs import (
    RETRAINED_SEED_OFFSET,
    TransformerSettings,
    finish_setup,
    keep_model,
    kept_model,
    model_folder,
    seed_data,
    train_configs,
)


def seed_band_runs(scenario_name: str, scale: float, settings: TransformerSettings, seeds, device: str = "cuda",
                   methods=None, progress: bool = True, model_dir: str | None = None,
                   recompute: bool = False) -> list[tuple[dict, dict]]:
    """``[({method: Trajectory}, {component: retrained kl_true}) for each seed]`` (module docstring).

    ``settings.seed`` is replaced by each seed; ``model_dir`` keeps each seed's models in the folder
    ``prepare_transformer`` uses (both train in float32, ``transformer_runs.train_configs``).
    """
    from llm.replica_training import unlearn_replicas

    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: pass at least one seed")
    pretraining_config, unlearning_config = train_configs(settings, device, progress)  # float32, as replicas
    data = [seed_data(scenario_name, scale, seed) for seed in seeds]
    shapes = {(d.vocab_size, d.max_length, len(d.pretraining), len(d.forget), len(d.retain)) for d in data}
    if len(shapes) != 1:
        raise ValueError(f"the seeds' samples differ in shape {sorted(shapes)}; batched seeds need one vocabulary, "
                         f"length and set sizes")
    configs = [dataclasses.replace(pretraining_config, seed=seed) for seed in seeds]
    folders = [model_folder(model_dir, scenario_name, scale, device, settings.preset, seed, config)
               for seed, config in zip(seeds, configs)]
    references = _pretrained_replicas(settings.preset, seeds, [d.pretraining for d in data], configs, data[0],
                                      folders, "reference", recompute)
    retrained = _pretrained_replicas(settings.preset, [seed + RETRAINED_SEED_OFFSET for seed in seeds],
                                     [d.retain for d in data], configs, data[0], folders, "retrained", recompute)
    setups = [finish_setup(d, reference, model, dataclasses.replace(unlearning_config, seed=seed),
                           settings.evaluation_subsample)
              for d, reference, model, seed in zip(data, references, retrained, seeds)]
    objectives = data[0].scenario.with_methods(methods or list(data[0].scenario.methods))
    pairs = [(setup, name, objective) for setup in setups for name, objective in objectives.items()]
    trajectories = unlearn_replicas([copy.deepcopy(setup.reference) for setup, _, _ in pairs],
                                    [objective for _, _, objective in pairs], [setup.forget for setup, _, _ in pairs],
                                    [setup.retain for setup, _, _ in pairs],
                                    [setup.unlearning_config for setup, _, _ in pairs],
                                    [setup.evaluator for setup, _, _ in pairs])
    per_seed = len(objectives)
    return [(dict(zip(objectives, trajectories[k * per_seed: (k + 1) * per_seed])), setup.retrained_kl)
            for k, setup in enumerate(setups)]


def _pretrained_replicas(preset: str, init_seeds: list[int], sequences: list, configs: list, shape, folders: list,
                         name: str, recompute: bool) -> list:
    """Each seed's model ``name`` ("reference" or "retrained"): loaded from its folder where kept (unless
    ``recompute``, once per process), the others pre-trained together as replicas, each on its own
    sequences, and kept (written atomically)."""
    from llm import build_model
    from llm.replica_pretraining import pretrain_replicas

    paths = [None if folder is None else os.path.join(folder, name) for folder in folders]
    models = [kept_model(path, recompute) for path in paths]
    missing = [k for k, model in enumerate(models) if model is None]
    for k in missing:
        models[k] = build_model(preset, shape.vocab_size, shape.max_length, seed=init_seeds[k])
    if missing:
        pretrain_replicas([models[k] for k in missing], [sequences[k] for k in missing], [configs[k] for k in missing])
        for k in missing:
            keep_model(models[k], paths[k], configs[k].progress)
    return models
