"""Loop-free every-step evaluation of N replicas on the stacked (or vmap) route, for GPUs.

``llm.replica_evaluation`` evaluates all replicas in one logits call per chunk, then walks the
replicas one by one for each chunk's bookkeeping (log-probs, CPU copies, loss terms). On a CPU that
walk is free next to the arithmetic; on a GPU it is what the evaluation costs (a kernel launch and a
host sync per replica and chunk). Here the same quantities come from whole-stack tensor operations:

* test-set metrics (:func:`stacked_test_metrics`): per chunk, the (R, b, t, vocab) logits of the R
  evaluated replicas give their sequence log-likelihoods and next-state log-predictives (float64,
  on the device); then for every KL target p (n, T-1, V) and replica r, with m the response mask,

      KL_c(r) = sum_{i in c, t} m_it KL(p_it || q^r_it) / sum_{i in c, t} m_it,
      logp_per_token_c(r) = mean_{i in c} logp^r_i / |y_i|,

  exactly ``Evaluator.metrics`` (``markovsim.metrics.per_token_kl``), one host copy at the end;
* the forget part of the diagnostics (:func:`stacked_forget_pass`), for sequence losses: per chunk,
  every replica's own rows gathered at once, the losses of each group of replicas with equal
  objectives in one ``Objective.forget_losses`` call, mean weights by one ``Objective.forget_weights``
  call, and one ``torch.autograd.grad`` of the sum of all (scaled) terms for the power share;
* per-replica gradient norms (:func:`replica_norms`) from the stacked gradients in one pass.

Where a replica's logits are not finite these raise ``NonFiniteLogitsError`` and the caller takes
the per-replica path, which isolates that replica. Float sums run in another order than the
single run's, so values agree with it to rounding (tested at rtol 1e-6).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from markovsim.losses import SEQUENCE_LOSSES, reduce_token_logps
from markovsim.metrics import per_token_kl

from .data import evaluation_chunks
from .diagnostics import Diagnostics
from .evaluate import Evaluator, length_order
from .logps import labelled_token_logps, state_log_probs
from .replica_common import StackedTokens, join_encoded, objective_groups
from .replicas import ReplicaStack

__all__ = ["stacked_route", "stacked_metrics_apply", "stacked_test_metrics", "stacked_forget_applies",
           "forget_tokens", "stacked_forget_pass", "replica_norms", "component_rows"]


def stacked_route(stack: ReplicaStack) -> bool:
    """Whether ``stack`` computes all replicas in one call (the stacked or vmap route)."""
    return stack.route != "loop"


def component_rows(component_ids: np.ndarray, num_components: int) -> list[np.ndarray]:
    """Row indices of each component 0..C-1 (empty where a component has no rows)."""
    return [np.flatnonzero(np.asarray(component_ids) == c) for c in range(num_components)]


def stacked_metrics_apply(stack: ReplicaStack, evaluators: list[Evaluator]) -> bool:
    """Whether :func:`stacked_test_metrics` can evaluate replicas with ``evaluators``: a batched route, one
    batch size, the same metric and component names (targets may differ, e.g. each replica's own
    reference), and one test set or test sets of one shape (e.g. each seed its own sample)."""
    first = evaluators[0]
    return stacked_route(stack) and all(
        e.batch_size == first.batch_size and list(e.targets) == list(first.targets)
        and e.component_names == first.component_names
        and (e.test is first.test or e.encoded.input_ids.shape == first.encoded.input_ids.shape)
        for e in evaluators)


@torch.no_grad()
def stacked_test_metrics(stack: ReplicaStack, evaluators: list[Evaluator], members: list[int],
                         rows_per_pass: int) -> dict[int, dict[str, np.ndarray]]:
    """``{r: evaluators[k].evaluate(replica r)}`` for replicas ``r = members[k]`` (module docstring), in
    eval mode; the evaluators pass :func:`stacked_metrics_apply`.

    Args:
        rows_per_pass: test rows per replica in one stacked call.
    Raises: NonFiniteLogitsError when a member's logits are not finite at a labelled position.
    """
    evaluator = evaluators[0]
    encoded, device, count = evaluator.encoded, stack.device, len(members)
    n, width = len(encoded), encoded.input_ids.shape[1]
    chosen = torch.tensor(members, device=device)
    states = torch.zeros((count, n, width - 2, encoded.num_states), dtype=torch.float64, device=device)
    logps = torch.zeros((count, n), dtype=torch.float64, device=device)
    num_tokens = torch.zeros((count, n), dtype=torch.float64, device=device)
    shared = all(e.test is evaluator.test for e in evaluators)
    own_sets = _OwnTestSets(evaluators, members, stack) if not shared else None
    order = length_order(encoded)
    replica_axis = torch.arange(count, device=device)[:, None]  # (R, 1)
    with stack.eval_mode():
        for chunk in evaluation_chunks(n, rows_per_pass):
            if shared:
                rows = order[chunk]
                batch = encoded.batch(rows, device)  # (b, t) each
                b, t = batch["input_ids"].shape
                shape = (stack.num_replicas, b, t)
                logits = stack.stacked_batch_logits(batch["input_ids"].expand(shape),
                                                    batch["attention_mask"].expand(shape))[chosen]  # (R, b, t, vocab)
                labels = batch["labels"].expand(count, b, t)
                index = torch.as_tensor(rows, device=device).expand(count, b)  # (R, b)
            else:  # each replica its own rows of its own test set
                index, ids, mask, labels = own_sets.gather(chunk)
                logits = stack.stacked_batch_logits(ids, mask)[chosen]
                labels = labels[chosen]
                b, t = labels.shape[1:]
            token_logps, mask = labelled_token_logps(logits.flatten(0, 1), labels.flatten(0, 1))
            logps[replica_axis, index] = token_logps.sum(-1).double().view(count, b)
            num_tokens[replica_axis, index] = mask.sum(-1).double().view(count, b)
            predictive = state_log_probs(logits[:, :, 1: t - 1], encoded.num_states).double()  # (R, b, t-2, V)
            valid = (labels[:, :, 2:t] != -100)[..., None]  # (R, b, t-2, 1)
            states[replica_axis, index, : t - 2] = torch.where(valid, predictive, 0.0)
    if shared:
        table = _metric_table(evaluators, states, logps, num_tokens)  # (metrics, R, C)
    else:  # each replica's components and transition mask are its own test set's
        table = np.concatenate([_metric_table([e], states[k: k + 1], logps[k: k + 1], num_tokens[k: k + 1])
                                for k, e in enumerate(evaluators)], axis=1)
    names = list(evaluator.targets) + ["logp_per_token"]
    return {r: {name: table[m, k] for m, name in enumerate(names)} for k, r in enumerate(members)}


class _OwnTestSets:
    """The evaluated replicas' own test sets (one shape) on the device, gathered chunk by chunk: replica k
    takes rows ``length_order(its set)[chunk]``; replicas not evaluated run on the first one's rows."""

    def __init__(self, evaluators: list[Evaluator], members: list[int], stack: ReplicaStack):
        self.tokens, self.offsets = _joined_tokens(stack, [e.encoded for e in evaluators])  # offsets (R,)
        self.orders = [length_order(e.encoded) for e in evaluators]
        self.position = {r: k for k, r in enumerate(members)}
        self.num_replicas, self.device = stack.num_replicas, stack.device

    def gather(self, chunk) -> tuple[torch.Tensor, ...]:
        """``(index (R, b) own rows, input_ids, attention_mask, labels (N, b, t))``."""
        own = np.stack([order[chunk] for order in self.orders])  # (R, b)
        joined = own + self.offsets[:, None]
        every = np.stack([joined[self.position.get(r, 0)] for r in range(self.num_replicas)])  # (N, b)
        _, ids, mask, labels = self.tokens.gather(every)
        return torch.as_tensor(own, device=self.device), ids, mask, labels


