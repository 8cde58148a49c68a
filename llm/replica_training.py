"""Pre-training and unlearning of N same-architecture replicas as one computation (issue 11).

:func:`pretrain_replicas` and :func:`unlearn_replicas` run N copies of :func:`llm.train.pretrain` /
:func:`llm.train.unlearn` at once: replica i has its own starting model, ``TrainConfig`` (seed =
batch order, learning rate, betas, eps, weight decay, divergence threshold) and, when unlearning,
its own ``Objective``. Each step:

    batches_i  = the single run's batch of step k for seed_i         (llm.data.batch_indices)
    logits_i   = ReplicaStack.logits(batches)[i]                      one vmap call (or a loop)
    loss_i     = llm.objective.objective_terms on logits_i           the single run's loss code
    grads      = d(sum_i loss_i)/d(stacked parameters)               one backward pass
    update     = StackedAdamW on the replicas still active

so replica i returns what the single run with its settings returns (same batches, same metrics;
tested to rtol 1e-5 in float32 on CPU). A replica that meets NaN/inf (or its divergence threshold)
records ``diverged_at`` and stops updating; the others go on.

Evaluation (test-set KLs, forget weights, power share) still runs per replica on a scratch model
with the single run's ``Evaluator`` / ``Diagnostics`` code: exact, but not batched.

Not (yet) supported: checkpoints/resume, run directories, data parallelism, bf16 autocast
(replicas run in float32), ``preferred`` (DPO) sets. The settings that must agree across replicas
are :data:`SHARED_FIELDS`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from markovsim.data import SequenceSet, concatenate
from markovsim.losses import Objective
from markovsim.trajectory import COMPONENT_METRICS, Trajectory

from .data import FORGET_STREAM, RETAIN_STREAM, batch_indices, encode, merge_batches
from .diagnostics import Diagnostics, DiagnosticsPlan
from .evaluate import Evaluator, sequence_logps_batched
from .logps import NonFiniteLogitsError, token_log_probs
from .objective import BatchCounts, UnlearningBatch, objective_terms
from .replicas import ReplicaStack, StackedAdamSettings, StackedAdamW, clip_replica_grads
from .train import PAPER_PRETRAINING, PAPER_UNLEARNING, TrainConfig, TrainingHistory

__all__ = ["SHARED_FIELDS", "replica_configs", "pretrain_replicas", "unlearn_replicas"]

# TrainConfig fields that may differ between replicas; every other field must be equal.
PER_REPLICA_FIELDS = ("seed", "learning_rate", "adam_betas", "adam_eps", "weight_decay", "divergence_logp_per_token")
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_REPLICA_FIELDS)
_LOGITS_FAILURE = "the model produced NaN/inf logits"


def replica_configs(configs: TrainConfig | Sequence[TrainConfig], num_replicas: int) -> tuple[TrainConfig, ...]:
    """One ``TrainConfig`` per replica (a single config is repeated); checks the shared fields agree."""
    if num_replicas < 1:
        raise ValueError(f"need at least one replica (N >= 1), got {num_replicas}")
    configs = (configs,) * num_replicas if isinstance(configs, TrainConfig) else tuple(configs)
    if len(configs) != num_replicas:
        raise ValueError(f"got {len(configs)} configs for {num_replicas} replicas; pass one or one per replica")
    for config in configs:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"configs must be llm.train.TrainConfig, got {type(config).__name__}")
    differing = [f for f in SHARED_FIELDS if len({repr(getattr(c, f)) for c in configs}) > 1]
    if differing:
        raise ValueError(f"replicas must share {differing}; only {PER_REPLICA_FIELDS} may differ")
    if configs[0].mixed_precision == "bf16":
        raise ValueError("replicas run in float32; bf16 autocast is not supported yet (use mixed_precision='no')")
    return configs


def _device(config: TrainConfig) -> torch.device:
    wants_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if wants_cuda else "cpu")


@contextlib.contextmanager
def _threads(num_threads: int | None):
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _optimizer(stack: ReplicaStack, configs: tuple[TrainConfig, ...]) -> StackedAdamW:
    settings = StackedAdamSettings(configs[0].optimizer, tuple(tuple(c.adam_betas) for c in configs),
                                   tuple(c.adam_eps for c in configs), tuple(c.weight_decay for c in configs))
    return StackedAdamW(stack.parameters, settings)


def _learning_rate_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """The single run's schedule (``llm.train.learning_rate_factor``, restated so that only the names of
    ``llm.train`` that survive its split are imported): linear warm-up, then constant/linear/cosine."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _learning_rates(configs: tuple[TrainConfig, ...], step: int, total_steps: int) -> list[float]:
    """Each replica's learning rate at ``step``: peak x the schedule's factor (as the single run's LambdaLR)."""
    config = configs[0]
    factor = _learning_rate_factor(step, total_steps, config.schedule, config.warmup_steps)
    return [c.learning_rate * factor for c in configs]


