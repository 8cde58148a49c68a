"""TOFU metrics on hand-computed inputs, and batched answer scoring against a per-item loop."""

import math
import warnings

import numpy as np
import pytest
import torch
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm.tofu import metrics
from llm.tofu.format import format_example
from llm.tofu.scoring import answer_logps, generate_answers, perturbed_logps


def logps_of(p, n):
    """Summed log-likelihood of an answer of n tokens whose length-normalised probability is p."""
    return np.log(np.asarray(p, dtype=float)) * np.asarray(n)


def test_probability_is_exp_of_minus_mean_nll():
    assert metrics.probability([-2.0, -3.0, 0.0], [2, 3, 4]) == pytest.approx([math.exp(-1)] * 2 + [1.0])
    with pytest.raises(ValueError, match="at least one scored token"):
        metrics.probability([-1.0], [0])


# Item 0: perturbed P = 0.25, 0.04 -> geometric mean 0.1; reference P = 0.5 -> TR = 0.2.
# Item 1: perturbed P = 0.5, 0.5 -> 0.5; reference P = 0.25 -> TR = 2.
PERT_N = np.array([[3, 5], [2, 7]])
PERT = logps_of([[0.25, 0.04], [0.5, 0.5]], PERT_N)
REF_N = np.array([4, 6])
REF = logps_of([0.5, 0.25], REF_N)


def test_truth_ratio_known_answer():
    assert metrics.truth_ratio(PERT, PERT_N, REF, REF_N) == pytest.approx([0.2, 2.0])


def test_truth_ratio_from_extreme_mean_log_likelihoods():
    # per-token means (perturbed k = 1, 2 | reference):
    #   (-800, -800 | -800)   -> log TR = 0               (exp(-800) = 0: the ratio of probabilities is 0 / 0)
    #   (-1001, -999 | -1001) -> log TR = 1
    #   (-800, -800 | -740)   -> log TR = -60             (exp(-740) is subnormal, exp(-800) = 0)
    #   (-740, -740 | -800)   -> log TR = 60
    pert_n = np.array([[3, 5], [3, 1], [1, 1], [2, 2]])
    pert = np.array([[-2400.0, -4000.0], [-3003.0, -999.0], [-800.0, -800.0], [-1480.0, -1480.0]])
    ref_n = np.array([4, 2, 1, 1])
    ref = np.array([-3200.0, -2002.0, -740.0, -800.0])
    assert metrics.log_truth_ratio(pert, pert_n, ref, ref_n) == pytest.approx([0.0, 1.0, -60.0, 60.0], abs=1e-12)
    ratios = metrics.truth_ratio(pert, pert_n, ref, ref_n)
    assert ratios == pytest.approx([1.0, math.e, math.exp(-60), math.exp(60)], rel=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):  # what exponentiating first gives: NaN, NaN, 0, inf
        naive = np.exp(np.log(np.exp(pert / pert_n)).mean(axis=1) - np.log(np.exp(ref / ref_n)))
    assert np.isnan(naive[:2]).all() and naive[2] == 0 and naive[3] == np.inf


def test_overflowing_truth_ratios_aggregate_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratios = metrics.truth_ratio([[-1.0]], [[1]], [-900.0], [1])  # log TR = 899: exp overflows to inf
        assert ratios.tolist() == [math.inf]
        assert metrics.truth_ratio_aggregate([0.0, math.inf, 0.5], forget=True) == pytest.approx(0.5 / 3)
        assert metrics.truth_ratio_aggregate([0.0, math.inf], forget=False) == pytest.approx(0.5)


def test_normalised_probability_from_extreme_mean_log_likelihoods():
    # means: true -800, perturbed -801 and -802 -> 1 / (1 + e^-1 + e^-2) (every probability underflows to 0)
    value = metrics.normalised_probability([-1600.0], [2], [[-801.0, -2406.0]], [[1, 3]])
    assert value == pytest.approx([1.0 / (1.0 + math.exp(-1) + math.exp(-2))], rel=1e-12)


def test_truth_ratio_aggregates():
    ratios = [0.2, 2.0]
    assert metrics.truth_ratio_aggregate(ratios, forget=True) == pytest.approx((0.2 + 0.5) / 2)  # min(tr, 1/tr)
    assert metrics.truth_ratio_aggregate(ratios, forget=False) == pytest.approx((0.8 + 0.0) / 2)  # max(0, 1 - tr)


def test_normalised_probability_known_answer():
    true_n, pert_n = np.array([2, 3]), np.array([[1, 4], [2, 2]])
    value = metrics.normalised_probability(logps_of([0.5, 0.6], true_n), true_n,
                                           logps_of([[0.25, 0.25], [0.1, 0.2]], pert_n), pert_n)
    assert value == pytest.approx([0.5 / 1.0, 0.6 / 0.9])


def test_rouge_l_recall_known_answers():
    pytest.importorskip("rouge_score")
    answer = "The cat sat on the mat."
    # stemmed, lower-cased tokens: the cat sat on the mat (6); LCS lengths 3, 2, 6, 0
    generations = ["the cats sat", "mat on the", "A cat: the cat sat on the mat!", ""]
    assert metrics.rouge_l_recall(generations, [answer] * 4) == pytest.approx([3 / 6, 2 / 6, 1.0, 0.0])
    with pytest.raises(ValueError, match="2 generations for 1 answers"):
        metrics.rouge_l_recall(["a", "b"], [answer])


def test_forget_quality_is_the_ks_p_value():
    assert metrics.forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    assert metrics.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / math.comb(6, 3))  # exact, D = 1


