"""A command's output folder is left as it was found when the command fails.

:func:`restored_on_failure` wraps everything a command writes into its ``--out`` folder. When the
block raises (any exception, Ctrl-C included) the folder is put back: removed if the block created it
(with the parent folders made for it); otherwise every entry the block added is removed and every file
it replaced or deleted is put back from hard links taken on entry (a copy where hard links fail). The
run's files are all written by atomic rename (``metrics.jsonl`` is rewritten that way when a run
starts), so the links hold the old contents.

One exception: a block that saved a new checkpoint (``checkpoints/step-*``) keeps the folder as it is,
since ``--resume`` continues from it (a long run that fails late keeps its progress).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile

from markovsim.results import missing_folders, remove_empty_folders

from .checkpoint import latest_checkpoint

__all__ = ["restored_on_failure"]


@contextlib.contextmanager
def restored_on_failure(path: str | os.PathLike, enabled: bool = True):
    """Run the block; if it raises, put the folder ``path`` back as it was on entry (see the module docstring).

    Args:
        path: the output folder (absent or a folder; anything else is left to the block to refuse).
        enabled: False = do nothing (processes other than the main one of a distributed run).
    """
    path = os.path.abspath(path)
    if not enabled or (os.path.lexists(path) and not os.path.isdir(path)):
        yield
        return
    created, entries, backup = missing_folders(path), {}, None
    if not created:
        entries = _entries(path)
        backup = _backup(path, entries)
    checkpoint = latest_checkpoint(path)
    try:
        yield
    except BaseException:
        if latest_checkpoint(path) == checkpoint:
            with contextlib.suppress(OSError):
                _restore(path, created, entries, backup)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _entries(path: str) -> dict[str, tuple[bool, int]]:
    """``{relative path: (is a folder, inode)}`` of everything below ``path`` (links not followed)."""
    entries = {}
    for root, folders, files in os.walk(path):
        for name in folders + files:
            full = os.path.join(root, name)
            info = os.lstat(full)
            entries[os.path.relpath(full, path)] = (stat.S_ISDIR(info.st_mode), info.st_ino)
    return entries


def _backup(path: str, entries: dict[str, tuple[bool, int]]) -> str | None:
    """A hidden sibling folder holding a hard link (or copy) of every file of ``entries``; None if the parent
    folder is not writable (then only the entries the block adds are undone)."""
    try:
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.before-", dir=os.path.dirname(path))
    except OSError:
        return None
    for relative, (is_folder, _) in entries.items():
        source, target = os.path.join(path, relative), os.path.join(backup, relative)
        if is_folder:
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(source, target, follow_symlinks=False)
    return backup


def _restore(path: str, created: list[str], entries: dict[str, tuple[bool, int]], backup: str | None) -> None:
    """Undo the block's changes to ``path`` (see :func:`restored_on_failure`)."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        remove_empty_folders(created[1:])
        return
    for root, folders, files in os.walk(path, topdown=False):
        for name in files + folders:
            full = os.path.join(root, name)
            info = os.lstat(full)
            is_folder = stat.S_ISDIR(info.st_mode)
            before = entries.get(os.path.relpath(full, path))
            if before is None or before[0] != is_folder or (not is_folder and before[1] != info.st_ino):
                shutil.rmtree(full) if is_folder else os.remove(full)
    if backup is None:
        return
    for relative, (is_folder, _) in sorted(entries.items()):  # parents before their contents
        target = os.path.join(path, relative)
        if is_folder:
            os.makedirs(target, exist_ok=True)
        elif not os.path.lexists(target):
            os.replace(os.path.join(backup, relative), target)
