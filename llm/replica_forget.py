"""One unlearning step of N replicas, as one batched computation.

When every replica's objective has a sequence forget loss (``markovsim.losses.SEQUENCE_LOSSES``: GA,
NPO, SimNPO, ...) and any retain term (none; nll: GradDiff, NPO+RT, SimNPO+RT; kl: NPO+KL, SimNPO+KL),
and the stack has a batched route, :class:`BatchedForget` computes the step of all replicas without a
per-replica loop:

    rows_i       (b,)            replica i's forget rows of step k (``llm.data.batch_indices``, seed_i)
    retain_i     (b_r,)          its retain rows (the retain stream), where some objective has a retain term
    logits       (N, b + b_r, t, V)  ``ReplicaStack.stacked_batch_logits`` on the gathered rows
    logp_ij      (N, b + b_r)    sum_t log pi_i(y_ijt | y_ij<t) over response tokens; |y_ij| their count
    forget_i     = (1 / b) sum_j L_g(logp_ij, |y_ij|, ref_ij)   one ``Objective.forget_losses`` call per
                                                                 group g of replicas with equal objectives
    nll_i        = (1 / b_r) sum_j -logp_ij / |y_ij|             over the retain rows
    kl_i         = sum_{j,t} KL(pi_ref_i || pi_i) / N_r,i         over the retain rows' labelled positions,
                   pi_ref_i replica i's frozen starting model (one stacked forward of the kl replicas' references)
    total_i      = forget_weight_g * forget_i (+ retain_weight_g * nll_i or kl_i)

the formulas of ``llm.objective.objective_terms`` for each replica's own batch (forget and retain rows
in one forward pass, padded to the widest row of the step: causal attention makes the padding
invisible to real positions). The replica loop of ``llm.replica_training`` does the same per replica;
this path exists for GPUs, where that loop's kernel
launches and host syncs cost more than the arithmetic (see benchmarks/replicas.py).
"""

from __future__ import annotations

import numpy as np
import torch

from markovsim.losses import SEQUENCE_LOSSES, Objective, reduce_token_logps
from markovsim.tensor_checks import value_checks_skipped

from .config import TrainConfig
from .data import FORGET_STREAM, IGNORE_INDEX, RETAIN_STREAM, EncodedSequences, padded_cat
from .logps import sequence_token_kl, token_log_likelihoods, upcast
from .replica_common import ReplicaRows, StackedTokens, objective_groups
from .replicas import ReplicaStack

__all__ = ["BatchedForget"]


