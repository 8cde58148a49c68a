"""First-order Markov chains: the ground-truth data generators of the simulator.

A chain is an initial distribution ``mu`` (V,) and a row-stochastic transition matrix ``P`` (V, V).
A sequence ``s_1..s_L`` has probability ``mu(s_1) prod_t P(s_{t+1} | s_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import check_real
from .validation import check_int, check_probability_vector, check_rng, check_stochastic_matrix, check_tokens

MAX_BLOCK_STATES = 10_000
"""The largest V :func:`block_chains` builds (three dense V x V float64 matrices: 2.4 GB at the limit)."""


@dataclass(frozen=True, eq=False)
class MarkovChain:
    """A validated first-order Markov chain.

    Attributes:
        initial_probs: (V,) float64, ``mu(s) = P(s_1 = s)``.
        transition_matrix: (V, V) float64, ``P[s, s'] = P(s_{t+1} = s' | s_t = s)``; rows sum to 1.
    """

    initial_probs: np.ndarray
    transition_matrix: np.ndarray

    def __post_init__(self) -> None:
        initial = check_probability_vector(self.initial_probs, "initial_probs")
        transition = check_stochastic_matrix(self.transition_matrix, "transition_matrix", initial.size)
        for array in (initial, transition):
            array.setflags(write=False)
        object.__setattr__(self, "initial_probs", initial)
        object.__setattr__(self, "transition_matrix", transition)

    @property
    def num_states(self) -> int:
        """V, the number of states (the vocabulary size)."""
        return self.initial_probs.size

    def sample(self, num_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``num_sequences`` i.i.d. sequences of ``length`` states.

        Vectorised over sequences (one inverse-CDF draw per time step for all sequences at once).

        Returns:
            (num_sequences, length) int64 state ids.
        """
        num_sequences = check_int(num_sequences, "num_sequences", 0)
        length = check_int(length, "length", 1)
        rng = check_rng(rng)
        uniforms = rng.random((num_sequences, length))  # (n, L)
        tokens = np.empty((num_sequences, length), dtype=np.int64)
        tokens[:, 0] = _inverse_cdf(np.cumsum(self.initial_probs)[None, :], uniforms[:, 0])
        cumulative = np.cumsum(self.transition_matrix, axis=1)  # (V, V)
        for t in range(1, length):
            tokens[:, t] = _inverse_cdf(cumulative[tokens[:, t - 1]], uniforms[:, t])
        return tokens

    def logps(self, tokens) -> np.ndarray:
        """Exact log-probability ``log mu(s_1) + sum_t log P(s_{t+1} | s_t)`` of each sequence.

        Args:
            tokens: (n, L) or (L,) integer state ids.
        Returns:
            (n,) float64 (or a 0-d array for a single sequence); ``-inf`` for impossible sequences.
        """
        tokens = check_tokens(tokens, "tokens", self.num_states)
        single = tokens.ndim == 1
        tokens = np.atleast_2d(tokens)  # (n, L)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (n, L) with L >= 1, got {tokens.shape}")
        with np.errstate(divide="ignore"):
            log_initial = np.log(self.initial_probs)
            log_transition = np.log(self.transition_matrix)
        result = log_initial[tokens[:, 0]] + log_transition[tokens[:, :-1], tokens[:, 1:]].sum(axis=1)
        return result[0] if single else result


    log_prob = logps  # deprecated name (before the docs/theory.md "Names" glossary)

    def state_marginals(self, length: int) -> np.ndarray:
        """Marginal state distributions ``q_1 = mu``, ``q_{t+1} = q_t P``.

        Returns:
            (length, V) float64; row t-1 is ``P(s_t = .)``.
        """
        length = check_int(length, "length", 1)
        marginals = np.empty((length, self.num_states))
        marginals[0] = self.initial_probs
        for t in range(1, length):
            marginals[t] = marginals[t - 1] @ self.transition_matrix
        return marginals


def _inverse_cdf(cumulative: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Index of the first cumulative entry exceeding each uniform; cumulative (n or 1, V), uniforms (n,)."""
    indices = (uniforms[:, None] >= cumulative).sum(axis=1)  # (n,)
    return np.minimum(indices, cumulative.shape[1] - 1)


BLOCK_NAMES = ("retain", "forget1", "forget2")


def block_chains(num_states: int = 10, leakage: float = 0.2) -> dict[str, MarkovChain]:
    """The SimNPO paper's retain / forget1 / forget2 chains (docs/theory.md, "Mixtures of Markov chains").

    With ``m = V // 3`` and blocks ``B_0 = {0..m-1}`` (retain), ``B_1 = {m..2m-1}`` (forget1),
    ``B_2 = {2m..3m-1}`` (forget2), chain k has, for a state s in its block B_k,

        P_k(s' | s) = (1 - eps) / m   if s' in B_k,      eps / (V - m)   otherwise,

    and the uniform row ``1 / V`` for s outside B_k. Its initial distribution ``mu_k`` has the in-block
    row's pattern. With ``V = 10`` state 9 belongs to no block.

    Args:
        num_states: V >= 3.
        leakage: eps in [0, 1], the probability of leaving the block in one step.
    Returns:
        ``{"retain": chain, "forget1": chain, "forget2": chain}``.
    """
    num_states = check_int(num_states, "num_states", 3)
    if num_states > MAX_BLOCK_STATES:
        raise ValueError(f"num_states must be <= {MAX_BLOCK_STATES} for block chains (each is a dense V x V "
                         f"matrix), got {num_states}")
    leakage = check_real("leakage", leakage, minimum=0.0)
    if leakage > 1.0:
        raise ValueError(f"leakage must lie in [0, 1], got {leakage}")
    block_size = num_states // 3
    chains = {}
    for index, name in enumerate(BLOCK_NAMES):
        in_block = np.zeros(num_states, dtype=bool)
        in_block[index * block_size : (index + 1) * block_size] = True
        block_row = np.where(in_block, (1.0 - leakage) / block_size, leakage / (num_states - block_size))
        transition = np.where(in_block[:, None], block_row[None, :], 1.0 / num_states)  # (V, V)
        chains[name] = MarkovChain(block_row, transition)
    return chains
