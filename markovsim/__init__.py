"""markovsim: an exact simulator of unlearning on mixtures of Markov chains.

Chains generate retain and forget data of different lengths; tabular and mixture sequence models
have log-likelihoods, gradients and KL divergences computed exactly (float64) from transition
counts. See docs/theory.md for every formula.
"""

from .chains import MarkovChain, block_chains
from .data import PAD_TOKEN, Component, MixtureSpec, SequenceSet, concatenate
from .metrics import component_kl, mean_kl_per_component, per_token_kl, population_kl, true_next_token_probs
from .mixture import MixtureOfChains
from .results import package_version
from .tabular import TabularMarkov

__all__ = [
    "MarkovChain", "block_chains", "PAD_TOKEN", "Component", "MixtureSpec", "SequenceSet", "concatenate",
    "component_kl", "mean_kl_per_component", "per_token_kl", "population_kl", "true_next_token_probs",
    "MixtureOfChains", "TabularMarkov", "package_version",
]
