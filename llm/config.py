"""``TrainConfig``: the optimisation, evaluation and runtime settings of one run, and the paper's presets.

``TrainConfig`` inherits :class:`markovsim.config.RunSettings`: the fields every run shares
(optimizer, learning rate, Adam settings, weight decay, clipping, seed, progress, divergence
threshold) have one name, one default and one check for the simulator and the transformer. Only
``learning_rate`` has its own default here (5e-4: a transformer needs a far smaller step than the
simulator's tabular logits). Every field is declared with :func:`markovsim.config.setting`, which
records its help text and constraints (minimum, exclusive bound, choices) in the field's metadata;
one generic check (:func:`check_setting`) validates the LLM-only fields from their type annotation
and that metadata, and the command line (:mod:`llm.__main__`) generates one flag per field from the
same declarations, so a new field is validated and gets a flag without further code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass

import numpy as np

from markovsim.config import RunSettings, setting

from .data import steps_per_epoch
from .flags import optional_inner
from .runtime import DEVICES, MIXED_PRECISIONS

__all__ = ["SCHEDULES", "TrainConfig", "PAPER_PRETRAINING", "PAPER_UNLEARNING", "setting", "check_setting",
           "setting_types", "config_state"]

SCHEDULES = ("constant", "linear", "cosine")
_SHARED_FIELDS = frozenset(f.name for f in dataclasses.fields(RunSettings))


@dataclass(frozen=True)
class TrainConfig(RunSettings):
    """Optimisation, evaluation and runtime settings of one run (each field's help: its ``setting``).

    The shared fields and their checks come from :class:`markovsim.config.RunSettings` (the same
    defaults as the simulator's ``DynamicsConfig``: no weight decay, no clipping, no progress, stop
    below a forget log-likelihood of -50 per token), except ``learning_rate``.
    ``optimizer="adamw_legacy"`` is the removed ``transformers.AdamW`` of the paper's code (eps
    added to the uncorrected sqrt(v)); use it with ``adam_eps=1e-6`` as ``PAPER_PRETRAINING`` /
    ``PAPER_UNLEARNING`` do. The rules: :mod:`markovsim.optimizers`; weight decay applies to weight
    matrices (ndim >= 2) only.
    The diagnostics (``track_forget_weights``, ``track_power_share``: :mod:`llm.diagnostics`) use
    a fixed, seeded subsample of at most ``diagnostics_max_sequences`` sequences per component; the
    power share scales each component's gradient by (its sequences / subsample size) to estimate
    the full-set sum. The training numbers are the same with and without them.
    """

    learning_rate: float = setting(5e-4, "peak learning rate, > 0 (default 5e-4, the paper's transformer value: "
                                         "the simulator's 0.05 suits tabular logits, not a transformer)")
    batch_size: int = setting(128, "global batch in sequences (the forget batch when unlearning)", minimum=1)
    retain_batch_size: int | None = setting(None, "global retain batch when unlearning (none = batch_size)",
                                            minimum=1)
    epochs: float = setting(1.0, "passes over the training (forget) set; ignored when steps is set", above=0)
    steps: int | None = setting(None, "optimisation steps (overrides epochs)", minimum=0)
    schedule: str = setting("constant", "learning-rate schedule after warm-up (linear/cosine decay to 0)",
                            choices=SCHEDULES)
    warmup_steps: int = setting(0, "linear warm-up steps from 0", minimum=0)
    eval_every: int = setting(10, "unlearning: evaluate at step 0, every this many steps and at the end",
                              minimum=1)
    eval_batch_size: int = setting(256, "rows per evaluation forward pass", minimum=1)
    checkpoint_every: int | None = setting(None, "write a checkpoint every this many steps (none = never; "
                                                 "needs an output folder)", minimum=1)
    keep_checkpoints: int = setting(2, "newest checkpoints kept", minimum=0)
    device: str = setting("auto", "auto (CUDA if available), cpu or cuda", choices=DEVICES)
    mixed_precision: str = setting("auto", "auto (bf16 autocast on CUDA), bf16 (CUDA only) or no",
                                   choices=MIXED_PRECISIONS)
    num_threads: int | None = setting(None, "torch intra-op threads during the run (none = leave as is)",
                                      minimum=1)
    track_forget_weights: bool = setting(True, "unlearning: record the mean closed-form gradient weight per "
                                               "forget component (mean_weight)")
    track_power_share: bool = setting(True, "unlearning: record each component's share of the gradient norm "
                                            "(power_share; one extra backward pass per evaluation)")
    diagnostics_max_sequences: int | None = setting(256, "sequences per component in the diagnostics "
                                                         "subsample (none = every sequence: exact)", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()  # the shared fields: RunSettings' checks
        hints = setting_types()
        for field in dataclasses.fields(self):
            if field.name not in _SHARED_FIELDS:
                check_setting(field.name, getattr(self, field.name), hints[field.name], field.metadata)

    def total_steps(self, num_items: int) -> int:
        """``steps`` if set, else ``ceil(epochs * (num_items // batch_size))``."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * steps_per_epoch(num_items, self.batch_size)))


@functools.cache
def setting_types() -> dict[str, object]:
    """Each ``TrainConfig`` field's resolved type annotation (e.g. ``int | None``)."""
    return typing.get_type_hints(TrainConfig)


def check_setting(name: str, value, hint, metadata) -> None:
    """TypeError/ValueError naming ``name`` unless ``value`` fits ``hint`` and the ``metadata`` constraints."""
    hint, optional = optional_inner(hint)
    if value is None:
        if not optional:
            raise TypeError(f"{name} must not be None")
        return
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, tuple) or len(value) != len(items):
            raise ValueError(f"{name} must be {len(items)} numbers, got {value!r}")
        for index, (item, item_hint) in enumerate(zip(value, items)):
            check_setting(f"{name}[{index}]", item, item_hint, metadata)
        return
    if hint is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        if metadata["choices"] is not None and value not in metadata["choices"]:
            raise ValueError(f"{name} must be one of {metadata['choices']}, got {value!r}")
    else:
        _check_number(name, value, hint, metadata)


def _check_number(name: str, value, hint, metadata) -> None:
    integer_types = (int, np.integer)
    allowed = integer_types if hint is int else integer_types + (float, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, allowed):
        kind = "an int" if hint is int else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if metadata["finite"] and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if metadata["minimum"] is not None and not value >= metadata["minimum"]:
        raise ValueError(f"{name} must be >= {metadata['minimum']}, got {value}")
    if metadata["above"] is not None and not value > metadata["above"]:
        raise ValueError(f"{name} must be > {metadata['above']}, got {value}")


def config_state(config: TrainConfig) -> dict:
    """The config as a JSON-ready dict (tuples as lists): what checkpoints and trajectories record."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


# The paper's synthetic experiment exactly (SimNPO Sec. 5 / App. H and its official code; docs/theory.md,
# "The paper's synthetic experiment"): the legacy transformers.AdamW with its defaults (eps 1e-6, no
# weight decay), no gradient clipping; pre-training 5 epochs of batch 128 at lr 5e-4; unlearning 50
# steps of 4 forget sequences at lr 5e-4, evaluated after every step, never stopped early. Our TrainConfig
# defaults differ (torch AdamW, eps 1e-8, stop below a forget log-likelihood of -50 per token).
_PAPER_OPTIMIZER = dict(optimizer="adamw_legacy", adam_eps=1e-6, weight_decay=0.0, max_grad_norm=None,
                        divergence_logp_per_token=None)
PAPER_PRETRAINING = TrainConfig(learning_rate=5e-4, batch_size=128, epochs=5.0, **_PAPER_OPTIMIZER)
PAPER_UNLEARNING = TrainConfig(learning_rate=5e-4, batch_size=4, steps=50, eval_every=1, **_PAPER_OPTIMIZER)
