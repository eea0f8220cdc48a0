"""H&E → Xenium registration: per-region affine from DAPI landmarks, QC, image-based refinement.

Pipeline of :func:`register_sample`:

1. Read the alignment input (keypoints CSV or 3×3 alignment matrix, detected by content) and
   optional region polygons (GeoJSON, Xenium µm) or region labels on the keypoints.
2. Per region: least-squares affine H&E level-0 px → Xenium µm, leave-one-out (LOO) residual per
   landmark, robust outlier flagging (iterative trimming or RANSAC), refit without outliers.
   Without any alignment input: coarse initialisation from tissue masks (moments + a few
   rotations/flips + phase correlation).
3. Image refinement: maximise normalised cross-correlation (NCC) between the DAPI image and the
   hematoxylin channel of the H&E (``skimage.color.rgb2hed``) at ``refine_mpp`` µm/px, read
   from pyramid levels only (never full resolution), masked to the region, optimising the six
   affine parameters coarse → fine (Nelder–Mead). ``refine: auto`` keeps it only if NCC improves.
4. Transcript-covered area in H&E px (streamed transcripts mapped with their region's inverse).
5. ``registration.json`` (contract in docs/ARCHITECTURE.md) and ``registration_qc.png``.

Matrices are 3×3 and act on column vectors ``[x, y, 1]``. ``matrix`` maps H&E level-0 px →
Xenium µm, ``inverse`` maps µm → H&E px. ``rms_um``/``max_um`` are LOO residuals of the inlier
landmarks under the landmark fit (``null`` where not defined: no landmarks, or exactly 3).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError, MorphomolError
from morphomol.io.landmarks import (
    Keypoints,
    RegionPolygon,
    read_alignment,
    read_regions_geojson,
    sha256_file,
)
from morphomol.util.logs import get_logger

log = get_logger("registration")

ROBUST_METHODS = ("trim", "ransac", "none")
REFINE_MODES = ("auto", "always", "never")
ASSIGNMENTS = ("nearest", "drop")
COLLINEAR_RATIO = 0.01  # minor/major spread of a region's landmarks below this = collinear
BOUNDS_TOL = 0.01  # landmarks may lie this fraction of the image size outside it (clicks on the border)


# --------------------------------------------------------------------------------------------
# affine algebra
# --------------------------------------------------------------------------------------------


class DegenerateFit(ValueError):
    """The landmark configuration does not determine an affine (raised as InputError by callers)."""


def apply_affine(m: np.ndarray, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 3×3 affine to coordinate arrays; returns float64 arrays of the broadcast shape."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _apply_pts(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    x, y = apply_affine(m, pts[:, 0], pts[:, 1])
    return np.stack([x, y], axis=1)


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _scale(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def _rotation(theta: float, flip: bool = False) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    r = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return r @ np.diag([1.0, -1.0, 1.0]) if flip else r


def _normaliser(pts: np.ndarray) -> np.ndarray:
    c = pts.mean(axis=0)
    s = float(np.sqrt(((pts - c) ** 2).sum(axis=1).mean())) or 1.0
    return _scale(1.0 / s) @ _translate(-c[0], -c[1])


def collinearity(pts: np.ndarray) -> float:
    """Ratio of minor to major singular value of the centred points (0 = collinear)."""
    if len(pts) < 2:
        return 0.0
    s = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    return float(s[1] / s[0]) if s[0] > 0 else 0.0


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine with ``dst ≈ M @ [src, 1]`` (3×3). Raises :class:`DegenerateFit`."""
    src = np.asarray(src, float)
    dst = np.asarray(dst, float)
    if len(src) < 3:
        raise DegenerateFit(f"{len(src)} landmarks; an affine needs at least 3")
    if collinearity(src) < COLLINEAR_RATIO or collinearity(dst) < COLLINEAR_RATIO:
        raise DegenerateFit("landmarks are (nearly) collinear")
    ns, nd = _normaliser(src), _normaliser(dst)
    xs = np.column_stack([_apply_pts(ns, src), np.ones(len(src))])
    yd = _apply_pts(nd, dst)
    b, *_ = np.linalg.lstsq(xs, yd, rcond=None)
    mn = np.eye(3)
    mn[:2, :] = b.T
    m = np.linalg.inv(nd) @ mn @ ns
    lin = m[:2, :2]
    det = float(np.linalg.det(lin))
    scale2 = float(np.sum(lin**2)) / 2.0
    if not np.all(np.isfinite(m)) or abs(det) < 1e-6 * max(scale2, 1e-300):
        raise DegenerateFit(f"fitted matrix is singular (det={det:.3g})")
    return m


