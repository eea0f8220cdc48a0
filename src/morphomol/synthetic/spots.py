"""Simulated Visium sections with paired H&E, written in the real Space Ranger layout (demo / tests).

One sample = one section of ``tissue_um`` µm::

    outs/filtered_feature_bc_matrix.h5        10x HDF5 v3 (in-tissue spots x genes)
    outs/spatial/tissue_positions.csv         Space Ranger >= 2.0 (header; every array spot of the field)
    outs/spatial/scalefactors_json.json       spot_diameter_fullres (65 µm theoretical spot), hires / lowres scale factors
    outs/spatial/tissue_hires_image.png, tissue_lowres_image.png
    he.tif                                    full-resolution H&E, tiled JPEG pyramid with its resolution
    captions.csv                              barcode, caption (a share of spots has none)
    truth.json, truth_spots.parquet           programs, gene roles, per-spot composition

Biology. Three cell types with a visible morphology (tumour, stroma, immune; :mod:`.spots_he`) whose
proportions follow smooth random fields (correlation length ``field_um``), plus an interferon-like
program with no morphology. Genes (names say their role): ``TUMOR_*``, ``STROMA_*``, ``IMMUNE_*``
markers follow their cell type's share at the spot (predictable from H&E); ``IFN_*`` follow the hidden
program (not predictable from H&E); ``HK_*`` follow library size only; ``NOISE_*`` carry spot-level
noise without spatial structure. Counts are negative binomial. Patient effects (composition shift,
per-gene factors, stain, depth) depend on ``(seed, patient_id)``, the rest on ``(seed, sample_id)``.

Visium geometry: 55 µm spots on a hexagonal grid with 100 µm centre-to-centre (row step 86.6 µm,
column step 50 µm, row + col even). Captions describe the cell composition of each spot's 112 µm
patch in words (dominant visible program, infiltrate density): honest, they only say what the
simulated H&E shows, never the hidden program.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from morphomol.errors import InputError
from morphomol.synthetic.spots_he import CellLayer, render_he
from morphomol.util.atomic import atomic_path

TYPES = ("tumour", "stroma", "immune")
#: gene groups: prefix, share of genes, role
GROUPS = (("TUMOR", 0.2, "tumour"), ("STROMA", 0.2, "stroma"), ("IMMUNE", 0.15, "immune"), ("IFN", 0.15, "ifn"),
          ("HK", 0.15, "housekeeping"), ("NOISE", 0.15, "noise"))
DEFAULTS: dict[str, Any] = {"seed": 0, "tissue_um": [2400, 2400], "he_mpp": 0.5, "n_genes": 200, "cell_density": 2500,
                            "depth": 3000, "field_um": 220, "caption_fraction": 0.95, "jpeg_quality": 88}
SPOT_UM, PITCH_UM, FULLRES_SPOT_UM = 55.0, 100.0, 65.0
GRID_UM = 10.0
OUTPUTS = ("outs/filtered_feature_bc_matrix.h5", "outs/spatial/tissue_positions.csv",
           "outs/spatial/scalefactors_json.json", "he.tif", "captions.csv", "truth.json")


def _rng(seed: int, *key: str) -> np.random.Generator:
    h = hashlib.sha256(("\0".join([str(seed), *key])).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-9)


def _lookup(grid: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    i = np.clip((np.asarray(y_um) / GRID_UM).astype(int), 0, grid.shape[0] - 1)
    j = np.clip((np.asarray(x_um) / GRID_UM).astype(int), 0, grid.shape[1] - 1)
    return grid[i, j]


def gene_names(n_genes: int) -> tuple[list[str], list[str]]:
    """(names, roles) of the simulated genes (group sizes by :data:`GROUPS` shares)."""
    sizes = [max(1, int(round(share * n_genes))) for _, share, _ in GROUPS]
    sizes[-1] = max(1, n_genes - sum(sizes[:-1]))
    names, roles = [], []
    for (prefix, _, role), k in zip(GROUPS, sizes):
        names += [f"{prefix}_{i + 1:02d}" for i in range(k)]
        roles += [role] * k
    return names, roles


def _barcode(row: int, col: int) -> str:
    h = hashlib.sha256(f"{row}:{col}".encode()).digest()
    return "".join("ACGT"[b & 3] for b in h[:16]) + "-1"


def _caption(frac: np.ndarray, dens: float, rng: np.random.Generator) -> str:
    """Words for a patch's visible composition (tumour, stroma, immune shares)."""
    t, s, i = frac
    tum = ["Sheets of atypical epithelial cells with enlarged crowded nuclei",
           "Solid tumour nests of pleomorphic cells with vesicular nuclei",
           "Crowded malignant epithelium with large nuclei"]
    stro = ["Fibrous eosinophilic stroma with sparse spindle-shaped nuclei",
            "Pink collagenous stroma with scattered elongated fibroblasts",
            "Loose fibrous connective tissue with spindle cells"]
    imm = ["Dense infiltrate of small round lymphocytes with dark nuclei",
           "Sheets of small hyperchromatic lymphoid cells",
           "Lymphocyte-rich area with densely packed small round nuclei"]
    parts = {0: tum, 1: stro, 2: imm}
    order = np.argsort(-frac)
    main = parts[int(order[0])][int(rng.integers(3))]
    second = int(order[1])
    if frac[second] > 0.25:
        tail = {0: "with adjacent tumour cell nests", 1: "bordered by fibrous stroma",
                2: "with a patchy lymphocytic infiltrate"}[second]
        text = f"{main} {tail}"
    elif i > 0.12 and order[0] != 2:
        text = f"{main} and scattered lymphocytes"
    else:
        text = main
    if dens < 0.6:
        text = "Sparsely cellular tissue: " + text[0].lower() + text[1:]
    return " ".join(text.split()[:25]) + "."