def test_harmonic_mean_and_model_utility():
    assert metrics.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert metrics.harmonic_mean([1.0, 0.0]) == 0.0
    per_set = {s: {"probability": 0.5, "rouge_l": 0.5, "truth_ratio": 0.5} for s in metrics.UTILITY_SETS}
    per_set["world_facts"]["rouge_l"] = 0.25
    assert len(metrics.utility_components(per_set)) == 9
    assert metrics.model_utility(per_set) == pytest.approx(9 / (8 * 2 + 4))
    with pytest.raises(ValueError, match="real_authors"):
        metrics.model_utility({"retain": per_set["retain"], "world_facts": per_set["world_facts"]})


QUESTIONS = ["what is the capital of france ?", "who wrote a book ?", "who ?"]
ANSWERS = ["paris .", "an author born in paris , she writes novels about cats", "he"]


def per_item_logp(model, tok, question, answer):
    """Reference: one unpadded sequence, log-softmax by hand, summed over the answer + EOS positions."""
    example = format_example(tok, question, answer)
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    total, count = 0.0, 0
    for t, label in enumerate(example["labels"]):
        if label != -100:
            total += float(log_probs[t - 1, label])
            count += 1
    return total, count


@pytest.mark.parametrize("chat", [True, False])
def test_batched_answer_logps_match_a_per_item_loop(chat):
    tok = tiny_tokenizer(chat)
    model = tiny_llama(len(tok))
    logps, counts = answer_logps(model, tok, QUESTIONS, ANSWERS, batch_size=2)  # padded batches of 2 + 1
    expected = [per_item_logp(model, tok, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    assert logps == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert counts.tolist() == [e[1] for e in expected] == [3, 12, 2]  # answer words + EOS


def test_perturbed_logps_shape_and_values():
    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok))
    perturbed = [["paris .", "cats"], ["dogs", "he writes"]]
    logps, counts = perturbed_logps(model, tok, QUESTIONS[:2], perturbed, batch_size=3)
    assert logps.shape == counts.shape == (2, 2)
    assert logps[1, 1] == pytest.approx(per_item_logp(model, tok, QUESTIONS[1], "he writes")[0], abs=1e-4)
    with pytest.raises(ValueError, match="same number of perturbed answers"):
        perturbed_logps(model, tok, QUESTIONS[:2], [["a"], ["b", "c"]])


def test_greedy_generation_batched_equals_one_by_one():
    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok), seed=1)
    batched = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tok, [q], max_new_tokens=6)[0] for q in QUESTIONS]
    assert batched == single and all(isinstance(a, str) for a in batched)


# ----- the percentile bootstrap over items -----

def test_bootstrap_of_a_constant_sample_is_a_zero_width_interval():
    for value in (0.1, -3.7, 1e-9):
        assert metrics.bootstrap_interval(np.full(13, value)) == (value, value)


def _exact_percentile(values: np.ndarray, probabilities: np.ndarray, level: float) -> float:
    """The smallest value whose exact CDF reaches ``level``."""
    order = np.argsort(values)
    cdf = np.cumsum(probabilities[order])
    return float(values[order][np.searchsorted(cdf, level - 1e-12)])


def test_bootstrap_interval_matches_exact_enumeration_of_every_resample():
    """n = 4, sample (0, 0, 0, 1): the 4^4 equally likely index tuples give the resampled mean k / 4 with
    k ~ Binomial(4, 1/4), CDF 0.316, 0.738, 0.949, 0.996, 1: the exact 2.5% / 97.5% percentiles are 0 and 0.75,
    far enough from the CDF's jumps that 10,000 Monte Carlo resamples land on them exactly."""
    import itertools

    sample = np.array([0.0, 0.0, 0.0, 1.0])
    means = np.array([sample[list(picks)].mean() for picks in itertools.product(range(4), repeat=4)])
    weights = np.full(len(means), 1 / len(means))
    exact = (_exact_percentile(means, weights, 0.025), _exact_percentile(means, weights, 0.975))
    assert exact == (0.0, 0.75)
    assert metrics.bootstrap_interval(sample) == exact
    assert metrics.bootstrap_interval(sample, seed=7) == exact  # not a property of one seed


def test_bootstrap_counts_are_resamples_of_n_draws_and_reproducible():
    counts = metrics.bootstrap_counts(5, 1000, seed=3)
    assert counts.shape == (1000, 5) and np.all(counts.sum(1) == 5) and counts.min() >= 0
    np.testing.assert_array_equal(counts, metrics.bootstrap_counts(5, 1000, seed=3))
    assert counts.mean() == pytest.approx(1.0, abs=0.05)  # each item drawn once per resample on average
    values = np.random.default_rng(0).normal(size=5)
    low, high = metrics.bootstrap_interval(values, counts=counts)
    assert low < values.mean() < high
    assert metrics.bootstrap_interval(values, counts=counts) == metrics.bootstrap_interval(values, 1000, seed=3)
    assert all(math.isnan(v) for v in metrics.bootstrap_interval([1.0, float("nan")]))


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.bootstrap_counts(0), "at least one item"),
    (lambda: metrics.bootstrap_counts(3, 0), "num_resamples"),
    (lambda: metrics.bootstrap_interval([[1.0, 2.0]]), r"\(N,\)"),
    (lambda: metrics.bootstrap_interval([1.0, 2.0], counts=np.ones((4, 3))), r"counts must be \(B, 2\)"),
    (lambda: metrics.percentile_interval([1.0], confidence=1.0), "confidence"),
])
def test_bad_bootstrap_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_forget_truth_ratio_scores_are_the_aggregate_per_item():
    ratios = np.array([0.5, 2.0, 1.0, 0.0, np.inf])
    np.testing.assert_array_equal(metrics.forget_truth_ratio_scores(ratios), [0.5, 0.5, 1.0, 0.0, 0.0])
    assert metrics.truth_ratio_aggregate(ratios, forget=True) == pytest.approx(0.4)
