"""Training a causal LM on TOFU question/answer pairs: fine-tuning and unlearning, on an :class:`llm.session.Session`.

Both reuse the transformer side's machinery: the Session (optimizer, schedule, clipping, bf16 on CUDA,
data parallelism, NaN guard, JSONL metrics, checkpoints with exact resume), the seeded batch order of
:func:`llm.data.batch_indices`, and the losses of :mod:`llm.objective` (which evaluates the shared
``markovsim.losses`` objectives). No loss is written here:

    fine-tuning  minimise the nll retain term on the training pairs
                 L = (1 / n) sum_i -logp(answer_i | question_i) / |answer_i|        (a batch of n pairs)
    unlearning   objective_terms(model, objective, forget batch, forget_ref_logps, retain batch)

NPO's reference log-likelihoods of the forget answers are computed once from the starting model
(:func:`llm.tofu.scoring.answer_logps`) and passed with each batch: no second model in memory.
Labels sit on answer tokens + EOS only (:mod:`llm.tofu.format`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm.checkpoint import latest_checkpoint
from llm.config import TrainConfig
from llm.data import FORGET_STREAM, RETAIN_STREAM, batch_indices, shard
from llm.objective import BatchCounts, UnlearningBatch, objective_terms, retain_term
from llm.session import Session
from markovsim.config import divergence_reason
from markovsim.losses import NEEDS_REFERENCE
from markovsim.objectives import Objective
from markovsim.runtime import torch_threads

from .data import TofuItem
from .format import collate, format_example
from .scoring import answer_logps

__all__ = ["Examples", "TrainOutcome", "finetune", "unlearn"]

_FINETUNE_OBJECTIVE = Objective("ga", "nll")  # only its nll retain term is used: the fine-tuning loss


@dataclass(frozen=True)
class Examples:
    """Tokenised QA pairs (answer-only labels) and the pad id; ``batch(rows)`` right-pads them."""

    examples: tuple[dict, ...]
    pad_token_id: int

    @classmethod
    def build(cls, tokenizer, items: Sequence[TofuItem]) -> Examples:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(tuple(format_example(tokenizer, i.question, i.answer) for i in items), pad)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, rows, device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate([self.examples[int(r)] for r in rows], self.pad_token_id).items()}

    def num_label_tokens(self, rows) -> int:
        return sum(sum(label != -100 for label in self.examples[int(r)]["labels"]) for r in rows)


@dataclass(frozen=True)
class TrainOutcome:
    """What a stage's training did: steps run, the last loss, and the divergence (None when none)."""

    steps: int
    last_loss: float
    diverged_at: int | None = None
    reason: str | None = None


def _resume_flag(run_dir) -> bool:
    """Resume from the newest checkpoint in ``run_dir`` if there is one; else clear the folder's stale log."""
    if run_dir is None:
        return False
    if latest_checkpoint(run_dir) is not None:
        return True
    log = os.path.join(os.fspath(run_dir), "metrics.jsonl")
    if os.path.isfile(log):
        os.remove(log)  # a killed run without a checkpoint restarts from step 0
    return False


def _loop(session: Session, forward, description: str, threshold) -> TrainOutcome:
    """Steps ``start_step .. total_steps - 1``: forward/backward, log, update; stop at a divergence."""
    session.begin(_resume_flag(session.run_dir))
    session.model.train()
    bar = session.progress_bar(description)
    loss = float("nan")
    for step in range(session.start_step, session.total_steps):
        outcome = session.forward_backward(forward, step, backward=True)
        reason = outcome.reason or threshold(outcome.values)
        if reason is not None:
            bar.close()
            return TrainOutcome(step, outcome.values["total"], step, reason)
        loss = outcome.values["total"]
        session.log.append({"kind": "train", "step": step, **outcome.values, "grad_norm": outcome.grad_norm,
                            "learning_rate": session.scheduler.get_last_lr()[0]})
        session.advance(step, loss, bar, lambda: {})
    bar.close()
    return TrainOutcome(session.total_steps, loss)


