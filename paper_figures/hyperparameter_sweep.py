"""SimNPO's beta and gamma, NPO's beta: how the reach values move with the hyperparameters the paper's users tune.

Question: on the paper's two Markov scenarios, how does the retain damage at which each forget component is
unlearned (the *reach value*, ``reach_statistics``) depend on SimNPO's beta in {1, 2.5, 4, 8} and margin gamma in
{0, 1, 2}, and on NPO's beta in {0.1, 0.2, 0.5, 1}? Every configuration runs on the same paired seeds with the
scenario's optimiser (Adam, lr 0.02, full batch, 50 steps on the exact models).

Layout: one column per source, one row per case and forget component; x = beta (log scale), y = the median reach
value over the seeds with its 5-95% range (SimNPO: one line per gamma, in shades of red; NPO: blue); a
configuration that reaches on no seed is drawn as an x at the top. ``<output>_table.md`` holds every number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from markovsim.plotting import NPO_COLOR
from markovsim.results import atomic_output

from .cache import load_cache, save_cache
from .markov_tradeoff import CASES
from .reach_statistics import FORGET, reach_point, summarise
from .runs import SIMULATOR_SOURCES, map_in_workers, ordered_sources
from .style import apply_style, save_figure

TITLE = "SimNPO's beta and gamma, NPO's beta: retain KL at reach on the paper's Markov mixtures"
GAMMA_COLORS = ("#d62728", "#ff7f0e", "#8c564b")  # SimNPO's gammas, in order


@dataclass(frozen=True)
class Config:
    """What the figure runs.

    Attributes:
        scale: fraction of the paper's sequence counts; steps: unlearning steps (evaluated after each).
        sources: exact model classes; seeds: paired data / batch-order seeds.
        simnpo_betas, simnpo_gammas: SimNPO's grid; npo_betas: NPO's.
    """

    scale: float = 0.1
    steps: int = 50
    sources: tuple[str, ...] = ("tabular",)
    seeds: tuple[int, ...] = (0, 1, 2)
    simnpo_betas: tuple[float, ...] = (1.0, 2.5, 4.0, 8.0)
    simnpo_gammas: tuple[float, ...] = (0.0, 1.0, 2.0)
    npo_betas: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(SIMULATOR_SOURCES))
        if unknown:
            raise ValueError(f"sources: {unknown} unknown; valid: {list(SIMULATOR_SOURCES)}")
        if not self.seeds or len(self.simnpo_gammas) > len(GAMMA_COLORS):
            raise ValueError(f"need at least one seed and at most {len(GAMMA_COLORS)} gammas")

    def configurations(self) -> list[tuple[str, float, float | None]]:
        """``[(method, beta, gamma), ...]``: SimNPO's beta x gamma grid, then NPO's betas (gamma None)."""
        return ([("SimNPO", float(b), float(g)) for g in self.simnpo_gammas for b in self.simnpo_betas]
                + [("NPO", float(b), None) for b in self.npo_betas])


CONFIGS = {
    "tiny": Config(scale=0.005, steps=3, seeds=(0,), simnpo_betas=(2.5, 4.0), simnpo_gammas=(0.0, 1.0),
                   npo_betas=(0.1, 0.2)),
    "quick": Config(),  # the tabular model on a tenth of the data, 3 seeds (about 20 s)
    "paper": Config(scale=1.0, sources=SIMULATOR_SOURCES, seeds=tuple(range(10))),
}


def _unit(task: dict) -> list[dict]:
    """Every configuration on one (source, case, seed): the reach rows."""
    from markovsim.dynamics import unlearn
    from markovsim.runtime import torch_threads
    from markovsim.scenarios import prepare

    from .runs import retrained_levels, seeded_scenario

    scenario = seeded_scenario(task["case"], task["scale"], task["seed"])
    dynamics = dataclasses.replace(scenario.dynamics, steps=task["steps"], seed=task["seed"])
    rows = []
    with torch_threads(1):
        setup = prepare(scenario, task["source"])
        levels = retrained_levels(setup)
        for method, beta, gamma in task["configurations"]:
            objective = scenario.with_methods([method], betas=beta, gammas=gamma)[method]
            trajectory = unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference, dynamics,
                                 setup.evaluator)
            for component in FORGET:
                retain_kl, _ = reach_point(trajectory, component, levels[component])
                rows.append({"source": task["source"], "case": task["case"], "seed": task["seed"], "method": method,
                             "beta": beta, "gamma": gamma, "component": component,
                             "retain_kl_at_reach": None if not np.isfinite(retain_kl) else float(retain_kl)})
    return rows


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    del device, recompute  # exact models only; every unit is recomputed (seconds)
    tasks = [{"source": source, "case": case, "seed": int(seed), "scale": config.scale, "steps": config.steps,
              "configurations": config.configurations()}
             for source in config.sources for case in CASES for seed in config.seeds]
    rows = [row for rows in map_in_workers(_unit, tasks, jobs) for row in rows]
    return save_cache(cache_stem, {}, config, rows=rows)


def cell_values(rows: list[dict], source: str, case: str, method: str, beta: float, gamma: float | None,
                component: str) -> dict[int, float]:
    """``{seed: reach value}`` of one configuration (NaN = not reached)."""
    return {r["seed"]: np.nan if r["retain_kl_at_reach"] is None else r["retain_kl_at_reach"] for r in rows
            if (r["source"], r["case"], r["method"], r["component"]) == (source, case, method, component)
            and np.isclose(r["beta"], beta) and (gamma is None or np.isclose(r["gamma"], gamma))}


def _curves(config: dict) -> list[tuple[str, float | None, list[float], str, str]]:
    """``(method, gamma, betas, colour, label)`` per line of a panel."""
    curves = [("SimNPO", gamma, config["simnpo_betas"], color, f"SimNPO, gamma {gamma:g}")
              for gamma, color in zip(config["simnpo_gammas"], GAMMA_COLORS)]
    return curves + [("NPO", None, config["npo_betas"], NPO_COLOR, "NPO")]


def table_markdown(document: dict) -> str:
    config, rows = document["config"], document["rows"]
    lines = [f"# {TITLE}", "", f"Scale {config['scale']}, {config['steps']} steps, seeds {config['seeds']} (paired); "
             "the scenario's optimiser (Adam, lr 0.02, full batch). Median [5%, 95%] of the retain KL at reach over "
             "the seeds that reach (k/n when not all do; n.r. = none).", ""]
    for source in ordered_sources(r["source"] for r in rows):
        for case, label in CASES.items():
            lines += [f"## {source}, {label}", "", "| method | gamma | beta | forget1 | forget2 |",
                      "|---|---|---|---|---|"]
            for method, gamma, betas, _, _ in _curves(config):
                for beta in betas:
                    cells = []
                    for component in FORGET:
                        summary = summarise(cell_values(rows, source, case, method, beta, gamma, component))
                        cells.append("n.r." if summary.median is None else
                                     f"{summary.median:.4f} [{summary.low:.4f}, {summary.high:.4f}]"
                                     + ("" if summary.reached == summary.seeds else
                                        f" {summary.reached}/{summary.seeds}"))
                    lines.append(f"| {method} | {'-' if gamma is None else f'{gamma:g}'} | {beta:g} | "
                                 + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    import matplotlib.pyplot as plt

    apply_style()
    document, _ = load_cache(cache_stem)
    config, rows = document["config"], document["rows"]
    sources = ordered_sources(r["source"] for r in rows)
    panels = [(case, component) for case in CASES for component in FORGET]
    size = (max(6.5, 4.0 * len(sources)), 2.3 * len(panels))
    figure, axes = plt.subplots(len(panels), len(sources), figsize=size, squeeze=False)
    for column, source in enumerate(sources):
        for row_index, (case, component) in enumerate(panels):
            axis = axes[row_index, column]
            highest, missing = [], []
            for index, (method, gamma, betas, color, label) in enumerate(_curves(config)):
                medians, lows, highs, xs = [], [], [], []
                for beta in betas:
                    summary = summarise(cell_values(rows, source, case, method, beta, gamma, component))
                    if summary.median is None:
                        missing.append((beta * 1.07 ** index, color))  # side by side where several miss
                        continue
                    xs.append(beta)
                    medians.append(summary.median)
                    lows.append(summary.low)
                    highs.append(summary.high)
                if xs:
                    axis.plot(xs, medians, "o-", color=color, label=label, ms=3, lw=1.2)
                    axis.fill_between(xs, lows, highs, color=color, alpha=0.15, lw=0)
                    highest += highs
            top = max(highest) * 1.1 if highest else 1.0
            for beta, color in missing:
                axis.plot([beta], [top], "x", color=color, ms=6)
            axis.set_xscale("log")
            axis.set_ylim(0, top * 1.05)
            axis.set_xlabel("beta")
            if column == 0:
                axis.set_ylabel(f"{CASES[case].split(' ')[0]} {component}\nretain KL at reach")
            if row_index == 0:
                axis.set_title(source)
                axis.legend(fontsize=6)
    figure.suptitle(f"{TITLE}\nmedian and 5-95% over {len(config['seeds'])} paired seeds; x at the top: never reached",
                    fontsize=9)
    paths = save_figure(figure, output_stem)
    table_path = output_stem + "_table.md"
    with atomic_output(table_path) as temporary, open(temporary, "w") as file:
        file.write(table_markdown(document) + "\n")
    return paths + [table_path]
