"""Benchmark: the complete ``paper_short_forget2`` scenario on ``paper-synthetic``, one seed and S seeds batched.

The work of one seed of the paper's synthetic experiment (what ``paper_figures.transformer_runs``
runs for a figure; the official pipeline needs ~8 minutes for it on the 2-core VM):

1. pre-train the reference model on the pre-training sequences (``PAPER_PRETRAINING``: 5 epochs,
   batch 128, lr 5e-4, legacy AdamW), initialisation seed s, batch order seed s;
2. retrain a fresh model on retain only (initialisation seed s + 1000, as the figures);
3. the evaluator: the test set's true-chain targets and the retrained and reference predictives;
4. unlearn GA, NPO, SimNPO from copies of the reference (``PAPER_UNLEARNING``: 50 steps, forget
   batch 4), every metric after every step (test-set KLs to the true chains, the retrained and
   the reference model, forget weights and power share on up to ``--diagnostics-subsample``
   sequences per component).

Measured side by side in one process:

* one seed (s = 0): ``llm.train.pretrain`` x 2 and ``llm.train.unlearn`` x 3, one after another;
* S seeds batched (s = 0..S-1): ``pretrain_replicas`` (S replicas), ``pretrain_replicas`` (S
  retrained replicas), ``unlearn_replicas`` (3 S replicas: every method x seed in one computation,
  each seed's replicas evaluated against its own retrained and reference models).

Each seed samples its own data (the scenario with data seed s, as a figure's seed): replica k
pre-trains, retrains, unlearns and is evaluated on seed s_k's sets (``pretrain_replicas`` /
``unlearn_replicas`` with one set per replica). Each measurement runs with the full test set
(``--evaluation full``) and/or a fixed test subsample (``--evaluation subsample``:
``llm.evaluate.evaluation_subsample_of``, ``--subsample`` sequences of each seed's test set).

Targets (CPU): one seed <= 60 s; S = 5 seeds <= 2x one seed.

Run: ``python benchmarks/replica_scenario.py [--scale 1.0] [--seeds 5] [--threads 2]
[--evaluation full subsample] [--subsample 400] [--pretrain-route loop]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import time

import torch

from llm.config import PAPER_PRETRAINING, PAPER_UNLEARNING
from llm.evaluate import Evaluator, evaluation_subsample_of
from llm.models import build_model
from llm.replica_pretraining import pretrain_replicas
from llm.replica_training import EVALUATIONS, unlearn_replicas
from llm.replicas import ROUTES
from llm.train import pretrain, unlearn
from paper_figures.transformer_runs import seed_data

SCENARIO = "paper_short_forget2"
PRESET = "paper-synthetic"
METHODS = ("GA", "NPO", "SimNPO")
RETRAINED_SEED_OFFSET = 1000  # as paper_figures.transformer_runs
TARGET_SECONDS = 60.0


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's data (1.0 = paper scale)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the batched measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--evaluation", nargs="+", choices=("full", "subsample"), default=["full", "subsample"],
                        help="test set of the every-step evaluation: all of it and/or a fixed subsample")
    parser.add_argument("--subsample", type=int, default=400, help="test sequences of the subsampled evaluation")
    parser.add_argument("--diagnostics-subsample", type=int, default=256,
                        help="forget-weight / power-share sequences per component (the figures' 256)")
    parser.add_argument("--replica-evaluation", choices=EVALUATIONS, default="batched",
                        help="how unlearn_replicas evaluates its replicas")
    parser.add_argument("--pretrain-route", choices=ROUTES, default=None,
                        help="ReplicaStack route of the batched pre-training and retraining (default: the model's, "
                             "'stacked'; 'loop' is the faster one on a CPU, benchmarks/RESULTS.md)")
    parser.add_argument("--unlearn-steps", type=int, default=50, help="unlearning steps per method")
    parser.add_argument("--pretrain-epochs", type=float, default=5.0, help="pre-training and retraining epochs")
    parser.add_argument("--skip-single", action="store_true", help="only the batched seeds")
    parser.add_argument("--skip-batched", action="store_true", help="only the single seed")
    return parser.parse_args(argv)


def scenario_data(scale: float, seed: int = 0) -> dict:
    """The scenario's data sampled with data seed ``seed`` (``paper_figures.transformer_runs.seed_data``, a
    figure's seed): pre-training, retain, forget and test sets, true chains."""
    data = seed_data(SCENARIO, scale, seed)
    return {"scenario": data.scenario, "pretraining": data.pretraining, "retain": data.retain,
            "forget": data.forget, "test": data.test, "chains": {c.name: c.chain for c in data.spec.components},
            "vocab_size": data.vocab_size, "max_length": data.max_length}


def train_configs(arguments: argparse.Namespace, seed: int):
    """(pre-training, unlearning) ``TrainConfig`` of one seed, as the figures' transformer runs."""
    common = dict(device="cpu", progress=False, num_threads=arguments.threads, seed=seed,
                  divergence_logp_per_token=None)
    pretraining = dataclasses.replace(PAPER_PRETRAINING, epochs=arguments.pretrain_epochs, **common)
    unlearning = dataclasses.replace(PAPER_UNLEARNING, steps=arguments.unlearn_steps, eval_every=1,
                                     diagnostics_max_sequences=arguments.diagnostics_subsample, **common)
    return pretraining, unlearning


