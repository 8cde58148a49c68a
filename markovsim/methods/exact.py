"""The simulator side of the method registry: shared exact pieces and one driver.

Every exact method of :mod:`markovsim.methods` is built from three closed-form gradients the models
already have (docs/theory.md, "Mixtures of Markov chains" and "Other unlearning methods"):

    d/dtheta sum_y w_y logp(y)                              model.response_logps_gradient
    d/dtheta sum_{y,t} c_t KL(p_t || pi_theta(.|prefix_t))  model.predictive_kl_gradient
    d/dtheta sum_{y,t} c_t log pi_theta(y_{t+1}|prefix_t)   = -predictive_kl_gradient with p_t = onehot(y_{t+1})

(the last because KL(onehot(v) || q) = -log q(v)). :func:`unlearn_exact` runs any
:class:`~markovsim.methods.base.ExactProblem` with the optimisers of :mod:`markovsim.dynamics` and returns a
:class:`~markovsim.trajectory.Trajectory` of the same shape as ``markovsim.dynamics.unlearn``'s, with each
component's ``power_share`` (:func:`method_diagnostics`; ``mean_weight`` is NaN: these methods have no
per-sequence gradient weight).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import divergence_reason
from ..data import SequenceSet, concatenate
from ..diagnostics import global_norm, power_shares
from ..dynamics import DynamicsConfig, ParameterOptimizer, assemble_trajectory, run_steps, unlearning_progress
from ..evaluation import ExactEvaluator
from ..exact_gradients import objective_value_and_gradient, retain_kl_value
from ..objectives import Objective
from ..runtime import torch_threads
from .base import ExactStep, FineTuneConfig

__all__ = ["fine_tune", "token_log_probs", "next_token_onehots", "token_kl_step", "token_logps_gradient",
           "component_rows", "method_diagnostics", "autograd_step", "unlearn_exact"]


def fine_tune(model, sequences: SequenceSet, config: FineTuneConfig):
    """``model`` trained for ``config.steps`` steps on the token-mean NLL of ``sequences`` (closed-form gradients).

    NLL(theta) = -(1/n) sum_y logp_theta(y) / |y|, i.e. minus the ``GA`` objective, so its gradient is minus
    ``objective_value_and_gradient(model, Objective("ga"), sequences)``'s.
    """
    if not isinstance(config, FineTuneConfig):
        raise TypeError(f"config must be a FineTuneConfig, got {type(config).__name__}")
    if not isinstance(sequences, SequenceSet) or len(sequences) == 0:
        raise ValueError("fine_tune needs a non-empty SequenceSet")
    settings = DynamicsConfig(optimizer=config.optimizer, learning_rate=config.learning_rate, steps=config.steps)
    params = model.parameters()
    optimizer = ParameterOptimizer(settings, params)
    with torch_threads(1):
        for _ in range(config.steps):
            ascent = objective_value_and_gradient(model, Objective("ga"), sequences).gradients
            params = optimizer.step(params, tuple(-g for g in ascent))
            model = model.with_parameters(*params)
    return model


def next_token_onehots(sequences: SequenceSet) -> torch.Tensor:
    """(n, T-1, V) float64 one-hot of the observed next state at each response position, 0 on padding."""
    following = torch.as_tensor(np.where(sequences.tokens[:, 1:] >= 0, sequences.tokens[:, 1:], 0))  # (n, T-1)
    mask = torch.as_tensor(sequences.transition_mask)  # (n, T-1)
    onehots = torch.nn.functional.one_hot(following, sequences.num_states).to(torch.float64)
    return onehots * mask[..., None]


def token_log_probs(model, sequences: SequenceSet) -> torch.Tensor:
    """(n, T-1) ``log pi_theta(s_{t+1} | s_1..s_t)`` at each response position, 0 on padding (differentiable).

    Their row sums are ``model.response_logps(sequences)``.
    """
    return (model.next_token_log_probs(sequences) * next_token_onehots(sequences)).sum(-1)  # (n, T-1)


def token_kl_step(model, sequences: SequenceSet, target_log_probs: torch.Tensor, weight: float = 1.0,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``weight * (1/N) sum_{y,t} KL(p_t || pi_theta(.|prefix_t))`` over all N response tokens, and its gradient.

    Args:
        target_log_probs: (n, T-1, V) log p_t (may hold -inf: a one-hot target is a cross-entropy).
        rows: optional (n,) 0/1 weights: the gradient of only those sequences' share of the sum (still / N).
    Returns:
        (value, gradients): the value is ``weight * markovsim.exact_gradients.retain_kl_value`` (all rows).
    """
    mask = torch.as_tensor(sequences.transition_mask)  # (n, T-1)
    value = weight * retain_kl_value(model, sequences, target_log_probs)
    token_weights = mask.to(torch.float64) * (weight / float(mask.sum()))  # (n, T-1)
    if rows is not None:
        token_weights = token_weights * rows[:, None]
    target_probs = torch.exp(target_log_probs) * mask[..., None]  # (n, T-1, V)
    return value, model.predictive_kl_gradient(sequences, target_probs, token_weights)


