"""Plots that accept any :class:`~markovsim.trajectory.Trajectory` (simulator or transformer).

``tradeoff_axes`` draws the paper's Markov figure: forget quality (KL from the true chain, per
forget component) against retain distance, one trajectory per method, with the initial and
retrained models marked. ``allocation_axes`` draws mean gradient weight and power share over steps.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np

from .analysis import fit_divergence_rates
from .trajectory import Trajectory

# The paper's colours: NPO blue, SimNPO red, GA grey (their +RT / +KL forms in lighter shades of the same hue);
# the 2x2 cells between them: NPO-ave purple (blue + normalisation), SimNPO-sum orange (red - normalisation).
NPO_COLOR, SIMNPO_COLOR, GA_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
METHOD_COLORS = {"GA": GA_COLOR, "GradDiff": "#8c564b", "NPO": NPO_COLOR, "NPO+RT": "#aec7e8", "NPO+KL": "#17becf",
                 "SimNPO": SIMNPO_COLOR, "SimNPO+RT": "#ff9896", "SimNPO+KL": "#e377c2",
                 "NPO-ave": "#9467bd", "NPO-ave+RT": "#c5b0d5", "SimNPO-sum": "#ff7f0e", "SimNPO-sum+RT": "#ffbb78"}
LINESTYLES = ("-", "--", ":", "-.")


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method.split(" ")[0], "#333333")


def tradeoff_axes(axis, trajectories: Mapping[str, Trajectory], forget_component: str, retain_component: str = "retain",
                  metric: str = "kl_true", retrained: Mapping[str, float] | None = None, linestyle: str = "-",
                  label_suffix: str = "") -> None:
    """y = ``metric`` on the forget component (higher = more forgotten), x = ``metric`` on retain (lower = better)."""
    for method, trajectory in trajectories.items():
        x = trajectory.metric(metric, retain_component)
        y = trajectory.metric(metric, forget_component)
        axis.plot(x, y, linestyle, color=method_color(method), label=f"{method}{label_suffix}", lw=1.5)
        axis.plot(x[-1:], y[-1:], "o", color=method_color(method), ms=3)
        if trajectory.diverged_at is not None:
            axis.plot(x[-1:], y[-1:], "x", color=method_color(method), ms=7)
    first = next(iter(trajectories.values()))
    axis.plot(first.metric(metric, retain_component)[:1], first.metric(metric, forget_component)[:1], "k*", ms=9,
              label="initial (reference)" if not label_suffix else None)
    if retrained is not None:
        axis.plot([retrained[retain_component]], [retrained[forget_component]], "*", color="#ff7f0e", ms=11,
                  label="retrained" if not label_suffix else None)
        axis.axhline(retrained[forget_component], color="#ff7f0e", lw=0.8, ls=":")
    axis.set_xlabel(f"retain distance: KL on {retain_component}")
    axis.set_ylabel(f"forget quality: KL on {forget_component}")
    axis.set_title(forget_component)


def stack_seeds(curves) -> np.ndarray:
    """(S, E) array of per-seed curves of possibly different lengths (runs that stopped early), NaN-padded."""
    curves = [np.asarray(c, dtype=np.float64) for c in curves]
    stacked = np.full((len(curves), max(len(c) for c in curves)), np.nan)
    for row, curve in enumerate(curves):
        stacked[row, : len(curve)] = curve
    return stacked


def median_path(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """The pointwise median over seeds of a parametric curve: (E,) x and (E,) y.

    Args: xs, ys: lists of per-seed curves (or (S, E) arrays; NaN where a seed has stopped). At each
    evaluation the median of the seeds still running (NaN where none is).
    """
    xs, ys = stack_seeds(xs), stack_seeds(ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return np.nanmedian(xs, 0), np.nanmedian(ys, 0)


def seed_lines_axes(axis, xs, ys, color: str, linestyle: str = "-", label: str | None = None) -> None:
    """Every seed's (x(t), y(t)) as a thin faint line and their pointwise :func:`median_path` as a thick one
    (what a reader should see of a 2-D path over seeds; an sd band of such a path can fold into a polygon
    nowhere near any seed)."""
    for x, y in zip(xs, ys):
        axis.plot(x, y, linestyle, color=color, lw=0.5, alpha=0.3)
    median_x, median_y = median_path(xs, ys)
    axis.plot(median_x, median_y, linestyle, color=color, lw=1.8, label=label)


def band_polygon(xs: np.ndarray, ys: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray | None:
    """A band of one standard deviation around the seed-mean of a parametric curve (x(t), y(t)).

    At each step the half-width along the curve's normal n is ``sqrt(n^T Sigma n)``, Sigma the
    seeds' covariance of (x, y); directions are taken in coordinates divided by ``scale`` (the
    axes' spans), so the band looks right on axes with different units.

    Args:
        xs, ys: (S, E) per-seed coordinates (NaN where a seed has stopped).
    Returns: (2E', 2) polygon vertices (upper edge, then lower edge reversed), or None with < 2 seeds.
    """
    keep = np.sum(np.isfinite(xs) & np.isfinite(ys), axis=0) >= 2  # (E,)
    if xs.shape[0] < 2 or keep.sum() < 2:
        return None
    u, w = xs[:, keep] / scale[0], ys[:, keep] / scale[1]  # (S, E') normalised coordinates
    mean = np.stack([np.nanmean(u, 0), np.nanmean(w, 0)], axis=1)  # (E', 2)
    tangent = np.gradient(mean, axis=0)  # (E', 2)
    length = np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.where(length > 0, np.stack([-tangent[:, 1], tangent[:, 0]], 1) / np.where(length > 0, length, 1),
                      np.array([0.0, 1.0]))  # (E', 2)
    du, dw = u - mean[:, 0], w - mean[:, 1]  # (S, E')
    projected = du * normal[:, 0] + dw * normal[:, 1]  # (S, E') deviation along the normal
    half = np.sqrt(np.nansum(projected ** 2, 0) / np.maximum(np.sum(np.isfinite(projected), 0) - 1, 1))  # (E',)
    upper, lower = mean + half[:, None] * normal, mean - half[:, None] * normal
    polygon = np.concatenate([upper, lower[::-1]])
    return polygon * np.asarray(scale)


def seed_band_axes(axis, xs, ys, color: str, linestyle: str = "-", label: str | None = None,
                   scale: tuple[float, float] = (1.0, 1.0), marker_every: int = 0) -> None:
    """Seed-mean trajectory of (x, y) with a one-sd band (:func:`band_polygon`); ``xs``/``ys``: lists of
    per-seed curves."""
    xs, ys = stack_seeds(xs), stack_seeds(ys)
    mean_x, mean_y = np.nanmean(xs, 0), np.nanmean(ys, 0)
    axis.plot(mean_x, mean_y, linestyle, color=color, lw=1.6, label=label)
    if marker_every:
        axis.plot(mean_x[::marker_every], mean_y[::marker_every], ".", color=color, ms=3)
    polygon = band_polygon(xs, ys, scale)
    if polygon is not None:
        axis.fill(polygon[:, 0], polygon[:, 1], color=color, alpha=0.18, lw=0)


def allocation_axes(weight_axis, share_axis, trajectories: Mapping[str, Trajectory], components) -> None:
    """Mean gradient weight (log scale) and power share over steps; one colour per method, one style per component."""
    for method, trajectory in trajectories.items():
        for index, name in enumerate(components):
            style = LINESTYLES[index % len(LINESTYLES)]
            weight = trajectory.metric("mean_weight", name)
            if np.any(np.isfinite(weight)):
                weight_axis.plot(trajectory.steps, weight, style, color=method_color(method), label=f"{method} {name}")
            share_axis.plot(trajectory.steps, trajectory.metric("power_share", name), style,
                            color=method_color(method), label=f"{method} {name}")
    weight_axis.set_yscale("log")
    weight_axis.set_xlabel("step")
    weight_axis.set_ylabel("mean gradient weight w(y)")
    share_axis.set_xlabel("step")
    share_axis.set_ylabel("share of gradient norm")
    share_axis.set_ylim(0, 1)


def scenario_figure(runs: Mapping[str, Mapping[str, Trajectory]], retrained: Mapping[str, Mapping[str, float]],
                    forget_components, title: str):
    """One row per model class: a trade-off panel per forget component, then weights and power share."""
    figure, axes = plt.subplots(len(runs), len(forget_components) + 2, squeeze=False,
                                figsize=(4.0 * (len(forget_components) + 2), 3.4 * len(runs)))
    for row, (model_class, trajectories) in enumerate(runs.items()):
        for col, component in enumerate(forget_components):
            tradeoff_axes(axes[row, col], trajectories, component, retrained=retrained.get(model_class))
            axes[row, col].set_title(f"{model_class}: {component}")
        allocation_axes(axes[row, -2], axes[row, -1], trajectories, forget_components)
        axes[row, -2].set_title(f"{model_class}: gradient weight")
        axes[row, -1].set_title(f"{model_class}: unlearning power")
    axes[0, 0].legend(fontsize=7)
    axes[0, -1].legend(fontsize=6, ncol=2)
    figure.suptitle(title)
    figure.set_layout_engine("constrained")
    return figure


def fitted_curve(fit: dict, steps: np.ndarray) -> np.ndarray:
    """Evaluate the better of the two fits returned by :func:`~markovsim.analysis.fit_divergence_rates`."""
    if fit["better"] == "linear":
        return fit["linear"]["a"] + fit["linear"]["b"] * steps
    logarithmic = fit["logarithmic"]
    return logarithmic["a"] + logarithmic["b"] * np.log1p(steps / logarithmic["tau"])


def rate_axes(axis, steps: np.ndarray, values: np.ndarray, label: str, color: str, fit: dict | None = None) -> dict:
    """``values`` against steps on a log x-axis with the better linear/logarithmic fit dotted; returns the fit."""
    fit = fit or fit_divergence_rates(steps, values)
    shown = steps > 0
    axis.plot(steps[shown], values[shown], color=color, lw=2, alpha=0.6, label=label)
    axis.plot(steps[shown], fitted_curve(fit, steps)[shown], "k:", lw=1,
              label=f"{label} fit: {fit['better']} (R2 {fit[fit['better']]['r2']:.3f})")
    axis.set_xscale("log")
    axis.set_xlabel("step (log scale)")
    return fit


def divergence_figure(runs: Mapping[str, Mapping[str, Trajectory]], forget_components, title: str):
    """Per model class: mean forget log-likelihood per token and parameter distance vs steps, with fitted rates."""
    figure, axes = plt.subplots(len(runs), 2, squeeze=False, figsize=(10, 3.4 * len(runs)))
    for row, (model_class, trajectories) in enumerate(runs.items()):
        for method, trajectory in trajectories.items():
            forget = np.nanmean([trajectory.metric("logp_per_token", name) for name in forget_components], axis=0)
            if np.isfinite(forget).sum() >= 3:
                rate_axes(axes[row, 0], trajectory.steps, forget, method, method_color(method))
                rate_axes(axes[row, 1], trajectory.steps, trajectory.step_metrics["parameter_distance"], method,
                          method_color(method))
        axes[row, 0].set_ylabel("forget log-likelihood per token")
        axes[row, 1].set_ylabel("||theta_t - theta_0||")
        for axis in axes[row]:
            axis.set_title(model_class)
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.set_layout_engine("constrained")
    return figure
