"""Pre-training / retraining of N same-architecture replicas as one computation (see llm.replica_training)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from markovsim.config import divergence_reason
from markovsim.data import SequenceSet
from markovsim.progress import progress_iter
from markovsim.results import atomic_write_json, metadata_block
from markovsim.runtime import torch_threads

from .checkpoint import parameter_fingerprint
from .config import PAPER_PRETRAINING, TrainConfig, config_state
from .logps import NonFiniteLogitsError, labelled_token_logps
from .models import save_model
from .pretraining import TrainingHistory
from .replica_checkpoints import check_run_dir, replica_folder, restore_replicas, save_replicas
from .replica_common import (
    LOGITS_FAILURE,
    ReplicaRows,
    StackedTokens,
    check_models,
    replica_configs,
    replica_device,
    replica_learning_rates,
    replica_sets,
    stacked_optimizer,
)
from .replicas import ReplicaStack, clip_replica_grads

__all__ = ["CHECKPOINT_KIND", "pretrain_replicas"]


# The run kind recorded in (and required of) a pre-training-replicas checkpoint.
CHECKPOINT_KIND = "pretrain_replicas"


def pretrain_replicas(models, sequences: SequenceSet | Sequence[SequenceSet],
                      configs: TrainConfig | Sequence[TrainConfig] = PAPER_PRETRAINING, route: str | None = None,
                      run_dir=None, resume: bool | str = False) -> list[TrainingHistory]:
    """:func:`llm.train.pretrain` of every model in ``models`` (in place), as one computation.

    Args:
        models: N >= 1 freshly initialised causal LMs of one architecture (e.g. ``build_model(preset,
            V + 1, L + 1, seed=s)`` for seeds s).
        sequences: the training sequences: one ``SequenceSet`` for every replica, or one per replica (each
            seed its own sampled data), all of one size.
        configs: one ``TrainConfig`` or N (differing only in ``PER_REPLICA_FIELDS``).
        route: ``ReplicaStack`` route (None = the architecture's default).
        run_dir: folder for ``checkpoints/`` (every ``configs[0].checkpoint_every`` steps, newest
            ``keep_checkpoints`` kept; ``llm.replica_checkpoints``) and, at the end,
            ``replica-<i:03d>/model`` and ``replica-<i:03d>/history.json``; None = no files.
        resume: True = continue from the newest checkpoint in ``run_dir``; a path = that checkpoint. Pass
            the same starting models and configs as the interrupted run (both are checked).
    Returns: N ``TrainingHistory``, replica i equal to ``pretrain(models[i], sequences, configs[i])``
        (``sequences[i]`` when one per replica).
    """
    models = check_models(models)
    configs = replica_configs(configs, len(models))
    checkpoint = check_run_dir(run_dir, resume)
    with torch_threads(configs[0].num_threads):
        state = _PreTraining(models, sequences, configs, route, run_dir)
        if checkpoint is not None:
            state.restore(checkpoint)
        return state.run()


class _PreTraining:
    """The state of N pre-training runs (see :func:`pretrain_replicas`)."""

    def __init__(self, models, sequences, configs, route, run_dir=None):
        self.models, self.configs, self.started = models, configs, time.perf_counter()
        self.run_dir, self.start_step = run_dir, 0
        self.fingerprints = [parameter_fingerprint(m) for m in models] if run_dir is not None else None
        # one set for all, or the replicas' own sets one after another (replica i's rows start at offsets[i])
        data = replica_sets(sequences, len(models), "sequences", "all")
        self.encoded, self.offsets = data.joined, data.offsets
        self.total_steps = configs[0].total_steps(len(data.own[0]))
        self.stack = ReplicaStack(models, route, replica_device(configs[0]))
        self.rows = ReplicaRows(len(data.own[0]), configs[0].batch_size, [c.seed for c in configs])
        self.tokens = StackedTokens(self.encoded, self.stack.device)
        self.optimizer = stacked_optimizer(self.stack, configs)
        self.history = [{"steps": [], "losses": [], "learning_rates": [], "grad_norms": []} for _ in models]
        self.diverged = [None] * len(models)

    def _identity(self, index: int) -> dict:
        return {"fingerprint": self.fingerprints[index], "config": config_state(self.configs[index])}

    def restore(self, path: str) -> None:
        """Continue from the checkpoint at ``path`` after checking it belongs to this run."""
        expected = [self._identity(i) for i in range(len(self.models))]
        self.start_step, saved = restore_replicas(path, CHECKPOINT_KIND, self.stack, self.optimizer, expected)
        self.history = [dict(entry["history"]) for entry in saved]
        self.diverged = [entry["diverged_at"] for entry in saved]

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` optimisation steps."""
        entries = [{"history": h, "diverged_at": d, **self._identity(i)}
                   for i, (h, d) in enumerate(zip(self.history, self.diverged))]
        save_replicas(self.run_dir, step, self.stack, self.optimizer, CHECKPOINT_KIND, entries,
                      self.configs[0].keep_checkpoints)

    def checkpoint_due(self, step: int) -> bool:
        every = self.configs[0].checkpoint_every
        return self.run_dir is not None and every is not None and step % every == 0 and step < self.total_steps

    def losses(self, step: int) -> tuple[list[float | None], torch.Tensor | list]:
        """Each replica's token-mean cross-entropy on its step-``step`` batch: the values (None: NaN/inf
        logits) and the differentiable losses, an (N,) tensor from the loop-free path (stacked route) or
        a list (per replica; also where some replica's logits are not finite, to isolate it)."""
        rows = self.rows(step) + self.offsets[:, None]  # (N, b) rows of self.encoded
        if self.stack.route != "loop":
            try:
                losses = self._stacked_losses(rows)
                return losses.detach().double().tolist(), losses
            except NonFiniteLogitsError:
                pass
        batches = [self.encoded.batch(r, self.stack.device) for r in rows]
        losses = []
        for logits, batch, replica_rows in zip(self.stack.logits(batches), batches, rows):
            try:
                token_logps, _ = labelled_token_logps(logits, batch["labels"])  # (b, t-1)
            except NonFiniteLogitsError:
                losses.append(None)
                continue
            losses.append(-token_logps.sum() / int(self.encoded.num_label_tokens[replica_rows].sum()))
        return [None if loss is None else float(loss.detach().double()) for loss in losses], losses

    def _stacked_losses(self, rows: np.ndarray) -> torch.Tensor:
        """(N,) losses of every replica's rows (N, b) from one stacked forward, no per-replica loop."""
        counts = self.encoded.num_label_tokens[torch.from_numpy(rows)].sum(1)  # (N,) labelled tokens of each batch
        _, ids, mask, labels = self.tokens.gather(rows)
        logits = self.stack.stacked_batch_logits(ids, mask)  # (N, b, t, vocab)
        token_logps, _ = labelled_token_logps(logits.flatten(0, 1), labels.flatten(0, 1))  # (N b, t-1)
        sums = token_logps.view(*rows.shape, -1).sum((1, 2))  # (N,)
        return -sums / counts.to(device=sums.device, dtype=sums.dtype)

    def run(self) -> list[TrainingHistory]:
        steps = range(self.start_step, self.total_steps)
        description = f"pre-training {len(self.diverged)} replicas"
        for step in progress_iter(steps, len(steps), description, self.configs[0].progress):
            active = [d is None for d in self.diverged]
            if not any(active):
                break
            learning_rates = replica_learning_rates(self.configs, step, self.total_steps)
            values, losses = self.losses(step)
            included = [i for i, (value, a) in enumerate(zip(values, active))
                        if a and value is not None and math.isfinite(value)]
            self.stack.zero_grad()
            if included:
                if isinstance(losses, torch.Tensor):
                    losses[torch.tensor(included, device=losses.device)].sum().backward()
                else:
                    torch.stack([losses[i] for i in included]).sum().backward()
            grad_norms = clip_replica_grads(self.stack.parameters, self.configs[0].max_grad_norm).tolist()
            for i, value in enumerate(values):
                if active[i]:
                    self._record(i, step, value, learning_rates[i], grad_norms[i])
            self.optimizer.step(learning_rates, [d is None for d in self.diverged])
            if self.checkpoint_due(step + 1):
                self.save(step + 1)
        self.stack.zero_grad()
        for i, model in enumerate(self.models):
            self.stack.write_into(model, i)
        seconds = time.perf_counter() - self.started
        histories = [TrainingHistory(np.asarray(h["steps"], dtype=np.int64), np.asarray(h["losses"]),
                                     np.asarray(h["learning_rates"]), np.asarray(h["grad_norms"]), d,
                                     None if d is None else h["reason"], seconds, 1)
                     for h, d in zip(self.history, self.diverged)]
        if self.run_dir is not None:
            self.write_outputs(histories)
        return histories

    def write_outputs(self, histories: list[TrainingHistory]) -> None:
        """``replica-<i>/model`` (``save_pretrained``) and ``replica-<i>/history.json`` (strict JSON), atomically."""
        for i, (model, history, config) in enumerate(zip(self.models, histories, self.configs)):
            folder = replica_folder(self.run_dir, i)
            os.makedirs(folder, exist_ok=True)
            save_model(model, os.path.join(folder, "model"), progress=False)
            document = metadata_block(config_state(config), replica=i, num_replicas=len(self.models),
                                      route=self.stack.route, kind=CHECKPOINT_KIND)
            document["history"] = {**{key: getattr(history, key).tolist()
                                      for key in ("steps", "losses", "learning_rates", "grad_norms")},
                                   "diverged_at": history.diverged_at, "divergence_reason": history.divergence_reason,
                                   "wall_seconds": history.wall_seconds}
            atomic_write_json(os.path.join(folder, "history.json"), document)

    def _record(self, index: int, step: int, loss: float | None, learning_rate: float, grad_norm: float) -> None:
        history = self.history[index]
        value = math.nan if loss is None else loss
        reason = LOGITS_FAILURE if loss is None else divergence_reason(value, grad_norm=grad_norm)
        grad_norm = math.nan if loss is None else grad_norm
        for key, item in (("steps", step), ("losses", value), ("learning_rates", learning_rate),
                          ("grad_norms", grad_norm)):
            history[key].append(item)
        if reason is not None:
            self.diverged[index], history["reason"] = step, reason
