"""A registry method's loss on one transformer batch: :func:`method_loss` (the maths lives in markovsim.methods).

Each method's formula is the ``markovsim.methods`` piece applied to transformer log-probabilities; the
normalisers are global (:mod:`llm.methods.batch`), so data-parallel shares add up:

    GA+Mismatch  ga_mismatch_loss(forget logps * b_f/n_f, |y|, mismatch logps * b_m/n_m, |y_r|,
                                  sum_{normal tokens} KL(pi_ref || pi_theta) / N_r, config)
                 (scaling the per-sequence inputs by b/n turns the pieces' batch means into global shares)
    WHP          sum_{forget tokens} KL(softmax(generic_target_log_probs(v_b, v_r, alpha, target)) || pi_theta) / N_f
                 with v_b, v_r the RAW logits of the frozen baseline and reinforced models on the same rows
    KGA          kga_loss(G, unseen_gap, sum_{retain tokens} KL(A_D || A*) / N_r, retain_weight),
                 G = sum_{forget tokens} KL(A_f || A*) / N_f, the GLOBAL forget gap (|.| is not additive:
                 each process gets sign(G - c) dG_k; the value is split by the shard's token share)
    SeUL         sum_y masked_ga(token logps, mask, select_sensitive_tokens(token logps, mask, fraction)) / n_f
                 (``sensitive_states`` set: the tokens whose label is one of those ids)
    AdvGA/AdvNPO llm.objective.objective_terms of config.objective's forget loss with delta* added to the
                 layer's hidden states (one (d,) vector for the whole global batch), plus its retain term on
                 the unperturbed model; delta* = adversarial_perturbation(ascent on sum_y logp(y)/|y| / n_f)

``part`` selects the forget-side terms ("forget": GA+Mismatch's GA + mismatch, WHP, KGA's alignment, SeUL,
LAU's perturbed loss), the retain side ("retain", weighted) or both ("all"). ``context`` carries the
batch-global quantities (KGA's G, LAU's delta*; :func:`step_context`), so a subset of rows (one
component's, for the per-component power share) can be scored with the full batch's values.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from markovsim.losses import NEEDS_REFERENCE, masked_ga, reduce_token_logps
from markovsim.methods.kga import kga_loss
from markovsim.methods.lau import adversarial_perturbation, autograd_ascent_direction
from markovsim.methods.mismatch import ga_mismatch_loss
from markovsim.methods.seul import select_sensitive_tokens
from markovsim.methods.whp import generic_target_log_probs

from ..logps import labelled_token_logps, model_logits, summed_token_kl, upcast
from ..objective import BatchCounts, UnlearningBatch, objective_terms, retain_term
from .batch import MethodBatch, MethodTerms
from .layers import perturbed_hidden_states, unwrap_model
from .state import MethodState

__all__ = ["PARTS", "StepContext", "required_batches", "step_context", "method_loss", "token_kl_share"]

PARTS = ("all", "forget", "retain")
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Batch-global quantities of one step (None where the method has none).

    Attributes:
        forget_gap: KGA's global forget gap G = dis_{D_f}(A*, A_f) over the step's whole forget batch.
        perturbation: AdvGA/AdvNPO's delta* (d,), from the whole forget batch.
    """

    forget_gap: float | None = None
    perturbation: torch.Tensor | None = None


def required_batches(state: MethodState) -> tuple[str, ...]:
    """The MethodBatch fields ``method_loss`` needs for ``state`` (forget always; TaskNegation: none)."""
    name, config = state.name, state.config
    if name == "TaskNegation":
        return ()
    if name == "GA+Mismatch":
        return ("forget", "mismatch", "retain")
    if name == "KGA":
        return ("forget", "retain")
    if name in ("AdvGA", "AdvNPO"):
        extra = ("retain",) if config.objective.retain is not None else ()
        ref = ("forget_ref_logps",) if config.objective.forget in NEEDS_REFERENCE else ()
        return ("forget",) + extra + ref
    return ("forget",)


