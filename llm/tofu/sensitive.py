"""SeUL's sensitive memorisation accuracy (S-MA) on the TOFU forget set, for every evaluated model.

    sensitive tokens  per forget answer (+ EOS), the ceil(fraction * |y|) tokens that the TARGET model
                      predicts with the highest probability: SeUL's online selection rule
                      (:func:`markovsim.methods.seul.select_sensitive_tokens`) evaluated once, at the model
                      before unlearning, so every model is scored on the same tokens; stored as positions
                      among each answer's labelled tokens (0 = the answer's first token)
    S-MA              share of the sensitive tokens whose teacher-forced greedy prediction
                      argmax_v p(v | question, answer_<t) is the true token
                      (:func:`markovsim.methods.seul.sensitive_memorisation_accuracy`, per batch, then
                      weighted by each batch's number of sensitive tokens)

The sensitive extraction likelihood S-EL (n-grams of a generated continuation) is not computed here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from llm.logps import labelled_token_logps, model_logits
from markovsim.methods.seul import select_sensitive_tokens, sensitive_memorisation_accuracy

from .data import TofuItem
from .scoring import answer_batches

__all__ = ["sensitive_positions", "sensitive_memorisation"]


def _batches(model, tokenizer, items: Sequence[TofuItem], batch_size: int) -> Iterator[tuple]:
    """(logits (B, T, V), labels (B, T), rows) per batch of answer-labelled pairs, without gradients."""
    if not items:
        raise ValueError("no items to score")
    for batch, rows in answer_batches(model, tokenizer, [i.question for i in items], [i.answer for i in items],
                                      batch_size):
        with torch.no_grad():
            yield model_logits(model, batch), batch["labels"], rows  # (B, T, V), (B, T)


@torch.no_grad()
def sensitive_positions(model, tokenizer, items: Sequence[TofuItem], fraction: float,
                        batch_size: int = 16) -> list[list[int]]:
    """Per item, the positions (among its answer's labelled tokens) of its sensitive tokens under ``model``."""
    positions = []
    for logits, labels, _ in _batches(model, tokenizer, items, batch_size):
        token_logps, mask = labelled_token_logps(logits, labels)  # (B, T-1) each
        selected = select_sensitive_tokens(token_logps, mask, fraction)  # (B, T-1)
        positions += [torch.nonzero(row[keep]).flatten().tolist() for row, keep in zip(selected, mask)]
    return positions


def _mask_from_positions(mask: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, T-1) bool: True at the given positions among each row's True entries of ``mask``."""
    sensitive = torch.zeros_like(mask)
    for row, (keep, chosen) in enumerate(zip(mask, positions)):
        labelled = torch.nonzero(keep).flatten()  # (n_b,) labelled columns of the row
        if chosen and max(chosen) >= len(labelled):
            raise ValueError(f"sensitive position {max(chosen)} is past the answer's {len(labelled)} tokens: the "
                             f"positions were made with another tokenizer or other items")
        sensitive[row, labelled[list(chosen)]] = True
    return sensitive


@torch.no_grad()
def sensitive_memorisation(model, tokenizer, items: Sequence[TofuItem], positions: Sequence[Sequence[int]],
                           batch_size: int = 16) -> dict:
    """``{"s_ma": S-MA, "num_sensitive_tokens": n}`` of ``model`` on ``items`` at the given sensitive positions."""
    if len(positions) != len(items):
        raise ValueError(f"positions has {len(positions)} rows for {len(items)} items")
    hits, total = 0.0, 0
    for logits, labels, rows in _batches(model, tokenizer, items, batch_size):
        mask = labels[:, 1:] != -100  # (B, T-1) HF shift: position j predicts labels[:, j + 1]
        sensitive = _mask_from_positions(mask, [positions[r] for r in rows])  # (B, T-1)
        count = int(sensitive.sum())
        if count:
            accuracy = sensitive_memorisation_accuracy(logits[:, :-1], labels[:, 1:], sensitive)
            hits, total = hits + float(accuracy) * count, total + count
    if total == 0:
        raise ValueError("no sensitive tokens: S-MA is undefined")
    return {"s_ma": hits / total, "num_sensitive_tokens": total}
