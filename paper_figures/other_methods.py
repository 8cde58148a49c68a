"""The field's other unlearning methods beside GA, NPO and SimNPO: trade-off and reference-model bias.

Question: on the paper's two Markov scenarios (case (a): forget2 of length 5; case (b): forget2 never
pre-trained), how do GA+Mismatch, WHP, TaskNegation, KGA, SeUL, AdvGA and AdvNPO (the registry
``markovsim.methods.METHODS``) trade forget quality against retain distance, next to GA, NPO and SimNPO,
in the exact simulator and on the paper-synthetic transformer; and which of them inherit NPO's
reference-model bias (docs/theory.md, "Reference-model bias")?

Top: one panel per (case, forget component) and source; x = KL on retain (lower is better), y = KL on
the forget component (higher = more forgotten), each line the seed mean of a method with a one-sd band;
stars mark the initial (reference) and the retrained model. TaskNegation is a path over its scale
lambda (0 .. the registry's lambda), drawn with markers. Bottom: the forget2 fraction of the forget-side
unlearning power, p_2 = s_2 / (s_1 + s_2) with s_c the component's ``power_share``, at the first step
(bars, seed mean +- sd) and averaged over the run (diamonds), per method and source. NPO's bias puts
the power on the long component in case (a) (low p_2) and on the never-learned one in case (b) (high
p_2); SimNPO's length-normalised weight does the opposite. Each method is labelled with the baseline
whose first-step p_2 it is closer to (N = NPO, S = SimNPO); the cache's ``bias`` table holds every
number and the classification, and ``reach`` the retain KL at which each forget component first reaches
its retrained level (as ``markov_tradeoff``'s table).

GA, NPO and SimNPO are ``markov_tradeoff``'s run sets (shared cache); the registry methods are run here
with ``markovsim.methods.simulate.run_method`` (exact gradients, the scenario's optimiser and step count).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from markovsim.methods import METHODS, get_method, run_method, unseen_sequences
from markovsim.plotting import method_color, seed_band_axes, stack_seeds
from markovsim.progress import progress_iter
from markovsim.results import atomic_output
from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS, prepare

from . import markov_tradeoff
from .runs import (
    _RECOMPUTED,
    ScenarioRuns,
    _execute,
    _needs_computing,
    by_source,
    cached_runs,
    job_key,
    load_runs,
    ordered_sources,
    save_runs,
)
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings, prepare_transformer

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
REGISTRY_KIND = "registry_simulator"
REGISTRY_TRANSFORMER_KIND = "registry_transformer"


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
# Runs
# ---------------------------------------------------------------------------------------------


def baseline_runs(config: Config, case: str) -> ScenarioRuns:
    """GA, NPO and SimNPO: ``markov_tradeoff``'s run sets (same job keys when the settings agree)."""
    transformers = () if config.transformer is None else (config.transformer,)
    return ScenarioRuns(case, config.scale, tuple(config.seeds), config.simulator_steps,
                        tuple(config.simulator_sources), transformers)


def registry_jobs(config: Config, case: str) -> list[dict]:
    """One JSON-ready job per (seed, exact model class): every registry method of ``config`` on it."""
    return [{"kind": REGISTRY_KIND, "scenario": case, "scale": config.scale, "seed": seed, "source": source,
             "steps": config.simulator_steps, "methods": list(config.methods),
             "task_negation_points": config.task_negation_points}
            for seed in config.seeds for source in config.simulator_sources]


def registry_transformer_jobs(config: Config, case: str, device: str) -> list[dict]:
    """One JSON-ready job per seed of ``config.registry_transformer_seeds``: the registry methods on the transformer."""
    if config.registry_transformer is None:
        return []
    return [{"kind": REGISTRY_TRANSFORMER_KIND, "scenario": case, "scale": config.scale, "seed": seed,
             "source": config.registry_transformer.preset, "device": device, "methods": list(config.methods),
             "settings": dataclasses.asdict(dataclasses.replace(config.registry_transformer, seed=seed)),
             "task_negation_points": config.task_negation_points}
            for seed in config.registry_transformer_seeds]


