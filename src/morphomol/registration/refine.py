"""Image-based refinement of an affine, and coarse initialisation without landmarks.

The score is the normalised cross-correlation (NCC) between the DAPI image and the H&E
hematoxylin warped to Xenium µm, on a µm grid masked to the region (:class:`NCCProblem`).
:func:`refine_affine` optimises a six-parameter correction coarse → fine (phase-correlation
shift search, then Nelder–Mead); :func:`coarse_init` tries tissue-mask moments with a few
rotations/flips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize

from morphomol.errors import InputError
from morphomol.geometry import apply_affine, rotation, scale, translate
from morphomol.registration.images import Raster
from morphomol.util.logs import get_logger

log = get_logger("registration")


def _polygon_mask(poly: np.ndarray | None, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Grid points inside the polygon ring (all of them when there is none)."""
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
    """NCC of ``a`` and ``b`` over mask ``m`` (-1 when fewer than 16 points or a flat image)."""
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
    """Scale to [0, 1] between the 0.5 and 99.5 percentiles (float32)."""
    hi = float(np.percentile(x, 99.5)) if x.size else 1.0
    lo = float(np.percentile(x, 0.5)) if x.size else 0.0
    return np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(np.float32)


@dataclass
class _Grid:
    """A µm sampling grid of one step with the DAPI sampled on it and the smoothed hematoxylin."""

    gx: np.ndarray
    gy: np.ndarray
    step: float
    dapi: np.ndarray
    mask: np.ndarray  # region ∧ DAPI valid
    he_smooth: np.ndarray


class NCCProblem:
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
        return translate(c[0] + p[4], c[1] + p[5]) @ a @ translate(-c[0], -c[1])

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


def _shift_search(prob: NCCProblem, m: np.ndarray, g: _Grid) -> np.ndarray:
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
    cand = translate(dx * g.step, dy * g.step) @ m
    return cand if prob.score(cand, g) > prob.score(m, g) else m


def refine_affine(m0: np.ndarray, dapi: Raster, he: Raster, *, bbox_um: Sequence[float],
                  polygon_um: np.ndarray | None = None, refine_mpp: float = 4.0,
                  scales: Sequence[int] = (4, 2, 1), shift_search: bool = True,
                  max_grid_px: int = 160_000) -> tuple[np.ndarray, float, float]:
    """Refine an affine (H&E px → µm) by maximising DAPI/hematoxylin NCC, coarse → fine.

    Returns ``(matrix, score_before, score_after)``; scores are NCC at the finest grid step.
    """
    prob = NCCProblem(dapi, he, polygon_um, bbox_um, refine_mpp)
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
    """Pixels above the Otsu threshold of the finite values."""
    from skimage.filters import threshold_otsu

    v = img[np.isfinite(img)]
    if v.size == 0 or float(v.max()) <= float(v.min()):
        return np.zeros(img.shape, bool)
    return img > threshold_otsu(v)


def _moments(mask: np.ndarray, to_frame: np.ndarray) -> tuple[np.ndarray, float]:
    """Centroid (frame units) and major-axis angle of a mask."""
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
    prob = NCCProblem(dapi, he, None, bbox, coarse_mpp)
    g = prob.grid(coarse_mpp)
    best: tuple[float, np.ndarray] = (-2.0, np.eye(3))
    for flip in (False, True):
        ah_eff = -ah if flip else ah
        angles = {round((ad - ah_eff) % (2 * math.pi), 6), round((ad - ah_eff + math.pi) % (2 * math.pi), 6)}
        angles |= {0.0, math.pi / 2, math.pi, 3 * math.pi / 2}
        for theta in sorted(angles):
            m = translate(cd[0], cd[1]) @ rotation(theta, flip) @ scale(he_mpp) @ translate(-ch[0], -ch[1])
            m = _shift_search(prob, m, g)
            s = prob.score(m, g)
            log.debug("coarse candidate flip=%s theta=%.1f° NCC %.3f", flip, math.degrees(theta), s)
            if s > best[0]:
                best = (s, m)
    log.info("coarse initialisation: NCC %.3f", best[0])
    return best[1], best[0]
