"""Results files: a JSON document (metadata, full config, package version, git commit) written atomically.

Arrays go beside it in an ``.npz`` written with :func:`markovsim.data.atomic_save_npz`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import subprocess
import tempfile
from importlib import metadata

import numpy as np


def package_version() -> str:
    """The installed ``simnpo-companion`` version (``"unknown"`` when run from a bare checkout)."""
    try:
        return metadata.version("simnpo-companion")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The checkout's commit hash, or None outside a git checkout."""
    try:
        folder = os.path.dirname(os.path.abspath(__file__))
        output = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        return output.stdout.strip() or None if output.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata_block(config=None, **extra) -> dict:
    """The provenance every results file records: config, version, commit, time, plus ``extra``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return {"config": config, "package_version": package_version(), "git_commit": git_commit(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}


def _to_json(value):
    """Convert numpy scalars/arrays and non-finite floats to JSON-safe values (inf/nan become strings)."""
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    Readers therefore see either the old file or the complete new one, never a half-written file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_json(path: str | os.PathLike, document: dict) -> None:
    """Write ``document`` as indented JSON atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as temporary, open(temporary, "w") as file:
        json.dump(_to_json(document), file, indent=2, allow_nan=False)
        file.write("\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a results JSON; a missing or malformed file raises ValueError naming the path."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read results file {os.fspath(path)!r}: {error}") from error