def finetune(model, tokenizer, items: Sequence[TofuItem], config: TrainConfig, run_dir=None,
             description: str = "finetune") -> TrainOutcome:
    """Fine-tune ``model`` in place on QA pairs: ``config.total_steps(len(items))`` steps of the nll loss.

    ``run_dir`` holds metrics.jsonl and (with ``config.checkpoint_every``) checkpoints; a run killed
    after a checkpoint resumes from it when called again with the same starting model and config.
    """
    data = Examples.build(tokenizer, items)
    with torch_threads(config.num_threads):
        session = Session(model, config, config.total_steps(len(data)), run_dir, "tofu-finetune", ("total",))

        def forward(step: int) -> dict:
            rows = batch_indices(len(data), config.batch_size, step, config.seed, RETAIN_STREAM)
            local = shard(rows, session.accelerator.process_index, session.num_processes)
            counts = BatchCounts(0, len(rows), data.num_label_tokens(rows))
            return {"total": retain_term(session.model, _FINETUNE_OBJECTIVE, data.batch(local, session.device),
                                         counts)}

        return _loop(session, forward, description, lambda values: None)


def unlearn(model, tokenizer, objective: Objective, forget: Sequence[TofuItem], retain: Sequence[TofuItem] | None,
            config: TrainConfig, run_dir=None, description: str = "unlearn") -> TrainOutcome:
    """Unlearn ``forget`` from ``model`` in place with ``objective`` (a retain batch per step if it has a retain term).

    ``config.total_steps(len(forget))`` steps; each takes ``batch_size`` forget pairs and
    ``retain_batch_size`` (default ``batch_size``) retain pairs. Stops early (returning the divergence)
    when the loss or gradient turns non-finite or the forget log-likelihood per token falls below
    ``config.divergence_logp_per_token``; the model keeps its last finite update.
    """
    forget_data = Examples.build(tokenizer, forget)
    retain_data = Examples.build(tokenizer, retain) if objective.retain is not None else None
    if objective.retain is not None and not retain:
        raise ValueError(f"objective has retain term {objective.retain!r}: pass retain pairs")
    with torch_threads(config.num_threads):
        ref = None
        if objective.forget in NEEDS_REFERENCE:  # cached once from the starting model
            ref = torch.as_tensor(answer_logps(model, tokenizer, [i.question for i in forget],
                                               [i.answer for i in forget], config.eval_batch_size)[0])  # (n_f,)
        reference = copy.deepcopy(model).eval().requires_grad_(False) if objective.retain == "kl" else None
        session = Session(model, config, config.total_steps(len(forget_data)), run_dir, "tofu-unlearn",
                          ("total", "forget", "retain", "logp_per_token"))

        def forward(step: int) -> dict:
            rank, world, device = session.accelerator.process_index, session.num_processes, session.device
            rows = batch_indices(len(forget_data), config.batch_size, step, config.seed, FORGET_STREAM)
            local = shard(rows, rank, world)
            retain_batch, counts = None, BatchCounts(len(rows))
            if retain_data is not None:
                retain_rows = batch_indices(len(retain_data), config.retain_batch_size or config.batch_size, step,
                                            config.seed, RETAIN_STREAM)
                retain_batch = retain_data.batch(shard(retain_rows, rank, world), device)
                counts = BatchCounts(len(rows), len(retain_rows), retain_data.num_label_tokens(retain_rows))
            batch = UnlearningBatch(forget_data.batch(local, device),
                                    None if ref is None else ref[local].to(device), counts, retain_batch)
            terms = objective_terms(session.model, objective, batch, reference)
            per_token = (terms.forget_logps / terms.forget_num_tokens).sum() / counts.forget_sequences
            return {"total": terms.total, "forget": terms.forget,
                    "retain": terms.retain if terms.retain is not None else 0.0, "logp_per_token": per_token}

        def threshold(values: dict) -> str | None:
            return divergence_reason(values["total"], values["logp_per_token"],
                                     threshold=config.divergence_logp_per_token)

        return _loop(session, forward, description, threshold)
