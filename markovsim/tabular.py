"""The tabular first-order model (one chain shared by all data) and the helpers every exact model uses.

:class:`TabularMarkov` has initial logits ``b`` (V,) and transition logits ``A`` (V, V) shared by all
data, so forgetting one component interferes with retaining another (the simulator's stand-in for a
shared-parameter LM). Models are immutable: ``with_parameters`` returns a new model. Every
likelihood is computed from the sufficient statistics of a :class:`~markovsim.data.SequenceSet` (no
loop over tokens). The *response* log-likelihood (what the unlearning losses use) excludes the
prompt ``s_1`` (docs/theory.md, "Mixtures of Markov chains").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .chains import MarkovChain
from .data import Component, SequenceSet

LOG_FLOOR = -700.0  # log of probabilities below ~1e-304 is clamped so logits stay finite


def _as_parameter(value, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.to(torch.float64)
    else:
        tensor = torch.tensor(np.array(value, dtype=np.float64))
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf; logits must be finite")
    return tensor


def _logits_from_probs(probs: np.ndarray) -> torch.Tensor:
    """Finite logits ``log p`` (clamped at ``LOG_FLOOR``) of a probability array."""
    with np.errstate(divide="ignore"):
        return torch.as_tensor(np.maximum(np.log(probs), LOG_FLOOR), dtype=torch.float64)


def _normalise_rows(counts: np.ndarray) -> np.ndarray:
    """Divide the last axis by its sum; all-zero rows (never visited) become uniform."""
    totals = counts.sum(axis=-1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / counts.shape[-1])
    return np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), uniform)


def _check_sequences(sequences, num_states: int) -> SequenceSet:
    if not isinstance(sequences, SequenceSet):
        raise TypeError(f"sequences must be a SequenceSet, got {type(sequences).__name__}")
    if sequences.num_states != num_states:
        raise ValueError(f"sequences have {sequences.num_states} states but the model has {num_states}")
    return sequences


def _gather_positions(sequences: SequenceSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Current states (n, T-1), next states (n, T-1) with padding replaced by 0, and the mask."""
    tokens = torch.as_tensor(np.where(sequences.tokens >= 0, sequences.tokens, 0))  # (n, T)
    return tokens[:, :-1], tokens[:, 1:], torch.as_tensor(sequences.transition_mask)


def expected_counts(chain: MarkovChain, length: int, num_sequences: float) -> tuple[np.ndarray, np.ndarray]:
    """Expected first-state counts (V,) and transition counts (V, V) of ``num_sequences`` sequences.

    ``E[c] = N mu`` and ``E[C] = N sum_{t=1}^{L-1} diag(q_t) P`` with ``q_t`` the state marginals.
    """
    marginals = chain.state_marginals(length)  # (L, V)
    visits = marginals[:-1].sum(axis=0)  # (V,) expected visits to s at positions 1..L-1
    return num_sequences * chain.initial_probs, num_sequences * visits[:, None] * chain.transition_matrix


