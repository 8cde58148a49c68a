"""Bootstrap intervals of :mod:`llm.tofu.bias`'s per-group mean weights and power shares, from per-item gradients.

Per group g of the forget set (rows R_g: the items its diagnostics sum over; s_g = n_g / |R_g|, 1 unless
subsampled, as in :class:`llm.diagnostics.Diagnostics`), with the per-item forget gradient
g_i = (forget_weight / n_f) d L_f(y_i) / d theta (all trainable parameters) and weight w_i:

    mean_weight[g] = mean_{i in R_g} w_i          power_share[g] = ||s_g sum_{i in R_g} g_i|| / sum_g' (same)

A bootstrap resample of group g draws |R_g| of its items with replacement (counts c, (|R_g|,),
:func:`llm.tofu.metrics.bootstrap_counts`); its gradient sum is sum_i c_i g_i, whose squared norm is
c^T K c with K[i, j] = <g_i, g_j>, the Gram matrix of the per-item gradients. So one Gram matrix of
the measured items gives every resample's shares exactly, without another gradient pass:

    norm_b[g]   = s_g sqrt(c_bg^T K[R_g, R_g] c_bg)                     (B,) per group
    share_b[g]  = norm_b[g] / sum_g' norm_b[g']
    weight_b[g] = c_bg . w[R_g] / |R_g|

and each 95% interval is the percentile interval of its B values. Groups are resampled independently
(stratified: the groups themselves stay fixed); at c = 1 the formulas give the diagnostics' own numbers.

Cost: the per-item gradients are the rows of an (m, P_block) float32 matrix, one block of the P
parameters at a time so that m x P_block x 4 bytes stays under ``max_bytes``; each block costs one
forward and backward pass per item (SmolLM2-135M and 40 items: 22 GB of gradients, 11 passes over
the items at the default 2 GiB), and K is accumulated in float64.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from llm.evaluate import model_device
from llm.logps import NonFiniteLogitsError
from llm.objective import SEQUENCE_LOSSES, BatchCounts, UnlearningBatch, objective_terms
from markovsim.objectives import Objective

from . import metrics
from .finetune import Examples

__all__ = ["DEFAULT_MAX_BYTES", "BOOTSTRAP_STREAM", "item_gradient_gram", "group_statistics", "group_intervals"]

DEFAULT_MAX_BYTES = 2 << 30  # per-item gradient rows held at once (one parameter block)
BOOTSTRAP_STREAM = 1  # group g's resamples: seed [seed, BOOTSTRAP_STREAM, g] (its subsample uses [seed, g])


def item_gradient_gram(model, objective: Objective, examples: Examples, ref_logps: torch.Tensor | None, rows,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """``(K (m, m) float64, w (m,))``: the Gram matrix <g_i, g_j> of the per-item forget gradients of ``rows``
    (m,) of ``examples`` at ``model`` (n_f = len(examples)), and their closed-form weights (NaN for a loss
    without one). NaN throughout when the model's logits are not finite."""
    rows = np.asarray(rows, dtype=np.int64)
    params = [p for p in model.parameters() if p.requires_grad]
    bounds = np.cumsum([0] + [p.numel() for p in params])  # (T + 1,) flat offsets of the tensors
    width = max(1, int(max_bytes) // (4 * len(rows)))
    was_training = model.training
    model.eval()
    try:
        gram, weights = torch.zeros((len(rows), len(rows)), dtype=torch.float64, device=model_device(model)), None
        for start in range(0, int(bounds[-1]), width):
            block, block_weights = _gradient_block(model, objective, examples, ref_logps, rows, params, bounds,
                                                   start, min(start + width, int(bounds[-1])))  # (m, width)
            weights = block_weights if weights is None else weights
            gram += _gram(block)
        return gram.cpu().numpy(), weights
    except NonFiniteLogitsError:
        return np.full((len(rows), len(rows)), np.nan), np.full(len(rows), np.nan)
    finally:
        model.train(was_training)


def _gradient_block(model, objective, examples, ref_logps, rows, params, bounds, start: int,
                    stop: int) -> tuple[torch.Tensor, np.ndarray]:
    """(m, stop - start) float32: coordinates start..stop of each row's flat gradient; and the rows' weights."""
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    last = int(np.searchsorted(bounds, stop, side="left"))  # tensors first .. last - 1 hold the block
    picked = params[first:last]
    objective = dataclasses.replace(objective, retain=None)
    device, counts = model_device(model), BatchCounts(len(examples))
    block = torch.empty((len(rows), stop - start), dtype=torch.float32, device=device)
    weights = np.full(len(rows), np.nan)
    for index, row in enumerate(rows):
        ref = None if ref_logps is None else ref_logps[[int(row)]].to(device)
        terms = objective_terms(model, objective, UnlearningBatch(examples.batch([row], device), ref, counts))
        grads = torch.autograd.grad(terms.total, picked, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, picked)])
        block[index] = flat[start - int(bounds[first]):stop - int(bounds[first])]
        if objective.forget in SEQUENCE_LOSSES:
            weights[index] = float(objective.forget_weights(terms.forget_logps.cpu(), terms.forget_num_tokens.cpu(),
                                                            None if ref is None else ref.cpu())[0])
    return block, weights


