"""Devices, precision and the ``accelerate`` state: where and how the transformer runs.

* ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``.
* ``mixed_precision``: ``"auto"`` (bf16 autocast on a CUDA device that supports it, else none),
  ``"bf16"`` (CUDA only) or ``"no"``. Parameters and optimizer state stay float32; only the
  forward pass is autocast, and log-softmax is computed in float32 (:mod:`llm.logps`).
* Data parallelism: launch with ``torchrun --nproc_per_node N`` (or ``accelerate launch``), which
  sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``; on CPU the backend is gloo.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from markovsim.runtime import DEVICES, resolve_device  # the one device rule, shared with the simulator

__all__ = ["DEVICES", "MIXED_PRECISIONS", "resolve_device", "use_bf16", "autocast", "make_accelerator",
           "is_distributed_launch", "end_distributed", "exit_with", "transformers_output", "host_to_device"]

MIXED_PRECISIONS = ("auto", "bf16", "no")


def use_bf16(device: str, mixed_precision: str) -> bool:
    """Whether to autocast to bf16: only on CUDA (ValueError for bf16 on CPU)."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}")
    device = resolve_device(device)
    if mixed_precision == "bf16" and device != "cuda":
        raise ValueError("mixed_precision='bf16' is supported on CUDA only; use 'no' (or 'auto') on CPU")
    if mixed_precision == "auto":
        return device == "cuda" and torch.cuda.is_bf16_supported()
    return mixed_precision == "bf16"


def autocast(device_type: str, bf16: bool):
    """``torch.autocast`` to bf16 on CUDA when ``bf16``, else a no-op context."""
    if bf16 and device_type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor.to(device)`` without a host sync on CUDA: through pinned memory, non-blocking.

    A copy from ordinary (pageable) host memory waits for the GPU's queue to drain; the replica loops
    copy small index and factor tables every step, and each such wait would stop the host from queueing
    the next kernels. On other devices this is ``tensor.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def end_distributed() -> None:
    """Destroy the default process group of a distributed launch, if there is one (else a no-op).

    Call it once a process's work is done: left to interpreter exit, Gloo's worker threads can abort the
    process ("terminate called without an active exception", pytorch/pytorch#190489).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_with(code: int) -> None:
    """``sys.exit(code)`` for a command line's ``main``: on success it first ends the process group
    (:func:`end_distributed`); after a failure it does not, since a failed rank may have left the others
    inside a collective, where no teardown handshake can complete."""
    if code == 0:
        end_distributed()
    sys.exit(code)


def is_distributed_launch() -> bool:
    """True when a launcher started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(device: str):
    """An ``accelerate.Accelerator`` for ``device`` (no accelerate-managed mixed precision: we autocast).

    In a single (non-launched) process the accelerate singletons are reset first, so successive
    runs in one Python process may use different devices.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = resolve_device(device)
    if not is_distributed_launch() and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    if device == "cpu" and is_distributed_launch():
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))
    return Accelerator(cpu=device == "cpu", mixed_precision="no")


@contextlib.contextmanager
def transformers_output(progress: bool):
    """Inside, ``transformers`` prints its own bars and notices only when ``progress``.

    With ``progress=False`` the "Loading weights" / "Writing model shards" bars are disabled and
    its log level raised to errors; both settings are restored on exit (also after an error).
    """
    if progress:
        yield
        return
    from transformers.utils import logging as transformers_logging

    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
