"""llm.models: presets built from configs (no network), loading local checkpoints, data/model checks."""

import os

import numpy as np
import pytest
import torch

from llm.models import (
    PRESETS,
    build_config,
    build_model,
    check_model_data,
    context_length,
    count_parameters,
    load_model,
    vocabulary_size,
)
from markovsim.data import SequenceSet


def tiny_set(num_states=10, length=5, n=3):
    tokens = np.random.default_rng(0).integers(0, num_states, size=(n, length))
    return SequenceSet(tokens, np.full(n, length), np.zeros(n, dtype=np.int64), ("c",), num_states)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "gpt2-4x128", "paper-synthetic", "tiny-synthetic"])
def test_preset_builds_and_predicts_every_token(preset):
    model = build_model(preset, vocab_size=11, max_length=21, seed=0)
    logits = model(input_ids=torch.randint(0, 11, (2, 6)), use_cache=False).logits
    assert logits.shape == (2, 6, 11)
    assert vocabulary_size(model) == 11 and context_length(model) == 21


def test_gpt2_4x128_is_a_gpt2_of_the_papers_size():
    config = build_config("gpt2-4x128", 11, 21)
    assert (config.n_layer, config.n_head, config.n_embd) == (4, 4, 128)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    assert config.bos_token_id == config.pad_token_id == 10


def test_gpt2_small_config_has_124m_parameters_with_the_gpt2_vocabulary():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config("gpt2-small", 50257, 1024))
    assert abs(count_parameters(model) - 124.4e6) < 0.5e6


def test_the_old_preset_name_says_what_it_became():
    with pytest.raises(ValueError, match="renamed.*gpt2-4x128.*paper-synthetic"):
        build_model("paper-gpt2", 11, 21)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid presets") as error:
        build_model("gpt5", 11, 21)
    for name in PRESETS:
        assert name in str(error.value)


@pytest.mark.parametrize("arguments, exception", [(("tiny-gpt2", 11.0, 21), TypeError),
                                                  (("tiny-gpt2", 0, 21), ValueError),
                                                  (("tiny-gpt2", 11, -1), ValueError)])
def test_bad_sizes_name_the_argument(arguments, exception):
    with pytest.raises(exception, match="vocab_size|max_length"):
        build_model(*arguments)


def test_seed_determines_the_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second, other = (build_model("tiny-gpt2", 11, 21, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), before)
    pairs = list(zip(first.parameters(), second.parameters(), other.parameters()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)


def test_save_and_load_roundtrip(tmp_path):
    model = build_model("tiny-llama", 11, 21, seed=3)
    model.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    x = torch.randint(0, 11, (2, 7))
    assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_load_model_never_goes_to_the_network_by_default(tmp_path):
    with pytest.raises(ValueError, match="not a local model directory"):
        load_model("gpt2")
    with pytest.raises(ValueError, match="not a local model directory"):
        load_model(tmp_path)


def test_vocabulary_mismatch_is_a_clear_error():
    model = build_model("tiny-gpt2", vocab_size=12, max_length=21)
    with pytest.raises(ValueError, match="vocabulary mismatch.*10 states.*vocab_size 11"):
        check_model_data(model, tiny_set(num_states=10))


def test_sequence_longer_than_the_context_is_a_clear_error():
    model = build_model("tiny-gpt2", vocab_size=11, max_length=5)
    with pytest.raises(ValueError, match="longer than the model's context"):
        check_model_data(model, tiny_set(length=5))
    check_model_data(build_model("tiny-gpt2", 11, 6), tiny_set(length=5))  # BOS + 5 states fit


def test_check_model_data_rejects_other_types():
    with pytest.raises(TypeError, match="sequences must be a markovsim SequenceSet"):
        check_model_data(build_model("tiny-gpt2", 11, 6), np.zeros((2, 3)))


def test_save_model_writes_atomically_and_replaces_an_older_model(tmp_path, monkeypatch):
    from llm.models import save_model

    first, second = build_model("tiny-gpt2", 11, 21, seed=1), build_model("tiny-gpt2", 11, 21, seed=2)
    save_model(first, tmp_path / "model", progress=False)
    save_model(second, tmp_path / "model", progress=False)
    assert os.listdir(tmp_path) == ["model"]  # no temporary folder left behind
    x = torch.randint(0, 11, (2, 7))
    assert torch.equal(load_model(tmp_path / "model").eval()(input_ids=x).logits, second.eval()(input_ids=x).logits)

    def crash(self, path, **kwargs):
        open(os.path.join(path, "config.json"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(type(first), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(first, tmp_path / "model", progress=False)
    assert os.listdir(tmp_path) == ["model"]  # the complete older model is untouched
    assert torch.equal(load_model(tmp_path / "model")(input_ids=x).logits, second(input_ids=x).logits)


@pytest.mark.parametrize("damage, file", [("truncate config.json", "config.json"),
                                          ("remove weights", "model.safetensors"),
                                          ("truncate weights", "model.safetensors")])
def test_a_damaged_model_folder_is_a_value_error_naming_the_folder_and_the_file(tmp_path, damage, file):
    folder = tmp_path / "model"
    build_model("tiny-gpt2", 11, 21).save_pretrained(folder)
    target = folder / file
    if damage.startswith("remove"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    with pytest.raises(ValueError) as raised:
        load_model(folder)
    assert str(folder) in str(raised.value) and file in str(raised.value)
    assert damage.startswith("remove") or raised.value.__cause__ is not None


def test_without_progress_transformers_prints_no_bars(tmp_path, capfd):
    from llm.models import save_model

    model = build_model("tiny-gpt2", 11, 21)
    save_model(model, tmp_path / "model", progress=False)
    load_model(tmp_path / "model", progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    save_model(model, tmp_path / "model", progress=True)  # the bars this switches off (a test that can fail)
    load_model(tmp_path / "model", progress=True)
    assert "Loading weights" in capfd.readouterr().err
