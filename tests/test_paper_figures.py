"""Every registered figure runs at tiny scale, writes non-empty PNG + PDF, and the manifest lists exactly them."""

import dataclasses
import json
import os

import numpy as np
import pytest

from paper_figures import FIGURES
from paper_figures.__main__ import main
from paper_figures.cache import load_cache


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


def _check_reach_files_against_cache(stem: str, table_path, csv_path) -> list[dict]:
    """Recompute every per-seed reach value of a markov_tradeoff cache from its trajectories with an independent
    walk (:func:`_first_reach`); compare with the written CSV (every case x source x method x component x seed
    once), and the table file with the table the CSV's rows give. Returns the CSV's rows."""
    from paper_figures.fig5_tables import table_markdown
    from paper_figures.markov_tradeoff import mean_levels
    from paper_figures.official_fig5 import CASE_LETTERS
    from paper_figures.reach_statistics import read_csv
    from paper_figures.runs import load_runs

    runs, retrained, document = load_runs(stem)
    rows = read_csv(str(csv_path))
    written = {(r["case"], r["source"], r["method"], r["component"], r["seed"]): r for r in rows}
    assert len(written) == len(rows) == 2 * sum(len(trajectories) for trajectories in runs.values())
    for key, trajectories in runs.items():
        case, rest = key.split(":")
        source, seed = rest.split("/seed")
        for method, trajectory in trajectories.items():
            for component in ("forget1", "forget2"):
                retain_kl, step = _first_reach(trajectory.metric("kl_true", "retain"),
                                               trajectory.metric("kl_true", component), retrained[key][component])
                row = written[(CASE_LETTERS[case], source, method, component, int(seed))]
                if retain_kl is None:
                    assert np.isnan(row["retain_kl_at_reach"]) and np.isnan(row["step_at_reach"])
                else:
                    assert row["retain_kl_at_reach"] == pytest.approx(retain_kl, rel=1e-12, abs=1e-15)
                    assert row["step_at_reach"] == pytest.approx(step, rel=1e-12, abs=1e-12)
    assert open(table_path).read() == table_markdown(rows, document["config"], mean_levels(runs, retrained))
    return rows


def test_tradeoff_table_and_csv_hold_the_numbers_the_figure_plots(tiny_output):
    rows = _check_reach_files_against_cache(str(tiny_output / "cache" / "markov_tradeoff_tiny"),
                                            tiny_output / "markov_tradeoff_table.md", tiny_output / "fig5_reach.csv")
    from paper_figures.markov_tradeoff import CONFIGS

    config = CONFIGS["tiny"]
    for source in ("tabular", "mixture", "tiny-synthetic", "tiny-gpt2"):  # each source its own seed count
        assert {r["seed"] for r in rows if r["source"] == source} == set(config.seeds_of(source))


def test_committed_fig5_table_and_csv_hold_the_numbers_of_their_committed_cache():
    """docs/figures/markov_tradeoff_table.md and fig5_reach.csv (the Fig. 5 numbers of docs/results.md) against the
    paper-scale cache they came from."""
    docs = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "figures")
    rows = _check_reach_files_against_cache(os.path.join(docs, "cache", "markov_tradeoff_paper"),
                                            os.path.join(docs, "markov_tradeoff_table.md"),
                                            os.path.join(docs, "fig5_reach.csv"))
    seeds = {source: len({r["seed"] for r in rows if r["source"] == source}) for source in
             ("tabular", "mixture", "paper-synthetic", "gpt2-4x128")}
    assert len(rows) == 2 * 3 * 2 * sum(seeds.values())  # cases x methods x forget components x seeds
    assert min(seeds.values()) >= 5


def test_paper_scale_runs_enough_paired_seeds():
    """The paper scale's seed counts: >= 20 for the paper's transformer, >= 10 for every other source."""
    from paper_figures.markov_tradeoff import CONFIGS

    config = CONFIGS["paper"]
    assert config.scale == 1.0 and len(config.seeds_of("paper-synthetic")) >= 20
    for source in (*config.simulator_sources, *(t.preset for t in config.transformers)):
        assert len(config.seeds_of(source)) >= 10, source
    seeds = [set(config.seeds_of(s)) for s in ("tabular", "mixture", "gpt2-4x128")]
    assert all(s <= set(config.seeds_of("paper-synthetic")) for s in seeds)  # paired: shared seeds, same data


def record_seed_bands(module, monkeypatch, function: str = "seed_band_axes") -> list:
    """Every ``(xs, ys)`` a figure module passes to ``function`` (a seed-band drawer) from now on (still drawn)."""
    drawn = []
    original = getattr(module, function)
    monkeypatch.setattr(module, function,
                        lambda axis, xs, ys, *a, **k: drawn.append((xs, ys)) or original(axis, xs, ys, *a, **k))
    return drawn


def seed_groups(runs: dict) -> dict:
    """``{(source key, method, forget component): [(retain KL, component KL) per seed]}`` of cached runs."""
    pool = {}
    for key, trajectories in runs.items():
        for method, trajectory in trajectories.items():
            for component in ("forget1", "forget2"):
                pool.setdefault((key.split("/seed")[0], method, component), []).append(
                    (trajectory.metric("kl_true", "retain"), trajectory.metric("kl_true", component)))
    return pool


def assert_drawn_once_each(drawn: list, expected: list) -> None:
    """Every drawn ``(xs, ys)`` band is one expected seed group (bit-equal), and every group is drawn."""
    remaining = list(expected)
    for xs, ys in drawn:
        match = next(i for i, pairs in enumerate(remaining)
                     if len(pairs) == len(xs) and all(np.array_equal(a, x) and np.array_equal(b, y)
                                                      for (a, b), x, y in zip(pairs, xs, ys)))
        remaining.pop(match)
    assert not remaining


