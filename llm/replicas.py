"""N replicas of one architecture as one computation: stacked parameters and a stacked AdamW.

A :class:`ReplicaStack` holds the parameters of N models that share an architecture (different
seeds, starting points, learning rates, objectives...) as stacked leaf tensors::

    parameters[name]: (N, *shape of the parameter in one model)

and computes every replica's logits on its own batch in one call (:meth:`ReplicaStack.logits`).
Gradients come from ordinary autograd on the sum of the replicas' losses: the replicas share no
computation, so ``d(sum_i loss_i) / d parameters[name][i] = d loss_i / d theta_i`` exactly.

Three routes (:attr:`ReplicaStack.route`):

* ``"stacked"`` (the default for ``PaperSyntheticForCausalLM``): the model's forward pass written
  once for stacked parameters (``llm.paper_synthetic.stacked_logits``): every ``Linear`` one
  ``baddbmm`` over the replica axis with the stacked bias fused in, and a hand-written backward whose
  weight gradients come out in the parameters' own layout. Same values as ``"vmap"`` (tested); on a
  2-core CPU ~20% faster for 16 replicas (vmap turns ``nn.Linear`` into ``bmm`` + a separate bias
  add and its weight gradients need a transposed copy).
* ``"vmap"``: ``torch.func.vmap`` of ``functional_call`` over the stacked parameters, for
  architectures whose forward pass has no data-dependent Python control flow. Our own
  ``PaperSyntheticForCausalLM`` (presets ``paper-synthetic``, ``tiny-synthetic``) is such a model:
  vmap runs its unmodified forward (tested equal to N separate forwards). Batches of different
  widths are right-padded to a common width (padding is masked and causal attention never looks
  ahead, so the real positions' logits are unchanged) and trimmed back afterwards.
* ``"loop"``: an honest sequential loop of ``functional_call`` per replica on views of the same
  stacked parameters, for Hugging Face models that vmap cannot trace (GPT-2's attention-mask
  handling has data-dependent control flow). Same API, same optimizer; no speed-up.

:class:`StackedAdamW` (``llm.replica_adam``) updates the stacked parameters with per-replica
Adam settings.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from .data import IGNORE_INDEX
from .paper_synthetic import PaperSyntheticForCausalLM, stacked_logits
from .replica_adam import ADAM_BLOCK, StackedAdamSettings, StackedAdamW

__all__ = ["ADAM_BLOCK", "ROUTES", "STACKED_ARCHITECTURES", "VMAP_ARCHITECTURES", "ReplicaStack", "StackedAdamW",
           "StackedAdamSettings",
           "clip_replica_grads", "replica_grad_norms"]

ROUTES = ("stacked", "vmap", "loop")
# Architectures with a hand-written forward pass on stacked parameters (route "stacked").
STACKED_ARCHITECTURES = (PaperSyntheticForCausalLM,)
# Architectures whose forward pass vmap can trace (no data-dependent Python control flow).
VMAP_ARCHITECTURES = (PaperSyntheticForCausalLM,)
_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}


def _architecture(model) -> tuple:
    """What two models must share to be stacked: class, config and parameter names/shapes/dtypes."""
    config = model.config.to_dict() if hasattr(model, "config") else None
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    shapes = tuple((name, tuple(p.shape), p.dtype) for name, p in model.named_parameters())
    return type(model), repr(config), shapes


def _default_route(model) -> str:
    if isinstance(model, STACKED_ARCHITECTURES):
        return "stacked"
    return "vmap" if isinstance(model, VMAP_ARCHITECTURES) else "loop"


class ReplicaStack:
    """The parameters of N same-architecture models, stacked, and their logits in one call.

    Args:
        models: N >= 1 causal LMs of one architecture (same class, config and parameter shapes).
            They are not modified; :meth:`write_into` copies a replica back into a model.
        route: ``"stacked"``, ``"vmap"`` or ``"loop"``; None = ``"stacked"`` for ``STACKED_ARCHITECTURES``,
            else ``"vmap"`` for ``VMAP_ARCHITECTURES``, else ``"loop"``.
        device: where the stacked tensors live (default: the first model's device).
    Attributes:
        parameters: ``{name: (N, *shape)}`` float leaf tensors with ``requires_grad``.
        buffers: ``{name: (N, *shape)}`` stacked buffers.
        route: the route used.
    """

    def __init__(self, models, route: str | None = None, device: torch.device | str | None = None):
        models = list(models)
        if len(models) < 1:
            raise ValueError("a ReplicaStack needs at least one model (N >= 1)")
        reference = _architecture(models[0])
        for index, model in enumerate(models[1:], start=1):
            if _architecture(model) != reference:
                raise ValueError(f"model {index} has a different architecture from model 0 (class, config or "
                                 f"parameter shapes differ); replicas must share one architecture")
        route = _default_route(models[0]) if route is None else route
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
        for name, supported in (("stacked", STACKED_ARCHITECTURES), ("vmap", VMAP_ARCHITECTURES)):
            if route == name and not isinstance(models[0], supported):
                raise ValueError(f"the {name} route supports {[c.__name__ for c in supported]}, not "
                                 f"{type(models[0]).__name__}; use route='loop'")
        self.route, self.num_replicas = route, len(models)
        self.device = torch.device(device) if device is not None else next(models[0].parameters()).device
        parameters, buffers = stack_module_state([m.to(self.device) for m in models])
        self.parameters = {k: v.detach().clone().requires_grad_(True) for k, v in parameters.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self._skeleton = copy.deepcopy(models[0]).to("meta") if route != "loop" else copy.deepcopy(models[0])
        self._skeleton.train(models[0].training)
        # fixed data the replicas' evaluation reads every step, kept on the device for the stack's life
        # (``llm.replica_stacked_evaluation``)
        self.device_data: dict = {}

    def replica_parameters(self, index: int) -> dict[str, torch.Tensor]:
        """Views ``{name: (*shape)}`` of replica ``index`` (gradients flow into the stacked tensors)."""
        return {name: value[index] for name, value in self.parameters.items()}

    def write_into(self, model, index: int) -> None:
        """Copy replica ``index``'s parameters and buffers into ``model`` (same architecture)."""
        state = {name: value[index].detach() for name, value in {**self.parameters, **self.buffers}.items()}
        with torch.no_grad():
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if name in state:
                    tensor.copy_(state[name])

    @contextlib.contextmanager
    def eval_mode(self):
        """Within the block, :meth:`logits` runs the model in eval mode (as ``llm.evaluate.predict``)."""
        was_training = self._skeleton.training
        self._skeleton.eval()
        try:
            yield self
        finally:
            self._skeleton.train(was_training)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"parameters": {name: (N, ...)}, "buffers": {...}}``, detached CPU copies (for checkpoints)."""
        return {"parameters": {k: v.detach().cpu().clone() for k, v in self.parameters.items()},
                "buffers": {k: v.detach().cpu().clone() for k, v in self.buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Copy what :meth:`state_dict` returned into the stacked tensors (same names and shapes)."""
        for kind, tensors in (("parameters", self.parameters), ("buffers", self.buffers)):
            saved = state[kind]
            if set(saved) != set(tensors) or any(saved[k].shape != v.shape for k, v in tensors.items()):
                raise ValueError(f"stacked {kind} of the checkpoint do not match this stack's names and shapes "
                                 f"(another architecture or number of replicas)")
            for name, tensor in tensors.items():
                tensor.copy_(saved[name])

    def zero_grad(self) -> None:
        for value in self.parameters.values():
            value.grad = None

    def logits(self, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Every replica's logits on its own batch.

        Args:
            batches: N dicts ``{input_ids, attention_mask, ...}`` of (b_i, t_i) int64 tensors (the stacked
                and vmap routes pad them to a common (b, t) and trim the logits back).
        Returns: N tensors (b_i, t_i, vocab), differentiable with respect to :attr:`parameters`.
        """
        if len(batches) != self.num_replicas:
            raise ValueError(f"expected {self.num_replicas} batches (one per replica), got {len(batches)}")
        if self.route == "loop":
            return [self._replica_logits(self.replica_parameters(i), self._buffers(i), batch)
                    for i, batch in enumerate(batches)]
        shapes = [tuple(batch["input_ids"].shape) for batch in batches]  # (b_i, t_i)
        rows, width = max(b for b, _ in shapes), max(t for _, t in shapes)
        input_ids, attention_mask = _stack_padded(batches, rows, width)  # (N, b, t) each
        logits = self.stacked_batch_logits(input_ids, attention_mask)  # (N, b, t, vocab)
        return [logits[i, :b, :t] for i, (b, t) in enumerate(shapes)]

    def stacked_batch_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every replica's logits on its row of already stacked batches (the stacked and vmap routes).

        Args: input_ids, attention_mask: (N, b, t) int64 on :attr:`device`, replica i's batch in row i.
        Returns: (N, b, t, vocab), differentiable with respect to :attr:`parameters`.
        """
        if self.route == "loop":
            raise ValueError("stacked_batch_logits needs the stacked or vmap route; use logits() for route='loop'")
        # the one call that makes the replicas one computation: batched matmuls over the replica axis
        if self.route == "stacked":
            return stacked_logits(self._skeleton.config, self.parameters, input_ids, attention_mask)
        return vmap(self._replica_logits_from_tensors)(self.parameters, self.buffers, input_ids, attention_mask)

    def _buffers(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in self.buffers.items()}

    def _replica_logits(self, parameters, buffers, batch) -> torch.Tensor:
        return self._replica_logits_from_tensors(parameters, buffers, batch["input_ids"], batch["attention_mask"])

    def _replica_logits_from_tensors(self, parameters, buffers, input_ids, attention_mask) -> torch.Tensor:
        output = functional_call(self._skeleton, (parameters, buffers), (),
                                 {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False})
        return output.logits if hasattr(output, "logits") else output["logits"]


def _stack_padded(batches: list[dict[str, torch.Tensor]], rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, rows, width) input_ids and attention_mask: each batch padded at the bottom and on the right
    with its own pad id (its BOS, ``llm.data``) and attention 0.

    Padding changes no real position's logits: rows are independent, attention is causal and padded
    keys are masked (a padded query still sees itself, so no softmax row is empty).
    """
    input_ids, attention_mask = [], []
    for batch in batches:
        missing_rows, missing_width = rows - batch["input_ids"].shape[0], width - batch["input_ids"].shape[1]
        pad = int(batch["input_ids"][0, 0])
        input_ids.append(torch.nn.functional.pad(batch["input_ids"], (0, missing_width, 0, missing_rows), value=pad))
        attention_mask.append(torch.nn.functional.pad(batch["attention_mask"], (0, missing_width, 0, missing_rows)))
    return torch.stack(input_ids), torch.stack(attention_mask)


def replica_grad_norms(parameters: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) float32 global gradient norm of each replica, as ``torch.nn.utils.clip_grad_norm_`` computes it.

    Per parameter the 2-norm of its (N, ...) gradient over all but the replica axis, then the 2-norm
    over parameters. Missing gradients count as zero.
    """
    norms = [torch.linalg.vector_norm(p.grad.flatten(1), 2, dim=1) for p in parameters.values() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), 2, dim=1)  # (N,)


def clip_replica_grads(parameters: dict[str, torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip each replica's gradient to ``max_norm`` (None = no clipping) like ``clip_grad_norm_``; return (N,) norms.

    coefficient_i = min(1, max_norm / (norm_i + 1e-6)), gradients of replica i multiplied by it.
    """
    norms = replica_grad_norms(parameters)  # (N,)
    if max_norm is not None:
        coefficients = torch.clamp(max_norm / (norms + 1e-6), max=1.0)  # (N,)
        for value in parameters.values():
            if value.grad is not None:
                value.grad.mul_(coefficients.view(-1, *([1] * (value.ndim - 1))))
    return norms
