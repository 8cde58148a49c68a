"""Why GPT-2 "jumps" on the first unlearning step: Adam's sign-like first step against each weight's scale.

Question: on case (a), one AdamW step of SimNPO at the paper's lr (5e-4) raises GPT-2's forget2 KL
several times more than the paper's synthetic transformer's, while the retain KL goes down. Which
parameters carry that jump, and is it the optimiser's step relative to the weights' scale?

Adam's first step moves every weight with a non-zero gradient by about lr in the gradient's sign
direction, whatever the gradient's size (docs/theory.md, "Adam, eps and small gradient weights"):
the relative change of a group is about lr / rms(weights). GPT-2's matrices are initialised at
std 0.02 (and stay small), the paper's at PyTorch's defaults (~0.05) with N(0, 1) embeddings. The
legacy optimiser's effective eps (3e-5 at step 1) shrinks the step where gradients are that small,
as SimNPO's are. Panels, averaged over five first batches (batch-order seeds 0-4), on the seed-0
models of the markov_tradeoff figure:
(1) relative first step ||d theta_g|| / ||theta_g|| per parameter group;
(2) the forget2 KL rise when ONLY group g takes its first-step update (attribution);
(3) the forget2 KL rise and the retain KL change after one step against the learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from markovsim.losses import NEEDS_REFERENCE
from markovsim.runtime import torch_threads

from .cache import load_cache, save_cache
from .runs import map_in_workers
from .style import apply_style, save_figure
from .transformer_runs import TransformerSettings, prepare_transformer

TITLE = "The first unlearning step (case a, SimNPO): Adam's step relative to each weight group's scale"
SCENARIO = "paper_short_forget2"
RULES = {"adamw": ("torch AdamW (eps 1e-8)", 1e-8), "adamw_legacy": ("legacy AdamW (eps 1e-6, paper)", 1e-6)}
# Substrings of parameter names -> group (first match wins); covers GPT-2, Llama and the paper's model. Norms
# come first: the paper's model names its MLP LayerNorm "mlp_norm" (and Llama "post_attention_layernorm").
GROUPS = (("ln_", "LayerNorms"), ("norm", "LayerNorms"),
          ("wte", "tokens (GPT-2: = output)"), ("token_embedding", "tokens (GPT-2: = output)"),
          ("embed_tokens", "tokens (GPT-2: = output)"), ("wpe", "positions"), ("position_embedding", "positions"),
          ("attn", "attention"), ("query", "attention"), ("key", "attention"), ("value", "attention"),
          ("mlp", "MLP"), ("output", "output layer"), ("lm_head", "output layer"))
GROUP_ORDER = ("tokens (GPT-2: = output)", "positions", "attention", "MLP", "LayerNorms", "output layer")


@dataclass(frozen=True)
class Config:
    scale: float = 0.2
    presets: tuple[str, ...] = ("paper-synthetic", "gpt2-4x128")
    method: str = "SimNPO"
    batch_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    learning_rates: tuple[float, ...] = (5e-5, 1.5e-4, 5e-4, 1.5e-3)
    max_test_sequences: int | None = 1000  # fixed, evenly spaced test subsample for the one-step KLs
    transformer: TransformerSettings = field(default_factory=TransformerSettings)


CONFIGS = {
    "tiny": Config(scale=0.005, presets=("tiny-synthetic", "tiny-gpt2"), batch_seeds=(0,), learning_rates=(5e-4,),
                   transformer=TransformerSettings(pretrain_epochs=1.0, unlearn_steps=2)),
    # quick: the paper's transformer only (the markov_tradeoff quick runs pre-train no GPT-2), 2 batch seeds
    "quick": Config(presets=("paper-synthetic",), batch_seeds=(0, 1),
                    transformer=TransformerSettings(diagnostics_max_sequences=64)),
    "paper": Config(scale=1.0),
}


def group_of(name: str) -> str:
    for key, group in GROUPS:
        if key in name:
            return group
    return "other"


def _first_step(model, objective, forget, reference_logps, rule: str, eps: float, learning_rate: float,
                batch_seed: int) -> dict[str, torch.Tensor]:
    """The parameter update of the paper's first unlearning step (batch of 4) on a copy of ``model``."""
    from llm.data import batch_indices
    from llm.objective import BatchCounts, UnlearningBatch, objective_terms
    from markovsim.optimizers import build_torch_optimizer

    stepped = copy.deepcopy(model).train()
    optimizer = build_torch_optimizer(rule, [{"params": list(stepped.parameters()), "weight_decay": 0.0}],
                                      learning_rate, (0.9, 0.999), eps)
    rows = batch_indices(len(forget), 4, 0, batch_seed)
    reference = None if reference_logps is None else reference_logps[rows]
    objective_terms(stepped, objective, UnlearningBatch(forget.batch(rows), reference, BatchCounts(4))).total.backward()
    optimizer.step()
    start = dict(model.named_parameters())
    return {name: (p.detach() - start[name].detach()) for name, p in stepped.named_parameters()}


