"""Figure 5: divergence speed of GA vs NPO (NPO paper, Theorem 2).

Question: under plain gradient descent, does GA move the parameters and the forget
log-likelihood linearly in the step count while NPO slows to a logarithmic pace, and what retain
damage does each pay by the end? Fitted linear and logarithmic rates are drawn over the curves.
The transformer rows overlay the GA and NPO runs (seed 0) of the ``markov_tradeoff`` figure
(paper_short_forget2, the paper's legacy AdamW, the same cached runs), fitted the same way.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from markovsim.analysis import fit_divergence_rates
from markovsim.plotting import method_color, rate_axes

from .cache import load_cache, save_cache
from .runs import cached_runs, ordered_sources, scenario_runs, simulator_runs
from .style import apply_style, save_figure

TITLE = ("Divergence speed of GA vs NPO: exact simulator under gradient descent (rows 1-2); "
         "transformers under the paper's AdamW, the runs of the markov_tradeoff figure (last rows)")
METHODS = ("GA", "NPO")


@dataclass(frozen=True)
class Config:
    scale: float = 0.2
    steps: int = 400
    eval_every: int = 4
    transformer_overlay: str | None = "quick"  # which scale's markov_tradeoff transformer runs to overlay


CONFIGS = {"tiny": Config(scale=0.005, steps=12, eval_every=3, transformer_overlay="tiny"), "quick": Config(),
           "paper": Config(scale=1.0, steps=1000, transformer_overlay="paper")}


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    runs, _ = cached_runs(os.path.dirname(cache_stem),
                          f"npo_divergence_{config.scale}_{config.steps}_{config.eval_every}",
                          {"scenario": "npo_divergence", "scale": config.scale, "steps": config.steps,
                           "eval_every": config.eval_every},
                          lambda: simulator_runs("npo_divergence", config.scale, config.steps,
                                                 dynamics_overrides={"eval_every": config.eval_every}), recompute)
    runs = dict(runs)
    if config.transformer_overlay is not None:
        from . import markov_tradeoff

        tradeoff_config = markov_tradeoff.CONFIGS[config.transformer_overlay]
        for spec in markov_tradeoff.case_runs(tradeoff_config, "paper_short_forget2"):
            if not spec.transformers:
                continue
            spec = dataclasses.replace(spec, seeds=spec.seeds[:1])  # the first seed (0)
            for source, per_seed in scenario_runs(spec, os.path.dirname(cache_stem), device, recompute, jobs).items():
                runs[source] = {m: t for m, t in per_seed[0][0].items() if m in METHODS}
    arrays, fits = {}, {}
    for source, trajectories in runs.items():
        for method, trajectory in trajectories.items():
            forget_logp = np.nanmean([trajectory.metric("logp_per_token", n) for n in ("forget1", "forget2")], axis=0)
            key = f"{source}/{method}"
            arrays[f"{key}/steps"] = trajectory.steps
            arrays[f"{key}/retain_kl"] = trajectory.metric("kl_true", "retain")
            fits[key] = {}
            for quantity, values in (("forget_logp", forget_logp),
                                     ("distance", trajectory.step_metrics.get("parameter_distance"))):
                if values is not None and np.isfinite(values).sum() >= 3:
                    arrays[f"{key}/{quantity}"] = values
                    fits[key][quantity] = fit_divergence_rates(trajectory.steps, values)
    return save_cache(cache_stem, arrays, config, fits=fits, device=device)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    fits = document["fits"]
    apply_style()
    import matplotlib.pyplot as plt

    sources = ordered_sources(key.split("/")[0] for key in fits)
    figure, axes = plt.subplots(len(sources), 3, figsize=(13, 3.4 * len(sources)), squeeze=False)
    for row, source in enumerate(sources):
        for method in METHODS:
            color = method_color(method)
            key = f"{source}/{method}"
            if key not in fits:
                continue
            steps = arrays[f"{key}/steps"]
            for col, (quantity, label) in enumerate((("forget_logp", "forget log-likelihood per token"),
                                                     ("distance", "||theta_t - theta_0||"))):
                if quantity not in fits[key]:
                    continue
                rate_axes(axes[row, col], steps, arrays[f"{key}/{quantity}"], method, color, fits[key][quantity])
                axes[row, col].set_ylabel(label)
                axes[row, col].set_title(f"{source}: {label}")
                axes[row, col].legend(fontsize=7)
            axes[row, 2].plot(steps, arrays[f"{key}/retain_kl"], color=color, label=method)
        axes[row, 2].set_xlabel("step")
        axes[row, 2].set_ylabel("retain KL (true chain || model)")
        axes[row, 2].set_yscale("log")
        axes[row, 2].set_title(f"{source}: retain damage")
        axes[row, 2].legend(fontsize=7)
    figure.suptitle(TITLE.replace("; ", ";\n"))
    return save_figure(figure, output_stem)
