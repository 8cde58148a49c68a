"""Benchmark: N batched replicas of the paper-synthetic unlearning run vs N single runs.

For N = 1, 4, 16 (and 64 with ``--with-64``) replicas of the ``paper_short_forget2`` SimNPO
unlearning run on ``paper-synthetic`` (``llm.PAPER_UNLEARNING``: 50 steps, forget batch 4, lr 5e-4,
legacy AdamW; replica i starts from a model initialised with seed i and draws batches with seed i),
measured side by side in one process:

* every-step evaluation: after every step the test-set KLs (to the true chains and the reference),
  forget weights and power share, of all replicas in batched passes (``llm.replica_evaluation``);
* the same on a fixed subsample: ``Evaluator(..., evaluation_subsample=64)`` test sequences and
  ``diagnostics_max_sequences=32`` per component (``--subsample``, ``--diagnostics-subsample``);
* training steps: evaluation only at steps 0 and 50, on 8 test sequences, without the forget-weight
  and power-share diagnostics (the training steps alone, what the batching speeds up);
* the cost of one evaluation of one model, by part (test-set KLs, forget weights, power share).
* time of ``llm.replica_training.unlearn_replicas`` with N replicas relative to N x the time of one
  ``llm.train.unlearn`` run (< 1 = faster than running them one after another; the issue's CPU
  target is 16 replicas <= 4x one run, i.e. a ratio <= 0.25 at N = 16);
* training-step GFLOP/s, counted as 6 N D tokens (D = parameters, tokens = the forget batch's real
  tokens), against the machine's fp32 matmul peak (best of a few 2048^3 ``torch.matmul``).

The starting models are not pre-trained: the time of a step does not depend on the weights.

Timings are best-of-several, single and batched runs interleaved (the machine may be shared).

Run: ``python benchmarks/replicas.py [--scale 0.1] [--threads 2] [--with-64] [--repeats 3] [--modes steps ...]
[--route stacked|vmap|loop] [--device cuda] [--counts 1 16 256 1024] [--profile 256]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from llm.evaluate import Evaluator
from llm.models import build_model
from llm.replica_training import unlearn_replicas
from llm.replicas import ROUTES
from llm.train import PAPER_UNLEARNING, unlearn
from markovsim.scenarios import SCENARIOS

MODES = ("steps", "every-step", "subsample")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1, help="fraction of the paper's 10000/5000/5000 sequences")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=50, help="unlearning steps")
    parser.add_argument("--with-64", action="store_true", help="also N = 64 (training steps only)")
    parser.add_argument("--counts", type=int, nargs="+", default=None,
                        help="replica counts N (default 1 4 16, and 64 with --with-64 for training steps)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the runs train")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings (training steps)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="what to time: training steps, every-step evaluation, every-step on a subsample")
    parser.add_argument("--route", choices=ROUTES, default=None, help="ReplicaStack route (default: the model's)")
    parser.add_argument("--subsample", type=int, default=64, help="test sequences of the subsampled evaluation")
    parser.add_argument("--diagnostics-subsample", type=int, default=32,
                        help="diagnostics sequences per component of the subsampled evaluation")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="after the timings, profile one training-steps run of N replicas (torch.profiler: "
                             "top ops by host time and by device time, and the host syncs)")
    return parser.parse_args(argv)


def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best fp32 FLOP/s of ``torch.matmul`` on two (size, size) matrices (2 size^3 FLOPs; on CUDA at the
    default ``allow_tf32=False``, the precision the replicas train in)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, timed(lambda: torch.matmul(a, b))[1])
    return 2 * size ** 3 / best


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(function) -> tuple[object, float]:
    synchronize()
    start = time.perf_counter()
    result = function()
    synchronize()
    return result, time.perf_counter() - start


def setup(scale: float, subsample: int = 64) -> dict:
    scenario = SCENARIOS["paper_short_forget2"]
    scenario = scenario.scaled(scale) if scale != 1.0 else scenario
    train, test = scenario.spec.sample()
    forget, retain = train.select("forget1", "forget2"), train.select("retain")
    reference = build_model("paper-synthetic", 11, 21, seed=0)
    evaluator = Evaluator(test, {c.name: c.chain for c in scenario.spec.components}, reference=reference)
    objective = scenario.with_methods(["SimNPO"])["SimNPO"]
    tokens = 4 * float(forget.lengths.mean() + 1)  # real tokens of a forget batch of 4 (BOS + states)
    chains = {c.name: c.chain for c in scenario.spec.components}
    small = Evaluator(test.subset(range(8)), chains, reference=reference)
    subsampled = Evaluator(test, chains, reference=reference, evaluation_subsample=subsample)
    return {"forget": forget, "retain": retain, "evaluator": evaluator, "small_evaluator": small,
            "subsampled_evaluator": subsampled,
            "objective": objective, "tokens": tokens, "sizes": (len(train), len(test))}


def configs(steps: int, every_step: bool, device: str = "cpu"):
    """``PAPER_UNLEARNING`` with ``steps``; every-step evaluation with diagnostics, or neither."""
    # float32 like the replicas (on CUDA the default "auto" would autocast the single run to bf16)
    base = dataclasses.replace(PAPER_UNLEARNING, steps=steps, device=device, progress=False, mixed_precision="no")
    if every_step:
        return dataclasses.replace(base, eval_every=1)
    return dataclasses.replace(base, eval_every=steps, track_forget_weights=False, track_power_share=False)


def evaluation_parts(data: dict, repeats: int = 3) -> dict[str, float]:
    """Seconds of one evaluation of one model (best of ``repeats``): test-set KLs, forget weights, power share."""
    model = build_model("paper-synthetic", 11, 21, seed=0).to(data["device"])
    seconds = {"test-set KLs": min(timed(lambda: data["evaluator"].evaluate(model))[1] for _ in range(repeats))}
    base = dataclasses.replace(configs(1, True, data["device"]), track_forget_weights=False, track_power_share=False)
    without = min(time_single(data, base, data["evaluator"]) for _ in range(repeats))
    for label, weights, power in (("forget weights", True, False), ("power share", False, True)):
        config = dataclasses.replace(base, track_forget_weights=weights, track_power_share=power)
        with_part = min(time_single(data, config, data["evaluator"]) for _ in range(repeats))
        seconds[label] = (with_part - without) / 2  # a 1-step run evaluates twice
    return seconds


def time_single(data: dict, config, evaluator) -> float:
    model = build_model("paper-synthetic", 11, 21, seed=0)
    return timed(lambda: unlearn(model, data["objective"], data["forget"], data["retain"], config, evaluator))[1]


def time_replicas(data: dict, config, num_replicas: int, evaluator) -> float:
    models = [build_model("paper-synthetic", 11, 21, seed=seed) for seed in range(num_replicas)]
    replica_configs = [dataclasses.replace(config, seed=seed) for seed in range(num_replicas)]
    objectives = [data["objective"]] * num_replicas
    return timed(lambda: unlearn_replicas(models, objectives, data["forget"], data["retain"], replica_configs,
                                          evaluator, route=data.get("route")))[1]


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    device = arguments.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    peak = matmul_peak_flops(device=device)
    data = setup(arguments.scale, arguments.subsample)
    data["device"] = device
    parameters = sum(p.numel() for p in build_model("paper-synthetic", 11, 21).parameters())
    machine = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {machine} ({device}), torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"paper_short_forget2 at scale {arguments.scale}: {data['sizes'][0]} train / {data['sizes'][1]} test "
          f"sequences; paper-synthetic, {parameters:,} parameters; SimNPO, {arguments.steps} steps, batch 4")
    parts = evaluation_parts(data) if set(arguments.modes) - {"steps"} else {}
    if parts:
        print("one evaluation of one model: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in parts.items()))
    modes = {"steps": ("training steps (8-sequence evaluation at 0 and end, no diagnostics)",
                       configs(arguments.steps, False, device), data["small_evaluator"]),
             "every-step": ("every-step evaluation (full test set, diagnostics on up to 256 sequences per component)",
                            configs(arguments.steps, True, device), data["evaluator"]),
             "subsample": (f"every-step evaluation on a fixed subsample ({arguments.subsample} test sequences, "
                           f"diagnostics on {arguments.diagnostics_subsample} per component)",
                           dataclasses.replace(configs(arguments.steps, True, device),
                                               diagnostics_max_sequences=arguments.diagnostics_subsample),
                           data["subsampled_evaluator"])}
    data["route"] = arguments.route
    for label, config, evaluator in (modes[mode] for mode in arguments.modes):
        every_step = config.eval_every == 1
        counts = (1, 4, 16, 64) if arguments.with_64 and not every_step else (1, 4, 16)
        counts = tuple(arguments.counts) if arguments.counts else counts
        repeats = 1 if every_step else arguments.repeats
        print(f"\n{label}")
        print(f"  {'N':>5s} {'batched s':>10s} {'N x single s':>13s} {'batched / (N x single)':>23s}"
              f" {'batched / single':>17s}" + ("" if every_step else f" {'GFLOP/s':>8s} {'of peak':>8s}"), flush=True)
        single = float("inf")
        for count, seconds, single in compare(data, config, evaluator, counts, repeats):
            line = (f"  {count:5d} {seconds:10.2f} {count * single:13.2f} {seconds / (count * single):23.3f} "
                    f"{seconds / single:17.2f}")
            if not every_step:
                flops = 6 * count * parameters * data["tokens"] * arguments.steps
                line += f" {flops / seconds / 1e9:8.2f} {flops / seconds / peak:8.1%}"
            print(line, flush=True)
        print(f"  (single = one llm.train.unlearn run, best of the {len(counts) + 1} interleaved: {single:.3f} s)",
              flush=True)
    if arguments.profile:
        profile_replicas(data, modes["steps"][1], modes["steps"][2], arguments.profile)


def profile_replicas(data: dict, config, evaluator, count: int) -> None:
    """Print where one run of ``count`` replicas spends host and device time (3 steps warm, then the run)."""
    from torch.profiler import ProfilerActivity, profile

    time_replicas(data, dataclasses.replace(config, steps=3), count, evaluator)  # warm: allocator, pinned memory
    on_gpu = data["device"] == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as trace:
        seconds = time_replicas(data, config, count, evaluator)
    averages = trace.key_averages()
    print(f"\nprofile of {count} replicas, training steps ({seconds:.2f} s under the profiler)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
    if on_gpu:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    calls = {e.key: e.count for e in averages}
    print("host syncs and copies per run: " + ", ".join(f"{name} {calls.get(name, 0)}" for name in (
        "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel", "aten::item",
        "aten::_local_scalar_dense")), flush=True)


def compare(data: dict, config, evaluator, counts, repeats: int):
    """Yield ``(N, best-of-repeats seconds of N batched replicas, best single-run seconds so far)`` for
    each N, a single run timed before the first N and after each (so that load from other work on a
    shared machine hits both alike, and a run cut short still printed the counts it finished)."""
    singles = [time_single(data, config, evaluator)]
    for count in counts:
        batched = min(time_replicas(data, config, count, evaluator) for _ in range(repeats))
        singles.append(time_single(data, config, evaluator))
        yield count, batched, min(singles)


if __name__ == "__main__":
    main()
