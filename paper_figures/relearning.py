"""The relearning attack, simulator beside TOFU: how fast does a little fine-tuning on forget data undo unlearning?

Question: after GA, NPO and SimNPO unlearning, how many relearning steps on a few forget sequences
bring each forget component back toward the model before unlearning? Simulator panels (one per
paper scenario and exact model class; ``markovsim.relearning``, exact gradients, plain gradient
descent): KL(reference || model) per forget component (solid forget1, dashed forget2) against the
relearning step, with relearning from the reference itself as the baseline (black). TOFU column:
the recovery of forget probability and truth ratio since step 0 (metric after s relearning steps minus
before), per unlearned model, beside the same relearning of the retain model ("learned fresh": it never
saw the forget authors; green, dashed) and of the target (black, dotted), each with its 95% bootstrap
band over the evaluation pairs (paired), read from a TOFU run's ``results.json`` key ``"relearning"``
(``--tofu-run RUN``; without it the column says so). An unlearned model above the green line regains
more than a model that never knew the facts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from markovsim.plotting import method_color
from markovsim.progress import progress_iter
from markovsim.relearning import RelearningConfig, relearning_curves
from markovsim.results import read_json
from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS, prepare

from . import markov_tradeoff
from .cache import load_cache, save_cache
from .style import MODEL_COLORS, apply_style, save_figure

TITLE = ("Relearning attack: forget KL back toward the reference (simulator); recovery of the forget metrics "
         "beside a model learning them fresh (TOFU)")
METHODS = ("GA", "NPO", "SimNPO")
CASES = tuple(markov_tradeoff.CASES)
FORGET = ("forget1", "forget2")
STYLES = {"forget1": "-", "forget2": "--"}
TOFU_METRICS = {"forget_probability": "forget probability", "forget_truth_ratio": "forget truth ratio"}
CONTROLS = {"retain": ("--", "retain (learned fresh)"), "target": (":", "target")}  # line style, label
USES_TOFU_RUN = True
NO_RUN = "no TOFU run given:\nmake tofu-figures, or\npython -m paper_figures --only\nrelearning --tofu-run RUN"


@dataclass(frozen=True)
class Config:
    scale: float = 0.2
    unlearning_steps: int = 50
    relearning: dict = field(default_factory=lambda: {"steps": 50, "learning_rate": 1.0, "sequences_per_component": 8,
                                                      "eval_every": 2})
    sources: tuple[str, ...] = ("tabular", "mixture")
    tofu_run: str | None = None


CONFIGS = {
    "tiny": Config(scale=0.005, unlearning_steps=3,
                   relearning={"steps": 3, "learning_rate": 1.0, "sequences_per_component": 2, "eval_every": 1}),
    "quick": Config(),
    "paper": Config(scale=1.0),
}


def simulator_arrays(config: Config) -> dict[str, np.ndarray]:
    """``sim/<case>/<source>/<method>/{steps (E,), kl_reference (E, 2)}`` (forget1, forget2), methods + reference."""
    arrays, relearning = {}, RelearningConfig(**config.relearning)
    jobs = [(case, source) for case in CASES for source in config.sources]
    with torch_threads(1):
        for case, source in progress_iter(jobs, len(jobs), "relearning", unit="run set"):
            scenario = SCENARIOS[case].scaled(config.scale)
            dynamics = dataclasses.replace(scenario.dynamics, steps=config.unlearning_steps)
            curves = relearning_curves(prepare(scenario, source), scenario.with_methods(list(METHODS)), dynamics,
                                       relearning)
            for method, trajectory in curves.items():
                prefix = f"sim/{case}/{source}/{method}"
                arrays[f"{prefix}/steps"] = trajectory.steps.astype(np.float64)
                arrays[f"{prefix}/kl_reference"] = np.stack([trajectory.metric("kl_reference", c) for c in FORGET], 1)
    return arrays


def tofu_arrays(document: dict, path: str) -> dict[str, np.ndarray]:
    """From a results document's ``"relearning"`` entry (``{model: {"steps": [...], metric: [...],
    "recovery": {metric: [...]}, "recovery_interval": {metric: [[lo, hi], ...]}}}``, models: the controls
    "target" and "retain" and each method), per model and metric of :data:`TOFU_METRICS`:
    ``tofu/<model>/steps`` (R,), ``tofu/<model>/<metric>`` (R,), ``tofu/<model>/recovery/<metric>`` (R,) and
    ``tofu/<model>/recovery_interval/<metric>`` (R, 2). A document without recoveries (a run from before
    them) gives metric - metric at step 0 and NaN intervals."""
    if "relearning" not in document:
        raise ValueError(f"{path} has no 'relearning' results; run the TOFU protocol's relearning stage first")
    arrays = {}
    for model, record in document["relearning"].items():
        steps = np.asarray(record["steps"], dtype=np.float64)
        arrays[f"tofu/{model}/steps"] = steps
        for metric in TOFU_METRICS:
            values = np.asarray(record[metric], dtype=np.float64)
            if values.shape != steps.shape:
                raise ValueError(f"{path}: relearning/{model}/{metric} has {values.shape} values for "
                                 f"{steps.shape} steps")
            arrays[f"tofu/{model}/{metric}"] = values
            arrays[f"tofu/{model}/recovery/{metric}"], arrays[f"tofu/{model}/recovery_interval/{metric}"] = (
                _recovery(record, metric, values, steps))
    return arrays


def _recovery(record: dict, metric: str, values: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recovery (R,), its interval (R, 2)) of one model's metric; NaN where the document has none."""
    if metric in record.get("recovery", {}):
        intervals = [[np.nan, np.nan] if pair is None else pair for pair in record["recovery_interval"][metric]]
        return (np.asarray(record["recovery"][metric], dtype=np.float64),
                np.asarray(intervals, dtype=np.float64).reshape(len(steps), 2))
    start = np.flatnonzero(steps == 0)
    recovery = values - values[start[0]] if len(start) else np.full(len(steps), np.nan)
    return recovery, np.full((len(steps), 2), np.nan)


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    arrays = simulator_arrays(config)
    if config.tofu_run is not None:
        path = os.path.join(config.tofu_run, "results.json")
        if not os.path.isfile(path):
            raise ValueError(f"--tofu-run {config.tofu_run}: {path} not found; run the TOFU protocol "
                             f"(python -m llm.tofu run ... --out {config.tofu_run}) first")
        arrays |= tofu_arrays(read_json(path), path)
    return save_cache(cache_stem, arrays, dataclasses.asdict(config))


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    sources = document["config"]["sources"]
    figure, axes = plt.subplots(len(CASES), len(sources) + 1, figsize=(4 * (len(sources) + 1), 3.3 * len(CASES)),
                                squeeze=False)
    for row, case in enumerate(CASES):
        for col, source in enumerate(sources):
            _simulator_panel(axes[row, col], arrays, case, source)
    tofu_models = [key.split("/")[1] for key in arrays if key.startswith("tofu/") and key.endswith("/steps")]
    for row, (metric, label) in enumerate(list(TOFU_METRICS.items())[:len(CASES)]):
        axis = axes[row, -1]
        if not tofu_models:
            axis.text(0.5, 0.5, NO_RUN, ha="center", va="center", transform=axis.transAxes, fontsize=8)
            axis.set_axis_off()
            continue
        for model in tofu_models:
            _tofu_recovery(axis, arrays, model, metric)
        axis.axhline(0.0, color="gray", lw=0.5)
        axis.set(title=f"TOFU relearning: {label}\nrecovery since step 0 (95% bootstrap bands)",
                 xlabel="relearning step", ylabel=f"{label} - at step 0")
        axis.legend(fontsize=6)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)