def _check_inputs(state, batch, part) -> None:
    if not isinstance(state, MethodState):
        raise TypeError(f"state must be a MethodState from prepare_method, got {type(state).__name__}")
    if state.name == "TaskNegation":
        raise ValueError("TaskNegation is an update rule, not a loss: use apply_task_negation(model, "
                         "state.auxiliary['fine_tuned'], scale)")
    if not isinstance(batch, MethodBatch):
        raise TypeError(f"batch must be a MethodBatch, got {type(batch).__name__}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    missing = [f for f in required_batches(state) if getattr(batch, f) is None
               and not (f == "retain" and part == "forget") and not (f == "mismatch" and part == "retain")]
    if missing:
        raise ValueError(f"{state.name} needs batch fields {missing} (MethodBatch({', '.join(missing)}=...))")
    counts = batch.counts
    for field_name, count in (("retain", counts.retain_tokens), ("mismatch", counts.mismatch_sequences)):
        if getattr(batch, field_name) is not None and count == 0:
            raise ValueError(f"batch has {field_name} rows but counts.{field_name}_"
                             f"{'tokens' if field_name == 'retain' else 'sequences'} is 0")


def token_kl_share(target_log_probs: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
                   normaliser: int) -> torch.Tensor:
    """sum over labelled tokens of KL(p_target || softmax(logits)) / normaliser (``markovsim.losses.kl``).

    Args: target_log_probs (b, t-1, V) (may hold -inf); logits (b, t, V) of the model (the last position
    predicts nothing); mask (b, t-1); normaliser: the global token count.
    """
    return summed_token_kl(target_log_probs, logits, mask) / normaliser


@torch.no_grad()
def _frozen_log_probs(model, batch: dict) -> torch.Tensor:
    """log_softmax of a frozen model's logits at the predicting positions, (b, t-1, V)."""
    return torch.log_softmax(upcast(model_logits(model, batch)[:, :-1]), -1)


def _forward(model, batch: dict):
    """logits (b, t, V), token_logps (b, t-1), mask (b, t-1), logps (b,), num_tokens (b,)."""
    logits = model_logits(model, batch)
    token_logps, mask = labelled_token_logps(logits, batch["labels"])
    logps, num_tokens = reduce_token_logps(token_logps, mask)
    return logits, token_logps, mask, logps, num_tokens


def _retain_kl(state, model, batch: MethodBatch) -> torch.Tensor:
    """sum over retain tokens of KL(pi_ref || pi_theta) / N_r (GA+Mismatch's normal data, KGA's L_r)."""
    logits, _, mask, _, _ = _forward(model, batch.retain)
    return token_kl_share(_frozen_log_probs(state.reference, batch.retain), logits, mask, batch.counts.retain_tokens)


def _zero_like(model) -> torch.Tensor:
    return next(p for p in model.parameters()).new_zeros(()).float()


def _ga_mismatch(state, model, batch: MethodBatch, part: str) -> MethodTerms:
    config, counts = state.config, batch.counts
    _, _, _, logps, num_tokens = _forward(model, batch.forget)
    if part == "retain":
        retain = _retain_kl(state, model, batch)
        total, terms = config.retain_weight * retain, {"forget": retain.new_zeros(()), "retain": retain.detach()}
    else:
        _, _, _, m_logps, m_tokens = _forward(model, batch.mismatch)
        retain = _retain_kl(state, model, batch) if part == "all" else logps.new_zeros(())
        weights = config if part == "all" else dataclasses.replace(config, retain_weight=0.0)
        total, terms = ga_mismatch_loss(logps * (logps.shape[0] / counts.forget_sequences), num_tokens,
                                        m_logps * (m_logps.shape[0] / counts.mismatch_sequences), m_tokens,
                                        retain, weights)
    return MethodTerms(total, terms, logps.detach(), num_tokens.detach())


