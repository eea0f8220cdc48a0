"""The input pipeline of issue 19 in one script: loader, host work per step, feature extraction,
and (on a GPU) model-only vs end-to-end training and feature extraction. Prints a table and
writes one JSON. No thresholds: figures are reported, never asserted.

    .venv/bin/python benchmarks/bench_pipeline.py --device cpu [--json cpu.json]     # 2-core box
    .venv/bin/python benchmarks/bench_pipeline.py --device cpu --quick                # same code, small
    python benchmarks/bench_pipeline.py --device cuda --json OUT.json                # one GPU, < 8 min

A realistic synthetic cohort is written first with the project's own writers (tiles.zarr through
``morphomol.tiling``, tokens.zarr through ``morphomol.tokens``: 380 genes, 280 core, about 5.3 k
core token entries per tile). Then, at batch 512 (fields of early fusion: image, tokens, tile,
target), through the trainer's own source (``StoreSplit.epoch``):

* ``loader``   tiles/s of one epoch and the main thread's CPU time per 512 tiles (null model:
  everything but the model — hand-off, pin, copy enqueue, token scatter), for DataLoader worker
  processes (``workers=N``, the batch built on the host) and the threaded feed (``threads=N``:
  decode threads writing into reused (pinned) buffers, tokens scattered on the device);
* ``features`` tiles/s of ``extract_features`` with a null encoder (features only, and with patch
  tokens), i.e. everything but the model;
* ``train`` (GPU; tiny model with ``--device cpu``): the early-fusion ViT-S train step model-only
  (batches resident on the device) vs end to end from the stores, eager and ``torch.compile``
  (compile time reported apart), with 4 / 8 / 12 decode threads;
* ``encoders`` (GPU; tiny with ``--device cpu``): ViT-S and ViT-L feature extraction model-only vs
  end to end; peak GPU memory.

Every section is timed; once ``--budget-s`` (default 420 s) is spent, the remaining sections are
skipped (and listed in the JSON), so a GPU run stays under 8 minutes. The JSON is rewritten after
every section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
FIELDS = ["image", "tokens", "tile", "target"]
T0 = time.perf_counter()


# ----------------------------------------------------------------------------------- cohort
def build_cohort(root: Path, n_tiles: int) -> dict[str, Any]:
    """Two samples of ``n_tiles / 2`` tiles, written by the project's writers (``bench_loader.build``:
    tiles.zarr through ``morphomol.tiling``, tokens.zarr through ``morphomol.tokens``, 380 genes, 280
    core, 9000 transcripts per tile), one split (everything ``fit``) and panel."""
    from bench_loader import build

    build(root, n_tiles, 380, 280, 9000)
    split = pd.read_parquet(root / "splits" / "fold0.parquet")
    return {"root": root, "samples": sorted(split["sample_id"].unique().tolist()), "n_tiles": len(split)}


def fold_source(cohort: dict[str, Any], *, buffer_chunks: int = 8, buffer_batches: int = 4) -> Any:
    """The fit partition as the trainer sees it (``StoreSplit``)."""
    from morphomol.data.folds import read_fold_panel, read_split
    from morphomol.studies.fusion.data import FoldInputs, StoreSplit

    r = cohort["root"]
    inputs = FoldInputs(split=r / "splits" / "fold0.parquet", panel=r / "panels" / "fold0.json",
                        tokens={s: r / "samples" / s / "tokens.zarr" for s in cohort["samples"]},
                        tiles={s: r / "samples" / s / "tiles.zarr" for s in cohort["samples"]})
    args = (read_split(inputs.split), read_fold_panel(inputs.panel), inputs.stores(), "fit")
    try:  # the config's defaults
        return StoreSplit(*args, buffer_chunks=buffer_chunks, buffer_batches=buffer_batches)
    except TypeError:  # a tree before issue 19 (no buffer_batches)
        return StoreSplit(*args, buffer_chunks=buffer_chunks)


def new_feed(src: Any) -> bool:
    """The threaded feed exists (this tree has the issue-19 loader)."""
    return "threads" in getattr(src, "epoch_options", ())


# ----------------------------------------------------------------------------------- loader
def epoch_iter(src: Any, epoch: int, mode: str, n: int, bs: int, device: Any, fields: list[str],
               drop_last: bool = False) -> Any:
    kw: dict[str, Any] = dict(batch_size=bs, fields=fields, seed=0, shuffle=True, drop_last=drop_last)
    if mode == "workers":
        kw.update(num_workers=n, pin_memory=device.type == "cuda")
    else:
        kw.update(threads=n, device=device)
    return src.epoch(epoch, **kw)


def measure_loader(src: Any, mode: str, n: int, bs: int, device: Any, epochs: int, fields: list[str]) -> dict[str, Any]:
    """tiles/s over ``epochs`` timed epochs (after one warm-up epoch) and the main thread's CPU time
    per batch with a null model (the batch moved to the device and its tensors touched)."""
    import torch

    from morphomol.train.runtime import to_device

    cuda = device.type == "cuda"
    rates, host, cpu_all = [], [], []
    for e in range(1 + epochs):
        t0, p0 = time.perf_counter(), time.process_time()
        k = nb = 0
        cpu = 0.0
        it = iter(epoch_iter(src, e, mode, n, bs, device, fields))
        while True:
            c0 = time.thread_time()
            b = next(it, None)
            if b is None:
                break
            b = to_device(b, device)  # null model: what the trainer does before the forward pass
            cpu += time.thread_time() - c0
            k += len(b["tile_id"])
            nb += 1
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if e:
            rates.append(k / dt)
            host.append(1000 * cpu / max(k, 1) * 512)
            cpu_all.append((time.process_time() - p0) / max(k, 1) * 1000)
    return {"mode": f"{mode}={n}", "tiles_per_s": round(float(np.median(rates)), 1),
            "host_ms_per_512": round(float(np.median(host)), 2), "batch": bs, "epochs": epochs,
            # CPU seconds of this process (all its threads; not DataLoader workers) per 1000 tiles
            "process_cpu_s_per_1000": round(float(np.median(cpu_all)), 3)}


# ----------------------------------------------------------------------------------- features
def null_encoder(dim: int = 384) -> Any:
    import torch
    from torch import nn

    class Null(nn.Module):
        """No model: (B, dim) zeros and (B, 196, dim) fp16 zero tokens."""

        weights_id = "null"
        pooling = "cls"
        config = {"arch": {"null": True}}

        def __init__(self) -> None:
            super().__init__()
            self.dim = dim
            self.register_buffer("z", torch.zeros(1))

        def _out(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
            # a model's output without a model: preallocated (so its own allocation is not timed)
            t = self.__dict__.setdefault("_cache", {}).get(key)
            if t is None or t.shape != shape or t.device != x.device:
                t = self._cache[key] = torch.zeros(shape, dtype=dtype, device=x.device)
            return t

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._out("f", (x.shape[0], self.dim), torch.float32, x)

        def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
            return self._out("t", (x.shape[0], 196, self.dim), torch.float16, x)

        def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.forward(x), self.forward_tokens(x)

        @property
        def has_tokens(self) -> bool:
            return True

    return Null()


def measure_features(store: Path, out_dir: Path, device: Any, *, encoder: Any, name: str, batch: int,
                     patch_tokens: bool = False, threads: int | None = None, reps: int = 3) -> dict[str, Any]:
    import inspect

    from morphomol.features import extract_features

    kw: dict[str, Any] = {}
    if threads is not None and "read_threads" in inspect.signature(extract_features).parameters:
        kw["read_threads"] = threads
    out = out_dir / f"feat_{name}_{int(patch_tokens)}_{threads}.zarr"
    rates, cpus = [], []
    for _ in range(reps):  # median of `reps` runs (one run is a fraction of a second on the CPU)
        p0 = time.process_time()
        s = extract_features(store, out, "vit_s", None, batch, device, encoder=encoder, patch_tokens=patch_tokens,
                             log_every_s=1e9, **kw)
        cpus.append(1000 * (time.process_time() - p0) / s["n_tiles"])
        rates.append(s["tiles_per_second"])
        shutil.rmtree(out, ignore_errors=True)
    return {"encoder": name, "patch_tokens": patch_tokens, "threads": kw.get("read_threads"), "batch": batch,
            "n_tiles": s["n_tiles"], "tiles_per_s": round(float(np.median(rates)), 1), "runs": reps,
            "process_cpu_s_per_1000": round(float(np.median(cpus)), 3)}


def model_only_features(enc: Any, device: Any, batch: int, iters: int) -> float:
    import torch

    cuda = device.type == "cuda"
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)

    def step() -> Any:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return enc(x)

    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- training
def train_rows(src: Any, device: Any, *, vit: dict[str, int], bs: int, steps: int, warmup: int, threads: list[int],
               compile_modes: list[bool], n_core: int, n_targets: int) -> list[dict[str, Any]]:
    """Model-only vs end-to-end early-fusion train steps (the trainer's ``train_step``)."""
    import torch

    from morphomol.config import default_sections
    from morphomol.studies.fusion.models import build_model
    from morphomol.studies.fusion.regression import regression_loss
    from morphomol.studies.fusion.settings import load_settings
    from morphomol.train.loop import train_step
    from morphomol.train.runtime import autocast, to_device  # noqa: F401

    setting = load_settings(ROOT / "config" / "experiments" / "table_a1.yaml")["early_add_vits_ft_mlp_token"]
    cuda = device.type == "cuda"
    rows = []
    g = torch.Generator().manual_seed(0)
    # keys in the order the store source yields them (a compiled step guards on the batch it sees)
    resident = {"tile_id": [str(i) for i in range(bs)],
                "image": torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, generator=g).to(device),
                "tokens": torch.poisson(torch.full((bs, 196, n_core), 0.1), generator=g).to(device),
                "tile": torch.rand(bs, n_core, generator=g).to(device),
                "target": torch.rand(bs, n_targets, generator=g).to(device)}
    for compiled in compile_modes:
        torch.manual_seed(0)
        model = build_model(setting, n_core, n_targets,
                            default_sections(model={"vit": vit, "expr_hidden": 32}).model).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        opt_kw = {"fused": True} if cuda else {}
        opt = torch.optim.AdamW(model.param_groups(1e-4, 1e-5), weight_decay=1e-3, **opt_kw)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step_model = torch.compile(model) if compiled else model
        model.train()
        # compile / warm-up apart
        t0 = time.perf_counter()
        train_step(step_model, resident, opt, regression_loss, trainable, 1.0, device)
        sync(device)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            train_step(step_model, resident, opt, regression_loss, trainable, 1.0, device)
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(step_model, resident, opt, regression_loss, trainable, 1.0, device)
        sync(device)
        mo = bs * steps / (time.perf_counter() - t0)
        row: dict[str, Any] = {"compiled": compiled, "first_step_s": round(first, 2),
                               "model_only_tiles_per_s": round(mo, 1),
                               "end_to_end": {}}
        if cuda:
            row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        for t in threads:
            if over_budget():
                row["end_to_end"][f"threads={t}"] = "skipped (budget)"
                continue
            n = 0
            epoch = 100
            mode = "threads" if new_feed(src) else "workers"
            # drop_last: every step has the compiled shape (as fit does with training.compile)
            it = iter(epoch_iter(src, epoch, mode, t, bs, device, FIELDS, drop_last=True))
            host = [0.0]

            def next_batch() -> dict[str, Any]:
                nonlocal it, epoch
                c0 = time.thread_time()
                b = next(it, None)
                if b is None:
                    epoch += 1
                    it = iter(epoch_iter(src, epoch, mode, t, bs, device, FIELDS, drop_last=True))
                    b = next(it)
                b = to_device(b, device)
                host[0] += time.thread_time() - c0
                return b

            for _ in range(warmup):
                train_step(step_model, next_batch(), opt, regression_loss, trainable, 1.0, device)
            sync(device)
            host[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                b = next_batch()
                n += len(b["tile_id"])
                train_step(step_model, b, opt, regression_loss, trainable, 1.0, device)
            sync(device)
            e2e = n / (time.perf_counter() - t0)
            row["end_to_end"][f"{mode}={t}"] = {"tiles_per_s": round(e2e, 1), "of_model_only": round(e2e / mo, 3),
                                                "host_ms_per_step": round(1000 * host[0] / steps, 2)}
        rows.append(row)
        del model, opt, step_model
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------- goals
def goals(res: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The issue's goals next to the figures (reported, never asserted)."""
    out: dict[str, Any] = {}
    loader = {r["mode"]: r for r in res.get("loader", [])}
    if not cuda:
        # decode threads (>= 1): the training thread only hands off (threads=0 decodes in it)
        best = max((r for m, r in loader.items() if m.startswith("threads") and m != "threads=0"),
                   key=lambda r: r["tiles_per_s"], default=None)
        if best:
            out["loader >= 6000 tiles/s at batch 512 (2 cores)"] = f"{best['mode']}: {best['tiles_per_s']}"
            out["main-process host work <= 15 ms / 512 tiles"] = f"{best['mode']}: {best['host_ms_per_512']} ms"
        feats = [r for r in res.get("features", []) if not r["patch_tokens"]]
        if feats:
            b = max(feats, key=lambda r: r["tiles_per_s"])
            out["null-encoder extraction >= 15000 tiles/s"] = f"threads={b['threads']}: {b['tiles_per_s']}"
        return out
    for r in res.get("train", {}).get("rows", []):
        need = 0.9
        e2e = {k: v for k, v in r["end_to_end"].items() if isinstance(v, dict)}
        if e2e:
            k, v = max(e2e.items(), key=lambda kv: kv[1]["tiles_per_s"])
            out[f"train {'compiled' if r['compiled'] else 'eager'} end-to-end >= 90% of model-only"] = \
                f"{k}: {v['tiles_per_s']} tiles/s = {v['of_model_only']:.0%} of {r['model_only_tiles_per_s']}" \
                f" ({'met' if v['of_model_only'] >= need else 'not met'})"
    for r in res.get("encoders", []):
        need = 0.8 if r["encoder"] == "vit_s" else 0.9
        out[f"features {r['encoder']} end-to-end >= {need:.0%} of model-only"] = \
            f"{r['of_model_only']:.0%} ({'met' if r['of_model_only'] >= need else 'not met'})"
    return out


# ----------------------------------------------------------------------------------- driver
BUDGET = [420.0]


def over_budget() -> bool:
    return time.perf_counter() - T0 > BUDGET[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K")
    ap.add_argument("--quick", action="store_true", help="small cohort, one timed epoch (checks the code path)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--tiles", type=int, default=None, help="cohort tiles (default 4096 CPU, 2048 quick, 16384 GPU)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=None, help="timed loader epochs (default 2, 1 quick)")
    ap.add_argument("--workers", default=None, help="DataLoader worker counts (default 0,1,2 CPU; 8 GPU)")
    ap.add_argument("--threads", default=None, help="feed thread counts (default 0,1,2 CPU; 4,8,12 GPU)")
    ap.add_argument("--sections", default="loader,features,train,encoders")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--buffer-batches", type=int, default=4, help="training.buffer_batches (shuffle buffer)")
    ap.add_argument("--keep", default=None, help="keep the cohort in this directory (reused when present)")
    a = ap.parse_args()
    BUDGET[0] = a.budget_s

    import torch

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    n_tiles = a.tiles or (16384 if cuda else (2048 if a.quick else 4096))
    epochs = a.epochs or (1 if a.quick else 2)
    workers = [int(x) for x in (a.workers or ("8" if cuda else "0,1,2")).split(",") if x != ""]
    threads = [int(x) for x in (a.threads or ("4,8,12" if cuda else "0,1,2")).split(",") if x != ""]
    sections = set(a.sections.split(","))
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:], "skipped": []}

    def dump() -> None:
        res["elapsed_s"] = round(time.perf_counter() - T0, 1)
        res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        t0 = time.perf_counter()
        if a.keep and (tmp / "cohort.json").exists():
            cohort = json.loads((tmp / "cohort.json").read_text())
            cohort["root"] = Path(cohort["root"])
        else:
            tmp.mkdir(parents=True, exist_ok=True)
            cohort = build_cohort(tmp / "cohort", n_tiles)
            if a.keep:
                (tmp / "cohort.json").write_text(json.dumps({**cohort, "root": str(cohort["root"])}))
        res["cohort"] = {"n_tiles": cohort["n_tiles"], "samples": len(cohort["samples"]), "genes": 380, "core": 280,
                         "build_s": round(time.perf_counter() - t0, 1)}
        print(f"# cohort: {cohort['n_tiles']} tiles in {res['cohort']['build_s']} s", flush=True)
        src = fold_source(cohort, buffer_batches=a.buffer_batches)
        res["feed"] = "threads" if new_feed(src) else "legacy (no threaded feed in this tree)"
        dump()

        if "loader" in sections:
            res["loader"] = []
            modes = [("workers", w) for w in workers] + ([("threads", t) for t in threads] if new_feed(src) else [])
            for mode, n in modes:
                if over_budget():
                    res["skipped"].append(f"loader {mode}={n}")
                    continue
                r = measure_loader(src, mode, n, a.batch, device, epochs, FIELDS)
                print(f"loader {r['mode']:10s} {r['tiles_per_s']:9.1f} tiles/s  host {r['host_ms_per_512']:6.2f} "
                      f"ms/512 tiles", flush=True)
                res["loader"].append(r)
                src._loaders.clear()  # each layout's feed / workers go (pinned buffers are freed)
                dump()

        store = cohort["root"] / "samples" / cohort["samples"][0] / "tiles.zarr"
        if "features" in sections and not over_budget():
            res["features"] = []
            for pt in (False, True):
                for th in ([None] if not cuda else [None]) + ([2, 4] if not cuda else [4, 8]):
                    if over_budget():
                        res["skipped"].append(f"features tokens={pt} threads={th}")
                        continue
                    r = measure_features(store, tmp, device, encoder=null_encoder(), name="null", batch=256,
                                         patch_tokens=pt, threads=th)
                    if r["threads"] is None and th is not None:
                        continue  # this tree has no read_threads option
                    print(f"features null tokens={pt!s:5} threads={r['threads']}: {r['tiles_per_s']:9.1f} tiles/s",
                          flush=True)
                    res["features"].append(r)
                    dump()

        if "train" in sections and not over_budget():
            vit = {"embed_dim": 384, "depth": 12, "num_heads": 6} if cuda else {"embed_dim": 64, "depth": 2,
                                                                                 "num_heads": 2}
            bs = a.batch if cuda else (64 if a.quick else 128)
            res["train"] = {"vit": vit, "batch": bs, "rows": train_rows(
                src, device, vit=vit, bs=bs, steps=20 if cuda else 4, warmup=3 if cuda else 2,
                threads=threads if cuda else threads[-1:], compile_modes=[False, True] if cuda else [False],
                n_core=280, n_targets=100)}
            for r in res["train"]["rows"]:
                print(f"train compiled={r['compiled']}: model-only {r['model_only_tiles_per_s']} tiles/s, first step "
                      f"{r['first_step_s']} s, end-to-end {r['end_to_end']}", flush=True)
            dump()

        if "encoders" in sections and not over_budget():
            from morphomol.encoders import create_encoder

            res["encoders"] = []
            for name in ("vit_s", "uni"):
                if over_budget():
                    res["skipped"].append(f"encoders {name}")
                    continue
                overrides = {} if cuda else {"embed_dim": 64, "depth": 2, "num_heads": 2}
                enc = create_encoder(name, allow_random=True, **overrides).to(device).eval()
                if cuda:
                    enc = enc.to(memory_format=torch.channels_last)
                    torch.cuda.reset_peak_memory_stats(device)
                b = 256 if cuda else 16
                mo = model_only_features(enc, device, b, 20 if cuda else 2)
                rows = [measure_features(store, tmp, device, encoder=enc, name=name, batch=b, threads=th, reps=1)
                        for th in ([4] if cuda else [2])]
                r = {"encoder": name, "arch": enc.spec.architecture, "batch": b, "model_only_tiles_per_s": round(mo, 1),
                     "end_to_end": rows, "of_model_only": round(rows[-1]["tiles_per_s"] / mo, 3)}
                if cuda:
                    r["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                print(f"encoder {name}: model-only {mo:.1f} tiles/s, end-to-end {rows[-1]['tiles_per_s']} tiles/s "
                      f"({r['of_model_only']:.0%})", flush=True)
                res["encoders"].append(r)
                del enc
                if cuda:
                    torch.cuda.empty_cache()
                dump()
        res["goals"] = goals(res, cuda)
        for k, v in res["goals"].items():
            print(f"goal {k}: {v}")
    finally:
        dump()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"# done in {time.perf_counter() - T0:.1f} s" + (f"; wrote {a.json}" if a.json else ""))


if __name__ == "__main__":
    main()
