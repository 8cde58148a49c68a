"""Fixtures shared by the test modules."""

import pytest

from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors everywhere: one torch thread avoids thread start-up dominating on 2 cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data():
    """paper_short_forget2 at 1% scale: train/test splits, forget and retain sets, the true chains."""
    scenario = SCENARIOS["paper_short_forget2"].scaled(0.01)
    train, test = scenario.spec.sample()
    return {"train": train, "test": test, "forget": train.select("forget1", "forget2"),
            "retain": train.select("retain"), "chains": {c.name: c.chain for c in scenario.spec.components}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny TOFU base checkpoint on disk (random 2-layer Llama + word-level chat tokenizer; ``--model PATH``)."""
    from test_tofu_fixtures import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")
