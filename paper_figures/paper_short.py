"""Figure 2: ``paper_short_forget2`` (SimNPO paper Fig. 3, case a).

Question: with forget data of two lengths (forget1: 20, forget2: 5), how do GA, NPO and SimNPO trade
forget quality on each forget component against retain distance, in the exact simulator (tabular
and mixture models) and on a transformer trained on the same data?
"""

from . import tradeoff

TITLE = "paper_short_forget2: forget quality vs retain distance (simulator and transformer)"
Config = tradeoff.Config
CONFIGS = tradeoff.configs("paper_short_forget2")
compute = tradeoff.compute


def plot(cache_stem: str, output_stem: str) -> list[str]:
    return tradeoff.plot(cache_stem, output_stem, TITLE)
