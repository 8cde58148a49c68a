"""The simulator's exact ``TabularMarkov`` as a causal LM: the bridge between the two sides.

``TabularCausalLM`` is an ``nn.Module`` with the calling convention of a ``transformers`` causal LM
(``model(input_ids, attention_mask).logits``) whose predictive IS the tabular model:

    logits[b, 0]  = [initial_logits, -1e9]                       after BOS: pi(s_1) = softmax(b)
    logits[b, j]  = [transition_logits[input_ids[b, j]], -1e9]   after state s: pi(. | s) = softmax(A[s])

(the last column is the BOS token, given probability exp(-1e9) = 0 exactly in float64). Every
``llm`` function (``model_sequence_logps``, ``unlearn``, ``Evaluator``) therefore runs on it and must
reproduce ``markovsim`` exactly: ``model_sequence_logps`` equals ``TabularMarkov.response_log_prob``,
and ``llm.train.unlearn`` with full batches and Adam follows ``markovsim.dynamics.unlearn``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from markovsim.models import TabularMarkov

__all__ = ["TabularCausalLM"]

_EXCLUDED_LOGIT = -1e9


class TabularCausalLM(nn.Module):
    """A ``TabularMarkov`` with trainable float64 logits behind a causal-LM interface.

    Args:
        tabular: the exact model (its logits are copied into parameters).
        max_length: the context length reported in ``config`` (positions are not used).
    Attributes:
        initial_logits: (V,) parameter ``b``.  transition_logits: (V, V) parameter ``A``.
        config: ``vocab_size = V + 1`` (BOS = V), ``n_positions = max_length``.
    """

    def __init__(self, tabular: TabularMarkov, max_length: int = 1024):
        super().__init__()
        if not isinstance(tabular, TabularMarkov):
            raise TypeError(f"tabular must be a markovsim TabularMarkov, got {type(tabular).__name__}")
        self.initial_logits = nn.Parameter(tabular.initial_logits.detach().clone())
        self.transition_logits = nn.Parameter(tabular.transition_logits.detach().clone())
        self.num_states = tabular.num_states
        self.config = SimpleNamespace(vocab_size=self.num_states + 1, n_positions=int(max_length))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **unused):
        """Logits (B, T, V + 1); BOS and padding positions (id V) use the initial logits."""
        table = torch.cat([self.transition_logits, self.initial_logits[None, :]], dim=0)  # (V+1, V)
        logits = table[input_ids]  # (B, T, V)
        excluded = logits.new_full((*logits.shape[:2], 1), _EXCLUDED_LOGIT)  # (B, T, 1) the BOS column
        return SimpleNamespace(logits=torch.cat([logits, excluded], dim=-1))

    def to_tabular(self) -> TabularMarkov:
        """The current parameters as a ``TabularMarkov``."""
        return TabularMarkov(self.initial_logits.detach().clone(), self.transition_logits.detach().clone())
