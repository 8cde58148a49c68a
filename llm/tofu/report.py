"""The protocol's results: forget quality and model utility with their components, per model, as JSON and Markdown.

``results.json`` (strict JSON: NaN/inf written as null and listed under ``non_finite``) holds the
package name and version, the full protocol config, each stage's wall time and outcome, and per model
(target, retain, then each method) the headline numbers, the 9 utility components and the forget-set
numbers, SeUL's sensitive memorisation accuracy on the forget set (``forget/s_ma``, on the tokens
chosen at the target model; :mod:`llm.tofu.sensitive`; null for eval records made before it existed),
the membership-inference AUCs (``mia_auc/<attack>``: forget pairs as members against the
holdout authors' pairs) and PrivLeak against the retain model (``privleak/<attack>``, percent,
MUSE's sign: negative = under-unlearned; the retain model itself scores 0); ``holdout`` says which
authors were held out; ``relearning`` holds, per method and for the controls ``"target"`` and
``"retain"`` (the retain model learning the forget pairs fresh), the relearning attack's curves
``{"steps", "forget_probability", "forget_rouge_l", "forget_truth_ratio", "forget_quality"}`` (one entry
per step count) with their bootstrap intervals, recoveries since step 0 and recoveries beyond the retain
model's (:func:`llm.tofu.relearn.relearning_intervals`), and ``relearning_setup`` how they were made.
``results.md`` has the same numbers as tables for reading. Forget quality is the KS-test p-value of the
model's forget truth ratios against the retain model's (the retain model itself scores 1).
"""

from __future__ import annotations

import importlib.metadata
import math

from llm.mia import ATTACKS, attack_aucs, privleak
from markovsim.results import atomic_output, atomic_write_json

from .evaluate import EVAL_SETS, forget_quality
from .metrics import BOOTSTRAP_RESAMPLES
from .relearn import FRESH, PER_PAIR_METRICS, relearning_intervals
from .result_intervals import interval_or_none, paired_differences, resampled_statistics

__all__ = ["PACKAGE", "package_version", "model_row", "membership_row", "results_document", "markdown_table",
           "write_report"]

PACKAGE = "simnpo-companion"
_COLUMNS = [("forget quality", "forget_quality"), ("model utility", "model_utility")] + [
    (f"{s} {label}", f"{s}/{metric}") for s in EVAL_SETS
    for label, metric in (("prob", "probability"), ("ROUGE-L", "rouge_l"), ("TR", "truth_ratio"))] + [
    ("forget S-MA", "forget/s_ma")]
_INTERVALS = (f"models.<model>.intervals: 95% percentile bootstrap over the evaluation items ({BOOTSTRAP_RESAMPLES} "
              f"resamples per set, the same for every model, so gap closed and PrivLeak are paired; "
              f"llm.tofu.result_intervals); differences.'<b> - <a>': each later method minus each earlier one, with "
              f"the interval of the paired resamples; forget quality (a KS p-value) has none")
_INTERVAL_COLUMNS = [("forget gap closed", "forget_gap_closed"), ("forget prob", "forget/probability"),
                     ("forget ROUGE-L", "forget/rouge_l"), ("forget TR", "forget/truth_ratio"),
                     ("model utility", "model_utility"), ("retain prob", "retain/probability"),
                     ("retain ROUGE-L", "retain/rouge_l"), ("LOSS AUC", "mia_auc/loss"),
                     ("LOSS PrivLeak %", "privleak/loss")]
_DIFFERENCE_COLUMNS = [("forget gap closed", "forget_gap_closed"), ("forget ROUGE-L", "forget/rouge_l"),
                       ("forget TR", "forget/truth_ratio"), ("model utility", "model_utility"),
                       ("real_authors ROUGE-L", "real_authors/rouge_l"), ("world_facts ROUGE-L", "world_facts/rouge_l"),
                       ("LOSS AUC", "mia_auc/loss")]
