"""Trajectory: per-step, per-component metrics of one unlearning run (simulator or transformer).

Every plot accepts a :class:`Trajectory`, whichever side produced it. Metrics are arrays of shape
(num_evaluations, num_components); step-level scalars (the loss) are (num_evaluations,).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .data import atomic_save_npz
from .results import atomic_write_json, metadata_block, read_json

COMPONENT_METRICS = (
    "kl_true",        # mean per-token KL(true chain row || model predictive) on the component's test set
    "kl_retrained",   # ... KL(retrained predictive || model predictive)
    "kl_reference",   # ... KL(reference predictive || model predictive)
    "logp_per_token", # mean response log-likelihood per token on the component's test set
    "mean_weight",    # mean closed-form gradient weight w(y) on the component's forget training sequences
    "power_share",    # the component's share of the summed gradient norms ("unlearning power")
)
STEP_METRICS = (
    "loss",                # the objective on the step's batch
    "parameter_distance",  # ||theta_t - theta_0|| over all parameters (NPO paper, Theorem 2)
)


@dataclass
class Trajectory:
    """Evaluations of one run.

    Attributes:
        steps: (E,) int optimisation steps at which the model was evaluated (0 = before unlearning).
        component_names: C names, in the column order of every component metric.
        component_metrics: name -> (E, C) float64 arrays (``COMPONENT_METRICS``; NaN where undefined).
        step_metrics: name -> (E,) float64 arrays (``STEP_METRICS``).
        diverged_at: the step at which the run stopped on divergence, else None.
        divergence_reason: what was non-finite or past its threshold.
        info: JSON-ready description of the run (method, objective, config).
    """

    steps: np.ndarray
    component_names: tuple[str, ...]
    component_metrics: dict[str, np.ndarray]
    step_metrics: dict[str, np.ndarray]
    diverged_at: int | None = None
    divergence_reason: str | None = None
    info: dict = field(default_factory=dict)

    def metric(self, name: str, component: str | None = None) -> np.ndarray:
        """(E,) values of a step metric, or of a component metric for one component."""
        if name in self.step_metrics:
            return self.step_metrics[name]
        if name not in self.component_metrics:
            available = sorted(self.component_metrics) + sorted(self.step_metrics)
            raise ValueError(f"unknown metric {name!r}; available: {available}")
        if component not in self.component_names:
            raise ValueError(f"component must be one of {list(self.component_names)}, got {component!r}")
        return self.component_metrics[name][:, self.component_names.index(component)]

    def rows(self) -> list[dict]:
        """A tidy table: one dict per (evaluation step, component)."""
        table = []
        for e, step in enumerate(self.steps):
            for c, name in enumerate(self.component_names):
                row = {"step": int(step), "component": name}
                row |= {k: float(v[e, c]) for k, v in self.component_metrics.items()}
                row |= {k: float(v[e]) for k, v in self.step_metrics.items()}
                table.append(row)
        return table

    def save(self, stem: str | os.PathLike, config=None) -> None:
        """Write ``stem.json`` (metadata, config, info, divergence) and ``stem.npz`` (arrays), atomically."""
        stem = os.fspath(stem)
        arrays = {"steps": self.steps} | {f"component/{k}": v for k, v in self.component_metrics.items()}
        arrays |= {f"step/{k}": v for k, v in self.step_metrics.items()}
        atomic_save_npz(stem + ".npz", arrays)
        atomic_write_json(stem + ".json", metadata_block(config, component_names=list(self.component_names),
                                                         diverged_at=self.diverged_at,
                                                         divergence_reason=self.divergence_reason, info=self.info))

    @classmethod
    def load(cls, stem: str | os.PathLike) -> "Trajectory":
        stem = os.fspath(stem)
        document = read_json(stem + ".json")
        try:
            with np.load(stem + ".npz", allow_pickle=False) as data:
                component = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("component/")}
                step = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("step/")}
                steps = data["steps"]
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{stem}.npz is not a valid trajectory file: {error}") from error
        return cls(steps, tuple(document["component_names"]), component, step, document.get("diverged_at"),
                   document.get("divergence_reason"), document.get("info", {}))
