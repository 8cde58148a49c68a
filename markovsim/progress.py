"""Progress display: a tqdm bar on a terminal, plain occasional lines when output goes to a file or pipe.

tqdm redraws its bar with carriage returns, which fills a log file with hundreds of partial lines;
when stderr is not a terminal :class:`PlainProgress` prints one line per ~10% of the run instead
(and the last step), e.g. ``unlearn npo: step 20/50 loss=1.2345``. The one implementation for the
simulator (``markovsim.dynamics``, sweeps), ``llm`` (``llm.progress`` re-exports it) and
``paper_figures``.
"""

from __future__ import annotations

import sys

__all__ = ["PlainProgress", "progress_bar", "progress_iter"]


class PlainProgress:
    """The part of tqdm's interface the training loops use, printing plain lines to ``stream``.

    Args:
        total: the number of steps.  initial: steps already done (a resumed run).
        description: the line prefix.  stream: where lines go (default ``sys.stderr``).
        lines: about how many lines a whole run prints.  unit: what is counted (``step 20/50``).
    """

    def __init__(self, total: int, initial: int, description: str, stream=None, lines: int = 10,
                 unit: str = "step"):
        self.total, self.count, self.description, self.unit = total, initial, description, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, total // max(1, lines))
        self.postfix = ""

    def update(self, steps: int = 1) -> None:
        """Count ``steps`` more; print a line every ``every`` steps and at the end."""
        self.count += steps
        if self.count % self.every == 0 or self.count >= self.total:
            suffix = f" {self.postfix}" if self.postfix else ""
            print(f"{self.description}: {self.unit} {self.count}/{self.total}{suffix}", file=self.stream, flush=True)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        """Values shown after the step count (``loss=...``), as tqdm's ``set_postfix``."""
        self.postfix = " ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        """Nothing to clean up (tqdm compatibility)."""


class _Silent:
    """A disabled progress display."""

    def update(self, steps: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = True, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int = 0, description: str = "", enabled: bool = True, stream=None,
                 unit: str = "step"):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, :class:`PlainProgress` lines otherwise.

    Nothing at all is printed when not ``enabled``. The result has ``update``, ``set_postfix`` and
    ``close``.
    """
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return PlainProgress(total, initial, description, stream, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True, file=stream)


def progress_iter(iterable, total: int, description: str, enabled: bool = True, stream=None, unit: str = "step"):
    """Yield ``iterable``'s items, counting each on a :func:`progress_bar` (tqdm's ``tqdm(iterable)``)."""
    bar = progress_bar(total, 0, description, enabled, stream, unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
