"""Pre-training / retraining of N same-architecture replicas as one computation (see llm.replica_training)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from markovsim.config import divergence_reason
from markovsim.data import SequenceSet
from markovsim.runtime import torch_threads

from .config import PAPER_PRETRAINING, TrainConfig
from .data import batch_indices, encode
from .logps import NonFiniteLogitsError, labelled_token_logps
from .pretraining import TrainingHistory
from .replica_common import (
    LOGITS_FAILURE,
    check_models,
    replica_configs,
    replica_device,
    replica_learning_rates,
    stacked_optimizer,
)
from .replicas import ReplicaStack, clip_replica_grads

__all__ = ["pretrain_replicas"]


def pretrain_replicas(models, sequences: SequenceSet, configs: TrainConfig | Sequence[TrainConfig] = PAPER_PRETRAINING,
                      route: str | None = None) -> list[TrainingHistory]:
    """:func:`llm.train.pretrain` of every model in ``models`` (in place), as one computation.

    Args:
        models: N >= 1 freshly initialised causal LMs of one architecture (e.g. ``build_model(preset,
            V + 1, L + 1, seed=s)`` for seeds s).
        sequences: the training sequences (the same for every replica).
        configs: one ``TrainConfig`` or N (differing only in ``PER_REPLICA_FIELDS``).
        route: ``ReplicaStack`` route (None = the architecture's default).
    Returns: N ``TrainingHistory``, replica i equal to ``pretrain(models[i], sequences, configs[i])``.
    """
    models = check_models(models)
    configs = replica_configs(configs, len(models))
    with torch_threads(configs[0].num_threads):
        return _PreTraining(models, sequences, configs, route).run()


class _PreTraining:
    """The state of N pre-training runs (see :func:`pretrain_replicas`)."""

    def __init__(self, models, sequences, configs, route):
        self.models, self.configs, self.started = models, configs, time.perf_counter()
        self.encoded = encode(sequences, "all")
        self.total_steps = configs[0].total_steps(len(sequences))
        self.stack = ReplicaStack(models, route, replica_device(configs[0]))
        self.optimizer = stacked_optimizer(self.stack, configs)
        self.history = [{"steps": [], "losses": [], "learning_rates": [], "grad_norms": []} for _ in models]
        self.diverged = [None] * len(models)

    def losses(self, step: int) -> list[torch.Tensor | None]:
        """Each replica's token-mean cross-entropy on its step-``step`` batch (None: NaN/inf logits)."""
        rows = [batch_indices(len(self.encoded), c.batch_size, step, c.seed) for c in self.configs]
        batches = [self.encoded.batch(r, self.stack.device) for r in rows]
        losses = []
        for logits, batch, replica_rows in zip(self.stack.logits(batches), batches, rows):
            try:
                token_logps, _ = labelled_token_logps(logits, batch["labels"])  # (b, t-1)
            except NonFiniteLogitsError:
                losses.append(None)
                continue
            losses.append(-token_logps.sum() / int(self.encoded.num_label_tokens[replica_rows].sum()))
        return losses

    def run(self) -> list[TrainingHistory]:
        for step in range(self.total_steps):
            active = [d is None for d in self.diverged]
            if not any(active):
                break
            learning_rates = replica_learning_rates(self.configs, step, self.total_steps)
            losses = self.losses(step)
            finite = [loss for loss, a in zip(losses, active) if a and loss is not None and torch.isfinite(loss)]
            self.stack.zero_grad()
            if finite:
                torch.stack(finite).sum().backward()
            grad_norms = clip_replica_grads(self.stack.parameters, self.configs[0].max_grad_norm).tolist()
            for i, loss in enumerate(losses):
                if active[i]:
                    self._record(i, step, loss, learning_rates[i], grad_norms[i])
            self.optimizer.step(learning_rates, [d is None for d in self.diverged])
        self.stack.zero_grad()
        for i, model in enumerate(self.models):
            self.stack.write_into(model, i)
        seconds = time.perf_counter() - self.started
        return [TrainingHistory(np.asarray(h["steps"], dtype=np.int64), np.asarray(h["losses"]),
                                np.asarray(h["learning_rates"]), np.asarray(h["grad_norms"]), d,
                                None if d is None else h["reason"], seconds, 1)
                for h, d in zip(self.history, self.diverged)]

    def _record(self, index: int, step: int, loss, learning_rate: float, grad_norm: float) -> None:
        history = self.history[index]
        value = math.nan if loss is None else float(loss.detach().double())
        reason = LOGITS_FAILURE if loss is None else divergence_reason(value, grad_norm=grad_norm)
        grad_norm = math.nan if loss is None else grad_norm
        for key, item in (("steps", step), ("losses", value), ("learning_rates", learning_rate),
                          ("grad_norms", grad_norm)):
            history[key].append(item)
        if reason is not None:
            self.diverged[index], history["reason"] = step, reason
