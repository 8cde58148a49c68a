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
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# Public boundaries that passed bad values through to numpy / torch, and two silent failures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("indices, exception", [([10**6], ValueError), ([0.5], TypeError), (np.array([1.0]), TypeError),
                                                ([-1], ValueError), ([[0, 1]], ValueError), (None, TypeError),
                                                (np.array([True, False]), ValueError)])
def test_sequence_set_subset_checks_its_indices(data, indices, exception):
    with pytest.raises(exception, match="indices"):
        data["forget"].subset(indices)


def test_a_sequence_set_from_a_0_by_0_token_array_names_tokens():
    empty = np.zeros(0, dtype=np.int64)
    with pytest.raises(ValueError, match="tokens must have shape"):
        SequenceSet(np.zeros((0, 0), dtype=np.int64), empty, empty, ("a",), 3)


def test_mixture_spec_of_none_names_components():
    from markovsim.data import MixtureSpec

    with pytest.raises(TypeError, match="components must be a list or tuple of Component"):
        MixtureSpec(None)


@pytest.fixture(scope="module")
def exact_setup():
    from markovsim.scenarios import SCENARIOS, prepare

    return prepare(SCENARIOS["paper_short_forget2"].scaled(0.002))


def _exact_unlearn(setup, **changes):
    from markovsim.dynamics import unlearn
    from markovsim.objectives import OBJECTIVES

    arguments = {"model": setup.reference, "objective": OBJECTIVES["NPO"], "forget": setup.forget,
                 "retain": setup.retain, "reference": setup.reference, "config": DynamicsConfig(steps=1),
                 "evaluator": setup.evaluator} | changes
    return unlearn(**arguments)


@pytest.mark.parametrize("changes, exception, message", [
    ({"objective": "NPO"}, TypeError, "objective must be a markovsim Objective"),
    ({"evaluator": 5}, TypeError, "evaluator must be a markovsim.evaluation.Evaluator"),
    ({"forget": "empty"}, ValueError, "forget is empty"),
    ({"forget": "numpy"}, TypeError, "forget must be a markovsim SequenceSet, got ndarray"),
    ({"model": None}, TypeError, "model must be"), ({"reference": None}, TypeError, "reference is None"),
    ({"retain": 5}, TypeError, "retain must be"), ({"progress": "no"}, TypeError, "progress")])
def test_exact_unlearn_checks_its_arguments(exact_setup, changes, exception, message):
    if changes.get("forget") == "empty":
        changes = {"forget": exact_setup.forget.subset([])}
    elif changes.get("forget") == "numpy":
        changes = {"forget": exact_setup.forget.tokens}
    with pytest.raises(exception, match=message):
        _exact_unlearn(exact_setup, **changes)


@pytest.mark.parametrize("times", [[0, math.nan], [0, math.inf]])
def test_gradient_flow_names_non_finite_times(exact_setup, times):
    from markovsim.dynamics import gradient_flow
    from markovsim.objectives import OBJECTIVES

    with pytest.raises(ValueError, match="times contains NaN or inf"):
        gradient_flow(exact_setup.reference, OBJECTIVES["NPO"], exact_setup.forget, None, exact_setup.reference,
                      times)


def test_gradient_flow_at_time_zero_and_repeated_times(exact_setup):
    from markovsim.dynamics import gradient_flow
    from markovsim.objectives import OBJECTIVES

    flow = gradient_flow(exact_setup.reference, OBJECTIVES["NPO"], exact_setup.forget, None, exact_setup.reference,
                         [0.0, 0.0, 0.05, 0.05])
    assert list(flow.steps) == [0.0, 0.0, 0.05, 0.05]
    losses_ = flow.step_metrics["loss"]
    assert losses_[0] == losses_[1] and losses_[2] == losses_[3] and losses_[2] < losses_[0]


def test_a_json_scenario_too_large_for_memory_names_its_sizes_not_scale(tmp_path, capsys):
    spec = _spec()
    spec["components"][1]["num_train"] = 10**11
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(spec))
    assert markovsim_main(["run", str(path), "--out", str(tmp_path / "run")] + TINY[2:]) == 2
    line = _one_error_line(capsys, "num_train 100000000000")
    assert str(path) in line and "'forget'" in line and "--scale" not in line
    assert not (tmp_path / "run").exists()


def test_sequence_set_load_refuses_component_names_that_are_a_json_object(tmp_path, data):
    path = tmp_path / "names.npz"
    saved = data["forget"]
    np.savez(path, tokens=saved.tokens, lengths=saved.lengths, component_ids=saved.component_ids,
             component_names=np.asarray(json.dumps({"forget1": 0, "forget2": 1})), num_states=saved.num_states)
    with pytest.raises(ValueError, match=r"names\.npz.*component_names must be a JSON list"):
        SequenceSet.load(path)


@pytest.mark.parametrize("beta", [1e-320, 5e-324, 1e-39])
def test_a_beta_too_small_for_2_over_beta_is_refused_naming_the_minimum(beta):
    from markovsim.objectives import Objective

    with pytest.raises(ValueError, match=r"beta must be >= 1e-38"):
        losses.npo(torch.tensor([-1.0]), torch.tensor([-2.0]), beta)
    with pytest.raises(ValueError, match=r"beta must be >= 1e-38"):
        Objective("npo", beta=beta)
    assert torch.isfinite(losses.npo(torch.tensor([-1.0]), torch.tensor([-2.0]), 1e-38)).all()


