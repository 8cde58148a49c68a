"""Summaries of trajectories: divergence-rate fits (docs/theory.md, "Divergence speed") and comparisons at
equal progress."""

from __future__ import annotations

import numpy as np

from .trajectory import Trajectory


def _least_squares(feature: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Fit ``values = a + b feature``; returns (a, b, R^2)."""
    design = np.stack([np.ones_like(feature), feature], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, values, rcond=None)
    residual = values - (a + b * feature)
    spread = np.sum((values - values.mean()) ** 2)
    return float(a), float(b), float(1 - np.sum(residual ** 2) / spread) if spread > 0 else 1.0


def fit_divergence_rates(steps, values) -> dict[str, dict[str, float]]:
    """Fit a forget log-likelihood curve two ways (NPO paper, Theorem 2):

        linear:       values ~ a + b t
        logarithmic:  values ~ a + b log(1 + t / tau)   (tau chosen on a log grid by least squares)

    Args:
        steps: (E,) steps t >= 0; values: (E,) e.g. mean forget log-likelihood per token.
    Returns:
        ``{"linear": {a, b, r2}, "logarithmic": {a, b, tau, r2}, "better": "linear" | "logarithmic"}``
    """
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if steps.size < 3:
        raise ValueError("fit_divergence_rates needs at least 3 finite points")
    a, b, r2 = _least_squares(steps, values)
    best = None
    for tau in np.geomspace(max(steps.max(), 1) * 1e-4, max(steps.max(), 1) * 1e2, 121):
        fit = _least_squares(np.log1p(steps / tau), values)
        if best is None or fit[2] > best[3]:
            best = (*fit[:2], float(tau), fit[2])
    logarithmic = {"a": best[0], "b": best[1], "tau": best[2], "r2": best[3]}
    return {"linear": {"a": a, "b": b, "r2": r2}, "logarithmic": logarithmic,
            "better": "logarithmic" if logarithmic["r2"] > r2 else "linear"}


def crossing(progress, target: float, increasing: bool = True) -> float:
    """Fractional index at which ``progress`` (E,) first reaches ``target``; NaN if it never does.

    ``increasing``: reaching means ``progress >= target`` (else ``<=``). Already reached at index 0
    gives 0; otherwise the crossing is linearly interpolated between the two evaluations around it.
    """
    progress = np.asarray(progress, dtype=np.float64)
    sign = 1.0 if increasing else -1.0
    reached = np.flatnonzero(sign * (progress - target) >= 0)
    if reached.size == 0:
        return float("nan")
    i = int(reached[0])
    if i == 0:
        return 0.0
    return float(i - 1 + (target - progress[i - 1]) / (progress[i] - progress[i - 1]))


def interpolate_at(values, position: float) -> float:
    """``values`` (E,) linearly interpolated at a fractional index (NaN stays NaN)."""
    if not np.isfinite(position):
        return float("nan")
    values = np.asarray(values, dtype=np.float64)
    low = int(np.floor(position))
    if low >= len(values) - 1:
        return float(values[-1])
    return float(values[low] + (position - low) * (values[low + 1] - values[low]))


def value_at_progress(trajectory: Trajectory, progress_metric: str, progress_component: str, target: float,
                      outcome_metric: str, outcome_component: str, increasing: bool | None = None) -> float:
    """The outcome metric, linearly interpolated at the first evaluation where the progress metric reaches ``target``.

    E.g. the retain KL paid when forget2's KL to the truth first reaches the retrained model's value.
    ``increasing`` None infers the direction from the start (progress below the target must rise);
    NaN if the target is never reached.
    """
    progress = trajectory.metric(progress_metric, progress_component)
    if increasing is None:
        increasing = bool(target >= progress[0])
    position = crossing(progress, target, increasing)
    return interpolate_at(trajectory.metric(outcome_metric, outcome_component), position)


def power_summary(trajectory: Trajectory, components) -> dict[str, float]:
    """Mean power share of each component over the run (evaluations with a defined share)."""
    return {name: float(np.nanmean(trajectory.metric("power_share", name))) for name in components}
