"""Logging set-up shared by the library, the CLI and the Snakemake adapters.

Rule logs keep every attempt: a retried, resumed or rerun job adds its lines under an attempt
header instead of losing what the earlier attempt wrote (the preempted attempt's log is often the
one that explains a failure). Snakemake deletes a job's declared log before each run, so the lines
are also appended to a hidden sibling ``.NAME.history`` that Snakemake does not manage; a new attempt
starts its log with that history (capped to the last :data:`HISTORY_BYTES`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ATTEMPT_HEADER = "===== {what} started {when} ====="
#: how much of the earlier attempts' lines a rule log carries over
HISTORY_BYTES = 1_000_000


def history_path(log_path: str | Path) -> Path:
    """The hidden sibling keeping the lines of every attempt of a rule log."""
    p = Path(log_path)
    return p.with_name(f".{p.name}.history")


def _carry_over(path: Path, history: Path) -> None:
    """Start ``path`` with the earlier attempts' lines (``history``, tail-capped) when Snakemake
    removed it; the history itself is trimmed to the same cap."""
    try:
        with open(history, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - HISTORY_BYTES))
            old = fh.read()
    except OSError:
        return
    if size > HISTORY_BYTES:
        old = old[old.find(b"\n") + 1:]
        history.write_bytes(old)
    if not path.exists() or path.stat().st_size == 0:
        path.write_bytes(old)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"morphomol.{name}" if not name.startswith("morphomol") else name)


def setup_logging(log_path: str | Path | None = None, level: int = logging.INFO, *, header: str | None = None) -> None:
    """Send morphomol log lines to stderr and, if given, append them to ``log_path``.

    ``header`` (e.g. ``"rule tile, attempt 2"``) is written first as a separator line.
    """
    root = logging.getLogger("morphomol")
    root.setLevel(level)
    for h in root.handlers:
        h.close()
    root.handlers.clear()
    fmt = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        files, history = [path], history_path(path)
        if header:  # a rule log: keep every attempt (see the module docstring)
            _carry_over(path, history)
            files.append(history)
            line = ATTEMPT_HEADER.format(what=header, when=time.strftime("%Y-%m-%d %H:%M:%S"))
            for f in files:
                with open(f, "a") as fh:
                    fh.write(("\n" if fh.tell() > 0 else "") + line + "\n")
        elif history.exists():  # a process the rule started (e.g. a torchrun rank) writing to its log
            files.append(history)
        handlers.extend(logging.FileHandler(f, mode="a") for f in files)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.propagate = False
