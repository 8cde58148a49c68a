"""The other unlearning methods (markovsim.methods): known answers, limits that reduce to GA/NPO, closed-form =
autograd gradients on both exact models, and hyperparameter validation."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import exact_problems
from test_exact_gradients import small_problem

from markovsim.data import SequenceSet
from markovsim.dynamics import DynamicsConfig
from markovsim.exact_gradients import next_token_log_probs, objective_value_and_gradient
from markovsim.losses import ga, masked_ga
from markovsim.methods import (
    METHODS,
    FineTuneConfig,
    exact_problem,
    fine_tune,
    get_config,
    run_method,
    unlearn_exact,
)
from markovsim.methods.exact import autograd_step, token_log_probs
from markovsim.methods.kga import gap_alignment, kga_loss
from markovsim.methods.lau import adversarial_perturbation, perturb_logits, project_to_ball
from markovsim.methods.mismatch import ga_mismatch_loss, mismatch_pairs, mismatch_sequences
from markovsim.methods.seul import (
    select_sensitive_tokens,
    sensitive_extraction_likelihood,
    sensitive_memorisation_accuracy,
)
from markovsim.methods.task_negation import negate_task, task_vector
from markovsim.methods.whp import generic_logits, generic_target_log_probs
from markovsim.objectives import Objective
from markovsim.scenarios import SCENARIOS, prepare

FAST = FineTuneConfig(steps=3, learning_rate=0.1)
GRADIENT_METHODS = [name for name, spec in METHODS.items() if spec.kind != "update_rule"]


def small_configs() -> dict:
    """Each method's config with cheap auxiliary training."""
    return {"GA+Mismatch": get_config("GA+Mismatch", responses_per_prompt=2), "WHP": get_config("WHP", reinforce=FAST),
            "KGA": get_config("KGA", auxiliary=FAST), "SeUL": get_config("SeUL", fraction=0.5),
            "AdvGA": get_config("AdvGA"), "AdvNPO": get_config("AdvNPO"),
            "TaskNegation": get_config("TaskNegation", fine_tune=FAST)}


@pytest.fixture(scope="module")
def problem():
    forget, retain, models, reference = small_problem(7)
    return forget, retain, models, reference


# --- Registry --------------------------------------------------------------------------------------------


def test_registry_has_the_seven_names_with_kinds():
    assert list(METHODS) == ["GA+Mismatch", "WHP", "TaskNegation", "KGA", "SeUL", "AdvGA", "AdvNPO"]
    kinds = {name: spec.kind for name, spec in METHODS.items()}
    assert kinds["TaskNegation"] == "update_rule" and kinds["AdvGA"] == kinds["AdvNPO"] == "wrapper"
    assert {kinds[n] for n in ("GA+Mismatch", "WHP", "KGA", "SeUL")} == {"objective"}
    for spec in METHODS.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec.config, dataclasses.fields(spec.config)[0].name, None)
    with pytest.raises(ValueError, match="unknown method"):
        get_config("RMU")
    with pytest.raises(ValueError, match="unknown WHPConfig fields"):
        get_config("WHP", beta=1.0)


BAD_HYPERPARAMETERS = [
    ("GA+Mismatch", "mismatch_weight", -1.0), ("GA+Mismatch", "responses_per_prompt", 0),
    ("WHP", "alpha", -0.5), ("WHP", "target", "argmax"), ("TaskNegation", "scale", float("nan")),
    ("KGA", "retain_weight", -2.0), ("SeUL", "fraction", 1.5), ("SeUL", "fraction", 0.0),
    ("SeUL", "sensitive_states", ()), ("AdvGA", "epsilon", -0.1), ("AdvNPO", "inner_steps", -1),
    ("AdvNPO", "inner_learning_rate", 0.0),
]


@pytest.mark.parametrize("name, field, value", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_value_error_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=field):
        get_config(name, **{field: value})


def test_bad_fine_tune_settings_name_the_field():
    for field, value in (("steps", 0), ("learning_rate", -1.0), ("optimizer", "sgd")):
        with pytest.raises(ValueError, match=field):
            FineTuneConfig(**{field: value})
    with pytest.raises(TypeError, match="objective"):
        get_config("AdvGA", objective="ga")