_ATTACK_LABELS = {"loss": "LOSS", "zlib": "ZLib", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++"}


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def model_row(result: dict, retain_result: dict) -> dict:
    """Headline numbers and components of one model, flat: ``{"forget_quality": ..., "forget/rouge_l": ...}``."""
    row = {"forget_quality": forget_quality(result, retain_result), "model_utility": result["model_utility"]}
    for name in EVAL_SETS:
        for metric in ("probability", "rouge_l", "truth_ratio"):
            row[f"{name}/{metric}"] = result["sets"][name][metric]
    return row


def membership_row(scores: dict, retain_scores: dict) -> dict:
    """``{"mia_auc/<attack>": AUC, "privleak/<attack>": percent}`` of one model's eval-stage MIA scores.

    ``scores`` / ``retain_scores``: ``{"forget": {attack: [...]}, "holdout": {attack: [...]}}`` of the
    model and of the retain model. PrivLeak (:func:`llm.mia.privleak`) is None (n/a) where the retain model's
    AUC is 1.
    """
    aucs, retain_aucs = (attack_aucs(s["forget"], s["holdout"]) for s in (scores, retain_scores))
    row = {f"mia_auc/{name}": aucs[name] for name in ATTACKS}
    for name in ATTACKS:
        row[f"privleak/{name}"] = privleak(aucs[name], retain_aucs[name]) if retain_aucs[name] < 1 else None
    return row


def _relearning(protocol) -> tuple[dict, dict]:
    """(``{model: curve with intervals}``: "target", "retain", then each method by name; the setup) from the
    relearn stages (empty when there are none)."""
    c = protocol.config
    names = {"target": "target", "retain": "retain"} | dict(zip(protocol.model_names()[2:], c.methods))
    curves = {names[name]: protocol.record(f"relearn-{name}")["relearning"] for name in protocol.model_names()
              if f"relearn-{name}" in protocol.stages()}
    if not curves:
        return {}, {}
    train_rows, eval_rows = protocol.relearn_rows()
    setup = {"relearn_pairs": f"the first {c.relearn_items_per_author} of the 20 pairs of every forget author",
             "num_relearn_pairs": len(train_rows), "num_eval_pairs": len(eval_rows),
             "measured_on": "the other forget pairs (forget quality against the retain model on the same pairs)",
             "steps": list(c.relearn_steps), "batch_size": min(c.relearn_batch_size, len(train_rows)),
             "learning_rate": c.relearn_lr, "optimizer": "adamw, constant learning rate, weight decay 0.01",
             "controls": {"target": "the target model (fine-tuned on the forget pairs)",
                          FRESH: "the retain model (never saw the forget authors): learning the pairs fresh"},
             "intervals": f"95% percentile bootstrap over the {len(eval_rows)} evaluation pairs "
                          f"({BOOTSTRAP_RESAMPLES} resamples, seed 0), paired (per-pair differences resampled) for "
                          f"recovery = m(s) - m(0) and beyond_fresh = recovery - the retain model's recovery; "
                          f"truth ratio per pair = min(TR, 1/TR); forget quality (a KS p-value) has none"}
    return relearning_intervals(curves), setup


def results_document(protocol) -> dict:
    """The results.json document of a protocol whose eval (and relearn) stages are done."""
    records = {name: protocol.record(f"eval-{name}") for name in protocol.model_names()}
    evaluations = {name: record["result"] for name, record in records.items()}
    models = {name: model_row(result, evaluations["retain"])
              | {"forget/s_ma": records[name].get("sensitive", {}).get("s_ma")}
              | membership_row(records[name]["mia"], records["retain"]["mia"])
              for name, result in evaluations.items()}
    statistics = resampled_statistics(evaluations, {name: record["mia"] for name, record in records.items()})
    for name, row in models.items():
        row |= {"forget_gap_closed": float(statistics[name]["forget_gap_closed"][0]),
                "intervals": {key: interval_or_none(estimates[1:]) for key, estimates in statistics[name].items()}}
    stages = {}
    for stage in protocol.stages()[:-1]:
        record = protocol.record(stage)
        stages[stage] = {k: v for k, v in record.items()
                         if k not in ("stage", "result", "mia", "relearning", "sensitive")}
    methods = dict(zip([n for n in protocol.model_names()[2:]], protocol.config.methods))
    slugs = list(methods)
    differences = paired_differences(statistics, [(a, b) for i, a in enumerate(slugs) for b in slugs[i + 1:]],
                                     [key for _, key in _DIFFERENCE_COLUMNS])
    differences = {f"{methods[b]} - {methods[a]}": differences[f"{b} - {a}"]
                   for i, a in enumerate(slugs) for b in slugs[i + 1:]}
    relearning, setup = _relearning(protocol)
    return {"package": {"name": PACKAGE, "version": package_version()}, "config": protocol.config.state(),
            "models": {name: {"method": methods.get(name), **row} for name, row in models.items()},
            "forget_rouge_l_before_unlearning": evaluations["target"]["sets"]["forget"]["rouge_l"],
            "intervals": _INTERVALS, "differences": differences,
            "holdout": protocol.holdout_record(), "relearning": relearning, "relearning_setup": setup,
            "stages": stages}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _label(document: dict, name: str, row: dict) -> str:
    label = row["method"] or name
    diverged = document["stages"].get(f"unlearn-{name}", {}).get("diverged_at")
    return label + (f" (stopped at step {diverged})" if diverged is not None else "")


def _membership_table(document: dict) -> list[str]:
    holdout = document["holdout"]
    header = ["model"] + [f"{_ATTACK_LABELS[a]} AUC" for a in ATTACKS] + [
        f"{_ATTACK_LABELS[a]} PrivLeak % (<0: under)" for a in ATTACKS]
    rows = [[_label(document, name, row)] + [_cell(row[f"{kind}/{a}"]) for kind in ("mia_auc", "privleak")
                                              for a in ATTACKS] for name, row in document["models"].items()]
    return [f"Membership inference: AUC of the forget pairs (members) against the pairs of the held-out authors "
            f"{holdout['authors'][0]}-{holdout['authors'][-1]} (non-members; 0.5 = indistinguishable); PrivLeak = "
            f"(AUC of the retain model - AUC) / (1 - AUC of the retain model) x 100, MUSE's sign convention: 0 = as "
            f"private as the retain model, negative = under-unlearned (about -100: still memorised), positive = "
            f"over-unlearned. Min-K% / Min-K%++ leave out the EOS token (open-unlearning's convention).",
            ""] + _table(header, rows) + [""]


def _with_interval(value, interval) -> str:
    return _cell(value) if interval is None else f"{_cell(value)} [{_cell(interval[0])}, {_cell(interval[1])}]"


def _difference_table(document: dict) -> list[str]:
    """Each pair of methods: later minus earlier, with the paired interval (none when the run has one method)."""
    rows = [[pair] + [_with_interval(d[key]["difference"], d[key]["interval"]) for _, key in _DIFFERENCE_COLUMNS]
            for pair, d in document.get("differences", {}).items()]
    if not rows:
        return []
    return ["Paired differences between methods (the same item resamples for both; an interval that excludes 0 "
            "separates the two methods at this run's items, one seed).", ""] + _table(
        ["methods"] + [label for label, _ in _DIFFERENCE_COLUMNS], rows) + [""]


def _interval_table(document: dict) -> list[str]:
    """The headline numbers of each model with their bootstrap intervals (models without intervals: none)."""
    rows = [[_label(document, name, row)] + [_with_interval(row[key], row["intervals"][key])
                                             for _, key in _INTERVAL_COLUMNS]
            for name, row in document["models"].items() if "intervals" in row]
    if not rows:
        return []
    return ["With 95% bootstrap intervals over the items (the same resamples for every model; forget gap closed "
            "= (P_target - P) / (P_target - P_retain) of the mean forget probability: 0 = the target, 1 = the "
            "retain model; PrivLeak < 0: under-unlearned).", ""] + _table(
        ["model"] + [label for label, _ in _INTERVAL_COLUMNS], rows) + [""]


def _relearn_label(name: str) -> str:
    return f"{name} (learned fresh)" if name == FRESH else name


def _relearning_table(document: dict) -> list[str]:
    """The levels with intervals per model and step count, then the recoveries since step 0 beside the retain
    model's (learned fresh)."""
    if not document["relearning"]:
        return []
    setup, curves = document["relearning_setup"], document["relearning"]
    levels = [[_relearn_label(name), str(steps)]
              + [_with_interval(curve[m][i], curve["interval"][m][i]) for m in PER_PAIR_METRICS]
              + [_cell(curve["forget_quality"][i])]
              for name, curve in curves.items() for i, steps in enumerate(curve["steps"])]
    lines = [f"Relearning attack: each unlearned model, and as controls the target and the retain model (which "
             f"never saw the forget authors: it learns them fresh), fine-tuned on {setup['num_relearn_pairs']} "
             f"forget pairs ({setup['relearn_pairs']}; batch {setup['batch_size']}, lr {setup['learning_rate']:g}), "
             f"measured on the other {setup['num_eval_pairs']}; [95% bootstrap interval over those pairs]; TR = "
             f"mean min(TR, 1/TR).", ""]
    lines += _table(["model", "relearn steps", "forget prob", "forget ROUGE-L", "forget TR", "forget quality"],
                    levels) + [""]
    recovery = [[_relearn_label(name), str(steps)]
                + [cell for m in PER_PAIR_METRICS for cell in (
                    _with_interval(curve["recovery"][m][i], curve["recovery_interval"][m][i]),
                    _with_interval(curve["beyond_fresh"][m][i], curve["beyond_fresh_interval"][m][i])
                    if "beyond_fresh" in curve else "-")]
                for name, curve in curves.items() if "recovery" in curve
                for i, steps in enumerate(curve["steps"]) if steps != 0]
    if recovery:
        lines += ["Recovery since step 0 (the model's own gain; paired over the evaluation pairs) and beyond fresh "
                  "(that gain minus the retain model's on the same pairs: above 0, the model regains more than a "
                  "model that never knew the facts).", ""]
        lines += _table(["model", "relearn steps"] + [f"{label} {kind}" for label in ("prob", "ROUGE-L", "TR")
                                                      for kind in ("recovery", "beyond fresh")], recovery) + [""]
    return lines


def markdown_table(document: dict) -> str:
    """The results as Markdown: per model forget quality, model utility and the components; the
    membership-inference AUCs and PrivLeak; the relearning curves per model with the controls (when run)."""
    config = document["config"]
    rows = [[_label(document, name, row)] + [_cell(row[key]) for _, key in _COLUMNS]
            for name, row in document["models"].items()]
    lines = [f"TOFU {config['split']} on {config['model']} (limit {config['limit']}, LoRA {config['lora']}); "
             f"{document['package']['name']} {document['package']['version']}", ""]
    lines += _table(["model"] + [label for label, _ in _COLUMNS], rows)
    lines += ["", f"Forget-set ROUGE-L of the target before unlearning: "
                  f"{_cell(document['forget_rouge_l_before_unlearning'])}", ""]
    return "\n".join(lines + _interval_table(document) + _difference_table(document) + _membership_table(document)
                     + _relearning_table(document))


def write_report(protocol) -> dict:
    """Write results.json and results.md into the run folder; returns the report stage's record."""
    document = results_document(protocol)
    atomic_write_json(protocol.out / "results.json", document)
    with atomic_output(protocol.out / "results.md") as temporary, open(temporary, "w") as handle:
        handle.write(markdown_table(document))
    return {"results": ["results.json", "results.md"]}
