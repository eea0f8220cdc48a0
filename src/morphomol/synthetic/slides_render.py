"""H&E rendering of the simulated slide cohort (the slides study's demo): tissue blob, eosin texture,
tumour nuclei and lymphocytes, Beer–Lambert stain colours, written as a tiled JPEG pyramid that
OpenSlide opens (:func:`morphomol.tiling.write_pyramidal_tiff`).

Morphological footprints (what the slides study must be able to read from the image):

* *nuclear density*: tumour nuclei per mm² of tissue (large, pale-violet, slightly elliptic);
* *lymphocyte density*: small, round, very dark nuclei per mm² of tissue.

Both are modulated within the slide by a smooth random field (tiles differ) and are drawn at
their slide's means; everything else (stain colours, texture) is cohort / slide noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphomol.synthetic.render import E_OD, H_OD
from scipy import ndimage

#: stain optical-density directions (Ruifrok & Johnston), normalised
GLASS_OD = 0.02


@dataclass(frozen=True)
class Stain:
    """Stain colour of one cohort / slide: OD directions and strengths."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    h_scale: float
    e_scale: float


def cohort_stain(rng: np.random.Generator, shift: float) -> Stain:
    """A cohort's stain: the reference OD directions rotated by ``shift`` (per channel sd) and scaled."""
    h = np.abs(H_OD + rng.normal(0, shift, 3))
    e = np.abs(E_OD + rng.normal(0, shift, 3))
    return Stain(h / np.linalg.norm(h), e / np.linalg.norm(e), float(np.exp(rng.normal(0, 2 * shift))),
                 float(np.exp(rng.normal(0, 2 * shift))))


def slide_stain(base: Stain, rng: np.random.Generator, jitter: float = 0.01) -> Stain:
    h = np.abs(base.h_vec + rng.normal(0, jitter, 3))
    e = np.abs(base.e_vec + rng.normal(0, jitter, 3))
    return Stain(h / np.linalg.norm(h), e / np.linalg.norm(e), base.h_scale * float(np.exp(rng.normal(0, jitter))),
                 base.e_scale * float(np.exp(rng.normal(0, jitter))))


