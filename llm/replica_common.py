"""What pre-training and unlearning replicas share: per-replica configs, device, optimizer, schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from markovsim.data import SequenceSet
from markovsim.losses import Objective
from markovsim.runtime import resolve_device

from .config import TrainConfig
from .data import (
    IGNORE_INDEX,
    EncodedSequences,
    bos_token_id,
    concatenate_encoded,
    encode,
    epoch_permutation,
    steps_per_epoch,
)
from .replicas import ReplicaStack, StackedAdamSettings, StackedAdamW
from .runtime import host_to_device
from .session import learning_rate_factor

__all__ = ["ReplicaRows", "StackedTokens", "TOKEN_KEYS", "objective_groups", "PER_REPLICA_FIELDS", "SHARED_FIELDS",
           "LOGITS_FAILURE", "ReplicaSets", "replica_sets", "join_encoded", "replica_configs", "replica_device",
           "stacked_optimizer", "replica_learning_rates", "check_models", "ReplayLogits", "SingleProcess"]

# TrainConfig fields that may differ between replicas; every other field must be equal.
PER_REPLICA_FIELDS = ("seed", "learning_rate", "adam_betas", "adam_eps", "weight_decay", "divergence_logp_per_token")
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_REPLICA_FIELDS)
LOGITS_FAILURE = "the model produced NaN/inf logits"


def replica_configs(configs: TrainConfig | Sequence[TrainConfig], num_replicas: int) -> tuple[TrainConfig, ...]:
    """One ``TrainConfig`` per replica (a single config is repeated); checks the shared fields agree.

    Replicas run in float32: ``mixed_precision="auto"`` (bf16 autocast on CUDA for a single run) becomes
    ``"no"`` in the returned configs, so what a replica records is what ran, and the single run a
    replica equals is the one with ``mixed_precision="no"``; ``"bf16"`` is refused.
    """
    if num_replicas < 1:
        raise ValueError(f"need at least one replica (N >= 1), got {num_replicas}")
    configs = (configs,) * num_replicas if isinstance(configs, TrainConfig) else tuple(configs)
    if len(configs) != num_replicas:
        raise ValueError(f"got {len(configs)} configs for {num_replicas} replicas; pass one or one per replica")
    for config in configs:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"configs must be llm.train.TrainConfig, got {type(config).__name__}")
    differing = [f for f in SHARED_FIELDS if len({repr(getattr(c, f)) for c in configs}) > 1]
    if differing:
        raise ValueError(f"replicas must share {differing}; only {PER_REPLICA_FIELDS} may differ")
    if configs[0].mixed_precision == "bf16":
        raise ValueError("replicas run in float32; bf16 autocast is not supported yet (use mixed_precision='no')")
    return tuple(dataclasses.replace(c, mixed_precision="no") for c in configs)


@dataclasses.dataclass(frozen=True)
class ReplicaSets:
    """Every replica's training set, encoded: each distinct set encoded once and the distinct sets joined.

    Attributes:
        sets: N ``SequenceSet`` (or N None), replica i's own.
        own: N ``EncodedSequences`` (or N None); replicas given one set share one object.
        joined: the distinct encoded sets one after another (the set itself when all share it), what the
            loop-free paths gather from.
        offsets: (N,) int64, where replica i's rows start in ``joined``.
    """

    sets: list
    own: list
    joined: EncodedSequences | None
    offsets: np.ndarray


def replica_sets(sets, num_replicas: int, name: str, label_scope: str = "response") -> ReplicaSets:
    """One training set shared by every replica, or one per replica (e.g. each seed its own sampled data).

    Args:
        sets: a ``SequenceSet`` (shared), N ``SequenceSet`` of one size (replicas share one step schedule),
            or None.
        num_replicas: N.
        name: the argument's name, for errors.
        label_scope: ``llm.data.encode``'s label scope.
    """
    if sets is None:
        return ReplicaSets([None] * num_replicas, [None] * num_replicas, None, np.zeros(num_replicas, np.int64))
    if isinstance(sets, SequenceSet):
        sets = [sets] * num_replicas
    elif isinstance(sets, (str, bytes)) or not isinstance(sets, Sequence):
        raise TypeError(f"{name} must be a SequenceSet or a list of one SequenceSet per replica, "
                        f"got {type(sets).__name__}")
    sets = list(sets)
    if len(sets) != num_replicas:
        raise ValueError(f"{name}: got {len(sets)} sets for {num_replicas} replicas; pass one SequenceSet for all "
                         f"or one per replica")
    for value in sets:
        if not isinstance(value, SequenceSet):
            raise TypeError(f"{name}: every entry must be a markovsim.data.SequenceSet, got {type(value).__name__}")
    sizes = sorted({len(value) for value in sets})
    if len(sizes) != 1:
        raise ValueError(f"{name}: the replicas' sets have {sizes} sequences; replicas share one step schedule, "
                         f"so every set needs the same number (sample each seed at the same scale)")
    encoded = {}
    for value in sets:
        if id(value) not in encoded:
            encoded[id(value)] = encode(value, label_scope)
    own = [encoded[id(value)] for value in sets]
    joined, offsets = join_encoded(own)
    return ReplicaSets(sets, own, joined, offsets)


def join_encoded(sets: list[EncodedSequences]) -> tuple[EncodedSequences, np.ndarray]:
    """The distinct sets of ``sets`` (by identity, all of one size) one after another, and where each
    entry's rows start in it (len(sets),) int64; the set itself and zeros when there is one."""
    if len({len(value) for value in sets}) != 1:
        raise ValueError("join_encoded needs sets of one size")
    unique = list({id(value): value for value in sets}.values())  # first-seen order
    position = {id(value): k for k, value in enumerate(unique)}
    offsets = np.array([position[id(value)] * len(sets[0]) for value in sets], dtype=np.int64)
    return (unique[0] if len(unique) == 1 else concatenate_encoded(unique)), offsets


