"""Figure 3: ``paper_unseen_forget2`` (SimNPO paper Fig. 3, case b).

Question: when forget2 never entered pre-training (the reference already assigns it low
likelihood), how do GA, NPO and SimNPO trade forget quality against retain distance, in the exact
simulator and on a transformer?
"""

from . import tradeoff

TITLE = "paper_unseen_forget2: forget quality vs retain distance (simulator and transformer)"
Config = tradeoff.Config
CONFIGS = tradeoff.configs("paper_unseen_forget2")
compute = tradeoff.compute


def plot(cache_stem: str, output_stem: str) -> list[str]:
    return tradeoff.plot(cache_stem, output_stem, TITLE)
