"""llm.lora: optional LoRA adapters (peft); without peft a clear ImportError, with it unlearning trains adapters
only."""

import importlib.util
import sys

import pytest
import torch

from llm.lora import LoraSettings, add_lora
from llm.models import build_model
from llm.train import TrainConfig, unlearn
from markovsim.losses import OBJECTIVES
from markovsim.runtime import torch_threads
from markovsim.scenarios import SCENARIOS

HAS_PEFT = importlib.util.find_spec("peft") is not None


def test_without_peft_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where peft is not installed
    with pytest.raises(ImportError, match="pip install peft"):
        add_lora(build_model("tiny-gpt2", 11, 21))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="alpha"):
        LoraSettings(alpha=0.0)


@pytest.mark.skipif(not HAS_PEFT, reason="needs the optional peft package")
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_unlearning_through_adapters_changes_the_adapters_and_only_them(preset):
    train, _ = SCENARIOS["paper_short_forget2"].scaled(0.01).spec.sample()
    model = add_lora(build_model(preset, 11, 21, seed=0), LoraSettings(rank=2))
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    adapters = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)  # only the adapters are trainable
    with torch_threads(1):
        trajectory = unlearn(model, OBJECTIVES["NPO"], train.select("forget1", "forget2"), None,
                             TrainConfig(learning_rate=1e-2, batch_size=8, steps=3, eval_every=3, device="cpu",
                                         progress=False))
    assert trajectory.diverged_at is None
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed == adapters  # every adapter moved (lora_B starts at zero, so both A and B must train) ...
    # ... and the base is bit-identical
    assert all(torch.equal(before[name], after[name].detach()) for name in before if name not in adapters)
    assert trajectory.step_metrics["parameter_distance"][-1] > 0