class BatchedForget:
    """The batched forget-only step (module docstring) of the replicas of ``stack``.

    Args:
        stack: the replicas' :class:`ReplicaStack` (stacked or vmap route).
        objectives: N objectives, all forget-only sequence losses (:meth:`applies`).
        configs: N ``TrainConfig`` (seed and batch size of each replica's batches).
        forget: the encoded forget set (CPU tensors; copied to the stack's device once): the shared set, or
            the replicas' distinct sets one after another (``llm.replica_common.replica_sets``).
        forget_refs: N (n_f,) float64 reference log-likelihoods of each replica's own set (None where the
            objective needs none).
        offsets: (N,) where each replica's own set starts in ``forget`` (None: one shared set).
        retain, retain_offsets: the encoded retain set(s) and offsets, likewise (needed when some objective
            has a retain term).
        references: N frozen reference models (each replica's starting model), needed where the objective
            has a kl retain term (None elsewhere).
    """

    def __init__(self, stack: ReplicaStack, objectives: list[Objective], configs: tuple[TrainConfig, ...],
                 forget: EncodedSequences, forget_refs: list[torch.Tensor | None], offsets: np.ndarray | None = None,
                 retain: EncodedSequences | None = None, retain_offsets: np.ndarray | None = None,
                 references: list | None = None):
        if not self.applies(stack, objectives):
            raise ValueError("BatchedForget needs a stacked/vmap route and sequence-loss objectives")
        self.stack, self.device = stack, stack.device
        seeds = [c.seed for c in configs]
        self.offsets = _offsets(offsets, len(configs))
        self.rows = ReplicaRows(len(forget) - int(self.offsets.max()), configs[0].batch_size, seeds, FORGET_STREAM)
        self.tokens = StackedTokens(forget, self.device)
        self.device_offsets = torch.as_tensor(self.offsets, device=self.device)[:, None]  # (N, 1)
        self.retain_rows = self.retain_tokens = None
        if any(o.retain is not None for o in objectives):
            if retain is None:
                raise ValueError("an objective has a retain term: pass the encoded retain set")
            self.retain_offsets = _offsets(retain_offsets, len(configs))
            size = configs[0].retain_batch_size or configs[0].batch_size
            self.retain_rows = ReplicaRows(len(retain) - int(self.retain_offsets.max()), size, seeds, RETAIN_STREAM)
            self.retain_tokens = StackedTokens(retain, self.device)
        # the kl replicas' frozen references as one stack of their own (positions into it follow kl_members)
        self.kl_members = [i for i, o in enumerate(objectives) if o.retain == "kl"]
        self.reference_stack = None
        if self.kl_members:
            if references is None or any(references[i] is None for i in self.kl_members):
                raise ValueError("an objective has a kl retain term: pass each such replica's reference model")
            self.reference_stack = ReplicaStack([references[i] for i in self.kl_members], stack.route, self.device)
            self.kl_index = torch.tensor(self.kl_members, device=self.device)
            self.kl_position = {replica: k for k, replica in enumerate(self.kl_members)}
        groups = objective_groups(objectives, forget_refs, self.device)
        # (objective, member replicas (n_g,) on the device, references (n_g, n_f) float64 or None, positions of
        # the members among the kl replicas or None)
        self.groups = [(o, torch.tensor(members, device=self.device), r,
                        torch.tensor([self.kl_position[i] for i in members], device=self.device)
                        if o.retain == "kl" else None) for o, members, r in groups]
        order = [i for _, members, _ in groups for i in members]
        self.inverse = torch.tensor(np.argsort(order), device=self.device)  # group-concatenated -> replica order

    @staticmethod
    def applies(stack: ReplicaStack, objectives) -> bool:
        """Whether every objective has a sequence forget loss and the stack has a batched route."""
        return stack.route != "loop" and all(o.forget in SEQUENCE_LOSSES for o in objectives)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every replica's step-``step`` objective and the values the single run logs.

        Returns: totals (N,) differentiable, and values (N, 4) detached float64 on the device: total, forget
            term, the mean per-token log-likelihood of the forget batch and the retain term (0 without one).
            Nothing is copied to the host (no sync): where a replica's logits are not finite at a labelled
            position, its log-likelihood column is NaN or inf (the check ``llm.logps.labelled_token_logps``
            makes with a sync), and the caller then takes the per-replica path, which isolates the failing
            replica.
        """
        with value_checks_skipped():  # the checks' value reads are host syncs; NaN/inf shows in the values
            rows = self.rows(step)  # (N, b) in each replica's own set
            index, ids, mask, labels = self.tokens.gather(rows + self.offsets[:, None])
            index = index - self.device_offsets  # (N, b) rows of each replica's own set, for its references
            b = rows.shape[1]
            if self.retain_tokens is not None:  # the retain rows after the forget rows, as objective_terms merges
                retain_rows = self.retain_rows(step) + self.retain_offsets[:, None]
                ids, mask, labels = _joined((ids, mask, labels), self.retain_tokens.gather(retain_rows)[1:],
                                            self.tokens.pad_values)
            logits = self.stack.stacked_batch_logits(ids, mask)  # (N, b + b_r, t, V)
            token_logps, token_mask = token_log_likelihoods(logits.flatten(0, 1), labels.flatten(0, 1))
            all_logps, all_tokens = (x.view(*ids.shape[:2]) for x in reduce_token_logps(token_logps, token_mask))
            logps, num_tokens = all_logps[:, :b], all_tokens[:, :b]  # (N, b) the forget rows
            nll = None
            if any(objective.retain == "nll" for objective, *_ in self.groups):
                nll = (-all_logps[:, b:] / all_tokens[:, b:]).sum(1) / (all_logps.shape[1] - b)  # (N,)
            kl = self._retain_kl(logits, ids, mask, labels, b) if self.kl_members else None  # (len(kl_members),)
            totals, forgets, retains = [], [], []
            for objective, members, references, kl_at in self.groups:
                member_logps, member_tokens = logps[members], num_tokens[members]  # (n_g, b)
                reference = None
                if references is not None:
                    reference = references.gather(1, index[members]).to(logps.dtype).flatten()
                losses = objective.forget_losses(member_logps.flatten(), member_tokens.flatten(), reference)
                forget = losses.view(member_logps.shape).sum(1) / b  # (n_g,)
                retain = None
                if objective.retain == "nll":
                    retain = nll[members]
                elif objective.retain == "kl":
                    retain = kl[kl_at]
                totals.append(objective.total(forget, retain))
                forgets.append(forget.detach())
                retains.append(torch.zeros_like(forget) if retain is None else retain.detach())
        totals, forgets, retains = (torch.cat(x)[self.inverse] for x in (totals, forgets, retains))  # (N,)
        per_token = (logps / num_tokens).sum(1).detach() / b  # (N,)
        values = torch.stack([totals.detach().double(), forgets.double(), per_token.double(), retains.double()], 1)
        return totals, values

    def _retain_kl(self, logits, ids, mask, labels, b: int) -> torch.Tensor:
        """(K,) each kl replica's retain term: the summed token KL from its reference over its retain rows,
        divided by their labelled-token count (``llm.objective``'s kl retain term)."""
        rows = ids[self.kl_index, b:]  # (K, b_r, t)
        with torch.no_grad():
            reference = self.reference_stack.stacked_batch_logits(rows, mask[self.kl_index, b:])  # (K, b_r, t, V)
        target = torch.log_softmax(upcast(reference[:, :, :-1]), -1).flatten(0, 1)  # (K b_r, t-1, V)
        labelled = labels[self.kl_index, b:, 1:] != IGNORE_INDEX  # (K, b_r, t-1)
        sums = sequence_token_kl(target, logits[self.kl_index, b:].flatten(0, 1), labelled.flatten(0, 1))  # (K b_r,)
        return sums.view(len(self.kl_members), -1).sum(1) / labelled.sum((1, 2))


def _offsets(offsets, count: int) -> np.ndarray:
    return np.zeros(count, dtype=np.int64) if offsets is None else np.asarray(offsets, dtype=np.int64)


def _joined(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...], pad_values) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels) of two row groups (N, b, t) and (N, b_r, t_r) side by side along the
    rows, the narrower padded to the wider (``pad_values``: BOS, mask 0, no label)."""
    return tuple(padded_cat([x, y], value, dim=1) for x, y, value in zip(first, second, pad_values))
