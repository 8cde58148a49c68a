"""llm.replicas / llm.replica_training: every replica equals its own single run.

References: ``llm.train.pretrain`` / ``llm.train.unlearn`` run once per replica with that replica's
seed, objective and learning rate (float32, CPU, rtol 1e-5); ``torch.optim.AdamW`` and
``markovsim.optimizers.LegacyAdamW`` step by step for the stacked optimizer; N separate forward
passes and per-model autograd for the stacked and vmap routes.
"""

import contextlib
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm import replica_evaluation, replica_training
from llm.data import encode
from llm.diagnostics import Diagnostics
from llm.evaluate import Evaluator
from llm.models import build_model
from llm.replica_evaluation import replica_test_metrics
from llm.replica_training import pretrain_replicas, replica_configs, unlearn_replicas
from llm.replicas import ReplicaStack, StackedAdamSettings, StackedAdamW
from llm.train import TrainConfig, pretrain, unlearn
from markovsim.data import concatenate
from markovsim.losses import get_objective
from markovsim.optimizers import LegacyAdamW
from markovsim.scenarios import SCENARIOS

CPU = {"device": "cpu", "progress": False}
RTOL, ATOL = 1e-5, 1e-7
UNLEARNING = TrainConfig(optimizer="adamw_legacy", adam_eps=1e-6, weight_decay=0.0, max_grad_norm=None,
                         learning_rate=5e-4, batch_size=4, steps=4, eval_every=1, diagnostics_max_sequences=8, **CPU)


@pytest.fixture(scope="module")
def tiny():
    """paper_short_forget2 at 0.5% scale: 80 training sequences (40 retain, 20 + 20 forget)."""
    train, _ = SCENARIOS["paper_short_forget2"].scaled(0.005).spec.sample()
    return {"train": train, "forget": train.select("forget1", "forget2"), "retain": train.select("retain")}


def three_models(preset: str) -> list:
    return [build_model(preset, 11, 21, seed=seed) for seed in (0, 1, 2)]


def assert_same_trajectory(batched, single) -> None:
    assert list(batched.steps) == list(single.steps)
    assert batched.diverged_at == single.diverged_at and batched.divergence_reason == single.divergence_reason
    assert batched.component_names == single.component_names
    assert set(batched.component_metrics) == set(single.component_metrics)
    for name, values in single.component_metrics.items():
        np.testing.assert_allclose(batched.component_metrics[name], values, rtol=RTOL, atol=ATOL, err_msg=name)
    for name, values in single.step_metrics.items():
        np.testing.assert_allclose(batched.step_metrics[name], values, rtol=RTOL, atol=ATOL, err_msg=name)


def assert_same_parameters(model, other) -> None:
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# The stack and its optimizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, route, expected_route", [("tiny-synthetic", None, "stacked"),
                                                            ("tiny-synthetic", "vmap", "vmap"),
                                                            ("tiny-gpt2", None, "loop")])
