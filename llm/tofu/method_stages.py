"""The protocol stages of the registry methods (:data:`markovsim.methods.METHODS`): auxiliary fine-tunes and unlearning.

    aux-<start>-on-<data>   :func:`auxiliary_stage`: ``start`` (the base model or models/target) fine-tuned
                            with :func:`llm.tofu.finetune.finetune` on ``data`` (the forget split, or the
                            holdout pairs as KGA's unseen set), the protocol's fine-tuning settings and
                            LoRA setting; resumes inside with ``checkpoint_every`` like target / retain
    unlearn-tasknegation    :func:`task_negation_stage`: theta = target - lambda (theta_ft - target) with
                            theta_ft = models/aux-target-on-forget (:func:`llm.methods.apply_task_negation`;
                            under ``--lora`` tau is the merged delta of the adapters kept in
                            models/aux-target-on-forget-lora/)
    unlearn-<other>         :func:`registry_unlearn_stage`: the method's loss trained from the target with
                            :func:`llm.tofu.finetune.unlearn_method` (the accelerate loop of every method)

:mod:`llm.tofu.methods` lists what each method needs on TOFU and why.
"""

from __future__ import annotations

import dataclasses

from .data import load_split
from .finetune import is_main_process, save_trained
from .methods import AUXILIARY, auxiliary_models, method_config, method_slug, mismatch_items

__all__ = ["auxiliary_items", "auxiliary_stage", "task_negation_stage", "registry_unlearn_stage"]


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
    if c.lora and is_main_process():  # the adapters themselves, before they are merged: TaskNegation's exact tau
        from llm.models import save_model

        save_model(trained, _lora_adapter_path(protocol, name), progress=False)
    protocol._save(trained, tokenizer, name, outcome)
    return {"model": name, "start": aux.start, "data": aux.data, "num_items": len(items), "steps": outcome.steps,
            "last_loss": outcome.last_loss}


def _lora_adapter_path(protocol, name: str):
    """Where an auxiliary stage trained under ``--lora`` keeps its (unmerged) adapters: models/<name>-lora/."""
    return protocol.out / "models" / f"{name}-lora"


def task_negation_stage(protocol, method: str = "TaskNegation") -> dict:
    """TaskNegation: the target minus ``scale`` times its task vector on the forget set; saved as the method's model.

    theta_ft is models/aux-target-on-forget (:func:`llm.methods.apply_task_negation` does the edit): with
    ``--lora`` its saved adapters, so tau is exactly the merged LoRA delta (alpha / r) B A of each adapted
    weight; otherwise the full difference of the weights.
    """
    from llm.methods import apply_task_negation

    c, config = protocol.config, method_config(method, protocol.config.options)
    target, tokenizer = protocol._load("target")
    if c.lora:  # the adapters over a second copy of the target (the first one is edited)
        from peft import PeftModel

        fine_tuned = PeftModel.from_pretrained(protocol._load("target")[0],
                                               _lora_adapter_path(protocol, "aux-target-on-forget"))
    else:
        fine_tuned, _ = protocol._load("aux-target-on-forget")
    apply_task_negation(target, fine_tuned, config.scale)
    save_trained(target, tokenizer, protocol.model_path(method_slug(method)), None, device=c.device)
    return {"model": method_slug(method), "method": method, "method_config": dataclasses.asdict(config),
            "auxiliary": ["aux-target-on-forget"],
            "task_vector": "merged LoRA deltas (alpha / r) B A" if c.lora else "full fine-tuning difference",
            "steps": 0, "last_loss": None, "diverged_at": None, "reason": None}


def _state(protocol, method: str, model, tokenizer):
    """:func:`llm.methods.prepare_method` of ``method`` at the target ``model``, its auxiliary models the finished
    ``aux-*`` stages' (passed as ``trained``: TOFU fine-tunes them with the protocol's settings, from the
    pretrained base for KGA's "scratch"; :mod:`llm.tofu.methods`)."""
    from llm.methods.state import AUXILIARY_ROLES, prepare_method

    from .finetune import Examples

    c = protocol.config
    device = next(model.parameters()).device
    names = auxiliary_models(method, c.options)  # in the order of the method's roles (forget data first)
    trained = {role: protocol._load(name)[0].to(device) for role, name in zip(AUXILIARY_ROLES.get(method, ()), names)}

    def batches(data):
        examples = Examples.build(tokenizer, auxiliary_items(protocol, data))
        for first in range(0, len(examples), c.eval_batch_size):
            yield examples.batch(range(first, min(first + c.eval_batch_size, len(examples))), device)

    return prepare_method(method, model, forget="forget", retain="retain", config=method_config(method, c.options),
                          unseen="unseen", batches=batches, seed=c.seed, trained=trained)


def registry_unlearn_stage(protocol, method: str) -> dict:
    """Unlearn with registry method ``method`` from the target and save it; returns the stage record.

    TaskNegation: :func:`task_negation_stage`. The others: :func:`llm.tofu.finetune.unlearn_method` with
    the unlearning settings (LoRA adapters under ``--lora``), retain pairs for GA+Mismatch's KL on normal
    data and KGA's L_r, GA+Mismatch's mismatch pairs (:func:`llm.tofu.methods.mismatch_items`).
    """
    if method == "TaskNegation":
        return task_negation_stage(protocol, method)
    from .finetune import unlearn_method

    c, slug = protocol.config, method_slug(method)
    config = method_config(method, c.options)
    forget, retain = load_split(c.split), protocol.retain_items()
    model, tokenizer = protocol._load("target")
    model = protocol._to_device(model)
    state = _state(protocol, method, model, tokenizer)
    mismatch = (mismatch_items(forget, retain, config.responses_per_prompt, config.seed)[0]
                if method == "GA+Mismatch" else None)
    trained = protocol._train_model(model)
    outcome = unlearn_method(trained, tokenizer, state, forget, retain, c.train_config("unlearn", len(forget)),
                             protocol._work_dir(slug), description=f"unlearn {method}", mismatch=mismatch)
    protocol._save(trained, tokenizer, slug, outcome)
    record = {"model": slug, "method": method, "method_config": dataclasses.asdict(config),
              "auxiliary": list(auxiliary_models(method, c.options)), "steps": outcome.steps,
              "last_loss": outcome.last_loss, "diverged_at": outcome.diverged_at, "reason": outcome.reason}
    if mismatch is not None:
        record["num_mismatch_pairs"] = len(mismatch)
    if state.unseen_gap is not None:
        record["unseen_gap"] = state.unseen_gap
    return record
