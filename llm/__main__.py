"""Command line: ``python -m llm pretrain|retrain|unlearn|evaluate --run-dir DIR [--config JSON] [flags]``.

Data come from a ``markovsim`` scenario (``--scenario``, ``--scale``, ``--data-seed``): ``pretrain``
trains on the components in pre-training, ``retrain`` on the retain components only, ``unlearn``
forgets the forget components' training split, ``evaluate`` measures a model on the test split.
Everything of a run goes into its run directory::

    DIR/config.json      the resolved configuration (written first)
    DIR/metrics.jsonl    training and evaluation records
    DIR/checkpoints/     resumable checkpoints (--checkpoint-every; --resume continues)
    DIR/model/           the final model (save_pretrained; load with llm.models.load_model)
    DIR/trajectory.*     unlearning: the markovsim Trajectory (json + npz)
    DIR/results.json     summary with config, package version, git commit, device (written last)

A JSON config has the sections ``data``, ``model``, ``train`` (``llm.train.TrainConfig`` fields),
``objective`` (``{"name": "NPO", "beta": 0.2, ...}``) and ``retrained``; flags override it. Example::

    python -m llm pretrain --run-dir runs/pre --preset paper-synthetic --scale 0.1 --epochs 5
    python -m llm retrain  --run-dir runs/re  --preset paper-synthetic --scale 0.1 --epochs 5
    python -m llm unlearn  --run-dir runs/npo --model runs/pre/model --retrained runs/re/model --objective NPO
    torchrun --nproc_per_node 2 -m llm unlearn --device cpu ...      (data parallel, gloo on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

from markovsim.losses import OBJECTIVES, Objective

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "load_run_config", "main"]

COMMANDS = ("pretrain", "retrain", "unlearn", "evaluate")
_OBJECTIVE_FIELDS = ("beta", "gamma", "alpha", "forget_weight", "retain_weight")


@dataclass(frozen=True)
class DataConfig:
    """Which Markov data: a scenario name (or JSON spec path), a scale, and an optional seed override."""

    scenario: str = "paper_short_forget2"
    scale: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A preset (with its initialisation seed) for new models, or a local path for existing ones."""

    preset: str = "paper-synthetic"
    seed: int = 0
    path: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything a command needs; serialised to ``config.json`` in the run directory."""

    command: str
    run_dir: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: dict = field(default_factory=dict)
    objective: dict = field(default_factory=lambda: {"name": "NPO"})
    retrained: str | None = None
    resume: bool = False


def _section(document: dict, name: str, cls):
    values = document.get(name) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} must be an object")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"config section {name!r} has unknown keys {unknown}; valid keys: {sorted(valid)}")
    return cls(**values)


def load_run_config(path: str | None) -> dict:
    """The JSON config at ``path`` as a dict of sections ({} without a path)."""
    if path is None:
        return {}
    try:
        with open(path) as file:
            document = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read config {path!r}: {error}") from error
    valid = {"data", "model", "train", "objective", "retrained"}
    if not isinstance(document, dict) or set(document) - valid:
        raise ValueError(f"config {path!r} must be an object with sections {sorted(valid)}")
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--run-dir", required=True, help="the run directory (created)")
    parser.add_argument("--config", help="JSON config (sections data, model, train, objective, retrained)")
    data = parser.add_argument_group("data")
    data.add_argument("--scenario", help="markovsim scenario name or JSON spec path")
    data.add_argument("--scale", type=float, help="fraction of the scenario's sequence counts")
    data.add_argument("--data-seed", type=int, help="override the scenario's sampling seed")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", help="model preset for pretrain/retrain (llm.models.PRESETS)")
    model.add_argument("--model-seed", type=int, help="initialisation seed")
    model.add_argument("--model", help="local model directory (unlearn/evaluate; pretrain/retrain continue from it)")
    model.add_argument("--retrained", help="retrained model directory, for the kl_retrained metric")
    train = parser.add_argument_group("training (llm.train.TrainConfig)")
    for flag, kind in (("--optimizer", str), ("--adam-eps", float), ("--learning-rate", float), ("--batch-size", int), ("--retain-batch-size", int),
                       ("--epochs", float), ("--steps", int), ("--weight-decay", float), ("--schedule", str),
                       ("--warmup-steps", int), ("--max-grad-norm", float), ("--eval-every", int),
                       ("--eval-batch-size", int), ("--checkpoint-every", int), ("--seed", int), ("--device", str),
                       ("--mixed-precision", str), ("--num-threads", int)):
        train.add_argument(flag, type=kind)
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    objective = parser.add_argument_group("unlearning objective")
    objective.add_argument("--objective", help=f"one of {list(OBJECTIVES)} (scenario defaults for beta/gamma)")
    for name in _OBJECTIVE_FIELDS:
        objective.add_argument("--" + name.replace("_", "-"), type=float)
    return parser


def resolve(arguments: argparse.Namespace) -> RunConfig:
    """Merge the JSON config and the flags (flags win) into a :class:`RunConfig`."""
    document = load_run_config(arguments.config)
    data = _section(document, "data", DataConfig)
    data = dataclasses.replace(data, **{k: v for k, v in (("scenario", arguments.scenario), ("scale", arguments.scale),
                                                          ("seed", arguments.data_seed)) if v is not None})
    model = _section(document, "model", ModelConfig)
    model = dataclasses.replace(model, **{k: v for k, v in (("preset", arguments.preset), ("seed", arguments.model_seed),
                                                            ("path", arguments.model)) if v is not None})
    train = dict(document.get("train") or {})
    for name in ("optimizer", "adam_eps", "learning_rate", "batch_size", "retain_batch_size", "epochs", "steps", "weight_decay", "schedule",
                 "warmup_steps", "max_grad_norm", "eval_every", "eval_batch_size", "checkpoint_every", "seed",
                 "device", "mixed_precision", "num_threads"):
        if getattr(arguments, name) is not None:
            train[name] = getattr(arguments, name)
    if arguments.no_progress:
        train["progress"] = False
    objective = dict(document.get("objective") or {"name": "NPO"})
    if arguments.objective is not None:
        objective["name"] = arguments.objective
    objective |= {k: getattr(arguments, k) for k in _OBJECTIVE_FIELDS if getattr(arguments, k) is not None}
    retrained = arguments.retrained if arguments.retrained is not None else document.get("retrained")
    return RunConfig(arguments.command, arguments.run_dir, data, model, train, objective, retrained, arguments.resume)


def _train_config(config: RunConfig, defaults):
    from llm.train import TrainConfig

    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config.train) - valid)
    if unknown:
        raise ValueError(f"train settings {unknown} are not TrainConfig fields; valid: {sorted(valid)}")
    return dataclasses.replace(defaults, **config.train)


def _scenario(config: RunConfig):
    from markovsim.data import MixtureSpec
    from markovsim.scenarios import load_scenario

    scenario = load_scenario(config.data.scenario)
    if config.data.scale != 1.0:
        scenario = scenario.scaled(config.data.scale)
    if config.data.seed is not None:
        scenario = dataclasses.replace(scenario, spec=MixtureSpec(scenario.spec.components, config.data.seed))
    return scenario


def _objective(config: RunConfig, scenario) -> Objective:
    settings = dict(config.objective)
    name = settings.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {list(OBJECTIVES)}")
    unknown = sorted(set(settings) - set(_OBJECTIVE_FIELDS))
    if unknown:
        raise ValueError(f"objective settings {unknown} are unknown; valid: {list(_OBJECTIVE_FIELDS)}")
    base = scenario.with_methods([name])[name]
    return dataclasses.replace(base, **settings)


def _data(scenario):
    spec = scenario.spec
    train, test = spec.sample()
    return {"train": train, "test": test,
            "pretraining": train.select(*spec.names_where(in_pretraining=True)),
            "retain": train.select(*spec.names_where(role="retain")),
            "forget": train.select(*spec.names_where(role="forget"))}


def _model(config: RunConfig, num_states: int, max_length: int):
    from llm.models import build_model, load_model

    if config.model.path is not None:
        return load_model(config.model.path)
    if config.command in ("unlearn", "evaluate"):
        raise ValueError(f"{config.command} needs --model (a local model directory, e.g. a pretrain run's model/)")
    return build_model(config.model.preset, num_states + 1, max_length + 1, config.model.seed)


def _evaluator(scenario, data, reference, retrained_path, train_config, device: str):
    from markovsim.models import MixtureOfChains

    from llm.evaluate import Evaluator
    from llm.models import load_model
    from llm.runtime import use_bf16

    spec = scenario.spec
    retain_components = [c for c in spec.components if c.role == "retain"]
    pretraining_components = [c for c in spec.components if c.in_pretraining]
    retrained = load_model(retrained_path).to(device) if retrained_path else None
    exact = {"retrained": MixtureOfChains.from_components(retain_components),
             "reference": MixtureOfChains.from_components(pretraining_components)}
    return Evaluator(data["test"], {c.name: c.chain for c in spec.components}, retrained=retrained, reference=reference,
                     exact_models=exact, batch_size=train_config.eval_batch_size,
                     bf16=use_bf16(train_config.device, train_config.mixed_precision))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(config: RunConfig) -> dict:
    """Execute one command; returns the results document (also written to ``run_dir/results.json``)."""
    from markovsim.results import atomic_write_json, metadata_block

    from llm import train as training
    from llm.runtime import resolve_device

    scenario = _scenario(config)
    data = _data(scenario)
    defaults = training.PAPER_UNLEARNING if config.command == "unlearn" else training.PAPER_PRETRAINING
    train_config = _train_config(config, defaults)
    if not config.resume and os.path.isfile(os.path.join(config.run_dir, "metrics.jsonl")):
        raise ValueError(f"run directory {config.run_dir!r} already holds a run; pass --resume or choose a new one")
    if _is_main_process():
        os.makedirs(config.run_dir, exist_ok=True)
        atomic_write_json(os.path.join(config.run_dir, "config.json"), metadata_block(config))
    model = _model(config, data["train"].num_states, data["train"].max_length)
    summary = _COMMANDS[config.command](config, scenario, data, model, train_config)
    document = metadata_block(config, command=config.command, device=resolve_device(train_config.device),
                              train_config=dataclasses.asdict(train_config), **summary)
    if _is_main_process():
        atomic_write_json(os.path.join(config.run_dir, "results.json"), document)
    return document


def _pretrain(config, scenario, data, model, train_config) -> dict:
    from llm.train import pretrain

    sequences = data["retain"] if config.command == "retrain" else data["pretraining"]
    history = pretrain(model, sequences, train_config, config.run_dir, config.resume)
    return {"steps": int(len(history.steps)), "final_loss": float(history.losses[-1]) if len(history.losses) else None,
            "diverged_at": history.diverged_at, "divergence_reason": history.divergence_reason,
            "wall_seconds": history.wall_seconds, "num_processes": history.num_processes,
            "num_sequences": len(sequences)}


def _final_metrics(trajectory) -> dict:
    return {name: dict(zip(trajectory.component_names, values[-1].tolist()))
            for name, values in trajectory.component_metrics.items()}


def _unlearn(config, scenario, data, model, train_config) -> dict:
    from llm.runtime import resolve_device
    from llm.train import unlearn

    objective = _objective(config, scenario)
    device = resolve_device(train_config.device)
    model.to(device)
    evaluator = _evaluator(scenario, data, model, config.retrained, train_config, device)
    trajectory = unlearn(model, objective, data["forget"], data["retain"], train_config, evaluator,
                         config.run_dir, config.resume)
    return {"objective": dataclasses.asdict(objective), "diverged_at": trajectory.diverged_at,
            "divergence_reason": trajectory.divergence_reason, "final": _final_metrics(trajectory),
            "final_loss": float(trajectory.step_metrics["loss"][-1]), "wall_seconds": trajectory.info["wall_seconds"],
            "num_processes": trajectory.info["num_processes"]}


def _evaluate(config, scenario, data, model, train_config) -> dict:
    from llm.runtime import resolve_device

    device = resolve_device(train_config.device)
    model.to(device)
    evaluator = _evaluator(scenario, data, None, config.retrained, train_config, device)
    metrics = evaluator.evaluate(model)
    return {"metrics": {name: dict(zip(evaluator.component_names, values.tolist())) for name, values in metrics.items()}}


_COMMANDS = {"pretrain": _pretrain, "retrain": _pretrain, "unlearn": _unlearn, "evaluate": _evaluate}


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        document = run(resolve(arguments))
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if _is_main_process():
        summary = {k: document[k] for k in ("command", "device", "wall_seconds", "final_loss", "diverged_at")
                   if k in document}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
