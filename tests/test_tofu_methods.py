"""The registry methods (GA+Mismatch, WHP, TaskNegation, KGA, SeUL, AdvGA, AdvNPO) in the TOFU protocol, at tiny
scale: a random 2-layer Llama with the word-level chat tokenizer of test_tofu_fixtures, forget01, 4 retain pairs,
two steps per training stage.

What is checked against independent references: TaskNegation's saved model is 2 theta_target - theta_ft at
lambda = 1 (full and LoRA) and the target itself at lambda = 0 (weights and every metric); KGA's recorded
unseen gap is the token-mean KL(A_n || A_D) recomputed item by item from the saved auxiliary model and the
target on the holdout pairs; S-MA is recomputed item by item (top-probability tokens at the target, greedy
hits at the model); GA+Mismatch's mismatch rows are the step's forget prompts followed by retain answers; an
auxiliary stage killed after a checkpoint resumes to the weights of an uninterrupted run.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm.tofu import __main__ as cli
from llm.tofu.data import load_split
from llm.tofu.format import format_example
from llm.tofu.methods import METHOD_NAMES, auxiliary_models, mismatch_items, parse_method_options
from llm.tofu.protocol import Protocol, ProtocolConfig
from markovsim.methods import METHODS

REGISTRY = tuple(METHODS)
TINY = dict(split="forget01", limit=4, batch_size=4, finetune_steps=2, unlearn_steps=2, max_new_tokens=3,
            finetune_lr=1e-2, unlearn_lr=1e-3,
            eval_batch_size=64, progress=False, device="cpu", num_threads=1)


def _strict(path):
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def _weights(protocol, name):
    return load_file(protocol.model_path(name) / "model.safetensors")


@pytest.fixture(scope="module")
def every_method(base, tmp_path_factory):
    """One protocol run with the seven registry methods (TaskNegation at lambda = 0), relearning 0 and 1 steps."""
    config = ProtocolConfig(methods=REGISTRY, model=base, relearn_steps=(0, 1),
                            method_options=("TaskNegation.scale=0",), **TINY)
    protocol = Protocol(config, tmp_path_factory.mktemp("methods") / "run")
    protocol.run()
    return protocol


def test_every_registry_method_is_a_row_of_the_results(every_method):
    results = _strict(every_method.out / "results.json")
    slugs = ["ga-mismatch", "whp", "tasknegation", "kga", "seul", "advga", "advnpo"]
    assert list(results["models"]) == ["target", "retain"] + slugs
    assert [results["models"][s]["method"] for s in slugs] == list(REGISTRY)
    keys = set(results["models"]["target"])
    for slug in slugs:
        row = results["models"][slug]
        assert set(row) == keys
        assert 0 <= row["forget_quality"] <= 1 and 0 <= row["model_utility"] <= 1 and 0 <= row["forget/s_ma"] <= 1
        assert all(0 <= row[f"mia_auc/{a}"] <= 1 for a in ("loss", "zlib", "min_k", "min_k_plus_plus"))
        assert results["relearning"][row["method"]]["steps"] == [0, 1]
    markdown = (every_method.out / "results.md").read_text()
    assert all(f"| {name} |" in markdown for name in REGISTRY) and "forget S-MA" in markdown


def test_auxiliary_stages_run_once_and_feed_their_methods(every_method):
    stages = every_method.stages()
    aux = ["aux-target-on-forget", "aux-base-on-forget", "aux-base-on-unseen"]  # WHP + TaskNegation share the first
    assert [s for s in stages if s.startswith("aux-")] == aux
    assert stages.index("aux-base-on-unseen") < stages.index("unlearn-kga")
    records = {s: every_method.record(s) for s in stages}
    assert records["unlearn-whp"]["auxiliary"] == ["aux-target-on-forget"]
    assert records["unlearn-kga"]["auxiliary"] == ["aux-base-on-forget", "aux-base-on-unseen"]
    assert records["aux-base-on-unseen"]["num_items"] == 40  # the 2 holdout authors' pairs
    assert records["unlearn-ga-mismatch"]["num_mismatch_pairs"] == 40
    target = _weights(every_method, "target")
    for slug in ("ga-mismatch", "whp", "kga", "seul", "advga", "advnpo"):  # each trained: weights moved
        assert records[f"unlearn-{slug}"]["steps"] == 2
        assert any(not torch.equal(value, target[key]) for key, value in _weights(every_method, slug).items()), slug


def test_task_negation_at_scale_zero_is_the_target(every_method):
    target, negated = _weights(every_method, "target"), _weights(every_method, "tasknegation")
    assert all(torch.equal(negated[key], value) for key, value in target.items())
    rows = _strict(every_method.out / "results.json")["models"]
    assert {k: v for k, v in rows["tasknegation"].items() if k != "method"} == {
        k: v for k, v in rows["target"].items() if k != "method"}
    assert every_method.record("eval-tasknegation")["result"] == every_method.record("eval-target")["result"]


def _token_log_probs(model, tokenizer, item):
    """(n, V) next-token log-probabilities at the answer's labelled positions and the (n,) labels, one item alone."""
    example = format_example(tokenizer, item.question, item.answer)
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V)
    keep = labels[1:] != -100
    return torch.log_softmax(logits[keep], -1), labels[1:][keep]


