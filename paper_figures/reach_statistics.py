"""Fig. 5's reach values over paired seeds: the per-seed table, its summaries and paired differences.

The *reach value* of a run on a forget component is the retain KL (``kl_true`` on retain) at the first
evaluation where the component's forget KL reaches the seed's retrained model's level, linearly
interpolated between the two evaluations around the crossing (``step_at_reach`` is the fractional
step there); a run that never reaches the level has no reach value (empty in the CSV).

Seeds are *paired*: for one source and seed every method unlearns the same pre-trained model, on the
same data, with the same batch order, so the difference of two methods' reach values on one seed
isolates the method. Over the seeds:

- :func:`summarise`: median and 5-95% interval (percentiles over the seeds that reach) of one cell;
- :func:`paired_difference`: the mean of the per-seed differences ``a - b`` on seeds where both reach,
  its percentile bootstrap interval (resampling seeds), and the fraction of seeds with each ordering
  (a seed where only one method reaches counts as the other one lower).

The per-seed rows are one tidy CSV (:data:`CSV_COLUMNS`): every number a claim uses can be recomputed
from it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from markovsim.analysis import crossing, interpolate_at
from markovsim.results import atomic_output

CSV_COLUMNS = ("case", "source", "method", "component", "seed", "retain_kl_at_reach", "step_at_reach")
FORGET = ("forget1", "forget2")
BOOTSTRAP_RESAMPLES = 10_000
INTERVAL = (5.0, 95.0)  # percentiles of the per-seed spread
CONFIDENCE = 0.95  # of the bootstrap interval of a paired difference


def reach_point(trajectory, component: str, level: float) -> tuple[float, float]:
    """``(retain KL, step)`` where ``component``'s ``kl_true`` first reaches ``level`` (NaN, NaN if never)."""
    position = crossing(trajectory.metric("kl_true", component), level, increasing=True)
    if not np.isfinite(position):
        return math.nan, math.nan
    return (interpolate_at(trajectory.metric("kl_true", "retain"), position),
            interpolate_at(trajectory.steps.astype(np.float64), position))


def per_seed_rows(case: str, source: str, per_seed) -> list[dict]:
    """One row per (method, forget component, seed): ``per_seed`` is ``[(seed, {method: Trajectory},
    {component: retrained kl_true}), ...]``; values are floats, NaN where the level is not reached."""
    rows = []
    for method in per_seed[0][1]:
        for component in FORGET:
            for seed, trajectories, levels in per_seed:
                retain_kl, step = reach_point(trajectories[method], component, levels[component])
                rows.append({"case": case, "source": source, "method": method, "component": component,
                             "seed": int(seed), "retain_kl_at_reach": retain_kl, "step_at_reach": step})
    return rows


def _cell(value: float) -> str:
    return "" if not np.isfinite(value) else repr(float(value))


def write_csv(path: str, rows: list[dict]) -> None:
    """Write ``rows`` (:func:`per_seed_rows`) as CSV with :data:`CSV_COLUMNS`, atomically; NaN -> empty cell."""
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row["case"], row["source"], row["method"], row["component"], row["seed"],
                             _cell(row["retain_kl_at_reach"]), _cell(row["step_at_reach"])])


