"""Scenario runs shared by several figures: every (source, seed) cached once, on disk.

A *source* is an exact simulator model class (``"tabular"``, ``"mixture"``) or a transformer preset
(``"paper-synthetic"``, ``"gpt2-4x128"``, ...). For one scenario, scale and seed every source sees
the same sampled data. Each (scenario, source, seed, settings) run set is one cache pair
``cache/runs_<scenario>_<source>_seed<k>_<hash>.{json,npz}`` (the hash covers the full settings,
which the JSON spells out); figures copy what they plot into their own cache, and plots read only
that. Missing run sets can be computed in parallel worker processes (``jobs > 1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context

from markovsim.dynamics import unlearn
from markovsim.progress import progress_iter
from markovsim.results import metadata_block
from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS, prepare
from markovsim.trajectory import Trajectory

from .cache import load_cache, save_cache
from .seed_bands import seed_band_runs
from .transformer_runs import TransformerSettings, transformer_runs

SIMULATOR_SOURCES = ("tabular", "mixture")
# Plot order of every source a figure may hold.
SOURCE_ORDER = ("tabular", "mixture", "paper-synthetic", "gpt2-4x128", "tiny-synthetic", "tiny-gpt2")


def save_runs(stem: str, runs: dict[str, dict[str, Trajectory]], retrained: dict[str, dict[str, float]], config,
              **extra) -> None:
    """Write ``stem.npz`` (every metric array) and ``stem.json`` (config, names, divergence, retrained KLs, ``extra``).

    ``runs`` maps a key (a source, or ``"source/seed<k>"``) to ``{method: Trajectory}``.
    """
    arrays, index = {}, {}
    for key, trajectories in runs.items():
        index[key] = {}
        for method, trajectory in trajectories.items():
            prefix = f"{key}/{method}"
            arrays[f"{prefix}/steps"] = trajectory.steps
            arrays |= {f"{prefix}/component/{k}": v for k, v in trajectory.component_metrics.items()}
            arrays |= {f"{prefix}/step/{k}": v for k, v in trajectory.step_metrics.items()}
            index[key][method] = {"component_names": list(trajectory.component_names),
                                  "diverged_at": trajectory.diverged_at,
                                  "divergence_reason": trajectory.divergence_reason, "info": trajectory.info}
    save_cache(stem, arrays, config, runs=index, retrained=retrained, **extra)


def load_runs(stem: str) -> tuple[dict[str, dict[str, Trajectory]], dict, dict]:
    """Read a cache written by :func:`save_runs`: ``(runs, retrained, document)``."""
    document, data = load_cache(stem)
    runs = {}
    for key, methods in document["runs"].items():
        runs[key] = {}
        for method, entry in methods.items():
            prefix = f"{key}/{method}/"
            component = {k[len(prefix) + 10:]: v for k, v in data.items() if k.startswith(prefix + "component/")}
            step = {k[len(prefix) + 5:]: v for k, v in data.items() if k.startswith(prefix + "step/")}
            runs[key][method] = Trajectory(data[prefix + "steps"], tuple(entry["component_names"]), component,
                                           step, entry["diverged_at"], entry["divergence_reason"], entry["info"])
    return runs, document["retrained"], document


def seeded_scenario(scenario_name: str, scale: float, seed: int):
    """The scenario at ``scale`` with data seed ``seed`` (every source of a figure's seed samples these data)."""
    scenario = SCENARIOS[scenario_name].scaled(scale)
    return dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, seed=seed))


def retrained_levels(setup) -> dict[str, float]:
    """``{component: kl_true of the retrained model}``: the level a figure marks as "forgotten"."""
    return dict(zip(setup.evaluator.component_names, setup.evaluator.evaluate(setup.retrained)["kl_true"].tolist()))


def simulator_runs(scenario_name: str, scale: float, steps: int, methods=None, seed: int = 0,
                   sources=SIMULATOR_SOURCES, dynamics_overrides: dict | None = None):
    """Run the scenario's methods on the exact models; returns ``(runs, retrained_kl_true)`` keyed by source."""
    scenario = seeded_scenario(scenario_name, scale, seed)
    dynamics = dataclasses.replace(scenario.dynamics, steps=steps, **(dynamics_overrides or {}))
    objectives = scenario.with_methods(methods or list(scenario.methods))
    runs, retrained = {}, {}
    for source in sources:
        setup = prepare(scenario, source)
        retrained[source] = retrained_levels(setup)
        runs[source] = {method: unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                                        dynamics, setup.evaluator)
                        for method, objective in objectives.items()}
    return runs, retrained


_RECOMPUTED: set[str] = set()


def _load_if_current(stem: str, expected: dict):
    if os.path.exists(stem + ".json") and os.path.exists(stem + ".npz"):
        try:
            runs, retrained, document = load_runs(stem)
            if document.get("config") == expected:
                return runs, retrained
        except (ValueError, KeyError, OSError):
            pass
    return None


