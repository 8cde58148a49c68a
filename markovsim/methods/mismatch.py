"""GA+Mismatch: gradient ascent, a mismatch term and a KL anchor (Yao, Xu, Liu 2023, "Large Language Model
Unlearning", eq. for theta_{t+1}; docs/theory.md, "Other unlearning methods").

    L = eps_1 L_fgt + eps_2 L_rdn + eps_3 L_nor
    L_fgt = mean over forget (x, y) of logp_theta(y|x) / |y|                 (gradient ascent, token mean)
    L_rdn = mean over forget prompts x, and m random normal responses y_r, of -logp_theta(y_r|x) / |y_r|
    L_nor = mean over normal-data tokens of KL(pi_ref(.|ctx) || pi_theta(.|ctx))

"Random responses" are responses of normal (retain) examples paired at random with the forget prompts
(:func:`mismatch_pairs`). In the simulator a prompt is a sequence's first state, so a mismatch sequence is
the forget sequence's first state followed by the response (states 2..L) of a random retain sequence
(:func:`mismatch_sequences`); its first transition, from the forget prompt into the retain response, is
the "mismatch". Defaults (eps_1, eps_2, eps_3) = (0.5, 1, 1) are those of the public code as we recall
them (its ``bad_weight``, ``random_weight``, ``normal_weight``; not re-checked against the repository).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import check_integer, check_real
from ..data import SequenceSet
from ..exact_gradients import next_token_log_probs, num_tokens_tensor, objective_value_and_gradient, retain_kl_value
from ..losses import ga, nll
from ..objectives import Objective
from ..tensor_checks import check_tensor
from ..validation import check_rng
from .base import ExactStep
from .exact import component_rows

__all__ = ["GAMismatchConfig", "mismatch_pairs", "mismatch_rows", "ga_mismatch_loss", "mismatch_sequences",
           "ExactGAMismatch", "build_exact"]


@dataclass(frozen=True)
class GAMismatchConfig:
    """GA+Mismatch hyperparameters.

    Attributes:
        forget_weight: eps_1 >= 0, the gradient-ascent term's weight.
        mismatch_weight: eps_2 >= 0, the mismatch NLL's weight.
        retain_weight: eps_3 >= 0, the KL-to-original weight on normal data.
        responses_per_prompt: m >= 1 random normal responses per forget prompt.
        seed: seed of the random pairing (numpy ``default_rng``).
    """

    forget_weight: float = 0.5
    mismatch_weight: float = 1.0
    retain_weight: float = 1.0
    responses_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("forget_weight", "mismatch_weight", "retain_weight"):
            check_real(name, getattr(self, name), minimum=0.0)
        check_integer("responses_per_prompt", self.responses_per_prompt, 1)
        check_integer("seed", self.seed, 0)


def mismatch_pairs(num_forget: int, num_normal: int, responses_per_prompt: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which normal response goes with which forget prompt: (forget_index, normal_index), each (n_f * m,) int64.

    Forget prompt i appears m times (rows i*m .. i*m + m - 1), each with a normal example drawn uniformly
    with replacement.
    """
    check_integer("num_forget", num_forget, 1)
    check_integer("num_normal", num_normal, 1)
    check_integer("responses_per_prompt", responses_per_prompt, 1)
    rng = check_rng(rng)
    forget_index = np.repeat(np.arange(num_forget, dtype=np.int64), responses_per_prompt)
    return forget_index, rng.integers(0, num_normal, size=forget_index.size, dtype=np.int64)


def mismatch_rows(forget_rows, responses_per_prompt: int) -> np.ndarray:
    """The rows of :func:`mismatch_pairs`'s layout that belong to forget prompts ``forget_rows``: i*m .. i*m + m - 1
    for each i, in order, (len(forget_rows) * m,) int64 (a step's mismatch rows from its forget rows)."""
    rows = np.asarray(forget_rows, dtype=np.int64)
    return (rows[:, None] * responses_per_prompt + np.arange(responses_per_prompt)).reshape(-1)


