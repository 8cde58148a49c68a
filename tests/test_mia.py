"""Membership inference (llm.mia): known answers, the U statistic against a brute-force pairwise count,
PrivLeak against MUSE's own orientation, Min-K% / Min-K%++ (EOS left out, variance clamped at 1e-6 as in
open-unlearning) against hand-computed distributions, a tiny model's scores against a direct per-item loop."""

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm import mia
from llm.tofu.format import format_example
from llm.tofu.scoring import answer_logps, answer_token_statistics

LN2 = math.log(2.0)


def test_auc_of_separated_and_tied_scores():
    assert mia.auc([3.0, 4.0, 5.0], [0.0, 1.0]) == 1.0
    assert mia.auc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0
    assert mia.auc([2.0, 2.0, 2.0], [2.0, 2.0]) == 0.5
    # one member above both non-members, one tied with one and above the other: (2 + 1.5) / 4
    assert mia.auc([5.0, 1.0], [1.0, 0.0]) == pytest.approx(3.5 / 4)


score_lists = st.lists(st.integers(-4, 4).map(float), min_size=1, max_size=12)  # small integers: many ties


@settings(max_examples=200, deadline=None)
@given(score_lists, score_lists)
def test_auc_equals_the_pairwise_count(members, nonmembers):
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in members for n in nonmembers)
    assert mia.auc(members, nonmembers) == pytest.approx(wins / (len(members) * len(nonmembers)), abs=1e-12)
    assert mia.auc(members, nonmembers) + mia.auc(nonmembers, members) == pytest.approx(1.0, abs=1e-12)


def test_privleak_known_answers():
    # (AUC_retain - AUC_unlearned) / (1 - AUC_retain) x 100: under-unlearning is negative
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)  # a model that still memorises the forget set
    assert mia.privleak(0.75, 0.5) == pytest.approx(-50.0)
    assert mia.privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearned: forget items look unfamiliar
    assert mia.privleak(0.6, 0.6) == 0.0
    assert mia.privleak(0.943, 0.512) == pytest.approx(-0.431 / 0.488 * 100)  # -88.3 (was "+84" with AUC_r below)
    assert mia.privleak(0.5, 0.0) == pytest.approx(-50.0)  # defined at AUC_retain = 0 (MUSE's AUC' = 1)
    assert mia.privleak(0.0, 0.8) == pytest.approx(400.0)


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 1), st.floats(0, 0.999))
def test_privleak_is_muses_formula_on_their_auc_orientation(auc_unlearned, auc_retain):
    # MUSE / open-unlearning: AUC' = 1 - AUC (forget set as the first class), (AUC'_u - AUC'_r) / AUC'_r x 100
    muse_u, muse_r = 1.0 - auc_unlearned, 1.0 - auc_retain
    expected = (muse_u - muse_r) / muse_r * 100.0
    assert mia.privleak(auc_unlearned, auc_retain) == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_min_k_plus_plus_on_a_hand_computed_distribution():
    # p = (1/2, 1/4, 1/4) at every position: mu = -1.5 ln 2, E[(log p)^2] = 2.5 (ln 2)^2, sigma = 0.5 ln 2,
    # so z = +1 for token 0 and -1 for tokens 1, 2.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(1, 6, 3)  # (1, 6, 3)
    labels = torch.tensor([[-100, 0, 1, 1, 0, 2]])  # positions 0..4 predict 0, 1, 1, 0, 2
    token_logps, mu, sigma, mask = mia.next_token_statistics(logits, labels)
    assert mask.tolist() == [[True] * 5]
    assert mu[0].tolist() == pytest.approx([-1.5 * LN2] * 5)
    assert sigma[0].tolist() == pytest.approx([0.5 * LN2] * 5)
    assert token_logps[0].tolist() == pytest.approx([-LN2, -2 * LN2, -2 * LN2, -LN2, -2 * LN2])
    args = [t.numpy() for t in (token_logps, mu, sigma, mask)]
    # all tokens: z = (1, -1, -1, 1, -1)
    assert mia.min_k_plus_plus_score(*args, k=0.4, drop_eos=False)[0] == pytest.approx(-1.0)  # floor(2) lowest
    assert mia.min_k_plus_plus_score(*args, k=1.0, drop_eos=False)[0] == pytest.approx(-0.2)
    # the last token (EOS, z = -1) left out: z = (1, -1, -1, 1)
    assert mia.min_k_plus_plus_score(*args, k=0.4)[0] == pytest.approx(-1.0)  # floor(0.4 * 4) = 1 lowest z
    assert mia.min_k_plus_plus_score(*args, k=1.0)[0] == pytest.approx(0.0, abs=1e-6)  # float32 logits
    assert mia.min_k_score(args[0], args[3])[0] == pytest.approx(-2 * LN2)
    assert mia.min_k_score(args[0], args[3], k=1.0)[0] == pytest.approx(-6 * LN2 / 4)
    assert mia.min_k_score(args[0], args[3], k=1.0, drop_eos=False)[0] == pytest.approx(-8 * LN2 / 5)
    assert mia.loss_score(args[0], args[3])[0] == pytest.approx(-8 * LN2 / 5)  # LOSS keeps the EOS


