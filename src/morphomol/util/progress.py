"""Progress of long loops: a tqdm bar in an interactive terminal, rate-limited log lines otherwise.

:func:`progress` wraps an iterable (samples of an export, batches of an epoch, ...). Where it
reports is decided once per loop by :func:`interactive`:

* stderr is a terminal and the process is not a SLURM batch job (no ``SLURM_JOB_ID``): a tqdm bar;
* otherwise (SLURM, a Snakemake rule log, a pipe): one log line at most every ``every`` seconds
  (default ``MORPHOMOL_PROGRESS_SECONDS`` or 60 s) plus one at the end, with the count, rate and
  an estimate of the time left, so that a cluster log shows that a job is alive without filling up.

``MORPHOMOL_PROGRESS=bar|log|off`` forces one mode (``off``: nothing at all).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from morphomol.util.logs import get_logger

T = TypeVar("T")

_log = get_logger("progress")
MODES = ("bar", "log", "off")


def mode() -> str:
    """``bar``, ``log`` or ``off`` for this process (see the module docstring)."""
    forced = os.environ.get("MORPHOMOL_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    return "bar" if interactive() else "log"


def interactive() -> bool:
    """True in an interactive terminal outside a SLURM batch job."""
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("SLURM_PTY_PORT"):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _seconds(every: float | None) -> float:
    if every is not None:
        return float(every)
    try:
        return float(os.environ.get("MORPHOMOL_PROGRESS_SECONDS", "60"))
    except ValueError:
        return 60.0


def _eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class LogProgress:
    """Rate-limited progress lines (the non-interactive mode of :func:`progress`)."""

    def __init__(self, desc: str, total: int | None, unit: str, every: float, logger: logging.Logger,
                 clock=time.monotonic) -> None:
        self.desc, self.total, self.unit, self.every, self.log = desc, total, unit, every, logger
        self.clock = clock
        self.n = 0
        self.start = clock()
        self.last = self.start
        self.lines = 0

    def line(self) -> str:
        """The progress line as it would be logged now."""
        dt = max(self.clock() - self.start, 1e-9)
        rate = self.n / dt
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta = f", {_eta(left)} left" if left == left else ""
            return f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, " \
                   f"{rate:.3g} {self.unit}/s{eta})"
        return f"{self.desc}: {self.n} {self.unit} ({rate:.3g} {self.unit}/s)"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.lines += 1
            self.log.info("%s", self.line())

    def close(self, *, quiet_if_short: bool = False) -> None:
        """The final line (skipped with ``quiet_if_short`` when no periodic line was due: a short loop)."""
        if quiet_if_short and self.lines == 0:
            return
        self.lines += 1
        self.log.info("%s (done in %s)", self.line(), _eta(self.clock() - self.start))


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             every: float | None = None, logger: logging.Logger | None = None, leave: bool = True) -> Iterator[T]:
    """Iterate ``iterable`` with progress reporting (bar, log lines or nothing; see the module docstring).

    ``total`` defaults to ``len(iterable)`` when it has one. The final line / bar is written only when the
    loop runs to its end (an exception propagates without a misleading "done"); ``leave=False``: no final
    log line for a loop shorter than ``every`` (e.g. the batches of a short epoch, summarised elsewhere).
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    m = mode()
    if m == "off":
        yield from iterable
        return
    if m == "bar":
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with the dependencies
            m = "log"
        else:
            with tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                      dynamic_ncols=True) as bar:
                yield from bar
            return
    lp = LogProgress(desc or "progress", total, unit, _seconds(every), logger or _log)
    for item in iterable:
        yield item
        lp.update()
    lp.close(quiet_if_short=not leave)


__all__ = ["LogProgress", "interactive", "mode", "progress"]
