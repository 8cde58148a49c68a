"""CUDA: the same objectives in bf16 autocast on a GPU (skipped, and reported as skipped, without one)."""

import copy

import numpy as np
import pytest
import torch

from llm.data import encode
from llm.evaluate import model_sequence_logps_batched
from llm.logps import model_sequence_logps
from llm.models import build_model
from llm.objective import BatchCounts, UnlearningBatch, objective_terms
from llm.runtime import autocast
from llm.train import TrainConfig, pretrain, unlearn
from markovsim.losses import OBJECTIVES, get_objective
from markovsim.scenarios import SCENARIOS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = dict(device="cuda", mixed_precision="bf16", progress=False)


@pytest.fixture(scope="module")
def setup():
    train, test = SCENARIOS["paper_short_forget2"].scaled(0.05).spec.sample()
    model = build_model("paper-synthetic", 11, 21, seed=0)
    history = pretrain(model, train, TrainConfig(learning_rate=3e-3, batch_size=64, epochs=3, **GPU))
    return model, history, train


def test_bf16_pretraining_lowers_the_loss_on_cuda(setup):
    model, history, _ = setup
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # autocast only: master weights stay float32
    assert history.losses[-5:].mean() < history.losses[:5].mean() - 0.1


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_bf16_unlearning_with_each_objective_lowers_the_forget_likelihood(setup, name):
    model, _, train = setup
    trajectory = unlearn(copy.deepcopy(model), OBJECTIVES[name], train.select("forget1", "forget2"),
                         train.select("retain"),
                         TrainConfig(learning_rate=2e-3, batch_size=16, steps=8, eval_every=8, **GPU))
    columns = [trajectory.component_names.index(n) for n in ("forget1", "forget2")]
    logp = trajectory.component_metrics["logp_per_token"][:, columns].mean(1)
    assert trajectory.diverged_at is None and logp[-1] < logp[0]


def test_bf16_cached_reference_matches_the_live_reference(setup):
    model, _, train = setup
    model = copy.deepcopy(model)
    reference = copy.deepcopy(model).eval()
    forget = encode(train.select("forget1", "forget2"))
    cached, _ = model_sequence_logps_batched(model, forget, batch_size=256, bf16=True)
    rows = np.arange(0, len(forget), max(1, len(forget) // 16))
    batch = forget.batch(rows, "cuda")
    with torch.no_grad(), autocast("cuda", True):
        live, _ = model_sequence_logps(reference, batch)
    torch.testing.assert_close(cached[rows].float(), live.float().cpu(), rtol=2e-2, atol=5e-2)
    objective = get_objective("NPO", beta=0.2)
    with autocast("cuda", True):
        losses = [objective_terms(model, objective,
                                  UnlearningBatch(batch, ref.to("cuda"), BatchCounts(len(rows)))).total
                  for ref in (cached[rows], live)]
    torch.testing.assert_close(losses[0].float(), losses[1].float(), rtol=2e-2, atol=2e-2)
