"""One training job on N processes: torchrun (``torch.distributed.run --standalone``) data parallel.

:func:`train_job` is what the ``cells_train`` rule calls. With ``cells.train.gpus`` = 1 it trains in the
job's process. With N > 1 it writes the job's arguments to ``launch.json`` in the run directory and starts
``torchrun --standalone --nproc_per_node N -m morphomol.studies.cells.launch launch.json``: every worker
joins the process group (NCCL on GPUs, gloo on CPU), trains on its own examples and averages gradients
(:mod:`.trainer`); rank 0 writes the outputs. SIGTERM / SIGUSR1 to the job are forwarded to torchrun, the
workers save ``resume.pt`` and the job exits 143 like a single-process run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from morphomol.errors import MorphomolError
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.trainer import TrainInputs, TrainOutputs, train_fold
from morphomol.train.resume import PREEMPTED_EXIT_CODE, RESUME_NAME, Preempted
from morphomol.train.runtime import Runtime
from morphomol.util.logs import get_logger

log = get_logger("cells.launch")


def _spec(inputs: TrainInputs, outputs: TrainOutputs, cfg: CellsConfig, seed: int, threads: int, device: str) -> dict:
    return {"inputs": {k: (str(v) if not isinstance(v, dict) else {s: str(p) for s, p in v.items()})
                       for k, v in dataclasses.asdict(inputs).items()},
            "outputs": {k: str(v) for k, v in dataclasses.asdict(outputs).items()},
            "cells": dataclasses.asdict(cfg), "seed": seed, "threads": threads, "device": device}


def train_job(inputs: TrainInputs, outputs: TrainOutputs, *, cfg: CellsConfig, seed: int, threads: int,
              device: str = "auto", world: int | None = None) -> dict[str, Any] | None:
    """Train one fold on ``world`` processes (default ``cfg.train.gpus``); rank 0's metrics (None when run
    through torchrun: read ``outputs.metrics``)."""
    world = int(cfg.train.gpus if world is None else world)
    if world <= 1:
        return train_fold(inputs, outputs, cfg=cfg, runtime=Runtime(seed=seed, threads=threads, device=device))
    outputs.work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = outputs.work_dir / "launch.json"
    spec_path.write_text(json.dumps(_spec(inputs, outputs, cfg, seed, threads, device), indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "morphomol.studies.cells.launch", str(spec_path)]
    log.info("starting %d training processes: %s", world, " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
    proc = subprocess.Popen(cmd, env=env)
    old = {s: signal.signal(s, lambda signum, _f: proc.send_signal(signum)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == PREEMPTED_EXIT_CODE or (rc != 0 and (outputs.work_dir / RESUME_NAME).exists()
                                     and not outputs.metrics.exists()):
        raise Preempted(outputs.work_dir / RESUME_NAME)
    if rc != 0:
        raise MorphomolError(f"distributed training failed (exit code {rc}); see the workers' messages above")
    spec_path.unlink(missing_ok=True)
    return None


def _worker(spec_path: str) -> int:
    """torchrun worker: join the process group, train (rank 0 writes), leave."""
    import torch
    import torch.distributed as dist

    from morphomol.config.sections import build
    from morphomol.util.logs import setup_logging

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    setup_logging(None)
    cuda = torch.cuda.is_available() and spec["device"] != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    i = spec["inputs"]
    inputs = TrainInputs(fold_table=Path(i["fold_table"]), fold_meta=Path(i["fold_meta"]), base_model=Path(i["base_model"]),
                         templates=Path(i["templates"]), image_stores={s: Path(p) for s, p in i["image_stores"].items()})
    outputs = TrainOutputs(**{k: Path(v) for k, v in spec["outputs"].items()})
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    try:
        train_fold(inputs, outputs, cfg=build(CellsConfig, spec["cells"]),
                   runtime=Runtime(seed=int(spec["seed"]), threads=max(1, int(spec["threads"]) // world), device=device),
                   rank=rank, world=world)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from morphomol.util.offline import enforce_offline

    enforce_offline()  # as in the rule's own process (morphomol.smk): no hub, no hub kernels in the workers
    sys.exit(_worker(sys.argv[1]))
