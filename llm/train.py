"""Pre-training, retraining and unlearning of transformers on Markov data, on ``accelerate``.

* :func:`pretrain` / :func:`retrain`: token-mean cross-entropy on the full likelihood (labels on
  s_1..s_L), as in the paper's synthetic experiment (retrain = pre-train on retain data only).
* :func:`unlearn`: an ``Objective`` from ``markovsim.losses`` on response tokens (s_2..s_L), a forget
  batch and (for a retain term) a retain batch per step. NPO/DPO reference log-probs on the forget
  set are computed once from the starting model and cached; a frozen reference model is kept only
  for a KL retain term. Returns a ``markovsim.trajectory.Trajectory`` like the simulator.

Common machinery: AdamW (weight decay on matrices only), a warm-up + constant/linear/cosine
schedule, gradient clipping, bf16 autocast on CUDA only, data parallelism when launched with
``torchrun`` / ``accelerate launch`` (every process computes the same global batch from the seed
and takes its shard; losses are normalised by global counts so N processes match 1), a NaN/inf
guard that stops and records ``diverged_at``, JSONL metrics, checkpoints with exact resume, and a
tqdm bar. Models are trained in place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from markovsim.data import SequenceSet, concatenate
from markovsim.losses import Objective
from markovsim.optimizers import ADAM_RULES, build_torch_optimizer
from markovsim.runtime import torch_threads
from markovsim.trajectory import COMPONENT_METRICS, Trajectory

from .checkpoint import latest_checkpoint, load_checkpoint, parameter_fingerprint, save_checkpoint, set_rng_state
from .data import FORGET_STREAM, RETAIN_STREAM, batch_indices, encode, shard, steps_per_epoch
from .diagnostics import Diagnostics, DiagnosticsPlan
from .evaluate import Evaluator, sequence_logps_batched
from .logps import NonFiniteLogitsError, model_logits, token_log_probs
from .metrics_log import MetricsLog
from .models import check_model_data
from .objective import BatchCounts, UnlearningBatch, objective_terms
from .runtime import DEVICES, MIXED_PRECISIONS, autocast, make_accelerator, use_bf16

__all__ = ["SCHEDULES", "TrainConfig", "PAPER_PRETRAINING", "PAPER_UNLEARNING", "TrainingHistory",
           "learning_rate_factor", "pretrain", "retrain", "unlearn"]

SCHEDULES = ("constant", "linear", "cosine")
# Fields that change the numbers of a run: a checkpoint only resumes a run with the same values.
_RESUME_FIELDS = ("optimizer", "learning_rate", "batch_size", "retain_batch_size", "epochs", "steps", "weight_decay",
                  "adam_betas", "adam_eps", "schedule", "warmup_steps", "max_grad_norm", "eval_every", "seed",
                  "divergence_logp_per_token", "track_forget_weights", "track_power_share",
                  "diagnostics_max_sequences")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and runtime settings of one run.

    Attributes:
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw_legacy"`` (the removed
            ``transformers.AdamW`` of the paper's code: eps added to the uncorrected sqrt(v); use
            it with ``adam_eps=1e-6, weight_decay=0`` as ``PAPER_PRETRAINING`` / ``PAPER_UNLEARNING``
            do). Both rules: :mod:`markovsim.optimizers`.
        learning_rate: peak learning rate.
        batch_size: global batch in sequences (the forget batch when unlearning).
        retain_batch_size: global retain batch when unlearning (None = batch_size).
        epochs: passes over the training (forget) set; ignored when ``steps`` is set.
        steps: optimisation steps (overrides ``epochs``).
        weight_decay: AdamW decoupled weight decay (default 0.01, torch's AdamW default), applied to
            weight matrices (ndim >= 2) only.
        adam_betas, adam_eps: AdamW settings.
        schedule: ``"constant"``, ``"linear"`` (decay to 0) or ``"cosine"`` (to 0), after warm-up.
        warmup_steps: linear warm-up from 0.
        max_grad_norm: clip the global gradient norm (None = no clipping; the norm is still logged).
        eval_every: unlearning: evaluate at step 0, every ``eval_every`` steps and at the end.
        eval_batch_size: rows per evaluation forward pass.
        checkpoint_every: write a checkpoint every this many steps (None = never; needs a run_dir).
        keep_checkpoints: newest checkpoints kept.
        seed: batch order (and the torch RNG for dropout).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        mixed_precision: ``"auto"`` (bf16 autocast on CUDA), ``"bf16"`` (CUDA only) or ``"no"``.
        progress: show a tqdm bar (main process only).
        num_threads: torch intra-op threads during the run (None = leave as is). One thread is
            usually fastest for small models on a busy CPU.
        divergence_logp_per_token: unlearning stops once the forget batch's mean log-likelihood per
            token falls below this (None = only the NaN/inf guard).
        track_forget_weights: unlearning: record the mean closed-form gradient weight per forget
            component (``mean_weight``; :mod:`llm.diagnostics`).
        track_power_share: unlearning: record each component's share of the gradient norm
            ("unlearning power", the simulator's ``power_share``; :mod:`llm.diagnostics`). Costs a
            backward pass over the diagnostics subsample per evaluation; the training numbers are
            the same with and without it.
        diagnostics_max_sequences: both diagnostics use a fixed, seeded subsample (drawn once per
            run) of at most this many forget sequences per component and this many retain
            sequences; the power share scales each component's gradient by (its sequences /
            subsample size) to estimate the full-set sum (None = every sequence: exact).
    """

    optimizer: str = "adamw"
    learning_rate: float = 5e-4
    batch_size: int = 128
    retain_batch_size: int | None = None
    epochs: float = 1.0
    steps: int | None = None
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    eval_every: int = 10
    eval_batch_size: int = 256
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"
    progress: bool = True
    num_threads: int | None = None
    divergence_logp_per_token: float | None = None
    track_forget_weights: bool = True
    track_power_share: bool = True
    diagnostics_max_sequences: int | None = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("epochs", self.epochs)
        _check_positive("adam_eps", self.adam_eps)
        for name in ("batch_size", "eval_every", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("retain_batch_size", "steps", "checkpoint_every", "num_threads", "diagnostics_max_sequences"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1 if name != "steps" else 0)
        for name in ("warmup_steps", "keep_checkpoints", "seed"):
            _check_int(name, getattr(self, name), 0)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.optimizer not in ADAM_RULES:
            raise ValueError(f"optimizer must be one of {ADAM_RULES}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_grad_norm is not None:
            _check_positive("max_grad_norm", self.max_grad_norm)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.divergence_logp_per_token is not None and not math.isfinite(self.divergence_logp_per_token):
            raise ValueError("divergence_logp_per_token must be finite or None")

    def total_steps(self, num_items: int) -> int:
        """``steps`` if set, else ``ceil(epochs * (num_items // batch_size))``."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * steps_per_epoch(num_items, self.batch_size)))


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


# The paper's synthetic experiment exactly (SimNPO Sec. 5 / App. H and its official code; docs/theory.md,
# "The paper's synthetic experiment"): the legacy transformers.AdamW with its defaults (eps 1e-6, no
# weight decay), no gradient clipping; pre-training 5 epochs of batch 128 at lr 5e-4; unlearning 50
# steps of 4 forget sequences at lr 5e-4, evaluated after every step. Our TrainConfig defaults differ
# (torch AdamW, eps 1e-8, weight decay 0.01, clipping at 1.0).
_PAPER_OPTIMIZER = dict(optimizer="adamw_legacy", adam_eps=1e-6, weight_decay=0.0, max_grad_norm=None)
PAPER_PRETRAINING = TrainConfig(learning_rate=5e-4, batch_size=128, epochs=5.0, **_PAPER_OPTIMIZER)
PAPER_UNLEARNING = TrainConfig(learning_rate=5e-4, batch_size=4, steps=50, eval_every=1, **_PAPER_OPTIMIZER)


@dataclass(frozen=True)
class TrainingHistory:
    """Per-step record of a pre-training/retraining run.

    Attributes:
        steps, losses, learning_rates, grad_norms: (S,) arrays, one entry per optimisation step
            (the loss of the step's batch before its update).
        diverged_at: step at which the NaN/inf guard stopped the run, else None.
        divergence_reason: what was non-finite.
        wall_seconds: time spent in this call (excluding a resumed run's earlier part).
        num_processes: data-parallel processes.
    """

    steps: np.ndarray
    losses: np.ndarray
    learning_rates: np.ndarray
    grad_norms: np.ndarray
    diverged_at: int | None
    divergence_reason: str | None
    wall_seconds: float
    num_processes: int


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
class _StepOutcome:
    """One step's global values (identical on every process)."""

    values: dict[str, float]
    grad_norm: float
    reason: str | None


class _Session:
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
        changed = [f for f in _RESUME_FIELDS if _comparable(saved.get(f)) != _comparable(getattr(self.config, f))]
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
        run = dict(run_state, kind=self.kind, fingerprint=self.fingerprint, config=_config_state(self.config))
        save_checkpoint(self.accelerator, self.run_dir, step, self.model, self.optimizer, self.scheduler, run,
                        keep=self.config.keep_checkpoints)

    def checkpoint_due(self, step: int) -> bool:
        every = self.config.checkpoint_every
        return self.run_dir is not None and every is not None and step % every == 0 and step < self.total_steps

    def progress_bar(self, description: str):
        from tqdm.auto import tqdm

        enabled = self.config.progress and self.accelerator.is_main_process
        return tqdm(total=self.total_steps, initial=self.start_step, disable=not enabled, desc=description,
                    leave=False, dynamic_ncols=True)

    def forward_backward(self, forward: Callable[[int], dict], step: int, backward: bool) -> _StepOutcome:
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
            return _StepOutcome(dict.fromkeys(names, math.nan), math.nan, "the model produced NaN/inf logits")
        grad_norm = math.nan
        if backward:
            self.accelerator.backward(local["total"] * self.num_processes)
            limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))
        return _StepOutcome(values, grad_norm, _divergence(values, grad_norm, backward))

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


def _config_state(config: TrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _divergence(values: dict[str, float], grad_norm: float, backward: bool) -> str | None:
    if not math.isfinite(values["total"]):
        return f"loss is {values['total']}"
    if backward and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    return None


@contextlib.contextmanager
def _threads(num_threads: int | None):
    if num_threads is None:
        yield
    else:
        with torch_threads(num_threads):
            yield


def _check_sequences(sequences, name: str) -> SequenceSet:
    if not isinstance(sequences, SequenceSet):
        raise TypeError(f"{name} must be a markovsim SequenceSet, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name} is empty; it needs at least one sequence")
    return sequences


def _check_config(config) -> TrainConfig:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be an llm.train.TrainConfig, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------
# Pre-training / retraining
# ---------------------------------------------------------------------------------------------


def pretrain(model, sequences: SequenceSet, config: TrainConfig = PAPER_PRETRAINING, run_dir=None,
             resume: bool | str = False) -> TrainingHistory:
    """Train ``model`` in place on the full likelihood of ``sequences`` (token-mean cross-entropy).

    loss = -(1/N) sum over the global batch's tokens s_1..s_L of log pi_theta(s_t | BOS, s_<t),
    N = number of those tokens.

    Args:
        model: a causal LM with vocab_size = V + 1 and a context >= 1 + max length.
        sequences: the training sequences.
        config: optimisation settings (``PAPER_PRETRAINING``: 5 epochs, batch 128, lr 5e-4).
        run_dir: folder for metrics.jsonl, checkpoints/ and the final model/ (None = no files).
        resume: True = continue from the newest checkpoint in run_dir; a path = that checkpoint.
    Returns: a :class:`TrainingHistory`.
    """
    config = _check_config(config)
    check_model_data(model, _check_sequences(sequences, "sequences"))
    with _threads(config.num_threads):
        return _pretrain(model, sequences, config, run_dir, resume)


def retrain(model, retain: SequenceSet, config: TrainConfig = PAPER_PRETRAINING, run_dir=None,
            resume: bool | str = False) -> TrainingHistory:
    """The retrained baseline: :func:`pretrain` a freshly initialised model on retain data only."""
    return pretrain(model, retain, config, run_dir, resume)


def _pretrain(model, sequences, config, run_dir, resume) -> TrainingHistory:
    started = time.perf_counter()
    encoded = encode(sequences, "all")
    session = _Session(model, config, config.total_steps(len(sequences)), run_dir, "pretrain")
    history = session.begin(resume).get("history") or {"steps": [], "losses": [], "learning_rates": [], "grad_norms": []}

    def forward(step: int) -> dict:
        rows = batch_indices(len(encoded), config.batch_size, step, config.seed)
        local = shard(rows, session.accelerator.process_index, session.num_processes)
        batch = encoded.batch(local, session.device)
        token_logps, _ = token_log_probs(model_logits(session.model, batch), batch["labels"])  # (b, t-1)
        return {"total": -token_logps.sum() / int(encoded.num_label_tokens[rows].sum())}

    diverged_at, reason = None, None
    session.model.train()
    bar = session.progress_bar(session.kind)
    for step in range(session.start_step, session.total_steps):
        learning_rate = session.scheduler.get_last_lr()[0]
        outcome = session.forward_backward(forward, step, backward=True)
        record = {"kind": "train", "step": step, "loss": outcome.values["total"], "learning_rate": learning_rate,
                  "grad_norm": outcome.grad_norm}
        session.log.append(record)
        for key, value in (("steps", step), ("losses", record["loss"]), ("learning_rates", learning_rate),
                           ("grad_norms", outcome.grad_norm)):
            history[key].append(value)
        if outcome.reason is not None:
            diverged_at, reason = step, outcome.reason
            break
        session.advance(step, record["loss"], bar, lambda: {"history": history})
    bar.close()
    if run_dir is not None and session.accelerator.is_main_process:
        session.unwrapped.save_pretrained(os.path.join(os.fspath(run_dir), "model"))
    session.accelerator.wait_for_everyone()
    return TrainingHistory(np.asarray(history["steps"], dtype=np.int64), np.asarray(history["losses"]),
                           np.asarray(history["learning_rates"]), np.asarray(history["grad_norms"]),
                           diverged_at, reason, time.perf_counter() - started, session.num_processes)


# ---------------------------------------------------------------------------------------------
# Unlearning
# ---------------------------------------------------------------------------------------------


def _check_unlearn_inputs(model, objective, forget, retain, preferred, config) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a markovsim.losses.Objective, got {type(objective).__name__}")
    _check_config(config)
    check_model_data(model, _check_sequences(forget, "forget"), "forget")
    if objective.retain is not None:
        if retain is None:
            raise ValueError(f"objective has retain term {objective.retain!r}: pass a retain SequenceSet")
        check_model_data(model, _check_sequences(retain, "retain"), "retain")
    if objective.forget == "dpo":
        check_model_data(model, _check_sequences(preferred, "preferred"), "preferred")
        if len(preferred) != len(forget):
            raise ValueError(f"preferred must pair each forget sequence with one preferred response: "
                             f"got {len(preferred)} preferred for {len(forget)} forget sequences")


def unlearn(model, objective: Objective, forget: SequenceSet, retain: SequenceSet | None = None,
            config: TrainConfig = PAPER_UNLEARNING, evaluator: Evaluator | None = None, run_dir=None,
            resume: bool | str = False, preferred: SequenceSet | None = None) -> Trajectory:
    """Unlearn ``forget`` from ``model`` (in place) with ``objective``; evaluate along the way.

    Each step takes a global forget batch of ``config.batch_size`` sequences (and a retain batch of
    ``retain_batch_size`` when the objective has a retain term) and minimises
    ``forget_weight * mean L_f + retain_weight * retain term`` (see :mod:`llm.objective`).

    Args:
        model: the starting model (the reference, e.g. the pre-trained model). When resuming, pass
            the same starting model: its weights are checked against the checkpoint's.
        objective: e.g. ``markovsim.losses.get_objective("NPO", beta=0.2)``.
        forget: forget training sequences (non-empty).
        retain: retain training sequences (needed for a retain term).
        config: optimisation settings (``PAPER_UNLEARNING``: 50 steps, batch 4, lr 5e-4, eval every step).
        evaluator: test-set metrics (default: ``Evaluator`` on forget + retain with the starting
            model as reference).
        run_dir: folder for metrics.jsonl, trajectory.json/.npz, checkpoints/ and model/.
        resume: True = continue from the newest checkpoint in run_dir; a path = that checkpoint.
        preferred: DPO only: one preferred response per forget sequence (row-aligned).
    Returns:
        a ``Trajectory``: steps, per-component metrics (``COMPONENT_METRICS`` plus the evaluator's
        extra ``kl_exact_*``; ``power_share`` as in ``markovsim.dynamics.gradient_diagnostics``, see
        ``_Unlearning.power_share``), the loss, and ``diverged_at``.
    """
    _check_unlearn_inputs(model, objective, forget, retain, preferred, config)
    if evaluator is not None and not isinstance(evaluator, Evaluator):
        raise TypeError(f"evaluator must be an llm.evaluate.Evaluator or None, got {type(evaluator).__name__}")
    with _threads(config.num_threads):
        return _Unlearning(model, objective, forget, retain, preferred, config, evaluator, run_dir).run(resume)


class _Unlearning:
    """The state of one unlearning run (see :func:`unlearn`)."""

    def __init__(self, model, objective, forget, retain, preferred, config, evaluator, run_dir):
        self.objective, self.config, self.run_dir = objective, config, run_dir
        self.started = time.perf_counter()
        needs_retain = objective.retain is not None
        self.forget = encode(forget, "response")
        self.retain = encode(retain, "response") if needs_retain else None
        self.preferred = encode(preferred, "response") if objective.forget == "dpo" else None
        self.session = _Session(model, config, config.total_steps(len(forget)), run_dir, "unlearn",
                                ("total", "forget", "retain", "logp_per_token"))
        bf16, size = self.session.bf16, config.eval_batch_size
        self.forget_ref, self.preferred_ref = self._reference_logps(model, objective, size, bf16)  # (n_f,) float64
        self.reference = None
        if objective.retain == "kl":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if evaluator is None:
            sets = [forget] + ([retain] if retain is not None else [])
            evaluator = Evaluator(concatenate(sets), reference=model, batch_size=size, bf16=bf16)
        self.evaluator = evaluator
        self.names = tuple(evaluator.component_names)
        self.diagnostics = None
        if config.track_forget_weights or config.track_power_share:
            plan = DiagnosticsPlan.build(self.names, self.forget, retain, self.retain, config.diagnostics_max_sequences,
                                         config.seed)
            self.diagnostics = Diagnostics(objective, self.names, plan, self.forget, self.retain, self.preferred,
                                           self.forget_ref, self.preferred_ref, self.reference, size, bf16,
                                           config.track_forget_weights, config.track_power_share)
        # theta_0 for ||theta_t - theta_0|| (NPO paper, Theorem 2): one copy of the trainable parameters
        self.start_parameters = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def _reference_logps(self, model, objective, batch_size, bf16):
        """Reference log-likelihoods of the forget (and preferred) sets, computed once from the starting model."""
        if objective.forget not in ("npo", "dpo"):
            return None, None
        try:
            forget = sequence_logps_batched(model, self.forget, batch_size, bf16)[0]
            preferred = (sequence_logps_batched(model, self.preferred, batch_size, bf16)[0]
                         if self.preferred is not None else None)
        except NonFiniteLogitsError as error:
            raise ValueError("the starting model gives NaN/inf log-probabilities, so it cannot serve as the "
                             "reference; check its weights") from error
        return forget, preferred

    def forward(self, step: int) -> dict:
        """This process's shares of the objective on step ``step``'s global batch."""
        config, session = self.config, self.session
        rank, world, device = session.accelerator.process_index, session.num_processes, session.device
        forget_rows = batch_indices(len(self.forget), config.batch_size, step, config.seed, FORGET_STREAM)
        local = shard(forget_rows, rank, world)
        retain_batch, counts = None, BatchCounts(len(forget_rows))
        if self.retain is not None:
            retain_rows = batch_indices(len(self.retain), config.retain_batch_size or config.batch_size, step,
                                        config.seed, RETAIN_STREAM)
            retain_batch = self.retain.batch(shard(retain_rows, rank, world), device)
            counts = BatchCounts(len(forget_rows), len(retain_rows), int(self.retain.num_label_tokens[retain_rows].sum()))
        batch = UnlearningBatch(
            self.forget.batch(local, device), None if self.forget_ref is None else self.forget_ref[local].to(device),
            counts, retain_batch,
            None if self.preferred is None else self.preferred.batch(local, device),
            None if self.preferred_ref is None else self.preferred_ref[local].to(device))
        terms = objective_terms(session.model, self.objective, batch, self.reference)
        per_token = (terms.forget_logps / terms.forget_num_tokens).sum() / counts.forget_sequences
        return {"total": terms.total, "forget": terms.forget,
                "retain": terms.retain if terms.retain is not None else 0.0, "logp_per_token": per_token}

    def evaluate(self, step: int, outcome: _StepOutcome, finite: bool) -> dict:
        """The evaluation record of ``step`` (computed on the main process, shared with the others)."""
        from accelerate.utils import broadcast_object_list

        record = None
        if self.session.accelerator.is_main_process:
            metrics = self._metrics() if finite else {}
            record = {"kind": "eval", "step": step, "loss": outcome.values["total"],
                      "parameter_distance": self.parameter_distance(),
                      "metrics": {k: [float(x) for x in v] for k, v in metrics.items()}}
        if self.session.num_processes > 1:
            record = broadcast_object_list([record], from_process=0)[0]
        return record

    def parameter_distance(self) -> float:
        """``||theta_t - theta_0||`` over the trainable parameters (the simulator's ``parameter_distance``)."""
        current = [p.detach() for p in self.session.unwrapped.parameters() if p.requires_grad]
        with torch.no_grad():
            squares = sum(float(((c.to(torch.float64) - s.to(c.device, torch.float64)) ** 2).sum())
                          for c, s in zip(current, self.start_parameters))
        return math.sqrt(squares)

    def _metrics(self) -> dict[str, np.ndarray]:
        model = self.session.unwrapped
        metrics = self.evaluator.evaluate(model)
        if self.diagnostics is not None:
            metrics |= self.diagnostics(model)
        return metrics

    def run(self, resume) -> Trajectory:
        session, config = self.session, self.config
        records = list(session.begin(resume).get("records", []))
        diverged_at, reason = None, None
        session.model.train()
        bar = session.progress_bar(f"unlearn {self.objective.forget}")
        for step in range(session.start_step, session.total_steps + 1):
            final = step == session.total_steps
            learning_rate = session.scheduler.get_last_lr()[0]
            outcome = session.forward_backward(self.forward, step, backward=not final)
            reason = outcome.reason or self._threshold(outcome)
            if step % config.eval_every == 0 or final or reason is not None:
                records.append(self.evaluate(step, outcome, finite=outcome.reason is None))
                session.log.append(records[-1])
            if reason is not None:
                diverged_at = step
                break
            if final:
                break
            values = outcome.values
            session.log.append({"kind": "train", "step": step, "loss": values["total"], "forget": values["forget"],
                                "retain": values["retain"], "forget_logp_per_token": values["logp_per_token"],
                                "learning_rate": learning_rate, "grad_norm": outcome.grad_norm})
            session.advance(step, values["total"], bar, lambda: {"records": records})
        bar.close()
        trajectory = self._trajectory(records, diverged_at, reason)
        self._write(trajectory)
        return trajectory

    def _threshold(self, outcome: _StepOutcome) -> str | None:
        threshold, value = self.config.divergence_logp_per_token, outcome.values["logp_per_token"]
        if threshold is not None and value < threshold:
            return f"forget log-likelihood per token {value:.3g} fell below {threshold}"
        return None

    def _trajectory(self, records: list[dict], diverged_at, reason) -> Trajectory:
        extra = sorted({k for r in records for k in r["metrics"]} - set(COMPONENT_METRICS))
        metrics = {}
        for name in tuple(COMPONENT_METRICS) + tuple(extra):
            rows = [r["metrics"].get(name, [math.nan] * len(self.names)) for r in records]
            metrics[name] = np.asarray(rows, dtype=np.float64).reshape(len(records), len(self.names))
        info = {"objective": dataclasses.asdict(self.objective), "config": _config_state(self.config),
                "model": type(self.session.unwrapped).__name__, "num_processes": self.session.num_processes,
                "wall_seconds": time.perf_counter() - self.started, "side": "llm"}
        return Trajectory(np.asarray([r["step"] for r in records], dtype=np.int64), self.names, metrics,
                          {"loss": np.asarray([r["loss"] for r in records], dtype=np.float64),
                           "parameter_distance": np.asarray([r.get("parameter_distance", math.nan) for r in records],
                                                            dtype=np.float64)},
                          diverged_at, reason, info)

    def _write(self, trajectory: Trajectory) -> None:
        session = self.session
        if self.run_dir is not None and session.accelerator.is_main_process:
            trajectory.save(os.path.join(os.fspath(self.run_dir), "trajectory"), self.config)
            session.unwrapped.save_pretrained(os.path.join(os.fspath(self.run_dir), "model"))
        session.accelerator.wait_for_everyone()
