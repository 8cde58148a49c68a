"""The shared look of every figure, and saving PNG + PDF atomically."""

from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHOD_COLORS = {"GA": "#7f7f7f", "NPO": "#d62728", "SimNPO": "#1f77b4", "GradDiff": "#2ca02c",
                 "initial": "#000000", "retrained": "#ff7f0e"}
COMPONENT_STYLES = {"retain": "-", "forget1": "-", "forget2": "--"}
COMPONENT_COLORS = {"retain": "#2ca02c", "forget1": "#9467bd", "forget2": "#8c564b"}

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "figure.constrained_layout.use": True,
}


def apply_style() -> None:
    plt.rcParams.update(STYLE)


def save_figure(figure, stem: str) -> list[str]:
    """Write ``stem.png`` and ``stem.pdf`` (each via a temporary file and rename); returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = []
    for extension in ("png", "pdf"):
        path = f"{stem}.{extension}"
        handle, temporary = tempfile.mkstemp(suffix=f".{extension}", dir=os.path.dirname(os.path.abspath(path)))
        os.close(handle)
        try:
            figure.savefig(temporary, format=extension)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        paths.append(path)
    plt.close(figure)
    return paths
