"""Where Adam's eps enters: torch AdamW vs the legacy transformers.AdamW of the paper's code.

Question: SimNPO's gradient weights (2/|y|) sigma((beta/|y|) logp + gamma) are tiny in the sigmoid's
tail, so its gradients approach Adam's eps. The legacy rule (``adamw_legacy``, the paper's optimiser)
adds eps = 1e-6 to the UNcorrected sqrt(v), an effective eps of eps / sqrt(1 - b2^t) (3e-5 at step 1);
torch's AdamW adds eps = 1e-8 to the corrected one. Does the choice change SimNPO's trajectory, and
leave NPO's (weights O(1) at the start) alone - in the exact simulator and on the paper's transformer?

Rows 1-2: trade-off curves (case (a), forget1 solid, forget2 dashed) of NPO and SimNPO under three
settings: torch AdamW eps 1e-8 (torch's default), torch AdamW eps 1e-6, legacy AdamW eps 1e-6 (the
paper). Row 3: a sweep of eps for both rules: mean forget KL after the last step.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from markovsim.dynamics import unlearn as exact_unlearn
from markovsim.optimizers import effective_eps
from markovsim.plotting import method_color
from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS, prepare

from .cache import load_cache, save_cache
from .runs import map_in_workers, ordered_sources
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings, prepare_transformer

TITLE = "Where Adam's eps enters: torch AdamW vs the paper's legacy transformers.AdamW (case a)"
SCENARIO = "paper_short_forget2"
METHODS = ("NPO", "SimNPO")
SETTINGS = {"torch AdamW, eps 1e-8": ("adamw", 1e-8), "torch AdamW, eps 1e-6": ("adamw", 1e-6),
            "legacy AdamW, eps 1e-6 (paper)": ("adamw_legacy", 1e-6)}
SETTING_COLORS = ("#1b9e77", "#7570b3", "#d95f02")
FORGET = ("forget1", "forget2")


@dataclass(frozen=True)
class Config:
    scale: float = 0.2
    simulator_sources: tuple[str, ...] = ("tabular", "mixture")
    simulator_steps: int = 50
    transformer: TransformerSettings | None = field(default_factory=TransformerSettings)
    sweep_eps: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)


CONFIGS = {
    "tiny": Config(scale=0.005, simulator_steps=3, sweep_eps=(1e-8, 1e-4),
                   transformer=TransformerSettings(preset="tiny-synthetic", pretrain_epochs=1.0, unlearn_steps=2)),
    # quick: the transformer's every-step KLs on 100 of the 800 test sequences (estimates; paper: all of them)
    "quick": Config(transformer=TransformerSettings(diagnostics_max_sequences=8, evaluation_subsample=100),
                    sweep_eps=(1e-8, 1e-6, 1e-5, 1e-4)),
    "paper": Config(scale=1.0),
}


def _simulator(config: Config, source: str, arrays: dict, finals: dict) -> None:
    scenario = SCENARIOS[SCENARIO].scaled(config.scale)
    setup = prepare(scenario, source)
    base = dataclasses.replace(scenario.dynamics, steps=config.simulator_steps)
    for method in METHODS:
        objective = scenario.methods[method]
        for label, (rule, eps) in SETTINGS.items():
            run = exact_unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                                dataclasses.replace(base, optimizer=rule, adam_eps=eps), setup.evaluator)
            _store(arrays, f"{source}/{method}/{label}", run)
        for rule in ("adamw", "adamw_legacy"):
            values = []
            for eps in config.sweep_eps:
                run = exact_unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                                    dataclasses.replace(base, optimizer=rule, adam_eps=eps,
                                                        eval_every=config.simulator_steps), setup.evaluator)
                values.append(_final_forget(run))
            finals[f"{source}/{method}/{rule}"] = values


def _transformer_runs(task: tuple) -> tuple[dict, dict]:
    """Some methods' transformer runs: the three settings' trajectories and the eps sweep's final forget KLs
    (``task``: config, device, cache dir, methods, progress, recompute)."""
    config, device, cache_dir, methods, progress, recompute = task
    arrays, finals = {}, {}
    with torch_threads(1):
        setup = prepare_transformer(SCENARIO, config.scale, config.transformer, device, progress,
                                    os.path.join(cache_dir, "models"), recompute)
        for method in methods:
            _method_runs(config, setup, method, arrays, finals)
    return arrays, finals


def _method_runs(config: Config, setup, method: str, arrays: dict, finals: dict) -> None:
    """One method's runs from ``setup``'s reference into ``arrays`` (trajectories) and ``finals`` (the sweep)."""
    import copy

    from llm import unlearn

    source, objective = config.transformer.preset, setup.scenario.methods[method]
    for label, (rule, eps) in SETTINGS.items():
        train = dataclasses.replace(setup.unlearning_config, optimizer=rule, adam_eps=eps)
        _store(arrays, f"{source}/{method}/{label}",
               unlearn(copy.deepcopy(setup.reference), objective, setup.forget, setup.retain, train, setup.evaluator))
    for rule in ("adamw", "adamw_legacy"):
        values = []
        for eps in config.sweep_eps:
            train = dataclasses.replace(setup.unlearning_config, optimizer=rule, adam_eps=eps,
                                        eval_every=config.transformer.unlearn_steps, track_power_share=False,
                                        track_forget_weights=False)
            values.append(_final_forget(unlearn(copy.deepcopy(setup.reference), objective, setup.forget,
                                                setup.retain, train, setup.evaluator)))
        finals[f"{source}/{method}/{rule}"] = values


def _store(arrays: dict, key: str, run) -> None:
    arrays[f"{key}/retain"] = run.metric("kl_true", "retain")
    for name in FORGET:
        arrays[f"{key}/{name}"] = run.metric("kl_true", name)


def _final_forget(run) -> float:
    return float(np.mean([run.metric("kl_true", name)[-1] for name in FORGET]))


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    arrays, finals = {}, {}
    with torch_threads(1):  # same numbers whatever the machine's cores
        for source in config.simulator_sources:
            _simulator(config, source, arrays, finals)
        if config.transformer is not None:
            cache_dir = os.path.dirname(cache_stem)
            tasks = [(config, device, cache_dir, METHODS, True, recompute)]
            if jobs > 1:  # the models trained (or loaded) once here, then each method's runs in its own worker
                prepare_transformer(SCENARIO, config.scale, config.transformer, device, True,
                                    os.path.join(cache_dir, "models"), recompute)
                tasks = [(config, device, cache_dir, (method,), False, False) for method in METHODS]
            for more_arrays, more_finals in map_in_workers(_transformer_runs, tasks, jobs):
                arrays |= more_arrays
                finals |= more_finals
    sources = [s for s in config.simulator_sources] + ([config.transformer.preset] if config.transformer else [])
    effective = {rule: [effective_eps(rule, 1e-6, 0.999, t) for t in (1, 10, 50)] for rule in ("adamw", "adamw_legacy")}
    return save_cache(cache_stem, arrays, config, sources=sources, finals=finals, effective_eps_at_1_10_50=effective)


def _coincide(arrays: dict, source: str, method: str, tolerance: float = 0.01) -> bool:
    """Do all settings' curves agree to ``tolerance`` (relative to the curves' range)?"""
    curves = [np.concatenate([arrays[f"{source}/{method}/{label}/{part}"] for part in ("retain",) + FORGET])
              for label in SETTINGS]
    if len({len(c) for c in curves}) > 1:
        return False
    spread = max(float(np.ptp(c)) for c in curves) or 1.0
    return all(np.max(np.abs(c - curves[0])) <= tolerance * spread for c in curves[1:])


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    config, finals = document["config"], document["finals"]
    apply_style()
    import matplotlib.pyplot as plt

    sources = ordered_sources(document["sources"])
    figure, axes = plt.subplots(3, len(sources), figsize=(3.8 * len(sources), 9.3), squeeze=False)
    for col, source in enumerate(sources):
        for row, method in enumerate(METHODS):
            axis = axes[row, col]
            for color, label in zip(SETTING_COLORS, SETTINGS):
                key = f"{source}/{method}/{label}"
                for name, style in zip(FORGET, ("-", "--")):
                    axis.plot(arrays[f"{key}/retain"], arrays[f"{key}/{name}"], style, color=color,
                              label=label if name == "forget1" else None)
            axis.plot(arrays[f"{key}/retain"][:1], arrays[f"{key}/forget1"][:1], "k*", ms=9)
            axis.set_title(f"{source}: {method}" + (" (the three settings coincide)"
                                                    if _coincide(arrays, source, method) else ""), fontsize=9)
            axis.set_xlabel("retain KL")
            axis.set_ylabel("forget KL (forget1 -, forget2 --)")
        axis = axes[2, col]
        for method in METHODS:
            for rule, style in (("adamw", "-o"), ("adamw_legacy", "--s")):
                axis.plot(config["sweep_eps"], finals[f"{source}/{method}/{rule}"], style, color=method_color(method),
                          ms=4, label=f"{method}, {'torch' if rule == 'adamw' else 'legacy'} rule")
        axis.set_xscale("log")
        axis.set_xlabel("Adam eps")
        axis.set_ylabel("mean forget KL after the last step")
        axis.set_title(f"{source}: eps sweep", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    axes[2, 0].legend(fontsize=7)
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)
