"""Write-then-rename helpers so that no half-written output is ever left behind.

:func:`atomic_path` yields a hidden temporary sibling (``.NAME.tmp-XXXXXXXX``) and moves it onto
the target only when the block succeeds. A process killed with SIGKILL cannot clean up after
itself, so every new write first removes the stale temporaries of *its own* target (same name
pattern, same directory) that an earlier, killed attempt left behind.

Permissions: some writers create private files (safetensors writes ``0600``, ``tempfile.mkstemp`` /
``mkdtemp`` ``0600`` / ``0700``). Before the rename every file and directory of the temporary output
gets at least the permissions a plain ``open()`` / ``mkdir()`` would give under the process umask
(``0644`` / ``0755`` with umask ``022``): outputs are readable by whoever may read the other outputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
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


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: set and restore (not thread-safe, only where /proc is missing)
    os.umask(mask)
    return mask


def _widen(p: str | Path, st_mode: int, wanted: int, executable: int | None = None) -> None:
    mode = stat.S_IMODE(st_mode)
    if executable is not None and mode & stat.S_IXUSR:  # an executable file: what a created one would get
        wanted = executable
    if mode & wanted != wanted:
        os.chmod(p, mode | wanted)


def normalise_permissions(path: str | Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the permissions of a normally
    created output: files at least ``0666 & ~umask``, directories at least ``0777 & ~umask``.

    Bits are only added (an executable file gets ``0777 & ~umask``); symlinks are left alone.
    """
    path = Path(path)
    mask = current_umask()
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return
    if not stat.S_ISDIR(st.st_mode):
        _widen(path, st.st_mode, files, dirs)
        return
    _widen(path, st.st_mode, dirs)
    for root, dirnames, filenames in os.walk(path):
        for name in dirnames:
            q = os.path.join(root, name)
            s = os.lstat(q)
            if stat.S_ISDIR(s.st_mode):
                _widen(q, s.st_mode, dirs)
        for name in filenames:
            q = os.path.join(root, name)
            s = os.lstat(q)
            if stat.S_ISREG(s.st_mode):
                _widen(q, s.st_mode, files, dirs)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and directories (zarr stores). On any exception the temporary output is
    removed and ``path`` is left untouched. Stale temporaries of ``path`` from a killed earlier
    attempt are removed first. The output gets the permissions of a normally created file
    (:func:`normalise_permissions`).
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
    try:
        if tmp.exists() or tmp.is_symlink():
            normalise_permissions(tmp)
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
