"""Named scenarios of the simulator (THEORY.md section 5).

``paper_mixture_spec`` builds the SimNPO paper's retain / forget1 / forget2 mixture of block chains.
"""

from __future__ import annotations

from .chains import block_chains
from .data import Component, MixtureSpec

PAPER_COUNTS = {"retain": 10000, "forget1": 5000, "forget2": 5000}


def paper_mixture_spec(forget2_length: int = 5, forget2_in_pretraining: bool = True, scale: float = 1.0,
                       num_states: int = 10, leakage: float = 0.2, length: int = 20, seed: int = 0) -> MixtureSpec:
    """The paper's mixture: retain and forget1 of ``length``, forget2 of ``forget2_length``.

    Each component has ``scale * PAPER_COUNTS[name]`` sequences (paper: 10000 / 5000 / 5000), split
    80/20 into train/test. ``forget2_in_pretraining=False`` gives case (b) of the paper.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    chains = block_chains(num_states, leakage)
    lengths = {"retain": length, "forget1": length, "forget2": forget2_length}
    components = tuple(
        Component.with_split(name, chains[name], lengths[name], max(5, int(round(scale * count))),
                             role="retain" if name == "retain" else "forget",
                             in_pretraining=forget2_in_pretraining or name != "forget2")
        for name, count in PAPER_COUNTS.items()
    )
    return MixtureSpec(components, seed=seed)
