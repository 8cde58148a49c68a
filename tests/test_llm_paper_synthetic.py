"""llm.paper_synthetic: the SimNPO paper's own synthetic transformer as a registered HF model."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from llm.models import build_model, count_parameters, load_model
from llm.paper_synthetic import PaperSyntheticConfig, PaperSyntheticForCausalLM


@pytest.fixture(scope="module")
def model():
    return build_model("paper-synthetic", vocab_size=11, max_length=21, seed=0)


def test_paper_size_has_exactly_336267_parameters(model):
    """Each group of parameters, read off the model's own tensors, against the paper's description (width d = 128,
    4 blocks; built here for 11 tokens and 21 positions), and the total."""
    d, vocab, positions = 128, 11, 21
    sizes = {name: parameter.numel() for name, parameter in model.named_parameters()}
    groups = {"token_embedding.": vocab * d, "position_embedding.": positions * d,
              "output.": d * vocab + vocab}  # the output layer: weight and bias, untied
    # a block: query, key, value d x d without bias; MLP d -> d -> d with biases; two LayerNorms (weight, bias)
    groups |= {f"blocks.{i}.": 3 * d * d + 2 * (d * d + d) + 2 * 2 * d for i in range(4)}
    for prefix, expected in groups.items():
        assert sum(n for name, n in sizes.items() if name.startswith(prefix)) == expected, prefix
    assert all(any(name.startswith(prefix) for prefix in groups) for name in sizes)  # nothing else
    assert sum(groups.values()) == 336_267
    assert count_parameters(model) == count_parameters(model, trainable_only=False) == 336_267


def test_count_parameters_counts_tied_weights_once_and_frozen_ones_only_when_asked():
    """Against the tensors themselves: GPT-2 ties its output layer to the token embedding (one tensor, listed
    twice by ``named_parameters(remove_duplicate=False)``); a frozen group drops out of the trainable count."""
    model = build_model("tiny-gpt2", 11, 21, seed=0)
    tokens = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is tokens
    listed = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert sum(p is tokens for p in listed) == 2
    total = sum(p.numel() for p in listed) - tokens.numel()
    assert count_parameters(model) == count_parameters(model, trainable_only=False) == total
    frozen = model.transformer.h[0]
    frozen.requires_grad_(False)
    frozen_size = sum(p.numel() for p in frozen.parameters())
    assert frozen_size > 0 and count_parameters(model) == total - frozen_size
    assert count_parameters(model, trainable_only=False) == total


def test_architecture_is_post_ln_single_head_without_dropout_or_output_projection(model):
    assert isinstance(model, PaperSyntheticForCausalLM)
    assert not any(isinstance(m, (nn.Dropout, nn.MultiheadAttention)) for m in model.modules())
    block = model.blocks[0]
    assert [n for n, _ in block.named_children()] == ["query", "key", "value", "attention_norm", "mlp_in", "mlp_out",
                                                      "mlp_norm"]
    assert all(getattr(block, n).bias is None for n in ("query", "key", "value"))
    assert block.mlp_in.out_features == block.mlp_out.in_features == 128  # MLP width d, not 4d
    assert len(model.blocks) == 4 and model.output.bias is not None
    assert model.output.weight.data_ptr() != model.token_embedding.weight.data_ptr()  # untied
    assert not any("final" in name or "ln_f" in name for name, _ in model.named_modules())


def test_post_ln_outputs_of_every_block_are_normalised(model):
    """Post-LN: each block ends with a LayerNorm (weight 1, bias 0 at init), so its output has
    zero mean and unit variance over the width at every position - a pre-LN block's would not."""
    x = torch.randint(0, 11, (3, 21))
    outputs = []
    hooks = [block.register_forward_hook(lambda _, __, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        model(input_ids=x)
    for hook in hooks:
        hook.remove()
    for out in outputs:
        torch.testing.assert_close(out.mean(-1), torch.zeros(3, 21), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3, 21), atol=1e-3, rtol=0)


def test_single_head_attention_is_one_softmax_over_the_full_width(model):
    """Reimplement the first block from its weights: one head, scores / sqrt(d), no output projection."""
    block, d = model.blocks[0], 128
    hidden = torch.randn(2, 7, d)
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    with torch.no_grad():
        q, k, v = hidden @ block.query.weight.T, hidden @ block.key.weight.T, hidden @ block.value.weight.T
        weights = torch.softmax((q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~causal, -math.inf), -1)
        h = nn.functional.layer_norm(hidden + weights @ v, (d,), block.attention_norm.weight, block.attention_norm.bias)
        mlp = block.mlp_out(torch.relu(block.mlp_in(h)))
        expected = nn.functional.layer_norm(h + mlp, (d,), block.mlp_norm.weight, block.mlp_norm.bias)
        torch.testing.assert_close(block(hidden, causal), expected)


def test_initialisation_follows_pytorch_defaults_and_the_papers_position_std():
    model = build_model("paper-synthetic", vocab_size=64, max_length=512, seed=1)
    assert abs(model.token_embedding.weight.std().item() - 1.0) < 0.05  # N(0, 1)
    assert abs(model.position_embedding.weight.std().item() - 0.02) < 0.002  # N(0, 0.02)
    weight = model.blocks[0].query.weight  # Kaiming-uniform(a = sqrt 5): U(-1/sqrt(d), 1/sqrt(d))
    bound = 1 / math.sqrt(128)
    assert weight.abs().max().item() <= bound and weight.abs().max().item() > 0.95 * bound
    assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    assert model.blocks[0].mlp_in.bias.abs().max().item() <= bound
    assert torch.equal(model.blocks[0].attention_norm.weight, torch.ones(128))


def test_causal_a_later_token_never_changes_an_earlier_position(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (4, 21), generator=generator)
    with torch.no_grad():
        base = model(input_ids=x).logits
        for cut in (1, 5, 20):
            changed = x.clone()
            changed[:, cut:] = torch.randint(0, 11, (4, 21 - cut), generator=generator)
            logits = model(input_ids=changed).logits
            torch.testing.assert_close(logits[:, :cut], base[:, :cut], rtol=0, atol=0)
            assert not torch.allclose(logits[:, cut:], base[:, cut:])


def test_right_padding_leaves_the_real_positions_unchanged(model):
    x = torch.randint(0, 10, (2, 9))
    padded = torch.cat([x, torch.full((2, 4), 10)], 1)
    mask = torch.cat([torch.ones(2, 9, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits[:, :9],
                                   model(input_ids=x).logits, rtol=1e-6, atol=1e-6)


def test_masked_keys_are_hidden_and_no_row_is_empty(model):
    x = torch.randint(0, 10, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits
        alone = model(input_ids=x[:, 2:]).logits  # same tokens without the masked prefix ...
    assert torch.isfinite(logits).all()
    # ... differ only through the position embedding: shift it back to compare exactly
    shifted = PaperSyntheticForCausalLM(model.config)
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        shifted.position_embedding.weight[:-2] = model.position_embedding.weight[2:]
        torch.testing.assert_close(shifted(input_ids=x[:, 2:]).logits, logits[:, 2:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, logits[:, 2:])


def test_loss_is_the_token_mean_next_token_cross_entropy(model):
    x = torch.randint(0, 11, (3, 8))
    labels = x.clone()
    labels[:, :2] = -100
    out = model(input_ids=x, labels=labels)
    log_probs = torch.log_softmax(out.logits[:, :-1], -1)
    picked = log_probs.gather(-1, x[:, 1:, None])[..., 0][:, 1:]  # labels 2..7
    torch.testing.assert_close(out.loss, -picked.mean())


def test_save_and_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "synthetic")
    loaded = load_model(tmp_path / "synthetic")
    assert isinstance(loaded, PaperSyntheticForCausalLM) and loaded.config.n_head == 1
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 11, (2, 21))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_seed_determines_the_weights():
    first, second, other = (build_model("tiny-synthetic", 11, 21, seed=s) for s in (4, 4, 5))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not torch.equal(first.token_embedding.weight, other.token_embedding.weight)


def test_a_context_longer_than_the_model_is_a_clear_error(model):
    with pytest.raises(ValueError, match="22 positions.*context is 21"):
        model(input_ids=torch.zeros(1, 22, dtype=torch.long))


def test_bf16_autocast_runs_and_stays_close_to_float32(model):
    x = torch.randint(0, 11, (2, 21))
    with torch.no_grad():
        reference = model(input_ids=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids=x).logits.float()
    assert torch.isfinite(low).all()
    assert np.corrcoef(low.flatten().numpy(), reference.flatten().numpy())[0, 1] > 0.99


def test_config_defaults_are_the_papers_sizes():
    config = PaperSyntheticConfig()
    assert (config.n_embd, config.n_layer, config.n_head, config.tie_word_embeddings) == (128, 4, 1, False)
    assert config.hidden_size == 128 and config.num_hidden_layers == 4
