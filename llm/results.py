"""Strict JSON for results files: NaN/inf become null, with the reason recorded beside the document.

``json.dumps`` writes a bare ``NaN`` by default, which is not JSON (jq and browsers reject it).
:func:`strict_json` replaces every non-finite float by ``None`` and lists each replaced value under
``"non_finite"``: its path (``"final.kl_true.forget1"``), what it was (``"nan"``, ``"inf"``) and
why (the run's divergence reason, when it has one). The result passes
``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["strict_json"]


def _replace_non_finite(value, path: str, found: dict[str, str]):
    """``value`` with non-finite floats as None; their paths and spellings collected in ``found``."""
    if isinstance(value, dict):
        return {key: _replace_non_finite(item, f"{path}.{key}" if path else str(key), found)
                for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_replace_non_finite(item, f"{path}[{index}]", found) for index, item in enumerate(value)]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        found[path] = str(float(value))
        return None
    return value


def strict_json(document: dict, reason: str | None = None) -> dict:
    """``document`` with NaN/inf as None and a ``"non_finite"`` entry explaining each (absent when none).

    Args:
        document: a JSON-like dict (numbers, strings, None, lists, dicts, numpy arrays).
        reason: why values are non-finite (e.g. the divergence reason), recorded with each.
    Returns:
        a new dict; ``document["non_finite"][path] = {"value": "nan", "reason": ...}`` per replacement.
    """
    found: dict[str, str] = {}
    cleaned = _replace_non_finite(document, "", found)
    if found:
        because = reason or "not a finite number"
        cleaned["non_finite"] = {path: {"value": spelling, "reason": because} for path, spelling in found.items()}
    return cleaned
