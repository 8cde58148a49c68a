"""Per-sequence log-likelihoods of a causal LM: the bridge from logits to ``markovsim.losses``.

    token_logps[b, j] = log softmax(logits[b, j])[labels[b, j + 1]]     (B, T - 1)
    mask[b, j]        = labels[b, j + 1] != -100
    (logps, num_tokens) = markovsim.losses.reduce_token_logps(token_logps, mask)   (THE shared reducer)

Naming glossary (the whole package): ``logps`` = per-sequence summed log-probabilities (N,),
``token_logps`` = per-token log-probabilities of the labels (N, T), ``log_probs`` = log of full
next-token distributions (..., V), ``logp_per_token`` = logps / num_tokens. Hence
:func:`labelled_token_logps` (logits -> token_logps) and :func:`model_sequence_logps`
(model, batch -> logps); ``markovsim.losses.reduce_token_logps`` reduces token_logps to logps.

Log-softmax runs in float32 (or the logits' dtype if wider), also under bf16 autocast.
"""

from __future__ import annotations

import torch

from markovsim import losses

from .data import IGNORE_INDEX

__all__ = ["NonFiniteLogitsError", "model_logits", "labelled_token_logps", "token_log_likelihoods",
           "model_sequence_logps", "summed_token_kl", "sequence_token_kl", "state_log_probs", "upcast"]


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN/inf logits where a loss applies (the training loop's divergence signal)."""


def model_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(input_ids, attention_mask).logits``, shape (B, T, vocab)."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return output.logits if hasattr(output, "logits") else output["logits"]


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32/float64 unchanged."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def labelled_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next label and the loss mask, HF shift convention.

    Args:
        logits: (B, T, vocab) from the model.
        labels: (B, T) int64 aligned with input_ids, -100 where no loss.
    Returns:
        token_logps (B, T - 1) float32/64 and mask (B, T - 1) bool. Masked positions hold 0.
    Raises:
        NonFiniteLogitsError: NaN/inf logits at a labelled position.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, vocab) and labels (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    token_logps, mask = token_log_likelihoods(logits, labels)
    if not bool(torch.isfinite(token_logps).all()):
        raise NonFiniteLogitsError("the model produced NaN/inf log-probabilities at labelled positions")
    return token_logps, mask


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic of :func:`labelled_token_logps` without its checks (a pure tensor function that
    ``torch.compile`` can fuse: over a large vocabulary the float32 log-sum-exp is most of a step).

    token_logps_bt = logits_{b,t,y} - logsumexp_v logits_{b,t,v} at labelled positions (y = labels_{b,t+1}), else 0.
    """
    shifted = upcast(logits[:, :-1])  # (B, T-1, vocab)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    safe = torch.where(mask, targets, 0)  # (B, T-1)
    picked = shifted.gather(-1, safe[..., None]).squeeze(-1)  # (B, T-1)
    token_logps = picked - torch.logsumexp(shifted, dim=-1)  # (B, T-1)
    return torch.where(mask, token_logps, 0.0), mask


def model_sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-likelihood over labelled tokens and their count (docs/theory.md: logps, |y|).

    Args:
        model: a causal LM (anything returning ``.logits`` of shape (B, T, vocab)).
        batch: ``{input_ids, attention_mask, labels}`` (B, T) from :mod:`llm.data`.
    Returns:
        logps (B,) and num_tokens (B,), float32 (or the logits' dtype if float64).
    """
    token_logps, mask = labelled_token_logps(model_logits(model, batch), batch["labels"])  # (B, T-1)
    return losses.reduce_token_logps(token_logps, mask)


def summed_token_kl(target_log_probs: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over labelled positions of KL(p_target || softmax(logits)) (``markovsim.losses.kl``), a scalar.

    Args: target_log_probs (b, t-1, V) (may hold -inf); logits (b, t, V) of the model (the last position
    predicts nothing); mask (b, t-1) labelled positions.
    """
    return sequence_token_kl(target_log_probs, logits, mask).sum()


def sequence_token_kl(target_log_probs: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b,) per sequence, the sum over its labelled positions of KL(p_target || softmax(logits)) (the terms
    :func:`summed_token_kl` adds up; same arguments)."""
    log_probs = torch.log_softmax(upcast(logits[:, :-1]), -1)  # (b, t-1, V)
    per_sequence = losses.kl(target_log_probs.to(log_probs.dtype), log_probs, mask)  # (b,) token means
    return per_sequence * mask.sum(-1)


def state_log_probs(logits: torch.Tensor, num_states: int) -> torch.Tensor:
    """Next-state log-predictive: log softmax over the V state tokens only (BOS excluded).

    Args:
        logits: (..., vocab) with vocab >= num_states.
    Returns: (..., V) float32/64 log-probabilities.
    """
    return torch.log_softmax(upcast(logits[..., :num_states]), dim=-1)


# Former names, kept for existing code: ``sequence_logps`` (its old name) collided with
# markovsim.losses.reduce_token_logps's old name.
sequence_logps = model_sequence_logps
token_log_probs = labelled_token_logps
