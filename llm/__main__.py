"""Command line: ``python -m llm pretrain|retrain|unlearn|evaluate --out DIR [--config JSON] [flags]``.

Data come from a ``markovsim`` scenario (``--scenario``, ``--scale``, ``--data-seed``): ``pretrain``
trains on the components in pre-training, ``retrain`` on the retain components only, ``unlearn``
forgets the forget components' training split, ``evaluate`` measures a model on the test split.
Everything of a run goes into its output folder (checked before any computing)::

    DIR/config.json      the resolved configuration (written first)
    DIR/metrics.jsonl    training and evaluation records
    DIR/checkpoints/     resumable checkpoints (--checkpoint-every; --resume continues)
    DIR/model/           the final model (save_pretrained; load with llm.models.load_model)
    DIR/trajectory.*     unlearning: the markovsim Trajectory (json + npz)
    DIR/results.json     summary with config, package version, git commit, device (written last;
                         strict JSON: a NaN/inf is null, listed under "non_finite" with the reason)

A command that fails leaves DIR as it found it (absent, or unchanged: :mod:`llm.run_folder`), unless it
saved a checkpoint, which ``--resume`` continues.

A JSON config has the sections ``data``, ``model``, ``train`` (``llm.config.TrainConfig`` fields),
``objective`` (``{"name": "NPO", "beta": 0.2, ...}``), ``method`` (a registry method of
``markovsim.methods`` instead of the objective: ``{"name": "WHP", "alpha": 2.0, "reinforce": {"steps": 10}}``,
also ``"layer"`` for AdvGA/AdvNPO; ``--method NAME`` picks it) and ``retrained``; flags override it. Every
``TrainConfig`` field has a flag (``--learning-rate``, ``--progress/--no-progress``, ``--steps none``
...), generated from the dataclass. Bad input exits with status 2 and one ``error:`` line
(``--debug`` shows the traceback). ``--run-dir`` is a deprecated spelling of ``--out``. Example::

    python -m llm pretrain --out runs/pre --preset paper-synthetic --scale 0.1 --epochs 5
    python -m llm retrain  --out runs/re  --preset paper-synthetic --scale 0.1 --epochs 5
    python -m llm unlearn  --out runs/npo --model runs/pre/model --retrained runs/re/model --objective NPO
    python -m llm unlearn  --out runs/whp --model runs/pre/model --retrained runs/re/model --method WHP
    torchrun --nproc_per_node 2 -m llm unlearn --device cpu ...      (data parallel, gloo on CPU)
    python -m llm unlearn  --out runs/grid --model runs/pre/model --objective NPO --seeds 0 1 2 --betas 0.1 0.2

``unlearn --seeds/--betas`` (or a ``replicas`` config section) runs the grid seeds x betas as batched
replicas, one ``DIR/replica-NNN/`` folder each (:mod:`llm.cli_replicas`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import typing
from dataclasses import dataclass, field

from llm.cli_replicas import ReplicaGrid, check_grid, unlearn_grid
from llm.config import TrainConfig
from llm.flags import add_dataclass_flags, given_values
from llm.run_folder import restored_on_failure
from markovsim.losses import OBJECTIVES, Objective
from markovsim.methods import METHODS

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "UsageError", "build_parser", "check_output_folder",
           "load_run_config", "method_settings", "resolve", "run", "main"]

COMMANDS = {"pretrain": "pre-train a new (or --model) transformer on the pre-training components",
            "retrain": "train the retrained baseline: the retain components only",
            "unlearn": "unlearn the forget components from --model",
            "evaluate": "measure --model on the test split"}
SECTIONS = ("data", "model", "train", "objective", "method", "retrained", "replicas")


def _is_float(hint) -> bool:
    return hint is float


# The objective's numeric settings (beta, gamma, alpha, forget_weight, retain_weight): its float fields.
OBJECTIVE_SETTINGS = tuple(name for name, hint in typing.get_type_hints(Objective).items() if _is_float(hint))


@dataclass(frozen=True)
class DataConfig:
    """Which Markov data: a scenario name (or JSON spec path), a scale, and an optional seed override."""

    scenario: str = field(default="paper_short_forget2", metadata={"help": "markovsim scenario name or JSON spec path"})
    scale: float = field(default=1.0, metadata={"help": "fraction of the scenario's sequence counts"})
    seed: int | None = field(default=None, metadata={"help": "override the scenario's sampling seed"})


@dataclass(frozen=True)
class ModelConfig:
    """A preset (with its initialisation seed) for new models, or a local path for existing ones."""

    preset: str = field(default="paper-synthetic", metadata={"help": "model preset for pretrain/retrain "
                                                                     "(llm.models.PRESETS)"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})
    path: str | None = field(default=None, metadata={"help": "local model directory (unlearn/evaluate; "
                                                             "pretrain/retrain continue from it)"})


@dataclass(frozen=True)
class RunConfig:
    """Everything a command needs; serialised to ``config.json`` in the output folder."""

    command: str
    out: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: dict = field(default_factory=dict)
    objective: dict = field(default_factory=lambda: {"name": "NPO"})
    retrained: str | None = None
    resume: bool = False
    replicas: ReplicaGrid = field(default_factory=ReplicaGrid)
    method: dict | None = None


class UsageError(ValueError):
    """Bad command-line input (reported as one ``error:`` line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def _section(document: dict, name: str, cls):
    values = document.get(name) or {}
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"config section {name!r} has unknown keys {unknown}; valid keys: {sorted(valid)}")
    return cls(**values)


