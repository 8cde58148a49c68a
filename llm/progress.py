"""Progress display: :mod:`markovsim.progress` (one implementation for the simulator and ``llm``), re-exported."""

from markovsim.progress import PlainProgress, progress_bar, progress_iter

__all__ = ["PlainProgress", "progress_bar", "progress_iter"]
