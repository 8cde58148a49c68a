"""Transformer presets for the Markov experiments, built from configs (never downloaded).

Token convention (docs/theory.md, "Notation and conventions"): state ``s`` is token id ``s`` and the
beginning-of-sequence token is id ``V`` (the number of states), so a model for V states has
``vocab_size = V + 1``. Padding reuses the BOS id (attention mask 0, label -100). The model's
context must hold ``1 + L`` tokens (BOS plus the longest sequence).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

__all__ = [
    "ModelPreset",
    "PRESETS",
    "build_config",
    "build_model",
    "load_model",
    "save_model",
    "context_length",
    "vocabulary_size",
    "check_model_data",
    "count_parameters",
]

ARCHITECTURES = ("synthetic", "gpt2", "llama")


@dataclass(frozen=True)
class ModelPreset:
    """A small decoder configuration.

    Attributes:
        architecture: ``"synthetic"`` (the SimNPO paper's own model, :mod:`llm.paper_synthetic`:
            post-LN, one head, MLP width d, N(0, 1) token embeddings, untied output layer),
            ``"gpt2"`` (learned absolute positions, pre-LN, tied embeddings) or ``"llama"``
            (RoPE, RMSNorm, SwiGLU).
        num_layers, num_heads, hidden_size: depth, attention heads, model width (``"synthetic"``
            has one head over the full width: num_heads must be 1).
        intermediate_size: MLP width (llama only; GPT-2 uses 4 * hidden_size).
        num_key_value_heads: grouped-query heads (llama only; None = num_heads).
        dropout: residual, embedding and attention dropout (0 keeps runs deterministic).
        description: what the preset is for.
    """

    architecture: str
    num_layers: int
    num_heads: int
    hidden_size: int
    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    dropout: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        from markovsim.config import check_integer, check_real

        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("num_layers", "num_heads", "hidden_size"):
            check_integer(name, getattr(self, name), 1)
        check_integer("intermediate_size", self.intermediate_size, 1, allow_none=True)
        check_integer("num_key_value_heads", self.num_key_value_heads, 1, allow_none=True)
        check_real("dropout", self.dropout, minimum=0.0, maximum=1.0)
        if not isinstance(self.description, str):
            raise TypeError(f"description must be a string, got {type(self.description).__name__}")
        if self.num_key_value_heads is not None and self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_key_value_heads "
                             f"{self.num_key_value_heads}")
        if self.architecture == "synthetic" and (self.num_heads != 1 or self.dropout != 0):
            raise ValueError(f"the synthetic architecture has one attention head and no dropout; got "
                             f"num_heads={self.num_heads}, dropout={self.dropout}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")


PRESETS: dict[str, ModelPreset] = {
    "paper-synthetic": ModelPreset("synthetic", 4, 1, 128,
                                   description="the SimNPO paper's synthetic model: 4 post-LN blocks of width 128, "
                                               "one head, MLP width 128, N(0,1) token embeddings (336,267 "
                                               "parameters for 10 states)"),
    "gpt2-4x128": ModelPreset("gpt2", 4, 4, 128,
                              description="Hugging Face GPT-2 (pre-LN, 4 heads, 4x GELU MLP, tied embeddings, "
                                          "std-0.02 init), 4 layers, width 128: the paper's size, not its model"),
    "tiny-synthetic": ModelPreset("synthetic", 2, 1, 32, description="the paper's architecture, 2 layers, width 32: "
                                                                      "unit tests"),
    "tiny-gpt2": ModelPreset("gpt2", 2, 2, 32, description="GPT-2, 2 layers, width 32: unit tests"),
    "tiny-llama": ModelPreset("llama", 2, 2, 32, intermediate_size=64, num_key_value_heads=1,
                              description="Llama, 2 layers, width 32, grouped-query attention: unit tests"),
    "gpt2-small": ModelPreset("gpt2", 12, 12, 768,
                              description="GPT-2 small (124M with the GPT-2 vocabulary): GPU benchmarks"),
}


_RENAMED = {"paper-gpt2": "gpt2-4x128 (the GPT-2 preset of the paper's size; the paper's own model is "
                          "paper-synthetic)"}


def _check_preset(preset: str) -> ModelPreset:
    if isinstance(preset, str) and preset in _RENAMED:
        raise ValueError(f"preset {preset!r} was renamed: use {_RENAMED[preset]}")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[preset]


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def build_config(preset: str, vocab_size: int, max_length: int):
    """The ``transformers`` config of ``preset`` for ``vocab_size`` tokens and a ``max_length`` context.

    BOS, EOS and padding all use the last id ``vocab_size - 1`` (the Markov BOS token).
    """
    spec = _check_preset(preset)
    vocab_size = _check_positive_int(vocab_size, "vocab_size")
    max_length = _check_positive_int(max_length, "max_length")
    special = dict(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    if spec.architecture == "synthetic":
        from .paper_synthetic import PaperSyntheticConfig

        return PaperSyntheticConfig(vocab_size=vocab_size, n_positions=max_length, n_embd=spec.hidden_size,
                                    n_layer=spec.num_layers, n_head=spec.num_heads, **special)
    if spec.architecture == "gpt2":
        from transformers import GPT2Config

        # GPT-2's tanh-approximate GELU through PyTorch's fused kernel: the same function as
        # transformers' default "gelu_new" (to ~2e-7) at a quarter of its CPU time
        return GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=spec.hidden_size,
                          n_layer=spec.num_layers, n_head=spec.num_heads, resid_pdrop=spec.dropout,
                          embd_pdrop=spec.dropout, attn_pdrop=spec.dropout, activation_function="gelu_pytorch_tanh",
                          use_cache=False, **special)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_length, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
                       num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                       num_key_value_heads=spec.num_key_value_heads or spec.num_heads,
                       attention_dropout=spec.dropout, use_cache=False, **special)


def build_model(preset: str, vocab_size: int, max_length: int, seed: int = 0):
    """A freshly initialised causal LM of ``preset`` (float32, CPU), deterministic under ``seed``.

    The global torch RNG is left untouched (initialisation runs inside ``torch.random.fork_rng``).

    Args:
        preset: a key of ``PRESETS``.
        vocab_size: V + 1 for V Markov states (the BOS token is id V).
        max_length: context length in tokens, at least 1 + the longest sequence.
        seed: initialisation seed.
    """
    from transformers import AutoModelForCausalLM

    from . import paper_synthetic  # noqa: F401  (registers the paper's model with AutoModelForCausalLM)

    config = build_config(preset, vocab_size, max_length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _check_model_folder(path: str) -> None:
    """ValueError naming ``path`` and the file unless it holds a readable config.json and a weights file."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"path {path!r} is not a local model directory (no config.json); "
                         f"save one with model.save_pretrained(path), or pass local_files_only=False for a hub id")
    try:
        with open(config_file, encoding="utf-8") as file:
            document = json.load(file)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"model directory {path!r}: config.json is unreadable: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("model_type"), str):
        raise ValueError(f"model directory {path!r}: config.json must hold a JSON object with a 'model_type' "
                         f"(as written by save_pretrained)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise ValueError(f"model directory {path!r} has no weights file (expected one of {list(WEIGHT_FILES)})")


def load_model(path: str | os.PathLike, local_files_only: bool = True, progress: bool = True):
    """Any causal-LM checkpoint saved with ``save_pretrained`` (``AutoModelForCausalLM``).

    Args:
        path: a local directory holding ``config.json`` and the weights.
        local_files_only: True (default) never touches the network; pass False to allow a hub id.
        progress: False silences transformers' "Loading weights" bar and notices.
    Raises:
        ValueError: naming the folder and the file when config.json or the weights are missing or
            unreadable (the underlying error chained as the cause).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from . import paper_synthetic  # noqa: F401  (registers the paper's model with AutoModelForCausalLM)
    from .runtime import transformers_output

    path = os.fspath(path)
    if local_files_only:
        _check_model_folder(path)
    try:
        with transformers_output(progress):
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, EOFError, SafetensorError) as error:
        weights = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        raise ValueError(f"cannot load the model in {path!r} (weights file {weights[0] if weights else 'missing'}): "
                         f"{error}") from error


def save_model(model, path: str | os.PathLike, progress: bool = True, tokenizer=None, state_dict=None) -> None:
    """``model.save_pretrained(path)`` (and ``tokenizer.save_pretrained(path)`` when given) atomically:
    written into a temporary sibling folder, then renamed.

    Readers therefore see the old folder or the complete new one, never a half-written model.
    ``progress=False`` silences transformers' "Writing model shards" bar. ``state_dict`` (default: the
    model's own) writes other weights with the model's config, e.g. the full weights that
    ``accelerator.get_state_dict`` gathered from an FSDP-sharded model.
    """
    from .runtime import transformers_output

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp's folder is private (0700); a model folder is not
    try:
        with transformers_output(progress):
            model.save_pretrained(temporary, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def context_length(model) -> int:
    """The number of positions the model can attend over (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the context length of {type(model).__name__} from its config")


def vocabulary_size(model) -> int:
    """The size of the model's output vocabulary."""
    return int(model.config.vocab_size)


def check_model_data(model, sequences, name: str = "sequences") -> None:
    """ValueError unless ``model`` fits the Markov data: vocab_size = V + 1 and context >= 1 + max length.

    Args:
        model: a causal LM with a ``config``.
        sequences: a ``markovsim.data.SequenceSet`` (V = ``num_states``).
        name: the argument name used in error messages.
    """
    from markovsim.data import SequenceSet

    if not isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int):
        raise TypeError(f"model must be a causal LM with a config.vocab_size (e.g. from build_model), "
                        f"got {type(model).__name__}")
    if not isinstance(sequences, SequenceSet):
        raise TypeError(f"{name} must be a markovsim SequenceSet, got {type(sequences).__name__}")
    expected = sequences.num_states + 1
    if vocabulary_size(model) != expected:
        raise ValueError(f"vocabulary mismatch: {name} has {sequences.num_states} states, so the model needs "
                         f"vocab_size {expected} (states + BOS), but it has {vocabulary_size(model)}")
    needed = sequences.max_length + 1
    if needed > context_length(model):
        raise ValueError(f"{name} has sequences of length {sequences.max_length} (+1 BOS = {needed} tokens), "
                         f"longer than the model's context of {context_length(model)} positions; "
                         f"build the model with max_length >= {needed}")


def count_parameters(model, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; tied weights are counted once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) in seen or (trainable_only and not parameter.requires_grad):
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def preset_description(preset: str) -> dict:
    """The preset's fields as a JSON-ready dict."""
    return dataclasses.asdict(_check_preset(preset))
