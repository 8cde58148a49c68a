"""A figure's cache: ``stem.npz`` (arrays) beside ``stem.json`` (config, provenance, small results)."""

from __future__ import annotations

import numpy as np

from markovsim.data import atomic_save_npz
from markovsim.results import atomic_write_json, metadata_block, read_json


def save_cache(stem: str, arrays: dict[str, np.ndarray], config, **extra) -> str:
    """Write both files atomically; ``extra`` goes into the JSON beside the config. Returns ``stem``."""
    atomic_save_npz(stem + ".npz", arrays)
    atomic_write_json(stem + ".json", metadata_block(config, **extra))
    return stem


def load_cache(stem: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(json document, arrays)``; a missing or malformed file raises ValueError naming it."""
    document = read_json(stem + ".json")
    try:
        with np.load(stem + ".npz", allow_pickle=False) as data:
            return document, {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read figure cache {stem}.npz: {error}") from error