def test_tradeoff_plot_draws_exactly_the_cached_trajectories(tiny_output, tmp_path, monkeypatch):
    from paper_figures import markov_tradeoff
    from paper_figures.runs import load_runs

    stem = str(tiny_output / "cache" / "markov_tradeoff_tiny")
    runs, _, _ = load_runs(stem)
    drawn = record_seed_bands(markov_tradeoff, monkeypatch, "seed_lines_axes")
    markov_tradeoff.plot(stem, str(tmp_path / "again"))
    expected = []
    for key, trajectories in runs.items():
        for method, trajectory in trajectories.items():
            for component in ("forget1", "forget2"):
                expected.append((key.split("/seed")[0], method, component))
    assert len(drawn) == 2 * len({e for e in expected})  # zoomed and whole panel, per seed group
    assert_drawn_once_each(drawn, [pairs for pairs in seed_groups(runs).values() for pairs in [pairs, pairs]])


# ----- tofu_bias and relearning: the simulator halves in every run, the TOFU halves from a TOFU run folder -----

def _drawn_figure(module, stem, tmp_path, monkeypatch):
    """Plot ``stem`` again and return the figure before it is closed."""
    captured = []
    original = module.save_figure
    monkeypatch.setattr(module, "save_figure", lambda figure, out: captured.append(figure) or original(figure, out))
    module.plot(stem, str(tmp_path / "again"))
    return captured[0]


def _lines_by_gid(figure) -> dict:
    return {line.get_gid(): line for axis in figure.axes for line in axis.lines if line.get_gid()}


def _check_lines_equal_cache(lines: dict, arrays: dict) -> None:
    for gid, line in lines.items():
        key, _, column = gid.partition("#")
        expected = arrays[key] if not column else arrays[key][:, int(column)]
        np.testing.assert_array_equal(line.get_ydata(), expected, err_msg=gid)
        np.testing.assert_array_equal(line.get_xdata(), arrays[key.rsplit("/", 1)[0] + "/steps"], err_msg=gid)


@pytest.mark.parametrize("name, per_method", [("tofu_bias", 2 * 2 * 2 * 2), ("relearning", 2 * 2 * 4 * 2)])
def test_simulator_halves_draw_exactly_the_cached_numbers(tiny_output, tmp_path, monkeypatch, name, per_method):
    module = FIGURES[name]
    document, arrays = load_cache(str(tiny_output / "cache" / f"{name}_tiny"))
    assert document["config"]["tofu_run"] is None and not any(k.startswith("tofu/") for k in arrays)
    lines = _lines_by_gid(_drawn_figure(module, str(tiny_output / "cache" / f"{name}_tiny"), tmp_path, monkeypatch))
    assert len(lines) == per_method  # every cached simulator series drawn once (cases x panels x methods x components)
    _check_lines_equal_cache(lines, arrays)


def test_tofu_bias_simulator_half_is_the_seed_mean_of_the_tradeoff_runs(tiny_output):
    from paper_figures import markov_tradeoff
    from paper_figures.runs import load_runs

    _, arrays = load_cache(str(tiny_output / "cache" / "tofu_bias_tiny"))
    runs, _, _ = load_runs(str(tiny_output / "cache" / "markov_tradeoff_tiny"))
    seeds = markov_tradeoff.CONFIGS["tiny"].seeds_of("tabular")
    assert len(seeds) == 3  # the tabular source's own seed count, not the default seeds
    for case in ("paper_short_forget2", "paper_unseen_forget2"):
        for method in ("NPO", "SimNPO"):
            per_seed = [runs[f"{case}:tabular/seed{s}"][method] for s in seeds]
            expected = np.mean([t.metric("power_share", "forget2") for t in per_seed], axis=0)
            np.testing.assert_allclose(arrays[f"sim/{case}/{method}/power_share"][:, 1], expected, rtol=1e-12)


@pytest.fixture(scope="module")
def tofu_run(tmp_path_factory):
    """A tiny TOFU run folder: bias/results.json from a real llm.tofu.bias measurement on a random 2-layer Llama,
    and a results.json with a 'relearning' entry in the protocol's schema."""
    from test_tofu_fixtures import tiny_llama, tiny_tokenizer

    from llm.tofu import bias
    from markovsim.results import atomic_write_json

    run = tmp_path_factory.mktemp("tofu_run")
    tokenizer = tiny_tokenizer(chat=True)
    for folder, seed in (("target", 0), ("retain", 1)):
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(run / "models" / folder)
        tokenizer.save_pretrained(run / "models" / folder)
    config = bias.BiasConfig(split="forget01", steps=2, record_every=1, batch_size=4, limit_forget=6, max_items=2,
                             device="cpu", progress=False, learning_rate=1e-3, num_threads=1)
    bias.measure_bias(run / "models" / "target", run / "models" / "retain", config, run / "bias")
    from llm.tofu.relearn import RELEARN_METRICS, relearning_intervals

    rng = np.random.default_rng(0)
    curves = {}
    for model in ("target", "retain", "NPO", "SimNPO"):
        per_pair = {m: rng.uniform(size=(3, 16)) + [[0.0], [0.1], [0.2]] for m in RELEARN_METRICS[:3]}
        curves[model] = {"steps": [0, 5, 10]} | {m: v.mean(1).tolist() for m, v in per_pair.items()} | {
            "forget_quality": [0.1, 0.2, 0.3], "per_pair": {m: v.tolist() for m, v in per_pair.items()}}
    atomic_write_json(run / "results.json", {"relearning": relearning_intervals(curves, num_resamples=200)})
    return run


