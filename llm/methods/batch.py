"""What one optimisation step of a registry method sees: this process's rows and the global normalisers.

Every term is a SHARE of the global-batch value (the convention of :mod:`llm.objective`): a sum over
this process's rows divided by a global count, so the shares of N data-parallel processes add up to
the value of the whole batch (and one process holding the whole batch gets the value itself).

    forget-sequence means   (1 / n_f) sum_y ...            n_f = counts.forget_sequences
    forget-token means      (1 / N_f) sum_{y, t} ...       N_f = counts.forget_tokens
    mismatch-sequence means (1 / n_m) sum_y ...            n_m = counts.mismatch_sequences
    retain-token means      (1 / N_r) sum_{y, t} ...       N_r = counts.retain_tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from markovsim.config import check_integer

from ..data import IGNORE_INDEX

__all__ = ["MethodCounts", "MethodBatch", "MethodTerms", "label_tokens"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def label_tokens(batch: dict) -> int:
    """Number of labelled (loss-carrying) tokens of an HF batch: labels[:, 1:] != -100 (the shift convention)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def check_hf_batch(batch, name: str) -> dict:
    """``batch`` must be a dict with (b, t) ``input_ids``, ``attention_mask`` and ``labels`` and b >= 1."""
    if not isinstance(batch, dict) or any(key not in batch for key in BATCH_KEYS):
        raise TypeError(f"{name} must be an HF batch dict with keys {list(BATCH_KEYS)}, got "
                        f"{type(batch).__name__}{'' if not isinstance(batch, dict) else ' with ' + str(list(batch))}")
    shape = tuple(batch["input_ids"].shape)
    if len(shape) != 2 or shape[0] == 0 or any(tuple(batch[k].shape) != shape for k in BATCH_KEYS):
        raise ValueError(f"{name}: input_ids, attention_mask and labels must share a non-empty (b, t) shape, got "
                         f"{[tuple(batch[k].shape) for k in BATCH_KEYS]}")
    return batch


@dataclass(frozen=True)
class MethodCounts:
    """Global normalisers of one step (identical on every process; 0 where the method has no such rows).

    Attributes:
        forget_sequences: n_f. forget_tokens: N_f, labelled forget tokens.
        retain_sequences: n_r. retain_tokens: N_r (retain = GA+Mismatch's normal data, KGA's D_r).
        mismatch_sequences: n_m, GA+Mismatch's (forget prompt, random normal response) rows.
    """

    forget_sequences: int
    forget_tokens: int
    retain_sequences: int = 0
    retain_tokens: int = 0
    mismatch_sequences: int = 0

    def __post_init__(self) -> None:
        check_integer("forget_sequences", self.forget_sequences, 1)
        check_integer("forget_tokens", self.forget_tokens, 1)
        for name in ("retain_sequences", "retain_tokens", "mismatch_sequences"):
            check_integer(name, getattr(self, name), 0)


@dataclass(frozen=True)
class MethodBatch:
    """This process's rows of one step, HF batches ``{input_ids, attention_mask, labels}`` (labels -100 where no
    loss, aligned with input_ids; the response tokens carry the labels).

    Attributes:
        forget: (b_f, t) forget rows.
        counts: the global normalisers (:class:`MethodCounts`).
        retain: (b_r, t) retain / normal rows (GA+Mismatch's KL, KGA's L_r, a retain term of AdvGA/AdvNPO).
        mismatch: (b_m, t) GA+Mismatch rows: a forget prompt followed by a random normal response
            (pair them with ``markovsim.methods.mismatch.mismatch_pairs``; Markov data:
            ``mismatch_sequences``).
        forget_ref_logps: (b_f,) the original model's log-likelihoods of the forget rows (AdvNPO only).
    """

    forget: dict
    counts: MethodCounts
    retain: dict | None = None
    mismatch: dict | None = None
    forget_ref_logps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_hf_batch(self.forget, "forget")
        if not isinstance(self.counts, MethodCounts):
            raise TypeError(f"counts must be a MethodCounts, got {type(self.counts).__name__}")
        for name in ("retain", "mismatch"):
            if getattr(self, name) is not None:
                check_hf_batch(getattr(self, name), name)
        ref = self.forget_ref_logps
        if ref is not None and (not isinstance(ref, torch.Tensor) or ref.shape != self.forget["input_ids"].shape[:1]):
            raise ValueError(f"forget_ref_logps must be a (b_f,) tensor, one per forget row, got "
                             f"{tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__}")

    @classmethod
    def single(cls, forget: dict, retain: dict | None = None, mismatch: dict | None = None,
               forget_ref_logps: torch.Tensor | None = None) -> "MethodBatch":
        """A batch that IS the global batch (one process): the counts are those of the given rows."""
        check_hf_batch(forget, "forget")
        counts = MethodCounts(
            forget["input_ids"].shape[0], label_tokens(forget),
            0 if retain is None else check_hf_batch(retain, "retain")["input_ids"].shape[0],
            0 if retain is None else label_tokens(retain),
            0 if mismatch is None else check_hf_batch(mismatch, "mismatch")["input_ids"].shape[0])
        return cls(forget, counts, retain, mismatch, forget_ref_logps)


@dataclass(frozen=True)
class MethodTerms:
    """A method's loss on one batch (this process's share). Unpacks as ``total, terms = method_loss(...)``.

    Attributes:
        total: differentiable scalar to minimise.
        terms: detached scalars to log (always ``"forget"``; method-specific others, e.g. ``"mismatch"``,
            ``"retain"``, ``"alignment"``, ``"perturbation_norm"``).
        forget_logps, forget_num_tokens: (b_f,) detached forget log-likelihoods and |y| at the model
            (AdvGA/AdvNPO: under the adversary's perturbation), for diagnostics and divergence checks.
    """

    total: torch.Tensor
    terms: dict
    forget_logps: torch.Tensor
    forget_num_tokens: torch.Tensor

    def __iter__(self):
        return iter((self.total, self.terms))
