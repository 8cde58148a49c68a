"""Every ordering of Fig. 5's reach values that the README states, in one place, with the test it must pass.

A claim names a case, a source and a forget component, and orders two methods by their retain KL at
reach (lower = cheaper forgetting). Its ``kind`` says what the per-seed data (``fig5_reach.csv``) must show:

- ``"interval"``: the paired bootstrap interval of ``lower - higher`` lies below 0;
- ``"every seed"``: additionally ``lower`` is strictly lower on every seed (both reach, or only ``lower``);
- ``"not distinguishable"``: the interval contains 0 (the README then says the two cannot be told apart).

``tests/test_fig5_claims.py`` checks every claim against the committed CSV; ``markov_tradeoff``'s table file
lists them with the measured numbers, so a README sentence quotes a number that a test holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reach_statistics import PairedDifference, paired_difference, values_by_seed

KINDS = ("interval", "every seed", "not distinguishable")


@dataclass(frozen=True)
class Claim:
    case: str  # "a" or "b"
    source: str
    component: str
    lower: str  # the method claimed cheaper (for "not distinguishable": the first of the pair)
    higher: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {KINDS}")

    def text(self) -> str:
        relation = {"interval": "<", "every seed": "< (every seed)", "not distinguishable": "~"}[self.kind]
        return f"({self.case}) {self.source} {self.component}: {self.lower} {relation} {self.higher}"


def evaluate(claim: Claim, rows: list[dict]) -> tuple[bool, PairedDifference]:
    """Whether ``claim`` holds on the per-seed ``rows`` (:func:`reach_statistics.read_csv`), and the paired
    difference ``lower - higher`` it was judged on."""
    lower = values_by_seed(rows, claim.case, claim.source, claim.lower, claim.component)
    higher = values_by_seed(rows, claim.case, claim.source, claim.higher, claim.component)
    difference = paired_difference(lower, higher)
    if claim.kind == "not distinguishable":
        return difference.verdict == "not distinguishable", difference
    holds = difference.verdict == "lower"
    if claim.kind == "every seed":
        holds = holds and difference.a_lower == 1.0
    return holds, difference


# The README's Fig. 5 sentences, each backed by one of these (paper scale, the committed per-seed CSV).
CLAIMS = (
    # SimNPO pays less retain KL than NPO to reach the retrained level, on both transformers, in both cases
    # where the component is not already forgotten at the start
    Claim("a", "paper-synthetic", "forget1", "SimNPO", "NPO", "interval"),
    Claim("a", "paper-synthetic", "forget2", "SimNPO", "NPO", "every seed"),
    Claim("a", "gpt2-4x128", "forget1", "SimNPO", "NPO", "interval"),
    Claim("a", "gpt2-4x128", "forget2", "SimNPO", "NPO", "every seed"),
    Claim("b", "paper-synthetic", "forget1", "SimNPO", "NPO", "every seed"),
    Claim("b", "gpt2-4x128", "forget1", "SimNPO", "NPO", "every seed"),
    # NPO is cheaper than GA on forget1, but not on the short forget2 of case (a), where GA is the cheaper
    Claim("a", "paper-synthetic", "forget1", "NPO", "GA", "interval"),
    Claim("a", "paper-synthetic", "forget2", "GA", "NPO", "interval"),
    Claim("b", "paper-synthetic", "forget1", "NPO", "GA", "interval"),
    # in case (b) forget2 starts at the retrained level: every method reaches it at the start
    Claim("b", "paper-synthetic", "forget2", "SimNPO", "NPO", "not distinguishable"),
    # the mixture model: case (a) reverses the transformers' order on forget2, NPO cheaper than SimNPO
    Claim("a", "mixture", "forget2", "NPO", "SimNPO", "interval"),
)