def _apply(model, delta: dict[str, torch.Tensor], groups=None):
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in moved.named_parameters():
            if groups is None or group_of(name) in groups:
                parameter += delta[name]
    return moved


def _analyse(config: Config, preset: str, device: str, cache_dir: str, recompute: bool) -> tuple[dict, dict]:
    from llm import Evaluator
    from llm.data import encode
    from llm.evaluate import model_sequence_logps_batched

    settings = dataclasses.replace(config.transformer, preset=preset, seed=0)
    setup = prepare_transformer(SCENARIO, config.scale, settings, device, True, os.path.join(cache_dir, "models"),
                                recompute)
    test = setup.evaluator.test
    if config.max_test_sequences is not None and len(test) > config.max_test_sequences:
        test = test.subset(np.linspace(0, len(test) - 1, config.max_test_sequences).astype(np.int64))
    evaluator = Evaluator(test, true_chains={c.name: c.chain for c in setup.scenario.spec.components})
    model = setup.reference.cpu().eval()
    objective = setup.scenario.methods[config.method]
    forget = encode(setup.forget, "response")
    reference_logps = model_sequence_logps_batched(model, forget)[0] if objective.forget in NEEDS_REFERENCE else None
    columns = list(evaluator.component_names)
    retain, forget2 = columns.index("retain"), columns.index("forget2")
    base = evaluator.evaluate(model)["kl_true"]
    groups = [g for g in GROUP_ORDER if any(group_of(n) == g for n, _ in model.named_parameters())]
    norms = {g: float(np.sqrt(sum(float((p.detach() ** 2).sum()) for n, p in model.named_parameters()
                                   if group_of(n) == g))) for g in groups}
    sizes = {g: sum(p.numel() for n, p in model.named_parameters() if group_of(n) == g) for g in groups}
    arrays, summary = {}, {"groups": groups, "rms": {g: norms[g] / np.sqrt(sizes[g]) for g in groups},
                           "base_kl": base.tolist()}
    for rule, (_, eps) in RULES.items():
        relative, attribution, full = np.zeros((len(config.batch_seeds), len(groups))), \
            np.zeros((len(config.batch_seeds), len(groups))), np.zeros((len(config.batch_seeds), 2))
        sweep = np.zeros((len(config.batch_seeds), len(config.learning_rates), 2))
        for i, batch_seed in enumerate(config.batch_seeds):
            for j, learning_rate in enumerate(config.learning_rates):
                delta = _first_step(model, objective, forget, reference_logps, rule, eps, learning_rate, batch_seed)
                kl = evaluator.evaluate(_apply(model, delta))["kl_true"]
                sweep[i, j] = kl[forget2] - base[forget2], kl[retain] - base[retain]
            delta = _first_step(model, objective, forget, reference_logps, rule, eps,
                                settings.unlearn_learning_rate, batch_seed)
            kl = evaluator.evaluate(_apply(model, delta))["kl_true"]
            full[i] = kl[forget2] - base[forget2], kl[retain] - base[retain]
            for k, group in enumerate(groups):
                moved = float(np.sqrt(sum(float((d ** 2).sum()) for n, d in delta.items() if group_of(n) == group)))
                relative[i, k] = moved / norms[group]
                kl = evaluator.evaluate(_apply(model, delta, {group}))["kl_true"]
                attribution[i, k] = kl[forget2] - base[forget2]
        arrays |= {f"{preset}/{rule}/relative": relative, f"{preset}/{rule}/attribution": attribution,
                   f"{preset}/{rule}/full": full, f"{preset}/{rule}/sweep": sweep}
    return arrays, summary


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    arrays, summaries = {}, {}
    tasks = [(config, preset, device, os.path.dirname(cache_stem), recompute) for preset in config.presets]
    for preset, (more, summary) in zip(config.presets, map_in_workers(_analyse_task, tasks, jobs)):
        arrays |= more
        summaries[preset] = summary
    return save_cache(cache_stem, arrays, config, summaries=summaries)


