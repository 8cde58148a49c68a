"""The field's other unlearning methods beside GA, NPO and SimNPO: trade-off and reference-model bias.

Question: on the paper's two Markov scenarios (case (a): forget2 of length 5; case (b): forget2 never
pre-trained), how do GA+Mismatch, WHP, TaskNegation, KGA, SeUL, AdvGA and AdvNPO (the registry
``markovsim.methods.METHODS``) trade forget quality against retain distance, next to GA, NPO and SimNPO,
in the exact simulator and on the paper-synthetic transformer; and which of them inherit NPO's
reference-model bias (docs/theory.md, "Reference-model bias")?

Top: one panel per (case, forget component) and source; x = KL on retain (lower is better), y = KL on
the forget component (higher = more forgotten), each line the seed mean of a method with a one-sd band;
stars mark the initial (reference) and the retrained model. TaskNegation is a path over its scale
lambda (0 .. the registry's lambda), a dot per lambda. Where the registry methods' transformer runs are
shorter than the baselines' (quick scale: 1 seed, 10 steps), that panel is zoomed to them.

Bottom: forget2's fraction of the forget-side unlearning power, p_2 = s_2 / (s_1 + s_2) with s_c the
component's ``power_share``, at the first step (bars, seed mean +- sd) and averaged over the run
(diamonds), per method and source. At the reference NPO's weights are all 1, so its first step is
sequence-summed gradient ascent: in case (a) that puts the power on the long forget1 (low p_2; GA's
token mean and SimNPO's length normalisation do not), and in case (b), where both forget components
have length 20, it is GA's step, which favours the never-learned forget2 (high p_2) while SimNPO's
weight moves the power to forget1. Each registry method's verdict is the baseline (NPO, GA, SimNPO)
with the nearest first-step p_2 (ties within ``TIE`` read NPO, the first), printed above its bars and
grouped in the title where every source agrees; TaskNegation, an update rule, has no gradient and no
verdict. The cache holds ``bias`` (every number and verdict; also ``<output>_table.md``), ``summary``
(the title's lines) and ``reach`` (per method and forget component, the retain KL at which its forget KL
first reaches the retrained model's, as ``markov_tradeoff``'s table).

Runs: GA, NPO and SimNPO are ``markov_tradeoff``'s run sets (the same cache files); the registry methods
run with ``markovsim.methods.run_method`` in the simulator (exact gradients, the scenario's optimiser and
step count) and with ``llm.methods.markov.unlearn_method`` on the transformer, from the same cached
pre-trained reference and retrained models.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from markovsim.methods import METHODS
from markovsim.plotting import method_color, seed_band_axes, stack_seeds
from markovsim.results import atomic_output

from . import markov_tradeoff
from .reach_statistics import reach_point
from .registry_runs import precompute, seeded_runs
from .runs import by_source, load_runs, ordered_sources, save_runs
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings

TITLE = "Other unlearning methods: forget quality vs retain distance, and who inherits NPO's reference bias"
CASES = markov_tradeoff.CASES
FORGET = ("forget1", "forget2")
BASELINES = ("GA", "NPO", "SimNPO")
VERDICT_ORDER = ("NPO", "GA", "SimNPO")  # a method's verdict: the baseline with the nearest forget2 fraction
REGISTRY = tuple(METHODS)
# Colours of the registry methods (markovsim.plotting.METHOD_COLORS has the baselines').
REGISTRY_COLORS = {"GA+Mismatch": "#bcbd22", "WHP": "#393b79", "TaskNegation": "#8c564b", "KGA": "#9467bd",
                   "SeUL": "#17becf", "AdvGA": "#637939", "AdvNPO": "#e377c2"}
HATCHES = ("", "//", "..", "xx")  # bias bars per source, in plot order


def color(method: str) -> str:
    return REGISTRY_COLORS.get(method) or method_color(method)


@dataclass(frozen=True)
class Config:
    """What the figure runs.

    Attributes:
        scale, seeds, simulator_steps: as ``markov_tradeoff.Config`` (the same values share its run sets).
        simulator_sources: exact model classes shown (GA/NPO/SimNPO and the registry methods).
        transformer: the transformer preset of GA/NPO/SimNPO (``markov_tradeoff``'s run sets); None = none.
        registry_transformer: the registry methods' transformer runs (``llm.methods.markov.unlearn_method``); its
            preset and pre-training should be ``transformer``'s, so both start from the same cached models
            (unlearning steps, evaluation and diagnostics may be smaller); None = simulator only.
        registry_transformer_seeds: the seeds of those runs (a subset of ``seeds``).
        methods: registry methods to run.
        task_negation_points: lambdas of TaskNegation's path, evenly from 0 to its configured scale.
    """

    scale: float = 0.2
    seeds: tuple[int, ...] = (0, 1)
    simulator_steps: int = 50
    simulator_sources: tuple[str, ...] = ("tabular",)
    transformer: TransformerSettings | None = field(
        default_factory=lambda: markov_tradeoff.CONFIGS["quick"].transformers[0])
    registry_transformer: TransformerSettings | None = None
    registry_transformer_seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = REGISTRY
    task_negation_points: int = 11

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(REGISTRY))
        if unknown:
            raise ValueError(f"methods: {unknown} are not registry methods; valid: {list(REGISTRY)}")
        if not set(self.registry_transformer_seeds) <= set(self.seeds):
            raise ValueError(f"registry_transformer_seeds {self.registry_transformer_seeds} must be a subset of "
                             f"seeds {self.seeds}")


def _registry_transformer(scale_name: str, **smaller) -> TransformerSettings:
    """``markov_tradeoff``'s first transformer at that scale (same pre-trained models), unlearning settings replaced."""
    return dataclasses.replace(markov_tradeoff.CONFIGS[scale_name].transformers[0], **smaller)


CONFIGS = {
    "tiny": Config(scale=0.005, simulator_steps=3, transformer=markov_tradeoff.CONFIGS["tiny"].transformers[0],
                   registry_transformer=_registry_transformer("tiny", unlearn_steps=2), task_negation_points=3),
    # quick: the registry methods on the transformer for 10 steps (start and end evaluated) on one seed, to stay
    # within make figures' budget (AdvGA / AdvNPO's power share solves LAU's inner problem on the whole forget set)
    "quick": Config(registry_transformer=_registry_transformer("quick", unlearn_steps=10, eval_every=10,
                                                               diagnostics_max_sequences=16),
                    task_negation_points=6),
    "paper": Config(scale=1.0, seeds=(0, 1, 2, 3, 4), simulator_sources=("tabular", "mixture"),
                    transformer=markov_tradeoff.CONFIGS["paper"].transformers[0],
                    registry_transformer=_registry_transformer("paper"), registry_transformer_seeds=(0, 1, 2, 3, 4)),
}


# ---------------------------------------------------------------------------------------------
# The bias table
# ---------------------------------------------------------------------------------------------


def forget2_fraction(trajectory) -> np.ndarray:
    """(E,) p_2 = s_2 / (s_1 + s_2): forget2's fraction of the forget-side power (NaN where not recorded)."""
    shares = np.stack([trajectory.metric("power_share", c) for c in FORGET])  # (2, E)
    total = shares.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, shares[1] / total, np.nan)


