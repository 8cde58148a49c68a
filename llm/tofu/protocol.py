"""The TOFU protocol as resumable stages: fine-tune target and retain models, unlearn, evaluate, report.

    stage             input            does                                               output
    target            base model       fine-tune on full = forgetXX + retainYY pairs      models/target/
    retain            base model       fine-tune on retainYY pairs (the gold standard)    models/retain/
    unlearn-<method>  models/target    unlearn forgetXX (retain batches: retainYY)         models/<method>/
    eval-<model>      models/<model>   every metric of llm.tofu.evaluate                  (its stage record)
    report            every eval       forget quality vs the retain model, utility        results.json, .md

Every stage ends by writing ``stages/<stage>.json`` atomically (after its model folder, itself written
through a temporary folder and one rename): a stage is done exactly when that file exists, so a killed
run, started again with the same command, skips the finished stages and redoes (or, with
``checkpoint_every``, resumes inside) the one it was killed in. ``config.json`` records the settings of
the folder; a rerun with different settings (other than the method list and runtime options) is refused.

``limit`` (the CPU smoke-run scale) keeps the first N retain pairs for training and the first N items
of retain / real_authors / world_facts for evaluation; the forget set is always whole.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llm.config import TrainConfig
from llm.models import save_model
from markovsim.objectives import OBJECTIVES, Objective, get_objective
from markovsim.results import atomic_write_json, read_json

from .data import load_split
from .evaluate import FORGET_SPLITS, evaluate_model, load_eval_sets

__all__ = ["RETAIN_SPLITS", "SIMNPO_SETTINGS", "ProtocolConfig", "method_objective", "method_slug", "Protocol"]

RETAIN_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# The official SimNPO TOFU settings (gamma 0): beta, and the forget weight beside a retain weight of 1.
# forget01 has no official setting; it takes forget05's.
SIMNPO_SETTINGS = {"forget01": (2.5, 0.1375), "forget05": (2.5, 0.1375), "forget10": (4.5, 0.125)}
# Settings that do not change the numbers: a rerun may change them.
_RUNTIME_FIELDS = ("methods", "progress", "device", "num_threads", "checkpoint_every")


def method_objective(method: str, split: str) -> Objective:
    """The ``markovsim`` objective of a method on a split (SimNPO's beta / weights per :data:`SIMNPO_SETTINGS`)."""
    if method not in OBJECTIVES:
        raise ValueError(f"unknown method {method!r}; valid names: {', '.join(OBJECTIVES)}")
    if method.startswith("SimNPO"):
        beta, forget_weight = SIMNPO_SETTINGS[split]
        weights = {"forget_weight": forget_weight, "retain_weight": 1.0} if "+" in method else {}
        return get_objective(method, beta=beta, gamma=0.0, **weights)
    return get_objective(method)


def method_slug(method: str) -> str:
    """A folder name for a method: ``"NPO+RT"`` -> ``"npo-rt"``."""
    return method.lower().replace("+", "-")


def _positive(name: str, value, kind=int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an int'} > 0, got {value!r}")


@dataclass(frozen=True)
class ProtocolConfig:
    """Every setting of one protocol run (recorded in config.json and results.json).

    Fine-tuning defaults follow TOFU's (5 epochs, weight decay 0.01, linear decay after one warm-up
    epoch) at a learning rate of 1e-4, under which SmolLM2-135M memorises the pairs (TOFU's 1e-5 is for
    7B models); unlearning follows the official SimNPO / TOFU recipe (10 epochs, lr 1e-5, batch 32 on a
    GPU; the CPU smoke run uses fewer steps and a smaller batch).
    """

    split: str = "forget10"
    methods: tuple[str, ...] = ("NPO", "SimNPO")
    model: str = "smollm2"
    limit: int | None = None
    batch_size: int = 32
    finetune_epochs: float = 5.0
    finetune_steps: int | None = None
    finetune_lr: float = 1e-4
    unlearn_epochs: float = 10.0
    unlearn_steps: int | None = None
    unlearn_lr: float = 1e-5
    max_new_tokens: int = 200
    eval_batch_size: int = 16
    lora: bool = False
    lora_rank: int = 8
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    checkpoint_every: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in FORGET_SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(FORGET_SPLITS)}")
        if not self.methods or isinstance(self.methods, str):
            raise ValueError("methods must be a non-empty list of method names")
        for method in self.methods:
            method_objective(method, self.split)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat a name: {list(self.methods)}")
        for name in ("batch_size", "max_new_tokens", "eval_batch_size", "lora_rank"):
            _positive(name, getattr(self, name))
        for name in ("limit", "finetune_steps", "unlearn_steps", "num_threads", "checkpoint_every"):
            _positive(name, getattr(self, name), optional=True)
        for name in ("finetune_epochs", "finetune_lr", "unlearn_epochs", "unlearn_lr"):
            _positive(name, getattr(self, name), kind=float)

    @property
    def retain_split(self) -> str:
        return RETAIN_SPLITS[self.split]

    def train_config(self, stage: str, num_items: int) -> TrainConfig:
        """The ``TrainConfig`` of a fine-tuning (``"finetune"``) or unlearning (``"unlearn"``) stage."""
        common = dict(batch_size=min(self.batch_size, num_items), seed=self.seed, device=self.device,
                      num_threads=self.num_threads, checkpoint_every=self.checkpoint_every, progress=self.progress,
                      eval_batch_size=self.eval_batch_size, track_forget_weights=False, track_power_share=False)
        if stage == "finetune":
            per_epoch = max(1, num_items // common["batch_size"])
            return TrainConfig(learning_rate=self.finetune_lr, epochs=self.finetune_epochs, steps=self.finetune_steps,
                               weight_decay=0.01, schedule="linear", warmup_steps=per_epoch if self.finetune_steps
                               is None else 0, divergence_logp_per_token=None, **common)
        return TrainConfig(learning_rate=self.unlearn_lr, epochs=self.unlearn_epochs, steps=self.unlearn_steps,
                           weight_decay=0.01, schedule="linear", **common)

    def state(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class Protocol:
    """The stages of one run in folder ``out`` (see the module docstring)."""

    def __init__(self, config: ProtocolConfig, out: str | os.PathLike):
        self.config, self.out = config, Path(out)
        self._check_folder()
        self.base = None  # (model, tokenizer) of the base model, loaded on first use

    # ----- layout -------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return ["target", "retain"] + [method_slug(m) for m in self.config.methods]

    def stages(self) -> list[str]:
        """Every stage, in order."""
        c = self.config
        return (["target", "retain"] + [f"unlearn-{method_slug(m)}" for m in c.methods]
                + [f"eval-{name}" for name in self.model_names()] + ["report"])

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
            saved = read_json(path)
            changed = sorted(k for k in set(state) | set(saved)
                             if k not in _RUNTIME_FIELDS and saved.get(k) != state.get(k))
            if changed:
                raise ValueError(f"{self.out} holds a run with different settings ({', '.join(changed)}); "
                                 f"use the same settings to resume it or choose a new --out folder")
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
        elif stage.startswith("unlearn-"):
            record = self._unlearn(stage.removeprefix("unlearn-"))
        elif stage.startswith("eval-"):
            record = self._evaluate(stage.removeprefix("eval-"))
        else:
            from .report import write_report

            record = write_report(self)
        record = {"stage": stage, "wall_seconds": time.perf_counter() - started} | record
        atomic_write_json(self.stage_path(stage), record)
        return record

    def _needs(self, stage: str) -> list[str]:
        if stage.startswith("unlearn-"):
            return ["target"]
        if stage.startswith("eval-"):
            name = stage.removeprefix("eval-")
            return [name if name in ("target", "retain") else f"unlearn-{name}"]
        if stage == "report":
            return [f"eval-{name}" for name in self.model_names()]
        return []

    def _load(self, name: str | None):
        """(model, tokenizer): the base model (``name=None``) or a finished stage's model."""
        from .model import load_causal_lm, load_smollm2

        if name is not None:
            return load_causal_lm(self.model_path(name))
        spec = self.config.model
        return load_smollm2(progress=self.config.progress) if spec == "smollm2" else load_causal_lm(spec)

    def _train_model(self, model):
        if not self.config.lora:
            return model
        from llm.lora import LoraSettings, add_lora

        return add_lora(model, LoraSettings(rank=self.config.lora_rank, alpha=2.0 * self.config.lora_rank,
                                            seed=self.config.seed))

    def _save(self, model, tokenizer, name: str) -> None:
        if self.config.lora:
            model = model.merge_and_unload()  # a plain model: the adapters folded into the weights
        save_model(model, self.model_path(name), progress=False, tokenizer=tokenizer)

    def _work_dir(self, name: str) -> Path:
        path = self.out / "work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _finetune(self, name: str) -> dict:
        from .finetune import finetune

        c = self.config
        retain = load_split(c.retain_split)[:c.limit]
        items = (load_split(c.split) + retain) if name == "target" else retain
        model, tokenizer = self._load(None)
        trained = self._train_model(model)
        config = c.train_config("finetune", len(items))
        outcome = finetune(trained, tokenizer, items, config, self._work_dir(name), description=f"finetune {name}")
        self._save(trained, tokenizer, name)
        return {"model": name, "num_items": len(items), "steps": outcome.steps, "last_loss": outcome.last_loss}

    def _unlearn(self, slug: str) -> dict:
        from .finetune import unlearn

        c = self.config
        method = next(m for m in c.methods if method_slug(m) == slug)
        objective = method_objective(method, c.split)
        forget, retain = load_split(c.split), load_split(c.retain_split)[:c.limit]
        model, tokenizer = self._load("target")
        config = c.train_config("unlearn", len(forget))
        trained = self._train_model(model)
        outcome = unlearn(trained, tokenizer, objective, forget, retain, config, self._work_dir(slug),
                          description=f"unlearn {method}")
        self._save(trained, tokenizer, slug)
        return {"model": slug, "method": method, "objective": dataclasses.asdict(objective), "steps": outcome.steps,
                "last_loss": outcome.last_loss, "diverged_at": outcome.diverged_at, "reason": outcome.reason}

    def _evaluate(self, name: str) -> dict:
        c = self.config
        model, tokenizer = self._load(name)
        sets = load_eval_sets(c.split, c.limit)
        result = evaluate_model(model, tokenizer, sets=sets, max_new_tokens=c.max_new_tokens,
                                batch_size=c.eval_batch_size, progress=c.progress)
        return {"model": name, "result": result}

    def clean_work(self) -> None:
        """Remove the training work folders (logs, checkpoints) of finished stages."""
        for name in self.model_names():
            stage = name if name in ("target", "retain") else f"unlearn-{name}"
            if self.done(stage):
                shutil.rmtree(self.out / "work" / name, ignore_errors=True)
