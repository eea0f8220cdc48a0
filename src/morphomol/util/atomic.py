"""Write-then-rename helpers so that no half-written output is ever left behind.

:func:`atomic_path` yields a hidden temporary sibling (``.NAME.tmp-XXXXXXXX``) and moves it onto
the target only when the block succeeds. A process killed with SIGKILL cannot clean up after
itself, so every new write first removes the stale temporaries of *its own* target (same name
pattern, same directory) that an earlier, killed attempt left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from morphomol.util.logs import get_logger

log = get_logger("atomic")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _stale_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-[0-9a-f]{{8}}$")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``path`` left by a killed writer.

    Only names of exactly this pattern for exactly this target are touched. Returns what was removed.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pat = _stale_pattern(path)
    removed = []
    for entry in parent.iterdir():
        if pat.match(entry.name):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.warning("removed %d stale temporary output(s) of %s left by an interrupted run: %s", len(removed), path,
                    ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and directories (zarr stores). On any exception the temporary output is
    removed and ``path`` is left untouched. Stale temporaries of ``path`` from a killed earlier
    attempt are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        if not overwrite:
            _remove(tmp)
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, path)
