"""A registry method on the Markov transformers: :func:`unlearn_method` -> the simulator's ``Trajectory``.

The step loop is :class:`llm.unlearning.UnlearningLoop` (the one of ``llm.unlearning.unlearn``: seeded
global batches, data parallelism, every-step evaluation, checkpoints, divergence guard); each step's loss
is :func:`llm.methods.method_loss` on the step's forget rows, and where the method needs them:

    retain    the retain training set (GA+Mismatch's normal data, KGA's D_r, a retain term of AdvGA/AdvNPO),
              a batch of ``retain_batch_size`` from its own seeded stream
    mismatch  ``markovsim.methods.mismatch.mismatch_sequences(forget, retain, m, rng(config.seed))``, built
              once: forget row i's m mismatch rows i*m .. i*m+m-1 come with it
    unseen    KGA's D_n (pass ``unseen``; the CLI samples ``markovsim.methods.unseen_sequences``)

Auxiliary models are fine-tuned with :func:`markov_fine_tune` (``llm.pretraining.pretrain``: the full
likelihood of the data, the run's TrainConfig with the method's steps / learning rate / optimizer). With
``method_config=None`` the registry default is used with the fine-tuning settings of
:data:`TRANSFORMER_FINE_TUNE` (the registry's 0.05 is a step for tabular logits) and KGA's auxiliary
models fine-tuned from the original (``auxiliary_from="reference"``).

Diagnostics (``track_power_share``): the share of the forget-side gradient norm each forget component
receives, as :mod:`llm.diagnostics` for the objectives: ``method_loss(..., part="forget")`` on one
component's rows with the whole training set's normalisers and the whole set's step context (KGA's gap,
LAU's delta*), the retain term's gradient credited in equal parts to the retain components; mean_weight is
NaN (these methods have no per-sequence weight). TaskNegation (an update rule) is evaluated along
``scales`` (default 11 lambdas from 0 to ``config.scale``): the trajectory's ``steps`` are the lambdas,
``loss`` the forget token-mean NLL, ``parameter_distance`` = lambda ||tau||; the model ends at
``config.scale``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch

from markovsim.data import SequenceSet
from markovsim.diagnostics import power_shares
from markovsim.methods import get_method
from markovsim.methods.base import FineTuneConfig
from markovsim.methods.mismatch import mismatch_rows, mismatch_sequences
from markovsim.runtime import torch_threads
from markovsim.trajectory import Trajectory

from ..config import PAPER_UNLEARNING, TrainConfig, config_state
from ..data import FORGET_STREAM, RETAIN_STREAM, EncodedSequences, batch_indices, encode, evaluation_chunks, shard
from ..diagnostics import DiagnosticsPlan, gradient_norm
from ..evaluate import Evaluator, model_device, model_sequence_logps_batched
from ..logps import NonFiniteLogitsError
from ..models import check_model_data
from ..pretraining import pretrain
from ..runtime import autocast, resolve_device
from ..session import check_config, check_sequences
from ..unlearning import UnlearningLoop, default_evaluator, trajectory_from_records
from .batch import MethodBatch, MethodCounts
from .losses import StepContext, method_loss, required_batches, step_context
from .state import check_method_config, prepare_method
from .task_negation import apply_task_negation, full_task_vector, lora_task_vector

__all__ = ["TRANSFORMER_FINE_TUNE", "default_method_config", "markov_fine_tune", "encoded_batches",
           "unlearn_method"]

TRANSFORMER_FINE_TUNE = FineTuneConfig(steps=20, learning_rate=1e-3, optimizer="adamw")


def default_method_config(name: str):
    """The registry default of ``name`` with transformer fine-tuning settings (module docstring)."""
    config = get_method(name).config
    overrides = {f.name: TRANSFORMER_FINE_TUNE for f in dataclasses.fields(config)
                 if isinstance(getattr(config, f.name), FineTuneConfig)}
    if name == "KGA":
        overrides["auxiliary_from"] = "reference"
    return dataclasses.replace(config, **overrides)


def markov_fine_tune(config: TrainConfig):
    """``fine_tune(model, sequences, settings)`` for ``prepare_method``: ``pretrain`` with ``config``'s runtime
    settings and ``settings``' steps, learning rate and optimizer (no diagnostics, checkpoints or progress)."""
    def fine_tune(model, sequences: SequenceSet, settings: FineTuneConfig):
        train = dataclasses.replace(config, steps=settings.steps, learning_rate=settings.learning_rate,
                                    optimizer=settings.optimizer, track_forget_weights=False,
                                    track_power_share=False, checkpoint_every=None, progress=False,
                                    warmup_steps=0, schedule="constant")
        pretrain(model, sequences, train)
        return model
    return fine_tune


