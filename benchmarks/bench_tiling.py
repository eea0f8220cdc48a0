"""Tiles written per second per core from a pyramidal slide, and the tiles.zarr codec choice.

    .venv/bin/python benchmarks/bench_tiling.py [--side 8192] [--mpp 0.25]

Makes a synthetic pyramidal TIFF (tiled JPEG IFDs, reduced levels subfiletype=1,
resolution in cm — OpenSlide's generic-tiff) from a real H&E tile mosaic when available,
then reads 512 px @ 0.5 µm/px tiles (stride 256) resampled to 224 px and writes them with
each codec (none / Blosc lz4 / Blosc zstd-1, byte shuffle). Prints write tiles/s,
whole-chunk read tiles/s and store size per codec.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def mosaic(side: int) -> np.ndarray:
    from PIL import Image

    src = None
    for p in (ROOT.parent / "shared/data/he_images/target_image.png", ROOT / "tests/data/he_images/target_image.png"):
        if p.exists():
            src = np.asarray(Image.open(p).convert("RGB"))
            break
    if src is None:
        rng = np.random.default_rng(0)
        src = (rng.normal(0, 20, (1000, 1000, 3)) + [200, 120, 180]).clip(0, 255).astype(np.uint8)
    reps = (side // src.shape[0] + 1, side // src.shape[1] + 1, 1)
    img = np.tile(src, reps)[:side, :side]
    img[:, : side // 8] = 245  # some background
    return np.ascontiguousarray(img)


def main() -> None:
    import zarr

    from morphomol.io.he import open_slide
    from morphomol.geometry import TileGrid
    from morphomol.tiling import ChunkWriter, TileReader, create_image_array, write_pyramidal_tiff

    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--chunk", type=int, default=64)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    try:
        t0 = time.perf_counter()
        write_pyramidal_tiff(tmp / "slide.tif", mosaic(a.side), a.mpp, n_levels=4, tile=512)
        print(f"# synthetic slide {a.side}x{a.side} px @ {a.mpp} µm/px written in {time.perf_counter() - t0:.1f} s")
        slide = open_slide(tmp / "slide.tif")
        print(f"# opened with backend={slide.backend}, levels={slide.level_count}, mpp={slide.mpp:.3f}")
        size = 512 * 0.5 / slide.mpp
        g = TileGrid.covering((0, 0, a.side, a.side), size, size / 2)
        jj, ii = np.mgrid[: g.ny, : g.nx]
        xs, ys = g.tile_origin(ii.ravel(), jj.ravel())
        n = len(xs)
        reader = TileReader(slide, size, 224)
        t0 = time.perf_counter()
        imgs = np.concatenate([reader.read_row(xs[r * g.nx:(r + 1) * g.nx], float(ys[r * g.nx])) for r in range(g.ny)])
        t_read = time.perf_counter() - t0
        print(f"read+resample: {n} tiles (level {reader.level}, {size:.0f} px -> 224) in {t_read:.2f} s = "
              f"{n / t_read:.0f} tiles/s/core")
        for codec in ("none", "lz4", "zstd1"):
            p = tmp / f"{codec}.zarr"
            t0 = time.perf_counter()
            _, arr = create_image_array(p, n, 224, a.chunk, codec, {"sample": "bench"})
            w = ChunkWriter(arr, a.chunk)
            w.add(imgs)
            w.flush()
            t_w = time.perf_counter() - t0
            nbytes = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            arr = zarr.open_group(str(p), mode="r")["images"]
            t0 = time.perf_counter()
            for rep in range(3):
                for c0 in range(0, n, a.chunk):
                    _ = arr[c0:c0 + a.chunk]
            t_r = (time.perf_counter() - t0) / 3
            print(f"codec {codec:6s}: write {n / t_w:8.0f} tiles/s, whole-chunk read {n / t_r:8.0f} tiles/s, "
                  f"size {nbytes / n / 1024:6.1f} KiB/tile ({imgs[0].nbytes / (nbytes / n):.2f}x), "
                  f"end-to-end tile rule ≈ {n / (t_read + t_w):.0f} tiles/s/core")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
