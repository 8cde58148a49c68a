"""The TOFU protocol as resumable stages: fine-tune target and retain models, unlearn, evaluate, relearn, report.

    stage             input            does                                               output
    target            base model       fine-tune on forgetXX + retainYY pairs (no holdout) models/target/
    retain            base model       fine-tune on retainYY pairs (no holdout)            models/retain/
    aux-<s>-on-<d>    base or target   an auxiliary fine-tune of a registry method (WHP,   models/aux-<s>-on-<d>/
                                       TaskNegation, KGA): start s on data d (forget, or
                                       unseen = the holdout pairs); llm.tofu.methods
    unlearn-<method>  models/target    unlearn forgetXX (retain batches: retainYY), or     models/<method>/
                      (+ its aux-*)    TaskNegation's closed-form edit
    eval-<model>      models/<model>   every metric of llm.tofu.evaluate, and the          (its stage record)
                                       membership scores of forget and holdout pairs
    relearn-<model>   models/<model>   the relearning attack (llm.tofu.relearn) on each    (its stage record)
                                       unlearned model, and as controls on the target and
                                       the retain model (learning the forget pairs fresh)
    report            every eval and   forget quality vs the retain model, utility, MIA    results.json, .md
                      relearn stage    AUCs and PrivLeak, relearning curves

Holdout authors: membership inference needs pairs neither model saw (TOFU's own holdout splits are
not in our data). As many whole authors as the forget split has (2 / 10 / 20), starting at author
``holdout_first_author`` (default 90, the middle of retain90, never in a forget split nor in the
retain evaluation set, which holds authors 0-22), are removed from both fine-tuning sets, from the
unlearning retain batches and from the retain evaluation set; their 20 pairs each are the
non-members of the MIA (``full`` items 20a .. 20a + 19 of author a). KGA's unseen set D_n is the same
pairs (only its auxiliary A_n trains on them; :mod:`llm.tofu.methods` says why that keeps them valid
non-members of the unlearned model).

Methods: the ``markovsim`` objectives (GA ... SimNPO+KL) train through :func:`llm.tofu.finetune.unlearn`;
the registry methods of :data:`markovsim.methods.METHODS` (GA+Mismatch, WHP, TaskNegation, KGA, SeUL,
AdvGA, AdvNPO; hyperparameters from the registry, changed with ``method_options``) through
:mod:`llm.tofu.method_stages`, their auxiliary models as the ``aux-*`` stages above. Every eval stage
also scores SeUL's S-MA on the forget set (:mod:`llm.tofu.sensitive`; the sensitive tokens are chosen
once at the target model and kept in ``sensitive_tokens.json``).

Every stage ends by writing ``stages/<stage>.json`` atomically (after its model folder, itself written
through a temporary folder and one rename): a stage is done exactly when that file exists, so a killed
run, started again with the same command, skips the finished stages and redoes (or, with
``checkpoint_every``, resumes inside; relearning resumes at its next step count) the one it was killed
in. ``config.json`` records the settings of the folder; a rerun with different settings (other than
the method list and runtime options) is refused: adding a method to a finished run adds its stages
(and its auxiliary stages, when no earlier method needed them) and reuses everything else.

``limit`` (the CPU smoke-run scale) keeps the first N retain pairs (after removing the holdout
authors) for training and the first N items of retain / real_authors / world_facts for evaluation;
the forget set and the holdout set are always whole.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from llm.config import TrainConfig
from markovsim.results import atomic_write_json, read_json
from markovsim.runtime import torch_threads

from .data import ITEMS_PER_AUTHOR, TofuItem, author_items, load_split
from .evaluate import evaluate_model, load_eval_sets, membership_scores
from .finetune import is_main_process, save_trained, wait_for_everyone
from .methods import (
    AUXILIARY,
    auxiliary_models,
    is_registry_method,
    method_config,
    method_slug,
)
from .protocol_config import RETAIN_SPLITS, RUNTIME_FIELDS, SIMNPO_SETTINGS, ProtocolConfig, method_objective
from .relearn import point_from_result, relearn_config, relearning_curve, split_forget, subset_result
from .sensitive import sensitive_memorisation, sensitive_positions

__all__ = ["RETAIN_SPLITS", "SIMNPO_SETTINGS", "ProtocolConfig", "method_objective", "method_slug", "Protocol"]

class Protocol:
    """The stages of one run in folder ``out`` (see the module docstring)."""

    def __init__(self, config: ProtocolConfig, out: str | os.PathLike):
        self.config, self.out = config, Path(out)
        self._check_folder()
        self.base = None  # (model, tokenizer) of the base model, loaded on first use

    # ----- layout -------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """The evaluated models: target, retain, then one per method."""
        return ["target", "retain"] + [method_slug(m) for m in self.config.methods]

    def auxiliary_names(self) -> list[str]:
        """The auxiliary models the methods need (:data:`llm.tofu.methods.AUXILIARY`), each once, first need first."""
        names = []
        for method in self.config.methods:
            names += [a for a in auxiliary_models(method, self.config.options) if a not in names]
        return names

    def stages(self) -> list[str]:
        """Every stage, in order."""
        c = self.config
        relearn = [f"relearn-{name}" for name in self.model_names()] if c.relearn_steps else []
        return (["target", "retain"] + self.auxiliary_names() + [f"unlearn-{method_slug(m)}" for m in c.methods]
                + [f"eval-{name}" for name in self.model_names()] + relearn + ["report"])

    def method(self, slug: str) -> str:
        """The method name of a slug of this run (``"ga-mismatch"`` -> ``"GA+Mismatch"``)."""
        return next(m for m in self.config.methods if method_slug(m) == slug)

    def stage_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def model_path(self, name: str) -> Path:
        return self.out / "models" / name

    def done(self, stage: str) -> bool:
        return self.stage_path(stage).is_file()

    def record(self, stage: str) -> dict:
        return read_json(self.stage_path(stage))

    def _check_folder(self) -> None:
        path = self.out / "config.json"
        state = self.config.state()
        if path.is_file():
            saved = {**ProtocolConfig().state(), **read_json(path)}  # a setting newer than the folder: its default
            changed = sorted(k for k in set(state) | set(saved)
                             if k not in RUNTIME_FIELDS and saved.get(k) != state.get(k))
            if changed:
                raise ValueError(f"{self.out} holds a run with different settings ({', '.join(changed)}); "
                                 f"use the same settings to resume it or choose a new --out folder")
        if is_main_process():
            atomic_write_json(path, state)

    # ----- running ------------------------------------------------------------------------------------------
    def run(self, stages: list[str] | None = None) -> list[str]:
        """Run the given stages (default: all) that are not done yet, in order; returns those run."""
        wanted = self.stages() if stages is None else stages
        unknown = [s for s in wanted if s not in self.stages()]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages of this run: {', '.join(self.stages())}")
        ran = []
        for stage in [s for s in self.stages() if s in wanted]:
            if not self.done(stage):
                self.run_stage(stage)
                ran.append(stage)
        return ran

    def run_stage(self, stage: str) -> dict:
        """Run one stage (its inputs must be done) and write its record; returns the record."""
        needs = self._needs(stage)
        missing = [s for s in needs if not self.done(s)]
        if missing:
            raise ValueError(f"stage {stage!r} needs stage(s) {', '.join(missing)} first")
        started = time.perf_counter()
        if stage in ("target", "retain"):
            record = self._finetune(stage)
        elif stage.startswith("aux-"):
            from .method_stages import auxiliary_stage

            record = auxiliary_stage(self, stage)
        elif stage.startswith("unlearn-"):
            record = self._unlearn(stage.removeprefix("unlearn-"))
        elif stage.startswith(("eval-", "relearn-")):
            with torch_threads(self.config.num_threads):  # training sets its own; evaluation needs it here
                record = (self._evaluate(stage.removeprefix("eval-")) if stage.startswith("eval-")
                          else self._relearn(stage.removeprefix("relearn-")))
        else:
            from .report import write_report

            record = write_report(self) if is_main_process() else {}
        record = {"stage": stage, "wall_seconds": time.perf_counter() - started} | record
        if is_main_process():
            atomic_write_json(self.stage_path(stage), record)
        wait_for_everyone(self.config.device)  # every process sees the record before it decides on the next stage
        return record

    def _needs(self, stage: str) -> list[str]:
        if stage.startswith("aux-"):
            return ["target"] if AUXILIARY[stage].start == "target" else []
        if stage.startswith("unlearn-"):
            return ["target"] + list(auxiliary_models(self.method(stage.removeprefix("unlearn-")), self.config.options))
        if stage.startswith("eval-"):  # the target too: its sensitive tokens (S-MA)
            name = stage.removeprefix("eval-")
            return ["target"] + ([] if name == "target" else [name if name == "retain" else f"unlearn-{name}"])
        if stage.startswith("relearn-"):
            name = stage.removeprefix("relearn-")
            model = name if name in ("target", "retain") else f"unlearn-{name}"
            return list(dict.fromkeys([model, "eval-retain", f"eval-{name}"]))  # step 0 is the model's eval
        if stage == "report":
            return [s for s in self.stages() if s.startswith(("eval-", "relearn-"))]
        return []

    def _load(self, name: str | None):
        """(model, tokenizer): the base model (``name=None``) or a finished stage's model."""
        from .model import load_causal_lm, load_smollm2

        if name is not None:
            return load_causal_lm(self.model_path(name))
        spec = self.config.model
        return load_smollm2(progress=self.config.progress) if spec == "smollm2" else load_causal_lm(spec)

    def _to_device(self, model):
        """``model`` on the run's device for evaluation (this process's GPU in a launch of several)."""
        import torch

        from markovsim.runtime import resolve_device

        device = resolve_device(self.config.device)
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return model.to(torch.device(device))

    def _train_model(self, model):
        if not self.config.lora:
            return model
        from llm.lora import LoraSettings, add_lora

        return add_lora(model, LoraSettings(rank=self.config.lora_rank, alpha=2.0 * self.config.lora_rank,
                                            seed=self.config.seed))

    def _save(self, model, tokenizer, name: str, outcome) -> None:
        """Write a trained model once (process 0; LoRA adapters merged into the weights)."""
        save_trained(model, tokenizer, self.model_path(name), outcome, merge_lora=self.config.lora,
                     device=self.config.device)

    def _work_dir(self, name: str) -> Path:
        path = self.out / "work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ----- data ---------------------------------------------------------------------------------------------
    def holdout_items(self) -> list[TofuItem]:
        """The holdout authors' pairs (membership-inference non-members), from ``full``."""
        return author_items(self.config.holdout_authors)

    def retain_items(self) -> list[TofuItem]:
        """The retain split without the holdout authors' pairs, then the first ``limit`` of them."""
        held = {item.question for item in self.holdout_items()}
        return [item for item in load_split(self.config.retain_split) if item.question not in held][:self.config.limit]

    def holdout_record(self) -> dict:
        """Which pairs are held out (for results.json)."""
        authors = self.config.holdout_authors
        return {"authors": authors, "full_items": [authors[0] * ITEMS_PER_AUTHOR, (authors[-1] + 1) * ITEMS_PER_AUTHOR],
                "num_items": len(authors) * ITEMS_PER_AUTHOR,
                "removed_from": ["target and retain fine-tuning", "unlearning retain batches", "retain evaluation set"]}

    def relearn_rows(self) -> tuple[list[int], list[int]]:
        """(relearning rows, evaluation rows) of the forget set (:func:`llm.tofu.relearn.split_forget`)."""
        return split_forget(len(load_split(self.config.split)), self.config.relearn_items_per_author)

    # ----- stages -------------------------------------------------------------------------------------------
    def _finetune(self, name: str) -> dict:
        from .finetune import finetune

        c = self.config
        retain = self.retain_items()
        items = (load_split(c.split) + retain) if name == "target" else retain
        model, tokenizer = self._load(None)
        trained = self._train_model(model)
        config = c.train_config("finetune", len(items))
        outcome = finetune(trained, tokenizer, items, config, self._work_dir(name), description=f"finetune {name}")
        self._save(trained, tokenizer, name, outcome)
        return {"model": name, "num_items": len(items), "steps": outcome.steps, "last_loss": outcome.last_loss}

    def _unlearn(self, slug: str) -> dict:
        from .finetune import unlearn

        c = self.config
        method = self.method(slug)
        if is_registry_method(method):
            from .method_stages import registry_unlearn_stage

            return registry_unlearn_stage(self, method)
        objective = method_objective(method, c.split)
        forget, retain = load_split(c.split), self.retain_items()
        model, tokenizer = self._load("target")
        config = c.train_config("unlearn", len(forget))
        trained = self._train_model(model)
        outcome = unlearn(trained, tokenizer, objective, forget, retain, config, self._work_dir(slug),
                          description=f"unlearn {method}")
        self._save(trained, tokenizer, slug, outcome)
        return {"model": slug, "method": method, "objective": dataclasses.asdict(objective), "steps": outcome.steps,
                "last_loss": outcome.last_loss, "diverged_at": outcome.diverged_at, "reason": outcome.reason}

    def _evaluate(self, name: str) -> dict:
        c = self.config
        model, tokenizer = self._load(name)
        model = self._to_device(model)
        sets = load_eval_sets(c.split, c.limit, exclude_questions={item.question for item in self.holdout_items()})
        result = evaluate_model(model, tokenizer, sets=sets, max_new_tokens=c.max_new_tokens,
                                batch_size=c.eval_batch_size, progress=c.progress)
        mia = {kind: membership_scores(model, tokenizer, items, c.eval_batch_size)
               for kind, items in (("forget", sets["forget"]), ("holdout", self.holdout_items()))}
        sensitive = sensitive_memorisation(model, tokenizer, sets["forget"], self.sensitive_tokens(sets["forget"]),
                                           c.eval_batch_size)
        return {"model": name, "result": result, "mia": mia, "sensitive": sensitive}

    def sensitive_tokens(self, forget: list[TofuItem]) -> list[list[int]]:
        """SeUL's sensitive tokens of the forget answers, chosen at the target model (``sensitive_tokens.json``).

        Per item the positions among its answer's tokens (:func:`llm.tofu.sensitive.sensitive_positions`
        with SeUL's ``fraction``); computed from models/target once and reused by every eval stage.
        """
        path, fraction = self.out / "sensitive_tokens.json", method_config("SeUL", self.config.options).fraction
        if path.is_file():
            saved = read_json(path)
            if saved["fraction"] == fraction and saved["questions"] == [i.question for i in forget]:
                return saved["positions"]
        model, tokenizer = self._load("target")
        positions = sensitive_positions(self._to_device(model), tokenizer, forget, fraction,
                                        self.config.eval_batch_size)
        if is_main_process():
            atomic_write_json(path, {"fraction": fraction, "chosen_at": "target", "positions": positions,
                                     "questions": [i.question for i in forget]})
        return positions

    def _relearn(self, name: str) -> dict:
        """The relearning attack on model ``name``: an unlearned model's slug, or the target / retain control."""
        c = self.config
        method = None if name in ("target", "retain") else self.method(name)
        train_rows, eval_rows = self.relearn_rows()
        forget_pairs, forget_eval = load_split(c.split), load_split(f"{c.split}_perturbed")
        retain_ratios = self.record("eval-retain")["result"]["sets"]["forget"]["truth_ratios"]
        if [i.question for i in forget_pairs] != [i.question for i in forget_eval]:
            raise ValueError(f"{c.split} and {c.split}_perturbed list different questions: cannot pair their rows")

        def load():
            model, tokenizer = self._load(name)
            return self._train_model(self._to_device(model)), tokenizer  # step 0 is measured without training

        def make_config(steps: int) -> TrainConfig:
            return relearn_config(steps, min(c.relearn_batch_size, len(train_rows)), c.relearn_lr, seed=c.seed,
                                  device=c.device, num_threads=c.num_threads, progress=c.progress,
                                  eval_batch_size=c.eval_batch_size)

        retain_rows = [retain_ratios[r] for r in eval_rows]
        evaluated = self.record(f"eval-{name}")["result"]["sets"]["forget"]  # step 0: the model's own evaluation
        initial = point_from_result(subset_result(evaluated, eval_rows), retain_rows)
        curve = relearning_curve(load, [forget_pairs[r] for r in train_rows], [forget_eval[r] for r in eval_rows],
                                 retain_rows, c.relearn_steps, make_config, self._work_dir(f"relearn-{name}"),
                                 c.max_new_tokens, c.eval_batch_size, c.progress, device=c.device, initial=initial)
        return {"model": name, "method": method, "relearn_items": len(train_rows), "eval_items": len(eval_rows),
                "relearning": curve}

    def clean_work(self) -> None:
        """Remove the training work folders (logs, checkpoints) of finished stages."""
        for name in self.model_names() + self.auxiliary_names():
            stage = name if name in ("target", "retain") or name.startswith("aux-") else f"unlearn-{name}"
            if self.done(stage):
                shutil.rmtree(self.out / "work" / name, ignore_errors=True)
            if self.done(f"relearn-{name}"):
                shutil.rmtree(self.out / "work" / f"relearn-{name}", ignore_errors=True)
