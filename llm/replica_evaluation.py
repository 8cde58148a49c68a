"""Every-step evaluation of N replicas in batched passes.

The single run evaluates one model with ``llm.evaluate.Evaluator`` (test-set KLs, ``logp_per_token``)
and ``llm.diagnostics.Diagnostics`` (forget weights, power share). Here all replicas of a
:class:`~llm.replicas.ReplicaStack` are evaluated together, with the single run's formulas:

* test-set metrics: per chunk of the (length-sorted) test set, the logits of EVERY replica in one
  ``ReplicaStack.logits`` call; each replica's chunk goes through ``llm.evaluate.store_predictions``
  and its evaluator's ``Evaluator.metrics`` (the same float64 KLs and means as ``Evaluator.evaluate``).
* forget weights and power share: per component c of the diagnostics plan and chunk, every
  replica's logits on its OWN rows (each replica draws its own seeded subsample; the row counts
  agree) in one call, each replica's loss by the single run's ``objective_terms``, and the gradient
  norms of all replicas from ONE ``torch.autograd.grad`` of the sum of their (scaled) terms: the
  replicas share no parameters, so ``d(sum_i L_i) / d theta_i = d L_i / d theta_i``. The retain
  term's share likewise (``retain_term``). Replica i's norm is the 2-norm of the i-th slice of the
  stacked gradient.

On the stacked and vmap routes this makes the evaluation one computation per chunk (chunks of at most
``PASS_ROWS`` rows over all replicas; a different chunking from the single run's only reorders float
sums); on the loop route ``ReplicaStack.logits`` loops, so it costs what N single evaluations cost.
On a CPU the evaluation is compute-bound (one test-set pass of one paper-synthetic model is ~8k
tokens), so batching saves nothing there (benchmarks/RESULTS.md, "Batched replicas"); what it
removes is per-call overhead, which dominates on a GPU: there the per-replica bookkeeping is done by
``llm.replica_stacked_evaluation`` without a replica loop (16 replicas' every-step evaluation on an
H100: 8.5x faster than with the loop, the whole run 1.08x one run). Replicas whose
diagnostics differ in layout (component names, per-component row counts, retain rows) are
evaluated one by one on a scratch model with the single run's ``Diagnostics`` (exact, not batched).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import torch

from markovsim.diagnostics import power_shares

from .data import evaluation_chunks
from .diagnostics import Diagnostics
from .evaluate import Evaluator, empty_predictions, length_order, store_predictions
from .logps import NonFiniteLogitsError
from .models import check_model_data
from .objective import SEQUENCE_LOSSES, BatchCounts, UnlearningBatch, objective_terms, retain_term
from .replica_common import ReplayLogits, StackedTokens
from .replica_stacked_evaluation import (
    _accumulate,
    forget_tokens,
    replica_norms,
    stacked_forget_applies,
    stacked_forget_pass,
    stacked_metrics_apply,
    stacked_test_metrics,
)
from .replicas import ReplicaStack

__all__ = ["replica_predictions", "replica_test_metrics", "replica_diagnostics"]


# Rows of ALL replicas in one stacked (or vmap) pass. The pass holds N x rows activations (and, for the power
# share, their graph) at once; past ~1024 rows they leave the CPU caches and a 16-replica pass got
# 1.5x slower than 16 single passes (measured, paper-synthetic, 2 threads). On a GPU each pass costs
# launches rather than cache misses: GPU_PASS_ROWS rows (a few GB of activations for paper-synthetic).
PASS_ROWS = 1024
GPU_PASS_ROWS = 16384


def _rows_per_pass(stack: ReplicaStack, batch_size: int) -> int:
    """Rows per replica of one chunk: ``batch_size`` on the loop route, at most PASS_ROWS / N otherwise
    (GPU_PASS_ROWS / N on a GPU)."""
    if stack.route == "loop":
        return batch_size
    total = GPU_PASS_ROWS if stack.device.type == "cuda" else PASS_ROWS
    return max(1, min(batch_size, total // stack.num_replicas))


@torch.no_grad()
def replica_predictions(stack: ReplicaStack, evaluator: Evaluator, indices) -> dict[int, tuple]:
    """``{i: (state_logprobs (n, T-1, V), logps (n,), num_tokens (n,))}`` of replicas ``indices`` on
    ``evaluator``'s test set, as ``llm.evaluate.predict`` gives for each replica alone (eval mode)."""
    encoded = evaluator.encoded
    predictions = {i: empty_predictions(encoded) for i in indices}
    order = length_order(encoded)
    with stack.eval_mode():
        for chunk in evaluation_chunks(len(encoded), _rows_per_pass(stack, evaluator.batch_size)):
            rows = order[chunk]
            batch = encoded.batch(rows, stack.device)
            all_logits = stack.logits([batch] * stack.num_replicas)  # N x (b, t, vocab): one call
            for i in indices:
                store_predictions(all_logits[i], batch, rows, predictions[i])
    return predictions


