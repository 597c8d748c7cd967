"""Atomic directory writes: a checkpoint directory is complete or absent, never half written.

:func:`atomic_directory` yields a temporary sibling directory to write into; on a clean exit
every file in it is fsynced, the directory is renamed onto the target in one ``rename`` (the
only atomic publish a POSIX file system offers for a directory) and the parent directory is
fsynced so the rename itself survives a power loss. On an exception (or Ctrl-C) the temporary
directory is removed and the target is left as it was::

    with hsd.checkpoint.atomic_directory("out/checkpoint-100") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    # out/checkpoint-100 now exists, complete

Readers never see a partial checkpoint because temporary directories carry a prefix
(``TEMP_PREFIX``) that :func:`is_temporary` recognises and that does not match
``checkpoint-*`` globbing (the HF Trainer's resume discovery). Leftovers of a killed process
(``kill -9``, power loss) are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_directory", "fsync_tree", "is_temporary", "remove_stale_temporaries", "TEMP_PREFIX"]

logger = logging.getLogger("hsd")

TEMP_PREFIX = ".tmp-"


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an unfinished :func:`atomic_directory` write."""
    return Path(path).name.startswith(TEMP_PREFIX)


def _fsync_path(path: Path, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems without fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file under ``root``, then every directory bottom-up (``root`` last)."""
    root = Path(root)
    directories = []
    for current, dirs, files in os.walk(root):
        directories.append(Path(current))
        for name in files:
            path = Path(current) / name
            if path.is_file() and not path.is_symlink():
                _fsync_path(path, directory=False)
    for directory in reversed(directories):
        _fsync_path(directory, directory=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yields a temporary sibling, published to ``path`` on success.

    Args:
        path: the final directory. Its parent is created if needed.
        overwrite: replace an existing ``path`` (the old one is moved aside, the new one renamed
            in, then the old one deleted: at every instant ``path`` is either the old complete
            directory or the new complete one, except for the instant between two renames when
            it is absent). Without it an existing ``path`` raises :class:`FileExistsError`
            before anything is written.

    The temporary directory is removed on any exception, including ``KeyboardInterrupt``.
    """
    target = Path(path)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    tmp = parent / f"{TEMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            if not overwrite:  # someone else published it while we were writing
                raise FileExistsError(f"{target} appeared while it was being written")
            old = parent / f"{TEMP_PREFIX}{target.name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_path(parent, directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete unfinished :func:`atomic_directory` writes left in ``directory`` by a killed process.

    Call it once at start-up, before any writer of this process runs (another live writer's
    temporary directory would be deleted too). Returns the removed paths.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for child in directory.iterdir():
        if child.is_dir() and is_temporary(child):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
            logger.warning("removed an unfinished checkpoint write %s", child)
    return removed
