"""Mixtures of Markov-chain data: components, a seeded specification, and exact sufficient statistics.

A :class:`SequenceSet` holds padded token arrays together with the statistics every exact
computation needs, built once: the first-state one-hots ``c_y`` (n, V) and the transition counts
``C_y`` (n, V, V) of each sequence (docs/theory.md, "Mixtures of Markov chains"). Padded positions hold ``PAD_TOKEN``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .chains import MarkovChain
from .results import atomic_output
from .validation import check_int, check_tokens

PAD_TOKEN = -1
ROLES = ("retain", "forget")


@dataclass(frozen=True, eq=False)
class Component:
    """One source of sequences in the mixture.

    Attributes:
        name: unique name (e.g. ``"forget1"``).
        chain: the generating :class:`MarkovChain`.
        length: number of states per sequence L >= 2 (prompt ``s_1`` plus ``L - 1`` response tokens).
        num_train, num_test: sequences in each split (num_train + num_test >= 1).
        role: ``"retain"`` or ``"forget"``.
        in_pretraining: whether the reference model saw this component's training split.
    """

    name: str
    chain: MarkovChain
    length: int
    num_train: int
    num_test: int
    role: str = "retain"
    in_pretraining: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Component name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.chain, MarkovChain):
            raise TypeError(f"Component {self.name!r}: chain must be a MarkovChain, got {type(self.chain).__name__}")
        check_int(self.length, f"Component {self.name!r} length", 2)
        check_int(self.num_train, f"Component {self.name!r} num_train", 0)
        check_int(self.num_test, f"Component {self.name!r} num_test", 0)
        if self.num_train + self.num_test == 0:
            raise ValueError(f"Component {self.name!r} is empty: give num_train + num_test >= 1")
        if self.role not in ROLES:
            raise ValueError(f"Component {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.in_pretraining, (bool, np.bool_)):
            raise TypeError(f"Component {self.name!r}: in_pretraining must be a bool")

    @classmethod
    def with_split(cls, name: str, chain: MarkovChain, length: int, num_sequences: int,
                   test_fraction: float = 0.2, **kwargs) -> "Component":
        """A component of ``num_sequences`` sequences, ``round(test_fraction * n)`` of them held out."""
        num_sequences = check_int(num_sequences, f"Component {name!r} num_sequences", 1)
        test_fraction = float(test_fraction)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
        num_test = int(round(test_fraction * num_sequences))
        return cls(name, chain, length, num_sequences - num_test, num_test, **kwargs)

    @property
    def num_tokens_per_sequence(self) -> int:
        """|y| = L - 1 response tokens."""
        return self.length - 1


@dataclass(frozen=True, eq=False)
class MixtureSpec:
    """A seeded mixture of components; :meth:`sample` is deterministic under ``seed``."""

    components: tuple[Component, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.components, (list, tuple)):
            raise TypeError(f"components must be a list or tuple of Component objects, "
                            f"got {type(self.components).__name__}")
        components = tuple(self.components)
        if not components:
            raise ValueError("components is empty: a MixtureSpec needs at least one Component")
        for component in components:
            if not isinstance(component, Component):
                raise TypeError(f"components must be Component objects, got {type(component).__name__}")
        names = [component.name for component in components]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate component names {duplicates}; every component needs a unique name")
        num_states = {component.chain.num_states for component in components}
        if len(num_states) != 1:
            raise ValueError(f"all component chains must have the same number of states, got {sorted(num_states)}")
        check_int(self.seed, "seed", 0)
        object.__setattr__(self, "components", components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(component.name for component in self.components)

    @property
    def num_states(self) -> int:
        return self.components[0].chain.num_states

    def component(self, name: str) -> Component:
        """The component called ``name`` (ValueError listing the names otherwise)."""
        for component in self.components:
            if component.name == name:
                return component
        raise ValueError(f"no component named {name!r}; components are {list(self.names)}")

    def names_where(self, role: str | None = None, in_pretraining: bool | None = None) -> tuple[str, ...]:
        """Names of the components with the given role and/or pre-training membership."""
        return tuple(
            c.name for c in self.components
            if (role is None or c.role == role) and (in_pretraining is None or c.in_pretraining == in_pretraining)
        )

    def sample(self) -> tuple["SequenceSet", "SequenceSet"]:
        """Sample every component and split it; returns ``(train, test)``.

        Component k draws ``num_train + num_test`` sequences from its own generator
        ``default_rng([seed, k])``, so adding a component never changes the others' data; the
        first ``num_train`` of a random permutation form the training split.
        """
        train_parts, test_parts = [], []
        for index, component in enumerate(self.components):
            rng = np.random.default_rng([self.seed, index])
            total = component.num_train + component.num_test
            tokens = component.chain.sample(total, component.length, rng)  # (n_k, L_k)
            order = rng.permutation(total)
            train_parts.append(tokens[order[: component.num_train]])
            test_parts.append(tokens[order[component.num_train :]])
        return (SequenceSet.from_parts(train_parts, self.names, self.num_states),
                SequenceSet.from_parts(test_parts, self.names, self.num_states))

    def to_dict(self) -> dict:
        """A JSON-ready description (chains as nested lists)."""
        return {
            "seed": self.seed,
            "components": [
                {**{f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "chain"},
                 "initial_probs": c.chain.initial_probs.tolist(),
                 "transition_matrix": c.chain.transition_matrix.tolist()}
                for c in self.components
            ],
        }


@dataclass(frozen=True, eq=False)
class SequenceSet:
    """Padded sequences of a mixture with their exact sufficient statistics.

    Attributes:
        tokens: (n, max_len) int64 state ids, ``PAD_TOKEN`` past each sequence's length.
        lengths: (n,) int64 sequence lengths L >= 2.
        component_ids: (n,) int64 indices into ``component_names``.
        component_names: names of the components, indexed by ``component_ids``.
        num_states: V.
    Derived (computed once on construction):
        first_state_onehots: (n, V) float64, ``c_y``.
        transition_counts: (n, V, V) float64, ``C_y[s, s'] = #{t : s_t = s, s_{t+1} = s'}``.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    component_ids: np.ndarray
    component_names: tuple[str, ...]
    num_states: int
    first_state_onehots: np.ndarray = dataclasses.field(init=False, repr=False)
    transition_counts: np.ndarray = dataclasses.field(init=False, repr=False)
    _tensor_cache: dict = dataclasses.field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        num_states = check_int(self.num_states, "num_states", 1)
        if not isinstance(self.component_names, (list, tuple)) or \
                not all(isinstance(name, str) and name for name in self.component_names):
            raise TypeError(f"component_names must be a tuple of non-empty strings, got {self.component_names!r}")
        names = tuple(self.component_names)
        if len(set(names)) != len(names):
            raise ValueError(f"component_names must be unique, got {list(names)}")
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must have shape (n, max_len) with max_len >= 2 (a prompt state and at least "
                             f"one response state), got {tokens.shape}")
        lengths = _check_index_array(self.lengths, "lengths", tokens.shape[0])
        component_ids = _check_index_array(self.component_ids, "component_ids", tokens.shape[0])
        if tokens.shape[0] and (lengths.min() < 2 or lengths.max() > tokens.shape[1]):
            raise ValueError(f"lengths must lie in [2, {tokens.shape[1]}] (max_len), "
                             f"got [{lengths.min()}, {lengths.max()}]")
        if component_ids.size and (component_ids.min() < 0 or component_ids.max() >= len(names)):
            raise ValueError(f"component_ids must index component_names (0..{len(names) - 1})")
        valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (n, max_len)
        tokens = np.where(valid, tokens, 0)
        tokens = check_tokens(tokens, "tokens", num_states)
        tokens = np.where(valid, tokens, PAD_TOKEN)
        try:
            onehots, counts = _sufficient_statistics(tokens, lengths, num_states)
        except (MemoryError, ValueError) as error:  # numpy: "Unable to allocate" / "Maximum allowed dimension"
            raise ValueError(f"num_states {num_states} is too large: the (n, V, V) transition counts of "
                             f"{tokens.shape[0]} sequences cannot be allocated ({error})") from None
        for name, value in [("tokens", tokens), ("lengths", lengths), ("component_ids", component_ids),
                            ("component_names", names), ("num_states", num_states),
                            ("first_state_onehots", onehots), ("transition_counts", counts)]:
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_parts(cls, parts: list[np.ndarray], names: tuple[str, ...], num_states: int) -> "SequenceSet":
        """Stack per-component token arrays ``parts[k]`` (n_k, L_k) into one padded set."""
        max_len = max([part.shape[1] for part in parts if part.size] or [2])
        total = sum(part.shape[0] for part in parts)
        tokens = np.full((total, max_len), PAD_TOKEN, dtype=np.int64)
        lengths = np.empty(total, dtype=np.int64)
        component_ids = np.empty(total, dtype=np.int64)
        start = 0
        for index, part in enumerate(parts):
            stop = start + part.shape[0]
            if stop == start:
                continue
            tokens[start:stop, : part.shape[1]] = part
            lengths[start:stop] = part.shape[1]
            component_ids[start:stop] = index
            start = stop
        return cls(tokens, lengths, component_ids, tuple(names), num_states)

    def statistics_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sufficient statistics as float64 torch tensors, built once and cached.

        Returns:
            first-state one-hots (n, V) and flattened transition counts (n, V * V).
        """
        if "statistics" not in self._tensor_cache:
            onehots = torch.tensor(self.first_state_onehots, dtype=torch.float64)  # (n, V)
            counts = torch.tensor(self.transition_counts.reshape(len(self), -1), dtype=torch.float64)  # (n, V*V)
            self._tensor_cache["statistics"] = (onehots, counts)
        return self._tensor_cache["statistics"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_tokens(self) -> np.ndarray:
        """(n,) int64 response lengths |y| = L - 1 (the first state is the prompt)."""
        return self.lengths - 1

    @property
    def transition_mask(self) -> np.ndarray:
        """(n, max_len - 1) bool: position t predicts ``tokens[:, t + 1]`` from a real prefix."""
        return np.arange(self.max_length - 1)[None, :] < (self.lengths - 1)[:, None]

    def component_counts(self) -> dict[str, int]:
        """Number of sequences per component name."""
        counts = np.bincount(self.component_ids, minlength=len(self.component_names))
        return dict(zip(self.component_names, counts.tolist()))

    def subset(self, indices) -> "SequenceSet":
        """The sequences at ``indices`` (row numbers in ``[0, n)``, repeats allowed, or an (n,) boolean mask),
        keeping component names."""
        indices = _check_row_indices(indices, len(self))
        lengths = self.lengths[indices]
        max_len = int(lengths.max()) if lengths.size else 2
        return SequenceSet(self.tokens[indices][:, :max_len], lengths, self.component_ids[indices],
                           self.component_names, self.num_states)

    def select(self, *names: str) -> "SequenceSet":
        """The sequences of the named components (ValueError for an unknown name or an empty result)."""
        unknown = [name for name in names if name not in self.component_names]
        if unknown or not names:
            raise ValueError(f"select needs names among {list(self.component_names)}, got {list(names)}")
        ids = [self.component_names.index(name) for name in names]
        mask = np.isin(self.component_ids, ids)
        if not mask.any():
            raise ValueError(f"components {list(names)} have no sequences in this set")
        return self.subset(mask)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (temporary file, then rename)."""
        arrays = {"tokens": self.tokens, "lengths": self.lengths, "component_ids": self.component_ids,
                  "component_names": np.asarray(json.dumps(list(self.component_names))),
                  "num_states": np.asarray(self.num_states)}
        atomic_save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SequenceSet":
        """Read a set written by :meth:`save`; malformed files raise ValueError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["tokens"], data["lengths"], data["component_ids"],
                           _saved_component_names(data["component_names"]), _saved_num_states(data["num_states"]))
        except FileNotFoundError:
            raise
        except (KeyError, OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as error:
            # json.JSONDecodeError is a ValueError; a truncated zip is BadZipFile, an empty file EOFError
            raise ValueError(f"{os.fspath(path)} is not a valid SequenceSet file (written by SequenceSet.save): "
                             f"{type(error).__name__}: {error}") from error


def concatenate(sets: list[SequenceSet]) -> SequenceSet:
    """Join sets with the same V; component names are merged (first-seen order) and ids remapped."""
    if not sets:
        raise ValueError("concatenate needs at least one SequenceSet")
    num_states = {s.num_states for s in sets}
    if len(num_states) != 1:
        raise ValueError(f"cannot concatenate sets with different num_states {sorted(num_states)}")
    names, component_ids = merge_components(sets)
    max_len = max(s.max_length for s in sets)
    tokens = np.concatenate([np.pad(s.tokens, ((0, 0), (0, max_len - s.max_length)), constant_values=PAD_TOKEN)
                             for s in sets])
    lengths = np.concatenate([s.lengths for s in sets])
    return SequenceSet(tokens, lengths, component_ids, names, sets[0].num_states)


def merge_components(sets) -> tuple[tuple[str, ...], np.ndarray]:
    """The component names of several sets merged in first-seen order, and every row's component id in
    them (the rows of ``sets`` one after another). ``sets``: anything with ``component_names`` and
    ``component_ids``."""
    names: list[str] = []
    for s in sets:
        names += [name for name in s.component_names if name not in names]
    component_ids = np.concatenate([
        np.asarray([names.index(n) for n in s.component_names], dtype=np.int64)[s.component_ids] for s in sets])
    return tuple(names), component_ids


def atomic_save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` atomically (temporary file in the target folder, then rename)."""
    if not os.fspath(path).endswith(".npz"):
        raise ValueError(f"path must end in .npz, got {os.fspath(path)!r}")
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)


