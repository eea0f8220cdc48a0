"""End-to-end training throughput of early-fusion add ViT-S (Table A.1 row 0): tiles/s.

Two data modes:
  stores     results/{cohort} stores of one fold's fit partition through morphomol.data.loader
             (chunk-shuffled loader, DataLoader workers): what a real `fusion_train` job sees.
  synthetic  in-memory uint8 tiles + Poisson token counts (pinned on CUDA), copied host->device
             every step; used when no stores are given/found.

Each step is the trainer's step (morphomol.train.loop.train_step): bf16 autocast on CUDA,
channels-last, MSE, backward, grad-norm clip, AdamW. On CUDA the GPU utilisation is sampled
(torch.cuda.utilization / nvidia-smi) during the timed steps.

    python benchmarks/bench_train.py                         # full ViT-S, batch 512 (GPU)
    python benchmarks/bench_train.py --compile               # + torch.compile
    python benchmarks/bench_train.py --tiny                  # CPU-sized model and batch
    python benchmarks/bench_train.py --cohort-dir results/demo --fold 0 --num-workers 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.config import default_sections
from morphomol.studies.fusion.data import FoldInputs, fold_from_stores
from morphomol.studies.fusion.models import build_model
from morphomol.studies.fusion.regression import regression_loss
from morphomol.studies.fusion.settings import load_settings
from morphomol.train.loop import train_step
from morphomol.train.runtime import to_device

ROOT = Path(__file__).resolve().parents[1]
FULL = {"embed_dim": 384, "depth": 12, "num_heads": 6}
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}


class GpuSampler:
    """Samples GPU utilisation (%) every ``interval`` s in a background thread."""

    def __init__(self, device: torch.device, interval: float = 0.2) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.source = "none"

    def _read(self) -> float | None:
        try:
            v = torch.cuda.utilization(self.device)
            self.source = "torch.cuda.utilization"
            return float(v)
        except Exception:  # noqa: BLE001 - pynvml missing: fall back to nvidia-smi
            pass
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(self.device.index or 0)], capture_output=True, text=True, timeout=5)
            self.source = "nvidia-smi"
            return float(out.stdout.strip().splitlines()[0])
        except Exception:  # noqa: BLE001
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self._read()
            if v is not None:
                self.samples.append(v)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_batches(n_batches: int, batch_size: int, n_core: int, n_targets: int, seed: int,
                      pin: bool) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        b = {"image": torch.from_numpy(rng.integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)),
             # sparse counts like real tokens (most token x gene entries are 0)
             "tokens": torch.from_numpy(rng.poisson(0.05, (batch_size, 196, n_core)).astype(np.float32)),
             "target": torch.from_numpy(rng.random((batch_size, n_targets), dtype=np.float32)),
             "tile_id": [f"synth__{i:06d}" for i in range(batch_size)]}
        if pin:
            b = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in b.items()}
        out.append(b)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="early_add_vits_ft_mlp_token")
    ap.add_argument("--tiny", action="store_true", help=f"ViT {TINY}, batch 32 (CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 (32 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30, 10 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 2 with --tiny)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cohort-dir", default=None, help="results/{cohort}: read the fit partition from the stores")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--n-core", type=int, default=380, help="synthetic mode: core genes")
    ap.add_argument("--n-targets", type=int, default=100, help="synthetic mode: add-on genes")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    a = ap.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    bs = a.batch_size or (32 if a.tiny else 512)
    steps = a.steps or (10 if a.tiny else 30)
    warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 5)
    vit = TINY if a.tiny else FULL
    setting = load_settings(ROOT / "config" / "experiments" / "table_a1.yaml")[a.setting]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # ---- data
    cdir = Path(a.cohort_dir) if a.cohort_dir else None
    stores = cdir is not None and (cdir / "splits" / f"fold{a.fold}.parquet").exists()
    if a.cohort_dir and not stores:
        print(f"no stores at {a.cohort_dir} (splits/fold{a.fold}.parquet missing): using synthetic batches")
    if stores:
        samples = sorted(p.name for p in (cdir / "samples").iterdir() if (p / "tokens.zarr").exists())
        data = fold_from_stores(FoldInputs(
            split=cdir / "splits" / f"fold{a.fold}.parquet", panel=cdir / "fusion" / "panels" / f"fold{a.fold}.json",
            tokens={s: cdir / "samples" / s / "tokens.zarr" for s in samples},
            tiles={s: cdir / "samples" / s / "images.zarr" for s in samples}))
        fit = data.fit
        n_core, n_targets = len(data.core_genes), len(data.addon_genes)

        def batches():
            epoch = 0
            while True:
                yield from fit.epoch(epoch, batch_size=bs, fields=setting.batch_fields, seed=0,
                                     num_workers=a.num_workers, pin_memory=device.type == "cuda")
                epoch += 1
        mode = f"stores {a.cohort_dir} fold {a.fold} fit ({len(fit)} tiles, {a.num_workers} workers)"
    else:
        n_core, n_targets = a.n_core, a.n_targets
        pool = synthetic_batches(4, bs, n_core, n_targets, seed=0, pin=device.type == "cuda")

        def batches():
            i = 0
            while True:
                yield pool[i % len(pool)]
                i += 1
        mode = "synthetic in-memory uint8 batches (host->device copy every step)"

    # ---- model and optimizer, as in the trainer
    torch.manual_seed(0)
    model = build_model(setting, n_core, n_targets, default_sections(model={"vit": vit, "expr_hidden": 32}).model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.param_groups(1e-4, 1e-5), weight_decay=1e-3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step_model = torch.compile(model) if a.compile else model
    model.train()

    it = batches()

    def one_step() -> int:
        b = to_device(next(it), device)
        train_step(step_model, b, opt, regression_loss, trainable, 1.0, device)
        return len(b["tile_id"])

    t_w = time.perf_counter()
    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t_w

    sampler = GpuSampler(device) if device.type == "cuda" else None
    if sampler:
        sampler.__enter__()
    t0 = time.perf_counter()
    tiles = sum(one_step() for _ in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if sampler:
        sampler.__exit__()

    res = {
        "setting": a.setting, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)", "vit": vit, "batch_size": bs, "n_core": n_core,
        "n_targets": n_targets, "compile": a.compile, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "data": mode, "steps": steps, "warmup_steps": warmup, "warmup_seconds": round(warm_s, 2),
        "seconds": round(secs, 3), "tiles_per_second": round(tiles / secs, 1),
        "ms_per_step": round(1000 * secs / steps, 1),
        "params": model.param_counts(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        res["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if sampler and sampler.samples:
            res["gpu_util_mean"] = round(float(np.mean(sampler.samples)), 1)
            res["gpu_util_samples"] = len(sampler.samples)
            res["gpu_util_source"] = sampler.source
    for k, v in res.items():
        print(f"{k:>18}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
