"""The only place the ``snakemake`` object is touched: ``scripts/*.py`` call :func:`run`.

Scripts stay one typed call each::

    from morphomol.smk import run
    from morphomol.tiling import tile_sample
    run(lambda smk: tile_sample(he=smk.input.he, ..., cfg=smk.params.tiling))

:func:`run` sets up the rule log (appended, with an attempt header, so a retried or resumed job
keeps the earlier attempt's lines), thread limits and the error policy: a
:class:`~morphomol.errors.MorphomolError` becomes one clear line in the log and exit code 1; a full
disk becomes one line naming the path and the free space; anything else keeps its traceback (a bug,
not bad input). When a job fails after a rerun, the message says that Snakemake removed the
previous outputs before rerunning (they cannot be recovered from here; see the README on keeping
results across experiments).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from morphomol.errors import MorphomolError
from morphomol.util.logs import ATTEMPT_HEADER, get_logger, history_path, setup_logging

#: what a finished job writes last in its log; a later attempt seeing it knows outputs existed
DONE_MARK = "done in"


def _previous_success(log_path: str | None) -> bool:
    """Whether an earlier run of this job finished (its lines survive in the log's history: Snakemake
    deletes the declared log itself before each run)."""
    if not log_path:
        return False
    try:
        text = history_path(log_path).read_text(errors="replace")
    except OSError:
        return False
    return f"{DONE_MARK} " in text


def _free_space(path: str | None) -> str:
    probe = Path(path) if path else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown"
    return f"{free / 1e9:.2f} GB"


def _enospc(exc: BaseException) -> OSError | None:
    """The ENOSPC error in an exception's cause/context chain (libraries such as zarr wrap it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        e = e.__cause__ or e.__context__
    return None


def _outputs(smk: Any) -> list[str]:
    try:
        return [str(p) for p in smk.output]
    except Exception:  # pragma: no cover - defensive
        return []


def run(main: Callable[[Any], Any], smk: Any | None = None) -> None:
    if smk is None:
        smk = sys.modules["__main__"].__dict__.get("snakemake")
        if smk is None:  # pragma: no cover - only when misused
            raise RuntimeError("morphomol.smk.run must be called from a Snakemake script")
    log_path = smk.log[0] if len(smk.log) else None
    attempt = int(getattr(smk, "attempt", 1) or 1)
    rerun = _previous_success(log_path)
    setup_logging(log_path, header=f"rule {smk.rule}, attempt {attempt}")
    log = get_logger("rule")
    threads = int(getattr(smk, "threads", 1) or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    slurm = {k: v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS",
                                                        "SLURM_GPUS", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT")}
    log.info("rule %s wildcards=%s threads=%d attempt=%d %s", smk.rule, dict(smk.wildcards.items()), threads,
             attempt, slurm or "")
    t0 = time.perf_counter()

    def fail(message: str) -> None:
        if rerun:
            message += (" -- this job had finished before: Snakemake removed its previous outputs before rerunning "
                        "it, so they are gone (to keep results across config changes, run each variant as its "
                        "own cohort or results directory; see README 'Keeping results')")
        log.error("%s", message)
        sys.exit(1)

    try:
        main(smk)
    except MorphomolError as exc:
        fail(exc.message)
    except Exception as exc:
        full = _enospc(exc)
        if full is None:
            raise
        where = full.filename or (_outputs(smk) or [None])[0]
        fail(f"disk full while writing {where} (free space there: {_free_space(where)}); "
             "free some space and rerun (incomplete outputs were removed)")
    log.info("rule %s %s %.1f s", smk.rule, DONE_MARK, time.perf_counter() - t0)


__all__ = ["run", "ATTEMPT_HEADER"]
