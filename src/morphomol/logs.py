"""Logging set-up shared by the library, the CLI and the Snakemake adapters."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"morphomol.{name}" if not name.startswith("morphomol") else name)


def setup_logging(log_path: str | Path | None = None, level: int = logging.INFO) -> None:
    """Send morphomol log lines to stderr and, if given, to ``log_path``."""
    root = logging.getLogger("morphomol")
    root.setLevel(level)
    root.handlers.clear()
    fmt = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.propagate = False