def ga_mismatch_loss(forget_logps: torch.Tensor, forget_num_tokens: torch.Tensor, mismatch_logps: torch.Tensor,
                     mismatch_num_tokens: torch.Tensor, retain_kl: torch.Tensor,
                     config: GAMismatchConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``eps_1 mean ga(forget) + eps_2 mean nll(mismatch) + eps_3 retain_kl`` and its three terms (unweighted).

    Args:
        forget_logps, forget_num_tokens: (B_f,) forget responses' logps and |y|.
        mismatch_logps, mismatch_num_tokens: (B_m,) the random normal responses under the forget prompts.
        retain_kl: scalar, the token-mean KL(pi_ref || pi_theta) on normal data (e.g. from ``losses.kl``).
    Returns:
        (total, {"forget": ..., "mismatch": ..., "retain": ...}); the terms are detached.
    """
    check_tensor("retain_kl", retain_kl)
    if retain_kl.ndim != 0:
        raise ValueError(f"retain_kl must be a scalar (the token-mean KL), got shape {tuple(retain_kl.shape)}")
    forget_term = ga(forget_logps, forget_num_tokens).mean()
    mismatch_term = nll(mismatch_logps, mismatch_num_tokens).mean()
    total = (config.forget_weight * forget_term + config.mismatch_weight * mismatch_term
             + config.retain_weight * retain_kl)
    terms = {"forget": forget_term, "mismatch": mismatch_term, "retain": retain_kl}
    return total, {name: value.detach() for name, value in terms.items()}


def mismatch_sequences(forget: SequenceSet, normal: SequenceSet, responses_per_prompt: int,
                       rng: np.random.Generator) -> SequenceSet:
    """The simulator's mismatch set: forget prompt s_1 followed by a random normal sequence's states 2..L.

    Row r has the forget sequence ``forget_index[r]``'s component (the prompt's source) and the length of
    its normal sequence.
    """
    forget_index, normal_index = mismatch_pairs(len(forget), len(normal), responses_per_prompt, rng)
    tokens = normal.tokens[normal_index].copy()  # (n_f * m, max_len) normal sequences
    tokens[:, 0] = forget.tokens[forget_index, 0]  # the forget prompt replaces the normal one
    return SequenceSet(tokens, normal.lengths[normal_index], forget.component_ids[forget_index],
                       forget.component_names, forget.num_states)


@dataclass(frozen=True, eq=False)
class ExactGAMismatch:
    """GA+Mismatch on an exact model: the mismatch set and the reference's retain predictive, built once."""

    config: GAMismatchConfig
    forget: SequenceSet
    retain: SequenceSet
    reference: object
    mismatch: SequenceSet
    retain_ref_log_probs: torch.Tensor

    def value(self, model) -> torch.Tensor:
        total, _ = ga_mismatch_loss(model.response_logps(self.forget), num_tokens_tensor(self.forget),
                                    model.response_logps(self.mismatch), num_tokens_tensor(self.mismatch),
                                    retain_kl_value(model, self.retain, self.retain_ref_log_probs), self.config)
        return total

    def step(self, model) -> ExactStep:
        c = self.config
        objective = Objective("ga", "kl", forget_weight=c.forget_weight, retain_weight=c.retain_weight)
        base = objective_value_and_gradient(model, objective, self.forget, self.retain, None,
                                            self.retain_ref_log_probs)
        with torch.no_grad():
            lengths = num_tokens_tensor(self.mismatch)  # (n_m,)
            mismatch = nll(model.response_logps(self.mismatch), lengths).mean()
            weights = -c.mismatch_weight / (len(self.mismatch) * lengths)  # (n_m,) d/dlogp of eps_2 * mean nll
            extra = model.response_logps_gradient(self.mismatch, weights)
        return ExactStep(base.value + c.mismatch_weight * mismatch,
                         tuple(g + h for g, h in zip(base.gradients, extra)), base.forget_logps)

    def forget_gradient(self, model, component: str) -> tuple[torch.Tensor, ...]:
        """Gradient of the GA and mismatch terms from component's forget sequences (mismatch rows: by prompt)."""
        c = self.config
        with torch.no_grad():
            forget_weights = component_rows(self.forget, component) * (
                c.forget_weight / (len(self.forget) * num_tokens_tensor(self.forget)))  # (n_f,) d/dlogp
            mismatch_weights = component_rows(self.mismatch, component) * (
                -c.mismatch_weight / (len(self.mismatch) * num_tokens_tensor(self.mismatch)))  # (n_m,)
            return tuple(g + h for g, h in zip(model.response_logps_gradient(self.forget, forget_weights),
                                               model.response_logps_gradient(self.mismatch, mismatch_weights)))


def build_exact(config: GAMismatchConfig, reference, forget: SequenceSet, retain: SequenceSet | None,
                unseen: SequenceSet | None = None) -> ExactGAMismatch:
    """The simulator counterpart: needs the retain set (the normal data of the mismatch and KL terms)."""
    if not isinstance(retain, SequenceSet) or len(retain) == 0:
        raise ValueError("GA+Mismatch needs a non-empty retain SequenceSet (its normal data)")
    mismatch = mismatch_sequences(forget, retain, config.responses_per_prompt, np.random.default_rng(config.seed))
    with torch.no_grad():
        retain_ref = next_token_log_probs(reference, retain)
    return ExactGAMismatch(config, forget, retain, reference, mismatch, retain_ref)