def test_kga_unseen_gap_is_the_token_mean_kl_of_the_auxiliary_to_the_target_on_the_holdout_pairs(every_method):
    from llm.tofu.model import load_causal_lm

    (target, tokenizer), (unseen_model, _) = (load_causal_lm(every_method.model_path(n))
                                              for n in ("target", "aux-base-on-unseen"))
    total, count = 0.0, 0
    for item in every_method.holdout_items():
        p, _ = _token_log_probs(unseen_model, tokenizer, item)  # A_n
        q, _ = _token_log_probs(target, tokenizer, item)  # A_D
        total += float((p.exp() * (p - q)).sum())
        count += len(p)
    assert every_method.record("unlearn-kga")["unseen_gap"] == pytest.approx(total / count, rel=1e-3)
    assert total / count > 1e-3  # the fine-tune moved A_n: a gap well above float32 noise


@pytest.mark.parametrize("name", ["target", "whp"])
def test_s_ma_matches_an_item_by_item_count(every_method, name):
    from llm.tofu.model import load_causal_lm

    target, tokenizer = load_causal_lm(every_method.model_path("target"))
    model, _ = load_causal_lm(every_method.model_path(name))
    hits = total = 0
    for item in load_split("forget01"):
        at_target, labels = _token_log_probs(target, tokenizer, item)
        chosen = at_target[torch.arange(len(labels)), labels]  # (n,) log p of each true token at the target
        order = sorted(range(len(labels)), key=lambda t: (-float(chosen[t]), t))[:math.ceil(0.25 * len(labels))]
        at_model, _ = _token_log_probs(model, tokenizer, item)
        hits += sum(int(at_model[t].argmax() == labels[t]) for t in order)
        total += len(order)
    sensitive = every_method.record(f"eval-{name}")["sensitive"]
    assert sensitive["num_sensitive_tokens"] == total
    assert sensitive["s_ma"] == pytest.approx(hits / total, abs=1e-12)


def test_mismatch_pairs_never_pair_a_forget_question_with_its_own_answer():
    forget = load_split("forget10")
    protocol_retain = Protocol.retain_items(type("P", (), {"config": ProtocolConfig(split="forget10"),
                                                           "holdout_items": Protocol.holdout_items})())
    items, forget_index, normal_index = mismatch_items(forget, protocol_retain, 3, seed=0)
    assert len(items) == 3 * len(forget)
    assert list(forget_index) == [i for i in range(len(forget)) for _ in range(3)]
    retain_answers = {item.answer for item in protocol_retain}
    for item, i, j in zip(items, forget_index, normal_index):
        assert item.question == forget[i].question and item.answer == protocol_retain[j].answer
        assert item.answer != forget[i].answer and item.answer in retain_answers
    assert len(set(normal_index.tolist())) > len(forget)  # spread over many retain pairs, not one
    again, other = (mismatch_items(forget, protocol_retain, 3, seed=s)[0] for s in (0, 1))
    assert again == items and other != items


