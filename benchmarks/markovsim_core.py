"""Benchmark: the exact core at paper scale (10 states; 10000 retain + 5000 + 5000 forget, length 20).

Prints the time to sample and build the SequenceSet (sufficient statistics included) and the time of
``TabularMarkov.log_prob`` / ``MixtureOfChains.log_prob`` on all 20000 sequences, side by side with a
per-token Python/numpy reference loop, as ratios. Run: ``python benchmarks/markovsim_core.py``.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from markovsim.data import concatenate
from markovsim.models import MixtureOfChains, TabularMarkov
from markovsim.scenarios import paper_mixture_spec


def best_of(function, repeats: int = 20) -> float:
    """Minimum wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def per_token_loop(model: TabularMarkov, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Reference: a plain loop over sequences and tokens."""
    initial = torch.log_softmax(model.initial_logits, -1).numpy()
    transition = torch.log_softmax(model.transition_logits, -1).numpy()
    result = np.empty(len(tokens))
    for i, (row, length) in enumerate(zip(tokens, lengths)):
        value = initial[row[0]]
        for t in range(length - 1):
            value += transition[row[t], row[t + 1]]
        result[i] = value
    return result


def main() -> None:
    torch.set_num_threads(1)
    spec = paper_mixture_spec(forget2_length=20)
    start = time.perf_counter()
    train, test = spec.sample()
    sequences = concatenate([train, test])
    build = time.perf_counter() - start
    sequences.statistics_tensors()
    model = TabularMarkov.fit(sequences)
    mixture = MixtureOfChains.from_components(spec.components)
    exact = best_of(lambda: model.logps(sequences))
    exact_mixture = best_of(lambda: mixture.logps(sequences))
    loop = best_of(lambda: per_token_loop(model, sequences.tokens, sequences.lengths), repeats=2)
    assert np.allclose(model.logps(sequences).numpy(), per_token_loop(model, sequences.tokens, sequences.lengths))
    print(f"machine: {platform.processor() or platform.machine()}, torch threads 1, torch {torch.__version__}")
    print(f"sequences: {len(sequences)} of length 20, 10 states")
    print(f"sample + build SequenceSet (with sufficient statistics): {build * 1e3:8.1f} ms")
    print(f"TabularMarkov.log_prob, all sequences:                   {exact * 1e3:8.2f} ms")
    print(f"MixtureOfChains.log_prob (K=3), all sequences:           {exact_mixture * 1e3:8.2f} ms")
    print(f"per-token reference loop:                                {loop * 1e3:8.1f} ms")
    print(f"ratio loop / exact (tabular): {loop / exact:,.0f}x")


if __name__ == "__main__":
    main()
