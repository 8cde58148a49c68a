"""llm.train: pre-training, unlearning with every objective, cached references, exact resume, errors.

The strongest check: ``llm.train.unlearn`` on the bridged TabularMarkov (full batches, Adam) follows
``markovsim.dynamics.unlearn`` step for step, for every named objective.
"""

import copy
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from llm.bridge import TabularCausalLM
from llm.data import encode
from llm.evaluate import Evaluator, model_sequence_logps_batched
from llm.logps import model_sequence_logps
from llm.metrics_log import read_jsonl
from llm.models import build_model
from llm.objective import BatchCounts, UnlearningBatch, objective_terms
from llm.train import TrainConfig, learning_rate_factor, pretrain, unlearn
from markovsim.dynamics import DynamicsConfig
from markovsim.dynamics import unlearn as exact_unlearn
from markovsim.evaluation import ExactEvaluator
from markovsim.losses import OBJECTIVES, Objective, get_objective
from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS, prepare
from markovsim.trajectory import Trajectory

CPU = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def pretrained(data):
    with torch_threads(1):
        model = build_model("tiny-gpt2", 11, 21, seed=0)
        history = pretrain(model, data["train"], TrainConfig(learning_rate=3e-3, batch_size=32, epochs=8, **CPU))
    return model, history


def forget_logp(trajectory: Trajectory) -> np.ndarray:
    """(E,) mean logp per token over the forget components at each evaluation."""
    columns = [trajectory.component_names.index(n) for n in ("forget1", "forget2")]
    return trajectory.component_metrics["logp_per_token"][:, columns].mean(1)


