"""Markov ``SequenceSet`` -> token batches in the Hugging Face convention, and seeded batch order.

A sequence ``s_1..s_L`` (docs/theory.md, "Mixtures of Markov chains": ``s_1`` is the prompt x, ``s_2..s_L``
the response y) becomes

    input_ids      = [BOS, s_1, s_2, ..., s_L, PAD, ...]     BOS = PAD = V (the number of states)
    attention_mask = [1,   1,   1,   ..., 1,   0,   ...]
    labels         = [-100, s_1, s_2, ..., s_L, -100, ...]   label_scope "all" (pre-training, full likelihood)
    labels         = [-100, -100, s_2, ..., s_L, -100, ...]  label_scope "response" (unlearning, metrics)

Labels are aligned with ``input_ids``; the model's logits at position j predict ``labels[j + 1]``
(the shift happens in :mod:`llm.logps`, as inside ``transformers``).

Batch order is a pure function of ``(seed, stream, step)``: step ``k`` of an epoch of
``num_items // batch_size`` steps takes a slice of that epoch's seeded permutation (the last partial
batch is dropped). Resuming at any step therefore reproduces the order with no sampler state, and
every process computes the same global batch and keeps its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from markovsim.data import SequenceSet, merge_components

__all__ = [
    "IGNORE_INDEX",
    "LABEL_SCOPES",
    "bos_token_id",
    "EncodedSequences",
    "concatenate_encoded",
    "encode",
    "steps_per_epoch",
    "batch_indices",
    "epoch_permutation",
    "shard",
    "merge_batches",
    "padded_cat",
    "evaluation_chunks",
]

IGNORE_INDEX = -100
LABEL_SCOPES = ("response", "all")
FORGET_STREAM, RETAIN_STREAM = 0, 1


def bos_token_id(num_states: int) -> int:
    """The BOS (and padding) token id: V, right after the V state ids."""
    return int(num_states)


@dataclass(frozen=True, eq=False)
class EncodedSequences:
    """A ``SequenceSet`` as padded token tensors (CPU), sliced into batches on demand.

    Attributes:
        input_ids: (n, T + 1) int64, ``[BOS, s_1..s_L]`` then BOS padding (T = max length).
        attention_mask: (n, T + 1) int64, 1 on BOS and states.
        labels: (n, T + 1) int64, state ids where a loss applies, -100 elsewhere.
        token_lengths: (n,) int64 number of real tokens ``L + 1``.
        num_label_tokens: (n,) int64 labelled tokens per sequence (``L - 1`` or ``L``).
        component_ids: (n,) int64 indices into ``component_names``.
        component_names: names of the components.
        num_states: V.
        label_scope: ``"response"`` or ``"all"``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_lengths: torch.Tensor
    num_label_tokens: torch.Tensor
    component_ids: np.ndarray
    component_names: tuple[str, ...]
    num_states: int
    label_scope: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The rows ``indices`` as ``{input_ids, attention_mask, labels}``, trimmed to their longest row.

        Args:
            indices: int array/tensor of row indices (may be empty only if you never forward it).
            device: where to put the tensors (default CPU).
        Returns:
            dict of (b, t) int64 tensors, t = max token length among the rows.
        """
        rows = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        width = int(self.token_lengths[rows].max()) if rows.numel() else 1
        batch = {"input_ids": self.input_ids[rows, :width], "attention_mask": self.attention_mask[rows, :width],
                 "labels": self.labels[rows, :width]}
        return {key: value.to(device) for key, value in batch.items()} if device is not None else batch


def encode(sequences: SequenceSet, label_scope: str = "response") -> EncodedSequences:
    """Encode a ``SequenceSet`` (see the module docstring for the layout).

    Args:
        sequences: Markov sequences with V states (token ids 0..V-1, BOS = V).
        label_scope: ``"response"`` (labels on s_2..s_L: unlearning losses, metrics) or ``"all"``
            (labels on s_1..s_L: pre-training/retraining on the full likelihood).
    """
    if not isinstance(sequences, SequenceSet):
        raise TypeError(f"sequences must be a markovsim SequenceSet, got {type(sequences).__name__}")
    if label_scope not in LABEL_SCOPES:
        raise ValueError(f"label_scope must be one of {LABEL_SCOPES}, got {label_scope!r}")
    n, width = len(sequences), sequences.max_length + 1
    bos = bos_token_id(sequences.num_states)
    tokens = torch.tensor(np.asarray(sequences.tokens, dtype=np.int64))  # (n, T), PAD_TOKEN = -1 past L
    real = tokens >= 0  # (n, T)
    input_ids = torch.full((n, width), bos, dtype=torch.int64)
    input_ids[:, 1:] = torch.where(real, tokens, bos)
    attention_mask = torch.zeros((n, width), dtype=torch.int64)
    attention_mask[:, 0] = 1
    attention_mask[:, 1:] = real.long()
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.int64)
    labels[:, 1:] = torch.where(real, tokens, IGNORE_INDEX)
    if label_scope == "response":
        labels[:, 1] = IGNORE_INDEX  # s_1 is the prompt
    lengths = torch.tensor(np.asarray(sequences.lengths, dtype=np.int64))
    num_label_tokens = lengths - 1 if label_scope == "response" else lengths.clone()
    return EncodedSequences(input_ids, attention_mask, labels, lengths + 1, num_label_tokens,
                            np.asarray(sequences.component_ids, dtype=np.int64), tuple(sequences.component_names),
                            sequences.num_states, label_scope)


def concatenate_encoded(sets) -> EncodedSequences:
    """The rows of several encoded sets (one V and label scope) one after another, as one
    ``EncodedSequences``: narrower sets padded as :func:`encode` pads (BOS, mask 0, no label); component
    names merged in first-seen order (``markovsim.data.merge_components``)."""
    sets = list(sets)
    first = sets[0]
    if any(s.num_states != first.num_states or s.label_scope != first.label_scope for s in sets):
        raise ValueError("concatenate_encoded needs sets with one num_states and one label_scope")

    def joined(key: str, value: int) -> torch.Tensor:
        return padded_cat([getattr(s, key) for s in sets], value)

    names, component_ids = merge_components(sets)
    return EncodedSequences(joined("input_ids", bos_token_id(first.num_states)), joined("attention_mask", 0),
                            joined("labels", IGNORE_INDEX), torch.cat([s.token_lengths for s in sets]),
                            torch.cat([s.num_label_tokens for s in sets]), component_ids, names,
                            first.num_states, first.label_scope)


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Full batches per epoch, ``num_items // batch_size`` (at least 1: a set smaller than a batch is one batch)."""
    num_items = _check_count(num_items, "num_items", 1)
    batch_size = _check_count(batch_size, "batch_size", 1)
    return max(1, num_items // batch_size)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int, stream: int = 0) -> np.ndarray:
    """The global batch of optimisation ``step``: rows of a seeded per-epoch permutation.

    Epoch ``e = step // steps_per_epoch`` is shuffled by ``default_rng([seed, stream, e])``; the batch
    is slice ``step % steps_per_epoch`` of it (``min(batch_size, num_items)`` rows).

    Returns: (b,) int64 row indices.
    """
    per_epoch = steps_per_epoch(num_items, batch_size)
    step = _check_count(step, "step", 0)
    epoch, position = divmod(step, per_epoch)
    order = epoch_permutation(num_items, _check_count(seed, "seed", 0), stream, epoch)
    return order[position * batch_size: (position + 1) * batch_size]


def epoch_permutation(num_items: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    """(num_items,) int64: the row order of ``epoch`` in :func:`batch_indices`."""
    return np.random.default_rng([seed, stream, epoch]).permutation(num_items)


def shard(indices: np.ndarray, process_index: int, num_processes: int) -> np.ndarray:
    """This process's contiguous share of a global batch (``np.array_split``; sizes differ by at most 1)."""
    if len(indices) < num_processes:
        raise ValueError(f"a global batch of {len(indices)} rows cannot be split over {num_processes} processes; "
                         f"use batch_size >= num_processes")
    return np.array_split(np.asarray(indices), num_processes)[process_index]


def merge_batches(batches: list[dict[str, torch.Tensor]],
                  pad_token_id: int) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """Stack batches of different widths into one (right padding), for a single forward pass.

    Returns:
        the merged batch (sum of rows, max width) and the row slice of each input batch.
    """
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    merged, slices, start = {}, [], 0
    for key, value in fill.items():
        merged[key] = padded_cat([b[key] for b in batches], value)
    for b in batches:
        slices.append(slice(start, start + b["input_ids"].shape[0]))
        start += b["input_ids"].shape[0]
    return merged, slices


def padded_cat(tensors: list[torch.Tensor], value: int, dim: int = 0) -> torch.Tensor:
    """``tensors`` right-padded with ``value`` on the last axis to the widest, concatenated along ``dim``
    (token tables of different widths: ids padded with BOS, masks with 0, labels with ``IGNORE_INDEX``)."""
    width = max(t.shape[-1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value) for t in tensors], dim)


def evaluation_chunks(num_items: int, batch_size: int) -> list[np.ndarray]:
    """Consecutive row-index chunks of at most ``batch_size`` rows covering ``range(num_items)``."""
    batch_size = _check_count(batch_size, "batch_size", 1)
    return [np.arange(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]