def _tofu_recovery(axis, arrays, model: str, metric: str) -> None:
    """One model's recovery line and (where the run has intervals) its band; controls dashed / dotted."""
    style, label = CONTROLS.get(model, ("-", model))
    color = MODEL_COLORS[model] if model in CONTROLS else method_color(model)
    steps, band = arrays[f"tofu/{model}/steps"], arrays[f"tofu/{model}/recovery_interval/{metric}"]
    line, = axis.plot(steps, arrays[f"tofu/{model}/recovery/{metric}"], style, marker="o", color=color, label=label,
                      ms=3)
    line.set_gid(f"tofu/{model}/recovery/{metric}")
    if np.isfinite(band).all():
        patch = axis.fill_between(steps, band[:, 0], band[:, 1], color=color, alpha=0.15, lw=0)
        patch.set_gid(f"tofu/{model}/recovery_interval/{metric}")


def _simulator_panel(axis, arrays, case: str, source: str) -> None:
    for method in ("reference",) + METHODS:
        prefix = f"sim/{case}/{source}/{method}"
        if f"{prefix}/steps" not in arrays:
            continue
        color = MODEL_COLORS.get(method) or method_color(method)
        for column, component in enumerate(FORGET):
            line, = axis.plot(arrays[f"{prefix}/steps"], arrays[f"{prefix}/kl_reference"][:, column],
                              STYLES[component], color=color, label=f"{method} {component}")
            line.set_gid(f"{prefix}/kl_reference#{column}")
    axis.set(title=f"simulator ({source}) {markov_tradeoff.CASES[case]}", xlabel="relearning step",
             ylabel="KL(reference || model), forget")
    axis.legend(fontsize=6)