def cached_runs(cache_dir: str, key: str, config, compute, recompute: bool = False) -> tuple[dict, dict]:
    """Load ``cache_dir/runs_{key}`` if it was made with the same config, else ``compute()`` and save it.

    With ``recompute`` the runs are recomputed once per process (figures sharing them reuse that).
    """
    stem = os.path.join(cache_dir, f"runs_{key}")
    expected = metadata_block(config)["config"]
    if not (recompute and stem not in _RECOMPUTED):
        loaded = _load_if_current(stem, expected)
        if loaded is not None:
            return loaded
    runs, retrained = compute()
    save_runs(stem, runs, retrained, config)
    _RECOMPUTED.add(stem)
    return runs, retrained


# ---------------------------------------------------------------------------------------------
# Seeded run sets of a scenario over several sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioRuns:
    """The runs of one scenario a figure needs: every source on the same data, for each seed.

    Attributes:
        scenario: a ``markovsim.scenarios.SCENARIOS`` name.
        scale: fraction of the paper's sequence counts (1.0 = paper scale), for every source.
        seeds: data, initialisation and batch-order seeds.
        simulator_steps: steps of the exact runs (the scenario's dynamics otherwise).
        simulator_sources: exact model classes to run.
        transformers: one :class:`TransformerSettings` per transformer preset (their ``seed`` is
            replaced by each seed).
        methods: the methods to run (None = the scenario's).
    """

    scenario: str
    scale: float
    seeds: tuple[int, ...] = (0,)
    simulator_steps: int = 50
    simulator_sources: tuple[str, ...] = SIMULATOR_SOURCES
    transformers: tuple[TransformerSettings, ...] = field(default_factory=lambda: (TransformerSettings(),))
    methods: tuple[str, ...] | None = None

    def jobs(self, device: str) -> list[dict]:
        """One JSON-ready description per (source, seed): what is computed and cached as a unit."""
        methods = None if self.methods is None else list(self.methods)
        jobs = []
        for seed in self.seeds:
            for source in self.simulator_sources:
                jobs.append({"kind": "simulator", "scenario": self.scenario, "scale": self.scale, "seed": seed,
                             "source": source, "steps": self.simulator_steps, "methods": methods})
            for settings in self.transformers:
                job = {"kind": "transformer", "scenario": self.scenario, "scale": self.scale, "seed": seed,
                       "source": settings.preset, "device": device, "methods": methods,
                       "settings": dataclasses.asdict(dataclasses.replace(settings, seed=seed))}
                if device == "cuda":  # the methods as batched replicas (float32), where that pays
                    job["batched_methods"] = True
                jobs.append(job)
        return jobs


def job_key(job: dict) -> str:
    """``<scenario>_<source>_seed<k>_<hash of the full settings>``."""
    digest = hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:10]
    return f"{job['scenario']}_{job['source']}_seed{job['seed']}_{digest}"


def _execute(job: dict, progress: bool, cache_dir: str, recompute: bool = False):
    if job["kind"] == "simulator":
        return simulator_runs(job["scenario"], job["scale"], job["steps"], job["methods"], seed=job["seed"],
                              sources=(job["source"],))
    settings, model_dir = TransformerSettings(**job["settings"]), os.path.join(cache_dir, "models")
    if job.get("batched_methods", False):
        # the reference and the retrained model pre-train as float32 replicas, the methods unlearn as replicas of
        # one computation (each equal to its own float32 single run). On a GPU the three methods then take about
        # the time of one (benchmarks/RESULTS.md, "Batched replicas"); on a CPU the runs are compute-bound and
        # batching saves nothing, so the figures batch on CUDA only.
        trajectories, retrained = seed_band_runs(job["scenario"], job["scale"], settings, (settings.seed,),
                                                 job["device"], job["methods"], progress, model_dir, recompute)[0]
    else:
        trajectories, retrained = transformer_runs(job["scenario"], job["scale"], settings, job["device"],
                                                   job["methods"], progress, model_dir, recompute)
    return {job["source"]: trajectories}, {job["source"]: retrained}


def _run_job(cache_dir: str, job: dict, recompute: bool, progress: bool, execute=None) -> str:
    """Compute and cache one job (in this process or a worker) with ``execute`` (default: this module's
    simulator / transformer runs); returns its cache stem."""
    execute = _execute if execute is None else execute
    with torch_threads(1):
        cached_runs(cache_dir, job_key(job), job, lambda: execute(job, progress, cache_dir, recompute), recompute)
    return os.path.join(cache_dir, f"runs_{job_key(job)}")


def _needs_computing(cache_dir: str, job: dict, recompute: bool) -> bool:
    stem = os.path.join(cache_dir, f"runs_{job_key(job)}")
    if recompute and stem not in _RECOMPUTED:
        return True
    return _load_if_current(stem, metadata_block(job)["config"]) is None