def test_min_k_plus_plus_clamps_the_variance_at_open_unlearnings_floor():
    logps, mu, mask = np.array([[-0.5, -0.4, -0.2]]), np.array([[-0.2, -0.2, -0.2]]), np.ones((1, 3), bool)
    # sigma 0 (a point mass), 1e-4 (variance 1e-8) and 0.5: divided by sqrt(max(var, 1e-6)) = 1e-3, 1e-3, 0.5
    sigma = np.array([[0.0, 1e-4, 0.5]])
    assert mia.min_k_plus_plus_score(logps, mu, sigma, mask, k=1.0, drop_eos=False)[0] == pytest.approx(
        (-300.0 - 200.0 + 0.0) / 3)
    assert mia.min_k_plus_plus_score(logps, mu, sigma, mask, k=0.4, drop_eos=False)[0] == pytest.approx(-300.0)
    # the earlier convention: sigma floored at 1e-12 (variance 1e-24)
    old = mia.MIN_K_CONVENTIONS["all-tokens"]
    assert mia.min_k_plus_plus_score(logps, mu, sigma, mask, k=1.0, drop_eos=False,
                                     variance_floor=old.variance_floor)[0] == pytest.approx((-3e11 - 2e3) / 3)


def test_extreme_log_likelihoods_give_finite_scores():
    # next-token logits (0, -1e4): p = (1, e^-1e4 = 0 in float64), mu = 0 and variance 0 at every position
    logits = torch.tensor([0.0, -1e4], dtype=torch.float64).expand(1, 5, 2)  # (1, 5, 2)
    labels = torch.tensor([[-100, 0, 1, 0, 0]])  # scored tokens: log p = 0, -1e4, 0, 0 (the last is the EOS)
    token_logps, mu, sigma, mask = (t.numpy() for t in mia.next_token_statistics(logits, labels))
    assert token_logps[0].tolist() == [0.0, -1e4, 0.0, 0.0] and mu[0].tolist() == [0.0] * 4
    assert sigma[0].tolist() == [0.0] * 4
    scores = mia.attack_scores(token_logps, mu, sigma, mask, ["a b c"])
    assert scores["loss"][0] == -2500.0 and scores["min_k"][0] == -1e4  # EOS left out: 1 of 3 tokens
    assert scores["min_k_plus_plus"][0] == pytest.approx(-1e4 / 1e-3)  # z = (0, -1e7, 0), lowest 1
    old = mia.attack_scores(token_logps, mu, sigma, mask, ["a b c"], convention="all-tokens")
    assert old["min_k_plus_plus"][0] == pytest.approx(-1e4 / 1e-12)  # sigma floored at 1e-12
    assert all(np.isfinite(v).all() for v in (*scores.values(), *old.values()))


