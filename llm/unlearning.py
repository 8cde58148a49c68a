"""Unlearning: an ``Objective`` from ``markovsim.losses`` on a transformer, on a :class:`Session`.

Response tokens (s_2..s_L) carry the loss; each step takes a forget batch and (for a retain term)
a retain batch. NPO/DPO reference log-probs on the forget set are computed once from the starting
model and cached; a frozen reference model is kept only for a KL retain term. Diagnostics
(:mod:`llm.diagnostics`) are recorded at each evaluation. Returns a
``markovsim.trajectory.Trajectory`` like the simulator. Models are trained in place.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
import os
import time

import numpy as np
import torch

from markovsim.config import divergence_reason
from markovsim.data import SequenceSet, concatenate
from markovsim.losses import NEEDS_REFERENCE, Objective
from markovsim.runtime import torch_threads
from markovsim.trajectory import COMPONENT_METRICS, Trajectory

from .config import PAPER_UNLEARNING, TrainConfig, config_state
from .data import FORGET_STREAM, RETAIN_STREAM, batch_indices, encode, shard
from .diagnostics import Diagnostics, DiagnosticsPlan
from .evaluate import Evaluator, model_sequence_logps_batched
from .logps import NonFiniteLogitsError
from .models import check_model_data
from .objective import BatchCounts, UnlearningBatch, objective_terms
from .session import Session, StepOutcome, check_config, check_sequences

__all__ = ["unlearn", "UnlearningLoop", "default_evaluator", "trajectory_from_records"]


def _check_unlearn_inputs(model, objective, forget, retain, preferred, config) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a markovsim.losses.Objective, got {type(objective).__name__}")
    check_config(config)
    check_model_data(model, check_sequences(forget, "forget"), "forget")
    if objective.retain is not None:
        if retain is None:
            raise ValueError(f"objective has retain term {objective.retain!r}: pass a retain SequenceSet")
        check_model_data(model, check_sequences(retain, "retain"), "retain")
    if objective.forget == "dpo":
        check_model_data(model, check_sequences(preferred, "preferred"), "preferred")
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
    with torch_threads(config.num_threads):
        return _Unlearning(model, objective, forget, retain, preferred, config, evaluator, run_dir).run(resume)


def default_evaluator(model, forget: SequenceSet, retain: SequenceSet | None, batch_size: int,
                      bf16: bool = False) -> Evaluator:
    """A run's default ``Evaluator``: forget + retain as the test set, the starting ``model`` as reference."""
    sets = [forget] + ([retain] if retain is not None else [])
    return Evaluator(concatenate(sets), reference=model, batch_size=batch_size, bf16=bf16)


class UnlearningLoop(abc.ABC):
    """The step loop of one unlearning run on a :class:`Session`, shared by :func:`unlearn` (an ``Objective``)
    and ``llm.methods.markov.unlearn_method`` (a registry method).

    A subclass sets ``self.diagnostics`` (None, or ``model -> {metric: (C,)}``), and implements
    ``forward(step) -> {"total", "forget", "retain", "logp_per_token"}`` (this process's shares on step
    ``step``'s global batch), ``description`` (the progress bar's label) and ``run_info()`` (what the
    trajectory's ``info`` records about the method).
    """

    VALUE_NAMES = ("total", "forget", "retain", "logp_per_token")

    def __init__(self, model, forget: SequenceSet, retain: SequenceSet | None, config: TrainConfig,
                 evaluator: Evaluator | None, run_dir):
        self.config, self.run_dir = config, run_dir
        self.started = time.perf_counter()
        self.session = Session(model, config, config.total_steps(len(forget)), run_dir, "unlearn", self.VALUE_NAMES)
        self.setup(model)
        if evaluator is None:
            evaluator = default_evaluator(model, forget, retain, config.eval_batch_size, self.session.bf16)
        self.evaluator = evaluator
        self.names = tuple(evaluator.component_names)
        self.diagnostics = None
        # theta_0 for ||theta_t - theta_0|| (NPO paper, Theorem 2): one copy of the trainable parameters
        self.start_parameters = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    description = "unlearn"

    def setup(self, model) -> None:
        """What the run computes from the starting model once the session exists (before the evaluator)."""

    @abc.abstractmethod
    def forward(self, step: int) -> dict:
        """This process's shares ``{"total", "forget", "retain", "logp_per_token"}`` of step ``step``."""

    def run_info(self) -> dict:
        return {}

    def evaluate(self, step: int, outcome: StepOutcome, finite: bool) -> dict:
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
        bar = session.progress_bar(self.description)
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

    def _threshold(self, outcome: StepOutcome) -> str | None:
        """:func:`markovsim.config.divergence_reason` on the forget batch's log-likelihood per token."""
        values = outcome.values
        return divergence_reason(values["total"], values["logp_per_token"],
                                 threshold=self.config.divergence_logp_per_token)

    def _trajectory(self, records: list[dict], diverged_at, reason) -> Trajectory:
        info = self.run_info() | {"config": config_state(self.config),
                "model": type(self.session.unwrapped).__name__, "num_processes": self.session.num_processes,
                "wall_seconds": time.perf_counter() - self.started, "side": "llm"}
        return trajectory_from_records(records, self.names, diverged_at, reason, info)

    def _write(self, trajectory: Trajectory) -> None:
        session = self.session
        if self.run_dir is not None and session.accelerator.is_main_process:
            trajectory.save(os.path.join(os.fspath(self.run_dir), "trajectory"), self.config)
        session.save_final_model()


