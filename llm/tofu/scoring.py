"""Per-item answer log-likelihoods and greedy answers from a causal LM, in batches.

    logps[i]      = sum_{t in answer_i + EOS} log p(token_t | prompt_i, answer_i,<t)     (N,)
    num_tokens[i] = |answer_i| + 1                                                        (N,)

Scoring batches are right-padded (:func:`llm.tofu.format.collate`): real tokens keep their positions,
so a batch gives the same numbers as items scored one at a time. :func:`answer_token_statistics` keeps
the per-token numbers that membership inference needs (:mod:`llm.mia`). Generation left-pads the prompts
(the model continues from the last real token) and passes the attention mask, from which the model
derives the position ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from llm.logps import model_logits, model_sequence_logps
from llm.mia import next_token_statistics

from .format import collate, format_example, prompt_ids

__all__ = ["answer_batches", "answer_logps", "perturbed_logps", "answer_token_statistics", "generate_answers"]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def answer_batches(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                   batch_size: int = 16) -> Iterator[tuple[dict, range]]:
    """``(batch, rows)`` per right-padded batch of answer-labelled pairs on the model's device, the model in eval
    mode meanwhile (its mode restored afterwards); batch = ``{input_ids, attention_mask, labels}`` (B, T)."""
    if len(questions) != len(answers):  # checked at the call, before any batch is asked for
        raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
    return _answer_batches(model, tokenizer, questions, answers, batch_size)


def _answer_batches(model, tokenizer, questions, answers, batch_size: int) -> Iterator[tuple[dict, range]]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            rows = range(start, min(start + batch_size, len(questions)))
            examples = [format_example(tokenizer, questions[r], answers[r]) for r in rows]
            yield {k: v.to(device) for k, v in collate(examples, _pad_id(tokenizer)).items()}, rows
    finally:
        model.train(was_training)


@torch.no_grad()
def answer_logps(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-likelihood of each answer (+ EOS) given its question, and its token count; (N,), (N,)."""
    logps, counts = [], []
    for batch, _ in answer_batches(model, tokenizer, questions, answers, batch_size):
        lp, n = model_sequence_logps(model, batch)  # (B,), (B,)
        logps.append(lp.double().cpu().numpy())
        counts.append(n.cpu().numpy())
    return np.concatenate(logps), np.concatenate(counts).astype(np.int64)


def perturbed_logps(model, tokenizer, questions: Sequence[str], perturbed: Sequence[Sequence[str]],
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """:func:`answer_logps` of K wrong answers per question, (N, K) each (K equal for all items)."""
    widths = {len(p) for p in perturbed}
    if len(widths) != 1:
        raise ValueError(f"every item needs the same number of perturbed answers; got counts {sorted(widths)}")
    k = widths.pop()
    flat_q = [q for q in questions for _ in range(k)]
    flat_a = [a for answers in perturbed for a in answers]
    logps, counts = answer_logps(model, tokenizer, flat_q, flat_a, batch_size)
    return logps.reshape(-1, k), counts.reshape(-1, k)


def _pad_rows(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D float arrays into (N, T_max) with zeros, and the (N, T_max) mask of real entries."""
    width = max(len(row) for row in rows)
    values, mask = np.zeros((len(rows), width)), np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        values[i, :len(row)], mask[i, :len(row)] = row, True
    return values, mask


@torch.no_grad()
def answer_token_statistics(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                            batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per answer token (+ EOS): its log-prob and mu / sigma of the model's next-token log-probs there.

    See :func:`llm.mia.next_token_statistics`. Returns ``{"token_logps", "mu", "sigma"}`` float64 (N, T_max),
    right-padded with 0, and ``"mask"`` bool (N, T_max); ``token_logps[i][mask[i]].sum()`` equals
    :func:`answer_logps` ``[i]`` (up to float32 rounding there).
    """
    batches = answer_batches(model, tokenizer, questions, answers, batch_size)
    if not questions:
        raise ValueError("no items to score")
    rows = {"token_logps": [], "mu": [], "sigma": []}
    for batch, _ in batches:
        *values, mask = next_token_statistics(model_logits(model, batch), batch["labels"])  # (B, T-1) each
        for name, tensor in zip(rows, values):
            rows[name] += [row[keep].cpu().numpy() for row, keep in zip(tensor, mask)]
    out = {name: _pad_rows(found)[0] for name, found in rows.items()}
    out["mask"] = _pad_rows(rows["mu"])[1]
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 200,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers (no sampling), cut at EOS, special tokens dropped, whitespace stripped."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tokenizer, q) for q in questions[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[_pad_id(tokenizer)] * (width - len(p)) + list(p) for p in prompts],
                           device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer))
        for row in generated[:, width:].tolist():  # new tokens only
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return out
