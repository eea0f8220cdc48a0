"""Stages measured by ``benchmarks/bench_scale.py`` (issue 22): one module per area.

Each module defines ``STAGES``: a list of :class:`Stage`. A stage is one heavy job of the workflow,
called through the same library function its rule's script calls, on inputs written with the project's
own writers at a size ``n`` (the unit the job's memory could grow with: slides, tiles, cells, spots).

``prepare(n, workdir) -> dict`` writes the inputs (run in its own process: its memory is not measured) and
returns the keyword arguments ``run`` needs (JSON-able). ``run(kwargs, workdir)`` is the job itself (run in a
fresh process; its peak RSS and wall time are the figures). ``seed_n`` is the seeds' scale the figures are
extrapolated to.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    unit: str                                   # what n counts ("slides", "tiles", "cells", "spots")
    quick: tuple[int, ...]                      # sizes of --quick
    full: tuple[int, ...]                       # sizes of a full run
    seed_n: int                                 # the seeds' scale (extrapolation target)
    prepare: Callable[[int, Path], dict[str, Any]]
    run: Callable[[dict[str, Any], Path], Any]
    note: str = ""                              # fixed dimensions of the inputs, what the job does
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def all_stages() -> dict[str, Stage]:
    """Every stage of every module of this package, by name."""
    out: dict[str, Stage] = {}
    for m in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{m.name}")
        for s in getattr(mod, "STAGES", []):
            if s.name in out:
                raise ValueError(f"stage {s.name} defined twice")
            out[s.name] = s
    return out