# --- Closed-form = autograd on both model classes -----------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tabular", "mixture"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_closed_form_gradient_equals_autograd(problem, name, model_name):
    forget, retain, models, reference = problem
    unseen = retain.subset(np.arange(3))
    exact = METHODS[name].exact(small_configs()[name], reference, forget, retain, unseen)
    model = models[model_name]
    closed, oracle = exact.step(model), autograd_step(exact, model)
    assert float(closed.value) == pytest.approx(float(oracle.value), rel=1e-12, abs=1e-14)
    for g, h in zip(closed.gradients, oracle.gradients):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in closed.gradients) > 0  # not a vacuous comparison


@settings(max_examples=4, deadline=None)
@given(exact_problems(), st.sampled_from(["tabular", "mixture"]))
def test_closed_form_equals_autograd_on_random_problems(problem, model_name):
    forget, retain, models, reference = problem
    configs = small_configs() | {"KGA": get_config("KGA", auxiliary_from="reference", auxiliary=FAST),
                                 "WHP": get_config("WHP", reinforce=FAST, target="hard", alpha=2.0)}
    for name in GRADIENT_METHODS:
        exact = METHODS[name].exact(configs[name], reference, forget, retain, retain.subset(np.arange(2)))
        closed, oracle = exact.step(models[model_name]), autograd_step(exact, models[model_name])
        assert float(closed.value) == pytest.approx(float(oracle.value), rel=1e-11, abs=1e-13), name
        for g, h in zip(closed.gradients, oracle.gradients):
            torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-12, msg=name)


def test_kga_gradient_matches_finite_differences(problem):
    """|.| in KGA: the closed form also agrees with central differences (away from the kink)."""
    forget, retain, models, reference = problem
    exact = METHODS["KGA"].exact(small_configs()["KGA"], reference, forget, retain, retain.subset(np.arange(3)))
    model = models["mixture"]
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                 for p in model.parameters()]
    step = 1e-6
    values = [float(exact.value(model.with_parameters(*[p + s * step * d for p, d in zip(model.parameters(),
                                                                                          direction)])))
              for s in (1, -1)]
    analytic = sum(float((g * d).sum()) for g, d in zip(exact.step(model).gradients, direction))
    assert (values[0] - values[1]) / (2 * step) == pytest.approx(analytic, rel=1e-5, abs=1e-8)


def no_retain_configs() -> dict:
    configs = small_configs()
    configs["GA+Mismatch"] = get_config("GA+Mismatch", responses_per_prompt=2, retain_weight=0.0)
    configs["KGA"] = get_config("KGA", retain_weight=0.0)
    configs["AdvNPO"] = get_config("AdvNPO", objective=Objective("npo", "nll", beta=0.5, retain_weight=0.0))
    return configs


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_component_gradients_add_up_to_the_forget_gradient(problem, name):
    """Per-component unlearning power: with the retain term's weight 0 the parts sum to the full gradient."""
    forget, retain, models, reference = problem
    exact = METHODS[name].exact(no_retain_configs()[name], reference, forget, retain, retain.subset(np.arange(3)))
    model = models["mixture"]
    parts = [exact.forget_gradient(model, c) for c in ("forget1", "forget2", "retain")]
    assert all(float(g.abs().max()) == 0 for g in parts[2])  # no forget sequences: no forget gradient
    assert all(float(g.abs().max()) > 0 for g in parts[0])
    for total, a, b in zip(exact.step(model).gradients, parts[0], parts[1]):
        torch.testing.assert_close(a + b, total, rtol=1e-10, atol=1e-13)


# --- GA+Mismatch -------------------------------------------------------------------------------------------


