"""JSONL metrics of a run: one JSON object per line, appended as training goes.

Records carry ``"kind"`` (``"train"`` per optimisation step, ``"eval"`` per evaluation) and
``"step"``. On resume the log is cut back to the checkpoint's step (atomically), so a resumed run's
log equals an uninterrupted run's. Non-finite floats are written as the strings "nan"/"inf".
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

__all__ = ["MetricsLog", "read_jsonl", "json_ready"]


def json_ready(value):
    """Numbers, arrays and nested containers as JSON-safe values (non-finite floats -> strings)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file (ValueError naming the file and line for a malformed line)."""
    records = []
    with open(path) as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{os.fspath(path)}:{number} is not valid JSON: {error}") from error
    return records


class MetricsLog:
    """Appends records to ``path`` (only where ``enabled``, i.e. on the main process)."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = None if path is None else os.fspath(path)
        self.enabled = enabled and self.path is not None

    def start(self, resume_step: int | None) -> None:
        """Begin a fresh log (``resume_step`` None), or cut an existing one back for a resume.

        On resume at step s (s updates done), the records of steps < s are kept: step s itself
        (its evaluation and its update) is recomputed by the resumed run.
        """
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        kept = []
        if resume_step is not None and os.path.isfile(self.path):
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) < resume_step]
        handle, temporary = tempfile.mkstemp(suffix=".jsonl", dir=os.path.dirname(os.path.abspath(self.path)))
        with os.fdopen(handle, "w") as file:
            file.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(temporary, self.path)

    def append(self, record: dict) -> None:
        """Append one record (flushed immediately)."""
        if self.enabled:
            with open(self.path, "a") as file:
                file.write(json.dumps(json_ready(record), allow_nan=False) + "\n")