TIE = 1e-6  # distances this close are a tie (GA's and NPO's first steps agree up to rounding in case (b))


def closer_to(value: float | None, references: dict[str, float | None]) -> str | None:
    """The name of the reference value nearest ``value``, the first in ``references``' order among those within
    ``TIE`` of the nearest; None if ``value`` or any reference is missing."""
    if value is None or any(reference is None for reference in references.values()):
        return None
    distances = {name: abs(value - reference) for name, reference in references.items()}
    nearest = min(distances.values())
    return next(name for name, distance in distances.items() if distance <= nearest + TIE)


def _mean_sd(values) -> tuple[float | None, float | None]:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def bias_rows(case: str, source: str, per_seed) -> list[dict]:
    """One row per method: forget2's fraction of the forget power at the first evaluation and its run mean
    (mean/sd over seeds), and the baseline each is nearest (``VERDICT_ORDER``: NPO first, so in case (b), where NPO's
    first step is GA's, a tie reads NPO)."""
    methods = list(dict.fromkeys(m for trajectories, _ in per_seed for m in trajectories))
    rows = []
    for method in methods:
        fractions = [forget2_fraction(trajectories[method]) for trajectories, _ in per_seed if method in trajectories]
        first = _mean_sd([f[0] for f in fractions])
        run = _mean_sd([np.nanmean(f) if np.any(np.isfinite(f)) else np.nan for f in fractions])
        rows.append({"case": case, "source": source, "method": method, "seeds": len(fractions),
                     "first_step_forget2_fraction": first[0], "first_step_sd": first[1],
                     "run_mean_forget2_fraction": run[0], "run_mean_sd": run[1]})
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        for key, verdict in (("first_step_forget2_fraction", "first_step_closer_to"),
                             ("run_mean_forget2_fraction", "run_mean_closer_to")):
            row[verdict] = closer_to(row[key], {m: by_method.get(m, {}).get(key) for m in VERDICT_ORDER})
    return rows


