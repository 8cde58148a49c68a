"""Exact per-component KL metrics (docs/theory.md, "Metrics").

Per component c, on its sequences, the mean over response tokens of
``KL( target(. | prefix) || model(. | prefix) )`` where the target is either another model's
next-token predictive (e.g. the retrained model) or the TRUE transition row of the chain that
generated the sequence. Also the population version for a tabular model against a chain.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .chains import MarkovChain
from .data import SequenceSet
from .tabular import TabularMarkov


def per_token_kl(target_probs: torch.Tensor, model_probs: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last axis, with ``0 log 0 = 0``.

    Args:
        target_probs, model_probs: (..., V) probabilities.
    Returns:
        (...) KL values; ``inf`` where q is 0 and p is not.
    """
    safe_model_probs = model_probs.clamp_min(torch.finfo(model_probs.dtype).tiny)
    ratio = torch.where(target_probs > 0, target_probs / safe_model_probs, 1.0)
    return torch.where(target_probs > 0, target_probs * torch.log(ratio), 0.0).sum(-1)


def true_next_token_probs(sequences: SequenceSet, chains: Mapping[str, MarkovChain]) -> torch.Tensor:
    """The generating chain's row ``P_c(. | s_t)`` at every response position, (n, T-1, V); zeros where padded.

    Args:
        chains: the chain of every component named in ``sequences.component_names``.
    """
    missing = [name for name in sequences.component_names if name not in chains]
    if missing:
        raise ValueError(f"chains has no entry for components {missing}")
    stacked = torch.as_tensor(np.stack([chains[name].transition_matrix
                                        for name in sequences.component_names]))  # (C, V, V)
    current = torch.as_tensor(np.where(sequences.tokens[:, :-1] >= 0, sequences.tokens[:, :-1], 0))  # (n, T-1)
    component_ids = torch.tensor(sequences.component_ids)[:, None]  # (n, 1)
    return stacked[component_ids, current] * torch.as_tensor(sequences.transition_mask)[..., None]


def mean_kl_per_component(target_probs: torch.Tensor, model_probs: torch.Tensor,
                          sequences: SequenceSet) -> dict[str, float]:
    """Mean per-token KL(target || model) over each component's response tokens.

    Args:
        target_probs, model_probs: (n, T-1, V) next-token distributions for ``sequences``.
    Returns:
        ``{component name: mean KL}`` for the components present in ``sequences``.
    """
    expected = (len(sequences), sequences.max_length - 1, sequences.num_states)
    for name, probs in (("target_probs", target_probs), ("model_probs", model_probs)):
        if tuple(probs.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} for these sequences, got {tuple(probs.shape)}")
    mask = torch.as_tensor(sequences.transition_mask)
    kl_sums = torch.where(mask, per_token_kl(target_probs, model_probs), 0.0).sum(1)  # (n,)
    ids = torch.tensor(sequences.component_ids)
    result = {}
    for index, name in enumerate(sequences.component_names):
        rows = ids == index
        if rows.any():
            result[name] = float(kl_sums[rows].sum() / mask[rows].sum())
    return result


def component_kl(target, model, sequences: SequenceSet) -> dict[str, float]:
    """Per-component mean per-token KL from ``target`` to ``model``'s next-token predictive.

    Args:
        target: a model with ``next_token_probs`` (e.g. the retrained model), or a mapping
            ``{component name: MarkovChain}`` for the KL from the true generating chains.
        model: a model with ``next_token_probs``.
    """
    target_probs = (true_next_token_probs(sequences, target) if isinstance(target, Mapping)
                    else target.next_token_probs(sequences))
    return mean_kl_per_component(target_probs, model.next_token_probs(sequences), sequences)


def population_kl(model: TabularMarkov, chain: MarkovChain, length: int, target: TabularMarkov | None = None) -> float:
    """Exact expected per-token KL of a tabular model on sequences of ``chain``:

        (1 / (L - 1)) sum_{t=1}^{L-1} sum_s q_t(s) KL( P_target(. | s) || P_theta(. | s) )

    with ``q_t`` the chain's state marginals; the target defaults to the chain itself.
    """
    if not isinstance(model, TabularMarkov):
        raise TypeError(f"model must be a TabularMarkov, got {type(model).__name__}")
    target_rows = (torch.tensor(chain.transition_matrix) if target is None
                   else torch.softmax(target.transition_logits, -1))  # (V, V)
    row_kl = per_token_kl(target_rows, torch.softmax(model.transition_logits, -1))  # (V,)
    visits = torch.as_tensor(chain.state_marginals(length)[:-1].sum(axis=0))  # (V,)
    return float(visits @ row_kl) / (length - 1)
