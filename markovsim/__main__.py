"""Command line: ``python -m markovsim list`` and ``python -m markovsim run SCENARIO ...``.

``run`` writes ``DIR/results.json`` (full config, package version, summaries), ``DIR/trajectories.npz``
(every metric of every run), ``DIR/plot.png`` and ``DIR/divergence.png``: into a temporary sibling
folder first, renamed into place at the end, so ``DIR`` is complete or absent. The dynamics flags
(``--learning-rate``, ``--steps``, ``--optimizer`` ...) are generated from ``DynamicsConfig``'s fields.
Bad input is one ``error: ...`` line and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import textwrap

import numpy as np

from .analysis import fit_divergence_rates, power_summary, value_at_progress
from .cli_flags import add_dataclass_flags, flag_name, given_values
from .data import MixtureSpec, atomic_save_npz
from .dynamics import DynamicsConfig, unlearn
from .losses import USES_BETA
from .objectives import OBJECTIVES
from .results import atomic_output, atomic_write_json, metadata_block, missing_folders, remove_empty_folders
from .scenarios import MODEL_CLASSES, SCENARIOS, check_data_memory, data_memory_subject, load_scenario, prepare

OUTPUT_FILES = ("results.json", "trajectories.npz", "plot.png", "divergence.png")


class UsageError(ValueError):
    """Bad command-line input (reported as one ``error:`` line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def _parse_named_floats(values, name: str, methods) -> float | dict | None:
    """``["0.2"]`` -> 0.2 for every method; ``["NPO=0.2", "SimNPO=4"]`` -> a dict (names among ``methods``)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return _finite(values[0], name, values[0])
    result = {}
    for value in values:
        method, separator, number = value.partition("=")
        if not separator or method not in methods:
            raise UsageError(f"--{name}: give one number, or METHOD=NUMBER pairs for the methods run "
                             f"{list(methods)}; got {value!r}")
        result[method] = _finite(number, name, value)
    return result


def _finite(text: str, name: str, shown: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"--{name}: give one number, or METHOD=NUMBER pairs; got {shown!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"--{name}: numbers must be finite, got {shown!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m markovsim", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the named scenarios and the questions they answer")
    run = commands.add_parser("run", help="run a scenario and write results + a plot")
    run.add_argument("scenario", help=f"one of {list(SCENARIOS)} or a path to a JSON scenario spec")
    run.add_argument("--methods", nargs="+", help=f"method names (default: the scenario's); any of {list(OBJECTIVES)}")
    run.add_argument("--betas", nargs="+", help="one beta for all methods, or METHOD=BETA pairs (others keep theirs)")
    run.add_argument("--gamma", type=float, help="SimNPO's reward margin gamma")
    run.add_argument("--models", nargs="+", choices=MODEL_CLASSES, default=list(MODEL_CLASSES))
    run.add_argument("--scale", type=float, default=1.0, help="fraction of the scenario's sequence counts")
    run.add_argument("--seed", type=int, help="data and minibatch seed")
    run.add_argument("--out", required=True, help="output folder (written complete or not at all)")
    dynamics = run.add_argument_group("dynamics (markovsim.dynamics.DynamicsConfig; default: the scenario's)")
    add_dataclass_flags(dynamics, DynamicsConfig, "dynamics", skip=("seed",))
    run.add_argument("--lr", type=float, dest="dynamics:learning_rate", default=argparse.SUPPRESS,
                     help=argparse.SUPPRESS)  # the old name of --learning-rate
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def _flagged(flag: str, build, *args, **kwargs):
    """``build(*args, **kwargs)``; a ValueError / TypeError is re-raised (same type) naming ``flag``."""
    try:
        return build(*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{flag}: {error}") from error


def _scenario(arguments):
    scenario = load_scenario(arguments.scenario)
    if not (math.isfinite(arguments.scale) and arguments.scale > 0):
        raise UsageError(f"--scale must be a finite number > 0, got {arguments.scale}")
    if arguments.scale != 1.0:
        scenario = scenario.scaled(arguments.scale)
    if arguments.seed is not None:
        spec = _flagged("--seed", MixtureSpec, scenario.spec.components, arguments.seed)
        scenario = dataclasses.replace(scenario, spec=spec)
    check_data_memory(scenario.spec, data_memory_subject(arguments.scenario, arguments.scale))
    return scenario


def _configure(arguments):
    scenario = _scenario(arguments)
    overrides = given_values(arguments, "dynamics")
    progress = overrides.pop("progress", True)  # the command line shows progress unless --no-progress
    if arguments.seed is not None:
        overrides["seed"] = arguments.seed
    flags = ", ".join(flag_name(name) for name in overrides) or "the scenario's dynamics"
    dynamics = _flagged(flags, dataclasses.replace, scenario.dynamics, **overrides)
    names = arguments.methods or list(scenario.methods)
    methods = _flagged("--methods", scenario.with_methods, names)
    betas = _parse_named_floats(arguments.betas, "betas", names)
    methods = _flagged("--betas", scenario.with_methods, names, betas=betas) if betas is not None else methods
    if arguments.gamma is not None:
        methods = _flagged("--gamma", scenario.with_methods, names, betas=betas, gammas=arguments.gamma)
    return scenario, dynamics, methods, progress


def check_output_folder(path: str) -> None:
    """ValueError naming ``--out`` if ``path`` cannot receive a run (checked before any work; nothing is created).

    ``path`` must be a writable folder whose result names are free or plain files, or not exist
    yet below a writable folder.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--out {path!r} is an existing file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path!r} is not writable")
        occupied = [name for name in OUTPUT_FILES if os.path.lexists(os.path.join(path, name))
                    and not os.path.isfile(os.path.join(path, name))]
        if occupied:
            raise ValueError(f"--out {path!r} holds {occupied[0]!r}, which is not a file; it would be replaced "
                             f"by a result file: remove it or choose another folder")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path!r} cannot be created: {ancestor!r} is not a writable folder")


