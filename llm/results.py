"""Strict JSON for results files: NaN/inf become null, with the reason recorded beside the document.

``json.dumps`` writes a bare ``NaN`` by default, which is not JSON (jq and browsers reject it).
:func:`strict_json` replaces every non-finite float by ``None`` and lists each replaced value under
``"non_finite"``: its path (``"final.kl_true.forget1"``), what it was (``"nan"``, ``"inf"``) and
why (the run's divergence reason, when it has one). The result passes
``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

from markovsim.results import to_strict_json

__all__ = ["strict_json"]


def _dotted(converted, pointer: str) -> str:
    """A JSON Pointer of :func:`markovsim.results.to_strict_json` as this file's dotted path
    (``/final/kl/0`` -> ``final.kl[0]``), walking ``converted`` to tell list indices from keys."""
    path, node = "", converted
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node, path = node[int(token)], f"{path}[{token}]"
        else:
            node, path = node[token], f"{path}.{token}" if path else token
    return path


def strict_json(document: dict, reason: str | None = None) -> dict:
    """``document`` with NaN/inf as None and a ``"non_finite"`` entry explaining each (absent when none).

    The conversion is :func:`markovsim.results.to_strict_json` (numpy values become Python numbers).

    Args:
        document: a JSON-like dict (numbers, strings, None, lists, dicts, numpy arrays).
        reason: why values are non-finite (e.g. the divergence reason), recorded with each.
    Returns:
        a new dict; ``document["non_finite"][path] = {"value": "nan", "reason": ...}`` per replacement.
    """
    cleaned, found = to_strict_json(document)
    if found:
        because = reason or "not a finite number"
        cleaned["non_finite"] = {_dotted(cleaned, pointer): {"value": spelling, "reason": because}
                                 for pointer, spelling in found.items()}
    return cleaned