def test_pretraining_lowers_the_loss(pretrained):
    _, history = pretrained
    assert history.diverged_at is None and history.num_processes == 1
    assert len(history.losses) == 8 * (160 // 32)
    assert history.losses[-5:].mean() < history.losses[:5].mean() - 0.05


@pytest.mark.parametrize("name", list(OBJECTIVES) + ["WGA"])
def test_unlearning_with_each_objective_lowers_the_forget_likelihood(pretrained, data, name):
    objective = Objective("wga", alpha=1.0) if name == "WGA" else OBJECTIVES[name]
    model = copy.deepcopy(pretrained[0])
    config = TrainConfig(learning_rate=2e-3, batch_size=8, steps=6, eval_every=3, **CPU)
    trajectory = unlearn(model, objective, data["forget"], data["retain"], config)
    assert trajectory.diverged_at is None
    assert list(trajectory.steps) == [0, 3, 6]
    logp = forget_logp(trajectory)
    assert logp[-1] < logp[0] - 0.01
    weights = trajectory.component_metrics["mean_weight"]
    forget_columns = [trajectory.component_names.index(n) for n in ("forget1", "forget2")]
    assert np.all(np.isfinite(weights[:, forget_columns])) == (objective.forget != "wga")
    shares = trajectory.component_metrics["power_share"]
    assert np.all(np.isfinite(shares)) and np.allclose(shares.sum(1), 1.0)


def test_dpo_with_preferred_responses_lowers_the_forget_likelihood(pretrained, data):
    model = copy.deepcopy(pretrained[0])
    preferred = data["retain"].subset(np.arange(len(data["forget"])) % len(data["retain"]))
    trajectory = unlearn(model, Objective("dpo", beta=0.5), data["forget"], None,
                         TrainConfig(learning_rate=2e-3, batch_size=8, steps=4, eval_every=4, **CPU),
                         preferred=preferred)
    logp = forget_logp(trajectory)
    assert logp[-1] < logp[0]


def test_cached_reference_gives_the_live_reference_losses_and_gradients(pretrained, data):
    model = copy.deepcopy(pretrained[0])
    reference = copy.deepcopy(model).eval()
    forget = encode(data["forget"])
    cached, _ = model_sequence_logps_batched(model, forget, batch_size=64)  # once, for the whole forget set
    objective = get_objective("NPO", beta=0.5)
    results = []
    for rows in (np.array([3, 50, 70, 1]), np.array([60, 2, 5, 77])):  # mixed lengths 20 and 5
        batch = forget.batch(rows)
        with torch.no_grad():
            live, _ = model_sequence_logps(reference, batch)
        for ref in (cached[rows], live):
            model.zero_grad()
            terms = objective_terms(model, objective, UnlearningBatch(batch, ref, BatchCounts(len(rows))))
            terms.total.backward()
            results.append((terms.total.detach(), [p.grad.clone() for p in model.parameters()]))
    for (cached_loss, cached_grads), (live_loss, live_grads) in zip(results[::2], results[1::2]):
        torch.testing.assert_close(cached_loss, live_loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(cached_grads, live_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, optimizer, eps", [(name, "adamw", 1e-8) for name in OBJECTIVES]
                         + [(name, "adamw_legacy", 1e-6) for name in ("GA", "NPO", "SimNPO", "SimNPO+KL")])
def test_transformer_loop_on_the_bridged_tabular_model_follows_the_exact_simulator(name, optimizer, eps):
    setup = prepare(SCENARIOS["paper_short_forget2"].scaled(0.005), "tabular")
    objective, steps, learning_rate = OBJECTIVES[name], 6, 0.05
    exact = exact_unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference,
                          DynamicsConfig(optimizer=optimizer, adam_eps=eps, learning_rate=learning_rate, steps=steps,
                                         eval_every=1),
                          evaluator=ExactEvaluator(setup.test, setup.true_chains, reference=setup.reference))
    config = TrainConfig(optimizer=optimizer, adam_eps=eps, learning_rate=learning_rate, batch_size=len(setup.forget),
                         retain_batch_size=len(setup.retain), steps=steps, eval_every=1, max_grad_norm=None,
                         weight_decay=0.0, **CPU)
    ours = unlearn(TabularCausalLM(setup.reference), objective, setup.forget, setup.retain, config,
                   evaluator=Evaluator(setup.test, setup.true_chains))
    assert np.array_equal(ours.steps, exact.steps)
    for metric in ("kl_true", "logp_per_token", "mean_weight"):
        np.testing.assert_allclose(ours.component_metrics[metric], exact.component_metrics[metric],
                                   rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours.step_metrics["loss"], exact.step_metrics["loss"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours.step_metrics["parameter_distance"], exact.step_metrics["parameter_distance"],
                               rtol=1e-8, atol=1e-12)


def test_resuming_unlearning_from_a_checkpoint_reproduces_the_uninterrupted_run(pretrained, data, tmp_path):
    config = TrainConfig(learning_rate=1e-3, batch_size=6, steps=4, eval_every=1, checkpoint_every=2,
                         keep_checkpoints=5,
                         weight_decay=0.01, schedule="cosine", warmup_steps=1, **CPU)
    objective = get_objective("NPO+KL", beta=0.5)
    start = pretrained[0]
    full_model = copy.deepcopy(start)
    full = unlearn(full_model, objective, data["forget"], data["retain"], config, run_dir=tmp_path / "full")
    resumed_model = copy.deepcopy(start)
    resumed = unlearn(resumed_model, objective, data["forget"], data["retain"], config, run_dir=tmp_path / "resumed",
                      resume=tmp_path / "full" / "checkpoints" / "step-0000002")
    assert np.array_equal(full.steps, resumed.steps)
    for metric, values in full.component_metrics.items():
        np.testing.assert_array_equal(values, resumed.component_metrics[metric])
    for metric, values in full.step_metrics.items():
        np.testing.assert_array_equal(values, resumed.step_metrics[metric])
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    log = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in log if r["kind"] == "eval"] == [2, 3, 4]  # the part this run computed


def test_resuming_pretraining_with_resume_true_reproduces_the_uninterrupted_run(data, tmp_path):
    config = TrainConfig(learning_rate=3e-3, batch_size=32, steps=6, checkpoint_every=3, schedule="linear", **CPU)
    first, second = build_model("tiny-llama", 11, 21, seed=1), build_model("tiny-llama", 11, 21, seed=1)
    full = pretrain(first, data["train"], config, run_dir=tmp_path / "full")
    os.makedirs(tmp_path / "cut" / "checkpoints")
    os.replace(tmp_path / "full" / "checkpoints" / "step-0000003", tmp_path / "cut" / "checkpoints" / "step-0000003")
    resumed = pretrain(second, data["train"], config, run_dir=tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(full.losses, resumed.losses)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_resume_checks_the_starting_model_and_the_settings(pretrained, data, tmp_path):
    config = TrainConfig(batch_size=4, steps=2, checkpoint_every=1, **CPU)
    unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None, config, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run"):
        unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None, config, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="different model weights"):
        unlearn(build_model("tiny-gpt2", 11, 21, seed=9), OBJECTIVES["GA"], data["forget"], None, config,
                run_dir=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match=r"different settings \['learning_rate'\]"):
        unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None,
                TrainConfig(batch_size=4, steps=2, learning_rate=1.0, **CPU), run_dir=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="has no checkpoint"):
        unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None, config,
                run_dir=tmp_path / "empty", resume=True)