def test_ga_mismatch_known_answer():
    """forget ga = mean(-2/2, -4/4) = -1; mismatch nll = 3/3 = 1; 0.5 * -1 + 1 * 1 + 1 * 0.25 = 0.75."""
    total, terms = ga_mismatch_loss(torch.tensor([-2.0, -4.0]), torch.tensor([2, 4]), torch.tensor([-3.0]),
                                    torch.tensor([3]), torch.tensor(0.25), get_config("GA+Mismatch"))
    assert float(total) == pytest.approx(0.75)
    assert float(terms["forget"]) == pytest.approx(-1.0) and float(terms["mismatch"]) == pytest.approx(1.0)
    total, _ = ga_mismatch_loss(torch.tensor([-2.0, -4.0]), torch.tensor([2, 4]), torch.tensor([-3.0]),
                                torch.tensor([3]), torch.tensor(0.25),
                                get_config("GA+Mismatch", forget_weight=2.0, mismatch_weight=0.0, retain_weight=4.0))
    assert float(total) == pytest.approx(2 * -1 + 4 * 0.25)


def test_mismatch_sequences_put_retain_responses_after_forget_prompts():
    forget = SequenceSet(np.array([[0, 1, 1], [2, 2, -1]]), np.array([3, 2]), np.array([0, 1]), ("f1", "f2"), 4)
    retain = SequenceSet(np.array([[3, 3, 0, 1], [1, 0, 2, -1]]), np.array([4, 3]), np.array([0, 0]), ("r",), 4)
    forget_index, normal_index = mismatch_pairs(2, 2, 3, np.random.default_rng(0))
    assert forget_index.tolist() == [0, 0, 0, 1, 1, 1]
    mismatch = mismatch_sequences(forget, retain, 3, np.random.default_rng(0))
    for row, (i, j) in enumerate(zip(forget_index, normal_index)):
        length = retain.lengths[j]
        assert mismatch.lengths[row] == length
        assert mismatch.tokens[row, 0] == forget.tokens[i, 0]
        assert mismatch.tokens[row, 1:length].tolist() == retain.tokens[j, 1:length].tolist()
        assert mismatch.component_names[mismatch.component_ids[row]] == forget.component_names[i]


# --- WHP -------------------------------------------------------------------------------------------------