def test_stack_logits_and_gradients_equal_each_models_own(tiny, preset, route, expected_route):
    """Logits of every replica = its model's forward; gradients of a loss of all replicas' logits =
    each model's own autograd gradients (checks the stacked route's hand-written backward)."""
    models = three_models(preset)
    stack = ReplicaStack(models, route)
    assert stack.route == expected_route and stack.num_replicas == 3
    encoded = encode(tiny["forget"], "response")
    batches = [encoded.batch(rows) for rows in ([0, 1, 2], [3, 4, 5], [6, 7, 8, 9])]  # rows and widths differ
    weights = [torch.randn(1, 1, 11, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    total = 0.0
    for logits, model, batch, weight in zip(stack.logits(batches), models, batches, weights):
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
        (expected.tanh() * weight).sum().backward()
        total = total + (logits.tanh() * weight).sum()
    total.backward()
    for i, model in enumerate(models):
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(stack.parameters[name].grad[i], parameter.grad, rtol=1e-5, atol=1e-6,
                                       msg=name)


def stacked_and_single(rule: str, kernel: str = "auto", shared: bool = False):
    """3 replicas of a (5, 4) matrix and a (4,) vector with different lr, betas, eps, weight decay (``shared``:
    the same, as seeds)."""
    generator = torch.Generator().manual_seed(0)
    matrix, vector = torch.randn(3, 5, 4, generator=generator), torch.randn(3, 4, generator=generator)
    settings = StackedAdamSettings(rule, ((0.9, 0.999), (0.8, 0.99), (0.95, 0.9)), (1e-8, 1e-6, 1e-3), (0.01, 0.0, 0.1))
    if shared:
        settings = StackedAdamSettings(rule, ((0.8, 0.99),) * 3, (1e-6,) * 3, (0.1,) * 3)
    stacked = {"matrix": matrix.clone().requires_grad_(True), "vector": vector.clone().requires_grad_(True)}
    singles, optimizers = [], []
    for i in range(3):
        params = [matrix[i].clone().requires_grad_(True), vector[i].clone().requires_grad_(True)]
        groups = [{"params": [params[0]], "weight_decay": settings.weight_decays[i]},
                  {"params": [params[1]], "weight_decay": 0.0}]
        kind = torch.optim.AdamW if rule == "adamw" else LegacyAdamW
        optimizers.append(kind(groups, lr=1.0, betas=settings.betas[i], eps=settings.eps[i]))
        singles.append(params)
    return stacked, StackedAdamW(stacked, settings, kernel), singles, optimizers


@pytest.mark.parametrize("rule, kernel, block, shared", [
    ("adamw", "fused", None, False), ("adamw_legacy", "fused", None, False), ("adamw", "fused", None, True),
    ("adamw_legacy", "fused", None, True), ("adamw", "blocked", None, False), ("adamw_legacy", "blocked", None, False),
    ("adamw_legacy", "blocked", 7, False)])
def test_stacked_adamw_equals_the_single_run_optimizer_step_by_step(rule, kernel, block, shared, monkeypatch):
    """Shared settings: the fused kernel updates all three replicas in one call per group of parameters while
    they step together, and replicas 0 and 2 in calls of their own once replica 1 has stopped."""
    if block is not None:  # blocks of 7 // 3 = 2 columns: the matrix's 20 columns in 10 blocks, the vector's in 2
        monkeypatch.setattr("llm.replica_adam.ADAM_BLOCK", block)
    stacked, optimizer, singles, optimizers = stacked_and_single(rule, kernel, shared)
    assert optimizer.kernel == kernel
    generator = torch.Generator().manual_seed(1)
    learning_rates = [1e-3] * 3 if shared else [1e-3, 5e-2, 2e-4]
    for step in range(6):
        active = [True, step < 3, True]  # replica 1 stops after 3 steps (as a diverged replica)
        grads = {name: torch.randn(value.shape, generator=generator) * 10.0 ** -step for name, value in stacked.items()}
        for name, value in stacked.items():
            value.grad = grads[name].clone()
        optimizer.step(learning_rates, active)
        for i in range(3):
            if not active[i]:
                continue
            for group in optimizers[i].param_groups:
                group["lr"] = learning_rates[i]
            for param, grad in zip(singles[i], (grads["matrix"][i], grads["vector"][i])):
                param.grad = grad.clone()
            optimizers[i].step()
        for i in range(3):
            torch.testing.assert_close(stacked["matrix"][i].detach(), singles[i][0].detach(), rtol=1e-6, atol=0)
            torch.testing.assert_close(stacked["vector"][i].detach(), singles[i][1].detach(), rtol=1e-6, atol=0)
    assert optimizer.steps == [6, 3, 6]


def test_stacked_adamw_refuses_an_unknown_or_unavailable_kernel(monkeypatch):
    stacked, _, _, _ = stacked_and_single("adamw")
    settings = StackedAdamSettings("adamw", ((0.9, 0.999),) * 3, (1e-8,) * 3, (0.0,) * 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        StackedAdamW(stacked, settings, kernel="fast")
    monkeypatch.setattr("markovsim.optimizers._FUSED_ADAMW", None)  # a PyTorch without the fused CPU kernel
    with pytest.raises(ValueError, match="kernel='fused' needs"):
        StackedAdamW(stacked, settings, kernel="fused")
    assert StackedAdamW(stacked, settings).kernel == "blocked"


def test_bad_input_raises_clear_errors(tiny):
    with pytest.raises(ValueError, match="at least one"):
        ReplicaStack([])
    with pytest.raises(ValueError, match="different architecture"):
        ReplicaStack([build_model("tiny-synthetic", 11, 21), build_model("tiny-synthetic", 11, 31)])
    with pytest.raises(ValueError, match="vmap route"):
        ReplicaStack([build_model("tiny-gpt2", 11, 21)], route="vmap")
    with pytest.raises(ValueError, match="stacked route"):
        ReplicaStack([build_model("tiny-gpt2", 11, 21)], route="stacked")
    with pytest.raises(ValueError, match="objectives for 3 replicas"):
        unlearn_replicas(three_models("tiny-synthetic"), [get_objective("GA")] * 2, tiny["forget"], None, UNLEARNING)
    with pytest.raises(ValueError, match="N >= 1"):
        replica_configs(UNLEARNING, 0)
    with pytest.raises(ValueError, match="must share"):
        replica_configs([UNLEARNING, dataclasses.replace(UNLEARNING, steps=5)], 2)


# ---------------------------------------------------------------------------------------------
# Every replica equals its own single run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-gpt2"])
def test_pretrain_replicas_equal_single_runs(tiny, preset):
    configs = [TrainConfig(learning_rate=lr, batch_size=16, steps=5, seed=seed, **CPU)
               for seed, lr in ((0, 3e-3), (1, 1e-3), (2, 5e-3))]
    models = three_models(preset)
    singles = [copy.deepcopy(m) for m in models]
    histories = pretrain_replicas(models, tiny["train"], configs)
    for model, single, config, history in zip(models, singles, configs, histories):
        expected = pretrain(single, tiny["train"], config)
        assert history.diverged_at is None and list(history.steps) == list(expected.steps)
        for key in ("losses", "learning_rates", "grad_norms"):
            np.testing.assert_allclose(getattr(history, key), getattr(expected, key), rtol=RTOL, err_msg=key)
        assert_same_parameters(model, single)


@pytest.mark.parametrize("preset, optimizer", [("tiny-synthetic", "adamw_legacy"), ("tiny-gpt2", "adamw")])
def test_unlearn_replicas_equal_single_runs(tiny, preset, optimizer):
    objectives = ([get_objective("GA"), get_objective("NPO+RT", beta=0.2), get_objective("SimNPO", beta=2.5)]
                  if preset == "tiny-synthetic" else  # the loop route also with a live KL reference
                  [get_objective("GradDiff"), get_objective("NPO+KL", beta=0.2), get_objective("SimNPO", beta=2.5)])
    configs = [dataclasses.replace(UNLEARNING, optimizer=optimizer, seed=seed, learning_rate=lr,
                                   max_grad_norm=1.0 if optimizer == "adamw" else None)
               for seed, lr in ((0, 1e-3), (1, 5e-4), (2, 2e-3))]
    models = three_models(preset)
    singles = [copy.deepcopy(m) for m in models]
    trajectories = unlearn_replicas(models, objectives, tiny["forget"], tiny["retain"], configs)
    for i, trajectory in enumerate(trajectories):
        expected = unlearn(singles[i], objectives[i], tiny["forget"], tiny["retain"], configs[i])
        assert trajectory.info["route"] == ("stacked" if preset == "tiny-synthetic" else "loop")
        assert_same_trajectory(trajectory, expected)
        assert_same_parameters(models[i], singles[i])


@pytest.mark.parametrize("route", ["stacked", "vmap"])
def test_forget_only_replicas_take_the_loop_free_step_and_equal_single_runs(tiny, monkeypatch, route):
    """GA / NPO (two betas) / SimNPO without retain terms: llm.replica_forget's batched step, no per-replica batches."""
    objectives = [get_objective("NPO", beta=0.2), get_objective("GA"), get_objective("SimNPO", beta=2.5),
                  get_objective("NPO", beta=0.5), get_objective("GA")]
    configs = [dataclasses.replace(UNLEARNING, seed=seed, learning_rate=lr)
               for seed, lr in ((0, 1e-3), (1, 5e-4), (2, 2e-3), (3, 1e-3), (4, 1e-3))]
    models = [build_model("tiny-synthetic", 11, 21, seed=seed) for seed in range(5)]
    singles = [copy.deepcopy(m) for m in models]
    expected = [unlearn(s, o, tiny["forget"], None, c) for s, o, c in zip(singles, objectives, configs)]

    def refuse(*args, **kwargs):
        raise AssertionError("the per-replica step was taken")

    monkeypatch.setattr(replica_training._Unlearning, "batch", refuse)
    trajectories = unlearn_replicas(models, objectives, tiny["forget"], None, configs, route=route)
    for model, single, trajectory, one in zip(models, singles, trajectories, expected):
        assert_same_trajectory(trajectory, one)
        assert_same_parameters(model, single)


def seeded_data(seeds) -> list[dict]:
    """paper_short_forget2 at 0.5% scale, each seed its own sample (what a figure's seed means)."""
    scenario = SCENARIOS["paper_short_forget2"].scaled(0.005)
    result = []
    for seed in seeds:
        train, _ = dataclasses.replace(scenario.spec, seed=seed).sample()
        result.append({"train": train, "forget": train.select("forget1", "forget2"), "retain": train.select("retain")})
    return result


def test_pretrain_replicas_each_on_its_own_data_equal_single_runs():
    data = seeded_data((0, 1, 2))
    assert not np.array_equal(data[0]["train"].tokens, data[1]["train"].tokens)
    configs = [TrainConfig(learning_rate=3e-3, batch_size=16, steps=5, seed=seed, **CPU) for seed in (0, 1, 2)]
    models = three_models("tiny-synthetic")
    singles = [copy.deepcopy(m) for m in models]
    histories = pretrain_replicas(models, [d["train"] for d in data], configs)
    for model, single, config, history, own in zip(models, singles, configs, histories, data):
        expected = pretrain(single, own["train"], config)
        np.testing.assert_allclose(history.losses, expected.losses, rtol=RTOL)
        assert_same_parameters(model, single)


@pytest.mark.parametrize("objective_names", [("GA", "NPO", "SimNPO"), ("GA", "NPO+RT", "SimNPO")])
def test_unlearn_replicas_each_on_its_own_data_equal_single_runs(monkeypatch, objective_names):
    """Per-replica forget/retain sets (the loop-free step with row offsets, with and without an nll retain term):
    every replica equals the single run on its own data, default evaluator and diagnostics included."""
    data = seeded_data((0, 1, 2))
    objectives = [get_objective(name) for name in objective_names]
    configs = [dataclasses.replace(UNLEARNING, seed=seed) for seed in (0, 1, 2)]
    models = three_models("tiny-synthetic")
    singles = [copy.deepcopy(m) for m in models]
    retain = [d["retain"] for d in data]
    monkeypatch.setattr(replica_training._Unlearning, "batch", None)  # the loop-free step must be taken
    monkeypatch.setattr(replica_evaluation, "_forget_pass", None)  # and the stacked forget diagnostics
    trajectories = unlearn_replicas(models, objectives, [d["forget"] for d in data], retain, configs)
    for i, (trajectory, own) in enumerate(zip(trajectories, data)):
        expected = unlearn(singles[i], objectives[i], own["forget"], own["retain"], configs[i])
        assert "power_share" in expected.component_metrics
        assert_same_trajectory(trajectory, expected)
        assert_same_parameters(models[i], singles[i])


def test_per_replica_sets_are_checked():
    data = seeded_data((0, 1))
    models, objectives = three_models("tiny-synthetic")[:2], [get_objective("GA")] * 2
    with pytest.raises(ValueError, match="forget: got 1 sets for 2 replicas"):
        unlearn_replicas(models, objectives, [data[0]["forget"]], None, UNLEARNING)
    with pytest.raises(ValueError, match="same number"):
        unlearn_replicas(models, objectives, [data[0]["forget"], data[1]["forget"].subset(range(10))], None,
                         UNLEARNING)
    with pytest.raises(TypeError, match="SequenceSet"):
        pretrain_replicas(models, [data[0]["train"], "data"], UNLEARNING)
    with pytest.raises(TypeError, match="SequenceSet or a list"):
        pretrain_replicas(models, "data", UNLEARNING)


@pytest.mark.parametrize("route", ["stacked", "vmap"])
def test_retain_term_replicas_take_the_loop_free_step_and_equal_single_runs(tiny, monkeypatch, route):
    """GradDiff / NPO+RT / SimNPO+RT (nll) and NPO+KL / SimNPO+KL (kl, each replica's own frozen reference)
    beside a forget-only objective, with a retain batch size of its own: the forget and retain rows of every
    replica in one stacked forward (llm.replica_forget), no per-replica batches."""
    objectives = [get_objective("GradDiff"), get_objective("NPO+RT", beta=0.2), get_objective("SimNPO"),
                  get_objective("SimNPO+RT", beta=2.5), get_objective("NPO+KL", beta=0.2),
                  get_objective("SimNPO+KL", beta=2.5)]
    configs = [dataclasses.replace(UNLEARNING, seed=seed, retain_batch_size=6) for seed in range(6)]
    models = [build_model("tiny-synthetic", 11, 21, seed=seed) for seed in range(6)]
    singles = [copy.deepcopy(m) for m in models]
    expected = [unlearn(s, o, tiny["forget"], tiny["retain"], c) for s, o, c in zip(singles, objectives, configs)]
    monkeypatch.setattr(replica_training._Unlearning, "batch", None)
    trajectories = unlearn_replicas(models, objectives, tiny["forget"], tiny["retain"], configs, route=route)
    for model, single, trajectory, one in zip(models, singles, trajectories, expected):
        assert_same_trajectory(trajectory, one)
        assert_same_parameters(model, single)


class _ValueReads(TorchDispatchMode):
    """Records every op that reads a tensor's values back to the host: on a GPU each one waits for the device."""

    READS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select", "aten::equal",
             "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _sync_errors():
    """On CUDA: every host sync inside raises (``torch.cuda.set_sync_debug_mode``; a traceback names the op)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield None
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("route, device", [("stacked", "cpu"), ("vmap", "cpu"), pytest.param("stacked", "cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_loop_free_step_waits_for_nothing(tiny, route, device):
    """Gather (forget and retain rows), stacked forward (forget-only, nll and kl objectives, the kl replicas'
    references), losses, backward, clipping and the GPU's AdamW kernel ("blocked") are queued without waiting:
    the one wait per step is the copy back of the values and gradient norms (``_batched_step_values``).

    On CUDA every host sync raises. On a CPU (so that CI without a GPU catches a wait added to the step) no op
    may read a tensor's values back (item, bool, nonzero, boolean-mask indexing, ...; a ``TorchDispatchMode``
    sees them, in backward too); a CPU run cannot show a device-to-host copy, which only the CUDA case checks."""
    from llm.replica_common import replica_learning_rates
    from llm.replicas import clip_replica_grads

    objectives = [get_objective("NPO", beta=0.2), get_objective("SimNPO", beta=2.5), get_objective("NPO+RT"),
                  get_objective("GradDiff"), get_objective("SimNPO+KL")]
    configs = replica_configs([dataclasses.replace(UNLEARNING, seed=seed, max_grad_norm=1.0, device=device)
                               for seed in range(5)], 5)
    models = [build_model("tiny-synthetic", 11, 21, seed=seed) for seed in range(5)]
    state = replica_training._Unlearning(models, objectives, tiny["forget"], tiny["retain"], configs, [None] * 5,
                                         route)
    assert state.batched_forget is not None and state.stack.device.type == device
    state.optimizer = StackedAdamW(state.stack.parameters, state.optimizer.settings, "blocked")
    reads = _ValueReads()
    with _sync_errors() if device == "cuda" else reads:
        for step in range(2):
            totals, values = state.batched_forget(step)
            totals.sum().backward()
            norms = clip_replica_grads(state.stack.parameters, 1.0)
            state.optimizer.step(replica_learning_rates(configs, step, 4))
            state.stack.zero_grad()
    assert reads.seen == []
    assert bool(torch.isfinite(values).all()) and bool(torch.isfinite(norms).all())
    if device == "cpu":
        with reads:  # the guard sees a read: what a .item() in the step would be
            float(totals[0].detach())
        assert reads.seen == ["aten::_local_scalar_dense"]


def test_a_diverged_replica_stops_and_the_others_go_on(tiny):
    objectives = [get_objective("NPO"), get_objective("GA"), get_objective("SimNPO")]
    configs = [dataclasses.replace(UNLEARNING, seed=0),
               dataclasses.replace(UNLEARNING, seed=1),
               dataclasses.replace(UNLEARNING, seed=2, divergence_logp_per_token=-1e-3)]  # crossed at step 0
    models = three_models("tiny-synthetic")
    with torch.no_grad():
        models[1].output.bias.fill_(math.nan)  # NaN logits from the start
    singles = [copy.deepcopy(m) for m in models]
    starts = [copy.deepcopy(m) for m in models]
    # a NaN model cannot be the default evaluator's reference: one shared evaluator for every run
    evaluator = Evaluator(concatenate([tiny["forget"], tiny["retain"]]), reference=starts[0])
    trajectories = unlearn_replicas(models, objectives, tiny["forget"], tiny["retain"], configs, evaluator)
    assert trajectories[1].diverged_at == 0 and "NaN/inf logits" in trajectories[1].divergence_reason
    assert trajectories[2].diverged_at == 0 and "fell below" in trajectories[2].divergence_reason
    assert trajectories[0].diverged_at is None and list(trajectories[0].steps) == [0, 1, 2, 3, 4]
    for i in (0, 2):
        assert_same_trajectory(trajectories[i], unlearn(singles[i], objectives[i], tiny["forget"], tiny["retain"],
                                                        configs[i], evaluator))
    for i in (1, 2):  # diverged replicas never update
        for p, q in zip(models[i].parameters(), starts[i].parameters()):
            assert torch.equal(p, q) or (torch.isnan(p).all() and torch.isnan(q).all())


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-gpt2"])
def test_batched_test_metrics_equal_each_models_evaluation(tiny, preset):
    chains = {c.name: c.chain for c in SCENARIOS["paper_short_forget2"].spec.components}
    test = concatenate([tiny["forget"], tiny["retain"]])
    models = three_models(preset)
    evaluator = Evaluator(test, chains, reference=models[0], batch_size=16)  # several chunks
    metrics = replica_test_metrics(ReplicaStack(models), [evaluator] * 3, [0, 2], models[0])
    assert set(metrics) == {0, 2}
    for i in (0, 2):
        expected = evaluator.evaluate(models[i])
        for name, values in expected.items():
            np.testing.assert_allclose(metrics[i][name], values, rtol=1e-6, atol=1e-9, err_msg=name)


def test_unlearn_replicas_evaluates_through_the_batched_path(tiny, monkeypatch):
    """Every-step metrics (KLs, forget weights, power share) never call the per-model evaluation."""
    objectives = [get_objective("GA"), get_objective("NPO+RT", beta=0.2), get_objective("SimNPO", beta=2.5)]
    configs = [dataclasses.replace(UNLEARNING, seed=seed, steps=2) for seed in (0, 1, 2)]
    models = three_models("tiny-synthetic")
    singles = [copy.deepcopy(m) for m in models]
    expected = [unlearn(s, o, tiny["forget"], tiny["retain"], c) for s, o, c in zip(singles, objectives, configs)]

    def refuse(*args, **kwargs):
        raise AssertionError("per-model evaluation called")

    monkeypatch.setattr(Evaluator, "evaluate", refuse)
    monkeypatch.setattr(Diagnostics, "__call__", refuse)
    trajectories = unlearn_replicas(models, objectives, tiny["forget"], tiny["retain"], configs)
    for trajectory, single in zip(trajectories, expected):
        assert {"power_share", "mean_weight", "kl_reference"} <= set(trajectory.component_metrics)
        assert_same_trajectory(trajectory, single)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="evaluation must be"):
        unlearn_replicas(models, objectives, tiny["forget"], tiny["retain"], configs, evaluation="vmap")
    sequential = unlearn_replicas(three_models("tiny-synthetic"), objectives, tiny["forget"], tiny["retain"], configs,
                                  evaluation="sequential")
    for trajectory, single in zip(sequential, expected):  # the sequential evaluation gives the same
        assert_same_trajectory(trajectory, single)


@pytest.mark.parametrize("route", ["stacked", "loop"])
def test_batched_test_metrics_on_each_replicas_own_test_set(route):
    """Each replica its own test set (one shape): the stacked pass gathers every replica's own rows; equal to
    each model's own evaluation (and the loop route's replica-by-replica fallback likewise)."""
    data = seeded_data((0, 1, 2))
    chains = {c.name: c.chain for c in SCENARIOS["paper_short_forget2"].spec.components}
    models = three_models("tiny-synthetic")
    evaluators = [Evaluator(concatenate([d["forget"], d["retain"]]), chains, reference=models[(k + 1) % 3],
                            batch_size=16) for k, d in enumerate(data)]  # several chunks, each its own targets
    stack = ReplicaStack(models, route)
    scratch = copy.deepcopy(models[0])
    if route == "stacked":  # the one stacked pass, not the replica-by-replica fallback
        stack.write_into = None
    metrics = replica_test_metrics(stack, evaluators, [0, 2], scratch)
    assert set(metrics) == {0, 2}
    for i in (0, 2):
        for name, values in evaluators[i].evaluate(models[i]).items():
            np.testing.assert_allclose(metrics[i][name], values, rtol=1e-6, atol=1e-9, err_msg=name)


def test_evaluation_token_tables_are_built_once_per_stack_and_list_of_sets():
    """The stacked evaluation's joined token tables are kept on the stack: the same sets give the same tables
    (no copy per step), other sets their own."""
    from llm.replica_stacked_evaluation import _joined_tokens

    data = seeded_data((0, 1))
    first, second = (encode(d["forget"], "response") for d in data)
    stack = ReplicaStack(three_models("tiny-synthetic")[:2])
    tokens, offsets = _joined_tokens(stack, [first, second])
    again, _ = _joined_tokens(stack, [first, second])
    shared, shared_offsets = _joined_tokens(stack, [first, first])
    assert again is tokens and shared is not tokens
    assert offsets.tolist() == [0, len(first)] and shared_offsets.tolist() == [0, 0]
    assert torch.equal(tokens.tensors["input_ids"][len(first):], encode(data[1]["forget"], "response").input_ids)