class Clock:
    """Wall seconds and this process's CPU seconds (all its threads) per phase, in order.

    On a shared machine the CPU seconds are the steadier number: other processes stretch the wall
    time, not (much) the CPU time; with one thread, CPU seconds ~ the wall time on an idle core.
    """

    def __init__(self):
        self.phases, self.cpu_phases = {}, {}
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        self.phases[name], self.cpu_phases[name] = now - self.last, now_cpu - self.last_cpu
        self.last, self.last_cpu = now, now_cpu

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_phases.values())


def fresh(data: dict, seed: int):
    return build_model(PRESET, data["vocab_size"], data["max_length"], seed=seed)


def one_seed(data: dict, test, arguments: argparse.Namespace, seed: int = 0) -> Clock:
    """The scenario for one seed with the single-run code; returns its phase times."""
    pretraining, unlearning = train_configs(arguments, seed)
    clock = Clock()
    reference = fresh(data, seed)
    pretrain(reference, data["pretraining"], pretraining)
    clock.lap("pre-train")
    retrained = fresh(data, seed + RETRAINED_SEED_OFFSET)
    pretrain(retrained, data["retain"], pretraining)
    clock.lap("retrain")
    evaluator = Evaluator(test, data["chains"], retrained=retrained, reference=reference,
                          batch_size=unlearning.eval_batch_size)
    clock.lap("evaluator")
    for objective in data["scenario"].with_methods(list(METHODS)).values():
        unlearn(copy.deepcopy(reference), objective, data["forget"], data["retain"], unlearning, evaluator)
    clock.lap(f"unlearn {len(METHODS)} methods")
    return clock


def batched_seeds(seed_data: list[dict], tests: list, arguments: argparse.Namespace) -> Clock:
    """The scenario for seeds 0..S-1 as replicas, each on its own data (``seed_data[k]``, test set ``tests[k]``);
    returns its phase times."""
    seeds = list(range(len(seed_data)))
    configs = [train_configs(arguments, seed) for seed in seeds]
    clock = Clock()
    references = [fresh(seed_data[seed], seed) for seed in seeds]
    route = arguments.pretrain_route
    pretrain_replicas(references, [d["pretraining"] for d in seed_data], [c[0] for c in configs], route)
    clock.lap("pre-train")
    retrained = [fresh(seed_data[seed], seed + RETRAINED_SEED_OFFSET) for seed in seeds]
    pretrain_replicas(retrained, [d["retain"] for d in seed_data], [c[0] for c in configs], route)
    clock.lap("retrain")
    evaluators = [Evaluator(test, d["chains"], retrained=r, reference=m, batch_size=configs[0][1].eval_batch_size)
                  for test, d, r, m in zip(tests, seed_data, retrained, references)]
    clock.lap("evaluator")
    objectives = seed_data[0]["scenario"].with_methods(list(METHODS))
    grid = [(k, method) for k in seeds for method in METHODS]
    unlearn_replicas([copy.deepcopy(references[k]) for k, _ in grid], [objectives[m] for _, m in grid],
                     [seed_data[k]["forget"] for k, _ in grid], [seed_data[k]["retain"] for k, _ in grid],
                     [configs[k][1] for k, _ in grid], [evaluators[k] for k, _ in grid],
                     evaluation=arguments.replica_evaluation)
    clock.lap(f"unlearn {len(METHODS)} methods")
    return clock


def report(label: str, clock: Clock, reference: Clock | None) -> None:
    phases = ", ".join(f"{name} {clock.phases[name]:.1f} s / {clock.cpu_phases[name]:.1f} s"
                       for name in clock.phases)
    line = f"  {label}: wall {clock.total:.1f} s, CPU {clock.cpu_total:.1f} s (wall / CPU: {phases})"
    if reference is not None:
        line += (f"; {clock.total / reference.total:.2f}x one seed in wall time, "
                 f"{clock.cpu_total / reference.cpu_total:.2f}x in CPU time (target <= 2x)")
    else:
        line += f"; target <= {TARGET_SECONDS:.0f} s: {'met' if clock.total <= TARGET_SECONDS else 'not met'}"
    print(line, flush=True)


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    seed_data = [scenario_data(arguments.scale, seed) for seed in range(arguments.seeds)]
    data = seed_data[0]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{SCENARIO} at scale {arguments.scale}: {len(data['pretraining'])} pre-training / {len(data['retain'])} "
          f"retain / {len(data['forget'])} forget / {len(data['test'])} test sequences; {PRESET}; "
          f"{', '.join(METHODS)} x {arguments.unlearn_steps} steps, every metric every step; "
          f"diagnostics on {arguments.diagnostics_subsample} sequences per component; "
          f"replica evaluation {arguments.replica_evaluation}; batched pre-training route "
          f"{arguments.pretrain_route or 'the model default'}")
    for evaluation in arguments.evaluation:
        tests = [d["test"] if evaluation == "full" else evaluation_subsample_of(d["test"], arguments.subsample)
                 for d in seed_data]
        test = tests[0]
        print(f"\nevaluation on {'the full test set' if evaluation == 'full' else 'a fixed subsample'} "
              f"({len(test)} sequences):", flush=True)
        single = None
        if not arguments.skip_single:
            single = one_seed(data, test, arguments)
            report("one seed (single runs)", single, None)
        if not arguments.skip_batched:
            batched = batched_seeds(seed_data, tests, arguments)
            report(f"{arguments.seeds} seeds batched (replicas)", batched, single)
        print(f"  load average {os.getloadavg()[0]:.2f} at the end", flush=True)


if __name__ == "__main__":
    main()
