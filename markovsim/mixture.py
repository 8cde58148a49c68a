"""The mixture of K latent first-order chains: exact log-sum-exp likelihood and Bayes predictive.

:class:`MixtureOfChains` has mixing logits, per-component initial and transition logits; its
likelihood is a log-sum-exp over components and its next-token predictive is the Bayes posterior
predictive (docs/theory.md, "Mixtures of Markov chains"). Immutable, like
:class:`~markovsim.tabular.TabularMarkov`, whose helpers it shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .chains import MarkovChain
from .data import Component, SequenceSet
from .tabular import LOG_FLOOR, _as_parameter, _check_sequences, _gather_positions, _logits_from_probs, _normalise_rows
from .validation import check_int, check_rng


@dataclass(frozen=True, eq=False)
class MixtureOfChains:
    """K latent first-order chains: ``p(y) = sum_k alpha_k mu_k(s_1) prod_t P_k(s_{t+1} | s_t)``.

    Attributes:
        weight_logits: (K,) float64, ``alpha = softmax(weight_logits)``.
        initial_logits: (K, V) float64, ``mu_k = softmax(initial_logits[k])``.
        transition_logits: (K, V, V) float64, ``P_k = softmax_rows(transition_logits[k])``.
    """

    weight_logits: torch.Tensor
    initial_logits: torch.Tensor
    transition_logits: torch.Tensor

    def __post_init__(self) -> None:
        weights = _as_parameter(self.weight_logits, "weight_logits")
        initial = _as_parameter(self.initial_logits, "initial_logits")
        if weights.ndim != 1 or initial.ndim != 2 or initial.shape[0] != weights.numel():
            raise ValueError(f"weight_logits must have shape (K,) and initial_logits shape (K, V); got "
                             f"{tuple(weights.shape)} and {tuple(initial.shape)}")
        shape = (initial.shape[0], initial.shape[1], initial.shape[1])
        object.__setattr__(self, "weight_logits", weights)
        object.__setattr__(self, "initial_logits", initial)
        object.__setattr__(self, "transition_logits", _as_parameter(self.transition_logits, "transition_logits", shape))

    @property
    def num_components(self) -> int:
        return self.weight_logits.numel()

    @property
    def num_states(self) -> int:
        return self.initial_logits.shape[1]

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.weight_logits, self.initial_logits, self.transition_logits)

    def with_parameters(self, weight_logits, initial_logits, transition_logits) -> "MixtureOfChains":
        return MixtureOfChains(weight_logits, initial_logits, transition_logits)

    def prompt_log_joint(self, sequences: SequenceSet) -> torch.Tensor:
        """``log alpha_k + log mu_k(s_1)``, shape (n, K)."""
        onehots, _ = _check_sequences(sequences, self.num_states).statistics_tensors()
        return torch.log_softmax(self.weight_logits, -1) + onehots @ torch.log_softmax(self.initial_logits, -1).T

    def component_log_joint(self, sequences: SequenceSet) -> torch.Tensor:
        """``log alpha_k + log mu_k(s_1) + <C_y, log P_k>``, shape (n, K)."""
        _, counts = sequences.statistics_tensors()
        log_transitions = torch.log_softmax(self.transition_logits, -1).reshape(self.num_components, -1)  # (K, V*V)
        return self.prompt_log_joint(sequences) + counts @ log_transitions.T

    def logps(self, sequences: SequenceSet) -> torch.Tensor:
        """Full log-likelihood ``logsumexp_k`` of :meth:`component_log_joint`, shape (n,)."""
        return torch.logsumexp(self.component_log_joint(sequences), dim=-1)

    def response_logps(self, sequences: SequenceSet) -> torch.Tensor:
        """``log p(s_2..s_L | s_1) = log p(y) - log sum_k alpha_k mu_k(s_1)``, shape (n,)."""
        return self.logps(sequences) - torch.logsumexp(self.prompt_log_joint(sequences), dim=-1)

    def posterior(self, sequences: SequenceSet) -> torch.Tensor:
        """Responsibilities ``r_k(y) = p(k | y)``, shape (n, K)."""
        return torch.softmax(self.component_log_joint(sequences), dim=-1)

    def prefix_posteriors(self, sequences: SequenceSet) -> torch.Tensor:
        """``r_k(s_1..s_t)`` for every response position t (prefix through the current state), (n, T-1, K)."""
        current, following, mask = _gather_positions(sequences)
        log_transitions = torch.log_softmax(self.transition_logits, -1)  # (K, V, V)
        step = log_transitions[:, current, following].permute(1, 2, 0) * mask[..., None]  # (n, T-1, K)
        before = torch.cumsum(step, dim=1) - step  # (n, T-1, K) log-likelihood of transitions before t
        return torch.softmax(self.prompt_log_joint(sequences)[:, None, :] + before, dim=-1)

    def next_token_probs(self, sequences: SequenceSet) -> torch.Tensor:
        """Bayes posterior predictive ``sum_k r_k(prefix) P_k(. | s_t)``, (n, T-1, V); zeros where padded."""
        current, _, mask = _gather_positions(_check_sequences(sequences, self.num_states))
        rows = torch.softmax(self.transition_logits, -1).transpose(0, 1)[current]  # (n, T-1, K, V)
        posteriors = self.prefix_posteriors(sequences)  # (n, T-1, K)
        return (posteriors[..., None, :] @ rows).squeeze(-2) * mask[..., None]  # (n, T-1, V)

    def next_token_log_probs(self, sequences: SequenceSet) -> torch.Tensor:
        """log of :meth:`next_token_probs` (floored at ``LOG_FLOOR``), (n, T-1, V); zeros where padded."""
        mask = torch.as_tensor(sequences.transition_mask)[..., None]
        return torch.log(self.next_token_probs(sequences).clamp_min(float(np.exp(LOG_FLOOR)))) * mask

    def response_logps_gradient(self, sequences: SequenceSet, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Closed-form ``sum_y w_y d logp_resp(y) / d(weight_logits, initial_logits, transition_logits)``.

        With full-sequence responsibilities ``r = p(k | y)`` and prompt responsibilities
        ``r0 = p(k | s_1)``: ``d/dA_k = sum_y w_y r_k (C_y - diag(n_y) P_k)``,
        ``d/d(weight_logits) = sum_y w_y (r - r0)``, ``d/d(initial_logits_k) = sum_y w_y (r_k - r0_k)(c_y - mu_k)``.
        ``weights`` may be (n,) or (G, n) (then every gradient has a leading G axis).
        """
        onehots, counts = _check_sequences(sequences, self.num_states).statistics_tensors()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        grouped = weights.reshape(-1, len(sequences))  # (G, n)
        full = torch.softmax(self.component_log_joint(sequences), -1)  # (n, K)
        prompt = torch.softmax(self.prompt_log_joint(sequences), -1)  # (n, K)
        delta = grouped[:, :, None] * (full - prompt)  # (G, n, K)
        initial_probs = torch.softmax(self.initial_logits, -1)  # (K, V)
        grad_initial = torch.einsum("gnk,nv->gkv", delta, onehots) - delta.sum(1)[..., None] * initial_probs
        weighted = torch.einsum("gnk,nm->gkm", grouped[:, :, None] * full, counts)  # (G, K, V*V)
        weighted = weighted.reshape(len(grouped), self.num_components, self.num_states, self.num_states)
        grad_transition = weighted - weighted.sum(-1, keepdim=True) * torch.softmax(self.transition_logits, -1)
        result = (delta.sum(1), grad_initial, grad_transition)  # (G, K), (G, K, V), (G, K, V, V)
        return result if weights.ndim == 2 else tuple(g[0] for g in result)

    # Deprecated names (before the docs/theory.md "Names" glossary); kept so existing callers work.
    log_prob = logps
    response_log_prob = response_logps
    response_log_prob_gradient = response_logps_gradient

    def predictive_kl_gradient(self, sequences: SequenceSet, target_probs: torch.Tensor,
                               token_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Closed-form gradient of ``sum_{i,t} c_{it} KL(p_{it} || q_{it})`` for the Bayes predictive q.

        ``log q_t(v) = log p(prefix_t, v) - log p(prefix_t)``, and ``d log p(z)`` of a (partial)
        sequence is a posterior-weighted count. With prefix posteriors ``r_tk``, rows
        ``P_k[s_t]``, ``u_tkv = p_t(v) P_k[s_t, v] / q_t(v)``, ``rho_tk = sum_v u_tkv`` and
        ``a_tk = c_t r_tk (rho_tk - 1)``, the gradient of ``F = sum c_t sum_v p_t(v) log q_t(v)`` is

            d/d(weight_logits)   = sum_t a_t
            d/d(initial_logits_k) = sum_t a_tk (c_y - mu_k)
            d/dA_k = M_k - diag(M_k 1) P_k + sum_t e_{s_t} c_t r_tk (u_tk - rho_tk P_k[s_t])^T

        where ``M_k = sum_j B_jk e_{s_j} e_{s_{j+1}}^T`` over transitions j with
        ``B_jk = sum_{t > j} a_tk``; the KL gradient is ``-dF`` (``sum p log p`` is constant).
        """
        current, following, mask = _gather_positions(_check_sequences(sequences, self.num_states))
        probs = torch.softmax(self.transition_logits, -1)  # (K, V, V)
        rows = probs[:, current].permute(1, 2, 0, 3)  # (n, T-1, K, V)
        posteriors = self.prefix_posteriors(sequences)  # (n, T-1, K)
        predictive = torch.einsum("ntk,ntkv->ntv", posteriors, rows)  # (n, T-1, V)
        safe = torch.where(mask[..., None], predictive, 1.0)  # (n, T-1, V)
        ratio = target_probs[:, :, None, :] * rows / safe[:, :, None, :]  # (n, T-1, K, V)  u
        rho = ratio.sum(-1)  # (n, T-1, K)
        weighted = token_weights[..., None] * posteriors  # (n, T-1, K)
        a = weighted * (rho - 1.0)  # (n, T-1, K)
        later = a.flip(1).cumsum(1).flip(1) - a  # (n, T-1, K)  B_j = sum_{t > j} a_t
        onehots, _ = sequences.statistics_tensors()
        k, v = self.num_components, self.num_states
        pair = (current * v + following).reshape(-1)  # (n*(T-1),)
        m = torch.zeros(v * v, k, dtype=torch.float64).index_add_(0, pair, (later * mask[..., None]).reshape(-1, k))
        m = m.T.reshape(k, v, v)  # (K, V, V)
        row_terms = weighted[..., None] * (ratio - rho[..., None] * rows)  # (n, T-1, K, V)
        extra = torch.zeros(v, k, v, dtype=torch.float64)
        extra = extra.index_add_(0, current.reshape(-1), row_terms.reshape(-1, k, v))
        grad_transition = m - m.sum(-1, keepdim=True) * probs + extra.permute(1, 0, 2)
        totals = a.sum(1)  # (n, K)
        grad_initial = totals.T @ onehots - totals.sum(0)[:, None] * torch.softmax(self.initial_logits, -1)
        return -totals.sum(0), -grad_initial, -grad_transition

    @classmethod
    def from_chains(cls, chains: Sequence[MarkovChain], weights: Sequence[float]) -> "MixtureOfChains":
        """A mixture with the given chains and mixing weights (normalised)."""
        weights = np.asarray(weights, dtype=np.float64)
        if len(chains) == 0 or weights.shape != (len(chains),) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("from_chains needs one non-negative weight per chain, with a positive sum")
        return cls(_logits_from_probs(weights / weights.sum()),
                   _logits_from_probs(np.stack([c.initial_probs for c in chains])),
                   _logits_from_probs(np.stack([c.transition_matrix for c in chains])))

    @classmethod
    def from_components(cls, components: Sequence[Component]) -> "MixtureOfChains":
        """The exact population model: one latent chain per component, weight ∝ its ``num_train``."""
        if not components:
            raise ValueError("from_components needs at least one component")
        return cls.from_chains([c.chain for c in components], [c.num_train for c in components])

    @classmethod
    def random(cls, num_components: int, num_states: int, rng: np.random.Generator) -> "MixtureOfChains":
        """Parameters drawn from flat Dirichlet distributions (an EM starting point)."""
        num_components = check_int(num_components, "num_components", 1)
        num_states = check_int(num_states, "num_states", 1)
        rng = check_rng(rng)
        return cls(_logits_from_probs(rng.dirichlet(np.ones(num_components))),
                   _logits_from_probs(rng.dirichlet(np.ones(num_states), size=num_components)),
                   _logits_from_probs(rng.dirichlet(np.ones(num_states), size=(num_components, num_states))))

    @classmethod
    def fit(cls, sequences: SequenceSet, num_components: int, rng: np.random.Generator, max_iterations: int = 200,
            tolerance: float = 1e-8, smoothing: float = 0.0, init: "MixtureOfChains | None" = None,
            ) -> tuple["MixtureOfChains", list[float]]:
        """Maximum likelihood by EM. Returns the model and the total log-likelihood before each M-step.

        E-step: ``r = softmax_k(component_log_joint)``. M-step: ``alpha ∝ sum_y r``,
        ``mu_k ∝ sum_y r_k c_y + smoothing``, ``P_k ∝ sum_y r_k C_y + smoothing`` (unvisited rows
        uniform). Stops when the per-sequence log-likelihood gain is below ``tolerance``.
        """
        if not isinstance(sequences, SequenceSet) or len(sequences) == 0:
            raise ValueError("fit needs a non-empty SequenceSet")
        model = init if init is not None else cls.random(num_components, sequences.num_states, rng)
        if model.num_components != num_components or model.num_states != sequences.num_states:
            raise ValueError("init must have num_components components over the data's num_states states")
        max_iterations = check_int(max_iterations, "max_iterations", 1)
        onehots, counts = sequences.statistics_tensors()
        history: list[float] = []
        for _ in range(max_iterations):
            joint = model.component_log_joint(sequences)  # (n, K)
            history.append(float(torch.logsumexp(joint, -1).sum()))
            if len(history) > 1 and history[-1] - history[-2] < tolerance * len(sequences):
                break
            responsibilities = torch.softmax(joint, -1)  # (n, K)
            initial = (responsibilities.T @ onehots).numpy() + smoothing  # (K, V)
            transition = (responsibilities.T @ counts).reshape(num_components, sequences.num_states, -1).numpy()
            model = cls(_logits_from_probs(_normalise_rows(responsibilities.sum(0).numpy())),
                        _logits_from_probs(_normalise_rows(initial)),
                        _logits_from_probs(_normalise_rows(transition + smoothing)))
        return model, history