def test_whp_generic_logits_known_answer_and_baseline_limit():
    baseline = torch.tensor([[0.0, 1.0, -1.0]])
    reinforced = torch.tensor([[2.0, 0.0, -0.5]])
    # v_g = v_b - 0.5 ReLU(v_r - v_b) = [0 - 1, 1 - 0, -1 - 0.25]
    torch.testing.assert_close(generic_logits(baseline, reinforced, 0.5), torch.tensor([[-1.0, 1.0, -1.25]]))
    logits = torch.randn(4, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(generic_logits(logits, logits, 3.0), logits)  # reinforced == baseline
    torch.testing.assert_close(generic_logits(logits, logits - 1.0, 3.0), logits)  # nothing boosted
    torch.testing.assert_close(generic_target_log_probs(logits, logits, 3.0), torch.log_softmax(logits, -1))
    hard = generic_target_log_probs(baseline, reinforced, 0.5, "hard")
    assert hard.tolist() == [[-float("inf"), 0.0, -float("inf")]]


def test_whp_with_unchanged_reinforced_model_is_already_optimal(problem):
    """With reinforce steps learning nothing (lr tiny) the target is the reference itself: value 0, gradient ~0."""
    forget, _, models, _ = problem
    reference = models["tabular"]
    config = get_config("WHP", reinforce=FineTuneConfig(steps=1, learning_rate=1e-300, optimizer="gd"))
    step = METHODS["WHP"].exact(config, reference, forget, None, None).step(reference)
    assert abs(float(step.value)) < 1e-14
    assert max(float(g.abs().max()) for g in step.gradients) < 1e-14


# --- TaskNegation ------------------------------------------------------------------------------------------


def test_task_negation_identity_and_exact_undo(problem):
    forget, _, models, _ = problem
    model = models["tabular"]
    fine_tuned = fine_tune(model, forget, FAST)
    vector = task_vector(model.parameters(), fine_tuned.parameters())
    for p, q in zip(negate_task(model.parameters(), vector, 0.0), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # lambda = 1 applied to theta_ft subtracts the fine-tuning exactly: back to theta
    for p, q in zip(negate_task(fine_tuned.parameters(), vector, 1.0), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
    # state dicts work the same way
    names = {"b": model.parameters()[0], "A": model.parameters()[1]}
    tuned = {"b": fine_tuned.parameters()[0], "A": fine_tuned.parameters()[1]}
    negated = negate_task(names, task_vector(names, tuned), 2.0)
    torch.testing.assert_close(negated["A"], model.parameters()[1] - 2 * (fine_tuned.parameters()[1]
                                                                         - model.parameters()[1]))


def test_task_negation_of_one_gd_step_is_one_exact_ga_step(problem):
    """theta_ft = theta + lr grad(mean logp/|y|) (one GD step on the NLL), so theta - tau = one GA step."""
    forget, _, models, _ = problem
    model = models["tabular"]
    learning_rate = 0.3
    exact = METHODS["TaskNegation"].exact(
        get_config("TaskNegation", fine_tune=FineTuneConfig(steps=1, learning_rate=learning_rate, optimizer="gd")),
        model, forget, None, None)
    gradient = objective_value_and_gradient(model, Objective("ga"), forget).gradients
    for p, q, g in zip(exact.apply(1.0).parameters(), model.parameters(), gradient):
        torch.testing.assert_close(p, q - learning_rate * g, rtol=0, atol=1e-14)


def test_task_negation_rejects_mismatched_parameters():
    with pytest.raises(ValueError, match="fine_tuned"):
        task_vector((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="keys"):
        task_vector({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


# --- KGA -------------------------------------------------------------------------------------------------


def test_kga_known_answer():
    total, terms = kga_loss(torch.tensor(0.3), torch.tensor(0.5), torch.tensor(0.2), retain_weight=2.0)
    assert float(total) == pytest.approx(abs(0.3 - 0.5) + 2 * 0.2)
    assert float(terms["alignment"]) == pytest.approx(0.2)
    torch.testing.assert_close(gap_alignment(torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.5])),
                               torch.tensor([0.4, 0.4]))


def test_kga_gap_is_zero_when_the_model_is_the_forget_auxiliary(problem):
    """dis_Df(A_f, A_f) = 0, so L_a = dis_Dn(A_D, A_n), which the exact problem computes once."""
    forget, retain, _, reference = problem
    exact = METHODS["KGA"].exact(get_config("KGA", auxiliary=FAST, retain_weight=0.0), reference, forget, retain,
                                 retain.subset(np.arange(3)))
    assert float(exact.step(exact.forget_model).value) == pytest.approx(float(exact.unseen_gap), abs=1e-12)
    assert float(exact.unseen_gap) > 0


# --- SeUL ------------------------------------------------------------------------------------------------


def test_seul_with_all_tokens_selected_is_token_mean_ga():
    token_logps = -torch.rand(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logps, num_tokens = torch.where(mask, token_logps, 0.0).sum(-1), mask.sum(-1)
    torch.testing.assert_close(masked_ga(token_logps, mask, torch.ones_like(mask)), ga(logps, num_tokens))
    selected = select_sensitive_tokens(token_logps, mask, 1.0)
    assert torch.equal(selected, mask)


def test_seul_masked_ga_and_selection_known_answer():
    token_logps = torch.tensor([[-0.1, -2.0, -0.5, -3.0]])
    mask = torch.tensor([[True, True, True, False]])
    selected = select_sensitive_tokens(token_logps, mask, 0.5)  # ceil(0.5 * 3) = 2 most probable: t = 0, 2
    assert selected.tolist() == [[True, False, True, False]]
    assert float(masked_ga(token_logps, mask, selected)) == pytest.approx((-0.1 - 0.5) / 2)
    assert float(masked_ga(token_logps, mask, torch.zeros_like(mask))) == 0.0


def test_seul_metrics_known_answers():
    log_probs = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]]))
    labels = torch.tensor([[0, 1, 1]])
    sensitive = torch.tensor([[True, True, False]])  # argmax hits at t = 0 only among the sensitive ones
    assert float(sensitive_memorisation_accuracy(log_probs, labels, sensitive)) == pytest.approx(0.5)
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    sensitive = torch.tensor([[False, True, True, True], [False, False, False, False]])
    generated = torch.tensor([[6, 7, 9, -1], [1, 2, 3, 4]])
    result = sensitive_extraction_likelihood(generated, labels, sensitive, n=2)  # targets (6,7), (7,8): 1 of 2
    assert result[0] == pytest.approx(0.5) and torch.isnan(result[1])


def test_seul_static_states_mask_transitions_into_those_states(problem):
    forget, _, models, _ = problem
    exact = METHODS["SeUL"].exact(get_config("SeUL", sensitive_states=(1,)), models["tabular"], forget, None, None)
    mask = exact.sensitive_mask(models["tabular"])
    following = torch.as_tensor(forget.tokens[:, 1:].copy())
    assert torch.equal(mask, (following == 1) & torch.as_tensor(forget.transition_mask))
    with pytest.raises(ValueError, match="sensitive_states"):
        METHODS["SeUL"].exact(get_config("SeUL", sensitive_states=(99,)), models["tabular"], forget, None, None)


# --- AdvGA / AdvNPO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, objective", [("AdvGA", Objective("ga")), ("AdvNPO", Objective("npo", beta=0.7)),
                                             ("AdvNPO", Objective("npo", "kl", beta=0.7, retain_weight=0.5))])
