"""TOFU splits shipped as package data: load, validate, and type every item.

Each split is a JSON Lines file (one object per line) in ``llm/tofu/data/`` (MIT; see LICENSE.md there).
Three kinds of file, by the fields each line must carry (all strings unless noted):

    qa          question, answer                                         full, forgetXX, retainYY
    perturbed   question, answer, paraphrased_question,
                paraphrased_answer, perturbed_answer (non-empty list)   forgetXX_perturbed, retain_perturbed
    options     question, answer (+ option1..option4, ignored)           real_authors, world_facts
    facts       question, answer, perturbed_answer (non-empty list)     real_authors_perturbed, world_facts_perturbed

Extra fields are ignored. A malformed line raises ``ValueError`` naming the file, the line and the field.

Authors: ``full`` is 200 fictitious authors x 20 QA pairs, in order (author a = items 20a .. 20a + 19).
forget01 / forget05 / forget10 are the last 2 / 10 / 20 authors, retain99 / 95 / 90 the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DATA_DIR", "SPLITS", "SPLIT_KINDS", "NUM_AUTHORS", "ITEMS_PER_AUTHOR", "FORGET_AUTHORS", "TofuItem",
           "load_split", "split_path", "author_items"]

DATA_DIR = Path(__file__).resolve().parent / "data"

_QA = ("question", "answer")
_PERTURBED = ("question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer")
_FACTS = ("question", "answer", "perturbed_answer")

# split name -> required fields (a plain dict registry; the file is f"{name}.json").
SPLIT_KINDS: dict[str, tuple[str, ...]] = {
    "full": _QA,
    "forget01": _QA, "forget05": _QA, "forget10": _QA,
    "retain90": _QA, "retain95": _QA, "retain99": _QA,
    "forget01_perturbed": _PERTURBED, "forget05_perturbed": _PERTURBED, "forget10_perturbed": _PERTURBED,
    "retain_perturbed": _PERTURBED,
    "real_authors": _QA, "world_facts": _QA,
    "real_authors_perturbed": _FACTS, "world_facts_perturbed": _FACTS,
}
SPLITS: tuple[str, ...] = tuple(SPLIT_KINDS)
NUM_AUTHORS, ITEMS_PER_AUTHOR = 200, 20
FORGET_AUTHORS = {"forget01": 2, "forget05": 10, "forget10": 20}  # the last N authors of ``full``


@dataclass(frozen=True)
class TofuItem:
    """One TOFU question with its answers. Fields a split does not carry are ``None``.

    ``perturbed_answers`` are the wrong answers of the truth ratio (a tuple, k >= 1 of them).
    """

    question: str
    answer: str
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] | None = None


def split_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The JSON Lines file of split ``name`` (in the package data unless ``data_dir`` is given)."""
    if name not in SPLIT_KINDS:
        raise ValueError(f"unknown TOFU split {name!r}; choose one of {', '.join(SPLITS)}")
    return Path(DATA_DIR if data_dir is None else data_dir) / f"{name}.json"


def _check_field(record: dict, field: str, where: str):
    """The value of ``field``, type-checked: a non-empty list of strings for perturbed_answer, else a string."""
    if field not in record:
        raise ValueError(f"{where}: missing field {field!r}")
    value = record[field]
    if field == "perturbed_answer":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where}: field 'perturbed_answer' must be a non-empty list of strings, got {value!r}")
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: field 'perturbed_answer' holds a non-string entry: {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _parse_line(line: str, fields: tuple[str, ...], where: str) -> TofuItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    values = {field: _check_field(record, field, where) for field in fields}
    if "perturbed_answer" in values:
        values["perturbed_answers"] = values.pop("perturbed_answer")
    return TofuItem(**values)


def load_split(name: str, data_dir: str | os.PathLike | None = None) -> list[TofuItem]:
    """All items of TOFU split ``name`` (one of :data:`SPLITS`), validated, in file order.

    Args:
        name: the split, e.g. ``"forget10"`` or ``"retain_perturbed"``.
        data_dir: a folder holding ``{name}.json``; default the copy shipped in the package.
    Raises:
        ValueError: unknown split, an empty file, or a malformed line (message: file, line number, field).
        FileNotFoundError: the file is missing.
    """
    path = split_path(name, data_dir)
    fields = SPLIT_KINDS[name]
    items = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                items.append(_parse_line(line, fields, f"{path}, line {number}"))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def author_items(authors, data_dir: str | os.PathLike | None = None) -> list[TofuItem]:
    """The 20 QA pairs of each author index in ``authors`` (0..199), from ``full``, in the given order."""
    full = load_split("full", data_dir)
    if len(full) != NUM_AUTHORS * ITEMS_PER_AUTHOR:
        raise ValueError(f"full has {len(full)} items, not {NUM_AUTHORS} authors x {ITEMS_PER_AUTHOR}")
    bad = [a for a in authors if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < NUM_AUTHORS]
    if bad:
        raise ValueError(f"author indices must be ints in [0, {NUM_AUTHORS}), got {bad}")
    return [item for a in authors for item in full[a * ITEMS_PER_AUTHOR:(a + 1) * ITEMS_PER_AUTHOR]]
