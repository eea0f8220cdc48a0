"""Preemption and resuming.

SIGTERM (and SIGUSR1, SLURM's early-warning ``--signal``) only set a flag; the loop writes
``resume.pt`` at the next step boundary and raises :class:`Preempted` (exit code 143). A rerun
resumes from ``resume.pt`` only onto the very same run: the same settings and configuration *and
the same input artifacts*. The run's fingerprint is a set of named parts — settings, config, the
fold's unit ids, genes, and a digest (names, sizes, modification times) of every declared input file
or store — stored in ``resume.pt``; when any part differs the run starts fresh and the log says which
part changed. An unreadable ``resume.pt`` (truncated by a kill during a write, disk trouble) is set
aside with a warning naming the file, and the run starts fresh instead of failing on every retry.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from morphomol.util.atomic import atomic_path
from morphomol.util.hashing import digest, stat_digest
from morphomol.util.logs import get_logger

log = get_logger("train.resume")

RESUME_NAME = "resume.pt"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what SLURM/Snakemake see for a terminated job


class Preempted(SystemExit):
    """Raised after ``resume.pt`` was written because a stop signal arrived; exits with code 143."""

    def __init__(self, resume_path: Path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.resume_path = resume_path


class StopFlag:
    """Context manager: SIGTERM (and SIGUSR1, SLURM's ``--signal``) set ``requested`` instead of killing."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(*, inputs: Mapping[str, str | Path | None] | None = None, **parts: Any) -> dict[str, str]:
    """Named digests identifying a run: one per keyword part, one per declared input
    (``input:<name>``; a stat digest of the file or store, see :func:`~morphomol.util.hashing.stat_digest`)."""
    out = {k: digest(v) for k, v in sorted(parts.items())}
    for name, path in sorted((inputs or {}).items()):
        if path is not None:
            out[f"input:{name}"] = stat_digest(path)
    return out


def load_resume(path: Path, fp: Mapping[str, str]) -> dict[str, Any] | None:
    """The saved state of an interrupted run, or None (no file, unreadable file, different run)."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state" not in ckpt:
            raise ValueError("not a resume state")
    except Exception as exc:  # truncated / corrupt file: never crash-loop on it
        bad = path.with_name(path.name + ".unreadable")
        try:
            path.replace(bad)
        except OSError:
            bad = path
        from morphomol.util.torchload import load_failure_reason

        log.warning("cannot read resume state %s (%s); starting from scratch (file kept as %s)", path,
                    load_failure_reason(exc), bad.name)
        return None
    saved = ckpt.get("fingerprint")
    if not isinstance(saved, dict):
        log.warning("%s has no per-part fingerprint (older format); starting from scratch", path)
        return None
    changed = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
    if changed:
        log.warning("%s belongs to a different run (changed: %s); starting from scratch", path, ", ".join(changed))
        return None
    return ckpt


def save_resume(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def detached(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are CPU copies (safe to write while training goes on)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached(v) for v in obj)
    return obj


class ResumeWriter:
    """Writes ``resume.pt`` in a background thread: the caller hands over a payload of copies
    (:func:`detached`, ``cpu_state``), the serialisation and the write (hundreds of MB for a ViT
    with AdamW state) overlap the next epoch. One write at a time; :meth:`save_now` (a stop signal)
    waits for a pending one and writes synchronously; :meth:`close` waits (a write error is raised
    there)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, payload: dict[str, Any]) -> None:
        try:
            save_resume(self.path, payload)
        except BaseException as exc:  # surfaced in wait()
            self._error = exc

    def submit(self, payload: dict[str, Any]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(payload,), name="resume-writer", daemon=True)
        self._thread.start()

    def save_now(self, payload: dict[str, Any]) -> None:
        self.wait()
        save_resume(self.path, payload)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    close = wait
