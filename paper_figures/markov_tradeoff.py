"""SimNPO paper Fig. 5 reproduced over paired seeds and held to the paper's own numbers.

Question: in case (a) (forget2 of length 5) and case (b) (forget2 never pre-trained), how do GA,
NPO and SimNPO trade forget quality (KL from the true forget chain; higher = more forgotten, the
target is the retrained model) against retain distance (KL from the true retain chain; lower is
better), on the paper's own synthetic transformer, on a GPT-2 of the same size, and in the exact
simulator - over seeds, and where does the paper's single published seed fall among them?

Layout: one column per source; rows (a) zoomed to the paper's window (x 0-0.25, y 0-0.5, linear
axes), (a) whole trajectories, then the same for (b): every seed a thin line, the pointwise median
over seeds a thick one (solid forget1, dashed forget2; NPO blue, SimNPO red, GA grey as in the
paper); stars mark the initial (reference) and retrained models (seed medians); diamonds on the
paper-synthetic panels the official figure's reach points (seed 42). The last row: the retain KL at
reach of every seed (points), its median (bar), the official seed-42 value (diamond) and the official
pipeline's re-run range (grey span, case (a)), per case and forget component.

Outputs beside the figure: ``<output>_table.md`` (``fig5_tables``: per cell median and 5-95% over seeds, the paired
differences SimNPO - NPO and NPO - GA with bootstrap intervals and ordering fractions, the official
values, every row with its optimiser, learning rate and batch size, and the documented claims checked) and
``fig5_reach.csv`` (one row per case, source, method, component and seed: ``reach_statistics``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from markovsim.plotting import method_color, seed_lines_axes
from markovsim.results import atomic_output

from . import official_fig5
from .fig5_tables import table_markdown
from .official_fig5 import CASE_LETTERS, OFFICIAL_SOURCE
from .reach_statistics import FORGET, per_seed_rows, values_by_seed, write_csv
from .runs import ScenarioRuns, by_source, load_runs, ordered_sources, precompute_runs, save_runs, scenario_runs
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings

TITLE = "SimNPO Fig. 5 on the paper's Markov mixtures over paired seeds: forget quality vs retain distance"
CASES = {"paper_short_forget2": "(a) forget2 of length 5", "paper_unseen_forget2": "(b) forget2 never pre-trained"}
COMPONENT_STYLES = {"forget1": "-", "forget2": "--"}
WINDOW = (0.25, 0.5)  # the paper's axes: retain KL 0-0.25, forget KL 0-0.5
CSV_NAME = "fig5_reach.csv"


def _transformers(steps: int = 50, epochs: float = 5.0, presets=("paper-synthetic", "gpt2-4x128"), diagnostics=256,
                  evaluation_subsample=None):
    return tuple(TransformerSettings(preset=p, pretrain_epochs=epochs, unlearn_steps=steps,
                                     diagnostics_max_sequences=diagnostics, evaluation_subsample=evaluation_subsample)
                 for p in presets)


@dataclass(frozen=True)
class Config:
    """What the figure runs.

    Attributes:
        scale: fraction of the paper's sequence counts (1.0 = the paper's).
        seeds: the seeds of every source not in ``seed_counts``.
        seed_counts: ``(source, n)`` pairs: that source runs seeds 0..n-1 instead (paired with every other
            source on the seeds they share: seed k is the same sampled data everywhere).
        simulator_steps, simulator_sources: the exact runs (the scenario's optimiser otherwise).
        transformers: one :class:`TransformerSettings` per transformer source.
    """

    scale: float = 0.2
    seeds: tuple[int, ...] = (0, 1)
    seed_counts: tuple[tuple[str, int], ...] = ()
    simulator_steps: int = 50
    simulator_sources: tuple[str, ...] = ("tabular", "mixture")
    # quick: the paper's transformer only, evaluated every step on 100 of the 800 test sequences, power share /
    # weights on 8 sequences per component (paper scale: every test sequence, 256), to keep make figures inside
    # its budget on a slow 2-core CPU (pre-training and every-step evaluation are a run set's arithmetic)
    transformers: tuple[TransformerSettings, ...] = field(
        default_factory=lambda: _transformers(presets=("paper-synthetic",), diagnostics=8, evaluation_subsample=100))

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        for source, count in self.seed_counts:
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"seed_counts: {source!r} has {count!r} seeds; give an int >= 1")

    def seeds_of(self, source: str) -> tuple[int, ...]:
        """The seeds ``source`` runs."""
        counts = dict(self.seed_counts)
        return tuple(range(counts[source])) if source in counts else tuple(self.seeds)


CONFIGS = {
    "tiny": Config(scale=0.005, seeds=(0, 1), seed_counts=(("tabular", 3),), simulator_steps=3,
                   transformers=_transformers(steps=2, epochs=1.0, presets=("tiny-synthetic", "tiny-gpt2"))),
    "quick": Config(seed_counts=(("tabular", 10), ("mixture", 10))),
    "paper": Config(scale=1.0, seeds=tuple(range(10)), seed_counts=(("paper-synthetic", 20),),
                    transformers=_transformers()),
}


def case_runs(config: Config, case: str) -> tuple[ScenarioRuns, ...]:
    """The run sets of one case, one spec per group of sources with the same seeds (shared with the
    power-share, divergence and tofu_bias figures)."""
    specs = [ScenarioRuns(case, config.scale, config.seeds_of(source), config.simulator_steps, (source,), ())
             for source in config.simulator_sources]
    specs += [ScenarioRuns(case, config.scale, config.seeds_of(settings.preset), config.simulator_steps, (),
                           (settings,)) for settings in config.transformers]
    return tuple(specs)


def seeded_case_runs(config: Config, case: str, cache_dir: str, device: str = "cpu", recompute: bool = False,
                     jobs: int = 1) -> dict[str, list[tuple[int, dict, dict]]]:
    """``{source: [(seed, {method: Trajectory}, {component: retrained kl_true}), ...]}`` of one case."""
    result = {}
    for spec in case_runs(config, case):
        for source, per_seed in scenario_runs(spec, cache_dir, device, recompute, jobs).items():
            result[source] = [(seed, runs, levels) for seed, (runs, levels) in zip(spec.seeds, per_seed)]
    return result


def flat_case_runs(config: Config, cache_dir: str, device: str = "cpu", recompute: bool = False,
                   jobs: int = 1) -> tuple[dict, dict]:
    """Every case's runs for :func:`paper_figures.runs.save_runs`: keys ``"<case>:<source>/seed<k>"``."""
    precompute_runs([spec for case in CASES for spec in case_runs(config, case)], cache_dir, device, recompute, jobs)
    runs, retrained = {}, {}
    for case in CASES:
        for source, per_seed in seeded_case_runs(config, case, cache_dir, device, recompute, jobs).items():
            for seed, trajectories, levels in per_seed:
                runs[f"{case}:{source}/seed{seed}"], retrained[f"{case}:{source}/seed{seed}"] = trajectories, levels
    return runs, retrained


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    runs, retrained = flat_case_runs(config, os.path.dirname(cache_stem), device, recompute, jobs)
    save_runs(cache_stem, runs, retrained, config)
    return cache_stem


# ---------------------------------------------------------------------------------------------
# Reach values: the per-seed rows, the tables
# ---------------------------------------------------------------------------------------------


def grouped_runs(runs: dict, retrained: dict) -> dict[tuple[str, str], list[tuple[int, dict, dict]]]:
    """``{(case, source): [(seed, {method: Trajectory}, levels), ...]}`` of a cache, seeds in order."""
    grouped = {}
    for key, per_seed in by_source(runs, retrained).items():
        case, source = key.split(":", 1)
        seeded = [(int(seed_key.rsplit("/seed", 1)[1]), trajectories, levels)
                  for seed_key, trajectories, levels in per_seed]
        grouped[(case, source)] = sorted(seeded, key=lambda item: item[0])
    return grouped


def reach_rows(runs: dict, retrained: dict) -> list[dict]:
    """Every per-seed reach row of a cache (the CSV's rows), cases in :data:`CASES` order, sources in plot order."""
    grouped = grouped_runs(runs, retrained)
    rows = []
    for case in CASES:
        for source in ordered_sources(s for c, s in grouped if c == case):
            rows += per_seed_rows(CASE_LETTERS[case], source, grouped[(case, source)])
    return rows


def mean_levels(runs: dict, retrained: dict) -> dict[tuple[str, str, str], float]:
    """``{(case letter, source, component): mean retrained kl_true over seeds}``."""
    return {(CASE_LETTERS[case], source, component): float(np.mean([levels[component] for _, _, levels in per_seed]))
            for (case, source), per_seed in grouped_runs(runs, retrained).items() for component in FORGET}


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------


def start_and_target(per_seed, method: str, component: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two stars of a trade-off panel, seed medians of (retain KL, ``component`` KL): the reference (where
    ``method``'s runs start) and the retrained model (the level of "forgotten")."""
    first = [trajectories[method] for _, trajectories, _ in per_seed]
    initial = (np.median([t.metric("kl_true", "retain")[0] for t in first]),
               np.median([t.metric("kl_true", component)[0] for t in first]))
    target = (np.median([levels["retain"] for _, _, levels in per_seed]),
              np.median([levels[component] for _, _, levels in per_seed]))
    return initial, target


def _draw_official(axis, case: str, methods) -> None:
    start = official_fig5.start_point(case)
    for component, face in (("forget1", None), ("forget2", "white")):
        for method in methods:
            value = official_fig5.reach(case, method, component)
            if value is not None:
                axis.plot(value, start[f"retrained_{component}"], "D", color=method_color(method), ms=6,
                          markeredgecolor="black", markerfacecolor=face or method_color(method), zorder=6)
        axis.plot(start["retain"], start[component], "P", color="black", ms=6, markerfacecolor=face or "black",
                  zorder=6)


def _draw_paths(axis, per_seed, zoomed: bool, case_letter: str, official: bool) -> None:
    methods = list(per_seed[0][1])
    for method in methods:
        for component in FORGET:
            xs = [trajectories[method].metric("kl_true", "retain") for _, trajectories, _ in per_seed]
            ys = [trajectories[method].metric("kl_true", component) for _, trajectories, _ in per_seed]
            seed_lines_axes(axis, xs, ys, method_color(method), COMPONENT_STYLES[component], f"{method} {component}")
    for component, face in (("forget1", None), ("forget2", "none")):
        initial, target = start_and_target(per_seed, methods[0], component)
        axis.plot(*initial, "*", color="black", ms=11, markerfacecolor=face or "black", zorder=5)
        axis.plot(*target, "*", color="#ff7f0e", ms=13, markerfacecolor=face or "#ff7f0e", zorder=5)
    if official:
        _draw_official(axis, case_letter, methods)
    if zoomed:
        axis.set_xlim(0, WINDOW[0])
        axis.set_ylim(0, WINDOW[1])
    else:
        from matplotlib.patches import Rectangle

        axis.add_patch(Rectangle((0, 0), *WINDOW, fill=False, ls=":", lw=0.8, color="gray"))
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)


def _draw_reach_points(axis, rows: list[dict], case: str, component: str, sources: list[str], methods) -> None:
    """Per-seed reach values of one case and component: a group of methods per source (log scale)."""
    rng = np.random.default_rng(0)  # jitter only
    ticks = []
    for group, source in enumerate(sources):
        for offset, method in enumerate(methods):
            x = group * (len(methods) + 1) + offset
            values = np.array(list(values_by_seed(rows, case, source, method, component).values()))
            values = values[np.isfinite(values)]
            if values.size:
                axis.plot(x + rng.uniform(-0.25, 0.25, values.size), values, "o", color=method_color(method), ms=2.5,
                          alpha=0.6, markeredgewidth=0)
                axis.plot([x - 0.35, x + 0.35], [np.median(values)] * 2, color=method_color(method), lw=2)
            if source == OFFICIAL_SOURCE:
                spread = official_fig5.rerun_range(case, method, component)
                if spread is not None:
                    axis.fill_between([x - 0.45, x + 0.45], *spread, color="gray", alpha=0.25, lw=0)
                value = official_fig5.reach(case, method, component)
                if value is not None:
                    axis.plot(x + 0.45, value, "D", color=method_color(method), markeredgecolor="black", ms=6,
                              zorder=6)
        ticks.append((group * (len(methods) + 1) + (len(methods) - 1) / 2, source))
    axis.set_yscale("log")
    axis.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=7, rotation=15)
    axis.grid(axis="x", visible=False)
    axis.set_ylabel("retain KL at reach (log)")


def _legend(figure, methods) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=method_color(m), lw=2, label=m) for m in methods]
    handles += [Line2D([], [], color="k", ls=style, label=f"{c}: median path; thin: each seed")
                for c, style in COMPONENT_STYLES.items()]
    handles += [Line2D([], [], ls="", marker="*", color="black", ms=10, label="initial (reference): forget1 filled, "
                                                                                 "forget2 hollow"),
                Line2D([], [], ls="", marker="*", color="#ff7f0e", ms=11, label="retrained model"),
                Line2D([], [], ls="", marker="D", color="gray", markeredgecolor="black", ms=6,
                       label="official figure, seed 42 (reach; + start)"),
                Patch(color="gray", alpha=0.25, label="official pipeline re-runs, 5 seeds"),
                Line2D([], [], ls="", marker="o", color="gray", ms=3, label="one seed's reach (bar: median)")]
    figure.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    runs, retrained, document = load_runs(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    grouped = grouped_runs(runs, retrained)
    sources = ordered_sources(source for _, source in grouped)
    columns = max(len(sources), 2 * len(CASES))
    figure, axes = plt.subplots(2 * len(CASES) + 1, columns, figsize=(3.7 * columns, 3.1 * (2 * len(CASES) + 1)),
                                squeeze=False)
    methods = []
    for block, (case, label) in enumerate(CASES.items()):
        for col in range(columns):
            source = sources[col] if col < len(sources) else None
            per_seed = grouped.get((case, source))
            for row, zoomed in ((2 * block, True), (2 * block + 1, False)):
                axis = axes[row, col]
                if per_seed is None:
                    axis.set_axis_off()
                    continue
                _draw_paths(axis, per_seed, zoomed, CASE_LETTERS[case], zoomed and source == OFFICIAL_SOURCE)
                methods = methods or list(per_seed[0][1])
                axis.set_title(f"{label}\n{source}, {len(per_seed)} seeds" + ("" if zoomed else ": whole run"),
                               fontsize=8)
                axis.set_xlabel("retain distance: KL on retain")
                axis.set_ylabel("forget quality: KL on forget")
    rows = reach_rows(runs, retrained)
    panels = [(case, component) for case in CASES for component in FORGET]
    for col in range(columns):
        axis = axes[-1, col]
        if col >= len(panels):
            axis.set_axis_off()
            continue
        case, component = panels[col]
        _draw_reach_points(axis, rows, CASE_LETTERS[case], component, sources, methods)
        axis.set_title(f"{CASES[case]}: {component}\nretain KL at reach, per seed", fontsize=8)
    _legend(figure, methods)
    figure.suptitle(TITLE)
    paths = save_figure(figure, output_stem)
    table_path = output_stem + "_table.md"
    with atomic_output(table_path) as temporary, open(temporary, "w") as file:
        file.write(table_markdown(rows, document["config"], mean_levels(runs, retrained)))
    csv_path = os.path.join(os.path.dirname(output_stem), CSV_NAME)
    write_csv(csv_path, rows)
    return paths + [table_path, csv_path]

