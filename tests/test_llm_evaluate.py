"""llm.evaluate: the transformer-side metrics equal markovsim's exact ones on the bridged tabular model."""

import numpy as np
import pytest
import torch

from llm.bridge import TabularCausalLM
from llm.evaluate import Evaluator, next_token_probs
from llm.models import build_model
from markovsim.metrics import component_kl
from markovsim.models import MixtureOfChains, TabularMarkov
from markovsim.scenarios import paper_mixture_spec


@pytest.fixture(scope="module")
def mixture():
    spec = paper_mixture_spec(forget2_length=5, scale=0.004)
    train, test = spec.sample()
    return spec, train, test, {c.name: c.chain for c in spec.components}


def test_next_token_probs_of_the_bridge_equal_the_tabular_model(mixture):
    _, train, test, _ = mixture
    tabular = TabularMarkov.fit(train)
    probs = next_token_probs(TabularCausalLM(tabular), test, batch_size=7)
    torch.testing.assert_close(probs, tabular.next_token_probs(test), rtol=0, atol=1e-12)


def test_evaluator_reproduces_the_exact_kls_and_likelihoods(mixture):
    spec, train, test, chains = mixture
    tabular, retrained = TabularMarkov.fit(train), TabularMarkov.fit(train.select("retain"))
    exact = MixtureOfChains.from_components(spec.components)
    evaluator = Evaluator(test, chains, retrained=TabularCausalLM(retrained), reference=TabularCausalLM(tabular),
                          exact_models={"mixture": exact}, batch_size=5)
    metrics = evaluator.evaluate(TabularCausalLM(tabular))
    names = test.component_names
    for metric, target in (("kl_true", chains), ("kl_retrained", retrained), ("kl_exact_mixture", exact)):
        expected = component_kl(target, tabular, test)
        np.testing.assert_allclose(metrics[metric], [expected[n] for n in names], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(metrics["kl_reference"], 0.0, atol=1e-12)
    per_token = (tabular.response_logps(test) / torch.tensor(test.num_tokens)).numpy()
    expected = [per_token[test.component_ids == c].mean() for c in range(len(names))]
    np.testing.assert_allclose(metrics["logp_per_token"], expected, rtol=1e-10)


def test_evaluator_on_a_transformer_gives_finite_positive_kls(mixture):
    _, _, test, chains = mixture
    model = build_model("tiny-gpt2", 11, 21, seed=0)
    metrics = Evaluator(test, chains, reference=model, batch_size=16).evaluate(model)
    assert metrics["kl_true"].shape == (3,) and np.all(metrics["kl_true"] > 0)
    np.testing.assert_allclose(metrics["kl_reference"], 0.0, atol=1e-6)
    assert np.all(metrics["logp_per_token"] < 0)


def test_evaluator_rejects_empty_or_mismatched_data(mixture):
    _, _, test, _ = mixture
    with pytest.raises(ValueError, match="test must be a non-empty SequenceSet"):
        Evaluator(test.subset(np.array([], dtype=np.int64)))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        Evaluator(test).evaluate(build_model("tiny-gpt2", 12, 21))


def test_evaluation_subsample_is_a_fixed_seeded_subset_and_off_by_default(mixture):
    _, _, test, chains = mixture
    model = build_model("tiny-gpt2", 11, 21, seed=0)
    assert Evaluator(test).test is test and Evaluator(test, evaluation_subsample=len(test) + 5).test is test
    small = Evaluator(test, chains, evaluation_subsample=10, subsample_seed=3)
    again = Evaluator(test, chains, evaluation_subsample=10, subsample_seed=3)
    other = Evaluator(test, chains, evaluation_subsample=10, subsample_seed=4)
    assert len(small.test) == 10 and np.array_equal(small.test.tokens, again.test.tokens)
    assert not np.array_equal(small.test.tokens, other.test.tokens)
    rows = [i for i in range(len(test)) if any(np.array_equal(test.tokens[i], t) for t in small.test.tokens)]
    expected = Evaluator(test.subset(np.array(rows)), chains).evaluate(model)
    for name, values in small.evaluate(model).items():
        np.testing.assert_allclose(values, expected[name], rtol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match="evaluation_subsample"):
        Evaluator(test, evaluation_subsample=0)
