"""An unlearning ``Objective`` (``markovsim.losses``) evaluated on a transformer batch.

One forward pass over the merged forget (+ preferred) (+ retain) rows gives every term:

    forget term = (1 / n_f) sum_{y in batch} L_f(y)                    n_f: global forget batch size
    nll retain  = (1 / n_r) sum_{y} -logp_theta(y) / |y|               n_r: global retain batch size
    kl retain   = (1 / N_r) sum_{y, t} KL(pi_ref(.|ctx_t) || pi_theta(.|ctx_t))   N_r: global retain tokens
    objective   = forget_weight * forget term + retain_weight * retain term

With data parallelism each process holds a shard of the global batch; the normalisers are the
GLOBAL counts, so the shards' values add up to the objective of the whole batch (the KL term is the
token-weighted mean over all retain response tokens, as ``markovsim.exact_gradients.retain_kl_value``).
NPO/DPO take reference log-probs precomputed once (``ref_logps``): no second model. Only a KL retain
term needs a live reference model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from markovsim.losses import LOSSES, SEQUENCE_LOSSES, Objective, reduce_token_logps
from markovsim.tensor_checks import value_checks_skipped

from .data import merge_batches
from .logps import labelled_token_logps, model_logits, summed_token_kl, upcast

__all__ = ["BatchCounts", "ObjectiveTerms", "UnlearningBatch", "objective_terms", "retain_term", "SEQUENCE_LOSSES"]


@dataclass(frozen=True)
class BatchCounts:
    """Global normalisers of one optimisation step (identical on every process).

    Attributes:
        forget_sequences: n_f, forget sequences in the global batch.
        retain_sequences: n_r, retain sequences in the global batch (0 without a retain term).
        retain_tokens: N_r, retain response tokens in the global batch.
    """

    forget_sequences: int
    retain_sequences: int = 0
    retain_tokens: int = 0


@dataclass(frozen=True)
class UnlearningBatch:
    """This process's rows of one step.

    Attributes:
        forget: forget batch ``{input_ids, attention_mask, labels}`` (response labels), (b_f, t).
        forget_ref_logps: (b_f,) cached reference log-likelihoods (npo, dpo), else None.
        retain: retain batch (b_r, t) or None.
        preferred: DPO's preferred responses, aligned row by row with ``forget``, or None.
        preferred_ref_logps: (b_f,) their reference log-likelihoods (dpo), else None.
        counts: the global normalisers.
    """

    forget: dict
    forget_ref_logps: torch.Tensor | None
    counts: BatchCounts
    retain: dict | None = None
    preferred: dict | None = None
    preferred_ref_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class ObjectiveTerms:
    """This shard's share of the step objective (shares over processes add up to the global values).

    Attributes:
        total: scalar, forget_weight * forget + retain_weight * retain (differentiable).
        forget: scalar forget term (detached). retain: scalar retain term (detached) or None.
        forget_logps, forget_num_tokens: (b_f,) detached, for diagnostics.
    """

    total: torch.Tensor
    forget: torch.Tensor
    retain: torch.Tensor | None
    forget_logps: torch.Tensor
    forget_num_tokens: torch.Tensor


def _forget_losses(objective: Objective, token_logps, mask, logps, num_tokens, batch: UnlearningBatch,
                   preferred_logps) -> torch.Tensor:
    """Per-sequence forget losses (b_f,) for every loss of ``markovsim.losses.LOSSES``."""
    if objective.forget in SEQUENCE_LOSSES:
        ref = batch.forget_ref_logps
        return objective.forget_losses(logps, num_tokens, None if ref is None else ref.to(logps.dtype))
    if objective.forget == "wga":
        return LOSSES["wga"](token_logps, mask, alpha=objective.alpha)
    if batch.preferred is None or batch.preferred_ref_logps is None or batch.forget_ref_logps is None:
        raise ValueError("dpo needs preferred responses and reference log-probs for both responses")
    return LOSSES["dpo"](preferred_logps, batch.preferred_ref_logps.to(logps.dtype), logps,
                         batch.forget_ref_logps.to(logps.dtype), beta=objective.beta)


def _retain_term(objective: Objective, logits, token_logps, mask, counts: BatchCounts, reference,
                 retain_batch) -> torch.Tensor:
    """The retain term's share: nll token means / n_r, or summed token KLs / N_r.

    Args: logits (b_r, t, vocab), token_logps and mask (b_r, t-1), trimmed to the retain batch's width t.
    """
    logps, num_tokens = reduce_token_logps(token_logps, mask)  # (b_r,)
    if objective.retain == "nll":
        return (-logps / num_tokens).sum() / counts.retain_sequences
    if reference is None:
        raise ValueError("a kl retain term needs the reference model; pass reference=")
    with torch.no_grad():
        ref_logits = model_logits(reference, retain_batch)  # (b_r, t, vocab)
    ref_logprobs = torch.log_softmax(upcast(ref_logits[:, :-1]), -1)  # (b_r, t-1, vocab)
    return summed_token_kl(ref_logprobs, logits, mask) / counts.retain_tokens


def _parts(objective: Objective, batch: UnlearningBatch) -> dict[str, dict]:
    """The row groups one forward pass needs, in order: forget, preferred (dpo), retain (retain term)."""
    parts = {"forget": batch.forget}
    if objective.forget == "dpo":
        if batch.preferred is None:
            raise ValueError("dpo needs preferred responses (the batch's preferred rows)")
        parts["preferred"] = batch.preferred
    if objective.retain is not None:
        if batch.retain is None:
            raise ValueError(f"objective has retain term {objective.retain!r}; the batch needs retain rows")
        parts["retain"] = batch.retain
    return parts


def objective_terms(model, objective: Objective, batch: UnlearningBatch, reference=None) -> ObjectiveTerms:
    """Evaluate ``objective`` on this process's rows with one forward pass of ``model``.

    Args:
        model: the causal LM being unlearned (train mode; possibly DDP-wrapped).
        objective: a ``markovsim.losses.Objective``.
        batch: this process's rows and the global normalisers.
        reference: the frozen reference model, only for a kl retain term.
    Returns: :class:`ObjectiveTerms`.
    """
    parts = _parts(objective, batch)
    pad = int(batch.forget["input_ids"][0, 0])  # the BOS id, also the padding id
    merged, row_slices = merge_batches(list(parts.values()), pad)
    rows = dict(zip(parts, row_slices))
    logits = model_logits(model, merged)  # (B, t, vocab)
    token_logps, mask = labelled_token_logps(logits, merged["labels"])  # (B, t-1)
    logps, num_tokens = reduce_token_logps(token_logps, mask)  # (B,)
    f = rows["forget"]
    preferred_logps = logps[rows["preferred"]] if "preferred" in rows else None
    losses = _forget_losses(objective, token_logps[f], mask[f], logps[f], num_tokens[f], batch,
                            preferred_logps)  # (b_f,)
    forget = losses.sum() / batch.counts.forget_sequences
    retain = None
    if "retain" in rows:
        r, width = rows["retain"], batch.retain["input_ids"].shape[1]
        retain = _retain_term(objective, logits[r, :width], token_logps[r, : width - 1], mask[r, : width - 1],
                              batch.counts, reference, batch.retain)
    with value_checks_skipped():  # terms computed here: an overflow to inf is the divergence rule's to report
        total = objective.total(forget, retain)
    return ObjectiveTerms(total, forget.detach(), None if retain is None else retain.detach(),
                          logps[f].detach(), num_tokens[f].detach())


def retain_term(model, objective: Objective, retain: dict, counts: BatchCounts, reference=None) -> torch.Tensor:
    """The retain term's share on ``retain`` rows alone (one forward pass), before ``retain_weight``.

    The same value as the retain part of :func:`objective_terms` (normalised by the GLOBAL ``counts``).

    Args:
        model: the causal LM; retain: a batch ``{input_ids, attention_mask, labels}`` (b_r, t).
        counts: the normalisers (``retain_sequences`` for nll, ``retain_tokens`` for kl).
        reference: the frozen reference model, only for a kl retain term.
    Returns: a differentiable scalar.
    """
    if objective.retain is None:
        raise ValueError("this objective has no retain term")
    logits = model_logits(model, retain)  # (b_r, t, vocab)
    token_logps, mask = labelled_token_logps(logits, retain["labels"])  # (b_r, t-1)
    return _retain_term(objective, logits, token_logps, mask, counts, reference, retain)