def test_tofu_halves_draw_the_tofu_run_numbers(tofu_run, tmp_path, monkeypatch):
    from markovsim.results import read_json

    output = tmp_path / "figures"
    assert main(["--scale", "tiny", "--device", "cpu", "--output", str(output), "--only", "tofu_bias", "relearning",
                 "--tofu-run", str(tofu_run)]) == 0
    bias_document = read_json(tofu_run / "bias" / "results.json")
    lines = _lines_by_gid(_drawn_figure(FIGURES["tofu_bias"], str(output / "cache" / "tofu_bias_tiny"), tmp_path,
                                        monkeypatch))
    for grouping in ("length", "memorisation"):
        for method in ("NPO", "SimNPO"):
            record = bias_document["methods"][method]
            for metric in ("mean_weight", "power_share"):
                values = np.array(record["diagnostics"][grouping][metric])  # (records, groups)
                for group in range(3):
                    line = lines[f"tofu/{grouping}/{method}/{metric}#{group}"]
                    np.testing.assert_array_equal(line.get_ydata(), values[:, group])
                    np.testing.assert_array_equal(line.get_xdata(), record["steps"])
    figure = _drawn_figure(FIGURES["tofu_bias"], str(output / "cache" / "tofu_bias_tiny"), tmp_path, monkeypatch)
    collections = {c.get_gid(): c for axis in figure.axes for c in axis.collections if c.get_gid()}
    for grouping in ("length", "memorisation"):
        for method in ("NPO", "SimNPO"):
            for metric in ("mean_weight", "power_share"):  # each group's 95% bootstrap band, as the run wrote it
                intervals = np.array(bias_document["methods"][method]["diagnostics"][grouping][f"{metric}_interval"])
                for group in range(3):
                    band = collections[f"tofu/{grouping}/{method}/{metric}_interval#{group}"]
                    heights = band.get_paths()[0].vertices[:, 1]
                    assert heights.min() == pytest.approx(intervals[:, group, 0].min())
                    assert heights.max() == pytest.approx(intervals[:, group, 1].max())
        for model, after in bias_document["after"].items():
            segments = collections[f"tofu/{grouping}/after/{model}/probability_interval"].get_segments()
            np.testing.assert_allclose([seg[:, 1] for seg in segments], after[grouping]["probability_interval"])
    bars = {patch.get_gid(): patch.get_height() for axis in figure.axes for patch in axis.patches if patch.get_gid()}
    expected = {f"tofu/{grouping}/after/{model}/probability#{group}": value
                for model, after in bias_document["after"].items() for grouping in ("length", "memorisation")
                for group, value in enumerate(after[grouping]["probability"])}
    assert bars == pytest.approx(expected, rel=1e-12) and len(expected) == 2 * 4 * 3  # target, retain, NPO, SimNPO
    relearning = read_json(tofu_run / "results.json")["relearning"]
    figure = _drawn_figure(FIGURES["relearning"], str(output / "cache" / "relearning_tiny"), tmp_path, monkeypatch)
    lines = _lines_by_gid(figure)
    bands = {c.get_gid(): c for axis in figure.axes for c in axis.collections if c.get_gid()}
    assert len(bands) == 4 * 2  # every model (the two controls, two methods) and metric has its band
    for model, record in relearning.items():  # the controls "target", "retain" beside each method
        for metric in ("forget_probability", "forget_truth_ratio"):
            line = lines[f"tofu/{model}/recovery/{metric}"]
            np.testing.assert_array_equal(line.get_ydata(), record["recovery"][metric])
            np.testing.assert_array_equal(line.get_xdata(), record["steps"])
            low, high = np.array(record["recovery_interval"][metric]).T
            band = bands[f"tofu/{model}/recovery_interval/{metric}"].get_paths()[0].vertices
            assert band[:, 1].min() == pytest.approx(low.min()) and band[:, 1].max() == pytest.approx(high.max())
    assert lines["tofu/retain/recovery/forget_probability"].get_linestyle() == "--"


def _protocol_results(path, with_intervals=True):
    """A protocol results.json of three models: every panel value and interval distinct (None for one interval)."""
    from markovsim.results import atomic_write_json
    from paper_figures.tofu_protocol import PANELS

    models = {}
    for m, (name, method) in enumerate((("target", None), ("retain", None), ("npo-rt", "NPO+RT"))):
        row = {"method": method, "forget_quality": 0.01 * (m + 1)}
        intervals = {}
        for k, key in enumerate(PANELS):
            row[key] = 0.1 * m + 0.01 * k
            intervals[key] = [row[key] - 0.05, row[key] + 0.07]
        intervals["mia_auc/loss"] = None if name == "retain" else intervals["mia_auc/loss"]
        models[name] = row | ({"intervals": intervals} if with_intervals else {})
    config = {"split": "forget01", "limit": 20, "model": "smollm2"}
    atomic_write_json(path / "results.json", {"config": config, "models": models})
    return models


def test_tofu_protocol_draws_each_models_numbers_and_intervals(tmp_path, monkeypatch):
    from paper_figures.tofu_protocol import PANELS

    run = tmp_path / "run"
    run.mkdir()
    models = _protocol_results(run)
    output = tmp_path / "figures"
    assert main(["--scale", "tiny", "--device", "cpu", "--output", str(output), "--only", "tofu_protocol",
                 "--tofu-run", str(run)]) == 0
    figure = _drawn_figure(FIGURES["tofu_protocol"], str(output / "cache" / "tofu_protocol_tiny"), tmp_path,
                           monkeypatch)
    points = _lines_by_gid(figure)
    bars = {c.get_gid(): c for axis in figure.axes for c in axis.collections if c.get_gid()}
    assert len(points) == 3 * len(PANELS) and len(bars) == 3 * len(PANELS) - 1  # the retain AUC has no interval
    for name, row in models.items():
        for position, key in enumerate(PANELS):
            assert points[f"{name}/{key}"].get_ydata()[0] == row[key]
            if row["intervals"][key] is not None:
                segment = bars[f"{name}/{key}/interval"].get_segments()[0]
                np.testing.assert_array_equal(segment[:, 1], row["intervals"][key])
    labels = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert labels == ["target\nFQ 0.01", "retain\nFQ 0.02", "NPO+RT\nFQ 0.03"]


