"""Benchmark: exact unlearning dynamics at paper scale.

1. The complete ``paper_short_forget2`` scenario (prepare data and models; GA, NPO, SimNPO for 50 exact
   full-batch iterations; every metric after every iteration), closed-form gradients side by side
   with autograd gradients, for both model classes.
2. A sweep of 3 methods x 8 betas x 5 seeds (GA ignores beta, so 85 distinct runs), serial and with
   a 2-process pool; and a small mixture-model sweep (slower runs, where the pool pays off).

Run: ``python benchmarks/markovsim_dynamics.py``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

from markovsim.dynamics import unlearn
from markovsim.scenarios import SCENARIOS, prepare
from markovsim.sweeps import grid, run_sweep


def scenario_time(model_class: str, gradient: str) -> float:
    start = time.perf_counter()
    scenario = SCENARIOS["paper_short_forget2"]
    setup = prepare(scenario, model_class)
    dynamics = dataclasses.replace(scenario.dynamics, gradient=gradient, eval_every=1, steps=50)
    for objective in scenario.methods.values():
        unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference, dynamics, setup.evaluator)
    return time.perf_counter() - start


def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    for model_class in ("tabular", "mixture"):
        closed = min(scenario_time(model_class, "closed_form") for _ in range(2))
        oracle = scenario_time(model_class, "autograd")
        print(f"paper_short_forget2 / {model_class:8s}: closed form {closed:6.2f} s, autograd {oracle:6.2f} s, "
              f"ratio {oracle / closed:4.1f}x")
    points = grid(["GA", "NPO", "SimNPO"], betas=[0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0], seeds=range(5))
    for processes in (1, 2):
        start = time.perf_counter()
        rows = run_sweep(SCENARIOS["paper_short_forget2"], points, processes=processes, progress=False)
        elapsed = time.perf_counter() - start
        print(f"sweep 3 methods x 8 betas x 5 seeds ({len(points)} runs, {len(rows)} rows), "
              f"{processes} process(es): {elapsed:6.2f} s")
    mixture_points = grid(["NPO", "SimNPO"], betas=[0.2, 4.0], seeds=range(2))
    for processes in (1, 2):
        start = time.perf_counter()
        run_sweep(SCENARIOS["paper_short_forget2"], mixture_points, model_class="mixture", processes=processes,
                  progress=False)
        print(f"mixture-model sweep ({len(mixture_points)} runs), {processes} process(es): "
              f"{time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
