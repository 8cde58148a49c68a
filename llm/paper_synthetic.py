"""The SimNPO paper's own synthetic transformer, as a registered Hugging Face model.

The model of the paper's Markov-chain experiment (SimNPO, Sec. 5 / App. H; official code
``OPTML-Group/Unlearn-Simple``, ``synthetic/``), rebuilt as a ``PretrainedConfig`` +
``PreTrainedModel`` pair registered with ``AutoConfig`` / ``AutoModelForCausalLM`` so that
``save_pretrained``, ``load_model``, accelerate, bf16 autocast and every ``llm`` loop use it
unchanged. See docs/theory.md, "The paper's synthetic transformer".

For tokens ``x`` (B, T)::

    h_0     = E[x] + P[0..T-1]                               E ~ N(0, 1), P ~ N(0, 0.02)    (B, T, d)
    block:  a = softmax(mask(Q h K h^T / sqrt(d))) V h       one head over the full width   (B, T, d)
            h = LayerNorm(h + a)                             no output projection, post-LN
            h = LayerNorm(h + W_2 relu(W_1 h + b_1) + b_2)   MLP width d (not 4d), post-LN
    logits  = W_o h_L + b_o                                  untied, no final LayerNorm      (B, T, V)

Q, K, V are bias-free ``Linear(d, d)``; every ``Linear`` and the token embedding keep PyTorch's
default initialisation (Kaiming-uniform weights, uniform biases, N(0, 1) embeddings); the position
embedding is N(0, 0.02); there is no dropout. The head count of the paper's configuration (4) is
not used by its model: attention has a single head of width d. The mask is causal; positions whose
``attention_mask`` is 0 are also hidden from later positions (a position always sees itself, so
no row is empty). The forward pass has no data-dependent Python control flow.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4.x
    from torch.nn import init as _init

__all__ = ["MODEL_TYPE", "PaperSyntheticConfig", "PaperSyntheticForCausalLM"]

MODEL_TYPE = "simnpo_synthetic"


class PaperSyntheticConfig(PretrainedConfig):
    """Configuration of :class:`PaperSyntheticForCausalLM`.

    Args:
        vocab_size: output and input vocabulary (V + 1 for V Markov states and BOS).
        n_positions: context length.
        n_embd: model width d (paper: 128).
        n_layer: number of blocks (paper: 4).
        n_head: recorded for reference only; attention has ONE head of width d, as in the paper's model.
        layer_norm_epsilon: LayerNorm epsilon (PyTorch default 1e-5).
        position_init_std: standard deviation of the position embedding's initialisation (0.02).
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "n_positions"}

    def __init__(self, vocab_size: int = 11, n_positions: int = 21, n_embd: int = 128, n_layer: int = 4,
                 n_head: int = 1, layer_norm_epsilon: float = 1e-5, position_init_std: float = 0.02, **kwargs):
        self.vocab_size, self.n_positions, self.n_embd = vocab_size, n_positions, n_embd
        self.n_layer, self.n_head = n_layer, n_head
        self.layer_norm_epsilon, self.position_init_std = layer_norm_epsilon, position_init_std
        kwargs.setdefault("tie_word_embeddings", False)  # the paper's output layer is its own Linear
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


class _Block(nn.Module):
    """Single-head attention without output projection, then a width-d ReLU MLP; both post-LN."""

    def __init__(self, width: int, epsilon: float):
        super().__init__()
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.attention_norm = nn.LayerNorm(width, eps=epsilon)
        self.mlp_in = nn.Linear(width, width)
        self.mlp_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width, eps=epsilon)
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, hidden: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B, T, d), ``visible`` (B, T, T) bool: may query t attend to key s."""
        scores = self.query(hidden) @ self.key(hidden).transpose(-1, -2) * self.scale  # (B, T, T)
        scores = scores.masked_fill(~visible, float("-inf"))
        attended = torch.softmax(scores, dim=-1) @ self.value(hidden)  # (B, T, d)
        hidden = self.attention_norm(hidden + attended)
        return self.mlp_norm(hidden + self.mlp_out(torch.relu(self.mlp_in(hidden))))  # (B, T, d)


class PaperSyntheticForCausalLM(PreTrainedModel):
    """The paper's synthetic decoder (module docstring) with the causal-LM interface of ``transformers``."""

    config_class = PaperSyntheticConfig
    base_model_prefix = "synthetic"
    _no_split_modules = ["_Block"]
    main_input_name = "input_ids"

    def __init__(self, config: PaperSyntheticConfig):
        super().__init__(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.n_positions, config.n_embd)
        self.blocks = nn.ModuleList(_Block(config.n_embd, config.layer_norm_epsilon) for _ in range(config.n_layer))
        self.output = nn.Linear(config.n_embd, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's defaults (what the paper's model gets), except the position embedding's N(0, 0.02)."""
        if isinstance(module, nn.Linear):
            _init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                _init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            std = self.config.position_init_std if module is self.position_embedding else 1.0
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_embedding = value

    def get_output_embeddings(self) -> None:
        return None  # untied: nothing for transformers to tie to the input embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Logits (B, T, vocab); with ``labels`` (B, T, -100 = ignored) also the token-mean next-token loss.

        Extra keyword arguments of the ``transformers`` interface (``use_cache``, ``return_dict``, ...)
        are accepted and ignored: the model keeps no cache.
        """
        length = input_ids.shape[1]
        if length > self.config.n_positions:
            raise ValueError(f"input_ids has {length} positions but the model's context is "
                             f"{self.config.n_positions}; build it with a larger max_length")
        positions = torch.arange(length, device=input_ids.device)  # (T,)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, d)
        visible = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        if attention_mask is not None:
            keys = attention_mask[:, None, :].bool() | torch.eye(length, dtype=torch.bool, device=input_ids.device)
            visible = visible & keys  # (B, T, T)
        else:
            visible = visible.expand(input_ids.shape[0], length, length)
        for block in self.blocks:
            hidden = block(hidden, visible)
        logits = self.output(hidden)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, PaperSyntheticConfig, exist_ok=True)
AutoModelForCausalLM.register(PaperSyntheticConfig, PaperSyntheticForCausalLM, exist_ok=True)