@pytest.mark.parametrize("model_name", ["tabular", "mixture"])
def test_lau_with_zero_radius_is_plain_objective(problem, name, objective, model_name):
    forget, retain, models, reference = problem
    model = models[model_name]
    config = get_config(name, objective=objective, epsilon=0.0)
    exact = METHODS[name].exact(config, reference, forget, retain, None)
    step = exact.step(model)
    plain = objective_value_and_gradient(model, objective, forget, retain if objective.retain else None,
                                         reference.response_logps(forget) if objective.forget == "npo" else None,
                                         next_token_log_probs(reference, retain) if objective.retain else None)
    assert float(step.value) == pytest.approx(float(plain.value), rel=1e-13)
    for g, h in zip(step.gradients, plain.gradients):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)


def test_lau_adversary_stays_in_the_ball_and_restores_forget_likelihood(problem):
    forget, _, models, reference = problem
    model = models["mixture"]
    exact = METHODS["AdvGA"].exact(get_config("AdvGA", epsilon=0.3, inner_steps=10), reference, forget, None, None)
    delta = exact.perturbation(model)
    assert float(delta.norm()) <= 0.3 + 1e-12 and float(delta.norm()) > 0.29
    with torch.no_grad():
        assert float(perturb_logits(model, delta).response_logps(forget).mean()) > float(
            model.response_logps(forget).mean())


