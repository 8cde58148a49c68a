"""Exact sequence models with explicit float64 torch parameters (re-exported from their modules).

* :class:`~markovsim.tabular.TabularMarkov` — one first-order chain shared by all data.
* :class:`~markovsim.mixture.MixtureOfChains` — K latent chains, a log-sum-exp likelihood and the
  Bayes posterior predictive.
"""

from .mixture import MixtureOfChains
from .tabular import LOG_FLOOR, TabularMarkov, expected_counts

__all__ = ["LOG_FLOOR", "MixtureOfChains", "TabularMarkov", "expected_counts"]
