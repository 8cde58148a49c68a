"""python -m llm: pretrain, retrain, unlearn (with resume) and evaluate, one run directory each."""

import dataclasses
import json
import math

import pytest

from llm.__main__ import build_parser, main, resolve, run

COMMON = ["--scale", "0.005", "--device", "cpu", "--no-progress", "--num-threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = root / "pretrain.json"
    config.write_text(json.dumps({"model": {"preset": "tiny-gpt2", "seed": 1},
                                  "train": {"batch_size": 16, "epochs": 2}}))
    assert main(["pretrain", "--out", str(root / "pre"), "--config", str(config)] + COMMON) == 0
    assert main(["retrain", "--out", str(root / "re"), "--preset", "tiny-gpt2", "--batch-size", "16",
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
    arguments = ["unlearn", "--out", str(models / "npo"), "--model", str(models / "pre" / "model"),
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
    assert main(["evaluate", "--out", str(models / "eval"), "--model", str(models / "npo" / "model"),
                 "--retrained", str(models / "re" / "model")] + COMMON) == 0
    evaluation = json.loads((models / "eval" / "results.json").read_text())
    assert evaluation["metrics"]["kl_true"]["forget2"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["command"] == "evaluate"


@pytest.mark.parametrize("name,forget,beta", [("NPO-ave", "npo_ave", 4.0), ("SimNPO-sum", "simnpo_sum", 0.2)])
def test_the_two_by_two_cells_unlearn_with_the_scenarios_settings(models, name, forget, beta):
    """NPO-ave takes the scenario's SimNPO beta (4), SimNPO-sum its NPO beta (0.2): markovsim.objectives.LADDER."""
    out = models / name
    assert main(["unlearn", "--out", str(out), "--model", str(models / "pre" / "model"), "--objective", name,
                 "--steps", "1"] + COMMON) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["objective"]["forget"], results["objective"]["beta"]) == (forget, beta)
    assert math.isfinite(results["final_loss"])


def test_flags_override_the_json_config(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": {"scale": 0.5}, "train": {"steps": 9}, "objective": {"name": "SimNPO"}}))
    resolved = resolve(build_parser().parse_args(["unlearn", "--out", "x", "--config", str(config), "--steps", "3",
                                                  "--beta", "2.0"]))
    assert resolved.data.scale == 0.5 and resolved.train["steps"] == 3
    assert resolved.objective == {"name": "SimNPO", "beta": 2.0}


def test_bad_configs_are_clear_errors(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"step": 3}}))
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        run(resolve(build_parser().parse_args(["pretrain", "--out", str(tmp_path / "r"), "--config", str(config)]
                                              + COMMON)))
    assert main(["unlearn", "--out", str(tmp_path / "u")] + COMMON) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "p"), "--preset", "gpt5"] + COMMON) == 2
    assert "valid presets" in capsys.readouterr().err
    assert main(["unlearn", "--out", str(tmp_path / "o"), "--model", str(tmp_path), "--objective", "XYZ"] + COMMON) == 2


def _bad_config(tmp_path, document) -> str:
    path = tmp_path / "bad.json"
    path.write_text(document)
    return str(path)


BAD_INPUTS = {  # arguments after the command -> the flag or key the one error line must name
    "non-integer batch": (["--batch-size", "2.5"], "--batch-size"),
    "unknown device": (["--device", "tpu"], "--device"),
    "non-finite learning rate": (["--learning-rate", "nan"], "learning_rate"),
    "objective as a string": (lambda tmp: ["--config", _bad_config(tmp, '{"objective": "NPO"}')], "'objective'"),
    "unknown train key": (lambda tmp: ["--config", _bad_config(tmp, '{"train": {"step": 3}}')], "step"),
    "truncated config": (lambda tmp: ["--config", _bad_config(tmp, '{"train": {')], "--config"),
    "missing config": (lambda tmp: ["--config", str(tmp / "missing.json")], "--config"),
    "truncated seed": (lambda tmp: ["--config", _bad_config(tmp, '{"train": {"seed": 1.5}}')], "seed"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_error_line_naming_the_flag_or_key(name, tmp_path, capsys):
    arguments, named = BAD_INPUTS[name]
    arguments = arguments(tmp_path) if callable(arguments) else arguments
    assert main(["pretrain", "--out", str(tmp_path / "run")] + arguments + COMMON) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "run" / "config.json").exists()  # rejected before anything is written


def test_debug_shows_the_underlying_exception(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        main(["pretrain", "--out", str(tmp_path / "run"), "--learning-rate", "inf", "--debug"] + COMMON)


def test_the_output_folder_is_checked_before_computing(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["pretrain", "--out", str(a_file)] + COMMON) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["pretrain", "--out", "/proc/not-writable"] + COMMON) == 2
    assert "not a writable folder" in capsys.readouterr().err
    assert main(["pretrain"] + COMMON) == 2
    assert "--out" in capsys.readouterr().err


def test_every_train_config_field_has_a_generated_flag():
    from llm.config import TrainConfig
    from llm.flags import flag_name

    options = {option for action in build_parser()._subparsers._group_actions[0].choices["unlearn"]._actions
               for option in action.option_strings}
    assert {flag_name(f.name) for f in dataclasses.fields(TrainConfig)} <= options
    arguments = ["unlearn", "--out", "x", "--no-progress", "--adam-betas", "0.8", "0.9", "--steps", "none",
                 "--max-grad-norm", "none", "--no-track-power-share", "--learning-rate", "0.25"]
    train = resolve(build_parser().parse_args(arguments)).train
    assert train == {"progress": False, "adam_betas": (0.8, 0.9), "steps": None, "max_grad_norm": None,
                     "track_power_share": False, "learning_rate": 0.25}


def test_run_dir_is_a_deprecated_alias_of_out():
    assert resolve(build_parser().parse_args(["pretrain", "--run-dir", "somewhere"])).out == "somewhere"
    assert "--run-dir" not in build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()


def test_results_are_strict_json(models):
    text = (models / "pre" / "results.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"results.json holds a bare {name}"))


def test_strict_json_writes_null_and_the_reason_beside_it():
    from llm.results import strict_json

    document = strict_json({"final_loss": math.nan, "final": {"kl": {"a": 1.0, "b": math.inf}}, "steps": 3},
                           "loss is nan")
    text = json.dumps(document, allow_nan=False)
    assert json.loads(text)["final_loss"] is None and document["final"]["kl"] == {"a": 1.0, "b": None}
    assert document["non_finite"] == {"final_loss": {"value": "nan", "reason": "loss is nan"},
                                      "final.kl.b": {"value": "inf", "reason": "loss is nan"}}
    assert "non_finite" not in strict_json({"a": 1.0})
