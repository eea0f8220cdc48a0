"""Landmark affine fits: least squares, leave-one-out residuals, robust outlier flagging.

Matrices are 3×3 and act on column vectors ``[x, y, 1]`` (:mod:`morphomol.geometry`). Fits are
computed on normalised points (centred, RMS distance 1 from the centre) and mapped back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from morphomol.errors import InputError
from morphomol.geometry import apply_points, scale, translate

ROBUST_METHODS = ("trim", "ransac", "none")
COLLINEAR_RATIO = 0.01  # minor/major spread of a region's landmarks below this = collinear


class DegenerateFit(ValueError):
    """The landmark configuration does not determine an affine (raised as InputError by callers)."""


def _normaliser(pts: np.ndarray) -> np.ndarray:
    """Similarity that centres ``pts`` and scales their RMS distance from the centre to 1."""
    c = pts.mean(axis=0)
    s = float(np.sqrt(((pts - c) ** 2).sum(axis=1).mean())) or 1.0
    return scale(1.0 / s) @ translate(-c[0], -c[1])


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
    xs = np.column_stack([apply_points(ns, src), np.ones(len(src))])
    yd = apply_points(nd, dst)
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
    xs = np.column_stack([apply_points(ns, src), np.ones(n)])
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
    """Result of :func:`robust_fit`."""

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
            err = np.linalg.norm(apply_points(m, src) - dst, axis=1)
            mask = err < threshold_um
            key = (int(mask.sum()), float(np.sum(np.minimum(err, threshold_um))))
            if key[0] > best[0] or (key[0] == best[0] and key[1] < best[1]):
                best, best_mask = key, mask
        if best[0] >= 3:
            inl = best_mask.copy()
            for _ in range(3):  # refit on the consensus set, re-evaluate
                m = fit_affine(src[inl], dst[inl])
                new = np.linalg.norm(apply_points(m, src) - dst, axis=1) < threshold_um
                if new.sum() < 3 or np.array_equal(new, inl):
                    break
                inl = new
    elif method != "none":
        raise InputError(f"unknown robust method {method!r}", field="registration.robust",
                         expected=" | ".join(ROBUST_METHODS))
    m = fit_affine(src[inl], dst[inl])
    res = apply_points(m, src) - dst
    loo = loo_residuals(src[inl], dst[inl])
    res[inl] = loo
    if inl.sum() > 3:
        norms = np.linalg.norm(loo, axis=1)
        rms, mx = float(np.sqrt(np.mean(norms**2))), float(np.max(norms))
    else:
        rms = mx = None
    return RobustFit(matrix=m, inliers=inl, residuals=res, rms_um=rms, max_um=mx)
