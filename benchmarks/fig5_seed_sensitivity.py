"""Why NPO's Fig. 5 reach values spread over seeds several times more than SimNPO's: a decomposition.

A reach value is the retain KL at the (fractional) step where the forget KL first reaches the retrained
level, r = R(t*). Over seeds it varies through the reach step t* (how many batches the method needs) and
through how fast the retain KL grows per step around it. To first order

    sd(r)  ~  |dR/dt at t*|  x  sd(t*)

so a method can be seed-sensitive because it needs a variable number of steps, or because every step
costs a lot of retain KL (then a step more or less moves r far). For each case, transformer source,
method and forget component of a ``markov_tradeoff`` cache this prints the median step at reach, its sd
over seeds, the median local slope of the retain KL (per step, centred difference at t*), their
product, and the measured sd of the reach value; plus, per method, the gradient-weight split at the
first evaluations (mean NPO weight on forget1, forget2 at steps 0, 2, 4: NPO starts as gradient ascent,
every weight 1, and its weights fall at a seed-dependent rate).

    python benchmarks/fig5_seed_sensitivity.py docs/figures/cache/markov_tradeoff_paper
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paper_figures.markov_tradeoff import grouped_runs  # noqa: E402
from paper_figures.official_fig5 import CASE_LETTERS  # noqa: E402
from paper_figures.reach_statistics import FORGET, reach_point  # noqa: E402
from paper_figures.runs import load_runs  # noqa: E402


def local_slope(trajectory, position: float) -> float:
    """d(retain KL)/d(step) at a fractional evaluation index (centred difference over the neighbours)."""
    retain = trajectory.metric("kl_true", "retain")
    steps = trajectory.steps.astype(np.float64)
    low = max(int(np.floor(position)) - 1, 0)
    high = min(int(np.floor(position)) + 2, len(retain) - 1)
    return float((retain[high] - retain[low]) / (steps[high] - steps[low]))


def decomposition(per_seed, method: str, component: str) -> dict:
    reach, step, slope = [], [], []
    for _, trajectories, levels in per_seed:
        trajectory = trajectories[method]
        value, at = reach_point(trajectory, component, levels[component])
        if np.isfinite(value):
            position = np.interp(at, trajectory.steps, np.arange(len(trajectory.steps)))
            reach.append(value)
            step.append(at)
            slope.append(local_slope(trajectory, position))
    if len(reach) < 2:
        return {}
    step_sd = float(np.std(step, ddof=1))
    return {"seeds": len(reach), "step_median": float(np.median(step)), "step_sd": step_sd,
            "slope_median": float(np.median(slope)), "predicted_sd": float(np.median(np.abs(slope))) * step_sd,
            "reach_median": float(np.median(reach)), "reach_sd": float(np.std(reach, ddof=1))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", help="a markov_tradeoff cache stem (without .json / .npz)")
    parser.add_argument("--sources", nargs="+", default=["paper-synthetic", "gpt2-4x128"])
    arguments = parser.parse_args(argv)
    runs, retrained, _ = load_runs(arguments.cache)
    grouped = grouped_runs(runs, retrained)
    print("| case | source | method | component | seeds | step at reach: median (sd) | retain KL slope per step "
          "at reach: median | slope x sd(step) | reach: median (sd) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (case, source), per_seed in grouped.items():
        if source not in arguments.sources:
            continue
        for method in ("NPO", "SimNPO"):
            for component in FORGET:
                d = decomposition(per_seed, method, component)
                if d and d["step_median"] > 0:
                    print(f"| ({CASE_LETTERS[case]}) | {source} | {method} | {component} | {d['seeds']} | "
                          f"{d['step_median']:.1f} ({d['step_sd']:.1f}) | {d['slope_median']:.4f} | "
                          f"{d['predicted_sd']:.3f} | {d['reach_median']:.3f} ({d['reach_sd']:.3f}) |")
    print("\nmean gradient weight at steps 0 / 2 / 4, forget1 | forget2, per seed (NPO; SimNPO's are ~1e-4-1e-3):")
    for (case, source), per_seed in grouped.items():
        if source not in arguments.sources:
            continue
        for seed, trajectories, _ in per_seed:
            trajectory = trajectories["NPO"]
            weights = [trajectory.metric("mean_weight", c)[[0, 2, 4]] for c in FORGET]
            print(f"  ({CASE_LETTERS[case]}) {source} seed {seed}: " +
                  " | ".join(" / ".join(f"{w:.2f}" for w in ws) for ws in weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
