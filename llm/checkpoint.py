"""Training checkpoints with exact resume: model, optimizer, scheduler, RNG states, step, run state.

Layout (inside a run directory)::

    checkpoints/step-0000040/state.pt     model/optimizer/scheduler state dicts, step, run state
    checkpoints/step-0000040/rng-0.pt     torch CPU (and CUDA) RNG state of process 0, rng-1.pt ...

A checkpoint at step s holds the state after s optimisation steps. It is written into a temporary
folder and renamed when complete, so a crash never leaves a half-written ``step-*`` folder; only
the newest ``keep`` checkpoints are kept. Files load with ``torch.load(weights_only=True)``: the
run state must contain only tensors, numbers, strings, None, lists, tuples and dicts.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil

import torch

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_path", "latest_checkpoint", "save_checkpoint", "load_checkpoint",
           "rng_state", "set_rng_state", "parameter_fingerprint", "CHECKPOINT_KEYS"]

CHECKPOINT_FORMAT = 1
_PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> str:
    """``run_dir/checkpoints/step-<step:07d>``."""
    return os.path.join(os.fspath(run_dir), "checkpoints", f"step-{step:07d}")


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint folder of ``run_dir``, or None."""
    folder = os.path.join(os.fspath(run_dir), "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = sorted(int(m.group(1)) for name in os.listdir(folder) if (m := _PATTERN.match(name))
                   and os.path.isfile(os.path.join(folder, name, "state.pt")))
    return checkpoint_path(run_dir, steps[-1]) if steps else None


def rng_state() -> dict:
    """This process's torch RNG states (CPU, and every CUDA device when available)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def parameter_fingerprint(model) -> list[float]:
    """``[sum, sum of squares, count]`` of all parameters in float64: identifies a starting model."""
    total, squares, count = 0.0, 0.0, 0
    for parameter in model.parameters():
        values = parameter.detach().double()
        total += float(values.sum())
        squares += float((values * values).sum())
        count += values.numel()
    return [total, squares, float(count)]


def save_checkpoint(accelerator, run_dir, step: int, model, optimizer, scheduler, run_state: dict,
                    keep: int = 2) -> str:
    """Write the checkpoint of ``step`` (collective: every process must call it).

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        run_dir: the run directory.
        step: optimisation steps taken so far.
        model, optimizer, scheduler: the (prepared) training objects.
        run_state: JSON-like extra state (records, cached reference log-probs, fingerprint, config).
        keep: how many newest checkpoints to keep.
    Returns: the checkpoint folder.
    """
    final = checkpoint_path(run_dir, step)
    temporary = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(temporary, f"rng-{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        state = {"format": CHECKPOINT_FORMAT, "step": step,
                 "model": accelerator.unwrap_model(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "run": run_state}
        torch.save(state, os.path.join(temporary, "state.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _prune(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(run_dir, keep: int) -> None:
    folder = os.path.join(os.fspath(run_dir), "checkpoints")
    steps = sorted(int(m.group(1)) for name in os.listdir(folder) if (m := _PATTERN.match(name)))
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_path(run_dir, step), ignore_errors=True)


CHECKPOINT_KEYS = ("format", "step", "model", "optimizer", "scheduler", "run")


def _load_file(path: str) -> object:
    """``torch.load`` of a checkpoint file; ValueError naming the file when it is truncated or corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"checkpoint file {path!r} is unreadable (truncated or corrupt): {error}") from error


def load_checkpoint(path: str | os.PathLike, process_index: int = 0) -> tuple[dict, dict | None]:
    """``(state, rng)`` of a checkpoint folder; ``rng`` is None if this process saved none.

    Raises:
        ValueError: naming the file when state.pt is missing, unreadable, of another format or
            lacks one of ``CHECKPOINT_KEYS``, or when rng-<i>.pt is unreadable.
    """
    path = os.fspath(path)
    state_file = os.path.join(path, "state.pt")
    if not os.path.isfile(state_file):
        raise ValueError(f"{path!r} is not a checkpoint folder (no state.pt)")
    state = _load_file(state_file)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {state_file!r} does not hold a checkpoint dict")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint file {state_file!r} misses the keys {missing}")
    rng_file = os.path.join(path, f"rng-{process_index}.pt")
    rng = _load_file(rng_file) if os.path.isfile(rng_file) else None
    return state, rng
