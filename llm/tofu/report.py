"""The protocol's results: forget quality and model utility with their components, per model, as JSON and Markdown.

``results.json`` (strict JSON: NaN/inf written as null and listed under ``non_finite``) holds the
package name and version, the full protocol config, each stage's wall time and outcome, and per model
(target, retain, then each method) the headline numbers, the 9 utility components and the forget-set
numbers. ``results.md`` is the same table for reading. Forget quality is the KS-test p-value of the
model's forget truth ratios against the retain model's (the retain model itself scores 1).
"""

from __future__ import annotations

import importlib.metadata
import math

from markovsim.results import atomic_output, atomic_write_json

from .evaluate import EVAL_SETS, forget_quality

__all__ = ["PACKAGE", "package_version", "model_row", "results_document", "markdown_table", "write_report"]

PACKAGE = "simnpo-companion"
_COLUMNS = [("forget quality", "forget_quality"), ("model utility", "model_utility")] + [
    (f"{s} {label}", f"{s}/{metric}") for s in EVAL_SETS
    for label, metric in (("prob", "probability"), ("ROUGE-L", "rouge_l"), ("TR", "truth_ratio"))]


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


def results_document(protocol) -> dict:
    """The results.json document of a protocol whose eval stages are done."""
    evaluations = {name: protocol.record(f"eval-{name}")["result"] for name in protocol.model_names()}
    models = {name: model_row(result, evaluations["retain"]) for name, result in evaluations.items()}
    stages = {}
    for stage in protocol.stages()[:-1]:
        record = protocol.record(stage)
        stages[stage] = {k: v for k, v in record.items() if k not in ("stage", "result")}
    methods = dict(zip([n for n in protocol.model_names()[2:]], protocol.config.methods))
    return {"package": {"name": PACKAGE, "version": package_version()}, "config": protocol.config.state(),
            "models": {name: {"method": methods.get(name), **row} for name, row in models.items()},
            "forget_rouge_l_before_unlearning": evaluations["target"]["sets"]["forget"]["rouge_l"],
            "stages": stages}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"


def markdown_table(document: dict) -> str:
    """The results as a Markdown table: one row per model, forget quality, model utility, then the components."""
    config = document["config"]
    lines = [f"TOFU {config['split']} on {config['model']} (limit {config['limit']}, LoRA {config['lora']}); "
             f"{document['package']['name']} {document['package']['version']}", "",
             "| model | " + " | ".join(label for label, _ in _COLUMNS) + " |",
             "|---" * (len(_COLUMNS) + 1) + "|"]
    for name, row in document["models"].items():
        label = row["method"] or name
        diverged = document["stages"].get(f"unlearn-{name}", {}).get("diverged_at")
        if diverged is not None:
            label += f" (stopped at step {diverged})"
        lines.append(f"| {label} | " + " | ".join(_cell(row[key]) for _, key in _COLUMNS) + " |")
    lines += ["", f"Forget-set ROUGE-L of the target before unlearning: "
                  f"{_cell(document['forget_rouge_l_before_unlearning'])}", ""]
    return "\n".join(lines)


def write_report(protocol) -> dict:
    """Write results.json and results.md into the run folder; returns the report stage's record."""
    document = results_document(protocol)
    atomic_write_json(protocol.out / "results.json", document)
    with atomic_output(protocol.out / "results.md") as temporary, open(temporary, "w") as handle:
        handle.write(markdown_table(document))
    return {"results": ["results.json", "results.md"]}
