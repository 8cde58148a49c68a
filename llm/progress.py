"""Progress display: a tqdm bar on a terminal, plain occasional lines when output goes to a file or pipe.

tqdm redraws its bar with carriage returns, which fills a log file with hundreds of partial lines;
when stderr is not a terminal :class:`PlainProgress` prints one line per ~10% of the run instead
(and the last step), e.g. ``unlearn npo: step 20/50 loss=1.2345``.
"""

from __future__ import annotations

import sys

__all__ = ["PlainProgress", "progress_bar"]


class PlainProgress:
    """The part of tqdm's interface the training loops use, printing plain lines to ``stream``.

    Args:
        total: the number of steps.  initial: steps already done (a resumed run).
        description: the line prefix.  stream: where lines go (default ``sys.stderr``).
        lines: about how many lines a whole run prints.
    """

    def __init__(self, total: int, initial: int, description: str, stream=None, lines: int = 10):
        self.total, self.count, self.description = total, initial, description
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, total // max(1, lines))
        self.postfix = ""

    def update(self, steps: int = 1) -> None:
        """Count ``steps`` more; print a line every ``every`` steps and at the end."""
        self.count += steps
        if self.count % self.every == 0 or self.count >= self.total:
            suffix = f" {self.postfix}" if self.postfix else ""
            print(f"{self.description}: step {self.count}/{self.total}{suffix}", file=self.stream, flush=True)

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


def progress_bar(total: int, initial: int, description: str, enabled: bool, stream=None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, :class:`PlainProgress` lines otherwise.

    Nothing at all is printed when not ``enabled``.
    """
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return PlainProgress(total, initial, description, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True, file=stream)
