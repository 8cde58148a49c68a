"""The unlearning methods of the TOFU protocol and what each needs on TOFU: names, settings, auxiliary models, data.

Two families share ``--methods``: the ``markovsim`` objectives (:data:`markovsim.objectives.OBJECTIVES`: GA,
GradDiff, NPO, SimNPO and their retain variants; on TOFU with the official settings of the split,
:func:`llm.tofu.protocol_config.official_settings`) and the registry methods
(:data:`markovsim.methods.METHODS`; docs/theory.md, "Other unlearning methods"). On TOFU the registry
methods take these inputs (the unlearned model always starts at the target model A_D):

    method        auxiliary models (stages ``aux-*``)           data of each unlearning step
    GA+Mismatch   -                                             forget pairs; mismatch pairs (forget questions
                                                                with answers of retain pairs, :func:`mismatch_items`);
                                                                retain pairs (KL to the target)
    WHP           aux-target-on-forget: the reinforced model    forget pairs (generic predictions from the target's
                                                                and the reinforced model's logits)
    TaskNegation  aux-target-on-forget: theta_ft                no loop: theta = target - lambda (theta_ft - target)
    KGA           aux-base-on-forget (A_f), aux-base-on-unseen  forget pairs, retain pairs (KL to the target),
                  (A_n); auxiliary_from="reference":            unseen pairs D_n (only through the constant gap
                  aux-target-on-forget / aux-target-on-unseen   dis_{D_n}(A_D, A_n))
    SeUL          -                                             forget pairs (sensitive tokens chosen online)
    AdvGA/AdvNPO  -                                             forget pairs (LAU's inner adversary)

Auxiliary models are fine-tuned with the protocol's fine-tuning settings (``finetune_lr``,
``finetune_epochs`` / ``finetune_steps``, weight decay and schedule as the target; LoRA adapters under
``--lora``, merged when saved), not with the registry's simulator-scale ``FineTuneConfig`` (its
learning rate 0.05 is for exact tabular models). "base" is the model the target was fine-tuned from
(the pretrained checkpoint: KGA's "scratch" auxiliaries on a transformer are trained from the same
pretrained initialisation as A_D, not from random weights).

Unseen data D_n (KGA): the pairs of the protocol's held-out authors (:meth:`Protocol.holdout_items`).
They are the only TOFU authors in no fine-tuning set (forget + retain cover all 200 authors), so
taking other authors would change what the target and retain models are trained on. They are also
the membership-inference non-members, which stays sound: the unlearned model A* never trains on D_n;
only the auxiliary A_n does, and A*'s loss sees D_n only through the scalar dis_{D_n}(A_D, A_n),
computed from two frozen models and constant in A*'s parameters. (A_n itself is not evaluated.)

WHP's anchored-term replacement (the paper's text-level step) is not implemented: the generic
predictions come from the reinforced model's logits alone. With ``--lora``, TaskNegation's task vector
is the merged LoRA delta ``(alpha / r) B A`` of the adapted projections (F-Learning's LoRA variant),
because the forget fine-tune trains adapters only.

Hyperparameters: the registry defaults (:func:`markovsim.methods.get_config`), replaced field by field
with ``method_options`` strings ``"Name.field=value"`` (``value`` read as JSON, else as a string), e.g.
``"TaskNegation.scale=0.5"``, ``"KGA.auxiliary_from=reference"``, ``"SeUL.fraction=0.5"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from markovsim.methods import METHODS, FineTuneConfig, get_config
from markovsim.methods.mismatch import mismatch_pairs
from markovsim.objectives import OBJECTIVES, Objective

from .data import TofuItem

__all__ = ["METHOD_NAMES", "AUXILIARY", "AuxiliaryModel", "check_method_name", "method_slug", "is_registry_method",
           "parse_method_options", "method_config", "auxiliary_models", "mismatch_items"]

METHOD_NAMES: tuple[str, ...] = tuple(OBJECTIVES) + tuple(METHODS)


@dataclass(frozen=True)
class AuxiliaryModel:
    """An auxiliary model: ``start`` ("base" or "target") fine-tuned on ``data`` ("forget" or "unseen")."""

    start: str
    data: str

    @property
    def name(self) -> str:
        """Its stage / model-folder name, e.g. ``"aux-target-on-forget"``."""
        return f"aux-{self.start}-on-{self.data}"


AUXILIARY: dict[str, AuxiliaryModel] = {
    aux.name: aux for aux in (AuxiliaryModel("target", "forget"), AuxiliaryModel("base", "forget"),
                              AuxiliaryModel("base", "unseen"), AuxiliaryModel("target", "unseen"))}


def check_method_name(name) -> str:
    """``name`` if it is an objective or a registry method; ValueError listing every valid name otherwise."""
    if not isinstance(name, str) or name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(METHOD_NAMES)}")
    return name


def method_slug(method: str) -> str:
    """A folder / stage name for a method: ``"NPO+RT"`` -> ``"npo-rt"``, ``"GA+Mismatch"`` -> ``"ga-mismatch"``."""
    return check_method_name(method).lower().replace("+", "-")


def is_registry_method(method: str) -> bool:
    """True for the names of :data:`markovsim.methods.METHODS` (False for the ``markovsim`` objectives)."""
    return check_method_name(method) in METHODS


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method_options(options: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["KGA.retain_weight=2", "SeUL.fraction=0.5"]`` -> ``{"KGA": {"retain_weight": 2}, "SeUL": {"fraction": 0.5}}``.

    Each option is ``Name.field=value`` with Name a registry method and field one of its config's
    fields (checked by building the config). Fields holding a ``FineTuneConfig`` or an ``Objective``
    are refused: on TOFU the auxiliary fine-tunes use the protocol's fine-tuning settings, and AdvGA /
    AdvNPO are defined by their objective.
    """
    if isinstance(options, str):
        raise ValueError(f"method_options must be a list of 'Name.field=value' strings, got the string {options!r}")
    parsed: dict[str, dict[str, Any]] = {}
    for option in options:
        name, dot, rest = str(option).partition(".")
        field, equals, value = rest.partition("=")
        if not (dot and equals and field):
            raise ValueError(f"method option {option!r} must read 'Name.field=value', e.g. 'TaskNegation.scale=0.5'")
        if name not in METHODS:
            raise ValueError(f"method option {option!r}: {name!r} is not a registry method; options exist for "
                             f"{', '.join(METHODS)}")
        default = getattr(METHODS[name].config, field, None)
        if isinstance(default, (FineTuneConfig, Objective)):
            raise ValueError(f"method option {option!r}: {name}.{field} cannot be set on TOFU (auxiliary fine-tunes "
                             f"use --finetune-lr / --finetune-epochs / --finetune-steps)")
        parsed.setdefault(name, {})[field] = _json_or_text(value)
    for name, fields in parsed.items():
        try:
            method_config(name, parsed)  # unknown fields and bad values raise here, naming the field
        except (ValueError, TypeError) as error:
            given = ", ".join(f"{name}.{k}={v!r}" for k, v in fields.items())
            raise ValueError(f"method options {given}: {error}") from None
    return parsed