def test_tofu_protocol_without_a_run_reads_the_committed_cpu_run_and_refuses_old_runs(tmp_path):
    from paper_figures import tofu_protocol

    assert tofu_protocol.results_path(tofu_protocol.Config()) == os.path.join(tofu_protocol.COMMITTED_RUN,
                                                                              "results.json")
    assert os.path.isfile(tofu_protocol.results_path(tofu_protocol.Config()))
    _protocol_results(tmp_path, with_intervals=False)
    with pytest.raises(SystemExit, match="no intervals.*stage report"):
        main(["--scale", "tiny", "--device", "cpu", "--output", str(tmp_path / "out"), "--only", "tofu_protocol",
              "--tofu-run", str(tmp_path)])


def test_relearning_reads_a_run_from_before_the_controls_and_intervals():
    """An older results.json (methods only, levels only): recovery from the levels, NaN bands (none drawn)."""
    from paper_figures.relearning import tofu_arrays

    old = {"relearning": {"NPO": {"steps": [0, 10], "forget_probability": [0.48, 0.52],
                                  "forget_truth_ratio": [0.6, 0.61]}}}
    arrays = tofu_arrays(old, "results.json")
    np.testing.assert_allclose(arrays["tofu/NPO/recovery/forget_probability"], [0.0, 0.04])
    assert np.isnan(arrays["tofu/NPO/recovery_interval/forget_truth_ratio"]).all()


def test_tofu_run_without_results_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    arguments = ["--scale", "tiny", "--device", "cpu", "--output", str(tmp_path / "out"), "--tofu-run", str(empty)]
    with pytest.raises(SystemExit, match="llm.tofu.bias --run"):
        main(arguments + ["--only", "tofu_bias"])
    with pytest.raises(SystemExit, match="results.json not found"):
        main(arguments + ["--only", "relearning"])
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--only", "relearning", "--tofu-run", str(tmp_path / "missing")])


def test_cache_check_matches_a_tuple_valued_config_read_back_from_json(tmp_path):
    """A config holding tuples is written as lists; the reuse check must still see it as the same config."""
    import dataclasses

    from markovsim.results import atomic_write_json, metadata_block
    from paper_figures.__main__ import _same_config

    @dataclasses.dataclass(frozen=True)
    class Config:
        seeds: tuple = (0, 1)
        sources: tuple = ("tabular", "mixture")

    stem = str(tmp_path / "cache")
    atomic_write_json(stem + ".json", metadata_block(Config()))
    assert _same_config(stem, Config())
    assert not _same_config(stem, Config(seeds=(0, 2)))


# ----- other_methods: the registry methods beside GA / NPO / SimNPO -----

def _other_methods_stem(tiny_output) -> str:
    return str(tiny_output / "cache" / "other_methods_tiny")


def test_other_methods_draws_exactly_the_cached_trajectories(tiny_output, tmp_path, monkeypatch):
    from paper_figures import other_methods
    from paper_figures.runs import load_runs

    stem = _other_methods_stem(tiny_output)
    runs, _, _ = load_runs(stem)
    drawn = record_seed_bands(other_methods, monkeypatch)
    other_methods.plot(stem, str(tmp_path / "again"))
    groups = list(seed_groups(runs).values())
    assert len(drawn) == len(groups)
    assert_drawn_once_each(drawn, groups)
    methods = {method for trajectories in runs.values() for method in trajectories}
    assert methods == {"GA", "NPO", "SimNPO"} | set(other_methods.REGISTRY)


