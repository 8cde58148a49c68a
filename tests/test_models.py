"""TabularMarkov and MixtureOfChains against enumeration, per-token loops, sampling and EM theory."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import mixture_specs, random_chain

from markovsim.chains import block_chains
from markovsim.data import Component, MixtureSpec, SequenceSet
from markovsim.models import MixtureOfChains, TabularMarkov


def all_sequences(num_states, length):
    tokens = np.array(list(itertools.product(range(num_states), repeat=length)))
    return SequenceSet(tokens, np.full(len(tokens), length), np.zeros(len(tokens), dtype=int), ("all",), num_states)


def random_tabular(rng, num_states):
    return TabularMarkov(rng.normal(size=num_states), rng.normal(size=(num_states, num_states)))


def random_mixture(rng, num_components, num_states):
    return MixtureOfChains(rng.normal(size=num_components), rng.normal(size=(num_components, num_states)),
                           rng.normal(size=(num_components, num_states, num_states)))


def loop_log_prob_tabular(model, row):
    initial = torch.log_softmax(model.initial_logits, -1).numpy()
    transition = torch.log_softmax(model.transition_logits, -1).numpy()
    return initial[row[0]] + sum(transition[a, b] for a, b in zip(row[:-1], row[1:]))


def loop_log_prob_mixture(model, row):
    alpha = torch.softmax(model.weight_logits, -1).numpy()
    mu = torch.softmax(model.initial_logits, -1).numpy()
    transition = torch.softmax(model.transition_logits, -1).numpy()
    total = 0.0
    for k in range(model.num_components):
        p = alpha[k] * mu[k, row[0]]
        for a, b in zip(row[:-1], row[1:]):
            p *= transition[k, a, b]
        total += p
    return math.log(total)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(2, 5), st.integers(1, 3), st.integers(0, 10**6))
def test_enumeration_sums_to_one_and_matches_loops(num_states, length, num_components, seed):
    rng = np.random.default_rng(seed)
    sequences = all_sequences(num_states, length)
    for model, loop in ((random_tabular(rng, num_states), loop_log_prob_tabular),
                        (random_mixture(rng, num_components, num_states), loop_log_prob_mixture)):
        log_probs = model.logps(sequences).numpy()
        assert math.isclose(np.exp(log_probs).sum(), 1.0, rel_tol=1e-10)
        expected = [loop(model, row) for row in sequences.tokens]
        np.testing.assert_allclose(log_probs, expected, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(mixture_specs(), st.integers(0, 10**6))
def test_log_prob_from_counts_equals_per_token_loop_on_variable_lengths(spec, seed):
    train, _ = spec.sample()
    rng = np.random.default_rng(seed)
    tabular, mixture = random_tabular(rng, spec.num_states), random_mixture(rng, 2, spec.num_states)
    for model, loop in ((tabular, loop_log_prob_tabular), (mixture, loop_log_prob_mixture)):
        expected = [loop(model, train.tokens[i, : train.lengths[i]]) for i in range(len(train))]
        np.testing.assert_allclose(model.logps(train).numpy(), expected, rtol=1e-10)


def test_response_log_prob_excludes_the_prompt():
    rng = np.random.default_rng(0)
    sequences = all_sequences(3, 4)
    tabular = random_tabular(rng, 3)
    initial = torch.log_softmax(tabular.initial_logits, -1)[np.array(sequences.tokens[:, 0])]
    torch.testing.assert_close(tabular.response_logps(sequences), tabular.logps(sequences) - initial)
    mixture = random_mixture(rng, 2, 3)
    # conditional on the prompt, response probabilities sum to one for every prompt
    conditional = torch.exp(mixture.response_logps(sequences))
    for state in range(3):
        assert conditional[sequences.tokens[:, 0] == state].sum().item() == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 3), st.integers(2, 4), st.integers(1, 3), st.integers(0, 10**6))
def test_mixture_next_token_predictive_equals_enumerated_conditionals(num_states, length, num_components, seed):
    model = random_mixture(np.random.default_rng(seed), num_components, num_states)
    sequences = all_sequences(num_states, length)
    joint = np.exp(model.logps(sequences).numpy())
    predictive = model.next_token_probs(sequences).numpy()  # (n, L-1, V)
    for i, row in enumerate(sequences.tokens):
        for t in range(length - 1):
            prefix = tuple(row[: t + 1])
            matches = np.all(sequences.tokens[:, : t + 1] == prefix, axis=1)
            denominator = joint[matches].sum()
            for v in range(num_states):
                numerator = joint[matches & (sequences.tokens[:, t + 1] == v)].sum()
                assert predictive[i, t, v] == pytest.approx(numerator / denominator, rel=1e-9)


def test_tabular_next_token_probs_are_transition_rows_and_zero_on_padding():
    model = random_tabular(np.random.default_rng(1), 3)
    sequences = SequenceSet(np.array([[0, 1, 2], [2, 0, -1]]), np.array([3, 2]), np.array([0, 0]), ("a",), 3)
    probs = model.next_token_probs(sequences)
    rows = torch.softmax(model.transition_logits, -1)
    torch.testing.assert_close(probs[0, 1], rows[1])
    torch.testing.assert_close(probs[1, 0], rows[2])
    assert torch.all(probs[1, 1] == 0)


def test_tabular_mle_recovers_the_chain():
    chain = random_chain(np.random.default_rng(2), 4)
    spec = MixtureSpec((Component("a", chain, 30, 20000, 0),), seed=1)
    train, _ = spec.sample()
    fitted = TabularMarkov.fit(train)
    np.testing.assert_allclose(torch.softmax(fitted.transition_logits, -1).numpy(), chain.transition_matrix, atol=0.01)
    np.testing.assert_allclose(torch.softmax(fitted.initial_logits, -1).numpy(), chain.initial_probs, atol=0.015)


def test_population_mle_on_one_chain_is_the_chain():
    chain = random_chain(np.random.default_rng(4), 5)
    model = TabularMarkov.population_mle([Component("a", chain, 12, 100, 0)])
    np.testing.assert_allclose(torch.softmax(model.transition_logits, -1).numpy(), chain.transition_matrix, atol=1e-12)
    np.testing.assert_allclose(torch.softmax(model.initial_logits, -1).numpy(), chain.initial_probs, atol=1e-12)


def test_population_mle_on_a_mixture_matches_a_large_sample():
    chains_by_name = block_chains()
    components = (Component("retain", chains_by_name["retain"], 20, 40000, 0),
                  Component("forget1", chains_by_name["forget1"], 20, 20000, 0),
                  Component("forget2", chains_by_name["forget2"], 5, 20000, 0))
    population = TabularMarkov.population_mle(components)
    sample_fit = TabularMarkov.fit(MixtureSpec(components, seed=0).sample()[0])
    population_rows = torch.softmax(population.transition_logits, -1).numpy()
    sample_rows = torch.softmax(sample_fit.transition_logits, -1).numpy()
    # sampling error of a row estimate from >= ~1e5 visits is below 0.005
    np.testing.assert_allclose(sample_rows, population_rows, atol=0.006)
    # and the population model is not simply one of the chains: forget rows are mixed
    assert not np.allclose(population_rows, chains_by_name["retain"].transition_matrix, atol=0.05)


def test_mixture_from_components_weights_by_sequence_count():
    chains_by_name = block_chains()
    mixture = MixtureOfChains.from_components([Component("a", chains_by_name["retain"], 20, 300, 0),
                                               Component("b", chains_by_name["forget1"], 5, 100, 0)])
    np.testing.assert_allclose(torch.softmax(mixture.weight_logits, -1).numpy(), [0.75, 0.25])


@settings(max_examples=15, deadline=None)
@given(mixture_specs(max_sequences=30), st.integers(1, 3), st.integers(0, 10**6))
def test_em_never_decreases_the_log_likelihood(spec, num_components, seed):
    train, _ = spec.sample()
    _, history = MixtureOfChains.fit(train, num_components, np.random.default_rng(seed), max_iterations=30,
                                     tolerance=0.0)
    assert all(np.isfinite(history))
    assert np.all(np.diff(history) >= -1e-8 * np.abs(history[:-1]).max())


def test_em_recovers_well_separated_chains():
    chains_by_name = block_chains(leakage=0.05)
    components = tuple(Component(name, chain, 20, 600, 0) for name, chain in chains_by_name.items())
    train, _ = MixtureSpec(components, seed=0).sample()
    model, history = MixtureOfChains.fit(train, 3, np.random.default_rng(0), max_iterations=200)
    truth = MixtureOfChains.from_components(components)
    # the fitted likelihood is at least the true model's (it is the MLE), and close to it
    true_ll = float(truth.logps(train).sum())
    assert history[-1] >= true_ll - 1e-6 * abs(true_ll)
    assert history[-1] - true_ll < 0.02 * abs(true_ll)


def test_model_input_validation():
    with pytest.raises(ValueError, match="shape"):
        TabularMarkov(np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        TabularMarkov(np.array([0.0, np.nan]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        MixtureOfChains(np.zeros(2), np.zeros((3, 4)), np.zeros((3, 4, 4)))
    model = TabularMarkov(np.zeros(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="states"):
        model.logps(all_sequences(2, 3))
    with pytest.raises(TypeError, match="SequenceSet"):
        model.logps(np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="smoothing"):
        TabularMarkov.from_counts(np.ones(3), np.ones((3, 3)), smoothing=-1)
    with pytest.raises(ValueError, match="non-empty"):
        TabularMarkov.fit(all_sequences(2, 3).subset(np.array([], dtype=int)))


def test_to_chain_round_trip():
    chain = random_chain(np.random.default_rng(7), 4)
    back = TabularMarkov.from_chain(chain).to_chain()
    np.testing.assert_allclose(back.transition_matrix, chain.transition_matrix, atol=1e-12)