def verdicts(bias: list[dict], case: str) -> dict[str, list[str]]:
    """The registry methods of one case grouped by their first-step verdict where every source agrees
    (``{"NPO": [...], "GA": [...], "SimNPO": [...], "mixed": [...]}``; TaskNegation, with no gradient, left out)."""
    groups = {name: [] for name in VERDICT_ORDER + ("mixed",)}
    rows = [row for row in bias if row["case"] == case and row["method"] not in BASELINES]
    for method in dict.fromkeys(row["method"] for row in rows):
        found = {row["first_step_closer_to"] for row in rows if row["method"] == method}
        if found != {None}:
            groups[found.pop() if len(found) == 1 else "mixed"].append(method)
    return groups


def summary_line(bias: list[dict]) -> str:
    """Two lines, one per case: the registry methods whose first-step split is nearest NPO's, GA's, SimNPO's."""
    lines = []
    for case, label in CASES.items():
        groups = verdicts(bias, case)
        lines.append(f"{label.split(' ')[0]} " + "; ".join(f"{'like ' * (name != 'mixed')}{name}: {', '.join(methods)}"
                                                          for name, methods in groups.items() if methods))
    return "first-step power split (every source):\n" + "\n".join(lines)


def method_seeds(per_seed, method: str) -> list:
    """The ``(key, trajectories, levels)`` entries of the seeds that ran ``method`` (the registry methods may run on
    fewer transformer seeds than the baselines)."""
    return [entry for entry in per_seed if method in entry[-2]]


def reach_rows(case: str, source: str, per_seed) -> list[dict]:
    """Per method and forget component, the retain KL (and step) at which the forget KL first reaches the seed's
    retrained level (``reach_statistics.reach_point``), mean/sd over the seeds that ran the method and reach it."""
    methods = list(dict.fromkeys(m for trajectories, _ in per_seed for m in trajectories))
    rows = []
    for method in methods:
        seeds = [(t[method], levels) for t, levels in per_seed if method in t]
        for component in FORGET:
            points = [reach_point(trajectory, component, levels[component]) for trajectory, levels in seeds]
            reached = [p for p in points if np.isfinite(p[0])]
            retain_kl, step = _mean_sd([p[0] for p in reached]), _mean_sd([p[1] for p in reached])
            rows.append({"case": case, "source": source, "method": method, "component": component,
                         "seeds": len(seeds), "reached": len(reached),
                         "retrained_kl": float(np.mean([levels[component] for _, levels in seeds])),
                         "retain_kl_mean": retain_kl[0], "retain_kl_sd": retain_kl[1], "step_mean": step[0],
                         "step_sd": step[1]})
    return rows


def format_value(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "not reached"
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} +- {sd:.3f}"


