"""The TOFU protocol's membership inference and relearning attack at tiny scale: the holdout authors
(which pairs, removed from where), the results schema, the AUCs against a brute-force count from the
stored scores, relearning's step 0 against the eval stage, and relearning resumed after a kill."""

import json
import os

import numpy as np
import pytest
from test_tofu_fixtures import tiny_llama, tiny_tokenizer

from llm import mia
from llm.tofu import __main__ as cli
from llm.tofu import metrics
from llm.tofu.data import author_items, load_split
from llm.tofu.evaluate import load_eval_sets
from llm.tofu.protocol import Protocol, ProtocolConfig
from llm.tofu.relearn import PER_PAIR_METRICS, RELEARN_METRICS, relearning_intervals, split_forget

TINY = dict(split="forget01", limit=4, batch_size=4, finetune_steps=2, unlearn_steps=1, max_new_tokens=2,
            eval_batch_size=64, progress=False, device="cpu", relearn_lr=1e-3,
            num_threads=1)  # the module fixture runs before conftest's one-thread fixture: say it here


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
    """A finished tiny run: NPO and SimNPO, relearning after 0, 1 and 3 steps."""
    protocol = Protocol(ProtocolConfig(methods=("NPO", "SimNPO"), model=base, relearn_steps=(0, 1, 3), **TINY),
                        tmp_path_factory.mktemp("run") / "run")
    protocol.run()
    return protocol


def _questions(items):
    return {item.question for item in items}


@pytest.mark.parametrize("split, authors", [("forget01", 2), ("forget05", 10), ("forget10", 20)])
def test_holdout_authors_are_whole_retain_authors_outside_every_forget_split(tmp_path, split, authors):
    protocol = Protocol(ProtocolConfig(split=split), tmp_path)
    held = protocol.holdout_items()
    assert protocol.config.holdout_authors == list(range(90, 90 + authors)) and len(held) == 20 * authors
    full = load_split("full")
    assert [full.index(item) for item in held] == list(range(1800, 1800 + 20 * authors))
    assert not _questions(held) & _questions(load_split("forget10"))  # the largest forget split
    assert _questions(held) <= _questions(load_split("retain90"))
    assert not _questions(held) & _questions(protocol.retain_items())
    assert len(protocol.retain_items()) == len(load_split(protocol.config.retain_split)) - 20 * authors


def test_holdout_at_the_start_shifts_the_limited_retain_sets(tmp_path):
    protocol = Protocol(ProtocolConfig(split="forget05", holdout_first_author=0, limit=5), tmp_path / "start")
    assert protocol.retain_items() == load_split("full")[200:205]  # authors 0-9 held out: the first 5 after them
    held = _questions(author_items(range(10)))
    assert _questions(protocol.holdout_items()) == held
    sets = load_eval_sets("forget05", 5, exclude_questions=held)
    assert sets["retain"] == [i for i in load_split("retain_perturbed") if i.question not in held][:5]
    assert len(sets["forget"]) == 200  # the forget set stays whole
    # the default holdout (authors 90-99) leaves the smoke-run retain sets as they were
    default = Protocol(ProtocolConfig(split="forget05", limit=5), tmp_path / "default")
    assert default.retain_items() == load_split("retain95")[:5]


def test_split_forget_takes_the_first_pairs_of_every_author():
    train, evaluate = split_forget(40, 3)
    assert train == [0, 1, 2, 20, 21, 22]
    assert sorted(train + evaluate) == list(range(40)) and not set(train) & set(evaluate)


@pytest.mark.parametrize("settings, message", [
    (dict(split="forget10", holdout_first_author=161), r"holdout_first_author must be an int in \[0, 160\]"),
    (dict(holdout_first_author=-1), "holdout_first_author"),
    (dict(relearn_steps=(0, 10, 10)), "strictly increasing"),
    (dict(relearn_steps=(-1,)), "relearn_steps"),
    (dict(relearn_items_per_author=20), "relearn_items_per_author"),
    (dict(relearn_lr=0.0), "relearn_lr"),
    (dict(relearn_batch_size=0), "relearn_batch_size"),
])
def test_bad_mia_and_relearning_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ProtocolConfig(**settings)


