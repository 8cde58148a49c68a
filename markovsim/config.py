"""Run settings shared by the simulator and the LLM side, with one default and one check per field.

:class:`RunSettings` holds what every optimisation run has (optimizer, learning rate, Adam settings,
weight decay, clipping, seed, progress, the divergence threshold). ``markovsim.dynamics.DynamicsConfig``
inherits from it, and ``llm``'s ``TrainConfig`` is meant to: the vocabulary, defaults and validation
then cannot drift. :func:`divergence_reason` is the one rule for stopping a run that has diverged.

Each field's help text lives in its ``metadata["help"]`` (command lines build their flags from it).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from .optimizers import ADAM_RULES

__all__ = ["OPTIMIZERS", "DEFAULT_DIVERGENCE_LOGP_PER_TOKEN", "RunSettings", "setting", "field_help",
           "divergence_reason", "check_real", "check_integer", "check_boolean"]

OPTIMIZERS = ("gd",) + ADAM_RULES

DEFAULT_DIVERGENCE_LOGP_PER_TOKEN = -50.0
"""Stop once the forget data's mean log-likelihood per token is below this: the model then gives each
forget token probability < e^-50 ~ 2e-22, i.e. it has put essentially zero mass on forget data and
the parameters run off to infinity (docs/theory.md, "Divergence speed"). Far below any value a
useful run visits (a uniform model over V = 10 states has -2.3)."""


def setting(default, help: str, *, minimum: float | None = None, above: float | None = None,
            choices: tuple | None = None, finite: bool = True, **kwargs):
    """A dataclass field with its help text and constraints in ``metadata``.

    ``metadata["help"]`` is read by :func:`field_help` and the command lines' flag generators;
    ``choices`` also becomes the flag's choices. The constraints (numbers >= ``minimum``, > ``above``,
    finite; strings in ``choices``) are for generic validators such as ``llm.config.check_setting``;
    :class:`RunSettings` checks its own fields explicitly in ``__post_init__``.
    """
    metadata = {"help": help, "minimum": minimum, "above": above, "choices": choices, "finite": finite}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def field_help(field: dataclasses.Field) -> str:
    """The help text of a field declared with :func:`setting` ("" otherwise)."""
    return field.metadata.get("help", "")


# ---------------------------------------------------------------------------------------------
# Field checks: every error names the field; types -> TypeError, values -> ValueError
# ---------------------------------------------------------------------------------------------


def check_real(name: str, value, *, minimum: float | None = None, exclusive: bool = False,
               maximum: float | None = None, allow_none: bool = False) -> float | None:
    """A finite real number (not a bool) with ``value > minimum`` (exclusive) or ``>= minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if allow_none else ''}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    if maximum is not None and value >= maximum:
        raise ValueError(f"{name} must be < {maximum}, got {value}")
    return float(value)


def check_integer(name: str, value, minimum: int, allow_none: bool = False) -> int | None:
    """An integer (not a bool) that is at least ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_boolean(name: str, value) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Settings every optimisation run shares (the simulator's ``DynamicsConfig``, the LLM's ``TrainConfig``).

    Frozen; ``dataclasses.replace`` makes variants. ``adam_betas`` given as a list is stored as a tuple.
    ``learning_rate``'s default suits the simulator's tabular logits; a subclass for another model
    family may override that one default (and says why).
    """

    optimizer: str = setting("adamw", "gd (theta -= lr g; no weight decay), adamw (torch's AdamW) or adamw_legacy "
                                      "(the paper code's transformers.AdamW: eps added to the uncorrected sqrt(v))",
                             choices=OPTIMIZERS)
    learning_rate: float = setting(0.05, "step size (peak learning rate), > 0")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "Adam's (beta1, beta2), each in [0, 1)")
    adam_eps: float = setting(1e-8, "Adam's eps, > 0 (the paper's transformers.AdamW used 1e-6)")
    weight_decay: float = setting(0.0, "decoupled weight decay, >= 0")
    max_grad_norm: float | None = setting(None, "clip the global gradient norm to this (> 0); None = no clipping")
    seed: int = setting(0, "seed of the batch order / minibatch sampler, >= 0")
    progress: bool = setting(False, "show progress (a bar on a terminal, occasional lines otherwise)")
    divergence_logp_per_token: float | None = setting(
        DEFAULT_DIVERGENCE_LOGP_PER_TOKEN,
        "stop once the forget data's mean log-likelihood per token falls below this (< 0); "
        "None = stop only on NaN/inf")

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, str):
            raise TypeError(f"optimizer must be a string, one of {OPTIMIZERS}, got {type(self.optimizer).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_real("learning_rate", self.learning_rate, minimum=0.0, exclusive=True)
        if isinstance(self.adam_betas, (str, bytes)) or not hasattr(self.adam_betas, "__len__") \
                or len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        for beta in self.adam_betas:
            check_real("adam_betas", beta, minimum=0.0, maximum=1.0)
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        check_real("adam_eps", self.adam_eps, minimum=0.0, exclusive=True)
        check_real("weight_decay", self.weight_decay, minimum=0.0)
        if self.optimizer == "gd" and self.weight_decay > 0:
            raise ValueError(f"weight_decay applies to the Adam rules only; optimizer='gd' needs weight_decay=0, "
                             f"got {self.weight_decay}")
        check_real("max_grad_norm", self.max_grad_norm, minimum=0.0, exclusive=True, allow_none=True)
        check_integer("seed", self.seed, 0)
        check_boolean("progress", self.progress)
        threshold = check_real("divergence_logp_per_token", self.divergence_logp_per_token, allow_none=True)
        if threshold is not None and threshold >= 0:
            raise ValueError(f"divergence_logp_per_token must be < 0 (log-likelihoods are <= 0), got {threshold}")


def divergence_reason(loss: float, logp_per_token: float | None = None, grad_norm: float | None = None,
                      threshold: float | None = None) -> str | None:
    """Why a run must stop, or None: the one divergence rule of the simulator and the LLM side.

    A run has diverged when the loss, the gradient norm ||g|| or the forget data's mean log-likelihood
    per token (mean over forget sequences of logps / num_tokens) is NaN/inf, or when that
    log-likelihood per token is below ``threshold`` (docs/theory.md, "Divergence speed").

    Args:
        loss: the objective's value at this step.
        logp_per_token: the forget batch's mean log-likelihood per token (None = not measured).
        grad_norm: the global gradient norm (None = not measured).
        threshold: e.g. ``RunSettings.divergence_logp_per_token`` (None = NaN/inf checks only).
    Returns:
        a human-readable reason, e.g. ``"loss is nan"`` or
        ``"forget log-likelihood per token -63.1 fell below -50.0"``; None while the run is healthy.
    """
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm} (the gradient has NaN/inf)"
    if logp_per_token is not None and not math.isfinite(logp_per_token):
        return f"forget log-likelihood per token is {logp_per_token}"
    if threshold is not None and logp_per_token is not None and logp_per_token < threshold:
        return f"forget log-likelihood per token {logp_per_token:.3g} fell below {threshold}"
    return None
