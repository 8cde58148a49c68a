"""Replica checkpoints: a run killed after a checkpoint and resumed equals the uninterrupted run.

Reference: the same ``unlearn_replicas`` / ``pretrain_replicas`` call run without interruption; the
resumed run must give exactly (bit for bit on one machine) the same trajectories and final models.
"""

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from llm.checkpoint import latest_checkpoint
from llm.models import build_model, load_model
from llm.replica_pretraining import _PreTraining
from llm.replica_training import _Unlearning, pretrain_replicas, replica_folder, unlearn_replicas
from llm.train import TrainConfig
from markovsim.losses import get_objective
from markovsim.results import read_json
from markovsim.scenarios import SCENARIOS
from markovsim.trajectory import Trajectory

CONFIG = TrainConfig(optimizer="adamw_legacy", adam_eps=1e-6, weight_decay=0.0, max_grad_norm=None, learning_rate=1e-3,
                     batch_size=4, steps=5, eval_every=1, diagnostics_max_sequences=8, checkpoint_every=2,
                     device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny():
    train, _ = SCENARIOS["paper_short_forget2"].scaled(0.005).spec.sample()
    return {"forget": train.select("forget1", "forget2"), "retain": train.select("retain")}


@pytest.fixture(scope="module")
def setup():
    """Three tiny-synthetic starting models, three objectives, three configs (seeds and lrs differ)."""
    models = [build_model("tiny-synthetic", 11, 21, seed=seed) for seed in (0, 1, 2)]
    objectives = [get_objective("GA"), get_objective("NPO+RT", beta=0.2), get_objective("SimNPO", beta=2.5)]
    configs = [dataclasses.replace(CONFIG, seed=seed, learning_rate=lr)
               for seed, lr in ((0, 1e-3), (1, 5e-4), (2, 2e-3))]
    return models, objectives, configs


class Killed(Exception):
    """Stands for the process being killed."""


def run(setup, tiny, run_dir, **kwargs):
    models, objectives, configs = setup
    copies = [copy.deepcopy(m) for m in models]
    return copies, unlearn_replicas(copies, objectives, tiny["forget"], tiny["retain"], configs, run_dir=run_dir,
                                    **kwargs)


def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(setup, tiny, tmp_path, monkeypatch):
    full_models, full = run(setup, tiny, tmp_path / "full")
    after_forward = _Unlearning._after_forward

    def kill_at_step_3(self, step, *args):
        if step == 3:
            raise Killed
        return after_forward(self, step, *args)

    monkeypatch.setattr(_Unlearning, "_after_forward", kill_at_step_3)
    with pytest.raises(Killed):
        run(setup, tiny, tmp_path / "cut")
    monkeypatch.undo()
    assert os.path.basename(latest_checkpoint(tmp_path / "cut")) == "step-0000002"
    assert not os.path.exists(replica_folder(tmp_path / "cut", 0))  # killed before the end
    resumed_models, resumed = run(setup, tiny, tmp_path / "cut", resume=True)
    for i, (a, b) in enumerate(zip(full, resumed)):
        assert list(a.steps) == list(b.steps) == [0, 1, 2, 3, 4, 5]
        assert a.diverged_at == b.diverged_at
        for name in a.component_metrics:
            np.testing.assert_array_equal(a.component_metrics[name], b.component_metrics[name], err_msg=name)
        for name in a.step_metrics:
            np.testing.assert_array_equal(a.step_metrics[name], b.step_metrics[name], err_msg=name)
        for p, q in zip(full_models[i].parameters(), resumed_models[i].parameters()):
            assert torch.equal(p, q)
        saved = Trajectory.load(os.path.join(replica_folder(tmp_path / "cut", i), "trajectory"))
        np.testing.assert_array_equal(saved.component_metrics["kl_true"], b.component_metrics["kl_true"])


def test_resume_refuses_another_run(setup, tiny, tmp_path):
    models, objectives, configs = setup
    run_dir = tmp_path / "run"
    run(setup, tiny, run_dir)  # leaves checkpoints/step-0000004 and step-0000002
    with pytest.raises(ValueError, match="already holds replica checkpoints"):
        run(setup, tiny, run_dir)
    other = [copy.deepcopy(m) for m in models]
    with torch.no_grad():
        other[1].output.bias.add_(1.0)
    with pytest.raises(ValueError, match="replica 1 was started from different model weights"):
        unlearn_replicas(other, objectives, tiny["forget"], tiny["retain"], configs, run_dir=run_dir, resume=True)
    changed = [configs[0], dataclasses.replace(configs[1], seed=7), configs[2]]
    with pytest.raises(ValueError, match=r"replica 1 was written with different settings \['seed'\]"):
        unlearn_replicas([copy.deepcopy(m) for m in models], objectives, tiny["forget"], tiny["retain"], changed,
                         run_dir=run_dir, resume=True)
    with pytest.raises(ValueError, match="holds 3 replicas; this run has 2"):
        unlearn_replicas([copy.deepcopy(m) for m in models[:2]], objectives[:2], tiny["forget"], tiny["retain"],
                         configs[:2], run_dir=run_dir, resume=True)
    with pytest.raises(ValueError, match="needs run_dir"):
        unlearn_replicas([copy.deepcopy(m) for m in models], objectives, tiny["forget"], tiny["retain"], configs,
                         resume=True)
    with pytest.raises(ValueError, match="has no checkpoint"):
        run(setup, tiny, tmp_path / "empty", resume=True)


# ---------------------------------------------------------------------------------------------
# Pre-training replicas
# ---------------------------------------------------------------------------------------------

PRETRAIN = TrainConfig(learning_rate=3e-3, batch_size=16, steps=5, checkpoint_every=2, device="cpu", progress=False)


def pretrain_run(run_dir, configs, **kwargs):
    models = [build_model("tiny-synthetic", 11, 21, seed=seed) for seed in (0, 1)]
    train, _ = SCENARIOS["paper_short_forget2"].scaled(0.005).spec.sample()
    return models, pretrain_replicas(models, train, configs, run_dir=run_dir, **kwargs)


def test_killed_and_resumed_pretraining_replicas_equal_the_uninterrupted_run(tmp_path, monkeypatch):
    configs = [dataclasses.replace(PRETRAIN, seed=seed, learning_rate=lr) for seed, lr in ((0, 3e-3), (1, 1e-3))]
    full_models, full = pretrain_run(tmp_path / "full", configs)
    losses = _PreTraining.losses

    def kill_at_step_3(self, step):
        if step == 3:
            raise Killed
        return losses(self, step)

    monkeypatch.setattr(_PreTraining, "losses", kill_at_step_3)
    with pytest.raises(Killed):
        pretrain_run(tmp_path / "cut", configs)
    monkeypatch.undo()
    assert os.path.basename(latest_checkpoint(tmp_path / "cut")) == "step-0000002"
    assert not os.path.exists(replica_folder(tmp_path / "cut", 0))
    resumed_models, resumed = pretrain_run(tmp_path / "cut", configs, resume=True)
    for i, (a, b) in enumerate(zip(full, resumed)):
        assert list(a.steps) == list(b.steps) == [0, 1, 2, 3, 4]
        for key in ("losses", "learning_rates", "grad_norms"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
        for p, q in zip(full_models[i].parameters(), resumed_models[i].parameters()):
            assert torch.equal(p, q)
        saved = read_json(os.path.join(replica_folder(tmp_path / "cut", i), "history.json"))
        assert saved["history"]["losses"] == b.losses.tolist() and saved["config"]["seed"] == configs[i].seed
        assert saved["package_version"]
        reloaded = load_model(os.path.join(replica_folder(tmp_path / "cut", i), "model"), progress=False)
        for p, q in zip(reloaded.parameters(), resumed_models[i].parameters()):
            assert torch.equal(p, q)


def test_pretraining_resume_refuses_another_run(tmp_path):
    configs = [dataclasses.replace(PRETRAIN, seed=seed) for seed in (0, 1)]
    pretrain_run(tmp_path / "run", configs)
    with pytest.raises(ValueError, match="already holds replica checkpoints"):
        pretrain_run(tmp_path / "run", configs)
    changed = [configs[0], dataclasses.replace(configs[1], learning_rate=1e-2)]
    with pytest.raises(ValueError, match=r"replica 1 was written with different settings \['learning_rate'\]"):
        pretrain_run(tmp_path / "run", changed, resume=True)
    unlearning_checkpoint = tmp_path / "unlearn"
    models = [build_model("tiny-synthetic", 11, 21, seed=seed) for seed in (0, 1)]
    train, _ = SCENARIOS["paper_short_forget2"].scaled(0.005).spec.sample()
    unlearn_replicas(models, [get_objective("GA")] * 2, train.select("forget1", "forget2"), None,
                     [dataclasses.replace(CONFIG, seed=seed) for seed in (0, 1)], run_dir=unlearning_checkpoint)
    with pytest.raises(ValueError, match="is from a 'unlearn_replicas' run, not 'pretrain_replicas'"):
        pretrain_run(tmp_path / "other", configs, resume=latest_checkpoint(unlearning_checkpoint))
