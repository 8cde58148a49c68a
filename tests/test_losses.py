"""Tests of markovsim.losses against independent references (docs/theory.md, "Forget losses and their gradient
weights"), float64."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import strategies as S  # tests/strategies.py (tests/ is on sys.path under pytest's rootdir insertion)
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from markovsim import loss_weights, losses

DTYPE = torch.float64
SEQUENCE_LOSSES = sorted(losses.SEQUENCE_LOSSES)
FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------------
# Helpers: each loss as a function of logps alone, with its explicit arguments (no module dispatch)
# ---------------------------------------------------------------------------------------------


def loss_of_logps(name, ref_logps, num_tokens, beta, gamma):
    return {
        "ga": lambda logps: losses.ga(logps, num_tokens),
        "ga_sum": lambda logps: losses.ga_sum(logps),
        "npo": lambda logps: losses.npo(logps, ref_logps, beta),
        "simnpo": lambda logps: losses.simnpo(logps, num_tokens, beta, gamma),
        "npo_ave": lambda logps: losses.npo_ave(logps, ref_logps, num_tokens, beta),
        "simnpo_sum": lambda logps: losses.simnpo_sum(logps, beta, gamma),
    }[name]


def weights(name, logps, ref_logps, num_tokens, beta, gamma):
    return loss_weights.gradient_weights(
        name, logps, num_tokens=num_tokens, ref_logps=ref_logps, beta=beta, gamma=gamma
    )


def autograd_weights(name, logps, ref_logps, num_tokens, beta, gamma):
    leaf = logps.clone().requires_grad_(True)
    loss_of_logps(name, ref_logps, num_tokens, beta, gamma)(leaf).sum().backward()
    return leaf.grad


def curvature_scale(name, num_tokens, beta):
    """The scale of logps over which the loss bends (for finite-difference steps)."""
    ones = torch.ones_like(num_tokens)
    return {"ga": ones, "ga_sum": ones, "npo": beta * ones, "simnpo": beta / num_tokens, "npo_ave": beta / num_tokens,
            "simnpo_sum": beta * ones}[name]


def unigram_logps(theta, tokens, mask):
    """logps = sum of log_softmax(theta)[tokens] over the mask, via losses.reduce_token_logps."""
    token_logps = torch.log_softmax(theta, -1)[tokens]  # (B, T)
    return losses.reduce_token_logps(token_logps, mask)


def sigma(z):
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------
# 1. Gradients: autograd == closed form == finite differences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@FAST
@given(batch=S.sequence_batches(), beta=S.betas(), gamma=S.gammas())
def test_autograd_equals_closed_form_weight(name, batch, beta, gamma):
    logps, ref_logps, num_tokens = batch
    expected = weights(name, logps, ref_logps, num_tokens, beta, gamma)
    got = autograd_weights(name, logps, ref_logps, num_tokens, beta, gamma)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@FAST
@given(batch=S.moderate_sequence_batches(), beta=S.betas(1e-2, 10.0), gamma=S.gammas())
def test_finite_differences_in_logps_equal_closed_form_weight(name, batch, beta, gamma):
    logps, ref_logps, num_tokens = batch
    loss = loss_of_logps(name, ref_logps, num_tokens, beta, gamma)
    step = 1e-3 / curvature_scale(name, num_tokens, beta)  # (B,) elementwise: losses are per sequence
    central = (loss(logps + step) - loss(logps - step)) / (2 * step)
    expected = weights(name, logps, ref_logps, num_tokens, beta, gamma)
    torch.testing.assert_close(central, expected, rtol=1e-6, atol=1e-300)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@SLOW
@given(problem=S.unigram_problems(), beta=S.betas(1e-2, 3.0), gamma=S.gammas(2.0))
def test_chain_rule_through_a_tiny_model(name, problem, beta, gamma):
    theta, theta_ref, tokens, mask = problem
    ref_logps, _ = unigram_logps(theta_ref, tokens, mask)

    def total_loss(params):
        logps, num_tokens = unigram_logps(params, tokens, mask)
        return loss_of_logps(name, ref_logps, num_tokens, beta, gamma)(logps).sum()

    leaf = theta.clone().requires_grad_(True)
    total_loss(leaf).backward()
    # Independent reference: d logps_b / d theta = counts_b - |y_b| softmax(theta).
    logps, num_tokens = unigram_logps(theta, tokens, mask)
    counts = (torch.nn.functional.one_hot(tokens, theta.numel()) * mask[..., None]).sum(1).to(DTYPE)
    dlogps = counts - num_tokens[:, None] * torch.softmax(theta, -1)  # (B, V)
    w = weights(name, logps, ref_logps, num_tokens, beta, gamma)  # (B,)
    expected = (w[:, None] * dlogps).sum(0)  # (V,)
    scale = (w * num_tokens).sum()  # the size of the gradient: |d logps_b / d theta_v| <= |y_b|
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-9, atol=1e-12 * scale)
    # Central finite differences on theta.
    step = 1e-5
    basis = torch.eye(theta.numel(), dtype=DTYPE)
    central = torch.stack(
        [(total_loss(theta + step * e) - total_loss(theta - step * e)) / (2 * step) for e in basis]
    )
    torch.testing.assert_close(central, expected, rtol=1e-6, atol=1e-6 * scale)


def test_dpo_gradient_closed_form():
    logps_w = torch.tensor([-3.0, -10.0, -1.0], dtype=DTYPE, requires_grad=True)
    logps_l = torch.tensor([-5.0, -2.0, -40.0], dtype=DTYPE, requires_grad=True)
    ref_w = torch.tensor([-4.0, -9.0, -2.0], dtype=DTYPE)
    ref_l = torch.tensor([-5.5, -1.0, -30.0], dtype=DTYPE)
    beta = 0.7
    losses.dpo(logps_w, ref_w, logps_l, ref_l, beta).sum().backward()
    margin = (logps_w - ref_w) - (logps_l - ref_l)
    weight = 2 * torch.sigmoid(-beta * margin.detach())  # d L / d logps_l, > 0: lowers logps_l
    torch.testing.assert_close(logps_l.grad, weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(logps_w.grad, -weight, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# 2-5. Invariants from the papers
# ---------------------------------------------------------------------------------------------


@FAST
@given(batch=S.sequence_batches(), beta=S.betas())
def test_npo_weight_is_one_at_the_reference(batch, beta):
    logps, _, _ = batch
    w = loss_weights.gradient_weights("npo", logps, ref_logps=logps.clone(), beta=beta)
    assert torch.equal(w, torch.ones_like(logps))
    got = autograd_weights("npo", logps, logps.clone(), None, beta, 0.0)
    torch.testing.assert_close(got, torch.ones_like(logps), rtol=1e-12, atol=0)
    value = losses.npo(logps, logps.clone(), beta)
    torch.testing.assert_close(value, torch.full_like(logps, 2 * math.log(2) / beta), rtol=1e-12, atol=0)


def _log_cosh_sandwich(err, u, scale, tol):
    """err = scale * log cosh(u), and u^2/2 - u^4/12 <= log cosh(u) <= u^2/2."""
    upper = scale * u * u / 2
    lower = scale * (u * u / 2 - u**4 / 12)
    assert lower - tol <= err <= upper + tol, (err, lower, upper, tol)


EPS = torch.finfo(DTYPE).eps
SMALL_BETAS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]


@FAST
@given(ref=st.floats(-1e3, 0.0), diff=st.floats(-50.0, 50.0))
def test_npo_tends_to_ga_linearly_in_beta(ref, diff):
    logps, ref_logps = torch.tensor([ref + diff], dtype=DTYPE), torch.tensor([ref], dtype=DTYPE)
    d = (logps - ref_logps).item()
    for beta in SMALL_BETAS:
        u = beta * d / 2
        # w - 1 = tanh(u), |u| - |u|^3/3 <= |tanh u| <= |u|
        w_err = abs(loss_weights.gradient_weights("npo", logps, ref_logps=ref_logps, beta=beta).item() - 1)
        assert abs(u) - abs(u) ** 3 / 3 - 4 * EPS <= w_err <= abs(u) + 4 * EPS
        # L - (2/beta) log 2 - d = (2/beta) log cosh(u), between beta d^2/4 - O(beta^3) and beta d^2/4
        loss = losses.npo(logps, ref_logps, beta).item()
        tol = 8 * EPS * (2 / beta + abs(d))
        _log_cosh_sandwich(loss - 2 * math.log(2) / beta - d, u, 2 / beta, tol)


@FAST
@given(logp=st.floats(-1e3, 0.0), length=st.integers(1, 4096))
def test_simnpo_tends_to_length_normalised_ga(logp, length):
    logps, num_tokens = torch.tensor([logp], dtype=DTYPE), torch.tensor([length], dtype=DTYPE)
    mean = logp / length
    for beta in SMALL_BETAS:
        u = beta * mean / 2
        w = loss_weights.gradient_weights("simnpo", logps, num_tokens, beta=beta, gamma=0.0).item()
        assert abs(u) - abs(u) ** 3 / 3 - 4 * EPS <= abs(length * w - 1) <= abs(u) + 4 * EPS
        loss = losses.simnpo(logps, num_tokens, beta, 0.0).item()
        tol = 8 * EPS * (2 / beta + abs(mean))
        _log_cosh_sandwich(loss - 2 * math.log(2) / beta - mean, u, 2 / beta, tol)


def test_simnpo_takes_no_reference():
    params = inspect.signature(losses.simnpo).parameters
    assert list(params) == ["logps", "num_tokens", "beta", "gamma"]
    assert not any("ref" in p for p in params)
    logps, num_tokens = torch.tensor([-3.0, -30.0], dtype=DTYPE), torch.tensor([2.0, 9.0], dtype=DTYPE)
    objective = losses.Objective("simnpo", beta=2.5, gamma=0.3)
    assert not objective.needs_reference
    with_ref = objective.forget_losses(logps, num_tokens, ref_logps=torch.tensor([-1e3, 5.0], dtype=DTYPE))
    assert torch.equal(with_ref, objective.forget_losses(logps, num_tokens))
    w_ref = loss_weights.gradient_weights("simnpo", logps, num_tokens, ref_logps=-logps, beta=2.5, gamma=0.3)
    assert torch.equal(w_ref, loss_weights.gradient_weights("simnpo", logps, num_tokens, beta=2.5, gamma=0.3))


# The 2x2 cells: each is another cell (or GA) under a substitution, and tends to its GA as beta -> 0.


@FAST
@given(batch=S.moderate_sequence_batches(), beta=S.betas(1e-2, 10.0), gamma=S.gammas())
def test_the_two_by_two_cells_reduce_to_each_other(batch, beta, gamma):
    logps, ref_logps, num_tokens = batch
    ones = torch.ones_like(num_tokens)
    close = dict(rtol=1e-12, atol=1e-300)
    # npo_ave is simnpo (gamma 0) on the log-ratio, and npo at |y| = 1.
    torch.testing.assert_close(losses.npo_ave(logps, ref_logps, num_tokens, beta),
                               losses.simnpo(logps - ref_logps, num_tokens, beta, 0.0), **close)
    torch.testing.assert_close(losses.npo_ave(logps, ref_logps, ones, beta), losses.npo(logps, ref_logps, beta),
                               **close)
    # simnpo_sum is simnpo at |y| = 1, and npo against the constant reference -gamma / beta.
    torch.testing.assert_close(losses.simnpo_sum(logps, beta, gamma), losses.simnpo(logps, ones, beta, gamma),
                               **close)
    constant_reference = torch.full_like(logps, -gamma / beta)
    torch.testing.assert_close(losses.simnpo_sum(logps, beta, gamma), losses.npo(logps, constant_reference, beta),
                               rtol=1e-9, atol=1e-12)
    # Their weights the same way.
    torch.testing.assert_close(weights("npo_ave", logps, ref_logps, num_tokens, beta, gamma),
                               weights("simnpo", logps - ref_logps, None, num_tokens, beta, 0.0), **close)
    torch.testing.assert_close(weights("simnpo_sum", logps, None, num_tokens, beta, gamma),
                               weights("simnpo", logps, None, ones, beta, gamma), **close)


@FAST
@given(batch=S.sequence_batches(), beta=S.betas())
def test_npo_ave_weight_is_one_over_length_at_the_reference(batch, beta):
    logps, _, num_tokens = batch
    w = loss_weights.gradient_weights("npo_ave", logps, num_tokens, ref_logps=logps.clone(), beta=beta)
    torch.testing.assert_close(w, 1.0 / num_tokens, rtol=1e-15, atol=0)
    value = losses.npo_ave(logps, logps.clone(), num_tokens, beta)
    torch.testing.assert_close(value, torch.full_like(logps, 2 * math.log(2) / beta), rtol=1e-12, atol=0)


@FAST
@given(logp=st.floats(-1e3, 0.0), ref=st.floats(-1e3, 0.0), length=st.integers(1, 4096))
def test_npo_ave_and_simnpo_sum_tend_to_their_ga(logp, ref, length):
    """beta -> 0: npo_ave -> GA on the mean log-ratio (w |y| -> 1), simnpo_sum (gamma 0) -> ga_sum (w -> 1)."""
    logps, ref_logps = torch.tensor([logp], dtype=DTYPE), torch.tensor([ref], dtype=DTYPE)
    num_tokens = torch.tensor([length], dtype=DTYPE)
    mean_ratio = (logp - ref) / length
    for beta in SMALL_BETAS:
        u = beta * mean_ratio / 2
        w = loss_weights.gradient_weights("npo_ave", logps, num_tokens, ref_logps, beta=beta).item()
        assert abs(u) - abs(u) ** 3 / 3 - 4 * EPS <= abs(length * w - 1) <= abs(u) + 4 * EPS
        loss = losses.npo_ave(logps, ref_logps, num_tokens, beta).item()
        _log_cosh_sandwich(loss - 2 * math.log(2) / beta - mean_ratio, u, 2 / beta,
                           8 * EPS * (2 / beta + abs(mean_ratio)))
        u = beta * logp / 2
        w = loss_weights.gradient_weights("simnpo_sum", logps, beta=beta, gamma=0.0).item()
        assert abs(u) - abs(u) ** 3 / 3 - 4 * EPS <= abs(w - 1) <= abs(u) + 4 * EPS
        loss = losses.simnpo_sum(logps, beta, 0.0).item()
        _log_cosh_sandwich(loss - 2 * math.log(2) / beta - logp, u, 2 / beta, 8 * EPS * (2 / beta + abs(logp)))


def test_npo_ave_hand_computed():
    """beta 2, logp -6, ref -2, |y| 4: mean ratio -1, L = -log sigma(2) = log(1 + e^-2), w = (1/2) sigma(-2)."""
    logps, ref_logps, num_tokens = T(-6.0), T(-2.0), T(4.0)
    assert math.isclose(losses.npo_ave(logps, ref_logps, num_tokens, 2.0).item(), math.log1p(math.exp(-2.0)),
                        rel_tol=1e-15)
    w = loss_weights.gradient_weights("npo_ave", logps, num_tokens, ref_logps, beta=2.0).item()
    assert math.isclose(w, 0.5 / (1 + math.exp(2.0)), rel_tol=1e-15)
    # simnpo_sum, beta 0.5, gamma 1, logp -6: L = -4 log sigma(2) = 4 log(1 + e^-2), w = 2 sigma(-2).
    assert math.isclose(losses.simnpo_sum(T(-6.0), 0.5, 1.0).item(), 4 * math.log1p(math.exp(-2.0)), rel_tol=1e-15)
    w = loss_weights.gradient_weights("simnpo_sum", T(-6.0), beta=0.5, gamma=1.0).item()
    assert math.isclose(w, 2 / (1 + math.exp(2.0)), rel_tol=1e-15)


def test_ingredient_ladder_changes_one_ingredient_per_pair():
    from markovsim.objectives import LADDER, ingredient_ladder

    npo, simnpo = losses.get_objective("NPO+RT", beta=0.2), losses.get_objective("SimNPO+RT", beta=4.0, gamma=0.5)
    ladder = ingredient_ladder(npo, simnpo)
    assert list(ladder) == [label for label, _, _ in LADDER]
    for label, reference, normalised in LADDER[1:]:
        assert ladder[label].forget == losses.INGREDIENTS[(reference, normalised)]
        assert ladder[label].needs_reference is reference
    fields = ("retain", "forget_weight", "retain_weight", "beta")
    same = lambda a, b: all(getattr(a, f) == getattr(b, f) for f in fields)  # noqa: E731
    assert same(ladder["NPO"], ladder["SimNPO-sum"]) and same(ladder["NPO-ave"], ladder["SimNPO"])
    assert ladder["SimNPO-sum"].gamma == 0.5 and ladder["NPO-ave"].beta == 4.0 and ladder["SimNPO-sum"].beta == 0.2
    assert ladder["GA"].forget == "ga" and same(ladder["GA"], dataclasses.replace(npo, beta=ladder["GA"].beta))
    with pytest.raises(ValueError, match="npo"):
        ingredient_ladder(simnpo, simnpo)
    with pytest.raises(ValueError, match="simnpo"):
        ingredient_ladder(npo, npo)


@FAST
@given(batch=S.moderate_sequence_batches(), beta=S.betas(1e-2, 10.0), shift=st.floats(-1e3, 1e3))
def test_npo_invariant_to_a_common_shift(batch, beta, shift):
    logps, ref_logps, _ = batch
    num_tokens = batch[2]
    for fn in (losses.npo, lambda lp, r, b: loss_weights.gradient_weights("npo", lp, ref_logps=r, beta=b),
               lambda lp, r, b: losses.npo_ave(lp, r, num_tokens, b),
               lambda lp, r, b: loss_weights.gradient_weights("npo_ave", lp, num_tokens, r, beta=b)):
        shifted = fn(logps + shift, ref_logps + shift, beta)
        torch.testing.assert_close(shifted, fn(logps, ref_logps, beta), rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# 6. Bounds and finiteness
# ---------------------------------------------------------------------------------------------


def _scaled_weights(name, logps, ref_logps, num_tokens, beta, gamma):
    """w_npo, w_simnpo_sum, |y| w_simnpo and |y| w_npo_ave, all in (0, 2)."""
    w = weights(name, logps, ref_logps, num_tokens, beta, gamma)
    return w * num_tokens if name in ("simnpo", "npo_ave") else w


SIGMOID_LOSSES = ["npo", "simnpo", "npo_ave", "simnpo_sum"]


@pytest.mark.parametrize("name", SIGMOID_LOSSES)
@FAST
@given(
    batch=S.sequence_batches(min_logp=-1e4, max_logp=1e4),
    beta=S.betas(1e-4, 1e3),
    gamma=S.gammas(),
)
def test_weights_bounded_losses_and_gradients_finite_at_extremes(name, batch, beta, gamma):
    logps, ref_logps, num_tokens = batch
    w = _scaled_weights(name, logps, ref_logps, num_tokens, beta, gamma)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 2).all()
    loss = loss_of_logps(name, ref_logps, num_tokens, beta, gamma)(logps)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(autograd_weights(name, logps, ref_logps, num_tokens, beta, gamma)).all()


@pytest.mark.parametrize("name", SIGMOID_LOSSES)
@FAST
@given(batch=S.moderate_sequence_batches(), beta=S.betas(1e-2, 0.5), gamma=S.gammas())
def test_weights_strictly_inside_bounds_on_moderate_inputs(name, batch, beta, gamma):
    logps, ref_logps, num_tokens = batch
    w = _scaled_weights(name, logps, ref_logps, num_tokens, beta, gamma)
    assert (w > 0).all() and (w < 2).all()


# ---------------------------------------------------------------------------------------------
# 7. Masking
# ---------------------------------------------------------------------------------------------


@FAST
@given(batch=S.token_logp_batches(), pad=st.lists(S.padding_values(), min_size=1, max_size=5))
def test_padding_changes_neither_logps_nor_num_tokens(batch, pad):
    token_logps, mask = batch
    logps, num_tokens = losses.reduce_token_logps(token_logps, mask)
    padding = torch.tensor(pad, dtype=DTYPE).expand(token_logps.shape[0], -1)
    padded = torch.cat([token_logps, padding], 1)
    padded_mask = torch.cat([mask, torch.zeros(padding.shape, dtype=torch.bool)], 1)
    logps_padded, num_tokens_padded = losses.reduce_token_logps(padded, padded_mask)
    torch.testing.assert_close(logps_padded, logps, rtol=1e-14, atol=0)
    assert torch.equal(num_tokens_padded, num_tokens)
    # Independent reference: Python sums over the masked-in positions only.
    rows = zip(token_logps.tolist(), mask.tolist())
    expected = [math.fsum(v for v, m in zip(vals, ms) if m) for vals, ms in rows]
    torch.testing.assert_close(logps, torch.tensor(expected, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    assert num_tokens.tolist() == mask.sum(1).tolist() and num_tokens.dtype == DTYPE


@SLOW
@given(batch=S.token_logp_batches())
def test_padding_never_leaks_into_gradients(batch):
    """-inf, +inf and NaN on padding are masked consistently: ignored, gradient exactly 0 there."""
    token_logps, mask = batch
    leaf = token_logps.clone().requires_grad_(True)
    logps, num_tokens = losses.reduce_token_logps(leaf, mask)
    (losses.simnpo(logps, num_tokens, 2.5) + losses.ga(logps, num_tokens)).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[~mask] == 0).all()


def test_mask_may_be_bool_int_or_float():
    token_logps = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, math.nan, -4.0]], dtype=DTYPE)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    expected = losses.reduce_token_logps(token_logps, mask)
    for other in (mask.long(), mask.to(DTYPE)):
        got = losses.reduce_token_logps(token_logps, other)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert expected[0].tolist() == [-3.0, -4.5] and expected[1].tolist() == [2.0, 2.0]


# ---------------------------------------------------------------------------------------------
# 8. Values equal a naive re-implementation of docs/theory.md on Python floats
# ---------------------------------------------------------------------------------------------


def naive(name, lp, r, n, beta, gamma):
    if name == "ga":
        return lp / n
    if name == "ga_sum":
        return lp
    if name == "npo":
        return -(2 / beta) * math.log(sigma(-beta * (lp - r)))
    if name == "simnpo":
        return -(2 / beta) * math.log(sigma(-(beta / n) * lp - gamma))
    if name == "npo_ave":
        return -(2 / beta) * math.log(sigma(-(beta / n) * (lp - r)))
    if name == "simnpo_sum":
        return -(2 / beta) * math.log(sigma(-beta * lp - gamma))
    raise AssertionError(name)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@FAST
@given(batch=S.moderate_sequence_batches(), beta=S.betas(5e-2, 5.0), gamma=S.gammas())
def test_values_equal_naive_formulas(name, batch, beta, gamma):
    logps, ref_logps, num_tokens = batch
    got = loss_of_logps(name, ref_logps, num_tokens, beta, gamma)(logps)
    rows = zip(logps.tolist(), ref_logps.tolist(), num_tokens.tolist())
    expected = torch.tensor([naive(name, lp, r, n, beta, gamma) for lp, r, n in rows], dtype=DTYPE)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@FAST
@given(batch=S.moderate_sequence_batches(), other=S.moderate_sequence_batches(), beta=S.betas(5e-2, 5.0))
def test_dpo_and_nll_equal_naive_formulas(batch, other, beta):
    logps, ref_logps, num_tokens = batch
    size = min(len(logps), len(other[0]))
    lw, rw, ll, rl = logps[:size], ref_logps[:size], other[0][:size], other[1][:size]
    got = losses.dpo(lw, rw, ll, rl, beta)
    expected = [
        -(2 / beta) * math.log(sigma(beta * ((a - b) - (c - d))))
        for a, b, c, d in zip(lw.tolist(), rw.tolist(), ll.tolist(), rl.tolist())
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=DTYPE), rtol=1e-10, atol=1e-12)
    expected_nll = [-lp / n for lp, n in zip(logps.tolist(), num_tokens.tolist())]
    torch.testing.assert_close(
        losses.nll(logps, num_tokens), torch.tensor(expected_nll, dtype=DTYPE), rtol=1e-14, atol=0
    )


# ---------------------------------------------------------------------------------------------
# 9. KL retain term
# ---------------------------------------------------------------------------------------------


def naive_kl(ref_log_probs, log_probs, mask):
    out = []
    for ref_rows, rows, ms in zip(ref_log_probs.tolist(), log_probs.tolist(), mask.tolist()):
        total, count = 0.0, 0
        for ref_row, row, m in zip(ref_rows, rows, ms):
            if not m:
                continue
            count += 1
            for r, q in zip(ref_row, row):
                if r != -math.inf:  # 0 log 0 = 0
                    total += math.exp(r) * (r - q)
        out.append(total / count)
    return torch.tensor(out, dtype=DTYPE)


@FAST
@given(batch=S.vocab_logprob_batches())
def test_kl_equals_brute_force_and_is_non_negative(batch):
    ref_log_probs, logits, mask = batch
    log_probs = torch.log_softmax(logits, -1)
    got = losses.kl(ref_log_probs, log_probs, mask)
    torch.testing.assert_close(got, naive_kl(ref_log_probs, log_probs, mask), rtol=1e-12, atol=1e-14)
    assert (got >= -1e-14).all()
    assert torch.equal(losses.kl(ref_log_probs, ref_log_probs.clone(), mask), torch.zeros_like(got))


@FAST
@given(batch=S.vocab_logprob_batches())
def test_kl_gradient_is_softmax_minus_reference(batch):
    ref_log_probs, logits, mask = batch
    garbage = torch.full_like(ref_log_probs, math.nan)
    ref_log_probs = torch.where(mask[..., None], ref_log_probs, garbage)  # padding never leaks
    leaf = logits.clone().requires_grad_(True)
    losses.kl(ref_log_probs, torch.log_softmax(leaf, -1), mask).sum().backward()
    per_token = torch.softmax(logits, -1) - ref_log_probs.exp()  # (B, T, V)
    expected = per_token / mask.sum(1)[:, None, None]
    expected = torch.where(mask[..., None], expected, torch.zeros_like(expected))
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 10. WGA
# ---------------------------------------------------------------------------------------------


@FAST
@given(batch=S.token_logp_batches(), alpha=st.floats(0.0, 3.0))
def test_wga_gradient_and_value(batch, alpha):
    token_logps, mask = batch
    leaf = token_logps.clone().requires_grad_(True)
    value = losses.wga(leaf, mask, alpha)
    value.sum().backward()
    num_tokens = mask.sum(1, keepdim=True).to(DTYPE)
    kept = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    expected_grad = torch.where(mask, torch.exp(alpha * kept) / num_tokens, torch.zeros_like(kept))
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-12, atol=0)
    rows = zip(token_logps.tolist(), mask.tolist())
    expected = [
        math.fsum(math.exp(alpha * v) * v for v, m in zip(vals, ms) if m) / sum(ms) for vals, ms in rows
    ]
    torch.testing.assert_close(value, torch.tensor(expected, dtype=DTYPE), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 11. Bad input
# ---------------------------------------------------------------------------------------------

T = lambda *values: torch.tensor(values, dtype=DTYPE)  # noqa: E731
L, R, N = T(-1.0, -2.0), T(-1.5, -2.5), T(1.0, 3.0)
Z2, ONE, TWO = torch.zeros(1, 1, 2, dtype=DTYPE), torch.tensor([[True]]), torch.tensor([[True, True]])

BAD_CALLS = {
    "beta zero": (lambda: losses.npo(L, R, 0.0), ValueError, "beta"),
    "beta negative": (lambda: losses.simnpo(L, N, -1.0), ValueError, "beta"),
    "beta inf": (lambda: losses.simnpo(L, N, math.inf), ValueError, "beta"),
    "beta nan": (lambda: losses.dpo(L, R, L, R, math.nan), ValueError, "beta"),
    "beta not a number": (lambda: losses.npo(L, R, "0.1"), TypeError, "beta"),
    "gamma inf": (lambda: losses.simnpo(L, N, 1.0, math.inf), ValueError, "gamma"),
    "logps nan": (lambda: losses.ga(T(math.nan, -1.0), N), ValueError, "logps"),
    "logps -inf": (lambda: losses.ga_sum(T(-math.inf, -1.0)), ValueError, "logps"),
    "ref_logps inf": (lambda: losses.npo(L, T(math.inf, 0.0), 0.1), ValueError, "ref_logps"),
    "ref shape": (lambda: losses.npo(L, T(-1.0), 0.1), ValueError, "ref_logps"),
    "num_tokens shape": (lambda: losses.simnpo(L, T(1.0, 2.0, 3.0), 1.0), ValueError, "num_tokens"),
    "logps 2-D": (lambda: losses.ga(L[None], N[None]), ValueError, "logps"),
    "num_tokens zero": (lambda: losses.ga(L, T(0.0, 1.0)), ValueError, "num_tokens"),
    "num_tokens negative": (lambda: losses.nll(L, T(2.0, -1.0)), ValueError, "num_tokens"),
    "num_tokens nan": (lambda: losses.simnpo(L, T(math.nan, 1.0), 1.0), ValueError, "num_tokens"),
    "logps list": (lambda: losses.ga([-1.0, -2.0], N), TypeError, "logps"),
    "num_tokens list": (lambda: losses.ga(L, [1, 3]), TypeError, "num_tokens"),
    "ref float": (lambda: losses.npo(L, -1.0, 0.1), TypeError, "ref_logps"),
    "logps int": (lambda: losses.ga_sum(torch.tensor([1, 2])), TypeError, "logps"),
    "token nan unmasked": (
        lambda: losses.reduce_token_logps(T(-1.0, math.nan)[None], torch.tensor([[True, True]])),
        ValueError,
        "token_logps",
    ),
    "token -inf unmasked": (
        lambda: losses.wga(T(-math.inf, -1.0)[None], torch.tensor([[True, True]])),
        ValueError,
        "token_logps",
    ),
    "mask shape": (lambda: losses.reduce_token_logps(L[None], torch.tensor([[True]])), ValueError, "mask"),
    "mask values": (lambda: losses.reduce_token_logps(L[None], torch.tensor([[1, 2]])), ValueError, "mask"),
    "mask list": (lambda: losses.reduce_token_logps(L[None], [[True, True]]), TypeError, "mask"),
    "wga empty row": (lambda: losses.wga(L[None], torch.tensor([[False, False]])), ValueError, "unmasked"),
    "wga alpha negative": (lambda: losses.wga(L[None], TWO, -1.0), ValueError, "alpha"),
    "kl nan": (lambda: losses.kl(torch.full_like(Z2, math.nan), Z2, ONE), ValueError, "ref_log_probs"),
    "kl +inf": (lambda: losses.kl(Z2, torch.full_like(Z2, math.inf), ONE), ValueError, "log_probs"),
    "kl shapes": (lambda: losses.kl(Z2, torch.zeros(1, 1, 3, dtype=DTYPE), ONE), ValueError, "shape"),
    "kl empty row": (lambda: losses.kl(Z2, Z2, ~ONE), ValueError, "unmasked"),
    "unknown loss": (lambda: loss_weights.gradient_weights("simpo", L, N, beta=1.0), ValueError, "simnpo"),
    "dpo weights": (lambda: loss_weights.gradient_weights("dpo", L, N, R, beta=1.0), ValueError, "LLM-side"),
    "wga weights": (lambda: loss_weights.gradient_weights("wga", L, N), ValueError, "LLM-side"),
    "npo weights no ref": (lambda: loss_weights.gradient_weights("npo", L, N, beta=1.0), ValueError, "ref_logps"),
    "simnpo weights no beta": (lambda: loss_weights.gradient_weights("simnpo", L, N), ValueError, "beta"),
    "unknown objective": (lambda: losses.get_objective("SimPO"), ValueError, "SimNPO\\+KL"),
    "unknown override": (lambda: losses.get_objective("NPO", temperature=1.0), ValueError, "beta"),
    "override invalid": (lambda: losses.get_objective("NPO", beta=-0.1), ValueError, "beta"),
    "objective forget": (lambda: losses.Objective("gd"), ValueError, "simnpo"),
    "objective retain": (lambda: losses.Objective("ga", "mse"), ValueError, "nll"),
    "objective beta": (lambda: losses.Objective("npo", beta=0.0), ValueError, "beta"),
    "objective weight nan": (
        lambda: losses.Objective("ga", forget_weight=math.nan), ValueError, "forget_weight"
    ),
    "objective weight negative": (
        lambda: losses.Objective("ga", "nll", retain_weight=-1.0), ValueError, "retain_weight"
    ),
    "objective npo no ref": (lambda: losses.Objective("npo").forget_losses(L, N), ValueError, "ref_logps"),
    "objective dpo forget_losses": (
        lambda: losses.Objective("dpo").forget_losses(L, N, R), ValueError, "dpo"
    ),
    "total missing retain": (
        lambda: losses.get_objective("GradDiff").total(L.mean()), ValueError, "retain_value"
    ),
    "total extra retain": (
        lambda: losses.get_objective("GA").total(L.mean(), L.mean()), ValueError, "retain"
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_a_clear_error(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()


# tensor inputs whose values (not type, shape or a Python scalar setting) are bad, and give NaN/inf unchecked
VALUE_CASES = ["logps nan", "logps -inf", "num_tokens zero", "num_tokens nan", "token nan unmasked",
               "token -inf unmasked"]


@pytest.mark.parametrize("case", VALUE_CASES)
def test_value_checks_skipped_turns_off_only_the_value_reads(case):
    """Inside ``value_checks_skipped`` a NaN/inf input gives a non-finite result instead of an error (no host
    sync); outside, and after the block, the same call raises again."""
    from markovsim.tensor_checks import value_checks_skipped

    call, error, message = BAD_CALLS[case]
    with value_checks_skipped():
        result = call()
    values = result if isinstance(result, tuple) else (result,)
    assert not all(bool(torch.isfinite(v).all()) for v in values if isinstance(v, torch.Tensor))
    with pytest.raises(error, match=message):
        call()


def test_value_checks_skipped_keeps_type_and_shape_checks_and_the_values():
    from markovsim.tensor_checks import value_checks_skipped

    logps, tokens = torch.tensor([-3.0, -5.0], dtype=torch.float64), torch.tensor([2.0, 4.0], dtype=torch.float64)
    with value_checks_skipped():
        with pytest.raises(ValueError, match="num_tokens has shape"):
            losses.simnpo(logps, tokens[:1], beta=2.5)
        with pytest.raises(TypeError, match="torch.Tensor"):
            losses.ga([-3.0], tokens)
        skipped = losses.simnpo(logps, tokens, beta=2.5)
    assert torch.equal(skipped, losses.simnpo(logps, tokens, beta=2.5))


# ---------------------------------------------------------------------------------------------
# 12. Objectives, registries, dtypes
# ---------------------------------------------------------------------------------------------

NEEDS_REFERENCE = {
    "GA": False,
    "GradDiff": False,
    "NPO": True,
    "NPO+RT": True,
    "NPO+KL": True,
    "SimNPO": False,
    "SimNPO+RT": False,
    "SimNPO+KL": True,
    "NPO-ave": True,
    "NPO-ave+RT": True,
    "SimNPO-sum": False,
    "SimNPO-sum+RT": False,
}


def test_registries():
    assert set(losses.LOSSES) == {"ga", "ga_sum", "npo", "simnpo", "npo_ave", "simnpo_sum", "dpo", "wga"}
    assert losses.RETAIN_TERMS == {"nll": losses.nll, "kl": losses.kl}
    assert set(losses.OBJECTIVES) == set(NEEDS_REFERENCE)
    assert losses.OBJECTIVES["NPO"].beta == 0.1
    assert (losses.OBJECTIVES["SimNPO"].beta, losses.OBJECTIVES["SimNPO"].gamma) == (2.5, 0.0)


@pytest.mark.parametrize("name", list(NEEDS_REFERENCE))
def test_every_objective_gives_a_finite_scalar_with_gradient(name):
    objective = losses.get_objective(name)
    assert objective == losses.OBJECTIVES[name]
    assert objective.needs_reference is NEEDS_REFERENCE[name]
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 5, dtype=DTYPE, generator=generator, requires_grad=True)  # (T, V) logits
    theta_ref = theta.detach() + 0.3 * torch.randn(4, 5, dtype=DTYPE, generator=generator)
    forget_tokens = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 0], [2, 3, 0, 1]])  # (B, T)
    retain_tokens = torch.tensor([[1, 1, 2, 4], [3, 0, 0, 2]])  # (B', T), distinct from the forget data
    forget_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    retain_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    log_probs = torch.log_softmax(theta, -1)  # (T, V), shared by all sequences
    ref_log_probs = torch.log_softmax(theta_ref, -1)

    def batch_logps(table, tokens, mask):
        token_logps = table.expand(len(tokens), -1, -1).gather(-1, tokens[..., None])[..., 0]  # (B, T)
        return losses.reduce_token_logps(token_logps, mask)

    logps, num_tokens = batch_logps(log_probs, forget_tokens, forget_mask)
    ref_logps, _ = batch_logps(ref_log_probs, forget_tokens, forget_mask)
    forget = objective.forget_losses(logps, num_tokens, ref_logps if objective.needs_reference else None)
    assert forget.shape == (3,)
    retain_logps, retain_num_tokens = batch_logps(log_probs, retain_tokens, retain_mask)
    expand = lambda table: table.expand(2, -1, -1)  # noqa: E731  (B', T, V)
    retain = {
        None: None,
        "nll": lambda: losses.nll(retain_logps, retain_num_tokens).mean(),
        "kl": lambda: losses.kl(expand(ref_log_probs), expand(log_probs), retain_mask).mean(),
    }[objective.retain]
    retain = retain if retain is None else retain()
    total = objective.total(forget.mean(), retain)
    assert total.shape == () and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0
    w = objective.forget_weights(logps, num_tokens, ref_logps)
    expected = loss_weights.gradient_weights(
        objective.forget, logps, num_tokens, ref_logps, beta=objective.beta, gamma=objective.gamma
    )
    assert torch.equal(w, expected)


def test_total_weights_the_terms():
    objective = losses.get_objective("SimNPO+RT", forget_weight=0.25, retain_weight=3.0)
    assert objective.total(T(2.0)[0], T(5.0)[0]).item() == 0.25 * 2.0 + 3.0 * 5.0
    assert losses.get_objective("NPO", forget_weight=0.5).total(T(2.0)[0]).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_is_preserved(dtype):
    token_logps = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, -3.0, -4.0]], dtype=dtype)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logps, num_tokens = losses.reduce_token_logps(token_logps, mask)
    assert logps.dtype == num_tokens.dtype == dtype
    vocab = token_logps[..., None].expand(2, 3, 2)  # (B, T, V); NaN after log_softmax on padding
    outputs = [
        losses.ga(logps, num_tokens),
        losses.ga_sum(logps),
        losses.npo(logps, logps - 1, 0.1),
        losses.simnpo(logps, num_tokens, 2.5, 0.5),
        losses.npo_ave(logps, logps - 1, num_tokens, 2.5),
        losses.simnpo_sum(logps, 0.1, 0.5),
        losses.dpo(logps, logps - 1, logps, logps + 1, 0.1),
        losses.wga(token_logps, mask, 1.0),
        losses.nll(logps, num_tokens),
        losses.kl(vocab.log_softmax(-1), torch.zeros_like(vocab).log_softmax(-1), mask),
    ] + [loss_weights.gradient_weights(n, logps, num_tokens, logps - 1, beta=0.5) for n in SEQUENCE_LOSSES]
    assert all(out.dtype == dtype and out.shape == (2,) for out in outputs)


def test_integer_num_tokens_keep_float64():
    logps = T(-3.0, -40.0)
    for name in ("ga", "simnpo", "npo_ave"):
        ref_logps = T(-1.0, -50.0)
        as_int = loss_of_logps(name, ref_logps, torch.tensor([3, 7]), 2.5, 0.1)(logps)
        as_float = loss_of_logps(name, ref_logps, T(3.0, 7.0), 2.5, 0.1)(logps)
        assert as_int.dtype == DTYPE and torch.equal(as_int, as_float)
        w_int = loss_weights.gradient_weights(name, logps, torch.tensor([3, 7]), ref_logps, beta=2.5, gamma=0.1)
        assert w_int.dtype == DTYPE and torch.equal(w_int, weights(name, logps, ref_logps, T(3.0, 7.0), 2.5, 0.1))


def test_moved_names_are_still_importable_from_their_old_modules():
    """llm/ imports these from markovsim.losses and markovsim.models: the re-exports must stay."""
    from markovsim import mixture, models, objectives, tabular
    from markovsim.losses import OBJECTIVES, Objective, get_objective

    assert (Objective, OBJECTIVES, get_objective) == (objectives.Objective, objectives.OBJECTIVES,
                                                      objectives.get_objective)
    assert (models.TabularMarkov, models.MixtureOfChains) == (tabular.TabularMarkov, mixture.MixtureOfChains)
    with pytest.raises(AttributeError):
        losses.no_such_name


# ---------------------------------------------------------------------------------------------
# Loss traits (SEQUENCE_LOSSES, NEEDS_REFERENCE, USES_BETA, USES_GAMMA, USES_ALPHA) against behaviour
# ---------------------------------------------------------------------------------------------

ALL_TERMS = {**losses.LOSSES, **losses.RETAIN_TERMS}


def _trait_inputs(reference_changed: bool) -> dict:
    """Every argument any loss or retain term takes, by parameter name; B = 3, T = 4, V = 5."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, dtype=DTYPE, generator=generator)  # (B, T, V)
    ref_logits = logits + (torch.randn(3, 4, 5, dtype=DTYPE, generator=generator) if reference_changed else 0.0)
    logps = -torch.rand(3, dtype=DTYPE, generator=generator) * 5 - 1  # (B,)
    shift = 0.7 if reference_changed else 0.0
    return {
        "logps": logps, "logps_w": logps - 0.5, "logps_l": logps,
        "ref_logps": logps + shift, "ref_logps_w": logps - 0.5 - shift, "ref_logps_l": logps + shift,
        "num_tokens": T(2.0, 3.0, 4.0),
        "token_logps": torch.log_softmax(logits, -1)[..., 0],  # (B, T)
        "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool),
        "log_probs": torch.log_softmax(logits, -1), "ref_log_probs": torch.log_softmax(ref_logits, -1),
        "beta": 0.5, "gamma": 0.3, "alpha": 0.5,
    }