def read_csv(path: str) -> list[dict]:
    """The rows of a reach CSV (empty cell -> NaN); a file without exactly :data:`CSV_COLUMNS` is a ValueError."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(CSV_COLUMNS)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append({**row, "seed": int(row["seed"]),
                             "retain_kl_at_reach": float(row["retain_kl_at_reach"] or "nan"),
                             "step_at_reach": float(row["step_at_reach"] or "nan")})
            except ValueError as error:
                raise ValueError(f"{path}, line {line}: {error}") from None
    return rows


def values_by_seed(rows: list[dict], case: str, source: str, method: str, component: str,
                   field: str = "retain_kl_at_reach") -> dict[int, float]:
    """``{seed: value}`` of one cell (NaN = not reached)."""
    return {row["seed"]: row[field] for row in rows if (row["case"], row["source"], row["method"],
                                                         row["component"]) == (case, source, method, component)}


@dataclass(frozen=True)
class Summary:
    """One cell over seeds: median and 5-95% percentiles of the seeds that reach (None if none does)."""

    seeds: int
    reached: int
    median: float | None
    low: float | None
    high: float | None


def summarise(values: dict[int, float]) -> Summary:
    finite = np.array([v for v in values.values() if np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return Summary(len(values), 0, None, None, None)
    low, high = np.percentile(finite, INTERVAL)
    return Summary(len(values), int(finite.size), float(np.median(finite)), float(low), float(high))


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over paired seeds.

    Attributes:
        seeds: seeds present for both; both_reached: of those, seeds where both reach.
        mean, low, high: mean difference over ``both_reached`` seeds and its bootstrap interval (None if < 2).
        a_lower, tied, a_higher: fractions of ``seeds`` with a < b, a == b, a > b (not reached = infinitely
            costly; both not reached = tied).
    """

    seeds: int
    both_reached: int
    mean: float | None
    low: float | None
    high: float | None
    a_lower: float
    tied: float
    a_higher: float

    @property
    def verdict(self) -> str:
        """"lower" / "higher" when the interval excludes 0 on that side, else "not distinguishable". Without an
        interval (fewer than two seeds where both reach) "lower" / "higher" only when every seed orders the two
        that way (e.g. ``a`` reaches on every seed, ``b`` on none)."""
        if self.low is not None:
            return "lower" if self.high < 0 else "higher" if self.low > 0 else "not distinguishable"
        if self.a_lower == 1.0:
            return "lower"
        if self.a_higher == 1.0:
            return "higher"
        return "not distinguishable"


def percentile_interval(statistics: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``statistics`` (percentile method)."""
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(statistics, (tail, 100.0 - tail))
    return float(low), float(high)


def bootstrap_interval(differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (n,), resampling with replacement."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, differences.size, size=(resamples, differences.size))].mean(axis=1)
    return percentile_interval(means, confidence)


def spread_ratio(a: dict[int, float], b: dict[int, float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, low, high)``: sd over seeds of ``b`` / sd of ``a`` (seeds where both reach), with a percentile
    bootstrap interval resampling seeds jointly (a resample whose sd of ``a`` is 0 is skipped)."""
    seeds = [s for s in sorted(set(a) & set(b)) if np.isfinite(a[s]) and np.isfinite(b[s])]
    if len(seeds) < 3:
        raise ValueError(f"spread_ratio needs >= 3 seeds where both reach, got {len(seeds)}")
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    sd_x, sd_y = x[rows].std(axis=1, ddof=1), y[rows].std(axis=1, ddof=1)
    keep = sd_x > 0
    low, high = percentile_interval(sd_y[keep] / sd_x[keep])
    return float(y.std(ddof=1) / x.std(ddof=1)), low, high


def paired_difference(a: dict[int, float], b: dict[int, float], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> PairedDifference:
    """:class:`PairedDifference` of ``a - b`` on the seeds both hold (``{seed: value}``, NaN = not reached)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference: the two cells share no seed")
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    x_cost, y_cost = np.where(np.isfinite(x), x, np.inf), np.where(np.isfinite(y), y, np.inf)
    both = np.isfinite(x) & np.isfinite(y)
    differences = (x - y)[both]
    mean = low = high = None
    if differences.size >= 2:
        mean = float(differences.mean())
        low, high = bootstrap_interval(differences, resamples, seed)
    tied = (x_cost == y_cost)
    return PairedDifference(len(seeds), int(both.sum()), mean, low, high, float(np.mean((x_cost < y_cost) & ~tied)),
                            float(np.mean(tied)), float(np.mean((x_cost > y_cost) & ~tied)))
