"""Atomic writes: build the new file or folder under a hidden temp name beside its target,
then `os.replace` it into place, so a reader finds the old target or the new one, never half
of one.

Nothing is fsynced: what is written this way (models, results, caches, reports) a rerun
rebuilds. The store's shards, which must survive a power cut, are written by storage/ with
its own fsyncing copy of this shape (storage/shards.py `replacing`): storage/ and alignment/
never import each other.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """A fresh path beside `target` (`.<name>.<hex>.tmp`, nothing there yet) for the block to
    write a file or build a folder at; when the block ends, it replaces `target` (a file in
    one rename; a folder, or anything replaced by a folder, is deleted first). If the block
    raises, it is deleted and `target` is left as it was; a process killed meanwhile leaves
    it behind, hidden.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if _is_folder(tmp) or _is_folder(target):  # os.replace swaps only file for file
            _remove(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; `path`."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_folder(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