def _whp(state, model, batch: MethodBatch, part: str) -> MethodTerms:
    config = state.config
    logits, _, mask, logps, num_tokens = _forward(model, batch.forget)
    if part == "retain":
        total = _zero_like(model)
    else:
        with torch.no_grad():
            baseline = upcast(model_logits(state.reference, batch.forget)[:, :-1])  # (b, t-1, V) raw v_b
            reinforced = upcast(model_logits(state.auxiliary["reinforced"], batch.forget)[:, :-1])  # v_r
            target = generic_target_log_probs(baseline, reinforced, config.alpha, config.target)
        total = token_kl_share(target, logits, mask, batch.counts.forget_tokens)
    return MethodTerms(total, {"forget": total.detach()}, logps.detach(), num_tokens.detach())


def _forget_gap(state, model, batch: MethodBatch):
    logits, _, mask, logps, num_tokens = _forward(model, batch.forget)
    gap = token_kl_share(_frozen_log_probs(state.auxiliary["forget"], batch.forget), logits, mask,
                         batch.counts.forget_tokens)
    return gap, mask, logps, num_tokens


def _kga(state, model, batch: MethodBatch, part: str, context: StepContext | None,
         reduce_sum: ReduceSum | None) -> MethodTerms:
    config, counts = state.config, batch.counts
    gap, mask, logps, num_tokens = _forget_gap(state, model, batch)
    if part == "retain":
        retain = _retain_kl(state, model, batch)
        return MethodTerms(config.retain_weight * retain, {"forget": gap.new_zeros(()), "retain": retain.detach()},
                           logps.detach(), num_tokens.detach())
    if context is None:  # this batch is the whole step: G is this forward's gap (summed over processes)
        context = StepContext(forget_gap=float(gap.detach() if reduce_sum is None else reduce_sum(gap.detach())))
    unseen = torch.tensor(state.unseen_gap, dtype=gap.dtype, device=gap.device)
    global_gap = gap + (context.forget_gap - gap.detach())  # value G (global), gradient d(this share)
    share = float(mask.sum()) / counts.forget_tokens  # this shard's share of the forget tokens
    retain = _retain_kl(state, model, batch).to(gap.dtype) if part == "all" else gap.new_zeros(())
    total, terms = kga_loss(global_gap, unseen, retain, config.retain_weight if part == "all" else 0.0)
    total = total - terms["alignment"] * (1.0 - share)  # value: share * |G - c| (+ weighted retain share)
    return MethodTerms(total, terms | {"forget": terms["alignment"] * share}, logps.detach(), num_tokens.detach())


def _seul(state, model, batch: MethodBatch, part: str) -> MethodTerms:
    config = state.config
    _, token_logps, mask, logps, num_tokens = _forward(model, batch.forget)
    if config.sensitive_states is None:
        selected = select_sensitive_tokens(token_logps, mask, config.fraction)  # (b, t-1)
    else:
        states = torch.tensor(config.sensitive_states, device=mask.device)
        selected = torch.isin(batch.forget["labels"][:, 1:], states) & mask
    losses = masked_ga(token_logps, mask, selected)  # (b,)
    total = losses.sum() / batch.counts.forget_sequences if part != "retain" else _zero_like(model)
    terms = {"forget": total.detach(), "selected_fraction": (selected.sum() / mask.sum()).detach()}
    return MethodTerms(total, terms, logps.detach(), num_tokens.detach())


def _perturbation(state, model, batch: MethodBatch, reduce_sum: ReduceSum | None) -> torch.Tensor:
    """The adversary's delta* (d,): K normalised PGD steps on the forget rows' sum_y logp(y)/|y| / n_f."""
    config = state.config
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model  # no DDP hooks
    hidden = int(unwrap_model(model).config.hidden_size)
    dtype = next(p for p in inner.parameters() if torch.is_floating_point(p)).dtype
    start = torch.zeros(hidden, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
                        device=batch.forget["input_ids"].device)
    if config.epsilon == 0 or config.inner_steps == 0:
        return start

    def likelihood(delta: torch.Tensor) -> torch.Tensor:
        with perturbed_hidden_states(inner, state.layer, delta):
            _, _, _, logps, num_tokens = _forward(inner, batch.forget)
        return (logps / num_tokens).sum() / batch.counts.forget_sequences

    ascent = autograd_ascent_direction(likelihood)
    direction = ascent if reduce_sum is None else (lambda delta: reduce_sum(ascent(delta)))
    return adversarial_perturbation(direction, start, config.epsilon, config.inner_steps, config.inner_learning_rate)