def task_negation_scales(method: str, points: int) -> np.ndarray | None:
    """TaskNegation's lambdas, ``points`` evenly from 0 to the registry's scale (None for the other methods)."""
    if get_method(method).kind != "update_rule":
        return None
    return np.linspace(0.0, get_method(method).config.scale, points)


def registry_transformer_runs(case: str, scale: float, settings: TransformerSettings, device: str, methods,
                              task_negation_points: int, progress: bool = True, model_dir: str | None = None,
                              recompute: bool = False):
    """The registry methods on one seed of a scenario on a transformer: ``({method: Trajectory}, levels)``.

    The reference and retrained models are ``transformer_runs.prepare_transformer``'s (the cached models of
    ``markov_tradeoff``'s runs when the settings agree); each method runs from a copy of the reference with
    ``llm.methods.markov.unlearn_method`` and the registry's transformer defaults; KGA's D_n is
    ``markovsim.methods.unseen_sequences(spec, len(forget), 0)``, as in the simulator.
    """
    unlearn_method = _transformer_driver()
    setup = prepare_transformer(case, scale, settings, device, progress, model_dir, recompute)
    unseen = unseen_sequences(setup.scenario.spec, len(setup.forget), 0)
    trajectories = {}
    for method in progress_iter(methods, len(methods), f"{case} {settings.preset} seed {settings.seed}", progress,
                                unit="method"):
        trajectories[method] = unlearn_method(copy.deepcopy(setup.reference), method, setup.forget, setup.retain,
                                              setup.unlearning_config, setup.evaluator,
                                              unseen=unseen if method == "KGA" else None,
                                              scales=task_negation_scales(method, task_negation_points))
    return trajectories, setup.retrained_kl


def _transformer_driver():
    """``llm.methods.markov.unlearn_method``; a clear error where this checkout does not have it yet."""
    try:
        from llm.methods.markov import unlearn_method
    except ImportError as error:
        raise ValueError("other_methods: registry_transformer needs llm.methods.markov.unlearn_method (the registry "
                         "methods on the Markov transformers), which this checkout lacks; set registry_transformer="
                         "None for the simulator half only") from error
    return unlearn_method


def registry_simulator_runs(case: str, scale: float, steps: int, methods, seed: int, source: str,
                            task_negation_points: int, progress: bool = False):
    """The registry methods on one exact model of a scenario: ``({source: {method: Trajectory}}, {source: levels})``.

    The data are the scenario's at ``scale`` with seed ``seed`` (as ``runs.simulator_runs``), the optimiser
    the scenario's with ``steps`` steps; TaskNegation is evaluated at ``task_negation_points`` lambdas.
    """
    scenario = SCENARIOS[case].scaled(scale)
    scenario = dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, seed=seed))
    dynamics = dataclasses.replace(scenario.dynamics, steps=steps)
    setup = prepare(scenario, source)
    levels = dict(zip(setup.evaluator.component_names, setup.evaluator.evaluate(setup.retrained)["kl_true"].tolist()))
    trajectories = {}
    for method in progress_iter(methods, len(methods), f"{case} {source} seed {seed}", progress, unit="method"):
        trajectories[method] = run_method(method, setup, dynamics, scales=task_negation_scales(method,
                                                                                         task_negation_points),
                                          progress=False)
    return {source: trajectories}, {source: levels}


def _execute_job(job: dict, progress: bool, cache_dir: str, recompute: bool = False):
    if job["kind"] == REGISTRY_KIND:
        return registry_simulator_runs(job["scenario"], job["scale"], job["steps"], job["methods"], job["seed"],
                                       job["source"], job["task_negation_points"], progress)
    if job["kind"] == REGISTRY_TRANSFORMER_KIND:
        trajectories, levels = registry_transformer_runs(
            job["scenario"], job["scale"], TransformerSettings(**job["settings"]), job["device"], job["methods"],
            job["task_negation_points"], progress, os.path.join(cache_dir, "models"), recompute)
        return {job["source"]: trajectories}, {job["source"]: levels}
    return _execute(job, progress, cache_dir, recompute)


