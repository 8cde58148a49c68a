"""Pre-training and retraining: token-mean cross-entropy on the full likelihood, on a :class:`Session`.

The loss covers s_1..s_L (labels on every state, the first one predicted from BOS); the paper's official
code has no BOS and covers s_2..s_L (docs/theory.md, "The paper's synthetic experiment"). The retrained
baseline is pre-training on the retain data only. Models are trained in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from markovsim.data import SequenceSet
from markovsim.runtime import torch_threads

from .config import PAPER_PRETRAINING, TrainConfig
from .data import batch_indices, encode, shard
from .logps import labelled_token_logps, model_logits
from .models import check_model_data
from .session import Session, check_config, check_sequences

__all__ = ["TrainingHistory", "pretrain", "retrain"]


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
    config = check_config(config)
    check_model_data(model, check_sequences(sequences, "sequences"))
    with torch_threads(config.num_threads):
        return _pretrain(model, sequences, config, run_dir, resume)


def retrain(model, retain: SequenceSet, config: TrainConfig = PAPER_PRETRAINING, run_dir=None,
            resume: bool | str = False) -> TrainingHistory:
    """The retrained baseline: :func:`pretrain` a freshly initialised model on retain data only."""
    return pretrain(model, retain, config, run_dir, resume)


def _pretrain(model, sequences, config, run_dir, resume) -> TrainingHistory:
    started = time.perf_counter()
    encoded = encode(sequences, "all")
    session = Session(model, config, config.total_steps(len(sequences)), run_dir, "pretrain")
    empty = {"steps": [], "losses": [], "learning_rates": [], "grad_norms": []}
    history = session.begin(resume).get("history") or empty

    def forward(step: int) -> dict:
        rows = batch_indices(len(encoded), config.batch_size, step, config.seed)
        local = shard(rows, session.accelerator.process_index, session.num_processes)
        batch = encoded.batch(local, session.device)
        token_logps, _ = labelled_token_logps(model_logits(session.model, batch), batch["labels"])  # (b, t-1)
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
    session.save_final_model()
    return TrainingHistory(np.asarray(history["steps"], dtype=np.int64), np.asarray(history["losses"]),
                           np.asarray(history["learning_rates"]), np.asarray(history["grad_norms"]),
                           diverged_at, reason, time.perf_counter() - started, session.num_processes)
