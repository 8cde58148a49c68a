"""Run a registry method on a prepared scenario (``markovsim.scenarios.prepare``) with exact gradients.

:func:`exact_problem` builds the method's simulator counterpart from a :class:`~markovsim.scenarios.Setup`
(forget, retain, the reference, and for KGA a fresh "unseen" set D_n sampled from the retain components'
true chains, which no model was trained on); :func:`run_method` runs it and returns a
:class:`~markovsim.trajectory.Trajectory` evaluated by the setup's test-set evaluator, the same plots as
``markovsim.dynamics.unlearn``'s.
"""

from __future__ import annotations

import numpy as np

from ..data import MixtureSpec, SequenceSet
from ..dynamics import DynamicsConfig
from ..validation import check_int
from .exact import unlearn_exact
from .registry import get_method
from .task_negation import task_negation_path

__all__ = ["unseen_sequences", "exact_problem", "run_method"]


def unseen_sequences(spec: MixtureSpec, num_sequences: int, seed: int = 0) -> SequenceSet:
    """``num_sequences`` fresh sequences per retain component of ``spec`` (its true chain and length).

    Drawn from ``default_rng([seed, 1000 + k])`` for component k, streams :meth:`MixtureSpec.sample` never uses.
    """
    check_int(num_sequences, "num_sequences", 1)
    check_int(seed, "seed", 0)
    parts, names = [], []
    for index, component in enumerate(spec.components):
        if component.role != "retain":
            continue
        rng = np.random.default_rng([seed, 1000 + index])
        parts.append(component.chain.sample(num_sequences, component.length, rng))
        names.append(component.name)
    return SequenceSet.from_parts(parts, tuple(names), spec.num_states)


def exact_problem(name: str, setup, config=None, num_unseen: int | None = None, seed: int = 0):
    """The simulator counterpart of method ``name`` on ``setup``; ``config`` defaults to the registry's.

    ``num_unseen`` (KGA's D_n per retain component) defaults to the forget set's size.
    """
    spec = get_method(name)
    if spec.exact is None:
        raise ValueError(f"method {name!r} has no exact simulator counterpart: {spec.exact_note}")
    config = spec.config if config is None else config
    if not isinstance(config, type(spec.config)):
        raise TypeError(f"config of {name!r} must be a {type(spec.config).__name__}, got {type(config).__name__}")
    unseen = None
    if name == "KGA":
        unseen = unseen_sequences(setup.scenario.spec, num_unseen or len(setup.forget), seed)
    return spec.exact(config, setup.reference, setup.forget, setup.retain, unseen)


def run_method(name: str, setup, dynamics: DynamicsConfig | None = None, config=None, scales=None,
               progress: bool | None = None, unseen_seed: int | None = None):
    """Run method ``name`` on ``setup`` from its reference model; a ``Trajectory``.

    Objectives and wrappers run ``dynamics`` (default: the scenario's) full-batch steps. TaskNegation,
    an update rule, is evaluated along ``scales`` (default 11 lambdas from 0 to its ``config.scale``);
    its trajectory's ``steps`` are those lambdas. KGA's unseen set is drawn with ``unseen_seed``
    (default: the scenario's data seed, so runs over data seeds also vary D_n).
    """
    seed = setup.scenario.spec.seed if unseen_seed is None else unseen_seed
    problem = exact_problem(name, setup, config, seed=seed)
    if get_method(name).kind == "update_rule":
        scales = np.linspace(0.0, problem.config.scale, 11) if scales is None else scales
        return task_negation_path(problem, scales, setup.evaluator)
    dynamics = setup.scenario.dynamics if dynamics is None else dynamics
    return unlearn_exact(problem, setup.reference, dynamics, setup.evaluator, progress)