def _lau(state, model, batch: MethodBatch, part: str, context: StepContext) -> MethodTerms:
    objective, counts = state.config.objective, batch.counts
    forget_objective = dataclasses.replace(objective, retain=None)
    delta = context.perturbation
    with perturbed_hidden_states(model, state.layer, delta):
        terms = objective_terms(model, forget_objective, UnlearningBatch(
            batch.forget, batch.forget_ref_logps, BatchCounts(counts.forget_sequences)))
    forget = terms.total if part != "retain" else terms.total * 0.0  # forget_weight * forget loss share
    logged = {"forget": terms.forget, "perturbation_norm": delta.norm().detach()}
    total = forget
    if objective.retain is not None and part != "forget":
        retain = retain_term(model, objective, batch.retain, BatchCounts(counts.forget_sequences,
                             counts.retain_sequences, counts.retain_tokens), state.reference)
        total = forget + objective.retain_weight * retain
        logged["retain"] = retain.detach()
    return MethodTerms(total, logged, terms.forget_logps, terms.forget_num_tokens)


def step_context(state: MethodState, model, batch: MethodBatch, reduce_sum: ReduceSum | None = None) -> StepContext:
    """The batch-global quantities of ``batch`` (KGA's G, LAU's delta*); ``reduce_sum`` sums a tensor over
    the data-parallel processes (None: this process holds the whole batch)."""
    _check_inputs(state, batch, "forget")
    if state.name == "KGA":
        with torch.no_grad():
            gap = _forget_gap(state, model, batch)[0].detach()
        return StepContext(forget_gap=float(gap if reduce_sum is None else reduce_sum(gap)))
    if state.name in ("AdvGA", "AdvNPO"):
        with torch.enable_grad():  # the adversary's ascent needs gradients also in a no-grad evaluation step
            return StepContext(perturbation=_perturbation(state, model, batch, reduce_sum))
    return StepContext()


def method_loss(state: MethodState, model, batch: MethodBatch, context: StepContext | None = None,
                reduce_sum: ReduceSum | None = None, part: str = "all") -> MethodTerms:
    """Method ``state.name``'s loss share on ``batch`` (module docstring); unpacks as ``total, terms``.

    Args:
        state: from :func:`~llm.methods.state.prepare_method` (not TaskNegation: an update rule).
        model: the causal LM being unlearned (train mode; possibly DDP / peft wrapped).
        batch: this process's rows and the global counts (:class:`~llm.methods.batch.MethodBatch`).
        context: the step's global quantities; default: those of this batch (:func:`step_context`; KGA's
            gap from the loss's own forward pass).
        reduce_sum: data parallelism: sums a tensor over processes (e.g. ``accelerator.reduce(t, "sum")``).
        part: "all", "forget" (forget-side terms only) or "retain" (the weighted retain term only).
    """
    _check_inputs(state, batch, part)
    if context is None and state.name in ("AdvGA", "AdvNPO"):
        context = step_context(state, model, batch, reduce_sum)
    if state.name == "GA+Mismatch":
        result = _ga_mismatch(state, model, batch, part)
    elif state.name == "WHP":
        result = _whp(state, model, batch, part)
    elif state.name == "KGA":  # its global gap comes from its own forward unless given (no second pass)
        result = _kga(state, model, batch, part, context, reduce_sum)
    elif state.name == "SeUL":
        result = _seul(state, model, batch, part)
    else:
        result = _lau(state, model, batch, part, context)
    return result