def encoded_batches(batch_size: int, device=None):
    """``batches(sequences)`` for ``prepare_method``: response-labelled HF batches of at most ``batch_size`` rows."""
    def batches(sequences: SequenceSet):
        encoded = encode(sequences, "response")
        return (encoded.batch(chunk, device) for chunk in evaluation_chunks(len(encoded), batch_size))
    return batches


@dataclasses.dataclass(frozen=True, eq=False)
class _Sets:
    """The encoded training sets of a method run (None where unused) and the mismatch rows per prompt."""

    forget: EncodedSequences
    retain: EncodedSequences | None
    mismatch: EncodedSequences | None
    per_prompt: int
    forget_ref: torch.Tensor | None

    def batch(self, rows, retain_rows, counts: MethodCounts, device) -> MethodBatch:
        """The MethodBatch of forget rows ``rows`` (with their mismatch rows) and retain rows ``retain_rows``."""
        mismatch = None if self.mismatch is None else self.mismatch.batch(mismatch_rows(rows, self.per_prompt),
                                                                          device)
        retain = None if retain_rows is None else self.retain.batch(retain_rows, device)
        ref = None if self.forget_ref is None else self.forget_ref[rows].to(device)
        return MethodBatch(self.forget.batch(rows, device), counts, retain, mismatch, ref)

    def counts(self, forget_rows, retain_rows) -> MethodCounts:
        forget_rows = np.asarray(forget_rows)
        return MethodCounts(
            len(forget_rows), int(self.forget.num_label_tokens[forget_rows].sum()),
            0 if retain_rows is None else len(retain_rows),
            0 if retain_rows is None else int(self.retain.num_label_tokens[np.asarray(retain_rows)].sum()),
            0 if self.mismatch is None else len(forget_rows) * self.per_prompt)


@dataclasses.dataclass(frozen=True, eq=False)
class MethodDiagnostics:
    """Per-component power share of a method at any parameters (module docstring); mean_weight NaN."""

    state: object
    names: tuple[str, ...]
    plan: DiagnosticsPlan
    sets: _Sets
    batch_size: int
    bf16: bool
    weights: bool = True
    power: bool = True

    def __call__(self, model) -> dict[str, np.ndarray]:
        result = {"mean_weight": np.full(len(self.names), np.nan)} if self.weights else {}
        if not self.power:
            return result
        was_training = model.training
        model.eval()
        try:
            result["power_share"] = self._power(model)
        except NonFiniteLogitsError:
            result["power_share"] = np.full(len(self.names), np.nan)
        finally:
            model.train(was_training)
        return result

    def _power(self, model) -> np.ndarray:
        sets, device = self.sets, model_device(model)
        params = [p for p in model.parameters() if p.requires_grad]
        everything = np.arange(len(sets.forget))
        retain_all = None if sets.retain is None else np.arange(len(sets.retain))
        counts = sets.counts(everything, retain_all)
        context = self._context(model, counts, device)
        norms = np.zeros(len(self.names))
        for column, rows, scale in self.plan.forget:
            values = (method_loss(self.state, model, sets.batch(rows[chunk], None, counts, device), context,
                                  part="forget").total * scale
                      for chunk in evaluation_chunks(len(rows), self.batch_size))
            norms[column] = gradient_norm(params, values)
        if self.plan.retain_columns and self.plan.retain_rows is not None:
            rows = self.plan.retain_rows
            values = (method_loss(self.state, model, sets.batch(everything[:1], rows[chunk], counts, device), context,
                                  part="retain").total * self.plan.retain_scale
                      for chunk in evaluation_chunks(len(rows), self.batch_size))
            retain_norm = gradient_norm(params, values)
            for column in self.plan.retain_columns:
                norms[column] += retain_norm / len(self.plan.retain_columns)
        return power_shares(norms, self.plan.present)

    def _context(self, model, counts: MethodCounts, device) -> StepContext:
        """The step context of the diagnostics: KGA's gap over the whole forget set (summed over chunks);
        LAU's delta* from one batch of the plan's (subsampled) forget rows, the rows whose power is measured
        (the PGD steps are normalised, so the estimate's scale does not matter; the whole set cost ~5 s
        per evaluation on a CPU at quick scale)."""
        sets, name = self.sets, self.state.name
        if name == "KGA":
            gap = sum(step_context(self.state, model, sets.batch(chunk, None, counts, device)).forget_gap
                      for chunk in evaluation_chunks(len(sets.forget), self.batch_size))
            return StepContext(forget_gap=gap)
        if name in ("AdvGA", "AdvNPO"):
            rows = np.sort(np.concatenate([rows for _, rows, _ in self.plan.forget]))
            with autocast(device.type, self.bf16):
                return step_context(self.state, model, sets.batch(rows, None, counts, device))
        return StepContext()

