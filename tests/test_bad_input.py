"""Every bad input the fuzz sweep found is a clear error naming the argument, flag, key or file.

One regression test per example of the issue (silently wrong, unclear, partial output). Each
asserts a ValueError / TypeError (or a one-line ``error:`` with exit status 2 from a command line)
whose message names what is wrong.
"""

import copy
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from markovsim import losses
from markovsim.__main__ import main as markovsim_main
from markovsim.config import RunSettings
from markovsim.data import SequenceSet
from markovsim.dynamics import DynamicsConfig
from markovsim.scenarios import scenario_from_dict

# ---------------------------------------------------------------------------------------------
# Configuration fields: silently wrong before
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, exception", [
    ("adam_eps", -1.0, ValueError), ("adam_eps", 0.0, ValueError), ("adam_eps", math.nan, ValueError),
    ("divergence_logp_per_token", math.nan, ValueError), ("divergence_logp_per_token", math.inf, ValueError),
    ("divergence_logp_per_token", 1.0, ValueError), ("progress", "no", TypeError), ("progress", 1, TypeError),
    ("steps", 2.0, TypeError), ("steps", True, TypeError), ("seed", 1.5, TypeError),
    ("batch_size", 0, ValueError), ("learning_rate", -0.1, ValueError), ("adam_betas", (0.9,), ValueError)])
def test_dynamics_config_rejects_bad_fields_naming_them(field, value, exception):
    with pytest.raises(exception, match=field):
        DynamicsConfig(**{field: value})


def test_train_config_rejects_progress_no_and_negative_eps():
    from llm.config import TrainConfig

    with pytest.raises(TypeError, match="progress"):
        TrainConfig(progress="no")
    with pytest.raises(ValueError, match="adam_eps"):
        TrainConfig(adam_eps=-1.0)
    with pytest.raises(ValueError, match="divergence_logp_per_token"):
        TrainConfig(divergence_logp_per_token=math.nan)


def test_run_settings_is_the_shared_check():
    with pytest.raises(ValueError, match="adam_eps"):
        RunSettings(adam_eps=-1.0)


# ---------------------------------------------------------------------------------------------
# Loss functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ga", "nll", "simnpo"])
def test_losses_reject_an_empty_batch(name):
    empty = torch.zeros(0, dtype=torch.float64)
    arguments = {"ga": (empty, empty), "nll": (empty, empty), "simnpo": (empty, empty, 1.0)}[name]
    with pytest.raises(ValueError, match="logps.*empty"):
        getattr(losses, name)(*arguments)


def test_npo_and_ga_sum_reject_an_empty_batch():
    empty = torch.zeros(0, dtype=torch.float64)
    with pytest.raises(ValueError, match="logps.*empty"):
        losses.npo(empty, empty, 1.0)
    with pytest.raises(ValueError, match="logps.*empty"):
        losses.ga_sum(empty)


def test_boolean_num_tokens_is_a_type_error():
    logps = torch.tensor([-1.0, -2.0])
    with pytest.raises(TypeError, match="num_tokens"):
        losses.ga(logps, torch.tensor([True, True]))
    with pytest.raises(TypeError, match="num_tokens"):
        losses.simnpo(logps, torch.tensor([True, True]), 1.0)


# ---------------------------------------------------------------------------------------------
# Scenario specs
# ---------------------------------------------------------------------------------------------


def _spec(**changes) -> dict:
    spec = {"name": "s", "num_states": 10, "seed": 0, "chains": {"r": "retain", "f": "forget1"},
            "components": [{"name": "retain", "chain": "r", "length": 5, "num_train": 8, "num_test": 2},
                           {"name": "forget", "chain": "f", "length": 5, "num_train": 8, "num_test": 2,
                            "role": "forget"}],
            "methods": {"NPO": {"beta": 0.2}}}
    return spec | changes


