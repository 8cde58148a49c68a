"""One model's TOFU evaluation: per-set probability, ROUGE-L and truth ratio, model utility; forget quality.

The four evaluation sets and what each metric compares (:mod:`llm.tofu.metrics` has the formulas):

    set            file                      probability          truth-ratio reference   TR aggregate
    forget         forgetXX_perturbed        P(answer)            paraphrased answer       mean(min(TR, 1/TR))
    retain         retain_perturbed          P(answer)            paraphrased answer       mean(max(0, 1 - TR))
    real_authors   real_authors_perturbed    normalised P(true)   true answer              mean(max(0, 1 - TR))
    world_facts    world_facts_perturbed     normalised P(true)   true answer              mean(max(0, 1 - TR))

ROUGE-L recall is of the greedy answer against the true answer on every set. Model utility is the
harmonic mean of the 9 numbers on retain, real_authors and world_facts; forget quality compares the
forget-set truth ratios (kept per item in the result) with the retain model's. :func:`membership_scores`
gives the per-item membership-inference scores of :mod:`llm.mia` (forget items against holdout items).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from llm import mia

from . import metrics
from .data import TofuItem, load_split
from .scoring import answer_logps, answer_token_statistics, generate_answers, perturbed_logps

__all__ = ["EVAL_SETS", "FORGET_SPLITS", "eval_set_files", "load_eval_sets", "evaluate_set", "evaluate_model",
           "forget_quality", "membership_scores"]

FORGET_SPLITS = ("forget01", "forget05", "forget10")
EVAL_SETS = ("forget", "retain", "real_authors", "world_facts")


def eval_set_files(forget_split: str) -> dict[str, str]:
    """Evaluation set -> split file, e.g. ``{"forget": "forget10_perturbed", "retain": "retain_perturbed", ...}``."""
    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"unknown forget split {forget_split!r}; choose one of {', '.join(FORGET_SPLITS)}")
    return {"forget": f"{forget_split}_perturbed", "retain": "retain_perturbed",
            "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}


def load_eval_sets(forget_split: str, limit: int | None = None, limit_forget: bool = False,
                   exclude_questions: Collection[str] = ()) -> dict[str, list[TofuItem]]:
    """The four evaluation sets; ``limit`` keeps the first N items of retain / real_authors / world_facts
    (and of forget when ``limit_forget``): the CPU smoke-run scale. Items of the sets other than forget
    whose question is in ``exclude_questions`` (the holdout authors' pairs) are dropped before the limit."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    excluded = frozenset(exclude_questions)
    sets = {}
    for name, split in eval_set_files(forget_split).items():
        items = [i for i in load_split(split) if name == "forget" or i.question not in excluded]
        cut = limit is not None and (name != "forget" or limit_forget)
        sets[name] = items[:limit] if cut else items
    return sets


def evaluate_set(model, tokenizer, items: Sequence[TofuItem], kind: str, max_new_tokens: int = 200,
                 batch_size: int = 16) -> dict:
    """Probability, ROUGE-L, truth ratio (aggregate and per item: ``probability_per_item``,
    ``rouge_l_per_item``, ``truth_ratios``) and the greedy answers of one set.

    ``kind`` is one of :data:`EVAL_SETS`: it picks the truth-ratio reference (paraphrased answer for
    forget/retain, true answer otherwise), the aggregate and the probability normalisation.
    """
    if kind not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {kind!r}; choose one of {', '.join(EVAL_SETS)}")
    questions = [item.question for item in items]
    answers = [item.answer for item in items]
    true_lp, true_n = answer_logps(model, tokenizer, questions, answers, batch_size)  # (N,), (N,)
    pert_lp, pert_n = perturbed_logps(model, tokenizer, questions, [i.perturbed_answers for i in items],
                                      batch_size)  # (N, K), (N, K)
    if kind in ("forget", "retain"):
        ref_lp, ref_n = answer_logps(model, tokenizer, questions, [i.paraphrased_answer for i in items], batch_size)
        probability = metrics.probability(true_lp, true_n)  # (N,)
    else:
        ref_lp, ref_n = true_lp, true_n
        probability = metrics.normalised_probability(true_lp, true_n, pert_lp, pert_n)  # (N,)
    ratios = metrics.truth_ratio(pert_lp, pert_n, ref_lp, ref_n)  # (N,)
    generations = generate_answers(model, tokenizer, questions, max_new_tokens, batch_size)
    rouge = metrics.rouge_l_recall(generations, answers)  # (N,)
    return {"num_items": len(items), "probability": float(probability.mean()), "rouge_l": float(rouge.mean()),
            "truth_ratio": metrics.truth_ratio_aggregate(ratios, forget=kind == "forget"),
            "truth_ratios": ratios.tolist(), "rouge_l_per_item": rouge.tolist(),
            "probability_per_item": probability.tolist(), "generations": generations}


def evaluate_model(model, tokenizer, forget_split: str = "forget10", limit: int | None = None,
                   max_new_tokens: int = 200, batch_size: int = 16,
                   sets: Mapping[str, Sequence[TofuItem]] | None = None, progress: bool = False) -> dict:
    """Every TOFU metric of one model except forget quality (which needs the retain model: :func:`forget_quality`).

    Args:
        model, tokenizer: a causal LM and its tokenizer (chat template used when present).
        forget_split: forget01 / forget05 / forget10 (picks the forget evaluation file).
        limit: first N items of retain / real_authors / world_facts (None = all).
        max_new_tokens: greedy generation length for ROUGE-L (the benchmark's default 200).
        batch_size: rows per scoring / generation batch.
        sets: the evaluation sets themselves (overrides ``forget_split`` / ``limit``).
        progress: a progress line per set.
    Returns:
        ``{"sets": {name: evaluate_set(...)}, "model_utility": float, "utility_components": {9 numbers}}``.
    """
    from llm.progress import progress_iter

    sets = load_eval_sets(forget_split, limit) if sets is None else sets
    missing = [name for name in EVAL_SETS if name not in sets]
    if missing:
        raise ValueError(f"evaluation needs the sets {', '.join(missing)}")
    per_set = {name: evaluate_set(model, tokenizer, sets[name], name, max_new_tokens, batch_size)
               for name in progress_iter(EVAL_SETS, len(EVAL_SETS), "evaluate", progress, unit="set")}
    return {"sets": per_set, "model_utility": metrics.model_utility(per_set),
            "utility_components": metrics.utility_components(per_set)}


def forget_quality(result: Mapping, retain_result: Mapping) -> float:
    """KS-test p-value between the forget truth ratios of ``result`` and of the retain model's ``retain_result``."""
    return metrics.forget_quality(np.asarray(result["sets"]["forget"]["truth_ratios"]),
                                  np.asarray(retain_result["sets"]["forget"]["truth_ratios"]))


def membership_scores(model, tokenizer, items: Sequence[TofuItem], batch_size: int = 16,
                      k: float = mia.MIN_K_FRACTION, convention: str = "open-unlearning") -> dict[str, list[float]]:
    """Per-item scores of every attack of :mod:`llm.mia` (higher = more likely a member) on the items' answers.

    Returns ``{"loss": [N floats], "zlib": [...], "min_k": [...], "min_k_plus_plus": [...]}``; the ZLib
    denominator is the compressed answer text; ``convention`` is Min-K's (:data:`llm.mia.MIN_K_CONVENTIONS`:
    by default open-unlearning's, without the EOS token and with the variance clamped at 1e-6).
    """
    answers = [item.answer for item in items]
    stats = answer_token_statistics(model, tokenizer, [item.question for item in items], answers, batch_size)
    scores = mia.attack_scores(stats["token_logps"], stats["mu"], stats["sigma"], stats["mask"], answers, k,
                               convention)
    return {name: values.tolist() for name, values in scores.items()}
