"""Exact unlearning dynamics: gradient descent, Adam and gradient flow with closed-form gradients.

``unlearn`` runs an :class:`~markovsim.losses.Objective` on a ``TabularMarkov`` or
``MixtureOfChains`` and returns a :class:`~markovsim.trajectory.Trajectory` with, at every
evaluation step and for every component: KL to the true chain, to the retrained and to the
reference model (test sequences), log-likelihood per token, the mean gradient weight and the
component's share of the gradient norm ("unlearning power", docs/theory.md, "Reference-model bias"). A run that
reaches a non-finite value, or pushes a forget log-likelihood per token below a threshold, stops
cleanly and records where.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .config import OPTIMIZERS as OPTIMIZERS  # re-exported: the simulator's optimizer names
from .config import RunSettings, check_boolean, check_integer, check_real, divergence_reason, setting
from .data import SequenceSet
from .diagnostics import global_norm
from .diagnostics import gradient_diagnostics as gradient_diagnostics  # re-exported (moved to diagnostics)
from .evaluation import Evaluator as EvaluatorProtocol
from .evaluation import ExactEvaluator
from .exact_gradients import ExactEvaluation, next_token_log_probs, objective_value, objective_value_and_gradient
from .losses import NEEDS_REFERENCE
from .mixture import MixtureOfChains
from .objectives import Objective
from .optimizers import AdamState, adam_update
from .progress import progress_bar
from .runtime import torch_threads
from .tabular import TabularMarkov
from .trajectory import Trajectory
from .validation import as_float_array

Evaluator = ExactEvaluator  # the old name of markovsim.evaluation.ExactEvaluator (evaluation.Evaluator is the protocol)

GRADIENTS = ("closed_form", "autograd")
FLOW_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")  # scipy.integrate.solve_ivp's solvers
EXACT_MODELS = (TabularMarkov, MixtureOfChains)


@dataclass(frozen=True)
class DynamicsConfig(RunSettings):
    """How to run unlearning in the simulator: the shared :class:`~markovsim.config.RunSettings`
    (optimizer, learning_rate, adam_betas, adam_eps, weight_decay, max_grad_norm, seed, progress,
    divergence_logp_per_token) plus the fields below. Keyword construction only.

    The Adam rules are in :mod:`markovsim.optimizers` (docs/theory.md, "Adam, eps and small gradient
    weights"); ``seed`` seeds the minibatch sampler (unused with full batches).
    """

    steps: int = setting(50, "optimisation steps, >= 0")
    eval_every: int = setting(1, "evaluate every this many steps (and always at step 0 and the last step)")
    batch_size: int | None = setting(None, "forget (and retain) sequences per step; None = the exact full batch")
    gradient: str = setting("closed_form", "closed_form (default) or autograd (the oracle: same numbers, slower)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        check_integer("steps", self.steps, 0)
        check_integer("eval_every", self.eval_every, 1)
        check_integer("batch_size", self.batch_size, 1, allow_none=True)


@dataclass(frozen=True)
class Problem:
    """Everything a run needs besides the model and objective; reference quantities cached once."""

    forget: SequenceSet
    retain: SequenceSet | None
    reference: object
    forget_ref_logps: torch.Tensor | None
    retain_ref_log_probs: torch.Tensor | None

    @classmethod
    def build(cls, objective: Objective, forget: SequenceSet, retain: SequenceSet | None, reference) -> "Problem":
        with torch.no_grad():
            forget_ref = reference.response_logps(forget) if objective.forget in NEEDS_REFERENCE else None
            retain_ref = next_token_log_probs(reference, retain) if objective.retain in NEEDS_REFERENCE else None
        return cls(forget, retain, reference, forget_ref, retain_ref)

    def batch(self, rng: np.random.Generator | None, batch_size: int | None) -> tuple:
        """The arguments of ``objective_value_and_gradient`` for a full batch or a sampled minibatch."""
        if batch_size is None or rng is None:
            return (self.forget, self.retain, self.forget_ref_logps, self.retain_ref_log_probs)
        forget_rows = rng.choice(len(self.forget), size=min(batch_size, len(self.forget)), replace=False)
        forget = self.forget.subset(forget_rows)
        forget_ref = None if self.forget_ref_logps is None else self.forget_ref_logps[forget_rows]
        retain, retain_ref = self.retain, None
        if self.retain is not None:
            retain_rows = rng.choice(len(self.retain), size=min(batch_size, len(self.retain)), replace=False)
            retain = self.retain.subset(retain_rows)
            if self.retain_ref_log_probs is not None:
                retain_ref = self.retain_ref_log_probs[retain_rows][:, : retain.max_length - 1]
        return (forget, retain, forget_ref, retain_ref)


def autograd_evaluation(model, objective: Objective, *args) -> ExactEvaluation:
    """Same as ``objective_value_and_gradient`` but with the gradient from autograd (the test oracle)."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    value = objective_value(model.with_parameters(*params), objective, *args)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))
    closed = objective_value_and_gradient(model, objective, *args)
    return dataclasses.replace(closed, value=value.detach(), gradients=grads)


class ParameterOptimizer:
    """GD or one of the Adam rules of :mod:`markovsim.optimizers` over a tuple of float64 tensors.

    ``step(params, grads)`` clips ``grads`` by ``config.max_grad_norm`` and returns the updated tuple
    (shared by the exact unlearning, relearning and other-method drivers)."""

    def __init__(self, config: DynamicsConfig, params: tuple[torch.Tensor, ...]):
        self.config = config
        self.states = [AdamState(p) for p in params]

    def step(self, params, grads) -> tuple[torch.Tensor, ...]:
        c = self.config
        grads = clip_by_global_norm(grads, c.max_grad_norm)
        if c.optimizer == "gd":
            return tuple(p - c.learning_rate * g for p, g in zip(params, grads))
        return tuple(adam_update(c.optimizer, p, g, state, c.learning_rate, c.adam_betas, c.adam_eps, c.weight_decay)
                     for p, g, state in zip(params, grads, self.states))


def clip_by_global_norm(grads: tuple[torch.Tensor, ...], max_norm: float | None) -> tuple[torch.Tensor, ...]:
    """``g * min(1, max_norm / ||g||)`` with ||g|| the norm over all tensors (torch's ``clip_grad_norm_``
    rule, without its 1e-6 in the denominator); unchanged when ``max_norm`` is None."""
    if max_norm is None:
        return grads
    norm = global_norm(grads)
    return grads if norm <= max_norm else tuple(g * (max_norm / norm) for g in grads)


def _evaluate_step(model, params, objective, batch, evaluate_gradient):
    """``(model at params, its evaluation, None)``, or ``(model, None, reason)`` when it cannot be evaluated."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return model, None, "parameters have NaN/inf"
    candidate = model.with_parameters(*params)
    try:
        return candidate, evaluate_gradient(candidate, objective, *batch), None
    except ValueError:
        with torch.no_grad():
            if not bool(torch.isfinite(candidate.response_logps(batch[0])).all()):
                return candidate, None, "forget log-likelihoods are NaN/inf"
        raise


def _divergence(evaluation: ExactEvaluation, num_tokens: torch.Tensor, threshold: float | None) -> str | None:
    """:func:`markovsim.config.divergence_reason` of one step: the objective, ||g|| and the forget batch's
    mean of logps / num_tokens."""
    logp_per_token = float((evaluation.forget_logps / num_tokens).mean())
    return divergence_reason(float(evaluation.value), logp_per_token, global_norm(evaluation.gradients), threshold)


def _check_model(name: str, model, num_states: int) -> None:
    """TypeError unless ``model`` is an exact model (TabularMarkov / MixtureOfChains); ValueError unless it has
    ``num_states`` states."""
    if not isinstance(model, EXACT_MODELS):
        raise TypeError(f"{name} must be a markovsim TabularMarkov or MixtureOfChains, got {type(model).__name__}")
    if model.num_states != num_states:
        raise ValueError(f"{name} has {model.num_states} states but forget has {num_states}; use a model of the "
                         f"data's chains")


def _check_sequences(name: str, sequences, num_states: int | None = None) -> SequenceSet:
    """TypeError unless ``sequences`` is a SequenceSet; ValueError if it is empty or has another ``num_states``."""
    if not isinstance(sequences, SequenceSet):
        raise TypeError(f"{name} must be a markovsim SequenceSet, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name} is empty; it needs at least one sequence")
    if num_states is not None and sequences.num_states != num_states:
        raise ValueError(f"{name} has {sequences.num_states} states but forget has {num_states}")
    return sequences


def check_run_inputs(model, objective, forget, retain, reference, evaluator) -> None:
    """The arguments every exact run shares (:func:`unlearn`, :func:`gradient_flow`), each checked with an error
    naming it: ``objective`` an :class:`Objective`; ``forget`` a non-empty SequenceSet; ``retain`` None or a
    non-empty SequenceSet of the same V (required when the objective has a retain term); ``model`` and
    ``reference`` exact models of that V (``reference`` may be None when the objective does not need it);
    ``evaluator`` None or a :class:`markovsim.evaluation.Evaluator`."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a markovsim Objective (e.g. markovsim.objectives.get_objective('NPO')), "
                        f"got {type(objective).__name__}")
    num_states = _check_sequences("forget", forget).num_states
    if retain is not None or objective.retain is not None:
        if retain is None:
            raise ValueError(f"objective has retain term {objective.retain!r}: pass a retain SequenceSet")
        _check_sequences("retain", retain, num_states)
    _check_model("model", model, num_states)
    if reference is None and objective.needs_reference:
        raise TypeError(f"reference is None, but objective {objective.forget!r}/{objective.retain!r} needs the "
                        f"reference model: pass the model before unlearning")
    if reference is not None:
        _check_model("reference", reference, num_states)
    if evaluator is not None and not isinstance(evaluator, EvaluatorProtocol):
        raise TypeError(f"evaluator must be a markovsim.evaluation.Evaluator (e.g. ExactEvaluator) or None, "
                        f"got {type(evaluator).__name__}")