def _check_models(models, name: str = "models") -> list:
    models = list(models)
    if not models:
        raise ValueError(f"{name} is empty: need at least one replica (N >= 1)")
    return models


def _divergence(total: float, grad_norm: float, backward: bool) -> str | None:
    if not math.isfinite(total):
        return f"loss is {total}"
    if backward and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    return None


# ---------------------------------------------------------------------------------------------
# Pre-training / retraining
# ---------------------------------------------------------------------------------------------


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
    models = _check_models(models)
    configs = replica_configs(configs, len(models))
    with _threads(configs[0].num_threads):
        return _PreTraining(models, sequences, configs, route).run()


class _PreTraining:
    """The state of N pre-training runs (see :func:`pretrain_replicas`)."""

    def __init__(self, models, sequences, configs, route):
        self.models, self.configs, self.started = models, configs, time.perf_counter()
        self.encoded = encode(sequences, "all")
        self.total_steps = configs[0].total_steps(len(sequences))
        self.stack = ReplicaStack(models, route, _device(configs[0]))
        self.optimizer = _optimizer(self.stack, configs)
        self.history = [{"steps": [], "losses": [], "learning_rates": [], "grad_norms": []} for _ in models]
        self.diverged = [None] * len(models)

    def losses(self, step: int) -> list[torch.Tensor | None]:
        """Each replica's token-mean cross-entropy on its step-``step`` batch (None: NaN/inf logits)."""
        rows = [batch_indices(len(self.encoded), c.batch_size, step, c.seed) for c in self.configs]
        batches = [self.encoded.batch(r, self.stack.device) for r in rows]
        losses = []
        for logits, batch, replica_rows in zip(self.stack.logits(batches), batches, rows):
            try:
                token_logps, _ = token_log_probs(logits, batch["labels"])  # (b, t-1)
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
            learning_rates = _learning_rates(self.configs, step, self.total_steps)
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
        reason = _LOGITS_FAILURE if loss is None else _divergence(value, grad_norm, True)
        grad_norm = math.nan if loss is None else grad_norm
        for key, item in (("steps", step), ("losses", value), ("learning_rates", learning_rate),
                          ("grad_norms", grad_norm)):
            history[key].append(item)
        if reason is not None:
            self.diverged[index], history["reason"] = step, reason


# ---------------------------------------------------------------------------------------------
# Unlearning
# ---------------------------------------------------------------------------------------------


