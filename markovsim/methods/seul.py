"""SeUL, selective unlearning (Wang et al. 2024, "Selective Forgetting: Advancing Machine Unlearning Techniques
and Evaluation in Language Models"; docs/theory.md, "Other unlearning methods").

Gradient ascent on the *sensitive* tokens of the forget responses only (``markovsim.losses.masked_ga``):

    L(y) = (1/|S_y|) sum_{t in S_y} log pi_theta(y_t | x, y_<t)

The spans S_y are annotated offline or chosen online by the model itself. Online selection here
(:func:`select_sensitive_tokens`): in each response, the ``ceil(fraction * |y|)`` tokens the current model
predicts with the HIGHEST probability (the most memorised ones), re-selected at every step with the
selection held fixed inside the step (it is piecewise constant, so the gradient is exact almost
everywhere). Which tokens the paper's online rule picks is our uncertain reading. In the simulator a
static alternative is "transitions into a chosen set of states" (``sensitive_states``).

Metrics on the sensitive tokens (after Jang et al. 2022's EL and MA, restricted to S; our reading):

    S-MA = fraction of sensitive tokens whose greedy prediction argmax_v pi_theta(v | prefix) is the true token
    S-EL_n = fraction of the true sensitive n-grams (n consecutive sensitive tokens) that occur among the
             n-grams of a generated continuation
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import check_integer, check_real
from ..data import SequenceSet
from ..losses import masked_ga
from ..tensor_checks import check_float, check_mask, check_nonempty
from .base import ExactStep
from .exact import component_rows, token_log_probs, token_logps_gradient

__all__ = ["SeULConfig", "select_sensitive_tokens", "sensitive_memorisation_accuracy",
           "sensitive_extraction_likelihood", "ExactSeUL", "build_exact"]


@dataclass(frozen=True)
class SeULConfig:
    """SeUL hyperparameters.

    Attributes:
        fraction: in (0, 1], the share of each response's tokens selected online (1 = token-mean GA).
        sensitive_states: simulator only: if given, the sensitive tokens are the transitions INTO these
            states (a static mask) instead of the online selection.
    """

    fraction: float = 0.25
    sensitive_states: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_real("fraction", self.fraction, minimum=0.0, exclusive=True)
        if self.fraction > 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.sensitive_states is not None:
            states = tuple(self.sensitive_states)
            if not states:
                raise ValueError("sensitive_states must name at least one state, or be None for online selection")
            for state in states:
                check_integer("sensitive_states", state, 0)
            object.__setattr__(self, "sensitive_states", states)


def select_sensitive_tokens(token_logps: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, T) bool: per row, the ``ceil(fraction * |y|)`` response tokens with the highest log p_t (ties: earlier).

    Args:
        token_logps: (B, T) log p_t under the current model (detached here).
        mask: (B, T) response-token mask; every row needs a token.
        fraction: in (0, 1]; 1 selects every response token.
    """
    check_float("token_logps", token_logps)
    mask = check_mask(mask, token_logps.shape)
    check_nonempty(mask)
    fraction = check_real("fraction", fraction, minimum=0.0, exclusive=True)
    if fraction > 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scores = torch.where(mask, token_logps.detach(), -math.inf)  # (B, T) padding ranks last
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, T)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)  # (B, T)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)  # (B, T)
    keep = torch.ceil(fraction * mask.sum(-1, keepdim=True).to(torch.float64))  # (B, 1)
    return (ranks < keep) & mask