@contextlib.contextmanager
def staged_output(path: str):
    """Yield a temporary folder; on success its files move into ``path``, on failure it is removed.

    A new ``path`` is a renamed sibling (complete or absent; on failure the parent folders made for it
    are removed too); an existing folder receives each file by an atomic rename.
    """
    path = os.path.abspath(path)
    exists = os.path.isdir(path)
    parent = path if exists else os.path.dirname(path)
    created = missing_folders(parent)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield staging
        if exists:
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(path, name))
            os.rmdir(staging)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty_folders(created)  # the folders made for ``path`` go too: --out is left as it was
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_command(arguments) -> int:
    check_output_folder(arguments.out)
    scenario, dynamics, methods, progress = _configure(arguments)
    runs, retrained, summaries, arrays = {}, {}, {}, {}
    for model_class in arguments.models:
        setup = prepare(scenario, model_class)
        retrained[model_class] = dict(zip(setup.evaluator.component_names,
                                          setup.evaluator.evaluate(setup.retrained)["kl_true"].tolist()))
        runs[model_class] = {}
        for method, objective in methods.items():
            print(f"[markovsim] {scenario.name} / {model_class} / {method}", flush=True)
            trajectory = unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference, dynamics,
                                 setup.evaluator, progress=progress)
            runs[model_class][method] = trajectory
            summaries[f"{model_class}/{method}"] = _summary(trajectory, setup, retrained[model_class])
            arrays[f"{model_class}/{method}/steps"] = trajectory.steps
            arrays |= {f"{model_class}/{method}/{k}": v for k, v in trajectory.component_metrics.items()}
            arrays |= {f"{model_class}/{method}/{k}": v for k, v in trajectory.step_metrics.items()}
    config = {"scenario": scenario.name, "question": scenario.question, "spec": scenario.spec.to_dict(),
              "methods": {k: dataclasses.asdict(v) for k, v in methods.items()},
              "dynamics": dataclasses.asdict(dynamics), "models": arguments.models}
    with staged_output(arguments.out) as folder:
        atomic_save_npz(os.path.join(folder, "trajectories.npz"), arrays)
        atomic_write_json(os.path.join(folder, "results.json"),
                          metadata_block(config, component_names=list(setup.evaluator.component_names),
                                         retrained_kl_true=retrained, summaries=summaries,
                                         retain_kl_at_equal_forget_logp={m: _equal_progress(r, scenario)
                                                                         for m, r in runs.items()}))
        _plot(runs, retrained, scenario, os.path.join(folder, "plot"))
    print(f"[markovsim] wrote {arguments.out}/results.json, trajectories.npz, plot.png, divergence.png")
    return 0


