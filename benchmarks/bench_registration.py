"""Benchmark: registration of a large pyramidal H&E slide + DAPI (landmarks, then + refinement).

Synthesises (once, cached in --workdir) a Xenium bundle with a 0.2125 µm/px DAPI OME-TIFF
pyramid (SubIFDs, deflate) and a >= 20k x 20k px H&E at 0.25 µm/px (tiled JPEG, pyramid as
IFDs, opened by OpenSlide), both written tile by tile so the generator never holds a full
resolution image either. Then times ``register_sample`` with keypoints + two GeoJSON regions:

* refine=never  (landmark fits, LOO residuals, transcript bbox, QC PNG)
* refine=always (+ image refinement at refine_mpp from pyramid levels)

and prints wall time, peak RSS (ru_maxrss of the run, in a fresh subprocess each) and the
pyramid levels read. Usage::

    .venv/bin/python benchmarks/bench_registration.py [--size 20480] [--workdir /tmp/morphomol_bench_reg]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PIXEL_SIZE = 0.2125
HE_MPP = 0.25
TILE = 512
_H_OD = np.array([0.65, 0.70, 0.29], np.float32)
_E_OD = np.array([0.07, 0.99, 0.11], np.float32)


def truth_matrix(size_px: int) -> np.ndarray:
    """H&E level-0 px -> Xenium µm: 3° rotation, 0.25 µm/px, shifted."""
    t = math.radians(3.0)
    c = size_px * HE_MPP / 2
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]])
    sc = np.diag([HE_MPP, HE_MPP, 1.0])
    return np.array([[1, 0, c + 40.0], [0, 1, c - 25.0], [0, 0, 1]]) @ rot @ np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]]) @ sc


def density_um(extent_um: float, rng: np.random.Generator) -> np.ndarray:
    """Nuclei density image on a 1 µm grid (pixel k covers [k, k+1) µm)."""
    from scipy import ndimage

    n = int(extent_um)
    yy, xx = np.mgrid[0:n:8, 0:n:8].astype(np.float32)
    c = n / 2
    r = np.hypot(xx - c, yy - c) / (0.42 * n)
    ang = np.arctan2(yy - c, xx - c)
    tissue_small = r < 1.0 + 0.08 * np.sin(5 * ang) + 0.05 * np.cos(3 * ang)
    tissue = np.kron(tissue_small, np.ones((8, 8), bool))[:n, :n]
    n_nuc = int(n * n / 90)
    pts = rng.uniform(0, n, (n_nuc, 2))
    holes = rng.uniform(0, n, (int(n * n / 4e4), 2))
    from scipy.spatial import cKDTree

    d, _ = cKDTree(holes).query(pts)
    ix, iy = pts[:, 0].astype(int), pts[:, 1].astype(int)
    keep = tissue[iy, ix] & (d > 30)
    img = np.zeros((n, n), np.float32)
    np.add.at(img, (iy[keep], ix[keep]), 1.0)
    img = ndimage.gaussian_filter(img, 2.5)
    img /= np.percentile(img[img > 0], 99.5)
    return np.clip(img, 0, 1.5), pts[keep], tissue


def write_dapi(path: Path, dens: np.ndarray, w0: int, h0: int, n_levels: int) -> None:
    import tifffile

    def level_tiles(lv: int):
        f = 2**lv
        w, h = w0 // f, h0 // f
        for ty in range(0, h, TILE):
            yc = ((np.arange(ty, ty + TILE) + 0.5) * f - 0.5) * PIXEL_SIZE
            iy = np.clip(yc.astype(int), 0, dens.shape[0] - 1)
            for tx in range(0, w, TILE):
                xc = ((np.arange(tx, tx + TILE) + 0.5) * f - 0.5) * PIXEL_SIZE
                ix = np.clip(xc.astype(int), 0, dens.shape[1] - 1)
                yield (dens[iy[:, None], ix[None, :]] * 20000 + 200).astype(np.uint16)

    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(level_tiles(0), shape=(h0, w0), dtype=np.uint16, tile=(TILE, TILE), compression="zlib",
                 subifds=n_levels - 1, metadata={"axes": "YX", "PhysicalSizeX": PIXEL_SIZE, "PhysicalSizeY": PIXEL_SIZE})
        for lv in range(1, n_levels):
            f = 2**lv
            tw.write(level_tiles(lv), shape=(h0 // f, w0 // f), dtype=np.uint16, tile=(TILE, TILE),
                     compression="zlib", subfiletype=1)


def write_he(path: Path, dens: np.ndarray, size: int, truth: np.ndarray, rng: np.random.Generator) -> None:
    """H&E: level 2 (1 µm/px in the H&E frame) rendered through the truth affine; level 0/1 are
    its nearest upsampling plus grain, levels 3+ block means."""
    import tifffile
    from scipy import ndimage

    f2 = 4
    n2 = size // f2
    jj = (np.arange(n2) + 0.5) * f2 - 0.5
    lvl2 = np.empty((n2, n2, 3), np.uint8)
    for r0 in range(0, n2, 512):
        gy, gx = np.meshgrid(jj[r0:r0 + 512], jj, indexing="ij")
        ux = truth[0, 0] * gx + truth[0, 1] * gy + truth[0, 2]
        uy = truth[1, 0] * gx + truth[1, 1] * gy + truth[1, 2]
        h = ndimage.map_coordinates(dens, [uy - 0.5, ux - 0.5], order=1, cval=0.0)
        tis = (h > 0).astype(np.float32)
        tis = ndimage.uniform_filter(ndimage.maximum_filter(tis, 9), 9)
        od = h[..., None] * _H_OD * 0.9 + tis[..., None] * _E_OD * 0.25
        lvl2[r0:r0 + 512] = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)
    grain = rng.normal(0, 4, (TILE, TILE, 3)).astype(np.float32)

    def up_tiles(f: int):
        n = size // f
        for ty in range(0, n, TILE):
            iy = np.clip((np.arange(ty, ty + TILE) * f) // f2, 0, n2 - 1)
            for tx in range(0, n, TILE):
                ix = np.clip((np.arange(tx, tx + TILE) * f) // f2, 0, n2 - 1)
                t = lvl2[iy[:, None], ix[None, :]].astype(np.float32) + grain
                yield np.clip(t, 0, 255).astype(np.uint8)

    levels = [lvl2]
    while min(levels[-1].shape[:2]) > 1024:
        a = levels[-1]
        hh, ww = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        levels.append(a[:hh, :ww].reshape(hh // 2, 2, ww // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    res = 1e4 / HE_MPP
    kw = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 85}, resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(up_tiles(1), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), resolution=(res, res), **kw)
        tw.write(up_tiles(2), shape=(size // 2, size // 2, 3), dtype=np.uint8, tile=(TILE, TILE),
                 resolution=(res / 2, res / 2), subfiletype=1, **kw)
        for i, a in enumerate(levels):
            tw.write(a, tile=(TILE, TILE), resolution=(res / 4 / 2**i, res / 4 / 2**i), subfiletype=1, **kw)


def synthesise(work: Path, size: int, seed: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_path = work / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("size") == size:
            return meta
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    extent = size * HE_MPP  # µm
    truth = truth_matrix(size)
    dens, nuclei, tissue = density_um(extent, rng)
    xen = work / "xenium"
    xen.mkdir(exist_ok=True)
    (xen / "experiment.xenium").write_text(json.dumps({"pixel_size": PIXEL_SIZE, "run_name": "bench"}))
    w0 = h0 = int(extent / PIXEL_SIZE)
    n_levels = 1
    while max(w0, h0) // 2 ** (n_levels - 1) > 1024:
        n_levels += 1
    write_dapi(xen / "morphology_focus.ome.tif", dens, w0, h0, n_levels)
    k = np.repeat(nuclei, 3, axis=0) + rng.normal(0, 2.0, (3 * len(nuclei), 2))
    genes = np.array([f"G{i:02d}" for i in range(40)])[rng.integers(0, 40, len(k))]
    pq.write_table(pa.table({"feature_name": genes, "x_location": k[:, 0].astype(np.float32),
                             "y_location": k[:, 1].astype(np.float32),
                             "qv": np.full(len(k), 35.0, np.float32)}), xen / "transcripts.parquet",
                   row_group_size=1_000_000)
    write_he(work / "he.tif", dens, size, truth, rng)
    # two regions (left/right halves of the tissue), 15 landmarks each, 2 µm click noise
    c = extent / 2
    polys = {"left": [[0, 0], [c, 0], [c, extent], [0, extent]], "right": [[c, 0], [extent, 0], [extent, extent], [c, extent]]}
    feats = [{"type": "Feature", "properties": {"name": n}, "geometry": {"type": "Polygon", "coordinates": [p + [p[0]]]}}
             for n, p in polys.items()]
    (work / "regions.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    inv = np.linalg.inv(truth)
    rows = ["fixedX,fixedY,alignmentX,alignmentY,region"]
    ty, tx = np.nonzero(tissue[::16, ::16])
    for name, (x_lo, x_hi) in (("left", (0, c)), ("right", (c, extent))):
        cand = np.column_stack([tx, ty]) * 16.0 + 8
        cand = cand[(cand[:, 0] > x_lo + 200) & (cand[:, 0] < x_hi - 200)]
        pick = cand[rng.choice(len(cand), 15, replace=False)]
        for ux, uy in pick:
            hx = inv[0, 0] * ux + inv[0, 1] * uy + inv[0, 2]
            hy = inv[1, 0] * ux + inv[1, 1] * uy + inv[1, 2]
            nx, ny = rng.normal(0, 2.0, 2)
            rows.append(f"{(ux + nx) / PIXEL_SIZE:.3f},{(uy + ny) / PIXEL_SIZE:.3f},{hx:.3f},{hy:.3f},{name}")
    (work / "keypoints.csv").write_text("\n".join(rows) + "\n")
    meta = {"size": size, "truth": truth.tolist(), "dapi_px": [w0, h0], "dapi_levels": n_levels,
            "n_transcripts": int(len(k)), "extent_um": extent, "polys": polys,
            "synth_seconds": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta))
    return meta


def _peak_rss_kb() -> float:
    """VmHWM of this process (reset by exec, unlike ru_maxrss, which a child inherits at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_one(work: Path, refine: str) -> None:
    """Child process: one registration; prints a JSON line with the figures."""
    from morphomol.util.logs import setup_logging
    from morphomol.registration import register_sample

    setup_logging(work / f"register_{refine}.log")
    logging.getLogger("morphomol").handlers[0].setLevel(logging.WARNING)
    meta = json.loads((work / "meta.json").read_text())
    t0 = time.perf_counter()
    reg = register_sample(xenium=work / "xenium", he=work / "he.tif", alignment=work / "keypoints.csv",
                          regions=work / "regions.geojson", out_json=work / f"out_{refine}/registration.json",
                          out_qc=work / f"out_{refine}/registration_qc.png", sample="bench", refine=refine,
                          refine_mpp=4.0)
    dt = time.perf_counter() - t0
    truth = np.array(meta["truth"])
    errs = []
    for r in reg.regions:
        p = np.array(r.polygon_um)
        lo, hi = p.min(axis=0) + 300, p.max(axis=0) - 300
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 20), np.linspace(lo[1], hi[1], 20))
        inv = np.linalg.inv(truth)
        hx = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
        hy = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
        ux = r.matrix[0, 0] * hx + r.matrix[0, 1] * hy + r.matrix[0, 2]
        uy = r.matrix[1, 0] * hx + r.matrix[1, 1] * hy + r.matrix[1, 2]
        errs.append(float(np.sqrt(np.mean((ux - gx) ** 2 + (uy - gy) ** 2))))
    levels = [ln.split(": ", 1)[1] for ln in (work / f"register_{refine}.log").read_text().splitlines()
              if "for refinement:" in ln]
    print(json.dumps({"refine": refine, "seconds": round(dt, 2),
                      "peak_rss_mb": round(_peak_rss_kb() / 1024, 1),
                      "truth_rms_um": [round(e, 3) for e in errs], "lm_rms_um": [round(r.rms_um, 3) for r in reg.regions],
                      "ncc": [None if r.refine_score_before is None else [round(r.refine_score_before, 3), round(r.refine_score_after, 3)]
                              for r in reg.regions],
                      "levels": sorted(set(levels))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20480, help="H&E level-0 side in px (>= 20000 for the figure)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/morphomol_bench_reg"))
    ap.add_argument("--child", choices=["never", "always"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        run_one(a.workdir, a.child)
        return
    t0 = time.perf_counter()
    meta = synthesise(a.workdir, a.size)
    he_mb = (a.workdir / "he.tif").stat().st_size / 2**20
    dapi_mb = (a.workdir / "xenium/morphology_focus.ome.tif").stat().st_size / 2**20
    print(f"synthetic sample: H&E {a.size}x{a.size} px @ {HE_MPP} µm/px ({he_mb:.0f} MiB JPEG, raw "
          f"{a.size * a.size * 3 / 2**30:.2f} GiB), DAPI {meta['dapi_px'][0]}x{meta['dapi_px'][1]} px @ {PIXEL_SIZE} µm/px "
          f"({meta['dapi_levels']} levels, {dapi_mb:.0f} MiB, raw {meta['dapi_px'][0] * meta['dapi_px'][1] * 2 / 2**30:.2f} GiB), "
          f"{meta['n_transcripts']:,} transcripts; synthesis {meta['synth_seconds']} s "
          f"(this run {time.perf_counter() - t0:.1f} s)")
    for refine in ("never", "always"):
        out = subprocess.run([sys.executable, __file__, "--workdir", str(a.workdir), "--child", refine],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stdout, out.stderr)
            raise SystemExit(out.returncode)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"refine={refine:6s}: {res['seconds']:7.2f} s/sample, peak RSS {res['peak_rss_mb']:7.1f} MiB, "
              f"landmark LOO RMS {res['lm_rms_um']} µm, error vs truth {res['truth_rms_um']} µm, "
              f"NCC before/after {res['ncc']}")
        for lv in res["levels"]:
            print(f"    read: {lv}")


if __name__ == "__main__":
    main()
