"""Evaluation: the :class:`Evaluator` protocol shared by the simulator and ``llm``, and the simulator's evaluator.

One construction convention for every evaluator::

    SomeEvaluator(test, true_chains=None, retrained=None, reference=None, **options)

``test`` is the evaluation :class:`~markovsim.data.SequenceSet`; each optional target adds its KL
column (``kl_true``, ``kl_retrained``, ``kl_reference``; NaN or absent without it); ``options`` are
implementation specific (e.g. ``batch_size``). ``evaluate(model)`` returns ``{metric: (C,) array}``
over ``component_names`` (docs/theory.md, "Metrics").
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from .chains import MarkovChain
from .data import SequenceSet
from .metrics import true_next_token_probs
from .tabular import TabularMarkov

__all__ = ["Evaluator", "ExactEvaluator", "KL_METRICS"]

KL_METRICS = ("kl_true", "kl_retrained", "kl_reference")


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a model per component on a fixed test set (see the module docstring)."""

    component_names: tuple[str, ...]

    def evaluate(self, model) -> dict[str, np.ndarray]:
        """``{metric: (C,) array}``, one value per component of ``component_names``."""
        ...


class ExactEvaluator:
    """Per-component metrics on a fixed test set, with every target predictive computed once.

    ``KL(p || q)`` per token splits into the target's ``sum p log p`` (cached per component) minus
    the cross term ``sum p log q``, so one evaluation costs one ``log q`` and a product per target.

    Args (the :class:`Evaluator` construction order):
        test: the evaluation sequences (all components).
        true_chains: ``{component: MarkovChain}`` for ``kl_true`` (optional; NaN without it).
        retrained: the retain-only model for ``kl_retrained`` (optional; NaN without it).
        reference: the model before unlearning for ``kl_reference`` (optional; NaN without it).
    """

    def __init__(self, test: SequenceSet, true_chains: Mapping[str, MarkovChain] | None = None, retrained=None,
                 reference=None):
        if not isinstance(test, SequenceSet) or len(test) == 0:
            raise ValueError("test must be a non-empty SequenceSet")
        self.test = test
        self.component_names = test.component_names
        self.num_tokens = torch.tensor(test.num_tokens, dtype=torch.float64)  # (n,)
        ids = torch.as_tensor(np.array(test.component_ids))
        self.membership = (ids[None, :] == torch.arange(len(self.component_names))[:, None]).to(torch.float64)  # (C, n)
        self.component_tokens = self.membership @ self.num_tokens  # (C,)
        self.component_sizes = self.membership.sum(1)  # (C,)
        targets = {}
        if reference is not None:
            targets["kl_reference"] = reference.next_token_probs(test)
        if retrained is not None:
            targets["kl_retrained"] = retrained.next_token_probs(test)
        if true_chains is not None:
            targets["kl_true"] = true_next_token_probs(test, true_chains)
        self.targets = {name: probs.detach() for name, probs in targets.items()}  # (n, T-1, V), zero on padding
        self.neg_entropy = {name: self.membership @ torch.special.xlogy(probs, probs).sum((1, 2))
                            for name, probs in self.targets.items()}  # (C,)
        # For a tabular model log q_t = log P[s_t], so the cross term only needs the target mass summed
        # per (component, current state): by_state[c, s, :] = sum_{t in c, s_t = s} p_t.
        num_states = test.num_states
        current = torch.as_tensor(np.where(test.tokens[:, :-1] >= 0, test.tokens[:, :-1], 0))
        index = (ids[:, None] * num_states + current).reshape(-1)  # (n*(T-1),)
        self.by_state = {name: torch.zeros(len(self.component_names) * num_states, num_states, dtype=torch.float64)
                         .index_add_(0, index, probs.reshape(-1, num_states)).reshape(-1, num_states, num_states)
                         for name, probs in self.targets.items()}  # (C, V, V)

    def evaluate(self, model) -> dict[str, np.ndarray]:
        """``{metric: (C,) array}`` for the KL metrics and ``logp_per_token`` (NaN for absent components)."""
        with torch.no_grad():
            tabular = isinstance(model, TabularMarkov)
            log_model = model.transition_log_probs() if tabular else model.next_token_log_probs(self.test)
            result = {}
            for metric in KL_METRICS:
                if metric not in self.targets:
                    result[metric] = np.full(len(self.component_names), np.nan)
                    continue
                if tabular:
                    cross = torch.einsum("csv,sv->c", self.by_state[metric], log_model)  # (C,)
                else:
                    cross = self.membership @ (self.targets[metric] * log_model).sum((1, 2))  # (C,)
                result[metric] = ((self.neg_entropy[metric] - cross) / self.component_tokens).numpy()
            per_token = model.response_logps(self.test) / self.num_tokens  # (n,)
            result["logp_per_token"] = ((self.membership @ per_token) / self.component_sizes).numpy()
        return result
