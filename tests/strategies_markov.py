"""Hypothesis strategies for Markov chains, mixtures and sequence sets (merged into strategies.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from markovsim.chains import MarkovChain
from markovsim.data import Component, MixtureSpec


def random_chain(rng: np.random.Generator, num_states: int, concentration: float = 1.0) -> MarkovChain:
    """A chain with Dirichlet(concentration) initial distribution and rows (all entries > 0 a.s.)."""
    alpha = np.full(num_states, concentration)
    return MarkovChain(rng.dirichlet(alpha), rng.dirichlet(alpha, size=num_states))


@st.composite
def chains(draw, min_states: int = 2, max_states: int = 4) -> MarkovChain:
    num_states = draw(st.integers(min_states, max_states))
    seed = draw(st.integers(0, 2**32 - 1))
    concentration = draw(st.sampled_from([0.3, 1.0, 5.0]))
    return random_chain(np.random.default_rng(seed), num_states, concentration)


@st.composite
def mixture_specs(draw, max_states: int = 4, max_components: int = 3, max_length: int = 6,
                  max_sequences: int = 12) -> MixtureSpec:
    """Small mixtures with different lengths per component."""
    num_states = draw(st.integers(2, max_states))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_components = draw(st.integers(1, max_components))
    components = tuple(
        Component(f"c{k}", random_chain(rng, num_states), draw(st.integers(2, max_length)),
                  draw(st.integers(1, max_sequences)), draw(st.integers(0, max_sequences)),
                  role=draw(st.sampled_from(["retain", "forget"])))
        for k in range(num_components)
    )
    return MixtureSpec(components, seed=draw(st.integers(0, 1000)))
