"""An independent reference for reach values: a plain linear scan of a run's KL columns (tests only)."""

from __future__ import annotations

import math

import numpy as np


def reach_by_scan(forget, retain, level: float) -> float:
    """The retain KL where ``forget`` (per evaluation) first reaches ``level``, linearly interpolated between the
    two evaluations around the crossing; the first value when it starts there; NaN when never."""
    forget, retain = np.asarray(forget, dtype=float), np.asarray(retain, dtype=float)
    above = np.nonzero(forget >= level)[0]
    if above.size == 0:
        return math.nan
    i = above[0]
    if i == 0:
        return float(retain[0])
    t = (level - forget[i - 1]) / (forget[i] - forget[i - 1])
    return float(retain[i - 1] + t * (retain[i] - retain[i - 1]))
