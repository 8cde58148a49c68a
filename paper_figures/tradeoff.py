"""Shared computation and drawing of the trade-off figures (figures 2 and 3).

Forget quality (KL from the true chain on each forget component; higher = more forgotten) against
retain distance (KL on retain; lower = better) for GA, NPO and SimNPO: exact simulator (tabular and
mixture) and transformer side by side, with shared axes and colours.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .runs import cached_runs, load_runs, save_runs, simulator_runs
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings, transformer_runs

SOURCES = ("tabular", "mixture", "transformer")


@dataclass(frozen=True)
class Config:
    scenario: str = "paper_short_forget2"
    scale: float = 0.2
    steps: int = 50
    transformer: TransformerSettings | None = field(default_factory=TransformerSettings)
    transformer_scale: float = 0.2


def tiny(scenario: str) -> Config:
    return Config(scenario, scale=0.005, steps=3,
                  transformer=TransformerSettings(preset="tiny-gpt2", pretrain_epochs=1, unlearn_steps=2),
                  transformer_scale=0.005)


def configs(scenario: str) -> dict[str, Config]:
    # quick: the transformer is evaluated every 5 steps (each evaluation is a forward pass over the
    # test and forget sets, the dominant CPU cost); paper: every step, as in the paper.
    return {"tiny": tiny(scenario), "quick": Config(scenario, transformer=TransformerSettings(eval_every=5)),
            "paper": Config(scenario, scale=1.0, transformer_scale=1.0)}


def scenario_runs(config: Config, cache_dir: str, device: str, recompute: bool):
    """Simulator and transformer runs of the scenario, each cached (shared with the power-share figure)."""
    sim_key = f"{config.scenario}_sim_{config.scale}_{config.steps}"
    runs, retrained = cached_runs(cache_dir, sim_key, {"scenario": config.scenario, "scale": config.scale,
                                                       "steps": config.steps},
                                  lambda: simulator_runs(config.scenario, config.scale, config.steps), recompute)
    runs, retrained = dict(runs), dict(retrained)
    if config.transformer is not None:
        key = f"{config.scenario}_transformer_{config.transformer_scale}_{config.transformer.preset}_{device}"
        more, more_retrained = cached_runs(
            cache_dir, key, {"scenario": config.scenario, "scale": config.transformer_scale,
                             "settings": dataclasses.asdict(config.transformer), "device": device},
            lambda: transformer_runs(config.scenario, config.transformer_scale, config.transformer, device), recompute)
        runs |= more
        retrained |= more_retrained
    return runs, retrained


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False) -> str:
    runs, retrained = scenario_runs(config, os.path.dirname(cache_stem), device, recompute)
    save_runs(cache_stem, runs, retrained, config)
    return cache_stem


def plot(cache_stem: str, output_stem: str, title: str) -> list[str]:
    from markovsim.plotting import tradeoff_axes

    runs, retrained, _ = load_runs(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    sources = [s for s in SOURCES if s in runs]
    forget_names = [n for n in next(iter(runs[sources[0]].values())).component_names if n.startswith("forget")]
    figure, axes = plt.subplots(len(forget_names), len(sources), figsize=(4.2 * len(sources), 3.5 * len(forget_names)),
                                squeeze=False, sharex="row", sharey="row")
    for row, name in enumerate(forget_names):
        for col, source in enumerate(sources):
            tradeoff_axes(axes[row, col], runs[source], name, retrained=retrained[source])
            axes[row, col].set_title(f"{source}: {name}")
            # log axes: the simulator's gentle runs and the transformer's overshoot share one scale
            axes[row, col].set_xscale("log")
            axes[row, col].set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(title)
    return save_figure(figure, output_stem)
