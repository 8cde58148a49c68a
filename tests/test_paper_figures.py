"""Every registered figure runs at tiny scale, writes non-empty PNG + PDF, and the manifest lists exactly them."""

import json
import os

import numpy as np
import pytest

from paper_figures import FIGURES
from paper_figures.__main__ import main


@pytest.fixture(scope="module")
def tiny_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("figures")
    assert main(["--scale", "tiny", "--device", "cpu", "--output", str(output)]) == 0
    return output


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_files_exist_and_are_not_empty(tiny_output, name):
    for extension in ("png", "pdf"):
        path = tiny_output / f"{name}.{extension}"
        assert path.stat().st_size > 1000, f"{path} is empty or tiny"


def test_manifest_lists_exactly_the_figures(tiny_output):
    manifest = json.loads((tiny_output / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["figures"]] == list(FIGURES)
    produced = sorted(p for p in os.listdir(tiny_output) if p.endswith((".png", ".pdf")))
    listed = sorted(f for entry in manifest["figures"] for f in entry["files"])
    assert produced == sorted(f for f in listed if f.endswith((".png", ".pdf")))
    assert manifest["package_version"] and all(entry["config"] for entry in manifest["figures"])


TIMING_KEYS = {"created", "wall_seconds", "runtime_s"}


def without_timings(document):
    """The document without wall-clock fields, which legitimately differ between runs."""
    if isinstance(document, dict):
        return {k: without_timings(v) for k, v in document.items() if k not in TIMING_KEYS}
    if isinstance(document, list):
        return [without_timings(v) for v in document]
    return document


def test_recompute_with_same_seed_gives_identical_cache(tiny_output, tmp_path):
    assert main(["--scale", "tiny", "--device", "cpu", "--output", str(tmp_path), "--recompute"]) == 0
    caches = sorted(p.name for p in (tiny_output / "cache").iterdir() if p.is_file())  # models/ holds checkpoints
    assert caches == sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_file())
    for name in caches:
        first, second = tiny_output / "cache" / name, tmp_path / "cache" / name
        if name.endswith(".json"):
            documents = [without_timings(json.loads(path.read_text())) for path in (first, second)]
            assert documents[0] == documents[1], name
        else:
            with np.load(first) as a, np.load(second) as b:
                assert sorted(a.files) == sorted(b.files), name
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


def test_cache_is_reused_unless_recompute(tmp_path):
    name = next(iter(FIGURES))
    arguments = ["--scale", "tiny", "--device", "cpu", "--output", str(tmp_path), "--only", name]
    main(arguments)
    main(arguments)
    assert json.loads((tmp_path / "manifest.json").read_text())["figures"][0]["reused_cache"] is True
    main(arguments + ["--recompute"])
    assert json.loads((tmp_path / "manifest.json").read_text())["figures"][0]["reused_cache"] is False


def test_unknown_figure_is_rejected():
    with pytest.raises(SystemExit):
        main(["--only", "no_such_figure"])


def _first_reach(retain, forget, level):
    """Independent reference: walk the evaluations until forget >= level; interpolate retain there."""
    for e in range(len(forget)):
        if forget[e] >= level:
            if e == 0:
                return retain[0], 0.0
            fraction = (level - forget[e - 1]) / (forget[e] - forget[e - 1])
            return retain[e - 1] + fraction * (retain[e] - retain[e - 1]), e - 1 + fraction
    return None, None


def _check_table_against_cache(stem: str, table_path) -> int:
    """Recompute every reach row of a markov_tradeoff cache from its trajectories; compare with the cached
    table and the written markdown. Returns the number of rows checked."""
    from paper_figures.markov_tradeoff import table_markdown
    from paper_figures.runs import by_source, load_runs

    runs, retrained, document = load_runs(stem)
    table = {(r["case"], r["source"], r["method"], r["component"]): r for r in document["table"]}
    grouped = by_source(runs, retrained)
    assert len(table) == sum(2 * len(per_seed[0][1]) for per_seed in grouped.values())
    for key, per_seed in grouped.items():
        case, source = key.split(":")
        for method in per_seed[0][1]:
            for component in ("forget1", "forget2"):
                reached = [_first_reach(t[method].metric("kl_true", "retain"), t[method].metric("kl_true", component),
                                        levels[component]) for _, t, levels in per_seed]
                reached = [r for r in reached if r[0] is not None]
                row = table[(case, source, method, component)]
                assert row["reached"] == len(reached) and row["seeds"] == len(per_seed)
                if reached:
                    assert row["retain_kl_mean"] == pytest.approx(np.mean([r[0] for r in reached]), rel=1e-12)
                    assert row["step_mean"] == pytest.approx(np.mean([r[1] for r in reached]), rel=1e-12, abs=1e-12)
                else:
                    assert row["retain_kl_mean"] is None
    assert open(table_path).read() == table_markdown(document["table"])
    return len(table)


def test_tradeoff_table_holds_the_numbers_the_figure_plots(tiny_output):
    _check_table_against_cache(str(tiny_output / "cache" / "markov_tradeoff_tiny"),
                               tiny_output / "markov_tradeoff_table.md")


def test_committed_paper_scale_table_holds_the_numbers_of_its_committed_cache():
    """docs/figures/markov_tradeoff_table.md (the README's Fig. 5 table) against the paper-scale cache it came from."""
    docs = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "figures")
    rows = _check_table_against_cache(os.path.join(docs, "cache", "markov_tradeoff_paper"),
                                      os.path.join(docs, "markov_tradeoff_table.md"))
    assert rows == 2 * 4 * 3 * 2  # cases x sources x methods x forget components


def test_tradeoff_plot_draws_exactly_the_cached_trajectories(tiny_output, tmp_path, monkeypatch):
    from paper_figures import markov_tradeoff
    from paper_figures.runs import load_runs

    stem = str(tiny_output / "cache" / "markov_tradeoff_tiny")
    runs, _, _ = load_runs(stem)
    drawn = []
    original = markov_tradeoff.seed_band_axes
    monkeypatch.setattr(markov_tradeoff, "seed_band_axes",
                        lambda axis, xs, ys, *a, **k: drawn.append((xs, ys)) or original(axis, xs, ys, *a, **k))
    markov_tradeoff.plot(stem, str(tmp_path / "again"))
    expected = []
    for key, trajectories in runs.items():
        for method, trajectory in trajectories.items():
            for component in ("forget1", "forget2"):
                expected.append((key.split("/seed")[0], method, component))
    assert len(drawn) == 2 * len({e for e in expected})  # zoomed and whole panel, per seed group
    pool = {}
    for key, trajectories in runs.items():
        for method, trajectory in trajectories.items():
            for component in ("forget1", "forget2"):
                pool.setdefault((key.split("/seed")[0], method, component), []).append(
                    (trajectory.metric("kl_true", "retain"), trajectory.metric("kl_true", component)))
    remaining = [pair for pairs in pool.values() for pair in [pairs, pairs]]
    for xs, ys in drawn:
        match = next(i for i, pairs in enumerate(remaining)
                     if len(pairs) == len(xs) and all(np.array_equal(a, x) and np.array_equal(b, y)
                                                      for (a, b), x, y in zip(pairs, xs, ys)))
        remaining.pop(match)
    assert not remaining
