"""Unlearning diagnostics of a transformer: mean gradient weight and "unlearning power" per component.

The simulator's definitions (``markovsim.dynamics.gradient_diagnostics``; docs/theory.md,
"Reference-model bias"), on a fixed, seeded subsample of the training sets drawn once per run, and
from ONE forward pass per chunk: the forward that gives the forget losses' gradient also gives the
log-likelihoods behind the closed-form weights.

* ``mean_weight[c]``: mean over component c's (subsampled) forget rows of the weight w(y) with
  ``d L_f(y) = w(y) d logp(y)`` (``Objective.forget_weights``; NaN for dpo / wga, which have none).
* ``power_share[c] = ||g_c|| / sum_c' ||g_c'||``: the forget term's gradient splits exactly by
  component, ``g_c = (forget_weight / n_f) sum_{y in c} d L_f(y) / d theta`` (n_f: the whole forget
  training set); the retain term's gradient ``retain_weight * d R / d theta`` is credited in equal
  parts to the retain set's components. Norms over all trainable parameters; the shares are
  :func:`markovsim.diagnostics.power_shares` (the simulator's rule: NaN for a component with no
  training sequences).

With ``max_sequences`` set, each component's sum runs over at most that many rows and is scaled by
(rows / subsample size), an unbiased estimate of the full-set gradient (its norm is biased upwards
by the sampling noise, most for a term whose per-sequence gradients nearly cancel, such as the
retain term near the reference); ``None`` uses every row and is exact. The pass runs in eval mode
with ``torch.autograd.grad``: ``.grad``, the optimizer and the RNG of the run are untouched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from markovsim.data import SequenceSet
from markovsim.diagnostics import power_shares
from markovsim.losses import Objective

from .data import EncodedSequences, evaluation_chunks
from .evaluate import model_device
from .logps import NonFiniteLogitsError
from .objective import SEQUENCE_LOSSES, BatchCounts, UnlearningBatch, objective_terms, retain_term
from .runtime import autocast

__all__ = ["DiagnosticsPlan", "Diagnostics", "gradient_norm"]

# Seed stream of the fixed diagnostics subsamples (batch order uses FORGET_STREAM / RETAIN_STREAM).
DIAGNOSTICS_STREAM = 2


@dataclass(frozen=True)
class DiagnosticsPlan:
    """The rows behind the diagnostics, drawn once per run.

    Attributes:
        forget: ``(column, rows, scale)`` per component with forget rows: its (subsampled) forget
            rows, sorted by length (little padding per chunk), and ``n_c / len(rows)``.
        retain_rows, retain_scale: the (subsampled) retain rows and ``n_r / len(rows)`` (None / 1
            without a retain term).
        retain_columns: columns credited with the retain term's gradient norm.
        present: (C,) bool, the component has forget or retain training sequences (else NaN).
    """

    forget: tuple[tuple[int, np.ndarray, float], ...]
    retain_rows: np.ndarray | None
    retain_scale: float
    retain_columns: tuple[int, ...]
    present: np.ndarray

    @classmethod
    def build(cls, names: tuple[str, ...], forget: EncodedSequences, retain_set: SequenceSet | None,
              retain: EncodedSequences | None, max_sequences: int | None, seed: int) -> "DiagnosticsPlan":
        """``forget`` / ``retain``: the encoded training sets (``retain`` None without a retain term);
        ``retain_set``: the retain sequences as passed (their components count as present)."""

        def subsample(rows: np.ndarray, key: int, lengths: torch.Tensor) -> np.ndarray:
            if max_sequences is not None and len(rows) > max_sequences:
                rows = np.sort(np.random.default_rng([seed, DIAGNOSTICS_STREAM, key]).choice(
                    rows, size=max_sequences, replace=False))
            return rows[np.argsort(lengths[rows].numpy(), kind="stable")]

        parts, present = [], np.zeros(len(names), dtype=bool)
        for column, name in enumerate(names):
            if name in forget.component_names:
                rows = np.flatnonzero(forget.component_ids == forget.component_names.index(name))
                if len(rows):
                    chosen = subsample(rows, column, forget.token_lengths)
                    parts.append((column, chosen, len(rows) / len(chosen)))
                    present[column] = True
        retain_rows, retain_scale, retain_columns = None, 1.0, ()
        if retain_set is not None:
            counts = retain_set.component_counts()
            retain_names = [n for n in retain_set.component_names if n in names and counts.get(n, 0) > 0]
            present[[names.index(n) for n in retain_names]] = True
            if retain is not None:
                retain_columns = tuple(names.index(n) for n in retain_names)
                retain_rows = subsample(np.arange(len(retain)), len(names), retain.token_lengths)
                retain_scale = len(retain) / len(retain_rows)
        return cls(tuple(parts), retain_rows, retain_scale, retain_columns, present)


@dataclass(frozen=True)
class Diagnostics:
    """What one run needs to compute its diagnostics at any parameters (built once per run).

    Attributes:
        objective: the run's objective.
        names: the evaluator's component names (the columns).
        plan: the fixed rows (:class:`DiagnosticsPlan`).
        forget, retain, preferred: the encoded training sets (retain / preferred None when unused).
        forget_ref, preferred_ref: (n_f,) cached reference log-likelihoods (npo, dpo) or None.
        reference: the frozen reference model (kl retain term) or None.
        batch_size: rows per forward pass.
        bf16: autocast the forward passes (CUDA only).
        weights, power: which diagnostics to compute.
    """

    objective: Objective
    names: tuple[str, ...]
    plan: DiagnosticsPlan
    forget: EncodedSequences
    retain: EncodedSequences | None
    preferred: EncodedSequences | None
    forget_ref: torch.Tensor | None
    preferred_ref: torch.Tensor | None
    reference: object
    batch_size: int
    bf16: bool
    weights: bool = True
    power: bool = True

    def __call__(self, model) -> dict[str, np.ndarray]:
        """``{"mean_weight": (C,), "power_share": (C,)}`` (those asked for) at the model's parameters."""
        was_training = model.training
        model.eval()
        try:
            return self._compute(model)
        except NonFiniteLogitsError:
            return {name: np.full(len(self.names), np.nan) for name in self._asked()}
        finally:
            model.train(was_training)

    def _asked(self) -> list[str]:
        return [name for name, on in (("mean_weight", self.weights), ("power_share", self.power)) if on]

    def _compute(self, model) -> dict[str, np.ndarray]:
        params = [p for p in model.parameters() if p.requires_grad]
        norms, weights = np.zeros(len(self.names)), np.full(len(self.names), np.nan)
        for column, rows, scale in self.plan.forget:
            norm, mean_weight = self._forget_pass(model, params, rows, scale)
            norms[column], weights[column] = norm, mean_weight
        if self.power and self.objective.retain is not None and self.plan.retain_columns:
            retain_norm = gradient_norm(params, self._retain_chunks(model))
            for column in self.plan.retain_columns:
                norms[column] += retain_norm / len(self.plan.retain_columns)
        result = {}
        if self.weights:
            result["mean_weight"] = weights
        if self.power:
            result["power_share"] = power_shares(norms, self.plan.present)
        return result

    def _forget_pass(self, model, params, rows: np.ndarray, scale: float) -> tuple[float, float]:
        """``(||g_c||, mean w)`` of one component from one forward per chunk (no gradient if not asked)."""
        objective = dataclasses.replace(self.objective, retain=None)
        device, counts = model_device(model), BatchCounts(len(self.forget))
        weight_sum, norm_buffers = 0.0, [torch.zeros_like(p) for p in params]
        for chunk in evaluation_chunks(len(rows), self.batch_size):
            picked = rows[chunk]
            batch = UnlearningBatch(self.forget.batch(picked, device), _rows(self.forget_ref, picked, device), counts,
                                    None, None if self.preferred is None else self.preferred.batch(picked, device),
                                    _rows(self.preferred_ref, picked, device))
            with torch.set_grad_enabled(self.power), autocast(device.type, self.bf16):
                terms = objective_terms(model, objective, batch)  # total = forget_weight * sum L_f / n_f
            if self.power:
                for buffer, grad in zip(norm_buffers, torch.autograd.grad(terms.total * scale, params,
                                                                           allow_unused=True)):
                    if grad is not None:
                        buffer += grad
            if self.weights and self.objective.forget in SEQUENCE_LOSSES:
                ref = None if self.forget_ref is None else self.forget_ref[picked].to(terms.forget_logps.dtype)
                weight_sum += float(self.objective.forget_weights(terms.forget_logps.cpu(),
                                                                  terms.forget_num_tokens.cpu(), ref).sum())
        mean_weight = weight_sum / len(rows) if self.objective.forget in SEQUENCE_LOSSES else math.nan
        return _norm(norm_buffers), mean_weight

    def _retain_chunks(self, model):
        """The retain term's (scaled) value per chunk of the plan's retain rows."""
        device, retain = model_device(model), self.retain
        counts = BatchCounts(len(self.forget), len(retain), int(retain.num_label_tokens.sum()))
        rows = self.plan.retain_rows
        for chunk in evaluation_chunks(len(rows), self.batch_size):
            with autocast(device.type, self.bf16):
                value = retain_term(model, self.objective, retain.batch(rows[chunk], device), counts, self.reference)
            yield self.objective.retain_weight * value * self.plan.retain_scale



def gradient_norm(params, values) -> float:
    """``||sum_k d values_k / d params||_2`` (float64), one ``torch.autograd.grad`` per value (chunk) and
    the gradients summed, so a sum over chunks never holds more than one chunk's graph."""
    buffers = [torch.zeros_like(p) for p in params]
    for value in values:
        for buffer, grad in zip(buffers, torch.autograd.grad(value, params, allow_unused=True)):
            if grad is not None:
                buffer += grad
    return _norm(buffers)


def _rows(values: torch.Tensor | None, rows: np.ndarray, device) -> torch.Tensor | None:
    return None if values is None else values[rows].to(device)


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))
