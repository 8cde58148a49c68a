"""The tables beside Fig. 5 (``markov_tradeoff``): reach values per cell, paired differences, the documented claims.

Every table is computed from the per-seed rows (``reach_statistics.per_seed_rows``, the rows of
``fig5_reach.csv``) and the cache's config (each row names its optimiser, learning rate and batch).
"""

from __future__ import annotations

from markovsim.scenarios import SCENARIOS

from . import official_fig5
from .fig5_claims import CLAIMS
from .fig5_claims import evaluate as evaluate_claim
from .official_fig5 import CASE_LETTERS, OFFICIAL_SOURCE
from .reach_statistics import paired_difference, summarise, values_by_seed


def training_label(config: dict, case: str, source: str) -> str:
    """The optimiser, learning rate and batch of a source's unlearning runs, from a cache's config."""
    for settings in config.get("transformers", ()):
        if settings["preset"] == source:
            return (f"{settings['optimizer']} lr {settings['unlearn_learning_rate']:g}, batch "
                    f"{settings['unlearn_batch_size']}, {settings['unlearn_steps']} steps")
    dynamics = SCENARIOS[case].dynamics
    batch = "full batch" if dynamics.batch_size is None else f"batch {dynamics.batch_size}"
    return f"{dynamics.optimizer} lr {dynamics.learning_rate:g}, {batch}, {config['simulator_steps']} steps"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _official(case: str, method: str, component: str) -> tuple[str, str]:
    value, spread = official_fig5.reach(case, method, component), official_fig5.rerun_range(case, method, component)
    return (_number(value), "-" if spread is None else f"{spread[0]:.3f}-{spread[1]:.3f}")


def reach_table(rows: list[dict], config: dict, levels: dict) -> list[str]:
    """Markdown lines: per (case, source, method, component) the median [5%, 95%] over seeds, official values."""
    lines = ["| case | source | unlearning | method | component | retrained KL | retain KL at reach: median "
             "[5%, 95%] | step at reach: median | seeds reached | official (seed 42) | official re-runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (case, source, method, component) in dict.fromkeys((r["case"], r["source"], r["method"], r["component"])
                                                          for r in rows):
        scenario = next(name for name, letter in CASE_LETTERS.items() if letter == case)
        reach = summarise(values_by_seed(rows, case, source, method, component))
        step = summarise(values_by_seed(rows, case, source, method, component, "step_at_reach"))
        official, spread = _official(case, method, component) if source == OFFICIAL_SOURCE else ("", "")
        value = ("not reached" if reach.median is None
                 else f"{reach.median:.3f} [{reach.low:.3f}, {reach.high:.3f}]")
        lines.append(f"| ({case}) | {source} | {training_label(config, scenario, source)} | {method} | {component} | "
                     f"{levels[(case, source, component)]:.3f} | {value} | {_number(step.median, 1)} | "
                     f"{reach.reached}/{reach.seeds} | {official} | {spread} |")
    return lines


PAIRS = (("SimNPO", "NPO"), ("NPO", "GA"))


def _difference_cell(difference) -> str:
    if difference.mean is None:
        return f"- (both reach on {difference.both_reached} seeds)"
    return f"{difference.mean:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}]"


def difference_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per (case, source, component) the paired differences of :data:`PAIRS` (bootstrap 95%
    interval of the mean over seeds) and the fraction of seeds on which the first is lower / tied / higher."""
    header = "| case | source | component | seeds |"
    rule = "|---|---|---|---|"
    for a, b in PAIRS:
        header += f" {a} - {b}: mean [95% CI] | {a} lower / tied / higher |"
        rule += "---|---|"
    lines = [header, rule]
    cells = dict.fromkeys((r["case"], r["source"], r["component"]) for r in rows)
    methods = {(r["case"], r["source"]): set() for r in rows}
    for r in rows:
        methods[(r["case"], r["source"])].add(r["method"])
    for case, source, component in cells:
        line, seeds = f"| ({case}) | {source} | {component} |", None
        for a, b in PAIRS:
            if not {a, b} <= methods[(case, source)]:
                line += " | |"
                continue
            d = paired_difference(values_by_seed(rows, case, source, a, component),
                                  values_by_seed(rows, case, source, b, component))
            seeds = d.seeds
            line += f" {_difference_cell(d)} | {d.a_lower:.2f} / {d.tied:.2f} / {d.a_higher:.2f} |"
        lines.append(line.replace(f"| {component} |", f"| {component} | {seeds} |", 1))
    return lines


def claims_lines(rows: list[dict]) -> list[str]:
    """The documented claims (:data:`fig5_claims.CLAIMS`) judged on ``rows``; only those whose sources are here."""
    present = {(r["case"], r["source"]) for r in rows}
    lines = []
    for claim in CLAIMS:
        if (claim.case, claim.source) not in present:
            continue
        try:
            holds, d = evaluate_claim(claim, rows)
        except ValueError as error:  # too few seeds here to judge it (e.g. a spread over 2 seeds)
            lines.append(f"- {claim.text()}: cannot be judged on these seeds ({error})")
            continue
        verdict = "holds" if holds else "DOES NOT HOLD"
        if claim.kind == "narrower spread":
            lines.append(f"- {claim.text()}: sd {claim.higher} / sd {claim.lower} = {d[0]:.1f} [{d[1]:.1f}, "
                         f"{d[2]:.1f}]: {verdict}")
        else:
            lines.append(f"- {claim.text()}: {claim.lower} - {claim.higher} = {_difference_cell(d)}, "
                         f"{claim.lower} lower on {d.a_lower:.0%} of {d.seeds} seeds: {verdict}")
    return lines


def table_markdown(rows: list[dict], config: dict, levels: dict) -> str:
    """The table file: reach values, paired differences, claims (what README.md and docs/results.md quote)."""
    seeds = sorted({(r["source"], len({x["seed"] for x in rows if x["source"] == r["source"]})) for r in rows})
    parts = [f"Scale {config['scale']}; seeds per source: " + ", ".join(f"{s} {n}" for s, n in seeds) +
             ". Retain KL at reach = the retain KL where the forget KL first reaches the seed's retrained level "
             "(lower = cheaper forgetting); 5-95% over the seeds that reach; paired differences over seeds "
             "(same data, initialisation and batch order for every method), 95% percentile bootstrap of the mean "
             "(10,000 resamples). Official: the SimNPO repository's published figure (one seed, 42) and the "
             "official pipeline re-run over five seeds (case (a)); see paper_figures/data/simnpo_official_fig5.json.",
             "", *reach_table(rows, config, levels), "", "Paired differences of the retain KL at reach:", "",
             *difference_table(rows)]
    claims = claims_lines(rows)
    if claims:
        heading = "The claims of README.md and docs/results.md (paper_figures/fig5_claims.py), judged on these seeds:"
        parts += ["", heading, "", *claims]
    return "\n".join(parts) + "\n"