def test_run_directory_holds_metrics_trajectory_and_model(pretrained, data, tmp_path):
    config = TrainConfig(batch_size=4, steps=3, eval_every=2, **CPU)
    trajectory = unlearn(copy.deepcopy(pretrained[0]), get_objective("SimNPO", beta=4.0), data["forget"],
                         data["retain"],
                         config, evaluator=Evaluator(data["test"], data["chains"]), run_dir=tmp_path)
    assert list(trajectory.steps) == [0, 2, 3]
    loaded = Trajectory.load(tmp_path / "trajectory")
    np.testing.assert_array_equal(loaded.component_metrics["kl_true"], trajectory.component_metrics["kl_true"])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [0, 1, 2]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 3]
    assert os.path.isfile(tmp_path / "model" / "config.json")
    assert json.loads((tmp_path / "trajectory.json").read_text())["package_version"]


def test_non_finite_logits_stop_the_run_and_record_where(pretrained, data):
    model = copy.deepcopy(pretrained[0])
    calls = {"train": 0}

    def poison_third_training_forward(module, inputs, output):
        if module.training:
            calls["train"] += 1
            if calls["train"] >= 3:
                output.logits = torch.full_like(output.logits, float("nan"))
        return output

    model.register_forward_hook(poison_third_training_forward)
    evaluator = Evaluator(data["test"], data["chains"])
    trajectory = unlearn(model, OBJECTIVES["NPO"], data["forget"], None,
                         TrainConfig(batch_size=4, steps=5, eval_every=10, **CPU), evaluator=evaluator)
    assert trajectory.diverged_at == 2 and "NaN/inf" in trajectory.divergence_reason
    assert list(trajectory.steps) == [0, 2]
    assert np.all(np.isnan(trajectory.component_metrics["kl_true"][-1]))  # not evaluated once non-finite
    history = pretrain(model, data["train"], TrainConfig(batch_size=16, steps=3, **CPU))
    assert history.diverged_at == 0 and len(history.losses) == 1 and np.isnan(history.losses[0])


def test_a_non_finite_starting_model_is_rejected_as_reference(pretrained, data):
    model = copy.deepcopy(pretrained[0])
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="cannot serve as the reference"):
        unlearn(model, OBJECTIVES["NPO"], data["forget"], None, TrainConfig(batch_size=4, steps=1, **CPU))


def test_divergence_threshold_stops_runaway_unlearning(pretrained, data):
    trajectory = unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None,
                         TrainConfig(learning_rate=0.05, batch_size=8, steps=40, eval_every=50,
                                     divergence_logp_per_token=-5.0, **CPU))
    assert trajectory.diverged_at is not None and "fell below -5.0" in trajectory.divergence_reason
    assert trajectory.steps[-1] == trajectory.diverged_at


def test_clear_errors_for_bad_inputs(pretrained, data):
    model = pretrained[0]
    config = TrainConfig(batch_size=4, steps=1, **CPU)
    empty = data["forget"].subset(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="forget is empty"):
        unlearn(model, OBJECTIVES["GA"], empty, None, config)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        unlearn(build_model("tiny-gpt2", 12, 21), OBJECTIVES["GA"], data["forget"], None, config)
    with pytest.raises(ValueError, match="longer than the model's context"):
        pretrain(build_model("tiny-gpt2", 11, 8), data["train"], config)
    with pytest.raises(ValueError, match="pass a retain SequenceSet"):
        unlearn(model, OBJECTIVES["GradDiff"], data["forget"], None, config)
    with pytest.raises(TypeError, match="objective must be a markovsim.losses.Objective"):
        unlearn(model, "NPO", data["forget"], None, config)
    with pytest.raises(TypeError, match="config must be an llm.train.TrainConfig"):
        unlearn(model, OBJECTIVES["GA"], data["forget"], None, {"steps": 1})
    with pytest.raises(ValueError, match="preferred"):
        unlearn(model, Objective("dpo"), data["forget"], None, config, preferred=data["retain"].subset(np.arange(3)))
    with pytest.raises(TypeError, match="evaluator must be an llm.evaluate.Evaluator"):
        unlearn(model, OBJECTIVES["GA"], data["forget"], None, config, evaluator="test set")
    with pytest.raises(TypeError, match="model must be a causal LM"):
        pretrain("gpt2", data["train"], config)
    with pytest.raises(ValueError, match="bf16' is supported on CUDA only"):
        unlearn(copy.deepcopy(model), OBJECTIVES["GA"], data["forget"], None,
                TrainConfig(batch_size=4, steps=1, device="cpu", mixed_precision="bf16", progress=False))


