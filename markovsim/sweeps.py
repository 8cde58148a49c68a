"""Sweeps: many (method, beta, gamma, learning rate, seed) configurations in one call.

Each seed re-samples the scenario's data (``MixtureSpec.seed``) and seeds the minibatch sampler.
Runs go through a process pool when ``processes > 1`` (one torch thread per worker), with a progress
display (:mod:`markovsim.progress`), and come back as a tidy table: one row per configuration and
evaluation step, with a column ``"{metric}/{component}"`` for every component metric.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .dynamics import unlearn
from .losses import USES_BETA, USES_GAMMA
from .objectives import get_objective
from .progress import progress_bar
from .results import atomic_output
from .runtime import torch_threads
from .scenarios import Scenario, prepare


@dataclass(frozen=True)
class SweepPoint:
    """One configuration; ``beta`` / ``gamma`` are ignored by losses that do not use them."""

    method: str
    beta: float | None
    gamma: float | None
    learning_rate: float
    seed: int


def grid(methods, betas=(None,), gammas=(None,), learning_rates=(0.02,), seeds=(0,)) -> list[SweepPoint]:
    """The Cartesian product, keeping one beta/gamma value for methods that do not use it."""
    points = []
    for method, beta, gamma, lr, seed in itertools.product(methods, betas, gammas, learning_rates, seeds):
        forget = get_objective(method).forget
        point = SweepPoint(method, beta if forget in USES_BETA else None,
                           gamma if forget in USES_GAMMA else None, float(lr), int(seed))
        if point not in points:
            points.append(point)
    return points


_SETUPS: dict = {}


def _setup(scenario: Scenario, model_class: str, seed: int):
    """The prepared data and models for one seed, cached per process by the mixture's content."""
    spec = dataclasses.replace(scenario.spec, seed=seed)
    key = (json.dumps(spec.to_dict(), sort_keys=True), model_class)
    if key not in _SETUPS:
        if len(_SETUPS) > 16:
            _SETUPS.clear()
        _SETUPS[key] = prepare(dataclasses.replace(scenario, spec=spec), model_class)
    return _SETUPS[key]


def run_point(scenario: Scenario, model_class: str, point: SweepPoint, steps: int | None = None) -> list[dict]:
    """Run one configuration; returns its rows."""
    setup = _setup(scenario, model_class, point.seed)
    objective = scenario.with_methods([point.method], betas=point.beta, gammas=point.gamma)[point.method]
    dynamics = dataclasses.replace(scenario.dynamics, learning_rate=point.learning_rate, seed=point.seed,
                                   **({"steps": steps} if steps is not None else {}))
    with torch_threads(1):
        trajectory = unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference, dynamics,
                             setup.evaluator)
    base = {"scenario": scenario.name, "model_class": model_class, "method": point.method, "beta": objective.beta,
            "gamma": objective.gamma, "learning_rate": point.learning_rate, "seed": point.seed,
            "diverged_at": trajectory.diverged_at}
    rows = []
    for e, step in enumerate(trajectory.steps):
        row = dict(base, step=int(step), loss=float(trajectory.step_metrics["loss"][e]))
        for metric, values in trajectory.component_metrics.items():
            row |= {f"{metric}/{name}": float(values[e, c]) for c, name in enumerate(trajectory.component_names)}
        rows.append(row)
    return rows


def _worker(arguments):
    return run_point(*arguments)


def run_sweep(scenario: Scenario, points: list[SweepPoint], model_class: str = "tabular", processes: int = 1,
              steps: int | None = None, progress: bool = True) -> list[dict]:
    """Run every point; rows are returned in the order of ``points``."""
    if not points:
        raise ValueError("run_sweep needs at least one SweepPoint (see grid())")
    jobs = [(scenario, model_class, point, steps) for point in points]
    bar = progress_bar(len(jobs), 0, f"sweep {scenario.name}", progress, unit="run")
    results = []
    if processes > 1:
        with ProcessPoolExecutor(max_workers=processes, initializer=_init_worker) as pool:
            for rows in pool.map(_worker, jobs, chunksize=max(1, len(jobs) // (4 * processes))):
                results.append(rows)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_worker(job))
            bar.update(1)
    bar.close()
    return [row for rows in results for row in rows]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def final_rows(rows: list[dict]) -> list[dict]:
    """The last evaluation of each configuration."""
    last = {}
    for row in rows:
        key = tuple(row[name] for name in ("scenario", "model_class", "method", "beta", "gamma", "learning_rate",
                                           "seed"))
        last[key] = row
    return list(last.values())


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Write the table as CSV atomically."""
    if not rows:
        raise ValueError("no rows to write")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict], value: str, by=("method", "beta")) -> dict[tuple, tuple[float, float]]:
    """Mean and standard deviation of ``value`` at the final step, grouped by ``by`` (over seeds)."""
    groups: dict[tuple, list[float]] = {}
    for row in final_rows(rows):
        groups.setdefault(tuple(row[k] for k in by), []).append(row[value])
    return {key: (float(np.mean(v)), float(np.std(v))) for key, v in groups.items()}