@pytest.mark.parametrize("forget, retain, named", [
    (math.nan, 0.5, "forget_loss_mean"), (math.inf, 0.5, "forget_loss_mean"), (1.0, -math.inf, "retain_value"),
    (1.0, math.nan, "retain_value")])
def test_objective_total_refuses_non_finite_terms(forget, retain, named):
    from markovsim.objectives import OBJECTIVES

    with pytest.raises(ValueError, match=f"{named} contains NaN or inf"):
        OBJECTIVES["NPO+RT"].total(torch.tensor(forget), torch.tensor(retain))


def test_an_overflowing_exact_run_still_stops_cleanly(exact_setup):
    """The package's own loss terms are combined unchecked, so an overflow is the divergence rule's to report."""
    from markovsim.objectives import OBJECTIVES

    trajectory = _exact_unlearn(exact_setup, objective=OBJECTIVES["GA"], reference=None, config=DynamicsConfig(
        optimizer="gd", learning_rate=1e307, steps=40, divergence_logp_per_token=None))
    assert trajectory.diverged_at is not None and "inf" in trajectory.divergence_reason.lower() + "nan"


# ---------------------------------------------------------------------------------------------
# A command line that fails after it started leaves --out as it found it
# ---------------------------------------------------------------------------------------------


def _folder_state(folder) -> dict:
    """``{relative path: file bytes, or None for a folder}`` of everything below ``folder`` ({} when absent)."""
    state = {}
    for root, folders, files in os.walk(folder):
        for name in folders:
            state[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                state[os.path.relpath(os.path.join(root, name), folder)] = file.read()
    return state


def _failing_stage(config, *args, **kwargs):
    """A command stage that writes what a run writes (a log, a model folder, a replaced file) and then fails."""
    (Path(config.out) / "metrics.jsonl").write_text('{"kind": "train", "step": 0}\n')
    (Path(config.out) / "model").mkdir(exist_ok=True)
    (Path(config.out) / "model" / "config.json").write_text("{}")
    (Path(config.out) / "notes.txt").unlink(missing_ok=True)
    raise RuntimeError("the stage failed")


@pytest.mark.parametrize("before", ["absent", "nested", "existing"])
def test_a_failed_llm_run_leaves_the_output_folder_as_it_found_it(tmp_path, monkeypatch, before):
    import llm.__main__ as cli

    monkeypatch.setitem(cli._COMMANDS, "pretrain", _failing_stage)
    out = tmp_path / "a" / "b" / "run" if before == "nested" else tmp_path / "run"
    if before == "existing":
        (out / "model").mkdir(parents=True)
        (out / "notes.txt").write_text("the user's notes")
        (out / "config.json").write_text('{"mine": true}')
        (out / "model" / "weights.bin").write_bytes(b"\x00\x01")
    listing, state = sorted(os.listdir(tmp_path)), _folder_state(out)
    with pytest.raises(RuntimeError, match="the stage failed"):
        cli.main(["pretrain", "--out", str(out), "--preset", "tiny-gpt2"] + LLM_COMMON)
    assert sorted(os.listdir(tmp_path)) == listing and _folder_state(out) == state


def test_a_failed_llm_run_that_saved_a_checkpoint_keeps_it_for_resume(tmp_path, monkeypatch):
    import llm.results

    def broken(*args, **kwargs):
        raise RuntimeError("writing the results failed")

    monkeypatch.setattr(llm.results, "strict_json", broken)
    out = tmp_path / "run"
    from llm.__main__ import main

    with pytest.raises(RuntimeError, match="writing the results failed"):
        main(["pretrain", "--out", str(out), "--preset", "tiny-gpt2", "--steps", "2", "--checkpoint-every", "1"]
             + LLM_COMMON)
    assert (out / "checkpoints" / "step-0000001" / "state.pt").is_file() and (out / "config.json").is_file()


def test_a_failed_llm_run_with_bad_input_after_start_leaves_no_folder(tmp_path, capsys):
    """``unlearn`` without --model fails after config.json was written: exit 2, and no folder is left."""
    from llm.__main__ import main

    assert main(["unlearn", "--out", str(tmp_path / "run")] + LLM_COMMON) == 2
    _one_error_line(capsys, "--model")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("before", ["nested", "existing"])
def test_a_failed_markovsim_run_leaves_the_output_folder_as_it_found_it(tmp_path, capsys, monkeypatch, before):
    import markovsim.__main__ as cli

    def broken(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(cli, "_plot", broken)
    out = tmp_path / "a" / "b" / "run" if before == "nested" else tmp_path / "run"
    if before == "existing":
        out.mkdir()
        (out / "results.json").write_text('{"an earlier": "run"}')
        (out / "notes.txt").write_text("the user's notes")
    listing, state = sorted(os.listdir(tmp_path)), _folder_state(out)
    with pytest.raises(RuntimeError, match="the plot failed"):
        markovsim_main(["run", "paper_short_forget2", "--out", str(out)] + TINY)
    assert sorted(os.listdir(tmp_path)) == listing and _folder_state(out) == state
