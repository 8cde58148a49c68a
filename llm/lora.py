"""Unlearning through LoRA adapters (optional: needs the ``peft`` package, imported lazily).

``add_lora(model)`` freezes the base weights and adds rank-r adapters to the attention projections;
the result is still a causal LM returning ``.logits``, so ``llm.train.unlearn`` (and every other
``llm`` function) takes it unchanged: only the adapter weights are optimised. Saving such a model
with ``save_pretrained`` writes the adapters only; call ``model.merge_and_unload()`` first to get a
plain model that ``llm.models.load_model`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LoraSettings", "DEFAULT_TARGET_MODULES", "add_lora", "require_peft"]

DEFAULT_TARGET_MODULES = {"gpt2": ("c_attn", "c_proj"), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters.

    Attributes:
        rank: adapter rank r.  alpha: scaling numerator (update = alpha / r * B A).
        dropout: dropout on the adapter input.  target_modules: module names to adapt (None = the
            attention projections of the architecture, ``DEFAULT_TARGET_MODULES``).
        seed: initialisation seed of the adapters (A random, B zero).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


def require_peft():
    """The ``peft`` module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA unlearning needs the optional 'peft' package: pip install peft") from error
    return peft


def add_lora(model, settings: LoraSettings = LoraSettings()):
    """Wrap ``model`` with LoRA adapters (base weights frozen); returns the ``peft`` model.

    Args:
        model: a ``transformers`` causal LM (GPT-2 or Llama presets, or any model with
            ``settings.target_modules``).
        settings: :class:`LoraSettings`.
    """
    peft = require_peft()
    model_type = getattr(model.config, "model_type", None)
    targets = settings.target_modules or DEFAULT_TARGET_MODULES.get(model_type)
    if targets is None:
        raise ValueError(f"no default LoRA target modules for model type {model_type!r}; pass "
                         f"LoraSettings(target_modules=...) (defaults exist for {sorted(DEFAULT_TARGET_MODULES)})")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=list(targets), fan_in_fan_out=model_type == "gpt2",
                             task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return peft.get_peft_model(model, config)