def test_ga_mismatch_steps_see_their_forget_questions_with_retain_answers(base, tmp_path, monkeypatch):
    import llm.methods
    from llm.data import FORGET_STREAM, batch_indices
    from llm.tofu.format import collate
    from llm.tofu.model import load_causal_lm

    seen, original = [], llm.methods.method_loss

    def spy(state, model, batch, **kwargs):
        seen.append(batch)
        return original(state, model, batch, **kwargs)

    monkeypatch.setattr(llm.methods, "method_loss", spy)
    config = ProtocolConfig(methods=("GA+Mismatch",), model=base, relearn_steps=(),
                            method_options=("GA+Mismatch.responses_per_prompt=2", "GA+Mismatch.seed=3"), **TINY)
    protocol = Protocol(config, tmp_path / "run")
    protocol.run(["target", "unlearn-ga-mismatch"])
    forget, retain = load_split("forget01"), protocol.retain_items()
    pairs, _, normal_index = mismatch_items(forget, retain, 2, seed=3)
    tokenizer = load_causal_lm(base)[1]
    assert len(seen) == 2
    for step, batch in enumerate(seen):
        rows = batch_indices(len(forget), 4, step, config.seed, FORGET_STREAM)  # the step's forget pairs
        expected = [collate([format_example(tokenizer, items[r].question, items[r].answer) for r in chosen], 0)
                    for items, chosen in ((forget, rows), (pairs, [2 * r + k for r in rows for k in (0, 1)]))]
        for got, want in zip((batch.forget, batch.mismatch), expected):
            assert all(torch.equal(got[key], want[key]) for key in want)
        assert all(pairs[2 * r + k].question == forget[r].question and retain[normal_index[2 * r + k]].answer
                   == pairs[2 * r + k].answer != forget[r].answer for r in rows for k in (0, 1))
        counts = batch.counts
        assert (counts.forget_sequences, counts.mismatch_sequences, counts.retain_sequences) == (4, 8, 4)
        assert counts.forget_tokens == int((batch.forget["labels"][:, 1:] != -100).sum())


def _adapted(key: str) -> bool:
    return any(p in key for p in ("q_proj", "k_proj", "v_proj", "o_proj"))  # llm.lora's Llama targets


def test_task_negation_at_scale_one_is_twice_the_target_minus_the_fine_tuned_model(base, tmp_path):
    for lora in (False, True):
        protocol = Protocol(ProtocolConfig(methods=("TaskNegation", "AdvGA"), model=base, lora=lora,
                                           relearn_steps=(), **TINY), tmp_path / f"lora-{lora}")
        protocol.run(["target", "aux-target-on-forget", "unlearn-tasknegation"] + ["unlearn-advga"] * lora)
        target, tuned = _weights(protocol, "target"), _weights(protocol, "aux-target-on-forget")
        negated = _weights(protocol, "tasknegation")
        moved = [key for key in target if not torch.equal(tuned[key], target[key])]
        assert moved
        if lora:  # only the adapted attention projections move, in the auxiliary and in a LoRA-unlearned model
            unlearned = _weights(protocol, "advga")
            assert all(map(_adapted, moved))
            assert moved == [key for key in target if not torch.equal(unlearned[key], target[key])]
        for key, value in target.items():
            expected = 2 * value.double() - tuned[key].double()
            torch.testing.assert_close(negated[key].double(), expected, rtol=0, atol=1e-6, msg=key)


