"""The SimNPO paper's own Fig. 5 numbers (``data/simnpo_official_fig5.json``) as reference data.

The official repository publishes the synthetic figure of each case as a vector PDF drawn from one
seed (42); the file holds, read from the PDF's path coordinates, the retain KL at which each curve
first reaches the retrained model's forget KL, the curves' start points, and the spread of the official
pipeline re-run over five seeds (case (a)). ``markov_tradeoff`` marks them in the figure and the table.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "simnpo_official_fig5.json")
CASE_LETTERS = {"paper_short_forget2": "a", "paper_unseen_forget2": "b"}  # scenario -> the figure's case
OFFICIAL_SOURCE = "paper-synthetic"  # the official figure's model


@lru_cache(maxsize=1)
def load() -> dict:
    """The reference document (provenance, ``reach`` rows, ``start_points``, ``official_rerun_ranges``)."""
    with open(PATH) as file:
        return json.load(file)


def reach(case: str, method: str, component: str) -> float | None:
    """The published (seed 42) retain KL at reach of ``method`` on ``component`` in case ``"a"`` / ``"b"``."""
    for row in load()["reach"]:
        if (row["case"], row["method"], row["component"]) == (case, method, component):
            return float(row["retain_kl_at_reach"])
    return None


def rerun_range(case: str, method: str, component: str) -> tuple[float, float] | None:
    """``(low, high)`` of the official pipeline's re-runs over seeds, where recorded (case (a) only)."""
    for row in load()["official_rerun_ranges"]["ranges"]:
        if (row["case"], row["method"], row["component"]) == (case, method, component):
            return float(row["low"]), float(row["high"])
    return None


def start_point(case: str) -> dict[str, float]:
    """The published curves' start (retain, forget1, forget2 KL) and retrained levels of case ``case``."""
    return dict(load()["start_points"][case])
