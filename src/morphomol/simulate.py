"""Paired-cohort simulator: a Xenium bundle and an H&E slide per sample, in real formats.

Every sample directory holds::

    xenium/transcripts.parquet      10x columns (controls and low-qv transcripts included)
    xenium/cells.parquet            10x cell table
    xenium/experiment.xenium        JSON (pixel_size 0.2125, run/region/panel keys)
    xenium/gene_panel.json          10x layout: payload.targets[].type.data.name
    xenium/morphology_focus.ome.tif DAPI, uint16, tiled + deflate, SubIFD pyramid
    he.tif                          H&E pyramid (tiled JPEG IFDs) that OpenSlide opens
    keypoints.csv                   Xenium Explorer keypoints (+ region column)
    he_imagealignment.csv           headerless 3x3, H&E px -> morphology px (region r0)
    regions.geojson                 region polygons in Xenium µm
    truth.json                      ground truth (affines, proportions, add-on kinds, ...)
    truth_cells.parquet             per-cell latents (cell type, morphology state, program)

Geometry. Xenium µm span ``[0, W] x [0, H]`` (``tissue_um``); the tissue is an irregular
blob in it. The tissue is split into ``n_regions`` vertical bands (slanted split lines);
each band has its own affine ``H&E px -> µm`` (a global rotation/scale/translation composed
with a small per-region rotation, scale, shear and translation about the band centre), as
when a section tears or folds. The H&E slide is rendered in its own pixel frame: nuclei
are drawn forward through the inverse of their band's affine; the background (eosin,
white glass) is looked up backwards through every band's affine.

Biology. Five cell types with distinct nucleus morphology and density, arranged by smooth
random fields of type proportions (neighbourhoods of ~``neighbourhood_um``). Two more
smooth latents: a *morphology state* ``z`` (nucleus size and hyperchromasia, visible in
H&E/DAPI, only weakly reflected in the core genes) and an *expression program* ``p``
(an interferon-like program that drives a few core genes and is invisible in H&E).
Core genes: negative-binomial counts from per-type mean profiles times the program.
Add-on genes, split evenly by index into three kinds (``truth["addon_kinds"]``):

* ``a``: log-mean linear in ``z``  (predictable from morphology),
* ``b``: mean proportional to a weighted sum of the cell's own core program counts
  (predictable from core genes),
* ``c``: log-mean ``beta * (0.4 z + 0.4 p + 0.8 z p)`` (an AND-like interaction: each
  modality alone explains little, both together explain it).

Patient effects (type composition shift, per-gene multiplicative factors, program/state
offsets, stain colour) are a function of ``(seed, patient_id)`` only, cohort constants
(type profiles, gene roles) of ``(seed, gene names)``, and everything else of
``(seed, sample_id)``: a sample simulated alone equals the same sample inside a cohort.
"""

from __future__ import annotations

import json
import math
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tifffile
from scipy import ndimage

from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

__all__ = [
    "ADDON_KINDS",
    "CELL_TYPES",
    "PIXEL_SIZE",
    "SAMPLE_OUTPUTS",
    "simulate_cohort",
    "simulate_from_config",
    "simulate_sample",
]

log = get_logger("simulate")

PIXEL_SIZE = 0.2125  # µm per Xenium morphology pixel
ADDON_KINDS = ("a", "b", "c")
CELL_TYPES = ("tumour", "lymphocyte", "fibroblast", "macrophage", "endothelial")

#: files and folders a simulated sample directory holds (and nothing else)
SAMPLE_OUTPUTS = (
    "xenium",
    "he.tif",
    "keypoints.csv",
    "he_imagealignment.csv",
    "regions.geojson",
    "truth.json",
    "truth_cells.parquet",
)


@dataclass(frozen=True)
class _TypeTable:
    """Per-cell-type parameters (index = position in CELL_TYPES)."""

    logit: np.ndarray  # baseline composition logits
    density: np.ndarray  # relative cell density
    major_um: np.ndarray  # nucleus major axis (µm)
    aspect: np.ndarray  # minor / major
    size_cv: np.ndarray  # cell-to-cell log-size sd
    dapi: np.ndarray  # DAPI intensity (counts)
    hem: np.ndarray  # hematoxylin optical density
    chromatin: np.ndarray  # intensity texture amplitude inside the nucleus
    cyto_um: np.ndarray  # cytoplasm rim (µm)
    cyto_eosin: np.ndarray  # cytoplasm eosin optical density
    cyto_hem: np.ndarray  # cytoplasm hematoxylin (amphophilia)
    tx_factor: np.ndarray  # relative transcripts per cell
    nuc_fraction: np.ndarray  # fraction of transcripts in the nucleus
    oriented: np.ndarray  # nuclei follow the local fibre orientation


TYPES = _TypeTable(
    logit=np.array([1.1, -0.2, 0.3, -0.6, -0.9]),
    density=np.array([1.0, 1.5, 0.45, 0.7, 0.55]),
    major_um=np.array([11.0, 6.4, 13.0, 9.5, 11.0]),
    aspect=np.array([0.75, 0.92, 0.28, 0.70, 0.30]),
    size_cv=np.array([0.18, 0.07, 0.12, 0.12, 0.10]),
    dapi=np.array([2600.0, 5200.0, 3000.0, 1900.0, 2600.0]),
    hem=np.array([0.55, 1.00, 0.70, 0.38, 0.60]),
    chromatin=np.array([0.45, 0.10, 0.15, 0.25, 0.15]),
    cyto_um=np.array([5.0, 1.2, 2.5, 6.0, 2.0]),
    cyto_eosin=np.array([0.30, 0.04, 0.10, 0.20, 0.08]),
    cyto_hem=np.array([0.07, 0.02, 0.0, 0.04, 0.0]),
    tx_factor=np.array([1.3, 0.55, 0.8, 1.1, 0.75]),
    nuc_fraction=np.array([0.30, 0.55, 0.40, 0.22, 0.35]),
    oriented=np.array([False, False, True, False, True]),
)

# Known marker symbols (used to give real-looking gene roles; unknown symbols get
# deterministic random roles).
_MARKERS: dict[str, int] = {}
for _t, _genes in enumerate(
    (
        "EPCAM KRT8 KRT18 KRT19 KRT7 KRT5 KRT14 CDH1 MKI67 TOP2A ERBB2 CEACAM5 MUC1 ESR1 PGR AR SOX2 TP63",
        "CD3E CD3D CD3G CD2 CD8A CD8B CD4 PTPRC MS4A1 CD79A CD79B GZMB GZMA GZMK NKG7 CCR7 IL7R CD247 LCK "
        "FOXP3 CXCR4 CD19 CD27 CD28 TRAC SELL KLRD1 PRF1",
        "COL1A1 COL1A2 COL3A1 COL5A1 DCN LUM PDGFRA PDGFRB FAP ACTA2 POSTN SFRP2 THY1 MMP2 TAGLN MYH11 VIM",
        "CD68 CD163 CD14 LYZ ITGAM MRC1 C1QA C1QB C1QC APOE FCGR3A CSF1R SPP1 MARCO CD86 ITGAX MS4A4A",
        "PECAM1 VWF CDH5 KDR CLDN5 PLVAP ENG EMCN FLT1 TEK",
    )
):
    for _g in _genes.split():
        _MARKERS[_g] = _t
_PROGRAM_GENES = ("STAT1", "IRF1", "CXCL9", "CXCL10", "GBP5", "IDO1", "GBP1", "GBP4", "PSMB9", "TAP1", "ISG15", "IFIT3")
_OTHER_CANDIDATES = ("ACTB", "GAPDH", "RPLP0", "EEF1A1", "TPT1", "UBC", "HPRT1", "TBP")

_N_NEG_PROBES = 20
_N_NEG_CODEWORDS = 20
_N_BLANKS = 40

# stain optical-density directions (normalised), white glass
_H_OD = np.array([0.650, 0.704, 0.286])
_E_OD = np.array([0.216, 0.801, 0.558])
_H_OD = _H_OD / np.linalg.norm(_H_OD)
_E_OD = _E_OD / np.linalg.norm(_E_OD)
_GLASS_OD = 0.018
_LN10 = math.log(10.0)
_H_MAX = 1.6  # hematoxylin / eosin optical densities are clipped here
_E_MAX = 1.2


# --------------------------------------------------------------------------- seeding


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _seq(seed: int, *keys: str) -> np.random.SeedSequence:
    return np.random.SeedSequence(int(seed), spawn_key=tuple(_key(k) for k in keys))


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(_seq(seed, *keys)))


