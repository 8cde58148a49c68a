"""TaskNegation: subtract the forget task's vector (task arithmetic, Ilharco et al. 2023; the forgetting step of
F-Learning, Ni et al. 2023; docs/theory.md, "Other unlearning methods").

    tau = theta_ft - theta           (theta_ft: theta fine-tuned on the forget data)
    theta_new = theta - lambda * tau

An update rule, not an objective: no loop over unlearning steps. On a transformer ``theta`` is any
mapping of parameter tensors (a ``state_dict``), and with LoRA tau is the merged adapter delta
``scale * B @ A`` of each adapted weight (F-Learning reports that subtracting LoRA deltas works about as
well as full fine-tuning deltas). In the simulator theta are the exact models' logit parameters, so the
rule is exact there: e.g. with one gradient step of fine-tuning, lambda = 1 gives one exact gradient-ascent
step (tests/test_methods.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..config import check_real
from ..data import SequenceSet
from ..evaluation import ExactEvaluator
from .base import FineTuneConfig
from .exact import fine_tune

__all__ = ["TaskNegationConfig", "task_vector", "negate_task", "task_negation_path", "ExactTaskNegation",
           "build_exact"]


@dataclass(frozen=True)
class TaskNegationConfig:
    """TaskNegation hyperparameters.

    Attributes:
        scale: lambda >= 0, how much of the task vector to subtract (lambda = 0: the identity).
        fine_tune: how theta_ft is trained on the forget data.
    """

    scale: float = 1.0
    fine_tune: FineTuneConfig = FineTuneConfig()

    def __post_init__(self) -> None:
        check_real("scale", self.scale, minimum=0.0)
        if not isinstance(self.fine_tune, FineTuneConfig):
            raise TypeError(f"fine_tune must be a FineTuneConfig, got {type(self.fine_tune).__name__}")


def _pairs(base, other, name: str):
    """Matched (key, base tensor, other tensor) of two tuples/lists or two mappings of tensors."""
    if isinstance(base, Mapping) != isinstance(other, Mapping):
        raise TypeError(f"base and {name} must both be mappings (state dicts) or both sequences of tensors")
    if isinstance(base, Mapping):
        if set(base) != set(other):
            raise ValueError(f"base and {name} have different keys: {sorted(set(base) ^ set(other))[:5]}")
        return [(key, base[key], other[key]) for key in base]
    if len(base) != len(other):
        raise ValueError(f"base has {len(base)} tensors but {name} has {len(other)}")
    return list(zip(range(len(base)), base, other))


def _rebuild(base, values: list):
    return dict(zip(base, values)) if isinstance(base, Mapping) else tuple(values)


def task_vector(base: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                fine_tuned: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]):
    """tau = theta_ft - theta, tensor by tensor (a tuple, or a dict with the mapping's keys)."""
    pairs = _pairs(base, fine_tuned, "fine_tuned")
    for key, b, f in pairs:
        if b.shape != f.shape:
            raise ValueError(f"parameter {key!r}: base shape {tuple(b.shape)} != fine_tuned shape {tuple(f.shape)}")
    return _rebuild(base, [f - b for _, b, f in pairs])


def negate_task(base, vector, scale: float):
    """theta - lambda * tau, tensor by tensor (``vector`` from :func:`task_vector`, or merged LoRA deltas)."""
    scale = check_real("scale", scale)
    pairs = _pairs(base, vector, "vector")
    return _rebuild(base, [b - scale * v for _, b, v in pairs])


@dataclass(frozen=True, eq=False)
class ExactTaskNegation:
    """TaskNegation on an exact model: theta_ft built once; :meth:`apply` gives the model for any lambda."""

    config: TaskNegationConfig
    forget: SequenceSet
    reference: object
    fine_tuned: object

    retain = None

    def apply(self, scale: float | None = None):
        """The reference with lambda * tau subtracted (lambda defaults to ``config.scale``)."""
        scale = self.config.scale if scale is None else scale
        base = self.reference.parameters()
        return self.reference.with_parameters(*negate_task(base, task_vector(base, self.fine_tuned.parameters()),
                                                           scale))


def build_exact(config: TaskNegationConfig, reference, forget: SequenceSet, retain: SequenceSet | None = None,
                unseen: SequenceSet | None = None) -> ExactTaskNegation:
    """Fine-tune the reference on the forget set (theta_ft); see :func:`task_negation_path` to run it."""
    return ExactTaskNegation(config, forget, reference, fine_tune(reference, forget, config.fine_tune))


def task_negation_path(problem: ExactTaskNegation, scales, evaluator: ExactEvaluator):
    """A :class:`~markovsim.trajectory.Trajectory` over lambda: its ``steps`` are the (float) scales.

    ``loss`` is the forget set's token-mean NLL at each lambda, ``parameter_distance`` = lambda ||tau||;
    ``mean_weight`` / ``power_share`` are NaN (no gradient).
    """
    from ..diagnostics import global_norm
    from ..dynamics import assemble_trajectory

    scales = np.asarray(scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size == 0 or np.any(scales < 0) or not np.all(np.isfinite(scales)):
        raise ValueError("scales must be a non-empty 1-d array of finite lambdas >= 0")
    names = evaluator.component_names
    nan = np.full(len(names), np.nan)
    base = problem.reference.parameters()
    norm = global_norm(task_vector(base, problem.fine_tuned.parameters()))
    records, losses = [], []
    lengths = torch.as_tensor(problem.forget.num_tokens, dtype=torch.float64)
    with torch.no_grad():
        for scale in scales:
            model = problem.apply(float(scale))
            records.append(evaluator.evaluate(model) | {"mean_weight": nan, "power_share": nan})
            losses.append(float((-model.response_logps(problem.forget) / lengths).mean()))
    info = {"method": "TaskNegation", "config": dataclasses.asdict(problem.config), "scales": scales.tolist(),
            "model": type(problem.reference).__name__}
    return assemble_trajectory(scales, names, records, losses, (scales * norm).tolist(), None, None, info)