def test_an_auxiliary_stage_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(base, tmp_path,
                                                                                              monkeypatch):
    from llm.session import Session

    settings = dict(TINY, finetune_steps=5, checkpoint_every=2)
    config = ProtocolConfig(methods=("WHP",), model=base, relearn_steps=(), **settings)
    straight, killed = Protocol(config, tmp_path / "straight"), Protocol(config, tmp_path / "killed")
    for protocol in (straight, killed):
        protocol.run(["target"])
    straight.run(["aux-target-on-forget"])

    class Killed(Exception):
        pass

    original, steps, kills = Session.forward_backward, [], []

    def forward_backward(self, forward, at, backward):
        steps.append(at)
        if at == 3 and not kills:  # once: steps 0-2 updated, the checkpoint holds steps 0-1
            kills.append(at)
            raise Killed
        return original(self, forward, at, backward)

    monkeypatch.setattr(Session, "forward_backward", forward_backward)
    with pytest.raises(Killed):
        killed.run(["aux-target-on-forget"])
    assert not killed.done("aux-target-on-forget")
    assert (killed.out / "work" / "aux-target-on-forget" / "checkpoints" / "step-0000002").is_dir()
    del steps[:]
    assert killed.run(["aux-target-on-forget"]) == ["aux-target-on-forget"]
    assert steps == [2, 3, 4]  # resumed inside the stage, not restarted
    expected, got = _weights(straight, "aux-target-on-forget"), _weights(killed, "aux-target-on-forget")
    assert all(torch.equal(got[key], value) for key, value in expected.items())


@pytest.mark.parametrize("methods, message", [
    (["GA+mismatch"], "valid names: GA, GradDiff, NPO"),
    (["whp"], "GA+Mismatch, WHP, TaskNegation, KGA, SeUL, AdvGA, AdvNPO"),
    (["NPO", "NPO"], "repeat"),
])
def test_bad_method_names_exit_2_listing_the_valid_names(tmp_path, capsys, methods, message):
    assert cli.main(["run", "--out", str(tmp_path / "x"), "--no-progress", "--methods"] + methods) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option, message", [
    ("TaskNegation.scale=-1", "TaskNegation.scale=-1: scale must be >= 0"),
    ("KGA.nope=1", "unknown KGAConfig fields ['nope']"),
    ("NPO.beta=1", "'NPO' is not a registry method"),
    ("WHP.reinforce=3", "cannot be set on TOFU"),
    ("SeUL.fraction", "must read 'Name.field=value'"),
    ("SeUL.fraction=0.5", "method_options name ['SeUL'], which are not among methods ['NPO']"),
])
def test_bad_method_options_exit_2_naming_the_option(tmp_path, capsys, option, message):
    argv = ["run", "--out", str(tmp_path / "x"), "--no-progress", "--methods", "NPO", "--method-option", option]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_method_options_set_the_registry_config_and_the_auxiliary_models():
    options = parse_method_options(["KGA.auxiliary_from=reference", "SeUL.fraction=0.5", "WHP.target=hard"])
    assert options == {"KGA": {"auxiliary_from": "reference"}, "SeUL": {"fraction": 0.5}, "WHP": {"target": "hard"}}
    assert auxiliary_models("KGA", options) == ("aux-target-on-forget", "aux-target-on-unseen")
    assert auxiliary_models("KGA") == ("aux-base-on-forget", "aux-base-on-unseen")
    assert set(METHOD_NAMES) >= set(REGISTRY) and np.all([auxiliary_models(m) == () for m in ("SeUL", "AdvNPO")])


DDP_METHODS = ("KGA", "AdvGA", "GA+Mismatch")


def unlearn_registry(output: str, run_dir: str) -> None:
    """2 steps of each of DDP_METHODS with llm.tofu.finetune.unlearn_method; process 0 saves the final weights.

    Odd global batches (5 forget, 3 retain pairs) so the two shards differ in size. KGA's auxiliary models
    are freshly initialised with other seeds, untrained ("scratch" with an identity fine_tune): far from
    A_D, so its forget gap is not 0 (at a gap of 0 the gradient is float noise, which AdamW's first step
    blows up to +-lr per weight, differently in each summation order).
    """
    import os

    from test_tofu_fixtures import tiny_llama, tiny_tokenizer

    from llm.config import TrainConfig
    from llm.methods import prepare_method
    from llm.tofu.finetune import Examples, unlearn_method

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer(chat=True)
    items = load_split("forget01")
    forget, retain, unseen = items[:9], items[20:29], items[30:36]
    states = {}
    for method in DDP_METHODS:
        model = tiny_llama(len(tokenizer))
        examples = Examples.build(tokenizer, unseen)
        state = prepare_method(method, model, forget=forget, fine_tune=lambda start, data, settings: start,
                               unseen=unseen, batches=lambda data: [examples.batch(range(len(data)), "cpu")],
                               seed=1)  # A_f, A_n initialised with seeds 1, 2; the model with seed 0
        mismatch = mismatch_items(forget, retain, 2, seed=0)[0] if method == "GA+Mismatch" else None
        config = TrainConfig(batch_size=5, retain_batch_size=3, eval_batch_size=4, device="cpu", progress=False,
                             learning_rate=1e-3, steps=2)
        unlearn_method(model, tokenizer, state, forget, retain, config, os.path.join(run_dir, method),
                       mismatch=mismatch)
        states[method] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(states, output)