# --------------------------------------------------------------------------- affine helpers


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _scale(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def _shear(k: float) -> np.ndarray:
    return np.array([[1.0, k, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _trans(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _apply(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


# --------------------------------------------------------------------------- cohort constants


@dataclass
class _GeneModel:
    core: list[str]
    addon: list[str]
    other: list[str]
    expr_genes: list[str]  # core + other (type-profile genes)
    log_profile: np.ndarray  # (K, len(expr_genes)) log relative abundance
    program_gamma: np.ndarray  # (len(expr_genes),) program loading
    program_genes: list[str]
    addon_kind: list[str]
    addon_beta: np.ndarray
    addon_share: np.ndarray  # expected share of a cell's transcripts
    b_inputs: dict[str, dict[str, float]]  # kind-b gene -> {core gene: weight}


def _gene_model(seed: int, core: Sequence[str], addon: Sequence[str], other: Sequence[str]) -> _GeneModel:
    """Cohort-level gene roles; per-gene draws depend on (seed, gene name) only."""
    core, addon, other = list(core), list(addon), list(other)
    expr = core + other
    k = len(CELL_TYPES)
    n_prog = max(3, round(0.15 * len(core)))
    known = [g for g in core if g in _PROGRAM_GENES]
    rest = sorted((g for g in core if g not in known), key=lambda g: _key(f"{seed}:program:{g}"))
    program = (known + rest)[:n_prog] if len(known) < n_prog else known[:n_prog]
    prog_set = set(program)

    log_profile = np.zeros((k, len(expr)))
    gamma = np.zeros(len(expr))
    for j, g in enumerate(expr):
        r = _rng(seed, "gene", g)
        base = r.normal(-0.2, 0.5)
        noise = r.normal(0.0, 0.35, size=k)
        home = _MARKERS.get(g)
        if home is None and g not in prog_set:
            u = r.random()
            home = int(r.integers(0, k)) if u < 0.75 else None  # others: housekeeping-like
        else:
            r.random()
            r.integers(0, k)
        prof = base + noise
        if g in other:
            prof = base + 0.6 + 0.1 * noise  # generic, abundant, little type signal
        elif home is not None:
            prof[home] += math.log(r.uniform(5.0, 12.0))
            prof -= 0.5  # markers are low elsewhere
        log_profile[:, j] = prof
        if g in prog_set:
            gamma[j] = r.uniform(0.8, 1.1)
            log_profile[:, j] += 0.3

    kinds = [ADDON_KINDS[min(2, (3 * i) // max(1, len(addon)))] for i in range(len(addon))]
    beta = np.zeros(len(addon))
    b_inputs: dict[str, dict[str, float]] = {}
    for i, g in enumerate(addon):
        r = _rng(seed, "addon", g)
        beta[i] = {"a": r.uniform(0.9, 1.2), "b": 1.0, "c": r.uniform(0.8, 1.0)}[kinds[i]]
        if kinds[i] == "b":
            n_in = min(3, len(program))
            pick = sorted(program, key=lambda c: _key(f"{seed}:b:{g}:{c}"))[:n_in]
            w = r.uniform(0.5, 1.5, size=n_in)
            b_inputs[g] = {c: float(x) for c, x in zip(pick, w / w.sum(), strict=True)}
    share = np.full(len(addon), 0.012)
    return _GeneModel(
        core=core,
        addon=addon,
        other=other,
        expr_genes=expr,
        log_profile=log_profile,
        program_gamma=gamma,
        program_genes=program,
        addon_kind=kinds,
        addon_beta=beta,
        addon_share=share,
        b_inputs=b_inputs,
    )


@dataclass
class _Patient:
    composition: np.ndarray  # (K,) logit offsets
    gene_log_factor: dict[str, float]
    z_shift: float
    p_shift: float
    stain_h: float
    stain_e: float
    efficiency: float


def _patient(seed: int, patient_id: str, genes: Sequence[str]) -> _Patient:
    r = _rng(seed, "patient", patient_id)
    comp = r.normal(0.0, 0.6, size=len(CELL_TYPES))
    z_shift, p_shift = r.normal(0.0, 0.3, size=2)
    stain_h, stain_e = np.exp(r.normal(0.0, 0.1, size=2))
    eff = float(np.exp(r.normal(0.0, 0.15)))
    factors = {}
    for g in genes:
        rg = _rng(seed, "patient", patient_id, g)
        affected = rg.random() < 0.5
        val = rg.normal(0.0, 0.35)
        factors[g] = float(val) if affected else 0.0
    return _Patient(comp, factors, float(z_shift), float(p_shift), float(stain_h), float(stain_e), eff)


# --------------------------------------------------------------------------- fields


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def _lookup(grid: np.ndarray, step: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nearest-cell lookup of a µm-frame grid (cell (i, j) covers [j*step, (j+1)*step))."""
    gi = np.clip((y / step).astype(np.int64), 0, grid.shape[0] - 1)
    gj = np.clip((x / step).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[gi, gj]


def _bilinear(grid: np.ndarray, step: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(grid, [y / step - 0.5, x / step - 0.5], order=1, mode="nearest")


def _tissue_mask(rng: np.random.Generator, w: float, h: float, step: float) -> np.ndarray:
    ny, nx = int(math.ceil(h / step)), int(math.ceil(w / step))
    yy, xx = np.mgrid[0:ny, 0:nx]
    x = (xx + 0.5) * step
    y = (yy + 0.5) * step
    cx, cy = w / 2 + rng.normal(0, 0.01 * w), h / 2 + rng.normal(0, 0.01 * h)
    ax, ay = 0.47 * w, 0.47 * h
    dx, dy = (x - cx) / ax, (y - cy) / ay
    rho = (np.abs(dx) ** 3 + np.abs(dy) ** 3) ** (1 / 3)
    theta = np.arctan2(dy, dx)
    wobble = np.zeros_like(theta)
    for k in range(2, 7):
        wobble += rng.uniform(0.01, 0.05) / (k - 1) ** 0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    mask = rho < 1.0 + wobble - 0.03
    # a lumen / fat hole inside the tissue
    hx, hy = cx + rng.uniform(-0.25, 0.25) * w, cy + rng.uniform(-0.25, 0.25) * h
    hr = rng.uniform(0.05, 0.09) * min(w, h)
    mask &= ((x - hx) / (1.3 * hr)) ** 2 + ((y - hy) / hr) ** 2 > 1.0
    return mask


# --------------------------------------------------------------------------- rendering


def _ellipse_quad(a: np.ndarray, b: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadratic form (qa, qb, qc) of ellipses with semi-axes a, b, angle phi: q = 1 on the rim."""
    c, s = np.cos(phi), np.sin(phi)
    ia, ib = 1.0 / a**2, 1.0 / b**2
    return c * c * ia + s * s * ib, c * s * (ia - ib), s * s * ia + c * c * ib


def _transform_quad(qa, qb, qc, lin: np.ndarray):
    """Quadratic form in a frame where d_old = lin @ d_new."""
    l00, l01, l10, l11 = lin[0, 0], lin[0, 1], lin[1, 0], lin[1, 1]
    na = qa * l00 * l00 + 2 * qb * l00 * l10 + qc * l10 * l10
    nb = qa * l00 * l01 + qb * (l00 * l11 + l01 * l10) + qc * l10 * l11
    nc = qa * l01 * l01 + 2 * qb * l01 * l11 + qc * l11 * l11
    return na, nb, nc


def _quad_half(qa, qb, qc) -> np.ndarray:
    """Half side of the axis-aligned box that holds the ellipse q <= 1."""
    det = qa * qc - qb * qb
    return np.sqrt(np.maximum(qc / det, qa / det))


@numba.njit(cache=True, nogil=True)
def _splat_kernel(out, row0, cx, cy, qa, qb, qc, half, amp, soft, texture, seed):  # pragma: no cover - jitted
    h, w = out.shape
    inv_soft = 1.0 / soft
    for k in range(cx.shape[0]):
        hk = half[k]
        x0 = max(int(math.floor(cx[k] - hk)), 0)
        x1 = min(int(math.ceil(cx[k] + hk)) + 1, w)
        y0 = max(int(math.floor(cy[k] - hk)), row0)
        y1 = min(int(math.ceil(cy[k] + hk)) + 1, row0 + h)
        a, b, c, t = qa[k], qb[k], qc[k], texture[k]
        for yy in range(y0, y1):
            dy = yy + 0.5 - cy[k]
            for xx in range(x0, x1):
                dx = xx + 0.5 - cx[k]
                q = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy
                if q >= 1.0:
                    continue
                v = (1.0 - math.sqrt(q)) * inv_soft
                if v > 1.0:
                    v = 1.0
                v *= amp[k]
                if t > 0.0:
                    # stateless grain: splitmix64 hash of (seed, pixel), independent of draw order
                    z = np.uint64(seed) ^ (np.uint64(yy) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(xx) * np.uint64(0xC2B2AE3D27D4EB4F))
                    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                    z = z ^ (z >> np.uint64(31))
                    u = float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                    v *= 1.0 - t + 2.0 * t * u
                out[yy - row0, xx] += v


def _splat(
    out: np.ndarray,
    row0: int,
    cx: np.ndarray,
    cy: np.ndarray,
    quad: tuple[np.ndarray, np.ndarray, np.ndarray],
    amp: np.ndarray,
    soft: float,
    texture: np.ndarray | None = None,
    seed: int = 0,
) -> None:
    """Add soft-edged ellipses (quadratic forms ``quad``, sampled at pixel centres) to the
    float32 strip ``out`` whose first row is global row ``row0``. ``texture`` (per ellipse,
    0..1) multiplies each pixel by a deterministic grain in ``[1 - t, 1 + t]``."""
    if len(cx) == 0:
        return
    qa, qb, qc = (np.ascontiguousarray(q, dtype=np.float64) for q in quad)
    half = _quad_half(qa, qb, qc)
    tex = np.zeros(len(cx)) if texture is None else np.ascontiguousarray(texture, dtype=np.float64)
    _splat_kernel(
        out,
        int(row0),
        np.ascontiguousarray(cx, dtype=np.float64),
        np.ascontiguousarray(cy, dtype=np.float64),
        qa,
        qb,
        qc,
        half,
        np.ascontiguousarray(amp, dtype=np.float64),
        float(soft),
        tex,
        np.uint64(seed & 0xFFFFFFFFFFFFFFFF),
    )


def _downsample2(img: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """2x2 mean (rounded) of an integer image, (H, W) or (H, W, C), computed in row chunks."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    out = np.empty((h, w) + img.shape[2:], img.dtype)
    for r in range(0, h, chunk):
        r1 = min(h, r + chunk)
        a = img[2 * r : 2 * r1, : 2 * w]
        acc = a[0::2, 0::2].astype(np.uint32)
        acc += a[1::2, 0::2]
        acc += a[0::2, 1::2]
        acc += a[1::2, 1::2]
        acc += 2
        acc >>= 2
        out[r:r1] = acc
    return out


# --------------------------------------------------------------------------- main entry


def _check_genes(core: Sequence[str], addon: Sequence[str]) -> tuple[list[str], list[str]]:
    core, addon = [str(g) for g in core], [str(g) for g in addon]
    if not core:
        raise InputError("no core genes", field="core", expected="a non-empty list of gene symbols")
    if not addon:
        raise InputError("no add-on genes", field="addon", expected="a non-empty list of gene symbols")
    for name, lst in (("core", core), ("addon", addon)):
        dup = sorted({g for g in lst if lst.count(g) > 1})
        if dup:
            raise InputError(f"duplicate genes {dup}", field=name, expected="unique gene symbols")
        ctrl = [g for g in lst if g.startswith(("BLANK_", "NegControl", "Unassigned", "Deprecated", "Intergenic"))]
        if ctrl:
            raise InputError(f"control feature names {ctrl}", field=name, expected="gene symbols")
    both = sorted(set(core) & set(addon))
    if both:
        raise InputError(f"genes in both lists: {both}", field="addon", expected="disjoint core and add-on lists")
    return core, addon


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError("exists and is not a directory", file=out_dir, expected="an output directory")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in SAMPLE_OUTPUTS)
        if foreign:
            raise InputError(
                f"holds files the simulator did not write: {foreign[:5]}",
                file=out_dir,
                expected="an empty or previously simulated sample directory",
            )


def simulate_sample(
    out_dir: str | Path,
    *,
    sample_id: str,
    patient_id: str,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    seed: int = 0,
    tissue_um: Sequence[float] = (2500.0, 2500.0),
    he_mpp: float = 0.5,
    cell_density: float = 3000.0,
    transcripts_per_cell: float = 60.0,
    click_noise_um: float = 1.5,
    n_regions: int = 2,
    landmarks_per_region: Sequence[int] = (8, 12),
    other_genes: Sequence[str] | None = None,
    n_other_genes: int = 4,
    control_fraction: float = 0.025,
    low_qv_fraction: float = 0.06,
    unassigned_fraction: float = 0.05,
    neighbourhood_um: float = 120.0,
    he_rotation_deg: float = 8.0,
    region_jitter: float = 1.0,
    jpeg_quality: int = 88,
) -> dict[str, Any]:
    """Simulate one paired sample into ``out_dir`` and return its ground truth (``truth.json``).

    Parameters (µm unless stated):
        core_genes, addon_genes: panel lists (disjoint); add-on kinds a/b/c split evenly by index.
        seed: cohort seed. Patient effects depend on (seed, patient_id), gene roles on
            (seed, gene), everything else on (seed, sample_id).
        tissue_um: (width, height) of the Xenium field; the tissue blob fills ~75 % of it.
        he_mpp: µm per H&E pixel at level 0 (the H&E is rendered in its own frame).
        cell_density: mean cells per mm² of tissue; transcripts_per_cell: mean gene
            transcripts per cell (controls come on top).
        click_noise_um: sd per axis of the mismatch between the two clicks of a landmark.
        n_regions: tissue pieces (vertical bands) with their own H&E affine; region_jitter
            scales how much their affines differ (0 = identical).
        landmarks_per_region: (min, max) landmarks per region.
        other_genes / n_other_genes: measured genes outside the panel lists.
        control_fraction, low_qv_fraction, unassigned_fraction: shares of control-probe,
            qv < 20 and cell-unassigned transcripts.
        neighbourhood_um: correlation length of cell-type / state / program fields.
        he_rotation_deg: max global rotation of the H&E against Xenium.

    Deterministic: the same arguments give byte-identical files. The whole directory is
    written under a temporary name and renamed on success; a directory holding files the
    simulator did not write is refused (:class:`InputError`).
    """
    out_dir = Path(out_dir)
    core, addon = _check_genes(core_genes, addon_genes)
    if len(tissue_um) != 2 or min(float(v) for v in tissue_um) < 300:
        raise InputError(f"{list(tissue_um)}", field="tissue_um", expected="[width, height] in µm, each >= 300")
    if not 0.1 <= float(he_mpp) <= 2.0:
        raise InputError(f"{he_mpp}", field="he_mpp", expected="µm per H&E pixel in [0.1, 2]")
    if int(n_regions) < 1 or int(n_regions) > 6:
        raise InputError(f"{n_regions}", field="n_regions", expected="an integer in 1..6")
    if cell_density <= 0 or transcripts_per_cell <= 0:
        raise InputError("must be positive", field="cell_density/transcripts_per_cell", expected="> 0")
    if click_noise_um < 0:
        raise InputError(f"{click_noise_um}", field="click_noise_um", expected=">= 0")
    lo_lm, hi_lm = (int(landmarks_per_region[0]), int(landmarks_per_region[-1]))
    if lo_lm < 3 or hi_lm < lo_lm:
        raise InputError(f"{list(landmarks_per_region)}", field="landmarks_per_region", expected="[min, max] with 3 <= min <= max")
    if other_genes is None:
        panel = set(core) | set(addon)
        other = [g for g in _OTHER_CANDIDATES if g not in panel][: int(n_other_genes)]
    else:
        other = [str(g) for g in other_genes if g not in set(core) | set(addon)]
    _check_out_dir(out_dir)

    sim = _Simulation(
        sample_id=str(sample_id),
        patient_id=str(patient_id),
        core=core,
        addon=addon,
        other=other,
        seed=int(seed),
        width=float(tissue_um[0]),
        height=float(tissue_um[1]),
        he_mpp=float(he_mpp),
        cell_density=float(cell_density),
        tpc=float(transcripts_per_cell),
        click_noise_um=float(click_noise_um),
        n_regions=int(n_regions),
        landmarks=(lo_lm, hi_lm),
        control_fraction=float(control_fraction),
        low_qv_fraction=float(low_qv_fraction),
        unassigned_fraction=float(unassigned_fraction),
        neighbourhood_um=float(neighbourhood_um),
        he_rotation_deg=float(he_rotation_deg),
        region_jitter=float(region_jitter),
        jpeg_quality=int(jpeg_quality),
    )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        truth = sim.run(tmp)
    log.info(
        "simulated %s (patient %s): %d cells, %d transcripts, H&E %dx%d px",
        sample_id,
        patient_id,
        truth["n_cells"],
        truth["n_transcripts"],
        truth["he_size_px"][0],
        truth["he_size_px"][1],
    )
    return truth


class _Simulation:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.genes = _gene_model(self.seed, self.core, self.addon, self.other)
        self.patient = _patient(self.seed, self.patient_id, self.core + self.addon + self.other)

    def rng(self, part: str) -> np.random.Generator:
        return _rng(self.seed, "sample", self.sample_id, part)

    # ------------------------------------------------------------------ pipeline
    def run(self, out: Path) -> dict[str, Any]:
        self._fields()
        self._regions()
        self._cells()
        self._expression()
        self._transcripts()
        xdir = out / "xenium"
        xdir.mkdir()
        self._write_transcripts(xdir / "transcripts.parquet")
        self._write_cells(xdir / "cells.parquet")
        del self.tx  # the transcript arrays are not needed by the image writers
        self._write_panel(xdir / "gene_panel.json")
        self._write_dapi(xdir / "morphology_focus.ome.tif")
        self._write_experiment(xdir / "experiment.xenium")
        self._write_he(out / "he.tif")
        self._write_landmarks(out)
        self._write_truth_cells(out / "truth_cells.parquet")
        truth = self._truth()
        (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        return truth

    # ------------------------------------------------------------------ fields
    def _fields(self) -> None:
        r = self.rng("fields")
        self.step = 4.0  # µm per tissue-mask cell
        self.fstep = 10.0  # µm per smooth-field cell
        self.tissue = _tissue_mask(r, self.width, self.height, self.step)
        ny, nx = int(math.ceil(self.height / self.fstep)), int(math.ceil(self.width / self.fstep))
        sig = self.neighbourhood_um / self.fstep
        k = len(CELL_TYPES)
        logits = np.stack([_smooth_field(r, (ny, nx), sig) for _ in range(k)])
        logits = 1.6 * logits + (TYPES.logit + self.patient.composition)[:, None, None]
        logits -= logits.max(axis=0, keepdims=True)
        prob = np.exp(logits)
        self.type_prob = prob / prob.sum(axis=0, keepdims=True)  # (K, ny, nx)
        self.z_field = _smooth_field(r, (ny, nx), 1.2 * sig)
        self.p_field = _smooth_field(r, (ny, nx), 1.2 * sig)
        ori = _smooth_field(r, (ny, nx), 0.8 * sig), _smooth_field(r, (ny, nx), 0.8 * sig)
        self.orient_field = 0.5 * np.arctan2(ori[0], ori[1])

    def _regions(self) -> None:
        r = self.rng("regions")
        w, h, nr = self.width, self.height, self.n_regions
        pad = 0.05 * max(w, h)
        # split lines x = c_i + s_i * (y - h/2)
        self.splits = []
        for i in range(1, nr):
            c = w * i / nr + r.uniform(-0.05, 0.05) * w / nr
            s = r.uniform(-0.15, 0.15)
            self.splits.append((c, s))
        polys = []
        ys = (-pad, h + pad)
        for i in range(nr):
            left = [(-pad, ys[0]), (-pad, ys[1])] if i == 0 else [self._split_x(i - 1, y) for y in ys]
            right = [(w + pad, ys[0]), (w + pad, ys[1])] if i == nr - 1 else [self._split_x(i, y) for y in ys]
            ring = [left[0], right[0], right[1], left[1], left[0]]
            polys.append([[float(a), float(b)] for a, b in ring])
        self.polygons = polys

        # geometry: global H&E px -> µm, then per-region deltas about the region's tissue centre
        theta0 = math.radians(r.uniform(-1.0, 1.0) * self.he_rotation_deg)
        s0 = r.uniform(0.98, 1.02)
        glob = _rot(theta0) @ _scale(self.he_mpp * s0)
        gy, gx = np.nonzero(self.tissue)
        tx_um, ty_um = (gx + 0.5) * self.step, (gy + 0.5) * self.step
        reg_of_grid = self.region_of(tx_um, ty_um)
        sign = 1.0
        mats = []
        jit = self.region_jitter
        for i in range(nr):
            sel = reg_of_grid == i
            cx = float(tx_um[sel].mean()) if sel.any() else w * (i + 0.5) / nr
            cy = float(ty_um[sel].mean()) if sel.any() else h / 2
            if nr == 1:
                delta = np.eye(3)
            else:
                dth = math.radians(sign * r.uniform(0.5, 1.0) * jit)
                dsc = 1.0 + sign * r.uniform(0.004, 0.01) * jit
                dsh = r.uniform(-0.008, 0.008) * jit
                dt = r.normal(0.0, 4.0, size=2) * jit
                delta = _trans(cx + dt[0], cy + dt[1]) @ _rot(dth) @ _shear(dsh) @ _scale(dsc) @ _trans(-cx, -cy)
            sign = -sign
            mats.append(delta @ glob)
        # H&E canvas: the whole Xenium field through every region, plus a margin
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=float)
        pts = []
        for m in mats:
            inv = np.linalg.inv(m)
            pts.append(np.stack(_apply(inv, corners[:, 0], corners[:, 1]), axis=1))
        pts = np.concatenate(pts)
        margin = 80.0 / self.he_mpp
        lo = pts.min(axis=0) - margin
        hi = pts.max(axis=0) + margin
        shift = _trans(lo[0], lo[1])
        self.he_to_um = [m @ shift for m in mats]
        self.um_to_he = [np.linalg.inv(m) for m in self.he_to_um]
        self.he_size = (int(math.ceil(hi[0] - lo[0])), int(math.ceil(hi[1] - lo[1])))  # (width, height)

    def _split_x(self, i: int, y: float) -> tuple[float, float]:
        c, s = self.splits[i]
        return (c + s * (y - self.height / 2), y)

    def region_of(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        reg = np.zeros(np.shape(x), dtype=np.int64)
        for c, s in self.splits:
            reg += (x >= c + s * (y - self.height / 2)).astype(np.int64)
        return reg

    # ------------------------------------------------------------------ cells
    def _cells(self) -> None:
        r = self.rng("cells")
        tissue_area_mm2 = self.tissue.sum() * (self.step / 1000.0) ** 2
        ty, tx = np.nonzero(self.tissue)
        dens = (self.type_prob * TYPES.density[:, None, None]).sum(axis=0)
        mean_w = float(_lookup(dens, self.fstep, (tx + 0.5) * self.step, (ty + 0.5) * self.step).mean())
        cand_density = self.cell_density * TYPES.density.max() / mean_w  # per mm2
        d0 = 1000.0 / math.sqrt(cand_density)
        gx = np.arange(d0 / 2, self.width, d0)
        gy = np.arange(d0 / 2, self.height, d0)
        xx, yy = np.meshgrid(gx, gy)
        x = xx.ravel() + r.uniform(-0.35, 0.35, xx.size) * d0
        y = yy.ravel() + r.uniform(-0.35, 0.35, yy.size) * d0
        keep = (x > 0) & (x < self.width) & (y > 0) & (y < self.height)
        x, y = x[keep], y[keep]
        keep = _lookup(self.tissue, self.step, x, y)
        x, y = x[keep], y[keep]
        gi = np.clip((y / self.fstep).astype(np.int64), 0, self.type_prob.shape[1] - 1)
        gj = np.clip((x / self.fstep).astype(np.int64), 0, self.type_prob.shape[2] - 1)
        prob = self.type_prob[:, gi, gj].T  # (n, K)
        cum = np.cumsum(prob, axis=1)
        u = r.random(len(x))[:, None]
        ctype = np.minimum((u > cum).sum(axis=1), len(CELL_TYPES) - 1)
        accept = r.random(len(x)) < TYPES.density[ctype] / TYPES.density.max()
        x, y, ctype, gi, gj = x[accept], y[accept], ctype[accept], gi[accept], gj[accept]
        n = len(x)
        if n == 0:
            raise InputError("no cells were placed", field="tissue_um/cell_density", expected="a larger tissue or density")
        self.n_cells = n
        self.cx, self.cy, self.ctype = x, y, ctype
        self.cell_region = self.region_of(x, y)
        self.z = _bilinear(self.z_field, self.fstep, x, y) + 0.35 * r.standard_normal(n) + self.patient.z_shift
        self.p = _bilinear(self.p_field, self.fstep, x, y) + 0.5 * r.standard_normal(n) + self.patient.p_shift
        # nucleus shape (semi-axes in µm) and orientation
        major = TYPES.major_um[ctype] * np.exp(0.2 * self.z + TYPES.size_cv[ctype] * r.standard_normal(n))
        self.na = major / 2.0
        aspect = np.clip(TYPES.aspect[ctype] * np.exp(0.08 * r.standard_normal(n)), 0.15, 1.0)
        self.nb = self.na * aspect
        phi = r.uniform(0.0, np.pi, n)
        ori = TYPES.oriented[ctype]
        local = self.orient_field[gi, gj] + 0.25 * r.standard_normal(n)
        self.phi = np.where(ori, local, phi)
        self.cyto = TYPES.cyto_um[ctype] * np.exp(0.15 * r.standard_normal(n))
        self.hem_jitter = np.exp(0.08 * r.standard_normal(n))
        self.tissue_area_mm2 = float(tissue_area_mm2)
        ids = np.arange(1, n + 1) + r.integers(0, 1 << 20)
        self.cell_ids = np.array([_cell_id(int(i)) for i in ids], dtype=object)

    # ------------------------------------------------------------------ expression
    def _expression(self) -> None:
        r = self.rng("expression")
        g = self.genes
        n = self.n_cells
        pat = self.patient
        size = TYPES.tx_factor[self.ctype] * np.exp(0.1 * self.z + 0.25 * r.standard_normal(n))
        size = size / size.mean() * self.tpc * pat.efficiency * float(np.exp(r.normal(0, 0.08)))
        self.size = size
        # relative abundance: expression genes share (1 - addon share) of the transcripts
        prof = np.exp(g.log_profile)  # (K, G)
        prof = prof / prof.sum(axis=1, keepdims=True) * (1.0 - g.addon_share.sum())
        self.profile = prof
        pf = np.array([pat.gene_log_factor[x] for x in g.expr_genes])
        prog = np.clip(self.p[:, None] * g.program_gamma[None, :], -3, 3) - 0.5 * g.program_gamma[None, :] ** 2
        lam = size[:, None] * prof[self.ctype] * np.exp(prog + pf[None, :])
        expr_counts = _nb(r, lam, shape=4.0)
        # add-on genes
        z_std = self.z
        lam_a = np.zeros((n, len(g.addon)))
        col = {x: j for j, x in enumerate(g.expr_genes)}
        qbar = prof.mean(axis=0)
        for i, name in enumerate(g.addon):
            kind, beta, share = g.addon_kind[i], g.addon_beta[i], g.addon_share[i]
            f = math.exp(pat.gene_log_factor[name])
            if kind == "a":
                lam_a[:, i] = size * share * f * np.exp(np.clip(beta * z_std, -3, 3) - 0.5 * beta**2)
            elif kind == "b":
                ins = g.b_inputs[name]
                num = sum(w * expr_counts[:, col[c]] for c, w in ins.items())
                den = sum(w * qbar[col[c]] for c, w in ins.items())
                lam_a[:, i] = share * f * (num / den + 0.05 * self.tpc)
            else:
                joint = 0.4 * z_std + 0.4 * self.p + 0.8 * z_std * self.p
                lam_a[:, i] = size * share * f * np.exp(np.clip(beta * joint, -2.5, 2.5) - 0.5)
        addon_counts = _nb(r, lam_a, shape=6.0)
        self.gene_names = g.expr_genes + g.addon  # column order of self.counts
        self.counts = np.concatenate([expr_counts, addon_counts], axis=1).astype(np.int64)

    # ------------------------------------------------------------------ transcripts
    def _transcripts(self) -> None:
        r = self.rng("transcripts")
        counts = self.counts
        n_cells, n_genes = counts.shape
        flat = counts.ravel()
        cell = np.repeat(np.repeat(np.arange(n_cells), n_genes), flat)
        gene = np.repeat(np.tile(np.arange(n_genes), n_cells), flat)
        m = len(cell)
        t = self.ctype[cell]
        a, b, phi = self.na[cell], self.nb[cell], self.phi[cell]
        nuclear = r.random(m) < TYPES.nuc_fraction[t]
        theta = r.uniform(0.0, 2 * np.pi, m)
        rad = np.where(nuclear, np.sqrt(r.random(m)), 1.0)
        lx, ly = a * rad * np.cos(theta), b * rad * np.sin(theta)
        extra = np.abs(r.standard_normal(m)) * (self.cyto[cell] * 0.8) + 0.15
        norm = np.hypot(lx, ly) + 1e-9
        lx = np.where(nuclear, lx, lx + extra * lx / norm)
        ly = np.where(nuclear, ly, ly + extra * ly / norm)
        c, s = np.cos(phi), np.sin(phi)
        x = self.cx[cell] + c * lx - s * ly + 0.2 * r.standard_normal(m)
        y = self.cy[cell] + s * lx + c * ly + 0.2 * r.standard_normal(m)
        dist = np.where(nuclear, 0.0, extra)
        # diffused transcripts: moved away, not assigned to a cell
        unassigned = r.random(m) < self.unassigned_fraction
        k = int(unassigned.sum())
        dx, dy = r.normal(0.0, 7.0, k), r.normal(0.0, 7.0, k)
        x[unassigned] += dx
        y[unassigned] += dy
        dist[unassigned] += np.hypot(dx, dy)
        nuclear &= ~unassigned
        cell_idx = np.where(unassigned, -1, cell)
        qv = _qv(r, m, self.low_qv_fraction)

        # control probes / codewords / blanks
        names = list(self.gene_names) + _control_names()
        n_ctrl = int(round(self.control_fraction * m / (1.0 - self.control_fraction)))
        ctrl_gene = n_genes + r.integers(0, len(names) - n_genes, n_ctrl)
        host = r.integers(0, n_cells, n_ctrl)
        on_tissue = r.random(n_ctrl) < 0.85
        cxs = np.where(on_tissue, self.cx[host] + r.normal(0, 6.0, n_ctrl), r.uniform(0, self.width, n_ctrl))
        cys = np.where(on_tissue, self.cy[host] + r.normal(0, 6.0, n_ctrl), r.uniform(0, self.height, n_ctrl))
        ctrl_cell = np.where(on_tissue & (r.random(n_ctrl) < 0.6), host, -1)
        ctrl_nuc = (ctrl_cell >= 0) & (r.random(n_ctrl) < 0.3)
        ctrl_dist = np.where(ctrl_nuc, 0.0, np.abs(r.normal(0, 4.0, n_ctrl)))
        ctrl_qv = _qv(r, n_ctrl, 0.35)

        x = np.concatenate([x, cxs])
        y = np.concatenate([y, cys])
        np.clip(x, 0.0, self.width, out=x)
        np.clip(y, 0.0, self.height, out=y)
        fov_um = 900.0
        nfx = int(math.ceil(self.width / fov_um))
        fov = (np.minimum(y // fov_um, 1e6).astype(np.int64)) * nfx + np.minimum(x // fov_um, nfx - 1).astype(np.int64)
        order = np.argsort(fov, kind="stable")
        fov = fov[order]
        z_loc = 8.0 + 0.0008 * x + 0.0005 * y + r.uniform(-4.0, 4.0, len(x))
        self.tx = {
            "fov": fov,
            "x": x[order].astype(np.float32),
            "y": y[order].astype(np.float32),
            "z": z_loc[order].astype(np.float32),
            "gene": np.concatenate([gene, ctrl_gene])[order].astype(np.int32),
            "cell": np.concatenate([cell_idx, ctrl_cell])[order].astype(np.int64),
            "nuclear": np.concatenate([nuclear, ctrl_nuc])[order].astype(np.uint8),
            "qv": np.concatenate([qv, ctrl_qv])[order].astype(np.float32),
            "dist": np.concatenate([dist, ctrl_dist])[order].astype(np.float32),
        }
        self.feature_names = names
        self.nfx = nfx
        self.n_ctrl = n_ctrl

    # ------------------------------------------------------------------ writers: Xenium
    def _write_transcripts(self, path: Path) -> None:
        t = self.tx
        fov = t["fov"]
        # transcript ids: (fov + 1) << 32 | running index within the fov (unique, uint64)
        starts = np.searchsorted(fov, fov, side="left")
        within = np.arange(len(fov)) - starts
        tid = ((fov.astype(np.uint64) + np.uint64(1)) << np.uint64(32)) | within.astype(np.uint64)
        cell_dict = pa.array(list(self.cell_ids) + ["UNASSIGNED"], type=pa.string())
        cell_codes = np.where(t["cell"] < 0, self.n_cells, t["cell"])
        ufov = np.unique(fov)
        fov_dict = pa.array([_fov_name(int(f), self.nfx) for f in range(int(ufov.max()) + 1)], type=pa.string())
        feat_dict = pa.array(self.feature_names, type=pa.string())
        table = pa.table(
            {
                "transcript_id": pa.array(tid, type=pa.uint64()),
                "cell_id": pc.take(cell_dict, pa.array(cell_codes)),
                "overlaps_nucleus": pa.array(t["nuclear"], type=pa.uint8()),
                "feature_name": pc.take(feat_dict, pa.array(t["gene"])),
                "x_location": pa.array(t["x"]),
                "y_location": pa.array(t["y"]),
                "z_location": pa.array(t["z"]),
                "qv": pa.array(t["qv"]),
                "fov_name": pc.take(fov_dict, pa.array(fov)),
                "nucleus_distance": pa.array(t["dist"]),
            }
        )
        pq.write_table(table, path, compression="zstd", row_group_size=1 << 20)
        self.n_transcripts = table.num_rows

    def _write_cells(self, path: Path) -> None:
        t = self.tx
        assigned = t["cell"] >= 0
        n_genes = len(self.gene_names)
        c = t["cell"][assigned]
        g = t["gene"][assigned]
        good = t["qv"][assigned] >= 20
        names = self.feature_names

        def count(mask: np.ndarray) -> np.ndarray:
            return np.bincount(c[mask], minlength=self.n_cells).astype(np.int64)

        is_gene = g < n_genes
        probe = np.array([n.startswith("NegControlProbe_") for n in names])[g]
        codeword = np.array([n.startswith("NegControlCodeword_") for n in names])[g]
        blank = np.array([n.startswith("BLANK_") for n in names])[g]
        na, nb, cy = self.na, self.nb, self.cyto
        table = pa.table(
            {
                "cell_id": pa.array(list(self.cell_ids), type=pa.string()),
                "x_centroid": pa.array(self.cx.astype(np.float64)),
                "y_centroid": pa.array(self.cy.astype(np.float64)),
                "transcript_counts": pa.array(count(is_gene & good), type=pa.uint32()),
                "control_probe_counts": pa.array(count(probe & good), type=pa.uint32()),
                "genomic_control_counts": pa.array(np.zeros(self.n_cells, np.uint32)),
                "control_codeword_counts": pa.array(count(codeword & good), type=pa.uint32()),
                "unassigned_codeword_counts": pa.array(count(blank & good), type=pa.uint32()),
                "deprecated_codeword_counts": pa.array(np.zeros(self.n_cells, np.uint32)),
                "total_counts": pa.array(count(good), type=pa.uint32()),
                "cell_area": pa.array(np.pi * (na + cy) * (nb + cy)),
                "nucleus_area": pa.array(np.pi * na * nb),
                "nucleus_count": pa.array(np.ones(self.n_cells, np.uint32)),
                "segmentation_method": pa.array(["Segmented by nucleus expansion of 5.0µm"] * self.n_cells),
            }
        )
        pq.write_table(table, path, compression="zstd")
        self.transcripts_per_cell_median = float(np.median(count(is_gene & good)))

    def _write_panel(self, path: Path) -> None:
        targets = []
        for i, name in enumerate(self.feature_names):
            if name.startswith("NegControlProbe_"):
                desc = "negative_control_probe"
            elif name.startswith("NegControlCodeword_"):
                desc = "negative_control_codeword"
            elif name.startswith("BLANK_"):
                desc = "unassigned_codeword"
            else:
                desc = "gene"
            ident = f"ENSG{_key(name) % 10**11:011d}" if desc == "gene" else name
            targets.append(
                {
                    "codewords": [(_key(f"cw:{name}") % 8000) + i],
                    "source": {
                        "category": "predesigned" if name in self.core else ("custom" if name in self.addon else desc),
                        "design_id": "morphomol-sim",
                        "identity": "simulated",
                    },
                    "type": {"data": {"id": ident, "name": name}, "descriptor": desc},
                }
            )
        doc = {
            "metadata": {"file_format_version": 3.0, "generated_by": "morphomol.simulate"},
            "payload": {
                "chemistry": {"name": "Xenium v1"},
                "identity": {"name": "morphomol simulated immuno-oncology panel", "revision": 1},
                "panel": {"design_id": "morphomol-sim", "organism": "Human", "tissue": "simulated"},
                "targets": targets,
            },
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")

    def _write_experiment(self, path: Path) -> None:
        r = self.rng("experiment")
        doc = {
            "major_version": 5,
            "minor_version": 0,
            "patch_version": 0,
            "run_name": f"morphomol-sim-{self.patient_id}",
            "run_start_time": f"2024-{1 + _key(self.sample_id) % 12:02d}-15T09:00:00+00:00",
            "region_name": self.sample_id,
            "preservation_method": "ffpe",
            "num_cells": int(self.n_cells),
            "transcripts_per_cell": int(round(self.transcripts_per_cell_median)),
            "transcripts_per_100um": float(self.n_transcripts / max(1.0, self.tissue_area_mm2 * 1e4)),  # per 100 µm2
            "cassette_name": f"SIM{_key(self.patient_id) % 10000:04d}",
            "slide_id": f"{_key(self.sample_id) % 10**7:07d}",
            "panel_design_id": "morphomol-sim",
            "panel_name": "morphomol simulated immuno-oncology panel",
            "panel_organism": "Human",
            "panel_tissue_type": "simulated",
            "panel_num_targets_predesigned": len(self.core) + len(self.other),
            "panel_num_targets_custom": len(self.addon),
            "pixel_size": PIXEL_SIZE,
            "instrument_sn": "SIM0001",
            "instrument_sw_version": "simulated",
            "analysis_sw_version": "morphomol.simulate",
            "experiment_uuid": str(uuid.UUID(bytes=r.bytes(16), version=4)),
            "cassette_uuid": str(uuid.UUID(bytes=r.bytes(16), version=4)),
            "roi_uuid": str(uuid.UUID(bytes=r.bytes(16), version=4)),
            "z_step_size": 3.0,
            "well_uuid": "",
            "calibration_uuid": "N/A",
            "images": {"morphology_focus_filepath": "morphology_focus.ome.tif"},
            "xenium_explorer_files": {},
        }
        path.write_text(json.dumps(doc, indent=4) + "\n")

    def _write_dapi(self, path: Path) -> None:
        r = self.rng("dapi")
        grain_seed = int(r.integers(0, 2**63))
        ps = PIXEL_SIZE
        w = int(math.ceil(self.width / ps))
        h = int(math.ceil(self.height / ps))
        tile = 512
        strip = 512
        # cells in DAPI pixels
        cx, cy = self.cx / ps, self.cy / ps
        quad = _ellipse_quad(self.na / ps, self.nb / ps, self.phi)
        half = _quad_half(*quad)
        amp = TYPES.dapi[self.ctype] * np.clip(1.0 + 0.15 * self.z, 0.6, 1.6) * self.hem_jitter
        tex = TYPES.chromatin[self.ctype]
        col_idx = np.clip(((np.arange(w) + 0.5) * ps / self.step).astype(np.int64), 0, self.tissue.shape[1] - 1)
        bg_tissue = np.where(self.tissue, 160, 40).astype(np.float32)
        levels_shape = [(h, w)]
        while max(levels_shape[-1]) > 1024:
            lh, lw = levels_shape[-1]
            levels_shape.append((lh // 2, lw // 2))
        level1 = np.zeros(levels_shape[1], np.uint16) if len(levels_shape) > 1 else None

        def tiles_in_order():
            # tifffile wants tiles row by row of *tiles*; a strip holds strip // tile tile-rows
            for r0 in range(0, h, strip):
                rh = min(strip, h - r0)
                rows = np.clip(((np.arange(r0, r0 + rh) + 0.5) * ps / self.step).astype(np.int64), 0, self.tissue.shape[0] - 1)
                buf = np.ascontiguousarray(bg_tissue[rows][:, col_idx])
                sel = (cy + half >= r0 - 1) & (cy - half < r0 + rh + 1)
                _splat(buf, r0, cx[sel], cy[sel], tuple(q[sel] for q in quad), amp[sel], 0.25, tex[sel], grain_seed)
                img = np.clip(buf, 0, 65535).astype(np.uint16)
                if level1 is not None:
                    d = _downsample2(img)
                    lr0 = r0 // 2
                    n = min(d.shape[0], level1.shape[0] - lr0)
                    level1[lr0 : lr0 + n] = d[:n, : level1.shape[1]]
                for t0 in range(0, rh, tile):
                    for c0 in range(0, w, tile):
                        blk = img[t0 : t0 + tile, c0 : c0 + tile]
                        if blk.shape != (tile, tile):
                            t = np.zeros((tile, tile), np.uint16)
                            t[: blk.shape[0], : blk.shape[1]] = blk
                            blk = t
                        yield np.ascontiguousarray(blk)

        meta = {
            "axes": "YX",
            "PhysicalSizeX": ps,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": ps,
            "PhysicalSizeYUnit": "µm",
            "Name": f"{self.sample_id} DAPI",
            "Channel": {"Name": "DAPI"},
            "UUID": str(uuid.UUID(bytes=r.bytes(16), version=4)),
            "Creator": "morphomol.simulate",
        }
        opts = {"compression": "zlib", "compressionargs": {"level": 1}, "predictor": True}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            tif.write(
                tiles_in_order(),
                shape=(h, w),
                dtype=np.uint16,
                tile=(tile, tile),
                subifds=len(levels_shape) - 1,
                metadata=meta,
                photometric="minisblack",
                resolution=(1e4 / ps, 1e4 / ps),
                resolutionunit="CENTIMETER",
                software=False,
                **opts,
            )
            lvl = level1
            for k in range(1, len(levels_shape)):
                if k > 1:
                    lvl = _downsample2(lvl)
                tif.write(
                    lvl,
                    subfiletype=1,
                    tile=(tile if min(lvl.shape) >= tile else 256, tile if min(lvl.shape) >= tile else 256),
                    photometric="minisblack",
                    resolution=(1e4 / (ps * 2**k), 1e4 / (ps * 2**k)),
                    resolutionunit="CENTIMETER",
                    software=False,
                    **opts,
                )
        self.dapi_shape = (h, w)
        self.dapi_levels = levels_shape

    # ------------------------------------------------------------------ writers: H&E
    def _write_he(self, path: Path) -> None:
        r = self.rng("he")
        grain_seed = int(r.integers(0, 2**63))
        pat = self.patient
        mpp = self.he_mpp
        W, H = self.he_size
        img = np.empty((H, W, 3), np.uint8)
        # stain colours of this sample: patient stain strength + small sample jitter
        stain_h = pat.stain_h * float(np.exp(r.normal(0, 0.04)))
        stain_e = pat.stain_e * float(np.exp(r.normal(0, 0.04)))
        h_vec = (_H_OD + r.normal(0, 0.02, 3)).astype(np.float32)
        e_vec = (_E_OD + r.normal(0, 0.02, 3)).astype(np.float32)
        # background eosin in the µm frame (stroma denser, tumour nests slightly pinker)
        tp = self.type_prob
        e_grid = (0.16 + 0.22 * tp[2] + 0.05 * tp[0] - 0.04 * tp[1] + 0.03 * np.clip(self.z_field, -2, 2)).astype(np.float32)
        # mottled / fibrillar texture in the H&E frame (1 µm cells)
        f = max(1, int(round(1.0 / mpp)))
        th, tw = H // f + 2, W // f + 2
        tex = ndimage.gaussian_filter(r.standard_normal((th, tw)).astype(np.float32), 1.0)
        tex = (tex / (tex.std() + 1e-6)).astype(np.float32)

        # cells in H&E px: nucleus and cytoplasm ellipses through their region's inverse affine
        n = self.n_cells
        hx = np.empty(n)
        hy = np.empty(n)
        nq = [np.empty(n) for _ in range(3)]
        cq = [np.empty(n) for _ in range(3)]
        qn = _ellipse_quad(self.na, self.nb, self.phi)
        qc_ = _ellipse_quad(self.na + self.cyto, self.nb + self.cyto, self.phi)
        for i, m in enumerate(self.he_to_um):
            sel = self.cell_region == i
            inv = self.um_to_he[i]
            hx[sel], hy[sel] = _apply(inv, self.cx[sel], self.cy[sel])
            lin = m[:2, :2]
            for dst, src in ((nq, qn), (cq, qc_)):
                t = _transform_quad(src[0][sel], src[1][sel], src[2][sel], lin)
                for k in range(3):
                    dst[k][sel] = t[k]
        hem = TYPES.hem[self.ctype] * np.clip(1.0 + 0.2 * self.z, 0.5, 1.7) * self.hem_jitter * stain_h
        chrom = TYPES.chromatin[self.ctype]
        c_e = TYPES.cyto_eosin[self.ctype] * np.clip(1.0 + 0.15 * self.z, 0.6, 1.5) * stain_e
        c_h = TYPES.cyto_hem[self.ctype] * stain_h
        half_n = _quad_half(*nq)
        half_c = _quad_half(*cq)

        # colour lookup table over quantised (hematoxylin, eosin) optical densities
        hq = np.linspace(0.0, _H_MAX, 256, dtype=np.float32)[:, None, None]
        eq = np.linspace(0.0, _E_MAX, 256, dtype=np.float32)[None, :, None]
        od = _GLASS_OD + hq * h_vec[None, None, :] + eq * e_vec[None, None, :]
        lut = np.clip(255.0 * np.exp(-_LN10 * od) + 0.5, 0, 255).astype(np.uint8)
        strip = 512
        nreg = len(self.he_to_um)
        for r0 in range(0, H, strip):
            rh = min(strip, H - r0)
            # coarse (f x f px) lookups of region claim and background eosin
            ch, cw = (rh + f - 1) // f, (W + f - 1) // f
            v = (r0 + (np.arange(ch) + 0.5) * f)[:, None].astype(np.float64)
            u = ((np.arange(cw) + 0.5) * f)[None, :].astype(np.float64)
            e_bg = np.zeros((ch, cw), np.float32)
            claimed = np.zeros((ch, cw), bool)
            for i in range(nreg):
                xu, yu = _apply(self.he_to_um[i], u, v)
                inside = (xu >= 0) & (xu < self.width) & (yu >= 0) & (yu < self.height)
                inside &= self.region_of(xu, yu) == i
                take = inside & ~claimed
                if take.any():
                    xt, yt = xu[take], yu[take]
                    e_bg[take] = _lookup(e_grid, self.fstep, xt, yt) * _lookup(self.tissue, self.step, xt, yt)
                    claimed |= take
            tr0 = r0 // f
            e_bg *= 1.0 + 0.28 * tex[tr0 : tr0 + ch, :cw]
            e_bg *= stain_e
            cE = np.repeat(np.repeat(e_bg, f, axis=0), f, axis=1)[:rh, :W].copy()
            cH = np.zeros((rh, W), np.float32)
            sel = (hy + half_c >= r0 - 1) & (hy - half_c < r0 + rh + 1)
            _splat(cE, r0, hx[sel], hy[sel], tuple(q[sel] for q in cq), c_e[sel], 0.5)
            _splat(cH, r0, hx[sel], hy[sel], tuple(q[sel] for q in cq), c_h[sel], 0.5)
            sel = (hy + half_n >= r0 - 1) & (hy - half_n < r0 + rh + 1)
            _splat(cH, r0, hx[sel], hy[sel], tuple(q[sel] for q in nq), hem[sel], 0.3, chrom[sel], grain_seed)
            ih = np.clip(cH * np.float32(255 / _H_MAX) + 0.5, 0, 255).astype(np.uint8)
            ie = np.clip(cE * np.float32(255 / _E_MAX) + 0.5, 0, 255).astype(np.uint8)
            img[r0 : r0 + rh] = lut[ih, ie]

        levels = [img]
        while min(levels[-1].shape[:2]) > 600:
            levels.append(_downsample2(levels[-1]))
        opts = {
            "photometric": "rgb",
            "compression": "jpeg",
            "compressionargs": {"level": self.jpeg_quality},
            "resolutionunit": "CENTIMETER",
            "software": False,
            "metadata": None,
        }
        with tifffile.TiffWriter(path, bigtiff=False) as tif:
            for k, lvl in enumerate(levels):
                tif.write(
                    lvl,
                    tile=(256, 256),
                    subfiletype=0 if k == 0 else 1,
                    resolution=(1e4 / (mpp * 2**k), 1e4 / (mpp * 2**k)),
                    description=f"morphomol simulated H&E {self.sample_id} |MPP = {mpp}" if k == 0 else None,
                    **opts,
                )
        self.he_levels = [lv.shape[:2] for lv in levels]

    # ------------------------------------------------------------------ landmarks
    def _write_landmarks(self, out: Path) -> None:
        r = self.rng("landmarks")
        side = self.click_noise_um / math.sqrt(2.0)
        rows = []
        for i in range(self.n_regions):
            cand = np.nonzero(self.cell_region == i)[0]
            if len(cand) < 3:
                continue
            n_lm = int(r.integers(self.landmarks[0], self.landmarks[1] + 1))
            pts = np.stack([self.cx[cand], self.cy[cand]], axis=1)
            # farthest-point sampling among the region's nuclei, from a random start
            chosen = [int(r.integers(0, len(cand)))]
            d = np.hypot(*(pts - pts[chosen[0]]).T)
            for _ in range(min(n_lm, len(cand)) - 1):
                j = int(np.argmax(d * r.uniform(0.85, 1.0, len(d))))
                chosen.append(j)
                d = np.minimum(d, np.hypot(*(pts - pts[j]).T))
            for j in chosen:
                x, y = pts[j]
                # both clicks are noisy; their mismatch has sd ``sigma`` µm per axis
                fx = x / PIXEL_SIZE + r.normal(0, side / PIXEL_SIZE)
                fy = y / PIXEL_SIZE + r.normal(0, side / PIXEL_SIZE)
                ax, ay = _apply(self.um_to_he[i], np.array(x), np.array(y))
                ax = float(ax) + r.normal(0, side / self.he_mpp)
                ay = float(ay) + r.normal(0, side / self.he_mpp)
                rows.append((fx, fy, ax, ay, f"r{i}"))
        with open(out / "keypoints.csv", "w") as fh:
            fh.write("fixedX,fixedY,alignmentX,alignmentY,region\n")
            for fx, fy, ax, ay, name in rows:
                fh.write(f"{fx:.4f},{fy:.4f},{ax:.4f},{ay:.4f},{name}\n")
        self.n_landmarks = len(rows)
        # 10x alignment matrix: H&E px -> morphology px (region r0's affine)
        m = _scale(1.0 / PIXEL_SIZE) @ self.he_to_um[0]
        with open(out / "he_imagealignment.csv", "w") as fh:
            for row in m:
                fh.write(",".join(f"{v:.10g}" for v in row) + "\n")
        features = [
            {
                "type": "Feature",
                "properties": {"name": f"r{i}"},
                "geometry": {"type": "Polygon", "coordinates": [poly]},
            }
            for i, poly in enumerate(self.polygons)
        ]
        (out / "regions.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}) + "\n")

    def _write_truth_cells(self, path: Path) -> None:
        table = pa.table(
            {
                "cell_id": pa.array(list(self.cell_ids), type=pa.string()),
                "x_um": self.cx,
                "y_um": self.cy,
                "cell_type": pa.array([CELL_TYPES[t] for t in self.ctype], type=pa.string()),
                "region": self.cell_region.astype(np.int32),
                "morph_state": self.z,
                "program": self.p,
                "nucleus_major_um": 2 * self.na,
                "nucleus_minor_um": 2 * self.nb,
                "size_factor": self.size,
            }
        )
        pq.write_table(table, path, compression="zstd")

    def _truth(self) -> dict[str, Any]:
        props = np.bincount(self.ctype, minlength=len(CELL_TYPES)) / self.n_cells
        g = self.genes
        return {
            "sample_id": self.sample_id,
            "patient_id": self.patient_id,
            "seed": self.seed,
            "pixel_size": PIXEL_SIZE,
            "he_mpp": self.he_mpp,
            "tissue_um": [self.width, self.height],
            "tissue_area_mm2": self.tissue_area_mm2,
            "he_size_px": list(self.he_size),
            "he_levels": [list(s) for s in self.he_levels],
            "dapi_levels": [list(s) for s in self.dapi_levels],
            "click_noise_um": self.click_noise_um,
            "n_landmarks": self.n_landmarks,
            "regions": [
                {
                    "name": f"r{i}",
                    "matrix": self.he_to_um[i].tolist(),
                    "inverse": self.um_to_he[i].tolist(),
                    "polygon_um": self.polygons[i],
                    "n_cells": int((self.cell_region == i).sum()),
                }
                for i in range(self.n_regions)
            ],
            "n_cells": int(self.n_cells),
            "n_transcripts": int(self.n_transcripts),
            "n_control_transcripts": int(self.n_ctrl),
            "cell_types": list(CELL_TYPES),
            "cell_type_proportions": {t: float(p) for t, p in zip(CELL_TYPES, props, strict=True)},
            "core_genes": g.core,
            "addon_genes": g.addon,
            "other_genes": g.other,
            "addon_kinds": dict(zip(g.addon, g.addon_kind, strict=True)),
            "program_genes": g.program_genes,
            "kind_b_inputs": g.b_inputs,
            "patient_effects": {
                "composition_logit": dict(zip(CELL_TYPES, self.patient.composition.tolist(), strict=True)),
                "morph_state_shift": self.patient.z_shift,
                "program_shift": self.patient.p_shift,
                "efficiency": self.patient.efficiency,
                "gene_log_factor": {k: v for k, v in self.patient.gene_log_factor.items() if v != 0.0},
            },
        }


# --------------------------------------------------------------------------- small helpers


def _nb(r: np.random.Generator, lam: np.ndarray, shape: float) -> np.ndarray:
    """Negative-binomial counts with mean ``lam`` (gamma-Poisson, gamma shape ``shape``)."""
    g = r.gamma(shape, 1.0 / shape, size=lam.shape)
    return r.poisson(lam * g)


def _qv(r: np.random.Generator, n: int, low_fraction: float) -> np.ndarray:
    low = r.random(n) < low_fraction
    good = np.clip(40.0 - r.gamma(1.5, 4.0, n), 20.0, 40.0)
    bad = r.uniform(2.0, 19.9, n)
    return np.where(low, bad, good)


def _control_names() -> list[str]:
    probes = [f"NegControlProbe_{i:05d}" for i in (2, 3, 4, 9, 12, 13, 14, 16, 17, 19, 22, 25, 28, 31, 33, 35, 39, 40, 41, 42)]
    codewords = [f"NegControlCodeword_{500 + i:04d}" for i in range(_N_NEG_CODEWORDS)]
    blanks = [f"BLANK_{6 + 7 * i:04d}" for i in range(_N_BLANKS)]
    return probes[:_N_NEG_PROBES] + codewords + blanks


def _cell_id(n: int) -> str:
    """10x cell id ("aaabcdef-1"): 8 hex digits written with the letters a..p, dataset suffix 1."""
    return "".join(chr(ord("a") + int(h, 16)) for h in f"{n:08x}") + "-1"


def _fov_name(f: int, nfx: int) -> str:
    row, col = divmod(f, nfx)
    letters = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"{letters}{col + 1}"


# --------------------------------------------------------------------------- cohort


def _sheet_row(out_dir: Path, sample_id: str, patient_id: str, he_mpp: float) -> dict[str, Any]:
    d = out_dir / sample_id
    return {
        "sample_id": sample_id,
        "patient_id": patient_id,
        "xenium_dir": str(d / "xenium"),
        "he_path": str(d / "he.tif"),
        "he_mpp": he_mpp,
        "alignment": str(d / "keypoints.csv"),
        "regions": str(d / "regions.geojson"),
    }


def simulate_cohort(
    out_dir: str | Path,
    *,
    n_patients: int,
    samples_per_patient: int,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    seed: int = 0,
    **sample_kwargs: Any,
) -> pd.DataFrame:
    """Simulate ``n_patients * samples_per_patient`` samples (S01.., patients P1..) under ``out_dir``.

    Returns the sample sheet (also written to ``out_dir/samples.tsv``).
    """
    if int(n_patients) < 1 or int(samples_per_patient) < 1:
        raise InputError(
            f"n_patients={n_patients}, samples_per_patient={samples_per_patient}",
            field="n_patients/samples_per_patient",
            expected="positive integers",
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    he_mpp = float(sample_kwargs.get("he_mpp", 0.5))
    total = int(n_patients) * int(samples_per_patient)
    width = max(2, len(str(total)))
    rows = []
    k = 0
    for p in range(int(n_patients)):
        pid = f"P{p + 1}"
        for _ in range(int(samples_per_patient)):
            k += 1
            sid = f"S{k:0{width}d}"
            log.info("cohort: sample %d/%d %s (patient %s)", k, total, sid, pid)
            simulate_sample(
                out_dir / sid,
                sample_id=sid,
                patient_id=pid,
                core_genes=core_genes,
                addon_genes=addon_genes,
                seed=seed,
                **sample_kwargs,
            )
            rows.append(_sheet_row(out_dir, sid, pid, he_mpp))
    sheet = pd.DataFrame(rows)
    with atomic_path(out_dir / "samples.tsv") as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)
    return sheet


_CONFIG_KEYS = {
    "seed",
    "tissue_um",
    "he_mpp",
    "cell_density",
    "transcripts_per_cell",
    "click_noise_um",
    "n_regions",
    "landmarks_per_region",
    "other_genes",
    "n_other_genes",
    "control_fraction",
    "low_qv_fraction",
    "unassigned_fraction",
    "neighbourhood_um",
    "he_rotation_deg",
    "region_jitter",
    "jpeg_quality",
}


def simulate_from_config(
    out_dir: str | Path,
    *,
    sample_id: str,
    patient_id: str,
    panel: Mapping[str, Any],
    simulate: Mapping[str, Any],
    he_mpp: float | None = None,
    config_file: str | Path | None = None,
) -> dict[str, Any]:
    """Simulate one sample from a cohort's ``simulate`` block and ``panel`` (used by the rule).

    ``he_mpp`` (the sample sheet's value, if any) must agree with the ``simulate`` block.
    """
    sim = dict(simulate or {})
    unknown = sorted(set(sim) - _CONFIG_KEYS)
    if unknown:
        raise InputError(f"unknown keys {unknown}", file=config_file, field="simulate", expected=f"keys among {sorted(_CONFIG_KEYS)}")
    core = list(panel.get("core") or [])
    addon = list(panel.get("addon") or [])
    if not core or not addon:
        raise InputError(
            "the simulator needs explicit gene lists", file=config_file, field="panel.core/panel.addon", expected="non-empty core and addon lists"
        )
    if he_mpp is not None and str(he_mpp).strip() not in ("", "nan", "NaN", "None"):
        try:
            he_mpp = float(he_mpp)
        except (TypeError, ValueError):
            raise InputError(f"{he_mpp!r} is not a number", field="he_mpp", expected="µm per H&E pixel") from None
        block = float(sim.get("he_mpp", he_mpp))
        if abs(block - he_mpp) > 1e-9:
            raise InputError(
                f"sample sheet he_mpp {he_mpp} differs from simulate.he_mpp {block}",
                file=config_file,
                field="he_mpp",
                expected="the same value in both places",
            )
        sim["he_mpp"] = float(he_mpp)
    if "tissue_um" in sim:
        sim["tissue_um"] = tuple(float(v) for v in sim["tissue_um"])
    return simulate_sample(out_dir, sample_id=sample_id, patient_id=patient_id, core_genes=core, addon_genes=addon, **sim)
