"""llm.methods: the registry methods on transformers equal the markovsim pieces applied to independently computed
log-probabilities, reduce to GA / NPO in their limits, add up over data-parallel shards, and reject bad input."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from llm.data import encode
from llm.methods import (
    MethodBatch,
    MethodCounts,
    StepContext,
    apply_task_negation,
    decoder_layers,
    lora_task_vector,
    method_loss,
    perturbed_hidden_states,
    prepare_method,
    replace_config,
    required_batches,
    step_context,
)
from llm.models import build_model
from llm.objective import BatchCounts, UnlearningBatch, objective_terms
from markovsim.data import SequenceSet
from markovsim.losses import masked_ga
from markovsim.methods import METHODS, FineTuneConfig, get_config
from markovsim.methods.kga import kga_loss
from markovsim.methods.mismatch import ga_mismatch_loss, mismatch_sequences
from markovsim.objectives import Objective

V = 6
torch.set_num_threads(1)


def sequences(seed: int, n: int, names=("forget1", "forget2")) -> SequenceSet:
    """n random sequences of lengths 3..6 over V states, alternating between two components."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 7, size=n)
    tokens = np.full((n, 6), -1, dtype=np.int64)
    for i, length in enumerate(lengths):
        tokens[i, :length] = rng.integers(0, V, size=length)
    return SequenceSet(tokens, lengths, np.arange(n) % len(names), names, V)


def hf(data: SequenceSet) -> dict:
    encoded = encode(data, "response")
    return encoded.batch(np.arange(len(encoded)))


def tiny(preset="tiny-synthetic", seed=0):
    return build_model(preset, V + 1, 8, seed=seed).double()


def sgd_fine_tune(steps=1, learning_rate=0.5):
    """A fine_tune callable: plain SGD steps on the token-mean NLL of the data's response labels."""
    def fine_tune(model, data, settings):
        batch = hf(data)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
        for _ in range(steps):
            optimizer.zero_grad()
            nll(model, batch).backward()
            optimizer.step()
        return model
    return fine_tune


def identity_fine_tune(model, data, settings):
    return model


