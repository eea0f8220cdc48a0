"""Tiles/s delivered by the training loader (image + tokens + targets, collated).

    .venv/bin/python benchmarks/bench_loader.py [--tiles 3000] [--genes 380] [--core 280]

Builds a cohort of 2 samples through the real writers (tiles.zarr with H&E-like images,
tokens.zarr from simulated transcripts pooled by morphomol.tokens), then iterates one
epochs of the "fit" partition with 0 and 2 workers, dense and COO token batches (COO is what a
GPU trainer should use: ``store.densify_tokens(batch, device)`` scatters on the device).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench_tiling import mosaic


def build(root: Path, n_tiles: int, G: int, core: int, tx_per_tile: int) -> dict:
    from morphomol import tokens
    from morphomol.tiling import Batch, ChunkWriter, TileGrid, create_image_array, um_to_patch_matrices

    genes = [f"G{i:04d}" for i in range(G)]
    side = int(np.sqrt(n_tiles / 2))
    img_src = mosaic(2048)
    rng = np.random.default_rng(0)
    rows = []
    for s in ("A", "B"):
        d = root / "samples" / s
        d.mkdir(parents=True)
        grid = TileGrid(0, 0, 512, 256, side, side)
        jj, ii = np.mgrid[:side, :side]
        ii, jj = ii.ravel(), jj.ravel()
        N = len(ii)
        _, arr = create_image_array(d / "tiles.zarr", N, 224, 64, "lz4", {"sample": s})
        w = ChunkWriter(arr, 64)
        for t0 in range(0, N, 64):
            m = min(64, N - t0)
            oy, ox = rng.integers(0, 2048 - 224, (2, m))
            w.add(np.stack([img_src[y:y + 224, x:x + 224] for y, x in zip(oy, ox)]))
        w.flush()
        M, _ = um_to_patch_matrices(grid, [np.eye(3)])
        n_tx = N * tx_per_tile // 4
        ext = 256 * (side + 1)
        p = rng.dirichlet(np.full(G, 0.3))
        batches = []
        for a in range(0, n_tx, 2_000_000):
            m = min(2_000_000, n_tx - a)
            batches.append(Batch(rng.uniform(0, ext, m).astype(np.float32), rng.uniform(0, ext, m).astype(np.float32),
                                 np.zeros(m, np.int32), rng.choice(G, m, p=p).astype(np.int32),
                                 np.arange(G, dtype=np.int32)))
        pc, pm = tokens.pool_patches(batches, grid, ii, jj, M, G)
        tokens.write_tokens_zarr(d / "tokens.zarr", pc, pm, grid, ii, jj, genes, s, 64)
        rows.append(pd.DataFrame({"tile_id": [f"{s}__{i:06d}" for i in range(N)], "sample_id": s, "patient_id": s,
                                  "index": np.arange(N), "partition": "fit"}))
    (root / "splits").mkdir()
    pd.concat(rows).to_parquet(root / "splits/fold0.parquet")
    panel = {"mode": "yaml", "core": genes[:core], "addon": genes[core:]}
    (root / "panels").mkdir()
    (root / "panels/fold0.json").write_text(json.dumps(panel))
    return panel


def main() -> None:
    from morphomol.data.folds import read_split
    from morphomol.data.loader import TileStream, make_loader
    from morphomol.data.stores import StorePaths

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--genes", type=int, default=380)
    ap.add_argument("--core", type=int, default=280)
    ap.add_argument("--tx-per-tile", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4, help="timed epochs after a warm-up epoch (median reported)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        t0 = time.perf_counter()
        build(root, a.tiles, a.genes, a.core, a.tx_per_tile)
        split = read_split(root / "splits/fold0.parquet")
        n = len(split)
        panel = json.loads((root / "panels/fold0.json").read_text())
        stores = {s: StorePaths(root / "samples" / s / "tokens.zarr", root / "samples" / s / "tiles.zarr")
                  for s in split["sample_id"].unique()}
        print(f"# cohort of {n} tiles built in {time.perf_counter() - t0:.1f} s ({a.genes} genes, {a.core} core)")
        for workers in (0, 2):
            for fmt in ("dense", "coo"):
                ld = make_loader(split, panel, stores, "fit", batch_size=a.batch, shuffle=True, seed=0,
                                 num_workers=workers, token_format=fmt)
                rates = []
                for epoch in range(1 + a.epochs):  # epoch 0 (warm-up) includes worker start-up
                    t0 = time.perf_counter()
                    k = 0
                    for b in ld:
                        k += len(b["tile_id"])
                    rates.append(k / (time.perf_counter() - t0))
                    assert k == n
                rate = float(np.median(rates[1:]))
                per_core = rate / max(1, workers)
                print(f"workers={workers} tokens={fmt:5s}: {rate:7.0f} tiles/s ({per_core:.0f} tiles/s per worker "
                      f"core), batch {a.batch}, median of {a.epochs} epochs")
        ds = TileStream(split, panel, stores, "fit", batch_size=a.batch, images=False, tokens=False)
        t0 = time.perf_counter()
        k = sum(len(b["tile_id"]) for b in ds)
        print(f"tile-level only (no images/tokens): {k / (time.perf_counter() - t0):.0f} tiles/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
