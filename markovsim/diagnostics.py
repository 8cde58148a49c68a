"""Gradient diagnostics: each component's share of the gradient norm ("unlearning power") and mean weights.

docs/theory.md, "Reference-model bias". :func:`power_shares` is the one rule for turning per-component
gradient norms into shares, used by the simulator (and meant for ``llm.diagnostics``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .exact_gradients import ExactEvaluation, objective_value_and_gradient
from .objectives import Objective

__all__ = ["global_norm", "power_shares", "component_has_data", "gradient_diagnostics"]


def global_norm(tensors) -> float:
    """||g|| = sqrt(sum over tensors of sum g^2): the norm of the concatenated tensors."""
    return float(torch.sqrt(sum((t * t).sum() for t in tensors)))


def power_shares(norms_by_component: Sequence[float], has_data: Sequence[bool]) -> np.ndarray:
    """Each component's share of the gradient norm: share_c = ||g_c|| / sum_{c' with data} ||g_c'||.

    Args:
        norms_by_component: (C,) gradient norms ||g_c|| >= 0 (credited retain norms included).
        has_data: (C,) whether component c has training data (forget or retain) in this run.
    Returns:
        (C,) float64 shares summing to 1 over the components with data; NaN for a component without
        data (its share is undefined, not 0), and NaN everywhere when no component has a gradient.
    """
    norms = np.asarray(norms_by_component, dtype=np.float64)
    has_data = np.asarray(has_data, dtype=bool)
    if norms.shape != has_data.shape or norms.ndim != 1:
        raise ValueError(f"norms_by_component and has_data must both have shape (C,), got {norms.shape} "
                         f"and {has_data.shape}")
    total = norms[has_data].sum()
    if not total > 0:
        return np.full(norms.shape, np.nan)
    return np.where(has_data, norms / total, np.nan)


def component_has_data(problem, names: Sequence[str]) -> np.ndarray:
    """(C,) bool: component ``names[c]`` has forget sequences, or retain sequences (when a retain set is used)."""
    forget_counts = problem.forget.component_counts()
    retain_counts = problem.retain.component_counts() if problem.retain is not None else {}
    return np.array([forget_counts.get(n, 0) > 0 or retain_counts.get(n, 0) > 0 for n in names], dtype=bool)


def gradient_diagnostics(model, objective: Objective, problem, names: tuple[str, ...],
                         full: ExactEvaluation | None = None) -> dict[str, np.ndarray]:
    """Full-batch mean weight per forget component and every component's share of the gradient norm.

    The forget gradient splits exactly by component, ``g_c = (forget_weight / n_f) sum_{y in c} w(y) d logp(y)``;
    the retain term's gradient is credited to the retain components, split evenly. Shares follow
    :func:`power_shares` (NaN for a component without data).
    ``full`` is the full-batch evaluation at ``model`` when the caller already has it.
    """
    if full is None:
        full = objective_value_and_gradient(model, objective, *problem.batch(None, None))
    ids = torch.as_tensor(np.array(problem.forget.component_ids))
    scale = objective.forget_weight / len(problem.forget)
    norms, weights = np.zeros(len(names)), np.full(len(names), np.nan)
    forget_counts = problem.forget.component_counts()
    present = [(c, problem.forget.component_names.index(name)) for c, name in enumerate(names)
               if forget_counts.get(name, 0) > 0]
    forget_total = [torch.zeros_like(p) for p in model.parameters()]
    if present:
        rows = torch.stack([(ids == index).to(torch.float64) for _, index in present])  # (G, n_f)
        parts = model.response_logps_gradient(problem.forget, rows * full.forget_weights * scale)  # each (G, ...)
        for group, (c, _) in enumerate(present):
            weights[c] = float((full.forget_weights * rows[group]).sum() / rows[group].sum())
            norms[c] = global_norm([part[group] for part in parts])
        forget_total = [part.sum(0) for part in parts]
    if problem.retain is not None and objective.retain is not None:
        retain_norm = global_norm([g - f for g, f in zip(full.gradients, forget_total)])
        retain_counts = problem.retain.component_counts()
        retain_names = [name for name in names if retain_counts.get(name, 0) > 0]
        for name in retain_names:
            norms[names.index(name)] += retain_norm / len(retain_names)
    return {"mean_weight": weights, "power_share": power_shares(norms, component_has_data(problem, names))}