def unlearn(model, objective: Objective, forget: SequenceSet, retain: SequenceSet | None, reference,
            config: DynamicsConfig = DynamicsConfig(), evaluator: ExactEvaluator | None = None,
            progress: bool | None = None) -> Trajectory:
    """Run ``config.steps`` optimisation steps of ``objective`` from ``model``.

    Args:
        model: the starting ``TabularMarkov`` / ``MixtureOfChains`` (usually the reference itself).
        forget, retain: training sequences (retain may be None for forget-only objectives).
        reference: the model before unlearning (NPO's pi_ref, the KL term's target).
        evaluator: test-set metrics; default evaluates on ``forget`` and ``retain`` themselves.
        progress: show progress; None = ``config.progress``.
    Returns:
        a :class:`Trajectory`; ``diverged_at`` is set if the run stopped early.
    """
    check_run_inputs(model, objective, forget, retain, reference, evaluator)
    if not isinstance(config, DynamicsConfig):
        raise TypeError(f"config must be a DynamicsConfig, got {type(config).__name__}")
    if progress is not None:
        check_boolean("progress", progress)
    with torch_threads(1):
        progress = config.progress if progress is None else progress
        return _unlearn(model, objective, forget, retain, reference, config, evaluator, progress)


def _unlearn(model, objective, forget, retain, reference, config, evaluator, progress) -> Trajectory:
    problem = Problem.build(objective, forget, retain, reference)
    if evaluator is None:
        from .data import concatenate

        evaluator = ExactEvaluator(concatenate([s for s in (forget, retain) if s is not None]), reference=reference)
    names = evaluator.component_names
    rng = np.random.default_rng(config.seed) if config.batch_size is not None else None
    evaluate_gradient = autograd_evaluation if config.gradient == "autograd" else objective_value_and_gradient
    optimizer, params = ParameterOptimizer(config, model.parameters()), model.parameters()
    full_batch = config.batch_size is None
    last = {"model": model}  # the model at the latest evaluated parameters

    def step(index, params):
        batch = problem.batch(rng, config.batch_size)
        last["model"], current, reason = _evaluate_step(last["model"], params, objective, batch, evaluate_gradient)
        if reason is None:
            reason = _divergence(current, torch.tensor(batch[0].num_tokens, dtype=torch.float64),
                                 config.divergence_logp_per_token)
        loss = float(current.value) if current is not None else float("nan")
        record = lambda: _record(last["model"], objective, problem, evaluator, names,  # noqa: E731
                                 finite=reason is None, full=current if full_batch else None)
        return loss, None if current is None else current.gradients, reason, record

    log = run_steps(params, config, optimizer, step, unlearning_progress(config.steps, progress))
    model = last["model"]
    steps, records, losses, distances, diverged_at, reason = log
    return assemble_trajectory(steps, names, records, losses, distances, diverged_at, reason,
                       {"objective": dataclasses.asdict(objective), "dynamics": dataclasses.asdict(config),
                        "model": type(model).__name__})


