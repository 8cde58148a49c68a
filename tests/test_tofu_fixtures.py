"""Tiny offline stand-ins for the TOFU tests: a word-level tokenizer (with or without a chat template)
and a random 2-layer Llama. Imported by the other test_tofu_* modules."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ("what is the capital of france paris who wrote a book an author born in city question answer : ? . , "
         "she he writes novels about cats dogs Question Answer").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """Lower-case word-level tokenizer; BOS prepended by its post-processor; optional chat template."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 32), float32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def save_tiny_checkpoint(folder) -> str:
    """The tiny Llama + the chat-template tokenizer saved as a local checkpoint (what ``--model PATH`` loads)."""
    tokenizer = tiny_tokenizer(chat=True)
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_tiny_tokenizer_round_trip():
    tok = tiny_tokenizer(chat=False)
    ids = tok("what is the capital of france ?")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "what is the capital of france ?"