def precompute_runs(specs, cache_dir: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> None:
    """Compute every run set of ``specs`` not cached yet (all once per process with ``recompute``): on CUDA
    each transformer's missing seeds first as one batched computation (:func:`precompute_seed_bands`), then
    the rest in ``jobs`` worker processes (one torch thread each, transformers first: they take longest)."""
    all_jobs = [job for spec in specs for job in spec.jobs(device)]
    precompute_seed_bands(all_jobs, cache_dir, recompute)
    precompute_jobs(all_jobs, cache_dir, recompute, jobs)


def precompute_seed_bands(all_jobs: list[dict], cache_dir: str, recompute: bool) -> None:
    """The transformer jobs that batch their methods (``--device cuda``), grouped by everything but the seed:
    each group's missing seeds (two or more) run as one ``seed_band_runs`` computation in this process, and
    each seed is cached under its own job's key (the numbers a ``batched_methods`` job gives it alone)."""
    groups: dict[str, list[dict]] = {}
    for job in all_jobs:
        if job["kind"] == "transformer" and job.get("batched_methods") and _needs_computing(cache_dir, job, recompute):
            shared = {key: value for key, value in job.items() if key not in ("seed", "settings")}
            shared["settings"] = {key: value for key, value in job["settings"].items() if key != "seed"}
            groups.setdefault(json.dumps(shared, sort_keys=True), []).append(job)
    for members in (group for group in groups.values() if len(group) > 1):
        first = members[0]
        bands = seed_band_runs(first["scenario"], first["scale"], TransformerSettings(**first["settings"]),
                               [job["seed"] for job in members], first["device"], first["methods"], True,
                               os.path.join(cache_dir, "models"), recompute)
        for job, (runs, retrained) in zip(members, bands):
            stem = os.path.join(cache_dir, f"runs_{job_key(job)}")
            save_runs(stem, {job["source"]: runs}, {job["source"]: retrained}, job)
            _RECOMPUTED.add(stem)


def precompute_jobs(all_jobs: list[dict], cache_dir: str, recompute: bool, jobs: int, execute=None,
                    slow_kinds: tuple[str, ...] = ("transformer",)) -> None:
    """The jobs of ``all_jobs`` not cached yet, in ``jobs`` worker processes (``slow_kinds`` first),
    each computed by ``execute(job, progress, cache_dir, recompute)`` (a module-level function: workers
    are spawned) and cached; with ``jobs <= 1`` nothing here (the callers compute in order, with progress)."""
    missing = [job for job in all_jobs if _needs_computing(cache_dir, job, recompute)]
    if jobs <= 1 or len(missing) <= 1:
        return
    missing.sort(key=lambda job: job["kind"] not in slow_kinds)
    os.makedirs(cache_dir, exist_ok=True)
    with ProcessPoolExecutor(min(jobs, len(missing)), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_job, cache_dir, job, recompute, False, execute) for job in missing]
        for future in progress_iter(as_completed(futures), len(futures), "run sets", unit="run set"):
            _RECOMPUTED.add(future.result())  # a worker's recompute counts for this process too


def map_in_workers(function, tasks: list, jobs: int, label: str | None = None) -> list:
    """``[function(task) for task in tasks]``, in ``min(jobs, len(tasks))`` spawned worker processes when
    ``jobs > 1`` (``function`` at module level, tasks picklable), in order; with ``label``, a progress bar
    counting finished tasks."""
    if jobs <= 1 or len(tasks) <= 1:
        ordered = tasks if label is None else progress_iter(tasks, len(tasks), label, unit="task")
        return [function(task) for task in ordered]
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=get_context("spawn")) as pool:
        if label is None:
            return list(pool.map(function, tasks))
        futures = {pool.submit(function, task): index for index, task in enumerate(tasks)}
        results = [None] * len(tasks)
        for future in progress_iter(as_completed(futures), len(futures), label, unit="task"):
            results[futures[future]] = future.result()
        return results


def scenario_runs(spec: ScenarioRuns, cache_dir: str, device: str = "cpu", recompute: bool = False,
                  jobs: int = 1) -> dict[str, list[tuple[dict[str, Trajectory], dict[str, float]]]]:
    """``{source: [({method: Trajectory}, {component: retrained kl_true}) for each seed]}``.

    Run sets not cached yet (or all, once per process, with ``recompute``) are computed first, in
    ``jobs`` worker processes when ``jobs > 1`` (:func:`precompute_runs`).
    """
    precompute_runs([spec], cache_dir, device, recompute, jobs)
    result: dict[str, list] = {}
    for job in spec.jobs(device):
        runs, retrained = cached_runs(cache_dir, job_key(job), job,
                                      lambda job=job: _execute(job, True, cache_dir, recompute), recompute)
        result.setdefault(job["source"], []).append((runs[job["source"]], retrained[job["source"]]))
    return result


def by_source(runs: dict[str, dict], retrained: dict[str, dict]) -> dict[str, list[tuple[str, dict, dict]]]:
    """Group ``"[prefix:]source/seed<k>"`` keys back: ``{[prefix:]source: [(seed key, runs, retrained), ...]}``."""
    grouped: dict[str, list] = {}
    for key, trajectories in runs.items():
        grouped.setdefault(key.split("/seed")[0], []).append((key, trajectories, retrained[key]))
    return grouped


def ordered_sources(names) -> list[str]:
    """Distinct source names in plot order (``SOURCE_ORDER``, unknown ones last)."""
    order = {name: index for index, name in enumerate(SOURCE_ORDER)}
    return sorted(dict.fromkeys(names), key=lambda name: order.get(name, len(order)))