def run_steps(params, config, optimizer: ParameterOptimizer, step, bar) -> tuple:
    """The step loop shared by exact unlearning, relearning and the other methods' driver.

    For index = 0..config.steps: ``step(index, params) -> (loss, gradients, reason, record)`` evaluates the
    parameters (``reason``: why the run stops here, else None; ``record()``: the evaluation record, called
    only at evaluation steps: every ``config.eval_every``, the last and a stopping step); then the optimiser
    updates ``params``. Returns (steps, records, losses, parameter distances from the start,
    diverged_at, reason).
    """
    start = tuple(p.clone() for p in params)
    steps, records, losses, distances, diverged_at, reason = [], [], [], [], None, None
    for index in range(config.steps + 1):
        loss, gradients, reason, record = step(index, params)
        if index % config.eval_every == 0 or index == config.steps or reason is not None:
            records.append(record())
            steps.append(index)
            losses.append(loss)
            distances.append(global_norm([p - p0 for p, p0 in zip(params, start)]))
        if reason is not None:
            diverged_at = index
            break
        if index < config.steps:
            params = optimizer.step(params, gradients)
            bar.update(1)
    bar.close()
    return steps, records, losses, distances, diverged_at, reason


def _record(model, objective, problem, evaluator, names, finite: bool, full: ExactEvaluation | None = None) -> dict:
    if not finite:
        return {}
    return evaluator.evaluate(model) | gradient_diagnostics(model, objective, problem, names, full)