def simulate_spots_sample(out_dir: str | Path, *, sample_id: str, patient_id: str,
                          params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Simulate one section into ``out_dir`` (layout in the module docstring); returns a summary."""
    p = {**DEFAULTS, **(params or {})}
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown simulate key(s) {unknown}", field="simulate", expected=", ".join(DEFAULTS))
    seed, mpp = int(p["seed"]), float(p["he_mpp"])
    W_um, H_um = (float(v) for v in p["tissue_um"])
    rs, rp, rc = _rng(seed, "sample", sample_id), _rng(seed, "patient", patient_id), _rng(seed, "cohort")
    gy, gx = int(np.ceil(H_um / GRID_UM)), int(np.ceil(W_um / GRID_UM))
    sig = float(p["field_um"]) / GRID_UM
    # tissue: a smooth blob covering most of the field
    yy, xx = np.mgrid[0:gy, 0:gx]
    r = np.hypot((xx - gx / 2) / (gx / 2), (yy - gy / 2) / (gy / 2))
    tissue = ((r + 0.25 * _field(rs, (gy, gx), 3 * sig)) < 0.85).astype(np.float32)
    tissue = ndimage.gaussian_filter(tissue, 1.0)
    # programs: logits of the three visible cell types (+ patient shift), hidden interferon program
    shift = rp.normal(0, 0.5, 3)
    logits = np.stack([1.6 * _field(rs, (gy, gx), sig) + shift[k] for k in range(3)])
    prop = np.exp(logits - logits.max(axis=0))
    prop /= prop.sum(axis=0)
    ifn = _field(rs, (gy, gx), sig) + rp.normal(0, 0.3)
    density = float(p["cell_density"]) * (0.9 * prop[0] + 0.55 * prop[1] + 1.9 * prop[2]) * tissue  # per mm2
    # cells
    n_exp = density * (GRID_UM / 1000) ** 2
    n = rs.poisson(n_exp)
    gi, gj = np.nonzero(n)
    reps = n[gi, gj]
    cy = (np.repeat(gi, reps) + rs.random(reps.sum())) * GRID_UM
    cx = (np.repeat(gj, reps) + rs.random(reps.sum())) * GRID_UM
    cp = prop[:, np.repeat(gi, reps), np.repeat(gj, reps)]
    ctype = (rs.random(len(cx))[None, :] > np.cumsum(cp, axis=0)).sum(axis=0).clip(0, 2)
    orient = _field(rs, (gy, gx), sig) * 1.2
    phi = np.where(ctype == 1, _lookup(orient, cx, cy), rs.uniform(0, np.pi, len(cx)))
    cells = CellLayer(cx, cy, ctype, phi, np.exp(rs.normal(0, 0.12, len(cx))))
    eosin = (0.18 + 0.55 * prop[1] + 0.2 * prop[0] + 0.05 * prop[2]).astype(np.float32)
    # Visium grid over the field
    rows = np.arange(int(H_um / (PITCH_UM * np.sqrt(3) / 2)))
    grid = [(r_, c_) for r_ in rows for c_ in range(int(W_um / (PITCH_UM / 2))) if (r_ + c_) % 2 == 0]
    ar = np.array([g[0] for g in grid])
    ac = np.array([g[1] for g in grid])
    off = PITCH_UM / 2
    sx, sy = off + ac * PITCH_UM / 2, off + ar * PITCH_UM * np.sqrt(3) / 2
    keep = (sx < W_um - off / 2) & (sy < H_um - off / 2)
    ar, ac, sx, sy = ar[keep], ac[keep], sx[keep], sy[keep]
    in_tissue = _lookup(tissue, sx, sy) > 0.5
    # expression of in-tissue spots
    names, roles = gene_names(int(p["n_genes"]))
    roles_a = np.array(roles)
    G = len(names)
    base = np.exp(rc.normal(0, 0.8, G))
    W = np.full((3, G), 0.03)
    for k, role in enumerate(TYPES):
        W[k, roles_a == role] = 1.0
    W[:, np.isin(roles_a, ["ifn", "housekeeping", "noise"])] = 1.0
    beta = np.where(roles_a == "ifn", rc.uniform(0.8, 1.4, G), 0.0)
    pat_gene = np.exp(rp.normal(0, 0.15, G))
    depth = float(p["depth"]) * np.exp(rp.normal(0, 0.15)) * np.exp(rs.normal(0, 0.1))
    ti = np.flatnonzero(in_tissue)
    fr = np.stack([_lookup(prop[k], sx[ti], sy[ti]) for k in range(3)], axis=1)
    dens_s = _lookup(density, sx[ti], sy[ti]) / float(p["cell_density"])
    lib = depth * (0.5 + 0.5 * np.clip(dens_s, 0, 2)) * np.exp(rs.normal(0, 0.2, len(ti)))
    rel = base * pat_gene * (fr @ W) * np.exp(beta * _lookup(ifn, sx[ti], sy[ti])[:, None])
    rel[:, roles_a == "noise"] *= np.exp(rs.normal(0, 0.8, (len(ti), int((roles_a == "noise").sum()))))
    mu = lib[:, None] * rel / rel.sum(axis=1, keepdims=True)
    theta = 5.0
    counts = rs.poisson(rs.gamma(theta, mu / theta)).astype(np.int32)
    barcodes = np.array([_barcode(int(a), int(b)) for a, b in zip(ar, ac)], dtype=object)
    # captions: visible composition of the 112 µm patch around each in-tissue spot
    from scipy.spatial import cKDTree

    tree = cKDTree(np.c_[cx, cy])
    caps, pfr = [], []
    rcap = _rng(seed, "captions", sample_id)
    for k, i in enumerate(ti):
        near = tree.query_ball_point([sx[i], sy[i]], r=56.0, p=np.inf)
        f = np.bincount(ctype[near], minlength=3) / max(len(near), 1)
        pfr.append(f)
        caps.append(_caption(f, float(dens_s[k]), rcap))
    has_cap = rcap.random(len(ti)) < float(p["caption_fraction"])
    # ---- write everything
    out = Path(out_dir)
    (out / "outs" / "spatial").mkdir(parents=True, exist_ok=True)
    px_w, px_h = int(round(W_um / mpp)), int(round(H_um / mpp))
    img = render_he(out / "he.tif", cells, eosin, tissue, GRID_UM, (px_w, px_h), mpp, _rng(seed, "he", sample_id),
                    stain=(float(np.exp(rp.normal(0, 0.06))), float(np.exp(rp.normal(0, 0.06)))),
                    jpeg_quality=int(p["jpeg_quality"]))
    write_10x_h5(out / "outs" / "filtered_feature_bc_matrix.h5", barcodes[ti], names, counts)
    hires_s, lowres_s = 2000 / max(px_w, px_h), 600 / max(px_w, px_h)
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(int), "array_row": ar, "array_col": ac,
                        "pxl_row_in_fullres": np.round(sy / mpp).astype(int),
                        "pxl_col_in_fullres": np.round(sx / mpp).astype(int)})
    with atomic_path(out / "outs" / "spatial" / "tissue_positions.csv") as tmp:
        pos.to_csv(tmp, index=False)
    sf = {"spot_diameter_fullres": FULLRES_SPOT_UM / mpp, "tissue_hires_scalef": hires_s,
          "fiducial_diameter_fullres": 105.0 / mpp, "tissue_lowres_scalef": lowres_s}
    (out / "outs" / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=4))
    from PIL import Image

    pil = Image.fromarray(img)
    for name, s in (("tissue_hires_image.png", hires_s), ("tissue_lowres_image.png", lowres_s)):
        pil.resize((max(1, round(px_w * s)), max(1, round(px_h * s))), Image.Resampling.BOX).save(
            out / "outs" / "spatial" / name, compress_level=1)
    cap = pd.DataFrame({"barcode": barcodes[ti][has_cap], "caption": np.array(caps, dtype=object)[has_cap]})
    with atomic_path(out / "captions.csv") as tmp:
        cap.to_csv(tmp, index=False)
    truth = pd.DataFrame({"barcode": barcodes[ti], "tumour": fr[:, 0], "stroma": fr[:, 1], "immune": fr[:, 2],
                          "ifn": _lookup(ifn, sx[ti], sy[ti]), "patch_tumour": np.array(pfr)[:, 0],
                          "patch_stroma": np.array(pfr)[:, 1], "patch_immune": np.array(pfr)[:, 2]})
    truth.to_parquet(out / "truth_spots.parquet", index=False)
    summary = {"sample": sample_id, "patient": patient_id, "params": p, "spots": int(len(barcodes)),
               "in_tissue": int(len(ti)), "cells": int(len(cx)), "genes": G, "roles": dict(zip(names, roles)),
               "image_px": [px_w, px_h], "captions": int(has_cap.sum()), "mean_counts": float(counts.sum(1).mean())}
    (out / "truth.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_10x_h5(path: Path, barcodes: np.ndarray, genes: list[str], counts: np.ndarray) -> None:
    """A 10x HDF5 v3 feature-barcode matrix (genes x barcodes CSC, Gene Expression features)."""
    import h5py
    import scipy.sparse as sp

    m = sp.csc_matrix(np.asarray(counts).T)  # genes x barcodes, columns = barcodes
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = "morphomol-simulated spaceranger-2.0.0 layout"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        g.create_dataset("data", data=m.data.astype(np.int32), compression="gzip")
        g.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        ft = g.create_group("features")
        ft.create_dataset("id", data=np.array([f"SIM{i:05d}".encode() for i in range(len(genes))]))
        ft.create_dataset("name", data=np.array([n.encode() for n in genes]))
        ft.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)))
        ft.create_dataset("genome", data=np.array([b"simulated"] * len(genes)))
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def simulate_spots_from_config(out_dir: str | Path, *, sample_id: str, patient_id: str, simulate: dict[str, Any],
                               he_mpp: float | None = None, config_file: str | Path | None = None) -> dict[str, Any]:
    """The ``spots_simulate`` rule: one sample of a cohort's ``simulate`` block (the sheet's he_mpp must
    agree with ``simulate.he_mpp`` when both are given)."""
    params = dict(simulate or {})
    if he_mpp is not None and "he_mpp" in params and abs(float(he_mpp) - float(params["he_mpp"])) > 1e-9:
        raise InputError(f"sheet he_mpp {he_mpp} differs from simulate.he_mpp {params['he_mpp']}", file=config_file,
                         field="simulate.he_mpp", expected="the same value (or an empty he_mpp cell)")
    try:
        return simulate_spots_sample(out_dir, sample_id=sample_id, patient_id=patient_id, params=params)
    except InputError as exc:
        raise InputError(exc.message, file=config_file, field="simulate") from None
