"""Membership inference (llm.mia): known answers, the U statistic against a brute-force pairwise count,
Min-K%++ against a hand-computed distribution, a tiny model's scores against a direct per-item loop."""

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
    assert mia.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert mia.privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert mia.privleak(0.6, 0.6) == 0.0


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
    assert mia.min_k_plus_plus_score(*args, k=0.4)[0] == pytest.approx(-1.0)  # floor(0.4 * 5) = 2 lowest z
    assert mia.min_k_plus_plus_score(*args, k=1.0)[0] == pytest.approx(-0.2)  # mean of (1, -1, -1, 1, -1)
    assert mia.min_k_score(args[0], args[3])[0] == pytest.approx(-2 * LN2)
    assert mia.loss_score(args[0], args[3])[0] == pytest.approx(-8 * LN2 / 5)


def test_min_k_keeps_at_least_one_token_and_ignores_padding():
    values = np.array([[-1.0, -5.0, -3.0, 99.0], [-2.0, -100.0, -100.0, -100.0]])
    mask = np.array([[True, True, True, False], [True, False, False, False]])
    assert mia.min_k_score(values, mask, 0.4).tolist() == [-5.0, -2.0]  # floor(1.2) = 1, floor(0.4) -> 1
    assert mia.min_k_score(values, mask, 0.7).tolist() == [-4.0, -2.0]  # floor(2.1) = 2
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
    (lambda: mia.privleak(0.5, 0.0), ValueError, "auc_retain is 0"),
    (lambda: mia.privleak(1.5, 0.5), ValueError, "auc_unlearned"),
    (lambda: mia.attack_aucs({"loss": [1.0]}, {"loss": [0.0]}), ValueError, "zlib"),
])
def test_bad_input_is_refused_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _direct_item_scores(model, tokenizer, question: str, answer: str, k: float) -> dict[str, float]:
    """The four scores of one item, one token and one vocabulary entry at a time (float64 Python arithmetic)."""
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
        sigma = math.sqrt(sum(math.exp(lp) * lp * lp for lp in log_p) - mu * mu)
        logps.append(log_p[label])
        standardised.append((log_p[label] - mu) / sigma)
    kept = max(1, int(k * len(logps)))
    loss = sum(logps) / len(logps)
    return {"loss": loss, "zlib": loss / len(zlib.compress(answer.encode())),
            "min_k": sum(sorted(logps)[:kept]) / kept, "min_k_plus_plus": sum(sorted(standardised)[:kept]) / kept}


@pytest.mark.parametrize("chat", [True, False])
def test_tiny_model_scores_equal_a_direct_loop(chat):
    tokenizer = tiny_tokenizer(chat=chat)
    model = tiny_llama(len(tokenizer), seed=3)
    questions = ["who wrote a book ?", "what is the capital of france ?", "who is she ?"]
    answers = ["she writes novels about cats and dogs .", "paris", "an author born in a city , he writes"]
    stats = answer_token_statistics(model, tokenizer, questions, answers, batch_size=2)  # padded batches
    scores = mia.attack_scores(stats["token_logps"], stats["mu"], stats["sigma"], stats["mask"], answers)
    for i, (question, answer) in enumerate(zip(questions, answers)):
        direct = _direct_item_scores(model, tokenizer, question, answer, mia.MIN_K_FRACTION)
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