def _call_term(name: str, reference_changed: bool = False, **hyperparameters) -> torch.Tensor:
    """ALL_TERMS[name] called with the arguments its signature names (hyperparameters override)."""
    function = ALL_TERMS[name]
    available = _trait_inputs(reference_changed) | hyperparameters
    return function(**{p: available[p] for p in inspect.signature(function).parameters})


@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_needs_reference_matches_the_signature_and_the_value(name):
    takes_reference = any(p.startswith("ref_") for p in inspect.signature(ALL_TERMS[name]).parameters)
    assert takes_reference is (name in losses.NEEDS_REFERENCE)
    if takes_reference:
        assert not torch.allclose(_call_term(name), _call_term(name, reference_changed=True))


@pytest.mark.parametrize("trait,hyperparameter,values", [
    ("USES_BETA", "beta", (0.5, 2.0)), ("USES_GAMMA", "gamma", (0.0, 1.0)), ("USES_ALPHA", "alpha", (0.0, 2.0))])
@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_hyperparameter_traits_match_the_value(name, trait, hyperparameter, values):
    uses = name in getattr(losses, trait)
    assert (hyperparameter in inspect.signature(ALL_TERMS[name]).parameters) is uses
    if uses:
        low, high = (_call_term(name, **{hyperparameter: v}) for v in values)
        assert not torch.allclose(low, high)


@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_sequence_losses_are_exactly_those_with_a_gradient_weight(name):
    inputs = _trait_inputs(reference_changed=True)
    arguments = dict(num_tokens=inputs["num_tokens"], ref_logps=inputs["ref_logps"], beta=0.5, gamma=0.3)
    if name not in losses.SEQUENCE_LOSSES:
        with pytest.raises(ValueError):
            loss_weights.gradient_weights(name, inputs["logps"], **arguments)
        return
    expected = autograd_weights(name, inputs["logps"], inputs["ref_logps"], inputs["num_tokens"], 0.5, 0.3)
    assert torch.allclose(loss_weights.gradient_weights(name, inputs["logps"], **arguments), expected)
