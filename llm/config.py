"""``TrainConfig``: the optimisation, evaluation and runtime settings of one run, and the paper's presets.

Every field is declared with :func:`setting`, which records its help text and its constraints
(minimum, exclusive bound, choices) in the field's metadata. One generic check
(:func:`check_setting`) validates each field from its type annotation and that metadata, and the
command line (:mod:`llm.__main__`) generates one flag per field from the same declarations, so a
new field is validated and gets a flag without further code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass

import numpy as np

from markovsim.optimizers import ADAM_RULES

from .data import steps_per_epoch
from .flags import optional_inner
from .runtime import DEVICES, MIXED_PRECISIONS

__all__ = ["SCHEDULES", "TrainConfig", "PAPER_PRETRAINING", "PAPER_UNLEARNING", "setting", "check_setting",
           "setting_types", "config_state"]

SCHEDULES = ("constant", "linear", "cosine")


def setting(default, help: str, *, minimum: float | None = None, above: float | None = None,
            choices: tuple | None = None, finite: bool = True):
    """A dataclass field with its help text and constraints in ``metadata``.

    Args:
        default: the default value (never changed: cached results depend on it).
        help: one line for ``--help`` and the documentation.
        minimum: numbers must be >= minimum.  above: numbers must be > above.
        choices: allowed strings.  finite: numbers must be finite (NaN/inf rejected).
    """
    metadata = {"help": help, "minimum": minimum, "above": above, "choices": choices, "finite": finite}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and runtime settings of one run (each field's help: its ``setting``).

    ``optimizer="adamw_legacy"`` is the removed ``transformers.AdamW`` of the paper's code (eps
    added to the uncorrected sqrt(v)); use it with ``adam_eps=1e-6, weight_decay=0`` as
    ``PAPER_PRETRAINING`` / ``PAPER_UNLEARNING`` do. Both rules: :mod:`markovsim.optimizers`.
    The diagnostics (``track_forget_weights``, ``track_power_share``: :mod:`llm.diagnostics`) use
    a fixed, seeded subsample of at most ``diagnostics_max_sequences`` sequences per component; the
    power share scales each component's gradient by (its sequences / subsample size) to estimate
    the full-set sum. The training numbers are the same with and without them.
    """

    optimizer: str = setting("adamw", "adamw (torch.optim.AdamW) or adamw_legacy (the paper code's "
                                      "transformers.AdamW)", choices=ADAM_RULES)
    learning_rate: float = setting(5e-4, "peak learning rate", above=0)
    batch_size: int = setting(128, "global batch in sequences (the forget batch when unlearning)", minimum=1)
    retain_batch_size: int | None = setting(None, "global retain batch when unlearning (none = batch_size)",
                                            minimum=1)
    epochs: float = setting(1.0, "passes over the training (forget) set; ignored when steps is set", above=0)
    steps: int | None = setting(None, "optimisation steps (overrides epochs)", minimum=0)
    weight_decay: float = setting(0.01, "AdamW decoupled weight decay on weight matrices (ndim >= 2) only",
                                  minimum=0)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's two betas, each in [0, 1)", minimum=0)
    adam_eps: float = setting(1e-8, "AdamW's eps", above=0)
    schedule: str = setting("constant", "learning-rate schedule after warm-up (linear/cosine decay to 0)",
                            choices=SCHEDULES)
    warmup_steps: int = setting(0, "linear warm-up steps from 0", minimum=0)
    max_grad_norm: float | None = setting(1.0, "clip the global gradient norm (none = no clipping; the norm "
                                               "is still logged)", above=0)
    eval_every: int = setting(10, "unlearning: evaluate at step 0, every this many steps and at the end",
                              minimum=1)
    eval_batch_size: int = setting(256, "rows per evaluation forward pass", minimum=1)
    checkpoint_every: int | None = setting(None, "write a checkpoint every this many steps (none = never; "
                                                 "needs an output folder)", minimum=1)
    keep_checkpoints: int = setting(2, "newest checkpoints kept", minimum=0)
    seed: int = setting(0, "batch order (and the torch RNG for dropout)", minimum=0)
    device: str = setting("auto", "auto (CUDA if available), cpu or cuda", choices=DEVICES)
    mixed_precision: str = setting("auto", "auto (bf16 autocast on CUDA), bf16 (CUDA only) or no",
                                   choices=MIXED_PRECISIONS)
    progress: bool = setting(True, "show progress (main process only; plain lines when not a terminal)")
    num_threads: int | None = setting(None, "torch intra-op threads during the run (none = leave as is)",
                                      minimum=1)
    divergence_logp_per_token: float | None = setting(
        None, "unlearning stops once the forget batch's mean log-likelihood per token falls below this "
              "(none = only the NaN/inf guard)")
    track_forget_weights: bool = setting(True, "unlearning: record the mean closed-form gradient weight per "
                                               "forget component (mean_weight)")
    track_power_share: bool = setting(True, "unlearning: record each component's share of the gradient norm "
                                            "(power_share; one extra backward pass per evaluation)")
    diagnostics_max_sequences: int | None = setting(256, "sequences per component in the diagnostics "
                                                         "subsample (none = every sequence: exact)", minimum=1)

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, (list, tuple)):
            object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        hints = setting_types()
        for field in dataclasses.fields(self):
            check_setting(field.name, getattr(self, field.name), hints[field.name], field.metadata)
        if not all(beta < 1 for beta in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")

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
# steps of 4 forget sequences at lr 5e-4, evaluated after every step. Our TrainConfig defaults differ
# (torch AdamW, eps 1e-8, weight decay 0.01, clipping at 1.0).
_PAPER_OPTIMIZER = dict(optimizer="adamw_legacy", adam_eps=1e-6, weight_decay=0.0, max_grad_norm=None)
PAPER_PRETRAINING = TrainConfig(learning_rate=5e-4, batch_size=128, epochs=5.0, **_PAPER_OPTIMIZER)
PAPER_UNLEARNING = TrainConfig(learning_rate=5e-4, batch_size=4, steps=50, eval_every=1, **_PAPER_OPTIMIZER)