def test_min_k_leaves_out_the_eos_of_each_item():
    values = np.array([[-1.0, -5.0, -3.0, -9.0], [-2.0, -7.0, 99.0, 99.0]])  # last real token = EOS: -9, -7
    mask = np.array([[True, True, True, True], [True, True, False, False]])
    assert mia.min_k_score(values, mask, 0.4).tolist() == [-5.0, -2.0]  # 3 and 1 tokens left: floor -> 1
    assert mia.min_k_score(values, mask, 0.7).tolist() == [-4.0, -2.0]  # floor(2.1) = 2 of (-1, -5, -3)
    assert mia.min_k_score(values, mask, 0.7, drop_eos=False).tolist() == [-7.0, -7.0]  # floor(2.8) = 2, 1
    with pytest.raises(ValueError, match=r"at least two tokens; rows \[1\]"):
        mia.min_k_score(values, np.array([[True] * 4, [True, False, False, False]]))


def test_min_k_keeps_at_least_one_token_and_ignores_padding():
    values = np.array([[-1.0, -5.0, -3.0, 99.0], [-2.0, -100.0, -100.0, -100.0]])
    mask = np.array([[True, True, True, False], [True, False, False, False]])
    assert mia.min_k_score(values, mask, 0.4, drop_eos=False).tolist() == [-5.0, -2.0]  # floor(1.2), floor(0.4) -> 1
    assert mia.min_k_score(values, mask, 0.7, drop_eos=False).tolist() == [-4.0, -2.0]  # floor(2.1) = 2
    assert mia.loss_score(values, mask).tolist() == [-3.0, -2.0]


def test_zlib_score_divides_the_loss_score_by_the_compressed_length():
    values, mask = np.array([[-1.0, -3.0], [-4.0, 0.0]]), np.array([[True, True], [True, False]])
    texts = ["abc", "the cat the cat the cat the cat"]
    lengths = [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    assert mia.zlib_score(values, mask, texts).tolist() == pytest.approx([-2.0 / lengths[0], -4.0 / lengths[1]])


@pytest.mark.parametrize("call, error, message", [
    (lambda: mia.auc([], [1.0]), ValueError, "member_scores"),
    (lambda: mia.auc([1.0], [math.nan]), ValueError, "nonmember_scores holds NaN"),
    (lambda: mia.auc([[1.0, 2.0]], [1.0]), ValueError, "1-D"),
    (lambda: mia.loss_score(np.zeros((2, 3)), np.ones((2, 2), bool)), ValueError, "same shape"),
    (lambda: mia.loss_score(np.zeros((2, 3)), np.ones((2, 3))), TypeError, "boolean"),
    (lambda: mia.loss_score(np.zeros((0, 3)), np.ones((0, 3), bool)), ValueError, "no items"),
    (lambda: mia.loss_score(np.zeros((1, 2)), np.zeros((1, 2), bool)), ValueError, "at least one token"),
    (lambda: mia.loss_score(np.array([[math.nan]]), np.ones((1, 1), bool)), ValueError, "NaN"),
    (lambda: mia.zlib_score(np.zeros((2, 1)), np.ones((2, 1), bool), ["a"]), ValueError, "2 strings"),
    (lambda: mia.min_k_score(np.zeros((1, 1)), np.ones((1, 1), bool), k=0.0), ValueError, "k must be"),
    (lambda: mia.min_k_plus_plus_score(np.zeros((1, 2)), np.zeros((1, 1)), np.ones((1, 2)), np.ones((1, 2), bool)),
     ValueError, "mu and sigma"),
    (lambda: mia.privleak(0.5, 1.0), ValueError, "auc_retain is 1"),
    (lambda: mia.min_k_plus_plus_score(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), np.ones((1, 2), bool),
                                       variance_floor=0.0), ValueError, "variance_floor"),
    (lambda: mia.attack_scores(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), np.ones((1, 2), bool), ["a"],
                               convention="nope"), ValueError, "unknown Min-K convention"),
    (lambda: mia.privleak(1.5, 0.5), ValueError, "auc_unlearned"),
    (lambda: mia.attack_aucs({"loss": [1.0]}, {"loss": [0.0]}), ValueError, "zlib"),
])
def test_bad_input_is_refused_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _direct_item_scores(model, tokenizer, question: str, answer: str, k: float, convention: str) -> dict[str, float]:
    """The four scores of one item, one token and one vocabulary entry at a time (float64 Python arithmetic).

    Min-K% / Min-K%++ as open-unlearning's ``tokenwise_logprobs`` reads an item: every labelled position but
    the last (its EOS), the variance clamped at the convention's floor."""
    rule = mia.MIN_K_CONVENTIONS[convention]
    example = format_example(tokenizer, question, answer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0].double().tolist()  # (T, V)
    logps, standardised = [], []
    for position, label in enumerate(example["labels"][1:]):
        if label == -100:
            continue
        row = logits[position]
        log_norm = math.log(sum(math.exp(v - max(row)) for v in row)) + max(row)
        log_p = [v - log_norm for v in row]
        mu = sum(math.exp(lp) * lp for lp in log_p)
        variance = sum(math.exp(lp) * lp * lp for lp in log_p) - mu * mu
        logps.append(log_p[label])
        standardised.append((log_p[label] - mu) / math.sqrt(max(variance, rule.variance_floor)))
    loss = sum(logps) / len(logps)
    if rule.drop_eos:
        logps, standardised = logps[:-1], standardised[:-1]
    kept = max(1, int(k * len(logps)))
    return {"loss": loss, "zlib": loss / len(zlib.compress(answer.encode())),
            "min_k": sum(sorted(logps)[:kept]) / kept, "min_k_plus_plus": sum(sorted(standardised)[:kept]) / kept}


