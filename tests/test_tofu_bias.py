"""llm.tofu.bias at tiny scale (random 2-layer Llama, word-level tokenizer): the groups, the per-group weights and
power shares against direct computations, and one measurement end to end with its results file."""

import json
import os

import numpy as np
import pytest
import torch
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm.logps import model_sequence_logps
from llm.tofu import bias, bias_intervals
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


def _npo_setup(num_items: int = 9):
    """A tiny Llama moved off its own reference log-likelihoods (NPO weights not all 1), its items and groups."""
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer), seed=0)
    items = load_split("forget01_perturbed")[:num_items]
    ref_np, num_tokens = answer_logps(model, tokenizer, [i.question for i in items], [i.answer for i in items])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    objective = method_objective("NPO", "forget01")
    return model, objective, Examples.build(tokenizer, items), torch.as_tensor(ref_np, dtype=torch.float64), num_tokens


def _item_gradients(model, objective, examples, ref, rows) -> np.ndarray:
    """(m, P) float64: (forget_weight / n_f) d L_f(y_i) / d theta per row, one autograd call each (markovsim's loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    gradients = []
    for row in rows:
        logps, num_tokens = model_sequence_logps(model, examples.batch([row], "cpu"))
        loss = objective.forget_losses(logps.double(), num_tokens.double(), ref[[row]]).sum()
        grads = torch.autograd.grad(objective.forget_weight * loss / len(examples), params)
        gradients.append(torch.cat([g.reshape(-1).double() for g in grads]).numpy())
    return np.stack(gradients)


def test_gram_matrix_is_the_inner_products_of_per_item_gradients():
    model, objective, examples, ref, _ = _npo_setup()
    rows = np.array([0, 2, 3, 7])
    gradients = _item_gradients(model, objective, examples, ref, rows)  # (4, P)
    gram, weights = bias_intervals.item_gradient_gram(model, objective, examples, ref, rows)
    np.testing.assert_allclose(gram, gradients @ gradients.T, rtol=1e-4, atol=1e-12 * np.abs(gram).max())
    # parameter blocks of 1000 coordinates (cutting across tensors): the same matrix
    blocked, _ = bias_intervals.item_gradient_gram(model, objective, examples, ref, rows, max_bytes=4 * 4 * 1000)
    np.testing.assert_allclose(blocked, gram, rtol=1e-6, atol=1e-12 * np.abs(gram).max())
    logps, num_tokens = model_sequence_logps(model, examples.batch(rows, "cpu"))
    expected = objective.forget_weights(logps.double(), num_tokens.double(), ref[rows]).numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    assert not np.allclose(weights, 1.0)


@pytest.mark.parametrize("max_items", [None, 2])
def test_gram_statistics_at_unit_counts_are_the_diagnostics_and_resamples_the_weighted_sums(max_items):
    model, objective, examples, ref, num_tokens = _npo_setup()
    groups = bias.forget_groups(ref.numpy(), num_tokens, 3)["length"]
    result = bias.group_diagnostics(model, objective, examples, ref, groups, num_tokens, max_items=max_items,
                                    batch_size=2)
    parts = bias.group_rows(groups, num_tokens, max_items)
    rows = np.unique(np.concatenate([chosen for _, chosen, _ in parts]))
    gram, weights = bias_intervals.item_gradient_gram(model, objective, examples, ref, rows)
    positions, scales = [np.searchsorted(rows, chosen) for _, chosen, _ in parts], [s for _, _, s in parts]
    ones = [np.ones((1, len(p))) for p in positions]
    means, shares = bias_intervals.group_statistics(gram, weights, positions, scales, ones)
    np.testing.assert_allclose(shares[0], result["power_share"], rtol=1e-4)
    np.testing.assert_allclose(means[0], result["mean_weight"], rtol=1e-5)
    # one resample: the share of the count-weighted gradient sums, computed directly
    counts = [np.random.default_rng(g).multinomial(len(p), np.full(len(p), 1 / len(p)))[None] for g, p in
              enumerate(positions)]
    gradients = _item_gradients(model, objective, examples, ref, rows)
    norms = np.array([s * np.linalg.norm(c[0] @ gradients[p]) for c, p, s in zip(counts, positions, scales)])
    _, resampled = bias_intervals.group_statistics(gram, weights, positions, scales, counts)
    np.testing.assert_allclose(resampled[0], norms / norms.sum(), rtol=1e-4)
    intervals = bias_intervals.group_intervals(gram, weights, positions, scales, num_resamples=500)
    for key in ("mean_weight_interval", "power_share_interval"):
        assert np.shape(intervals[key]) == (3, 2) and all(low <= high for low, high in intervals[key])


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
            for key in ("mean_weight_interval", "power_share_interval"):  # (records, groups, [low, high])
                intervals = np.array(record["diagnostics"][grouping][key])
                assert intervals.shape == (3, 3, 2) and np.all(intervals[..., 0] <= intervals[..., 1])
            assert np.all(np.array(record["diagnostics"][grouping]["power_share_interval"]) <= 1)
        if method == "NPO":  # at the target itself every NPO weight is exactly 1, and so is every resample's mean
            np.testing.assert_allclose(record["diagnostics"]["length"]["mean_weight"][0], 1.0, atol=1e-6)
            np.testing.assert_allclose(record["diagnostics"]["length"]["mean_weight_interval"][0], 1.0, atol=1e-6)
        after = document["after"][method]["memorisation"]
        assert len(after["forget_quality"]) == 3 and all(0 <= q <= 1 for q in after["forget_quality"])
        for name in ("probability", "truth_ratio"):
            for value, (low, high) in zip(after[name], after[f"{name}_interval"]):
                assert low <= value <= high  # 3 items per group: the 95% interval is [min, max]
    # the retain model compared with itself: every KS p-value is 1
    np.testing.assert_allclose(document["after"]["retain"]["length"]["forget_quality"], 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "forget99"}, "split must be"), ({"methods": ("NPO+RT",)}, "retain term"),
    ({"methods": ("Nope",)}, "unknown method"), ({"steps": 0}, "steps must be"), ({"num_groups": 4}, "num_groups"),
    ({"learning_rate": -1.0}, "learning_rate"), ({"max_items": 0}, "max_items"),
    ({"bootstrap_resamples": 0}, "bootstrap_resamples"), ({"gram_max_gb": 0}, "gram_max_gb"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bias.BiasConfig(**kwargs)


def test_the_measurement_uses_every_forget_item_and_10000_resamples_by_default():
    config = bias.BiasConfig()
    assert config.max_items is None and config.limit_forget is None and config.bootstrap_resamples == 10_000
    arguments = bias.build_parser().parse_args(["--run", "RUN"])
    assert arguments.max_items is None and arguments.bootstrap_resamples == 10_000 and arguments.gram_max_gb == 2.0


def test_bad_input_raises(tmp_path, capsys):
    with pytest.raises(ValueError, match="not a model folder"):
        bias.measure_bias(tmp_path / "missing", None, bias.BiasConfig(), tmp_path / "out")
    with pytest.raises(TypeError, match="BiasConfig"):
        bias.measure_bias(tmp_path, None, {}, tmp_path / "out")
    with pytest.raises(ValueError, match="cannot fill"):
        bias.rank_groups([1.0, 2.0], 3)
    assert bias.main(["--steps", "2"]) == 2
    assert "give --run RUN" in capsys.readouterr().err
