"""The TOFU protocol end to end at tiny scale: a random 2-layer Llama with a word-level chat tokenizer,
forget01 with 6 retain pairs, one or two steps per stage, every stage, resume, LoRA, the command line."""

import json
import os

import pytest

from llm.tofu import __main__ as cli
from llm.tofu.evaluate import evaluate_model, load_eval_sets
from llm.tofu.protocol import Protocol, ProtocolConfig
from llm.tofu.protocol_config import DEFAULT_METHODS, method_objective, official_settings

TINY = ["--limit", "4", "--batch-size", "4", "--finetune-steps", "2", "--unlearn-steps", "1",
        "--max-new-tokens", "3", "--eval-batch-size", "64", "--no-progress", "--device", "cpu",
        "--relearn-steps", "0", "1"]


def _strict(path):
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


# Every number of the official TOFU settings (NPO / SimNPO papers' TOFU code), per (objective, split):
# (forget loss, retain term, beta, gamma, forget weight, retain weight); None = the field is not set.
OFFICIAL = {
    ("NPO+RT", "forget05"): ("npo", "nll", 0.1, None, 1.0, 1.0),
    ("NPO+RT", "forget10"): ("npo", "nll", 0.1, None, 1.0, 1.0),
    ("SimNPO+RT", "forget05"): ("simnpo", "nll", 2.5, 0.0, 0.1375, 1.0),
    ("SimNPO+RT", "forget10"): ("simnpo", "nll", 4.5, 0.0, 0.125, 1.0),
    ("SimNPO+RT", "forget01"): ("simnpo", "nll", 2.5, 0.0, 0.1375, 1.0),  # no official forget01: forget05's
    ("SimNPO+KL", "forget10"): ("simnpo", "kl", 4.5, 0.0, 0.125, 1.0),
    ("NPO", "forget10"): ("npo", None, 0.1, None, 1.0, None),
    # the 2x2 cells (no official rows): NPO-ave with SimNPO's settings, SimNPO-sum with NPO's
    ("NPO-ave+RT", "forget05"): ("npo_ave", "nll", 2.5, 0.0, 0.1375, 1.0),
    ("NPO-ave+RT", "forget10"): ("npo_ave", "nll", 4.5, 0.0, 0.125, 1.0),
    ("SimNPO-sum+RT", "forget10"): ("simnpo_sum", "nll", 0.1, 0.0, 1.0, 1.0),
    ("SimNPO-sum", "forget05"): ("simnpo_sum", None, 0.1, 0.0, 1.0, None),
    ("NPO+KL", "forget05"): ("npo", "kl", 0.1, None, 1.0, 1.0),
    ("SimNPO", "forget05"): ("simnpo", None, 2.5, 0.0, 1.0, None),
    ("SimNPO", "forget10"): ("simnpo", None, 4.5, 0.0, 1.0, None),
    ("GradDiff", "forget10"): ("ga", "nll", None, None, 1.0, 1.0),
    ("GA", "forget05"): ("ga", None, None, None, 1.0, None),
}


@pytest.mark.parametrize("method, split", list(OFFICIAL))
def test_official_tofu_settings(method, split):
    forget, retain, beta, gamma, forget_weight, retain_weight = OFFICIAL[method, split]
    expected = {"forget_weight": forget_weight, "retain_weight": retain_weight, "beta": beta, "gamma": gamma}
    assert official_settings(method, split) == {k: v for k, v in expected.items() if v is not None}
    objective = method_objective(method, split)
    assert (objective.forget, objective.retain, objective.forget_weight) == (forget, retain, forget_weight)
    for field in ("beta", "gamma", "retain_weight"):
        if expected[field] is not None:
            assert getattr(objective, field) == expected[field], field


def test_the_protocol_defaults_are_the_papers_tofu_rows():
    config = ProtocolConfig()
    assert config.methods == DEFAULT_METHODS == ("GradDiff", "NPO+RT", "SimNPO+RT")
    assert (config.split, config.unlearn_lr, config.unlearn_epochs, config.unlearn_steps, config.batch_size) == (
        "forget10", 1e-5, 10.0, None, 32)
    unlearn = config.train_config("unlearn", 400)  # forget10: 400 pairs, 12 steps per epoch at batch 32
    assert (unlearn.learning_rate, unlearn.epochs, unlearn.batch_size, unlearn.weight_decay, unlearn.schedule,
            unlearn.warmup_steps) == (1e-5, 10.0, 32, 0.01, "linear", 12)
    assert ProtocolConfig(unlearn_steps=5).train_config("unlearn", 400).warmup_steps == 0  # a step count: no warm-up
    assert cli.build_parser().parse_args(["run", "--out", "x"]).methods == list(DEFAULT_METHODS)
    with pytest.raises(ValueError, match="registry method"):
        official_settings("KGA", "forget10")
    with pytest.raises(ValueError, match="unknown split"):
        official_settings("NPO+RT", "forget20")


