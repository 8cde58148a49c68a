"""python -m llm unlearn --seeds ... --betas ...: the grid runs as replicas, one results folder each."""

import json
import os

import numpy as np
import pytest

from llm.__main__ import build_parser, main, resolve
from llm.cli_replicas import ReplicaGrid
from markovsim.trajectory import Trajectory

COMMON = ["--scale", "0.005", "--device", "cpu", "--no-progress", "--num-threads", "1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    assert main(["pretrain", "--out", str(root / "pre"), "--preset", "tiny-synthetic", "--batch-size", "16",
                 "--epochs", "1"] + COMMON) == 0
    return root


def unlearn_arguments(root, out: str, *extra: str) -> list[str]:
    return ["unlearn", "--out", str(root / out), "--model", str(root / "pre" / "model"), "--objective", "NPO",
            "--steps", "3", "--eval-every", "1", "--diagnostics-max-sequences", "4", *extra] + COMMON


def test_seeds_times_betas_run_as_replicas_equal_to_single_runs(pretrained, capsys):
    assert main(unlearn_arguments(pretrained, "grid", "--seeds", "0", "1", "--betas", "0.1", "0.2")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["command"] == "unlearn"
    text = (pretrained / "grid" / "results.json").read_text()
    index = json.loads(text)
    assert "NaN" not in text and index["num_replicas"] == 4 and index["route"] == "stacked"
    assert [(r["seed"], r["beta"]) for r in index["replicas"]] == [(0, 0.1), (0, 0.2), (1, 0.1), (1, 0.2)]
    assert index["config"]["replicas"] == {"seeds": [0, 1], "betas": [0.1, 0.2]}
    singles = []
    for i, entry in enumerate(index["replicas"]):
        folder = pretrained / "grid" / entry["folder"]
        results = json.loads((folder / "results.json").read_text())
        assert results["replica"] == i and results["objective"]["beta"] == entry["beta"]
        assert results["train_config"]["seed"] == entry["seed"] and results["final"]["kl_true"]
        # every replica equals the single run with its (seed, beta)
        out = f"single-{i}"
        assert main(unlearn_arguments(pretrained, out, "--seed", str(entry["seed"]), "--beta", str(entry["beta"]))) == 0
        single = Trajectory.load(pretrained / out / "trajectory")
        batched = Trajectory.load(folder / "trajectory")
        assert list(batched.steps) == list(single.steps)
        for name, values in single.component_metrics.items():
            np.testing.assert_allclose(batched.component_metrics[name], values, rtol=1e-5, atol=1e-7,
                                       err_msg=f"replica {i} {name}")
        singles.append(single.component_metrics["kl_true"])
    for i in range(len(singles)):  # the grid's runs differ pairwise, so a replica run with another's settings fails
        for j in range(i):
            assert not np.allclose(singles[i], singles[j], rtol=1e-4, atol=0), (i, j)


def test_a_grid_checkpoints_and_resumes_to_the_same_results(pretrained, capsys):
    arguments = unlearn_arguments(pretrained, "resumable", "--seeds", "0", "1", "--checkpoint-every", "1")
    assert main(arguments) == 0
    folder = pretrained / "resumable"
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-0000001", "step-0000002"]  # keep 2 (of 1, 2)
    first = [Trajectory.load(folder / f"replica-00{i}" / "trajectory") for i in (0, 1)]
    assert main(arguments) == 2  # the folder holds a run: refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(arguments + ["--resume"]) == 0  # continues from step 2: steps 2 and 3 again
    for i, before in enumerate(first):
        after = Trajectory.load(folder / f"replica-00{i}" / "trajectory")
        assert list(after.steps) == list(before.steps) == [0, 1, 2, 3]
        for name, values in before.component_metrics.items():
            np.testing.assert_array_equal(after.component_metrics[name], values, err_msg=name)


BAD_GRIDS = {  # arguments after the model -> what the one error line must name
    "duplicate": (["--seeds", "0", "0"], "--seeds"),
    "not an int": (["--seeds", "0", "x"], "--seeds"),
    "no value": (["--seeds"], "--seeds"),
    "both seed flags": (["--seeds", "0", "1", "--seed", "2"], "--seed"),
    "both beta flags": (["--betas", "0.1", "--beta", "0.2"], "--beta"),
    "resume without a checkpoint": (["--seeds", "0", "1", "--resume"], "--resume"),
    "beta-less objective": (["--betas", "0.1", "--objective", "GA"], "--betas"),
}


@pytest.mark.parametrize("name", list(BAD_GRIDS))
def test_bad_grids_exit_2_with_one_error_line(name, pretrained, capsys):
    extra, named = BAD_GRIDS[name]
    assert main(unlearn_arguments(pretrained, f"bad-{name.replace(' ', '-')}", *extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (pretrained / f"bad-{name.replace(' ', '-')}" / "replica-000").exists()


def test_the_grid_comes_from_flags_or_the_json_config(tmp_path):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"replicas": {"seeds": [3, 4]}}))
    parsed = resolve(build_parser().parse_args(["unlearn", "--out", "x", "--config", str(config)]))
    assert parsed.replicas == ReplicaGrid(seeds=(3, 4))
    parsed = resolve(build_parser().parse_args(["unlearn", "--out", "x", "--config", str(config), "--betas", "1"]))
    assert parsed.replicas == ReplicaGrid(seeds=(3, 4), betas=(1.0,))
    assert not resolve(build_parser().parse_args(["unlearn", "--out", "x"])).replicas.active
    with pytest.raises(ValueError, match="seeds"):
        ReplicaGrid(seeds=[])
    assert ReplicaGrid(seeds=(1, 2), betas=(0.5,)).combinations(0, 0.1) == [(1, 0.5), (2, 0.5)]
    assert ReplicaGrid(betas=(0.5, 0.7)).combinations(9, 0.1) == [(9, 0.5), (9, 0.7)]
