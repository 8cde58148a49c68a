"""The relearning attack in the simulator: fine-tune an unlearned exact model on a few forget sequences.

docs/theory.md, "Relearning". Unlearning that a few fine-tuning steps undo is not unlearning (Hu et
al. 2024; the SimNPO authors' follow-up). From an unlearned ``TabularMarkov`` / ``MixtureOfChains``
theta_0, gradient descent (or an Adam rule of :mod:`markovsim.optimizers`) on the token-mean negative
log-likelihood of a small seeded subset S of the forget training sequences, m = |S|:

    L_relearn(theta) = (1/m) sum_{y in S} -logp(y) / |y|                                    (scalar)
    d L_relearn      = -(1/m) sum_{y in S} (1/|y|) d logp(y)          (one weighted count sum, closed form)
    theta_{k+1}      = theta_k - lr * d L_relearn(theta_k)                                   (optimizer "gd")

``logp`` is the response log-likelihood (the first state is the prompt), as in every unlearning
loss; the gradient is the models' ``response_logps_gradient`` with weights -1/(m |y|), exact in
float64. Every ``eval_every`` steps the evaluator records, per component on the test sequences,
``kl_reference`` (how far the model still is from the model before unlearning: relearning drives
it back toward 0), ``kl_true`` (KL to the generating chains) and ``logp_per_token``.

Shapes: S holds ``sequences_per_component`` sequences of each forget component (fewer if the
component has fewer); trajectories are (E, C) per metric, E evaluations, C components.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .config import RunSettings, check_integer, setting
from .data import SequenceSet
from .diagnostics import global_norm
from .dynamics import DynamicsConfig, ParameterOptimizer, run_steps
from .evaluation import ExactEvaluator
from .exact_gradients import num_tokens_tensor, objective_value_and_gradient
from .objectives import Objective
from .progress import progress_bar
from .runtime import torch_threads
from .trajectory import Trajectory

__all__ = ["RelearningConfig", "relearning_subset", "relearning_loss", "relearning_loss_and_gradient",
           "unlearned_model", "relearn", "relearning_curves"]


@dataclass(frozen=True)
class RelearningConfig(RunSettings):
    """How to relearn: the shared :class:`~markovsim.config.RunSettings` (here ``optimizer`` defaults to
    plain gradient descent, ``learning_rate`` to 1.0, a stable step for the token-mean NLL of tabular
    logits) plus the fields below. Keyword construction only."""

    optimizer: str = setting("gd", "gd (default: theta -= lr g), adamw or adamw_legacy")
    learning_rate: float = setting(1.0, "step size, > 0")
    steps: int = setting(50, "relearning steps, >= 0")
    eval_every: int = setting(1, "evaluate every this many steps (and always at step 0 and the last step)")
    sequences_per_component: int = setting(8, "forget training sequences per forget component in the relearning "
                                              "subset, >= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("steps", self.steps, 0)
        check_integer("eval_every", self.eval_every, 1)
        check_integer("sequences_per_component", self.sequences_per_component, 1)


def relearning_subset(forget: SequenceSet, sequences_per_component: int, seed: int) -> SequenceSet:
    """Up to ``sequences_per_component`` rows of each component of ``forget``, drawn without replacement.

    Row choice uses ``numpy.random.default_rng([seed, c])`` for component c, so each component's
    subset does not depend on the others' sizes. Returns a (m,) SequenceSet, components in order.
    """
    if not isinstance(forget, SequenceSet) or len(forget) == 0:
        raise ValueError("forget must be a non-empty SequenceSet (the forget training sequences)")
    check_integer("sequences_per_component", sequences_per_component, 1)
    check_integer("seed", seed, 0)
    ids = np.asarray(forget.component_ids)
    rows = []
    for index in range(len(forget.component_names)):
        candidates = np.flatnonzero(ids == index)
        if len(candidates):
            size = min(sequences_per_component, len(candidates))
            rows.append(np.sort(np.random.default_rng([seed, index]).choice(candidates, size=size, replace=False)))
    return forget.subset(np.concatenate(rows))


def relearning_loss(model, sequences: SequenceSet) -> torch.Tensor:
    """``(1/m) sum_y -logp(y) / |y|`` over ``sequences`` (scalar, autograd-able: the test oracle)."""
    return (-model.response_logps(sequences) / num_tokens_tensor(sequences)).mean()


def relearning_loss_and_gradient(model, sequences: SequenceSet) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The relearning loss and its closed-form gradient, weights ``-1 / (m |y|)`` on ``d logp(y)``.

    Returns ``(value, gradients)`` with one gradient per ``model.parameters()`` tensor, same shapes.
    """
    with torch.no_grad():
        num_tokens = num_tokens_tensor(sequences)  # (m,)
        value = (-model.response_logps(sequences) / num_tokens).mean()
        gradients = model.response_logps_gradient(sequences, -1.0 / (len(sequences) * num_tokens))
    return value, tuple(gradients)


