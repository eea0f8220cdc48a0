"""The H&E resampled into the µm frame of a sample (Xenium µm, or the spots' µm = px × mpp).

Unit tables keep their coordinates in µm (``obsm['spatial']``); viewers that draw an image under
those coordinates (``scanpy.pl.spatial``, squidpy, the registration QC) need the H&E in that same
frame. :func:`he_in_um` builds it: every output pixel (a point in µm) is assigned to its
registration region, mapped through that region's inverse affine (µm -> H&E level-0 px) and
sampled bilinearly from the pyramid level closest to the output resolution. A sample whose
registration has several regions (pieces with their own affines) is therefore rendered exactly,
piece by piece; points outside the slide or in no region (``region_assignment: drop``) are white.

:func:`spatial_image` wraps it into the :class:`morphomol.data.units.SpatialImage` that
:func:`morphomol.data.units.write_units` stores as ``uns['spatial'][library_id]``: the image covers
µm ``[0, x_max] x [0, y_max]`` (image pixel (0, 0) = µm (0, 0), scanpy's convention) at
``scalef`` image px per µm, the longer side at most ``max_px``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.geometry import scale
from morphomol.registration.transform import Registration, RegionTransform
from morphomol.util.logs import get_logger

log = get_logger("registration.warp")

HIRES_PX = 2000  # longer side of Space Ranger's tissue_hires_image


def scale_registration(mpp: float, sample: str = "") -> Registration:
    """The registration of an image whose µm frame is its pixels × ``mpp`` (spots: x_um = x_px × mpp)."""
    m = scale(float(mpp))
    return Registration(regions=[RegionTransform(name="r0", matrix=m, inverse=np.linalg.inv(m))], sample=sample,
                        method="scale", he_mpp=float(mpp))


def he_in_um(slide: Any, reg: Registration, extent_um: Sequence[float], scalef: float, *,
             background: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 (H, W, 3), valid bool (H, W)): the H&E over µm ``extent_um = (x0, y0, x1, y1)`` at
    ``scalef`` output px per µm; pixel (i, j) is centred on µm ``(x0 + (j + .5) / scalef, y0 + (i + .5) / scalef)``."""
    from scipy.ndimage import map_coordinates

    x0, y0, x1, y1 = (float(v) for v in extent_um)
    if not (scalef > 0 and x1 > x0 and y1 > y0):
        raise ValueError(f"empty extent {extent_um} or scale {scalef}")
    w = max(1, int(math.ceil((x1 - x0) * scalef)))
    h = max(1, int(math.ceil((y1 - y0) * scalef)))
    out = np.full((h, w, 3), background, np.uint8)
    valid = np.zeros((h, w), bool)
    xs = x0 + (np.arange(w) + 0.5) / scalef
    ys = y0 + (np.arange(h) + 0.5) / scalef
    # µm per output px vs H&E µm per level-0 px -> the pyramid level to read
    out_um = 1.0 / scalef
    for row0 in range(0, h, 512):  # row blocks: bounded memory for large outputs
        yy = ys[row0: row0 + 512]
        gx, gy = np.meshgrid(xs, yy)
        region = reg.assign_regions(gx.ravel(), gy.ravel()).reshape(gx.shape)
        for ri, r in enumerate(reg.regions):
            sel = region == ri
            if not sel.any():
                continue
            hx, hy = reg.um_to_he(gx[sel], gy[sel], ri)
            det = abs(np.linalg.det(np.asarray(r.matrix, float)[:2, :2]))
            he_um = math.sqrt(det) if det > 0 else float(getattr(slide, "mpp", 1.0))
            level = slide.get_best_level_for_downsample(max(out_um / he_um, 1.0))
            ds = slide.level_downsamples[level]
            lx, ly = hx / ds - 0.5, hy / ds - 0.5  # level px, pixel centres at integers
            lw, lh = slide.level_dimensions[level]
            inside = (lx >= -0.5) & (ly >= -0.5) & (lx <= lw - 0.5) & (ly <= lh - 0.5)
            if not inside.any():
                continue
            bx0 = max(0, int(math.floor(lx[inside].min())) - 1)
            by0 = max(0, int(math.floor(ly[inside].min())) - 1)
            bx1 = min(lw, int(math.ceil(lx[inside].max())) + 2)
            by1 = min(lh, int(math.ceil(ly[inside].max())) + 2)
            block = slide.read_region((int(round(bx0 * ds)), int(round(by0 * ds))), level, (bx1 - bx0, by1 - by0))
            coords = np.vstack([ly[inside] - by0, lx[inside] - bx0])
            vals = np.stack([map_coordinates(block[..., c].astype(np.float32), coords, order=1, mode="nearest")
                             for c in range(3)], axis=1)
            idx = np.flatnonzero(sel.ravel())[inside]
            sub = out[row0: row0 + len(yy)].reshape(-1, 3)
            sub[idx] = np.clip(np.round(vals), 0, 255).astype(np.uint8)
            valid[row0: row0 + len(yy)].reshape(-1)[idx] = True
    return out, valid


def spatial_image(he_path: str | Path | Any, *, spatial_um: np.ndarray, spot_diameter_um: float,
                  library_id: str, registration: Registration | str | Path | None = None, he_mpp: float | None = None,
                  max_px: int = HIRES_PX, margin_um: float | None = None) -> Any:
    """The :class:`~morphomol.data.units.SpatialImage` of a unit table: the H&E in the units' µm frame.

    ``registration``: the sample's registration (µm frame of the transcripts); None: the µm frame is
    the slide's pixels × its µm/px (spots). ``spatial_um``: the units' centres (the extent to cover).
    """
    from morphomol.data.units import SpatialImage
    from morphomol.io.he import open_slide

    slide = he_path if hasattr(he_path, "read_region") else open_slide(he_path, mpp=he_mpp)
    try:
        mpp = float(slide.mpp)
        if registration is None:
            reg = scale_registration(mpp, library_id)
        elif isinstance(registration, Registration):
            reg = registration
        else:
            reg = Registration.load(registration)
        xy = np.asarray(spatial_um, float).reshape(-1, 2)
        finite = xy[np.isfinite(xy).all(axis=1)]
        if not len(finite):
            raise InputError(f"{library_id}: no unit with finite coordinates", field="obsm['spatial']",
                             expected="unit centres in µm")
        margin = float(margin_um if margin_um is not None else max(spot_diameter_um, 0.0))
        x1 = max(float(finite[:, 0].max()) + margin, 1.0)
        y1 = max(float(finite[:, 1].max()) + margin, 1.0)
        scalef = min(max_px / max(x1, y1), 1.0 / mpp)  # never finer than the H&E itself
        rgb, _ = he_in_um(slide, reg, (0.0, 0.0, x1, y1), scalef)
    finally:
        if not hasattr(he_path, "read_region"):
            slide.close()
    log.info("%s: H&E in the µm frame, %dx%d px at %.4g px/µm", library_id, rgb.shape[1], rgb.shape[0], scalef)
    return SpatialImage(library_id=str(library_id), hires=rgb, scalef=float(scalef),
                        spot_diameter_um=float(spot_diameter_um),
                        source=str(getattr(slide, "path", he_path)), he_mpp=mpp)


__all__ = ["HIRES_PX", "he_in_um", "scale_registration", "spatial_image"]
