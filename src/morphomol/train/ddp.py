"""Data-parallel training on one node: torchrun processes, one per GPU (gloo on the CPU, for tests).

Launch: :func:`launch` runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m
morphomol.train.ddp PAYLOAD``; every process unpickles the payload (a library function and its
arguments), joins the process group (NCCL on CUDA, ``cuda:LOCAL_RANK``; gloo on the CPU) and
calls the function; rank 0's return value comes back to the launcher. A stop signal (SIGTERM /
SIGUSR1) to the launcher is forwarded to torchrun, which forwards it to the ranks; the ranks agree
on it at the next step (:func:`any_flag`), rank 0 writes ``resume.pt`` and the launcher exits with
143 (the resumable exit code of :mod:`morphomol.train.resume`).

What the trainer does with it (:func:`morphomol.train.loop.fit`): every rank takes its part of
each batch (``shard=(rank, world)``: the ranks together see the batches of one process, each tile
once), the model is wrapped in ``DistributedDataParallel``, per-rank mean losses are weighted by
``n_rank * world / n_batch`` (the averaged gradient is then the gradient of the whole batch's
mean), losses and tile counts are summed over ranks, predictions gathered (:func:`gather_parts`),
contrastive losses see every rank's embeddings (:func:`gather_with_grad`). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.util.logs import get_logger, setup_logging

log = get_logger("train.ddp")

_FLAG_GROUP: Any = None  # a gloo group for host-side flags (no device sync per step)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Dist:
    """The process group this process belongs to (``Dist()`` when none is initialised)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return Dist(d.get_rank(), d.get_world_size(), int(os.environ.get("LOCAL_RANK", d.get_rank())))
    return Dist()


def init(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, else gloo)."""
    global _FLAG_GROUP
    d = torch.distributed
    if not d.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        d.init_process_group(backend=backend)
        _FLAG_GROUP = d.new_group(backend="gloo") if backend != "gloo" else d.group.WORLD
    return current()


def shutdown() -> None:
    global _FLAG_GROUP
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _FLAG_GROUP = None


def any_flag(flag: bool) -> bool:
    """True on every rank when any rank's ``flag`` is set (a host-side all-reduce; no device sync)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_FLAG_GROUP)
    return bool(t.item())


def barrier() -> None:
    """Every rank waits here (host-side; e.g. until rank 0 wrote ``resume.pt``)."""
    torch.distributed.barrier(group=_FLAG_GROUP)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (in place; ``x`` on the process's device)."""
    torch.distributed.all_reduce(x)
    return x


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_sizes(n: int, world: int) -> list[int]:
    """Rows of each rank's part of an ``n``-row batch (``np.array_split``)."""
    return [len(p) for p in np.array_split(np.arange(n), world)]


class _AllGather(torch.autograd.Function):
    """All ranks' equal-sized blocks concatenated; backward: the gradient summed over ranks (every
    rank's loss uses every block), this rank's block of it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        d = torch.distributed
        ctx.rank, ctx.m = d.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(d.get_world_size())]
        d.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.contiguous().clone()
        torch.distributed.all_reduce(g)
        return g[ctx.rank * ctx.m:(ctx.rank + 1) * ctx.m]


def gather_with_grad(x: torch.Tensor, n_global: int) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order (the whole batch), differentiable: each rank's
    gradient reaches its own rows. Parts may differ by one row (padded for the collective)."""
    dist = current()
    sizes = shard_sizes(n_global, dist.world)
    m = max(sizes)
    pad = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))]) if x.shape[0] < m else x
    full = _AllGather.apply(pad)
    return torch.cat([full[r * m:r * m + s] for r, s in enumerate(sizes)])


def gather_parts(parts: Sequence[Any]) -> list[list[Any]]:
    """``parts`` (a list per batch) of every rank, as ``[batch][rank]`` (rank order)."""
    out: list[Any] = [None] * current().world
    torch.distributed.all_gather_object(out, list(parts))
    return [[out[r][b] for r in range(len(out))] for b in range(len(parts))]


# ------------------------------------------------------------------------------ launching
@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen[Any]) -> Iterator[list[int]]:
    got: list[int] = []
    old = {}

    def handler(signum: int, _frame: Any) -> None:
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield got
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _log_file() -> str | None:
    import logging

    for h in get_logger("morphomol").handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename
    return None


def launch(nproc: int, fn: Callable[..., Any], *args: Any, device: str = "auto", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in ``nproc`` torchrun processes on this node; rank 0's result.

    ``device``: ``cuda`` (one GPU per rank, NCCL), ``cpu`` (gloo) or ``auto``. A stop signal is
    forwarded; a stopped run exits with 143 (resumable), a failed one raises RuntimeError.
    """
    from morphomol.train.resume import PREEMPTED_EXIT_CODE

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="morphomol_ddp_") as tmp:
        payload = Path(tmp) / "payload.pkl"
        result = Path(tmp) / "result.pkl"
        with open(payload, "wb") as f:
            pickle.dump({"module": fn.__module__, "name": fn.__qualname__, "args": args, "kwargs": kwargs,
                         "device": device, "result": str(result), "log": _log_file()}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
               "-m", "morphomol.train.ddp", str(payload)]
        env = dict(os.environ)
        if device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        log.info("launching %d processes (%s): %s", nproc, device, " ".join(cmd[1:]))
        proc = subprocess.Popen(cmd, env=env)
        with _forward_signals(proc) as got:
            rc = proc.wait()
        if rc != 0:
            if got or rc == PREEMPTED_EXIT_CODE:
                raise SystemExit(PREEMPTED_EXIT_CODE)
            raise RuntimeError(f"distributed run of {fn.__qualname__} failed (exit code {rc}); see the log above")
        with open(result, "rb") as f:
            return pickle.load(f)


def _worker(payload_path: str) -> None:
    with open(payload_path, "rb") as f:
        p = pickle.load(f)
    rank = int(os.environ.get("RANK", 0))
    if p.get("log") and rank == 0:
        setup_logging(p["log"])
    else:
        setup_logging(None, level=20 if rank == 0 else 30)
    dist = init(p["device"])
    try:
        obj: Any = importlib.import_module(p["module"])
        for part in p["name"].split("."):
            obj = getattr(obj, part)
        out = obj(*p["args"], **p["kwargs"])
        if dist.is_main:
            with open(p["result"], "wb") as f:
                pickle.dump(out, f)
    finally:
        shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])