class _MethodUnlearning(UnlearningLoop):
    """A registry method's run (see :func:`unlearn_method`)."""

    def __init__(self, model, state, forget, retain, config, evaluator, run_dir):
        self.state = state
        needs = required_batches(state)
        mismatch, per_prompt = None, 1
        if "mismatch" in needs:
            per_prompt = state.config.responses_per_prompt
            mismatch = encode(mismatch_sequences(forget, retain, per_prompt, np.random.default_rng(config.seed)))
        self.sets = _Sets(encode(forget, "response"), encode(retain, "response") if "retain" in needs else None,
                          mismatch, per_prompt, None)
        super().__init__(model, forget, retain, config, evaluator, run_dir)
        if config.track_forget_weights or config.track_power_share:
            plan = DiagnosticsPlan.build(self.names, self.sets.forget, retain, self.sets.retain,
                                         config.diagnostics_max_sequences, config.seed)
            self.diagnostics = MethodDiagnostics(state, self.names, plan, self.sets, config.eval_batch_size,
                                                 self.session.bf16, config.track_forget_weights,
                                                 config.track_power_share)

    @property
    def description(self) -> str:
        return f"unlearn {self.state.name}"

    def run_info(self) -> dict:
        return {"method": self.state.name, "method_config": dataclasses.asdict(self.state.config)}

    def setup(self, model) -> None:
        if "forget_ref_logps" in required_batches(self.state):
            logps = model_sequence_logps_batched(model, self.sets.forget, self.config.eval_batch_size,
                                                 self.session.bf16)[0]
            self.sets = dataclasses.replace(self.sets, forget_ref=logps)

    def forward(self, step: int) -> dict:
        config, session, sets = self.config, self.session, self.sets
        rank, world, device = session.accelerator.process_index, session.num_processes, session.device
        forget_rows = batch_indices(len(sets.forget), config.batch_size, step, config.seed, FORGET_STREAM)
        retain_rows = local_retain = None
        if sets.retain is not None:
            retain_rows = batch_indices(len(sets.retain), config.retain_batch_size or config.batch_size, step,
                                        config.seed, RETAIN_STREAM)
            local_retain = shard(retain_rows, rank, world)
        counts = sets.counts(forget_rows, retain_rows)
        batch = sets.batch(shard(forget_rows, rank, world), local_retain, counts, device)
        reduce_sum = None if world == 1 else (lambda value: session.accelerator.reduce(value, reduction="sum"))
        result = method_loss(self.state, session.model, batch, reduce_sum=reduce_sum)
        per_token = (result.forget_logps / result.forget_num_tokens).sum() / counts.forget_sequences
        return {"total": result.total, "forget": result.terms["forget"],
                "retain": result.terms.get("retain", 0.0), "logp_per_token": per_token}


def _check_inputs(model, name, forget, retain, unseen, config, evaluator) -> None:
    check_config(config)
    check_model_data(model, check_sequences(forget, "forget"), "forget")
    for label, data in (("retain", retain), ("unseen", unseen)):
        if data is not None:
            check_model_data(model, check_sequences(data, label), label)
    if name in ("GA+Mismatch", "KGA") and retain is None:
        raise ValueError(f"{name} needs the retain SequenceSet (retain=...): its normal / D_r data")
    if evaluator is not None and not isinstance(evaluator, Evaluator):
        raise TypeError(f"evaluator must be an llm.evaluate.Evaluator or None, got {type(evaluator).__name__}")


