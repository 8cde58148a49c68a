"""Fig. 5's statistics against hand-computed numbers and an exhaustive bootstrap; the official reference data."""

import itertools
import math

import numpy as np
import pytest

from paper_figures import official_fig5
from paper_figures.reach_statistics import (
    CSV_COLUMNS,
    bootstrap_interval,
    paired_difference,
    per_seed_rows,
    reach_point,
    read_csv,
    summarise,
    write_csv,
)


def test_summary_median_and_5_95_percentiles_by_hand():
    summary = summarise({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0, 5: math.nan})
    # linear interpolation at 0.05 * 4 = 0.2 and 0.95 * 4 = 3.8 between the sorted values
    assert (summary.seeds, summary.reached, summary.median) == (6, 5, 3.0)
    assert summary.low == pytest.approx(1.2) and summary.high == pytest.approx(4.8)
    assert summarise({0: math.nan}).median is None and summarise({0: math.nan}).reached == 0


def test_paired_difference_fractions_and_mean_by_hand():
    simnpo = {0: 0.01, 1: 0.02, 2: 0.05, 3: math.nan, 4: 0.03, 5: math.nan}
    npo = {0: 0.03, 1: 0.02, 2: 0.04, 3: 0.10, 4: math.nan, 5: math.nan, 6: 0.5}  # seed 6: unpaired, ignored
    d = paired_difference(simnpo, npo)
    # seeds 0..5: lower on 0 and 4 (NPO not reached), tied on 1 and 5 (neither reached), higher on 2 and 3
    assert (d.seeds, d.both_reached) == (6, 3)
    assert (d.a_lower, d.tied, d.a_higher) == pytest.approx((2 / 6, 2 / 6, 2 / 6))
    assert d.mean == pytest.approx((-0.02 + 0.0 + 0.01) / 3)
    assert d.low <= d.mean <= d.high
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_bootstrap_interval_matches_the_exhaustive_bootstrap_distribution():
    """For n = 4 every resample (4^4 ordered draws, equally likely) can be enumerated: the Monte Carlo
    percentiles must sit at the exact distribution's quantiles."""
    differences = np.array([-0.3, -0.1, 0.05, -0.2])
    means = np.sort([np.mean(draw) for draw in itertools.product(differences, repeat=4)])
    low, high = bootstrap_interval(differences, resamples=200_000, seed=1)
    exact_low, exact_high = np.percentile(means, (2.5, 97.5))
    assert low == pytest.approx(exact_low, abs=0.01) and high == pytest.approx(exact_high, abs=0.01)
    assert bootstrap_interval(differences) == bootstrap_interval(differences)  # seeded: same numbers


@pytest.mark.parametrize("values, verdict", [([-0.2, -0.1, -0.15, -0.3], "lower"), ([0.2, 0.1, 0.15], "higher"),
                                             ([-0.2, 0.3, -0.1, 0.25], "not distinguishable")])
def test_verdict_follows_the_interval(values, verdict):
    a = {seed: value for seed, value in enumerate(values)}
    assert paired_difference(a, {seed: 0.0 for seed in a}).verdict == verdict


def test_verdict_without_an_interval_needs_every_seed():
    """Fewer than two seeds where both reach: no interval; a verdict only when every seed orders the pair."""
    reaches, never = {0: 0.1, 1: 0.2, 2: 0.3}, {0: math.nan, 1: math.nan, 2: math.nan}
    assert paired_difference(reaches, never).verdict == "lower"
    assert paired_difference(never, reaches).verdict == "higher"
    assert paired_difference({0: 0.1, 1: math.nan}, {0: math.nan, 1: 0.1}).verdict == "not distinguishable"


def test_spread_ratio_by_hand_and_its_interval():
    from paper_figures.reach_statistics import spread_ratio

    narrow = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    wide = {seed: 10 * value for seed, value in narrow.items()}  # exactly 10x the spread on every resample
    ratio, low, high = spread_ratio(narrow, wide)
    assert ratio == pytest.approx(10.0) and low == pytest.approx(10.0) and high == pytest.approx(10.0)
    with pytest.raises(ValueError, match=">= 3 seeds"):
        spread_ratio({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})