def test_adversarial_perturbation_known_answer_on_a_linear_objective():
    """For f(delta) = <a, delta> each step moves eta along a/||a||, until the ball's edge."""
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    for steps, expected in ((2, 0.2), (10, 0.5)):
        delta = adversarial_perturbation(lambda d: a, torch.zeros(2, dtype=torch.float64), 0.5, steps, 0.1)
        torch.testing.assert_close(delta, expected * a / 5.0)
    torch.testing.assert_close(project_to_ball(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0),
                               torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


# --- Shared pieces and the driver --------------------------------------------------------------------------


def test_fine_tune_raises_likelihood_and_token_log_probs_sum_to_logps(problem):
    forget, _, models, _ = problem
    for model in models.values():
        tuned = fine_tune(model, forget, FAST)
        with torch.no_grad():
            assert float(tuned.response_logps(forget).mean()) > float(model.response_logps(forget).mean())
            torch.testing.assert_close(token_log_probs(model, forget).sum(-1), model.response_logps(forget))


def test_unlearn_exact_autograd_and_closed_form_trajectories_agree(problem):
    forget, retain, models, reference = problem
    exact = METHODS["KGA"].exact(small_configs()["KGA"], reference, forget, retain, retain.subset(np.arange(3)))
    runs = [unlearn_exact(exact, models["tabular"], DynamicsConfig(steps=4, gradient=gradient))
            for gradient in ("closed_form", "autograd")]
    np.testing.assert_allclose(runs[0].step_metrics["loss"], runs[1].step_metrics["loss"], rtol=1e-10)
    assert runs[0].step_metrics["parameter_distance"][-1] > 0
    with pytest.raises(ValueError, match="batch_size"):
        unlearn_exact(exact, models["tabular"], DynamicsConfig(steps=1, batch_size=2))


@pytest.fixture(scope="module")
def tiny_setup():
    return prepare(SCENARIOS["paper_unseen_forget2"].scaled(0.01), "tabular")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_a_paper_scenario(tiny_setup, name):
    config = small_configs()[name]
    trajectory = run_method(name, tiny_setup, DynamicsConfig(steps=3, learning_rate=0.02), config=config)
    assert trajectory.diverged_at is None
    logp = trajectory.component_metrics["logp_per_token"]
    assert np.all(np.isfinite(logp)) and logp.shape[1] == len(tiny_setup.evaluator.component_names)
    if name != "TaskNegation":
        shares = trajectory.component_metrics["power_share"]
        has_data = ~np.isnan(shares[0])
        assert has_data[tiny_setup.evaluator.component_names.index("forget1")]
        np.testing.assert_allclose(np.nansum(shares, axis=1), 1.0)
    forget = tiny_setup.evaluator.component_names.index("forget1")
    loss = trajectory.step_metrics["loss"]
    if name == "TaskNegation":  # its "loss" is the forget NLL along lambda = 0 .. 1
        assert loss[-1] > loss[0] and logp[-1, forget] < logp[0, forget]
    elif name in ("KGA", "SeUL"):
        # KGA aligns gaps (here the forget gap starts above the unseen one, so it moves towards A_f); SeUL lowers
        # the selected tokens' likelihood, which need not lower the mean over all forget tokens
        assert loss[-1] < loss[0]
    else:
        assert loss[-1] < loss[0] and logp[-1, forget] < logp[0, forget]



def test_kga_unseen_set_follows_the_data_seed_unless_given(tiny_setup):
    """run_method draws KGA's D_n with the scenario's data seed by default (seed bands vary it), else unseen_seed."""
    dynamics, config = DynamicsConfig(steps=2, learning_rate=0.02), small_configs()["KGA"]
    reseeded = dataclasses.replace(tiny_setup, scenario=dataclasses.replace(
        tiny_setup.scenario, spec=dataclasses.replace(tiny_setup.scenario.spec, seed=3)))
    by_default = run_method("KGA", reseeded, dynamics, config=config)
    direct = unlearn_exact(exact_problem("KGA", reseeded, config, seed=3), reseeded.reference, dynamics,
                           reseeded.evaluator)
    np.testing.assert_array_equal(by_default.step_metrics["loss"], direct.step_metrics["loss"])
    other = run_method("KGA", reseeded, dynamics, config=config, unseen_seed=4)
    assert not np.array_equal(other.step_metrics["loss"], by_default.step_metrics["loss"])


def test_unlearn_exact_stops_cleanly_on_divergence(tiny_setup):
    trajectory = run_method("AdvGA", tiny_setup, DynamicsConfig(optimizer="gd", learning_rate=1e4, steps=20))
    assert trajectory.diverged_at is not None and trajectory.diverged_at < 20
    assert "fell below" in trajectory.divergence_reason
    assert trajectory.steps[-1] == trajectory.diverged_at


def test_task_negation_path_is_indexed_by_lambda(tiny_setup):
    config = get_config("TaskNegation", fine_tune=FAST, scale=2.0)
    trajectory = run_method("TaskNegation", tiny_setup, config=config, scales=[0.0, 0.5, 2.0])
    np.testing.assert_allclose(trajectory.steps, [0.0, 0.5, 2.0])
    distance = trajectory.step_metrics["parameter_distance"]
    assert distance[0] == 0 and distance[2] == pytest.approx(4 * distance[1])
    reference = tiny_setup.evaluator.evaluate(tiny_setup.reference)["kl_true"]
    np.testing.assert_allclose(trajectory.component_metrics["kl_true"][0], reference)  # lambda = 0: the reference
    assert trajectory.info["config"]["scale"] == 2.0
