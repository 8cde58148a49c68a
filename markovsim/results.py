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


NON_FINITE_KEY = "non_finite_values"


def _pointer_token(key) -> str:
    """One JSON Pointer (RFC 6901) reference token: ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return str(key).replace("~", "~0").replace("/", "~1")


def to_strict_json(value, pointer: str = "", non_finite: dict | None = None):
    """``value`` as strict-JSON-ready data, and ``{JSON Pointer: "nan" | "inf" | "-inf"}`` for what became null.

    numpy scalars/arrays become Python numbers/lists; a NaN/inf float becomes ``None`` (JSON null) and
    its location is recorded, e.g. ``{"/summaries/NPO/final/0": "nan"}`` (RFC 6901 pointers: ``/``
    in a key is written ``~1``). Returns ``(converted, non_finite)``.
    """
    non_finite = {} if non_finite is None else non_finite
    if isinstance(value, dict):
        return {str(k): to_strict_json(v, f"{pointer}/{_pointer_token(k)}", non_finite)[0]
                for k, v in value.items()}, non_finite
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v, f"{pointer}/{i}", non_finite)[0] for i, v in enumerate(value)], non_finite
    if isinstance(value, np.ndarray):
        return to_strict_json(value.tolist(), pointer, non_finite)
    if isinstance(value, (np.integer,)):
        return int(value), non_finite
    if isinstance(value, (np.bool_,)):
        return bool(value), non_finite
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value, non_finite
        non_finite[pointer] = str(value)
        return None, non_finite
    return value, non_finite


def strict_json_text(document: dict) -> str:
    """Indented strict JSON (no NaN/Infinity tokens): non-finite numbers are null, listed under
    ``"non_finite_values"`` (see :func:`to_strict_json`); :func:`read_json` restores them."""
    converted, non_finite = to_strict_json(document)
    if non_finite:
        converted[NON_FINITE_KEY] = non_finite
    return json.dumps(converted, indent=2, allow_nan=False) + "\n"


def _restore_non_finite(document: dict) -> dict:
    """Put the floats listed under ``non_finite_values`` back at their JSON Pointers."""
    for pointer, text in document.pop(NON_FINITE_KEY, {}).items():
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
        container = document
        for token in tokens[:-1]:
            container = container[int(token) if isinstance(container, list) else token]
        last = tokens[-1]
        container[int(last) if isinstance(container, list) else last] = float(text)
    return document


def missing_folders(path: str | os.PathLike) -> list[str]:
    """The folders that ``os.makedirs(path)`` would create, deepest first (absolute paths; [] if ``path`` exists)."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_empty_folders(folders: list[str]) -> None:
    """Remove each folder of ``folders`` (deepest first) that exists and is empty; others are left alone."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


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
    """Write ``document`` as indented strict JSON (:func:`strict_json_text`) atomically (:func:`atomic_output`)."""
    text = strict_json_text(document)
    with atomic_output(path) as temporary, open(temporary, "w") as file:
        file.write(text)


def read_json(path: str | os.PathLike) -> dict:
    """Read a results JSON, with the non-finite numbers that were written as null restored as floats.

    A missing or malformed file raises ValueError naming the path.
    """
    try:
        with open(path) as file:
            document = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read results file {os.fspath(path)!r}: {error}") from error
    return _restore_non_finite(document) if isinstance(document, dict) else document