@pytest.mark.slow
def test_registry_methods_on_two_processes_match_one(tmp_path):
    """DDP (2 gloo processes) = 1 process: global counts, KGA's summed forget gap, LAU's summed ascent direction.

    Losses and gradient norms within tests/test_tofu_distributed.py's tolerances (float32 sums in another
    order). Weights: atol 2e-5, against AdamW steps that move each weight by up to lr = 1e-3. Measured: all
    weights within 1e-7 (KGA) except single coordinates whose two step gradients nearly cancel, where
    AdamW's m / sqrt(v) magnifies the float-order noise (5.3e-6 AdvGA, 2.4e-6 GA+Mismatch, one weight each).
    A wrong normaliser, or a batch-global quantity (KGA's gap, LAU's ascent direction) left unreduced,
    changes losses by tens of percent and weights by ~lr.
    """
    from two_processes import launch_two

    one, two = tmp_path / "one", tmp_path / "two"
    unlearn_registry(str(tmp_path / "one.pt"), str(one))
    launch_two("test_tofu_methods", "unlearn_registry", str(tmp_path / "two.pt"), str(two))
    single, double = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    for method in DDP_METHODS:
        logs = [[r for r in map(json.loads, open(path / method / "metrics.jsonl")) if r.get("kind") == "train"]
                for path in (one, two)]
        assert [r["step"] for r in logs[1]] == [0, 1]
        for key in logs[0][0]:
            if key != "kind":
                np.testing.assert_allclose([r[key] for r in logs[1]], [r[key] for r in logs[0]], rtol=1e-4,
                                           atol=1e-5, err_msg=f"{method} {key}")
        for name, value in single[method].items():
            torch.testing.assert_close(double[method][name], value, rtol=0, atol=2e-5, msg=f"{method} {name}")


def test_a_run_folder_from_before_method_options_still_resumes(base, tmp_path):
    out = tmp_path / "old"
    Protocol(ProtocolConfig(model=base, **TINY), out)
    saved = json.loads((out / "config.json").read_text())
    del saved["method_options"]  # as written before the setting existed
    (out / "config.json").write_text(json.dumps(saved))
    Protocol(ProtocolConfig(model=base, **TINY), out)  # no "different settings" refusal
    with pytest.raises(ValueError, match=r"different settings \(method_options\)"):
        Protocol(ProtocolConfig(model=base, methods=("NPO", "SimNPO", "SeUL"), method_options=("SeUL.fraction=0.5",),
                                **TINY), out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_registry_method_in_the_tiny_protocol_on_cuda(base, tmp_path):
    """On a GPU (bf16 autocast, float32 weights): every stage runs, losses finite, no divergence, models saved."""
    pytest.importorskip("rouge_score")
    settings = dict(TINY, device="cuda", num_threads=None)
    protocol = Protocol(ProtocolConfig(methods=REGISTRY, model=base, relearn_steps=(1,), **settings),
                        tmp_path / "run")
    assert protocol.run() == protocol.stages()
    for method in REGISTRY:
        record = protocol.record(f"unlearn-{method.lower().replace('+', '-')}")
        assert record["diverged_at"] is None and (method == "TaskNegation" or math.isfinite(record["last_loss"]))
    rows = _strict(tmp_path / "run" / "results.json")["models"]
    assert all(math.isfinite(rows[name]["forget/s_ma"]) for name in rows)