def _analyse_task(task: tuple) -> tuple[dict, dict]:
    """:func:`_analyse` of one preset (in a worker when jobs > 1; the models have no dropout, so the numbers
    do not depend on which process or order runs the presets)."""
    with torch.random.fork_rng(devices=[]), torch_threads(1):  # same numbers whatever the machine's cores
        return _analyse(*task)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, arrays = load_cache(cache_stem)
    config, summaries = document["config"], document["summaries"]
    apply_style()
    import matplotlib.pyplot as plt

    presets = list(summaries)
    groups = [g for g in GROUP_ORDER if any(g in summaries[p]["groups"] for p in presets)]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    bars = [(p, r) for p in presets for r in RULES]
    width = 0.8 / len(bars)
    colors = {"paper-synthetic": "#1f77b4", "gpt2-4x128": "#d62728"}
    for b, (preset, rule) in enumerate(bars):
        color, hatch = colors.get(preset, "#555555"), "" if rule == "adamw" else "//"
        label = f"{preset}, {RULES[rule][0]}"
        for panel, name in ((0, "relative"), (1, "attribution")):
            values = arrays[f"{preset}/{rule}/{name}"].mean(0)
            heights = [values[summaries[preset]["groups"].index(g)] if g in summaries[preset]["groups"] else np.nan
                       for g in groups]
            axes[panel].bar(np.arange(len(groups)) + (b - (len(bars) - 1) / 2) * width, heights, width, color=color,
                            hatch=hatch, edgecolor="white", label=label)
        sweep = arrays[f"{preset}/{rule}/sweep"].mean(0)  # (lrs, 2)
        style = "-o" if rule == "adamw" else "--s"
        axes[2].plot(config["learning_rates"], sweep[:, 0], style, color=color, ms=4, label=f"{label}: forget2")
        axes[2].plot(config["learning_rates"], sweep[:, 1], style, color=color, ms=3, alpha=0.45,
                     label=f"{label}: retain")
    for panel, ylabel, title in ((0, "||d theta_g|| / ||theta_g||", "(1) relative first step per group"),
                                 (1, "forget2 KL rise (only this group moves)", "(2) which group carries the jump")):
        axes[panel].set_xticks(np.arange(len(groups)), [g.replace(" (", "\n(") for g in groups], fontsize=7)
        axes[panel].set_ylabel(ylabel)
        axes[panel].set_title(title)
    axes[0].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower left", ncol=2, fontsize=7)
    axes[2].axhline(0, color="black", lw=0.6)
    axes[2].axvline(5e-4, color="gray", ls=":", lw=0.8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("learning rate (paper: 5e-4, dotted)")
    axes[2].set_ylabel("KL change after one step")
    axes[2].set_title(f"(3) one {config['method']} step: forget2 rise vs retain change")
    axes[2].legend(fontsize=6, loc="upper left")
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)