def independent_token_logps(model, batch):
    """Plain forward + log_softmax + a Python loop over the labels: (logps per row, |y| per row, log-probs)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits.double(), -1)  # (b, t, V)
    logps, counts = [], []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for j in range(logits.shape[1] - 1):
            label = int(batch["labels"][b, j + 1])
            if label != -100:
                total = total + log_probs[b, j, label]
                count += 1
        logps.append(total)
        counts.append(count)
    return torch.stack(logps), torch.tensor(counts, dtype=torch.float64), log_probs


def nll(model, batch):
    logps, counts, _ = independent_token_logps(model, batch)
    return -(logps / counts).mean()


def token_kl_sum(target_log_probs, log_probs, batch):
    """sum over labelled positions j (predicting labels[j + 1]) of KL(target || model), by an explicit loop."""
    total = 0.0
    for b in range(log_probs.shape[0]):
        for j in range(log_probs.shape[1] - 1):
            if int(batch["labels"][b, j + 1]) != -100:
                p = target_log_probs[b, j].exp()
                keep = p > 0
                total = total + (p[keep] * (target_log_probs[b, j][keep] - log_probs[b, j][keep])).sum()
    return total


def gradients(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(value, params, allow_unused=True), params)]


def assert_same_gradients(first, second, atol=1e-10):
    for g, h in zip(first, second):
        torch.testing.assert_close(g, h, rtol=1e-7, atol=atol)


@pytest.fixture(scope="module")
def data():
    forget, retain = sequences(1, 6), sequences(2, 6, ("retain",))
    mismatch = mismatch_sequences(forget, retain, 2, np.random.default_rng(0))
    return {"forget": forget, "retain": retain, "unseen": sequences(3, 4, ("retain",)), "mismatch": mismatch}


def full_batch(data, ref_logps=None):
    return MethodBatch.single(hf(data["forget"]), hf(data["retain"]), hf(data["mismatch"]), ref_logps)


# --- Per method: the transformer loss = the markovsim piece on independently computed log-probs ---------------


def test_ga_mismatch_equals_the_piece_on_independent_logps(data):
    model = tiny()
    state = prepare_method("GA+Mismatch", model, config=get_config("GA+Mismatch", responses_per_prompt=2))
    batch = full_batch(data)
    total, terms = method_loss(state, model, batch)
    f_logps, f_n, _ = independent_token_logps(model, batch.forget)
    m_logps, m_n, _ = independent_token_logps(model, batch.mismatch)
    _, _, log_probs = independent_token_logps(model, batch.retain)
    _, _, ref = independent_token_logps(state.reference, batch.retain)
    retain_kl = token_kl_sum(ref, log_probs, batch.retain) / batch.counts.retain_tokens
    expected, _ = ga_mismatch_loss(f_logps, f_n, m_logps, m_n, retain_kl, state.config)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert float(terms["retain"]) == pytest.approx(0.0, abs=1e-12)  # the model is still the reference
    assert_same_gradients(gradients(model, total), gradients(model, expected))


def test_ga_mismatch_with_zero_mismatch_and_kl_weights_is_ga(data):
    model = tiny()
    config = get_config("GA+Mismatch", forget_weight=1.0, mismatch_weight=0.0, retain_weight=0.0)
    state = prepare_method("GA+Mismatch", model, config=config)
    batch = full_batch(data)
    total, _ = method_loss(state, model, batch)
    ga = objective_terms(model, Objective("ga"), UnlearningBatch(batch.forget, None, BatchCounts(6))).total
    assert float(total.detach()) == pytest.approx(float(ga.detach()), rel=1e-12)
    assert_same_gradients(gradients(model, total), gradients(model, ga))


def test_whp_equals_generic_targets_computed_by_hand(data):
    model = tiny()
    config = get_config("WHP", alpha=2.0)
    state = prepare_method("WHP", model, data["forget"], fine_tune=sgd_fine_tune(3), config=config)
    batch = MethodBatch.single(hf(data["forget"]))
    total, _ = method_loss(state, model, batch)
    with torch.no_grad():
        def raw(m):
            return m(input_ids=batch.forget["input_ids"], attention_mask=batch.forget["attention_mask"]).logits
        v_b, v_r = raw(state.reference), raw(state.auxiliary["reinforced"])
        v_g = v_b - 2.0 * torch.clamp(v_r - v_b, min=0.0)
        assert float((v_r - v_b).abs().max()) > 1e-3  # the reinforced model differs
    _, _, log_probs = independent_token_logps(model, batch.forget)
    expected = token_kl_sum(torch.log_softmax(v_g, -1), log_probs, batch.forget) / batch.counts.forget_tokens
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert float(total.detach()) > 0
    assert_same_gradients(gradients(model, total), gradients(model, expected))


def test_whp_hard_target_is_the_cross_entropy_to_the_generic_argmax(data):
    model, trained = tiny(), tiny(seed=2)
    state = prepare_method("WHP", model, data["forget"], fine_tune=sgd_fine_tune(3),
                           config=get_config("WHP", alpha=1.5, target="hard"))
    batch = MethodBatch.single(hf(data["forget"]))
    total, _ = method_loss(state, trained, batch)
    with torch.no_grad():
        def raw(m):
            return m(input_ids=batch.forget["input_ids"], attention_mask=batch.forget["attention_mask"]).logits
        v_b, v_r = raw(state.reference), raw(state.auxiliary["reinforced"])
        labels = (v_b - 1.5 * torch.clamp(v_r - v_b, min=0.0)).argmax(-1)  # (b, t) generic labels
    _, _, log_probs = independent_token_logps(trained, batch.forget)
    expected = 0.0
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1] - 1):
            if int(batch.forget["labels"][b, j + 1]) != -100:
                expected = expected - log_probs[b, j, labels[b, j]]
    expected = expected / batch.counts.forget_tokens
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert_same_gradients(gradients(trained, total), gradients(trained, expected))


def test_whp_with_reinforced_equal_to_baseline_has_zero_loss_and_gradient(data):
    model = tiny()
    state = prepare_method("WHP", model, data["forget"], fine_tune=identity_fine_tune)
    total, _ = method_loss(state, model, MethodBatch.single(hf(data["forget"])))
    assert abs(float(total.detach())) < 1e-12
    assert max(float(g.abs().max()) for g in gradients(model, total)) < 1e-10
    # alpha = 0 (replace_config: the same reinforced model) also makes the target the baseline
    state = prepare_method("WHP", model, data["forget"], fine_tune=sgd_fine_tune(3))
    batch = MethodBatch.single(hf(data["forget"]))
    assert float(method_loss(state, model, batch).total.detach()) > 1e-6
    total, _ = method_loss(replace_config(state, alpha=0.0), model, batch)
    assert abs(float(total.detach())) < 1e-12


def kga_state(model, data, fine_tune, **overrides):
    def batches(sequence_set):
        return [hf(sequence_set)]
    config = get_config("KGA", auxiliary_from="reference", **overrides)
    return prepare_method("KGA", model, data["forget"], data["retain"], fine_tune, config, data["unseen"], batches)


def test_kga_known_answer_when_the_forget_model_is_the_original(data):
    """A_f = A_D = A*: forget gap 0 and retain KL 0, so L = |0 - c| = c, the unseen gap, computed by hand."""
    model = tiny()
    train = sgd_fine_tune(3)
    state = kga_state(model, data, lambda m, d, s: m if d is data["forget"] else train(m, d, s))  # A_f = A_D
    unseen_model = state.auxiliary["unseen"]
    unseen = hf(data["unseen"])
    _, _, target = independent_token_logps(unseen_model, unseen)
    _, counts, original = independent_token_logps(model, unseen)
    expected_gap = token_kl_sum(target, original, unseen) / counts.sum()
    assert state.unseen_gap == pytest.approx(float(expected_gap), rel=1e-10)
    assert state.unseen_gap > 1e-4  # A_n was trained on D_n
    total, terms = method_loss(state, model, full_batch(data))
    assert float(total.detach()) == pytest.approx(state.unseen_gap, rel=1e-10)
    assert float(terms["forget_gap"]) == pytest.approx(0.0, abs=1e-12)


def test_kga_equals_the_piece_on_independent_gaps(data):
    model = tiny()
    state = kga_state(model, data, sgd_fine_tune(2), retain_weight=0.7)
    trained = tiny(seed=5)  # a different A* than the original
    batch = full_batch(data)
    total, _ = method_loss(state, trained, batch)
    _, _, a_f = independent_token_logps(state.auxiliary["forget"], batch.forget)
    _, _, a_star = independent_token_logps(trained, batch.forget)
    forget_gap = token_kl_sum(a_f, a_star, batch.forget) / batch.counts.forget_tokens
    _, _, a_d = independent_token_logps(model, batch.retain)
    _, _, a_star_r = independent_token_logps(trained, batch.retain)
    retain_kl = token_kl_sum(a_d, a_star_r, batch.retain) / batch.counts.retain_tokens
    expected, _ = kga_loss(forget_gap, torch.tensor(state.unseen_gap, dtype=torch.float64), retain_kl, 0.7)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert_same_gradients(gradients(trained, total), gradients(trained, expected))


def test_seul_with_fraction_one_is_token_mean_ga(data):
    model = tiny()
    state = prepare_method("SeUL", model, config=get_config("SeUL", fraction=1.0))
    batch = MethodBatch.single(hf(data["forget"]))
    total, terms = method_loss(state, model, batch)
    ga = objective_terms(model, Objective("ga"), UnlearningBatch(batch.forget, None, BatchCounts(6))).total
    assert float(total.detach()) == pytest.approx(float(ga.detach()), rel=1e-12)
    assert float(terms["selected_fraction"]) == 1.0
    assert_same_gradients(gradients(model, total), gradients(model, ga))


def test_seul_selects_the_most_probable_tokens_of_each_response(data):
    model = tiny()
    state = prepare_method("SeUL", model, config=get_config("SeUL", fraction=0.5))
    batch = MethodBatch.single(hf(data["forget"]))
    total, _ = method_loss(state, model, batch)
    _, _, log_probs = independent_token_logps(model, batch.forget)
    expected = 0.0
    for b in range(log_probs.shape[0]):
        values = [log_probs[b, j, int(batch.forget["labels"][b, j + 1])] for j in range(log_probs.shape[1] - 1)
                  if int(batch.forget["labels"][b, j + 1]) != -100]
        keep = int(np.ceil(0.5 * len(values)))
        expected = expected + sum(sorted(values, key=float, reverse=True)[:keep]) / keep
    expected = expected / log_probs.shape[0]
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert_same_gradients(gradients(model, total), gradients(model, expected))


def test_seul_static_states_mask_equals_masked_ga(data):
    model = tiny()
    state = prepare_method("SeUL", model, config=get_config("SeUL", sensitive_states=(0, 3)))
    batch = MethodBatch.single(hf(data["forget"]))
    total, _ = method_loss(state, model, batch)
    logits = model(input_ids=batch.forget["input_ids"], attention_mask=batch.forget["attention_mask"]).logits
    labels = batch.forget["labels"][:, 1:]
    mask = labels != -100
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    expected = masked_ga(token_logps, mask, (labels == 0) | (labels == 3)).mean()
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)


@pytest.mark.parametrize("name, objective", [("AdvGA", Objective("ga")), ("AdvNPO", Objective("npo", beta=0.1)),
                                             ("AdvNPO", Objective("npo", "nll", beta=0.1, retain_weight=0.5))])
def test_lau_with_zero_epsilon_is_ga_or_npo(data, name, objective):
    model = tiny()
    state = prepare_method(name, model, config=get_config(name, objective=objective, epsilon=0.0, inner_steps=3))
    ref = independent_token_logps(model, hf(data["forget"]))[0].detach()
    batch = full_batch(data, ref)
    total, terms = method_loss(state, model, batch)
    plain = objective_terms(model, objective, UnlearningBatch(batch.forget, ref, BatchCounts(6, 6, 0),
                                                              batch.retain)).total
    assert float(total.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    assert float(terms["perturbation_norm"]) == 0
    assert_same_gradients(gradients(model, total), gradients(model, plain))


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-gpt2", "tiny-llama"])
def test_lau_adversary_stays_in_the_ball_and_restores_forget_likelihood(data, preset):
    model = tiny(preset)
    state = prepare_method("AdvGA", model, config=get_config("AdvGA", epsilon=0.5, inner_steps=4))
    batch = MethodBatch.single(hf(data["forget"]))
    context = step_context(state, model, batch)
    delta = context.perturbation
    assert delta.shape == (model.config.hidden_size,)
    assert float(delta.norm()) == pytest.approx(0.5, rel=1e-9)  # 4 steps of 0.2 reach the boundary
    clean = objective_terms(model, Objective("ga"), UnlearningBatch(batch.forget, None, BatchCounts(6))).total
    total, _ = method_loss(state, model, batch, context)
    assert float(total.detach()) > float(clean.detach())  # GA loss = mean logp/|y|: the adversary raised the likelihood
    assert all(torch.isfinite(g).all() for g in gradients(model, total))


def test_perturbation_hook_on_the_last_gpt2_layer_shifts_the_final_norm_input(data):
    model = tiny("tiny-gpt2")
    batch = hf(data["forget"])
    captured = {}
    handle = model.transformer.h[-1].register_forward_hook(
        lambda module, inputs, output: captured.setdefault("h", output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    delta = torch.linspace(-1, 1, model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad(), perturbed_hidden_states(model, -1, delta):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = model.lm_head(model.transformer.ln_f(captured["h"] + delta))
    torch.testing.assert_close(logits, expected)
    assert decoder_layers(model) is model.transformer.h
    assert decoder_layers(tiny("tiny-llama")) is not None and len(decoder_layers(tiny())) == 2


# --- Data parallelism: shares with global counts add up ------------------------------------------------------


def half(batch: dict, rows) -> dict:
    return {key: value[rows] for key, value in batch.items()}


@pytest.mark.parametrize("name", ["GA+Mismatch", "WHP", "KGA", "SeUL", "AdvNPO"])
def test_shards_with_global_counts_add_up_to_the_whole_batch(data, name):
    model = tiny()
    fine_tune = sgd_fine_tune(2)
    if name == "KGA":
        state = kga_state(model, data, fine_tune)
    else:
        config = get_config(name, objective=Objective("npo", "nll", beta=0.1)) if name == "AdvNPO" else None
        state = prepare_method(name, model, data["forget"], data["retain"], fine_tune, config)
    trained = tiny(seed=3)
    ref = independent_token_logps(model, hf(data["forget"]))[0].detach()
    whole = full_batch(data, ref)
    context = step_context(state, trained, whole)
    total = method_loss(state, trained, whole, context).total
    parts = []
    for rows in (slice(0, 2), slice(2, 6)):
        shard = MethodBatch(half(whole.forget, rows), whole.counts, half(whole.retain, rows),
                            half(whole.mismatch, slice(2 * rows.start, 2 * rows.stop)), ref[rows])
        parts.append(method_loss(state, trained, shard, context).total)
    assert float((parts[0] + parts[1]).detach()) == pytest.approx(float(total.detach()), rel=1e-10)
    assert_same_gradients([a + b for a, b in zip(gradients(trained, parts[0]), gradients(trained, parts[1]))],
                          gradients(trained, total))


def test_kga_reduce_sum_gives_each_shard_the_global_forget_gap(data):
    model, trained = tiny(), tiny(seed=4)
    state = kga_state(model, data, sgd_fine_tune(1))
    whole = full_batch(data)
    shards = [MethodBatch(half(whole.forget, rows), whole.counts, half(whole.retain, rows)) for rows in
              (slice(0, 3), slice(3, 6))]
    gaps = [step_context(state, trained, shard).forget_gap for shard in shards]  # each shard's share alone
    reduced = step_context(state, trained, shards[0], reduce_sum=lambda gap: gap + gaps[1])
    assert reduced.forget_gap == pytest.approx(step_context(state, trained, whole).forget_gap, rel=1e-12)
    assert gaps[0] != pytest.approx(reduced.forget_gap)


def test_forget_and_retain_parts_add_up_to_the_whole(data):
    model, trained = tiny(), tiny(seed=4)
    state = kga_state(model, data, sgd_fine_tune(1))
    batch = full_batch(data)
    parts = [method_loss(state, trained, batch, part=p).total for p in ("forget", "retain", "all")]
    assert float((parts[0] + parts[1]).detach()) == pytest.approx(float(parts[2].detach()), rel=1e-12)


# --- TaskNegation ----------------------------------------------------------------------------------------------


def test_task_negation_known_answers(data):
    model = tiny()
    original = copy.deepcopy(model.state_dict())
    state = prepare_method("TaskNegation", model, data["forget"], fine_tune=sgd_fine_tune(1, 0.3))
    fine_tuned = state.auxiliary["fine_tuned"]
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # prepare leaves model alone
    same = apply_task_negation(copy.deepcopy(model), fine_tuned, 0.0)
    assert all(torch.equal(original[k], v) for k, v in same.state_dict().items())  # lambda = 0: the identity
    # one SGD step of size eta on the NLL, then lambda = 1: exactly one gradient-ASCENT step of size eta
    probe = copy.deepcopy(model)
    grads = dict(zip([n for n, _ in probe.named_parameters()], gradients(probe, nll(probe, hf(data["forget"])))))
    negated = apply_task_negation(copy.deepcopy(model), fine_tuned, 1.0)
    for name, parameter in negated.named_parameters():
        torch.testing.assert_close(parameter, original[name] + 0.3 * grads[name], rtol=1e-9, atol=1e-12)
    # any lambda: theta - lambda (theta_ft - theta), entry by entry; and from theta_ft, lambda = -1 is not allowed
    tuned = fine_tuned.state_dict()
    for key, value in apply_task_negation(copy.deepcopy(model), fine_tuned, 2.5).state_dict().items():
        torch.testing.assert_close(value, original[key] - 2.5 * (tuned[key] - original[key]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scale"):
        apply_task_negation(copy.deepcopy(model), fine_tuned, -1.0)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_lora_task_vector_equals_the_merged_adapter_delta(data, preset):
    from llm.lora import LoraSettings

    model = tiny(preset)
    state = prepare_method("TaskNegation", model, data["forget"], fine_tune=sgd_fine_tune(2, 0.5),
                           lora=LoraSettings(rank=2))
    fine_tuned = state.auxiliary["fine_tuned"]
    vector = lora_task_vector(fine_tuned)
    merged = copy.deepcopy(fine_tuned).merge_and_unload().state_dict()
    original = model.state_dict()
    assert vector and all(float(v.abs().max()) > 0 for v in vector.values())
    for key, delta in vector.items():
        torch.testing.assert_close(delta, merged[key] - original[key], rtol=1e-7, atol=1e-12)
    negated = apply_task_negation(copy.deepcopy(model), fine_tuned, 0.7).state_dict()
    for key, value in negated.items():
        expected = original[key] - 0.7 * vector[key] if key in vector else original[key]
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


# --- Bad input -----------------------------------------------------------------------------------------------


def test_bad_input_is_rejected_with_a_clear_error(data):
    model = tiny()
    with pytest.raises(ValueError, match="unknown method"):
        prepare_method("RMU", model)
    with pytest.raises(TypeError, match="WHPConfig"):
        prepare_method("WHP", model, data["forget"], fine_tune=identity_fine_tune, config=get_config("SeUL"))
    with pytest.raises(ValueError, match="fine_tune"):
        prepare_method("WHP", model, data["forget"])
    with pytest.raises(ValueError, match="unseen"):
        prepare_method("KGA", model, data["forget"], data["retain"], identity_fine_tune)
    with pytest.raises(ValueError, match="lora applies to TaskNegation"):
        prepare_method("WHP", model, data["forget"], fine_tune=identity_fine_tune, lora=object())
    with pytest.raises(ValueError, match="layer"):
        prepare_method("AdvGA", model, layer=7)
    kga = kga_state(model, data, identity_fine_tune)
    with pytest.raises(ValueError, match=r"needs batch fields \['retain'\]"):
        method_loss(kga, model, MethodBatch.single(hf(data["forget"])))
    mismatch = prepare_method("GA+Mismatch", model)
    with pytest.raises(ValueError, match="mismatch"):
        method_loss(mismatch, model, MethodBatch.single(hf(data["forget"]), hf(data["retain"])))
    with pytest.raises(ValueError, match="update rule"):
        method_loss(prepare_method("TaskNegation", model, data["forget"], fine_tune=identity_fine_tune), model,
                    MethodBatch.single(hf(data["forget"])))
    with pytest.raises(TypeError, match="forget must be an HF batch"):
        MethodBatch({"input_ids": torch.zeros(1, 2)}, MethodCounts(1, 1))
    with pytest.raises(ValueError, match="forget_tokens"):
        MethodCounts(1, 0)
    with pytest.raises(ValueError, match="part"):
        method_loss(mismatch, model, full_batch(data), part="both")
    assert required_batches(kga) == ("forget", "retain") and set(METHODS) >= {"AdvGA", "AdvNPO"}
    assert isinstance(step_context(prepare_method("SeUL", model), model, full_batch(data)), StepContext)
    assert dataclasses.is_dataclass(kga)


# --- Markov transformers: every method end to end (llm.methods.markov) -----------------------------------------


CPU = dict(device="cpu", progress=False, num_threads=1)
FAST_TUNE = FineTuneConfig(steps=5, learning_rate=1e-2)


@pytest.fixture(scope="module")
def markov():
    from llm.pretraining import pretrain
    from llm.train import TrainConfig
    from markovsim.methods import unseen_sequences
    from markovsim.scenarios import SCENARIOS

    scenario = SCENARIOS["paper_short_forget2"].scaled(0.01)
    train, _ = scenario.spec.sample()
    model = build_model("tiny-synthetic", train.num_states + 1, train.max_length + 1, seed=0)
    pretrain(model, train, TrainConfig(batch_size=16, steps=30, learning_rate=3e-3, **CPU))
    forget = train.select("forget1", "forget2")
    return {"model": model, "forget": forget, "retain": train.select("retain"),
            "unseen": unseen_sequences(scenario.spec, len(forget), 0)}


def fast_config(name):
    from llm.methods.markov import default_method_config

    config = default_method_config(name)
    return dataclasses.replace(config, **{f.name: FAST_TUNE for f in dataclasses.fields(config)
                                          if isinstance(getattr(config, f.name), FineTuneConfig)})


def run_markov(markov, name, **overrides):
    from llm.methods.markov import unlearn_method
    from llm.train import TrainConfig

    config = TrainConfig(batch_size=8, steps=4, eval_every=1, learning_rate=1e-2, track_power_share=True, **CPU)
    return unlearn_method(copy.deepcopy(markov["model"]), name, markov["forget"], markov["retain"],
                          dataclasses.replace(config, **overrides), method_config=fast_config(name),
                          unseen=markov["unseen"])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_the_paper_synthetic_transformer(markov, name):
    trajectory = run_markov(markov, name)
    names = trajectory.component_names
    forget = [names.index("forget1"), names.index("forget2")]
    likelihood = trajectory.component_metrics["logp_per_token"][:, forget].mean(1)  # (E,) mean forget logp/token
    assert trajectory.diverged_at is None and np.all(np.isfinite(likelihood))
    assert trajectory.info["method"] == name
    if name == "TaskNegation":  # evaluated along lambda = 0 .. 1: lambda 0 is the start, then it moves
        assert trajectory.steps.tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())
        assert trajectory.step_metrics["parameter_distance"][0] == 0 and likelihood[-1] != likelihood[0]
        return
    assert trajectory.steps.tolist() == [0, 1, 2, 3, 4]
    if name == "KGA":  # it aligns gaps: the forget likelihood may rise (docs/theory.md); it must move
        assert abs(likelihood[-1] - likelihood[0]) > 1e-3
    else:
        assert likelihood[-1] < likelihood[0] - 1e-3
    shares = trajectory.component_metrics["power_share"][-1]
    assert np.nansum(shares) == pytest.approx(1.0) and np.all(shares[forget] > 0)
    assert np.all(np.isnan(trajectory.component_metrics["mean_weight"]))


@pytest.mark.parametrize("name, lora", [("AdvGA", None), ("TaskNegation", 2), ("GA+Mismatch", None)])
def test_methods_run_on_the_gpt2_preset(markov, name, lora):
    from llm.lora import LoraSettings
    from llm.methods.markov import unlearn_method
    from llm.pretraining import pretrain
    from llm.train import TrainConfig

    forget = markov["forget"]
    model = build_model("tiny-gpt2", forget.num_states + 1, forget.max_length + 1, seed=0)
    pretrain(model, markov["forget"], TrainConfig(batch_size=16, steps=5, learning_rate=3e-3, **CPU))
    before = copy.deepcopy(model.state_dict())
    trajectory = unlearn_method(model, name, forget, markov["retain"],
                                TrainConfig(batch_size=8, steps=2, learning_rate=1e-2, **CPU),
                                method_config=fast_config(name), lora=None if lora is None else LoraSettings(rank=lora),
                                scales=[0.0, 1.0])
    assert trajectory.diverged_at is None and np.all(np.isfinite(trajectory.component_metrics["kl_reference"]))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and (lora is None or all(k.endswith(("c_attn.weight", "c_proj.weight")) for k in changed))


def test_same_seed_same_numbers_and_another_seed_other_numbers(markov):
    first, second = run_markov(markov, "AdvNPO"), run_markov(markov, "AdvNPO")
    np.testing.assert_array_equal(first.component_metrics["kl_reference"], second.component_metrics["kl_reference"])
    np.testing.assert_array_equal(first.step_metrics["loss"], second.step_metrics["loss"])
    other = run_markov(markov, "AdvNPO", seed=1)
    assert not np.array_equal(first.step_metrics["loss"], other.step_metrics["loss"])


def test_method_cli_writes_a_run_with_the_method(tmp_path):
    import json

    from llm.__main__ import main, method_settings

    common = ["--scale", "0.005", "--device", "cpu", "--no-progress", "--num-threads", "1"]
    assert main(["pretrain", "--out", str(tmp_path / "pre"), "--preset", "tiny-synthetic", "--steps", "5",
                 "--batch-size", "16"] + common) == 0
    config = tmp_path / "method.json"
    config.write_text(json.dumps({"method": {"name": "SeUL", "fraction": 0.5}}))
    assert main(["unlearn", "--out", str(tmp_path / "seul"), "--model", str(tmp_path / "pre" / "model"),
                 "--config", str(config), "--steps", "2", "--batch-size", "4"] + common) == 0
    results = json.loads((tmp_path / "seul" / "results.json").read_text())
    assert results["method"] == "SeUL" and results["method_config"]["fraction"] == 0.5
    assert (tmp_path / "seul" / "trajectory.json").is_file() and (tmp_path / "seul" / "model").is_dir()
    name, whp, options = method_settings({"name": "WHP", "alpha": 2.0, "reinforce": {"steps": 3}})
    assert name == "WHP" and whp.alpha == 2.0 and whp.reinforce.steps == 3 and options == {}
    with pytest.raises(ValueError, match="not WHPConfig fields"):
        method_settings({"name": "WHP", "beta": 1.0})
    assert main(["unlearn", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "pre" / "model"),
                 "--method", "RMU"] + common) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_in_bf16_autocast_on_cuda(markov, name):
    trajectory = run_markov(markov, name, device="cuda", mixed_precision="bf16")
    names = trajectory.component_names
    forget = [names.index("forget1"), names.index("forget2")]
    likelihood = trajectory.component_metrics["logp_per_token"][:, forget].mean(1)
    assert trajectory.diverged_at is None and np.all(np.isfinite(likelihood))
    if name not in ("KGA", "TaskNegation"):
        assert likelihood[-1] < likelihood[0] - 1e-3


def run_methods_for_distributed_test(output: str) -> None:
    """KGA (global gap), AdvNPO (shared delta*) and GA+Mismatch (mismatch rows) 3 steps each on a tiny GPT-2,
    odd batch sizes (uneven shards); writes the losses and kl_reference (process 0)."""
    import json
    import os

    from llm.methods.markov import unlearn_method
    from llm.train import TrainConfig, pretrain
    from markovsim.methods import unseen_sequences
    from markovsim.scenarios import SCENARIOS

    scenario = SCENARIOS["paper_short_forget2"].scaled(0.01)
    train, _ = scenario.spec.sample()
    model = build_model("tiny-gpt2", 11, 21, seed=0)
    pretrain(model, train, TrainConfig(batch_size=17, steps=3, learning_rate=2e-3, device="cpu", progress=False))
    forget, retain = train.select("forget1", "forget2"), train.select("retain")
    results = {}
    for name in ("KGA", "AdvNPO", "GA+Mismatch"):
        trajectory = unlearn_method(copy.deepcopy(model), name, forget, retain,
                                    TrainConfig(batch_size=5, retain_batch_size=7, steps=3, eval_every=1,
                                                learning_rate=1e-2, device="cpu", progress=False),
                                    method_config=fast_config(name), unseen=unseen_sequences(scenario.spec, 10, 0))
        results[name] = {"loss": trajectory.step_metrics["loss"].tolist(),
                         "kl_reference": trajectory.component_metrics["kl_reference"].tolist(),
                         "num_processes": trajectory.info["num_processes"]}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(output, "w") as file:
            json.dump(results, file)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path):
    import json

    from two_processes import launch_two

    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run_methods_for_distributed_test(one)
    launch_two("test_llm_methods", "run_methods_for_distributed_test", two)
    single, double = (json.load(open(path)) for path in (one, two))
    for name in single:
        assert single[name]["num_processes"] == 1 and double[name]["num_processes"] == 2
        for key in ("loss", "kl_reference"):
            np.testing.assert_allclose(double[name][key], single[name][key], rtol=1e-4, atol=1e-6, err_msg=name)
