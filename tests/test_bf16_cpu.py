"""bf16 autocast on the CPU, so that runs without a GPU (CI) exercise the mixed-precision path of ``llm``.

``llm.runtime.autocast`` autocasts on CUDA only (tests/test_llm_cuda.py covers that); the arithmetic it relies on
(bf16 logits upcast to float32 before the log-softmax, float32 log-likelihoods and gradients, master weights
in float32) is the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``. The first test runs the log-
likelihoods and an objective's gradient under CPU autocast against float32; the second runs the unlearning loop
with its bf16 switch on (``Session.bf16``: reference log-likelihoods, training steps, evaluation and diagnostics
under autocast) on the CPU against the float32 run.
"""

import contextlib
import copy

import numpy as np
import pytest
import torch

from llm.data import encode
from llm.logps import model_logits, model_sequence_logps
from llm.models import build_model
from llm.objective import BatchCounts, UnlearningBatch, objective_terms
from llm.train import TrainConfig, unlearn
from markovsim.losses import get_objective


def cpu_bf16_autocast() -> bool:
    """Whether this torch build autocasts a CPU matmul to bf16."""
    try:
        if not torch.amp.is_autocast_available("cpu"):
            return False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except (AttributeError, RuntimeError):
        return False


pytestmark = pytest.mark.skipif(not cpu_bf16_autocast(),
                                reason="this torch build has no bf16 autocast on the CPU "
                                       "(torch.autocast('cpu', dtype=torch.bfloat16))")

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-gpt2", "tiny-llama"])
def test_logps_and_gradients_under_cpu_bf16_autocast_are_float32_and_near_float32(data, preset):
    model = build_model(preset, 11, 21, seed=0)
    batch = encode(data["forget"]).batch(np.arange(12))
    with torch.no_grad():
        reference, num_tokens = model_sequence_logps(model, batch)  # float32, no autocast
        with torch.autocast(**BF16):
            assert model_logits(model, batch).dtype == torch.bfloat16  # autocast is on
            logps, counts = model_sequence_logps(model, batch)
    assert logps.dtype == torch.float32 and torch.equal(counts, num_tokens)
    torch.testing.assert_close(logps, reference, rtol=2e-2, atol=0.1)
    assert not torch.equal(logps, reference)  # the bf16 forward really ran

    objective = get_objective("NPO+KL", beta=0.5)
    retain = encode(data["retain"])
    unlearning = UnlearningBatch(batch, reference.double() - 0.5,
                                 BatchCounts(12, 12, int(retain.num_label_tokens[:12].sum())),
                                 retain=retain.batch(np.arange(12)))
    gradients = []
    for context in (contextlib.nullcontext(), torch.autocast(**BF16)):
        model.zero_grad()
        with context:
            terms = objective_terms(model, objective, unlearning, reference=copy.deepcopy(model).eval())
        assert terms.total.dtype in (torch.float32, torch.float64) and torch.isfinite(terms.total)
        terms.total.backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
        gradients.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    cosine = torch.nn.functional.cosine_similarity(gradients[0], gradients[1], dim=0)
    assert cosine > 0.99, float(cosine)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


def test_unlearning_loop_with_bf16_switched_on_runs_on_the_cpu_near_float32(data, monkeypatch):
    """``Session.bf16`` True on the CPU (``llm.runtime`` allows it on CUDA only: patched here), the loop's
    every autocast a CPU bf16 autocast: the run finishes, lowers the forget likelihood and stays near float32."""
    from llm import diagnostics, evaluate, session

    entered = []

    def autocast(device_type, bf16):
        entered.append(bf16)
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    model = build_model("tiny-gpt2", 11, 21, seed=0)
    config = TrainConfig(learning_rate=2e-3, batch_size=8, steps=4, eval_every=2, device="cpu", progress=False,
                         mixed_precision="no")
    objective = get_objective("NPO", beta=0.5)
    float32 = unlearn(copy.deepcopy(model), objective, data["forget"], data["retain"], config)
    for module in (session, evaluate, diagnostics):
        monkeypatch.setattr(module, "autocast", autocast)
    monkeypatch.setattr(session, "use_bf16", lambda device, mixed_precision: True)
    trained = copy.deepcopy(model)
    bf16 = unlearn(trained, objective, data["forget"], data["retain"], config)
    assert entered and all(entered)  # every forward of the run under bf16 autocast
    assert all(p.dtype == torch.float32 for p in trained.parameters())  # master weights stay float32
    assert bf16.diverged_at is None and list(bf16.steps) == list(float32.steps) == [0, 2, 4]
    columns = [bf16.component_names.index(n) for n in ("forget1", "forget2")]
    logp = bf16.component_metrics["logp_per_token"][:, columns].mean(1)
    assert logp[-1] < logp[0]
    # the default evaluator (no true chains): log-likelihoods, KL to the starting model, the diagnostics; bf16 moved
    # them by < 1e-4 relative (logps), < 5e-4 absolute (the rest) when this was written
    tolerances = {"logp_per_token": dict(rtol=1e-3, atol=0), "kl_reference": dict(rtol=0, atol=2e-3),
                  "mean_weight": dict(rtol=0, atol=5e-3), "power_share": dict(rtol=0, atol=5e-3)}
    for metric, tolerance in tolerances.items():
        values, expected = bf16.component_metrics[metric], float32.component_metrics[metric]
        assert np.isfinite(values[np.isfinite(expected)]).all() and np.isfinite(expected[1:, 1:]).all(), metric
        np.testing.assert_allclose(values, expected, err_msg=metric, **tolerance)
    assert (bf16.component_metrics["kl_reference"][-1] > 0.005).all()  # the model moved: the comparison is not vacuous
    assert not np.array_equal(bf16.component_metrics["logp_per_token"], float32.component_metrics["logp_per_token"])
