"""The relearning attack on an unlearned TOFU model: fine-tune it on a few forget pairs, re-measure the rest.

Unlearning that a few fine-tuning steps undo has hidden the knowledge rather than removed it (Hu et
al. 2024, "Jogging the memory of unlearned LLMs"). The attack here, per unlearned model:

    split     each forget author's first ``items_per_author`` QA pairs (of 20) are the relearning
              pairs; the other 20 - items_per_author pairs of every author are the evaluation pairs
              (the attack relearns a few facts about an author and we measure whether the *other*
              facts return)
    relearn   for each step count s in ``step_counts`` (e.g. 0, 10, 25, 50): a fresh copy of the
              unlearned model fine-tuned s steps on the relearning pairs with the nll loss
              (:func:`llm.tofu.finetune.finetune`: AdamW, constant learning rate, no warm-up, the
              seeded batch order of ``llm.data.batch_indices``), so the model after s steps is
              exactly the first s steps of one longer run; s = 0 is the unlearned model itself
    measure   on the evaluation pairs (the forget evaluation set's rows, paraphrases and perturbed
              answers included): forget probability, ROUGE-L, truth ratio (the forget aggregate) and
              forget quality = KS p-value of their truth ratios against the retain model's on the
              same pairs; the first three also per pair (their means), for the intervals
    controls  the same runs from the retain model, which never saw the forget authors (how far the
              relearning pairs take a model that learns them *fresh*), and from the target (which
              was fine-tuned on them)

Intervals (:func:`relearning_intervals`; 95% percentile bootstrap over the evaluation pairs,
:func:`llm.tofu.metrics.bootstrap_interval`, paired: per-pair differences are resampled), per model,
step count s and per-pair metric m (probability, ROUGE-L, min(TR, 1/TR)):

    level           m(s)                                          mean over pairs, with its interval
    recovery        m(s) - m(0)                                   per pair, then the mean
    beyond fresh    (m(s) - m(0)) - (m_retain(s) - m_retain(0))   per pair, then the mean; every model
                                                                  but the retain model itself

An unlearned model whose recovery exceeds the retain model's (beyond fresh > 0, the interval above 0)
regains more than a model that never knew the facts: it hid them. Forget quality, a KS p-value over the
whole set, has no per-pair form and no interval.

Each step count's numbers are written to ``work_dir/steps-<s>.json`` when done, so a killed stage
resumes at the next step count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from llm.config import TrainConfig
from markovsim.results import atomic_write_json, read_json

from . import metrics
from .data import ITEMS_PER_AUTHOR, TofuItem
from .evaluate import evaluate_set

__all__ = ["RELEARN_METRICS", "PER_PAIR_METRICS", "FRESH", "split_forget", "check_step_counts", "relearn_config",
           "measure", "relearning_curve", "relearning_intervals"]

RELEARN_METRICS = ("forget_probability", "forget_rouge_l", "forget_truth_ratio", "forget_quality")
PER_PAIR_METRICS = RELEARN_METRICS[:3]  # means over the evaluation pairs (forget quality is not)
FRESH = "retain"  # the control that learns the forget pairs fresh


def split_forget(num_items: int, items_per_author: int) -> tuple[list[int], list[int]]:
    """(relearning rows, evaluation rows) of a forget set of whole authors (20 consecutive rows each).

    Relearning: rows 20a .. 20a + items_per_author - 1 of every author a; evaluation: the others.
    """
    if num_items <= 0 or num_items % ITEMS_PER_AUTHOR:
        raise ValueError(f"the forget set must hold whole authors ({ITEMS_PER_AUTHOR} pairs each), got {num_items}")
    if isinstance(items_per_author, bool) or not isinstance(items_per_author, int) \
            or not 0 < items_per_author < ITEMS_PER_AUTHOR:
        raise ValueError(f"relearn_items_per_author must be an int in [1, {ITEMS_PER_AUTHOR - 1}], "
                         f"got {items_per_author!r}")
    train = [row for row in range(num_items) if row % ITEMS_PER_AUTHOR < items_per_author]
    return train, [row for row in range(num_items) if row % ITEMS_PER_AUTHOR >= items_per_author]


def check_step_counts(step_counts) -> tuple[int, ...]:
    """``step_counts`` as a tuple of strictly increasing ints >= 0 (may be empty: no relearning)."""
    counts = tuple(step_counts)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in counts) \
            or any(b <= a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"relearn_steps must be strictly increasing ints >= 0, got {list(counts)}")
    return counts


def relearn_config(steps: int, batch_size: int, learning_rate: float, **runtime) -> TrainConfig:
    """The ``TrainConfig`` of one relearning run: ``steps`` AdamW steps at a constant ``learning_rate``.

    Weight decay 0.01 as fine-tuning; ``runtime``: seed, device, num_threads, progress, eval_batch_size.
    """
    return TrainConfig(learning_rate=learning_rate, steps=steps, batch_size=batch_size, weight_decay=0.01,
                       schedule="constant", warmup_steps=0, divergence_logp_per_token=None,
                       track_forget_weights=False, track_power_share=False, **runtime)


def point_from_result(result: dict, retain_truth_ratios) -> dict:
    """The four forget numbers of :data:`RELEARN_METRICS` and ``per_pair`` from a forget-set result of
    :func:`llm.tofu.evaluate.evaluate_set` (forget quality against ``retain_truth_ratios``, (n_eval,))."""
    ratios = np.asarray(result["truth_ratios"])  # (n_eval,)
    quality = metrics.forget_quality(ratios, np.asarray(retain_truth_ratios))
    per_pair = {"forget_probability": result["probability_per_item"], "forget_rouge_l": result["rouge_l_per_item"],
                "forget_truth_ratio": metrics.forget_truth_ratio_scores(ratios).tolist()}
    return {"forget_probability": result["probability"], "forget_rouge_l": result["rouge_l"],
            "forget_truth_ratio": result["truth_ratio"], "forget_quality": quality, "per_pair": per_pair}


def subset_result(result: dict, rows: Sequence[int]) -> dict:
    """A forget-set result of :func:`llm.tofu.evaluate.evaluate_set` restricted to ``rows``: the per-item values
    of those rows and their aggregates (mean probability, mean ROUGE-L, mean min(TR, 1/TR)).

    Step 0 of the relearning attack is the unlearned model itself, already scored on every forget pair by
    its eval stage: its numbers on the evaluation pairs are these rows, with no second pass.
    """
    rows = list(rows)
    values = {key: np.asarray(result[key], dtype=np.float64)[rows]
              for key in ("probability_per_item", "rouge_l_per_item", "truth_ratios")}
    return {"probability": float(values["probability_per_item"].mean()),
            "rouge_l": float(values["rouge_l_per_item"].mean()),
            "truth_ratio": metrics.truth_ratio_aggregate(values["truth_ratios"], forget=True)} | {
        key: value.tolist() for key, value in values.items()}


def measure(model, tokenizer, eval_items: Sequence[TofuItem], retain_truth_ratios, max_new_tokens: int,
            batch_size: int) -> dict:
    """The four forget numbers of :data:`RELEARN_METRICS` on ``eval_items`` (forget quality vs the retain model),
    and ``per_pair``: the (n_eval,) values behind the first three (probability, ROUGE-L, min(TR, 1/TR))."""
    result = evaluate_set(model, tokenizer, eval_items, "forget", max_new_tokens, batch_size)
    return point_from_result(result, retain_truth_ratios)


def relearning_curve(load: Callable[[], tuple], train_items: Sequence[TofuItem], eval_items: Sequence[TofuItem],
                     retain_truth_ratios, step_counts: Sequence[int], make_config: Callable[[int], TrainConfig],
                     work_dir: str | os.PathLike, max_new_tokens: int, batch_size: int,
                     progress: bool = False, device: str = "auto", initial: dict | None = None) -> dict[str, list]:
    """Relearn and measure at every step count (see the module docstring); resumes from ``work_dir``.

    Args:
        load: returns a fresh (trainable model, tokenizer) of the unlearned model.
        train_items / eval_items: the relearning and evaluation pairs (:func:`split_forget`).
        retain_truth_ratios: the retain model's forget truth ratios on ``eval_items``, (n_eval,).
        step_counts: strictly increasing step counts; make_config(s): the TrainConfig of s steps.
        device: the run's device setting (picks the barrier's backend in a multi-process launch).
        initial: the step-0 point when it is known already (:func:`point_from_result` of the unlearned model's
            eval-stage result on ``eval_items``); otherwise step 0 is measured like the others.
    Returns:
        ``{"steps": [...], "forget_probability": [...], "forget_rouge_l": [...], "forget_truth_ratio": [...],
        "forget_quality": [...], "per_pair": {metric: [...]}}``, one entry per step count; ``per_pair``
        holds each step count's (n_eval,) values of :data:`PER_PAIR_METRICS` (None for a step count
        measured before they were kept).
    """
    from llm.progress import progress_iter

    from .finetune import finetune, is_main_process, wait_for_everyone

    if len(retain_truth_ratios) != len(eval_items):
        raise ValueError(f"{len(retain_truth_ratios)} retain truth ratios for {len(eval_items)} evaluation pairs")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    points = []
    for steps in progress_iter(check_step_counts(step_counts), len(step_counts), "relearn", progress, unit="run"):
        path = work / f"steps-{steps}.json"
        if steps == 0 and initial is not None:
            exists = path.is_file()
            wait_for_everyone(device)  # every process has looked before the main one writes: all take one branch
            if not exists:
                if is_main_process():
                    atomic_write_json(path, {"steps": 0} | initial)
                wait_for_everyone(device)
        elif not path.is_file():
            model, tokenizer = load()
            if steps > 0:
                finetune(model, tokenizer, train_items, make_config(steps), work / f"steps-{steps}",
                         description=f"relearn {steps} steps")
            point = {"steps": steps} | measure(model, tokenizer, eval_items, retain_truth_ratios, max_new_tokens,
                                               batch_size)
            if is_main_process():  # one writer in a multi-process launch; the others read it after the barrier
                atomic_write_json(path, point)
            wait_for_everyone(device)
        points.append(read_json(path))
    return ({"steps": [p["steps"] for p in points]} | {name: [p[name] for p in points] for name in RELEARN_METRICS}
            | {"per_pair": {name: [p.get("per_pair", {}).get(name) for p in points] for name in PER_PAIR_METRICS}})


def relearning_intervals(curves: Mapping[str, dict], fresh: str = FRESH,
                         num_resamples: int = metrics.BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """Each curve of :func:`relearning_curve` (``{model: curve}``) with its intervals (module docstring).

    Per model: the curve without ``per_pair``, plus ``interval``, ``recovery``, ``recovery_interval`` and
    (every model but ``fresh``, when the ``fresh`` curve has the same step counts) ``beyond_fresh`` and
    ``beyond_fresh_interval``, each ``{metric: [one entry per step count]}`` over :data:`PER_PAIR_METRICS`;
    an interval is ``[low, high]``, or None where per-pair values are missing, said under ``missing``
    (as is a recovery without step count 0). Every interval resamples the same pairs (one seed).
    """
    counts = {}

    def interval(values):
        if values is None:
            return None
        if len(values) not in counts:
            counts[len(values)] = metrics.bootstrap_counts(len(values), num_resamples, seed)
        return list(metrics.bootstrap_interval(values, counts=counts[len(values)]))

    base = curves.get(fresh)
    return {name: _with_intervals(curve, None if name == fresh else base, interval) for name, curve in curves.items()}


def _with_intervals(curve: dict, base: dict | None, interval: Callable) -> dict:
    """One curve's summary (:func:`relearning_intervals`); ``base``: the fresh control's curve or None."""
    steps = curve["steps"]
    start = steps.index(0) if 0 in steps else None
    compare = base is not None and start is not None and base["steps"] == steps
    summary = {k: v for k, v in curve.items() if k != "per_pair"} | {"interval": {}}
    missing = {}
    if start is None:
        missing["recovery"] = "step count 0 (the model before relearning) was not measured"
    else:
        summary |= {"recovery": {}, "recovery_interval": {}} | (
            {"beyond_fresh": {}, "beyond_fresh_interval": {}} if compare else {})
    for metric in PER_PAIR_METRICS:
        pairs = _per_pair(curve, metric)
        summary["interval"][metric] = [interval(v) for v in pairs]
        if start is None:
            continue
        gains = [_minus(v, pairs[start]) for v in pairs]  # (n_eval,) per step count: recovery per pair
        summary["recovery"][metric] = [level - curve[metric][start] for level in curve[metric]]
        summary["recovery_interval"][metric] = [interval(g) for g in gains]
        if compare:
            fresh_pairs = _per_pair(base, metric)
            fresh_gains = [_minus(v, fresh_pairs[start]) for v in fresh_pairs]
            summary["beyond_fresh"][metric] = [gain - (level - base[metric][start]) for gain, level in
                                               zip(summary["recovery"][metric], base[metric])]
            summary["beyond_fresh_interval"][metric] = [interval(_minus(g, f)) for g, f in zip(gains, fresh_gains)]
    if any(v is None for metric in PER_PAIR_METRICS for v in _per_pair(curve, metric) + (
            _per_pair(base, metric) if compare else [])):
        missing["interval"] = ("no per-pair values for some step counts (measured before they were kept); remove "
                               "the stage's record and its work/relearn-<model>/steps-*.json to measure them again")
    if base is not None and not compare and start is not None:
        missing["beyond_fresh"] = "the retain model's relearning has other step counts"
    return summary | ({"missing": missing} if missing else {})


def _per_pair(curve: dict, metric: str) -> list[np.ndarray | None]:
    """(n_eval,) values per step count, None where not kept."""
    values = curve.get("per_pair", {}).get(metric) or [None] * len(curve["steps"])
    return [None if v is None else np.asarray(v, dtype=np.float64) for v in values]


def _minus(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return None if a is None or b is None else a - b
