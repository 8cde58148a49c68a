"""Regenerate every figure: ``python -m paper_figures [--only NAME ...] [--scale quick|paper]``.

``FIGURES`` maps a figure name to its module; each module has ``TITLE``, ``CONFIGS`` (per scale),
``compute(config, cache_stem, device, recompute) -> cache_stem`` and ``plot(cache_stem, output_stem) -> paths``.
"""

from . import divergence, gradient_weights, markov_mixture, sensitivity

FIGURES = {
    "markov_mixture": markov_mixture,
    "gradient_weights": gradient_weights,
    "divergence": divergence,
    "sensitivity": sensitivity,
}
