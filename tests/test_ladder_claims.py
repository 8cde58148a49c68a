"""The README's and docs/results.md's sentences about the ablation ladder, each checked against the committed
paper-scale outputs (docs/figures/ablation_ladder_{reach.csv,summary.json}: exact tabular and mixture models, 10
paired report seeds, best learning rates chosen on 5 other seeds). Regenerated outputs that change a verdict fail
here."""

from __future__ import annotations

import os

import pytest

from paper_figures import ablation_ladder as ladder

FIGURES = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "figures")
SOURCES = ("tabular", "mixture")
CASE_A, CASE_B = "paper_short_forget2", "paper_unseen_forget2"
CELLS = [(s, c, o) for s in SOURCES for c in (CASE_A, CASE_B) for o in ladder.OPTIMIZERS]


@pytest.fixture(scope="module")
def committed():
    return ladder.load_outputs(os.path.join(FIGURES, "ablation_ladder"))


def verdicts(committed, step: str, component: str = "forget1") -> dict:
    document, rows = committed
    return {cell: (dict(ladder.ingredient_differences(rows, document, *cell, component)).get(step) or None)
            for cell in CELLS}


def test_the_committed_cache_is_the_paper_scale_protocol(committed):
    document, rows = committed
    config = document["config"]
    assert config["scale"] == 1.0 and len(config["report_seeds"]) == 10 and len(config["selection_seeds"]) == 5
    assert set(config["simulator_sources"]) == set(SOURCES) and document["skipped_sources"]
    assert {r["source"] for r in rows} == set(SOURCES)


def test_dropping_the_reference_without_normalising_never_helps(committed):
    """SimNPO-sum: worse than NPO on both components in case (a) everywhere; no eligible lr in case (b)."""
    document, _ = committed
    choices = ladder.chosen(document)
    for component in ("forget1", "forget2"):
        for (source, case, optimizer), difference in verdicts(committed, "drop the reference (summed)",
                                                              component).items():
            if case == CASE_A:
                assert difference.verdict == "higher", (source, optimizer, component)
            else:
                assert choices[(source, case, optimizer, "SimNPO-sum")]["best_learning_rate"] is None
    forget1_gaps = [d.mean for (s, c, o), d in verdicts(committed, "drop the reference (summed)").items()
                    if c == CASE_A]
    assert min(forget1_gaps) > 0.19 and max(forget1_gaps) < 0.39


def test_normalising_with_the_reference_kept_is_worse_than_npo_in_8_of_12_cells(committed):
    found = {cell: d.verdict for cell, d in verdicts(committed, "normalise (with reference)").items()}
    assert sorted(cell for cell, v in found.items() if v == "lower") == sorted([
        ("tabular", CASE_A, "adamw_legacy"), ("tabular", CASE_A, "adamw"), ("tabular", CASE_B, "gd"),
        ("mixture", CASE_B, "gd")])
    assert sum(v == "higher" for v in found.values()) == 8


def test_dropping_the_reference_on_the_per_token_scale_helps_in_10_of_12_cells(committed):
    found = verdicts(committed, "drop the reference (normalised)")
    exceptions = {cell: d for cell, d in found.items() if d.verdict != "lower"}
    assert set(exceptions) == {("tabular", CASE_A, "adamw"), ("tabular", CASE_B, "adamw")}
    assert all(d.verdict == "higher" and d.mean < 0.0025 for d in exceptions.values())


def test_simnpo_beats_npo_under_legacy_adamw_everywhere_but_not_under_every_optimiser(committed):
    found = {cell: d for cell, d in verdicts(committed, "both (SimNPO - NPO)").items()}
    lower = {cell for cell, d in found.items() if d.verdict == "lower"}
    assert {cell for cell in CELLS if cell[2] == "adamw_legacy"} <= lower
    assert {cell for cell in CELLS if cell[2] == "adamw"} & lower == {("tabular", CASE_A, "adamw"),
                                                                     ("mixture", CASE_B, "adamw")}
    assert {cell for cell in CELLS if cell[2] == "gd"} - lower == {("mixture", CASE_A, "gd")}
    quoted = {("tabular", CASE_A, "adamw_legacy"): "-0.0278 [-0.0284, -0.0271]",
              ("mixture", CASE_B, "adamw_legacy"): "-0.1395 [-0.1416, -0.1373]",
              ("mixture", CASE_A, "adamw"): "+0.0725 [+0.0562, +0.0913]",
              ("mixture", CASE_A, "gd"): "+0.0035 [+0.0027, +0.0045]",
              ("mixture", CASE_A, "adamw_legacy"): "-0.1221 [-0.1244, -0.1194]"}
    for cell, text in quoted.items():
        d = found[cell]
        assert f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" == text, cell


def test_the_committed_table_is_the_committed_cache(committed):
    document, rows = committed
    table = open(os.path.join(FIGURES, "ablation_ladder_table.md")).read()
    assert table == ladder.table_markdown(document, rows) + "\n"


def test_the_cpu_transformer_ladder_sentences():
    """docs/results.md on benchmarks/ablation_ladder_transformer_cpu.py (paper-synthetic, scale 0.2, 10 seeds)."""
    document, rows = ladder.load_outputs(os.path.join(FIGURES, "ablation_ladder_transformer_cpu"))
    assert document["config"]["scale"] == 0.2 and len(document["config"]["report_seeds"]) == 10
    cells = [("paper-synthetic", c, o) for c in (CASE_A, CASE_B) for o in ladder.OPTIMIZERS]

    def found(step, component="forget1"):
        return {cell: dict(ladder.ingredient_differences(rows, document, *cell, component)).get(step)
                for cell in cells}

    choices = ladder.chosen(document)
    assert all(choices[("paper-synthetic", CASE_B, o, "SimNPO-sum")]["best_learning_rate"] is None
               for o in ladder.OPTIMIZERS)
    summed = found("drop the reference (summed)")
    assert all(summed[("paper-synthetic", CASE_A, o)].verdict == "higher" for o in ("adamw_legacy", "adamw"))
    normalised = found("drop the reference (normalised)")
    assert {cell for cell, d in normalised.items() if d.verdict == "lower"} == set(cells) - {
        ("paper-synthetic", CASE_A, "gd")}
    assert all(d.verdict != "lower" for d in found("normalise (with reference)").values())
    both = found("both (SimNPO - NPO)")
    assert {cell for cell, d in both.items() if d.verdict != "lower"} == {("paper-synthetic", CASE_A, "adamw_legacy")}
    d = both[("paper-synthetic", CASE_A, "adamw_legacy")]
    assert f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" == "+0.0214 [+0.0045, +0.0374]"
    assert all(d.verdict == "lower" for cell, d in found("both (SimNPO - NPO)", "forget2").items() if cell[1] == CASE_A)
    table = open(os.path.join(FIGURES, "ablation_ladder_transformer_cpu_table.md")).read()
    assert table == ladder.table_markdown(document, rows) + "\n"
