"""The TOFU headline numbers against hand-computed values, with the model's scores replaced by fixed arrays.

``llm.tofu.evaluate`` reads a model only through ``answer_logps``, ``perturbed_logps`` and
``generate_answers``; here they return fixed per-answer numbers, so every set metric, model utility, forget
quality and PrivLeak can be worked out by hand (the arithmetic is in the comments). Each set is chosen so
that the wrong choice (truth-ratio reference, aggregate direction, probability normalisation) gives another
number.
"""

import math
import types

import numpy as np
import pytest

from llm.tofu import evaluate, report
from llm.tofu.data import TofuItem

# answer text -> (length-normalised probability p, scored tokens n); logps = n log p
SCORES = {
    "A true": (0.5, 2), "A para": (0.25, 4), "A wrong1": (0.125, 3), "A wrong2": (0.5, 5),
    "B true": (0.8, 5), "B para": (0.4, 2), "B wrong1": (0.1, 4), "B wrong2": (0.1, 2),
    "C true": (0.25, 3), "C para": (0.5, 3), "C wrong1": (0.25, 2), "C wrong2": (0.0625, 6),
    "D true": (0.5, 2), "D para": (0.1, 3), "D wrong1": (0.2, 2), "D wrong2": (0.2, 3),
}
# truth ratio TR = geometric mean of the wrong answers' p / reference p
#   A: wrong sqrt(0.125 * 0.5) = 0.25  -> TR(paraphrase 0.25) = 1      TR(true 0.5)  = 0.5
#   B: wrong 0.1                       -> TR(paraphrase 0.4)  = 0.25   TR(true 0.8)  = 0.125
#   C: wrong sqrt(0.25 * 0.0625) = 0.125 -> TR(paraphrase 0.5) = 0.25  TR(true 0.25) = 0.5
#   D: wrong 0.2                       -> TR(paraphrase 0.1)  = 2      TR(true 0.5)  = 0.4
# the answers' words and the greedy generations: ROUGE-L recall = LCS / answer words
ANSWER_WORDS = {"A": "red green blue yellow", "B": "one two three four five", "C": "cat dog", "D": "sun moon star sky"}
GENERATIONS = {"A": "red blue", "B": "one two three four five", "C": "dog", "D": "moon"}  # 0.5, 1, 0.5, 0.25


def item(key: str) -> TofuItem:
    return TofuItem(question=f"question {key}", answer=f"{key} true", paraphrased_answer=f"{key} para",
                    perturbed_answers=(f"{key} wrong1", f"{key} wrong2"))


SETS = {"forget": "ABD", "retain": "BC", "real_authors": "AB", "world_facts": "CD"}


@pytest.fixture
def fixed_scores(monkeypatch):
    """Replace the model's scoring by the SCORES table and GENERATIONS (model and tokenizer are unused)."""

    def answer_logps(model, tokenizer, questions, answers, batch_size=16):
        assert len(questions) == len(answers)
        p, n = np.array([SCORES[a] for a in answers]).T
        return n * np.log(p), n.astype(np.int64)

    def perturbed_logps(model, tokenizer, questions, perturbed, batch_size=16):
        logps, counts = zip(*(answer_logps(model, tokenizer, [q] * len(wrong), wrong) for q, wrong in
                              zip(questions, perturbed)))
        return np.stack(logps), np.stack(counts)

    def generate_answers(model, tokenizer, questions, max_new_tokens=200, batch_size=16):
        return [GENERATIONS[q.removeprefix("question ")] for q in questions]

    real_rouge_l_recall = evaluate.metrics.rouge_l_recall

    def rouge_l_recall(generations, answers):  # the answers' words stand in for "A true" etc.
        return real_rouge_l_recall(generations, [ANSWER_WORDS[a.split()[0]] for a in answers])

    monkeypatch.setattr(evaluate, "answer_logps", answer_logps)
    monkeypatch.setattr(evaluate, "perturbed_logps", perturbed_logps)
    monkeypatch.setattr(evaluate, "generate_answers", generate_answers)
    monkeypatch.setattr(evaluate.metrics, "rouge_l_recall", rouge_l_recall)


