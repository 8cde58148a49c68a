"""Regenerate every figure: ``python -m paper_figures [--only NAME ...] [--scale quick|paper]``.

``FIGURES`` maps a figure name to its module; each module has ``TITLE``, ``CONFIGS`` (per scale),
``compute(config, cache_stem, device, recompute) -> cache_stem`` and ``plot(cache_stem, output_stem) -> paths``.
"""

from . import divergence, gradient_weights, markov_mixture, paper_short, paper_unseen, power_share, sensitivity

FIGURES = {
    "markov_mixture": markov_mixture,
    "gradient_weights": gradient_weights,
    "paper_short": paper_short,
    "paper_unseen": paper_unseen,
    "power_share": power_share,
    "divergence": divergence,
    "sensitivity": sensitivity,
}
