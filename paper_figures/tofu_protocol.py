"""The TOFU protocol's headline numbers per model, each with its 95% bootstrap interval over the items.

Question: on a real language model, how far does each method take the forget set toward the retain
model (which never saw it), at what cost to everything else, and does membership inference still
recognise the forget pairs? Panels, one point per model (target and retain model as references,
then each method of the run) with its interval (``llm.tofu.result_intervals``): the share of the
forget-probability gap closed (0 = the target, 1 = the retain model; dashed line at 1/2, the CPU
protocol's bar), forget probability, forget ROUGE-L, model utility, and the LOSS membership AUC of the
forget pairs against the held-out authors (0.5 = indistinguishable). Forget quality, a KS p-value with
no interval, is written under each method's name.

Source: ``--tofu-run RUN`` (a protocol run folder's ``results.json``), else the committed CPU protocol
run (``docs/results/tofu-cpu/results.json``, made by ``make tofu-figures``), named in the title.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from markovsim.plotting import method_color
from markovsim.results import read_json

from .cache import load_cache, save_cache
from .style import MODEL_COLORS, apply_style, save_figure

TITLE = "TOFU protocol: how far each method unlearns, what it costs, whether the pairs are still recognised"
USES_TOFU_RUN = True
COMMITTED_RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results",
                             "tofu-cpu")
PANELS = {"forget_gap_closed": "forget gap closed\n(0 = target, 1 = retain model)",
          "forget/probability": "forget probability", "forget/rouge_l": "forget ROUGE-L",
          "model_utility": "model utility", "mia_auc/loss": "LOSS membership AUC\n(forget vs held-out authors)"}
REFERENCE_LINES = {"forget_gap_closed": (0.5, 1.0), "mia_auc/loss": (0.5,)}


@dataclass(frozen=True)
class Config:
    tofu_run: str | None = None


CONFIGS = {name: Config() for name in ("tiny", "quick", "paper")}


def results_path(config: Config) -> str:
    """The results.json the figure reads: the given run's, else the committed CPU protocol run's."""
    return os.path.join(config.tofu_run if config.tofu_run is not None else COMMITTED_RUN, "results.json")


def tofu_arrays(document: dict, path: str) -> dict[str, np.ndarray]:
    """``<model>/<key>`` (1,) value and ``<model>/<key>/interval`` (2,) (NaN where none) per panel key, and
    ``<model>/forget_quality`` (1,), for each model of a protocol ``results.json`` (``path`` names it in errors)."""
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path} has no 'models': not a TOFU protocol results.json")
    arrays = {}
    for name, row in models.items():
        if "intervals" not in row:
            raise ValueError(f"{path}: model {name!r} has no intervals (a run from before they existed); rewrite "
                             f"its report with python -m llm.tofu stage report (same settings)")
        for key in PANELS:
            value, interval = row.get(key), row["intervals"].get(key)
            arrays[f"{name}/{key}"] = np.array([np.nan if value is None else value], dtype=np.float64)
            arrays[f"{name}/{key}/interval"] = np.array([np.nan, np.nan] if interval is None else interval,
                                                        dtype=np.float64)
        arrays[f"{name}/forget_quality"] = np.array([row["forget_quality"]], dtype=np.float64)
    return arrays


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    path = results_path(config)
    if not os.path.isfile(path):
        raise ValueError(f"--tofu-run {config.tofu_run}: {path} not found; run the TOFU protocol "
                         f"(python -m llm.tofu run ... --out {config.tofu_run}) first")
    document = read_json(path)
    arrays = tofu_arrays(document, path)
    source = {"results": path, "split": document["config"]["split"], "limit": document["config"]["limit"],
              "model": document["config"]["model"], "models": list(document["models"]),
              "methods": {name: row["method"] for name, row in document["models"].items()}}
    return save_cache(cache_stem, arrays, dataclasses.asdict(config) | {"source": source})


def _label(name: str, method: str | None) -> str:
    return method or name


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    source = document["config"]["source"]
    names = source["models"]
    labels = [_label(name, source["methods"][name]) for name in names]
    positions = np.arange(len(names))
    figure, axes = plt.subplots(1, len(PANELS), figsize=(3.2 * len(PANELS), 3.6), squeeze=False)
    for axis, (key, title) in zip(axes[0], PANELS.items()):
        for position, name, label in zip(positions, names, labels):
            color = MODEL_COLORS.get(name) or method_color(label)
            value, (low, high) = arrays[f"{name}/{key}"][0], arrays[f"{name}/{key}/interval"]
            control = name in MODEL_COLORS  # target / retain model: hollow squares, methods filled circles
            point, = axis.plot([position], [value], "s" if control else "o", color=color, ms=5,
                               markerfacecolor="none" if control else color)
            point.set_gid(f"{name}/{key}")
            if np.isfinite([low, high]).all():
                bar = axis.vlines(position, low, high, color=color, lw=2)
                bar.set_gid(f"{name}/{key}/interval")
        for level in REFERENCE_LINES.get(key, ()):
            axis.axhline(level, color="gray", lw=0.8, ls="--")
        quality = [f"{label}\nFQ {arrays[f'{name}/forget_quality'][0]:.2g}" for name, label in zip(names, labels)]
        axis.set_xticks(positions, quality, rotation=45, ha="right", fontsize=7)
        axis.set_title(title, fontsize=9)
    run = os.path.dirname(source["results"])
    where = ("the committed CPU run (docs/results/tofu-cpu)" if os.path.samefile(run, COMMITTED_RUN)
             else f"run {os.path.basename(run)}") if os.path.isdir(run) else f"run {os.path.basename(run)}"
    figure.suptitle(f"{TITLE}\nTOFU {source['split']} (limit {source['limit']}) on {source['model']}, {where}; "
                    f"95% bootstrap intervals over items; FQ = forget quality (KS p-value, no interval)", fontsize=9)
    return save_figure(figure, output_stem)
