"""Job sizes for Snakemake resource functions (no torch): how much a job reads, in MB, and the memory /
runtime request that follows from it.

A heavy rule's ``mem_mb`` is ``base + per_mb × (MB of the inputs that its memory grows with)``, times the
attempt (a job retried after an out-of-memory kill asks for more), rounded up to 100 MB: the request fits the
job's own unit of work instead of a flat constant. Directories (zarr stores) count every file below them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path


def path_size_mb(paths: str | Path | Iterable[str | Path]) -> float:
    """Total size in MB of files and directory trees (missing paths count 0)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    total = 0
    for p in paths:
        p = Path(p)
        try:
            if p.is_dir():
                stack = [str(p)]
                while stack:
                    with os.scandir(stack.pop()) as it:
                        for e in it:
                            if e.is_dir(follow_symlinks=False):
                                stack.append(e.path)
                            elif e.is_file(follow_symlinks=False):
                                total += e.stat(follow_symlinks=False).st_size
            elif p.exists():
                total += p.stat().st_size
        except OSError:
            continue
    return total / 1e6


def sized_mb(base_mb: float, per_mb: float = 0.0, size_mb: float = 0.0, *, per_unit_mb: float = 0.0,
             units: float = 0.0, attempt: int = 1, cap_mb: float | None = None) -> int:
    """``(base + per_mb·size + per_unit·units) × attempt``, rounded up to 100 MB (``cap_mb``: at most)."""
    mb = (float(base_mb) + float(per_mb) * float(size_mb) + float(per_unit_mb) * float(units)) * max(1, int(attempt))
    if cap_mb is not None:
        mb = min(mb, float(cap_mb) * max(1, int(attempt)))
    return int(math.ceil(mb / 100.0) * 100)


def sized_runtime(base_min: float, per_mb_min: float = 0.0, size_mb: float = 0.0, *, per_unit_min: float = 0.0,
                  units: float = 0.0, attempt: int = 1) -> int:
    """Minutes: ``(base + per_mb·size + per_unit·units) × attempt``, rounded up."""
    return int(math.ceil((float(base_min) + float(per_mb_min) * float(size_mb) + float(per_unit_min) * float(units))
                         * max(1, int(attempt))))