def _check_row_indices(indices, num_rows: int) -> np.ndarray:
    """``indices`` as (k,) int64 row numbers of a set of ``num_rows`` rows, or a clear error naming ``indices``.

    Accepts integers in ``[0, num_rows)`` (any order, repeats allowed; a list, range or integer array) or
    an (num_rows,) boolean mask; an empty sequence selects nothing.
    """
    if indices is None or isinstance(indices, (str, bytes, dict, set)):
        raise TypeError(f"indices must be a 1-d array of row numbers or a boolean mask, got {type(indices).__name__}")
    try:
        array = np.asarray(indices)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise TypeError(f"indices must be a 1-d array of row numbers or a boolean mask: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-d (row numbers or a boolean mask), got shape {array.shape}; "
                         f"wrap a single row number in a list")
    if array.dtype == bool:
        if array.shape != (num_rows,):
            raise ValueError(f"a boolean mask as indices needs one entry per sequence ({num_rows}), got {array.size}")
        return np.flatnonzero(array)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"indices must be integer row numbers or a boolean mask, got dtype {array.dtype}")
    if array.min() < 0 or array.max() >= num_rows:
        raise ValueError(f"indices must lie in [0, {num_rows}) (the set has {num_rows} sequences), "
                         f"got min {array.min()}, max {array.max()}")
    return array.astype(np.int64)


