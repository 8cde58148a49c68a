"""Which ingredient makes SimNPO work: the reference and the length normalisation separated, per optimiser,
at a shared learning rate and at each method's own best one.

Question: SimNPO changes two things relative to NPO, it drops the reference model and it length-normalises the
log-likelihood. With GA and the 2x2 {reference kept, dropped} x {summed, length-normalised} (NPO, SimNPO-sum,
NPO-ave, SimNPO; ``markovsim.objectives.ingredient_ladder``: the summed cells take the scenario's NPO beta, the
normalised ones its SimNPO beta), which ingredient lowers the retain damage at which each forget component is
unlearned (the *reach value* of ``reach_statistics``: the retain KL where the component's forget KL reaches the
retrained model's), in case (a) (forget2 of length 5) and case (b) (forget2 never pre-trained), and does the
answer survive a change of optimiser (the paper code's legacy AdamW, torch's AdamW, plain gradient descent)
and of learning rate?

Protocol (docs/theory.md, "Which ingredient"): for each source, case, optimiser and method, every learning rate
of the optimiser's grid runs on the *selection seeds*; the best learning rate is the one with the lowest sum over
the forget components of the median reach value (a component a learning rate reaches on at most half the seeds
makes it ineligible). The *report seeds*, disjoint from those, then run each method at the shared learning rate
(``default_learning_rates``: the scenario's Adam lr 0.02, and for GD lr 10, the lowest where GA reaches case (a)'s
components within the 50 steps) and at its own best one. Seeds are paired: on one seed every method, optimiser
and learning rate unlearns the same reference on the same data.

Layout: one column per source; one row per case and forget component: for each method (x) and optimiser
(marker), the median reach value over the report seeds with its 5-95% range at the method's best learning rate
(filled) and at the shared one (hollow); a method that reaches on no report seed is drawn as an x at the top.
Outputs beside the figure: ``<output>_table.md`` (every cell's best learning rate and reach values, and the four
ingredient differences per case with bootstrap intervals over the report seeds), ``<output>_reach.csv``
(one row per source, case, optimiser, learning rate, method, component and seed) and ``<output>_summary.json``
(config and learning-rate choices; with the CSV it replaces the cache: :func:`load_outputs`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from markovsim.objectives import LADDER
from markovsim.optimizers import ADAM_DEFAULTS
from markovsim.plotting import method_color
from markovsim.results import atomic_output, atomic_write_json, read_json

from .cache import load_cache, save_cache
from .markov_tradeoff import CASES
from .reach_statistics import FORGET, paired_difference, reach_point, summarise
from .runs import SIMULATOR_SOURCES, map_in_workers, ordered_sources
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings

TITLE = "Which ingredient makes SimNPO work: reference and length normalisation, per optimiser and learning rate"
METHODS = tuple(label for label, _, _ in LADDER)
OPTIMIZERS = ("adamw_legacy", "adamw", "gd")
OPTIMIZER_MARKERS = {"adamw_legacy": "o", "adamw": "s", "gd": "^"}
OPTIMIZER_LABELS = {"adamw_legacy": "legacy AdamW (paper code)", "adamw": "torch AdamW", "gd": "gradient descent"}
# The four single-ingredient steps: (label, a, b) for the paired difference a - b of reach values.
INGREDIENT_STEPS = (
    ("drop the reference (summed)", "SimNPO-sum", "NPO"),
    ("drop the reference (normalised)", "SimNPO", "NPO-ave"),
    ("normalise (with reference)", "NPO-ave", "NPO"),
    ("normalise (no reference)", "SimNPO", "SimNPO-sum"),
    ("both (SimNPO - NPO)", "SimNPO", "NPO"),
)
CSV_COLUMNS = ("case", "source", "optimizer", "learning_rate", "method", "component", "seed", "phase",
               "retain_kl_at_reach", "step_at_reach")
ADAM_MULTIPLIERS = (0.1, 0.3, 1.0, 3.0, 10.0)  # 10x either side of the shared learning rate
GD_MULTIPLIERS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # SimNPO's GD steps are ~1e-3 of GA's


@dataclass(frozen=True)
class Config:
    """What the figure runs.

    Attributes:
        scale: fraction of the paper's sequence counts, for every source.
        steps: unlearning steps of every run (evaluated after each).
        simulator_sources: exact model classes.
        transformers: transformer presets (``TransformerSettings``; pre-trained with their own settings, the
            paper's, then unlearned with each optimiser and learning rate of the ladder).
        optimizers: a subset of :data:`OPTIMIZERS` (each with ``markovsim.optimizers.ADAM_DEFAULTS``' eps and
            weight decay; GD has neither).
        default_learning_rates: ``((optimizer, lr), ...)`` the shared learning rate per optimiser (per source kind:
            the simulator's; a transformer uses its settings' ``unlearn_learning_rate`` for the Adam rules and
            ``transformer_gd_learning_rate`` for GD).
        multipliers: ``((optimizer, (m, ...)), ...)`` the grid is the shared learning rate times each m.
        selection_seeds, report_seeds: disjoint seed sets (best learning rates are chosen on the first).
        methods: a subset of :data:`METHODS` (GA and the 2x2).
        transformers_on_cpu: run the transformer sources on a CPU too (default False: their grid is thousands of
            runs, so on a CPU they are skipped with a message and the figure shows the exact models).
    """

    scale: float = 0.2
    steps: int = 50
    simulator_sources: tuple[str, ...] = ("tabular",)
    transformers: tuple[TransformerSettings, ...] = ()
    optimizers: tuple[str, ...] = OPTIMIZERS
    default_learning_rates: tuple[tuple[str, float], ...] = (("adamw_legacy", 0.02), ("adamw", 0.02), ("gd", 10.0))
    transformer_gd_learning_rate: float = 1.0
    multipliers: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("adamw_legacy", ADAM_MULTIPLIERS), ("adamw", ADAM_MULTIPLIERS), ("gd", GD_MULTIPLIERS))
    selection_seeds: tuple[int, ...] = (100, 101)
    report_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = METHODS
    transformers_on_cpu: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.optimizers) - set(OPTIMIZERS))
        if unknown:
            raise ValueError(f"optimizers: {unknown} unknown; valid: {list(OPTIMIZERS)}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: {unknown} unknown; valid: {list(METHODS)}")
        unknown = sorted(set(self.simulator_sources) - set(SIMULATOR_SOURCES))
        if unknown:
            raise ValueError(f"simulator_sources: {unknown} unknown; valid: {list(SIMULATOR_SOURCES)}")
        if set(self.selection_seeds) & set(self.report_seeds) or not self.selection_seeds or not self.report_seeds:
            raise ValueError(f"selection_seeds {self.selection_seeds} and report_seeds {self.report_seeds} must be "
                             f"non-empty and disjoint (the best learning rate is chosen on seeds it is not "
                             f"reported on)")
        for name in ("default_learning_rates", "multipliers"):
            missing = sorted(set(self.optimizers) - {optimizer for optimizer, _ in getattr(self, name)})
            if missing:
                raise ValueError(f"{name} has no entry for optimizers {missing}")

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.simulator_sources) + tuple(settings.preset for settings in self.transformers)

    def shared_learning_rate(self, source: str, optimizer: str) -> float:
        """The learning rate every method shares (the figures' usual setting) for ``source`` and ``optimizer``."""
        settings = self.transformer(source)
        if settings is None:
            return float(dict(self.default_learning_rates)[optimizer])
        return float(self.transformer_gd_learning_rate if optimizer == "gd" else settings.unlearn_learning_rate)

    def grid(self, source: str, optimizer: str) -> tuple[float, ...]:
        """The learning-rate grid: the shared learning rate times each multiplier."""
        base = self.shared_learning_rate(source, optimizer)
        return tuple(float(base * m) for m in dict(self.multipliers)[optimizer])

    def transformer(self, source: str) -> TransformerSettings | None:
        return next((settings for settings in self.transformers if settings.preset == source), None)


CONFIGS = {
    "tiny": Config(scale=0.005, steps=3, optimizers=("adamw_legacy", "gd"),
                   multipliers=(("adamw_legacy", (1.0, 10.0)), ("adamw", (1.0,)), ("gd", (1.0, 100.0))),
                   selection_seeds=(100,), report_seeds=(0, 1)),
    # quick: the tabular model on a tenth of the paper's data, 2 selection and 4 report seeds, GD's grid every
    # decade (about half a minute on 2 workers)
    "quick": Config(scale=0.1, report_seeds=(0, 1, 2, 3),
                    multipliers=(("adamw_legacy", ADAM_MULTIPLIERS), ("adamw", ADAM_MULTIPLIERS),
                                 ("gd", (0.1, 1.0, 10.0, 100.0, 1000.0)))),
    # paper: both exact models at the paper's counts, 5 selection and 10 report seeds; the transformers need a GPU
    "paper": Config(scale=1.0, simulator_sources=SIMULATOR_SOURCES,
                    transformers=(TransformerSettings(preset="paper-synthetic"),
                                  TransformerSettings(preset="gpt2-4x128")),
                    selection_seeds=(100, 101, 102, 103, 104), report_seeds=tuple(range(10))),
}


# ---------------------------------------------------------------------------------------------
# Runs: one unit = one (source, case, seed), every (optimizer, learning rate, method) asked of it
# ---------------------------------------------------------------------------------------------


def optimizer_settings(optimizer: str) -> dict:
    """eps and weight decay of an Adam rule (``ADAM_DEFAULTS``); GD has neither."""
    defaults = ADAM_DEFAULTS.get(optimizer)
    return {} if defaults is None else {"adam_eps": defaults["eps"], "weight_decay": defaults["weight_decay"]}


def _simulator_unit(task: dict) -> list[dict]:
    from markovsim.dynamics import unlearn
    from markovsim.runtime import torch_threads
    from markovsim.scenarios import prepare

    from .runs import retrained_levels, seeded_scenario

    scenario = seeded_scenario(task["case"], task["scale"], task["seed"])
    with torch_threads(1):
        setup = prepare(scenario, task["source"])
        levels = retrained_levels(setup)
        objectives = scenario.with_methods(list(task["methods"]))
        rows = []
        for optimizer, learning_rates in task["runs"]:
            for learning_rate in learning_rates:
                dynamics = dataclasses.replace(scenario.dynamics, optimizer=optimizer, learning_rate=learning_rate,
                                               steps=task["steps"], seed=task["seed"], **optimizer_settings(optimizer))
                for method in task["methods"]:
                    trajectory = unlearn(setup.reference, objectives[method], setup.forget, setup.retain,
                                         setup.reference, dynamics, setup.evaluator)
                    rows += _reach_rows(task, optimizer, learning_rate, method, trajectory, levels)
    return rows


def _transformer_unit(task: dict) -> list[dict]:
    import copy

    from llm import unlearn

    from .transformer_runs import prepare_transformer

    settings = TransformerSettings(**dict(task["settings"], seed=task["seed"]))
    setup = prepare_transformer(task["case"], task["scale"], settings, task["device"], False, task["model_dir"])
    objectives = setup.scenario.with_methods(list(task["methods"]))
    rows = []
    for optimizer, learning_rates in task["runs"]:
        for learning_rate in learning_rates:
            config = dataclasses.replace(setup.unlearning_config, optimizer=optimizer, learning_rate=learning_rate,
                                         steps=task["steps"], track_forget_weights=False, track_power_share=False,
                                         **optimizer_settings(optimizer))
            for method in task["methods"]:
                trajectory = unlearn(copy.deepcopy(setup.reference), objectives[method], setup.forget, setup.retain,
                                     config, setup.evaluator)
                rows += _reach_rows(task, optimizer, learning_rate, method, trajectory, setup.retrained_kl)
    return rows


def _run_unit(task: dict) -> list[dict]:
    return (_simulator_unit if task["kind"] == "simulator" else _transformer_unit)(task)


def _reach_rows(task: dict, optimizer: str, learning_rate: float, method: str, trajectory, levels) -> list[dict]:
    rows = []
    for component in FORGET:
        retain_kl, step = reach_point(trajectory, component, levels[component])
        rows.append({"case": task["case"], "source": task["source"], "optimizer": optimizer,
                     "learning_rate": float(learning_rate), "method": method, "component": component,
                     "seed": int(task["seed"]), "phase": task["phase"], "retain_kl_at_reach": float(retain_kl),
                     "step_at_reach": float(step)})
    return rows


def units(config: Config, phase: str, runs_of, device: str = "cpu", model_dir: str | None = None) -> list[dict]:
    """The run units of one phase: ``runs_of(source, case)`` gives ``((optimizer, (lr, ...)), ...)``."""
    seeds = config.selection_seeds if phase == "select" else config.report_seeds
    tasks = []
    for source in config.sources:
        settings = config.transformer(source)
        for case in CASES:
            for seed in seeds:
                task = {"kind": "simulator" if settings is None else "transformer", "source": source, "case": case,
                        "seed": int(seed), "phase": phase, "scale": config.scale, "steps": config.steps,
                        "methods": list(config.methods), "runs": runs_of(source, case)}
                if settings is not None:
                    task |= {"settings": dataclasses.asdict(settings), "device": device, "model_dir": model_dir}
                tasks.append(task)
    return tasks


def best_learning_rates(rows: list[dict]) -> dict[tuple[str, str, str, str], float | None]:
    """``{(source, case, optimizer, method): best lr}`` from selection rows: the lr with the lowest sum over forget
    components of the median reach value, a component reached on at most half the seeds making the lr ineligible
    (None: no lr of the grid is eligible)."""
    cells: dict[tuple, dict[float, dict[str, list[float]]]] = {}
    for row in rows:
        key = (row["source"], row["case"], row["optimizer"], row["method"])
        per_lr = cells.setdefault(key, {}).setdefault(row["learning_rate"], {})
        per_lr.setdefault(row["component"], []).append(row["retain_kl_at_reach"])
    best = {}
    for key, per_lr in cells.items():
        scores = {lr: _score(per_component) for lr, per_component in per_lr.items()}
        eligible = {lr: score for lr, score in scores.items() if np.isfinite(score)}
        best[key] = min(eligible, key=lambda lr: (eligible[lr], lr)) if eligible else None
    return best


def _score(per_component: dict[str, list[float]]) -> float:
    total = 0.0
    for values in per_component.values():
        finite = [v for v in values if np.isfinite(v)]
        if 2 * len(finite) <= len(values):
            return np.inf
        total += float(np.median(finite))
    return total


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    """Selection phase, best learning rates, report phase; caches every row (NaN = not reached) and the choices."""
    del recompute  # every unit is recomputed: they are cheap on the exact models and not shared with other figures
    model_dir = os.path.join(os.path.dirname(cache_stem), "models")
    requested, skipped = config, []
    if device == "cpu" and config.transformers and not config.transformers_on_cpu:
        skipped = [settings.preset for settings in config.transformers]
        print(f"[ablation_ladder] skipping the transformer sources {skipped} on the CPU (each needs "
              f"{len(config.optimizers)} optimisers x ~5-9 learning rates x {len(config.methods)} methods x "
              f"{len(config.selection_seeds) + len(config.report_seeds)} seeds x 2 cases unlearning runs: run with "
              f"--device cuda, or set transformers_on_cpu)", flush=True)
        config = dataclasses.replace(config, transformers=())
    selection = units(config, "select", lambda source, case: [(o, config.grid(source, o)) for o in config.optimizers],
                      device, model_dir)
    selection_rows = _run_all(selection, jobs, "ablation ladder: learning-rate selection")
    best = best_learning_rates(selection_rows)

    def report_runs(source, case):
        runs = []
        for optimizer in config.optimizers:
            shared = config.shared_learning_rate(source, optimizer)
            chosen = {best.get((source, case, optimizer, m)) for m in config.methods} - {None}
            runs.append((optimizer, tuple(sorted({shared} | chosen))))
        return runs

    report_rows = _run_all(units(config, "report", report_runs, device, model_dir), jobs, "ablation ladder: report")
    choices = [{"source": s, "case": c, "optimizer": o, "method": m, "best_learning_rate": lr,
                "shared_learning_rate": config.shared_learning_rate(s, o)} for (s, c, o, m), lr in sorted(best.items())]
    save_cache(cache_stem, {}, requested, rows=[_strict(row) for row in selection_rows + report_rows], choices=choices,
               optimizer_settings={o: optimizer_settings(o) for o in config.optimizers}, skipped_sources=skipped)
    return cache_stem


def _run_all(tasks: list[dict], jobs: int, label: str) -> list[dict]:
    """Every unit's rows, in task order (in ``jobs`` spawned workers when ``jobs > 1``), with a progress bar."""
    return [row for rows in map_in_workers(_run_unit, tasks, jobs, label) for row in rows]


def _strict(row: dict) -> dict:
    """NaN (not reached) -> None, so the cache is strict JSON."""
    return {key: (None if isinstance(value, float) and not np.isfinite(value) else value) for key, value in row.items()}


def load_rows(cache_stem: str) -> tuple[dict, list[dict]]:
    """``(cache document, rows)`` with None read back as NaN."""
    document, _ = load_cache(cache_stem)
    rows = [{key: (np.nan if value is None and key in ("retain_kl_at_reach", "step_at_reach") else value)
             for key, value in row.items()} for row in document["rows"]]
    return document, rows


# ---------------------------------------------------------------------------------------------
# Summaries and the table
# ---------------------------------------------------------------------------------------------


def report_values(rows: list[dict], source: str, case: str, optimizer: str, method: str, learning_rate: float | None,
                  component: str) -> dict[int, float]:
    """``{seed: reach value}`` of one report cell (empty when ``learning_rate`` is None)."""
    return {row["seed"]: row["retain_kl_at_reach"] for row in rows
            if row["phase"] == "report" and learning_rate is not None
            and (row["source"], row["case"], row["optimizer"], row["method"], row["component"]) ==
            (source, case, optimizer, method, component) and np.isclose(row["learning_rate"], learning_rate)}


def chosen(document: dict) -> dict[tuple[str, str, str, str], dict]:
    return {(c["source"], c["case"], c["optimizer"], c["method"]): c for c in document["choices"]}


def ingredient_differences(rows: list[dict], document: dict, source: str, case: str, optimizer: str, component: str,
                           at: str = "best") -> list[tuple[str, object]]:
    """The :data:`INGREDIENT_STEPS` as ``(label, PairedDifference)`` at each method's best (``at="best"``) or the
    shared learning rate; a step whose methods were not run is left out."""
    choices = chosen(document)
    result = []
    for label, a, b in INGREDIENT_STEPS:
        if (source, case, optimizer, a) not in choices or (source, case, optimizer, b) not in choices:
            continue
        values = [report_values(rows, source, case, optimizer, m, choices[(source, case, optimizer, m)][
            "best_learning_rate" if at == "best" else "shared_learning_rate"], component) for m in (a, b)]
        if values[0] and values[1]:
            result.append((label, paired_difference(*values)))
    return result


@dataclass(frozen=True)
class Claim:
    """A sentence of the docs about one ingredient step: ``step`` (a label of :data:`INGREDIENT_STEPS`) moves the
    reach value of ``component`` the way ``verdict`` says ("lower", "higher", "not distinguishable"; the
    :class:`~paper_figures.reach_statistics.PairedDifference` verdict over the report seeds) on ``source`` in
    ``case`` under ``optimizer``, at each method's best learning rate (``at="best"``) or the shared one."""

    source: str
    case: str
    optimizer: str
    component: str
    step: str
    verdict: str
    at: str = "best"


def judge(claim: Claim, document: dict, rows: list[dict]):
    """``(holds, PairedDifference or None)`` of one claim against a ladder cache."""
    found = dict(ingredient_differences(rows, document, claim.source, claim.case, claim.optimizer, claim.component,
                                        claim.at))
    difference = found.get(claim.step)
    return (difference is not None and difference.verdict == claim.verdict), difference


def config_of(document: dict) -> Config:
    """The :class:`Config` a cache or summary records (JSON lists back to tuples)."""
    fields = dict(document["config"])
    fields["transformers"] = tuple(TransformerSettings(**t) for t in fields["transformers"])
    fields["multipliers"] = tuple((o, tuple(m)) for o, m in fields["multipliers"])
    fields["default_learning_rates"] = tuple(tuple(pair) for pair in fields["default_learning_rates"])
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _best_cell(best: float | None, grid: tuple[float, ...]) -> str:
    """The best lr; "(grid edge)" when it is the grid's smallest or largest (the optimum may lie beyond)."""
    if best is None:
        return "none reaches"
    edge = np.isclose(best, min(grid)) or np.isclose(best, max(grid))
    return f"{best:g}" + (" (grid edge)" if edge else "")


def _summary_cell(values: dict[int, float]) -> str:
    if not values:
        return "-"
    summary = summarise(values)
    if summary.median is None:
        return f"n.r. (0/{summary.seeds})"
    reached = "" if summary.reached == summary.seeds else f", {summary.reached}/{summary.seeds} reach"
    return f"{summary.median:.4f} [{summary.low:.4f}, {summary.high:.4f}{reached}]"


def _difference_cell(difference) -> str:
    if difference.mean is None:
        return f"- ({difference.verdict}; {difference.both_reached} seeds both reach)"
    return f"{difference.mean:+.4f} [{difference.low:+.4f}, {difference.high:+.4f}] {difference.verdict}"


def table_markdown(document: dict, rows: list[dict]) -> str:
    """Per source and case: each method's best lr and reach values (median [5-95%] over the report seeds) at the
    shared and the best lr, then the ingredient differences with 95% bootstrap intervals."""
    config, recorded = document["config"], config_of(document)
    choices = chosen(document)
    lines = [f"# {TITLE}", "",
             f"Scale {config['scale']}, {config['steps']} steps evaluated after each, selection seeds "
             f"{config['selection_seeds']}, report seeds {config['report_seeds']} (paired). Reach value = retain KL "
             "(kl_true) where the component's forget KL reaches the retrained model's (lower is better; n.r. = not "
             "reached within the steps). Median [5%, 95%] over the report seeds. Optimiser settings: "
             + "; ".join(f"{o}: {s or 'no eps, no weight decay'}" for o, s in document["optimizer_settings"].items())
             + ". Full batch on the exact models.", ""]
    sources = ordered_sources(row["source"] for row in rows)
    optimizers = [o for o in OPTIMIZERS if o in config["optimizers"]]
    for source in sources:
        for case, label in CASES.items():
            lines += [f"## {source}, {label}", "",
                      "| optimiser | method | shared lr | best lr | forget1 at shared lr | forget1 at best lr | "
                      "forget2 at shared lr | forget2 at best lr |", "|---|---|---|---|---|---|---|---|"]
            for optimizer in optimizers:
                for method in config["methods"]:
                    choice = choices.get((source, case, optimizer, method))
                    if choice is None:
                        continue
                    cells = [_summary_cell(report_values(rows, source, case, optimizer, method, choice[k], component))
                             for component in FORGET for k in ("shared_learning_rate", "best_learning_rate")]
                    best = _best_cell(choice["best_learning_rate"], recorded.grid(source, optimizer))
                    lines.append(f"| {optimizer} | {method} | {choice['shared_learning_rate']:g} | {best} | "
                                 + " | ".join(cells) + " |")
            lines += ["", "Ingredient steps, paired difference a - b of reach values at each method's best lr "
                          "(mean over seeds where both reach [95% bootstrap interval]; lower = the step helps):", "",
                      "| optimiser | component | " + " | ".join(label for label, _, _ in INGREDIENT_STEPS) + " |",
                      "|---|---|" + "---|" * len(INGREDIENT_STEPS)]
            for optimizer in optimizers:
                for component in FORGET:
                    found = dict(ingredient_differences(rows, document, source, case, optimizer, component))
                    lines.append(f"| {optimizer} | {component} | " + " | ".join(
                        _difference_cell(found[label]) if label in found else "-" for label, _, _ in INGREDIENT_STEPS)
                        + " |")
            lines.append("")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    """Every row with :data:`CSV_COLUMNS`, atomically; NaN -> empty cell."""
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(["" if isinstance(row[c], float) and not np.isfinite(row[c]) else
                             repr(row[c]) if isinstance(row[c], float) else row[c] for c in CSV_COLUMNS])


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------


def plot(cache_stem: str, output_stem: str) -> list[str]:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    apply_style()
    document, rows = load_rows(cache_stem)
    config, choices = document["config"], chosen(document)
    sources = ordered_sources(row["source"] for row in rows)
    optimizers = [o for o in OPTIMIZERS if o in config["optimizers"]]
    methods = list(config["methods"])
    panels = [(case, component) for case in CASES for component in FORGET]
    size = (max(7.5, 3.6 * len(sources) + 1.0), 2.3 * len(panels))
    figure, axes = plt.subplots(len(panels), len(sources), figsize=size, squeeze=False, sharex=True)
    offsets = np.linspace(-0.25, 0.25, len(optimizers))
    for column, source in enumerate(sources):
        for row_index, (case, component) in enumerate(panels):
            axis = axes[row_index, column]
            reached_values = []
            missing = []
            for m, method in enumerate(methods):
                for offset, optimizer in zip(offsets, optimizers):
                    choice = choices.get((source, case, optimizer, method))
                    if choice is None:
                        continue
                    for kind, filled in (("best_learning_rate", True), ("shared_learning_rate", False)):
                        values = report_values(rows, source, case, optimizer, method, choice[kind], component)
                        summary = summarise(values) if values else None
                        x = m + offset + (0.0 if filled else 0.06)
                        if summary is None or summary.median is None:
                            if filled:
                                missing.append((x, method))
                            continue
                        reached_values += [summary.low, summary.high]
                        axis.errorbar([x], [summary.median], yerr=[[summary.median - summary.low],
                                                                   [summary.high - summary.median]],
                                      fmt=OPTIMIZER_MARKERS[optimizer], color=method_color(method),
                                      ms=5 if filled else 4, mfc=method_color(method) if filled else "white", lw=0.9,
                                      capsize=1.5)
            finite = [v for v in reached_values if v > 0]
            top = max(finite) * 1.6 if finite else 1.0
            bottom = min(finite) / 1.6 if finite else 1e-3
            for x, method in missing:  # at the top: not reached on the report seeds, or no eligible lr
                axis.plot([x], [top], "x", color=method_color(method), ms=6)
            axis.set_yscale("log")
            axis.set_ylim(bottom, top * 1.3)
            axis.set_xticks(range(len(methods)))
            axis.set_xticklabels(methods, rotation=30, fontsize=7)
            if column == 0:
                axis.set_ylabel(f"{CASES[case].split(' ')[0]} {component}\nretain KL at reach")
            if row_index == 0:
                axis.set_title(source)
    handles = [Line2D([], [], marker=OPTIMIZER_MARKERS[o], color="#333333", ls="none", label=OPTIMIZER_LABELS[o])
               for o in optimizers]
    handles += [Line2D([], [], marker="o", color="#333333", ls="none", label="each method's best lr"),
                Line2D([], [], marker="o", color="#333333", mfc="white", ls="none", label="shared lr"),
                Line2D([], [], marker="x", color="#333333", ls="none", label="not reached at best lr")]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=7)
    figure.suptitle(f"{TITLE}\nmedian and 5-95% over {len(config['report_seeds'])} report seeds; best lr chosen on "
                    f"{len(config['selection_seeds'])} other seeds", fontsize=9)
    paths = save_figure(figure, output_stem)
    table_path = output_stem + "_table.md"
    with atomic_output(table_path) as temporary, open(temporary, "w") as file:
        file.write(table_markdown(document, rows) + "\n")
    csv_path = output_stem + "_reach.csv"
    write_csv(csv_path, rows)
    summary_path = output_stem + "_summary.json"
    atomic_write_json(summary_path, {key: value for key, value in document.items() if key != "rows"})
    return paths + [table_path, csv_path, summary_path]


def read_csv(path: str) -> list[dict]:
    """The rows :func:`write_csv` wrote (empty cell -> NaN), typed as in the cache."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(CSV_COLUMNS)}")
        return [{**row, "seed": int(row["seed"]), "learning_rate": float(row["learning_rate"]),
                 "retain_kl_at_reach": float(row["retain_kl_at_reach"] or "nan"),
                 "step_at_reach": float(row["step_at_reach"] or "nan")} for row in reader]


def load_outputs(output_stem: str) -> tuple[dict, list[dict]]:
    """``(document, rows)`` from a plot's outputs (``_summary.json`` and ``_reach.csv``), the form committed
    under docs/figures: the same numbers as the cache without its copy of the rows."""
    return read_json(output_stem + "_summary.json"), read_csv(output_stem + "_reach.csv")
