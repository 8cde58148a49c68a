"""MarkovChain and block_chains against brute-force enumeration, sampling tests and formulas."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from scipy import stats
from strategies import chains, random_chain

from markovsim.chains import MarkovChain, block_chains


def enumerate_log_probs(chain: MarkovChain, length: int) -> dict[tuple, float]:
    """log P(sequence) for every sequence by a plain Python loop over tokens."""
    result = {}
    for sequence in itertools.product(range(chain.num_states), repeat=length):
        value = math.log(chain.initial_probs[sequence[0]])
        for a, b in zip(sequence[:-1], sequence[1:]):
            value += math.log(chain.transition_matrix[a, b])
        result[sequence] = value
    return result


@settings(max_examples=30, deadline=None)
@given(chains())
def test_enumerated_probabilities_sum_to_one_and_match_log_prob(chain):
    for length in (1, 2, 4):
        brute = enumerate_log_probs(chain, length)
        assert math.isclose(sum(math.exp(v) for v in brute.values()), 1.0, rel_tol=1e-10)
        tokens = np.array(list(brute))
        np.testing.assert_allclose(chain.logps(tokens), list(brute.values()), rtol=1e-12)


def test_sampled_frequencies_pass_chi_square():
    chain = random_chain(np.random.default_rng(3), 3)
    length, num_samples = 3, 30000
    samples = chain.sample(num_samples, length, np.random.default_rng(0))
    brute = enumerate_log_probs(chain, length)
    codes = samples @ (3 ** np.arange(length)[::-1])
    observed = np.bincount(codes, minlength=3**length)
    expected = np.array([math.exp(brute[s]) for s in itertools.product(range(3), repeat=length)]) * num_samples
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_sample_is_reproducible_and_in_range():
    chain = random_chain(np.random.default_rng(1), 4)
    first = chain.sample(50, 7, np.random.default_rng(5))
    assert first.shape == (50, 7) and first.dtype == np.int64
    assert np.array_equal(first, chain.sample(50, 7, np.random.default_rng(5)))
    assert first.min() >= 0 and first.max() < 4


@settings(max_examples=20, deadline=None)
@given(chains())
def test_state_marginals_match_enumeration(chain):
    length = 4
    brute = enumerate_log_probs(chain, length)
    marginals = np.zeros((length, chain.num_states))
    for sequence, log_p in brute.items():
        for t, state in enumerate(sequence):
            marginals[t, state] += math.exp(log_p)
    np.testing.assert_allclose(chain.state_marginals(length), marginals, atol=1e-12)


@pytest.mark.parametrize("num_states,leakage", [(10, 0.2), (9, 0.0), (12, 0.5), (3, 1.0)])
def test_block_chains_match_theory_entry_by_entry(num_states, leakage):
    chains_by_name = block_chains(num_states, leakage)
    assert list(chains_by_name) == ["retain", "forget1", "forget2"]
    m = num_states // 3
    for k, name in enumerate(["retain", "forget1", "forget2"]):
        block = set(range(k * m, (k + 1) * m))
        chain = chains_by_name[name]
        for s in range(num_states):
            in_row = (1 - leakage) / m
            out_row = leakage / (num_states - m)
            expected_initial = in_row if s in block else out_row
            assert chain.initial_probs[s] == pytest.approx(expected_initial, abs=1e-15)
            for s_next in range(num_states):
                if s in block:
                    expected = in_row if s_next in block else out_row
                else:
                    expected = 1 / num_states
                assert chain.transition_matrix[s, s_next] == pytest.approx(expected, abs=1e-15)


def test_block_chains_paper_values():
    forget2 = block_chains()["forget2"]
    assert forget2.transition_matrix[6, 7] == pytest.approx(0.8 / 3)
    assert forget2.transition_matrix[6, 0] == pytest.approx(0.2 / 7)
    assert forget2.transition_matrix[9, 6] == pytest.approx(0.1)


@pytest.mark.parametrize("initial,transition,match", [
    ([0.5, -0.1, 0.6], np.full((3, 3), 1 / 3), "negative"),
    ([0.5, np.nan, 0.5], np.full((3, 3), 1 / 3), "NaN"),
    ([0.5, 0.2, 0.2], np.full((3, 3), 1 / 3), "sums to"),
    ([0.5, 0.5], np.full((3, 3), 1 / 3), "3 states but 2"),
    ([1 / 3] * 3, np.full((3, 2), 0.5), "square"),
    ([1 / 3] * 3, [[1, 0, 0], [0, 1, 0], [0.5, 0.6, -0.1]], "negative"),
    ([1 / 3] * 3, [[1, 0, 0], [0, 1, 0], [0.5, 0.6, 0.0]], "row 2 sums to"),
    ([1 / 3] * 3, np.full((3, 3, 1), 1 / 3), "dimension"),
])
def test_malformed_chains_raise_value_error(initial, transition, match):
    with pytest.raises(ValueError, match=match):
        MarkovChain(initial, transition)


def test_bad_tokens_and_arguments():
    chain = random_chain(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="out of range"):
        chain.logps([[0, 1, 3]])
    with pytest.raises(ValueError, match="out of range"):
        chain.logps([[0, -1, 2]])
    with pytest.raises(ValueError, match="integer"):
        chain.logps([[0.5, 1.0]])
    with pytest.raises(TypeError, match="Generator"):
        chain.sample(3, 4, rng=0)
    with pytest.raises(ValueError, match="length"):
        chain.sample(3, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="leakage"):
        block_chains(10, 1.5)
    with pytest.raises(ValueError, match="num_states"):
        block_chains(2)


def test_chain_arrays_are_read_only():
    chain = random_chain(np.random.default_rng(0), 3)
    with pytest.raises(ValueError):
        chain.transition_matrix[0, 0] = 1.0
