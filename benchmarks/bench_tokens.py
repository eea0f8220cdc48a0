"""Pooling throughput and peak memory: transcript -> tile -> token on simulated samples.

    .venv/bin/python benchmarks/bench_tokens.py            # 20M and 60M transcripts
    .venv/bin/python benchmarks/bench_tokens.py --sizes 20 60 --area-mm 12

Each size runs in its own process (peak RSS per size). Transcripts are generated in
chunks of 2M (never all in memory) over a fixed slide area with 2 regions (different
affines); pooling time excludes generation. Prints transcripts/s (one core) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def one(n_million: float, area_mm: float, n_genes: int, chunk: int) -> dict:
    from morphomol import tokens
    from morphomol.geometry import Batch, TileGrid, um_to_patch_matrices
    from morphomol.tiling import count_cells, tile_stats

    he_mpp = 0.2125
    side_um = area_mm * 1000
    size = 512 * 0.5 / he_mpp
    inv0 = np.array([[1 / he_mpp, 0.0, 50.0], [0.0, 1 / he_mpp, 50.0], [0, 0, 1]])
    th = 0.004
    inv1 = np.array([[np.cos(th), -np.sin(th), 20.0], [np.sin(th), np.cos(th), -15.0], [0, 0, 1]]) @ inv0
    grid = TileGrid.covering((0, 0, side_um / he_mpp + 200, side_um / he_mpp + 200), size, size / 2)
    M, _ = um_to_patch_matrices(grid, [inv0, inv1])
    jj, ii = np.mgrid[: grid.ny, : grid.nx]
    ii, jj = ii.ravel(), jj.ravel()
    lut = np.arange(n_genes, dtype=np.int32)
    n = int(n_million * 1e6)
    gene_p = np.random.default_rng(0).dirichlet(np.full(n_genes, 0.3))
    cdf = np.cumsum(gene_p)

    def batches():
        rng = np.random.default_rng(1)
        for a in range(0, n, chunk):
            m = min(chunk, n - a)
            x = rng.uniform(0, side_um, m).astype(np.float32)
            y = rng.uniform(0, side_um, m).astype(np.float32)
            reg = (x > side_um / 2).astype(np.int32)
            g = np.searchsorted(cdf, rng.random(m)).clip(0, n_genes - 1).astype(np.int32)
            yield Batch(x, y, reg, g, lut)

    # warm the numba kernels on a tiny input (compile time is not throughput)
    small = next(iter([Batch(np.zeros(10, np.float32), np.zeros(10, np.float32), np.zeros(10, np.int32),
                             np.zeros(10, np.int32), lut)]))
    tokens.pool_patches([small], grid, ii[:1], jj[:1], M, n_genes)
    count_cells([small], grid, M, n_genes)

    t_gen = t_count = t_pool = 0.0
    # pass 1 (tile rule): counts per cell
    from morphomol.tiling import CellCounts, _count_kernel

    kern = _count_kernel()
    cc = CellCounts(np.zeros((grid.n_cell_y, grid.n_cell_x), np.int64), np.zeros((grid.n_cell_y, grid.n_cell_x, 2), np.int64),
                    np.zeros((grid.n_cell_y, grid.n_cell_x, n_genes), np.uint8))
    it = batches()
    while True:
        t0 = time.perf_counter()
        b = next(it, None)
        t1 = time.perf_counter()
        t_gen += t1 - t0
        if b is None:
            break
        kern(b.x, b.y, b.region, b.codes, b.lut, M, float(grid.n_patch_x), float(grid.n_patch_y), grid.s, cc.count,
             cc.region, cc.gene)
        t_count += time.perf_counter() - t1
    n_tx, _, _ = tile_stats(cc, grid)
    keep = n_tx[jj, ii] >= 1000
    ti, tj = ii[keep], jj[keep]
    # pass 2 (tokens rule): pooling
    pm, npatch = tokens.kept_patch_map(grid, ti, tj)
    acc = tokens.PatchAccumulator(grid, pm, npatch, n_genes, M)
    it = batches()
    while True:
        t0 = time.perf_counter()
        b = next(it, None)
        t1 = time.perf_counter()
        t_gen += t1 - t0
        if b is None:
            break
        acc.add(b.x, b.y, b.region, b.codes, b.lut)
        t_pool += time.perf_counter() - t1
    t_add = t_pool
    t1 = time.perf_counter()
    pc = acc.result()
    t_pool += time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # streaming passes + patch CSR
    # tile CSR for the first 1000 tiles (the rule builds it chunk by chunk while writing zarr)
    t1 = time.perf_counter()
    sub = slice(0, 1000)
    indptr, tok, gn, cnt, tc = tokens.tile_tokens(pc, pm, grid, ti[sub], tj[sub], n_genes)
    t_tiles = (time.perf_counter() - t1) * len(ti) / len(ti[sub])
    assert int(tc.sum()) == int(n_tx[tj[sub], ti[sub]].sum())
    return {"n_transcripts": n, "tiles_kept": int(len(ti)), "patch_gene_nnz": int(len(pc.gene)),
            "token_nnz_per_tile": float(indptr[-1]) / len(ti[sub]), "flushes": acc.n_flushes,
            "count_pass_tx_per_s": n / t_count, "finalize_s": t_pool - t_add, "add_tx_per_s": n / t_add, "pool_pass_tx_per_s": n / t_pool,
            "tile_csr_build_s": t_tiles, "generation_s": t_gen, "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[20, 60], help="millions of transcripts")
    ap.add_argument("--area-mm", type=float, default=10.0, help="slide side (mm)")
    ap.add_argument("--genes", type=int, default=380)
    ap.add_argument("--chunk", type=int, default=2_000_000)
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.area_mm, a.genes, a.chunk)))
        return
    print(f"# pooling benchmark: {a.area_mm:g} mm x {a.area_mm:g} mm, {a.genes} genes, 2 regions, 1 core")
    for s in a.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(s), "--area-mm", str(a.area_mm), "--genes",
                              str(a.genes), "--chunk", str(a.chunk)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n_transcripts'] / 1e6:5.0f}M transcripts: count pass {r['count_pass_tx_per_s'] / 1e6:6.1f} M/s, "
              f"pool pass {r['pool_pass_tx_per_s'] / 1e6:6.1f} M/s (streaming {r['add_tx_per_s'] / 1e6:.1f} M/s + "
              f"finalize {r['finalize_s']:.2f} s, flushes {r['flushes']}), "
              f"tiles {r['tiles_kept']}, patch-gene nnz {r['patch_gene_nnz'] / 1e6:.1f}M, "
              f"token entries/tile {r['token_nnz_per_tile']:.0f}, tile CSR (all tiles, est.) {r['tile_csr_build_s']:.2f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
