"""Data parallelism: 2 CPU processes (accelerate, gloo) give the same losses as 1 at the same global batch.

The two processes are started like ``torchrun`` does (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT in the environment); ``accelerate`` then sets up gloo on CPU.
"""

import json
import os

import numpy as np
import pytest
from two_processes import launch_two


def run_pretrain_and_unlearn(output: str, run_dir: str | None = None) -> None:
    """Pre-train a tiny GPT-2 3 steps, then NPO+KL 3 steps (odd batch sizes: uneven shards); write losses."""
    import torch

    from llm.models import build_model
    from llm.train import TrainConfig, pretrain, unlearn
    from markovsim.losses import get_objective
    from markovsim.scenarios import SCENARIOS

    torch.set_num_threads(1)
    train, _ = SCENARIOS["paper_short_forget2"].scaled(0.01).spec.sample()
    model = build_model("tiny-gpt2", 11, 21, seed=0)
    history = pretrain(model, train,
                       TrainConfig(batch_size=17, steps=3, learning_rate=2e-3, device="cpu", progress=False))
    trajectory = unlearn(model, get_objective("NPO+KL", beta=0.5), train.select("forget1", "forget2"),
                         train.select("retain"),
                         TrainConfig(batch_size=5, retain_batch_size=7, steps=3, eval_every=1, checkpoint_every=2,
                                     device="cpu", progress=False), run_dir=run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(output, "w") as file:
            json.dump({"pretrain": history.losses.tolist(), "unlearn": trajectory.step_metrics["loss"].tolist(),
                       "kl_reference": trajectory.component_metrics["kl_reference"].tolist(),
                       "num_processes": [history.num_processes, trajectory.info["num_processes"]]}, file)


def launch_two_processes(output: str, run_dir: str) -> None:
    launch_two("test_llm_distributed", "run_pretrain_and_unlearn", output, run_dir)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path):
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run_pretrain_and_unlearn(one)
    launch_two_processes(two, str(tmp_path / "run"))
    single, double = (json.load(open(path)) for path in (one, two))
    assert single["num_processes"] == [1, 1] and double["num_processes"] == [2, 2]
    for key in ("pretrain", "unlearn", "kl_reference"):
        np.testing.assert_allclose(double[key], single[key], rtol=1e-4, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps.count(0) == 2  # one train and one eval record: written once, by process 0
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-0000002")


def process_group_ended(output: str) -> None:
    """Start gloo on this process's rank (as a launch does), then end it with ``llm.runtime.end_distributed``."""
    import torch.distributed as dist

    from llm.runtime import end_distributed

    dist.init_process_group("gloo")
    before = dist.is_initialized()
    end_distributed()
    end_distributed()  # a second call (or one without a launch) is a no-op
    print(json.dumps({"before": before, "after": dist.is_initialized()}))


def test_end_distributed_destroys_the_process_group_once_the_work_is_done(tmp_path):
    outputs = launch_two("test_llm_distributed", "process_group_ended", str(tmp_path))
    for text in outputs:
        record = json.loads(text.strip().splitlines()[-1])
        assert record == {"before": True, "after": False}
