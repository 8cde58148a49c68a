"""The shared look of every figure, and saving PNG + PDF atomically."""

from __future__ import annotations

import matplotlib.pyplot as plt

from markovsim.results import atomic_output

COMPONENT_COLORS = {"retain": "#2ca02c", "forget1": "#9467bd", "forget2": "#8c564b"}
# Models that are not an unlearning method (relearning baselines, the TOFU target and retain models).
MODEL_COLORS = {"reference": "#000000", "target": "#000000", "retain": "#2ca02c"}

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "figure.constrained_layout.use": True,
}


def apply_style() -> None:
    plt.rcParams.update(STYLE)


def save_figure(figure, stem: str) -> list[str]:
    """Write ``stem.png`` and ``stem.pdf`` atomically; returns the paths."""
    paths = []
    for extension in ("png", "pdf"):
        with atomic_output(f"{stem}.{extension}") as temporary:
            figure.savefig(temporary, format=extension)
        paths.append(f"{stem}.{extension}")
    plt.close(figure)
    return paths
