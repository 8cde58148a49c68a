"""``--checkpoint-every`` resume inside a TOFU training stage: a run killed mid-stage, started again with the
same command, ends with exactly the models, losses and results of a run that was never interrupted.

The kill is an exception raised from the training loop at a chosen step of a chosen stage (after a
checkpoint and one more update that the checkpoint does not hold), once in the fine-tuning of the
target model and once in NPO+RT unlearning (whose cached reference log-probs are recomputed from the
reloaded target on resume). A checkpoint holds the model, AdamW and schedule states and the RNG state;
the batch of step s is a function of (seed, s); on CPU every operation is deterministic. So the resumed
run must reproduce the uninterrupted one bit for bit: weights and logged losses are compared exactly.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from llm.session import Session
from llm.tofu import __main__ as cli

TINY = ["--split", "forget01", "--methods", "NPO+RT", "--limit", "4", "--batch-size", "4", "--finetune-steps", "5",
        "--unlearn-steps", "5", "--checkpoint-every", "2", "--max-new-tokens", "3", "--eval-batch-size", "64",
        "--relearn-steps", "0", "1", "--no-progress", "--device", "cpu"]


class Killed(Exception):
    """Stands for the process being killed (not one of the errors the command line turns into exit 2)."""


def _kill_at(monkeypatch, kind: str, step: int, calls: list) -> None:
    """Make the training loop of a ``kind`` session ("tofu-finetune" / "tofu-unlearn") raise at ``step``, once."""
    original = Session.forward_backward

    def forward_backward(self, forward, at, backward):
        calls.append((self.kind, at))
        if self.kind == kind and at == step and not any(c == ("killed", kind) for c in calls):
            calls.append(("killed", kind))
            raise Killed(f"{kind} step {step}")
        return original(self, forward, at, backward)

    monkeypatch.setattr(Session, "forward_backward", forward_backward)


def _train_losses(path) -> list[tuple[int, float]]:
    return [(r["step"], r["total"]) for r in map(json.loads, open(path)) if r.get("kind") == "train"]


def test_a_stage_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(base, tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(["run", "--out", str(straight), "--model", base] + TINY) == 0

    argv = ["run", "--out", str(killed), "--model", base] + TINY
    calls = []
    _kill_at(monkeypatch, "tofu-finetune", 3, calls)  # steps 0-2 updated, checkpoint after step 1 (step-0000002)
    with pytest.raises(Killed):
        cli.main(argv)
    assert (killed / "work" / "target" / "checkpoints" / "step-0000002" / "state.pt").is_file()
    assert not (killed / "stages" / "target.json").exists()
    monkeypatch.undo()

    calls.clear()
    _kill_at(monkeypatch, "tofu-unlearn", 3, calls)  # the same command: resumes target at step 2, then dies in NPO+RT
    with pytest.raises(Killed):
        cli.main(argv)
    assert [at for kind, at in calls if kind == "tofu-finetune"][:3] == [2, 3, 4]  # target resumed, not restarted
    assert (killed / "stages" / "target.json").is_file() and (killed / "stages" / "retain.json").is_file()
    assert (killed / "work" / "npo-rt" / "checkpoints" / "step-0000002").is_dir()
    monkeypatch.undo()

    calls.clear()
    _kill_at(monkeypatch, "none", -1, calls)  # only records the steps run
    assert cli.main(argv) == 0
    assert [at for kind, at in calls if kind == "tofu-unlearn"] == [2, 3, 4]  # resumed inside the unlearning stage

    for name in ("target", "retain", "npo-rt"):
        expected, got = (load_file(path / "models" / name / "model.safetensors") for path in (straight, killed))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name} {key}"
        assert (_train_losses(killed / "work" / name / "metrics.jsonl")
                == _train_losses(straight / "work" / name / "metrics.jsonl"))
    assert [s for s, _ in _train_losses(killed / "work" / "npo-rt" / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    results = [json.loads((path / "results.json").read_text()) for path in (straight, killed)]
    assert results[1]["models"] == results[0]["models"]