def unlearned_model(reference, objective: Objective, forget: SequenceSet, retain: SequenceSet | None,
                    config: DynamicsConfig):
    """The model after ``config.steps`` full-batch steps of ``objective`` from ``reference`` (its final parameters).

    The same updates as :func:`markovsim.dynamics.unlearn` with ``batch_size=None`` (same closed-form
    gradient, same optimizer rules), without the per-step evaluation; it stops at the last finite
    parameters if an update turns them non-finite.
    """
    if not isinstance(config, DynamicsConfig) or config.batch_size is not None:
        raise ValueError("config must be a DynamicsConfig with batch_size=None (full-batch unlearning)")
    from .dynamics import Problem

    with torch_threads(1):
        problem = Problem.build(objective, forget, retain, reference)
        params, optimizer = reference.parameters(), ParameterOptimizer(config, reference.parameters())
        for _ in range(config.steps):
            evaluation = objective_value_and_gradient(reference.with_parameters(*params), objective,
                                                      *problem.batch(None, None))
            updated = optimizer.step(params, evaluation.gradients)
            if not all(bool(torch.isfinite(p).all()) for p in updated):
                break
            params = updated
        return reference.with_parameters(*params)


def relearn(model, sequences: SequenceSet, evaluator: ExactEvaluator, config: RelearningConfig = RelearningConfig(),
            progress: bool | None = None) -> Trajectory:
    """Minimise :func:`relearning_loss` on ``sequences`` from ``model``; evaluate every ``eval_every`` steps.

    Returns a :class:`Trajectory` with the evaluator's component metrics (E, C) and step metrics
    ``loss`` (the relearning loss, (E,)) and ``parameter_distance`` (||theta_k - theta_0||, (E,)).
    """
    if not isinstance(config, RelearningConfig):
        raise TypeError(f"config must be a RelearningConfig, got {type(config).__name__}")
    if not isinstance(sequences, SequenceSet) or len(sequences) == 0:
        raise ValueError("sequences must be a non-empty SequenceSet (e.g. relearning_subset(setup.forget, ...))")
    if not isinstance(evaluator, ExactEvaluator):
        raise TypeError(f"evaluator must be a markovsim ExactEvaluator, got {type(evaluator).__name__}")
    with torch_threads(1):
        return _relearn(model, sequences, evaluator, config, config.progress if progress is None else progress)


def _relearn(model, sequences, evaluator, config, progress) -> Trajectory:
    params = model.parameters()

    def step(index, params):
        current = model.with_parameters(*params)
        value, gradients = relearning_loss_and_gradient(current, sequences)
        reason = None if torch.isfinite(value) and np.isfinite(global_norm(gradients)) else \
            f"relearning loss or gradient is not finite at step {index}"
        record = lambda: evaluator.evaluate(current) if reason is None else {}  # noqa: E731
        return float(value), gradients, reason, record

    steps, records, losses, distances, diverged_at, reason = run_steps(
        params, config, ParameterOptimizer(config, params), step, progress_bar(config.steps, 0, "relearning", progress))
    names = evaluator.component_names
    metrics = {metric: np.array([r.get(metric, np.full(len(names), np.nan)) for r in records]).reshape(-1, len(names))
               for metric in ("kl_true", "kl_retrained", "kl_reference", "logp_per_token")}
    return Trajectory(np.asarray(steps), tuple(names), metrics,
                      {"loss": np.asarray(losses), "parameter_distance": np.asarray(distances)}, diverged_at, reason,
                      {"relearning": dataclasses.asdict(config), "num_sequences": len(sequences),
                       "model": type(model).__name__})


def relearning_curves(setup, objectives: dict[str, Objective], dynamics: DynamicsConfig,
                      config: RelearningConfig = RelearningConfig()) -> dict[str, Trajectory]:
    """``{method: relearning Trajectory}`` from each method's unlearned model, plus ``"reference"`` (relearning
    from the model before unlearning itself, the baseline with nothing to recover).

    Args:
        setup: a :class:`markovsim.scenarios.Setup` (data, reference, evaluator with ``kl_reference``).
        objectives: ``{method: Objective}`` to unlearn with (e.g. ``scenario.with_methods([...])``).
        dynamics: full-batch unlearning settings (``batch_size=None``).
        config: the relearning settings; the subset is drawn from ``setup.forget`` with ``config.seed``.
    """
    if not objectives:
        raise ValueError("objectives must name at least one method, e.g. {'NPO': get_objective('NPO')}")
    subset = relearning_subset(setup.forget, config.sequences_per_component, config.seed)
    curves = {"reference": relearn(setup.reference, subset, setup.evaluator, config)}
    for method, objective in objectives.items():
        retain = setup.retain if objective.retain is not None else None
        model = unlearned_model(setup.reference, objective, setup.forget, retain, dynamics)
        curves[method] = relearn(model, subset, setup.evaluator, config)
    return curves

