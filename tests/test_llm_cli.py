"""python -m llm: pretrain, retrain, unlearn (with resume) and evaluate, one run directory each."""

import json

import pytest

from llm.__main__ import build_parser, main, resolve, run

COMMON = ["--scale", "0.005", "--device", "cpu", "--no-progress", "--num-threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = root / "pretrain.json"
    config.write_text(json.dumps({"model": {"preset": "tiny-gpt2", "seed": 1}, "train": {"batch_size": 16, "epochs": 2}}))
    assert main(["pretrain", "--run-dir", str(root / "pre"), "--config", str(config)] + COMMON) == 0
    assert main(["retrain", "--run-dir", str(root / "re"), "--preset", "tiny-gpt2", "--batch-size", "16",
                 "--epochs", "2"] + COMMON) == 0
    return root


def test_pretrain_writes_a_complete_run_directory(models):
    results = json.loads((models / "pre" / "results.json").read_text())
    assert results["command"] == "pretrain" and results["package_version"] and results["device"] == "cpu"
    assert results["config"]["model"]["preset"] == "tiny-gpt2"
    assert results["train_config"]["batch_size"] == 16 and results["num_sequences"] == 80  # retain+forget1+forget2
    assert json.loads((models / "re" / "results.json").read_text())["num_sequences"] == 40  # retain only
    for name in ("config.json", "metrics.jsonl", "model/config.json"):
        assert (models / "pre" / name).is_file()


def test_unlearn_then_resume_then_evaluate(models, capsys):
    arguments = ["unlearn", "--run-dir", str(models / "npo"), "--model", str(models / "pre" / "model"),
                 "--retrained", str(models / "re" / "model"), "--objective", "NPO", "--steps", "4",
                 "--eval-every", "2", "--checkpoint-every", "2"] + COMMON
    assert main(arguments) == 0
    first = json.loads((models / "npo" / "results.json").read_text())
    assert first["objective"]["beta"] == 0.2  # the scenario's NPO beta
    assert set(first["final"]["kl_retrained"]) == {"retain", "forget1", "forget2"}
    assert "kl_exact_retrained" in first["final"] and first["diverged_at"] is None
    assert main(arguments + ["--resume"]) == 0  # continues from step 2 and reproduces the end
    second = json.loads((models / "npo" / "results.json").read_text())
    assert second["final"] == first["final"] and second["final_loss"] == first["final_loss"]
    assert main(["evaluate", "--run-dir", str(models / "eval"), "--model", str(models / "npo" / "model"),
                 "--retrained", str(models / "re" / "model")] + COMMON) == 0
    evaluation = json.loads((models / "eval" / "results.json").read_text())
    assert evaluation["metrics"]["kl_true"]["forget2"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["command"] == "evaluate"


def test_flags_override_the_json_config(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": {"scale": 0.5}, "train": {"steps": 9}, "objective": {"name": "SimNPO"}}))
    resolved = resolve(build_parser().parse_args(["unlearn", "--run-dir", "x", "--config", str(config), "--steps", "3",
                                                  "--beta", "2.0"]))
    assert resolved.data.scale == 0.5 and resolved.train["steps"] == 3
    assert resolved.objective == {"name": "SimNPO", "beta": 2.0}


def test_bad_configs_are_clear_errors(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"step": 3}}))
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        run(resolve(build_parser().parse_args(["pretrain", "--run-dir", str(tmp_path / "r"), "--config", str(config)]
                                              + COMMON)))
    assert main(["unlearn", "--run-dir", str(tmp_path / "u")] + COMMON) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["pretrain", "--run-dir", str(tmp_path / "p"), "--preset", "gpt5"] + COMMON) == 2
    assert "valid presets" in capsys.readouterr().err
    assert main(["unlearn", "--run-dir", str(tmp_path / "o"), "--model", str(tmp_path), "--objective", "XYZ"] + COMMON) == 2
