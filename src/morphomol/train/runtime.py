"""Where and how one run executes: seed, CPU threads, device; determinism and autocast."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Runtime:
    """Execution settings of one run (not part of the model's configuration).

    ``num_workers`` overrides ``training.num_workers`` when set (jobs on cached features load in
    the training process: 0).
    """

    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda[:k]
    num_workers: int | None = None

    def resolved_device(self) -> torch.device:
        """The run's device; in a data-parallel run on CUDA, the process's own GPU (``LOCAL_RANK``)."""
        if self.device in ("", "auto"):
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(self.device)
        if dev.type == "cuda" and dev.index is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev

    def workers(self, configured: int) -> int:
        return int(configured if self.num_workers is None else self.num_workers)


def loader_threads(training: Any, runtime: Runtime, device: torch.device) -> int | None:
    """Decode threads of the store feed for a run (``None``: DataLoader worker processes).

    ``training.loader``: ``feed`` -> ``loader_threads`` (default: the run's worker count) threads;
    ``workers`` -> None; ``auto`` -> the feed on CUDA and when loading in process (0 workers: decoded
    in the training thread), worker processes otherwise (the CPU behaviour before the feed).
    """
    workers = runtime.workers(training.num_workers)
    mode = getattr(training, "loader", "auto")
    configured = getattr(training, "loader_threads", None)
    n = int(configured if configured is not None else workers)
    if mode == "workers":
        return None
    if mode == "feed" or device.type == "cuda" or workers == 0:
        return n
    return None


def _set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms`` without importing torch._inductor (~3 s per training
    job) when nothing in this process has loaded it: inductor's flag only matters to torch.compile."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode)
    else:
        torch._C._set_deterministic_algorithms(mode)


@contextlib.contextmanager
def run_context(runtime: Runtime) -> Iterator[torch.device]:
    """Threads, seeds and deterministic algorithms (CPU) for the duration of one run."""
    device = runtime.resolved_device()
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    if runtime.threads:
        torch.set_num_threads(int(runtime.threads))
    torch.manual_seed(runtime.seed)
    if device.type == "cpu":
        _set_deterministic(True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield device
    finally:
        torch.set_num_threads(old_threads)
        _set_deterministic(old_det)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}
