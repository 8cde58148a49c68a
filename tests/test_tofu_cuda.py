"""CUDA: the TOFU path on a GPU (skipped, and reported as skipped, without one).

* the tiny protocol end to end on cuda (training under bf16 autocast, float32 master weights);
* the evaluation metrics of one model on cuda equal the cpu ones (both float32);
* the cached NPO reference log-probs (computed once, in eval batches, under bf16 autocast) agree with
  a live reference model's on the training batch, and NPO's forget loss starts at (2 / beta) log 2.

Tolerances. Float32 on cuda vs cpu (no TF32: PyTorch leaves ``allow_tf32`` off for matmuls) differ by
reduction order only, ~1e-6 relative per logit, so log-likelihoods summed over ~30 answer tokens agree
to ~1e-4: probabilities and truth ratios are compared at rtol 1e-3. Greedy generations can flip where
the top two logits of the random tiny model tie to ~1e-6, so ROUGE-L is compared item by item and at
most one item per set may differ. Under bf16 autocast a log-probability carries ~1e-2 relative error
per token and kernels differ with the batch shape (eval batches vs the training batch), so the cached
and live references are compared at rtol 2e-2 / atol 5e-2 (as tests/test_llm_cuda.py does).
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm.config import TrainConfig
from llm.logps import model_sequence_logps
from llm.objective import BatchCounts, UnlearningBatch, objective_terms
from llm.runtime import autocast
from llm.tofu.data import load_split
from llm.tofu.evaluate import EVAL_SETS, evaluate_model, load_eval_sets
from llm.tofu.finetune import Examples, unlearn
from llm.tofu.protocol import Protocol, ProtocolConfig
from llm.tofu.scoring import answer_logps
from markovsim.losses import get_objective

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE, BF16 = "cuda", True


def test_tiny_protocol_end_to_end_on_cuda(base, tmp_path):
    pytest.importorskip("rouge_score")  # the "tofu" extra (benchmarks/device_checks.sh --prepare-tofu carries it)
    from safetensors.torch import load_file

    config = ProtocolConfig(split="forget01", methods=("NPO", "SimNPO+RT"), model=base, limit=4, batch_size=4,
                            finetune_steps=3, unlearn_steps=2, max_new_tokens=3, eval_batch_size=64, progress=False,
                            relearn_steps=(0, 1), device=DEVICE)
    protocol = Protocol(config, tmp_path / "run")
    assert protocol.run() == protocol.stages()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["models"]) == ["target", "retain", "npo", "simnpo-rt"]
    assert results["models"]["retain"]["forget_quality"] == pytest.approx(1.0)
    for stage in ("target", "retain", "unlearn-npo", "unlearn-simnpo-rt"):
        record = protocol.record(stage)
        assert math.isfinite(record["last_loss"]) and record.get("diverged_at") is None, record
    weights = load_file(tmp_path / "run" / "models" / "npo" / "model.safetensors")
    assert all(value.dtype == torch.float32 for value in weights.values())  # autocast only: float32 weights
    start = tiny_llama(len(tiny_tokenizer(chat=True))).state_dict()
    assert max(float((weights[k] - start[k]).abs().max()) for k in weights) > 1e-6  # the stages trained


def test_evaluation_metrics_on_cuda_equal_cpu(base):
    pytest.importorskip("rouge_score")
    from llm.tofu.model import load_causal_lm

    model, tokenizer = load_causal_lm(base)
    sets = {name: items[:5] for name, items in load_eval_sets("forget01", limit=5).items()}
    on_cpu = evaluate_model(model, tokenizer, sets=sets, max_new_tokens=4, batch_size=3)
    on_gpu = evaluate_model(copy.deepcopy(model).to(DEVICE), tokenizer, sets=sets, max_new_tokens=4, batch_size=3)
    for name in EVAL_SETS:
        cpu, gpu = on_cpu["sets"][name], on_gpu["sets"][name]
        np.testing.assert_allclose(gpu["probability"], cpu["probability"], rtol=1e-3, err_msg=name)
        np.testing.assert_allclose(gpu["truth_ratios"], cpu["truth_ratios"], rtol=1e-3, err_msg=name)
        differing = sum(a != b for a, b in zip(gpu["rouge_l_per_item"], cpu["rouge_l_per_item"]))
        assert differing <= 1, (name, cpu["generations"], gpu["generations"])


def test_cached_reference_matches_the_live_reference_on_cuda(tmp_path):
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer)).to(DEVICE)
    forget = load_split("forget01")[:8]
    with autocast(DEVICE, BF16):  # as unlearn() caches it: eval batches of 3, under the run's autocast
        cached = torch.as_tensor(answer_logps(model, tokenizer, [i.question for i in forget],
                                              [i.answer for i in forget], batch_size=3)[0])  # (8,)
    batch = Examples.build(tokenizer, forget).batch(range(8), DEVICE)  # the training batch: all 8 at once
    reference = copy.deepcopy(model).eval()
    with torch.no_grad(), autocast(DEVICE, BF16):
        live, _ = model_sequence_logps(reference, batch)  # (8,)
    torch.testing.assert_close(cached.float(), live.float().cpu(), rtol=2e-2, atol=5e-2)
    objective = get_objective("NPO", beta=0.5)
    with torch.no_grad(), autocast(DEVICE, BF16):
        losses = [objective_terms(model, objective, UnlearningBatch(batch, ref.to(DEVICE), BatchCounts(8))).total
                  for ref in (cached, live)]
    torch.testing.assert_close(losses[0].float(), losses[1].float(), rtol=2e-2, atol=2e-2)
    # the cached reference inside unlearn(): its first step starts at pi = pi_ref, where NPO's loss is (2/beta) log 2
    config = TrainConfig(batch_size=8, steps=1, learning_rate=1e-5, device=DEVICE, mixed_precision="bf16",
                         eval_batch_size=3, progress=False)
    unlearn(tiny_llama(len(tokenizer)), tokenizer, objective, forget, None, config, tmp_path / "npo")
    records = [json.loads(line) for line in (tmp_path / "npo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("kind") == "train")
    assert first["step"] == 0 and first["forget"] == pytest.approx(2 / 0.5 * math.log(2), abs=5e-2)