# per set: probability, ROUGE-L, truth-ratio aggregate, per-item truth ratios (hand-computed from the table)
EXPECTED = {
    # P(answer) mean (0.5 + 0.8 + 0.5) / 3; TR vs the paraphrase [1, 0.25, 2]; mean(min(TR, 1/TR)) = (1 + .25 + .5) / 3
    "forget": (0.6, (0.5 + 1.0 + 0.25) / 3, 1.75 / 3, [1.0, 0.25, 2.0]),
    # P(answer) (0.8 + 0.25) / 2; TR vs the paraphrase [0.25, 0.25]; mean(max(0, 1 - TR)) = 0.75
    "retain": (0.525, 0.75, 0.75, [0.25, 0.25]),
    # normalised P: A 0.5 / (0.5 + 0.125 + 0.5) = 4/9, B 0.8 / (0.8 + 0.1 + 0.1) = 0.8; TR vs the true answer
    # [0.5, 0.125]; mean(max(0, 1 - TR)) = (0.5 + 0.875) / 2
    "real_authors": ((4 / 9 + 0.8) / 2, 0.75, 0.6875, [0.5, 0.125]),
    # normalised P: C 0.25 / (0.25 + 0.25 + 0.0625) = 4/9, D 0.5 / (0.5 + 0.2 + 0.2) = 5/9; TR vs the true answer
    # [0.5, 0.4]; mean(max(0, 1 - TR)) = (0.5 + 0.6) / 2
    "world_facts": (0.5, 0.375, 0.55, [0.5, 0.4]),
}


@pytest.mark.parametrize("kind", list(SETS))
def test_each_set_uses_its_reference_answer_normalisation_and_aggregate(fixed_scores, kind):
    result = evaluate.evaluate_set(None, None, [item(k) for k in SETS[kind]], kind)
    probability, rouge_l, truth_ratio, ratios = EXPECTED[kind]
    assert result["num_items"] == len(SETS[kind])
    assert result["probability"] == pytest.approx(probability, rel=1e-12)
    assert result["rouge_l"] == pytest.approx(rouge_l, rel=1e-12)
    assert result["truth_ratio"] == pytest.approx(truth_ratio, rel=1e-12)
    assert result["truth_ratios"] == pytest.approx(ratios, rel=1e-12)
    assert result["generations"] == [GENERATIONS[k] for k in SETS[kind]]


def test_model_utility_is_the_harmonic_mean_of_the_nine_hand_computed_numbers(fixed_scores):
    result = evaluate.evaluate_model(None, None, sets={kind: [item(k) for k in keys] for kind, keys in SETS.items()})
    nine = {f"{kind}/{metric}": EXPECTED[kind][column] for kind in ("retain", "real_authors", "world_facts")
            for column, metric in enumerate(("probability", "rouge_l", "truth_ratio"))}
    assert result["utility_components"] == pytest.approx(nine, rel=1e-12)
    # 9 / (1/0.525 + 1/0.75 + 1/0.75 + 45/28 + 1/0.75 + 1/0.6875 + 1/0.5 + 1/0.375 + 1/0.55)
    expected = 9 / (1 / 0.525 + 3 / 0.75 + 45 / 28 + 1 / 0.6875 + 2 + 1 / 0.375 + 1 / 0.55)
    assert result["model_utility"] == pytest.approx(expected, rel=1e-12)
    assert list(result["sets"]) == list(SETS)


def exact_ks_p_value(a, b) -> float:
    """Two-sided two-sample KS p-value by brute force: the share of the C(n+m, n) ways of splitting the pooled
    values (all distinct) into two groups whose statistic is at least the observed one."""
    from itertools import combinations

    pooled = np.concatenate([a, b])

    def statistic(first):
        x, y = pooled[list(first)], np.delete(pooled, list(first))
        grid = np.sort(pooled)
        return max(abs(np.mean(x <= t) - np.mean(y <= t)) for t in grid)

    observed = statistic(range(len(a)))
    splits = list(combinations(range(len(pooled)), len(a)))
    return sum(statistic(s) >= observed - 1e-12 for s in splits) / len(splits)


# forget-set truth ratios per model; KS against the retain model's [4, 5, 6]:
#   target [1, 2, 3]: D = 1, p = 2 / C(6, 3) = 0.1
#   npo [1, 2, 5.5]: D = 2/3; the splits whose ECDF difference stays within 1/3 alternate (8 of 20): p = 0.6
RATIOS = {"target": [1.0, 2.0, 3.0], "retain": [4.0, 5.0, 6.0], "npo": [1.0, 2.0, 5.5]}
FORGET_QUALITY = {"target": 0.1, "retain": 1.0, "npo": 0.6}
# membership scores (higher = member): forget items against holdout items [0.5, 0.1] / [0.3, 0.1]
#   target [0.9, 0.4] vs [0.5, 0.1]: pairs won 1, 1, 0, 1 -> AUC 0.75
#   retain [0.2, 0.05] vs [0.5, 0.1]: 0, 1, 0, 0 -> AUC 0.25
#   npo [0.3, 0.05] vs [0.3, 0.1]: 1/2 (tie), 1, 0, 0 -> AUC 0.375
# PrivLeak = (AUC_retain - AUC) / (1 - AUC_retain) x 100: target (0.25 - 0.75) / 0.75 = -66.67%, npo -16.67%
MIA = {"target": ([0.9, 0.4], [0.5, 0.1]), "retain": ([0.2, 0.05], [0.5, 0.1]), "npo": ([0.3, 0.05], [0.3, 0.1])}
AUC = {"target": 0.75, "retain": 0.25, "npo": 0.375}
PRIVLEAK = {"target": -200 / 3, "retain": 0.0, "npo": -50 / 3}
UTILITY = {"target": 0.61, "retain": 0.52, "npo": 0.43}