def test_other_methods_bias_table_bars_and_summary_hold_the_cached_power_shares(tiny_output, tmp_path, monkeypatch):
    """Every bar (first step) and diamond (run mean) against an independent recomputation from the cached
    power shares; the NPO / SimNPO verdicts and the title's summary from those numbers."""
    from paper_figures import other_methods
    from paper_figures.runs import by_source, load_runs

    stem = _other_methods_stem(tiny_output)
    runs, retrained, document = load_runs(stem)
    expected = {}
    for key, per_seed in by_source(runs, retrained).items():
        case, source = key.split(":")
        for method in {m for _, trajectories, _ in per_seed for m in trajectories}:
            first, mean = [], []
            for _, trajectories, _ in (entry for entry in per_seed if method in entry[1]):
                f1 = trajectories[method].metric("power_share", "forget1")
                f2 = trajectories[method].metric("power_share", "forget2")
                fractions = [b / (a + b) for a, b in zip(f1, f2) if a + b > 0]
                if fractions:
                    first.append(f2[0] / (f1[0] + f2[0]))
                    mean.append(sum(fractions) / len(fractions))
            expected[(case, source, method)] = (np.mean(first) if first else None, np.mean(mean) if mean else None)
    rows = {(r["case"], r["source"], r["method"]): r for r in document["bias"]}
    assert set(rows) == set(expected)
    for key, (first, mean) in expected.items():
        row = rows[key]
        if first is None:
            assert key[2] == "TaskNegation" and row["first_step_forget2_fraction"] is None
            continue
        assert row["first_step_forget2_fraction"] == pytest.approx(first, rel=1e-12)
        assert row["run_mean_forget2_fraction"] == pytest.approx(mean, rel=1e-12)
        npo, ga, simnpo = (rows[key[:2] + (m,)]["first_step_forget2_fraction"] for m in ("NPO", "GA", "SimNPO"))
        distances = {"NPO": abs(first - npo), "GA": abs(first - ga), "SimNPO": abs(first - simnpo)}
        nearest = [m for m in ("NPO", "GA", "SimNPO") if distances[m] <= min(distances.values()) + 1e-6][0]
        assert row["first_step_closer_to"] == nearest
    figure = _drawn_figure(other_methods, stem, tmp_path, monkeypatch)
    bars = {p.get_gid(): p.get_height() for axis in figure.axes for p in axis.patches if p.get_gid()}
    diamonds = {line.get_gid(): line.get_ydata()[0] for axis in figure.axes for line in axis.lines if line.get_gid()}
    drawn = [k for k, (first, _) in expected.items() if first is not None]
    assert set(bars) == {f"{c}/{s}/{m}/first_step" for c, s, m in drawn}
    assert set(diamonds) == {f"{c}/{s}/{m}/run_mean" for c, s, m in drawn}
    for case, source, method in drawn:
        row = rows[(case, source, method)]
        assert bars[f"{case}/{source}/{method}/first_step"] == row["first_step_forget2_fraction"]
        assert diamonds[f"{case}/{source}/{method}/run_mean"] == row["run_mean_forget2_fraction"]
    summary = document["summary"].split("\n")
    for line, (case, label) in zip(summary[1:], other_methods.CASES.items()):
        assert line.startswith(label.split(" ")[0] + " ")
        listed = dict(part.split(": ") for part in line[len(label.split(" ")[0]) + 1:].split("; "))
        registry = {m for c, _, m in expected if c == case and m in other_methods.REGISTRY and m != "TaskNegation"}
        for method in registry:
            found = {rows[(c, s, m)]["first_step_closer_to"] for c, s, m in expected if c == case and m == method}
            group = f"like {found.pop()}" if len(found) == 1 else "mixed"
            assert method in listed[group].split(", "), (case, method, listed)
        assert sum(len(names.split(", ")) for names in listed.values()) == len(registry)
    assert (tiny_output / "other_methods_table.md").read_text() == other_methods.bias_markdown(document["bias"])


def test_other_methods_runs_are_the_registry_drivers_and_the_tradeoff_runs(tiny_output):
    """The cached registry runs equal run_method on the same seeded setup; GA / NPO / SimNPO equal markov_tradeoff's;
    TaskNegation's path starts at the reference (lambda = 0)."""
    import dataclasses

    from markovsim.methods import run_method
    from markovsim.scenarios import SCENARIOS, prepare
    from paper_figures import other_methods
    from paper_figures.runs import load_runs

    config = other_methods.CONFIGS["tiny"]
    runs, _, _ = load_runs(_other_methods_stem(tiny_output))
    tradeoff, _, _ = load_runs(str(tiny_output / "cache" / "markov_tradeoff_tiny"))
    case, seed = "paper_unseen_forget2", config.seeds[-1]
    scenario = SCENARIOS[case].scaled(config.scale)
    scenario = dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, seed=seed))
    setup = prepare(scenario, "tabular")
    direct = run_method("SeUL", setup, dataclasses.replace(scenario.dynamics, steps=config.simulator_steps))
    cached = runs[f"{case}:tabular/seed{seed}"]["SeUL"]
    for metric in ("kl_true", "power_share"):
        np.testing.assert_allclose(cached.component_metrics[metric], direct.component_metrics[metric], rtol=1e-12)
    path = runs[f"{case}:tabular/seed{seed}"]["TaskNegation"]
    assert path.steps[0] == 0.0 and len(path.steps) == config.task_negation_points
    np.testing.assert_allclose(path.component_metrics["kl_reference"][0], 0.0, atol=1e-12)
    for key, trajectories in tradeoff.items():
        for method in ("GA", "NPO", "SimNPO"):
            if key in runs:
                np.testing.assert_array_equal(runs[key][method].component_metrics["kl_true"],
                                              trajectories[method].component_metrics["kl_true"])


def test_other_methods_closer_to_and_forget2_fraction_by_hand():
    from markovsim.trajectory import Trajectory
    from paper_figures.other_methods import closer_to, forget2_fraction

    references = {"NPO": 0.25, "GA": 0.5, "SimNPO": 0.7}
    assert [closer_to(v, references) for v in (0.3, 0.45, 0.65, 0.9)] == ["NPO", "GA", "SimNPO", "SimNPO"]
    assert closer_to(0.5, {"NPO": 0.75, "GA": 0.25, "SimNPO": 0.875}) == "NPO"  # a tie goes to the first name
    assert closer_to(0.7, {"NPO": 0.6 - 1e-9, "GA": 0.6 + 1e-9, "SimNPO": 0.2}) == "NPO"  # equal up to rounding
    assert closer_to(0.7, {"NPO": 0.6 - 1e-3, "GA": 0.6 + 1e-3, "SimNPO": 0.2}) == "GA"
    assert closer_to(None, references) is None and closer_to(0.5, references | {"GA": None}) is None
    shares = np.array([[0.2, 0.2, 0.6], [0.0, 0.0, 0.0], [0.5, 0.375, 0.125]])  # (E, C): retain, forget1, forget2
    trajectory = Trajectory(np.arange(3), ("retain", "forget1", "forget2"), {"power_share": shares}, {})
    np.testing.assert_allclose(forget2_fraction(trajectory), [0.75, np.nan, 0.25])


