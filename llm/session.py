"""A run's session: accelerator, optimizer, schedule, checkpoints with exact resume, the step tail.

Shared by :mod:`llm.pretraining` and :mod:`llm.unlearning`: AdamW (weight decay on matrices
only), a warm-up + constant/linear/cosine schedule, gradient clipping, bf16 autocast on CUDA only,
data parallelism when launched with ``torchrun`` / ``accelerate launch`` (every process computes
the same global batch from the seed and takes its shard; losses are normalised by global counts so
N processes match 1), a NaN/inf guard, JSONL metrics, checkpoints and a progress display.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from markovsim.config import divergence_reason
from markovsim.data import SequenceSet
from markovsim.optimizers import build_torch_optimizer

from .checkpoint import latest_checkpoint, load_checkpoint, parameter_fingerprint, save_checkpoint, set_rng_state
from .config import TrainConfig, config_state
from .logps import NonFiniteLogitsError
from .metrics_log import MetricsLog
from .models import save_model
from .progress import progress_bar
from .runtime import autocast, make_accelerator, use_bf16

__all__ = ["Session", "StepOutcome", "learning_rate_factor", "check_sequences", "check_config"]

# Fields that change the numbers of a run: a checkpoint only resumes a run with the same values.
RESUME_FIELDS = ("optimizer", "learning_rate", "batch_size", "retain_batch_size", "epochs", "steps", "weight_decay",
                 "adam_betas", "adam_eps", "schedule", "warmup_steps", "max_grad_norm", "eval_every", "seed",
                 "divergence_logp_per_token", "track_forget_weights", "track_power_share",
                 "diagnostics_max_sequences")

def learning_rate_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return build_torch_optimizer(config.optimizer, groups, config.learning_rate, config.adam_betas, config.adam_eps)


@dataclass
class StepOutcome:
    """One step's global values (identical on every process)."""

    values: dict[str, float]
    grad_norm: float
    reason: str | None


