"""markovsim.optimizers: the torch and the legacy transformers AdamW rules, by hand and against torch."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from markovsim.optimizers import (
    ADAM_RULES,
    AdamState,
    LegacyAdamW,
    adam_update,
    build_torch_optimizer,
    effective_eps,
    fused_adam_step,
)


def run_rule(rule, start, grads, **settings_):
    state, param = AdamState(start), start
    for grad in grads:
        param = adam_update(rule, param, grad, state, **settings_)
    return param


def test_legacy_rule_on_a_hand_computed_two_step_example():
    """p0 = 1, g = (2, -1), lr 0.1, betas (0.9, 0.999), eps 1e-6, no weight decay.

    step 1: m = 0.2, v = 0.004, sqrt(v) = 0.0632455532; step size 0.1 * sqrt(0.001) / 0.1 = 0.0316227766
            p1 = 1 - 0.0316227766 * 0.2 / (0.0632455532 + 1e-6) = 0.90000158111
    step 2: m = 0.9 * 0.2 - 0.1 = 0.08, v = 0.999 * 0.004 + 0.001 = 0.004996, sqrt(v) = 0.0706823882;
            step size 0.1 * sqrt(1 - 0.999^2) / (1 - 0.9^2) = 0.1 * 0.0447101778 / 0.19 = 0.0235316725
            p2 = p1 - 0.0235316725 * 0.08 / (0.0706823882 + 1e-6) = 0.87336825395
    """
    settings_ = dict(learning_rate=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    start = torch.tensor([1.0], dtype=torch.float64)
    first = run_rule("adamw_legacy", start, [torch.tensor([2.0], dtype=torch.float64)], **settings_)
    second = run_rule("adamw_legacy", start, [torch.tensor([2.0], dtype=torch.float64),
                                              torch.tensor([-1.0], dtype=torch.float64)], **settings_)
    assert math.isclose(float(first), 0.90000158111383, rel_tol=1e-12)
    assert math.isclose(float(second), 0.87336825395067, rel_tol=1e-12)
    # the torch rule with eps 1e-8 moves the first step by lr * sign(g) up to eps: 0.9000000005
    torch_first = run_rule("adamw", start, [torch.tensor([2.0], dtype=torch.float64)],
                           **dict(settings_, eps=1e-8))
    assert math.isclose(float(torch_first), 0.9000000005, rel_tol=1e-12)


def test_where_eps_enters_decides_how_far_a_tiny_gradient_moves():
    """g = 1e-6 (SimNPO deep in the sigmoid's tail): torch AdamW with eps 1e-6 moves lr * 1/2 on step 1;
    the legacy rule's effective eps 1e-6 / sqrt(0.001) = 3.16e-5 gives lr / (1 + 31.6) = 0.0307 lr."""
    settings_ = dict(learning_rate=1.0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    start, grad = torch.zeros(1, dtype=torch.float64), torch.full((1,), 1e-6, dtype=torch.float64)
    torch_step = -float(run_rule("adamw", start, [grad], **settings_))
    legacy_step = -float(run_rule("adamw_legacy", start, [grad], **settings_))
    assert math.isclose(torch_step, 0.5, rel_tol=1e-12)
    assert math.isclose(legacy_step, 1 / (1 + 1 / math.sqrt(1e-3)), rel_tol=1e-12)
    assert math.isclose(effective_eps("adamw_legacy", 1e-6, 0.999, 1), 1e-6 / math.sqrt(1e-3))
    assert math.isclose(effective_eps("adamw_legacy", 1e-6, 0.999, 50), 4.5e-6, rel_tol=0.01)
    assert effective_eps("adamw", 1e-6, 0.999, 50) == 1e-6


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 12), eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_legacy_rule_is_the_torch_rule_with_the_effective_eps(seed, steps, eps, weight_decay):
    """Without weight decay the two rules coincide step by step once eps is replaced by eps / sqrt(1 - b2^t)."""
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(5, generator=generator, dtype=torch.float64) * 10.0 ** float(torch.randint(-7, 1, (1,),
             generator=generator)) for _ in range(steps)]
    start = torch.randn(5, generator=generator, dtype=torch.float64)
    legacy, modern = AdamState(start), AdamState(start)
    p_legacy = p_modern = start
    for t, grad in enumerate(grads, 1):
        p_legacy = adam_update("adamw_legacy", p_legacy, grad, legacy, 0.01, (0.9, 0.999), eps, 0.0)
        p_modern = adam_update("adamw", p_modern, grad, modern, 0.01, (0.9, 0.999),
                               effective_eps("adamw_legacy", eps, 0.999, t), 0.0)
        torch.testing.assert_close(p_legacy, p_modern, rtol=1e-12, atol=1e-15)
    if weight_decay:  # legacy decays the UPDATED parameter after the step; torch the old one before it
        state = AdamState(start)
        decayed = adam_update("adamw_legacy", start, grads[0], state, 0.01, (0.9, 0.999), eps, weight_decay)
        undecayed = adam_update("adamw_legacy", start, grads[0], AdamState(start), 0.01, (0.9, 0.999), eps, 0.0)
        torch.testing.assert_close(decayed, undecayed * (1 - 0.01 * weight_decay), rtol=1e-14, atol=0)