def replica_test_metrics(stack: ReplicaStack, evaluators: list[Evaluator], indices, scratch) -> dict[int, dict]:
    """``{i: evaluators[i].evaluate(replica i)}`` for ``indices``.

    On a batched route one stacked pass per chunk evaluates every replica, on one shared test set or on
    each replica's own (test sets of one shape, e.g. each seed its own sample;
    ``llm.replica_stacked_evaluation``). Otherwise (the loop route, test sets of different shapes, or
    non-finite logits, which this path isolates) one pass per distinct test set computes every replica's
    logits, so a test set that fewer than half of the replicas use is evaluated replica by replica on
    ``scratch`` instead (the single run's ``Evaluator.evaluate``).
    """
    indices = list(indices)
    evaluated = [evaluators[i] for i in indices]
    for test in {id(e.test): e.test for e in evaluated}.values():
        check_model_data(scratch, test, "test")
    if indices and stacked_metrics_apply(stack, evaluated):
        try:
            return stacked_test_metrics(stack, evaluated, indices, _rows_per_pass(stack, evaluated[0].batch_size))
        except NonFiniteLogitsError:  # the per-replica path below isolates the failing replica
            pass
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault((id(evaluators[i].test), evaluators[i].batch_size), []).append(i)
    users = Counter(id(evaluator.test) for evaluator in evaluators)  # test set -> how many replicas use it
    result = {}
    for members in groups.values():
        evaluator = evaluators[members[0]]
        if 2 * users[id(evaluator.test)] < stack.num_replicas:
            for i in members:
                stack.write_into(scratch, i)
                result[i] = evaluators[i].evaluate(scratch)
            continue
        predictions = replica_predictions(stack, evaluator, members)
        for i in members:
            result[i] = evaluators[i].metrics(*predictions[i])
    return result


def _layout(diagnostics: Diagnostics) -> tuple:
    """What must agree for a batched diagnostics pass."""
    plan = diagnostics.plan
    return (diagnostics.names, tuple((column, len(rows)) for column, rows, _ in plan.forget), diagnostics.batch_size,
            diagnostics.weights, diagnostics.power, None if plan.retain_rows is None else len(plan.retain_rows))


def replica_diagnostics(stack: ReplicaStack, diagnostics: dict[int, Diagnostics]) -> dict[int, dict] | None:
    """``{i: diagnostics[i](replica i)}`` in batched passes, or None when the layouts differ (see module doc)."""
    indices = list(diagnostics)
    if not indices:
        return {}
    layouts = {_layout(d) for d in diagnostics.values()}
    retain_layouts = {layout[-1] for layout in layouts}
    if len({layout[:-1] for layout in layouts}) != 1 or len(retain_layouts - {None}) > 1:
        return None
    first = diagnostics[indices[0]]
    columns = len(first.names)
    norms, weights = {i: np.zeros(columns) for i in indices}, {i: np.full(columns, np.nan) for i in indices}
    failed: set[int] = set()
    tokens = forget_tokens(stack, diagnostics) if stacked_forget_applies(stack, diagnostics) else None
    with stack.eval_mode():
        for k, (column, rows, _) in enumerate(first.plan.forget):
            column_norms, mean_weights = _forget_pass_of(stack, diagnostics, k, len(rows), failed, tokens)
            for i in indices:
                norms[i][column], weights[i][column] = column_norms.get(i, 0.0), mean_weights[i]
        if first.power:
            _add_retain_norms(stack, diagnostics, norms, failed)
    result = {}
    for i, d in diagnostics.items():
        values = {"mean_weight": weights[i], "power_share": power_shares(norms[i], d.plan.present)}
        result[i] = {name: (np.full(columns, np.nan) if i in failed else values[name]) for name in d._asked()}
    return result