@pytest.mark.parametrize("chat, convention", [(True, "open-unlearning"), (False, "open-unlearning"),
                                              (True, "all-tokens")])
def test_tiny_model_scores_equal_a_direct_loop(chat, convention):
    tokenizer = tiny_tokenizer(chat=chat)
    model = tiny_llama(len(tokenizer), seed=3)
    questions = ["who wrote a book ?", "what is the capital of france ?", "who is she ?"]
    answers = ["she writes novels about cats and dogs .", "paris", "an author born in a city , he writes"]
    stats = answer_token_statistics(model, tokenizer, questions, answers, batch_size=2)  # padded batches
    scores = mia.attack_scores(stats["token_logps"], stats["mu"], stats["sigma"], stats["mask"], answers,
                               convention=convention)
    for i, (question, answer) in enumerate(zip(questions, answers)):
        direct = _direct_item_scores(model, tokenizer, question, answer, mia.MIN_K_FRACTION, convention)
        for name in mia.ATTACKS:
            assert scores[name][i] == pytest.approx(direct[name], rel=1e-5, abs=1e-6), (name, i)
    summed = (stats["token_logps"] * stats["mask"]).sum(axis=1)
    assert summed == pytest.approx(answer_logps(model, tokenizer, questions, answers, batch_size=3)[0], rel=1e-5)


def test_next_token_statistics_do_not_depend_on_the_chunk_size():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :3], labels[2, 5:] = -100, -100
    whole = mia.next_token_statistics(logits, labels, chunk_size=1000)
    for chunked, full in zip(mia.next_token_statistics(logits, labels, chunk_size=2), whole):
        assert torch.equal(chunked, full)
    assert whole[3].sum() == 3 * 6 - 2 - 2  # labels at positions 1..6 scored; row 0 loses 1, 2; row 2 loses 5, 6