def _run_job(cache_dir: str, job: dict, recompute: bool, progress: bool) -> str:
    """Compute and cache one job (in this process or a worker); returns its cache stem."""
    with torch_threads(1):
        cached_runs(cache_dir, job_key(job), job, lambda: _execute_job(job, progress, cache_dir, recompute),
                    recompute)
    return os.path.join(cache_dir, f"runs_{job_key(job)}")


def all_jobs(config: Config, device: str) -> list[dict]:
    """Every run set of the figure: the baselines' (``markov_tradeoff``'s) and the registry methods'."""
    return [job for case in CASES for job in case_jobs(config, case, device)]


def case_jobs(config: Config, case: str, device: str) -> list[dict]:
    """One case's run sets: the baselines', the registry methods' in the simulator and on the transformer."""
    return (baseline_runs(config, case).jobs(device) + registry_jobs(config, case)
            + registry_transformer_jobs(config, case, device))


def precompute(config: Config, cache_dir: str, device: str, recompute: bool, jobs: int) -> None:
    """The run sets not cached yet, in ``jobs`` worker processes (transformers first: they take longest)."""
    missing = [job for job in all_jobs(config, device) if _needs_computing(cache_dir, job, recompute)]
    if jobs <= 1 or len(missing) <= 1:
        return  # computed in order by seeded_runs, with progress bars
    missing.sort(key=lambda job: job["kind"] not in ("transformer", REGISTRY_TRANSFORMER_KIND))
    os.makedirs(cache_dir, exist_ok=True)
    with ProcessPoolExecutor(min(jobs, len(missing)), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_job, cache_dir, job, recompute, False) for job in missing]
        for future in progress_iter(as_completed(futures), len(futures), "run sets", unit="run set"):
            _RECOMPUTED.add(future.result())  # a worker's recompute counts for this process too


def seeded_runs(config: Config, case: str, cache_dir: str, device: str, recompute: bool) -> dict[str, list]:
    """``{source: [({method: Trajectory}, {component: retrained kl_true}) per seed]}``, baselines and registry
    methods merged per (source, seed)."""
    merged: dict[tuple[str, int], tuple[dict, dict]] = {}
    for job in case_jobs(config, case, device):
        runs, levels = cached_runs(cache_dir, job_key(job), job,
                                   lambda job=job: _execute_job(job, True, cache_dir, recompute), recompute)
        trajectories, _ = merged.setdefault((job["source"], job["seed"]), ({}, levels[job["source"]]))
        trajectories.update(runs[job["source"]])
    result: dict[str, list] = {}
    for (source, _), value in merged.items():
        result.setdefault(source, []).append(value)
    return result


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
    """``markov_tradeoff.reach_rows`` per method, over the seeds that ran it."""
    methods = list(dict.fromkeys(m for trajectories, _ in per_seed for m in trajectories))
    rows = []
    for method in methods:
        seeds = [(None, {method: t[method]}, levels) for t, levels in per_seed if method in t]
        rows += markov_tradeoff.reach_rows(case, source, seeds, len(seeds))
    return rows


def bias_markdown(bias: list[dict]) -> str:
    """The bias table as Markdown: forget2's fraction of the forget power, first step and run mean (mean +- sd)."""
    lines = ["| case | source | method | first step | closer to | run mean | closer to |",
             "|---|---|---|---|---|---|---|"]
    for row in bias:
        lines.append(f"| {CASES[row['case']].split(' ')[0]} | {row['source']} | {row['method']} | "
                     f"{markov_tradeoff.format_value(row['first_step_forget2_fraction'], row['first_step_sd'])} | "
                     f"{row['first_step_closer_to'] or '-'} | "
                     f"{markov_tradeoff.format_value(row['run_mean_forget2_fraction'], row['run_mean_sd'])} | "
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
    first = [trajectories[methods[0]] for _, trajectories, _ in per_seed]
    stars = [(np.mean([t.metric("kl_true", "retain")[0] for t in first]),
              np.mean([t.metric("kl_true", component)[0] for t in first])),
             (np.mean([levels["retain"] for _, _, levels in per_seed]),
              np.mean([levels[component] for _, _, levels in per_seed]))]
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
                axis.set_title(f"{label}: {component}" + (" (zoomed to the registry methods)" if zoom else "")
                               + f"\n{source}, {runs_text}", fontsize=8)
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