class Session:
    """A run's accelerator, prepared model/optimizer, schedule, run directory, log and resume state."""

    def __init__(self, model, config: TrainConfig, total_steps: int, run_dir, kind: str,
                 value_names: tuple[str, ...] = ("total",)):
        self.config, self.total_steps, self.kind, self.value_names = config, total_steps, kind, value_names
        self.run_dir = None if run_dir is None else os.fspath(run_dir)
        self.accelerator = make_accelerator(config.device)
        self.bf16 = use_bf16(config.device, config.mixed_precision)
        self.fingerprint = parameter_fingerprint(model)
        torch.manual_seed(config.seed + self.accelerator.process_index)
        model.to(self.accelerator.device)
        optimizer = _optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: learning_rate_factor(s, total_steps, config.schedule, config.warmup_steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped = model
        self.start_step, self.run_state = 0, {}
        self.log = MetricsLog(None if self.run_dir is None else os.path.join(self.run_dir, "metrics.jsonl"),
                              self.accelerator.is_main_process)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def begin(self, resume: bool | str) -> dict:
        """Restore a checkpoint if asked (returns its run state, else {}) and start the JSONL log."""
        if resume:
            self._restore(self._resume_path(resume))
        elif self.run_dir is not None and os.path.isfile(os.path.join(self.run_dir, "metrics.jsonl")):
            raise ValueError(f"run directory {self.run_dir!r} already holds a run; pass resume=True to continue "
                             f"it or choose a new directory")
        self.accelerator.wait_for_everyone()  # every process checks run_dir before the main process writes the log
        self.log.start(self.start_step if resume else None)
        return self.run_state

    def _resume_path(self, resume: bool | str) -> str:
        if isinstance(resume, (str, os.PathLike)):
            return os.fspath(resume)
        if self.run_dir is None:
            raise ValueError("resume=True needs run_dir (the run directory holding checkpoints/)")
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise ValueError(f"resume=True but {self.run_dir!r} has no checkpoint; start without resume")
        return path

    def _restore(self, path: str) -> None:
        state, rng = load_checkpoint(path, self.accelerator.process_index)
        run = state["run"]
        if run.get("kind") != self.kind:
            raise ValueError(f"checkpoint {path!r} is from a {run.get('kind')!r} run, not {self.kind!r}")
        if run.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint {path!r} was started from different model weights; pass the same "
                             f"starting model (e.g. the pre-trained model) when resuming")
        saved = run.get("config", {})
        changed = [f for f in RESUME_FIELDS if _comparable(saved.get(f)) != _comparable(getattr(self.config, f))]
        if changed:
            raise ValueError(f"checkpoint {path!r} was written with different settings {changed}; resume with the "
                             f"same TrainConfig")
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if rng is not None:
            set_rng_state(rng)
        self.start_step, self.run_state = int(state["step"]), run

    def save(self, step: int, run_state: dict) -> None:
        run = dict(run_state, kind=self.kind, fingerprint=self.fingerprint, config=config_state(self.config))
        save_checkpoint(self.accelerator, self.run_dir, step, self.model, self.optimizer, self.scheduler, run,
                        keep=self.config.keep_checkpoints)

    def checkpoint_due(self, step: int) -> bool:
        every = self.config.checkpoint_every
        return self.run_dir is not None and every is not None and step % every == 0 and step < self.total_steps

    def progress_bar(self, description: str):
        """A progress display of the run's steps (tqdm on a terminal, plain lines otherwise; main process only)."""
        enabled = self.config.progress and self.accelerator.is_main_process
        return progress_bar(self.total_steps, self.start_step, description, enabled)

    def save_final_model(self) -> None:
        """Write the trained model to ``run_dir/model`` (atomically; main process only), then synchronise."""
        if self.run_dir is not None and self.accelerator.is_main_process:
            save_model(self.unwrapped, os.path.join(self.run_dir, "model"), progress=self.config.progress)
        self.accelerator.wait_for_everyone()

    def forward_backward(self, forward: Callable[[int], dict], step: int, backward: bool) -> StepOutcome:
        """Run ``forward(step)`` (this process's share of each value) under autocast, reduce, backprop.

        ``forward`` returns ``{"total": differentiable scalar, other: detached scalars}``; every value
        is this shard's share, so the global value is the sum over processes.
        """
        try:
            with autocast(self.device.type, self.bf16), (contextlib.nullcontext() if backward else torch.no_grad()):
                local = forward(step)
            failed = 0.0
        except NonFiniteLogitsError:
            local, failed = None, 1.0
        names = self.value_names
        shares = [0.0 if local is None else float(local[n]) if not torch.is_tensor(local[n])
                  else local[n].detach().double() for n in names]
        vector = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in shares + [failed]])
        vector = self.accelerator.reduce(vector, reduction="sum") if self.num_processes > 1 else vector
        values = dict(zip(names, vector[:-1].tolist()))
        if float(vector[-1]) > 0:
            return StepOutcome(dict.fromkeys(names, math.nan), math.nan, "the model produced NaN/inf logits")
        grad_norm = math.nan
        if backward:
            self.accelerator.backward(local["total"] * self.num_processes)
            limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))
        reason = divergence_reason(values["total"], grad_norm=grad_norm if backward else None)
        return StepOutcome(values, grad_norm, reason)

    def update(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def advance(self, step: int, loss: float, bar, run_state: Callable[[], dict]) -> None:
        """Apply step ``step``'s update, move the progress bar, and checkpoint if one is due after it."""
        self.update()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.checkpoint_due(step + 1):
            self.save(step + 1, run_state())


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_sequences(sequences, name: str) -> SequenceSet:
    if not isinstance(sequences, SequenceSet):
        raise TypeError(f"{name} must be a markovsim SequenceSet, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name} is empty; it needs at least one sequence")
    return sequences


def check_config(config) -> TrainConfig:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be an llm.train.TrainConfig, got {type(config).__name__}")
    return config

