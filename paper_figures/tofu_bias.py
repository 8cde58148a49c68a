"""The reference-model bias, simulator beside TOFU: per group closed-form weight and power share, NPO vs SimNPO.

Question: does NPO's reference-relative weight allocate unlearning power by response length and by
how well the reference learned each item, as the simulator predicts, on a real language model too?
Rows: (a) length - the simulator's ``paper_short_forget2`` (forget1 of length 20, forget2 of length 5)
beside TOFU's answer-length tertiles; (b) memorisation - ``paper_unseen_forget2`` (forget2 never
pre-trained: poorly learned by the reference) beside TOFU's tertiles of the target's log-likelihood
per token. Columns: mean gradient weight and power share per component / group over the unlearning
steps (simulator: seed mean of the ``markov_tradeoff`` run sets' exact diagnostics; TOFU:
``llm.tofu.bias``, with its 95% bootstrap bands over each group's items where the run has them), then
TOFU's per-group probability after unlearning (with its interval as an error bar). Same colours (method)
and line styles (role: solid = long / well learned, dashed = short / poorly learned, dotted = middle).

The TOFU half needs a real model run (``make tofu-figures``, or ``python -m llm.tofu.bias --run RUN``
then ``python -m paper_figures --only tofu_bias --tofu-run RUN``); without ``--tofu-run`` its panels
say so and only the simulator half is computed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from markovsim.plotting import method_color
from markovsim.results import read_json

from . import markov_tradeoff
from .cache import load_cache, save_cache
from .runs import ScenarioRuns, scenario_runs
from .style import MODEL_COLORS, apply_style, save_figure

TITLE = "Reference-model bias: weight and power share per component (simulator) and per group (TOFU), NPO vs SimNPO"
METHODS = ("NPO", "SimNPO")
ROWS = (("paper_short_forget2", "length"), ("paper_unseen_forget2", "memorisation"))
USES_TOFU_RUN = True
# role line styles: forget1 / long / well learned solid, forget2 / short / poorly learned dashed, middle dotted
SIMULATOR_STYLES = {"forget1": "-", "forget2": "--"}
GROUP_STYLES = ("--", ":", "-")  # group 0 (short / low), 1 (medium / mid), 2 (long / high)
NO_RUN = "no TOFU run given:\nmake tofu-figures, or\npython -m paper_figures --only\ntofu_bias --tofu-run RUN"


@dataclass(frozen=True)
class Config:
    scale_name: str = "quick"
    source: str = "tabular"
    tofu_run: str | None = None


CONFIGS = {name: Config(name) for name in ("tiny", "quick", "paper")}


def tofu_bias_path(run: str) -> str:
    """Where ``python -m llm.tofu.bias --run RUN`` writes its results."""
    return os.path.join(run, "bias", "results.json")


def simulator_arrays(config: Config, cache_dir: str, device: str, recompute: bool, jobs: int) -> dict:
    """``sim/<case>/<method>/{steps, mean_weight, power_share}``: (E,) and seed-mean (E, 2) over forget1, forget2."""
    tradeoff = markov_tradeoff.CONFIGS[config.scale_name]
    arrays = {}
    for case, _ in ROWS:
        spec = ScenarioRuns(case, tradeoff.scale, tradeoff.seeds_of(config.source), tradeoff.simulator_steps,
                            (config.source,), ())
        per_seed = scenario_runs(spec, cache_dir, device, recompute, jobs)[config.source]
        for method in METHODS:
            trajectories = [runs[method] for runs, _ in per_seed]
            length = min(len(t.steps) for t in trajectories)
            arrays[f"sim/{case}/{method}/steps"] = trajectories[0].steps[:length].astype(np.float64)
            for metric in ("mean_weight", "power_share"):
                stacked = np.stack([np.stack([t.metric(metric, c)[:length] for c in SIMULATOR_STYLES], 1)
                                    for t in trajectories])  # (S, E, 2)
                arrays[f"sim/{case}/{method}/{metric}"] = stacked.mean(0)
    return arrays


def tofu_arrays(document: dict) -> tuple[dict, dict]:
    """``tofu/<grouping>/<method>/{steps (R,), mean_weight (R, G), power_share (R, G)}`` with
    ``.../{mean_weight,power_share}_interval`` (R, G, 2) and ``tofu/<grouping>/after/<model>/probability`` (G,)
    with ``.../probability_interval`` (G, 2) from an ``llm.tofu.bias`` results document (intervals NaN
    for a document from before them); and the group names."""
    arrays, names = {}, {}
    for _, grouping in ROWS:
        names[grouping] = document["groups"][grouping]["names"]
        for method in METHODS:
            if method not in document["methods"]:
                continue
            record = document["methods"][method]
            arrays[f"tofu/{grouping}/{method}/steps"] = np.asarray(record["steps"], dtype=np.float64)
            for metric in ("mean_weight", "power_share"):
                values = np.asarray(record["diagnostics"][grouping][metric], dtype=np.float64)  # (R, G)
                arrays[f"tofu/{grouping}/{method}/{metric}"] = values
                arrays[f"tofu/{grouping}/{method}/{metric}_interval"] = _interval(
                    record["diagnostics"][grouping].get(f"{metric}_interval"), values.shape)
        for model, after in document["after"].items():
            values = np.asarray(after[grouping]["probability"], dtype=np.float64)  # (G,)
            arrays[f"tofu/{grouping}/after/{model}/probability"] = values
            arrays[f"tofu/{grouping}/after/{model}/probability_interval"] = _interval(
                after[grouping].get("probability_interval"), values.shape)
    return arrays, names


def _interval(values, shape: tuple) -> np.ndarray:
    """``shape + (2,)`` [low, high] from a results list (null -> NaN), all NaN when absent."""
    if values is None:
        return np.full(shape + (2,), np.nan)
    return np.asarray(values, dtype=np.float64).reshape(shape + (2,))


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    arrays = simulator_arrays(config, os.path.dirname(cache_stem), device, recompute, jobs)
    names = {}
    if config.tofu_run is not None:
        path = tofu_bias_path(config.tofu_run)
        if not os.path.isfile(path):
            raise ValueError(f"--tofu-run {config.tofu_run}: {path} not found; run `python -m llm.tofu.bias --run "
                             f"{config.tofu_run}` first (after the TOFU protocol run)")
        tofu, names = tofu_arrays(read_json(path))
        arrays |= tofu
    return save_cache(cache_stem, arrays, dataclasses.asdict(config), group_names=names)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(ROWS), 5, figsize=(17, 3.3 * len(ROWS)), squeeze=False)
    for row, (case, grouping) in enumerate(ROWS):
        _simulator_panels(axes[row, 0], axes[row, 1], arrays, case, document["config"]["source"])
        names = document.get("group_names", {}).get(grouping)
        if names is None:
            for axis in axes[row, 2:]:
                axis.text(0.5, 0.5, NO_RUN, ha="center", va="center", transform=axis.transAxes, fontsize=8)
                axis.set_axis_off()
            continue
        _tofu_panels(axes[row, 2], axes[row, 3], arrays, grouping, names)
        _after_panel(axes[row, 4], arrays, grouping, names)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)


def _line(axis, arrays, key_steps: str, key: str, column: int, style: str, color: str, label: str) -> None:
    line, = axis.plot(arrays[key_steps], arrays[key][:, column], style, color=color, label=label)
    line.set_gid(f"{key}#{column}")  # which cached numbers this line draws (tests compare them)


def _simulator_panels(weight_axis, share_axis, arrays, case: str, source: str) -> None:
    for method in METHODS:
        for column, (component, style) in enumerate(SIMULATOR_STYLES.items()):
            for axis, metric in ((weight_axis, "mean_weight"), (share_axis, "power_share")):
                _line(axis, arrays, f"sim/{case}/{method}/steps", f"sim/{case}/{method}/{metric}", column, style,
                      method_color(method), f"{method} {component}")
    label = markov_tradeoff.CASES[case]
    weight_axis.set(title=f"simulator ({source})\n{label}\nmean gradient weight", xlabel="unlearning step",
                    ylabel="mean weight w(y)", yscale="log")
    share_axis.set(title=f"simulator ({source})\n{label}\nshare of gradient norm", xlabel="unlearning step",
                   ylabel="power share", ylim=(0, 1))
    weight_axis.legend(fontsize=6)


def _tofu_panels(weight_axis, share_axis, arrays, grouping: str, names) -> None:
    for method in METHODS:
        if f"tofu/{grouping}/{method}/steps" not in arrays:
            continue
        for column, name in enumerate(names):
            style = GROUP_STYLES[column] if len(names) == 3 else "-"
            for axis, metric in ((weight_axis, "mean_weight"), (share_axis, "power_share")):
                key = f"tofu/{grouping}/{method}/{metric}"
                _line(axis, arrays, f"tofu/{grouping}/{method}/steps", key, column, style, method_color(method),
                      f"{method} {name}")
                band = arrays[f"{key}_interval"][:, column]  # (R, 2)
                if np.isfinite(band).all():
                    patch = axis.fill_between(arrays[f"tofu/{grouping}/{method}/steps"], band[:, 0], band[:, 1],
                                              color=method_color(method), alpha=0.12, lw=0)
                    patch.set_gid(f"{key}_interval#{column}")
    weight_axis.set(title=f"TOFU, {grouping} tertiles\nmean gradient weight", xlabel="unlearning step",
                    ylabel="mean weight w(y)", yscale="log")
    share_axis.set(title=f"TOFU, {grouping} tertiles\nshare of gradient norm", xlabel="unlearning step",
                   ylabel="power share", ylim=(0, 1))
    weight_axis.legend(fontsize=6)


def _after_panel(axis, arrays, grouping: str, names) -> None:
    prefix = f"tofu/{grouping}/after/"
    models = [key[len(prefix):].split("/")[0] for key in arrays if key.startswith(prefix)
              and key.endswith("/probability")]
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        values, positions = arrays[f"{prefix}{model}/probability"], np.arange(len(names)) + index * width
        bars = axis.bar(positions, values, width, color=MODEL_COLORS.get(model, method_color(model)), label=model)
        for group, patch in enumerate(bars):
            patch.set_gid(f"{prefix}{model}/probability#{group}")
        interval = arrays[f"{prefix}{model}/probability_interval"]  # (G, 2)
        if np.isfinite(interval).all():
            axis.vlines(positions, interval[:, 0], interval[:, 1], color="gray", lw=0.8).set_gid(
                f"{prefix}{model}/probability_interval")
    axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    axis.set(title=f"TOFU, {grouping} tertiles\nprobability after unlearning", ylabel="mean P(answer)^(1/|y|)")
    axis.legend(fontsize=6)