def _stacked_target(evaluators: list[Evaluator], name: str, device) -> torch.Tensor:
    """Target ``name`` of every evaluator: (1, n, T-1, V) when they share one tensor, else (R, n, T-1, V)."""
    targets = [e.targets[name] for e in evaluators]
    if all(t is targets[0] for t in targets):
        return targets[0].to(device)[None]
    return torch.stack(targets).to(device)


def _metric_table(evaluators: list[Evaluator], states: torch.Tensor, logps: torch.Tensor,
                  num_tokens: torch.Tensor) -> np.ndarray:
    """(len(targets) + 1, R, C) float64: every KL target's per-component mean, then ``logp_per_token``."""
    evaluator = evaluators[0]
    test, device = evaluator.test, states.device
    columns = component_rows(test.component_ids, len(evaluator.component_names))
    mask = torch.as_tensor(test.transition_mask, device=device)  # (n, T-1)
    model_probs = states.exp()  # (R, n, T-1, V)
    rows_of = [torch.as_tensor(rows, device=device) for rows in columns]
    nan = torch.full((states.shape[0],), float("nan"), dtype=torch.float64, device=device)
    table = []
    for name in evaluator.targets:
        target = _stacked_target(evaluators, name, device)
        kl_sums = torch.where(mask, per_token_kl(target, model_probs), 0.0).sum(2)  # (R, n)
        table.append(torch.stack([kl_sums[:, rows].sum(1) / mask[rows].sum() if len(rows) else nan
                                  for rows in rows_of], dim=1))
    per_token = logps / num_tokens  # (R, n)
    table.append(torch.stack([per_token[:, rows].mean(1) if len(rows) else nan for rows in rows_of], dim=1))
    return torch.stack(table).cpu().numpy()


