"""Regenerate every figure: ``python -m paper_figures [--only NAME ...] [--scale quick|paper] [--jobs N]``.

``FIGURES`` maps a figure name to its module; each module has ``TITLE``, ``CONFIGS`` (per scale),
``compute(config, cache_stem, device, recompute, jobs) -> cache_stem`` and
``plot(cache_stem, output_stem) -> paths``. Modules with ``USES_TOFU_RUN = True`` have a
``tofu_run`` config field, set from ``--tofu-run DIR`` (a TOFU protocol run folder) for their TOFU panels.
"""

from . import (
               ablation_ladder,
               adam_eps,
               divergence,
               first_step,
               gradient_weights,
               hyperparameter_sweep,
               markov_mixture,
               markov_tradeoff,
               other_methods,
               power_share,
               relearning,
               sensitivity,
               tofu_bias,
               tofu_protocol,
)

FIGURES = {
    "markov_mixture": markov_mixture,
    "gradient_weights": gradient_weights,
    "markov_tradeoff": markov_tradeoff,
    "power_share": power_share,
    "adam_eps": adam_eps,
    "first_step": first_step,
    "divergence": divergence,
    "sensitivity": sensitivity,
    "tofu_bias": tofu_bias,
    "relearning": relearning,
    "tofu_protocol": tofu_protocol,
    "other_methods": other_methods,
    "ablation_ladder": ablation_ladder,
    "hyperparameter_sweep": hyperparameter_sweep,
}
