"""SimNPO paper Fig. 5 reproduced: forget quality vs retain distance on the paper's Markov mixtures.

Question: in case (a) (forget2 of length 5) and case (b) (forget2 never pre-trained), how do GA,
NPO and SimNPO trade forget quality (KL from the true forget chain; higher = more forgotten, the
target is the retrained model) against retain distance (KL from the true retain chain; lower is
better), on the paper's own synthetic transformer, on a GPT-2 of the same size, and in the exact
simulator - over seeds?

Layout: one column per source; rows (a) zoomed to the paper's window (x 0-0.25, y 0-0.5, linear
axes), (a) whole trajectories, then the same for (b). Each line is the seed mean of a method on a
forget component (solid forget1, dashed forget2) with a one-sd band; stars mark the initial
(reference) and retrained models. The table (``<output>_table.md`` and the cache's ``table``): the
retain KL at which each forget component's KL first reaches its retrained model's level, mean and
sd over the seeds that reach it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from markovsim.analysis import crossing, interpolate_at
from markovsim.plotting import method_color, seed_band_axes
from markovsim.results import atomic_output

from .runs import (
    ScenarioRuns,
    by_source,
    flatten_seeds,
    load_runs,
    ordered_sources,
    precompute_runs,
    save_runs,
    scenario_runs,
)
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings

TITLE = "SimNPO Fig. 5 on the paper's Markov mixtures: forget quality vs retain distance, seed mean +- sd"
CASES = {"paper_short_forget2": "(a) forget2 of length 5", "paper_unseen_forget2": "(b) forget2 never pre-trained"}
FORGET = ("forget1", "forget2")
COMPONENT_STYLES = {"forget1": "-", "forget2": "--"}
WINDOW = (0.25, 0.5)  # the paper's axes: retain KL 0-0.25, forget KL 0-0.5


def _transformers(steps: int = 50, epochs: float = 5.0, presets=("paper-synthetic", "gpt2-4x128"), diagnostics=256):
    return tuple(TransformerSettings(preset=p, pretrain_epochs=epochs, unlearn_steps=steps,
                                     diagnostics_max_sequences=diagnostics) for p in presets)


@dataclass(frozen=True)
class Config:
    scale: float = 0.2
    seeds: tuple[int, ...] = (0, 1)
    simulator_steps: int = 50
    simulator_sources: tuple[str, ...] = ("tabular", "mixture")
    # quick: power share / weights on 64 sequences per component (256 at paper scale), to keep
    # every-step evaluation of all runs inside make figures' budget
    transformers: tuple[TransformerSettings, ...] = field(default_factory=lambda: _transformers(diagnostics=64))


CONFIGS = {
    "tiny": Config(scale=0.005, seeds=(0, 1), simulator_steps=3,
                   transformers=_transformers(steps=2, epochs=1.0, presets=("tiny-synthetic", "tiny-gpt2"))),
    "quick": Config(),
    "paper": Config(scale=1.0, seeds=(0, 1, 2, 3, 4), transformers=_transformers()),
}


def case_runs(config: Config, case: str) -> ScenarioRuns:
    """The run sets of one case (shared with the power-share and divergence figures)."""
    return ScenarioRuns(case, config.scale, tuple(config.seeds), config.simulator_steps, config.simulator_sources,
                        tuple(config.transformers))


def reach_rows(case: str, source: str, per_seed, num_seeds: int) -> list[dict]:
    """Table rows of one source: per method and forget component, the retain KL (and step) at the first
    evaluation where the forget KL reaches the seed's retrained level, mean/sd over the seeds that reach it."""
    rows = []
    methods = list(per_seed[0][1])
    for method in methods:
        for component in FORGET:
            retain_kls, steps, levels = [], [], []
            for _, trajectories, retrained in per_seed:
                trajectory = trajectories[method]
                level = retrained[component]
                position = crossing(trajectory.metric("kl_true", component), level, increasing=True)
                levels.append(level)
                if np.isfinite(position):
                    retain_kls.append(interpolate_at(trajectory.metric("kl_true", "retain"), position))
                    steps.append(interpolate_at(trajectory.steps.astype(np.float64), position))
            rows.append({"case": case, "source": source, "method": method, "component": component,
                         "seeds": num_seeds, "reached": len(retain_kls), "retrained_kl": float(np.mean(levels)),
                         "retain_kl_mean": _mean(retain_kls), "retain_kl_sd": _sd(retain_kls),
                         "step_mean": _mean(steps), "step_sd": _sd(steps)})
    return rows


def _mean(values) -> float | None:
    return float(np.mean(values)) if values else None


