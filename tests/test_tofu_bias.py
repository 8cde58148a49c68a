"""llm.tofu.bias at tiny scale (random 2-layer Llama, word-level tokenizer): the groups, the per-group weights and
power shares against direct computations, and one measurement end to end with its results file."""

import json
import os

import numpy as np
import pytest
import torch
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm.logps import model_sequence_logps
from llm.tofu import bias
from llm.tofu.data import load_split
from llm.tofu.finetune import Examples
from llm.tofu.protocol import method_objective
from llm.tofu.scoring import answer_logps


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny 'target' and a differently seeded 'retain' model folder."""
    root = tmp_path_factory.mktemp("bias")
    tokenizer = tiny_tokenizer(chat=True)
    for name, seed in (("target", 0), ("retain", 1)):
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("size, groups", [(9, 3), (10, 3), (7, 2), (3, 3)])
def test_rank_groups_partition_by_rank(size, groups):
    values = np.random.default_rng(size).normal(size=size)
    ids = bias.rank_groups(values, groups)
    counts = np.bincount(ids, minlength=groups)
    assert counts.sum() == size and counts.max() - counts.min() <= 1
    for low in range(groups - 1):  # every value of a lower group is <= every value of the next
        assert values[ids == low].max() <= values[ids == low + 1].min()


def test_forget_groups_use_length_and_per_token_likelihood():
    num_tokens = np.array([3, 30, 10, 20, 5, 40])
    ref_logps = -np.array([3.0, 3.0, 10.0, 2.0, 15.0, 8.0])  # per token: -1, -.1, -1, -.1, -3, -.2
    groups = bias.forget_groups(ref_logps, num_tokens, 3)
    np.testing.assert_array_equal(groups["length"], [0, 2, 1, 1, 0, 2])
    np.testing.assert_array_equal(groups["memorisation"], [0, 2, 1, 2, 0, 1])


def _direct_group_norms(model, objective, tokenizer, items, ref, groups):
    """||(forget_weight / n_f) sum_{y in g} d L_f(y)|| per group, from one batch per group and markovsim's loss."""
    examples = Examples.build(tokenizer, items)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for group in range(int(groups.max()) + 1):
        rows = np.flatnonzero(groups == group)
        logps, num_tokens = model_sequence_logps(model, examples.batch(rows, "cpu"))
        losses = objective.forget_losses(logps.double(), num_tokens.double(), None if ref is None else ref[rows])
        total = objective.forget_weight * losses.sum() / len(items)
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in torch.autograd.grad(total, params)))))
    return np.array(norms)


@pytest.mark.parametrize("method", ["NPO", "SimNPO"])
def test_group_diagnostics_equal_direct_computation(folders, method):
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer), seed=0)
    items = load_split("forget01_perturbed")[:9]
    objective = method_objective(method, "forget01")
    ref_np, num_tokens = answer_logps(model, tokenizer, [i.question for i in items], [i.answer for i in items])
    ref = torch.as_tensor(ref_np, dtype=torch.float64)
    with torch.no_grad():  # move the model off the reference so NPO's weights are not all 1
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    groups = bias.forget_groups(ref_np, num_tokens, 3)["length"]
    result = bias.group_diagnostics(model, objective, Examples.build(tokenizer, items), ref, groups, num_tokens,
                                    max_items=None, batch_size=2)
    norms = _direct_group_norms(model, objective, tokenizer, items, ref, groups)
    np.testing.assert_allclose(result["power_share"], norms / norms.sum(), rtol=1e-4)
    assert result["power_share"].sum() == pytest.approx(1.0, abs=1e-12)
    logps, _ = answer_logps(model, tokenizer, [i.question for i in items], [i.answer for i in items])
    weights = objective.forget_weights(torch.as_tensor(logps), torch.as_tensor(num_tokens, dtype=torch.float64),
                                       ref).numpy()  # the closed form, per item
    expected = [weights[groups == g].mean() for g in range(3)]
    np.testing.assert_allclose(result["mean_weight"], expected, rtol=1e-4)
    if method == "NPO":  # 2 sigma(beta (logps - ref)): check the formula itself on one item
        beta = objective.beta
        assert weights[0] == pytest.approx(2 / (1 + np.exp(-beta * (logps[0] - ref_np[0]))), rel=1e-9)


def test_measure_bias_end_to_end(folders, tmp_path):
    config = bias.BiasConfig(split="forget01", steps=3, record_every=2, batch_size=4, limit_forget=9, max_items=2,
                             eval_batch_size=16, device="cpu", progress=False, learning_rate=1e-3)
    document = bias.measure_bias(folders / "target", folders / "retain", config, tmp_path / "out")
    with open(tmp_path / "out" / "results.json") as handle:
        json.loads(handle.read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert not os.path.exists(tmp_path / "out" / "work")  # checkpoints removed
    for grouping in bias.GROUPINGS:
        ids = np.array(document["groups"][grouping]["assignment"])
        assert sorted(np.bincount(ids)) == [3, 3, 3]
    for method in ("NPO", "SimNPO"):
        record = document["methods"][method]
        assert record["steps"] == [0, 2, 3]
        for grouping in bias.GROUPINGS:
            shares = np.array(record["diagnostics"][grouping]["power_share"])  # (records, groups)
            np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-12)
        if method == "NPO":  # at the target itself every NPO weight is exactly 1
            np.testing.assert_allclose(record["diagnostics"]["length"]["mean_weight"][0], 1.0, atol=1e-6)
        after = document["after"][method]["memorisation"]
        assert len(after["forget_quality"]) == 3 and all(0 <= q <= 1 for q in after["forget_quality"])
    # the retain model compared with itself: every KS p-value is 1
    np.testing.assert_allclose(document["after"]["retain"]["length"]["forget_quality"], 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "forget99"}, "split must be"), ({"methods": ("NPO+RT",)}, "retain term"),
    ({"methods": ("Nope",)}, "unknown method"), ({"steps": 0}, "steps must be"), ({"num_groups": 4}, "num_groups"),
    ({"learning_rate": -1.0}, "learning_rate"), ({"max_items": 0}, "max_items"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bias.BiasConfig(**kwargs)


def test_bad_input_raises(tmp_path, capsys):
    with pytest.raises(ValueError, match="not a model folder"):
        bias.measure_bias(tmp_path / "missing", None, bias.BiasConfig(), tmp_path / "out")
    with pytest.raises(TypeError, match="BiasConfig"):
        bias.measure_bias(tmp_path, None, {}, tmp_path / "out")
    with pytest.raises(ValueError, match="cannot fill"):
        bias.rank_groups([1.0, 2.0], 3)
    assert bias.main(["--steps", "2"]) == 2
    assert "give --run RUN" in capsys.readouterr().err
