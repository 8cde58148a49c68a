"""Benchmark: the paper's Markov experiment on a transformer (``paper_short_forget2``, ``paper-synthetic``).

Stages, each timed: sample the data; pre-train on retain + forget1 + forget2 (``llm.PAPER_PRETRAINING``:
5 epochs, batch 128, lr 5e-4, the legacy transformers.AdamW, token-mean cross-entropy on the full
likelihood); retrain on retain only (same settings); cache the evaluation targets (true chains,
retrained and reference predictives, exact models); then unlearn GA, NPO and SimNPO
(``llm.PAPER_UNLEARNING``: 50 iterations, forget batch 4, lr 5e-4; the scenario's beta: NPO 0.2,
SimNPO 4, gamma 0), evaluating every iteration on every test component (``--preset gpt2-4x128`` for
the GPT-2 of the same size). Prints the wall time
per stage and the final per-component KLs (to the true chains and to the retrained transformer).

On CUDA it also measures the unlearning step of ``gpt2-small`` (124M, GPT-2 vocabulary, bf16
autocast, sequence 512, batch 32): tokens/s, achieved TFLOP/s (6 N + 12 L T d FLOPs per token) as a
fraction of the GPU's dense bf16 peak, and the time of an NPO step with cached reference log-probs
relative to one that runs a live reference model.

Run: ``python benchmarks/llm_markov.py [--scale 0.1] [--device cpu|cuda|auto] [--eval-every 1]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time

import numpy as np
import torch

from llm.evaluate import Evaluator
from llm.models import build_model, count_parameters
from llm.runtime import resolve_device, use_bf16
from llm.train import PAPER_PRETRAINING, PAPER_UNLEARNING, pretrain, retrain, unlearn
from markovsim.models import MixtureOfChains
from markovsim.scenarios import SCENARIOS

# Dense bf16 tensor-core peaks (no sparsity), by substring of torch.cuda.get_device_name().
BF16_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's 10000/5000/5000 sequences")
    parser.add_argument("--preset", default="paper-synthetic", help="model preset (llm.models.PRESETS)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--methods", nargs="+", default=["GA", "NPO", "SimNPO"])
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--unlearn-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this model)")
    parser.add_argument("--skip-gpu-parts", action="store_true", help="skip the gpt2-small and reference-ratio timings")
    parser.add_argument("--output", help="also write the numbers to this JSON file")
    parser.add_argument("--gpu-step-only", action="store_true",
                        help="skip the Markov experiment (CUDA step timings only)")
    parser.add_argument("--variants", nargs="*", choices=list(STEP_VARIANTS), default=list(STEP_VARIANTS),
                        help="step variants timed after the baseline")
    parser.add_argument("--skip-live", action="store_true", help="skip the live-reference step timing")
    parser.add_argument("--profile", action="store_true",
                        help="print the top CUDA kernels of the last variant (torch.profiler, 3 steps)")
    return parser.parse_args(argv)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def scenario_data(scale: float):
    scenario = SCENARIOS["paper_short_forget2"]
    scenario = scenario.scaled(scale) if scale != 1.0 else scenario
    train, test = scenario.spec.sample()
    return scenario, train, test


def markov_experiment(arguments, device: str) -> dict:
    """Pre-train, retrain and unlearn on the Markov mixture; returns timings and final KLs."""
    (scenario, train, test), sample_seconds = timed(lambda: scenario_data(arguments.scale))
    spec, timings = scenario.spec, {"sample data": sample_seconds}
    print(f"data: {len(train)} train / {len(test)} test sequences {train.component_counts()}")
    training = dataclasses.replace(PAPER_PRETRAINING, epochs=arguments.epochs, device=device, progress=False)
    reference = build_model(arguments.preset, 11, 21, seed=0)
    history, timings["pre-train"] = timed(lambda: pretrain(reference, train, training))
    retrained = build_model(arguments.preset, 11, 21, seed=1)
    retrain_history, timings["retrain"] = timed(lambda: retrain(retrained, train.select("retain"), training))
    print(f"{arguments.preset}: {count_parameters(reference):,} parameters; pre-train {len(history.losses)} steps, "
          f"final loss {history.losses[-1]:.4f}; retrain {len(retrain_history.losses)} steps, "
          f"final loss {retrain_history.losses[-1]:.4f}")
    exact = {"retrained": MixtureOfChains.from_components([c for c in spec.components if c.role == "retain"])}
    bf16 = use_bf16(device, "auto")
    evaluator, timings["evaluation targets"] = timed(lambda: Evaluator(
        test, {c.name: c.chain for c in spec.components}, retrained=retrained, reference=reference,
        exact_models=exact, bf16=bf16))
    start_metrics = {"reference": evaluator.evaluate(reference), "retrained": evaluator.evaluate(retrained)}
    forget, retain = train.select("forget1", "forget2"), train.select("retain")
    unlearning = dataclasses.replace(PAPER_UNLEARNING, steps=arguments.unlearn_steps, eval_every=arguments.eval_every,
                                     device=device, progress=False)
    finals = {}
    for method, objective in scenario.with_methods(arguments.methods).items():
        trajectory, timings[f"unlearn {method}"] = timed(lambda: unlearn(
            copy.deepcopy(reference), objective, forget, retain, unlearning, evaluator))
        finals[method] = {metric: trajectory.component_metrics[metric][-1] for metric in ("kl_true", "kl_retrained")}
        finals[method]["evaluations"] = len(trajectory.steps)
    return {"timings": timings, "start": start_metrics, "finals": finals, "names": test.component_names,
            "sizes": {"train": len(train), "test": len(test), "forget": len(forget)},
            "pretrain_final_loss": float(history.losses[-1]), "retrain_final_loss": float(retrain_history.losses[-1])}


def print_markov_results(results: dict) -> None:
    names = results["names"]
    print("\nwall time per stage")
    for stage, seconds in results["timings"].items():
        print(f"  {stage:<22s} {seconds:8.1f} s")
    print(f"  {'total':<22s} {sum(results['timings'].values()):8.1f} s")
    header = "".join(f"{n:>10s}" for n in names)
    print(f"\nfinal mean per-token KL on the test set   (columns: {', '.join(names)})")
    print(f"  {'model':<18s}{'KL(true || model)':>{10 * len(names)}s}   {'KL(retrained || model)':>{10 * len(names)}s}")
    print(f"  {'':<18s}{header}   {header}")
    rows = {f"{k} (before)": v for k, v in results["start"].items()}
    rows |= {f"{k} (after)": v for k, v in results["finals"].items()}
    for label, metrics in rows.items():
        true = "".join(f"{x:10.4f}" for x in metrics["kl_true"])
        retrained = "".join(f"{x:10.4f}" for x in metrics["kl_retrained"])
        print(f"  {label:<18s}{true}   {retrained}")


def step_throughput(device: str, preset: str = "gpt2-small", vocab_size: int = 50257, length: int = 512,
                    batch_size: int = 32, steps: int = 10, warmup: int = 3, live_reference: bool = False,
                    attention: str | None = None, fused_adam: bool = False, compile_model: bool = False,
                    compile_logps: bool = False, compile_loss: bool = False, profile: bool = False) -> dict:
    """Time the NPO unlearning step (forward, backward, AdamW) of ``preset`` on random tokens.

    ``attention`` sets the transformers attention implementation (None = the library's default),
    ``fused_adam`` uses ``AdamW(fused=True)``, ``compile_model`` runs the model under ``torch.compile``
    (compilation happens in the warm-up steps, which are not timed), ``compile_logps`` also compiles
    ``llm.logps.token_log_likelihoods`` (the float32 log-sum-exp over the vocabulary) for the step;
    ``compile_loss`` compiles the whole forget loss as one function (model, log-likelihoods, NPO, the
    batch mean; the same value as ``objective_terms``, whose input checks would split the graph, run
    under ``markovsim.tensor_checks.value_checks_skipped``).
    """
    from llm.logps import model_sequence_logps
    from llm.objective import BatchCounts, UnlearningBatch, objective_terms
    from llm.runtime import autocast
    from markovsim.losses import get_objective
    from markovsim.tensor_checks import value_checks_skipped

    model = build_model(preset, vocab_size, length, seed=0).to(device)
    if attention is not None:
        model.set_attn_implementation(attention)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if live_reference else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adam or None)
    trained = torch.compile(model) if compile_model else model
    import llm.logps

    eager_logps = llm.logps.token_log_likelihoods
    if compile_logps:  # labelled_token_logps looks the name up at each call; restored before returning
        llm.logps.token_log_likelihoods = torch.compile(eager_logps)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size - 1, (batch_size, length), generator=generator).to(device)
    labels = input_ids.clone()
    labels[:, :2] = -100  # the first token is the prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    cached = torch.full((batch_size,), -float(length) * 10.0, device=device)
    objective, bf16 = get_objective("NPO", beta=0.1), device == "cuda"

    def forget_loss(input_ids, attention_mask, labels, ref):  # objective_terms' total for a forget-only objective
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        token_logps, mask = eager_logps(logits, labels)
        logps, num_tokens = token_logps.sum(-1), mask.sum(-1).to(token_logps.dtype)
        return objective.total(objective.forget_losses(logps, num_tokens, ref).mean())

    compiled_loss = torch.compile(forget_loss) if compile_loss else None

    def step():
        with autocast(device, bf16):
            ref = cached
            if reference is not None:
                with torch.no_grad():
                    ref = model_sequence_logps(reference, batch)[0]
            if compiled_loss is not None:
                with value_checks_skipped():
                    total = compiled_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], ref)
            else:
                total = objective_terms(trained, objective, UnlearningBatch(batch, ref, BatchCounts(batch_size))).total
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        on_gpu = device == "cuda"
        with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as trace:
            for _ in range(3):
                step()
            if on_gpu:
                torch.cuda.synchronize()
        table = trace.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=15,
                                           max_name_column_width=60)
    llm.logps.token_log_likelihoods = eager_logps
    config = model.config
    parameters = count_parameters(model) - config.n_positions * config.n_embd  # without position embeddings
    flops_per_token = 6 * parameters + 12 * config.n_layer * length * config.n_embd
    tokens = batch_size * length
    return {"seconds_per_step": seconds, "tokens_per_second": tokens / seconds,
            "flops_per_second": flops_per_token * tokens / seconds, "parameters": parameters,
            "attention": model.config._attn_implementation, "fused_adam": fused_adam, "compiled": compile_model,
            "compiled_logps": compile_logps, "compiled_loss": compile_loss, "vocab_size": vocab_size,
            "batch_size": batch_size, "profile": table}


# The step variants that can be timed after the baseline: name -> (label, step_throughput keyword arguments).
STEP_VARIANTS = {"fused": ("fused AdamW", {"fused_adam": True}),
                 "compiled": ("fused AdamW + torch.compile", {"fused_adam": True, "compile_model": True}),
                 "compiled-logps": ("fused AdamW + torch.compile of the model and of the log-likelihoods",
                                    {"fused_adam": True, "compile_model": True, "compile_logps": True}),
                 "compiled-batch64": ("fused AdamW + torch.compile, batch 64",
                                      {"fused_adam": True, "compile_model": True, "batch_size": 64}),
                 "compiled-loss": ("fused AdamW + one torch.compile of model, log-likelihoods and loss",
                                   {"fused_adam": True, "compile_loss": True}),
                 "compiled-loss-padded": ("the same, vocabulary padded to 50304 (a multiple of 128), batch 64",
                                          {"fused_adam": True, "compile_loss": True, "vocab_size": 50304,
                                           "batch_size": 64}),
                 "compiled-loss-padded32": ("the same, vocabulary padded to 50304, batch 32",
                                            {"fused_adam": True, "compile_loss": True, "vocab_size": 50304})}


def gpu_measurements(device: str, variants=tuple(STEP_VARIANTS), live_reference: bool = True,
                     profile: bool = False) -> dict:
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in BF16_PEAK_FLOPS.items() if key in name), None)
    cached = step_throughput(device)
    live = step_throughput(device, live_reference=True) if live_reference else cached | {"skipped": True}
    result = {"device_name": name, "bf16_peak_flops": peak, "cached": cached, "live": live,
              "live_over_cached": live["seconds_per_step"] / cached["seconds_per_step"]}
    print(f"\n{name}: gpt2-small ({cached['parameters'] / 1e6:.1f}M non-positional parameters), NPO unlearning step, "
          f"bf16 autocast, batch 32 x 512 tokens")
    print(f"  cached reference: {cached['seconds_per_step'] * 1e3:8.1f} ms/step, "
          f"{cached['tokens_per_second']:,.0f} tokens/s, "
          f"{cached['flops_per_second'] / 1e12:.1f} TFLOP/s"
          + (f" = {cached['flops_per_second'] / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else ""))
    print(f"  live reference:   {live['seconds_per_step'] * 1e3:8.1f} ms/step; live / cached time = "
          f"{result['live_over_cached']:.2f}x", flush=True)
    result["variants"] = {}
    for number, key in enumerate(variants):
        label, options = STEP_VARIANTS[key]
        try:
            variant = step_throughput(device, **options, profile=profile and number == len(variants) - 1)
        except Exception as error:  # a variant the installed versions cannot run is reported, not fatal
            print(f"  {label}: failed ({type(error).__name__}: {error})", flush=True)
            continue
        result["variants"][label] = variant
        print(f"  {label}: {variant['seconds_per_step'] * 1e3:8.1f} ms/step, {variant['tokens_per_second']:,.0f} "
              f"tokens/s, {variant['flops_per_second'] / 1e12:.1f} TFLOP/s"
              + (f" = {variant['flops_per_second'] / peak:.1%} MFU" if peak else ""), flush=True)
        if variant.get("profile"):
            print(variant["profile"], flush=True)
    return result


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    device = resolve_device(arguments.device)
    torch.set_num_threads(arguments.threads)
    machine = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {device} ({machine}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"scale {arguments.scale}, eval every {arguments.eval_every}")
    results = {}
    if not arguments.gpu_step_only:
        results = markov_experiment(arguments, device)
        print_markov_results(results)
    if device == "cuda" and not arguments.skip_gpu_parts:
        results["gpu"] = gpu_measurements(device, arguments.variants, not arguments.skip_live, arguments.profile)
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump(results, file, indent=2, default=lambda x: x.tolist() if isinstance(x, np.ndarray) else str(x))


if __name__ == "__main__":
    main()
