"""Per-component metrics of a transformer on Markov test data, the same as ``markovsim``'s.

Per component c, on its test sequences, the mean over response tokens of
``KL( target(. | prefix) || model(. | prefix) )`` (docs/theory.md, "Mixtures of Markov chains"), where the model's
next-state predictive is the softmax of its logits restricted to the V state tokens, and the
target is one of

    kl_true            the TRUE transition row of the chain that generated the sequence
    kl_retrained       the retrained (retain-only) transformer's predictive
    kl_reference       the reference transformer's predictive (the model before unlearning)
    kl_exact_<name>    the exact Bayes predictive of a ``markovsim`` model (e.g. the retain chain,
                       or the pre-training mixture ``MixtureOfChains.from_components``)

Every target predictive is computed once, in float64, and cached. ``logp_per_token`` is the mean
over the component's sequences of ``logp(y) / |y|`` under the model's full vocabulary.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from markovsim.chains import MarkovChain
from markovsim.data import SequenceSet
from markovsim.losses import SEQUENCE_LOSSES, Objective
from markovsim.metrics import mean_kl_per_component, true_next_token_probs

from .data import EncodedSequences, encode, evaluation_chunks
from .logps import labelled_token_logps, model_logits, state_log_probs
from .models import check_model_data
from .runtime import autocast

__all__ = ["model_device", "predict", "empty_predictions", "store_predictions", "length_order", "next_token_probs",
           "model_sequence_logps_batched", "component_means", "evaluation_subsample_of", "forget_weight_means",
           "Evaluator"]


# Seed stream of the evaluation subsample (batch order and diagnostics use streams 0-2).
SUBSAMPLE_STREAM = 3


def model_device(model) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def length_order(encoded: EncodedSequences) -> np.ndarray:
    """Row order by token length, so each evaluation chunk carries little padding."""
    return np.argsort(encoded.token_lengths.numpy(), kind="stable")


@torch.no_grad()
def predict(model, encoded: EncodedSequences, batch_size: int = 1024, bf16: bool = False,
            state_predictive: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One no-grad pass: next-state log-predictive and sequence log-likelihoods, on CPU float64.

    Args:
        model: a causal LM (its mode is restored afterwards; evaluated in eval mode).
        encoded: sequences with response labels.
        batch_size: rows per forward pass.
        bf16: autocast the forward pass (CUDA only).
        state_predictive: also return the (n, T-1, V) state log-predictive.
    Returns:
        state_logprobs (n, T-1, V) or None (0 on padding), logps (n,), num_tokens (n,).
    """
    n, device, was_training = len(encoded), model_device(model), model.training
    model.eval()
    states, logps, num_tokens = empty_predictions(encoded, state_predictive)
    order = length_order(encoded)
    try:
        for chunk in evaluation_chunks(n, batch_size):
            rows = order[chunk]
            batch = encoded.batch(rows, device)
            with autocast(device.type, bf16):
                logits = model_logits(model, batch)  # (b, t, vocab)
            store_predictions(logits, batch, rows, (states, logps, num_tokens))
    finally:
        model.train(was_training)
    return states, logps, num_tokens


def empty_predictions(encoded: EncodedSequences, state_predictive: bool = True) -> tuple:
    """Zeroed ``(states (n, T-1, V) or None, logps (n,), num_tokens (n,))`` CPU float64, filled by
    :func:`store_predictions`."""
    n, width = len(encoded), encoded.input_ids.shape[1]
    states = torch.zeros((n, width - 2, encoded.num_states), dtype=torch.float64) if state_predictive else None
    return states, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)


def store_predictions(logits: torch.Tensor, batch: dict, rows: np.ndarray, predictions: tuple) -> None:
    """Write one chunk's predictions into ``predictions = (states, logps, num_tokens)`` at ``rows``.

    Args:
        logits: (b, t, vocab) of the chunk ``batch`` (rows ``rows`` of the encoded set).
    Raises:
        NonFiniteLogitsError: NaN/inf logits at a labelled position.
    """
    states, logps, num_tokens = predictions
    token_logps, mask = labelled_token_logps(logits, batch["labels"])  # (b, t-1)
    logps[rows] = token_logps.sum(-1).double().cpu()
    num_tokens[rows] = mask.sum(-1).double().cpu()
    if states is not None:
        t = batch["input_ids"].shape[1]
        predictive = state_log_probs(logits[:, 1: t - 1], states.shape[-1]).double().cpu()  # (b, t-2, V)
        valid = (batch["labels"][:, 2:t] != -100).cpu()[..., None]  # (b, t-2, 1)
        states[rows, : t - 2] = torch.where(valid, predictive, 0.0)


def next_token_probs(model, sequences: SequenceSet, batch_size: int = 1024, bf16: bool = False) -> torch.Tensor:
    """The model's next-state predictive at every response position, (n, T-1, V) float64; 0 where padded.

    Same layout as ``markovsim`` models' ``next_token_probs``: entry t predicts ``tokens[:, t + 1]``.
    """
    check_model_data(model, sequences)
    states, _, _ = predict(model, encode(sequences, "response"), batch_size, bf16)
    mask = torch.as_tensor(sequences.transition_mask)[..., None]
    return torch.where(mask, states.exp(), 0.0)