def stacked_forget_pass(stack: ReplicaStack, diagnostics: dict[int, Diagnostics], k: int, size: int,
                        rows_per_pass: int, tokens: StackedTokens,
                        offsets: dict[int, int] | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """Component ``plan.forget[k]`` of every replica in ``diagnostics`` (``llm.diagnostics``'s forget pass):
    ``({i: ||d L_c / d theta_i||}, {i: mean w_i over the component's rows})``, loop-free.

    Needs every objective's forget loss in ``SEQUENCE_LOSSES`` and one shared encoded forget set or sets of
    one size (:func:`stacked_forget_applies`), their tokens on the device (``tokens`` and, for sets of
    their own, where replica i's rows start in them, ``offsets``; :func:`forget_tokens`).
    Raises NonFiniteLogitsError where some replica's logits are not finite.
    """
    indices = list(diagnostics)
    first, device = diagnostics[indices[0]], stack.device
    size_f = len(first.forget)
    groups = objective_groups([dataclasses.replace(diagnostics[i].objective, retain=None) for i in indices],
                              [diagnostics[i].forget_ref for i in indices], device)  # members: positions
    scales = torch.tensor([diagnostics[i].plan.forget[k][2] for i in indices], dtype=torch.float64, device=device)
    weight_sums = torch.zeros(len(indices), dtype=torch.float64, device=device)
    chosen = torch.tensor(indices, device=device)
    offsets = offsets or {}
    starts = [offsets.get(r, offsets.get(indices[0], 0)) for r in range(stack.num_replicas)]  # (N,)
    device_starts = torch.tensor(starts, device=device)[:, None]  # (N, 1)
    gradients = None
    for chunk in evaluation_chunks(size, rows_per_pass):
        own = {i: diagnostics[i].plan.forget[k][1][chunk] for i in indices}
        picked = np.stack([own.get(r, own[indices[0]]) for r in range(stack.num_replicas)])  # (N, b)
        index, ids, mask, labels = tokens.gather(picked + np.asarray(starts)[:, None])
        index = index - device_starts  # (N, b) rows of each replica's own set, for its references
        with torch.set_grad_enabled(first.power):
            logits = stack.stacked_batch_logits(ids, mask)[chosen]  # (A, b, t, vocab)
            token_logps, token_mask = labelled_token_logps(logits.flatten(0, 1), labels[chosen].flatten(0, 1))
            logps, num_tokens = (x.view(len(indices), -1) for x in reduce_token_logps(token_logps, token_mask))
            totals = []
            for objective, members, references in groups:
                at = torch.tensor(members, device=device)  # positions among the evaluated replicas
                reference = None
                if references is not None:
                    reference = references.gather(1, index[chosen[at]]).to(logps.dtype).flatten()
                losses = objective.forget_losses(logps[at].flatten(), num_tokens[at].flatten(), reference)
                forget_term = losses.view(len(members), -1).sum(1) / size_f  # (n_g,): sum L_f / n_f
                totals.append(objective.total(forget_term) * scales[at].to(forget_term.dtype))
                if first.weights:
                    weights = objective.forget_weights(logps[at].detach().flatten(), num_tokens[at].flatten(),
                                                       None if reference is None else reference.detach())
                    weight_sums[at] += weights.view(len(members), -1).sum(1).double()
        if first.power:
            gradients = _accumulate(gradients, stack, torch.cat(totals).sum())
    means = (weight_sums / size).tolist()
    return (replica_norms(gradients, indices) if first.power else {}), dict(zip(indices, means))


def stacked_forget_applies(stack: ReplicaStack, diagnostics: dict[int, Diagnostics]) -> bool:
    """Whether :func:`stacked_forget_pass` can run: batched route, sequence losses, one shared forget set or
    sets of one size (each replica its own data)."""
    values = list(diagnostics.values())
    return (stacked_route(stack) and bool(values) and all(d.objective.forget in SEQUENCE_LOSSES for d in values)
            and all(len(d.forget) == len(values[0].forget) for d in values))


def forget_tokens(stack: ReplicaStack, diagnostics: dict[int, Diagnostics]) -> tuple[StackedTokens, dict[int, int]]:
    """The replicas' forget sets on the device for :func:`stacked_forget_pass`: the shared set, or their
    distinct sets one after another, and where replica i's rows start (``{i: offset}``)."""
    tokens, offsets = _joined_tokens(stack, [d.forget for d in diagnostics.values()])
    return tokens, dict(zip(diagnostics, offsets.tolist()))


def _joined_tokens(stack: ReplicaStack, sets: list) -> tuple[StackedTokens, np.ndarray]:
    """``llm.replica_common.join_encoded(sets)`` as ``StackedTokens`` on the stack's device: built once per list
    of sets and kept in ``stack.device_data`` (the evaluation reads the same fixed sets every step). The entry
    holds the sets themselves, so the ids in its key stay theirs."""
    key = ("joined tokens", *map(id, sets))
    if key not in stack.device_data:
        joined, offsets = join_encoded(sets)
        stack.device_data[key] = (tuple(sets), StackedTokens(joined, stack.device), offsets)
    return stack.device_data[key][1:]


def _accumulate(gradients, stack: ReplicaStack, total: torch.Tensor) -> list[torch.Tensor]:
    """Add d total / d (stacked parameters), (N, ...) each, to ``gradients`` (None = zeros)."""
    parameters = list(stack.parameters.values())
    grads = torch.autograd.grad(total, parameters, allow_unused=True)  # .grad and the optimizer untouched
    if gradients is None:
        gradients = [torch.zeros_like(p) for p in parameters]
    for buffer, grad in zip(gradients, grads):
        if grad is not None:
            buffer += grad
    return gradients


def replica_norms(gradients, indices) -> dict[int, float]:
    """``{i: ||slice i of the stacked gradient||}`` in float64 (0 without gradients), one host sync."""
    indices = list(indices)
    if gradients is None or not indices:
        return dict.fromkeys(indices, 0.0)
    rows = torch.tensor(indices, device=gradients[0].device)
    squares = sum((g[rows].double() ** 2).flatten(1).sum(1) for g in gradients)  # (len(indices),)
    return dict(zip(indices, squares.sqrt().tolist()))
