"""Content hashes: the one implementation of file, directory and object digests.

* :func:`sha256_path` — sha256 of a file, or of a directory's regular files (relative names +
  contents, sorted; hidden files skipped). Used for weight checksums and run metadata.
* :func:`digest` — short sha256 of a JSON-serialisable object (fingerprints).
* :func:`ids_digest` — short sha256 of a sequence of ids (order matters).
* :func:`stat_digest` — short digest of a path's file list, sizes and modification times: cheap
  enough for multi-GB stores, and changes whenever a file is rewritten (resume fingerprints).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_BLOCK = 1 << 22


def _update_file(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)


def sha256_path(path: str | Path) -> str:
    """Hex sha256 of a file, or of a directory tree (relative path + NUL + contents per file, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(str(f.relative_to(p)).encode())
            h.update(b"\0")
            _update_file(h, f)
    else:
        _update_file(h, p)
    return h.hexdigest()


# The historical name of the file checksum (a file is a path).
sha256_file = sha256_path


def digest(obj: Any, length: int = 16) -> str:
    """Short hex sha256 of the canonical JSON of ``obj`` (dataclasses as dicts, keys sorted)."""
    from morphomol.util.jsonio import json_safe

    return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True, default=str).encode()).hexdigest()[:length]


def ids_digest(ids: Iterable[Any], length: int = 16) -> str:
    """Short hex sha256 of a sequence of ids (each as ``str`` + NUL; order matters)."""
    h = hashlib.sha256()
    for t in ids:
        h.update(str(t).encode() + b"\0")
    return h.hexdigest()[:length]


def stat_digest(path: str | Path, length: int = 16) -> str:
    """Short digest of (relative name, size, mtime_ns) of a file or every file under a directory.

    Not a content hash: it changes whenever a file is rewritten, even with identical bytes. That is
    what a resume check needs (resume only onto the very inputs the interrupted run read) at the
    cost of a ``stat`` per file instead of reading gigabytes. A missing path digests as ``missing``.
    """
    p = Path(path)
    h = hashlib.sha256()
    if not p.exists():
        h.update(b"missing:" + str(p).encode())
        return h.hexdigest()[:length]
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        st = os.stat(f)
        rel = str(f.relative_to(p)) if p.is_dir() else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:length]
