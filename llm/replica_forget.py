"""One unlearning step of N replicas with forget-only objectives, as one batched computation.

When every replica's objective is a forget-only sequence loss (``retain`` None, ``forget`` in
``markovsim.losses.SEQUENCE_LOSSES``: GA, NPO, SimNPO, ...) and the stack has a batched route,
:class:`BatchedForget` computes the step of all replicas without a per-replica loop:

    rows_i       (b,)            replica i's forget rows of step k (``llm.data.batch_indices``, seed_i)
    logits       (N, b, t, V)    ``ReplicaStack.stacked_batch_logits`` on the gathered rows
    logp_ij      (N, b)          sum_t log pi_i(y_ijt | y_ij<t) over response tokens; |y_ij| their count
    forget_i     = (1 / b) sum_j L_g(logp_ij, |y_ij|, ref_ij)   one ``Objective.forget_losses`` call per
                                                                 group g of replicas with equal objectives
    total_i      = forget_weight_g * forget_i

the formulas of ``llm.objective.objective_terms`` for each replica's own batch (rows padded to the
widest row of the step: causal attention makes the padding invisible to real positions). The
replica loop of ``llm.replica_training`` does the same per replica; this path exists for GPUs, where
that loop's kernel launches and host syncs cost more than the arithmetic (see benchmarks/replicas.py).
"""

from __future__ import annotations

import numpy as np
import torch

from markovsim.losses import SEQUENCE_LOSSES, Objective, reduce_token_logps
from markovsim.tensor_checks import value_checks_skipped

from .config import TrainConfig
from .data import FORGET_STREAM, EncodedSequences
from .logps import token_log_likelihoods
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
            the N replicas' own sets one after another (``llm.replica_common.replica_sets``).
        forget_refs: N (n_f,) float64 reference log-likelihoods of each replica's own set (None where the
            objective needs none).
        offsets: (N,) where each replica's own set starts in ``forget`` (None: one shared set).
    """

    def __init__(self, stack: ReplicaStack, objectives: list[Objective], configs: tuple[TrainConfig, ...],
                 forget: EncodedSequences, forget_refs: list[torch.Tensor | None], offsets: np.ndarray | None = None):
        if not self.applies(stack, objectives):
            raise ValueError("BatchedForget needs a stacked/vmap route and forget-only sequence-loss objectives")
        self.stack, self.device = stack, stack.device
        self.offsets = np.zeros(len(configs), dtype=np.int64) if offsets is None else np.asarray(offsets, np.int64)
        own_size = len(forget) - int(self.offsets.max())  # every replica's set has this many rows
        self.rows = ReplicaRows(own_size, configs[0].batch_size, [c.seed for c in configs], FORGET_STREAM)
        self.tokens = StackedTokens(forget, self.device)
        self.device_offsets = torch.as_tensor(self.offsets, device=self.device)[:, None]  # (N, 1)
        # (objective, member replicas (n_g,) on the device, references (n_g, n_f) float64 or None)
        groups = objective_groups(objectives, forget_refs, self.device)
        self.groups = [(o, torch.tensor(members, device=self.device), r) for o, members, r in groups]
        order = [i for _, members, _ in groups for i in members]
        self.inverse = torch.tensor(np.argsort(order), device=self.device)  # group-concatenated -> replica order

    @staticmethod
    def applies(stack: ReplicaStack, objectives) -> bool:
        """Whether every objective is forget-only with a sequence loss and the stack has a batched route."""
        return stack.route != "loop" and all(o.retain is None and o.forget in SEQUENCE_LOSSES for o in objectives)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every replica's step-``step`` objective and the values the single run logs.

        Returns: totals (N,) differentiable, and values (N, 3) detached float64 on the device: total, forget
            term and the mean per-token log-likelihood of the batch. Nothing is copied to the host (no sync):
            where a replica's logits are not finite at a labelled position, its log-likelihood column is
            NaN or inf (the check ``llm.logps.labelled_token_logps`` makes with a sync), and the caller then
            takes the per-replica path, which isolates the failing replica.
        """
        with value_checks_skipped():  # the checks' value reads are host syncs; NaN/inf shows in the values
            rows = self.rows(step)  # (N, b) in each replica's own set
            index, ids, mask, labels = self.tokens.gather(rows + self.offsets[:, None])
            index = index - self.device_offsets  # (N, b) rows of each replica's own set, for its references
            logits = self.stack.stacked_batch_logits(ids, mask)  # (N, b, t, V)
            token_logps, token_mask = token_log_likelihoods(logits.flatten(0, 1), labels.flatten(0, 1))  # (N b, t-1)
            logps, num_tokens = (x.view(rows.shape) for x in reduce_token_logps(token_logps, token_mask))  # (N, b)
            totals, forgets = [], []
            for objective, members, references in self.groups:
                member_logps, member_tokens = logps[members], num_tokens[members]  # (n_g, b)
                reference = None
                if references is not None:
                    reference = references.gather(1, index[members]).to(logps.dtype).flatten()
                losses = objective.forget_losses(member_logps.flatten(), member_tokens.flatten(), reference)
                forget = losses.view(member_logps.shape).sum(1) / rows.shape[1]  # (n_g,)
                totals.append(objective.total(forget))
                forgets.append(forget.detach())
        totals, forgets = torch.cat(totals)[self.inverse], torch.cat(forgets)[self.inverse]  # (N,)
        per_token = (logps / num_tokens).sum(1).detach() / rows.shape[1]  # (N,)
        values = torch.stack([totals.detach().double(), forgets.double(), per_token.double()], dim=1)
        return totals, values