def test_other_methods_transformer_half_is_unlearn_method_from_the_shared_reference(tiny_output):
    """A cached registry run on the tiny transformer equals llm.methods.markov.unlearn_method from the same cached
    reference; TaskNegation's path there starts at the reference (lambda = 0: KL to the reference 0)."""
    import copy

    from llm.methods.markov import unlearn_method
    from paper_figures import other_methods
    from paper_figures.runs import load_runs
    from paper_figures.transformer_runs import prepare_transformer

    config = other_methods.CONFIGS["tiny"]
    runs, _, _ = load_runs(_other_methods_stem(tiny_output))
    case, seed, preset = "paper_short_forget2", config.registry_transformer_seeds[0], config.registry_transformer.preset
    cached = runs[f"{case}:{preset}/seed{seed}"]
    assert set(cached) == {"GA", "NPO", "SimNPO"} | set(config.methods)
    settings = dataclasses.replace(config.registry_transformer, seed=seed)
    setup = prepare_transformer(case, config.scale, settings, "cpu", False, str(tiny_output / "cache" / "models"))
    direct = unlearn_method(copy.deepcopy(setup.reference), "SeUL", setup.forget, setup.retain,
                            setup.unlearning_config, setup.evaluator)
    np.testing.assert_allclose(cached["SeUL"].component_metrics["kl_true"], direct.component_metrics["kl_true"],
                               rtol=1e-6)
    path = cached["TaskNegation"]
    assert path.steps[0] == 0.0 and len(path.steps) == config.task_negation_points
    np.testing.assert_allclose(path.component_metrics["kl_reference"][0], 0.0, atol=1e-6)


def test_other_methods_config_rejects_unknown_methods_and_stray_transformer_seeds():
    from paper_figures.other_methods import Config

    with pytest.raises(ValueError, match="methods: \\['NoSuchMethod'\\] are not registry methods"):
        Config(methods=("WHP", "NoSuchMethod"))
    with pytest.raises(ValueError, match="registry_transformer_seeds"):
        Config(seeds=(0, 1), registry_transformer_seeds=(2,))


def test_seed_bands_equal_each_seeds_runs_one_after_another(tmp_path):
    """``seed_band_runs`` (the seeds' references, retrained models and every (seed, method) run as batched
    replicas, each seed its own data: what the figures do on CUDA) gives each seed's single runs (float32 on
    the CPU: rtol 1e-5); a second call loads the kept models and repeats the numbers exactly."""
    from paper_figures.seed_bands import seed_band_runs
    from paper_figures.transformer_runs import TransformerSettings, transformer_runs

    settings = TransformerSettings(preset="tiny-synthetic", pretrain_epochs=1.0, unlearn_steps=3,
                                   diagnostics_max_sequences=8)
    bands = seed_band_runs("paper_short_forget2", 0.005, settings, (0, 1), "cpu", None, False, str(tmp_path))
    assert len(bands) == 2
    for seed, (batched, levels) in zip((0, 1), bands):
        single, single_levels = transformer_runs("paper_short_forget2", 0.005, dataclasses.replace(settings, seed=seed),
                                                 "cpu", None, False, str(tmp_path))
        assert list(batched) == list(single) == ["GA", "NPO", "SimNPO"]
        np.testing.assert_allclose(list(levels.values()), list(single_levels.values()), rtol=1e-6)
        for method, trajectory in single.items():
            assert batched[method].info["num_replicas"] == 6
            for name, values in trajectory.component_metrics.items():
                np.testing.assert_allclose(batched[method].component_metrics[name], values, rtol=1e-5, atol=1e-7,
                                           err_msg=f"seed {seed} {method} {name}")
    again = seed_band_runs("paper_short_forget2", 0.005, settings, (0, 1), "cpu", None, False, str(tmp_path))
    for (first, _), (second, _) in zip(bands, again):
        for method in first:
            np.testing.assert_array_equal(first[method].component_metrics["kl_true"],
                                          second[method].component_metrics["kl_true"])


