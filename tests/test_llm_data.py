"""llm.data: the Hugging Face layout of Markov sequences and the seeded, resumable batch order."""

import numpy as np
import pytest

from llm.data import IGNORE_INDEX, batch_indices, encode, evaluation_chunks, merge_batches, shard, steps_per_epoch
from markovsim.data import SequenceSet

I = IGNORE_INDEX


def two_lengths():
    tokens = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    return SequenceSet(tokens, np.array([4, 2]), np.array([0, 1]), ("long", "short"), 7)


def test_response_layout_has_bos_padding_and_prompt_masked():
    encoded = encode(two_lengths(), "response")
    assert encoded.input_ids.tolist() == [[7, 1, 2, 3, 4], [7, 5, 6, 7, 7]]
    assert encoded.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert encoded.labels.tolist() == [[I, I, 2, 3, 4], [I, I, 6, I, I]]
    assert encoded.num_label_tokens.tolist() == [3, 1]  # |y| = L - 1
    assert encoded.component_names == ("long", "short")


def test_full_likelihood_layout_labels_every_state():
    encoded = encode(two_lengths(), "all")
    assert encoded.labels.tolist() == [[I, 1, 2, 3, 4], [I, 5, 6, I, I]]
    assert encoded.num_label_tokens.tolist() == [4, 2]


def test_batch_is_trimmed_to_its_longest_row():
    encoded = encode(two_lengths())
    assert encoded.batch([1])["input_ids"].tolist() == [[7, 5, 6]]
    assert encoded.batch([1, 0])["labels"].shape == (2, 5)


def test_encode_rejects_bad_input():
    with pytest.raises(TypeError, match="sequences must be a markovsim SequenceSet"):
        encode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="label_scope"):
        encode(two_lengths(), "prompt")


def test_batch_order_covers_each_epoch_once_and_is_a_function_of_the_step():
    n, size = 10, 3
    assert steps_per_epoch(n, size) == 3
    epoch = np.concatenate([batch_indices(n, size, step, seed=4) for step in range(3)])
    assert len(set(epoch.tolist())) == 9  # one partial batch dropped
    assert np.array_equal(batch_indices(n, size, 5, seed=4), batch_indices(n, size, 5, seed=4))
    assert not np.array_equal(batch_indices(n, size, 0, seed=4), batch_indices(n, size, 3, seed=4))
    assert len(batch_indices(2, 5, 0, seed=0)) == 2  # a set smaller than the batch is one batch


def test_streams_and_seeds_give_different_orders():
    assert not np.array_equal(batch_indices(50, 10, 0, 0, stream=0), batch_indices(50, 10, 0, 0, stream=1))
    assert not np.array_equal(batch_indices(50, 10, 0, 0), batch_indices(50, 10, 0, 1))


def test_shard_partitions_the_global_batch():
    rows = np.arange(7)
    parts = [shard(rows, rank, 3) for rank in range(3)]
    assert np.array_equal(np.concatenate(parts), rows)
    with pytest.raises(ValueError, match="batch_size >= num_processes"):
        shard(np.arange(1), 0, 2)


def test_merge_batches_pads_to_the_widest():
    encoded = encode(two_lengths())
    merged, slices = merge_batches([encoded.batch([1]), encoded.batch([0])], pad_token_id=7)
    assert merged["input_ids"].tolist() == [[7, 5, 6, 7, 7], [7, 1, 2, 3, 4]]
    assert merged["labels"][0].tolist() == [I, I, 6, I, I]
    assert merged["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert slices == [slice(0, 1), slice(1, 2)]


def test_evaluation_chunks_cover_every_row():
    chunks = evaluation_chunks(7, 3)
    assert [c.tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("bad", [0, -1])
def test_batch_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, bad, 0, 0)
    with pytest.raises(TypeError, match="batch_size"):
        batch_indices(10, 2.0, 0, 0)
