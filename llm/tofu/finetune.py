"""Training a causal LM on TOFU question/answer pairs: fine-tuning and unlearning, on an :class:`llm.session.Session`.

Both reuse the transformer side's machinery: the Session (optimizer, schedule, clipping, bf16 on CUDA,
data parallelism, NaN guard, JSONL metrics, checkpoints with exact resume), the seeded batch order of
:func:`llm.data.batch_indices`, and the losses of :mod:`llm.objective` (which evaluates the shared
``markovsim.losses`` objectives). No loss is written here:

    fine-tuning  minimise the nll retain term on the training pairs
                 L = (1 / n) sum_i -logp(answer_i | question_i) / |answer_i|        (a batch of n pairs)
    unlearning   objective_terms(model, objective, forget batch, forget_ref_logps, retain batch)
    registry     llm.methods.method_loss(state, model, MethodBatch(forget, counts, retain, mismatch, ref))
    methods      (GA+Mismatch, WHP, KGA, SeUL, AdvGA, AdvNPO: :func:`unlearn_method`)

NPO's reference log-likelihoods of the forget answers are computed once from the starting model
(:func:`llm.tofu.scoring.answer_logps`, on the run's device and under its bf16 autocast, as the
training forward passes are) and passed with each batch: no second model in memory.
Labels sit on answer tokens + EOS only (:mod:`llm.tofu.format`).

Several processes (``accelerate launch`` / ``torchrun``; the configs in ``llm/tofu/accelerate/``):
every process computes the same global batch and trains on its shard (DDP: numbers equal one process
at the same global batch); under FSDP the final weights are gathered into ``TrainOutcome.state_dict``
on the main process (``accelerator.get_state_dict``). :func:`save_trained` writes a trained model from
the main process only; :func:`is_main_process` and :func:`wait_for_everyone` let callers write their
own files once.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llm.checkpoint import latest_checkpoint
from llm.config import TrainConfig
from llm.data import FORGET_STREAM, RETAIN_STREAM, batch_indices, shard
from llm.models import save_model
from llm.objective import BatchCounts, UnlearningBatch, objective_terms, retain_term
from llm.runtime import autocast, is_distributed_launch, resolve_device
from llm.session import Session
from markovsim.config import divergence_reason
from markovsim.losses import NEEDS_REFERENCE
from markovsim.objectives import Objective
from markovsim.runtime import torch_threads

from .data import TofuItem
from .format import collate, format_example
from .scoring import answer_logps

__all__ = ["Examples", "TrainOutcome", "finetune", "unlearn", "unlearn_method", "save_trained", "is_main_process",
           "wait_for_everyone"]

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
    """What a stage's training did: steps run, the last loss, and the divergence (None when none).

    ``state_dict``: under FSDP (sharded weights), the full trained weights gathered on the main
    process (``accelerator.get_state_dict``; empty on the others); None otherwise, where the model
    object itself holds the trained weights. Pass the outcome to :func:`save_trained`.
    """

    steps: int
    last_loss: float
    diverged_at: int | None = None
    reason: str | None = None
    state_dict: dict | None = field(default=None, repr=False, compare=False)


def is_main_process() -> bool:
    """True in a single process and in process 0 of a launch (``accelerate launch`` / ``torchrun``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone(device: str = "auto") -> None:
    """A barrier across the processes of a launch (a no-op in a single process).

    ``device`` is the run's device setting: before any training stage has set up the processes'
    communication, it picks the backend as the training does (gloo for "cpu", else nccl on CUDA).
    """
    if is_distributed_launch():
        from accelerate import PartialState

        PartialState(cpu=resolve_device(device) == "cpu").wait_for_everyone()


def save_trained(model, tokenizer, path, outcome: TrainOutcome | None = None, merge_lora: bool = False,
                 device: str = "auto") -> None:
    """Write a model trained by :func:`finetune` / :func:`unlearn` (and its tokenizer) to ``path``, once.

    Collective: every process calls it; the main process writes (atomically,
    :func:`llm.models.save_model`) and the others wait (``device``: see :func:`wait_for_everyone`).
    Under FSDP the weights written are ``outcome.state_dict`` (gathered from the shards); otherwise
    the model's own. ``merge_lora`` folds LoRA adapters into the weights first.
    """
    sharded = outcome is not None and outcome.state_dict is not None
    if sharded and merge_lora:
        raise ValueError("LoRA under FSDP is not supported: train LoRA with DDP (llm/tofu/accelerate/ddp.yaml)")
    if is_main_process():
        if merge_lora:
            model = model.merge_and_unload()  # a plain model: the adapters folded into the weights
        save_model(model, path, progress=False, tokenizer=tokenizer, state_dict=outcome.state_dict if sharded else None)
    wait_for_everyone(device)


def _is_fsdp(session: Session) -> bool:
    from accelerate.utils import DistributedType

    return session.accelerator.distributed_type == DistributedType.FSDP


def _session(model, config: TrainConfig, total_steps: int, run_dir, kind: str, names: tuple[str, ...]) -> Session:
    session = Session(model, config, total_steps, run_dir, kind, names)
    if _is_fsdp(session) and config.checkpoint_every is not None:
        raise ValueError("checkpoint_every is not supported under FSDP (a checkpoint would need the sharded "
                         "optimizer state); leave --checkpoint-every unset, or use DDP")
    if _is_fsdp(session) and hasattr(model, "peft_config"):
        raise ValueError("LoRA under FSDP is not supported (the adapters could not be merged into gathered "
                         "weights): train LoRA with DDP (llm/tofu/accelerate/ddp.yaml)")
    return session


def _outcome(session: Session, steps: int, last_loss: float, diverged_at=None, reason=None) -> TrainOutcome:
    """The stage's outcome; under FSDP the full weights are gathered (a collective: every process calls it)."""
    state = session.accelerator.get_state_dict(session.model) if _is_fsdp(session) else None
    return TrainOutcome(steps, last_loss, diverged_at, reason, state)


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
            return _outcome(session, step, outcome.values["total"], step, reason)
        loss = outcome.values["total"]
        session.log.append({"kind": "train", "step": step, **outcome.values, "grad_norm": outcome.grad_norm,
                            "learning_rate": session.scheduler.get_last_lr()[0]})
        session.advance(step, loss, bar, lambda: {})
    bar.close()
    return _outcome(session, session.total_steps, loss)


def _reference_logps(session: Session, tokenizer, forget: Sequence[TofuItem], config: TrainConfig) -> torch.Tensor:
    """(n_f,) the starting model's forget log-likelihoods, under the run's autocast: cached once, before any resume."""
    with autocast(session.device.type, session.bf16):
        return torch.as_tensor(answer_logps(session.model, tokenizer, [i.question for i in forget],
                                            [i.answer for i in forget], config.eval_batch_size)[0])


def _retain_rows(session: Session, retain_data: Examples, config: TrainConfig, step: int) -> tuple[dict, int, int]:
    """Step ``step``'s retain rows: (this process's batch, n_r, N_r) of the global retain batch (RETAIN_STREAM)."""
    rows = batch_indices(len(retain_data), config.retain_batch_size or config.batch_size, step, config.seed,
                         RETAIN_STREAM)
    local = shard(rows, session.accelerator.process_index, session.num_processes)
    return retain_data.batch(local, session.device), len(rows), retain_data.num_label_tokens(rows)


def _divergence(config: TrainConfig):
    """The unlearning loops' stop rule: a non-finite loss, or a forget log-likelihood per token under the threshold."""
    def threshold(values: dict) -> str | None:
        return divergence_reason(values["total"], values["logp_per_token"],
                                 threshold=config.divergence_logp_per_token)
    return threshold


def finetune(model, tokenizer, items: Sequence[TofuItem], config: TrainConfig, run_dir=None,
             description: str = "finetune") -> TrainOutcome:
    """Fine-tune ``model`` in place on QA pairs: ``config.total_steps(len(items))`` steps of the nll loss.

    ``run_dir`` holds metrics.jsonl and (with ``config.checkpoint_every``) checkpoints; a run killed
    after a checkpoint resumes from it when called again with the same starting model and config.
    """
    data = Examples.build(tokenizer, items)
    with torch_threads(config.num_threads):
        session = _session(model, config, config.total_steps(len(data)), run_dir, "tofu-finetune", ("total",))

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
        reference = copy.deepcopy(model).eval().requires_grad_(False) if objective.retain == "kl" else None
        session = _session(model, config, config.total_steps(len(forget_data)), run_dir, "tofu-unlearn",
                           ("total", "forget", "retain", "logp_per_token"))
        if reference is not None:
            reference.to(session.device)
        ref = _reference_logps(session, tokenizer, forget, config) if objective.forget in NEEDS_REFERENCE else None

        def forward(step: int) -> dict:
            rank, world, device = session.accelerator.process_index, session.num_processes, session.device
            rows = batch_indices(len(forget_data), config.batch_size, step, config.seed, FORGET_STREAM)
            local = shard(rows, rank, world)
            retain_batch, counts = None, BatchCounts(len(rows))
            if retain_data is not None:
                retain_batch, *retain_counts = _retain_rows(session, retain_data, config, step)
                counts = BatchCounts(len(rows), *retain_counts)
            batch = UnlearningBatch(forget_data.batch(local, device),
                                    None if ref is None else ref[local].to(device), counts, retain_batch)
            terms = objective_terms(session.model, objective, batch, reference)
            per_token = (terms.forget_logps / terms.forget_num_tokens).sum() / counts.forget_sequences
            return {"total": terms.total, "forget": terms.forget,
                    "retain": terms.retain if terms.retain is not None else 0.0, "logp_per_token": per_token}

        return _loop(session, forward, description, _divergence(config))


# Terms of llm.methods.method_loss that are batch-global values, not shares: logged divided by the number of
# processes, so that the Session's sum over processes gives the value itself.
_GLOBAL_TERMS = ("alignment", "forget_gap", "unseen_gap", "perturbation_norm")
# Extra logged terms per registry method (beside total, forget, logp_per_token).
_METHOD_TERMS = {"GA+Mismatch": ("mismatch", "retain"), "KGA": ("retain", "alignment", "forget_gap", "unseen_gap"),
                 "SeUL": ("selected_fraction",), "AdvGA": ("perturbation_norm",), "AdvNPO": ("perturbation_norm",)}


def _move_state(state, device) -> None:
    """The frozen reference and auxiliary models of a MethodState onto ``device`` (in place)."""
    for model in [state.reference, *state.auxiliary.values()]:
        if model is not None:
            model.to(device)


def unlearn_method(model, tokenizer, state, forget: Sequence[TofuItem], retain: Sequence[TofuItem] | None,
                   config: TrainConfig, run_dir=None, description: str = "unlearn",
                   mismatch: Sequence[TofuItem] | None = None) -> TrainOutcome:
    """Unlearn ``forget`` from ``model`` in place with a registry method's loss (:func:`llm.methods.method_loss`).

    The loop, batches, checkpoints, divergence rule and data parallelism of :func:`unlearn`; each step
    builds the :class:`llm.methods.MethodBatch` that ``state`` needs (:func:`llm.methods.required_batches`):

        forget            ``batch_size`` forget pairs (the seeded FORGET_STREAM order), this process's shard
        retain            ``retain_batch_size`` (default ``batch_size``) retain pairs (RETAIN_STREAM)
        mismatch          GA+Mismatch: the mismatch pairs of the step's forget questions; ``mismatch`` holds
                          m pairs per forget pair, rows i*m .. i*m + m - 1 for forget pair i
                          (:func:`llm.tofu.methods.mismatch_items`)
        forget_ref_logps  AdvNPO: the starting model's forget log-likelihoods, cached once
        counts            GLOBAL normalisers n_f, N_f, n_r, N_r, n_m (:class:`llm.methods.MethodCounts`)

    Batch-global quantities (KGA's forget gap, LAU's perturbation) are summed over processes
    (``accelerator.reduce``), so DDP gives the numbers of one process holding the global batch.

    Args:
        model: the model being unlearned (the target; LoRA-wrapped under ``--lora``).
        state: :func:`llm.methods.prepare_method`'s state of the method (its frozen models are moved to
            the run's device here).
        forget, retain, mismatch: TOFU pairs (retain / mismatch only where the method needs them).
    """
    from llm.methods import MethodBatch, MethodCounts, method_loss, required_batches
    from markovsim.methods.mismatch import mismatch_rows

    needs = required_batches(state)
    if not needs:
        raise ValueError(f"{state.name} is an update rule, not a loss: it has no unlearning loop")
    for name, data in (("retain", retain), ("mismatch", mismatch)):
        if name in needs and not data:
            raise ValueError(f"{state.name} needs {name} pairs (pass {name}=...)")
    per_prompt = len(mismatch) // len(forget) if "mismatch" in needs else 0
    if "mismatch" in needs and per_prompt * len(forget) != len(mismatch):
        raise ValueError(f"mismatch must hold the same number of pairs per forget pair: {len(mismatch)} for "
                         f"{len(forget)} forget pairs")
    forget_data = Examples.build(tokenizer, forget)
    retain_data = Examples.build(tokenizer, retain) if "retain" in needs else None
    mismatch_data = Examples.build(tokenizer, mismatch) if "mismatch" in needs else None
    extra = _METHOD_TERMS.get(state.name, ())
    with torch_threads(config.num_threads):
        session = _session(model, config, config.total_steps(len(forget_data)), run_dir, "tofu-unlearn",
                           ("total", "forget", "logp_per_token") + extra)
        _move_state(state, session.device)
        ref = _reference_logps(session, tokenizer, forget, config) if "forget_ref_logps" in needs else None
        world = session.num_processes
        reduce_sum = (lambda t: session.accelerator.reduce(t, reduction="sum")) if world > 1 else None

        def forward(step: int) -> dict:
            rank, device = session.accelerator.process_index, session.device
            rows = batch_indices(len(forget_data), config.batch_size, step, config.seed, FORGET_STREAM)
            local = shard(rows, rank, world)
            retain_batch, mismatch_batch, retain_counts = None, None, (0, 0)
            if retain_data is not None:
                retain_batch, *retain_counts = _retain_rows(session, retain_data, config, step)
            if mismatch_data is not None:
                mismatch_batch = mismatch_data.batch(mismatch_rows(local, per_prompt), device)
            counts = MethodCounts(len(rows), forget_data.num_label_tokens(rows), *retain_counts,
                                  len(rows) * per_prompt)
            batch = MethodBatch(forget_data.batch(local, device), counts, retain_batch, mismatch_batch,
                                None if ref is None else ref[local].to(device))
            result = method_loss(state, session.model, batch, reduce_sum=reduce_sum)
            per_token = (result.forget_logps / result.forget_num_tokens).sum() / counts.forget_sequences
            values = {"total": result.total, "forget": result.terms["forget"], "logp_per_token": per_token}
            for name in extra:
                value = result.terms.get(name, math.nan)
                if name == "selected_fraction":  # this shard's fraction -> its share of the global one
                    value = value * forget_data.num_label_tokens(local) / counts.forget_tokens
                values[name] = value / world if name in _GLOBAL_TERMS else value
            return values

        return _loop(session, forward, description, _divergence(config))