def assemble_trajectory(steps, names, records, losses, distances, diverged_at, reason, info) -> Trajectory:
    """A :class:`Trajectory` from per-evaluation records ({metric: (C,) per component}; a missing metric -> NaN),
    the step losses and parameter distances, the divergence step/reason and ``info``."""
    metrics = {}
    for metric in ("kl_true", "kl_retrained", "kl_reference", "logp_per_token", "mean_weight", "power_share"):
        rows = [r.get(metric, np.full(len(names), np.nan)) for r in records]
        metrics[metric] = np.array(rows).reshape(len(records), len(names))
    step_metrics = {"loss": np.asarray(losses, dtype=np.float64),
                    "parameter_distance": np.asarray(distances, dtype=np.float64)}
    return Trajectory(np.asarray(steps), tuple(names), metrics, step_metrics,
                      diverged_at, reason, info)


def unlearning_progress(total: int, enabled: bool):
    """The progress bar of an exact run of ``total`` steps (:func:`markovsim.progress.progress_bar`)."""
    return progress_bar(total, 0, "unlearning", enabled)


def gradient_flow(model, objective: Objective, forget: SequenceSet, retain: SequenceSet | None, reference,
                  times, evaluator: ExactEvaluator | None = None, method: str = "RK45", rtol: float = 1e-8,
                  atol: float = 1e-10) -> Trajectory:
    """Integrate ``d theta / dt = -grad L(theta)`` with ``scipy.integrate.solve_ivp``; evaluate at ``times``.

    The trajectory's ``steps`` are the (float) times. Gradient descent with step ``eta`` for ``k`` steps
    approximates the flow at ``t = k eta`` when ``eta`` is small.

    Args (besides those of :func:`unlearn`):
        times: a non-empty, non-decreasing 1-d array of finite times >= 0.
        method: a ``solve_ivp`` solver name, one of ``FLOW_METHODS``.
        rtol, atol: its relative and absolute tolerances, finite and > 0.
    """
    check_run_inputs(model, objective, forget, retain, reference, evaluator)
    times = _check_times(times)
    if not isinstance(method, str) or method not in FLOW_METHODS:
        raise ValueError(f"method must be one of {FLOW_METHODS} (scipy.integrate.solve_ivp's solvers), got {method!r}")
    check_real("rtol", rtol, minimum=0.0, exclusive=True)
    check_real("atol", atol, minimum=0.0, exclusive=True)
    with torch_threads(1):
        return _gradient_flow(model, objective, forget, retain, reference, times, evaluator, method, rtol, atol)