def sensitive_memorisation_accuracy(log_probs: torch.Tensor, labels: torch.Tensor,
                                    sensitive: torch.Tensor) -> torch.Tensor:
    """S-MA: mean over all sensitive tokens of 1[argmax_v log_probs[b, t, v] == labels[b, t]] (a scalar).

    Args: log_probs (B, T, V) next-token (log-)scores; labels (B, T) true tokens; sensitive (B, T) mask
    (at least one True).
    """
    check_float("log_probs", log_probs)
    if log_probs.ndim != 3 or labels.shape != log_probs.shape[:2]:
        raise ValueError(f"log_probs must be (B, T, V) and labels (B, T), got {tuple(log_probs.shape)} and "
                         f"{tuple(labels.shape)}")
    sensitive = check_mask(sensitive, labels.shape)
    if not sensitive.any():
        raise ValueError("sensitive has no True entry: S-MA is undefined without sensitive tokens")
    hits = (log_probs.argmax(-1) == labels) & sensitive  # (B, T)
    return hits.sum() / sensitive.sum()


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def sensitive_extraction_likelihood(generated: torch.Tensor, labels: torch.Tensor, sensitive: torch.Tensor,
                                    n: int = 1) -> torch.Tensor:
    """S-EL_n per row (B,): the share of the row's sensitive n-grams of ``labels`` found in ``generated``'s n-grams.

    A sensitive n-gram is n consecutive label positions all in ``sensitive``. Rows without one give NaN.

    Args: generated (B, G) int tokens (e.g. a greedy continuation of the prompt, PAD < 0 ignored);
        labels (B, T) int; sensitive (B, T) mask; n >= 1.
    """
    n = check_integer("n", n, 1)
    sensitive = check_mask(sensitive, labels.shape)
    if generated.ndim != 2 or generated.shape[0] != labels.shape[0]:
        raise ValueError(f"generated must be (B, G) with B = {labels.shape[0]}, got {tuple(generated.shape)}")
    result = torch.full((labels.shape[0],), math.nan, dtype=torch.float64)
    for row in range(labels.shape[0]):
        produced = set(_ngrams([int(t) for t in generated[row] if t >= 0], n))
        flags, tokens = sensitive[row].tolist(), labels[row].tolist()
        targets = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1) if all(flags[i:i + n])]
        if targets:
            result[row] = sum(target in produced for target in targets) / len(targets)
    return result


@dataclass(frozen=True, eq=False)
class ExactSeUL:
    """SeUL on an exact model: forget-set masked GA, the sensitive mask chosen at each evaluated model."""

    config: SeULConfig
    forget: SequenceSet
    reference: object

    retain = None

    def sensitive_mask(self, model) -> torch.Tensor:
        """(n_f, T-1) bool sensitive response positions at ``model`` (static with ``sensitive_states``)."""
        mask = torch.as_tensor(self.forget.transition_mask)  # (n_f, T-1)
        if self.config.sensitive_states is not None:
            following = torch.as_tensor(self.forget.tokens[:, 1:].copy())  # (n_f, T-1)
            return torch.isin(following, torch.as_tensor(self.config.sensitive_states)) & mask
        with torch.no_grad():
            return select_sensitive_tokens(token_log_probs(model, self.forget), mask, self.config.fraction)

    def value(self, model) -> torch.Tensor:
        mask = torch.as_tensor(self.forget.transition_mask)
        return masked_ga(token_log_probs(model, self.forget), mask, self.sensitive_mask(model)).mean()

    def token_weights(self, model) -> torch.Tensor:
        """(n_f, T-1) d(mean_y L(y)) / d log p_t: 1 / (|S_y| n_f) on selected tokens, 0 elsewhere."""
        selected = self.sensitive_mask(model)  # (n_f, T-1)
        counts = selected.sum(-1, keepdim=True).clamp_min(1).to(torch.float64)  # (n_f, 1) |S_y|
        return selected.to(torch.float64) / (counts * len(self.forget))

    def step(self, model) -> ExactStep:
        with torch.no_grad():
            mask = torch.as_tensor(self.forget.transition_mask)
            value = masked_ga(token_log_probs(model, self.forget), mask, self.sensitive_mask(model)).mean()
            return ExactStep(value, token_logps_gradient(model, self.forget, self.token_weights(model)),
                             model.response_logps(self.forget))

    def forget_gradient(self, model, component: str) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            rows = component_rows(self.forget, component)[:, None]  # (n_f, 1)
            return token_logps_gradient(model, self.forget, self.token_weights(model) * rows)


def build_exact(config: SeULConfig, reference, forget: SequenceSet, retain: SequenceSet | None = None,
                unseen: SequenceSet | None = None) -> ExactSeUL:
    """SeUL needs only the forget set (sensitive_states must be valid states of it)."""
    if config.sensitive_states is not None and max(config.sensitive_states) >= forget.num_states:
        raise ValueError(f"sensitive_states must be < num_states = {forget.num_states}, got "
                         f"{list(config.sensitive_states)}")
    return ExactSeUL(config, forget, reference)