def test_results_schema_and_aucs_from_the_stored_scores(finished):
    results = json.loads((finished.out / "results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert results["holdout"]["authors"] == [90, 91] and results["holdout"]["full_items"] == [1800, 1840]
    assert list(results["relearning"]) == ["target", "retain", "NPO", "SimNPO"]  # the controls, then each method
    for name, curve in results["relearning"].items():
        extra = [] if name == "retain" else ["beyond_fresh", "beyond_fresh_interval"]
        assert list(curve) == ["steps"] + list(RELEARN_METRICS) + ["interval", "recovery", "recovery_interval"] + extra
        assert curve["steps"] == [0, 1, 3] and all(len(curve[name]) == 3 for name in RELEARN_METRICS)
        for key in ["interval", "recovery_interval"] + extra[1:]:
            assert list(curve[key]) == list(PER_PAIR_METRICS)
            assert all(low <= high for values in curve[key].values() for low, high in values)
    assert results["relearning"]["retain"]["forget_quality"][0] == pytest.approx(1.0)  # the retain model vs itself
    assert "controls" in results["relearning_setup"] and "bootstrap" in results["relearning_setup"]["intervals"]
    assert results["relearning_setup"]["num_relearn_pairs"] == 8 and results["relearning_setup"]["num_eval_pairs"] == 32
    retain_scores = finished.record("eval-retain")["mia"]
    for name, row in results["models"].items():
        scores = finished.record(f"eval-{name}")["mia"]
        assert len(scores["forget"]["loss"]) == 40 and len(scores["holdout"]["min_k_plus_plus"]) == 40
        for attack in mia.ATTACKS:
            members, nonmembers = scores["forget"][attack], scores["holdout"][attack]
            wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in members for n in nonmembers)
            assert row[f"mia_auc/{attack}"] == pytest.approx(wins / 1600)
            retain_auc = mia.auc(retain_scores["forget"][attack], retain_scores["holdout"][attack])
            expected = (retain_auc - row[f"mia_auc/{attack}"]) / (1 - retain_auc) * 100  # MUSE's sign
            assert row[f"privleak/{attack}"] == pytest.approx(expected, abs=1e-9)
    assert all(results["models"]["retain"][f"privleak/{a}"] == 0 for a in mia.ATTACKS)
    table = (finished.out / "results.md").read_text()
    assert "| Min-K%++ AUC |" in table and "| SimNPO | 3 |" in table and "| retain (learned fresh) | 3 |" in table
    assert "| prob recovery | prob beyond fresh |" in table


def test_relearning_step_zero_matches_the_eval_stage(finished):
    _, rows = finished.relearn_rows()
    evaluation = finished.record("eval-npo")["result"]["sets"]["forget"]
    retain = finished.record("eval-retain")["result"]["sets"]["forget"]
    ratios = np.asarray(evaluation["truth_ratios"])[rows]
    curve = finished.record("relearn-npo")["relearning"]
    assert curve["forget_truth_ratio"][0] == pytest.approx(metrics.truth_ratio_aggregate(ratios, forget=True))
    assert curve["forget_rouge_l"][0] == pytest.approx(np.mean(np.asarray(evaluation["rouge_l_per_item"])[rows]))
    expected = metrics.forget_quality(ratios, np.asarray(retain["truth_ratios"])[rows])
    assert curve["forget_quality"][0] == pytest.approx(expected)
    assert curve["forget_probability"][1] != curve["forget_probability"][0]  # relearning moved the model
    # step 0 is the eval stage's own per-pair values on the evaluation pairs (no second pass), to the last bit
    assert curve["per_pair"]["forget_probability"][0] == np.asarray(evaluation["probability_per_item"])[rows].tolist()
    assert curve["per_pair"]["forget_truth_ratio"][0] == metrics.forget_truth_ratio_scores(ratios).tolist()


def test_relearning_intervals_are_the_bootstrap_of_the_stored_pairs(finished):
    """Every interval of results.json recomputed from the stage records' per-pair values with the bootstrap helper:
    levels, recoveries since step 0 and recoveries beyond the retain model's, paired over the same pairs."""
    results = json.loads((finished.out / "results.json").read_text())
    pairs = {name: finished.record(f"relearn-{slug}")["relearning"]["per_pair"] for name, slug in
             (("target", "target"), ("retain", "retain"), ("NPO", "npo"), ("SimNPO", "simnpo"))}
    counts = metrics.bootstrap_counts(32, metrics.BOOTSTRAP_RESAMPLES, 0)
    for name, curve in results["relearning"].items():
        for metric in PER_PAIR_METRICS:
            values = np.asarray(pairs[name][metric])  # (step counts, 32 evaluation pairs)
            fresh = np.asarray(pairs["retain"][metric])
            assert values.shape == (3, 32)
            np.testing.assert_allclose(values.mean(1), curve[metric], rtol=1e-12)
            for i in range(3):
                assert curve["interval"][metric][i] == list(metrics.bootstrap_interval(values[i], counts=counts))
                gain = values[i] - values[0]
                assert curve["recovery"][metric][i] == pytest.approx(gain.mean(), abs=1e-12)
                assert curve["recovery_interval"][metric][i] == list(metrics.bootstrap_interval(gain, counts=counts))
                if name != "retain":
                    beyond = gain - (fresh[i] - fresh[0])
                    assert curve["beyond_fresh"][metric][i] == pytest.approx(beyond.mean(), abs=1e-12)
                    assert curve["beyond_fresh_interval"][metric][i] == list(
                        metrics.bootstrap_interval(beyond, counts=counts))
    # the retain control at step 0 is the retain model's own evaluation on the same pairs
    _, rows = finished.relearn_rows()
    evaluation = finished.record("eval-retain")["result"]["sets"]["forget"]
    assert results["relearning"]["retain"]["forget_probability"][0] == pytest.approx(
        np.mean(np.asarray(evaluation["probability_per_item"])[rows]))


def test_relearning_without_per_pair_values_says_why_its_intervals_are_missing():
    """A stage record from before per-pair values were kept: levels and recoveries, null intervals and the reason."""
    old = {"steps": [0, 2], "forget_probability": [0.1, 0.3], "forget_rouge_l": [0.2, 0.2],
           "forget_truth_ratio": [0.5, 0.6], "forget_quality": [0.01, 0.02]}
    summary = relearning_intervals({"retain": old, "NPO": old | {"forget_probability": [0.2, 0.5]}})
    assert summary["NPO"]["interval"]["forget_probability"] == [None, None]
    assert summary["NPO"]["recovery"]["forget_probability"] == pytest.approx([0.0, 0.3])
    assert summary["NPO"]["beyond_fresh"]["forget_probability"] == pytest.approx([0.0, 0.1])
    assert "per-pair" in summary["NPO"]["missing"]["interval"]
    no_start = relearning_intervals({"NPO": old | {"steps": [1, 2]}})["NPO"]
    assert "recovery" not in no_start and "step count 0" in no_start["missing"]["recovery"]


def test_relearning_resumes_at_the_next_step_count(finished, tmp_path, monkeypatch):
    """On a copy of the finished run (the module's other tests read the original): what is measured and trained
    again is seen by spying on the measuring and training functions."""
    import shutil

    from llm.tofu import finetune as training
    from llm.tofu import relearn

    run = Protocol(finished.config, shutil.copytree(finished.out, tmp_path / "run"))
    work = run.out / "work" / "relearn-simnpo"
    before = run.record("relearn-simnpo")["relearning"]
    os.remove(run.stage_path("relearn-simnpo"))  # killed during the last step count
    os.remove(work / "steps-3.json")
    measured, trained = [], []
    measure, finetune = relearn.measure, training.finetune
    monkeypatch.setattr(relearn, "measure", lambda *args, **kwargs: measured.append(1) or measure(*args, **kwargs))
    monkeypatch.setattr(training, "finetune", lambda model, tokenizer, items, config, *args, **kwargs:
                        trained.append(config.steps) or finetune(model, tokenizer, items, config, *args, **kwargs))
    assert run.run() == ["relearn-simnpo"]  # only the killed stage: the report's record is still there
    assert trained == [3] and len(measured) == 1  # only the killed step count; 0 and 1 are read back
    assert run.record("relearn-simnpo")["relearning"] == before  # same numbers: deterministic, resumed
    assert finished.done("relearn-simnpo") and (finished.out / "work" / "relearn-simnpo" / "steps-3.json").is_file()


def test_relearning_takes_step_zero_from_the_eval_stage_without_measuring_it(finished, tmp_path, monkeypatch):
    import shutil

    from llm.tofu import relearn

    run = Protocol(finished.config, shutil.copytree(finished.out, tmp_path / "run"))
    before = run.record("relearn-npo")["relearning"]
    os.remove(run.stage_path("relearn-npo"))
    shutil.rmtree(run.out / "work" / "relearn-npo")
    measured = []
    measure = relearn.measure
    monkeypatch.setattr(relearn, "measure", lambda *args, **kwargs: measured.append(1) or measure(*args, **kwargs))
    assert run.run() == ["relearn-npo"]
    assert len(measured) == 2  # steps 1 and 3; step 0 read from eval-npo
    assert run.record("relearn-npo")["relearning"] == before


def test_no_relearn_steps_means_no_relearning_stages(base, tmp_path, capsys):
    argv = ["stages", "--split", "forget01", "--methods", "NPO", "--model", base, "--out", str(tmp_path / "s"),
            "--relearn-steps"]
    assert cli.main(argv) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert not [s for s in stages if s.startswith("relearn-")] and "report" in stages


def test_a_relearning_run_of_s_steps_is_the_first_s_steps_of_a_longer_run(tmp_path):
    import torch

    from llm.checkpoint import checkpoint_path, load_checkpoint
    from llm.tofu.finetune import finetune
    from llm.tofu.relearn import relearn_config

    tokenizer = tiny_tokenizer(chat=True)
    pairs = load_split("forget01")[:8]
    short, long = tiny_llama(len(tokenizer), seed=5), tiny_llama(len(tokenizer), seed=5)
    runtime = dict(seed=0, device="cpu", progress=False)
    finetune(short, tokenizer, pairs, relearn_config(2, 4, 1e-3, **runtime))
    longer = relearn_config(3, 4, 1e-3, checkpoint_every=2, **runtime)
    finetune(long, tokenizer, pairs, longer, tmp_path / "long")
    state = load_checkpoint(checkpoint_path(tmp_path / "long", 2))[0]["model"]
    for name, value in short.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    assert not torch.equal(long.state_dict()["lm_head.weight"], short.state_dict()["lm_head.weight"])
