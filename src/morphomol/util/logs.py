"""Logging set-up shared by the library, the CLI and the Snakemake adapters.

Rule logs are opened in append mode: a retried, resumed or rerun job adds its lines under an
attempt header instead of overwriting what the earlier attempt wrote (the preempted attempt's log
is often the one that explains a failure).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ATTEMPT_HEADER = "===== {what} started {when} ====="


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
        if header:
            with open(path, "a") as fh:
                if fh.tell() > 0:
                    fh.write("\n")
                fh.write(ATTEMPT_HEADER.format(what=header, when=time.strftime("%Y-%m-%d %H:%M:%S")) + "\n")
        handlers.append(logging.FileHandler(path, mode="a"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.propagate = False