@dataclass(frozen=True, eq=False)
class TabularMarkov:
    """First-order tabular model ``pi(s_1) = softmax(b)``, ``pi(s'|s) = softmax(A[s])``.

    Attributes:
        initial_logits: (V,) float64 ``b``.
        transition_logits: (V, V) float64 ``A``.
    """

    initial_logits: torch.Tensor
    transition_logits: torch.Tensor

    def __post_init__(self) -> None:
        initial = _as_parameter(self.initial_logits, "initial_logits")
        if initial.ndim != 1 or initial.numel() == 0:
            raise ValueError(f"initial_logits must have shape (V,), got {tuple(initial.shape)}")
        size = initial.numel()
        object.__setattr__(self, "initial_logits", initial)
        object.__setattr__(self, "transition_logits",
                           _as_parameter(self.transition_logits, "transition_logits", (size, size)))

    @property
    def num_states(self) -> int:
        return self.initial_logits.numel()

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(initial_logits, transition_logits)``, the order used by every gradient."""
        return (self.initial_logits, self.transition_logits)

    def with_parameters(self, initial_logits, transition_logits) -> "TabularMarkov":
        return TabularMarkov(initial_logits, transition_logits)

    def initial_log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.initial_logits, dim=-1)  # (V,)

    def transition_log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.transition_logits, dim=-1)  # (V, V)

    def logps(self, sequences: SequenceSet) -> torch.Tensor:
        """``logp(y) = <c_y, log softmax(b)> + <C_y, log softmax_rows(A)>``, shape (n,)."""
        onehots, _ = _check_sequences(sequences, self.num_states).statistics_tensors()
        return onehots @ self.initial_log_probs() + self.response_logps(sequences)

    def response_logps(self, sequences: SequenceSet) -> torch.Tensor:
        """Response log-likelihood ``<C_y, log softmax_rows(A)>`` (prompt ``s_1`` excluded), shape (n,)."""
        _, counts = _check_sequences(sequences, self.num_states).statistics_tensors()  # (n, V*V)
        return counts @ self.transition_log_probs().reshape(-1)

    def next_token_probs(self, sequences: SequenceSet) -> torch.Tensor:
        """``pi(. | s_t)`` at every response position, shape (n, T-1, V); zeros where padded."""
        current, _, mask = _gather_positions(_check_sequences(sequences, self.num_states))
        probs = torch.softmax(self.transition_logits, dim=-1)[current]  # (n, T-1, V)
        return probs * mask[..., None]

    def next_token_log_probs(self, sequences: SequenceSet) -> torch.Tensor:
        """``log pi(. | s_t)`` at every response position, (n, T-1, V); zeros where padded."""
        current, _, mask = _gather_positions(_check_sequences(sequences, self.num_states))
        return self.transition_log_probs()[current] * mask[..., None]  # (n, T-1, V)

    def response_logps_gradient(self, sequences: SequenceSet,
                                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ``sum_y w_y d logp_resp(y) / d(b, A)`` (docs/theory.md, "Mixtures of Markov chains").

        ``d logp_resp / dA = C_y - diag(n_y) softmax_rows(A)`` and ``d logp_resp / db = 0``.

        Args:
            weights: (n,) per-sequence weights w_y, or (G, n) for G weightings at once.
        Returns:
            gradients shaped like ``(initial_logits, transition_logits)``, with a leading G axis
            when ``weights`` is 2-d.
        """
        _, counts = _check_sequences(sequences, self.num_states).statistics_tensors()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        grouped = weights.reshape(-1, len(sequences))  # (G, n)
        weighted = (grouped @ counts).reshape(-1, self.num_states, self.num_states)  # (G, V, V)
        visits = weighted.sum(dim=-1, keepdim=True)  # (G, V, 1)
        gradient = weighted - visits * torch.softmax(self.transition_logits, dim=-1)
        initial = torch.zeros(len(grouped), self.num_states, dtype=torch.float64)
        return (initial, gradient) if weights.ndim == 2 else (initial[0], gradient[0])

    # Deprecated names (before the docs/theory.md "Names" glossary); kept so existing callers work.
    log_prob = logps
    response_log_prob = response_logps
    response_log_prob_gradient = response_logps_gradient

    def predictive_kl_gradient(self, sequences: SequenceSet, target_probs: torch.Tensor,
                               token_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form gradient of ``sum_{i,t} c_{it} KL(p_{it} || pi(. | s_t))`` w.r.t. ``(b, A)``.

        ``d KL(p || softmax(A[s])) / dA[s] = softmax(A[s]) - p``, so row s of the gradient is
        ``sum_{t : s_t = s} c_t (P[s] - p_t)``.

        Args:
            target_probs: (n, T-1, V) target distributions p (e.g. the reference predictive).
            token_weights: (n, T-1) weights c, zero on padding.
        """
        current, _, _ = _gather_positions(_check_sequences(sequences, self.num_states))
        probs = torch.softmax(self.transition_logits, -1)  # (V, V)
        per_token = token_weights[..., None] * (probs[current] - target_probs)  # (n, T-1, V)
        gradient = torch.zeros_like(self.transition_logits).index_add_(0, current.reshape(-1),
                                                                      per_token.reshape(-1, self.num_states))
        return torch.zeros_like(self.initial_logits), gradient

    def to_chain(self) -> MarkovChain:
        """The chain with this model's probabilities."""
        return MarkovChain(torch.softmax(self.initial_logits, -1).numpy(),
                           torch.softmax(self.transition_logits, -1).numpy())

    @classmethod
    def from_chain(cls, chain: MarkovChain) -> "TabularMarkov":
        """Logits ``log mu`` and ``log P`` (zero probabilities clamped to ``exp(LOG_FLOOR)``)."""
        return cls(_logits_from_probs(chain.initial_probs), _logits_from_probs(chain.transition_matrix))

    @classmethod
    def from_counts(cls, initial_counts: np.ndarray, transition_counts: np.ndarray,
                    smoothing: float = 0.0) -> "TabularMarkov":
        """MLE (or add-``smoothing`` estimate) from first-state counts (V,) and transition counts (V, V)."""
        smoothing = float(smoothing)
        if not smoothing >= 0.0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        initial = _normalise_rows(np.asarray(initial_counts, dtype=np.float64) + smoothing)
        transition = _normalise_rows(np.asarray(transition_counts, dtype=np.float64) + smoothing)
        return cls(_logits_from_probs(initial), _logits_from_probs(transition))

    @classmethod
    def fit(cls, sequences: SequenceSet, smoothing: float = 0.0) -> "TabularMarkov":
        """Closed-form maximum likelihood: normalised summed counts (rows never visited are uniform)."""
        if not isinstance(sequences, SequenceSet) or len(sequences) == 0:
            raise ValueError("fit needs a non-empty SequenceSet")
        return cls.from_counts(sequences.first_state_onehots.sum(axis=0),
                               sequences.transition_counts.sum(axis=0), smoothing)

    @classmethod
    def population_mle(cls, components: Sequence[Component], smoothing: float = 0.0) -> "TabularMarkov":
        """The MLE on the infinite-data limit of a weighted mixture of chains.

        Component k contributes ``num_train`` sequences of length ``L_k``; the expected counts
        (:func:`expected_counts`) are summed, so each component is weighted by its token count.
        """
        if not components:
            raise ValueError("population_mle needs at least one component")
        initial, transition = zip(*(expected_counts(c.chain, c.length, c.num_train) for c in components))
        return cls.from_counts(sum(initial), sum(transition), smoothing)
