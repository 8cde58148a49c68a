"""Input checks for the loss functions: per-sequence tensors, masks, token values and scalars.

Cheap (one reduction per tensor); each error names the argument and says how to fix it. Used by
:mod:`markovsim.losses` and :mod:`markovsim.objectives`.

The checks that read tensor values (finite, > 0, 0/1 masks, nonempty rows) each cost a host sync on
a GPU. :func:`value_checks_skipped` turns just those off for a block of trusted internal code (the
batched replica step, whose inputs the package itself computed and whose NaN/inf it detects from the
results); the type and shape checks always run.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers

import torch

_VALUE_CHECKS = contextvars.ContextVar("markovsim_value_checks", default=True)


@contextlib.contextmanager
def value_checks_skipped():
    """Within the block, skip the checks that read tensor values (no host syncs); types and shapes are
    still checked. NaN/inf inputs then give NaN/inf losses instead of a ``ValueError``: only for callers
    that check the results themselves."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_on() -> bool:
    """False inside :func:`value_checks_skipped`."""
    return _VALUE_CHECKS.get()


def check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(x).__name__}; "
            f"wrap it with torch.as_tensor(...)"
        )
    return x


def check_finite_tensor(name: str, x) -> torch.Tensor:
    """A tensor without NaN/inf (any shape or dtype); the value read is skipped inside :func:`value_checks_skipped`."""
    check_tensor(name, x)
    if value_checks_on() and (x.is_floating_point() or x.is_complex()) and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; pass finite values (a diverged run stops before this)")
    return x


def check_float(name: str, x) -> torch.Tensor:
    check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_per_sequence(name: str, x, like: torch.Tensor | None = None) -> torch.Tensor:
    """A finite floating (B,) tensor, with the shape of ``like`` if given."""
    check_float(name, x)
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (B,) (one value per sequence), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (a batch of 0 sequences): the mean loss would be NaN; pass B >= 1")
    if like is not None and x.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but logps has shape {tuple(like.shape)}; "
            f"pass one value per sequence for both"
        )
    if value_checks_on() and not torch.isfinite(x).all():
        raise ValueError(
            f"{name} contains NaN or inf; sequence log-likelihoods must be finite "
            f"(very negative is fine). Check for -inf token log-probs at unmasked positions"
        )
    return x


def check_num_tokens(num_tokens, logps: torch.Tensor) -> torch.Tensor:
    """|y| per sequence: a (B,) tensor (integer or floating) of finite values > 0."""
    check_tensor("num_tokens", num_tokens)
    if num_tokens.dtype == torch.bool or num_tokens.is_complex():
        raise TypeError(f"num_tokens must hold integer or floating token counts, got dtype {num_tokens.dtype}")
    if num_tokens.shape != logps.shape:
        raise ValueError(
            f"num_tokens has shape {tuple(num_tokens.shape)} but logps has shape "
            f"{tuple(logps.shape)}; pass one token count per sequence"
        )
    if not value_checks_on():
        return num_tokens
    if num_tokens.is_floating_point() and not torch.isfinite(num_tokens).all():
        raise ValueError("num_tokens contains NaN or inf; pass the response-token counts")
    if not (num_tokens > 0).all():
        raise ValueError(
            "num_tokens must be > 0 for every sequence; drop sequences with no response tokens "
            "(fully masked) before computing the loss"
        )
    return num_tokens


def check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float, got {value}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}; use a small positive value instead")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


MIN_BETA = 1e-38
"""The smallest inverse temperature accepted: the losses scale by 2 / beta, which must stay finite also in
float32 (largest value 3.4e38), the dtype transformer log-probs come in; 2 / 1e-38 = 2e38."""


def check_beta(beta) -> float:
    """A finite beta >= ``MIN_BETA`` (so that the loss scale 2 / beta is finite)."""
    beta = check_number("beta", beta, positive=True)
    if beta < MIN_BETA:
        raise ValueError(f"beta must be >= {MIN_BETA:g} so that the loss scale 2 / beta stays finite, got {beta:g}")
    return beta


def check_mask(mask, shape: torch.Size) -> torch.Tensor:
    """A (B, T) mask, bool or 0/1 numbers, returned as bool."""
    check_tensor("mask", mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)} (B, T)")
    if mask.dtype != torch.bool:
        if value_checks_on() and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be bool or contain only 0 and 1")
        mask = mask.bool()
    return mask


def check_token_values(name: str, x: torch.Tensor, mask: torch.Tensor, *, allow_neg_inf: bool) -> None:
    """Values at masked-in positions must be finite (or -inf if allowed); padding is ignored."""
    if not value_checks_on():
        return
    kept = x[mask]  # (N, ...) masked-in positions only
    ok = (kept < math.inf).all() if allow_neg_inf else torch.isfinite(kept).all()
    if not ok:
        allowed = "finite or -inf (probability 0)" if allow_neg_inf else "finite"
        raise ValueError(
            f"{name} has NaN or inf at unmasked positions; values there must be {allowed}. "
            f"Padding positions (mask False) may hold anything"
        )


def check_nonempty(mask: torch.Tensor) -> None:
    if mask.shape[0] == 0:
        raise ValueError("mask has no sequences (a batch of 0): the mean loss would be NaN; pass B >= 1")
    if value_checks_on() and not mask.any(-1).all():
        raise ValueError("mask has a row with no True entry: every sequence needs at least one unmasked token; "
                         "drop empty sequences")
