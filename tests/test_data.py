"""Components, MixtureSpec sampling/splitting and SequenceSet statistics, I/O and validation."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import mixture_specs, random_chain

from markovsim.chains import block_chains
from markovsim.data import PAD_TOKEN, Component, MixtureSpec, SequenceSet, concatenate


def paper_spec(seed=0, scale=1):
    chains = block_chains()
    return MixtureSpec((
        Component.with_split("retain", chains["retain"], 20, 100 * scale),
        Component.with_split("forget1", chains["forget1"], 20, 50 * scale, role="forget"),
        Component.with_split("forget2", chains["forget2"], 5, 50 * scale, role="forget"),
    ), seed=seed)


def test_split_sizes_lengths_and_padding():
    train, test = paper_spec().sample()
    assert train.component_counts() == {"retain": 80, "forget1": 40, "forget2": 40}
    assert test.component_counts() == {"retain": 20, "forget1": 10, "forget2": 10}
    forget2 = train.select("forget2")
    assert forget2.max_length == 5 and np.all(forget2.lengths == 5)
    rows = train.component_ids == train.component_names.index("forget2")
    assert np.all(train.tokens[rows, 5:] == PAD_TOKEN)
    assert np.all(train.num_tokens[rows] == 4)


def test_sampling_is_deterministic_and_components_independent():
    first_train, first_test = paper_spec(seed=3).sample()
    second_train, second_test = paper_spec(seed=3).sample()
    assert np.array_equal(first_train.tokens, second_train.tokens)
    assert np.array_equal(first_test.tokens, second_test.tokens)
    other, _ = paper_spec(seed=4).sample()
    assert not np.array_equal(first_train.tokens, other.tokens)
    # adding a component leaves the existing components' data unchanged
    spec = paper_spec(seed=3)
    extra = Component("extra", random_chain(np.random.default_rng(0), 10), 7, 5, 5)
    extended = MixtureSpec(spec.components + (extra,), seed=3)
    extended_train, _ = extended.sample()
    np.testing.assert_array_equal(extended_train.select("forget2").tokens, first_train.select("forget2").tokens)


def brute_statistics(sequences):
    v = sequences.num_states
    onehots = np.zeros((len(sequences), v))
    counts = np.zeros((len(sequences), v, v))
    for i in range(len(sequences)):
        row = sequences.tokens[i, : sequences.lengths[i]]
        onehots[i, row[0]] = 1
        for a, b in zip(row[:-1], row[1:]):
            counts[i, a, b] += 1
    return onehots, counts


@settings(max_examples=25, deadline=None)
@given(mixture_specs())
def test_sufficient_statistics_match_a_loop(spec):
    train, test = spec.sample()
    for sequences in (train, test):
        onehots, counts = brute_statistics(sequences)
        np.testing.assert_array_equal(sequences.first_state_onehots, onehots)
        np.testing.assert_array_equal(sequences.transition_counts, counts)
        np.testing.assert_array_equal(sequences.transition_counts.sum(axis=(1, 2)), sequences.num_tokens)


def test_select_concatenate_and_subset_round_trip():
    train, test = paper_spec().sample()
    pieces = [train.select("forget2"), train.select("retain", "forget1")]
    joined = concatenate(pieces)
    assert len(joined) == len(train)
    assert joined.component_names == train.component_names  # select keeps every name, so ids stay comparable
    assert joined.component_counts() == train.component_counts()
    np.testing.assert_array_equal(joined.transition_counts.sum(0), train.transition_counts.sum(0))
    both = concatenate([train, test])
    assert len(both) == len(train) + len(test) and both.component_names == train.component_names
    with pytest.raises(ValueError, match="select needs names"):
        train.select("nope")


def test_save_load_round_trip_is_atomic(tmp_path):
    train, _ = paper_spec().sample()
    path = tmp_path / "sets" / "train.npz"
    train.save(path)
    assert os.listdir(path.parent) == ["train.npz"]
    loaded = SequenceSet.load(path)
    np.testing.assert_array_equal(loaded.tokens, train.tokens)
    np.testing.assert_array_equal(loaded.transition_counts, train.transition_counts)
    assert loaded.component_names == train.component_names


def test_malformed_file_raises_value_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, tokens=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="not a valid SequenceSet"):
        SequenceSet.load(bad)
    out_of_range = tmp_path / "range.npz"
    np.savez(out_of_range, tokens=np.array([[0, 5]]), lengths=np.array([2]), component_ids=np.array([0]),
             component_names=np.asarray('["a"]'), num_states=np.asarray(3))
    with pytest.raises(ValueError, match="out of range"):
        SequenceSet.load(out_of_range)


def test_bad_components_and_specs():
    chain = block_chains()["retain"]
    with pytest.raises(ValueError, match="length"):
        Component("a", chain, 1, 5, 5)
    with pytest.raises(ValueError, match="empty"):
        Component("a", chain, 5, 0, 0)
    with pytest.raises(ValueError, match="role"):
        Component("a", chain, 5, 5, 5, role="other")
    with pytest.raises(ValueError, match="test_fraction"):
        Component.with_split("a", chain, 5, 10, test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        Component.with_split("a", chain, 5, 10, test_fraction=0.0)
    with pytest.raises(ValueError, match="duplicate component names"):
        MixtureSpec((Component("a", chain, 5, 5, 5), Component("a", chain, 6, 5, 5)))
    with pytest.raises(ValueError, match="at least one"):
        MixtureSpec(())
    with pytest.raises(ValueError, match="same number of states"):
        MixtureSpec((Component("a", chain, 5, 5, 5),
                     Component("b", random_chain(np.random.default_rng(0), 3), 5, 5, 5)))


def test_bad_sequence_sets():
    with pytest.raises(ValueError, match="out of range"):
        SequenceSet(np.array([[0, 3]]), np.array([2]), np.array([0]), ("a",), 3)
    with pytest.raises(ValueError, match="integer"):
        SequenceSet(np.array([[0.5, 1.0]]), np.array([2]), np.array([0]), ("a",), 3)
    with pytest.raises(ValueError, match="lengths must lie"):
        SequenceSet(np.array([[0, 1]]), np.array([1]), np.array([0]), ("a",), 3)
    with pytest.raises(ValueError, match="lengths must have shape"):
        SequenceSet(np.array([[0, 1]]), np.array([2, 2]), np.array([0]), ("a",), 3)
    with pytest.raises(ValueError, match="component_ids"):
        SequenceSet(np.array([[0, 1]]), np.array([2]), np.array([1]), ("a",), 3)
    with pytest.raises(ValueError, match="unique"):
        SequenceSet(np.array([[0, 1]]), np.array([2]), np.array([0]), ("a", "a"), 3)
    # padding values beyond each length are ignored (not validated as states)
    padded = SequenceSet(np.array([[0, 1, 99]]), np.array([2]), np.array([0]), ("a",), 3)
    assert padded.tokens[0, 2] == PAD_TOKEN and padded.transition_counts.sum() == 1


def test_failed_write_leaves_nothing_on_disk(tmp_path):
    from markovsim.results import atomic_output

    target = tmp_path / "out.npz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            open(temporary, "wb").write(b"half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    train, _ = paper_spec().sample()
    train.save(target)
    before = target.read_bytes()
    class Unconvertible:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("cannot convert")

    from markovsim.data import atomic_save_npz

    with pytest.raises(RuntimeError, match="cannot convert"):
        atomic_save_npz(target, {"tokens": np.zeros(3), "bad": Unconvertible()})
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["out.npz"]
