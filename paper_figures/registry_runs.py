"""The run sets of the ``other_methods`` figure: the registry methods beside ``markov_tradeoff``'s GA / NPO / SimNPO.

Three kinds of job, each cached once as ``cache/runs_<scenario>_<source>_seed<k>_<hash>.{json,npz}``
(:mod:`paper_figures.runs`): the baselines' (``runs.ScenarioRuns``, the same files as ``markov_tradeoff``'s
when the settings agree), ``registry_simulator`` (every registry method on one exact model and seed,
``markovsim.methods.run_method``) and ``registry_transformer`` (every registry method on one transformer
seed, ``llm.methods.markov.unlearn_method`` from ``transformer_runs.prepare_transformer``'s cached models).
``config`` below is an ``other_methods.Config``.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from llm.methods.markov import unlearn_method
from markovsim.methods import get_method, run_method, unseen_sequences
from markovsim.progress import progress_iter
from markovsim.scenarios import prepare

from . import markov_tradeoff
from .runs import ScenarioRuns, _execute, cached_runs, job_key, precompute_jobs, retrained_levels, seeded_scenario
from .transformer_runs import TransformerSettings, prepare_transformer

REGISTRY_KIND = "registry_simulator"
REGISTRY_TRANSFORMER_KIND = "registry_transformer"
CASES = markov_tradeoff.CASES


def baseline_runs(config, case: str) -> ScenarioRuns:
    """GA, NPO and SimNPO: ``markov_tradeoff``'s run sets (same job keys when the settings agree)."""
    transformers = () if config.transformer is None else (config.transformer,)
    return ScenarioRuns(case, config.scale, tuple(config.seeds), config.simulator_steps,
                        tuple(config.simulator_sources), transformers)


def registry_jobs(config, case: str) -> list[dict]:
    """One JSON-ready job per (seed, exact model class): every registry method of ``config`` on it."""
    return [{"kind": REGISTRY_KIND, "scenario": case, "scale": config.scale, "seed": seed, "source": source,
             "steps": config.simulator_steps, "methods": list(config.methods),
             "task_negation_points": config.task_negation_points}
            for seed in config.seeds for source in config.simulator_sources]


def registry_transformer_jobs(config, case: str, device: str) -> list[dict]:
    """One JSON-ready job per seed of ``config.registry_transformer_seeds``: the registry methods on the transformer."""
    if config.registry_transformer is None:
        return []
    return [{"kind": REGISTRY_TRANSFORMER_KIND, "scenario": case, "scale": config.scale, "seed": seed,
             "source": config.registry_transformer.preset, "device": device, "methods": list(config.methods),
             "settings": dataclasses.asdict(dataclasses.replace(config.registry_transformer, seed=seed)),
             "task_negation_points": config.task_negation_points}
            for seed in config.registry_transformer_seeds]


def task_negation_scales(method: str, points: int) -> np.ndarray | None:
    """TaskNegation's lambdas, ``points`` evenly from 0 to the registry's scale (None for the other methods)."""
    if get_method(method).kind != "update_rule":
        return None
    return np.linspace(0.0, get_method(method).config.scale, points)


def registry_transformer_runs(case: str, scale: float, settings: TransformerSettings, device: str, methods,
                              task_negation_points: int, progress: bool = True, model_dir: str | None = None,
                              recompute: bool = False):
    """The registry methods on one seed of a scenario on a transformer: ``({method: Trajectory}, levels)``.

    The reference and retrained models are ``transformer_runs.prepare_transformer``'s (the cached models of
    ``markov_tradeoff``'s runs when the settings agree); each method runs from a copy of the reference with
    ``llm.methods.markov.unlearn_method`` and the registry's transformer defaults; KGA's D_n is
    ``markovsim.methods.unseen_sequences(spec, len(forget), seed)`` with the data seed, as in the simulator
    (``run_method``'s default), so seed bands vary it.
    """
    setup = prepare_transformer(case, scale, settings, device, progress, model_dir, recompute)
    unseen = unseen_sequences(setup.scenario.spec, len(setup.forget), settings.seed)  # the data seed
    trajectories = {}
    for method in progress_iter(methods, len(methods), f"{case} {settings.preset} seed {settings.seed}", progress,
                                unit="method"):
        trajectories[method] = unlearn_method(copy.deepcopy(setup.reference), method, setup.forget, setup.retain,
                                              setup.unlearning_config, setup.evaluator,
                                              unseen=unseen if method == "KGA" else None,
                                              scales=task_negation_scales(method, task_negation_points))
    return trajectories, setup.retrained_kl


