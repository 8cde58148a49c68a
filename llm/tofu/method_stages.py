"""The protocol stages of the registry methods (:data:`markovsim.methods.METHODS`): auxiliary fine-tunes and unlearning.

    aux-<start>-on-<data>   :func:`auxiliary_stage`: ``start`` (the base model or models/target) fine-tuned
                            with :func:`llm.tofu.finetune.finetune` on ``data`` (the forget split, or the
                            holdout pairs as KGA's unseen set), the protocol's fine-tuning settings and
                            LoRA setting; resumes inside with ``checkpoint_every`` like target / retain
    unlearn-tasknegation    :func:`task_negation_stage`: theta = target - lambda (theta_ft - target) with
                            theta_ft = models/aux-target-on-forget (:mod:`markovsim.methods.task_negation`)
    unlearn-<other>         :func:`registry_unlearn_stage`: the method's loss trained from the target with
                            :func:`llm.tofu.finetune.unlearn_method` (the accelerate loop of every method)

:mod:`llm.tofu.methods` lists what each method needs on TOFU and why.
"""

from __future__ import annotations

import dataclasses

import torch

from markovsim.methods.task_negation import negate_task, task_vector

from .data import load_split
from .finetune import save_trained
from .methods import AUXILIARY, config_record, method_config, method_slug

__all__ = ["auxiliary_items", "auxiliary_stage", "negated_state_dict", "task_negation_stage",
           "registry_unlearn_stage"]


def auxiliary_items(protocol, data: str):
    """The pairs an auxiliary model is fine-tuned on: the forget split, or the unseen (holdout) pairs."""
    if data == "forget":
        return load_split(protocol.config.split)
    if data == "unseen":
        return protocol.holdout_items()
    raise ValueError(f"unknown auxiliary data {data!r}; choose 'forget' or 'unseen'")


def auxiliary_stage(protocol, name: str) -> dict:
    """Fine-tune auxiliary model ``name`` (a key of :data:`llm.tofu.methods.AUXILIARY`) and save it."""
    from .finetune import finetune

    aux, c = AUXILIARY[name], protocol.config
    items = auxiliary_items(protocol, aux.data)
    model, tokenizer = protocol._load(None if aux.start == "base" else "target")
    trained = protocol._train_model(model)
    outcome = finetune(trained, tokenizer, items, c.train_config("finetune", len(items)), protocol._work_dir(name),
                       description=f"finetune {name}")
    protocol._save(trained, tokenizer, name, outcome)
    return {"model": name, "start": aux.start, "data": aux.data, "num_items": len(items), "steps": outcome.steps,
            "last_loss": outcome.last_loss}


def negated_state_dict(base: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                       scale: float) -> dict[str, torch.Tensor]:
    """theta - lambda (theta_ft - theta) for every floating tensor (in float64, cast back); others kept.

    ``markovsim.methods.task_negation.task_vector`` / ``negate_task`` do the arithmetic; the float64 pass
    makes lambda = 0 return ``base`` bit for bit and keeps a small tau exact for bf16 / float32 weights.
    """
    floats = [k for k, v in base.items() if torch.is_floating_point(v)]
    wide = {k: base[k].double() for k in floats}
    negated = negate_task(wide, task_vector(wide, {k: fine_tuned[k].double() for k in floats}), scale)
    return {k: negated[k].to(base[k].dtype) if k in negated else base[k] for k in base}


def task_negation_stage(protocol, method: str = "TaskNegation") -> dict:
    """TaskNegation: the target minus ``scale`` times its task vector on the forget set; saved as the method's model."""
    c, config = protocol.config, method_config(method, protocol.config.options)
    target, tokenizer = protocol._load("target")
    fine_tuned, _ = protocol._load("aux-target-on-forget")
    base, tuned = target.state_dict(), fine_tuned.state_dict()
    changed = sum(int(not torch.equal(base[k], tuned[k])) for k in base)
    target.load_state_dict(negated_state_dict(base, tuned, config.scale))
    save_trained(target, tokenizer, protocol.model_path(method_slug(method)), None, device=c.device)
    return {"model": method_slug(method), "method": method, "method_config": dataclasses.asdict(config),
            "fine_tuned": "aux-target-on-forget", "task_vector": "merged LoRA delta" if c.lora else "full fine-tune",
            "tensors_changed_by_fine_tuning": changed, "steps": 0, "last_loss": None, "diverged_at": None,
            "reason": None}


def registry_unlearn_stage(protocol, method: str) -> dict:
    """Unlearn with registry method ``method`` (TaskNegation: :func:`task_negation_stage`); returns the record."""
    if method == "TaskNegation":
        return task_negation_stage(protocol, method)
    raise NotImplementedError(f"{method} on TOFU needs the transformer layer (llm.methods); not wired yet "
                              f"({config_record(method, protocol.config.options)})")
