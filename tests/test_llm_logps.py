"""llm.logps: the bridge to the shared reducer, checked against the simulator's exact TabularMarkov."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from strategies import mixture_specs, random_chain

from llm.bridge import TabularCausalLM
from llm.data import encode
from llm.logps import NonFiniteLogitsError, labelled_token_logps, model_sequence_logps
from llm.models import build_model
from markovsim.models import TabularMarkov
from markovsim.scenarios import paper_mixture_spec


def random_tabular(num_states: int, seed: int) -> TabularMarkov:
    return TabularMarkov.from_chain(random_chain(np.random.default_rng(seed), num_states))


@settings(max_examples=25, deadline=None)
@given(mixture_specs())
def test_sequence_logps_of_the_wrapped_tabular_model_is_its_exact_likelihood(spec):
    train, _ = spec.sample()
    tabular = random_tabular(spec.num_states, seed=len(train))
    model = TabularCausalLM(tabular)
    everything = np.arange(len(train))
    logps, num_tokens = model_sequence_logps(model, encode(train, "response").batch(everything))
    torch.testing.assert_close(logps, tabular.response_logps(train), rtol=0, atol=1e-12)
    assert np.array_equal(num_tokens.numpy(), train.num_tokens)
    full, _ = model_sequence_logps(model, encode(train, "all").batch(everything))
    torch.testing.assert_close(full, tabular.logps(train), rtol=0, atol=1e-12)


def test_gradients_of_the_bridge_equal_the_closed_form():
    train, _ = paper_mixture_spec(scale=0.002).sample()
    tabular = random_tabular(10, seed=0)
    model = TabularCausalLM(tabular)
    weights = torch.linspace(0.1, 1.0, len(train), dtype=torch.float64)
    logps, _ = model_sequence_logps(model, encode(train).batch(np.arange(len(train))))
    (weights * logps).sum().backward()
    _, expected = tabular.response_logps_gradient(train, weights)
    torch.testing.assert_close(model.transition_logits.grad, expected, rtol=1e-10, atol=1e-12)


def test_padding_changes_neither_logps_nor_num_tokens():
    train, _ = paper_mixture_spec(forget2_length=5, scale=0.002).sample()
    model = build_model("tiny-gpt2", 11, 21, seed=0).eval()
    encoded = encode(train)
    short = int(np.flatnonzero(train.lengths == 5)[0])
    alone = model_sequence_logps(model, encoded.batch([short]))  # width 6
    padded = model_sequence_logps(model, encoded.batch([short, 0]))  # width 21
    torch.testing.assert_close(alone[0], padded[0][:1], rtol=1e-5, atol=1e-5)
    assert alone[1].item() == padded[1][0].item() == 4


def test_labelled_token_logps_follow_the_hugging_face_shift():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    labels = torch.tensor([[-100, 1, 0]])
    token_logps, mask = labelled_token_logps(logits, labels)
    torch.testing.assert_close(token_logps, torch.log(torch.tensor([[0.5, 0.25]])))
    assert mask.tolist() == [[True, True]]


def test_non_finite_logits_raise_the_divergence_signal():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteLogitsError):
        labelled_token_logps(logits, torch.tensor([[-100, 1, 2]]))
    labelled_token_logps(logits, torch.tensor([[-100, 1, -100]]))  # NaN only where no loss applies: fine


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="logits must be"):
        labelled_token_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