def registry_simulator_runs(case: str, scale: float, steps: int, methods, seed: int, source: str,
                            task_negation_points: int, progress: bool = False):
    """The registry methods on one exact model of a scenario: ``({source: {method: Trajectory}}, {source: levels})``.

    The data are the scenario's at ``scale`` with seed ``seed`` (as ``runs.simulator_runs``), the optimiser
    the scenario's with ``steps`` steps; TaskNegation is evaluated at ``task_negation_points`` lambdas.
    """
    scenario = seeded_scenario(case, scale, seed)
    dynamics = dataclasses.replace(scenario.dynamics, steps=steps)
    setup = prepare(scenario, source)
    levels = retrained_levels(setup)
    trajectories = {}
    for method in progress_iter(methods, len(methods), f"{case} {source} seed {seed}", progress, unit="method"):
        trajectories[method] = run_method(method, setup, dynamics, scales=task_negation_scales(method,
                                                                                         task_negation_points),
                                          progress=False)
    return {source: trajectories}, {source: levels}


def _execute_job(job: dict, progress: bool, cache_dir: str, recompute: bool = False):
    if job["kind"] == REGISTRY_KIND:
        return registry_simulator_runs(job["scenario"], job["scale"], job["steps"], job["methods"], job["seed"],
                                       job["source"], job["task_negation_points"], progress)
    if job["kind"] == REGISTRY_TRANSFORMER_KIND:
        trajectories, levels = registry_transformer_runs(
            job["scenario"], job["scale"], TransformerSettings(**job["settings"]), job["device"], job["methods"],
            job["task_negation_points"], progress, os.path.join(cache_dir, "models"), recompute)
        return {job["source"]: trajectories}, {job["source"]: levels}
    return _execute(job, progress, cache_dir, recompute)


def all_jobs(config, device: str) -> list[dict]:
    """Every run set of the figure: the baselines' (``markov_tradeoff``'s) and the registry methods'."""
    return [job for case in CASES for job in case_jobs(config, case, device)]


def case_jobs(config, case: str, device: str) -> list[dict]:
    """One case's run sets: the baselines', the registry methods' in the simulator and on the transformer."""
    return (baseline_runs(config, case).jobs(device) + registry_jobs(config, case)
            + registry_transformer_jobs(config, case, device))


def precompute(config, cache_dir: str, device: str, recompute: bool, jobs: int) -> None:
    """The run sets not cached yet, in ``jobs`` worker processes (transformers first: they take longest)."""
    precompute_jobs(all_jobs(config, device), cache_dir, recompute, jobs, _execute_job,
                    ("transformer", REGISTRY_TRANSFORMER_KIND))


def seeded_runs(config, case: str, cache_dir: str, device: str, recompute: bool) -> dict[str, list]:
    """``{source: [({method: Trajectory}, {component: retrained kl_true}) per seed]}``, baselines and registry
    methods merged per (source, seed)."""
    merged: dict[tuple[str, int], tuple[dict, dict]] = {}
    for job in case_jobs(config, case, device):
        runs, levels = cached_runs(cache_dir, job_key(job), job,
                                   lambda job=job: _execute_job(job, True, cache_dir, recompute), recompute)
        trajectories, _ = merged.setdefault((job["source"], job["seed"]), ({}, levels[job["source"]]))
        trajectories.update(runs[job["source"]])
    result: dict[str, list] = {}
    for (source, _), value in merged.items():
        result.setdefault(source, []).append(value)
    return result