INVALID_SETTINGS = [  # (field, bad value, exception): every TrainConfig field at least once
    ("optimizer", "sgd", ValueError), ("optimizer", 1, TypeError),
    ("learning_rate", -1.0, ValueError), ("learning_rate", "0.1", TypeError), ("learning_rate", math.inf, ValueError),
    ("batch_size", 0, ValueError), ("batch_size", 2.5, TypeError), ("batch_size", 2.0, TypeError),
    ("batch_size", True, TypeError), ("retain_batch_size", 0, ValueError), ("retain_batch_size", 1.5, TypeError),
    ("epochs", 0.0, ValueError), ("epochs", math.nan, ValueError), ("steps", -1, ValueError),
    ("steps", 3.0, TypeError), ("weight_decay", -0.1, ValueError), ("weight_decay", math.nan, ValueError),
    ("adam_betas", (0.9, 1.0), ValueError), ("adam_betas", (0.9,), ValueError), ("adam_betas", (-0.1, 0.9), ValueError),
    ("adam_betas", ("0.9", 0.9), TypeError), ("adam_eps", 0.0, ValueError), ("schedule", "step", ValueError),
    ("warmup_steps", -1, ValueError), ("warmup_steps", 1.5, TypeError), ("max_grad_norm", 0.0, ValueError),
    ("max_grad_norm", math.inf, ValueError), ("eval_every", 0, ValueError), ("eval_batch_size", 0, ValueError),
    ("checkpoint_every", 0, ValueError), ("keep_checkpoints", -1, ValueError), ("seed", -1, ValueError),
    ("seed", 1.5, TypeError), ("device", "tpu", ValueError), ("mixed_precision", "fp16", ValueError),
    ("progress", "no", TypeError), ("progress", 0, TypeError), ("num_threads", 0, ValueError),
    ("divergence_logp_per_token", math.nan, ValueError), ("divergence_logp_per_token", "-5", TypeError),
    ("track_forget_weights", 1, TypeError), ("track_power_share", "yes", TypeError),
    ("diagnostics_max_sequences", 0, ValueError), ("diagnostics_max_sequences", 2.5, TypeError),
    ("learning_rate", None, TypeError), ("batch_size", None, TypeError)]


@pytest.mark.parametrize("field, value, exception", INVALID_SETTINGS)
def test_train_config_validates_every_field(field, value, exception):
    with pytest.raises(exception, match=field):
        TrainConfig(**{field: value})


def test_the_validation_cases_cover_every_field():
    assert {f.name for f in dataclasses.fields(TrainConfig)} == {field for field, _, _ in INVALID_SETTINGS}


def test_valid_settings_are_kept_unchanged():
    config = TrainConfig(learning_rate=1, steps=0, retain_batch_size=None, adam_betas=[0.8, 0.9],
                         divergence_logp_per_token=-50, progress=False)
    assert config.learning_rate == 1 and config.steps == 0 and config.adam_betas == (0.8, 0.9)


def test_learning_rate_schedules():
    assert [learning_rate_factor(s, 10, "constant", 2) for s in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert learning_rate_factor(5, 10, "linear", 0) == pytest.approx(0.5)
    assert learning_rate_factor(5, 10, "cosine", 0) == pytest.approx(0.5)
    assert learning_rate_factor(10, 10, "cosine", 0) == pytest.approx(0.0)


def _checkpoint_of_a_short_run(pretrained, data, tmp_path) -> str:
    config = TrainConfig(batch_size=4, steps=2, checkpoint_every=1, **CPU)
    unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None, config, run_dir=tmp_path / "run")
    return os.path.join(tmp_path, "run", "checkpoints", "step-0000001")


def test_a_truncated_or_incomplete_checkpoint_is_a_value_error_naming_the_file(pretrained, data, tmp_path):
    from llm.checkpoint import load_checkpoint

    folder = _checkpoint_of_a_short_run(pretrained, data, tmp_path)
    state_file = os.path.join(folder, "state.pt")
    complete = open(state_file, "rb").read()
    state = torch.load(state_file, weights_only=True)
    del state["optimizer"]
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=r"state\.pt.*misses the keys \['optimizer'\]"):
        load_checkpoint(folder)
    with open(state_file, "wb") as file:
        file.write(complete[: len(complete) // 2])
    with pytest.raises(ValueError, match=r"state\.pt.*unreadable") as raised:
        load_checkpoint(folder)
    assert raised.value.__cause__ is not None
    with pytest.raises(ValueError, match=r"state\.pt"):  # through resume, too
        unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None,
                TrainConfig(batch_size=4, steps=2, checkpoint_every=1, **CPU), run_dir=tmp_path / "other",
                resume=folder)


def test_final_model_is_written_quietly_without_progress(pretrained, data, tmp_path, capfd):
    config = TrainConfig(batch_size=4, steps=1, eval_every=1, **CPU)  # CPU holds progress=False
    unlearn(copy.deepcopy(pretrained[0]), OBJECTIVES["GA"], data["forget"], None, config, run_dir=tmp_path / "run")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert not [p for p in os.listdir(tmp_path / "run") if p.endswith(".tmp")]
