"""Pre-training and unlearning of N same-architecture replicas as one computation.

:func:`pretrain_replicas` and :func:`unlearn_replicas` run N copies of :func:`llm.train.pretrain` /
:func:`llm.train.unlearn` at once: replica i has its own starting model, ``TrainConfig`` (seed =
batch order, learning rate, betas, eps, weight decay, divergence threshold) and, when unlearning,
its own ``Objective``. Each step:

    batches_i  = the single run's batch of step k for seed_i         (llm.data.batch_indices)
    logits_i   = ReplicaStack.logits(batches)[i]                      one stacked call (or a loop)
    loss_i     = llm.objective.objective_terms on logits_i           the single run's loss code
    grads      = d(sum_i loss_i)/d(stacked parameters)               one backward pass
    update     = StackedAdamW on the replicas still active

so replica i returns what the single run with its settings returns (same batches, same metrics;
tested to rtol 1e-5 in float32 on CPU). When every objective has a sequence forget loss and no retain
term, an NLL or a KL one (GA, NPO, SimNPO: the paper's setting; GradDiff, NPO+RT, SimNPO+RT; NPO+KL,
SimNPO+KL) and the route is batched, the loop over replicas is replaced by one grouped computation
(``llm.replica_forget.BatchedForget``: one gather of forget and retain rows, one forward, one loss
call per group of equal objectives, one host sync per step), which is what makes many replicas cheap
on a GPU. A replica that
meets NaN/inf (or its divergence threshold) records ``diverged_at`` and stops updating; the others go on.

Evaluation (test-set KLs, forget weights, power share) of all recording replicas runs in batched
passes over the stack with the single run's formulas (``llm.replica_evaluation``; for the test set,
one ``ReplicaStack.logits`` call per chunk for all replicas; for the power share, one backward pass
per component and chunk for all replicas); ``evaluation="sequential"`` evaluates replica by
replica on a scratch model instead (the same metrics; on a 2-core CPU, where evaluation is
compute-bound, faster with a large test set, slower on a small subsample).

Checkpoints and exact resume (``run_dir``, ``TrainConfig.checkpoint_every`` / ``keep_checkpoints``,
``resume``): ``run_dir/checkpoints/step-*/state.pt`` (``llm.checkpoint``'s layout and atomic writer)
holds the stacked parameters, the stacked AdamW state, and per replica its records, divergence,
starting-model fingerprint, config and objective; a run resumed from it continues with exactly
the numbers of the uninterrupted run (tested). At the end ``run_dir/replica-<i:03d>/trajectory.*``
holds replica i's ``Trajectory``.

Not (yet) supported: data parallelism, bf16 autocast (replicas run in float32), ``preferred`` (DPO)
sets. The settings that must agree across replicas are :data:`SHARED_FIELDS`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from markovsim.config import divergence_reason
from markovsim.data import SequenceSet, concatenate
from markovsim.losses import NEEDS_REFERENCE, Objective
from markovsim.progress import progress_iter
from markovsim.runtime import torch_threads
from markovsim.trajectory import Trajectory

from .checkpoint import parameter_fingerprint
from .config import PAPER_UNLEARNING, TrainConfig, config_state
from .data import FORGET_STREAM, RETAIN_STREAM, batch_indices, merge_batches
from .diagnostics import Diagnostics, DiagnosticsPlan
from .evaluate import Evaluator, model_sequence_logps_batched
from .logps import NonFiniteLogitsError
from .objective import BatchCounts, UnlearningBatch, objective_terms
from .replica_checkpoints import check_run_dir, replica_folder, restore_replicas, save_replicas
from .replica_common import (
    LOGITS_FAILURE,
    PER_REPLICA_FIELDS,
    SHARED_FIELDS,
    ReplayLogits,
    check_models,
    replica_configs,
    replica_device,
    replica_learning_rates,
    replica_sets,
    stacked_optimizer,
)
from .replica_evaluation import replica_diagnostics, replica_test_metrics
from .replica_forget import BatchedForget
from .replica_pretraining import pretrain_replicas
from .replicas import ReplicaStack, clip_replica_grads
from .runtime import host_to_device
from .unlearning import trajectory_from_records

# How unlearn_replicas evaluates: all replicas in batched passes, or one by one.
EVALUATIONS = ("batched", "sequential")

__all__ = ["CHECKPOINT_KIND", "EVALUATIONS", "PER_REPLICA_FIELDS", "SHARED_FIELDS", "replica_configs",
           "pretrain_replicas", "replica_folder", "unlearn_replicas"]

# The run kind recorded in (and required of) an unlearning-replicas checkpoint.
CHECKPOINT_KIND = "unlearn_replicas"


# ---------------------------------------------------------------------------------------------
# Unlearning
# ---------------------------------------------------------------------------------------------


def unlearn_replicas(models, objectives: Sequence[Objective], forget: SequenceSet | Sequence[SequenceSet],
                     retain: SequenceSet | Sequence[SequenceSet] | None = None,
                     configs: TrainConfig | Sequence[TrainConfig] = PAPER_UNLEARNING,
                     evaluators: Evaluator | Sequence[Evaluator] | None = None,
                     route: str | None = None, evaluation: str = "batched", run_dir=None,
                     resume: bool | str = False) -> list[Trajectory]:
    """:func:`llm.train.unlearn` of N models (in place) with N objectives, as one computation.

    Args:
        models: N >= 1 starting models of one architecture (each is its own replica's reference).
        objectives: N ``markovsim.losses.Objective`` (one per replica; methods may differ).
        forget, retain: the training sets: one ``SequenceSet`` for every replica, or one per replica (each
            seed its own sampled data; the forget sets all of one size, the retain sets too). Replica i's
            default evaluator, reference log-likelihoods and diagnostics then use its own sets; the
            loop-free step gathers every replica's rows from their concatenation.
        configs: one ``TrainConfig`` or N (differing only in ``PER_REPLICA_FIELDS``).
        evaluators: one ``Evaluator`` for all, N, or None (the single run's default per replica:
            forget + retain with that replica's starting model as the reference).
        route: ``ReplicaStack`` route (None = the architecture's default).
        evaluation: ``"batched"`` (all replicas in batched passes, ``llm.replica_evaluation``) or
            ``"sequential"`` (replica by replica on a scratch model, the single run's code). Same
            metrics; on a 2-core CPU sequential measured ~20% faster with a 400-sequence test set and
            batched ~25% faster on a 64-sequence subsample (benchmarks/RESULTS.md, "Fourth pass").
        run_dir: folder for ``checkpoints/`` (every ``configs[0].checkpoint_every`` steps, newest
            ``keep_checkpoints`` kept) and, at the end, ``replica-<i:03d>/trajectory.*``; None = no files.
        resume: True = continue from the newest checkpoint in ``run_dir``; a path = that checkpoint. Pass
            the same starting models, objectives, configs and evaluators as the interrupted run (models,
            configs and objectives are checked against the checkpoint).
    Returns: N ``Trajectory``; replica i has the content of ``unlearn(models[i], objectives[i],
        forget, retain, configs[i], evaluators[i])`` (``forget[i]``, ``retain[i]`` when one per replica;
        ``info`` adds ``replica`` and ``route``).
    """
    models = check_models(models)
    configs = replica_configs(configs, len(models))
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    objectives = list(objectives)
    if len(objectives) != len(models):
        raise ValueError(f"got {len(objectives)} objectives for {len(models)} replicas; pass one per replica")
    for objective in objectives:
        if not isinstance(objective, Objective):
            raise TypeError(f"objectives must be markovsim.losses.Objective, got {type(objective).__name__}")
        if objective.forget == "dpo":
            raise ValueError("dpo (preferred responses) is not supported by unlearn_replicas yet; "
                             "use llm.train.unlearn")
        if objective.retain is not None and retain is None:
            raise ValueError(f"objective {objective} has a retain term: pass a retain SequenceSet")
    if evaluators is None or isinstance(evaluators, Evaluator):
        evaluators = [evaluators] * len(models)
    if len(evaluators) != len(models):
        raise ValueError(f"got {len(evaluators)} evaluators for {len(models)} replicas; pass one, N or None")
    checkpoint = check_run_dir(run_dir, resume)
    with torch_threads(configs[0].num_threads):
        state = _Unlearning(models, objectives, forget, retain, configs, list(evaluators), route, evaluation, run_dir)
        if checkpoint is not None:
            state.restore(checkpoint)
        return state.run()


class _Replica:
    """What one unlearning replica needs besides the shared stack: objective, reference, evaluation."""

    def __init__(self, model, objective, config, evaluator, default_test, retain, encoded_forget, encoded_retain):
        self.objective, self.config = objective, config
        self.encoded_forget, self.encoded_retain = encoded_forget, encoded_retain  # this replica's own sets
        size = config.eval_batch_size
        self.forget_ref = (model_sequence_logps_batched(model, encoded_forget, size)[0]
                           if objective.forget in NEEDS_REFERENCE else None)  # (n_f,) float64
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if objective.retain == "kl" else None
        if evaluator is None:  # the single run's default; one shared test set, so one batched pass for all
            evaluator = Evaluator(default_test, reference=model, batch_size=size)
        self.evaluator, self.names = evaluator, tuple(evaluator.component_names)
        self.diagnostics = None
        if config.track_forget_weights or config.track_power_share:
            retain_encoded = encoded_retain if objective.retain is not None else None
            plan = DiagnosticsPlan.build(self.names, encoded_forget, retain, retain_encoded,
                                         config.diagnostics_max_sequences, config.seed)
            self.diagnostics = Diagnostics(objective, self.names, plan, encoded_forget, retain_encoded, None,
                                           self.forget_ref, None, self.reference, size, False,
                                           config.track_forget_weights, config.track_power_share)
        self.records, self.diverged_at, self.reason = [], None, None

    def identity(self, fingerprint: list[float]) -> dict:
        """What a checkpoint checks on resume: starting weights, settings and objective."""
        return {"fingerprint": fingerprint, "config": config_state(self.config),
                "objective": dataclasses.asdict(self.objective)}

    def run_state(self, fingerprint: list[float]) -> dict:
        """What a checkpoint keeps of this replica (plain values, ``torch.load(weights_only=True)``-safe)."""
        return {"records": self.records, "diverged_at": self.diverged_at, "reason": self.reason,
                **self.identity(fingerprint)}


class _Unlearning:
    """The state of N unlearning runs (see :func:`unlearn_replicas`)."""

    def __init__(self, models, objectives, forget, retain, configs, evaluators, route, evaluation="batched",
                 run_dir=None):
        self.configs, self.started, self.models = configs, time.perf_counter(), models
        self.evaluation, self.run_dir, self.start_step = evaluation, run_dir, 0
        # one set for all replicas, or one per replica (joined: what the loop-free step gathers from)
        self.forget = replica_sets(forget, len(models), "forget")
        self.retain = replica_sets(retain, len(models), "retain")
        self.total_steps = configs[0].total_steps(len(self.forget.sets[0]))
        self.stack = ReplicaStack(models, route, replica_device(configs[0]))
        self.optimizer = stacked_optimizer(self.stack, configs)
        tests = {}  # the single run's default test set, forget + retain: one object per distinct pair
        for pair in zip(self.forget.sets, self.retain.sets):
            tests.setdefault(tuple(map(id, pair)), concatenate([pair[0]] + ([pair[1]] if pair[1] is not None else [])))
        self.replicas = [_Replica(m, o, c, e, tests[id(f), id(r)], r, own_f, own_r)
                         for m, o, c, e, f, r, own_f, own_r in zip(models, objectives, configs, evaluators,
                                                                   self.forget.sets, self.retain.sets, self.forget.own,
                                                                   self.retain.own)]
        self.scratch = copy.deepcopy(models[0]).to(self.stack.device).train()
        # starting-model fingerprints identify a run's replicas in its checkpoints (only needed with files)
        self.fingerprints = [parameter_fingerprint(m) for m in models] if run_dir is not None else None
        self.batched_forget = None  # the loop-free step (llm.replica_forget) where every objective allows it
        if BatchedForget.applies(self.stack, objectives):
            self.batched_forget = BatchedForget(self.stack, objectives, configs, self.forget.joined,
                                                [r.forget_ref for r in self.replicas], self.forget.offsets,
                                                self.retain.joined, self.retain.offsets,
                                                [r.reference for r in self.replicas])
        self.start_parameters = [p.detach().clone() for p in self._trainable()]  # (N, ...) each

    def batch(self, index: int, step: int) -> UnlearningBatch:
        """Replica ``index``'s step-``step`` rows, exactly as the single run draws them."""
        replica, device = self.replicas[index], self.stack.device
        config, forget, retain = replica.config, replica.encoded_forget, replica.encoded_retain
        forget_rows = batch_indices(len(forget), config.batch_size, step, config.seed, FORGET_STREAM)
        retain_batch, counts = None, BatchCounts(len(forget_rows))
        if replica.objective.retain is not None:
            retain_rows = batch_indices(len(retain), config.retain_batch_size or config.batch_size, step,
                                        config.seed, RETAIN_STREAM)
            retain_batch = retain.batch(retain_rows, device)
            retain_tokens = int(retain.num_label_tokens[retain_rows].sum())
            counts = BatchCounts(len(forget_rows), len(retain_rows), retain_tokens)
        reference = None if replica.forget_ref is None else replica.forget_ref[forget_rows].to(device)
        return UnlearningBatch(forget.batch(forget_rows, device), reference, counts, retain_batch)

    def step_values(self, step: int, backward: bool) -> tuple[list[dict], list[float]]:
        """Every replica's ``{"total", "forget", "retain", "logp_per_token"}`` (floats; NaN on failure) and
        its gradient norm before clipping (NaN without ``backward``); with ``backward`` also the stacked
        gradients of the finite totals of active replicas, clipped per replica."""
        if self.batched_forget is not None:
            result = self._batched_step_values(step, backward)
            if result is not None:
                return result
        batches = [self.batch(i, step) for i in range(len(self.replicas))]
        merged = [merge_batches(_parts(r.objective, b), int(b.forget["input_ids"][0, 0]))[0]
                  for r, b in zip(self.replicas, batches)]
        with contextlib.nullcontext() if backward else torch.no_grad():
            all_logits = self.stack.logits(merged)  # N x (rows, t, vocab)
            values, totals = [], []
            for replica, batch, logits in zip(self.replicas, batches, all_logits):
                terms = self._terms(replica, batch, logits)
                values.append(terms[0])
                if terms[1] is not None and replica.diverged_at is None and math.isfinite(terms[0]["total"]):
                    totals.append(terms[1])
        self.stack.zero_grad()
        if backward and totals:
            torch.stack(totals).sum().backward()
        return values, self._clipped_norms(backward).tolist()

    def _batched_step_values(self, step: int, backward: bool) -> tuple[list[dict], list[float]] | None:
        """:meth:`step_values` by ``llm.replica_forget.BatchedForget``: no per-replica loop and one host sync
        per step (forward, backward and clipping are queued first; values and norms come back together).
        None when some replica's logits are not finite (the per-replica path then isolates it)."""
        with contextlib.nullcontext() if backward else torch.no_grad():
            totals, values = self.batched_forget(step)  # (N,), (N, 3) on the device
        self.stack.zero_grad()
        if backward:
            active = host_to_device(torch.tensor([r.diverged_at is None for r in self.replicas]), totals.device)
            included = active & torch.isfinite(totals.detach())  # (N,)
            # where() passes a zero gradient to the rows left out, as indexing the included rows would
            torch.where(included, totals, torch.zeros_like(totals)).sum().backward()
        rows = torch.cat([values, self._clipped_norms(backward).to(values)[:, None]], 1).tolist()  # one sync
        if not all(math.isfinite(row[2]) and math.isfinite(row[3]) for row in rows):  # non-finite logits
            self.stack.zero_grad()
            return None
        values = [dict(zip(("total", "forget", "logp_per_token", "retain"), row[:4])) for row in rows]
        return values, [row[4] for row in rows]

    def _clipped_norms(self, backward: bool) -> torch.Tensor:
        """Clip each replica's gradient (``TrainConfig.max_grad_norm``); the norms before clipping (N,) on the
        device, NaN without ``backward``."""
        if not backward:
            return torch.full((len(self.replicas),), math.nan, device=self.stack.device)
        return clip_replica_grads(self.stack.parameters, self.configs[0].max_grad_norm)

    @staticmethod
    def _terms(replica: _Replica, batch: UnlearningBatch, logits) -> tuple[dict, torch.Tensor | None]:
        try:
            terms = objective_terms(ReplayLogits(logits), replica.objective, batch, replica.reference)
        except NonFiniteLogitsError:
            return dict.fromkeys(("total", "forget", "retain", "logp_per_token"), math.nan), None
        count = batch.counts.forget_sequences
        per_token = (terms.forget_logps / terms.forget_num_tokens).sum() / count
        values = {"total": float(terms.total.detach().double()), "forget": float(terms.forget.double()),
                  "retain": 0.0 if terms.retain is None else float(terms.retain.double()),
                  "logp_per_token": float(per_token.double())}
        return values, terms.total

    def restore(self, path: str) -> None:
        """Continue from the checkpoint at ``path`` after checking it belongs to this run."""
        expected = [r.identity(f) for r, f in zip(self.replicas, self.fingerprints)]
        self.start_step, saved = restore_replicas(path, CHECKPOINT_KIND, self.stack, self.optimizer, expected)
        for replica, entry in zip(self.replicas, saved):
            replica.records, replica.diverged_at, replica.reason = list(entry["records"]), entry["diverged_at"], \
                entry["reason"]

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` optimisation steps (``llm.checkpoint``'s atomic writer, one process)."""
        entries = [r.run_state(f) for r, f in zip(self.replicas, self.fingerprints)]
        save_replicas(self.run_dir, step, self.stack, self.optimizer, CHECKPOINT_KIND, entries,
                      self.configs[0].keep_checkpoints)

    def checkpoint_due(self, step: int) -> bool:
        every = self.configs[0].checkpoint_every
        return self.run_dir is not None and every is not None and step % every == 0 and step < self.total_steps

    def run(self) -> list[Trajectory]:
        steps = range(self.start_step, self.total_steps + 1)
        description = f"unlearning {len(self.replicas)} replicas"
        for step in progress_iter(steps, len(steps), description, self.configs[0].progress):
            if all(r.diverged_at is not None for r in self.replicas):
                break
            final = step == self.total_steps
            learning_rates = replica_learning_rates(self.configs, step, self.total_steps)
            values, grad_norms = self.step_values(step, backward=not final)
            self._after_forward(step, final, values, grad_norms)
            if final:
                break
            self.optimizer.step(learning_rates, [r.diverged_at is None for r in self.replicas])
            if self.checkpoint_due(step + 1):
                self.save(step + 1)
        self.stack.zero_grad()
        for i, model in enumerate(self.models):
            self.stack.write_into(model, i)
        trajectories = [self._trajectory(i) for i in range(len(self.replicas))]
        if self.run_dir is not None:
            for i, trajectory in enumerate(trajectories):
                os.makedirs(replica_folder(self.run_dir, i), exist_ok=True)
                trajectory.save(os.path.join(replica_folder(self.run_dir, i), "trajectory"), self.configs[i])
        return trajectories

    def _after_forward(self, step: int, final: bool, values: list[dict], grad_norms: list[float]) -> None:
        """The single run's bookkeeping of one step for every active replica: divergence check and
        evaluation record, the evaluations of all recording replicas batched (``llm.replica_evaluation``)."""
        recording, reasons = {}, {}
        for i, replica in enumerate(self.replicas):
            if replica.diverged_at is not None:
                continue
            logits_failed = math.isnan(values[i]["total"]) and math.isnan(values[i]["logp_per_token"])
            # the single run's two checks (llm.session, llm.unlearning), both markovsim.config.divergence_reason
            reasons[i] = LOGITS_FAILURE if logits_failed else (
                divergence_reason(values[i]["total"], grad_norm=None if final else grad_norms[i])
                or divergence_reason(values[i]["total"], values[i]["logp_per_token"],
                                     threshold=replica.config.divergence_logp_per_token))
            if step % replica.config.eval_every == 0 or final or reasons[i] is not None:
                recording[i] = not logits_failed
        metrics = self._metrics([i for i, finite in recording.items() if finite])
        distances = self._parameter_distances(list(recording))
        for i in recording:
            self.replicas[i].records.append(self._record(i, step, values[i]["total"], metrics.get(i, {}),
                                                         distances[i]))
        for i, reason in reasons.items():
            if reason is not None:
                self.replicas[i].diverged_at, self.replicas[i].reason = step, reason

    def _metrics(self, indices: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """``{i: evaluator metrics | diagnostics}`` of replicas ``indices``: batched passes over the stack."""
        if self.evaluation == "sequential":
            return {i: self._sequential_metrics(i) for i in indices}
        metrics = replica_test_metrics(self.stack, [r.evaluator for r in self.replicas], indices, self.scratch)
        diagnostics = {i: self.replicas[i].diagnostics for i in indices if self.replicas[i].diagnostics is not None}
        batched = replica_diagnostics(self.stack, diagnostics)
        if batched is None:  # layouts differ: the single run's Diagnostics, replica by replica
            batched = {}
            for i, d in diagnostics.items():
                self.stack.write_into(self.scratch, i)
                batched[i] = d(self.scratch)
        for i, values in batched.items():
            metrics[i] |= values
        return metrics

    def _sequential_metrics(self, index: int) -> dict[str, np.ndarray]:
        """Replica ``index``'s metrics from the single run's ``Evaluator`` / ``Diagnostics`` on a scratch model."""
        replica = self.replicas[index]
        self.stack.write_into(self.scratch, index)
        metrics = replica.evaluator.evaluate(self.scratch)
        return metrics | (replica.diagnostics(self.scratch) if replica.diagnostics is not None else {})

    def _parameter_distances(self, indices: list[int]) -> dict[int, float]:
        """``{i: ||theta_i - theta_i(0)||_2}`` in float64 for replicas ``indices`` (one host sync)."""
        if not indices:
            return {}
        rows = torch.tensor(indices, device=self.stack.device)
        with torch.no_grad():
            squares = sum(((current[rows].to(torch.float64) - start[rows].to(torch.float64)) ** 2).flatten(1).sum(1)
                          for current, start in zip(self._trainable(), self.start_parameters))  # (len(indices),)
        return dict(zip(indices, squares.sqrt().tolist()))

    @staticmethod
    def _record(index: int, step: int, loss: float, metrics: dict, distance: float) -> dict:
        return {"step": step, "loss": loss, "parameter_distance": distance,
                "metrics": {k: [float(x) for x in v] for k, v in metrics.items()}}

    def _trainable(self) -> list[torch.Tensor]:
        """The stacked trainable parameters (N, ...) in the models' parameter order (detached)."""
        names = [name for name, p in self.scratch.named_parameters() if p.requires_grad]
        return [self.stack.parameters[name].detach() for name in names]

    def _trajectory(self, index: int) -> Trajectory:
        """Replica ``index``'s records as the single run assembles them (``llm.train``)."""
        replica = self.replicas[index]
        info = {"objective": dataclasses.asdict(replica.objective), "config": config_state(replica.config),
                "model": type(self.scratch).__name__, "num_processes": 1,
                "wall_seconds": time.perf_counter() - self.started, "side": "llm", "replica": index,
                "route": self.stack.route, "num_replicas": len(self.replicas)}
        return trajectory_from_records(replica.records, replica.names, replica.diverged_at, replica.reason, info)


def _parts(objective: Objective, batch: UnlearningBatch) -> list[dict]:
    """The row groups of ``objective_terms``'s single forward pass, in its order: forget, retain."""
    return [batch.forget] + ([batch.retain] if objective.retain is not None else [])
