"""Figure 6: beta and gamma sensitivity of NPO and SimNPO (exact simulator, several seeds).

Question: how do the final forget quality per forget component and the retain distance depend on
beta (and SimNPO's margin gamma), and how much do they vary across data seeds?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from markovsim.plotting import NPO_COLOR, SIMNPO_COLOR
from markovsim.scenarios import SCENARIOS
from markovsim.sweeps import final_rows, grid, run_sweep

from .cache import load_cache, save_cache
from .style import apply_style, save_figure

TITLE = "beta and gamma sensitivity on paper_short_forget2 (tabular model, mean +- std over seeds)"
COLUMNS = ("kl_true/forget1", "kl_true/forget2", "kl_true/retain")


@dataclass(frozen=True)
class Config:
    scale: float = 0.1
    steps: int = 50
    betas: tuple[float, ...] = (0.05, 0.2, 1.0, 4.0, 16.0)
    gammas: tuple[float, ...] = (0.0, 1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    processes: int = 1


CONFIGS = {
    "tiny": Config(scale=0.005, steps=2, betas=(0.2, 4.0), gammas=(0.0, 1.0), seeds=(0, 1)),
    "quick": Config(),
    "paper": Config(scale=1.0, betas=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0), gammas=(0.0, 0.5, 1.0, 2.0),
                    seeds=(0, 1, 2, 3, 4), processes=2),
}


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    scenario = SCENARIOS["paper_short_forget2"].scaled(config.scale)
    points = grid(["NPO", "SimNPO"], betas=config.betas, seeds=config.seeds)
    points += [p for p in grid(["SimNPO"], betas=(4.0,), gammas=config.gammas, seeds=config.seeds) if p not in points]
    processes = max(config.processes, jobs)
    rows = final_rows(run_sweep(scenario, points, steps=config.steps, processes=processes, progress=True))
    arrays = {}
    for method, values, axis_name in (("NPO", config.betas, "beta"), ("SimNPO", config.betas, "beta"),
                                      ("SimNPO", config.gammas, "gamma")):
        fixed = (lambda r: r["gamma"] == 0.0) if axis_name == "beta" else (lambda r: r["beta"] == 4.0)
        for column in COLUMNS:
            table = np.array([[r[column] for r in rows if r["method"] == method and fixed(r) and r[axis_name] == v]
                              for v in values])  # (values, seeds)
            arrays[f"{method}/{axis_name}/{column}"] = table
        arrays[f"{method}/{axis_name}/values"] = np.asarray(values, dtype=np.float64)
    return save_cache(cache_stem, arrays, config, device=device, num_runs=len(points))


def plot(cache_stem: str, output_stem: str) -> list[str]:
    _, arrays = load_cache(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    panels = (("NPO", "beta", NPO_COLOR), ("SimNPO", "beta", SIMNPO_COLOR))
    for axis, column in zip(axes[:2], COLUMNS[:2] + ()):
        for method, axis_name, color in panels:
            _band(axis, arrays, method, axis_name, column, color, f"{method}")
            _band(axis, arrays, method, axis_name, "kl_true/retain", color, f"{method} retain", style="--")
        axis.set_xscale("log")
        axis.set_xlabel("beta")
        axis.set_ylabel("final KL (true chain || model)")
        axis.set_title(f"{column.split('/')[1]} (solid) and retain (dashed)")
        axis.legend(fontsize=7)
    for column, style in zip(COLUMNS, ("-", "-.", "--")):
        _band(axes[2], arrays, "SimNPO", "gamma", column, SIMNPO_COLOR, column.split("/")[1], style=style)
    axes[2].set_xlabel("gamma (SimNPO, beta = 4)")
    axes[2].set_ylabel("final KL (true chain || model)")
    axes[2].set_title("SimNPO margin gamma")
    axes[2].legend(fontsize=7)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)


def _band(axis, arrays, method, axis_name, column, color, label, style="-") -> None:
    values = arrays[f"{method}/{axis_name}/values"]
    table = arrays[f"{method}/{axis_name}/{column}"]
    mean, spread = table.mean(axis=1), table.std(axis=1)
    axis.plot(values, mean, style, color=color, label=label, marker="o", ms=3)
    axis.fill_between(values, mean - spread, mean + spread, color=color, alpha=0.15)
