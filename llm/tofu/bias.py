"""The reference-model bias measured on TOFU: per response-length and per memorisation group, during unlearning.

docs/theory.md, "Reference-model bias" and "Length and memorisation groups on TOFU". The forget set is
split twice into ``num_groups`` groups of (nearly) equal size by rank (ties broken by item order):

    length        by n_i = answer tokens + EOS under the target's tokenizer          ("short", "medium", "long")
    memorisation  by logps_ref[i] / n_i, the target model's log-likelihood per token  ("low", "mid", "high")

Each group plays the role of one forget component of the simulator's mixture (short vs long: the
``paper_short_forget2`` scenario; poorly vs well learned by the reference: ``paper_unseen_forget2``).
A target model (e.g. a protocol run's ``models/target``) is unlearned with
:func:`llm.tofu.finetune.unlearn` unchanged, writing a checkpoint every ``record_every`` steps; at
step 0 (the target), every checkpoint and the end, per group g (rows R_g, n_f forget items):

    mean_weight[g]  = mean over y in R_g of w(y), the closed-form weight of ``markovsim.losses``
                      (NPO: 2 sigma(beta (logps - logps_ref)); SimNPO: (2/|y|) sigma((beta/|y|) logps + gamma))
    g_g             = (forget_weight / n_f) sum_{y in R_g} d L_f(y) / d theta        (all trainable parameters)
    power_share[g]  = ||g_g|| / sum_g' ||g_g'||                 (:func:`markovsim.diagnostics.power_shares`)

computed by :class:`llm.diagnostics.Diagnostics` (the Markov transformers' code, with groups as its
components) over every forget item by default (``max_items`` subsamples each group and scales its sum
by n_g / |subsample|, as there). After unlearning, per group: mean probability exp(logps / n), the
forget truth-ratio aggregate mean(min(TR, 1/TR)) and forget quality, the KS p-value of the group's
truth ratios against the retain model's on the same items (:mod:`llm.tofu.metrics`).

Intervals: every mean weight and power share, and every probability and truth-ratio aggregate after
unlearning, carries a 95% percentile-bootstrap interval over the group's items (``bootstrap_resamples``
resamples, seeded; the groups fixed, their items resampled): the weights and the after-unlearning numbers
are means of per-item values (:func:`llm.tofu.metrics.bootstrap_interval`); the power shares come
from the Gram matrix of the per-item gradients (:mod:`llm.tofu.bias_intervals`: exact for every
resample, one extra pass over the items per block of ``gram_max_gb`` GB of gradients). Forget
quality, a KS p-value, has none.

Results: ``OUT/results.json`` (strict JSON, config and package version); ``python -m llm.tofu.bias
--run RUN`` reads ``RUN/models/target`` and ``RUN/models/retain`` and writes ``RUN/bias/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch

from llm.checkpoint import checkpoint_path, load_checkpoint
from llm.config import TrainConfig
from llm.diagnostics import Diagnostics, DiagnosticsPlan
from markovsim.objectives import Objective
from markovsim.results import atomic_write_json, metadata_block, read_json
from markovsim.runtime import torch_threads

from . import metrics
from .bias_intervals import BOOTSTRAP_STREAM, group_intervals, item_gradient_gram
from .data import TofuItem, load_split
from .evaluate import FORGET_SPLITS
from .finetune import Examples, unlearn
from .scoring import answer_logps, perturbed_logps

__all__ = ["GROUPINGS", "BiasConfig", "rank_groups", "forget_groups", "group_rows", "group_diagnostics",
           "group_metrics", "measure_bias", "main"]

GROUP_NAMES = {"length": ("short", "medium", "long"), "memorisation": ("low", "mid", "high")}
GROUPINGS = tuple(GROUP_NAMES)


@dataclass(frozen=True)
class BiasConfig:
    """Settings of one bias measurement (recorded in the results file).

    Unlearning follows the protocol's stage (``llm.tofu.protocol.ProtocolConfig.train_config``: AdamW,
    weight decay 0.01, linear decay), with ``steps`` steps of ``batch_size`` forget pairs. ``max_items``:
    None (every forget item) or the items per group behind each diagnostic; ``bootstrap_resamples``
    and ``gram_max_gb``: the intervals' resamples and the per-item gradients held at once (module docstring).
    """

    split: str = "forget10"
    methods: tuple[str, ...] = ("NPO", "SimNPO")
    steps: int = 20
    record_every: int = 5
    batch_size: int = 8
    learning_rate: float = 1e-5
    num_groups: int = 3
    limit_forget: int | None = None
    max_items: int | None = None
    bootstrap_resamples: int = metrics.BOOTSTRAP_RESAMPLES
    gram_max_gb: float = 2.0
    eval_batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        from .protocol import method_objective

        if self.split not in FORGET_SPLITS:
            raise ValueError(f"split must be one of {', '.join(FORGET_SPLITS)}, got {self.split!r}")
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError("methods must be a non-empty list of method names, e.g. ('NPO', 'SimNPO')")
        for method in self.methods:
            objective = method_objective(method, self.split)
            if objective.retain is not None:
                raise ValueError(f"method {method!r} has a retain term; the bias measurement uses forget-only "
                                 f"methods (NPO, SimNPO, GA) so that the power shares split the forget gradient")
        for name in ("steps", "record_every", "batch_size", "num_groups", "eval_batch_size", "bootstrap_resamples"):
            _check_int(name, getattr(self, name), 1)
        for name in ("limit_forget", "max_items", "num_threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        for name in ("learning_rate", "gram_max_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.num_groups > 3:
            raise ValueError(f"num_groups must be 1, 2 or 3 (tertiles by default), got {self.num_groups}")
        object.__setattr__(self, "methods", tuple(self.methods))

    def train_config(self) -> TrainConfig:
        """The unlearning run's settings: a checkpoint every ``record_every`` steps, all kept."""
        return TrainConfig(learning_rate=self.learning_rate, steps=self.steps, batch_size=self.batch_size,
                           weight_decay=0.01, schedule="linear", seed=self.seed, device=self.device,
                           num_threads=self.num_threads, progress=self.progress, eval_batch_size=self.eval_batch_size,
                           checkpoint_every=self.record_every, keep_checkpoints=0, track_forget_weights=False,
                           track_power_share=False)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def rank_groups(values, num_groups: int) -> np.ndarray:
    """(N,) int group ids 0..G-1: items sorted by ``values`` (stable), cut into G parts of sizes differing by <= 1.

    Group 0 holds the smallest values. Every item is in exactly one group; N >= G is required.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"values must be a finite (N,) array, got shape {values.shape}")
    if len(values) < num_groups:
        raise ValueError(f"{len(values)} items cannot fill {num_groups} groups; use more forget items")
    groups = np.empty(len(values), dtype=np.int64)
    for group, rows in enumerate(np.array_split(np.argsort(values, kind="stable"), num_groups)):
        groups[rows] = group
    return groups


def forget_groups(ref_logps, num_tokens, num_groups: int = 3) -> dict[str, np.ndarray]:
    """``{"length": (N,) ids by num_tokens, "memorisation": (N,) ids by ref_logps / num_tokens}``."""
    ref_logps, num_tokens = np.asarray(ref_logps, dtype=np.float64), np.asarray(num_tokens, dtype=np.float64)
    if ref_logps.shape != num_tokens.shape:
        raise ValueError(f"ref_logps {ref_logps.shape} and num_tokens {num_tokens.shape} must have the same shape")
    return {"length": rank_groups(num_tokens, num_groups),
            "memorisation": rank_groups(ref_logps / num_tokens, num_groups)}


def group_names(grouping: str, num_groups: int) -> tuple[str, ...]:
    names = GROUP_NAMES[grouping]
    return names if num_groups == 3 else tuple(f"{grouping}{g}" for g in range(num_groups))


def group_rows(groups: np.ndarray, num_tokens: np.ndarray, max_items: int | None = None,
               seed: int = 0) -> tuple[tuple[int, np.ndarray, float], ...]:
    """``(group, rows, n_g / len(rows))`` per group: its rows (at most ``max_items``, seeded), sorted by length."""
    parts = []
    for group in range(int(groups.max()) + 1):
        rows = np.flatnonzero(groups == group)
        chosen = rows
        if max_items is not None and len(rows) > max_items:
            chosen = np.sort(np.random.default_rng([seed, group]).choice(rows, size=max_items, replace=False))
        chosen = chosen[np.argsort(num_tokens[chosen], kind="stable")]
        parts.append((group, chosen, len(rows) / len(chosen)))
    return tuple(parts)


def group_diagnostics(model, objective: Objective, examples: Examples, ref_logps: torch.Tensor | None,
                      groups: np.ndarray, num_tokens: np.ndarray, max_items: int | None = None, seed: int = 0,
                      batch_size: int = 16) -> dict[str, np.ndarray]:
    """``{"mean_weight": (G,), "power_share": (G,)}`` of the forget groups ``groups`` (N,) at ``model``.

    :class:`llm.diagnostics.Diagnostics` with one column per group, on :func:`group_rows`.
    """
    num_groups = int(groups.max()) + 1
    parts = group_rows(groups, num_tokens, max_items, seed)
    plan = DiagnosticsPlan(parts, None, 1.0, (), np.ones(num_groups, dtype=bool))
    diagnostics = Diagnostics(objective, tuple(str(g) for g in range(num_groups)), plan, examples, None, None,
                              ref_logps, None, None, batch_size, False)
    return diagnostics(model)


def item_scores(model, tokenizer, items: list[TofuItem], batch_size: int) -> dict[str, np.ndarray]:
    """Per item: ``probability`` (N,) and forget ``truth_ratio`` (N,) (paraphrased answer as the reference)."""
    questions = [i.question for i in items]
    true_lp, true_n = answer_logps(model, tokenizer, questions, [i.answer for i in items], batch_size)
    pert_lp, pert_n = perturbed_logps(model, tokenizer, questions, [i.perturbed_answers for i in items], batch_size)
    para_lp, para_n = answer_logps(model, tokenizer, questions, [i.paraphrased_answer for i in items], batch_size)
    return {"probability": metrics.probability(true_lp, true_n),
            "truth_ratio": metrics.truth_ratio(pert_lp, pert_n, para_lp, para_n)}


def group_metrics(scores: dict[str, np.ndarray], groups: np.ndarray, retain_ratios: np.ndarray | None = None,
                  num_resamples: int = metrics.BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, list]:
    """Per group: mean probability, the forget truth-ratio aggregate mean(min(TR, 1/TR)), each with its bootstrap
    interval over the group's items (``*_interval``, [low, high]; group g's resamples seeded by (seed, g)),
    and (given the retain model's per-item truth ratios) forget quality, the KS p-value of the group's ratios
    against the retain model's; (G,) lists."""
    result = {"probability": [], "probability_interval": [], "truth_ratio": [], "truth_ratio_interval": [],
              "forget_quality": []}
    for group in range(int(groups.max()) + 1):
        rows = groups == group
        counts = metrics.bootstrap_counts(int(rows.sum()), num_resamples, [seed, BOOTSTRAP_STREAM, group])
        for name, values in (("probability", scores["probability"][rows]),
                             ("truth_ratio", metrics.forget_truth_ratio_scores(scores["truth_ratio"][rows]))):
            result[name].append(float(values.mean()))
            result[f"{name}_interval"].append(list(metrics.bootstrap_interval(values, counts=counts)))
        result["forget_quality"].append(float("nan") if retain_ratios is None else
                                        metrics.forget_quality(scores["truth_ratio"][rows], retain_ratios[rows]))
    return result


def _load(path):
    from .model import load_causal_lm

    return load_causal_lm(path)


DIAGNOSTICS = ("mean_weight", "power_share", "mean_weight_interval", "power_share_interval")


def _diagnose_all(model, objective, examples, ref, assignment, num_tokens, config) -> dict:
    """Per grouping: :func:`group_diagnostics` and their intervals (one Gram matrix for both groupings)."""
    result = {grouping: group_diagnostics(model, objective, examples, ref, ids, num_tokens, config.max_items,
                                          config.seed, config.eval_batch_size) for grouping, ids in assignment.items()}
    parts = {grouping: group_rows(ids, num_tokens, config.max_items, config.seed) for grouping, ids in
             assignment.items()}
    rows = np.unique(np.concatenate([chosen for part in parts.values() for _, chosen, _ in part]))  # (m,) sorted
    gram, weights = item_gradient_gram(model, objective, examples, ref, rows, int(config.gram_max_gb * 2**30))
    for grouping, part in parts.items():
        result[grouping] |= group_intervals(gram, weights, [np.searchsorted(rows, chosen) for _, chosen, _ in part],
                                            [scale for _, _, scale in part], config.bootstrap_resamples, config.seed)
    return result


def _unlearn_and_record(target_dir, method: str, items, tokenizer, assignment, num_tokens, ref_logps, config,
                        work: str) -> dict:
    """Unlearn a fresh copy of the target; diagnostics at step 0, every checkpoint and the end."""
    from .protocol import method_objective

    objective = method_objective(method, config.split)
    examples = Examples.build(tokenizer, items)
    ref = torch.as_tensor(ref_logps, dtype=torch.float64)
    model, _ = _load(target_dir)
    records = {0: _diagnose_all(model, objective, examples, ref, assignment, num_tokens, config)}
    shutil.rmtree(work, ignore_errors=True)
    outcome = unlearn(model, tokenizer, objective, items, None, config.train_config(), work, f"unlearn {method}")
    records[outcome.steps] = _diagnose_all(model, objective, examples, ref, assignment, num_tokens, config)
    final_scores = item_scores(model, tokenizer, items, config.eval_batch_size)
    for step in range(config.record_every, outcome.steps, config.record_every):
        snapshot, _ = _load(target_dir)
        snapshot.load_state_dict(load_checkpoint(checkpoint_path(work, step))[0]["model"])
        snapshot.to(next(model.parameters()).device)
        records[step] = _diagnose_all(snapshot, objective, examples, ref, assignment, num_tokens, config)
    shutil.rmtree(work, ignore_errors=True)
    steps = sorted(records)
    diagnostics = {grouping: {key: [np.asarray(records[s][grouping][key]).tolist() for s in steps]
                              for key in DIAGNOSTICS} for grouping in assignment}
    return {"objective": dataclasses.asdict(objective), "steps": steps, "diagnostics": diagnostics,
            "diverged_at": outcome.diverged_at, "reason": outcome.reason, "scores": final_scores}


def measure_bias(target_dir, retain_dir, config: BiasConfig, out) -> dict:
    """Run the measurement (see the module docstring) and write ``out/results.json``; returns the document.

    Args:
        target_dir: the fine-tuned target model folder (``save_pretrained`` layout, with its tokenizer).
        retain_dir: the retain model folder (forget quality), or None to leave forget quality NaN.
        config: a :class:`BiasConfig`.
        out: output folder (``results.json`` and a temporary ``work/`` for the checkpoints).
    """
    if not isinstance(config, BiasConfig):
        raise TypeError(f"config must be a BiasConfig, got {type(config).__name__}")
    for name, path in (("target_dir", target_dir), ("retain_dir", retain_dir)):
        if path is not None and not os.path.isfile(os.path.join(os.fspath(path), "config.json")):
            raise ValueError(f"{name} {os.fspath(path)!r} is not a model folder (no config.json); pass e.g. "
                             f"RUN/models/{'target' if name == 'target_dir' else 'retain'} of a TOFU protocol run")
    with torch_threads(config.num_threads):  # scoring and diagnostics too, not only the unlearning steps
        return _measure(target_dir, retain_dir, config, out)


def _measure(target_dir, retain_dir, config: BiasConfig, out) -> dict:
    items = load_split(f"{config.split}_perturbed")[:config.limit_forget]
    target, tokenizer = _load(target_dir)
    ref_logps, num_tokens = answer_logps(target, tokenizer, [i.question for i in items], [i.answer for i in items],
                                         config.eval_batch_size)  # (N,), (N,)
    assignment = forget_groups(ref_logps, num_tokens, config.num_groups)
    scores = {"target": item_scores(target, tokenizer, items, config.eval_batch_size)}
    del target
    retain_ratios = None
    if retain_dir is not None:
        retain_model, retain_tokenizer = _load(retain_dir)
        scores["retain"] = item_scores(retain_model, retain_tokenizer, items, config.eval_batch_size)
        retain_ratios = scores["retain"]["truth_ratio"]
        del retain_model
    methods = {}
    for method in config.methods:
        record = _unlearn_and_record(target_dir, method, items, tokenizer, assignment, num_tokens, ref_logps, config,
                                     os.path.join(os.fspath(out), "work", method.lower()))
        scores[method] = record.pop("scores")
        methods[method] = record
    if os.path.isdir(os.path.join(os.fspath(out), "work")) and not os.listdir(os.path.join(os.fspath(out), "work")):
        os.rmdir(os.path.join(os.fspath(out), "work"))
    after = {model: {grouping: group_metrics(s, ids, retain_ratios, config.bootstrap_resamples, config.seed)
                     for grouping, ids in assignment.items()} for model, s in scores.items()}
    groups = {grouping: {"names": list(group_names(grouping, config.num_groups)), "assignment": ids.tolist(),
                         "mean_num_tokens": [float(num_tokens[ids == g].mean()) for g in range(config.num_groups)],
                         "mean_logp_per_token": [float((ref_logps / num_tokens)[ids == g].mean())
                                                 for g in range(config.num_groups)]}
              for grouping, ids in assignment.items()}
    intervals = (f"*_interval: 95% percentile bootstrap over each group's items ({config.bootstrap_resamples} "
                 f"resamples per group, seeded by (seed, group); groups fixed); power shares from the Gram matrix "
                 f"of the per-item gradients (llm.tofu.bias_intervals); forget quality has none")
    document = metadata_block(config, target_dir=os.fspath(target_dir),
                              retain_dir=None if retain_dir is None else os.fspath(retain_dir), num_items=len(items),
                              groups=groups, methods=methods, after=after, intervals=intervals)
    atomic_write_json(os.path.join(os.fspath(out), "results.json"), document)
    return document


def build_parser() -> argparse.ArgumentParser:
    d = BiasConfig()
    parser = argparse.ArgumentParser(prog="python -m llm.tofu.bias", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a TOFU protocol run folder: uses RUN/models/{target,retain}, its split, "
                                      "and writes RUN/bias/results.json")
    parser.add_argument("--target", help="target model folder (instead of --run)")
    parser.add_argument("--retain", help="retain model folder (forget quality; optional with --target)")
    parser.add_argument("--out", help="output folder (default RUN/bias)")
    parser.add_argument("--split", choices=FORGET_SPLITS, help=f"forget split (default: the run's, else {d.split})")
    parser.add_argument("--methods", nargs="+", default=list(d.methods))
    for name in ("steps", "record_every", "batch_size", "num_groups", "limit_forget", "max_items", "eval_batch_size",
                 "seed", "num_threads", "bootstrap_resamples"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--gram-max-gb", type=float, default=d.gram_max_gb,
                        help="per-item gradients held at once for the power-share intervals (default "
                             f"{d.gram_max_gb:g}; more memory, fewer passes over the items)")
    parser.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        target, retain, out, split = _paths(arguments)
        config = BiasConfig(split=split, methods=tuple(arguments.methods), steps=arguments.steps,
                            record_every=arguments.record_every, batch_size=arguments.batch_size,
                            learning_rate=arguments.learning_rate, num_groups=arguments.num_groups,
                            limit_forget=arguments.limit_forget, max_items=arguments.max_items,
                            bootstrap_resamples=arguments.bootstrap_resamples, gram_max_gb=arguments.gram_max_gb,
                            eval_batch_size=arguments.eval_batch_size, seed=arguments.seed, device=arguments.device,
                            num_threads=arguments.num_threads, progress=not arguments.no_progress)
        measure_bias(target, retain, config, out)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[llm.tofu.bias] wrote {os.path.join(out, 'results.json')}")
    return 0


def _paths(arguments) -> tuple[str, str | None, str, str]:
    """(target, retain, out, split) from ``--run`` or ``--target/--retain/--out``."""
    if arguments.run is not None:
        run = arguments.run
        saved = os.path.join(run, "config.json")
        split = arguments.split or (read_json(saved).get("split") if os.path.isfile(saved) else None) or "forget10"
        return (arguments.target or os.path.join(run, "models", "target"),
                arguments.retain or os.path.join(run, "models", "retain"), arguments.out or os.path.join(run, "bias"),
                split)
    if arguments.target is None or arguments.out is None:
        raise ValueError("give --run RUN (a TOFU protocol run folder) or both --target DIR and --out DIR")
    return arguments.target, arguments.retain, arguments.out, arguments.split or BiasConfig.split


if __name__ == "__main__":
    sys.exit(main())
