"""The shared run settings (markovsim.config.RunSettings) and the one divergence rule, tested once here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llm.config import TrainConfig
from markovsim.config import DEFAULT_DIVERGENCE_LOGP_PER_TOKEN, RunSettings, divergence_reason, field_help
from markovsim.dynamics import DynamicsConfig, clip_by_global_norm

BAD_VALUES = [
    ("optimizer", "sgd", ValueError),
    ("optimizer", 3, TypeError),
    ("learning_rate", 0.0, ValueError),
    ("learning_rate", -1.0, ValueError),
    ("learning_rate", math.nan, ValueError),
    ("learning_rate", math.inf, ValueError),
    ("learning_rate", "0.1", TypeError),
    ("learning_rate", True, TypeError),
    ("adam_betas", (0.9,), ValueError),
    ("adam_betas", (0.9, 1.0), ValueError),
    ("adam_betas", (-0.1, 0.9), ValueError),
    ("adam_betas", (0.9, math.nan), ValueError),
    ("adam_eps", -1.0, ValueError),
    ("adam_eps", 0.0, ValueError),
    ("adam_eps", math.nan, ValueError),
    ("weight_decay", -0.01, ValueError),
    ("weight_decay", math.inf, ValueError),
    ("max_grad_norm", 0.0, ValueError),
    ("max_grad_norm", math.nan, ValueError),
    ("seed", -1, ValueError),
    ("seed", 1.5, TypeError),
    ("seed", True, TypeError),
    ("progress", 1, TypeError),
    ("progress", "yes", TypeError),
    ("divergence_logp_per_token", math.nan, ValueError),
    ("divergence_logp_per_token", -math.inf, ValueError),
    ("divergence_logp_per_token", 0.0, ValueError),
]


@pytest.mark.parametrize("cls", [RunSettings, DynamicsConfig, TrainConfig])
@pytest.mark.parametrize("name,value,error", BAD_VALUES)
def test_every_shared_field_is_validated_with_an_error_naming_it(cls, name, value, error):
    with pytest.raises(error, match=name):
        cls(**{name: value})


def test_dynamics_config_is_run_settings_with_the_same_defaults():
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    assert issubclass(DynamicsConfig, RunSettings)
    assert {f.name: f.default for f in dataclasses.fields(DynamicsConfig) if f.name in shared} == \
           {f.name: f.default for f in dataclasses.fields(RunSettings)}
    defaults = RunSettings()
    assert (defaults.weight_decay, defaults.max_grad_norm, defaults.divergence_logp_per_token) == \
           (0.0, None, DEFAULT_DIVERGENCE_LOGP_PER_TOKEN)
    assert all(field_help(f) for f in dataclasses.fields(DynamicsConfig)), "every field documents itself"


def test_train_config_is_run_settings_with_one_default_per_field_but_the_learning_rate():
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    assert issubclass(TrainConfig, RunSettings)
    differing = {f.name for f in dataclasses.fields(TrainConfig)
                 if f.name in shared and f.default != RunSettings.__dataclass_fields__[f.name].default}
    assert differing == {"learning_rate"}  # 5e-4 for a transformer, documented in the field's help
    assert all(field_help(f) for f in dataclasses.fields(TrainConfig)), "every field documents itself"


def test_gd_takes_no_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        RunSettings(optimizer="gd", weight_decay=0.1)


def test_keyword_construction_and_normalisation():
    config = DynamicsConfig(optimizer="gd", learning_rate=1, steps=3, adam_betas=[0.5, 0.6], seed=2,
                            divergence_logp_per_token=None, max_grad_norm=2.0)
    assert config.adam_betas == (0.5, 0.6) and config.steps == 3 and config.divergence_logp_per_token is None
    with pytest.raises(ValueError, match="steps"):
        DynamicsConfig(steps=-1)


@pytest.mark.parametrize("arguments,expected", [
    (dict(loss=math.nan), "loss is nan"),
    (dict(loss=math.inf, logp_per_token=-1.0), "loss is inf"),
    (dict(loss=1.0, grad_norm=math.nan), "gradient norm is nan"),
    (dict(loss=1.0, logp_per_token=-math.inf, threshold=None), "log-likelihood per token is -inf"),
    (dict(loss=1.0, logp_per_token=-63.1, threshold=-50.0), "log-likelihood per token -63.1 fell below -50.0"),
])
def test_divergence_reason_names_the_cause(arguments, expected):
    assert expected in divergence_reason(**arguments)


@pytest.mark.parametrize("arguments", [
    dict(loss=-3.0),
    dict(loss=0.5, logp_per_token=-49.9, grad_norm=1e30, threshold=-50.0),
    dict(loss=0.5, logp_per_token=-1e6, grad_norm=0.0, threshold=None),
])
def test_divergence_reason_is_none_for_a_healthy_step(arguments):
    assert divergence_reason(**arguments) is None


def test_clip_by_global_norm_rescales_only_above_the_limit():
    grads = (torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64))  # norm 5
    clipped = clip_by_global_norm(grads, 1.0)
    assert math.isclose(float(torch.sqrt(sum((g * g).sum() for g in clipped))), 1.0)
    assert torch.allclose(clipped[0] / clipped[1].reshape(-1)[0], grads[0] / 4.0)  # direction kept
    assert clip_by_global_norm(grads, 10.0) is grads and clip_by_global_norm(grads, None) is grads
