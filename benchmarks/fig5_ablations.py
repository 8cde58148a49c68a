"""Fig. 5 against the official pipeline: switch, one at a time, what may make our reach values differ.

For one case of the paper's synthetic experiment (paper scale by default) and seeds 0..S-1, each seed's
reference and retrained ``paper-synthetic`` models are pre-trained as the figure does (or loaded from
the figure's model folder, ``paper_figures/output/cache/models``, so a later ``python -m paper_figures
--scale paper`` reuses them), then NPO and SimNPO unlearn under each variant:

  ours         the figure's runs (NPO beta 0.2 in case (a), 1 in case (b); SimNPO beta 4; legacy AdamW,
               lr 5e-4, batch 4, 50 steps, every step evaluated on the test set)
  npo_beta_1   NPO with beta 1 (the official script's only NPO command uses 1; the paper's text gives
               0.2 for case (a)); SimNPO is not affected and not rerun
  batch_order  the same models and data, another forget-batch order (batch seed + 100): how much of the
               seed-to-seed spread the order of 50 batches of 4 sequences alone makes
  shared_init  the retrained model initialised like the reference (the official scripts seed both
               with 42; ours use seed and seed + 1000): moves only the retrained level, i.e. the target

Only the unlearning metrics are computed (no power-share diagnostics: the training numbers are the same
with and without them). For each variant, method and forget component: the median and 5-95% of the retain
KL at reach over seeds, the official values, and the paired difference variant - ours (bootstrap 95%
interval of the mean over seeds). Per-seed rows and the summary go to ``--out`` (strict JSON, atomically).

    python benchmarks/fig5_ablations.py --case a --seeds 5 --out docs/figures/fig5_ablations_a.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from markovsim.results import atomic_write_json, metadata_block  # noqa: E402
from paper_figures import official_fig5  # noqa: E402
from paper_figures.official_fig5 import CASE_LETTERS  # noqa: E402
from paper_figures.reach_statistics import FORGET, paired_difference, reach_point, summarise  # noqa: E402
from paper_figures.transformer_runs import (  # noqa: E402
    TransformerSettings,
    _pretrained,
    model_folder,
    prepare_transformer,
    seed_data,
    train_configs,
)

CASES = {letter: scenario for scenario, letter in CASE_LETTERS.items()}
VARIANTS = ("ours", "npo_beta_1", "batch_order", "shared_init")
METHODS = ("NPO", "SimNPO")
BATCH_ORDER_OFFSET = 100
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(HERE), "paper_figures", "output", "cache", "models")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), required=True, help="a: forget2 of length 5; b: unseen")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 (default 5)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's counts (default 1.0)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--evaluation-subsample", type=int, default=1000,
                        help="test sequences evaluated after every step (default 1000 of the 4000 at paper scale, "
                             "the same fixed subset for every variant; 0 = all)")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="where pre-trained models are kept")
    parser.add_argument("--out", required=True, help="results JSON")
    arguments = parser.parse_args(argv)
    if arguments.seeds < 2:
        parser.error("--seeds must be >= 2 (paired differences need two seeds)")
    if not 0 < arguments.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    if arguments.evaluation_subsample < 0:
        parser.error("--evaluation-subsample must be >= 0 (0 = every test sequence)")
    arguments.evaluation_subsample = arguments.evaluation_subsample or None
    return arguments


def seed_setup(scenario: str, scale: float, seed: int, model_dir: str, evaluation_subsample: int | None):
    """The seed's figure setup (``prepare_transformer``: models loaded or pre-trained and kept in ``model_dir``),
    unlearning without diagnostics, evaluated on ``evaluation_subsample`` test sequences (None = all)."""
    settings = TransformerSettings(seed=seed, evaluation_subsample=evaluation_subsample)
    setup = prepare_transformer(scenario, scale, settings, "cpu", progress=False, model_dir=model_dir)
    unlearning = dataclasses.replace(setup.unlearning_config, track_power_share=False, track_forget_weights=False)
    return dataclasses.replace(setup, unlearning_config=unlearning)


def shared_init_levels(setup, scenario: str, scale: float, seed: int, model_dir: str) -> dict[str, float]:
    """The retrained levels (kl_true per component) of a retrained model initialised like the reference (kept beside
    the seed's models as ``retrained_shared_init``)."""
    settings = TransformerSettings(seed=seed)
    data = seed_data(scenario, scale, seed)
    pretraining, _ = train_configs(settings, "cpu", progress=False)
    folder = model_folder(model_dir, scenario, scale, "cpu", settings.preset, seed, pretraining)
    retrained = _pretrained(settings.preset, seed, data.retain, pretraining, data.vocab_size, data.max_length,
                            os.path.join(folder, "retrained_shared_init"))
    kl = np.asarray(setup.evaluator.evaluate(retrained)["kl_true"])
    return dict(zip(setup.evaluator.component_names, kl.tolist()))


def run_seed(variants, scenario: str, scale: float, seed: int, model_dir: str,
             evaluation_subsample: int | None) -> dict[str, dict]:
    """``{variant: {(method, component): (retain KL at reach, step)}}`` of one seed. ``shared_init`` changes only
    the target level, so it reuses ``ours``' trajectories."""
    from llm import unlearn

    setup = seed_setup(scenario, scale, seed, model_dir, evaluation_subsample)
    trajectories, result = {}, {}
    for variant in variants:
        if variant == "shared_init":
            continue
        config = setup.unlearning_config
        if variant == "batch_order":
            config = dataclasses.replace(config, seed=seed + BATCH_ORDER_OFFSET)
        methods = ("NPO",) if variant == "npo_beta_1" else METHODS
        objectives = setup.scenario.with_methods(list(methods),
                                                 betas={"NPO": 1.0} if variant == "npo_beta_1" else None)
        trajectories[variant] = {method: unlearn(copy.deepcopy(setup.reference), objective, setup.forget,
                                                 setup.retain, config, setup.evaluator)
                                 for method, objective in objectives.items()}
        result[variant] = _reach(trajectories[variant], setup.retrained_kl)
    if "shared_init" in variants:
        if "ours" not in trajectories:
            raise ValueError("--variants: shared_init needs ours (it re-reads ours' runs against another level)")
        levels = shared_init_levels(setup, scenario, scale, seed, model_dir)
        result["shared_init"] = _reach(trajectories["ours"], levels)
    return result


def _reach(trajectories: dict, levels: dict) -> dict:
    return {(method, component): reach_point(trajectory, component, levels[component])
            for method, trajectory in trajectories.items() for component in FORGET}


def summary_rows(per_seed: dict, case: str) -> list[dict]:
    rows = []
    for variant, seeds in per_seed.items():
        for method, component in sorted({key for result in seeds.values() for key in result}):
            values = {seed: result[(method, component)][0] for seed, result in seeds.items()}
            summary = summarise(values)
            row = {"variant": variant, "method": method, "component": component, "seeds": summary.seeds,
                   "reached": summary.reached, "median": summary.median, "low": summary.low, "high": summary.high,
                   "official_seed42": official_fig5.reach(case, method, component),
                   "official_reruns": official_fig5.rerun_range(case, method, component)}
            if variant != "ours" and "ours" in per_seed:
                ours = {seed: result[(method, component)][0] for seed, result in per_seed["ours"].items()}
                d = paired_difference(values, ours)
                row |= {"minus_ours_mean": d.mean, "minus_ours_low": d.low, "minus_ours_high": d.high,
                        "mean_abs_change": float(np.nanmean([abs(values[s] - ours[s]) for s in values]))}
            rows.append(row)
    return rows


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    import torch

    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    scenario, started = CASES[arguments.case], time.perf_counter()
    per_seed: dict[str, dict[int, dict]] = {variant: {} for variant in arguments.variants}
    for seed in range(arguments.seeds):
        begun = time.perf_counter()
        for variant, result in run_seed(arguments.variants, scenario, arguments.scale, seed, arguments.model_dir,
                                        arguments.evaluation_subsample).items():
            per_seed[variant][seed] = result
        print(f"case ({arguments.case}) seed {seed}: {time.perf_counter() - begun:.0f} s", flush=True)
    rows = summary_rows(per_seed, arguments.case)
    print(f"\ncase ({arguments.case}), scale {arguments.scale}, {arguments.seeds} seeds, paper-synthetic, legacy AdamW "
          f"lr 5e-4, batch 4, 50 steps, evaluated on {arguments.evaluation_subsample or 'all'} test sequences; "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| variant | method | component | retain KL at reach: median [5%, 95%] | reached | variant - ours: mean "
          "[95% CI] | mean abs change | official seed 42 | official re-runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        change = "" if "minus_ours_mean" not in row else (
            f"{_number(row['minus_ours_mean'])} [{_number(row['minus_ours_low'])}, {_number(row['minus_ours_high'])}]")
        spread = row["official_reruns"]
        print(f"| {row['variant']} | {row['method']} | {row['component']} | {_number(row['median'])} "
              f"[{_number(row['low'])}, {_number(row['high'])}] | {row['reached']}/{row['seeds']} | {change} | "
              f"{_number(row.get('mean_abs_change'))} | {_number(row['official_seed42'])} | "
              f"{'-' if spread is None else f'{spread[0]:.3f}-{spread[1]:.3f}'} |")
    per_seed_json = {variant: {str(seed): {f"{m}/{c}": {"retain_kl_at_reach": v[0], "step_at_reach": v[1]}
                                           for (m, c), v in result.items()} for seed, result in seeds.items()}
                     for variant, seeds in per_seed.items()}
    atomic_write_json(arguments.out, metadata_block(vars(arguments), summary=rows, per_seed=per_seed_json,
                                                    wall_seconds=round(time.perf_counter() - started, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