def _upsample(small: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float32 field to (h, w) (PIL, fast)."""
    from PIL import Image

    return np.array(Image.fromarray(small.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def tissue_mask(h: int, w: int, rng: np.random.Generator, coverage: float = 0.7) -> np.ndarray:
    """An irregular blob covering about ``coverage`` of an (h, w) frame (smooth random boundary)."""
    yy, xx = np.ogrid[0:h, 0:w]
    cx, cy = w * (0.5 + rng.normal(0, 0.03)), h * (0.5 + rng.normal(0, 0.03))
    r = np.hypot((xx - cx) / (w / 2), (yy - cy) / (h / 2)).astype(np.float32)
    noise = ndimage.gaussian_filter(rng.standard_normal((h // 16 + 1, w // 16 + 1)).astype(np.float32), 2.0)
    field = r + 0.12 * _upsample(noise / (noise.std() + 1e-6), h, w)
    thr = np.quantile(field[::4, ::4], coverage)
    return field <= thr


def smooth_field(h: int, w: int, rng: np.random.Generator, scale_px: float) -> np.ndarray:
    """A smooth, unit-variance random field of correlation length ~``scale_px``."""
    step = max(1, int(scale_px // 4))
    small = rng.standard_normal((h // step + 2, w // step + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, 2.0)
    small /= small.std() + 1e-6
    return _upsample(small, h, w)


def _place(n: int, weight: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points drawn with probability proportional to ``weight`` (pixel grid, jittered)."""
    p = weight.ravel().astype(np.float64)
    total = p.sum()
    if n <= 0 or total <= 0:
        return np.zeros(0), np.zeros(0)
    cdf = np.cumsum(p)
    idx = np.minimum(np.searchsorted(cdf, rng.random(n) * total, side="right"), p.size - 1)
    y, x = np.divmod(idx, weight.shape[1])
    return x + rng.random(n), y + rng.random(n)


def _stamp(img: np.ndarray, x: np.ndarray, y: np.ndarray, ra: np.ndarray, rb: np.ndarray, phi: np.ndarray,
           amp: np.ndarray) -> None:
    """Add soft-edged filled ellipses (semi-axes ``ra``, ``rb`` px, angle ``phi``) of height ``amp``."""
    if len(x) == 0:
        return
    h, w = img.shape
    half = int(np.ceil(max(ra.max(), rb.max()))) + 1
    off = np.arange(-half, half + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    px = np.floor(x).astype(np.int64)[:, None] + ox.ravel()[None, :]
    py = np.floor(y).astype(np.int64)[:, None] + oy.ravel()[None, :]
    dx, dy = px + 0.5 - x[:, None], py + 0.5 - y[:, None]
    c, s = np.cos(phi)[:, None], np.sin(phi)[:, None]
    u, v = (c * dx + s * dy) / ra[:, None], (-s * dx + c * dy) / rb[:, None]
    val = amp[:, None] * np.clip((1.0 - (u * u + v * v)) * 4.0, 0.0, 1.0)
    ok = (val > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
    np.add.at(img, (py[ok], px[ok]), val[ok].astype(np.float32))


def render_slide(*, width_px: int, height_px: int, mpp: float, tumour_per_mm2: float, lymph_per_mm2: float,
                 stain: Stain, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """RGB uint8 (h, w, 3) H&E of one slide and what was drawn (counts, tissue fraction)."""
    h, w = int(height_px), int(width_px)
    mask = tissue_mask(h, w, rng)
    area_mm2 = float(mask.sum()) * (mpp / 1000.0) ** 2
    hetero = np.exp(0.2 * smooth_field(h, w, rng, 120 / mpp))  # within-slide density variation
    hetero_l = np.exp(0.3 * smooth_field(h, w, rng, 90 / mpp))
    n_tum = int(rng.poisson(tumour_per_mm2 * area_mm2))
    n_lym = int(rng.poisson(lymph_per_mm2 * area_mm2))
    hem = np.zeros((h, w), np.float32)
    tx, ty = _place(n_tum, mask * hetero, rng)
    r_t = (3.6 / mpp) * np.exp(rng.normal(0, 0.12, n_tum))
    _stamp(hem, tx, ty, r_t * 1.25, r_t * 0.85, rng.uniform(0, np.pi, n_tum), 0.55 * np.exp(rng.normal(0, 0.15, n_tum)))
    lx, ly = _place(n_lym, mask * hetero_l, rng)
    r_l = (2.1 / mpp) * np.exp(rng.normal(0, 0.08, n_lym))
    _stamp(hem, lx, ly, r_l, r_l * 0.95, rng.uniform(0, np.pi, n_lym), 1.25 * np.exp(rng.normal(0, 0.1, n_lym)))
    texture = _upsample(rng.standard_normal((h // 2 + 1, w // 2 + 1), dtype=np.float32), h, w)
    texture /= texture.std() + 1e-6
    eos = np.where(mask, np.float32(0.32) + np.float32(0.06) * texture, np.float32(0.0))
    hem = np.minimum(hem, np.float32(1.6), out=hem)
    hem *= mask
    rgb = np.empty((h, w, 3), np.uint8)
    ln10 = np.float32(-np.log(10.0))
    for c in range(3):  # Beer-Lambert per channel, float32 throughout
        od = hem * np.float32(stain.h_scale * stain.h_vec[c] * ln10)
        od += eos * np.float32(stain.e_scale * stain.e_vec[c] * ln10)
        od += np.float32(GLASS_OD * ln10)
        val = np.exp(od, out=od)
        val *= np.float32(255.0)
        val += np.float32(2.0) * rng.standard_normal((h, w), dtype=np.float32)
        rgb[..., c] = np.clip(val, 0, 255)
    return rgb, {"tissue_fraction": float(mask.mean()), "tissue_mm2": area_mm2, "n_tumour_nuclei": n_tum,
                 "n_lymphocytes": n_lym}


def write_slide(path: str | Path, rgb: np.ndarray, mpp: float) -> None:
    """The slide as a tiled JPEG pyramid with its resolution (OpenSlide generic-tiff)."""
    from morphomol.tiling import write_pyramidal_tiff
    from morphomol.util.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        write_pyramidal_tiff(tmp, rgb, mpp, n_levels=2, tile=256, quality=90)