def _sd(values) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    runs, retrained, table = {}, {}, []
    precompute_runs([case_runs(config, case) for case in CASES], os.path.dirname(cache_stem), device, recompute, jobs)
    for case in CASES:
        seeded = scenario_runs(case_runs(config, case), os.path.dirname(cache_stem), device, recompute, jobs)
        flat_runs, flat_retrained = flatten_seeds(seeded, config.seeds)
        runs |= {f"{case}:{key}": value for key, value in flat_runs.items()}
        retrained |= {f"{case}:{key}": value for key, value in flat_retrained.items()}
        for source, per_seed in seeded.items():
            keyed = [(seed, trajectories, levels) for seed, (trajectories, levels) in zip(config.seeds, per_seed)]
            table += reach_rows(case, source, keyed, len(config.seeds))
    save_runs(cache_stem, runs, retrained, config, table=table)
    return cache_stem


def format_value(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "not reached"
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} +- {sd:.3f}"


def table_markdown(table: list[dict]) -> str:
    """The reach table as Markdown (what the README and benchmarks/RESULTS.md quote)."""
    lines = ["| case | source | method | component | retrained KL | retain KL at reach | step at reach "
             "| seeds reached |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {CASES[row['case']].split(' ')[0]} | {row['source']} | {row['method']} | {row['component']} | "
                     f"{row['retrained_kl']:.3f} | {format_value(row['retain_kl_mean'], row['retain_kl_sd'])} | "
                     f"{format_value(row['step_mean'], row['step_sd'])} | {row['reached']}/{row['seeds']} |")
    return "\n".join(lines) + "\n"


def start_and_target(per_seed, method: str, component: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two stars of a trade-off panel, seed means of (retain KL, ``component`` KL): the reference (where
    ``method``'s runs start) and the retrained model (the level of "forgotten")."""
    first = [trajectories[method] for _, trajectories, _ in per_seed]
    initial = (np.mean([t.metric("kl_true", "retain")[0] for t in first]),
               np.mean([t.metric("kl_true", component)[0] for t in first]))
    target = (np.mean([levels["retain"] for _, _, levels in per_seed]),
              np.mean([levels[component] for _, _, levels in per_seed]))
    return initial, target


def _draw(axis, per_seed, zoomed: bool) -> None:
    methods = list(per_seed[0][1])
    scale = WINDOW if zoomed else (1.0, 1.0)
    for method in methods:
        for component in FORGET:
            xs = [trajectories[method].metric("kl_true", "retain") for _, trajectories, _ in per_seed]
            ys = [trajectories[method].metric("kl_true", component) for _, trajectories, _ in per_seed]
            seed_band_axes(axis, xs, ys, method_color(method), COMPONENT_STYLES[component],
                           f"{method} {component}", scale=scale)
    for component, face in (("forget1", None), ("forget2", "none")):
        initial, target = start_and_target(per_seed, methods[0], component)
        axis.plot(*initial, "*", color="black", ms=11, markerfacecolor=face or "black", zorder=5)
        axis.plot(*target, "*", color="#ff7f0e", ms=13, markerfacecolor=face or "#ff7f0e", zorder=5)
    if zoomed:
        axis.set_xlim(0, WINDOW[0])
        axis.set_ylim(0, WINDOW[1])
    else:
        from matplotlib.patches import Rectangle

        axis.add_patch(Rectangle((0, 0), *WINDOW, fill=False, ls=":", lw=0.8, color="gray"))
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)


def _legend(figure, methods) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=method_color(m), lw=2, label=m) for m in methods]
    handles += [Line2D([], [], color="k", ls=style, label=f"{c} (band: 1 sd over seeds)")
                for c, style in COMPONENT_STYLES.items()]
    handles += [Line2D([], [], ls="", marker="*", color="black", ms=10, label="initial (reference): forget1 filled, "
                                                                                 "forget2 hollow"),
                Line2D([], [], ls="", marker="*", color="#ff7f0e", ms=11, label="retrained model")]
    figure.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    runs, retrained, document = load_runs(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    grouped = by_source(runs, retrained)  # {"case:source": [(key, runs, retrained) per seed]}
    sources = ordered_sources(key.split(":", 1)[1] for key in grouped)
    figure, axes = plt.subplots(2 * len(CASES), len(sources), figsize=(3.7 * len(sources), 3.1 * 2 * len(CASES)),
                                squeeze=False)
    methods = []
    for block, (case, label) in enumerate(CASES.items()):
        for col, source in enumerate(sources):
            per_seed = grouped.get(f"{case}:{source}")
            for row, zoomed in ((2 * block, True), (2 * block + 1, False)):
                axis = axes[row, col]
                if per_seed is None:
                    axis.set_axis_off()
                    continue
                _draw(axis, per_seed, zoomed)
                methods = methods or list(per_seed[0][1])
                axis.set_title(f"{label}\n{source}, {len(per_seed)} seeds" + ("" if zoomed else ": whole run"),
                               fontsize=8)
                axis.set_xlabel("retain distance: KL on retain")
                axis.set_ylabel("forget quality: KL on forget")
    _legend(figure, methods)
    figure.suptitle(TITLE)
    paths = save_figure(figure, output_stem)
    with atomic_output(output_stem + "_table.md") as temporary:
        with open(temporary, "w") as file:
            file.write(table_markdown(document["table"]))
    return paths + [output_stem + "_table.md"]
