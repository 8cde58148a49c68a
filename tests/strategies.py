"""Shared hypothesis strategies (a flat module of strategy functions), float64 torch tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

from markovsim.chains import MarkovChain
from markovsim.data import Component, MixtureSpec

DTYPE = torch.float64


def log_uniform(min_value: float, max_value: float):
    """Floats spread evenly in log10 between two positive bounds (both included)."""
    lo, hi = math.log10(min_value), math.log10(max_value)
    return st.floats(lo, hi).map(lambda e: min(max(10.0**e, min_value), max_value))


def betas(min_value: float = 1e-4, max_value: float = 1e3):
    """Inverse temperatures, log-uniform in [min_value, max_value] (docs/theory.md: losses finite for beta in
    1e-4 to 1e3)."""
    return log_uniform(min_value, max_value)


def gammas(max_value: float = 5.0):
    """SimNPO reward margins in [-max_value, max_value] (the paper's are >= 0; any finite margin is accepted)."""
    return st.floats(-max_value, max_value)


@st.composite
def sequence_batches(draw, max_batch=6, max_length=4096, min_logp=-1e4, max_logp=0.0):
    """(logps, ref_logps, num_tokens), each a float64 (B,) tensor; num_tokens integers >= 1."""
    size = draw(st.integers(1, max_batch))
    values = st.floats(min_logp, max_logp)
    logps = draw(st.lists(values, min_size=size, max_size=size))
    ref_logps = draw(st.lists(values, min_size=size, max_size=size))
    lengths = draw(st.lists(st.integers(1, max_length), min_size=size, max_size=size))
    return (
        torch.tensor(logps, dtype=DTYPE),
        torch.tensor(ref_logps, dtype=DTYPE),
        torch.tensor(lengths, dtype=DTYPE),
    )


def moderate_sequence_batches(max_batch=6):
    """Sequence batches with moderate values (logps in [-50, 0], lengths up to 64)."""
    return sequence_batches(max_batch=max_batch, max_length=64, min_logp=-50.0, max_logp=0.0)


def padding_values():
    """Values a padded position may hold: -inf, +inf, NaN, huge or ordinary numbers."""
    return st.sampled_from([-math.inf, math.inf, math.nan, -1e300, 1e300, 0.0, -3.5])


@st.composite
def masks(draw, batch: int, length: int, min_per_row: int = 1):
    """(batch, length) bool masks with at least ``min_per_row`` True per row, at any positions."""
    rows = []
    for _ in range(batch):
        row = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        for i in draw(st.permutations(range(length)))[:min_per_row]:
            row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@st.composite
def token_logp_batches(draw, max_batch=4, max_length=12, min_logp=-20.0):
    """(token_logps (B, T) float64, mask (B, T) bool): finite log-probs on masked-in positions,
    arbitrary values (including -inf, +inf and NaN) on padding; every row has a response token."""
    batch, length = draw(st.integers(1, max_batch)), draw(st.integers(1, max_length))
    mask = draw(masks(batch, length))
    kept = st.floats(min_logp, 0.0)
    values = [[draw(kept) if m else draw(padding_values()) for m in row] for row in mask.tolist()]
    return torch.tensor(values, dtype=DTYPE), mask


@st.composite
def unigram_problems(draw, max_vocab=5, max_batch=4, max_length=8):
    """A tiny parametrised model: logits theta (V,), reference logits theta_ref (V,), tokens (B, T)
    int64 and a mask (B, T); token log-probs are log_softmax(theta)[tokens]."""
    vocab = draw(st.integers(2, max_vocab))
    batch, length = draw(st.integers(1, max_batch)), draw(st.integers(1, max_length))
    logits = st.lists(st.floats(-3.0, 3.0), min_size=vocab, max_size=vocab)
    theta, theta_ref = draw(logits), draw(logits)
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=batch * length, max_size=batch * length))
    return (
        torch.tensor(theta, dtype=DTYPE),
        torch.tensor(theta_ref, dtype=DTYPE),
        torch.tensor(tokens).reshape(batch, length),
        draw(masks(batch, length)),
    )


@st.composite
def vocab_logprob_batches(draw, max_batch=3, max_length=5, max_vocab=5):
    """(ref_log_probs (B, T, V), logits (B, T, V), mask (B, T)), float64. The reference is a
    log_softmax with some entries at -inf (probability 0, never all of a row); logits are finite."""
    batch, length = draw(st.integers(1, max_batch)), draw(st.integers(1, max_length))
    vocab = draw(st.integers(2, max_vocab))
    size = batch * length * vocab
    ref_logits = draw(st.lists(st.floats(-4.0, 4.0), min_size=size, max_size=size))
    ref_logits = torch.tensor(ref_logits, dtype=DTYPE).reshape(batch, length, vocab)
    zero = torch.tensor(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    zero = zero.reshape(batch, length, vocab)
    zero[..., draw(st.integers(0, vocab - 1))] = False  # keep one supported entry per row
    ref_logits = ref_logits.masked_fill(zero, -math.inf)
    logits = draw(st.lists(st.floats(-4.0, 4.0), min_size=size, max_size=size))
    logits = torch.tensor(logits, dtype=DTYPE).reshape(batch, length, vocab)
    return torch.log_softmax(ref_logits, -1), logits, draw(masks(batch, length))


# ---- Markov chains, mixtures and sequence sets ----


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