def test_the_cpu_preset_sets_its_settings_and_flags_beside_it_win(tmp_path, capsys):
    from llm.tofu.protocol_config import PRESETS

    args = cli.build_parser("cpu").parse_args(["run", "--out", "x"])
    config = cli.config_from_args(args)
    for field, value in PRESETS["cpu"].items():
        assert getattr(config, field) == value, field
    assert config.methods == DEFAULT_METHODS and config.finetune_lr == ProtocolConfig().finetune_lr  # the rest
    # through main: the preset is found first, then an explicit flag overrides it
    out = tmp_path / "run"
    assert cli.main(["stages", "--preset", "cpu", "--unlearn-lr", "2e-5", "--out", str(out)]) == 0
    saved = _strict(out / "config.json")
    assert (saved["split"], saved["limit"], saved["unlearn_lr"], saved["relearn_steps"]) == ("forget01", 20, 2e-5,
                                                                                          [0, 10])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse refuses the name, listing the choices
        cli.main(["stages", "--preset", "gpu", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset"):
        cli.build_parser("gpu")


def test_evaluate_model_gives_every_metric(base):
    from llm.tofu.model import load_causal_lm

    model, tokenizer = load_causal_lm(base)
    sets = {k: v[:3] for k, v in load_eval_sets("forget01", limit=3).items()}
    result = evaluate_model(model, tokenizer, sets=sets, max_new_tokens=2, batch_size=64)
    assert set(result["sets"]) == {"forget", "retain", "real_authors", "world_facts"}
    assert len(result["utility_components"]) == 9 and 0 <= result["model_utility"] <= 1
    assert len(result["sets"]["forget"]["truth_ratios"]) == 3


def test_run_all_stages_then_resume_after_a_kill(base, tmp_path, capsys, monkeypatch):
    from scipy import stats

    out = tmp_path / "run"
    argv = ["run", "--split", "forget01", "--methods", "NPO", "SimNPO+RT", "--out", str(out), "--model", base] + TINY
    assert cli.main(argv) == 0
    results = _strict(out / "results.json")
    assert list(results["models"]) == ["target", "retain", "npo", "simnpo-rt"]
    assert list(results["differences"]) == ["SimNPO+RT - NPO"]  # each later method minus each earlier one
    difference = results["differences"]["SimNPO+RT - NPO"]["forget_gap_closed"]
    assert difference["difference"] == pytest.approx(results["models"]["simnpo-rt"]["forget_gap_closed"]
                                                     - results["models"]["npo"]["forget_gap_closed"])
    assert results["models"]["retain"]["forget_quality"] == pytest.approx(1.0)
    retain_ratios = _strict(out / "stages" / "eval-retain.json")["result"]["sets"]["forget"]["truth_ratios"]
    for name in ("target", "npo", "simnpo-rt"):  # each model's own truth ratios against the retain model's
        ratios = _strict(out / "stages" / f"eval-{name}.json")["result"]["sets"]["forget"]["truth_ratios"]
        expected = stats.ks_2samp(ratios, retain_ratios).pvalue
        assert results["models"][name]["forget_quality"] == pytest.approx(expected, rel=1e-12), name
    assert results["config"]["split"] == "forget01" and results["package"]["name"] == "simnpo-companion"
    assert results["stages"]["target"]["num_items"] == 44 and results["stages"]["unlearn-npo"]["steps"] == 1
    assert "| SimNPO+RT |" in (out / "results.md").read_text()
    # a kill during the last stages: their records are gone; earlier stages must not be recomputed (every stage's
    # work goes through one of these methods: a spy records which ran)
    computed = []
    for method in ("_finetune", "_unlearn", "_evaluate", "_relearn"):
        original = getattr(Protocol, method)
        monkeypatch.setattr(Protocol, method, lambda self, name, _original=original, _method=method:
                            computed.append((_method, name)) or _original(self, name))
    for stage in ("eval-simnpo-rt", "report"):
        os.remove(out / "stages" / f"{stage}.json")
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == ["eval-simnpo-rt", "report"]
    assert computed == [("_evaluate", "simnpo-rt")]
    assert _strict(out / "results.json")["models"].keys() == results["models"].keys()


def test_lora_variant_and_single_stages(base, tmp_path):
    config = ProtocolConfig(split="forget01", methods=("GradDiff",), model=base, limit=4, batch_size=4,
                            finetune_steps=1, unlearn_steps=1, max_new_tokens=2, eval_batch_size=64, lora=True,
                            progress=False, device="cpu", relearn_steps=(1,))
    protocol = Protocol(config, tmp_path / "lora")
    with pytest.raises(ValueError, match="needs stage"):
        protocol.run_stage("unlearn-graddiff")
    protocol.run(["target", "unlearn-graddiff"])
    assert protocol.done("unlearn-graddiff") and not protocol.done("retain")
    saved = json.loads((protocol.model_path("graddiff") / "config.json").read_text())
    assert "peft" not in json.dumps(saved).lower()  # adapters merged: a plain checkpoint
    protocol.run()
    assert _strict(tmp_path / "lora" / "results.json")["config"]["lora"] is True


@pytest.mark.parametrize("extra, message", [
    (["--methods", "Nope"], "unknown method"),
    (["--limit", "0"], "limit must be"),
    (["--model", "/nonexistent/model"], ""),
])
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, extra, message):
    argv = ["run", "--split", "forget01", "--out", str(tmp_path / "x"), "--no-progress"] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_changed_settings_are_refused(base, tmp_path, capsys):
    out = str(tmp_path / "r")
    Protocol(ProtocolConfig(split="forget01", model=base, limit=4), out)
    assert cli.main(["stages", "--split", "forget01", "--model", base, "--limit", "5", "--out", out]) == 2
    assert "different settings (limit)" in capsys.readouterr().err
