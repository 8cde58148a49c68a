"""Checkpoints and exact resume of replica runs (``unlearn_replicas`` and ``pretrain_replicas``).

A replica run's checkpoint is an ``llm.checkpoint`` folder (``run_dir/checkpoints/step-*/state.pt``,
written atomically by one process) holding the stacked parameters, the stacked AdamW state and
``run = {"kind": ..., "replicas": [entry_i]}``: per replica its records so far, its divergence, a
fingerprint of its starting model and its config (and, when unlearning, its objective). A resumed
run checks that every replica starts from the same weights with the same settings, then continues
with exactly the numbers of the uninterrupted run (the batches follow from step and seed alone).
"""

from __future__ import annotations

import os

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .replica_common import SingleProcess
from .replicas import ReplicaStack, StackedAdamW
from .session import RESUME_FIELDS

__all__ = ["replica_folder", "check_run_dir", "resume_path", "save_replicas", "restore_replicas"]


def replica_folder(run_dir, index: int) -> str:
    """``run_dir/replica-<index:03d>``: where replica ``index``'s outputs go."""
    return os.path.join(os.fspath(run_dir), f"replica-{index:03d}")


def check_run_dir(run_dir, resume: bool | str) -> str | None:
    """The checkpoint to resume from (None = a fresh run); ValueError for an inconsistent request."""
    if run_dir is None and resume is True:
        raise ValueError("resume=True needs run_dir (the run directory holding checkpoints/)")
    if not resume and run_dir is not None and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"run directory {os.fspath(run_dir)!r} already holds replica checkpoints; pass "
                         f"resume=True to continue that run or choose a new directory")
    return resume_path(run_dir, resume) if resume else None


def resume_path(run_dir, resume: bool | str) -> str:
    """``resume`` itself when it is a path, else the newest checkpoint of ``run_dir``."""
    if isinstance(resume, (str, os.PathLike)):
        return os.fspath(resume)
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(f"resume=True but {os.fspath(run_dir)!r} has no checkpoint; start without resume")
    return path


class _NoSchedule:
    """The schedule slot of a checkpoint: replica learning rates follow from the step alone."""

    @staticmethod
    def state_dict() -> dict:
        return {}


def save_replicas(run_dir, step: int, stack: ReplicaStack, optimizer: StackedAdamW, kind: str, entries: list[dict],
                  keep: int) -> str:
    """Checkpoint after ``step`` optimisation steps; ``entries``: one plain dict per replica."""
    run = {"kind": kind, "replicas": entries}
    return save_checkpoint(SingleProcess(), run_dir, step, stack, optimizer, _NoSchedule(), run, keep=keep)


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def restore_replicas(path: str, kind: str, stack: ReplicaStack, optimizer: StackedAdamW,
                     expected: list[dict]) -> tuple[int, list[dict]]:
    """Load the checkpoint at ``path`` into ``stack`` and ``optimizer`` after checking it belongs to this run.

    Args:
        expected: per replica ``{"fingerprint", "config"}`` (``config_state``) and optionally ``"objective"``,
            compared with the saved entries (the config on ``RESUME_FIELDS``).
    Returns: (steps taken, the saved entries).
    """
    state, _ = load_checkpoint(path)
    run = state["run"]
    if run.get("kind") != kind:
        raise ValueError(f"checkpoint {path!r} is from a {run.get('kind')!r} run, not {kind!r}")
    saved = run.get("replicas", [])
    if len(saved) != len(expected):
        raise ValueError(f"checkpoint {path!r} holds {len(saved)} replicas; this run has {len(expected)}")
    for i, (mine, entry) in enumerate(zip(expected, saved)):
        if entry["fingerprint"] != mine["fingerprint"]:
            raise ValueError(f"checkpoint {path!r}: replica {i} was started from different model weights; pass "
                             f"the same starting models when resuming")
        changed = [f for f in RESUME_FIELDS
                   if _comparable(entry["config"].get(f)) != _comparable(mine["config"].get(f))]
        if "objective" in mine and entry.get("objective") != mine["objective"]:
            changed.append("objective")
        if changed:
            raise ValueError(f"checkpoint {path!r}: replica {i} was written with different settings {changed}; "
                             f"resume with the same configs and objectives")
    stack.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), saved
