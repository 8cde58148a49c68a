"""Scenario runs shared by several figures, cached once per (scenario, scale, device).

A "runs" cache holds trajectories keyed by source (``"tabular"``, ``"mixture"``, ``"transformer"``)
and method, plus the retrained model's KL per source, in one JSON + one NPZ file written atomically.
Figures read these caches; they never recompute silently (``python -m paper_figures --recompute``).
"""

from __future__ import annotations

import dataclasses
import os


from markovsim.dynamics import unlearn
from markovsim.results import metadata_block
from markovsim.scenarios import SCENARIOS, prepare
from markovsim.trajectory import Trajectory

from .cache import load_cache, save_cache

SIMULATOR_SOURCES = ("tabular", "mixture")


def save_runs(stem: str, runs: dict[str, dict[str, Trajectory]], retrained: dict[str, dict[str, float]], config) -> None:
    """Write ``stem.npz`` (every metric array) and ``stem.json`` (config, names, divergence, retrained KLs)."""
    arrays, index = {}, {}
    for source, trajectories in runs.items():
        index[source] = {}
        for method, trajectory in trajectories.items():
            prefix = f"{source}/{method}"
            arrays[f"{prefix}/steps"] = trajectory.steps
            arrays |= {f"{prefix}/component/{k}": v for k, v in trajectory.component_metrics.items()}
            arrays |= {f"{prefix}/step/{k}": v for k, v in trajectory.step_metrics.items()}
            index[source][method] = {"component_names": list(trajectory.component_names),
                                     "diverged_at": trajectory.diverged_at,
                                     "divergence_reason": trajectory.divergence_reason, "info": trajectory.info}
    save_cache(stem, arrays, config, runs=index, retrained=retrained)


def load_runs(stem: str) -> tuple[dict[str, dict[str, Trajectory]], dict, dict]:
    """Read a cache written by :func:`save_runs`: ``(runs, retrained, document)``."""
    document, data = load_cache(stem)
    runs = {}
    for source, methods in document["runs"].items():
        runs[source] = {}
        for method, entry in methods.items():
            prefix = f"{source}/{method}/"
            component = {k[len(prefix) + 10:]: v for k, v in data.items() if k.startswith(prefix + "component/")}
            step = {k[len(prefix) + 5:]: v for k, v in data.items() if k.startswith(prefix + "step/")}
            runs[source][method] = Trajectory(data[prefix + "steps"], tuple(entry["component_names"]), component,
                                              step, entry["diverged_at"], entry["divergence_reason"], entry["info"])
    return runs, document["retrained"], document


def simulator_runs(scenario_name: str, scale: float, steps: int, methods=None, seed: int = 0,
                   sources=SIMULATOR_SOURCES, dynamics_overrides: dict | None = None):
    """Run the scenario's methods on the exact models; returns ``(runs, retrained_kl_true)``."""
    scenario = SCENARIOS[scenario_name].scaled(scale)
    scenario = dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, seed=seed))
    dynamics = dataclasses.replace(scenario.dynamics, steps=steps, **(dynamics_overrides or {}))
    objectives = scenario.with_methods(methods or list(scenario.methods))
    runs, retrained = {}, {}
    for source in sources:
        setup = prepare(scenario, source)
        retrained[source] = dict(zip(setup.evaluator.component_names,
                                     setup.evaluator.evaluate(setup.retrained)["kl_true"].tolist()))
        runs[source] = {method: unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                                        dynamics, setup.evaluator)
                        for method, objective in objectives.items()}
    return runs, retrained


_RECOMPUTED: set[str] = set()


def cached_runs(cache_dir: str, key: str, config, compute, recompute: bool = False) -> tuple[dict, dict]:
    """Load ``cache_dir/runs_{key}`` if it was made with the same config, else ``compute()`` and save it.

    With ``recompute`` the runs are recomputed once per process (figures sharing them reuse that).
    """
    stem = os.path.join(cache_dir, f"runs_{key}")
    expected = metadata_block(config)["config"]
    fresh_needed = recompute and stem not in _RECOMPUTED
    if not fresh_needed and os.path.exists(stem + ".json") and os.path.exists(stem + ".npz"):
        try:
            runs, retrained, document = load_runs(stem)
            if document.get("config") == expected:
                return runs, retrained
        except (ValueError, KeyError, OSError):
            pass
    runs, retrained = compute()
    save_runs(stem, runs, retrained, config)
    _RECOMPUTED.add(stem)
    return runs, retrained