def token_logps_gradient(model, sequences: SequenceSet, token_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Closed-form ``d/dtheta sum_{y,t} c_t log pi_theta(s_{t+1} | prefix_t)`` for token weights c (n, T-1)."""
    return tuple(-g for g in model.predictive_kl_gradient(sequences, next_token_onehots(sequences), token_weights))


def component_rows(sequences: SequenceSet, name: str) -> torch.Tensor:
    """(n,) float64 indicator of the sequences of component ``name`` (all zero if it has none)."""
    if name not in sequences.component_names:
        return torch.zeros(len(sequences), dtype=torch.float64)
    ids = torch.as_tensor(np.array(sequences.component_ids))
    return (ids == sequences.component_names.index(name)).to(torch.float64)


def method_diagnostics(problem, model, names: tuple[str, ...], full: ExactStep) -> dict[str, np.ndarray]:
    """``power_share`` per component for an exact method, as ``markovsim.diagnostics.gradient_diagnostics``.

    The forget-side gradient splits exactly by forget component, g_c = ``problem.forget_gradient(model, c)``
    (the forget term's gradient from component c's sequences, with the full-batch normalisation); the rest of
    the full gradient (the retain term) is credited to the retain components evenly. ``mean_weight`` is NaN:
    these methods have no per-sequence gradient weight.
    """
    norms = np.zeros(len(names))
    forget_counts = problem.forget.component_counts()
    forget_total = [torch.zeros_like(p) for p in model.parameters()]
    for c, name in enumerate(names):
        if forget_counts.get(name, 0) > 0:
            part = problem.forget_gradient(model, name)
            norms[c] = global_norm(part)
            forget_total = [t + g for t, g in zip(forget_total, part)]
    retain = getattr(problem, "retain", None)
    retain_counts = retain.component_counts() if retain is not None else {}
    retain_names = [name for name in names if retain_counts.get(name, 0) > 0]
    if retain_names:
        retain_norm = global_norm([g - f for g, f in zip(full.gradients, forget_total)])
        for name in retain_names:
            norms[names.index(name)] += retain_norm / len(retain_names)
    has_data = [forget_counts.get(n, 0) > 0 or retain_counts.get(n, 0) > 0 for n in names]
    return {"mean_weight": np.full(len(names), np.nan), "power_share": power_shares(norms, has_data)}


def autograd_step(problem, model) -> ExactStep:
    """``problem.step(model)`` with the gradient from autograd through ``problem.value`` (the test oracle)."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    value = problem.value(model.with_parameters(*params))
    grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))
    with torch.no_grad():
        logps = model.response_logps(problem.forget)
    return ExactStep(value.detach(), grads, logps)


def unlearn_exact(problem, model, config: DynamicsConfig = DynamicsConfig(),
                  evaluator: ExactEvaluator | None = None, progress: bool | None = None):
    """Run ``config.steps`` full-batch steps of an exact method from ``model``; a ``Trajectory`` like ``unlearn``'s.

    Args:
        problem: an :class:`~markovsim.methods.base.ExactProblem` (e.g. from ``METHODS[name].exact``).
        model: the starting ``TabularMarkov`` / ``MixtureOfChains`` (usually the reference).
        config: optimiser settings; ``batch_size`` must be None (the methods' targets are full-batch);
            ``gradient="autograd"`` uses :func:`autograd_step`.
        evaluator: test-set metrics; default evaluates on the problem's forget (and retain) sets.
    """
    if not isinstance(config, DynamicsConfig):
        raise TypeError(f"config must be a DynamicsConfig, got {type(config).__name__}")
    if config.batch_size is not None:
        raise ValueError(f"exact methods run on the full batch; set batch_size=None (got {config.batch_size})")
    if evaluator is None:
        sets = [s for s in (problem.forget, getattr(problem, "retain", None)) if s is not None]
        evaluator = ExactEvaluator(concatenate(sets), reference=getattr(problem, "reference", None))
    with torch_threads(1):
        return _unlearn_exact(problem, model, config, evaluator,
                              config.progress if progress is None else progress)


def _unlearn_exact(problem, model, config, evaluator, progress):
    evaluate = autograd_step if config.gradient == "autograd" else (lambda p, m: p.step(m))
    names = evaluator.component_names
    num_tokens = torch.as_tensor(problem.forget.num_tokens, dtype=torch.float64)
    params, optimizer = model.parameters(), ParameterOptimizer(config, model.parameters())
    last = {"model": model}  # the model at the latest parameters (None once they are not finite)

    def step(index, params):
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        last["model"] = model = last["model"].with_parameters(*params) if finite else None
        current = evaluate(problem, model) if model is not None else None
        reason = "parameters have NaN/inf" if current is None else divergence_reason(
            float(current.value), float((current.forget_logps / num_tokens).mean()), global_norm(current.gradients),
            config.divergence_logp_per_token)
        record = lambda: ({} if reason is not None else  # noqa: E731
                          evaluator.evaluate(model) | method_diagnostics(problem, model, names, current))
        loss = float(current.value) if current is not None else float("nan")
        return loss, None if current is None else current.gradients, reason, record

    steps, records, losses, distances, diverged_at, reason = run_steps(
        params, config, optimizer, step, unlearning_progress(config.steps, progress))
    model = last["model"]
    info = {"method": type(problem).__name__, "config": _config_dict(problem), "dynamics": dataclasses.asdict(config),
            "model": type(model).__name__ if model is not None else None}
    return assemble_trajectory(steps, names, records, losses, distances, diverged_at, reason, info)


def _config_dict(problem) -> dict | None:
    config = getattr(problem, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