class _ReplayLogits:
    """A stand-in model for ``objective_terms``: returns one replica's precomputed logits (b, t, vocab)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        if input_ids.shape != self.logits.shape[:2]:
            raise RuntimeError(f"replayed logits {tuple(self.logits.shape)} do not match the batch "
                               f"{tuple(input_ids.shape)}")
        return self


def unlearn_replicas(models, objectives: Sequence[Objective], forget: SequenceSet, retain: SequenceSet | None = None,
                     configs: TrainConfig | Sequence[TrainConfig] = PAPER_UNLEARNING,
                     evaluators: Evaluator | Sequence[Evaluator] | None = None,
                     route: str | None = None) -> list[Trajectory]:
    """:func:`llm.train.unlearn` of N models (in place) with N objectives, as one computation.

    Args:
        models: N >= 1 starting models of one architecture (each is its own replica's reference).
        objectives: N ``markovsim.losses.Objective`` (one per replica; methods may differ).
        forget, retain: the training sets (shared by all replicas).
        configs: one ``TrainConfig`` or N (differing only in ``PER_REPLICA_FIELDS``).
        evaluators: one ``Evaluator`` for all, N, or None (the single run's default per replica:
            forget + retain with that replica's starting model as the reference).
        route: ``ReplicaStack`` route (None = the architecture's default).
    Returns: N ``Trajectory``; replica i has the content of ``unlearn(models[i], objectives[i],
        forget, retain, configs[i], evaluators[i])`` (``info`` adds ``replica`` and ``route``).
    """
    models = _check_models(models)
    configs = replica_configs(configs, len(models))
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
    with _threads(configs[0].num_threads):
        return _Unlearning(models, objectives, forget, retain, configs, list(evaluators), route).run()


class _Replica:
    """What one unlearning replica needs besides the shared stack: objective, reference, evaluation."""

    def __init__(self, model, objective, config, evaluator, forget, retain, encoded_forget, encoded_retain, device):
        self.objective, self.config = objective, config
        size = config.eval_batch_size
        self.forget_ref = (sequence_logps_batched(model, encoded_forget, size)[0]
                           if objective.forget == "npo" else None)  # (n_f,) float64
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if objective.retain == "kl" else None
        if evaluator is None:
            sets = [forget] + ([retain] if retain is not None else [])
            evaluator = Evaluator(concatenate(sets), reference=model, batch_size=size)
        self.evaluator, self.names = evaluator, tuple(evaluator.component_names)
        self.diagnostics = None
        if config.track_forget_weights or config.track_power_share:
            retain_encoded = encoded_retain if objective.retain is not None else None
            plan = DiagnosticsPlan.build(self.names, encoded_forget, retain, retain_encoded,
                                         config.diagnostics_max_sequences, config.seed)
            self.diagnostics = Diagnostics(objective, self.names, plan, encoded_forget, retain_encoded, None,
                                           self.forget_ref, None, self.reference, size, False,
                                           config.track_forget_weights, config.track_power_share)
        self.start = [p.detach().clone().to(device) for p in model.parameters() if p.requires_grad]
        self.records, self.diverged_at, self.reason = [], None, None

    def metrics(self, scratch) -> dict[str, np.ndarray]:
        metrics = self.evaluator.evaluate(scratch)
        if self.diagnostics is not None:
            metrics |= self.diagnostics(scratch)
        return metrics


class _Unlearning:
    """The state of N unlearning runs (see :func:`unlearn_replicas`)."""

    def __init__(self, models, objectives, forget, retain, configs, evaluators, route):
        self.configs, self.started, self.models = configs, time.perf_counter(), models
        self.forget = encode(forget, "response")
        self.retain = encode(retain, "response") if retain is not None else None
        self.total_steps = configs[0].total_steps(len(forget))
        self.stack = ReplicaStack(models, route, _device(configs[0]))
        self.optimizer = _optimizer(self.stack, configs)
        self.replicas = [_Replica(m, o, c, e, forget, retain, self.forget, self.retain, self.stack.device)
                         for m, o, c, e in zip(models, objectives, configs, evaluators)]
        self.scratch = copy.deepcopy(models[0]).to(self.stack.device).train()

    def batch(self, index: int, step: int) -> UnlearningBatch:
        """Replica ``index``'s step-``step`` rows, exactly as the single run draws them."""
        replica, device = self.replicas[index], self.stack.device
        config = replica.config
        forget_rows = batch_indices(len(self.forget), config.batch_size, step, config.seed, FORGET_STREAM)
        retain_batch, counts = None, BatchCounts(len(forget_rows))
        if replica.objective.retain is not None:
            retain_rows = batch_indices(len(self.retain), config.retain_batch_size or config.batch_size, step,
                                        config.seed, RETAIN_STREAM)
            retain_batch = self.retain.batch(retain_rows, device)
            retain_tokens = int(self.retain.num_label_tokens[retain_rows].sum())
            counts = BatchCounts(len(forget_rows), len(retain_rows), retain_tokens)
        reference = None if replica.forget_ref is None else replica.forget_ref[forget_rows].to(device)
        return UnlearningBatch(self.forget.batch(forget_rows, device), reference, counts, retain_batch)

    def step_values(self, step: int, backward: bool) -> list[dict]:
        """Every replica's ``{"total", "forget", "retain", "logp_per_token"}`` (floats; NaN on failure);
        with ``backward`` also the stacked gradients of the finite totals of active replicas."""
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
        return values

    @staticmethod
    def _terms(replica: _Replica, batch: UnlearningBatch, logits) -> tuple[dict, torch.Tensor | None]:
        try:
            terms = objective_terms(_ReplayLogits(logits), replica.objective, batch, replica.reference)
        except NonFiniteLogitsError:
            return dict.fromkeys(("total", "forget", "retain", "logp_per_token"), math.nan), None
        count = batch.counts.forget_sequences
        per_token = (terms.forget_logps / terms.forget_num_tokens).sum() / count
        values = {"total": float(terms.total.detach().double()), "forget": float(terms.forget.double()),
                  "retain": 0.0 if terms.retain is None else float(terms.retain.double()),
                  "logp_per_token": float(per_token.double())}
        return values, terms.total

    def run(self) -> list[Trajectory]:
        for step in range(self.total_steps + 1):
            if all(r.diverged_at is not None for r in self.replicas):
                break
            final = step == self.total_steps
            learning_rates = _learning_rates(self.configs, step, self.total_steps)
            values = self.step_values(step, backward=not final)
            grad_norms = [math.nan] * len(self.replicas)
            if not final:
                grad_norms = clip_replica_grads(self.stack.parameters, self.configs[0].max_grad_norm).tolist()
            for i, replica in enumerate(self.replicas):
                if replica.diverged_at is None:
                    self._after_forward(i, step, final, values[i], grad_norms[i])
            if final:
                break
            self.optimizer.step(learning_rates, [r.diverged_at is None for r in self.replicas])
        self.stack.zero_grad()
        for i, model in enumerate(self.models):
            self.stack.write_into(model, i)
        return [self._trajectory(i) for i in range(len(self.replicas))]

    def _after_forward(self, index: int, step: int, final: bool, values: dict, grad_norm: float) -> None:
        """The single run's bookkeeping of one step: divergence check, evaluation record."""
        replica = self.replicas[index]
        logits_failed = math.isnan(values["total"]) and math.isnan(values["logp_per_token"])
        reason = _LOGITS_FAILURE if logits_failed else _divergence(values["total"], grad_norm, not final)
        threshold = replica.config.divergence_logp_per_token
        if reason is None and threshold is not None and values["logp_per_token"] < threshold:
            reason = f"forget log-likelihood per token {values['logp_per_token']:.3g} fell below {threshold}"
        if step % replica.config.eval_every == 0 or final or reason is not None:
            replica.records.append(self._evaluate(index, step, values["total"], finite=not logits_failed))
        if reason is not None:
            replica.diverged_at, replica.reason = step, reason

    def _evaluate(self, index: int, step: int, loss: float, finite: bool) -> dict:
        replica = self.replicas[index]
        self.stack.write_into(self.scratch, index)
        metrics = replica.metrics(self.scratch) if finite else {}
        current = [p.detach() for p in self.scratch.parameters() if p.requires_grad]
        with torch.no_grad():
            squares = sum(float(((c.to(torch.float64) - s.to(torch.float64)) ** 2).sum())
                          for c, s in zip(current, replica.start))
        return {"step": step, "loss": loss, "parameter_distance": math.sqrt(squares),
                "metrics": {k: [float(x) for x in v] for k, v in metrics.items()}}

    def _trajectory(self, index: int) -> Trajectory:
        """Replica ``index``'s records as the single run assembles them (``llm.train``)."""
        replica, records = self.replicas[index], self.replicas[index].records
        names = replica.names
        extra = sorted({k for r in records for k in r["metrics"]} - set(COMPONENT_METRICS))
        metrics = {}
        for name in tuple(COMPONENT_METRICS) + tuple(extra):
            rows = [r["metrics"].get(name, [math.nan] * len(names)) for r in records]
            metrics[name] = np.asarray(rows, dtype=np.float64).reshape(len(records), len(names))
        config_state = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in dataclasses.asdict(replica.config).items()}
        info = {"objective": dataclasses.asdict(replica.objective), "config": config_state,
                "model": type(self.scratch).__name__, "num_processes": 1,
                "wall_seconds": time.perf_counter() - self.started, "side": "llm", "replica": index,
                "route": self.stack.route, "num_replicas": len(self.replicas)}
        return Trajectory(np.asarray([r["step"] for r in records], dtype=np.int64), names, metrics,
                          {"loss": np.asarray([r["loss"] for r in records], dtype=np.float64),
                           "parameter_distance": np.asarray([r["parameter_distance"] for r in records],
                                                             dtype=np.float64)},
                          replica.diverged_at, replica.reason, info)


def _parts(objective: Objective, batch: UnlearningBatch) -> list[dict]:
    """The row groups of ``objective_terms``'s single forward pass, in its order: forget, retain."""
    return [batch.forget] + ([batch.retain] if objective.retain is not None else [])
