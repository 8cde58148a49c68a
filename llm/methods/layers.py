"""The decoder layers of a causal LM and a forward hook that adds a perturbation to one layer's output (LAU).

:func:`decoder_layers` finds the stack of decoder blocks, unwrapping DistributedDataParallel (``.module``)
and peft (``get_base_model()``) first:

    GPT-2 (``GPT2LMHeadModel``)            model.transformer.h
    Llama (``LlamaForCausalLM``, SmolLM2)  model.model.layers
    paper-synthetic (llm.paper_synthetic)  model.blocks
    other                                  the one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules

:func:`perturbed_hidden_states` adds delta to the OUTPUT hidden states of decoder layer ``layer`` (0-based;
the residual stream entering layer ``layer + 1``, or the final norm / unembedding for the last layer):

    h_layer(b, t, :) <- h_layer(b, t, :) + delta        delta (d,): one vector for every row and position,
                                                        or (b, t, d): one per position
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["unwrap_model", "decoder_layers", "perturbed_hidden_states"]

_KNOWN_PATHS = ("transformer.h", "model.layers", "blocks", "gpt_neox.layers", "model.decoder.layers")


def unwrap_model(model) -> nn.Module:
    """The plain ``transformers`` model inside DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _attribute(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def decoder_layers(model) -> nn.ModuleList:
    """The model's decoder blocks, in order (module docstring); ValueError when none are found."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module causal LM, got {type(model).__name__}")
    base = unwrap_model(model)
    for path in _KNOWN_PATHS:
        layers = _attribute(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    count = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    found = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}: none of {list(_KNOWN_PATHS)} and "
                     f"{len(found)} ModuleLists of config.num_hidden_layers = {count} modules")


def _check_layer(layers: nn.ModuleList, layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must be an int in [-{len(layers)}, {len(layers) - 1}] (the model has "
                         f"{len(layers)} decoder layers), got {layer!r}")
    return layer % len(layers)


@contextlib.contextmanager
def perturbed_hidden_states(model, layer: int, delta: torch.Tensor):
    """Within the block, decoder layer ``layer``'s output hidden states get ``+ delta`` (differentiable in delta).

    Args:
        model: a causal LM (possibly DDP / peft wrapped).
        layer: 0-based decoder layer index (negative counts from the last: -1 is the last layer).
        delta: (d,) or (b, t, d) float; cast to the hidden states' dtype (bf16 autocast) when added.
    """
    layers = decoder_layers(model)
    block = layers[_check_layer(layers, layer)]

    def add(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (b, t, d)
        if delta.shape[-1] != hidden.shape[-1] or (delta.ndim == 3 and delta.shape != hidden.shape):
            raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit hidden states "
                             f"{tuple(hidden.shape)}: use (d,) or (b, t, d)")
        hidden = hidden + delta.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(add)
    try:
        yield block
    finally:
        handle.remove()