def method_config(method: str, options: Mapping[str, Mapping[str, Any]] | None = None):
    """The hyperparameters of registry method ``method``: the registry defaults with ``options[method]`` applied."""
    if not is_registry_method(method):
        raise ValueError(f"{method!r} is a markovsim objective, not a registry method ({', '.join(METHODS)})")
    return get_config(method, **dict((options or {}).get(method, {})))


def auxiliary_models(method: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[str, ...]:
    """The auxiliary models (names of :data:`AUXILIARY`) that ``method`` needs before unlearning."""
    if method in ("WHP", "TaskNegation"):
        return ("aux-target-on-forget",)
    if method == "KGA":
        start = "base" if method_config(method, options).auxiliary_from == "scratch" else "target"
        return (f"aux-{start}-on-forget", f"aux-{start}-on-unseen")
    return ()


def mismatch_items(forget: Sequence[TofuItem], normal: Sequence[TofuItem], responses_per_prompt: int,
                   seed: int) -> tuple[list[TofuItem], np.ndarray, np.ndarray]:
    """GA+Mismatch's mismatch pairs on TOFU: each forget question with answers of random normal (retain) pairs.

    The pairing is :func:`markovsim.methods.mismatch.mismatch_pairs` (forget question i appears
    ``responses_per_prompt`` times, rows i*m .. i*m + m - 1, each with a normal pair drawn uniformly with
    replacement by ``numpy.random.default_rng(seed)``). The normal pairs are retain authors' pairs, so a
    forget question is never paired with its own answer.

    Returns:
        (items, forget_index, normal_index): the (n_f * m) mismatch pairs and which forget / normal pair
        each came from.
    """
    if not forget or not normal:
        raise ValueError(f"GA+Mismatch needs forget and normal (retain) pairs, got {len(forget)} and {len(normal)}")
    forget_index, normal_index = mismatch_pairs(len(forget), len(normal), responses_per_prompt,
                                                np.random.default_rng(seed))
    items = [TofuItem(forget[i].question, normal[j].answer) for i, j in zip(forget_index, normal_index)]
    return items, forget_index, normal_index