def _check_times(times) -> np.ndarray:
    """The evaluation times of :func:`gradient_flow` as float64 (k,), or an error naming ``times``."""
    if isinstance(times, (str, bytes)):
        raise TypeError(f"times must be a 1-d array of numbers, got {type(times).__name__}")
    times = as_float_array(times, "times", ndim=1)  # TypeError for non-numbers, ValueError for NaN/inf
    if times.size == 0:
        raise ValueError("times is empty; give at least one evaluation time >= 0")
    if times.min() < 0:
        raise ValueError(f"times must be >= 0 (the flow starts at t = 0), got {times.min():g}")
    decreasing = np.flatnonzero(np.diff(times) < 0)
    if decreasing.size:
        index = int(decreasing[0]) + 1
        raise ValueError(f"times must be non-decreasing; times[{index}] = {times[index]:g} follows "
                         f"{times[index - 1]:g}")
    return times


def _gradient_flow(model, objective, forget, retain, reference, times, evaluator, method, rtol, atol) -> Trajectory:
    from scipy.integrate import solve_ivp

    problem = Problem.build(objective, forget, retain, reference)
    shapes = [p.shape for p in model.parameters()]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflatten(vector):
        parts = np.split(np.asarray(vector), np.cumsum(sizes)[:-1])
        return [torch.as_tensor(part.copy()).reshape(shape) for part, shape in zip(parts, shapes)]

    def velocity(_, vector):
        gradients = objective_value_and_gradient(model.with_parameters(*unflatten(vector)), objective,
                                                 *problem.batch(None, None)).gradients
        return -np.concatenate([g.reshape(-1).numpy() for g in gradients])

    start = np.concatenate([p.reshape(-1).numpy() for p in model.parameters()])
    distinct, at = np.unique(times, return_inverse=True)  # solve_ivp needs strictly increasing times
    if distinct[-1] > 0:
        solution = solve_ivp(velocity, (0.0, float(distinct[-1])), start, t_eval=distinct, method=method, rtol=rtol,
                             atol=atol)
        if not solution.success:
            raise RuntimeError(f"solve_ivp failed: {solution.message}")
        points = solution.y.T[at]  # (k, P)
    else:  # every time is 0: nothing to integrate (solve_ivp needs a non-empty interval)
        points = np.repeat(start[None, :], times.size, axis=0)  # (k, P)
    if evaluator is None:
        from .data import concatenate

        evaluator = ExactEvaluator(concatenate([s for s in (forget, retain) if s is not None]), reference=reference)
    records, losses, distances = [], [], []
    for column in points:
        point = model.with_parameters(*unflatten(column))
        records.append(_record(point, objective, problem, evaluator, evaluator.component_names, True))
        losses.append(float(objective_value(point, objective, *problem.batch(None, None))))
        distances.append(float(np.linalg.norm(column - start)))
    return assemble_trajectory(times, evaluator.component_names, records, losses, distances, None, None,
                       {"objective": dataclasses.asdict(objective),
                        "flow": {"method": method, "rtol": rtol, "atol": atol},
                        "model": type(model).__name__})