@pytest.mark.parametrize("rule", ADAM_RULES)
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-15), (torch.float32, 1e-6, 1e-7)])
def test_fused_step_equals_the_functional_rule(rule, dtype, rtol, atol):
    """fused_adam_step (one fused pass on lists of tensors) against adam_update, with weight decay, different
    step counts and a transposed (non-contiguous) gradient, which the kernel alone would read wrongly.
    Tolerances: float rounding (the steps are lr = 0.05; atol ~ 1 float32 ulp of such a step)."""
    generator = torch.Generator().manual_seed(4)
    params = [torch.randn(3, 4, generator=generator, dtype=dtype), torch.randn(5, generator=generator, dtype=dtype)]
    expected, states = [p.clone() for p in params], [AdamState(p) for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    for step in range(1, 6):
        grads = [torch.randn(4, 3, generator=generator, dtype=dtype).t(), torch.randn(5, generator=generator,
                                                                                    dtype=dtype)]
        assert not grads[0].is_contiguous()
        fused_adam_step(rule, params, grads, *moments, step, 0.05, (0.8, 0.99), 1e-6, 0.1)
        expected = [adam_update(rule, e, g, state, 0.05, (0.8, 0.99), 1e-6, 0.1)
                    for e, g, state in zip(expected, grads, states)]
        for param, value in zip(params, expected):
            torch.testing.assert_close(param, value, rtol=rtol, atol=atol)


def test_fused_step_refuses_what_the_kernel_cannot_update():
    transposed = torch.zeros(4, 3).t()
    with pytest.raises(ValueError, match="contiguous floating point CPU"):
        fused_adam_step("adamw", [transposed], [torch.zeros(3, 4)], [torch.zeros(3, 4)], [torch.zeros(3, 4)], 1,
                        0.1, (0.9, 0.999), 1e-8, 0.0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rule", ADAM_RULES)
def test_torch_optimizers_follow_the_functional_rules(rule, fused, monkeypatch):
    """build_torch_optimizer: torch.optim.AdamW for 'adamw', LegacyAdamW for 'adamw_legacy', with decay groups;
    on a CPU through the fused kernel, and without it (a PyTorch that lacks it, or another device)."""
    if not fused:
        monkeypatch.setattr("markovsim.optimizers._FUSED_ADAMW", None)
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    vector = torch.randn(4, generator=generator, dtype=torch.float64)
    params = [torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(vector.clone())]
    optimizer = build_torch_optimizer(rule, [{"params": params[:1], "weight_decay": 0.1},
                                             {"params": params[1:], "weight_decay": 0.0}], 0.05, (0.8, 0.99), 1e-6)
    assert isinstance(optimizer, torch.optim.AdamW if rule == "adamw" else LegacyAdamW)
    expected, states = [matrix, vector], [AdamState(matrix), AdamState(vector)]
    assert (optimizer.defaults.get("fused") is True) == (fused and rule == "adamw")
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        for param, grad in zip(params, grads):
            # a transposed copy on odd steps: the fused kernels must not read its memory in order
            param.grad = grad.clone() if step % 2 == 0 or grad.ndim < 2 else grad.t().clone().t()
        optimizer.step()
        expected = [adam_update(rule, e, g, s, 0.05, (0.8, 0.99), 1e-6, decay)
                    for e, g, s, decay in zip(expected, grads, states, (0.1, 0.0))]
        for param, value in zip(params, expected):
            torch.testing.assert_close(param.detach(), value, rtol=1e-12, atol=1e-14)


def test_legacy_optimizer_state_round_trips_for_resume():
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    first = LegacyAdamW([param], lr=0.1)
    for value in (1.0, -2.0):
        param.grad = torch.full((3,), value, dtype=torch.float64)
        first.step()
    copy = torch.nn.Parameter(param.detach().clone())
    second = LegacyAdamW([copy], lr=0.1)
    second.load_state_dict(first.state_dict())
    for optimizer, p in ((first, param), (second, copy)):
        p.grad = torch.full((3,), 0.5, dtype=torch.float64)
        optimizer.step()
    assert torch.equal(param, copy)


def test_legacy_optimizer_steps_from_moments_in_another_layout():
    """A state whose moments are transposed views (e.g. loaded from elsewhere) still steps as adam_update."""
    generator = torch.Generator().manual_seed(5)
    start, grad = (torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    exp_avg = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    exp_avg_sq = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    param = torch.nn.Parameter(start.clone())
    optimizer = LegacyAdamW([param], lr=0.1, weight_decay=0.1)
    optimizer.state[param] = {"exp_avg": exp_avg.t().contiguous().t(), "exp_avg_sq": exp_avg_sq.t().contiguous().t(),
                              "step": 3}
    param.grad = grad.clone()
    optimizer.step()
    state = AdamState(start)
    state.exp_avg, state.exp_avg_sq, state.step = exp_avg.clone(), exp_avg_sq.clone(), 3
    expected = adam_update("adamw_legacy", start, grad, state, 0.1, (0.9, 0.999), 1e-6, 0.1)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(eps=-1e-6), dict(weight_decay=-0.1), dict(betas=(1.0, 0.9))])
def test_legacy_optimizer_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="LegacyAdamW"):
        LegacyAdamW([torch.nn.Parameter(torch.ones(1))], **bad)


def test_unknown_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="adamw_legacy"):
        adam_update("adam", torch.ones(1), torch.ones(1), AdamState(torch.ones(1)), 0.1, (0.9, 0.999), 1e-8, 0.0)
    assert np.isfinite(effective_eps("adamw", 1e-8, 0.999, 1))


def test_gd_is_plain_gradient_descent_in_torch_too():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = build_torch_optimizer("gd", [{"params": [param], "weight_decay": 0.0}], 0.5, (0.9, 0.999), 1e-8)
    param.grad = torch.tensor([0.2, 0.4], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([0.9, -2.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="weight decay"):
        build_torch_optimizer("gd", [{"params": [param], "weight_decay": 0.1}], 0.5, (0.9, 0.999), 1e-8)
