"""The TOFU protocol end to end at tiny scale: a random 2-layer Llama with a word-level chat tokenizer,
forget01 with 6 retain pairs, one or two steps per stage, every stage, resume, LoRA, the command line."""

import json
import os

import pytest

from llm.tofu import __main__ as cli
from llm.tofu.evaluate import evaluate_model, load_eval_sets
from llm.tofu.protocol import Protocol, ProtocolConfig, method_objective

TINY = ["--limit", "4", "--batch-size", "4", "--finetune-steps", "2", "--unlearn-steps", "1",
        "--max-new-tokens", "3", "--eval-batch-size", "64", "--no-progress", "--device", "cpu",
        "--relearn-steps", "0", "1"]


def _strict(path):
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def test_official_simnpo_settings():
    assert method_objective("SimNPO+RT", "forget05").beta == 2.5
    assert method_objective("SimNPO+RT", "forget05").forget_weight == 0.1375
    objective = method_objective("SimNPO+RT", "forget10")
    assert (objective.beta, objective.gamma, objective.forget_weight, objective.retain_weight) == (4.5, 0, 0.125, 1)
    assert method_objective("NPO", "forget10").beta == 0.1


def test_evaluate_model_gives_every_metric(base):
    from llm.tofu.model import load_causal_lm

    model, tokenizer = load_causal_lm(base)
    sets = {k: v[:3] for k, v in load_eval_sets("forget01", limit=3).items()}
    result = evaluate_model(model, tokenizer, sets=sets, max_new_tokens=2, batch_size=64)
    assert set(result["sets"]) == {"forget", "retain", "real_authors", "world_facts"}
    assert len(result["utility_components"]) == 9 and 0 <= result["model_utility"] <= 1
    assert len(result["sets"]["forget"]["truth_ratios"]) == 3


def test_run_all_stages_then_resume_after_a_kill(base, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--split", "forget01", "--methods", "NPO", "SimNPO+RT", "--out", str(out), "--model", base] + TINY
    assert cli.main(argv) == 0
    results = _strict(out / "results.json")
    assert list(results["models"]) == ["target", "retain", "npo", "simnpo-rt"]
    assert results["models"]["retain"]["forget_quality"] == pytest.approx(1.0)
    assert results["config"]["split"] == "forget01" and results["package"]["name"] == "simnpo-companion"
    assert results["stages"]["target"]["num_items"] == 44 and results["stages"]["unlearn-npo"]["steps"] == 1
    assert "| SimNPO+RT |" in (out / "results.md").read_text()
    # a kill during the last stages: their records are gone; earlier stages must not be recomputed
    times = {s: os.path.getmtime(out / "stages" / f"{s}.json") for s in ("target", "retain", "unlearn-npo")}
    for stage in ("eval-simnpo-rt", "report"):
        os.remove(out / "stages" / f"{stage}.json")
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == ["eval-simnpo-rt", "report"]
    assert times == {s: os.path.getmtime(out / "stages" / f"{s}.json") for s in times}
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
