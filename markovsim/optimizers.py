"""The two Adam update rules that unlearning results depend on, shared by the simulator and ``llm``.

With gradient g_t, moments m_t = b1 m_{t-1} + (1 - b1) g_t and v_t = b2 v_{t-1} + (1 - b2) g_t^2,
learning rate lr, decoupled weight decay wd (docs/theory.md, "Adam, eps and small gradient weights"):

``adamw`` (``torch.optim.AdamW``, eps = 1e-8 by default)::

    p <- p (1 - lr wd)
    p <- p - lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

``adamw_legacy`` (the ``transformers.AdamW`` class that transformers 5 removed, imported by the
official SimNPO synthetic code; eps = 1e-6 and wd = 0 by default)::

    p <- p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)
    p <- p (1 - lr wd)                               (after the step, on the updated p)

The two agree except where eps enters: the legacy rule adds eps to the UNcorrected sqrt(v_t), which
in the ``adamw`` formula is an effective eps of ``eps / sqrt(1 - b2^t)`` (:func:`effective_eps`):
about 3.2e-5 at t = 1 and 4.5e-6 at t = 50 for eps = 1e-6, b2 = 0.999. Gradients comparable to
that (SimNPO's weights in the sigmoid's tail) are damped by the legacy rule and not by ``adamw``.

:func:`adam_update` is the reference (immutable, any dtype, the simulator's). The ``torch.optim``
optimizers (:func:`build_torch_optimizer`) run both rules on a CPU through PyTorch's fused AdamW
kernel (:func:`fused_adam_step`: one pass per element; the legacy rule with the effective eps), equal
to :func:`adam_update` up to float rounding; on other devices ``torch.optim.AdamW``'s default
kernels and :func:`adam_update` per parameter.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["ADAM_RULES", "ADAM_DEFAULTS", "AdamState", "adam_update", "effective_eps", "fused_cpu_possible",
           "fused_adam_step", "LegacyAdamW", "build_torch_optimizer"]

ADAM_RULES = ("adamw", "adamw_legacy")
# Each rule's own defaults (eps, weight_decay), for settings that reproduce a published setup.
ADAM_DEFAULTS = {"adamw": {"eps": 1e-8, "weight_decay": 0.01}, "adamw_legacy": {"eps": 1e-6, "weight_decay": 0.0}}
# PyTorch's fused CPU AdamW kernel (what torch.optim.AdamW(fused=True) runs; PyTorch >= 2.4).
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


class AdamState:
    """First and second moments of one tensor and the step count (the rule's whole state)."""

    __slots__ = ("exp_avg", "exp_avg_sq", "step")

    def __init__(self, like: torch.Tensor):
        self.exp_avg = torch.zeros_like(like)
        self.exp_avg_sq = torch.zeros_like(like)
        self.step = 0


def _check_rule(rule: str) -> str:
    if rule not in ADAM_RULES:
        raise ValueError(f"Adam rule must be one of {ADAM_RULES}, got {rule!r}")
    return rule


def adam_update(rule: str, param: torch.Tensor, grad: torch.Tensor, state: AdamState, learning_rate: float,
                betas: tuple[float, float], eps: float, weight_decay: float) -> torch.Tensor:
    """One step of ``rule`` on ``param`` (any shape); updates ``state`` in place, returns the new parameter.

    ``param`` itself is not modified (the simulator keeps parameters immutable); see the module
    docstring for both formulas.
    """
    beta1, beta2 = betas
    state.step += 1
    state.exp_avg = beta1 * state.exp_avg + (1 - beta1) * grad
    state.exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * grad * grad
    correction1, correction2 = 1 - beta1 ** state.step, 1 - beta2 ** state.step
    if _check_rule(rule) == "adamw":
        decayed = param * (1 - learning_rate * weight_decay)
        denominator = torch.sqrt(state.exp_avg_sq / correction2) + eps
        return decayed - learning_rate * (state.exp_avg / correction1) / denominator
    step_size = learning_rate * math.sqrt(correction2) / correction1
    stepped = param - step_size * state.exp_avg / (torch.sqrt(state.exp_avg_sq) + eps)
    return stepped * (1 - learning_rate * weight_decay)


def effective_eps(rule: str, eps: float, beta2: float, step: int) -> float:
    """The eps of the ``adamw`` formula that reproduces ``rule`` at ``step`` (1-based): eps or eps / sqrt(1 - b2^t)."""
    return eps if _check_rule(rule) == "adamw" else eps / math.sqrt(1 - beta2 ** step)


def fused_cpu_possible(tensors) -> bool:
    """Whether PyTorch's fused CPU AdamW kernel can update ``tensors``: all floating point, contiguous, on a CPU.

    (The kernel reads memory in order, ignoring strides: a transposed tensor would be updated wrongly.)
    """
    return _FUSED_ADAMW is not None and all(t.device.type == "cpu" and t.is_floating_point() and t.is_contiguous()
                                            for t in tensors)


def fused_adam_step(rule: str, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, step: int,
                    learning_rate: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One step of ``rule`` in place on lists of same-shaped (param, grad, m, v) CPU tensors whose step count is
    ``step`` (1-based, this step included), in one pass per element (PyTorch's fused CPU AdamW kernel).

    ``adamw``: the kernel exactly as ``torch.optim.AdamW(fused=True)`` calls it. ``adamw_legacy``: the
    kernel with eps / sqrt(1 - b2^t) (:func:`effective_eps`: the same update, module docstring) and no
    decay, then p <- p (1 - lr wd) on the updated parameters. Equal to :func:`adam_update` up to float
    rounding (the kernel orders the operations its own way).
    """
    if not fused_cpu_possible([*params, *exp_avgs, *exp_avg_sqs]):
        raise ValueError("fused_adam_step needs contiguous floating point CPU tensors and torch._fused_adamw_ "
                         "(PyTorch >= 2.4); use adam_update")
    grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
    beta1, beta2 = betas
    legacy = _check_rule(rule) == "adamw_legacy"
    step_tensor = torch.tensor(float(step))
    _FUSED_ADAMW(params, grads, exp_avgs, exp_avg_sqs, [], [step_tensor] * len(params), lr=learning_rate,
                 beta1=beta1, beta2=beta2, weight_decay=0.0 if legacy else weight_decay,
                 eps=effective_eps(rule, eps, beta2, step), amsgrad=False, maximize=False)
    if legacy and weight_decay != 0:
        torch._foreach_mul_(params, 1 - learning_rate * weight_decay)


class LegacyAdamW(torch.optim.Optimizer):
    """``adamw_legacy`` as a ``torch.optim.Optimizer`` (the removed ``transformers.AdamW``, correct_bias=True).

    On a CPU each parameter group steps in one fused pass (:func:`fused_adam_step`); elsewhere
    parameter by parameter with :func:`adam_update`.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in ``transformers.AdamW`` (defaults 1e-3, (0.9, 0.999), 1e-6, 0).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"LegacyAdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grads = [param for param in group["params"] if param.grad is not None]
            if fused_cpu_possible(with_grads):
                self._fused_group_step(group, with_grads)
                continue
            for param in with_grads:
                saved = self.state[param]
                state = AdamState(param)
                if saved:
                    state.exp_avg, state.exp_avg_sq, state.step = saved["exp_avg"], saved["exp_avg_sq"], saved["step"]
                param.copy_(adam_update("adamw_legacy", param, param.grad, state, group["lr"], group["betas"],
                                        group["eps"], group["weight_decay"]))
                saved.update(exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq, step=state.step)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``, with moments of their own (the fused step updates them in place; the
        loaded dict's tensors may belong to another optimizer in this process)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            state.update({key: state[key].clone() for key in ("exp_avg", "exp_avg_sq") if key in state})

    def _fused_group_step(self, group: dict, params: list) -> None:
        by_step: dict[int, list] = {}  # parameters sharing a step count (all of them, in a run) share a call
        for param in params:
            saved = self.state[param]
            if not saved:
                saved.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param), step=0)
            for key in ("exp_avg", "exp_avg_sq"):  # (a no-op unless a loaded state came in another layout)
                saved[key] = saved[key].to(param.dtype).contiguous()
            saved["step"] += 1
            by_step.setdefault(saved["step"], []).append(param)
        for step, stepped in by_step.items():
            states = [self.state[param] for param in stepped]
            fused_adam_step("adamw_legacy", stepped, [param.grad for param in stepped],
                            [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states], step,
                            group["lr"], group["betas"], group["eps"], group["weight_decay"])


class _FusedCPUAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)``, gradients made contiguous first (the fused CPU kernel ignores strides)."""

    def __init__(self, params, **settings):
        super().__init__(params, fused=True, **settings)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and not param.grad.is_contiguous():
                    param.grad = param.grad.contiguous()
        return super().step(closure)


def build_torch_optimizer(rule: str, groups, learning_rate: float, betas: tuple[float, float], eps: float):
    """A ``torch.optim`` optimizer for ``rule`` over parameter ``groups`` (each with its ``weight_decay``).

    ``adamw`` is ``torch.optim.AdamW`` (fused on a CPU, see :func:`fused_adam_step`; its default
    kernels elsewhere; the tests check it equals :func:`adam_update`), ``adamw_legacy`` is
    :class:`LegacyAdamW`; ``gd`` (plain gradient descent, theta -= lr g, as the simulator's ``gd``) is
    ``torch.optim.SGD`` without momentum, and takes no weight decay (``markovsim.config.RunSettings``
    rejects one).
    """
    if rule == "gd":
        groups = list(groups)
        if any(isinstance(group, dict) and group.get("weight_decay", 0.0) for group in groups):
            raise ValueError("optimizer 'gd' takes no weight decay")
        return torch.optim.SGD(groups, lr=learning_rate)
    if _check_rule(rule) == "adamw":
        groups = list(groups)
        params = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
        kind = _FusedCPUAdamW if params and fused_cpu_possible(params) else torch.optim.AdamW
        return kind(groups, lr=learning_rate, betas=betas, eps=eps)
    return LegacyAdamW(groups, lr=learning_rate, betas=betas, eps=eps)
