"""Images for refinement and QC at a downsampled level (never full resolution).

:func:`load_dapi` reads one pyramid level of the Xenium morphology (DAPI) image, :func:`load_he`
the hematoxylin channel of one OpenSlide level of the H&E, in strips, inside a level-0 box; both
return a :class:`Raster` with the affine from its pixels to its frame (µm or H&E level-0 px).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from morphomol.errors import InputError
from morphomol.geometry import apply_affine, scale
from morphomol.util.logs import get_logger

log = get_logger("registration")


class MorphologySource(Protocol):
    """What :func:`load_dapi` needs of a Xenium bundle."""

    pixel_size: float

    def morphology_levels(self) -> list[tuple[int, int]]: ...
    def read_morphology(self, level: int = 0) -> np.ndarray: ...


class SlideSource(Protocol):
    """What :func:`load_he` needs of a slide (:func:`morphomol.io.he.open_slide`)."""

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
    """Mean over ``f x f`` blocks (float32; a partial last block row/column is dropped)."""
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
    to_um = scale(ps) @ _level_to_l0(dx * f, dy * f)
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
    check = getattr(slide, "check_decode", None)
    if check is not None:  # no gigapixel decode of a slide without a pyramid level near target_mpp
        check(level, (float(x0), float(y0), float(x0 + w_l * dx), float(y0 + h_l * dy)),
              what=f"registration raster at {target_mpp:g} µm/px")
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


def he_bbox(inverse: np.ndarray, bbox_um: Sequence[float], pad_um: float = 0.0) -> list[float]:
    """Level-0 H&E px box ``[x0, y0, x1, y1]`` covering the µm box ``bbox_um`` (+ ``pad_um``) under ``inverse``."""
    x0, y0, x1, y1 = bbox_um
    cx = np.array([x0 - pad_um, x1 + pad_um, x1 + pad_um, x0 - pad_um])
    cy = np.array([y0 - pad_um, y0 - pad_um, y1 + pad_um, y1 + pad_um])
    hx, hy = apply_affine(inverse, cx, cy)
    return [float(hx.min()), float(hy.min()), float(hx.max()), float(hy.max())]