def _forget_pass_of(stack, diagnostics: dict[int, Diagnostics], k: int, size: int, failed: set,
                    tokens: tuple[StackedTokens, dict[int, int]] | None):
    """:func:`llm.replica_stacked_evaluation.stacked_forget_pass` where it applies (``tokens``: the forget sets
    on the device and each replica's offset in them, ``forget_tokens``; None where it does not) and every
    logit is finite, else the per-replica :func:`_forget_pass`."""
    if not failed and tokens is not None:
        try:
            batch_size = next(iter(diagnostics.values())).batch_size
            return stacked_forget_pass(stack, diagnostics, k, size, _rows_per_pass(stack, batch_size), *tokens)
        except NonFiniteLogitsError:
            pass
    return _forget_pass(stack, diagnostics, k, size, failed)


def _forget_pass(stack, diagnostics: dict[int, Diagnostics], k: int, size: int, failed: set) -> tuple[dict, dict]:
    """Component ``plan.forget[k]`` of every replica: ``({i: ||g_c||}, {i: mean w})`` (Diagnostics._forget_pass)."""
    first, device = next(iter(diagnostics.values())), stack.device
    power, gradients = first.power, None
    weight_sums = dict.fromkeys(diagnostics, 0.0)
    for chunk in evaluation_chunks(size, _rows_per_pass(stack, first.batch_size)):
        batches = {}
        for i, d in diagnostics.items():
            picked = d.plan.forget[k][1][chunk]
            reference = None if d.forget_ref is None else d.forget_ref[picked].to(device)
            batches[i] = UnlearningBatch(d.forget.batch(picked, device), reference, BatchCounts(len(d.forget)))
        with torch.set_grad_enabled(power):
            all_logits = _logits(stack, {i: b.forget for i, b in batches.items()})
            totals = []
            for i, d in diagnostics.items():
                if i in failed:
                    continue
                objective = dataclasses.replace(d.objective, retain=None)
                try:
                    terms = objective_terms(ReplayLogits(all_logits[i]), objective, batches[i])
                except NonFiniteLogitsError:
                    failed.add(i)
                    continue
                totals.append(terms.total * d.plan.forget[k][2])  # total = forget_weight * sum L_f / n_f
                if d.weights and d.objective.forget in SEQUENCE_LOSSES:
                    ref = batches[i].forget_ref_logps
                    ref = None if ref is None else ref.to(terms.forget_logps.dtype).cpu()
                    weight_sums[i] += float(d.objective.forget_weights(terms.forget_logps.cpu(),
                                                                       terms.forget_num_tokens.cpu(), ref).sum())
        if power and totals:
            gradients = _accumulate(gradients, stack, torch.stack(totals).sum())
    mean_weights = {i: weight_sums[i] / size if d.objective.forget in SEQUENCE_LOSSES else math.nan
                    for i, d in diagnostics.items()}
    return (replica_norms(gradients, diagnostics) if power else {}), mean_weights


def _add_retain_norms(stack, diagnostics: dict[int, Diagnostics], norms: dict, failed: set) -> None:
    """The retain term's gradient norm of each replica with one, credited equally to its retain columns."""
    with_retain = {i: d for i, d in diagnostics.items() if d.objective.retain is not None and d.plan.retain_columns}
    if not with_retain:
        return
    device, gradients = stack.device, None
    first = next(iter(with_retain.values()))
    for chunk in evaluation_chunks(len(first.plan.retain_rows), _rows_per_pass(stack, first.batch_size)):
        batches = {i: d.retain.batch(d.plan.retain_rows[chunk], device) for i, d in with_retain.items()}
        all_logits = _logits(stack, batches)
        values = []
        for i, d in with_retain.items():
            if i in failed:
                continue
            counts = BatchCounts(len(d.forget), len(d.retain), int(d.retain.num_label_tokens.sum()))
            try:
                value = retain_term(ReplayLogits(all_logits[i]), d.objective, batches[i], counts, d.reference)
            except NonFiniteLogitsError:
                failed.add(i)
                continue
            values.append(d.objective.retain_weight * value * d.plan.retain_scale)
        if values:
            gradients = _accumulate(gradients, stack, torch.stack(values).sum())
    for i, norm in replica_norms(gradients, with_retain).items():
        for column in with_retain[i].plan.retain_columns:
            norms[i][column] += norm / len(with_retain[i].plan.retain_columns)


def _logits(stack: ReplicaStack, batches: dict[int, dict]) -> list[torch.Tensor]:
    """Logits of every replica; replicas without a batch here run on another replica's (ignored)."""
    filler = next(iter(batches.values()))
    return stack.logits([batches.get(i, filler) for i in range(stack.num_replicas)])