@pytest.mark.parametrize("changes, exception, named", [
    ({"num_states": 6.9}, TypeError, "num_states"), ({"num_states": "abc"}, TypeError, "num_states"),
    ({"num_states": True}, TypeError, "num_states"), ({"num_states": 0}, ValueError, "num_states"),
    ({"seed": 1.5}, TypeError, "seed"), ({"seed": -1}, ValueError, "seed"), ({"seed": "0"}, TypeError, "seed"),
    ({"leakage": "x"}, TypeError, "leakage"), ({"leakage": math.nan}, ValueError, "leakage"),
    ({"leakage": 2.0}, ValueError, "leakage"),
    ({"methods": {"NPO": 5}}, TypeError, "NPO"), ({"methods": {"NPO": {"bta": 1}}}, ValueError, "NPO"),
    ({"methods": {"XYZ": {}}}, ValueError, "XYZ"), ({"methods": {"NPO": {"beta": "1"}}}, TypeError, "beta"),
    ({"dynamics": 5}, TypeError, "dynamics"), ({"dynamics": {"steps": 1.5}}, TypeError, "steps"),
    ({"components": 5}, TypeError, "components"), ({"components": []}, ValueError, "components"),
    ({"name": 5}, TypeError, "name"), ({"question": 5}, TypeError, "question"),
])
def test_scenario_from_dict_names_the_bad_key(changes, exception, named):
    with pytest.raises(exception, match=named):
        scenario_from_dict(_spec(**changes))


def test_scenario_component_fields_are_checked():
    spec = _spec()
    spec["components"][0] = spec["components"][0] | {"length": 4.5}
    with pytest.raises(TypeError, match="length"):
        scenario_from_dict(spec)
    spec = _spec()
    spec["components"][0] = spec["components"][0] | {"in_pretraining": "yes"}
    with pytest.raises(TypeError, match="in_pretraining"):
        scenario_from_dict(spec)


def test_a_valid_spec_still_loads():
    scenario = scenario_from_dict(_spec())
    assert scenario.spec.num_states == 10 and scenario.spec.seed == 0


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _saved_set(tmp_path, data) -> str:
    path = str(tmp_path / "set.npz")
    data["forget"].save(path)
    return path


def test_sequence_set_load_of_a_truncated_npz_names_the_file(tmp_path, data):
    path = _saved_set(tmp_path, data)
    content = open(path, "rb").read()
    with open(path, "wb") as file:
        file.write(content[: len(content) // 2])
    with pytest.raises(ValueError, match="set.npz") as raised:
        SequenceSet.load(path)
    assert raised.value.__cause__ is not None


def test_sequence_set_load_of_an_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz") as raised:
        SequenceSet.load(path)
    assert raised.value.__cause__ is not None


def test_sequence_set_load_of_random_bytes_and_wrong_arrays(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(os.urandom(200))
    with pytest.raises(ValueError, match="junk.npz"):
        SequenceSet.load(path)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        SequenceSet.load(tmp_path / "other.npz")


@pytest.fixture(scope="module")
def tiny_model():
    from llm.models import build_model

    return build_model("tiny-gpt2", 11, 21, seed=0)


def test_load_model_on_a_truncated_config_json_names_the_file(tiny_model, tmp_path):
    from llm.models import load_model, save_model

    save_model(tiny_model, tmp_path / "model", progress=False)
    config = tmp_path / "model" / "config.json"
    config.write_text(config.read_text()[:20])
    with pytest.raises(ValueError, match="config.json") as raised:
        load_model(tmp_path / "model", progress=False)
    assert raised.value.__cause__ is not None


def _short_unlearning_run(model, data, run_dir):
    from llm.config import TrainConfig
    from llm.unlearning import unlearn
    from markovsim.losses import OBJECTIVES

    config = TrainConfig(batch_size=4, steps=2, checkpoint_every=1, device="cpu", progress=False)
    unlearn(copy.deepcopy(model), OBJECTIVES["GA"], data["forget"], None, config, run_dir=run_dir)
    return config


def test_resume_from_a_truncated_or_incomplete_state_pt_names_the_file(tiny_model, data, tmp_path):
    from llm.unlearning import unlearn
    from markovsim.losses import OBJECTIVES

    config = _short_unlearning_run(tiny_model, data, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints" / "step-0000001"
    state_file = folder / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["run"]
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=r"state\.pt.*'run'"):
        unlearn(copy.deepcopy(tiny_model), OBJECTIVES["GA"], data["forget"], None, config,
                run_dir=tmp_path / "other", resume=folder)
    state_file.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"state\.pt") as raised:
        unlearn(copy.deepcopy(tiny_model), OBJECTIVES["GA"], data["forget"], None, config,
                run_dir=tmp_path / "other", resume=folder)
    assert raised.value.__cause__ is not None


def test_unlearn_with_an_empty_forget_set_names_forget(tiny_model, data):
    from llm.config import TrainConfig
    from llm.unlearning import unlearn
    from markovsim.losses import OBJECTIVES

    empty = data["forget"].subset(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="forget is empty"):
        unlearn(copy.deepcopy(tiny_model), OBJECTIVES["GA"], empty, None,
                TrainConfig(batch_size=4, steps=1, device="cpu", progress=False))


# ---------------------------------------------------------------------------------------------
# Model presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, exception, named", [
    (("gpt2", -1, 2, 32), ValueError, "num_layers"), (("gpt2", 0, 2, 32), ValueError, "num_layers"),
    (("gpt2", 2, 0, 32), ValueError, "num_heads"), (("gpt2", 2, -2, 32), ValueError, "num_heads"),
    (("gpt2", 2, 2, 0), ValueError, "hidden_size"), (("gpt2", 2.5, 2, 32), TypeError, "num_layers"),
    (("gpt2", True, 2, 32), TypeError, "num_layers"), (("gpt2", 2, 2, "32"), TypeError, "hidden_size"),
    (("gpt2", 2, 2, 32, 0), ValueError, "intermediate_size"), (("llama", 2, 2, 32, 64, 3), ValueError,
                                                               "num_key_value_heads"),
    (("gpt2", 2, 2, 32, None, None, math.nan), ValueError, "dropout"),
    (("gpt2", 2, 2, 32, None, None, "0"), TypeError, "dropout"),
    (("gpt2", 2, 2, 32, None, None, 0.0, 5), TypeError, "description"),
    ((5, 2, 2, 32), ValueError, "architecture")])
