"""H&E of the simulated Visium sections (:mod:`morphomol.synthetic.spots`): cells drawn as soft
ellipses into hematoxylin / eosin optical-density strips, coloured through a Beer–Lambert lookup
table, written as a tiled JPEG pyramid TIFF with its resolution (OpenSlide opens it as generic-tiff).

What is visible: tumour cells (large, crowded, moderately dark nuclei with some eosin), stromal cells
(spindle nuclei aligned with a smooth orientation field, on dense pink fibrous background), immune
cells (small, round, very dark nuclei). The interferon-like program of the simulator has no
morphology at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from morphomol.synthetic.render import E_OD, H_OD, downsample2, ellipse_quad, splat

_GLASS_OD = 0.02
_LN10 = math.log(10.0)
_H_MAX, _E_MAX = 1.8, 1.2

#: per cell type (tumour, stroma, immune): nucleus semi-axes (µm), hematoxylin, chromatin grain, cytoplasm eosin
NUC_A = np.array([4.6, 5.5, 2.6])
NUC_B = np.array([3.6, 1.4, 2.4])
HEM = np.array([0.85, 0.75, 1.35])
GRAIN = np.array([0.45, 0.15, 0.2])
CYTO_E = np.array([0.35, 0.10, 0.05])
CYTO_UM = np.array([3.0, 1.0, 0.8])


@dataclass
class CellLayer:
    """Cells of one section in µm: centre, type (0 tumour, 1 stroma, 2 immune), angle, size jitter."""

    x: np.ndarray
    y: np.ndarray
    ctype: np.ndarray
    phi: np.ndarray
    scale: np.ndarray


def render_he(path: Path, cells: CellLayer, eosin_um: np.ndarray, tissue_um: np.ndarray, step_um: float,
              size_px: tuple[int, int], mpp: float, rng: np.random.Generator, *, stain: tuple[float, float] = (1.0, 1.0),
              jpeg_quality: int = 90) -> np.ndarray:
    """Render the section at ``mpp`` and write ``path`` (pyramid down to <= 600 px); returns level 0.

    ``eosin_um`` / ``tissue_um``: background eosin optical density and tissue mask on a grid of
    ``step_um`` µm cells over the section (row = y).
    """
    W, H = size_px
    stain_h, stain_e = stain
    h_vec = (H_OD + rng.normal(0, 0.015, 3)).astype(np.float32)
    e_vec = (E_OD + rng.normal(0, 0.015, 3)).astype(np.float32)
    hq = np.linspace(0.0, _H_MAX, 256, dtype=np.float32)[:, None, None]
    eq = np.linspace(0.0, _E_MAX, 256, dtype=np.float32)[None, :, None]
    lut = np.clip(255.0 * np.exp(-_LN10 * (_GLASS_OD + hq * h_vec + eq * e_vec)) + 0.5, 0, 255).astype(np.uint8)
    grain_seed = int(rng.integers(0, 2**62))
    # background at full resolution: bilinear zoom of the µm grid + fibrous texture
    zoom = step_um / mpp
    bg = ndimage.zoom((eosin_um * tissue_um).astype(np.float32), zoom, order=1)
    bg = np.pad(bg, ((0, max(0, H - bg.shape[0])), (0, max(0, W - bg.shape[1]))), mode="edge")[:H, :W]
    tex = ndimage.gaussian_filter(rng.standard_normal((H // 4 + 1, W // 4 + 1)).astype(np.float32), (0.6, 2.0))
    tex = np.repeat(np.repeat(tex / (tex.std() + 1e-6), 4, axis=0), 4, axis=1)[:H, :W]
    cx, cy = cells.x / mpp, cells.y / mpp
    t = cells.ctype
    a = NUC_A[t] * cells.scale / mpp
    b = NUC_B[t] * cells.scale / mpp
    qn = ellipse_quad(a, b, cells.phi)
    qc = ellipse_quad(a + CYTO_UM[t] / mpp, b + CYTO_UM[t] / mpp, cells.phi)
    hem = HEM[t] * stain_h * np.exp(rng.normal(0, 0.08, len(t)))
    cyto = CYTO_E[t] * stain_e
    img = np.empty((H, W, 3), np.uint8)
    strip = 512
    half = (a.max() if len(a) else 1) + CYTO_UM.max() / mpp + 2
    for r0 in range(0, H, strip):
        rh = min(strip, H - r0)
        cE = bg[r0:r0 + rh] * stain_e * (1.0 + 0.25 * tex[r0:r0 + rh])
        cE = np.ascontiguousarray(cE, dtype=np.float32)
        cH = np.zeros((rh, W), np.float32)
        sel = (cy + half >= r0) & (cy - half < r0 + rh)
        splat(cE, r0, cx[sel], cy[sel], tuple(q[sel] for q in qc), cyto[sel], 0.6)
        splat(cH, r0, cx[sel], cy[sel], tuple(q[sel] for q in qn), hem[sel], 0.35, GRAIN[t[sel]], grain_seed)
        ih = np.clip(cH * np.float32(255 / _H_MAX) + 0.5, 0, 255).astype(np.uint8)
        ie = np.clip(cE * np.float32(255 / _E_MAX) + 0.5, 0, 255).astype(np.uint8)
        img[r0:r0 + rh] = lut[ih, ie]
    write_pyramid(path, img, mpp, quality=jpeg_quality)
    return img


def write_pyramid(path: Path, img: np.ndarray, mpp: float, *, quality: int = 90) -> None:
    """Tiled JPEG TIFF pyramid (2x steps down to <= 600 px) with the resolution in the TIFF tags."""
    levels = [img]
    while min(levels[-1].shape[:2]) > 600:
        levels.append(downsample2(levels[-1]))
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k, lvl in enumerate(levels):
            tif.write(lvl, tile=(256, 256), subfiletype=0 if k == 0 else 1, photometric="rgb", compression="jpeg",
                      compressionargs={"level": quality}, resolutionunit="CENTIMETER",
                      resolution=(1e4 / (mpp * 2**k), 1e4 / (mpp * 2**k)), software=False, metadata=None,
                      description=f"morphomol simulated Visium H&E |MPP = {mpp}" if k == 0 else None)