class _Unlearning(UnlearningLoop):
    """An ``Objective`` run (see :func:`unlearn`)."""

    def __init__(self, model, objective, forget, retain, preferred, config, evaluator, run_dir):
        self.objective = objective
        needs_retain = objective.retain is not None
        self.forget = encode(forget, "response")
        self.retain = encode(retain, "response") if needs_retain else None
        self.preferred = encode(preferred, "response") if objective.forget == "dpo" else None
        super().__init__(model, forget, retain, config, evaluator, run_dir)
        bf16, size = self.session.bf16, config.eval_batch_size
        if config.track_forget_weights or config.track_power_share:
            plan = DiagnosticsPlan.build(self.names, self.forget, retain, self.retain, config.diagnostics_max_sequences,
                                         config.seed)
            self.diagnostics = Diagnostics(objective, self.names, plan, self.forget, self.retain, self.preferred,
                                           self.forget_ref, self.preferred_ref, self.reference, size, bf16,
                                           config.track_forget_weights, config.track_power_share)

    @property
    def description(self) -> str:
        return f"unlearn {self.objective.forget}"

    def run_info(self) -> dict:
        return {"objective": dataclasses.asdict(self.objective)}

    def setup(self, model) -> None:
        objective, size = self.objective, self.config.eval_batch_size
        self.forget_ref, self.preferred_ref = self._reference_logps(model, objective, size,
                                                                    self.session.bf16)  # (n_f,) float64
        self.reference = None
        if objective.retain == "kl":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def _reference_logps(self, model, objective, batch_size, bf16):
        """Reference log-likelihoods of the forget (and preferred) sets, computed once from the starting model."""
        if objective.forget not in NEEDS_REFERENCE:
            return None, None
        try:
            forget = model_sequence_logps_batched(model, self.forget, batch_size, bf16)[0]
            preferred = (model_sequence_logps_batched(model, self.preferred, batch_size, bf16)[0]
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
            retain_tokens = int(self.retain.num_label_tokens[retain_rows].sum())
            counts = BatchCounts(len(forget_rows), len(retain_rows), retain_tokens)
        batch = UnlearningBatch(
            self.forget.batch(local, device), None if self.forget_ref is None else self.forget_ref[local].to(device),
            counts, retain_batch,
            None if self.preferred is None else self.preferred.batch(local, device),
            None if self.preferred_ref is None else self.preferred_ref[local].to(device))
        terms = objective_terms(session.model, self.objective, batch, self.reference)
        per_token = (terms.forget_logps / terms.forget_num_tokens).sum() / counts.forget_sequences
        return {"total": terms.total, "forget": terms.forget,
                "retain": terms.retain if terms.retain is not None else 0.0, "logp_per_token": per_token}

def trajectory_from_records(records: list[dict], names: tuple[str, ...], diverged_at, reason, info: dict) -> Trajectory:
    """An unlearning run's evaluation records as a :class:`Trajectory` (shared by single runs and replicas).

    Each record holds ``step``, ``loss``, optionally ``parameter_distance`` and ``metrics``
    (``{metric: per-component values}``); a metric missing from a record is NaN there. Component
    metrics come first in ``COMPONENT_METRICS`` order, then any extra ones, sorted.
    """
    extra = sorted({k for r in records for k in r["metrics"]} - set(COMPONENT_METRICS))
    metrics = {}
    for name in tuple(COMPONENT_METRICS) + tuple(extra):
        rows = [r["metrics"].get(name, [math.nan] * len(names)) for r in records]
        metrics[name] = np.asarray(rows, dtype=np.float64).reshape(len(records), len(names))
    step_metrics = {"loss": np.asarray([r["loss"] for r in records], dtype=np.float64),
                    "parameter_distance": np.asarray([r.get("parameter_distance", math.nan) for r in records],
                                                     dtype=np.float64)}
    return Trajectory(np.asarray([r["step"] for r in records], dtype=np.int64), names, metrics, step_metrics,
                      diverged_at, reason, info)