def test_cuda_jobs_run_their_seeds_as_one_band_and_cache_each_seed(tmp_path):
    """``precompute_seed_bands`` groups the jobs that batch their methods (CUDA's; here CPU jobs marked so) by
    everything but the seed, computes each group as one ``seed_band_runs`` and caches every seed under its job."""
    from paper_figures.runs import ScenarioRuns, _execute, _needs_computing, job_key, load_runs, precompute_seed_bands
    from paper_figures.seed_bands import seed_band_runs
    from paper_figures.transformer_runs import TransformerSettings

    settings = TransformerSettings(preset="tiny-synthetic", pretrain_epochs=1.0, unlearn_steps=2,
                                   diagnostics_max_sequences=8)
    spec = ScenarioRuns("paper_short_forget2", 0.005, seeds=(0, 1), transformers=(settings,))
    assert [job.get("batched_methods") for job in spec.jobs("cuda") if job["kind"] == "transformer"] == [True, True]
    jobs = [job | {"batched_methods": True} if job["kind"] == "transformer" else job for job in spec.jobs("cpu")]
    precompute_seed_bands(jobs, str(tmp_path), recompute=False)
    transformer_jobs = [job for job in jobs if job["kind"] == "transformer"]
    assert not any(_needs_computing(str(tmp_path), job, False) for job in transformer_jobs)
    assert all(_needs_computing(str(tmp_path), job, False) for job in jobs if job["kind"] == "simulator")
    direct = seed_band_runs("paper_short_forget2", 0.005, settings, (0, 1), "cpu", None, False,
                            str(tmp_path / "models"))
    for job, (runs, _) in zip(transformer_jobs, direct):
        cached, _, document = load_runs(str(tmp_path / f"runs_{job_key(job)}"))
        assert document["config"]["seed"] == job["seed"]
        for method, trajectory in runs.items():
            np.testing.assert_array_equal(cached["tiny-synthetic"][method].component_metrics["kl_true"],
                                          trajectory.component_metrics["kl_true"])
    # a lone seed's batched job (nothing to group it with) runs as a band of one: the same numbers up to
    # float32 rounding (a band of one stacks one replica, not two)
    lone, _ = _execute(transformer_jobs[0], False, str(tmp_path / "lone"))
    for method, trajectory in direct[0][0].items():
        np.testing.assert_allclose(lone["tiny-synthetic"][method].component_metrics["kl_true"],
                                   trajectory.component_metrics["kl_true"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, extra", [("adam_eps", "finals"), ("first_step", "summaries")])
def test_figures_with_worker_processes_give_the_numbers_of_one_process(tiny_output, tmp_path, name, extra):
    """``adam_eps`` (each method's transformer runs) and ``first_step`` (each preset) run in worker processes
    when jobs > 1: the cache holds exactly the numbers of the one-process run (the tiny figures above, jobs 1)."""
    module = FIGURES[name]
    stem = str(tmp_path / "cache" / f"{name}_tiny")
    os.makedirs(tmp_path / "cache")
    module.compute(module.CONFIGS["tiny"], stem, "cpu", jobs=2)
    document, arrays = load_cache(stem)
    expected_document, expected = load_cache(str(tiny_output / "cache" / f"{name}_tiny"))
    assert sorted(arrays) == sorted(expected)
    for key, values in expected.items():
        np.testing.assert_array_equal(arrays[key], values, err_msg=key)
    assert document[extra] == expected_document[extra]


@pytest.mark.parametrize("preset", ["paper-synthetic", "gpt2-4x128", "tiny-synthetic", "tiny-gpt2", "tiny-llama"])
def test_first_step_groups_follow_the_module_types(preset):
    """first_step's weight groups against the owning module's type: a norm layer's parameters (and only they) are
    LayerNorms, an embedding's are tokens or positions, and no parameter is left in "other"."""
    import torch

    from llm import build_model
    from paper_figures.first_step import group_of

    model = build_model(preset, 11, 21, seed=0)
    owners = {f"{module_name}.{name}" if module_name else name: module
              for module_name, module in model.named_modules() for name, _ in module.named_parameters(recurse=False)}
    for name, _ in model.named_parameters():
        owner, group = owners[name], group_of(name)
        is_norm = "norm" in type(owner).__name__.lower()
        assert (group == "LayerNorms") == is_norm, (name, type(owner).__name__, group)
        if isinstance(owner, torch.nn.Embedding):
            assert group in ("tokens (GPT-2: = output)", "positions"), (name, group)
        assert group != "other", name



# ----- markov_mixture, gradient_weights, power_share, divergence, sensitivity: what each draws is its cache -----

@pytest.fixture
def plotted(monkeypatch):
    """``plotted(name, stem)``: the figure ``FIGURES[name].plot`` draws from the cache ``stem`` (not saved; closed
    at teardown)."""
    import matplotlib.pyplot as plt

    figures = []

    def draw(name, stem):
        module = FIGURES[name]
        monkeypatch.setattr(module, "save_figure", lambda figure, out: figures.append(figure) or [])
        module.plot(stem, "not written")
        return figures[-1]

    yield draw
    for figure in figures:
        plt.close(figure)


def _lines_by_label(axis) -> dict:
    """``{label: line}`` of an axis's labelled lines (each label once)."""
    lines = [line for line in axis.lines if not line.get_label().startswith("_")]
    labels = [line.get_label() for line in lines]
    assert len(set(labels)) == len(labels), labels
    return dict(zip(labels, lines))


def _assert_line(line, xs, ys, message: str) -> None:
    np.testing.assert_array_equal(line.get_xdata(), xs, err_msg=message)
    np.testing.assert_allclose(line.get_ydata(), ys, rtol=1e-12, atol=0, err_msg=message)


def test_markov_mixture_draws_the_cached_matrices_and_kls(tiny_output, plotted):
    stem = str(tiny_output / "cache" / "markov_mixture_tiny")
    document, matrices = load_cache(stem)
    figure = plotted("markov_mixture", stem)
    titles = {"true retain": "chain_retain", "true forget1": "chain_forget1", "true forget2": "chain_forget2",
              "reference": "model_reference", "retrained": "model_retrained"}
    drawn = {axis.get_title(): axis.images for axis in figure.axes if axis.images}
    assert set(drawn) == set(titles)
    for title, images in drawn.items():
        assert len(images) == 1
        np.testing.assert_array_equal(images[0].get_array(), matrices[titles[title]], err_msg=title)
    bars = next(axis for axis in figure.axes if axis.containers)
    names = [label.get_text() for label in bars.get_xticklabels()]
    assert names == ["retain", "forget1", "forget2"]
    kls = document["kl_to_true_chain"]
    assert [container.get_label() for container in bars.containers] == list(kls) == [
        "reference", "retrained", "reference (mixture)"]
    for container in bars.containers:
        heights = [patch.get_height() for patch in container.patches]
        assert heights == [kls[container.get_label()][name] for name in names], container.get_label()


def test_gradient_weights_draws_the_cached_curves(tiny_output, plotted):
    stem = str(tiny_output / "cache" / "gradient_weights_tiny")
    document, arrays = load_cache(stem)
    figure = plotted("gradient_weights", stem)
    closed, *scenarios = figure.axes[:3]
    grid, lines = arrays["logp_per_token"], _lines_by_label(closed)
    lengths = document["config"]["lengths"]
    assert len(lines) == 4 * len(lengths)
    for length in lengths:  # SimNPO's and NPO-ave's weights drawn times |y| (per-token normalised)
        _assert_line(lines[f"NPO, |y| = {length}"], grid, arrays[f"npo/{length}"], "NPO")
        _assert_line(lines[f"SimNPO x |y|, |y| = {length}"], grid, arrays[f"simnpo/{length}"] * length, "SimNPO")
        _assert_line(lines[f"NPO-ave x |y|, |y| = {length}"], grid, arrays[f"npo_ave/{length}"] * length, "NPO-ave")
        _assert_line(lines[f"SimNPO-sum, |y| = {length}"], grid, arrays[f"simnpo_sum/{length}"], "SimNPO-sum")
    for axis, scenario in zip(scenarios, ("paper_short_forget2", "paper_unseen_forget2")):
        assert axis.get_title().startswith(scenario)
        lines = _lines_by_label(axis)
        assert len(lines) == 4
        for method in ("NPO", "SimNPO"):
            for name in ("forget1", "forget2"):
                values = arrays[f"{scenario}/{method}/{name}"]
                _assert_line(lines[f"{method} {name}"], arrays[f"{scenario}/{method}/steps"], values / values[0],
                             f"{scenario} {method} {name}")


def test_power_share_draws_the_seed_mean_of_the_cached_runs(tiny_output, plotted):
    from paper_figures import markov_tradeoff
    from paper_figures.runs import load_runs

    stem = str(tiny_output / "cache" / "power_share_tiny")
    runs, _, _ = load_runs(stem)
    figure = plotted("power_share", stem)
    seeds = {}  # (case, source) -> [runs of each seed]
    for key, trajectories in runs.items():
        case, rest = key.split(":")
        seeds.setdefault((case, rest.split("/seed")[0]), []).append(trajectories)
    drawn = 0
    for axis in figure.axes:
        case_label, source_line = axis.get_title().split("\n")
        case = next(c for c, label in markov_tradeoff.CASES.items() if label == case_label)
        source = source_line.split(",")[0]
        per_seed = seeds[(case, source)]
        assert source_line == f"{source}, {len(per_seed)} seeds"
        lines = _lines_by_label(axis)
        for method in ("NPO", "SimNPO"):
            for name in ("forget1", "forget2"):
                curves = [trajectories[method].metric("power_share", name) for trajectories in per_seed]
                assert len({len(c) for c in curves}) == 1  # no run stopped early at this scale
                mean = np.mean(curves, axis=0)
                _assert_line(lines.pop(f"{method} {name}"), per_seed[0][method].steps, mean, f"{case} {source}")
                drawn += 1
        assert not lines
    assert drawn == 4 * len(seeds)


def test_divergence_draws_the_cached_curves_and_their_fits(tiny_output, plotted):
    from markovsim.analysis import fit_divergence_rates

    stem = str(tiny_output / "cache" / "divergence_tiny")
    document, arrays = load_cache(stem)
    fits = document["fits"]
    figure = plotted("divergence", stem)
    columns = {"forget log-likelihood per token": "forget_logp", "||theta_t - theta_0||": "distance",
               "retain damage": "retain_kl"}
    checked = set()
    for axis in figure.axes:
        source, _, column = axis.get_title().partition(": ")
        lines = _lines_by_label(axis)
        for method in ("GA", "NPO"):
            key, quantity = f"{source}/{method}", columns[column]
            steps, values = arrays[f"{key}/steps"], arrays[f"{key}/{quantity}"]
            if quantity == "retain_kl":
                _assert_line(lines.pop(method), steps, values, key)
                checked.add((key, quantity))
                continue
            fit = fits[key][quantity]
            refit = fit_divergence_rates(steps, values)  # the cached fit is the fit of the cached curve
            assert fit["better"] == refit["better"]
            assert all(fit[kind] == pytest.approx(refit[kind], rel=1e-9) for kind in ("linear", "logarithmic"))
            shown = steps > 0  # a log step axis
            _assert_line(lines.pop(method), steps[shown], values[shown], key)
            better = fit[fit["better"]]
            line = lines.pop(f"{method} fit: {fit['better']} (R2 {better['r2']:.3f})")
            t = steps[shown]
            expected = (better["a"] + better["b"] * t if fit["better"] == "linear"
                        else better["a"] + better["b"] * np.log(1 + t / better["tau"]))
            _assert_line(line, t, expected, f"{key} fit")
            checked.add((key, quantity))
        assert not lines
    keys = {key.rsplit("/", 1)[0] for key in arrays}
    assert checked == {(key, q) for key in keys for q in ("forget_logp", "distance", "retain_kl")}
    assert {key.split("/")[0] for key in keys} == {"tabular", "mixture", "tiny-synthetic", "tiny-gpt2"}


def test_sensitivity_draws_the_seed_mean_of_the_cached_tables(tiny_output, plotted):
    stem = str(tiny_output / "cache" / "sensitivity_tiny")
    document, arrays = load_cache(stem)
    config = document["config"]
    figure = plotted("sensitivity", stem)
    for method, axis_name, values in (("NPO", "beta", config["betas"]), ("SimNPO", "beta", config["betas"]),
                                      ("SimNPO", "gamma", config["gammas"])):
        np.testing.assert_array_equal(arrays[f"{method}/{axis_name}/values"], values)
        for column in ("kl_true/forget1", "kl_true/forget2", "kl_true/retain"):
            assert arrays[f"{method}/{axis_name}/{column}"].shape == (len(values), len(config["seeds"]))

    def mean(method, axis_name, column):  # over seeds, by hand
        table = arrays[f"{method}/{axis_name}/{column}"]
        return np.array([sum(row) / len(row) for row in table])

    for axis, component in zip(figure.axes[:2], ("forget1", "forget2")):
        lines = _lines_by_label(axis)
        assert len(lines) == 4
        for method in ("NPO", "SimNPO"):
            _assert_line(lines[method], config["betas"], mean(method, "beta", f"kl_true/{component}"), method)
            _assert_line(lines[f"{method} retain"], config["betas"], mean(method, "beta", "kl_true/retain"), method)
    lines = _lines_by_label(figure.axes[2])
    assert set(lines) == {"forget1", "forget2", "retain"}
    for component, line in lines.items():
        _assert_line(line, config["gammas"], mean("SimNPO", "gamma", f"kl_true/{component}"), component)