def bias_markdown(bias: list[dict]) -> str:
    """The bias table as Markdown: forget2's fraction of the forget power, first step and run mean (mean +- sd)."""
    lines = ["| case | source | method | first step | closer to | run mean | closer to |",
             "|---|---|---|---|---|---|---|"]
    for row in bias:
        lines.append(f"| {CASES[row['case']].split(' ')[0]} | {row['source']} | {row['method']} | "
                     f"{format_value(row['first_step_forget2_fraction'], row['first_step_sd'])} | "
                     f"{row['first_step_closer_to'] or '-'} | "
                     f"{format_value(row['run_mean_forget2_fraction'], row['run_mean_sd'])} | "
                     f"{row['run_mean_closer_to'] or '-'} |")
    return "\n".join(lines).replace("not reached", "no gradient") + "\n"


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    cache_dir = os.path.dirname(cache_stem)
    precompute(config, cache_dir, device, recompute, jobs)
    runs, retrained, bias, reach = {}, {}, [], []
    for case in CASES:
        for source, per_seed in seeded_runs(config, case, cache_dir, device, recompute).items():
            for seed, (trajectories, levels) in zip(config.seeds, per_seed):
                runs[f"{case}:{source}/seed{seed}"], retrained[f"{case}:{source}/seed{seed}"] = trajectories, levels
            bias += bias_rows(case, source, per_seed)
            reach += reach_rows(case, source, per_seed)
    save_runs(cache_stem, runs, retrained, config, bias=bias, reach=reach,
              summary=summary_line(bias))
    return cache_stem


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def _tradeoff_panel(axis, per_seed, component: str, zoom: bool = False) -> None:
    """Every method's seed-mean trade-off curve with its band; ``zoom``: limits to the registry methods' curves
    and the two stars (the baselines' longer runs clipped)."""
    methods = list(dict.fromkeys(m for _, trajectories, _ in per_seed for m in trajectories))
    extent = []
    for method in methods:
        runs = [trajectories[method] for _, trajectories, _ in method_seeds(per_seed, method)]
        xs, ys = [t.metric("kl_true", "retain") for t in runs], [t.metric("kl_true", component) for t in runs]
        path = get_method_kind(method) == "update_rule"  # TaskNegation: a dot per lambda
        seed_band_axes(axis, xs, ys, color(method), "-", method, marker_every=1 if path else 0)
        if method in REGISTRY:
            extent.append((np.nanmax(np.nanmean(stack_seeds(xs), 0)), np.nanmax(np.nanmean(stack_seeds(ys), 0))))
    stars = list(markov_tradeoff.start_and_target(per_seed, methods[0], component))
    axis.plot(*stars[0], "*", color="black", ms=11, zorder=5)
    axis.plot(*stars[1], "*", color="#ff7f0e", ms=13, markeredgecolor="black", zorder=5)
    if zoom and extent:
        right, top = np.max(extent + stars, axis=0)
        axis.set_xlim(0, 1.15 * right)
        axis.set_ylim(0, 1.15 * top)
    else:
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)


def panel_runs(per_seed) -> str:
    """A panel's runs, e.g. ``2 seeds, 50 steps``, and the registry methods' seeds and steps where they differ."""
    def describe(methods) -> str:
        stepped = [m for m in methods if get_method_kind(m) != "update_rule"]  # TaskNegation's steps are lambdas
        runs = [entry[-2][m] for m in stepped for entry in method_seeds(per_seed, m)]
        seeds = max((len(method_seeds(per_seed, m)) for m in methods), default=0)
        return f"{seeds} seed{'s' * (seeds != 1)}, {max((int(t.steps[-1]) for t in runs), default=0)} steps"

    baselines, registry = describe(BASELINES), describe(REGISTRY)
    return baselines if registry == baselines else f"{baselines}; registry methods: {registry}"


def get_method_kind(method: str) -> str:
    """The registry kind of ``method`` (``"objective"`` for GA, NPO and SimNPO)."""
    return METHODS[method].kind if method in METHODS else "objective"