def model_sequence_logps_batched(model, encoded: EncodedSequences, batch_size: int = 1024,
                           bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, num_tokens)`` of every row (CPU float64), without gradients."""
    _, logps, num_tokens = predict(model, encoded, batch_size, bf16, state_predictive=False)
    return logps, num_tokens


def component_means(values: torch.Tensor, component_ids: np.ndarray, component_names: tuple[str, ...],
                    names: tuple[str, ...]) -> np.ndarray:
    """Mean of ``values`` (n,) over each component in ``names`` (NaN where a component has no rows)."""
    values = np.asarray(values, dtype=np.float64)
    result = np.full(len(names), np.nan)
    for c, name in enumerate(names):
        if name in component_names:
            rows = component_ids == component_names.index(name)
            if rows.any():
                result[c] = values[rows].mean()
    return result


def forget_weight_means(objective: Objective, logps: torch.Tensor, num_tokens: torch.Tensor,
                        ref_logps: torch.Tensor | None, forget: EncodedSequences,
                        names: tuple[str, ...]) -> np.ndarray:
    """Mean closed-form gradient weight w(y) (``Objective.forget_weights``) per forget component.

    NaN for components without forget rows and for losses without a sequence-level weight (dpo, wga).
    """
    if objective.forget not in SEQUENCE_LOSSES:
        return np.full(len(names), np.nan)
    weights = objective.forget_weights(logps, num_tokens, ref_logps)  # (n_f,)
    return component_means(weights, forget.component_ids, forget.component_names, names)


def evaluation_subsample_of(test: SequenceSet, size: int | None, seed: int = 0) -> SequenceSet:
    """``test`` itself (``size`` None or >= len(test)), else the fixed subset of ``size`` rows drawn
    without replacement by ``numpy.random.default_rng([seed, SUBSAMPLE_STREAM])``, in their original order."""
    if size is None or size >= len(test):
        return test
    if size < 1:
        raise ValueError(f"evaluation_subsample must be None or >= 1, got {size}")
    rows = np.random.default_rng([seed, SUBSAMPLE_STREAM]).choice(len(test), size=size, replace=False)
    return test.subset(np.sort(rows))


class Evaluator:
    """Per-component metrics on a fixed test set; every target predictive computed once (float64).

    Args:
        test: the evaluation sequences (all components).
        true_chains: ``{component: MarkovChain}`` for ``kl_true`` (optional).
        retrained: the retrained transformer for ``kl_retrained`` (optional).
        reference: the reference transformer for ``kl_reference`` (optional).
        exact_models: ``{name: markovsim model}`` for ``kl_exact_<name>`` (e.g. the retain chain's
            ``MixtureOfChains``); any object with ``next_token_probs(sequences)``.
        batch_size: rows per forward pass.
        bf16: autocast the transformer forward passes (CUDA only).
        evaluation_subsample: None (default) = every test sequence; k = a fixed subset of k sequences
            (:func:`evaluation_subsample`, seeded by ``subsample_seed``) for runs whose figure does not
            need the full set (cheaper every-step evaluation; the metrics are then estimates).
        subsample_seed: seed of that subset.
    """

    def __init__(self, test: SequenceSet, true_chains: Mapping[str, MarkovChain] | None = None, retrained=None,
                 reference=None, exact_models: Mapping[str, object] | None = None, batch_size: int = 1024,
                 bf16: bool = False, evaluation_subsample: int | None = None, subsample_seed: int = 0):
        if not isinstance(test, SequenceSet) or len(test) == 0:
            raise ValueError("test must be a non-empty SequenceSet")
        test = evaluation_subsample_of(test, evaluation_subsample, subsample_seed)
        self.test, self.batch_size, self.bf16 = test, batch_size, bf16
        self.encoded = encode(test, "response")
        self.component_names = test.component_names
        self.targets: dict[str, torch.Tensor] = {}
        if true_chains is not None:
            self.targets["kl_true"] = true_next_token_probs(test, true_chains)
        for metric, model in (("kl_retrained", retrained), ("kl_reference", reference)):
            if model is not None:
                self.targets[metric] = next_token_probs(model, test, batch_size, bf16)
        for name, model in (exact_models or {}).items():
            self.targets[f"kl_exact_{name}"] = model.next_token_probs(test).detach().to(torch.float64)

    def evaluate(self, model) -> dict[str, np.ndarray]:
        """``{metric: (C,) array}``: each cached KL target and ``logp_per_token``."""
        check_model_data(model, self.test, "test")
        return self.metrics(*predict(model, self.encoded, self.batch_size, self.bf16))

    def metrics(self, state_logprobs: torch.Tensor, logps: torch.Tensor,
                num_tokens: torch.Tensor) -> dict[str, np.ndarray]:
        """The metrics of :meth:`evaluate` from one model's :func:`predict` output on ``self.encoded``
        (pure: shared by the single run and the batched replicas, ``llm.replica_evaluation``).

        Args:
            state_logprobs: (n, T-1, V) float64 next-state log-predictive (0 on padding).
            logps, num_tokens: (n,) float64 sequence log-likelihoods and response lengths.
        Returns: ``{metric: (C,) array}``.
        """
        model_probs = state_logprobs.exp()  # (n, T-1, V); padding rows are ignored by the KL's mask
        result = {}
        for metric, target in self.targets.items():
            per_component = mean_kl_per_component(target, model_probs, self.test)
            result[metric] = np.array([per_component.get(name, np.nan) for name in self.component_names])
        result["logp_per_token"] = component_means(logps / num_tokens, self.test.component_ids,
                                                   self.component_names, self.component_names)
        return result


# Former name, kept for existing code.
sequence_logps_batched = model_sequence_logps_batched