def loo_residuals(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Leave-one-out residual vectors (n, 2): prediction of the fit without landmark i minus dst_i.

    Uses the hat-matrix identity e_loo = e / (1 - h_ii) (exact for least squares). Rows are NaN
    when leaving the landmark out leaves an undetermined fit (n == 3).
    """
    src = np.asarray(src, float)
    dst = np.asarray(dst, float)
    n = len(src)
    if n <= 3:
        return np.full((n, 2), np.nan)
    ns = _normaliser(src)
    xs = np.column_stack([_apply_pts(ns, src), np.ones(n)])
    xtx_inv = np.linalg.pinv(xs.T @ xs)
    h = np.einsum("ij,jk,ik->i", xs, xtx_inv, xs)
    b = xtx_inv @ xs.T @ dst
    resid = xs @ b - dst
    denom = 1.0 - h
    out = np.full((n, 2), np.nan)
    ok = denom > 1e-9
    out[ok] = resid[ok] / denom[ok, None]
    return out


@dataclass
class RobustFit:
    matrix: np.ndarray
    inliers: np.ndarray  # bool (n,)
    residuals: np.ndarray  # (n, 2) µm: LOO for inliers, residual vs final fit for outliers
    rms_um: float | None
    max_um: float | None


def robust_fit(src: np.ndarray, dst: np.ndarray, *, method: str = "trim", threshold_um: float = 10.0,
               seed: int = 0, n_sigma: float = 3.0) -> RobustFit:
    """Affine fit with outlier flagging.

    ``trim``: repeatedly drop the landmark with the largest LOO residual while it exceeds both
    ``threshold_um`` and ``n_sigma`` robust sigmas (1.4826·median of the LOO residual norms of
    the other landmarks, fitted without the candidate).
    ``ransac``: exact fits of landmark triples (all, or 2000 random ones, seeded); the largest
    consensus set within ``threshold_um`` wins and is refitted. ``none``: plain least squares.
    At least 3 landmarks are always kept.
    """
    src = np.asarray(src, float)
    dst = np.asarray(dst, float)
    n = len(src)
    inl = np.ones(n, dtype=bool)
    if method == "trim":
        while inl.sum() >= 5:  # with 4 the LOO residuals cannot tell the outlier apart reliably
            idx = np.flatnonzero(inl)
            r = np.linalg.norm(loo_residuals(src[idx], dst[idx]), axis=1)
            if not np.all(np.isfinite(r)):
                break
            worst = int(np.argmax(r))
            rest = np.delete(idx, worst)
            # scale of the others' LOO residuals, from a fit without the candidate (an outlier
            # inflates every LOO residual of a fit that includes it)
            r_rest = np.linalg.norm(loo_residuals(src[rest], dst[rest]), axis=1)
            sigma = 1.4826 * float(np.median(r_rest if np.all(np.isfinite(r_rest)) else np.delete(r, worst)))
            if r[worst] > threshold_um and r[worst] > n_sigma * sigma:
                inl[idx[worst]] = False
            else:
                break
    elif method == "ransac":
        rng = np.random.default_rng(seed)
        combos: Sequence[tuple[int, ...]]
        if math.comb(n, 3) <= 2000:
            combos = list(itertools.combinations(range(n), 3))
        else:
            combos = [tuple(rng.choice(n, 3, replace=False)) for _ in range(2000)]
        best: tuple[int, float] = (0, math.inf)
        best_mask = inl
        for c in combos:
            try:
                m = fit_affine(src[list(c)], dst[list(c)])
            except DegenerateFit:
                continue
            err = np.linalg.norm(_apply_pts(m, src) - dst, axis=1)
            mask = err < threshold_um
            key = (int(mask.sum()), float(np.sum(np.minimum(err, threshold_um))))
            if key[0] > best[0] or (key[0] == best[0] and key[1] < best[1]):
                best, best_mask = key, mask
        if best[0] >= 3:
            inl = best_mask.copy()
            for _ in range(3):  # refit on the consensus set, re-evaluate
                m = fit_affine(src[inl], dst[inl])
                new = np.linalg.norm(_apply_pts(m, src) - dst, axis=1) < threshold_um
                if new.sum() < 3 or np.array_equal(new, inl):
                    break
                inl = new
    elif method != "none":
        raise InputError(f"unknown robust method {method!r}", field="registration.robust",
                         expected=" | ".join(ROBUST_METHODS))
    m = fit_affine(src[inl], dst[inl])
    res = _apply_pts(m, src) - dst
    loo = loo_residuals(src[inl], dst[inl])
    res[inl] = loo
    if inl.sum() > 3:
        norms = np.linalg.norm(loo, axis=1)
        rms, mx = float(np.sqrt(np.mean(norms**2))), float(np.max(norms))
    else:
        rms = mx = None
    return RobustFit(matrix=m, inliers=inl, residuals=res, rms_um=rms, max_um=mx)


# --------------------------------------------------------------------------------------------
# the Registration object (registration.json)
# --------------------------------------------------------------------------------------------


@dataclass
class RegionTransform:
    name: str
    matrix: np.ndarray  # H&E level-0 px -> Xenium µm
    inverse: np.ndarray  # Xenium µm -> H&E level-0 px
    n_landmarks: int = 0
    rms_um: float | None = None
    max_um: float | None = None
    outliers: list[int] = field(default_factory=list)
    refine_score_before: float | None = None
    refine_score_after: float | None = None
    refined: bool = False
    polygon_um: np.ndarray | None = None
    landmarks_um: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def to_dict(self) -> dict[str, Any]:
        def f(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        return {
            "name": self.name,
            "matrix": np.asarray(self.matrix, float).tolist(),
            "inverse": np.asarray(self.inverse, float).tolist(),
            "n_landmarks": int(self.n_landmarks),
            "rms_um": f(self.rms_um),
            "max_um": f(self.max_um),
            "outliers": [int(i) for i in self.outliers],
            "refine_score_before": f(self.refine_score_before),
            "refine_score_after": f(self.refine_score_after),
            "refined": bool(self.refined),
            "polygon_um": None if self.polygon_um is None else np.asarray(self.polygon_um, float).tolist(),
            "landmarks_um": np.asarray(self.landmarks_um, float).reshape(-1, 2).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegionTransform:
        m = np.asarray(d["matrix"], float)
        inv = np.asarray(d["inverse"], float) if d.get("inverse") is not None else np.linalg.inv(m)
        poly = d.get("polygon_um")
        return cls(name=str(d["name"]), matrix=m, inverse=inv, n_landmarks=int(d.get("n_landmarks", 0)),
                   rms_um=d.get("rms_um"), max_um=d.get("max_um"), outliers=list(d.get("outliers") or []),
                   refine_score_before=d.get("refine_score_before"),
                   refine_score_after=d.get("refine_score_after"), refined=bool(d.get("refined", False)),
                   polygon_um=None if poly is None else np.asarray(poly, float),
                   landmarks_um=np.asarray(d.get("landmarks_um") or np.zeros((0, 2)), float).reshape(-1, 2))


def _densify(ring: np.ndarray, step: float) -> np.ndarray:
    closed = np.vstack([ring, ring[:1]])
    pts = []
    for a, b in zip(closed[:-1], closed[1:], strict=True):
        k = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
        t = np.arange(k)[:, None] / k
        pts.append(a + t * (b - a))
    return np.vstack(pts)


@dataclass
class Registration:
    """Per-region affines between H&E level-0 pixels and Xenium µm (see docs/ARCHITECTURE.md)."""

    regions: list[RegionTransform]
    sample: str = ""
    method: str = "landmarks"
    he_mpp: float | None = None
    xenium_pixel_size: float | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    transcript_bbox_he: list[float] | None = None
    region_assignment: str = "nearest"

    # ---- io
    def to_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "method": self.method,
            "he_mpp": self.he_mpp,
            "xenium_pixel_size": self.xenium_pixel_size,
            "inputs": dict(self.inputs),
            "transcript_bbox_he": None if self.transcript_bbox_he is None else [float(v) for v in self.transcript_bbox_he],
            "region_assignment": self.region_assignment,
            "regions": [r.to_dict() for r in self.regions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registration:
        return cls(regions=[RegionTransform.from_dict(r) for r in d["regions"]], sample=d.get("sample", ""),
                   method=d.get("method", "landmarks"), he_mpp=d.get("he_mpp"),
                   xenium_pixel_size=d.get("xenium_pixel_size"), inputs=dict(d.get("inputs") or {}),
                   transcript_bbox_he=d.get("transcript_bbox_he"),
                   region_assignment=d.get("region_assignment", "nearest"))

    @classmethod
    def load(cls, path: str | Path) -> Registration:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            reg = cls.from_dict(d)
        except FileNotFoundError:
            raise InputError("file not found", file=path, expected="a registration.json from the register rule") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a valid registration file ({exc})", file=path,
                             expected="registration.json as in docs/ARCHITECTURE.md") from None
        if not reg.regions:
            raise InputError("no regions", file=path, field="regions", expected="at least one region")
        return reg

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=1))

    # ---- geometry
    def __post_init__(self) -> None:
        self._index: Any = None

    def _build_index(self) -> None:
        has_poly = [r.polygon_um is not None for r in self.regions]
        paths: list[Any] = []
        pts, owner = [], []
        if any(has_poly):
            from matplotlib.path import Path as MplPath

            for i, r in enumerate(self.regions):
                if r.polygon_um is not None:
                    ring = np.asarray(r.polygon_um, float)
                    paths.append((i, MplPath(np.vstack([ring, ring[:1]]), closed=True)))
                    per = float(np.sum(np.linalg.norm(np.diff(np.vstack([ring, ring[:1]]), axis=0), axis=1)))
                    b = _densify(ring, max(per / 2000.0, 1e-6))
                else:
                    b = self._region_points(r)
                pts.append(b)
                owner.append(np.full(len(b), i))
        else:
            for i, r in enumerate(self.regions):
                b = self._region_points(r)
                pts.append(b)
                owner.append(np.full(len(b), i))
        allpts = np.vstack(pts) if pts else np.zeros((0, 2))
        tree = cKDTree(allpts) if len(allpts) else None
        self._index = (paths, tree, np.concatenate(owner) if owner else np.zeros(0, int))

    @staticmethod
    def _region_points(r: RegionTransform) -> np.ndarray:
        lm = np.asarray(r.landmarks_um, float).reshape(-1, 2)
        if len(lm):
            keep = np.ones(len(lm), bool)
            keep[[i for i in r.outliers if 0 <= i < len(lm)]] = False
            if keep.sum():
                return lm[keep]
            return lm
        return np.zeros((0, 2))

    def assign_regions(self, x_um: Any, y_um: Any) -> np.ndarray:
        """Region index per point (int64); polygon containment, else nearest region; -1 = dropped."""
        x = np.asarray(x_um, dtype=np.float64).ravel()
        y = np.asarray(y_um, dtype=np.float64).ravel()
        n = len(x)
        if len(self.regions) == 1 and self.regions[0].polygon_um is None:
            return np.zeros(n, dtype=np.int64)
        if self._index is None:
            self._build_index()
        paths, tree, owner = self._index
        out = np.full(n, -1, dtype=np.int64)
        pts = np.column_stack([x, y])
        if paths:
            for i, p in paths:
                todo = out < 0
                if not todo.any():
                    break
                inside = p.contains_points(pts[todo])
                idx = np.flatnonzero(todo)[inside]
                out[idx] = i
            if self.region_assignment == "drop":
                return out
        todo = np.flatnonzero(out < 0)
        if len(todo) and tree is not None:
            _, j = tree.query(pts[todo], k=1)
            out[todo] = owner[j]
        elif len(todo):
            out[todo] = 0
        return out

    def _map(self, a: Any, b: Any, region_idx: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        ridx = np.broadcast_to(np.asarray(region_idx, dtype=np.int64), np.broadcast_shapes(a.shape, b.shape))
        a, b = np.broadcast_to(a, ridx.shape), np.broadcast_to(b, ridx.shape)
        if ridx.ndim == 0:
            if int(ridx) < 0:
                return np.asarray(np.nan), np.asarray(np.nan)
            r = self.regions[int(ridx)]
            return apply_affine(r.matrix if which == "m" else r.inverse, a, b)
        ox = np.full(ridx.shape, np.nan)
        oy = np.full(ridx.shape, np.nan)
        if np.any(ridx >= len(self.regions)):
            raise IndexError(f"region index {int(ridx.max())} out of range ({len(self.regions)} regions)")
        for i, r in enumerate(self.regions):
            sel = ridx == i
            if sel.any():
                ox[sel], oy[sel] = apply_affine(r.matrix if which == "m" else r.inverse, a[sel], b[sel])
        return ox, oy

    def um_to_he(self, x_um: Any, y_um: Any, region_idx: Any) -> tuple[np.ndarray, np.ndarray]:
        """Xenium µm → H&E level-0 px with each point's region (NaN where region_idx == -1)."""
        return self._map(x_um, y_um, region_idx, "inv")

    def he_to_um(self, x_px: Any, y_px: Any, region_idx: Any) -> tuple[np.ndarray, np.ndarray]:
        """H&E level-0 px → Xenium µm with each point's region (NaN where region_idx == -1)."""
        return self._map(x_px, y_px, region_idx, "m")


# --------------------------------------------------------------------------------------------
# images at a downsampled level (never full resolution)
# --------------------------------------------------------------------------------------------


class MorphologySource(Protocol):
    pixel_size: float

    def morphology_levels(self) -> list[tuple[int, int]]: ...
    def read_morphology(self, level: int = 0) -> np.ndarray: ...


class SlideSource(Protocol):
    mpp: float
    dimensions: tuple[int, int]
    level_dimensions: Sequence[tuple[int, int]]
    level_downsamples: Sequence[float]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...
    def get_best_level_for_downsample(self, downsample: float) -> int: ...


@dataclass
class Raster:
    """A 2-D image with the affine from its pixel (col, row) to a frame (µm for DAPI, H&E L0 px)."""

    data: np.ndarray  # float32 (h, w)
    to_frame: np.ndarray  # 3×3
    level: int
    mpp: float  # µm per raster pixel

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape  # type: ignore[return-value]


def _level_to_l0(dx: float, dy: float, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
    """Centre-aligned map from pixel index of a level downsampled by (dx, dy) to level-0 index."""
    return np.array([[dx, 0.0, x0 + (dx - 1.0) / 2.0], [0.0, dy, y0 + (dy - 1.0) / 2.0], [0.0, 0.0, 1.0]])


def _level_downsample(full: int, size: int) -> float:
    """Downsample of a pyramid level: the integer factor whose floor/ceil gives ``size``, else the ratio.

    Pyramids are built with integer factors and rounded sizes (2300 px -> 287 px at 8x); using the
    plain ratio (8.014) would put a scale error of up to one level pixel across the image.
    """
    r = full / size
    k = round(r)
    if k >= 1 and abs(full - k * size) < k:
        return float(k)
    return r


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    if f <= 1:
        return img.astype(np.float32, copy=False)
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    v = img[:h, :w].astype(np.float32, copy=False)
    return v.reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)


def load_dapi(source: MorphologySource, target_mpp: float) -> Raster:
    """DAPI at the OME-TIFF pyramid level closest to ``target_mpp`` (then integer block-mean).

    ``source`` is a :class:`morphomol.io.xenium.XeniumBundle` (or anything with ``pixel_size``,
    ``morphology_levels()``, ``read_morphology(level)``). Only that level is read.
    """
    levels = [tuple(int(v) for v in lv[-2:]) for lv in source.morphology_levels()]
    ps = float(source.pixel_size)
    h0, w0 = levels[0]
    mpps = [ps * _level_downsample(w0, w) for (_, w) in levels]
    level = int(np.argmin([abs(math.log(m / target_mpp)) for m in mpps]))
    img = np.asarray(source.read_morphology(level))
    if img.ndim == 3:  # (C, H, W) or (H, W, C): first channel is DAPI
        img = img[0] if img.shape[0] < img.shape[-1] else img[..., 0]
    if img.ndim != 2:
        raise InputError(f"morphology image level {level} has shape {img.shape}", field="morphology",
                         expected="a 2-D DAPI image")
    h, w = img.shape
    dx, dy = _level_downsample(w0, w), _level_downsample(h0, h)
    f = max(1, int(math.floor(target_mpp / (ps * dx) * 1.02)))  # tolerate odd level sizes
    data = _block_mean(img, f)
    to_um = _scale(ps) @ _level_to_l0(dx * f, dy * f)
    log.info("DAPI for refinement: level %d of %d (%dx%d px, %.3f µm/px), block %d -> %.3f µm/px",
             level, len(levels), w, h, ps * dx, f, ps * dx * f)
    return Raster(data=data, to_frame=to_um, level=level, mpp=ps * dx * f)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (``skimage.color.rgb2hed`` channel 0), float32."""
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(rgb)[..., :3]).astype(np.float32)[..., 0]


def load_he(slide: SlideSource, target_mpp: float, bbox_l0: Sequence[float] | None = None,
            max_strip_px: int = 4_000_000) -> Raster:
    """Hematoxylin of the H&E at the best OpenSlide level for ``target_mpp`` (then block-mean).

    Reads only ``bbox_l0`` (level-0 px, ``[x0, y0, x1, y1]``; whole slide if ``None``), in strips,
    so memory stays bounded even when the slide has no suitable pyramid level.
    """
    mpp = float(slide.mpp)
    W, H = (int(v) for v in slide.dimensions)
    ds_target = max(target_mpp / mpp, 1.0)
    level = int(slide.get_best_level_for_downsample(ds_target * 1.02))  # tolerate odd level sizes
    lw, lh = (int(v) for v in slide.level_dimensions[level])
    dx, dy = _level_downsample(W, lw), _level_downsample(H, lh)
    f = max(1, int(math.floor(ds_target / dx * 1.02)))
    if bbox_l0 is None:
        bbox_l0 = (0, 0, W, H)
    x0 = int(max(0, math.floor(bbox_l0[0])))
    y0 = int(max(0, math.floor(bbox_l0[1])))
    x1 = int(min(W, math.ceil(bbox_l0[2])))
    y1 = int(min(H, math.ceil(bbox_l0[3])))
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise InputError(f"region bbox {list(map(float, bbox_l0))} lies outside the H&E ({W}x{H} px)",
                         field="registration", expected="a transform mapping the region onto the H&E")
    # snap the origin to the level grid. OpenSlide resamples sub-pixel offsets (origin = the
    # level-0 location asked for); the tifffile/Pillow backends start at floor(x0 / ds).
    lx, ly = math.floor(x0 / dx), math.floor(y0 / dy)
    x0, y0 = int(math.ceil(lx * dx - 1e-9)), int(math.ceil(ly * dy - 1e-9))
    subpixel = getattr(slide, "backend", "openslide") == "openslide"
    ox, oy = (float(x0), float(y0)) if subpixel else (lx * dx, ly * dy)
    w_l = max(f, int(math.ceil((x1 - x0) / dx)) // f * f)
    h_l = max(f, int(math.ceil((y1 - y0) / dy)) // f * f)
    w_l = min(w_l, (lw - lx) // f * f)
    h_l = min(h_l, (lh - ly) // f * f)
    if w_l < f or h_l < f:
        raise InputError("region is too small at the refinement resolution", field="registration.refine_mpp",
                         expected="a smaller refine_mpp")
    rows_per_strip = max(f, (max_strip_px // max(w_l, 1)) // f * f)
    out = np.empty((h_l // f, w_l // f), dtype=np.float32)
    for r0 in range(0, h_l, rows_per_strip):
        rh = min(rows_per_strip, h_l - r0)
        ys = int(round(y0 + r0 * dy)) if subpixel else int(math.ceil((ly + r0) * dy - 1e-9))
        rgb = slide.read_region((x0, ys), level, (w_l, rh))
        out[r0 // f:(r0 + rh) // f] = _block_mean(hematoxylin(rgb), f)
    to_he = _level_to_l0(dx * f, dy * f, ox, oy)
    log.info("H&E for refinement: level %d of %d (%dx%d px, %.3f µm/px), block %d -> %.3f µm/px, read %dx%d",
             level, len(slide.level_dimensions), lw, lh, mpp * dx, f, mpp * dx * f, w_l, h_l)
    return Raster(data=out, to_frame=to_he, level=level, mpp=mpp * dx * f)


# --------------------------------------------------------------------------------------------
# image-based refinement
# --------------------------------------------------------------------------------------------


def _polygon_mask(poly: np.ndarray | None, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    if poly is None:
        return np.ones(gx.shape, bool)
    from matplotlib.path import Path as MplPath

    ring = np.asarray(poly, float)
    p = MplPath(np.vstack([ring, ring[:1]]), closed=True)
    return p.contains_points(np.column_stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)


def _sample(r: Raster, data: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``data`` (smoothed raster) at frame coordinates; returns values and validity."""
    inv = np.linalg.inv(r.to_frame)
    cx, cy = apply_affine(inv, fx, fy)
    h, w = data.shape
    valid = (cx >= -0.5) & (cx <= w - 0.5) & (cy >= -0.5) & (cy <= h - 0.5)
    v = ndimage.map_coordinates(data, [cy.ravel(), cx.ravel()], order=1, mode="nearest").reshape(fx.shape)
    return v.astype(np.float32, copy=False), valid


def _ncc(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    if m.sum() < 16:
        return -1.0
    a = a[m].astype(np.float64)
    b = b[m].astype(np.float64)
    a = a - a.mean()
    b = b - b.mean()
    # einsum, not BLAS: a threaded dot of this size is slower under load than a plain loop
    d = math.sqrt(float(np.einsum("i,i->", a, a)) * float(np.einsum("i,i->", b, b)))
    return float(np.einsum("i,i->", a, b)) / d if d > 0 else -1.0


def _robust_norm(x: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(x, 99.5)) if x.size else 1.0
    lo = float(np.percentile(x, 0.5)) if x.size else 0.0
    return np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(np.float32)


@dataclass
class _Grid:
    gx: np.ndarray
    gy: np.ndarray
    step: float
    dapi: np.ndarray
    mask: np.ndarray  # region ∧ DAPI valid
    he_smooth: np.ndarray


class _Problem:
    """NCC of DAPI vs hematoxylin on a µm grid as a function of a correction of the affine."""

    def __init__(self, dapi: Raster, he: Raster, polygon: np.ndarray | None, bbox_um: Sequence[float],
                 refine_mpp: float) -> None:
        self.dapi, self.he, self.polygon = dapi, he, polygon
        self.bbox = [float(v) for v in bbox_um]
        self.refine_mpp = refine_mpp
        self.centre = np.array([(self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2])
        self.radius = max(1.0, 0.5 * math.hypot(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))
        self.dapi_n = _robust_norm(dapi.data)
        self.he_n = _robust_norm(he.data)
        self._grids: dict[float, _Grid] = {}

    def grid(self, step: float) -> _Grid:
        if step in self._grids:
            return self._grids[step]
        x0, y0, x1, y1 = self.bbox
        xs = np.arange(x0 + step / 2, x1, step)
        ys = np.arange(y0 + step / 2, y1, step)
        gx, gy = np.meshgrid(xs, ys)
        sd = max(0.0, 0.5 * step / self.dapi.mpp)
        sh = max(0.0, 0.5 * step / self.he.mpp)
        dsm = ndimage.gaussian_filter(self.dapi_n, sd) if sd > 0.3 else self.dapi_n
        hsm = ndimage.gaussian_filter(self.he_n, sh) if sh > 0.3 else self.he_n
        dv, dvalid = _sample(self.dapi, dsm, gx, gy)
        mask = dvalid & _polygon_mask(self.polygon, gx, gy)
        g = _Grid(gx=gx, gy=gy, step=step, dapi=dv, mask=mask, he_smooth=hsm)
        self._grids[step] = g
        return g

    def correction(self, p: np.ndarray) -> np.ndarray:
        a = np.eye(3)
        a[:2, :2] += np.asarray(p[:4]).reshape(2, 2) / self.radius
        c = self.centre
        return _translate(c[0] + p[4], c[1] + p[5]) @ a @ _translate(-c[0], -c[1])

    def warped_he(self, m: np.ndarray, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
        inv = np.linalg.inv(m)
        hx, hy = apply_affine(inv, g.gx, g.gy)
        return _sample(self.he, g.he_smooth, hx, hy)

    def score(self, m: np.ndarray, g: _Grid) -> float:
        hv, hvalid = self.warped_he(m, g)
        mm = g.mask & hvalid
        if mm.sum() < 0.25 * max(1, g.mask.sum()):
            return -1.0
        return _ncc(g.dapi, hv, mm)


def _shift_search(prob: _Problem, m: np.ndarray, g: _Grid) -> np.ndarray:
    """Best integer-grid translation (µm) of the warped H&E onto the DAPI by masked phase correlation."""
    from skimage.registration import phase_cross_correlation

    hv, hvalid = prob.warped_he(m, g)
    mm = g.mask & hvalid
    if mm.sum() < 64:
        return m
    try:
        shift = phase_cross_correlation(g.dapi * mm, hv * mm, reference_mask=g.mask, moving_mask=mm,
                                        overlap_ratio=0.5)
        shift = shift[0] if isinstance(shift, tuple) else shift
    except Exception as exc:  # noqa: BLE001 - a failed search just keeps the start
        log.debug("phase correlation failed: %s", exc)
        return m
    dy, dx = (float(v) for v in np.asarray(shift).ravel()[:2])
    cand = _translate(dx * g.step, dy * g.step) @ m
    return cand if prob.score(cand, g) > prob.score(m, g) else m


def refine_affine(m0: np.ndarray, dapi: Raster, he: Raster, *, bbox_um: Sequence[float],
                  polygon_um: np.ndarray | None = None, refine_mpp: float = 4.0,
                  scales: Sequence[int] = (4, 2, 1), shift_search: bool = True,
                  max_grid_px: int = 160_000) -> tuple[np.ndarray, float, float]:
    """Refine an affine (H&E px → µm) by maximising DAPI/hematoxylin NCC, coarse → fine.

    Returns ``(matrix, score_before, score_after)``; scores are NCC at the finest grid step.
    """
    prob = _Problem(dapi, he, polygon_um, bbox_um, refine_mpp)
    area = (prob.bbox[2] - prob.bbox[0]) * (prob.bbox[3] - prob.bbox[1])
    finest = max(refine_mpp, math.sqrt(area / max_grid_px))
    steps = sorted({finest * s for s in scales}, reverse=True)
    before = prob.score(m0, prob.grid(steps[-1]))
    m = m0.copy()
    for si, step in enumerate(steps):
        g = prob.grid(step)
        if si == 0 and shift_search:
            m = _shift_search(prob, m, g)
        base = m.copy()

        def cost(p: np.ndarray, base: np.ndarray = base, g: _Grid = g) -> float:
            return -prob.score(prob.correction(p) @ base, g)

        simplex = np.vstack([np.zeros(6), np.eye(6) * step])
        res = optimize.minimize(cost, np.zeros(6), method="Nelder-Mead",
                                options={"initial_simplex": simplex, "xatol": 0.02 * step, "fatol": 1e-6,
                                         "maxfev": 1200})
        if -res.fun > prob.score(base, g):
            m = prob.correction(res.x) @ base
        log.debug("refine step %.1f µm: NCC %.4f (%d evals)", step, -res.fun, res.nfev)
    after = prob.score(m, prob.grid(steps[-1]))
    return m, float(before), float(after)


def _otsu_mask(img: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    v = img[np.isfinite(img)]
    if v.size == 0 or float(v.max()) <= float(v.min()):
        return np.zeros(img.shape, bool)
    return img > threshold_otsu(v)


def _moments(mask: np.ndarray, to_frame: np.ndarray) -> tuple[np.ndarray, float]:
    rr, cc = np.nonzero(mask)
    x, y = apply_affine(to_frame, cc, rr)
    pts = np.column_stack([x, y])
    c = pts.mean(axis=0)
    cov = np.cov((pts - c).T)
    w, v = np.linalg.eigh(cov)
    major = v[:, int(np.argmax(w))]
    return c, math.atan2(major[1], major[0])


def coarse_init(dapi: Raster, he: Raster, he_mpp: float, coarse_mpp: float) -> tuple[np.ndarray, float]:
    """Initial H&E px → µm affine without landmarks: tissue-mask moments + rotations/flips + shifts."""
    sd = max(0.0, 1.0 * coarse_mpp / dapi.mpp)
    sh = max(0.0, 1.0 * coarse_mpp / he.mpp)
    dmask = _otsu_mask(ndimage.gaussian_filter(_robust_norm(dapi.data), sd))
    hmask = _otsu_mask(ndimage.gaussian_filter(_robust_norm(he.data), sh))
    if dmask.sum() < 10 or hmask.sum() < 10:
        raise InputError("no tissue found for coarse registration", field="alignment",
                         expected="a keypoints CSV or alignment matrix, or images with visible tissue")
    cd, ad = _moments(dmask, dapi.to_frame)
    ch, ah = _moments(hmask, he.to_frame)
    h, w = dapi.data.shape
    ex = apply_affine(dapi.to_frame, np.array([-0.5, w - 0.5]), np.array([-0.5, h - 0.5]))
    bbox = [float(ex[0][0]), float(ex[1][0]), float(ex[0][1]), float(ex[1][1])]
    prob = _Problem(dapi, he, None, bbox, coarse_mpp)
    g = prob.grid(coarse_mpp)
    best: tuple[float, np.ndarray] = (-2.0, np.eye(3))
    for flip in (False, True):
        ah_eff = -ah if flip else ah
        angles = {round((ad - ah_eff) % (2 * math.pi), 6), round((ad - ah_eff + math.pi) % (2 * math.pi), 6)}
        angles |= {0.0, math.pi / 2, math.pi, 3 * math.pi / 2}
        for theta in sorted(angles):
            m = _translate(cd[0], cd[1]) @ _rotation(theta, flip) @ _scale(he_mpp) @ _translate(-ch[0], -ch[1])
            m = _shift_search(prob, m, g)
            s = prob.score(m, g)
            log.debug("coarse candidate flip=%s theta=%.1f° NCC %.3f", flip, math.degrees(theta), s)
            if s > best[0]:
                best = (s, m)
    log.info("coarse initialisation: NCC %.3f", best[0])
    return best[1], best[0]


# --------------------------------------------------------------------------------------------
# QC figure
# --------------------------------------------------------------------------------------------


@dataclass
class _RegionQC:
    fixed_um: np.ndarray  # (n, 2)
    residual_um: np.ndarray  # (n, 2)
    outliers: list[int]
    bbox_um: list[float]
    moving_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def write_qc_png(path: str | Path, reg: Registration, qc: list[_RegionQC], dapi: Raster | None,
                 he: SlideSource | None, refine_mpp: float) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(reg.regions)
    ncol = min(n, 3)
    nrow = int(math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.0 * ncol, 6.2 * nrow), squeeze=False)
    for i, (r, q) in enumerate(zip(reg.regions, qc, strict=True)):
        ax = axes[i // ncol][i % ncol]
        x0, y0, x1, y1 = q.bbox_um
        if dapi is not None and he is not None:
            try:
                hb = _he_bbox(r.inverse, q.bbox_um, pad_um=4 * refine_mpp)
                her = load_he(he, refine_mpp, hb)
                prob = _Problem(dapi, her, None, q.bbox_um, refine_mpp)
                step = max(refine_mpp, math.sqrt((x1 - x0) * (y1 - y0) / 250_000))
                g = prob.grid(step)
                hv, hvalid = prob.warped_he(r.matrix, g)
                rgb = np.zeros(g.gx.shape + (3,), np.float32)
                dn = np.where(g.mask, g.dapi, 0)
                hn = np.where(hvalid, hv, 0)
                rgb[..., 1] = dn / max(float(np.percentile(dn, 99.5)), 1e-6)
                hn = hn / max(float(np.percentile(hn, 99.5)), 1e-6)
                rgb[..., 0] = hn
                rgb[..., 2] = hn
                ax.imshow(np.clip(rgb, 0, 1), extent=(x0, x1, y1, y0), interpolation="nearest")
            except MorphomolError as exc:
                ax.text(0.5, 0.5, f"no image overlay: {exc.message}", transform=ax.transAxes, ha="center", wrap=True)
        if r.polygon_um is not None:
            pr = np.vstack([r.polygon_um, r.polygon_um[:1]])
            ax.plot(pr[:, 0], pr[:, 1], color="yellow", lw=1.0, label="region polygon")
        if len(q.fixed_um):
            res = np.nan_to_num(q.residual_um)
            norms = np.linalg.norm(res, axis=1)
            inl = np.ones(len(res), bool)
            inl[q.outliers] = False
            ref = float(np.median(norms[inl])) if inl.any() and np.median(norms[inl]) > 0 else 1.0
            key_um = float(10 ** math.floor(math.log10(max(ref, 1e-3))) * (5 if ref / 10 ** math.floor(math.log10(max(ref, 1e-3))) > 3 else 1))
            k = 0.05 * max(x1 - x0, y1 - y0) / max(ref, 1e-6)  # median arrow ≈ 5 % of the panel
            ax.scatter(q.fixed_um[inl, 0], q.fixed_um[inl, 1], s=18, facecolors="none", edgecolors="white",
                       label="landmark (DAPI)")
            qv = ax.quiver(q.fixed_um[:, 0], q.fixed_um[:, 1], res[:, 0], res[:, 1], angles="xy",
                           scale_units="xy", scale=1.0 / k, color=np.where(inl, "cyan", "red").tolist(), width=0.004)
            ax.quiverkey(qv, 0.06, 0.04, key_um, f"{key_um:g} µm residual (arrows ×{k:.0f})", labelpos="E",
                         coordinates="axes", color="cyan", labelcolor="white",
                         fontproperties={"size": 8})
            if q.outliers:
                o = q.fixed_um[q.outliers]
                ax.scatter(o[:, 0], o[:, 1], marker="x", s=60, c="red", label="outlier (excluded)")
                for j in q.outliers:
                    ax.annotate(f"#{j}", q.fixed_um[j], color="red", fontsize=8, xytext=(3, 3),
                                textcoords="offset points")
        rms = "n/a" if r.rms_um is None else f"{r.rms_um:.2f}"
        mx = "n/a" if r.max_um is None else f"{r.max_um:.2f}"
        sc = ""
        if r.refine_score_before is not None:
            sc = (f"\nNCC {r.refine_score_before:.3f} → {r.refine_score_after:.3f} "
                  f"({'refined' if r.refined else 'refinement not kept'})")
        ax.set_title(f"{r.name}: LOO RMS {rms} µm, max {mx} µm, n={r.n_landmarks}, "
                     f"outliers {len(r.outliers)}{sc}", fontsize=9)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_xlabel("x (Xenium µm)")
        ax.set_ylabel("y (Xenium µm)")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"{reg.sample}: {reg.method} — green: DAPI, magenta: H&E hematoxylin warped to Xenium "
                 f"({refine_mpp:g} µm/px)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def _opt(v: Any) -> Any:
    """None for missing sheet values (None, NaN, '', 'nan', 'NA')."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, str) and v.strip().lower() in ("", "nan", "na", "none", "null"):
        return None
    return v


def _he_bbox(inverse: np.ndarray, bbox_um: Sequence[float], pad_um: float = 0.0) -> list[float]:
    x0, y0, x1, y1 = bbox_um
    cx = np.array([x0 - pad_um, x1 + pad_um, x1 + pad_um, x0 - pad_um])
    cy = np.array([y0 - pad_um, y0 - pad_um, y1 + pad_um, y1 + pad_um])
    hx, hy = apply_affine(inverse, cx, cy)
    return [float(hx.min()), float(hy.min()), float(hx.max()), float(hy.max())]


def _fmt_lm(kp: Keypoints | None, idx: np.ndarray, order: Sequence[int], values: np.ndarray, k: int = 3) -> str:
    parts = []
    for j in list(order)[:k]:
        line = f"line {int(kp.rows[idx[j]])}" if kp is not None and len(kp.rows) else f"#{j}"
        parts.append(f"landmark {j} ({line}) {values[j]:.1f} µm")
    return ", ".join(parts)


def _region_groups(kp: Keypoints, fixed_um: np.ndarray, polygons: list[RegionPolygon] | None,
                   assignment: str, sample: str) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, landmark indices, polygon) per region."""
    n = len(kp)
    if polygons:
        names = [p.name for p in polygons]
        if kp.regions is not None and set(kp.regions) <= set(names):
            lab = np.array([names.index(r) for r in kp.regions])
        else:
            if kp.regions is not None:
                log.warning("%s: keypoint region labels %s do not match the GeoJSON names %s; "
                            "assigning landmarks by polygon containment", sample, sorted(set(kp.regions)), names)
            tmp = Registration(regions=[RegionTransform(name=p.name, matrix=np.eye(3), inverse=np.eye(3),
                                                        polygon_um=p.polygon_um) for p in polygons],
                               region_assignment=assignment)
            lab = tmp.assign_regions(fixed_um[:, 0], fixed_um[:, 1])
            if (lab < 0).any():
                log.warning("%s: %d landmark(s) outside every region polygon dropped (region_assignment=drop)",
                            sample, int((lab < 0).sum()))
        return [(p.name, np.flatnonzero(lab == i), p.polygon_um) for i, p in enumerate(polygons)]
    if kp.regions is not None:
        names = list(dict.fromkeys(kp.regions))
        lab = np.array([names.index(r) for r in kp.regions])
        return [(nm, np.flatnonzero(lab == i), None) for i, nm in enumerate(names)]
    return [("r0", np.arange(n), None)]


def _check_bounds(kp: Keypoints, morph_wh: tuple[int, int] | None, he_wh: tuple[int, int], sample: str) -> None:
    bad = []
    for label, pts, wh in (("morphology (fixedX/fixedY)", kp.fixed_px, morph_wh),
                           ("H&E (alignmentX/alignmentY)", kp.moving_px, he_wh)):
        if wh is None:
            continue
        w, h = wh
        tx, ty = BOUNDS_TOL * w + 2, BOUNDS_TOL * h + 2
        out = (pts[:, 0] < -tx) | (pts[:, 0] > w + tx) | (pts[:, 1] < -ty) | (pts[:, 1] > h + ty)
        for i in np.flatnonzero(out)[:5]:
            reg = f" region {kp.regions[i]}" if kp.regions is not None else ""
            bad.append(f"line {int(kp.rows[i])}{reg} ({pts[i, 0]:.1f}, {pts[i, 1]:.1f}) outside the "
                       f"{label} image of {w}x{h} px")
    if bad:
        raise InputError(f"sample {sample}: landmarks outside the images: " + "; ".join(bad), file=kp.path,
                         field="fixedX,fixedY,alignmentX,alignmentY", expected="landmarks inside both images")


def register_sample(*, xenium: Any, he: Any, out_json: str | Path, out_qc: str | Path,
                    alignment: Any = None, regions: Any = None, sample: str = "", he_mpp: Any = None,
                    qv_min: Any = 20.0, robust: str = "trim", outlier_threshold_um: float = 10.0,
                    max_rms_um: float = 15.0, region_assignment: str = "nearest", refine: str = "auto",
                    refine_mpp: float = 4.0, seed: int = 0, batch_size: int = 2_000_000,
                    **unknown: Any) -> Registration:
    """Register one sample and write ``registration.json`` + ``registration_qc.png``.

    ``xenium``: Xenium output dir (or a XeniumBundle); ``he``: H&E slide path (or a Slide);
    ``alignment``: keypoints CSV or 3×3 matrix CSV (None → image-based); ``regions``: GeoJSON.
    Raises :class:`InputError` (and writes nothing) on bad input.
    """
    from morphomol.io.he import open_slide
    from morphomol.io.xenium import XeniumBundle

    t0 = time.perf_counter()
    for k in unknown:
        log.warning("ignoring unknown registration setting %r", k)
    if robust not in ROBUST_METHODS:
        raise InputError(f"unknown value {robust!r}", field="registration.robust", expected=" | ".join(ROBUST_METHODS))
    if refine not in REFINE_MODES:
        raise InputError(f"unknown value {refine!r}", field="registration.refine", expected=" | ".join(REFINE_MODES))
    if region_assignment not in ASSIGNMENTS:
        raise InputError(f"unknown value {region_assignment!r}", field="registration.region_assignment",
                         expected=" | ".join(ASSIGNMENTS))
    if not (refine_mpp and float(refine_mpp) > 0):
        raise InputError(f"refine_mpp is {refine_mpp!r}", field="registration.refine_mpp", expected="a positive number")
    refine_mpp = float(refine_mpp)
    alignment, regions, he_mpp = _opt(alignment), _opt(regions), _opt(he_mpp)
    sample = sample or Path(str(xenium)).name

    bundle = xenium if hasattr(xenium, "pixel_size") else XeniumBundle(xenium)
    slide = he if hasattr(he, "read_region") else open_slide(he, mpp=None if he_mpp is None else float(he_mpp))
    ps = float(bundle.pixel_size)
    he_w, he_h = (int(v) for v in slide.dimensions)
    try:
        mh, mw = (int(v) for v in bundle.morphology_levels()[0][-2:])
        morph_wh: tuple[int, int] | None = (mw, mh)
    except (MorphomolError, OSError, FileNotFoundError, IndexError, AttributeError) as exc:
        log.warning("%s: no morphology (DAPI) image (%s); image refinement unavailable", sample, exc)
        morph_wh = None

    inputs: dict[str, str] = {}
    try:
        polygons = read_regions_geojson(regions) if regions is not None else None
        parsed = read_alignment(alignment) if alignment is not None else None
    except InputError as exc:  # name the sample too
        raise InputError(f"sample {sample}: {exc.message}") from None
    if regions is not None:
        inputs[Path(regions).name] = sha256_file(regions)
    if alignment is not None:
        inputs[Path(alignment).name] = sha256_file(alignment)

    dapi: Raster | None = None
    if morph_wh is not None:  # for refinement and for the QC overlay
        dapi = load_dapi(bundle, refine_mpp)
    full_um = [0.0, 0.0, morph_wh[0] * ps, morph_wh[1] * ps] if morph_wh else None

    region_list: list[RegionTransform] = []
    qc: list[_RegionQC] = []
    if isinstance(parsed, Keypoints):
        method = "landmarks"
        kp = parsed
        _check_bounds(kp, morph_wh, (he_w, he_h), sample)
        fixed_um = kp.fixed_px * ps
        for name, idx, poly in _region_groups(kp, fixed_um, polygons, region_assignment, sample):
            lines = ", ".join(str(int(kp.rows[i])) for i in idx[:10])
            if len(idx) < 3:
                raise InputError(f"sample {sample} region {name}: {len(idx)} landmark(s) (lines {lines or 'none'})",
                                 file=kp.path, field="region" if kp.regions is not None or polygons else "rows",
                                 expected="at least 3 non-collinear landmarks per region")
            src, dst = kp.moving_px[idx], fixed_um[idx]
            for label, pts, unit in (("H&E", src, "px"), ("DAPI", dst, "µm")):
                c = collinearity(pts)
                if c < COLLINEAR_RATIO:
                    raise InputError(f"sample {sample} region {name}: the {len(idx)} landmarks (lines {lines}) are "
                                     f"collinear in the {label} image (spread ratio {c:.2g})", file=kp.path,
                                     field="fixedX,fixedY,alignmentX,alignmentY",
                                     expected="at least 3 landmarks not on one line per region")
            try:
                fit = robust_fit(src, dst, method=robust, threshold_um=float(outlier_threshold_um), seed=int(seed))
            except DegenerateFit as exc:
                raise InputError(f"sample {sample} region {name}: {exc} (landmarks on lines {lines})", file=kp.path,
                                 field="fixedX,fixedY,alignmentX,alignmentY", expected="an invertible affine") from None
            norms = np.linalg.norm(np.nan_to_num(fit.residuals, nan=0.0), axis=1)
            outl = [int(i) for i in np.flatnonzero(~fit.inliers)]
            if outl:
                log.warning("%s region %s: outlier landmark(s) excluded: %s", sample, name,
                            _fmt_lm(kp, idx, outl, norms, k=10))
            if fit.rms_um is not None and fit.rms_um > float(max_rms_um):
                order = [int(j) for j in np.argsort(-norms) if fit.inliers[j]]
                raise InputError(f"sample {sample} region {name}: landmark residual RMS {fit.rms_um:.2f} µm exceeds "
                                 f"max_rms_um {float(max_rms_um):g}; worst: {_fmt_lm(kp, idx, order, norms)}",
                                 file=kp.path, field="registration.max_rms_um",
                                 expected=f"RMS <= {float(max_rms_um):g} µm (fix or remove these landmarks)")
            if fit.rms_um is None:
                log.warning("%s region %s: %d inlier landmarks: residuals are undefined (exact fit)",
                            sample, name, int(fit.inliers.sum()))
            m = fit.matrix
            region_list.append(RegionTransform(name=name, matrix=m, inverse=np.linalg.inv(m), n_landmarks=len(idx),
                                               rms_um=fit.rms_um, max_um=fit.max_um, outliers=outl, polygon_um=poly,
                                               landmarks_um=dst))
            bbox = _region_bbox(poly, dst, full_um)
            qc.append(_RegionQC(fixed_um=dst, residual_um=fit.residuals, outliers=outl, bbox_um=bbox, moving_px=src))
            log.info("%s region %s: %d landmarks, LOO RMS %s µm, max %s µm, %d outlier(s)", sample, name, len(idx),
                     _f(fit.rms_um), _f(fit.max_um), len(outl))
    else:
        if isinstance(parsed, np.ndarray):
            method = "matrix"
            m_all = _scale(ps) @ parsed
            log.info("%s: alignment matrix %s (H&E px -> morphology px) scaled by pixel size %.4f", sample,
                     Path(alignment).name, ps)
        else:
            method = "image"
            if dapi is None:
                raise InputError(f"sample {sample}: no alignment file and no morphology image", field="alignment",
                                 expected="a keypoints CSV, an alignment matrix CSV, or a Xenium morphology image")
            coarse_mpp = max(4 * refine_mpp, 16.0)
            dapi_c = load_dapi(bundle, coarse_mpp)
            he_c = load_he(slide, coarse_mpp)
            m_all, _ = coarse_init(dapi_c, he_c, float(slide.mpp), coarse_mpp)
        if not np.all(np.isfinite(m_all)) or abs(np.linalg.det(m_all[:2, :2])) < 1e-12:
            raise InputError(f"sample {sample}: alignment matrix is singular", file=alignment, field="matrix",
                             expected="an invertible affine")
        groups = [(p.name, p.polygon_um) for p in polygons] if polygons else [("r0", None)]
        for name, poly in groups:
            region_list.append(RegionTransform(name=name, matrix=m_all.copy(), inverse=np.linalg.inv(m_all),
                                               polygon_um=poly))
            qc.append(_RegionQC(fixed_um=np.zeros((0, 2)), residual_um=np.zeros((0, 2)), outliers=[],
                                bbox_um=_region_bbox(poly, None, full_um or _um_extent(m_all, he_w, he_h))))

    # image refinement
    do_refine = dapi is not None and (refine != "never" or method == "image")
    if refine != "never" and dapi is None:
        log.warning("%s: refinement skipped (no morphology image)", sample)
    any_refined = False
    for r, q in zip(region_list, qc, strict=True):
        if not do_refine:
            continue
        assert dapi is not None
        t1 = time.perf_counter()
        he_r = load_he(slide, refine_mpp, _he_bbox(r.inverse, q.bbox_um, pad_um=0.15 * _diag(q.bbox_um)))
        m, before, after = refine_affine(r.matrix, dapi, he_r, bbox_um=q.bbox_um, polygon_um=r.polygon_um,
                                         refine_mpp=refine_mpp)
        keep = refine == "always" or method == "image" or after > before + 1e-4
        r.refine_score_before, r.refine_score_after = before, (after if keep else before)
        if keep:
            r.matrix, r.inverse, r.refined = m, np.linalg.inv(m), True
            any_refined = True
        log.info("%s region %s: refinement NCC %.4f -> %.4f (%s) in %.1f s", sample, r.name, before, after,
                 "kept" if keep else "discarded", time.perf_counter() - t1)
        if keep and len(q.moving_px):
            inl = np.ones(len(q.moving_px), bool)
            inl[q.outliers] = False
            d = np.linalg.norm(_apply_pts(r.matrix, q.moving_px[inl]) - q.fixed_um[inl], axis=1)
            log.info("%s region %s: inlier landmark RMS under the refined transform %.2f µm", sample, r.name,
                     float(np.sqrt(np.mean(d**2))))
    if any_refined and method != "image":
        method += "+refine"

    reg = Registration(regions=region_list, sample=sample, method=method, he_mpp=float(slide.mpp),
                       xenium_pixel_size=ps, inputs=inputs, region_assignment=region_assignment)
    reg.transcript_bbox_he = transcript_bbox(reg, bundle, qv_min=_opt(qv_min), batch_size=int(batch_size),
                                             he_wh=(he_w, he_h))
    if reg.transcript_bbox_he is None:
        log.warning("%s: no transcripts mapped into the H&E; transcript_bbox_he is null", sample)
    write_qc_png(out_qc, reg, qc, dapi, slide, refine_mpp)
    reg.save(out_json)
    log.info("%s: registration (%s, %d region(s)) written in %.1f s", sample, method, len(region_list),
             time.perf_counter() - t0)
    return reg


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _diag(b: Sequence[float]) -> float:
    return math.hypot(b[2] - b[0], b[3] - b[1])


def _um_extent(m: np.ndarray, w: int, h: int) -> list[float]:
    x, y = apply_affine(m, np.array([0, w, w, 0]), np.array([0, 0, h, h]))
    return [float(x.min()), float(y.min()), float(x.max()), float(y.max())]


def _region_bbox(poly: np.ndarray | None, lm: np.ndarray | None, full: list[float] | None) -> list[float]:
    """Bounding box (µm) used for refinement and QC: polygon, else landmarks hull + 15 %, clipped."""
    if poly is not None:
        p = np.asarray(poly)
        b = [float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())]
    elif lm is not None and len(lm):
        b = [float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max())]
        pad = 0.15 * max(b[2] - b[0], b[3] - b[1])
        b = [b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad]
    else:
        assert full is not None
        b = list(full)
    if full is not None:
        c = [max(b[0], full[0]), max(b[1], full[1]), min(b[2], full[2]), min(b[3], full[3])]
        if c[2] > c[0] and c[3] > c[1]:
            b = c
    return b


def transcript_bbox(reg: Registration, bundle: Any, *, qv_min: Any = 20.0, batch_size: int = 2_000_000,
                    he_wh: tuple[int, int] | None = None) -> list[float] | None:
    """Bounding box [x0, y0, x1, y1] (H&E level-0 px) of all transcripts mapped with their region's affine."""
    lo = np.array([np.inf, np.inf])
    hi = np.array([-np.inf, -np.inf])
    n = 0
    for batch in bundle.iter_transcripts(batch_size=batch_size, qv_min=qv_min, drop_controls=True):
        x = np.asarray(batch.x, np.float64)
        y = np.asarray(batch.y, np.float64)
        if not len(x):
            continue
        ridx = reg.assign_regions(x, y)
        keep = ridx >= 0
        if not keep.any():
            continue
        hx, hy = reg.um_to_he(x[keep], y[keep], ridx[keep])
        lo = np.minimum(lo, [hx.min(), hy.min()])
        hi = np.maximum(hi, [hx.max(), hy.max()])
        n += int(keep.sum())
    if n == 0:
        return None
    box = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    if he_wh is not None:
        w, h = he_wh
        box = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
    log.info("transcript bbox in H&E px: %s (%d transcripts)", [round(v, 1) for v in box], n)
    return box