def _saved_component_names(value: np.ndarray) -> tuple[str, ...]:
    """The ``component_names`` entry of a saved set: a JSON list of names (ValueError otherwise)."""
    names = json.loads(str(value))
    if not isinstance(names, list):
        raise ValueError(f"component_names must be a JSON list of names, got a JSON {type(names).__name__}")
    return tuple(names)


def _saved_num_states(value: np.ndarray) -> int:
    """The ``num_states`` entry of a saved set: one integer (ValueError otherwise)."""
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"num_states must be one integer, got dtype {value.dtype} and shape {value.shape}")
    return int(value)


def _check_index_array(value, name: str, size: int) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) to match tokens, got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _sufficient_statistics(tokens: np.ndarray, lengths: np.ndarray, num_states: int) -> tuple[np.ndarray, np.ndarray]:
    """First-state one-hots (n, V) and transition counts (n, V, V) with one ``bincount``."""
    num_sequences, max_len = tokens.shape
    onehots = np.zeros((num_sequences, num_states))
    onehots[np.arange(num_sequences), tokens[:, 0]] = 1.0
    valid = np.arange(max_len - 1)[None, :] < (lengths - 1)[:, None]  # (n, max_len - 1)
    rows, positions = np.nonzero(valid)
    flat = (rows * num_states + tokens[rows, positions]) * num_states + tokens[rows, positions + 1]
    counts = np.bincount(flat, minlength=num_sequences * num_states * num_states)
    return onehots, counts.reshape(num_sequences, num_states, num_states).astype(np.float64)
