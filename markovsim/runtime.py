"""Runtime: the torch thread count for the simulator's many tiny tensor operations, and device resolution."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(num_threads: int | None = 1):
    """Temporarily set torch's intra-op thread count (restored on exit); ``None`` leaves it as it is.

    The simulator's tensors are small (V = 10), so thread start-up dominates: one thread is
    often >100x faster per operation on a busy 2-core machine.
    """
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """The device to run on: ``"cpu"`` or ``"cuda"`` for a requested ``"auto"``, ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks CUDA when torch sees a GPU. ValueError for any other name, and for ``"cuda"``
    without a GPU (so a run never silently falls back to the CPU). The one implementation for
    ``markovsim`` and ``llm``.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return device
