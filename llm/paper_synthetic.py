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

:func:`stacked_logits` is the same forward pass for N replicas on stacked parameters (the
``"stacked"`` route of ``llm.replicas.ReplicaStack``): every ``Linear`` one batched matmul with its
bias fused in (``baddbmm``), gradients from batched matmuls.
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

__all__ = ["MODEL_TYPE", "PaperSyntheticConfig", "PaperSyntheticForCausalLM", "stacked_logits"]

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


class _StackedLinear(torch.autograd.Function):
    """``x W_i^T + b_i`` for every replica i as one batched matmul, with batched-matmul gradients.

    Shapes: x (N, M, in), weight (N, out, in), bias (N, out) or None -> (N, M, out). Forward is
    ``baddbmm(b, x, W^T)`` (the stacked counterpart of ``nn.Linear``'s fused ``addmm``); backward::

        dx = dy W   (N, M, out) @ (N, out, in);   dW = dy^T x   (N, out, M) @ (N, M, in);   db = sum_M dy

    so every gradient comes out contiguous in its parameter's own layout (no transposed copy).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _stacked_layer_norm(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, epsilon: float) -> torch.Tensor:
    """LayerNorm of (N, M, d) with replica i's affine weight/bias (N, d)."""
    normalised = nn.functional.layer_norm(hidden, hidden.shape[-1:], None, None, epsilon)
    return torch.addcmul(bias.unsqueeze(1), normalised, weight.unsqueeze(1))


def stacked_logits(config: PaperSyntheticConfig, parameters: dict[str, torch.Tensor], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The forward pass of N :class:`PaperSyntheticForCausalLM` replicas at once, on stacked parameters.

    Args:
        config: the replicas' shared configuration.
        parameters: ``{name: (N, *shape)}`` (the names of ``PaperSyntheticForCausalLM.named_parameters``).
        input_ids, attention_mask: (N, B, T) int64, replica i's batch in row i.
    Returns: logits (N, B, T, vocab); replica i's equal those of ``forward`` with replica i's parameters.

    The same computation as ``forward`` (module docstring), every ``Linear`` a batched matmul over the
    replica axis (:class:`_StackedLinear`), attention a batched matmul over (replica, row).
    """
    replicas, rows, length = input_ids.shape
    if length > config.n_positions:
        raise ValueError(f"input_ids has {length} positions but the model's context is {config.n_positions}")
    width, p = config.n_embd, parameters
    tokens = p["token_embedding.weight"]  # (N, V, d)
    replica_index = torch.arange(replicas, device=input_ids.device)[:, None, None]  # (N, 1, 1)
    hidden = tokens[replica_index, input_ids] + p["position_embedding.weight"][:, None, :length]  # (N, B, T, d)
    visible = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
    if attention_mask is not None:
        keys = attention_mask[..., None, :].bool() | torch.eye(length, dtype=torch.bool, device=input_ids.device)
        visible = (visible & keys).reshape(replicas * rows, length, length)  # (N B, T, T)
    else:
        visible = visible.expand(replicas * rows, length, length)
    hidden = hidden.reshape(replicas, rows * length, width)  # (N, M, d), M = B T
    scale = 1.0 / math.sqrt(width)

    def linear(name, x, bias=True):
        return _StackedLinear.apply(x, p[f"{name}.weight"], p[f"{name}.bias"] if bias else None)

    for layer in range(config.n_layer):
        prefix = f"blocks.{layer}"
        query, key, value = (linear(f"{prefix}.{part}", hidden, bias=False).reshape(replicas * rows, length, width)
                             for part in ("query", "key", "value"))  # (N B, T, d)
        scores = query @ key.transpose(-1, -2) * scale  # (N B, T, T)
        scores = scores.masked_fill(~visible, float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ value).reshape(replicas, rows * length, width)  # (N, M, d)
        hidden = _stacked_layer_norm(hidden + attended, p[f"{prefix}.attention_norm.weight"],
                                     p[f"{prefix}.attention_norm.bias"], config.layer_norm_epsilon)
        inner = torch.relu(linear(f"{prefix}.mlp_in", hidden))
        hidden = _stacked_layer_norm(hidden + linear(f"{prefix}.mlp_out", inner), p[f"{prefix}.mlp_norm.weight"],
                                     p[f"{prefix}.mlp_norm.bias"], config.layer_norm_epsilon)
    return linear("output", hidden).reshape(replicas, rows, length, -1)  # (N, B, T, vocab)