def test_reach_point_interpolates_the_first_crossing():
    from markovsim.trajectory import Trajectory

    forget = np.array([[0.1], [0.3], [0.5], [0.2]])  # (E, 1); level 0.4 crossed between steps 1 and 2
    retain = np.array([[0.02], [0.04], [0.08], [0.09]])
    kl = np.concatenate([retain, forget, forget + 1.0], axis=1)  # (E, C); forget2 above the level from the start
    trajectory = Trajectory(np.arange(4) * 2, ("retain", "forget1", "forget2"), {"kl_true": kl}, {})
    retain_kl, step = reach_point(trajectory, "forget1", 0.4)
    assert retain_kl == pytest.approx(0.06) and step == pytest.approx(3.0)  # halfway, steps are 0, 2, 4, 6
    assert all(math.isnan(v) for v in reach_point(trajectory, "forget1", 0.6))
    rows = per_seed_rows("a", "tabular", [(7, {"GA": trajectory, "NPO": trajectory}, {"forget1": 0.4,
                                                                                      "forget2": 0.4})])
    assert len(rows) == 4 and rows[0]["seed"] == 7 and rows[0]["retain_kl_at_reach"] == pytest.approx(0.06)
    assert (rows[1]["component"], rows[1]["retain_kl_at_reach"], rows[1]["step_at_reach"]) == ("forget2", 0.02, 0.0)


def test_csv_round_trip_keeps_every_digit_and_writes_empty_cells_for_not_reached(tmp_path):
    rows = [{"case": "a", "source": "tabular", "method": "NPO", "component": "forget1", "seed": 3,
             "retain_kl_at_reach": 0.1234567890123456789, "step_at_reach": 12.5},
            {"case": "b", "source": "mixture", "method": "GA", "component": "forget2", "seed": 0,
             "retain_kl_at_reach": math.nan, "step_at_reach": math.nan}]
    path = str(tmp_path / "reach.csv")
    write_csv(path, rows)
    lines = open(path).read().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS) and lines[2] == "b,mixture,GA,forget2,0,,"
    back = read_csv(path)
    assert back[0]["retain_kl_at_reach"] == rows[0]["retain_kl_at_reach"] and back[0]["seed"] == 3
    assert math.isnan(back[1]["retain_kl_at_reach"])
    (tmp_path / "bad.csv").write_text("case,source\na,b\n")
    with pytest.raises(ValueError, match="columns"):
        read_csv(str(tmp_path / "bad.csv"))
    (tmp_path / "bad_value.csv").write_text(",".join(CSV_COLUMNS) + "\na,tabular,NPO,forget1,x,0.1,1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_csv(str(tmp_path / "bad_value.csv"))


def test_official_reference_data_holds_the_published_reading():
    """The numbers read from the official figures (their provenance is in the file)."""
    document = official_fig5.load()
    assert document["provenance"]["repository"] == "OPTML-Group/Unlearn-Simple" and document["provenance"]["seed"] == 42
    published = {("a", "NPO", "forget1"): 0.031, ("a", "NPO", "forget2"): 0.19, ("a", "SimNPO", "forget1"): 0.075,
                 ("a", "SimNPO", "forget2"): 0.030, ("b", "NPO", "forget1"): 0.125, ("b", "SimNPO", "forget1"): 0.084}
    for key, value in published.items():
        assert official_fig5.reach(*key) == value
    assert official_fig5.reach("b", "NPO", "forget2") == official_fig5.start_point("b")["retain"]  # reached at start
    assert official_fig5.rerun_range("a", "NPO", "forget2") == (0.04, 0.22)
    assert official_fig5.rerun_range("b", "NPO", "forget1") is None
    assert official_fig5.reach("a", "GA", "forget1") is None
    assert official_fig5.start_point("a")["retrained_forget2"] == 0.437


def test_the_figure_marks_the_official_values_where_they_are():
    """The official diamonds in a trade-off panel and in the per-seed panel sit at the reference data's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paper_figures.markov_tradeoff import _draw_official, _draw_reach_points

    figure, (paths, points) = plt.subplots(1, 2)
    _draw_official(paths, "a", ["GA", "NPO", "SimNPO"])
    diamonds = {(line.get_xdata()[0], line.get_ydata()[0]) for line in paths.lines if line.get_marker() == "D"}
    start = official_fig5.start_point("a")
    assert diamonds == {(official_fig5.reach("a", m, c), start[f"retrained_{c}"])
                        for m in ("NPO", "SimNPO") for c in ("forget1", "forget2")}
    rows = [{"case": "a", "source": "paper-synthetic", "method": m, "component": "forget2", "seed": s,
             "retain_kl_at_reach": 0.05 + 0.01 * s, "step_at_reach": 1.0} for m in ("NPO", "SimNPO") for s in range(3)]
    _draw_reach_points(points, rows, "a", "forget2", ["paper-synthetic"], ["NPO", "SimNPO"])
    marked = sorted(line.get_ydata()[0] for line in points.lines if line.get_marker() == "D")
    assert marked == sorted([official_fig5.reach("a", "NPO", "forget2"), official_fig5.reach("a", "SimNPO", "forget2")])
    plt.close(figure)
