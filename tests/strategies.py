"""Shared hypothesis strategies (a flat module of strategy functions), float64 torch tensors."""

from __future__ import annotations

import json
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


@st.composite
def exact_problems(draw, max_states: int = 5, max_length: int = 7, max_sequences: int = 5, max_chains: int = 3):
    """``(forget, retain, models, reference)`` with every shape drawn: V states; one or two retain components and
    two forget components (forget1, forget2), each its own length (2 = a single response token) and count (the
    retain set holds >= 2 sequences); random chains and model parameters from a drawn seed.

    ``models``: ``{"tabular": TabularMarkov, "mixture": MixtureOfChains with K chains}``, K drawn in
    [1, max_chains]; ``reference``: the mixture of the components' true chains (one chain each).
    """
    from markovsim.models import MixtureOfChains, TabularMarkov

    num_states, num_chains = draw(st.integers(2, max_states)), draw(st.integers(1, max_chains))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = ["retain", "retain2"][:draw(st.integers(1, 2))] + ["forget1", "forget2"]
    components = tuple(
        Component(name, random_chain(rng, num_states), draw(st.integers(2, max_length)),
                  draw(st.integers(2 if name == "retain" else 1, max_sequences)), 0,
                  role="retain" if name.startswith("retain") else "forget")
        for name in names)
    train, _ = MixtureSpec(components, seed=draw(st.integers(0, 1000))).sample()
    models = {"tabular": TabularMarkov(rng.normal(size=num_states), rng.normal(size=(num_states, num_states))),
              "mixture": MixtureOfChains(rng.normal(size=num_chains), rng.normal(size=(num_chains, num_states)),
                                         rng.normal(size=(num_chains, num_states, num_states)))}
    reference = MixtureOfChains.from_components(components)
    retain = train.select(*(name for name in names if name.startswith("retain")))
    return train.select("forget1", "forget2"), retain, models, reference


# ---- malformed arguments of the public entry points ----


@st.composite
def one_bad_argument(draw, valid: dict, bad: dict):
    """``(arguments, name)``: the ``valid`` keyword arguments with at most one, ``name``, replaced by a draw from
    the strategy ``bad[name]``; ``name`` is None when every argument is valid (so the call must succeed)."""
    name = draw(st.sampled_from([None, *bad]))
    arguments = dict(valid)
    if name is not None:
        arguments[name] = draw(bad[name])
    return arguments, name


def row_indices(num_rows: int):
    """Valid ``SequenceSet.subset`` arguments for a set of ``num_rows`` rows: row numbers in [0, num_rows) (lists,
    ranges or int arrays; any order, repeats, empty) or (num_rows,) boolean masks (lists or arrays)."""
    rows = st.lists(st.integers(0, num_rows - 1), max_size=6)
    mask = st.lists(st.booleans(), min_size=num_rows, max_size=num_rows)
    return st.one_of(rows, rows.map(np.asarray), st.just(range(num_rows)), mask, mask.map(np.asarray))


def bad_row_indices(num_rows: int):
    """Malformed ``SequenceSet.subset`` arguments: out of range or negative row numbers, floats (integral too),
    wrong-length masks, 2-d, ragged or complex arrays, scalars, strings, None, dicts and sets."""
    wrong_mask = st.lists(st.booleans(), min_size=1, max_size=num_rows + 2).filter(lambda m: len(m) != num_rows)
    out_of_range = st.lists(st.integers(-3, num_rows + 3), min_size=1, max_size=4).filter(
        lambda rows: min(rows) < 0 or max(rows) >= num_rows)
    floats = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(1.0)), min_size=1, max_size=3)
    odd = st.sampled_from([None, "0", b"1", 1.5, 3, {0: 1}, {0}, [[0, 1]], [[0], [1, 2]], [1j], np.zeros((2, 2), int),
                           np.array([0.0, 1.0]), 10**30, [10**30]])
    return st.one_of(wrong_mask, out_of_range, floats, floats.map(np.asarray), odd)


def saved_component_names():
    """The JSON text stored as ``component_names`` in a SequenceSet file: a list of names, or a JSON object, string,
    number, null, or a list holding non-strings / empty or repeated names."""
    values = st.one_of(st.just(["a", "b"]), st.lists(st.text(max_size=2), max_size=3),
                       st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(), min_size=1, max_size=3),
                       st.sampled_from(["ab", 5, None, 1.5, True, [1, 2], ["a", None], [["a"]]]))
    return values.map(json.dumps)


def saved_num_states():
    """The array stored as ``num_states`` in a SequenceSet file: an integer, or a float, bool, 1-d array or string."""
    return st.one_of(st.integers(3, 6).map(np.asarray),
                     st.sampled_from([np.asarray(4.0), np.asarray(3.5), np.asarray(True), np.asarray([4, 4]),
                                      np.asarray("4"), np.asarray(np.nan), np.zeros(0, dtype=np.int64)]))


def flow_times():
    """Valid ``gradient_flow`` times: short non-decreasing lists (or arrays) in [0, 0.2], 0 included."""
    times = st.lists(st.one_of(st.floats(0.0, 0.2), st.just(0.0)), min_size=1, max_size=3).map(sorted)
    return st.one_of(times, times.map(np.asarray))


def bad_flow_times():
    """Malformed ``gradient_flow`` times: NaN/inf, negative, decreasing, empty, 2-d, non-numeric, complex, scalar,
    too large for a float."""
    return st.sampled_from([[0.0, math.nan], [0.0, math.inf], [math.nan], [-math.inf, 0.0], [], [-1.0, 0.0],
                            [0.2, 0.1], [[0.0, 0.1]], "ab", None, {0: 1}, ["a"], [10**400], 0.1, [0.0, 1j]])


def bad_betas():
    """Inverse temperatures that no loss accepts: too small for 2 / beta to be finite, <= 0, NaN/inf, too large for a
    float, or not a real number."""
    return st.one_of(st.floats(0.0, 1e-39), st.floats(max_value=0.0), st.sampled_from(
        [1e-320, 5e-324, 1e-39, -1e-320, math.nan, math.inf, -math.inf, 10**400, "0.1", None, True, 1j, [0.1]]))


def bad_weights():
    """Objective weights (forget_weight, retain_weight, alpha) that are negative, non-finite or not numbers."""
    return st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf, 10**400, "1", None, True,
                                                                    [1.0]]))


def objective_terms():
    """Values for ``Objective.total``'s ``forget_loss_mean`` / ``retain_value`` that are not finite tensors: tensors
    holding NaN/inf (0-d or (B,)), and non-tensors."""
    special = st.sampled_from([math.nan, math.inf, -math.inf])
    return st.one_of(special.map(lambda v: torch.tensor(v, dtype=DTYPE)),
                     st.lists(st.one_of(st.floats(-5, 5), special), min_size=1, max_size=3)
                     .filter(lambda values: not all(math.isfinite(v) for v in values))
                     .map(lambda values: torch.tensor(values, dtype=DTYPE)),
                     st.sampled_from([1.0, None, "x", [1.0], np.float64(1.0), np.array([1.0])]))


def scenario_sizes():
    """``num_train`` / ``num_test`` of a scenario component: small, or far more sequences than memory holds."""
    return st.one_of(st.integers(1, 20), st.integers(10**7, 10**15), st.sampled_from([10**11, 10**18]))