def _gram(block: torch.Tensor) -> torch.Tensor:
    """block @ block.T in float64, a few columns at a time (m, m)."""
    gram = torch.zeros((block.shape[0], block.shape[0]), dtype=torch.float64, device=block.device)
    width = max(1, (1 << 24) // block.shape[0])  # float64 copies of at most 128 MB
    for start in range(0, block.shape[1], width):
        part = block[:, start:start + width].double()
        gram += part @ part.T
    return gram


def group_statistics(gram: np.ndarray, weights: np.ndarray, positions, scales,
                     counts) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_weight (B, G), power_share (B, G))`` of B resamples given as per-group counts.

    ``positions[g]``: group g's rows as indices into ``gram`` (m, m) / ``weights`` (m,); ``scales[g]``: s_g;
    ``counts[g]``: (B, |R_g|) how often each of them is drawn (all ones: the point estimate).
    """
    norms, means = [], []
    for rows, scale, drawn in zip(positions, scales, counts):
        drawn = np.asarray(drawn, dtype=np.float64)  # (B, n_g)
        quadratic = np.einsum("bi,bi->b", drawn @ gram[np.ix_(rows, rows)], drawn)  # c^T K c
        norms.append(scale * np.sqrt(np.maximum(quadratic, 0.0)))  # rounding can leave -1e-20
        centre = weights[rows].mean()  # a constant group's resampled means are then exactly the constant
        means.append(centre + drawn @ (weights[rows] - centre) / len(rows))
    norms = np.stack(norms, axis=1)  # (B, G)
    return np.stack(means, axis=1), norms / norms.sum(axis=1, keepdims=True)


def group_intervals(gram: np.ndarray, weights: np.ndarray, positions, scales,
                    num_resamples: int = metrics.BOOTSTRAP_RESAMPLES, seed: int = 0,
                    confidence: float = metrics.CONFIDENCE) -> dict[str, list[list[float]]]:
    """``{"mean_weight_interval": (G, 2), "power_share_interval": (G, 2)}`` as lists: the percentile intervals
    over ``num_resamples`` stratified resamples (group g's from :data:`BOOTSTRAP_STREAM`; NaN when the Gram
    matrix or the weights are: a loss without weights, non-finite logits)."""
    counts = [metrics.bootstrap_counts(len(rows), num_resamples, [seed, BOOTSTRAP_STREAM, group])
              for group, rows in enumerate(positions)]
    with np.errstate(invalid="ignore"):
        means, shares = group_statistics(gram, weights, positions, scales, counts)  # (B, G) each
    return {"mean_weight_interval": [list(metrics.percentile_interval(column, confidence)) for column in means.T],
            "power_share_interval": [list(metrics.percentile_interval(column, confidence)) for column in shares.T]}
