"""Per-component KL metrics against brute-force loops and enumeration."""

import itertools
import math

import numpy as np
import pytest
import torch
from strategies import random_chain

from markovsim.chains import block_chains
from markovsim.data import Component, MixtureSpec
from markovsim.metrics import component_kl, per_token_kl, population_kl
from markovsim.models import MixtureOfChains, TabularMarkov


def small_sets():
    chains = block_chains(6, 0.2)
    spec = MixtureSpec((Component("retain", chains["retain"], 6, 20, 6),
                        Component("forget1", chains["forget1"], 6, 10, 5, role="forget"),
                        Component("forget2", chains["forget2"], 3, 10, 5, role="forget")), seed=2)
    return spec, chains, *spec.sample()


def loop_component_kl(target_rows, model_rows, sequences):
    """target_rows(i, t) and model_rows(i, t) give distributions; a plain double loop."""
    sums, counts = {}, {}
    for i in range(len(sequences)):
        name = sequences.component_names[sequences.component_ids[i]]
        for t in range(sequences.lengths[i] - 1):
            p, q = target_rows(i, t), model_rows(i, t)
            sums[name] = sums.get(name, 0.0) + sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def test_component_kl_to_true_chains_matches_a_loop():
    spec, chains, _, test = small_sets()
    model = TabularMarkov(torch.randn(6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64))
    rows = torch.softmax(model.transition_logits, -1).numpy()
    expected = loop_component_kl(
        lambda i, t: chains[test.component_names[test.component_ids[i]]].transition_matrix[test.tokens[i, t]],
        lambda i, t: rows[test.tokens[i, t]], test)
    result = component_kl(chains, model, test)
    assert result.keys() == expected.keys()
    for name in expected:
        assert result[name] == pytest.approx(expected[name], rel=1e-10)


def test_component_kl_between_models_uses_the_mixture_predictive():
    spec, _, _, test = small_sets()
    mixture = MixtureOfChains.from_components(spec.components)
    tabular = TabularMarkov.population_mle(spec.components)
    mixture_probs = mixture.next_token_probs(test).numpy()
    tabular_rows = torch.softmax(tabular.transition_logits, -1).numpy()
    expected = loop_component_kl(lambda i, t: mixture_probs[i, t], lambda i, t: tabular_rows[test.tokens[i, t]], test)
    result = component_kl(mixture, tabular, test)
    for name in expected:
        assert result[name] == pytest.approx(expected[name], rel=1e-10)
    assert all(value == pytest.approx(0.0, abs=1e-15) for value in component_kl(tabular, tabular, test).values())


def test_population_kl_equals_enumeration():
    chain = random_chain(np.random.default_rng(0), 3)
    model = TabularMarkov(torch.randn(3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64))
    length = 4
    rows = torch.softmax(model.transition_logits, -1).numpy()
    expected = 0.0
    for sequence in itertools.product(range(3), repeat=length):
        probability = chain.initial_probs[sequence[0]] * np.prod(
            [chain.transition_matrix[a, b] for a, b in zip(sequence[:-1], sequence[1:])])
        per_token = np.mean([np.sum(chain.transition_matrix[s] * np.log(chain.transition_matrix[s] / rows[s]))
                             for s in sequence[:-1]])
        expected += probability * per_token
    assert population_kl(model, chain, length) == pytest.approx(expected, rel=1e-12)
    assert population_kl(TabularMarkov.from_chain(chain), chain, length) == pytest.approx(0.0, abs=1e-14)


def test_per_token_kl_handles_zero_target_entries():
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    assert per_token_kl(p, q).item() == pytest.approx(math.log(2))


def test_shape_and_name_errors():
    spec, chains, _, test = small_sets()
    with pytest.raises(ValueError, match="no entry"):
        component_kl({"retain": chains["retain"]}, TabularMarkov.population_mle(spec.components), test)