def test_model_preset_rejects_bad_sizes_naming_the_field(arguments, exception, named):
    from llm.models import ModelPreset

    with pytest.raises(exception, match=named):
        ModelPreset(*arguments)


# ---------------------------------------------------------------------------------------------
# markovsim command line
# ---------------------------------------------------------------------------------------------


def _one_error_line(capsys, named: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert "Traceback" not in captured.err
    return lines[0]


TINY = ["--scale", "0.002", "--steps", "1", "--models", "tabular", "--no-progress"]


def test_a_method_without_a_beta_keeps_its_default(tmp_path, capsys):
    out = tmp_path / "run"
    assert markovsim_main(["run", "paper_short_forget2", "--methods", "NPO", "SimNPO", "--betas", "NPO=1",
                           "--out", str(out)] + TINY) == 0
    methods = json.loads((out / "results.json").read_text())["config"]["methods"]
    assert methods["NPO"]["beta"] == 1.0 and methods["SimNPO"]["beta"] == 4.0


@pytest.mark.parametrize("betas, named", [(["NPO=abc"], "--betas"), (["abc"], "--betas"), (["XYZ=1"], "--betas"),
                                          (["NPO=-1"], "--betas"), (["NPO=nan"], "--betas")])
def test_bad_betas_name_the_flag(tmp_path, capsys, betas, named):
    assert markovsim_main(["run", "paper_short_forget2", "--methods", "NPO", "--betas", *betas,
                           "--out", str(tmp_path / "run")] + TINY) == 2
    _one_error_line(capsys, named)
    assert not (tmp_path / "run").exists()


def test_an_absurd_scale_is_refused_before_allocating_with_an_estimate(tmp_path, capsys):
    assert markovsim_main(["run", "paper_short_forget2", "--scale", "1e7", "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys, "--scale")
    assert "GiB" in line or "TiB" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_a_non_positive_or_non_finite_scale_names_the_flag(tmp_path, capsys, scale):
    assert markovsim_main(["run", "paper_short_forget2", "--scale", scale, "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, "--scale")


def test_out_that_is_a_file_is_refused_before_computing(tmp_path, capsys, monkeypatch):
    import markovsim.__main__ as cli

    monkeypatch.setattr(cli, "prepare", lambda *a, **k: pytest.fail("computed before checking --out"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert markovsim_main(["run", "paper_short_forget2", "--out", str(a_file)] + TINY) == 2
    _one_error_line(capsys, "--out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_out_that_is_read_only_is_refused_before_computing(tmp_path, capsys, monkeypatch):
    import markovsim.__main__ as cli

    monkeypatch.setattr(cli, "prepare", lambda *a, **k: pytest.fail("computed before checking --out"))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert markovsim_main(["run", "paper_short_forget2", "--out", str(folder / "run")] + TINY) == 2
        _one_error_line(capsys, "--out")
        assert markovsim_main(["run", "paper_short_forget2", "--out", str(folder)] + TINY) == 2
        _one_error_line(capsys, "--out")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_out_holding_a_folder_named_plot_png_is_refused_before_computing(tmp_path, capsys, monkeypatch):
    import markovsim.__main__ as cli

    monkeypatch.setattr(cli, "prepare", lambda *a, **k: pytest.fail("computed before checking --out"))
    (tmp_path / "run" / "plot.png").mkdir(parents=True)
    assert markovsim_main(["run", "paper_short_forget2", "--out", str(tmp_path / "run")] + TINY) == 2
    _one_error_line(capsys, "plot.png")


def test_methods_holding_a_number_in_a_json_scenario_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_spec(methods={"NPO": 5})))
    assert markovsim_main(["run", str(path), "--out", str(tmp_path / "run")] + TINY) == 2
    _one_error_line(capsys, "NPO")


def test_a_failure_while_plotting_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    import markovsim.__main__ as cli

    def broken(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(cli, "_plot", broken)
    with pytest.raises(RuntimeError, match="the plot failed"):
        markovsim_main(["run", "paper_short_forget2", "--out", str(tmp_path / "run")] + TINY)
    assert os.listdir(tmp_path) == []


def test_a_rerun_replaces_a_previous_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    for _ in range(2):
        assert markovsim_main(["run", "paper_short_forget2", "--out", str(out)] + TINY) == 0
    assert sorted(os.listdir(out)) == ["divergence.png", "plot.png", "results.json", "trajectories.npz"]
    assert os.listdir(tmp_path) == ["run"]


def test_learning_rate_flag_and_its_hidden_lr_alias(tmp_path, capsys):
    from markovsim.__main__ import build_parser

    for flag in ("--learning-rate", "--lr"):
        arguments = build_parser().parse_args(["run", "x", "--out", "o", flag, "0.5"])
        assert arguments.__dict__["dynamics:learning_rate"] == 0.5
    assert "--lr " not in build_parser()._subparsers._group_actions[0].choices["run"].format_help()


def test_markovsim_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="--betas"):
        markovsim_main(["--debug", "run", "paper_short_forget2", "--betas", "NPO=abc", "--out", str(tmp_path / "r")]
                       + TINY)


# ---------------------------------------------------------------------------------------------
# llm command line
# ---------------------------------------------------------------------------------------------

LLM_COMMON = ["--scale", "0.005", "--device", "cpu", "--no-progress", "--num-threads", "1"]


def test_llm_config_with_objective_as_a_string_names_the_key(tmp_path, capsys):
    from llm.__main__ import main

    config = tmp_path / "c.json"
    config.write_text('{"objective": "NPO"}')
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--config", str(config)] + LLM_COMMON) == 2
    _one_error_line(capsys, "'objective'")


def test_llm_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    from llm.__main__ import main

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["pretrain", "--out", str(a_file)] + LLM_COMMON) == 2
    _one_error_line(capsys, "--out")
    assert main(["pretrain", "--run-dir", str(a_file)] + LLM_COMMON) == 2
    _one_error_line(capsys, "--out")


def test_out_under_an_unwritable_folder_is_refused_before_computing_as_any_user(tmp_path, capsys, monkeypatch):
    """The same check where the permission bits cannot bite (root in CI): the folder reports itself unwritable."""
    import markovsim.__main__ as cli

    monkeypatch.setattr(cli, "prepare", lambda *a, **k: pytest.fail("computed before checking --out"))
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access",
                        lambda path, mode: False if str(path).startswith(str(folder)) else real_access(path, mode))
    assert markovsim_main(["run", "paper_short_forget2", "--out", str(folder / "run")] + TINY) == 2
    _one_error_line(capsys, "--out")
    assert markovsim_main(["run", "paper_short_forget2", "--out", str(folder)] + TINY) == 2
    _one_error_line(capsys, "--out")
    assert list(folder.iterdir()) == []
