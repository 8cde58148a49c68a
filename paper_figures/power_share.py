"""Unlearning power: the share of the gradient norm each forget component receives, NPO vs SimNPO.

Question: which forget component receives the larger share of the gradient norm ("unlearning
power", docs/theory.md "Reference-model bias") under NPO and under SimNPO, in both paper
scenarios, for the exact simulator and for each transformer? Reads the run sets of the
``markov_tradeoff`` figure at the same scale (seed mean, band = 1 sd over seeds).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from markovsim.plotting import method_color, stack_seeds

from . import markov_tradeoff
from .runs import by_source, load_runs, ordered_sources, save_runs
from .style import apply_style, save_figure

TITLE = "Unlearning power: share of the gradient norm per forget component, NPO vs SimNPO (seed mean +- sd)"
METHODS = ("NPO", "SimNPO")


@dataclass(frozen=True)
class Config:
    scale_name: str = "quick"


CONFIGS = {name: Config(name) for name in ("tiny", "quick", "paper")}


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    tradeoff_config = markov_tradeoff.CONFIGS[config.scale_name]
    flat_runs, retrained = markov_tradeoff.flat_case_runs(tradeoff_config, os.path.dirname(cache_stem), device,
                                                          recompute, jobs)
    runs = {key: {m: t for m, t in trajectories.items() if m in METHODS} for key, trajectories in flat_runs.items()}
    save_runs(cache_stem, runs, retrained, dataclasses.asdict(config))
    return cache_stem


def plot(cache_stem: str, output_stem: str) -> list[str]:
    runs, retrained, _ = load_runs(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    grouped = by_source(runs, retrained)
    sources = ordered_sources(key.split(":", 1)[1] for key in grouped)
    cases = list(markov_tradeoff.CASES)
    figure, axes = plt.subplots(len(cases), len(sources), figsize=(3.6 * len(sources), 3.2 * len(cases)),
                                squeeze=False, sharey=True)
    for row, case in enumerate(cases):
        for col, source in enumerate(sources):
            axis, per_seed = axes[row, col], grouped.get(f"{case}:{source}", [])
            for method in METHODS:
                for name, style in (("forget1", "-"), ("forget2", "--")):
                    trajectories = [runs_[method] for _, runs_, _ in per_seed if method in runs_]
                    if not trajectories:
                        continue
                    shares = stack_seeds([t.metric("power_share", name) for t in trajectories])  # (S, E)
                    if not np.any(np.isfinite(shares)):
                        continue
                    steps = max((t.steps for t in trajectories), key=len)
                    mean = np.nanmean(shares, 0)
                    axis.plot(steps, mean, style, color=method_color(method), label=f"{method} {name}")
                    if shares.shape[0] > 1:
                        spread = np.nanstd(shares, 0, ddof=1)
                        axis.fill_between(steps, mean - spread, mean + spread, color=method_color(method), alpha=0.15,
                                          lw=0)
            if not axis.lines:
                axis.text(0.5, 0.5, "power share not recorded", ha="center", va="center", transform=axis.transAxes)
            axis.set_ylim(0, 1)
            axis.set_title(f"{markov_tradeoff.CASES[case]}\n{source}, {len(per_seed)} seeds", fontsize=8)
            axis.set_xlabel("unlearning step")
            axis.set_ylabel("share of gradient norm")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)
