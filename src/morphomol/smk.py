"""The only place the ``snakemake`` object is touched: ``scripts/*.py`` call :func:`run`.

Scripts stay one typed call each::

    from morphomol.smk import run
    from morphomol.tiling import tile_sample
    run(lambda smk: tile_sample(he=smk.input.he, ..., cfg=smk.params.tiling))

:func:`run` sets up the rule log (appended, with an attempt header, so a retried or resumed job
keeps the earlier attempt's lines), thread limits and the error policy: a
:class:`~morphomol.errors.MorphomolError` becomes one clear line in the log and exit code 1; a full
disk (ENOSPC) or a file over the size limit (EFBIG: ``ulimit -f``, the file system's maximum) becomes
one line naming the path; anything else keeps its traceback (a bug, not bad input).

When a job that had finished before fails, the message says that Snakemake removed the previous
outputs before rerunning it (they cannot be recovered from here; see the README on keeping results
across experiments) -- but only when Snakemake had a reason of its own to rerun it: every finished run
records a fingerprint of its parameters and inputs (names, sizes, mtimes, inodes) in the log history,
and the note is given only when that fingerprint changed. With the same parameters and inputs,
Snakemake reran the job because its outputs were missing (deleted by hand): nothing was removed.

No hub at run time: importing this module sets the offline environment and disables hub kernels in the
job's process (:mod:`morphomol.util.offline`; the Snakemake process sets the same environment for every
job in ``workflow/rules/common.smk``), unless ``MORPHOMOL_ALLOW_ONLINE=1`` was set on purpose.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from morphomol.util.offline import ALLOW_ONLINE, enforce_offline

#: whether this job runs offline (set before the job imports transformers / bitsandbytes / huggingface_hub)
OFFLINE = enforce_offline()

from morphomol.errors import MorphomolError  # noqa: E402
from morphomol.util.logs import ATTEMPT_HEADER, get_logger, history_path, setup_logging  # noqa: E402

#: what a finished job writes last in its log; a later attempt seeing it knows outputs existed
DONE_MARK = "done in"
#: the job fingerprint after DONE_MARK's line (params + inputs of the finished run)
FINGERPRINT = "job fingerprint"
_DONE_RE = re.compile(rf"morphomol\.rule: rule \S+ {DONE_MARK} ")
_FINGERPRINT_RE = re.compile(rf"{DONE_MARK} .*\[{FINGERPRINT} ([0-9a-z]+)\]")


def _previous_success(log_path: str | None) -> tuple[bool, str | None]:
    """Whether an earlier run of this job finished (its lines survive in the log's history: Snakemake
    deletes the declared log itself before each run), and the fingerprint of the last finished run
    (``None`` for a run logged before fingerprints were recorded)."""
    if not log_path:
        return False, None
    try:
        text = history_path(log_path).read_text(errors="replace")
    except OSError:
        return False, None
    if _DONE_RE.search(text) is None:  # the boundary's own line (not a progress line's "done in")
        return False, None
    prints = _FINGERPRINT_RE.findall(text)
    return True, (prints[-1] if prints else None)


def _stat_id(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, "missing"]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino]


def job_fingerprint(smk: Any) -> str:
    """A digest of what makes Snakemake rerun a job whose outputs exist: its parameters and its inputs
    (each input path's own size, mtime and inode: a rewritten file or a store replaced atomically
    changes it; the files inside a directory are not walked)."""
    from morphomol.util.hashing import digest

    def named(obj: Any) -> Any:
        try:
            return {"items": [[str(k), v] for k, v in obj.items()], "all": list(obj)}
        except Exception:
            return repr(obj)

    try:
        inputs = [str(p) for p in (getattr(smk, "input", None) or [])]
        return digest({"rule": str(getattr(smk, "rule", "")), "params": named(getattr(smk, "params", [])),
                       "inputs": [_stat_id(p) for p in inputs]})
    except Exception:  # pragma: no cover - never fail a job over its fingerprint; "unknown" keeps the note
        return "unknown"


def _free_space(path: str | None) -> str:
    probe = Path(path) if path else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown"
    return f"{free / 1e9:.2f} GB"


def _os_error(exc: BaseException, codes: tuple[int, ...]) -> OSError | None:
    """The first OSError with one of ``codes`` in an exception's cause/context chain (libraries such
    as zarr wrap it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in codes:
            return e
        e = e.__cause__ or e.__context__
    return None


def _enospc(exc: BaseException) -> OSError | None:
    """The ENOSPC error in an exception's cause/context chain."""
    return _os_error(exc, (errno.ENOSPC,))


def _file_size_limit() -> str:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, AttributeError, OSError, ValueError):  # pragma: no cover - no RLIMIT_FSIZE here
        return "unknown"
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 1e9:.3f} GB"


def write_failure_message(exc: BaseException, where_default: str | None = None) -> str | None:
    """One line for a write that failed for lack of space (ENOSPC) or over a file size limit (EFBIG),
    else ``None`` (shared by the rules' boundary and the CLI)."""
    err = _os_error(exc, (errno.ENOSPC, errno.EFBIG))
    if err is None:
        return None
    where = err.filename or where_default
    if err.errno == errno.ENOSPC:
        return (f"disk full while writing {where} (free space there: {_free_space(where)}); "
                "free some space and rerun (incomplete outputs were removed)")
    return (f"file too large while writing {where}: it exceeds the file size limit of this process "
            f"(ulimit -f: {_file_size_limit()}) or of the file system; raise the limit (ulimit -f unlimited, "
            "or the scheduler's file size limit) or write to another file system, and rerun "
            "(incomplete outputs were removed)")


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
    finished_before, previous_print = _previous_success(log_path)
    fingerprint = job_fingerprint(smk)
    # Snakemake removes existing outputs before rerunning a job for a change of its own (params,
    # inputs); with an unchanged fingerprint the rerun was for missing outputs: nothing was removed
    rerun = finished_before and previous_print != fingerprint
    setup_logging(log_path, header=f"rule {smk.rule}, attempt {attempt}")
    log = get_logger("rule")
    threads = int(getattr(smk, "threads", 1) or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    slurm = {k: v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS",
                                                        "SLURM_GPUS", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT")}
    log.info("rule %s wildcards=%s threads=%d attempt=%d %s", smk.rule, dict(smk.wildcards.items()), threads,
             attempt, slurm or "")
    if not OFFLINE:
        log.warning("%s=1: online access allowed (Hugging Face hub, hub kernels); jobs are offline without it",
                    ALLOW_ONLINE)
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
        message = write_failure_message(exc, (_outputs(smk) or [None])[0])
        if message is None:
            raise
        fail(message)
    log.info("rule %s %s %.1f s [%s %s]", smk.rule, DONE_MARK, time.perf_counter() - t0, FINGERPRINT, fingerprint)


__all__ = ["run", "ATTEMPT_HEADER"]