def replica_device(config: TrainConfig) -> torch.device:
    """The device every replica runs on (:func:`markovsim.runtime.resolve_device` of ``config.device``)."""
    return torch.device(resolve_device(config.device))


def stacked_optimizer(stack: ReplicaStack, configs: tuple[TrainConfig, ...]) -> StackedAdamW:
    settings = StackedAdamSettings(configs[0].optimizer, tuple(tuple(c.adam_betas) for c in configs),
                                   tuple(c.adam_eps for c in configs), tuple(c.weight_decay for c in configs))
    return StackedAdamW(stack.parameters, settings)


def replica_learning_rates(configs: tuple[TrainConfig, ...], step: int, total_steps: int) -> list[float]:
    """Each replica's learning rate at ``step``: peak x the schedule's factor (as the single run's LambdaLR)."""
    config = configs[0]
    factor = learning_rate_factor(step, total_steps, config.schedule, config.warmup_steps)
    return [c.learning_rate * factor for c in configs]


def check_models(models, name: str = "models") -> list:
    models = list(models)
    if not models:
        raise ValueError(f"{name} is empty: need at least one replica (N >= 1)")
    return models


class ReplayLogits:
    """A stand-in model for ``objective_terms`` / ``retain_term``: returns one replica's precomputed
    logits (b, t, vocab) from ``ReplicaStack.logits``, so the single run's loss code runs unchanged."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        if input_ids.shape != self.logits.shape[:2]:
            raise RuntimeError(f"replayed logits {tuple(self.logits.shape)} do not match the batch "
                               f"{tuple(input_ids.shape)}")
        return self


class SingleProcess:
    """The part of an ``accelerate.Accelerator`` that ``llm.checkpoint.save_checkpoint`` uses, for the one
    process that runs all replicas: it is the main process, nothing to wait for, nothing to unwrap."""

    is_main_process, process_index = True, 0

    def wait_for_everyone(self) -> None:
        return None

    @staticmethod
    def unwrap_model(model):
        return model


class ReplicaRows:
    """Every replica's rows of a step, ``llm.data.batch_indices`` with replica i's seed, one epoch
    permutation per replica cached (a permutation of the whole set costs more than the step's rows).

    Args: num_items, batch_size: the set and the (shared) batch size; seeds: N seeds; stream: the data stream.
    """

    def __init__(self, num_items: int, batch_size: int, seeds: Sequence[int], stream: int = 0):
        self.num_items, self.batch_size, self.seeds, self.stream = num_items, batch_size, list(seeds), stream
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # replica -> (epoch, permutation)

    def __call__(self, step: int) -> np.ndarray:
        """(N, b) int64: replica i's rows of ``step``."""
        epoch, position = divmod(step, steps_per_epoch(self.num_items, self.batch_size))
        rows = []
        for index, seed in enumerate(self.seeds):
            cached = self._orders.get(index)
            if cached is None or cached[0] != epoch:
                cached = self._orders[index] = (epoch, epoch_permutation(self.num_items, seed, self.stream, epoch))
            rows.append(cached[1][position * self.batch_size: (position + 1) * self.batch_size])
        return np.stack(rows)


TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


class StackedTokens:
    """An encoded set's token tensors copied to ``device`` once, gathered (N, b) rows at a time for a stacked
    forward (every replica its own rows)."""

    def __init__(self, encoded: EncodedSequences, device):
        self.device = torch.device(device)
        self.token_lengths = encoded.token_lengths.numpy()  # (n,) host-side: reading it never waits for a device
        self.tensors = {key: getattr(encoded, key).to(self.device) for key in TOKEN_KEYS}
        self.pad_values = (bos_token_id(encoded.num_states), 0, IGNORE_INDEX)  # as llm.data.encode pads TOKEN_KEYS

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(index, input_ids, attention_mask, labels)``: the rows (N, b) on the device and their tokens
        (N, b, t), t the widest gathered row (causal attention makes the padding invisible to real positions)."""
        rows = np.asarray(rows, dtype=np.int64)
        width = int(self.token_lengths[rows].max())
        index = host_to_device(torch.from_numpy(rows), self.device)  # no host sync on CUDA
        return (index, *(self.tensors[key][index, :width] for key in TOKEN_KEYS))


def objective_groups(objectives: Sequence[Objective], forget_refs: Sequence[torch.Tensor | None],
                     device) -> list[tuple[Objective, list[int], torch.Tensor | None]]:
    """``(objective, member positions, their reference log-likelihoods (n_g, n_f) float64 or None)`` per distinct
    objective, in order of first appearance: the groups whose losses one ``Objective`` call computes."""
    groups: dict[Objective, list[int]] = {}
    for position, objective in enumerate(objectives):
        groups.setdefault(objective, []).append(position)
    return [(objective, members, None if forget_refs[members[0]] is None
             else torch.stack([forget_refs[i] for i in members]).to(device))
            for objective, members in groups.items()]
