"""Question/answer -> token ids with loss labels on the answer only, and right-padded batches.

With a chat template (SmolLM2, Llama-2-chat, ...)::

    prompt = apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    answer = answer + EOS

Without one (base models), the documented plain template::

    prompt = "Question: {question}\\nAnswer:"      (tokenised with the tokenizer's special tokens, e.g. BOS)
    answer = " {answer}" + EOS

``input_ids = prompt_ids + answer_ids``; ``labels`` are -100 on the prompt and equal ``answer_ids``
(EOS included) on the answer, aligned with ``input_ids`` (the shift happens in :mod:`llm.logps`).
Prompt and answer are tokenised separately, so the answer/prompt boundary is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.data import IGNORE_INDEX

__all__ = ["PLAIN_TEMPLATE", "has_chat_template", "prompt_text", "prompt_ids", "format_example", "collate"]

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


def has_chat_template(tokenizer) -> bool:
    """True if the tokenizer carries a chat template (then it is used for every prompt)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, question: str) -> str:
    """The text that precedes the answer: the chat template's user turn + assistant header, or PLAIN_TEMPLATE."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return PLAIN_TEMPLATE.format(question=question)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of :func:`prompt_text`. The chat template already writes any BOS it wants, so its text is
    tokenised without special tokens; the plain template gets the tokenizer's own (e.g. Llama's BOS)."""
    return _ids(tokenizer, prompt_text(tokenizer, question), special=not has_chat_template(tokenizer))


def format_example(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """One training/scoring example: ``{"input_ids": [...], "labels": [...]}`` (equal lengths).

    Labels are IGNORE_INDEX (-100) on the prompt tokens (:func:`prompt_ids`) and the token ids on answer + EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; the answer's end cannot be labelled")
    prompt = prompt_ids(tokenizer, question)
    answer_ids = _ids(tokenizer, answer if has_chat_template(tokenizer) else " " + answer, special=False) + [eos]
    return {"input_ids": prompt + answer_ids, "labels": [IGNORE_INDEX] * len(prompt) + answer_ids}


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``{input_ids, attention_mask, labels}`` of shape (B, T_max).

    Right padding keeps every real token at its unpadded position (default position ids), so the
    per-item log-likelihoods equal those of the items scored one by one.
    """
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.int64),  # (B, T)
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.int64),  # (B, T)
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64),  # (B, T)
    }
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(example["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(example["labels"])
    return batch
