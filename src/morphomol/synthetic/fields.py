"""The simulated scene in Xenium µm: tissue mask and smooth fields, tissue regions, cells.

* :func:`make_fields` — the tissue blob (4 µm cells) and smooth random fields (10 µm cells) of
  cell-type proportions, morphology state ``z``, expression program ``p`` and fibre orientation.
* :func:`make_regions` — ``n_regions`` vertical bands (slanted split lines), each with its own
  affine H&E px → µm, and the H&E canvas size.
* :func:`place_cells` — jittered-lattice cell positions inside the tissue, cell types drawn from
  the proportion field (with density thinning), latents and nucleus shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from morphomol.errors import InputError
from morphomol.geometry import apply_affine, rotation, scale, shear, translate
from morphomol.synthetic.params import CELL_TYPES, TYPES, Patient, SampleSpec


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Standardised Gaussian-smoothed white noise."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def lookup(grid: np.ndarray, step: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nearest-cell lookup of a µm-frame grid (cell (i, j) covers [j*step, (j+1)*step))."""
    gi = np.clip((y / step).astype(np.int64), 0, grid.shape[0] - 1)
    gj = np.clip((x / step).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[gi, gj]


def bilinear(grid: np.ndarray, step: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a µm-frame grid (values at cell centres)."""
    return ndimage.map_coordinates(grid, [y / step - 0.5, x / step - 0.5], order=1, mode="nearest")


def tissue_mask(rng: np.random.Generator, w: float, h: float, step: float) -> np.ndarray:
    """Irregular tissue blob (a wobbly superellipse with one hole) on a ``step`` µm grid."""
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


# --------------------------------------------------------------------------- fields


@dataclass
class Fields:
    """Tissue mask and smooth latent fields of one sample (µm frame)."""

    step: float  # µm per tissue-mask cell
    fstep: float  # µm per smooth-field cell
    tissue: np.ndarray  # bool (ny, nx) at ``step``
    type_prob: np.ndarray  # (K, ny, nx) at ``fstep``
    z_field: np.ndarray
    p_field: np.ndarray
    orient_field: np.ndarray


def make_fields(spec: SampleSpec, patient: Patient) -> Fields:
    """Tissue mask and fields from the sample's ``fields`` stream."""
    r = spec.rng("fields")
    step = 4.0  # µm per tissue-mask cell
    fstep = 10.0  # µm per smooth-field cell
    tissue = tissue_mask(r, spec.width, spec.height, step)
    ny, nx = int(math.ceil(spec.height / fstep)), int(math.ceil(spec.width / fstep))
    sig = spec.neighbourhood_um / fstep
    k = len(CELL_TYPES)
    logits = np.stack([smooth_field(r, (ny, nx), sig) for _ in range(k)])
    logits = 1.6 * logits + (TYPES.logit + patient.composition)[:, None, None]
    logits -= logits.max(axis=0, keepdims=True)
    prob = np.exp(logits)
    type_prob = prob / prob.sum(axis=0, keepdims=True)  # (K, ny, nx)
    z_field = smooth_field(r, (ny, nx), 1.2 * sig)
    p_field = smooth_field(r, (ny, nx), 1.2 * sig)
    ori = smooth_field(r, (ny, nx), 0.8 * sig), smooth_field(r, (ny, nx), 0.8 * sig)
    orient_field = 0.5 * np.arctan2(ori[0], ori[1])
    return Fields(step=step, fstep=fstep, tissue=tissue, type_prob=type_prob, z_field=z_field, p_field=p_field,
                  orient_field=orient_field)


# --------------------------------------------------------------------------- regions


def _region_of(splits: list[tuple[float, float]], height: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    reg = np.zeros(np.shape(x), dtype=np.int64)
    for c, s in splits:
        reg += (x >= c + s * (y - height / 2)).astype(np.int64)
    return reg


@dataclass
class Regions:
    """Tissue regions (bands) and their affines; the H&E canvas."""

    height: float
    splits: list[tuple[float, float]]  # split line i: x = c + s * (y - height / 2)
    polygons: list[list[list[float]]]  # closed rings in µm (GeoJSON order)
    he_to_um: list[np.ndarray]  # per region, H&E level-0 px -> µm
    um_to_he: list[np.ndarray]
    he_size: tuple[int, int]  # (width, height) px

    def region_of(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Region index (int64) of µm points."""
        return _region_of(self.splits, self.height, x, y)


def make_regions(spec: SampleSpec, fields: Fields) -> Regions:
    """Split lines, region polygons and per-region affines from the sample's ``regions`` stream.

    Global H&E px → µm (rotation, scale), then per-region deltas (rotation, scale, shear,
    translation) about the region's tissue centre; the canvas holds the whole Xenium field
    through every region's inverse plus an 80 µm margin.
    """
    r = spec.rng("regions")
    w, h, nr = spec.width, spec.height, spec.n_regions
    pad = 0.05 * max(w, h)
    # split lines x = c_i + s_i * (y - h/2)
    splits: list[tuple[float, float]] = []
    for i in range(1, nr):
        c = w * i / nr + r.uniform(-0.05, 0.05) * w / nr
        s = r.uniform(-0.15, 0.15)
        splits.append((c, s))

    def split_x(i: int, y: float) -> tuple[float, float]:
        c, s = splits[i]
        return (c + s * (y - h / 2), y)

    polys = []
    ys = (-pad, h + pad)
    for i in range(nr):
        left = [(-pad, ys[0]), (-pad, ys[1])] if i == 0 else [split_x(i - 1, y) for y in ys]
        right = [(w + pad, ys[0]), (w + pad, ys[1])] if i == nr - 1 else [split_x(i, y) for y in ys]
        ring = [left[0], right[0], right[1], left[1], left[0]]
        polys.append([[float(a), float(b)] for a, b in ring])

    # geometry: global H&E px -> µm, then per-region deltas about the region's tissue centre
    theta0 = math.radians(r.uniform(-1.0, 1.0) * spec.he_rotation_deg)
    s0 = r.uniform(0.98, 1.02)
    glob = rotation(theta0) @ scale(spec.he_mpp * s0)
    gy, gx = np.nonzero(fields.tissue)
    tx_um, ty_um = (gx + 0.5) * fields.step, (gy + 0.5) * fields.step
    reg_of_grid = _region_of(splits, h, tx_um, ty_um)
    sign = 1.0
    mats = []
    jit = spec.region_jitter
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
            delta = translate(cx + dt[0], cy + dt[1]) @ rotation(dth) @ shear(dsh) @ scale(dsc) @ translate(-cx, -cy)
        sign = -sign
        mats.append(delta @ glob)
    # H&E canvas: the whole Xenium field through every region, plus a margin
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=float)
    pts = []
    for m in mats:
        inv = np.linalg.inv(m)
        pts.append(np.stack(apply_affine(inv, corners[:, 0], corners[:, 1]), axis=1))
    allpts = np.concatenate(pts)
    margin = 80.0 / spec.he_mpp
    lo = allpts.min(axis=0) - margin
    hi = allpts.max(axis=0) + margin
    shift = translate(lo[0], lo[1])
    he_to_um = [m @ shift for m in mats]
    return Regions(height=h, splits=splits, polygons=polys, he_to_um=he_to_um,
                   um_to_he=[np.linalg.inv(m) for m in he_to_um],
                   he_size=(int(math.ceil(hi[0] - lo[0])), int(math.ceil(hi[1] - lo[1]))))


# --------------------------------------------------------------------------- cells


@dataclass
class Cells:
    """Per-cell positions (µm), types, regions, latents and nucleus geometry."""

    n: int
    cx: np.ndarray
    cy: np.ndarray
    ctype: np.ndarray  # index into CELL_TYPES
    region: np.ndarray
    z: np.ndarray  # morphology state
    p: np.ndarray  # expression program
    na: np.ndarray  # nucleus semi-axes (µm)
    nb: np.ndarray
    phi: np.ndarray  # nucleus orientation
    cyto: np.ndarray  # cytoplasm rim (µm)
    hem_jitter: np.ndarray
    ids: np.ndarray  # 10x cell ids (object)
    tissue_area_mm2: float


def cell_id(n: int) -> str:
    """10x cell id ("aaabcdef-1"): 8 hex digits written with the letters a..p, dataset suffix 1."""
    return "".join(chr(ord("a") + int(h, 16)) for h in f"{n:08x}") + "-1"


def place_cells(spec: SampleSpec, fields: Fields, regions: Regions, patient: Patient) -> Cells:
    """Cells from the sample's ``cells`` stream (InputError when none fall on the tissue)."""
    r = spec.rng("cells")
    step, fstep = fields.step, fields.fstep
    tissue_area_mm2 = fields.tissue.sum() * (step / 1000.0) ** 2
    ty, tx = np.nonzero(fields.tissue)
    dens = (fields.type_prob * TYPES.density[:, None, None]).sum(axis=0)
    mean_w = float(lookup(dens, fstep, (tx + 0.5) * step, (ty + 0.5) * step).mean())
    cand_density = spec.cell_density * TYPES.density.max() / mean_w  # per mm2
    d0 = 1000.0 / math.sqrt(cand_density)
    gx = np.arange(d0 / 2, spec.width, d0)
    gy = np.arange(d0 / 2, spec.height, d0)
    xx, yy = np.meshgrid(gx, gy)
    x = xx.ravel() + r.uniform(-0.35, 0.35, xx.size) * d0
    y = yy.ravel() + r.uniform(-0.35, 0.35, yy.size) * d0
    keep = (x > 0) & (x < spec.width) & (y > 0) & (y < spec.height)
    x, y = x[keep], y[keep]
    keep = lookup(fields.tissue, step, x, y)
    x, y = x[keep], y[keep]
    gi = np.clip((y / fstep).astype(np.int64), 0, fields.type_prob.shape[1] - 1)
    gj = np.clip((x / fstep).astype(np.int64), 0, fields.type_prob.shape[2] - 1)
    prob = fields.type_prob[:, gi, gj].T  # (n, K)
    cum = np.cumsum(prob, axis=1)
    u = r.random(len(x))[:, None]
    ctype = np.minimum((u > cum).sum(axis=1), len(CELL_TYPES) - 1)
    accept = r.random(len(x)) < TYPES.density[ctype] / TYPES.density.max()
    x, y, ctype, gi, gj = x[accept], y[accept], ctype[accept], gi[accept], gj[accept]
    n = len(x)
    if n == 0:
        raise InputError("no cells were placed", field="tissue_um/cell_density", expected="a larger tissue or density")
    z = bilinear(fields.z_field, fstep, x, y) + 0.35 * r.standard_normal(n) + patient.z_shift
    p = bilinear(fields.p_field, fstep, x, y) + 0.5 * r.standard_normal(n) + patient.p_shift
    # nucleus shape (semi-axes in µm) and orientation
    major = TYPES.major_um[ctype] * np.exp(0.2 * z + TYPES.size_cv[ctype] * r.standard_normal(n))
    na = major / 2.0
    aspect = np.clip(TYPES.aspect[ctype] * np.exp(0.08 * r.standard_normal(n)), 0.15, 1.0)
    nb = na * aspect
    phi = r.uniform(0.0, np.pi, n)
    ori = TYPES.oriented[ctype]
    local = fields.orient_field[gi, gj] + 0.25 * r.standard_normal(n)
    phi = np.where(ori, local, phi)
    cyto = TYPES.cyto_um[ctype] * np.exp(0.15 * r.standard_normal(n))
    hem_jitter = np.exp(0.08 * r.standard_normal(n))
    ids = np.arange(1, n + 1) + r.integers(0, 1 << 20)
    return Cells(n=n, cx=x, cy=y, ctype=ctype, region=regions.region_of(x, y), z=z, p=p, na=na, nb=nb, phi=phi,
                 cyto=cyto, hem_jitter=hem_jitter, ids=np.array([cell_id(int(i)) for i in ids], dtype=object),
                 tissue_area_mm2=float(tissue_area_mm2))
