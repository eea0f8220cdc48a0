"""Raster primitives of the simulator: soft-edged textured ellipses and 2x2 pyramid downsampling.

Nuclei and cytoplasm are ellipses given by quadratic forms ``q(d) = qa dx² + 2 qb dx dy + qc dy²``
(``q = 1`` on the rim), drawn by the jitted :func:`splat` into float32 strips of the image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from morphomol.util.numba import njit_kernels, numba_module

#: stain optical-density directions (normalised) of hematoxylin and eosin, shared by every simulated H&E
H_OD = np.array([0.650, 0.704, 0.286]) / np.linalg.norm(np.array([0.650, 0.704, 0.286]))
E_OD = np.array([0.216, 0.801, 0.558]) / np.linalg.norm(np.array([0.216, 0.801, 0.558]))


def ellipse_quad(a: np.ndarray, b: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadratic form (qa, qb, qc) of ellipses with semi-axes a, b, angle phi: q = 1 on the rim."""
    c, s = np.cos(phi), np.sin(phi)
    ia, ib = 1.0 / a**2, 1.0 / b**2
    return c * c * ia + s * s * ib, c * s * (ia - ib), s * s * ia + c * c * ib


def transform_quad(qa: np.ndarray, qb: np.ndarray, qc: np.ndarray,
                   lin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadratic form in a frame where d_old = lin @ d_new."""
    l00, l01, l10, l11 = lin[0, 0], lin[0, 1], lin[1, 0], lin[1, 1]
    na = qa * l00 * l00 + 2 * qb * l00 * l10 + qc * l10 * l10
    nb = qa * l00 * l01 + qb * (l00 * l11 + l01 * l10) + qc * l10 * l11
    nc = qa * l01 * l01 + 2 * qb * l01 * l11 + qc * l11 * l11
    return na, nb, nc


def quad_half(qa: np.ndarray, qb: np.ndarray, qc: np.ndarray) -> np.ndarray:
    """Half side of the axis-aligned box that holds the ellipse q <= 1."""
    det = qa * qc - qb * qb
    return np.sqrt(np.maximum(qc / det, qa / det))


def _build_splat() -> Any:
    nb = numba_module()

    @nb.njit(cache=True, nogil=True)
    def splat_kernel(out, row0, cx, cy, qa, qb, qc, half, amp, soft, texture, seed):  # pragma: no cover - jitted
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
                        z = np.uint64(seed) ^ (np.uint64(yy) * np.uint64(0x9E3779B97F4A7C15))
                        z = z ^ (np.uint64(xx) * np.uint64(0xC2B2AE3D27D4EB4F))
                        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                        z = z ^ (z >> np.uint64(31))
                        u = float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                        v *= 1.0 - t + 2.0 * t * u
                    out[yy - row0, xx] += v

    return splat_kernel


def splat(
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
    half = quad_half(qa, qb, qc)
    tex = np.zeros(len(cx)) if texture is None else np.ascontiguousarray(texture, dtype=np.float64)
    njit_kernels("synthetic.splat", _build_splat)(
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


def downsample2(img: np.ndarray, chunk: int = 1024) -> np.ndarray:
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