def _summary(trajectory, setup, retrained_kls) -> dict:
    forget_names = setup.scenario.spec.names_where(role="forget")
    summary = {"diverged_at": trajectory.diverged_at, "divergence_reason": trajectory.divergence_reason,
               "final": {m: dict(zip(trajectory.component_names, v[-1].tolist()))
                         for m, v in trajectory.component_metrics.items()},
               "mean_power_share": power_summary(trajectory, forget_names),
               "retain_kl_when_forget_reaches_retrained": {
                   name: value_at_progress(trajectory, "kl_true", name, retrained_kls[name], "kl_true", "retain")
                   for name in forget_names}}
    if len(trajectory.steps) >= 3:
        forget_logp = np.nanmean([trajectory.metric("logp_per_token", n) for n in forget_names], axis=0)
        summary["forget_logp_rates"] = fit_divergence_rates(trajectory.steps, forget_logp)
        summary["parameter_distance_rates"] = fit_divergence_rates(trajectory.steps,
                                                                   trajectory.step_metrics["parameter_distance"])
    return summary


def _equal_progress(trajectories, scenario) -> dict:
    """Per forget component: the forget log-likelihood per token every method reached, and each method's retain KL
    there."""
    result = {}
    for name in scenario.spec.names_where(role="forget"):
        level = max(float(np.nanmin(t.metric("logp_per_token", name))) for t in trajectories.values())
        result[name] = {"forget_logp_per_token": level} | {
            method: value_at_progress(t, "logp_per_token", name, level, "kl_true", "retain")
            for method, t in trajectories.items()}
    return result


def _plot(runs, retrained, scenario, stem) -> None:
    import matplotlib.pyplot as plt

    from .plotting import divergence_figure, scenario_figure

    forget_names = scenario.spec.names_where(role="forget")
    title = textwrap.shorten(f"{scenario.name}: {scenario.question}", 150)
    for figure, path in ((scenario_figure(runs, retrained, forget_names, title), stem + ".png"),
                         (divergence_figure(runs, forget_names, scenario.name),
                          os.path.join(os.path.dirname(stem), "divergence.png"))):
        with atomic_output(path) as temporary:
            figure.savefig(temporary, dpi=120, format="png")
        plt.close(figure)


def list_command() -> int:
    for name, scenario in SCENARIOS.items():
        methods = ", ".join(f"{k} (beta {v.beta})" if v.forget in USES_BETA else k for k, v in scenario.methods.items())
        print(f"{name}\n  {textwrap.fill(scenario.question, 96, subsequent_indent='  ')}\n  methods: {methods}\n")
    return 0


def main(argv=None) -> int:
    """Run the command line: 0 on success, 2 (one ``error:`` line on stderr) on bad input.

    An unexpected failure (a bug, running out of memory) raises with its traceback (exit status 1);
    ``--debug`` shows the traceback of bad input too.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: the command line never opens a window
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        arguments = build_parser().parse_args(argv)
        return list_command() if arguments.command == "list" else run_command(arguments)
    except (ValueError, TypeError) as error:
        if "--debug" in argv:
            raise
        message = " ".join(str(error).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
