"""Figure 4: unlearning power per forget component over the steps, NPO vs SimNPO.

Question: which forget component receives the larger share of the gradient norm ("unlearning
power", THEORY.md section 4) under NPO and under SimNPO, in both paper scenarios, for the exact
simulator and for the transformer? Reads the same cached runs as figures 2 and 3.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from markovsim.plotting import method_color

from .runs import load_runs, save_runs
from .style import apply_style, save_figure
from .tradeoff import SOURCES, scenario_runs
from .tradeoff import configs as tradeoff_configs

TITLE = "Unlearning power: share of the gradient norm per forget component, NPO vs SimNPO"
SCENARIOS = ("paper_short_forget2", "paper_unseen_forget2")
METHODS = ("NPO", "SimNPO")


@dataclass(frozen=True)
class Config:
    scale_name: str = "quick"


CONFIGS = {name: Config(name) for name in ("tiny", "quick", "paper")}


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False) -> str:
    runs, retrained = {}, {}
    for scenario in SCENARIOS:
        scenario_config = tradeoff_configs(scenario)[config.scale_name]
        more, more_retrained = scenario_runs(scenario_config, os.path.dirname(cache_stem), device, recompute)
        for source, trajectories in more.items():
            runs[f"{scenario}/{source}"] = {m: t for m, t in trajectories.items() if m in METHODS}
            retrained[f"{scenario}/{source}"] = more_retrained[source]
    save_runs(cache_stem, runs, retrained, dataclasses.asdict(config))
    return cache_stem


def plot(cache_stem: str, output_stem: str) -> list[str]:
    runs, _, _ = load_runs(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    sources = [s for s in SOURCES if any(key.endswith("/" + s) for key in runs)]
    figure, axes = plt.subplots(len(SCENARIOS), len(sources), figsize=(4.2 * len(sources), 3.4 * len(SCENARIOS)),
                                squeeze=False, sharey=True)
    for row, scenario in enumerate(SCENARIOS):
        for col, source in enumerate(sources):
            axis = axes[row, col]
            for method, trajectory in runs.get(f"{scenario}/{source}", {}).items():
                for name, style in (("forget1", "-"), ("forget2", "--")):
                    share = trajectory.metric("power_share", name)
                    if np.any(np.isfinite(share)):
                        axis.plot(trajectory.steps, share, style, color=method_color(method), label=f"{method} {name}")
            if not axis.lines:
                axis.text(0.5, 0.5, "power share not recorded", ha="center", va="center", transform=axis.transAxes)
            axis.set_ylim(0, 1)
            axis.set_title(f"{scenario}: {source}")
            axis.set_xlabel("unlearning step")
            axis.set_ylabel("share of gradient norm")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)
