"""TaskNegation on a transformer: theta <- theta - lambda (theta_ft - theta), an update rule (no loss).

``markovsim.methods.task_negation.task_vector`` / ``negate_task`` do the arithmetic; this module feeds them
a transformer's weights in two ways:

* full fine-tuning: tau = theta_ft - theta over every floating-point entry of the state dicts;
* LoRA (F-Learning's choice): ``fine_tuned`` is a peft model whose adapters were trained on the forget data
  over a copy of ``model``; tau of each adapted weight W is the adapter's merged delta
  ``get_delta_weight`` = (alpha / r) B A (transposed for GPT-2's Conv1D), 0 elsewhere, and only those
  weights change. Exact: no subtraction of two nearly equal full weights.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from markovsim.config import check_real
from markovsim.methods.task_negation import negate_task, task_vector

__all__ = ["lora_task_vector", "full_task_vector", "apply_task_negation"]

_PEFT_PREFIX = "base_model.model."


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_task_vector(fine_tuned) -> dict[str, torch.Tensor]:
    """``{base parameter name: merged LoRA delta}`` of every adapted weight of a peft model (active adapter)."""
    if not _is_peft(fine_tuned):
        raise TypeError(f"fine_tuned must be a peft model (llm.lora.add_lora), got {type(fine_tuned).__name__}")
    vector = {}
    with torch.no_grad():
        for name, module in fine_tuned.named_modules():
            if not (hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")):
                continue
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = (name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name) + ".weight"
                    delta = module.get_delta_weight(adapter).detach()
                    vector[key] = vector[key] + delta if key in vector else delta
    if not vector:
        raise ValueError("fine_tuned has no active LoRA adapters: nothing to negate")
    return vector


def _floating_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if torch.is_floating_point(v)}


def full_task_vector(model, fine_tuned) -> dict[str, torch.Tensor]:
    """tau = theta_ft - theta over the floating-point state-dict entries (``fine_tuned`` a model or a state dict)."""
    base = _floating_state(model)
    tuned = fine_tuned if isinstance(fine_tuned, Mapping) else _floating_state(fine_tuned)
    tuned = {k: v.to(base[k].device) for k, v in tuned.items() if k in base}
    return task_vector(base, tuned)


def apply_task_negation(model, fine_tuned, scale: float):
    """Subtract ``scale`` times the task vector from ``model``'s weights, in place; returns ``model``.

    Args:
        model: the original causal LM theta (not a peft model).
        fine_tuned: theta_ft: a model of the same architecture (or its state dict) fine-tuned on the forget
            data, or a peft model with LoRA adapters trained on the forget data (then tau = the merged deltas).
        scale: lambda >= 0 (0 leaves the model unchanged).
    """
    scale = check_real("scale", scale, minimum=0.0)
    if not isinstance(model, nn.Module) or _is_peft(model):
        raise TypeError(f"model must be a plain (non-peft) torch.nn.Module, got {type(model).__name__}")
    vector = lora_task_vector(fine_tuned) if _is_peft(fine_tuned) else full_task_vector(model, fine_tuned)
    state = model.state_dict()
    missing = sorted(set(vector) - set(state))
    if missing:
        raise ValueError(f"task vector entries {missing[:5]} are not parameters of model; fine-tune a copy of it")
    base = {k: state[k] for k in vector}
    new = negate_task(base, {k: v.to(base[k].device, base[k].dtype) for k, v in vector.items()}, scale)
    with torch.no_grad():
        for key, value in new.items():
            state[key].copy_(value)
    return model
