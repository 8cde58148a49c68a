"""AdamW on N stacked replicas, each with its own learning rate, betas, eps, weight decay and step count.

:class:`StackedAdamW` applies ``torch.optim.AdamW``'s or the legacy ``transformers.AdamW`` rule
(:mod:`markovsim.optimizers`) to the stacked parameters of a ``llm.replicas.ReplicaStack``
(``parameters[name]``: (N, *shape in one model)), and leaves replicas that are no longer active
(diverged) untouched. Two kernels, the same rule:

* ``"fused"`` (the default on a CPU): PyTorch's fused CPU AdamW kernel (``torch._fused_adamw_``,
  what ``torch.optim.AdamW(fused=True)`` runs; ``markovsim.optimizers.fused_adam_step``) on slices of
  rows: one pass over p, g, m, v per element instead of nine. Neighbouring replicas with the same
  settings and step count share one call (all seeds of a run: one call for the matrices, one for the
  rest); others get calls of their own. The legacy rule is the same kernel with
  eps' = eps / sqrt(1 - b2^t) (exact algebra) and its decay applied after the step. The single-run
  optimizers on a CPU (``markovsim.optimizers.build_torch_optimizer``) step through the same kernel,
  so a replica and its single run stay equal up to the order of float32 roundings. 2.4 ms per step
  for 16 replicas of ``paper-synthetic`` on the 2-core VM, 7.5x faster than ``"blocked"`` (18 ms).
* ``"blocked"`` (the default on a GPU, and on a CPU where the fused kernel is missing): the rule's
  element-wise operations on all replicas at once with (N, 1) per-replica factors, over column
  blocks of at most ``ADAM_BLOCK`` elements so that on a CPU the passes stay in cache. On a GPU one
  block per parameter (there a block costs kernel launches, not cache misses) and no wait for the
  host: the factors arrive in one non-blocking copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from markovsim.optimizers import fused_adam_step, fused_cpu_possible

from .runtime import host_to_device

__all__ = ["ADAM_BLOCK", "ADAM_KERNELS", "StackedAdamSettings", "StackedAdamW"]

# Elements (over all replicas) of one block of the blocked update: 32k float32 = 128 KiB per
# state tensor, so the rule's temporaries stay in cache (measured best on the 2-core VM: 2k-16k columns).
ADAM_BLOCK = 1 << 15
ADAM_KERNELS = ("auto", "fused", "blocked")


@dataclass(frozen=True)
class StackedAdamSettings:
    """Per-replica Adam settings, one entry per replica.

    Attributes:
        rule: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw_legacy"`` (``markovsim.optimizers.LegacyAdamW``).
        betas: N pairs (beta1, beta2).
        eps: N numbers.
        weight_decays: N numbers, applied to parameters with ndim >= 2 in ONE model (as ``llm.train``).
    """

    rule: str
    betas: tuple[tuple[float, float], ...]
    eps: tuple[float, ...]
    weight_decays: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.rule not in ("adamw", "adamw_legacy"):
            raise ValueError(f"rule must be 'adamw' or 'adamw_legacy', got {self.rule!r}")
        if not (len(self.betas) == len(self.eps) == len(self.weight_decays)) or not self.betas:
            raise ValueError("betas, eps and weight_decays need one entry per replica (N >= 1)")


class StackedAdamW:
    """One Adam step on every active replica of stacked parameters (see the module docstring).

    ``torch.optim.AdamW``, per element, with lr, b1, b2, eps, wd of replica i::

        p <- p * (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- v * b2 + ((1 - b2) g) g
        p <- p + (-(lr / (1 - b1^t)) m) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    legacy ``transformers.AdamW`` (``markovsim.optimizers.adam_update``)::

        m <- b1 m + (1 - b1) g;  v <- b2 v + ((1 - b2) g) g
        p <- (p - (lr sqrt(1 - b2^t) / (1 - b1^t)) m / (sqrt(v) + eps)) * (1 - lr wd)

    Each replica keeps its own step count t; inactive replicas are left untouched. ``kernel``: ``"auto"``
    (fused on a CPU where PyTorch has the kernel, else blocked), ``"fused"`` or ``"blocked"`` (module docstring).
    """

    def __init__(self, parameters: dict[str, torch.Tensor], settings: StackedAdamSettings, kernel: str = "auto"):
        if kernel not in ADAM_KERNELS:
            raise ValueError(f"kernel must be one of {ADAM_KERNELS}, got {kernel!r}")
        self.parameters, self.settings = parameters, settings
        self.num_replicas = len(settings.betas)
        for name, value in parameters.items():
            if value.shape[0] != self.num_replicas:
                raise ValueError(f"parameter {name!r} stacks {value.shape[0]} replicas, "
                                 f"settings have {self.num_replicas}")
            if not value.is_contiguous():
                raise ValueError(f"parameter {name!r} must be contiguous (StackedAdamW updates flat views)")
        self._device = next(iter(parameters.values())).device
        fused_possible = fused_cpu_possible(parameters.values())
        if kernel == "fused" and not fused_possible:
            raise ValueError("kernel='fused' needs the parameters on a CPU and torch._fused_adamw_ (PyTorch >= 2.4); "
                             "use kernel='blocked' or 'auto'")
        self.kernel = kernel if kernel != "auto" else ("fused" if fused_possible else "blocked")
        self.exp_avg = {name: torch.zeros_like(value) for name, value in parameters.items()}
        self.exp_avg_sq = {name: torch.zeros_like(value) for name, value in parameters.items()}
        self.steps = [0] * self.num_replicas

    def state_dict(self) -> dict:
        """``{"exp_avg": {name: (N, ...)}, "exp_avg_sq": {...}, "steps": [t_i]}`` (CPU copies, for checkpoints)."""
        return {"exp_avg": {k: v.cpu().clone() for k, v in self.exp_avg.items()},
                "exp_avg_sq": {k: v.cpu().clone() for k, v in self.exp_avg_sq.items()}, "steps": list(self.steps)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (same parameter names, shapes and number of replicas)."""
        if len(state["steps"]) != self.num_replicas:
            raise ValueError(f"optimizer state has {len(state['steps'])} replicas, this optimizer {self.num_replicas}")
        for key in ("exp_avg", "exp_avg_sq"):
            mine, saved = getattr(self, key), state[key]
            if set(saved) != set(mine) or any(saved[k].shape != v.shape for k, v in mine.items()):
                raise ValueError(f"optimizer state {key!r} does not match the parameters' names and shapes")
            for name, tensor in mine.items():
                tensor.copy_(saved[name])
        self.steps = [int(t) for t in state["steps"]]

    @torch.no_grad()
    def step(self, learning_rates, active=None) -> None:
        """Update the replicas with ``active[i]`` (default all) at learning rate ``learning_rates[i]``."""
        active = [True] * self.num_replicas if active is None else [bool(a) for a in active]
        if len(learning_rates) != self.num_replicas or len(active) != self.num_replicas:
            raise ValueError(f"need {self.num_replicas} learning rates and active flags")
        self.steps = [t + 1 if a else t for t, a in zip(self.steps, active)]
        if self.kernel == "fused":
            self._fused_step(learning_rates, active)
            return
        factors = self._factors(learning_rates)
        decays = any(wd != 0 for wd in self.settings.weight_decays)
        frozen = [i for i, a in enumerate(active) if not a]
        shaped = {key: value.view(-1, 1) for key, value in factors.items()}  # (N, 1) on the device
        for name, param in self.parameters.items():
            if param.grad is None:
                continue
            state = (param, self.exp_avg[name], self.exp_avg_sq[name])
            saved = [tensor[frozen].clone() for tensor in state] if frozen else None  # inactive rows, restored below
            flat = [tensor.view(self.num_replicas, -1) for tensor in state]  # (N, D) views of p, m, v
            grad = param.grad.reshape(self.num_replicas, -1)  # (N, D)
            # columns per block: cache-sized on a CPU; on a GPU one block (each block costs kernel launches)
            block = grad.shape[1] if grad.is_cuda else max(1, ADAM_BLOCK // self.num_replicas)
            for start in range(0, grad.shape[1], block):
                columns = slice(start, start + block)
                # in place, element by element as the single-run optimizers, one cache-sized block at a time
                self._update(*(tensor[:, columns] for tensor in flat), grad[:, columns], shaped,
                             decays and param.ndim >= 3)
            if frozen:
                for tensor, rows in zip(state, saved):
                    tensor[frozen] = rows

    def _fused_step(self, learning_rates, active: list[bool]) -> None:
        """Each active replica as its single run steps (``markovsim.optimizers.fused_adam_step``): its rows of the
        matrices (with weight decay) and of the other parameters (without), one fused call each. Neighbouring
        replicas with the same settings and step count share the calls (one slice of rows each; seeds: one call)."""
        s = self.settings
        names = [name for name, value in self.parameters.items() if value.grad is not None]
        groups = ([n for n in names if self.parameters[n].ndim >= 3], [n for n in names if self.parameters[n].ndim < 3])
        for first, last in _runs_of_equal([(learning_rates[i], s.betas[i], s.eps[i], s.weight_decays[i], self.steps[i])
                                           if a else None for i, a in enumerate(active)]):
            rows = slice(first, last)
            for group, weight_decay in zip(groups, (s.weight_decays[first], 0.0)):
                if group:
                    fused_adam_step(s.rule, [self.parameters[n][rows] for n in group],
                                    [self.parameters[n].grad[rows] for n in group],
                                    [self.exp_avg[n][rows] for n in group], [self.exp_avg_sq[n][rows] for n in group],
                                    self.steps[first], learning_rates[first], s.betas[first], s.eps[first],
                                    weight_decay)

    def _factors(self, learning_rates) -> dict[str, torch.Tensor]:
        """Per-replica scalars (N,) computed in float64 as the single-run optimizers do, then float32."""
        s, rows = self.settings, []
        for i, lr in enumerate(learning_rates):
            beta1, beta2 = s.betas[i]
            t = max(self.steps[i], 1)
            correction1, correction2 = 1 - beta1 ** t, 1 - beta2 ** t
            if s.rule == "adamw":
                step_size = -(lr / correction1)
            else:
                step_size = lr * math.sqrt(correction2) / correction1  # as markovsim.optimizers.adam_update
            rows.append((1 - beta1, beta1, beta2, 1 - beta2, correction2 ** 0.5, s.eps[i], step_size,
                         1 - lr * s.weight_decays[i]))
        names = ("one_minus_beta1", "beta1", "beta2", "one_minus_beta2", "correction2_sqrt", "eps", "step_size",
                 "decay")
        table = host_to_device(torch.tensor(rows, dtype=torch.float64).to(torch.float32), self._device)  # (N, 8)
        return {name: table[:, k] for k, name in enumerate(names)}

    def _update(self, param, m, v, grad, f, decay: bool) -> None:
        """One in-place step of the rule on (N, D) blocks; ``f``: per-replica factors shaped (N, 1)."""
        if self.settings.rule == "adamw":
            if decay:
                param.mul_(f["decay"])
            m.lerp_(grad, f["one_minus_beta1"])
            v.mul_(f["beta2"]).addcmul_(grad * f["one_minus_beta2"], grad)
            denominator = v.sqrt().div_(f["correction2_sqrt"]).add_(f["eps"])
            param.addcdiv_(m * f["step_size"], denominator)
            return
        # addcmul_/addcdiv_ fuse a multiply and an add per element; the products and sums are the same
        # as the single run's m * b1 + g * (1 - b1), v * b2 + (g * (1 - b2)) * g, p - (m s) / (sqrt(v) + eps)
        m.mul_(f["beta1"]).addcmul_(grad, f["one_minus_beta1"])
        v.mul_(f["beta2"]).addcmul_(grad * f["one_minus_beta2"], grad)
        param.addcdiv_(m * f["step_size"], v.sqrt().add_(f["eps"]), value=-1)
        if decay:
            param.mul_(f["decay"])


def _runs_of_equal(keys: list) -> list[tuple[int, int]]:
    """Maximal ranges [first, last) of neighbouring equal keys, skipping None: [1, 1, None, 2] -> [(0, 2), (3, 4)]."""
    runs, first = [], None
    for i, key in enumerate([*keys, None]):
        if first is not None and key != keys[first]:
            runs.append((first, i))
            first = None
        if first is None and key is not None:
            first = i
    return runs