def load_run_config(path: str | None) -> dict:
    """The JSON config at ``path`` as a dict of sections ({} without a path); ValueError naming the bad key."""
    if path is None:
        return {}
    try:
        with open(path) as file:
            document = json.load(file)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--config: cannot read {path!r}: {error}") from error
    if not isinstance(document, dict):
        raise ValueError(f"--config {path!r} must hold a JSON object with sections {list(SECTIONS)}")
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--config {path!r} has unknown sections {unknown}; valid: {list(SECTIONS)}")
    for name in ("data", "model", "train", "objective", "method", "replicas"):
        if document.get(name) is not None and not isinstance(document[name], dict):
            raise ValueError(f"--config {path!r}: section {name!r} must be an object (a mapping of settings), "
                             f"got {type(document[name]).__name__} {document[name]!r}")
    if document.get("retrained") is not None and not isinstance(document["retrained"], str):
        raise ValueError(f"--config {path!r}: 'retrained' must be a model directory path (a string)")
    return document


def _common_flags() -> argparse.ArgumentParser:
    """The flags every command takes (a parent parser)."""
    common = _Parser(add_help=False)
    common.add_argument("--out", help="the output folder (created; must not hold another run unless --resume)")
    common.add_argument("--run-dir", dest="out", help=argparse.SUPPRESS)  # deprecated spelling of --out
    common.add_argument("--config", help=f"JSON config (sections {', '.join(SECTIONS)})")
    common.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_dataclass_flags(common.add_argument_group("data"), DataConfig, "data", {"seed": "--data-seed"})
    model = common.add_argument_group("model")
    add_dataclass_flags(model, ModelConfig, "model", {"seed": "--model-seed", "path": "--model"})
    model.add_argument("--retrained", help="retrained model directory, for the kl_retrained metric")
    add_dataclass_flags(common.add_argument_group("training (llm.config.TrainConfig)"), TrainConfig, "train")
    return common


