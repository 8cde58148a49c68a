"""Runtime settings for the simulator's many tiny tensor operations."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(num_threads: int = 1):
    """Temporarily set torch's intra-op thread count (restored on exit).

    The simulator's tensors are small (V = 10), so thread start-up dominates: one thread is
    often >100x faster per operation on a busy 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