def unlearn_method(model, name: str, forget: SequenceSet, retain: SequenceSet | None = None,
                   config: TrainConfig = PAPER_UNLEARNING, evaluator: Evaluator | None = None, method_config=None,
                   unseen: SequenceSet | None = None, run_dir=None, resume: bool | str = False, lora=None,
                   layer: int = -1, scales=None) -> Trajectory:
    """Unlearn ``forget`` from ``model`` (in place) with registry method ``name``; a ``Trajectory`` like
    :func:`llm.unlearning.unlearn`'s (module docstring).

    Args:
        model: the starting (pre-trained) model; its copy is the original of the method's auxiliary models.
        name: a registry name (``markovsim.methods.METHODS``).
        forget, retain: training sequences (retain: GA+Mismatch's normal data, KGA's D_r, a retain term).
        config: the run's optimisation settings (also the runtime of the auxiliary fine-tuning runs).
        evaluator: test-set metrics (default: an ``Evaluator`` on forget + retain, the start as reference).
        method_config: the method's hyperparameters (default :func:`default_method_config`).
        unseen: KGA's D_n. run_dir, resume: as ``unlearn`` (not TaskNegation).
        lora: TaskNegation: ``llm.lora.LoraSettings`` for a LoRA task vector. layer: LAU's decoder layer.
        scales: TaskNegation's lambdas (default ``linspace(0, config.scale, 11)``).
    """
    method_config = default_method_config(name) if method_config is None else check_method_config(name,
                                                                                                    method_config)
    _check_inputs(model, name, forget, retain, unseen, config, evaluator)
    with torch_threads(config.num_threads):
        device = torch.device(resolve_device(config.device))
        model.to(device)  # the auxiliary models and frozen copies live where the run does
        state = prepare_method(name, model, forget, retain, markov_fine_tune(config), method_config, unseen,
                               encoded_batches(config.eval_batch_size, device), lora, layer, config.seed)
        if name == "TaskNegation":
            trajectory = _task_negation_path(model, state, forget, retain, config, evaluator, scales)
            _write_task_negation(model, trajectory, config, run_dir)
            return trajectory
        return _MethodUnlearning(model, state, forget, retain, config, evaluator, run_dir).run(resume)


def _write_task_negation(model, trajectory: Trajectory, config: TrainConfig, run_dir) -> None:
    """run_dir/trajectory.* and run_dir/model (the model at config.scale), as an unlearning run writes them."""
    if run_dir is None:
        return
    import os

    from ..models import save_model

    os.makedirs(os.fspath(run_dir), exist_ok=True)
    trajectory.save(os.path.join(os.fspath(run_dir), "trajectory"), config)
    save_model(model, os.path.join(os.fspath(run_dir), "model"), progress=config.progress)


def _task_negation_path(model, state, forget, retain, config, evaluator, scales) -> Trajectory:
    started = time.perf_counter()
    scales = np.linspace(0.0, state.config.scale, 11) if scales is None else np.asarray(scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ValueError("scales must be a non-empty 1-d array of finite lambdas >= 0")
    if evaluator is None:
        evaluator = default_evaluator(model, forget, retain, config.eval_batch_size)
    fine_tuned = state.auxiliary["fine_tuned"]
    vector = lora_task_vector(fine_tuned) if hasattr(fine_tuned, "peft_config") else full_task_vector(model,
                                                                                                       fine_tuned)
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in vector.values()))
    original, encoded, records = copy.deepcopy(model.state_dict()), encode(forget, "response"), []
    for scale in scales:
        model.load_state_dict(original)
        apply_task_negation(model, fine_tuned, float(scale))
        logps, num_tokens = model_sequence_logps_batched(model, encoded, config.eval_batch_size)
        metrics = evaluator.evaluate(model) | {"mean_weight": np.full(len(evaluator.component_names), np.nan)}
        records.append({"step": 0, "loss": float((-logps / num_tokens).mean()), "parameter_distance": scale * norm,
                        "metrics": {k: [float(x) for x in v] for k, v in metrics.items()}})
    model.load_state_dict(original)
    apply_task_negation(model, fine_tuned, state.config.scale)
    info = {"method": "TaskNegation", "method_config": dataclasses.asdict(state.config), "scales": scales.tolist(),
            "config": config_state(config), "model": type(model).__name__, "num_processes": 1,
            "wall_seconds": time.perf_counter() - started, "side": "llm"}
    trajectory = trajectory_from_records(records, tuple(evaluator.component_names), None, None, info)
    return dataclasses.replace(trajectory, steps=scales)