def build_parser() -> argparse.ArgumentParser:
    """``python -m llm COMMAND [flags]``: one subcommand per entry of ``COMMANDS``."""
    parser = _Parser(prog="python -m llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_flags()
    for name, summary in COMMANDS.items():
        command = commands.add_parser(name, parents=[common], help=summary, description=summary)
        if name == "unlearn":
            objective = command.add_argument_group("unlearning objective (markovsim.losses.Objective)")
            objective.add_argument("--objective", help=f"one of {list(OBJECTIVES)} (scenario defaults for beta/gamma)")
            add_dataclass_flags(objective, Objective, "objective", only=_is_float)
            objective.add_argument("--method", help=f"a registry method instead of the objective: one of "
                                                    f"{list(METHODS)} (llm.methods; settings: the config's "
                                                    f"'method' section)")
            add_dataclass_flags(command.add_argument_group("replicas (llm.cli_replicas)"), ReplicaGrid, "replicas")
    return parser


def resolve(arguments: argparse.Namespace) -> RunConfig:
    """Merge the JSON config and the flags (flags win) into a :class:`RunConfig`."""
    if arguments.out is None:
        raise UsageError("--out DIR is required (the output folder)")
    document = load_run_config(arguments.config)
    data = dataclasses.replace(_section(document, "data", DataConfig), **given_values(arguments, "data"))
    model = dataclasses.replace(_section(document, "model", ModelConfig), **given_values(arguments, "model"))
    train = dict(document.get("train") or {}) | given_values(arguments, "train")
    objective = dict(document.get("objective") or {"name": "NPO"})
    if getattr(arguments, "objective", None) is not None:
        objective["name"] = arguments.objective
    objective |= given_values(arguments, "objective")
    retrained = arguments.retrained if arguments.retrained is not None else document.get("retrained")
    replicas = dataclasses.replace(_section(document, "replicas", ReplicaGrid), **given_values(arguments, "replicas"))
    method = dict(document["method"]) if document.get("method") is not None else None
    if getattr(arguments, "method", None) is not None:
        method = (method or {}) | {"name": arguments.method}
    return RunConfig(arguments.command, arguments.out, data, model, train, objective, retrained, arguments.resume,
                     replicas, method)


def check_output_folder(path: str, resume: bool) -> None:
    """Create the output folder ``path`` if needed; ValueError naming ``--out`` if it cannot hold a new run.

    Checked before any computing: a path that is a file, a folder where files cannot be created,
    or (without ``resume``) a folder that already holds a run.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"--out {path!r} is not a writable folder: {error.strerror or error}") from error
    if not resume and os.path.isfile(os.path.join(path, "metrics.jsonl")):
        raise ValueError(f"--out {path!r} already holds a run; pass --resume or choose a new folder")


def _train_config(config: RunConfig, defaults):
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config.train) - valid)
    if unknown:
        raise ValueError(f"train settings {unknown} are not TrainConfig fields; valid: {sorted(valid)}")
    return dataclasses.replace(defaults, **config.train)


def _scenario(config: RunConfig):
    from markovsim.data import MixtureSpec
    from markovsim.scenarios import check_data_memory, data_memory_subject, load_scenario

    scenario = load_scenario(config.data.scenario)
    if config.data.scale != 1.0:
        scenario = scenario.scaled(config.data.scale)
    if config.data.seed is not None:
        scenario = dataclasses.replace(scenario, spec=MixtureSpec(scenario.spec.components, config.data.seed))
    check_data_memory(scenario.spec, data_memory_subject(config.data.scenario, config.data.scale))  # before sampling
    return scenario


def _objective(config: RunConfig, scenario) -> Objective:
    settings = dict(config.objective)
    name = settings.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {list(OBJECTIVES)}")
    unknown = sorted(set(settings) - set(OBJECTIVE_SETTINGS))
    if unknown:
        raise ValueError(f"objective settings {unknown} are unknown; valid: {list(OBJECTIVE_SETTINGS)}")
    base = scenario.with_methods([name])[name]
    return dataclasses.replace(base, **settings)


def method_settings(settings: dict) -> tuple[str, object, dict]:
    """``(name, config, options)`` of a ``method`` section: the transformer default of the registry method
    (``llm.methods.markov.default_method_config``) with its fields replaced (a FineTuneConfig field or
    AdvGA/AdvNPO's ``objective`` given as an object of its fields); ``options``: ``{"layer": ...}``."""
    from llm.methods.markov import default_method_config
    from markovsim.methods.base import FineTuneConfig

    settings = dict(settings)
    name = settings.pop("name", None)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {list(METHODS)}")
    options = {key: settings.pop(key) for key in ("layer",) if key in settings}
    base = default_method_config(name)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"method settings {unknown} are not {type(base).__name__} fields; valid: {sorted(fields)} "
                         f"and 'layer'")
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(fields[key], (FineTuneConfig, Objective)):
            settings[key] = dataclasses.replace(fields[key], **value)
        elif isinstance(value, list):
            settings[key] = tuple(value)
    return name, dataclasses.replace(base, **settings), options


def _data(scenario):
    spec = scenario.spec
    train, test = spec.sample()
    return {"train": train, "test": test,
            "pretraining": train.select(*spec.names_where(in_pretraining=True)),
            "retain": train.select(*spec.names_where(role="retain")),
            "forget": train.select(*spec.names_where(role="forget"))}


def _model(config: RunConfig, num_states: int, max_length: int, progress: bool):
    from llm.models import build_model, load_model

    if config.model.path is not None:
        return load_model(config.model.path, progress=progress)
    if config.command in ("unlearn", "evaluate"):
        raise ValueError(f"{config.command} needs --model (a local model directory, e.g. a pretrain run's model/)")
    return build_model(config.model.preset, num_states + 1, max_length + 1, config.model.seed)


def _evaluator(scenario, data, reference, retrained_path, train_config, device: str):
    from llm.evaluate import Evaluator
    from llm.models import load_model
    from llm.runtime import use_bf16
    from markovsim.models import MixtureOfChains

    spec = scenario.spec
    retain_components = [c for c in spec.components if c.role == "retain"]
    pretraining_components = [c for c in spec.components if c.in_pretraining]
    retrained = load_model(retrained_path, progress=train_config.progress).to(device) if retrained_path else None
    exact = {"retrained": MixtureOfChains.from_components(retain_components),
             "reference": MixtureOfChains.from_components(pretraining_components)}
    return Evaluator(data["test"], {c.name: c.chain for c in spec.components}, retrained=retrained, reference=reference,
                     exact_models=exact, batch_size=train_config.eval_batch_size,
                     bf16=use_bf16(train_config.device, train_config.mixed_precision))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(config: RunConfig) -> dict:
    """Execute one command; returns the results document (also written to ``out/results.json``)."""
    from llm import train as training
    from llm.results import strict_json
    from llm.runtime import resolve_device
    from markovsim.results import atomic_write_json, metadata_block

    defaults = training.PAPER_UNLEARNING if config.command == "unlearn" else training.PAPER_PRETRAINING
    train_config = _train_config(config, defaults)
    if config.replicas.active:
        check_grid(config, train_config, _objective(config, _scenario(config)))
    with restored_on_failure(config.out, enabled=_is_main_process()):  # a failed run leaves --out as it was
        check_output_folder(config.out, config.resume)
        scenario = _scenario(config)
        data = _data(scenario)
        if _is_main_process():
            atomic_write_json(os.path.join(config.out, "config.json"), metadata_block(config))
        model = _model(config, data["train"].num_states, data["train"].max_length, train_config.progress)
        summary = _COMMANDS[config.command](config, scenario, data, model, train_config)
        document = metadata_block(config, command=config.command, device=resolve_device(train_config.device),
                                  train_config=dataclasses.asdict(train_config), **summary)
        document = strict_json(document, summary.get("divergence_reason"))
        if _is_main_process():
            atomic_write_json(os.path.join(config.out, "results.json"), document)
    return document


def _pretrain(config, scenario, data, model, train_config) -> dict:
    from llm.train import pretrain

    sequences = data["retain"] if config.command == "retrain" else data["pretraining"]
    history = pretrain(model, sequences, train_config, config.out, config.resume)
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

    if config.method is not None:
        return _unlearn_method(config, scenario, data, model, train_config)
    objective = _objective(config, scenario)
    device = resolve_device(train_config.device)
    model.to(device)
    evaluator = _evaluator(scenario, data, model, config.retrained, train_config, device)
    if config.replicas.active:
        return unlearn_grid(config, data, model, train_config, objective, evaluator)
    trajectory = unlearn(model, objective, data["forget"], data["retain"], train_config, evaluator,
                         config.out, config.resume)
    return {"objective": dataclasses.asdict(objective), "diverged_at": trajectory.diverged_at,
            "divergence_reason": trajectory.divergence_reason, "final": _final_metrics(trajectory),
            "final_loss": float(trajectory.step_metrics["loss"][-1]), "wall_seconds": trajectory.info["wall_seconds"],
            "num_processes": trajectory.info["num_processes"]}


def _unlearn_method(config, scenario, data, model, train_config) -> dict:
    from llm.methods.markov import unlearn_method
    from llm.runtime import resolve_device
    from markovsim.methods import unseen_sequences

    name, method_config, options = method_settings(config.method)
    if config.replicas.active:
        raise ValueError("--method runs one model; the replica grid (--seeds/--betas) is for objectives")
    device = resolve_device(train_config.device)
    model.to(device)
    evaluator = _evaluator(scenario, data, model, config.retrained, train_config, device)
    unseen = unseen_sequences(scenario.spec, len(data["forget"]), train_config.seed) if name == "KGA" else None
    trajectory = unlearn_method(model, name, data["forget"], data["retain"], train_config, evaluator, method_config,
                                unseen, config.out, config.resume, **options)
    return {"method": name, "method_config": dataclasses.asdict(method_config), "diverged_at": trajectory.diverged_at,
            "divergence_reason": trajectory.divergence_reason, "final": _final_metrics(trajectory),
            "final_loss": float(trajectory.step_metrics["loss"][-1]), "wall_seconds": trajectory.info["wall_seconds"],
            "num_processes": trajectory.info["num_processes"]}


def _evaluate(config, scenario, data, model, train_config) -> dict:
    from llm.runtime import resolve_device

    device = resolve_device(train_config.device)
    model.to(device)
    evaluator = _evaluator(scenario, data, None, config.retrained, train_config, device)
    metrics = evaluator.evaluate(model)
    names = evaluator.component_names
    return {"metrics": {name: dict(zip(names, values.tolist())) for name, values in metrics.items()}}


_COMMANDS = {"pretrain": _pretrain, "retrain": _pretrain, "unlearn": _unlearn, "evaluate": _evaluate}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 2 (one ``error:`` line on stderr) on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        document = run(resolve(build_parser().parse_args(argv)))
    except (ValueError, TypeError, OSError) as error:
        if "--debug" in argv:
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    if _is_main_process():
        summary = {k: document[k] for k in ("command", "device", "wall_seconds", "final_loss", "diverged_at")
                   if k in document}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from llm.runtime import exit_with

    exit_with(main())
