"""Feature-extraction throughput: model-only vs end-to-end from a tiles.zarr store.

    .venv/bin/python benchmarks/bench_features.py                      # CPU: reduced counts
    .venv/bin/python benchmarks/bench_features.py --device cuda        # GPU: 4096 tiles, batch 256
    .venv/bin/python benchmarks/bench_features.py --store results/demo/samples/S1/tiles.zarr

For each encoder (default vit_s and uni = ViT-L/16, random weights) it prints
* model-only tiles/s: uint8 batches already on the device, same preprocessing/precision as the
  pipeline (bf16 autocast + channels_last on CUDA, fp32 on CPU);
* store-read tiles/s: whole chunks read sequentially from the zarr store (no model);
* end-to-end tiles/s: ``morphomol.features.extract_features`` from the store to a features zarr
  (background reader, pinned H2D, compute, write), with the ratio to model-only.
Reference (method.md, one H100, bf16 eager, model only): ViT-S ~20,500 tiles/s, ViT-L ~3,050.
No thresholds: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from morphomol.data.features import open_zarr_group  # noqa: E402
from morphomol.encoders import create_encoder  # noqa: E402
from morphomol.features import extract_features, resolve_device  # noqa: E402


def make_store(path: Path, n: int, chunk: int, seed: int = 0) -> None:
    """Synthetic tiles: smooth random blocks (compress like real H&E roughly does)."""
    import zarr

    rng = np.random.default_rng(seed)
    g = zarr.open_group(str(path), mode="w")
    a = g.create_array("images", shape=(n, 224, 224, 3), chunks=(chunk, 224, 224, 3), dtype="uint8")
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        small = rng.integers(0, 256, (m, 28, 28, 3), dtype=np.uint8)
        block = small.repeat(8, axis=1).repeat(8, axis=2)
        block = block + rng.integers(0, 8, block.shape, dtype=np.uint8)
        a[s : s + m] = block
    g.attrs.update({"sample": "bench", "tile_px": 512, "mpp": 0.5, "stride": 256})


def model_only(enc: torch.nn.Module, dev: torch.device, batch: int, iters: int) -> float:
    cuda = dev.type == "cuda"
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=dev)

    def step() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return enc(x)

    for _ in range(2 if cuda else 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def store_read(path: Path) -> float:
    arr = open_zarr_group(path)["images"]
    chunk = int(arr.chunks[0])
    t0 = time.perf_counter()
    for s in range(0, arr.shape[0], chunk):
        np.asarray(arr[s : s + chunk])
    return arr.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=None, help="tiles.zarr to read (default: synthetic)")
    ap.add_argument("--encoders", default="vit_s,uni")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=None, help="synthetic tiles (default 4096 CUDA / 64 CPU)")
    ap.add_argument("--n-large", type=int, default=None, help="tiles for ViT-L/H on CPU (default 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 CUDA / 8 CPU")
    ap.add_argument("--iters", type=int, default=None, help="model-only iterations (default 20 CUDA / 2 CPU)")
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    n = args.n or (4096 if cuda else 64)
    batch = args.batch_size or (256 if cuda else 8)
    iters = args.iters or (20 if cuda else 2)
    n_large = args.n_large or (n if cuda else 16)
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {batch}")

    tmp = Path(tempfile.mkdtemp(prefix="bench_features_"))
    stores: dict[int, Path] = {}

    def store_for(count: int) -> Path:
        if args.store is not None:
            return args.store
        if count not in stores:
            t0 = time.perf_counter()
            stores[count] = tmp / f"tiles_{count}.zarr"
            make_store(stores[count], count, args.chunk)
            print(f"synthetic store: {count} tiles, chunk {args.chunk}, written in {time.perf_counter() - t0:.1f} s")
        return stores[count]

    rows = []
    for enc_name in [e.strip() for e in args.encoders.split(",") if e.strip()]:
        large = enc_name not in ("vit_s",)
        count = n_large if large else n
        store = store_for(count)
        enc = create_encoder(enc_name, allow_random=True).to(dev).eval()
        if cuda:
            enc = enc.to(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats(dev)
        b = min(batch, count)
        it = iters if not (large and not cuda) else 1
        mo = model_only(enc, dev, b, it)
        rd = store_read(store)
        out = tmp / f"features_{enc_name}.zarr"
        summ = extract_features(store, out, enc_name, None, b, dev, encoder=enc, log_every_s=1e9)
        e2e = summ["tiles_per_second"]
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
        rows.append((enc_name, enc.spec.architecture, summ["n_tiles"], b, mo, rd, e2e, e2e / mo, mem))
        del enc
        if cuda:
            torch.cuda.empty_cache()

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print()
    print(f"{'encoder':8} {'tiles':>6} {'batch':>5} {'model-only/s':>13} {'store-read/s':>13} "
          f"{'end-to-end/s':>13} {'e2e/model':>9} {'gpu GiB':>8}")
    for r in rows:
        print(f"{r[0]:8} {r[2]:6d} {r[3]:5d} {r[4]:13.1f} {r[5]:13.1f} {r[6]:13.1f} {r[7]:9.0%} {r[8]:8.2f}")
    print(f"peak host RSS {rss:.2f} GiB")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
