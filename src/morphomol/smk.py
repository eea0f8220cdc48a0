"""Adapter used by scripts/*.py: run a stage function with the `snakemake` object.

Scripts stay thin::

    from morphomol.smk import run
    from morphomol import tiling
    run(lambda smk: tiling.run_rule(smk.input, smk.output, smk.params, smk.wildcards))

A :class:`~morphomol.errors.MorphomolError` becomes one clear line in the rule log and a
non-zero exit; anything else keeps its traceback (it is a bug, not bad input).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from morphomol.errors import MorphomolError
from morphomol.logs import get_logger, setup_logging


def run(main: Callable[[Any], Any], smk: Any | None = None) -> None:
    if smk is None:
        smk = sys.modules["__main__"].__dict__.get("snakemake")
        if smk is None:  # pragma: no cover - only when misused
            raise RuntimeError("morphomol.smk.run must be called from a Snakemake script")
    log_path = smk.log[0] if len(smk.log) else None
    setup_logging(log_path)
    log = get_logger("rule")
    threads = int(getattr(smk, "threads", 1) or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    slurm = {k: v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS", "SLURM_GPUS", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT")}
    log.info("rule %s wildcards=%s threads=%d %s", smk.rule, dict(smk.wildcards.items()), threads, slurm or "")
    t0 = time.perf_counter()
    try:
        main(smk)
    except MorphomolError as exc:
        log.error("%s", exc.message)
        sys.exit(1)
    log.info("rule %s done in %.1f s", smk.rule, time.perf_counter() - t0)
