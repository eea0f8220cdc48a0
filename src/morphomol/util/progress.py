"""Progress of long loops: a tqdm bar in an interactive terminal, rate-limited log lines otherwise.

:func:`progress` wraps an iterable (samples of an export, batches of an epoch, ...). Where it
reports is decided once per loop by :func:`interactive`:

* stderr is a terminal (a shell, also inside ``salloc``; a Snakemake job run from one): a tqdm bar;
* otherwise (SLURM, a Snakemake rule log, a pipe): one log line at most every ``every`` seconds
  (default ``MORPHOMOL_PROGRESS_SECONDS`` or 60 s) plus one at the end, with the count, rate and
  an estimate of the time left, so that a cluster log shows that a job is alive without filling up.

``MORPHOMOL_PROGRESS=bar|log|off`` forces one mode (``off``: nothing at all).

Training (:class:`TrainProgress`, used by :func:`morphomol.train.loop.fit`): the batches of each epoch get a
bar (``epoch 3/30``, with the whole run's time left as its postfix) that is cleared when the epoch's log line
is written, or rate-limited lines with the time left in the epoch and in the whole run
(``epoch 3/30: 120/400 batch (30%, 12.3 batch/s, epoch 0:22 left, run 5:10 left)``); the run's estimate
counts every batch of the epochs still to run at this process's pace so far (validation included), so with
early stopping it is an upper bound. While a bar is drawn, console log lines of ``morphomol`` loggers go
through ``tqdm.write`` (above the bar; log files are unchanged).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any, TypeVar

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
    """True when stderr is a terminal: a shell, also one inside a SLURM allocation (``salloc``, ``srun --pty``);
    a batch job (``sbatch``) writes stderr to a file, a Snakemake rule log or a pipe is no terminal either."""
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
                 clock=time.monotonic, *, what: str = "", extra: Callable[[], str] | None = None) -> None:
        self.desc, self.total, self.unit, self.every, self.log = desc, total, unit, every, logger
        self.clock = clock
        self.what = what    # names the time left (``epoch 0:22 left``)
        self.extra = extra  # more of the line (``, run 5:10 left``)
        self.n = 0
        self.start = clock()
        self.last = self.start
        self.lines = 0

    def line(self) -> str:
        """The progress line as it would be logged now."""
        dt = max(self.clock() - self.start, 1e-9)
        rate = self.n / dt
        extra = self.extra() if self.extra is not None else ""
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta = f", {self.what + ' ' if self.what else ''}{_eta(left)} left" if left == left else ""
            return f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, " \
                   f"{rate:.3g} {self.unit}/s{eta}{extra})"
        return f"{self.desc}: {self.n} {self.unit} ({rate:.3g} {self.unit}/s{extra})"

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


def _bar_logging() -> Any:
    """While a bar is drawn: console handlers of the ``morphomol`` loggers write through ``tqdm.write`` (a log
    line appears above the bar instead of breaking it); nothing changes when there is no console handler."""
    root = logging.getLogger("morphomol")
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
               for h in root.handlers):
        return nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[root])


class TrainProgress:
    """Progress of a training run: the batches of each epoch (a bar, or rate-limited lines with the time left
    in the epoch and in the run) and the run's time left for the epoch log lines (see the module docstring).

    ``done`` batches of the run were consumed before this process started (a resumed run); the run's pace is
    measured from this object's creation over the batches this process trains, so the time spent validating
    between epochs is part of it.
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, done: int = 0, logger: logging.Logger | None = None,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.epochs, self.steps = int(epochs), max(0, int(steps_per_epoch))
        self.log = logger or _log
        self.every = every
        self.clock = clock
        self.start = clock()
        self.done = int(done)  # batches of the run consumed (before this process, then by it)
        self.trained = 0       # batches this process consumed

    @property
    def total(self) -> int:
        return self.epochs * self.steps

    def run_left(self) -> float | None:
        """Seconds left in the whole run at this process's pace so far (None before its first batch)."""
        if self.trained <= 0:
            return None
        pace = (self.clock() - self.start) / self.trained
        return max(0, self.total - self.done) * pace

    def run_eta(self) -> str:
        """``run 5:10 left`` (``run ?:?? left`` before a pace is known; empty when the run is over)."""
        if self.done >= self.total:
            return ""
        left = self.run_left()
        return f"run {_eta(left) if left is not None else '?:??'} left"

    def _step(self) -> None:
        self.done += 1
        self.trained += 1

    def batches(self, iterable: Iterable[T], *, epoch: int, total: int, report: bool = True) -> Iterator[T]:
        """The batches of epoch ``epoch`` (0-based; ``total`` of them left) with progress reporting
        (``report=False``: counted for the run's estimate only, e.g. on the ranks other than 0)."""
        desc = f"epoch {epoch + 1}/{self.epochs}"
        m = mode() if report else "off"
        if m == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm comes with the dependencies
                m = "log"
            else:
                with _bar_logging(), tqdm(iterable, total=total, desc=desc, unit="batch", leave=False,
                                          file=sys.stderr, dynamic_ncols=True, postfix=self.run_eta()) as bar:
                    for item in bar:
                        yield item
                        self._step()
                        bar.set_postfix_str(self.run_eta(), refresh=False)
                return
        if m == "off":
            for item in iterable:
                yield item
                self._step()
            return
        lp = LogProgress(desc, total, "batch", _seconds(self.every), self.log, clock=self.clock, what="epoch",
                         extra=lambda: (", " + self.run_eta()) if self.run_eta() else "")
        for item in iterable:
            yield item
            self._step()
            lp.update()
        lp.close(quiet_if_short=True)


__all__ = ["LogProgress", "TrainProgress", "interactive", "mode", "progress"]