def _bias_panel(axis, bias: list[dict], case: str, sources: list[str], methods: list[str]) -> None:
    width = 0.8 / len(sources)
    for s, source in enumerate(sources):
        rows = {row["method"]: row for row in bias if row["case"] == case and row["source"] == source}
        for m, method in enumerate(methods):
            row = rows.get(method)
            if row is None or row["first_step_forget2_fraction"] is None:
                continue
            x = m - 0.4 + width * (s + 0.5)
            bar = axis.bar(x, row["first_step_forget2_fraction"], width, yerr=row["first_step_sd"] or 0.0,
                           color=color(method), hatch=HATCHES[s % len(HATCHES)], edgecolor="white", capsize=2)[0]
            bar.set_gid(f"{case}/{source}/{method}/first_step")
            if row["run_mean_forget2_fraction"] is not None:
                marker, = axis.plot(x, row["run_mean_forget2_fraction"], "D", color="black", ms=3)
                marker.set_gid(f"{case}/{source}/{method}/run_mean")
            if row["first_step_closer_to"] is not None and method not in BASELINES:
                axis.text(x, 1.02, row["first_step_closer_to"][0], ha="center", va="bottom", fontsize=6)
    axis.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=7)
    axis.set_ylim(0, 1.1)
    axis.axhline(0.5, color="gray", lw=0.6, ls=":")
    axis.set_ylabel("forget2 fraction of forget power")
    axis.set_title(CASES[case], fontsize=9)
    for m, method in enumerate(methods):
        if get_method_kind(method) == "update_rule":
            axis.text(m, 0.05, "no gradient\n(update rule)", ha="center", va="bottom", rotation=90, fontsize=6)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    runs, retrained, document = load_runs(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    grouped = by_source(runs, retrained)
    sources = ordered_sources(key.split(":", 1)[1] for key in grouped)
    methods = list(dict.fromkeys(m for trajectories in runs.values() for m in trajectories))
    figure = plt.figure(figsize=(max(3.6 * len(sources), 9.0), 2.9 * 2 * len(CASES) + 3.9))
    top, bottom = figure.subfigures(2, 1, height_ratios=[2 * len(CASES) * 2.9, 3.9])
    axes = top.subplots(2 * len(CASES), len(sources), squeeze=False)
    for block, (case, label) in enumerate(CASES.items()):
        for row, component in enumerate(FORGET):
            for col, source in enumerate(sources):
                axis, per_seed = axes[2 * block + row, col], grouped.get(f"{case}:{source}")
                if per_seed is None:
                    axis.set_axis_off()
                    continue
                runs_text = panel_runs(per_seed)
                zoom = "registry methods:" in runs_text  # their runs are shorter: show them, clip the baselines
                _tradeoff_panel(axis, per_seed, component, zoom)
                runs_lines = runs_text.replace("; ", ";\n")  # one line per run length: the titles fit the panel
                axis.set_title(f"{label}: {component}\n{source}, {runs_lines}" + (" (zoomed to them)" if zoom else ""),
                               fontsize=8)
                axis.set_xlabel("retain distance: KL on retain")
                axis.set_ylabel(f"forget quality: KL on {component}")
    bias_axes = bottom.subplots(1, len(CASES), squeeze=False)[0]
    hatching = ", ".join(f"{source} {HATCHES[s % len(HATCHES)] or 'plain'}" for s, source in enumerate(sources))
    bottom.suptitle("forget2's fraction of the forget-side unlearning power s2 / (s1 + s2): bars the first step (seed "
                    f"mean +- sd), diamonds the run mean\nbars per source: {hatching}; N / G / S: first step nearest "
                    "NPO's / GA's / SimNPO's\n(in (b) NPO's first step is GA's: every weight is 1 at the reference and "
                    "the forget lengths are equal)", fontsize=9)
    for axis, case in zip(bias_axes, CASES):
        _bias_panel(axis, document["bias"], case, sources, methods)
    paths = {m for m in methods if get_method_kind(m) == "update_rule"}
    handles = [Line2D([], [], color=color(m), lw=2, marker="." if m in paths else None,
                      label=m + (" (path over lambda)" if m in paths else "")) for m in methods]
    handles += [Line2D([], [], ls="", marker="*", color="black", ms=10, label="initial (reference)"),
                Line2D([], [], ls="", marker="*", color="#ff7f0e", markeredgecolor="black", ms=11,
                       label="retrained model")]
    top.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8)
    figure.suptitle(f"{TITLE}\n{document['summary']}", fontsize=10)
    paths = save_figure(figure, output_stem)
    with atomic_output(output_stem + "_table.md") as temporary:
        with open(temporary, "w") as file:
            file.write(bias_markdown(document["bias"]))
    return paths + [output_stem + "_table.md"]
