"""What a registry method prepares once before unlearning a transformer: :func:`prepare_method` -> MethodState.

The auxiliary models are fine-tuned by a callable the CALLER supplies, so this layer never sees the data
format (Markov ``SequenceSet``, TOFU items, ...):

    fine_tune(model_copy, data, settings: FineTuneConfig) -> trained model

``model_copy`` is a deep copy of the original model (or, for KGA with ``auxiliary_from="scratch"``, a
freshly initialised model of the same config) and ``settings`` the method's fine-tuning hyperparameters
(``WHPConfig.reinforce``, ``KGAConfig.auxiliary``, ``TaskNegationConfig.fine_tune``: steps, learning rate,
optimizer). KGA's unseen gap needs the unseen data as HF batches: ``batches(data)`` yields
``{input_ids, attention_mask, labels}`` dicts.

    GA+Mismatch   reference = frozen copy of the original (the KL on normal data)
    WHP           reference = baseline v_b (frozen original); auxiliary["reinforced"] = original fine-tuned on D_f
    TaskNegation  auxiliary["fine_tuned"] = theta_ft (full, or a peft model with LoRA adapters if ``lora``)
    KGA           reference = A_D; auxiliary["forget"] = A_f on D_f, auxiliary["unseen"] = A_n on D_n;
                  unseen_gap = dis_{D_n}(A_D, A_n) (token mean over all of D_n), computed once
    SeUL          nothing
    AdvGA/AdvNPO  layer = the perturbed decoder layer (default -1, the last: the simulator's logit-space
                  analogue); reference = frozen original only for a kl retain term
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from markovsim.methods import get_method
from markovsim.methods.base import FineTuneConfig

from ..logps import labelled_token_logps, model_logits, summed_token_kl, upcast
from .batch import check_hf_batch
from .layers import _check_layer, decoder_layers

__all__ = ["AUXILIARY_ROLES", "MethodState", "prepare_method", "frozen_copy", "check_method_config"]

FineTune = Callable[[Any, Any, FineTuneConfig], Any]


@dataclass(frozen=True, eq=False)
class MethodState:
    """A registry method ready to run on a transformer.

    Attributes:
        name: the registry name (``markovsim.methods.METHODS``).
        config: its hyperparameters (the registry's config dataclass).
        reference: the frozen original model where the method needs one (module docstring), else None.
        auxiliary: the frozen auxiliary models by role (``"reinforced"``, ``"forget"``, ``"unseen"``,
            ``"fine_tuned"``).
        unseen_gap: KGA's dis_{D_n}(A_D, A_n), else None.
        layer: AdvGA/AdvNPO's perturbed decoder layer (0-based), else None.
    """

    name: str
    config: Any
    reference: Any = None
    auxiliary: dict = field(default_factory=dict)
    unseen_gap: float | None = None
    layer: int | None = None

    @property
    def kind(self) -> str:
        """``objective``, ``update_rule`` or ``wrapper`` (the registry's kind)."""
        return get_method(self.name).kind


def check_method_config(name: str, config):
    """The registry default for None; TypeError unless ``config`` is the method's config class."""
    spec = get_method(name)
    if config is None:
        return spec.config
    if not isinstance(config, type(spec.config)):
        raise TypeError(f"config of {name!r} must be a {type(spec.config).__name__}, got {type(config).__name__}")
    return config


def frozen_copy(model):
    """A deep copy in eval mode with gradients off (the original, or an auxiliary model)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _fresh_model(model, seed: int):
    """A newly initialised model of ``model``'s class and config (KGA ``auxiliary_from="scratch"``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        raise TypeError(f"auxiliary_from='scratch' needs a transformers PreTrainedModel, got {type(model).__name__}; "
                        f"use auxiliary_from='reference'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(copy.deepcopy(config))
    return fresh.to(next(model.parameters()).device)


def _trained(fine_tune: FineTune, start, data, settings: FineTuneConfig, what: str):
    trained = fine_tune(start, data, settings)
    if not isinstance(trained, torch.nn.Module):
        raise TypeError(f"fine_tune must return the trained model ({what}), got {type(trained).__name__}")
    return trained.eval().requires_grad_(False)


@torch.no_grad()
def token_kl_sum(target_model, model, batches: Iterable[dict]) -> tuple[float, int]:
    """sum over labelled tokens of KL(p_target || p_model) and the token count, over ``batches`` (no gradient)."""
    total, count = 0.0, 0
    for batch in batches:
        check_hf_batch(batch, "batches(unseen) item")
        target = torch.log_softmax(upcast(model_logits(target_model, batch)[:, :-1]), -1)  # (b, t-1, V)
        logits = model_logits(model, batch)
        _, mask = labelled_token_logps(logits, batch["labels"])  # (b, t-1)
        total += float(summed_token_kl(target, logits, mask))
        count += int(mask.sum())
    return total, count


# The auxiliary models each method trains (roles of MethodState.auxiliary).
AUXILIARY_ROLES = {"WHP": ("reinforced",), "TaskNegation": ("fine_tuned",), "KGA": ("forget", "unseen")}


def prepare_method(name: str, model, forget=None, retain=None, fine_tune: FineTune | None = None, config=None,
                   unseen=None, batches: Callable[[Any], Iterable[dict]] | None = None, lora=None,
                   layer: int = -1, seed: int = 0, trained: dict | None = None) -> MethodState:
    """Build method ``name``'s state from the original ``model`` (left unchanged).

    Args:
        name: a registry name. model: the original causal LM (the model before unlearning).
        forget, retain, unseen: the data sets in the caller's format (passed only to ``fine_tune`` and
            ``batches``): D_f (WHP, KGA, TaskNegation), D_n (KGA).
        fine_tune: ``fine_tune(model_copy, data, settings) -> model`` (WHP, KGA, TaskNegation).
        config: the method's hyperparameters (default: the registry's).
        batches: ``batches(data) -> iterable of HF batches`` (KGA: the unseen gap over D_n).
        lora: TaskNegation only: an ``llm.lora.LoraSettings``; theta_ft is then a LoRA fine-tune (peft model).
        layer: AdvGA/AdvNPO's perturbed decoder layer (default -1: the last).
        seed: initialisation seed of KGA's "scratch" auxiliary models.
        trained: auxiliary models already trained elsewhere, by role (:data:`AUXILIARY_ROLES`; e.g. the TOFU
            protocol's ``aux-*`` stages): used as they are (frozen), ``fine_tune`` is not called for them.
    """
    config = check_method_config(name, config)
    trained = dict(trained or {})
    unknown = sorted(set(trained) - set(AUXILIARY_ROLES.get(name, ())))
    if unknown:
        raise ValueError(f"trained names roles {unknown} that {name} does not have; its roles: "
                         f"{list(AUXILIARY_ROLES.get(name, ()))}")
    needs_tuning = any(role not in trained for role in AUXILIARY_ROLES.get(name, ()))
    if needs_tuning and not callable(fine_tune):
        raise ValueError(f"{name} trains auxiliary models: pass fine_tune(model_copy, data, settings) -> model")
    if needs_tuning and forget is None:
        raise ValueError(f"{name} needs the forget data (forget=...) to fine-tune its auxiliary models")
    if lora is not None and name != "TaskNegation":
        raise ValueError(f"lora applies to TaskNegation only (LoRA task vectors), not to {name!r}")

    def auxiliary(role: str, start: Callable[[], Any], data, settings: FineTuneConfig, what: str):
        if role in trained:
            return trained[role].eval().requires_grad_(False)
        return _trained(fine_tune, start(), data, settings, what)

    if name == "GA+Mismatch":
        return MethodState(name, config, reference=frozen_copy(model))
    if name == "WHP":
        reinforced = auxiliary("reinforced", lambda: copy.deepcopy(model), forget, config.reinforce,
                               "WHP's reinforced model")
        return MethodState(name, config, reference=frozen_copy(model), auxiliary={"reinforced": reinforced})
    if name == "TaskNegation":
        def start():
            if lora is None:
                return copy.deepcopy(model)
            from ..lora import add_lora

            return add_lora(copy.deepcopy(model), lora)

        return MethodState(name, config, auxiliary={"fine_tuned": auxiliary("fine_tuned", start, forget,
                                                                              config.fine_tune, "theta_ft")})
    if name == "KGA":
        return _prepare_kga(config, model, forget, unseen, auxiliary, batches, seed)
    if name == "SeUL":
        return MethodState(name, config)
    layers = decoder_layers(model)  # AdvGA / AdvNPO
    reference = frozen_copy(model) if config.objective.retain == "kl" else None
    return MethodState(name, config, reference=reference, layer=_check_layer(layers, layer))


def _prepare_kga(config, model, forget, unseen, auxiliary, batches, seed) -> MethodState:
    if unseen is None:
        raise ValueError("KGA needs unseen data D_n (unseen=...): data the original model was not trained on")
    if not callable(batches):
        raise ValueError("KGA computes its unseen gap over D_n: pass batches(data) -> iterable of HF batches")

    def start(index: int):
        return copy.deepcopy(model) if config.auxiliary_from == "reference" else _fresh_model(model, seed + index)

    forget_model = auxiliary("forget", lambda: start(0), forget, config.auxiliary, "KGA's A_f")
    unseen_model = auxiliary("unseen", lambda: start(1), unseen, config.auxiliary, "KGA's A_n")
    reference = frozen_copy(model)
    total, count = token_kl_sum(unseen_model, reference, batches(unseen))
    if count == 0:
        raise ValueError("batches(unseen) yielded no labelled tokens")
    return MethodState("KGA", config, reference=reference, auxiliary={"forget": forget_model, "unseen": unseen_model},
                       unseen_gap=total / count)


def replace_config(state: MethodState, **overrides) -> MethodState:
    """The same prepared state with config fields replaced (no re-training; for hyperparameter sweeps)."""
    return dataclasses.replace(state, config=dataclasses.replace(state.config, **overrides))
