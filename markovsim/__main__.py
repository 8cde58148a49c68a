"""Command line: ``python -m markovsim list`` and ``python -m markovsim run SCENARIO ...``.

``run`` writes ``DIR/results.json`` (full config, package version, summaries), ``DIR/trajectories.npz``
(every metric of every run) and ``DIR/plot.png``, all atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap

import numpy as np

from .analysis import fit_divergence_rates, power_summary, value_at_progress
from .data import atomic_save_npz
from .dynamics import OPTIMIZERS, unlearn
from .losses import USES_BETA
from .objectives import OBJECTIVES
from .results import atomic_output, atomic_write_json, metadata_block
from .scenarios import MODEL_CLASSES, SCENARIOS, load_scenario, prepare


def _parse_named_floats(values, name: str):
    """``["0.2"]`` -> 0.2 for every method; ``["NPO=0.2", "SimNPO=4"]`` -> a dict."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        try:
            return float(values[0])
        except ValueError:
            raise ValueError(f"--{name}: give one number, or METHOD=NUMBER pairs; got {values[0]!r}") from None
    result = {}
    for value in values:
        method, _, number = value.partition("=")
        try:
            result[method] = float(number)
        except ValueError:
            raise ValueError(f"--{name}: give one number, or METHOD=NUMBER pairs; got {value!r}") from None
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m markovsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the named scenarios and the questions they answer")
    run = commands.add_parser("run", help="run a scenario and write results + a plot")
    run.add_argument("scenario", help=f"one of {list(SCENARIOS)} or a path to a JSON scenario spec")
    run.add_argument("--methods", nargs="+", help=f"method names (default: the scenario's); any of {list(OBJECTIVES)}")
    run.add_argument("--betas", nargs="+", help="one beta for all methods, or METHOD=BETA pairs")
    run.add_argument("--gamma", type=float, help="SimNPO's reward margin gamma")
    run.add_argument("--models", nargs="+", choices=MODEL_CLASSES, default=list(MODEL_CLASSES))
    run.add_argument("--scale", type=float, default=1.0, help="fraction of the scenario's sequence counts")
    run.add_argument("--steps", type=int)
    run.add_argument("--lr", type=float, help="learning rate")
    run.add_argument("--optimizer", choices=OPTIMIZERS,
                     help="gd, adamw (torch's AdamW) or adamw_legacy (the paper code's transformers.AdamW; "
                          "its own eps is 1e-6: add --adam-eps 1e-6)")
    run.add_argument("--adam-eps", type=float, help="Adam's eps (default 1e-8)")
    run.add_argument("--batch-size", type=int, help="minibatch size (default: exact full batch)")
    run.add_argument("--seed", type=int, help="data and minibatch seed")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def _configure(arguments):
    scenario = load_scenario(arguments.scenario)
    if arguments.scale != 1.0:
        scenario = scenario.scaled(arguments.scale)
    if arguments.seed is not None:
        scenario = dataclasses.replace(scenario, spec=dataclasses.replace(scenario.spec, seed=arguments.seed))
    overrides = {k: v for k, v in {"steps": arguments.steps, "learning_rate": arguments.lr,
                                   "optimizer": arguments.optimizer, "adam_eps": arguments.adam_eps,
                                   "batch_size": arguments.batch_size,
                                   "seed": arguments.seed}.items() if v is not None}
    dynamics = dataclasses.replace(scenario.dynamics, **overrides)
    methods = scenario.with_methods(arguments.methods or list(scenario.methods),
                                    betas=_parse_named_floats(arguments.betas, "betas"), gammas=arguments.gamma)
    return scenario, dynamics, methods


def check_output_folder(path: str) -> None:
    """Create ``path`` if needed; ValueError naming ``--out`` if it is a file or not writable (checked before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} is an existing file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {path!r} cannot be created: {error.strerror}") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path!r} is not writable")


def run_command(arguments) -> int:
    check_output_folder(arguments.out)
    scenario, dynamics, methods = _configure(arguments)
    runs, retrained, summaries, arrays = {}, {}, {}, {}
    for model_class in arguments.models:
        setup = prepare(scenario, model_class)
        retrained[model_class] = dict(zip(setup.evaluator.component_names,
                                          setup.evaluator.evaluate(setup.retrained)["kl_true"].tolist()))
        runs[model_class] = {}
        for method, objective in methods.items():
            print(f"[markovsim] {scenario.name} / {model_class} / {method}", flush=True)
            trajectory = unlearn(setup.reference, objective, setup.forget, setup.retain, setup.reference, dynamics,
                                 setup.evaluator, progress=not arguments.no_progress)
            runs[model_class][method] = trajectory
            summaries[f"{model_class}/{method}"] = _summary(trajectory, setup, retrained[model_class])
            arrays[f"{model_class}/{method}/steps"] = trajectory.steps
            arrays |= {f"{model_class}/{method}/{k}": v for k, v in trajectory.component_metrics.items()}
            arrays |= {f"{model_class}/{method}/{k}": v for k, v in trajectory.step_metrics.items()}
    os.makedirs(arguments.out, exist_ok=True)
    atomic_save_npz(os.path.join(arguments.out, "trajectories.npz"), arrays)
    config = {"scenario": scenario.name, "question": scenario.question, "spec": scenario.spec.to_dict(),
              "methods": {k: dataclasses.asdict(v) for k, v in methods.items()},
              "dynamics": dataclasses.asdict(dynamics), "models": arguments.models}
    atomic_write_json(os.path.join(arguments.out, "results.json"),
                      metadata_block(config, component_names=list(setup.evaluator.component_names),
                                     retrained_kl_true=retrained, summaries=summaries,
                                     retain_kl_at_equal_forget_logp={m: _equal_progress(r, scenario) for m, r in runs.items()}))
    _plot(runs, retrained, scenario, os.path.join(arguments.out, "plot"))
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
    """Per forget component: the forget log-likelihood per token every method reached, and each method's retain KL there."""
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
                         (divergence_figure(runs, forget_names, scenario.name), os.path.join(os.path.dirname(stem), "divergence.png"))):
        with atomic_output(path) as temporary:
            figure.savefig(temporary, dpi=120, format="png")
        plt.close(figure)


def list_command() -> int:
    for name, scenario in SCENARIOS.items():
        methods = ", ".join(f"{k} (beta {v.beta})" if v.forget in USES_BETA else k for k, v in scenario.methods.items())
        print(f"{name}\n  {textwrap.fill(scenario.question, 96, subsequent_indent='  ')}\n  methods: {methods}\n")
    return 0


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: the command line never opens a window
    arguments = build_parser().parse_args(argv)
    try:
        return list_command() if arguments.command == "list" else run_command(arguments)
    except (ValueError, TypeError) as error:
        if arguments.debug:
            raise
        message = " ".join(str(error).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