def test_hand_computed_ks_p_values():
    for name, expected in FORGET_QUALITY.items():
        assert exact_ks_p_value(RATIOS[name], RATIOS["retain"]) == pytest.approx(expected, abs=1e-12)


class FixedProtocol:
    """The parts of :class:`llm.tofu.protocol.Protocol` that :func:`report.results_document` reads: eval records
    built from RATIOS, MIA and UTILITY (every other set number a distinct constant), no relearning stages."""

    config = types.SimpleNamespace(methods=("NPO",), state=lambda: {"split": "forget01", "model": "fixed",
                                                                     "limit": None, "lora": False})

    def model_names(self):
        return ["target", "retain", "npo"]

    def stages(self):
        return [f"eval-{name}" for name in self.model_names()] + ["report"]

    def holdout_record(self):
        return {"authors": [90, 91]}

    def record(self, stage):
        name = stage.removeprefix("eval-")
        offset = self.model_names().index(name) / 100
        sets = {kind: {"probability": 0.1 + offset + k / 10, "rouge_l": 0.2 + offset + k / 10,
                       "truth_ratio": 0.3 + offset + k / 10} for k, kind in enumerate(evaluate.EVAL_SETS)}
        for kind, numbers in sets.items():  # per-item values: constant, their means the set's numbers
            n = len(RATIOS[name]) if kind == "forget" else 3
            numbers |= {"probability_per_item": [numbers["probability"]] * n,
                        "rouge_l_per_item": [numbers["rouge_l"]] * n,
                        "truth_ratios": [1 - numbers["truth_ratio"]] * n}  # max(0, 1 - TR) = the aggregate
        sets["forget"]["truth_ratios"] = RATIOS[name]
        forget, holdout = MIA[name]
        scores = {"forget": dict.fromkeys(report.ATTACKS, forget), "holdout": dict.fromkeys(report.ATTACKS, holdout)}
        return {"stage": stage, "wall_seconds": 1.0, "result": {"sets": sets, "model_utility": UTILITY[name]},
                "mia": scores}


def test_report_gives_each_model_its_own_forget_quality_utility_auc_and_privleak():
    document = report.results_document(FixedProtocol())
    assert list(document["models"]) == ["target", "retain", "npo"]
    assert document["models"]["npo"]["method"] == "NPO" and document["models"]["target"]["method"] is None
    for name, row in document["models"].items():
        assert row["forget_quality"] == pytest.approx(FORGET_QUALITY[name], abs=1e-12), name
        assert row["model_utility"] == UTILITY[name], name
        offset = ["target", "retain", "npo"].index(name) / 100
        for k, kind in enumerate(evaluate.EVAL_SETS):
            for base, metric in ((0.1, "probability"), (0.2, "rouge_l"), (0.3, "truth_ratio")):
                assert row[f"{kind}/{metric}"] == pytest.approx(base + offset + k / 10, abs=1e-15), (name, kind)
        for attack in report.ATTACKS:
            assert row[f"mia_auc/{attack}"] == pytest.approx(AUC[name], abs=1e-12), (name, attack)
            assert row[f"privleak/{attack}"] == pytest.approx(PRIVLEAK[name], abs=1e-9), (name, attack)
    assert math.isclose(document["forget_rouge_l_before_unlearning"], 0.2)  # the target's forget ROUGE-L
    # constant per-item values: every interval of a mean has zero width; the gap closed from the forget
    # probabilities 0.10 (target), 0.11 (retain), 0.12 (npo): (0.10 - 0.12) / (0.10 - 0.11) = 2
    npo = document["models"]["npo"]
    assert npo["intervals"]["retain/rouge_l"] == pytest.approx([0.32, 0.32], abs=1e-12)
    assert npo["forget_gap_closed"] == pytest.approx(2.0) and npo["intervals"]["forget_gap_closed"] == \
        pytest.approx([2.0, 2.0])
    assert "forget gap closed" in report.markdown_table(document)
    assert list(document["differences"]) == []  # one method: no pair to compare
