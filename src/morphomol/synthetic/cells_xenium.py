"""A simulated Xenium-like sample of the cells study: bundle files, cell groups, H&E and alignment matrix.

Written files (keys of ``out``): ``matrix`` (``cell_feature_matrix.h5``, 10x HDF5: features x barcodes
CSC with gene-expression features and a few negative control probes), ``cells`` (``cells.parquet``),
``transcripts`` (``transcripts.parquet``, one row per count near the cell centroid), ``experiment``
(``experiment.xenium``), ``groups`` (Xenium Explorer cell-groups CSV ``cell_id,group,color``), ``he``
(H&E TIFF with its µm/px) and ``alignment`` (headerless 3x3, H&E px -> morphology px, 10x convention).

Morphology: every type has its own nucleus (size, elongation, darkness, eccentricity) and cytoplasm
(extent, colour, granules) in the H&E: lymphocytes small round dark nuclei with scant cytoplasm (the T,
NK and B subsets look alike, as in real H&E), plasma cells eccentric nuclei in amphophilic cytoplasm,
macrophages large pale cytoplasm, fibroblasts and endothelial cells spindle nuclei, mast cells purple
granules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.synthetic.cells import CELL_TYPES, TYPES, UNASSIGNED, _rng, simulate_expression, xenium_panel
from morphomol.util.atomic import atomic_path

PIXEL_SIZE = 0.2125  # µm per morphology pixel (Xenium)
#: type -> nucleus (a, b µm, darkness, eccentric offset µm), cytoplasm (a, b µm), cytoplasm RGB, granules
MORPHOLOGY: dict[str, tuple[tuple[float, float, float, float], tuple[float, float], tuple[int, int, int], float]] = {
    "CD4 T cell": ((3.0, 2.8, 1.0, 0.0), (3.6, 3.4), (200, 160, 200), 0.0),
    "CD8 T cell": ((3.0, 2.8, 1.0, 0.0), (3.6, 3.4), (200, 160, 200), 0.0),
    "Regulatory T cell": ((3.0, 2.8, 1.0, 0.0), (3.6, 3.4), (200, 160, 200), 0.0),
    "NK cell": ((3.2, 3.0, 0.95, 0.0), (4.4, 4.2), (205, 165, 205), 0.15),
    "B cell": ((3.1, 2.9, 1.0, 0.0), (3.7, 3.5), (200, 160, 200), 0.0),
    "Plasma cell": ((2.8, 2.6, 1.0, 2.2), (5.6, 4.2), (175, 120, 185), 0.0),
    "Monocyte": ((4.2, 2.9, 0.75, 0.6), (6.2, 5.6), (210, 190, 215), 0.0),
    "Macrophage": ((3.8, 3.0, 0.7, 1.0), (9.0, 7.6), (235, 200, 225), 0.0),
    "Dendritic cell": ((4.6, 2.0, 0.8, 0.0), (6.4, 3.6), (220, 195, 220), 0.0),
    "Mast cell": ((2.9, 2.9, 0.9, 0.0), (6.2, 5.6), (150, 95, 170), 0.6),
    "Fibroblast": ((7.0, 1.4, 0.9, 0.0), (9.5, 2.2), (235, 150, 190), 0.0),
    "Endothelial cell": ((6.0, 1.2, 0.85, 0.0), (8.0, 1.7), (240, 175, 205), 0.0),
}
HEMATOXYLIN = np.array([70.0, 35.0, 115.0])
BACKGROUND_RGB = np.array([238.0, 205.0, 225.0])


def _place(r: np.random.Generator, n: int, side: float, min_dist: float) -> np.ndarray:
    """Up to ``n`` points in [m, side - m]^2 at least ``min_dist`` apart (dart throwing on a grid)."""
    m = 8.0
    pts: list[tuple[float, float]] = []
    cell = min_dist / math.sqrt(2)
    grid: dict[tuple[int, int], tuple[float, float]] = {}
    for _ in range(n * 60):
        if len(pts) >= n:
            break
        x, y = r.uniform(m, side - m, 2)
        gi, gj = int(x // cell), int(y // cell)
        ok = True
        for di in range(-2, 3):
            for dj in range(-2, 3):
                q = grid.get((gi + di, gj + dj))
                if q is not None and (q[0] - x) ** 2 + (q[1] - y) ** 2 < min_dist**2:
                    ok = False
        if ok:
            grid[(gi, gj)] = (x, y)
            pts.append((x, y))
    return np.asarray(pts, float).reshape(-1, 2)


def he_affine(field_um: float, he_mpp: float, rotation_deg: float = 3.0) -> np.ndarray:
    """H&E level-0 px -> Xenium µm (3x3): rotation + scale ``he_mpp`` + an offset of 30 µm."""
    th = math.radians(rotation_deg)
    c, s = math.cos(th) * he_mpp, math.sin(th) * he_mpp
    return np.array([[c, -s, -30.0], [s, c, -30.0], [0.0, 0.0, 1.0]])


def _ellipse(img: np.ndarray, cx: float, cy: float, a: float, b: float, phi: float, rgb: np.ndarray, alpha: float,
             grain: np.ndarray | None = None) -> None:
    """Alpha-blend a soft-edged ellipse (px) into ``img`` (float RGB) in place."""
    h, w = img.shape[:2]
    rr = int(math.ceil(max(a, b))) + 2
    x0, x1 = max(0, int(cx) - rr), min(w, int(cx) + rr + 1)
    y0, y1 = max(0, int(cy) - rr), min(h, int(cy) + rr + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    u = (dx * math.cos(phi) + dy * math.sin(phi)) / a
    v = (-dx * math.sin(phi) + dy * math.cos(phi)) / b
    d = np.sqrt(u * u + v * v)
    m = np.clip((1.15 - d) / 0.3, 0.0, 1.0) * alpha
    if grain is not None:
        m = m * grain[: m.shape[0], : m.shape[1]]
    patch = img[y0:y1, x0:x1]
    patch += m[..., None] * (rgb[None, None, :] - patch)


def render_he(centres_he: np.ndarray, types: np.ndarray, *, size_px: tuple[int, int], he_mpp: float,
              r: np.random.Generator) -> np.ndarray:
    """RGB uint8 H&E of the cells (centres in H&E px, type index per cell)."""
    w, h = size_px
    from scipy import ndimage

    tex = ndimage.gaussian_filter(r.standard_normal((h, w)), 6.0)
    tex /= tex.std() + 1e-9
    img = BACKGROUND_RGB[None, None, :] + 6.0 * tex[..., None] * np.array([0.3, 1.0, 0.6])[None, None, :]
    stain = float(np.exp(r.normal(0, 0.05)))
    for (cx, cy), t in zip(centres_he, types, strict=True):
        (na, nb, dark, ecc), (ca, cb), crgb, gran = MORPHOLOGY[CELL_TYPES[int(t)]]
        phi = float(r.uniform(0, math.pi))
        jit = float(np.exp(r.normal(0, 0.08)))
        _ellipse(img, cx, cy, ca * jit / he_mpp, cb * jit / he_mpp, phi, np.asarray(crgb, float), 0.85)
        if gran > 0:
            g = (r.random((64, 64)) < gran).astype(float)
            _ellipse(img, cx, cy, ca * jit / he_mpp, cb * jit / he_mpp, phi, np.array([95.0, 45.0, 130.0]), 0.8, g)
        ox, oy = ecc * math.cos(phi) / he_mpp, ecc * math.sin(phi) / he_mpp
        rgb = 255.0 - (255.0 - HEMATOXYLIN) * dark * stain
        _ellipse(img, cx + ox, cy + oy, na * jit / he_mpp, nb * jit / he_mpp, phi, rgb, 0.95)
    img += r.normal(0, 3.0, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _write_tiff(path: Path, img: np.ndarray, mpp: float, sample: str) -> None:
    import tifffile

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        tif.write(img, photometric="rgb", tile=(256, 256), compression="zlib", resolutionunit="CENTIMETER",
                  resolution=(1e4 / mpp, 1e4 / mpp), description=f"morphomol simulated cells H&E {sample} |MPP = {mpp}",
                  software=False, metadata=None)


def _write_10x_h5(path: Path, counts: np.ndarray, genes: list[str], barcodes: list[str], controls: np.ndarray,
                  control_names: list[str]) -> None:
    """10x HDF5 feature-barcode matrix (features x barcodes, CSC by barcode)."""
    import h5py
    import scipy.sparse as sp

    full = np.concatenate([counts, controls], axis=1)
    names = genes + control_names
    types = ["Gene Expression"] * len(genes) + ["Negative Control Probe"] * len(control_names)
    m = sp.csc_matrix(full.T.astype(np.float64))  # features x barcodes
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data
        g["indices"] = m.indices.astype(np.int32)
        g["indptr"] = m.indptr.astype(np.int32)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array([f"SIM_{i:05d}" for i in range(len(names))], dtype="S")
        ft["name"] = np.array(names, dtype="S")
        ft["feature_type"] = np.array(types, dtype="S")
        ft["genome"] = np.array(["Unknown"] * len(names), dtype="S")
        ft["_all_tag_keys"] = np.array(["genome"], dtype="S")


def write_xenium_sample(out: Mapping[str, str | Path], *, seed: int, sample: str, donor: str, n_cells: int,
                        field_um: float = 400.0, he_mpp: float = 0.5, library_size: float = 220.0) -> dict[str, Any]:
    """Write one Xenium-like sample (files named by ``out``, see the module docstring)."""
    r = _rng(seed, "xenium", sample)
    xy = _place(r, n_cells, field_um, min_dist=15.0)
    n = len(xy)
    expr = simulate_expression(seed, [donor], n, genes=xenium_panel(), library_size=library_size, key=sample)
    barcodes = [f"{sample.lower()}c{i:05d}-1" for i in range(n)]
    ctrl_names = [f"NegControlProbe_{i:05d}" for i in range(3)]
    controls = r.poisson(0.05, (n, len(ctrl_names))).astype(np.int32)
    paths = {k: Path(v) for k, v in out.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    _write_10x_h5(paths["matrix"], expr.counts, expr.genes, barcodes, controls, ctrl_names)
    tc = expr.counts.sum(1)
    cells = pd.DataFrame({"cell_id": barcodes, "x_centroid": xy[:, 0], "y_centroid": xy[:, 1],
                          "transcript_counts": tc.astype(np.int32),
                          "control_probe_counts": controls.sum(1).astype(np.int32),
                          "total_counts": (tc + controls.sum(1)).astype(np.int32),
                          "cell_area": r.uniform(40, 160, n), "nucleus_area": r.uniform(15, 50, n)})
    with atomic_path(paths["cells"]) as tmp:
        cells.to_parquet(tmp, index=False)
    # transcripts: one row per count, near the centroid
    cell_idx, gene_idx = np.nonzero(expr.counts)
    reps = expr.counts[cell_idx, gene_idx]
    ci, gi = np.repeat(cell_idx, reps), np.repeat(gene_idx, reps)
    tx = pd.DataFrame({"transcript_id": np.arange(len(ci), dtype=np.uint64) + 281474976710656,
                       "cell_id": np.asarray(barcodes, object)[ci],
                       "overlaps_nucleus": (r.random(len(ci)) < 0.6).astype(np.uint8),
                       "feature_name": np.asarray(expr.genes, object)[gi],
                       "x_location": (xy[ci, 0] + r.normal(0, 2.5, len(ci))).astype(np.float32),
                       "y_location": (xy[ci, 1] + r.normal(0, 2.5, len(ci))).astype(np.float32),
                       "z_location": r.uniform(10, 20, len(ci)).astype(np.float32),
                       "qv": np.full(len(ci), 40.0, np.float32)})
    with atomic_path(paths["transcripts"]) as tmp:
        tx.to_parquet(tmp, index=False)
    doc = {"major_version": 5, "minor_version": 0, "run_name": f"morphomol-cells-sim-{donor}", "region_name": sample,
           "num_cells": n, "pixel_size": PIXEL_SIZE, "panel_name": "morphomol simulated immune/stromal panel",
           "panel_num_targets_predesigned": len(expr.genes), "analysis_sw_version": "morphomol.simulate"}
    with atomic_path(paths["experiment"]) as tmp:
        tmp.write_text(json.dumps(doc, indent=4) + "\n")
    # cell groups (Xenium Explorer export); a few cells left unassigned
    labels = np.array([TYPES[CELL_TYPES[t]][2] for t in expr.types], dtype=object)
    labels[r.random(n) < 0.03] = UNASSIGNED
    groups = pd.DataFrame({"cell_id": barcodes, "group": labels, "color": "#888888"})
    with atomic_path(paths["groups"]) as tmp:
        groups.to_csv(tmp, index=False)
    # H&E in its own pixel frame + the 10x alignment matrix (H&E px -> morphology px)
    a = he_affine(field_um, he_mpp)
    inv = np.linalg.inv(a)
    centres = (inv @ np.c_[xy, np.ones(n)].T).T[:, :2]
    side = int(math.ceil((field_um + 60.0) / he_mpp))
    img = render_he(centres, expr.types, size_px=(side, side), he_mpp=he_mpp, r=r)
    _write_tiff(paths["he"], img, he_mpp, sample)
    m = np.diag([1 / PIXEL_SIZE, 1 / PIXEL_SIZE, 1.0]) @ a
    with atomic_path(paths["alignment"]) as tmp:
        tmp.write_text("\n".join(",".join(f"{v:.10g}" for v in row) for row in m) + "\n")
    return {"sample": sample, "kind": "xenium", "donors": [donor], "n_cells": n, "he_px": side}
