"""Figure 1: gradient weights of NPO and SimNPO (and of the 2x2 cells between them).

Question: how does each method weight a forget sequence as a function of its per-token
log-likelihood and its length, and how do the weights of the forget components evolve during
unlearning? (NPO starts at exactly 1 everywhere; docs/theory.md, "Reference-model bias".) The
closed-form panel also draws NPO-ave (the reference kept, length-normalised; SimNPO's beta) and
SimNPO-sum (no reference, summed; NPO's beta), docs/theory.md, "Which ingredient".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from markovsim.loss_weights import gradient_weights
from markovsim.plotting import NPO_COLOR, SIMNPO_COLOR, method_color

from .cache import load_cache, save_cache
from .runs import cached_runs, simulator_runs
from .style import apply_style, save_figure

TITLE = "Gradient weights of NPO and SimNPO: by likelihood and length, and during unlearning"


@dataclass(frozen=True)
class Config:
    scale: float = 0.2
    steps: int = 50
    npo_beta: float = 0.2
    simnpo_beta: float = 4.0
    reference_logp_per_token: float = -1.5
    lengths: tuple[int, ...] = (4, 19)


CONFIGS = {"tiny": Config(scale=0.005, steps=3), "quick": Config(), "paper": Config(scale=1.0)}


def weight_curves(config: Config) -> dict[str, np.ndarray]:
    """Closed-form weights over a grid of per-token log-likelihoods, for each length."""
    grid = np.linspace(-5.0, -0.25, 200)
    curves = {"logp_per_token": grid}
    for length in config.lengths:
        num_tokens = torch.full((grid.size,), float(length), dtype=torch.float64)
        logps = torch.as_tensor(grid * length)
        ref_logps = torch.full_like(logps, config.reference_logp_per_token * length)
        curves[f"npo/{length}"] = gradient_weights("npo", logps, num_tokens, ref_logps, beta=config.npo_beta).numpy()
        curves[f"simnpo/{length}"] = gradient_weights("simnpo", logps, num_tokens, beta=config.simnpo_beta).numpy()
        curves[f"npo_ave/{length}"] = gradient_weights("npo_ave", logps, num_tokens, ref_logps,
                                                       beta=config.simnpo_beta).numpy()
        curves[f"simnpo_sum/{length}"] = gradient_weights("simnpo_sum", logps, beta=config.npo_beta).numpy()
    return curves


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    cache_dir = os.path.dirname(cache_stem)
    arrays = weight_curves(config)
    for scenario, source in (("paper_short_forget2", "tabular"), ("paper_unseen_forget2", "mixture")):
        runs, _ = cached_runs(cache_dir, f"{scenario}_{source}_{config.scale}_{config.steps}",
                              {"scenario": scenario, "source": source, "scale": config.scale, "steps": config.steps},
                              lambda: simulator_runs(scenario, config.scale, config.steps, ["NPO", "SimNPO"],
                                                     sources=(source,)), recompute)
        for method, trajectory in runs[source].items():
            arrays[f"{scenario}/{method}/steps"] = trajectory.steps
            for name in ("forget1", "forget2"):
                arrays[f"{scenario}/{method}/{name}"] = trajectory.metric("mean_weight", name)
    return save_cache(cache_stem, arrays, config, device=device)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    config = document["config"]
    apply_style()
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    grid = arrays["logp_per_token"]
    for style, length in zip(("--", "-"), config["lengths"]):
        axes[0].plot(grid, arrays[f"npo/{length}"], style, color=NPO_COLOR, label=f"NPO, |y| = {length}")
        axes[0].plot(grid, arrays[f"simnpo/{length}"] * length, style, color=SIMNPO_COLOR,
                     label=f"SimNPO x |y|, |y| = {length}")
        if f"npo_ave/{length}" in arrays:  # caches made before the 2x2 cells existed lack them
            axes[0].plot(grid, arrays[f"npo_ave/{length}"] * length, style, color=method_color("NPO-ave"), lw=0.9,
                         label=f"NPO-ave x |y|, |y| = {length}")
            axes[0].plot(grid, arrays[f"simnpo_sum/{length}"], style, color=method_color("SimNPO-sum"), lw=0.9,
                         label=f"SimNPO-sum, |y| = {length}")
    axes[0].axvline(config["reference_logp_per_token"], color="k", lw=0.8, ls=":")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("per-token log-likelihood logp / |y|")
    axes[0].set_ylabel("gradient weight")
    axes[0].set_title(f"closed form (NPO: reference at {config['reference_logp_per_token']}/token)")
    axes[0].legend(fontsize=6, ncol=2)
    for axis, scenario in zip(axes[1:], ("paper_short_forget2", "paper_unseen_forget2")):
        for method, color in (("NPO", NPO_COLOR), ("SimNPO", SIMNPO_COLOR)):
            steps = arrays[f"{scenario}/{method}/steps"]
            for name, style in (("forget1", "-"), ("forget2", "--")):
                values = arrays[f"{scenario}/{method}/{name}"]
                axis.plot(steps, values / values[0], style, color=color, label=f"{method} {name}")
        axis.set_xlabel("unlearning step")
        axis.set_ylabel("mean weight / its value at step 0")
        axis.set_title(f"{scenario} ({'tabular' if 'short' in scenario else 'mixture'} model)")
        axis.legend(fontsize=7)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)
