"""H&E rendering and ``he.tif`` (tiled JPEG pyramid that OpenSlide opens as generic-tiff).

The slide is rendered in its own pixel frame: nuclei and cytoplasm are drawn forward through
the inverse of their region's affine; the background (eosin, white glass) is looked up
backwards through every region's affine (first region that claims a pixel wins). Colours come
from a lookup table over quantised hematoxylin / eosin optical densities (Beer–Lambert).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from morphomol.geometry import apply_affine
from morphomol.synthetic.fields import Cells, Fields, Regions, lookup
from morphomol.synthetic.params import TYPES, Patient, SampleSpec
from morphomol.synthetic.render import E_OD, H_OD, downsample2, ellipse_quad, quad_half, splat, transform_quad

# stain optical-density directions (normalised), white glass
_GLASS_OD = 0.018
_LN10 = math.log(10.0)
_H_MAX = 1.6  # hematoxylin / eosin optical densities are clipped here
_E_MAX = 1.2


def write_he(path: Path, spec: SampleSpec, patient: Patient, fields: Fields, regions: Regions,
             cells: Cells) -> list[tuple[int, int]]:
    """Render the H&E (512-row strips) and write the pyramid; returns the level shapes (h, w).

    Draws from the sample's ``he`` stream (stain jitter, background texture, nucleus grain).
    """
    r = spec.rng("he")
    grain_seed = int(r.integers(0, 2**63))
    pat = patient
    mpp = spec.he_mpp
    W, H = regions.he_size
    img = np.empty((H, W, 3), np.uint8)
    # stain colours of this sample: patient stain strength + small sample jitter
    stain_h = pat.stain_h * float(np.exp(r.normal(0, 0.04)))
    stain_e = pat.stain_e * float(np.exp(r.normal(0, 0.04)))
    h_vec = (H_OD + r.normal(0, 0.02, 3)).astype(np.float32)
    e_vec = (E_OD + r.normal(0, 0.02, 3)).astype(np.float32)
    # background eosin in the µm frame (stroma denser, tumour nests slightly pinker)
    tp = fields.type_prob
    e_grid = (0.16 + 0.22 * tp[2] + 0.05 * tp[0] - 0.04 * tp[1] + 0.03 * np.clip(fields.z_field, -2, 2)).astype(np.float32)
    # mottled / fibrillar texture in the H&E frame (1 µm cells)
    f = max(1, int(round(1.0 / mpp)))
    th, tw = H // f + 2, W // f + 2
    tex = ndimage.gaussian_filter(r.standard_normal((th, tw)).astype(np.float32), 1.0)
    tex = (tex / (tex.std() + 1e-6)).astype(np.float32)

    # cells in H&E px: nucleus and cytoplasm ellipses through their region's inverse affine
    n = cells.n
    hx = np.empty(n)
    hy = np.empty(n)
    nq = [np.empty(n) for _ in range(3)]
    cq = [np.empty(n) for _ in range(3)]
    qn = ellipse_quad(cells.na, cells.nb, cells.phi)
    qc_ = ellipse_quad(cells.na + cells.cyto, cells.nb + cells.cyto, cells.phi)
    for i, m in enumerate(regions.he_to_um):
        sel = cells.region == i
        inv = regions.um_to_he[i]
        hx[sel], hy[sel] = apply_affine(inv, cells.cx[sel], cells.cy[sel])
        lin = m[:2, :2]
        for dst, src in ((nq, qn), (cq, qc_)):
            t = transform_quad(src[0][sel], src[1][sel], src[2][sel], lin)
            for k in range(3):
                dst[k][sel] = t[k]
    hem = TYPES.hem[cells.ctype] * np.clip(1.0 + 0.2 * cells.z, 0.5, 1.7) * cells.hem_jitter * stain_h
    chrom = TYPES.chromatin[cells.ctype]
    c_e = TYPES.cyto_eosin[cells.ctype] * np.clip(1.0 + 0.15 * cells.z, 0.6, 1.5) * stain_e
    c_h = TYPES.cyto_hem[cells.ctype] * stain_h
    half_n = quad_half(*nq)
    half_c = quad_half(*cq)

    # colour lookup table over quantised (hematoxylin, eosin) optical densities
    hq = np.linspace(0.0, _H_MAX, 256, dtype=np.float32)[:, None, None]
    eq = np.linspace(0.0, _E_MAX, 256, dtype=np.float32)[None, :, None]
    od = _GLASS_OD + hq * h_vec[None, None, :] + eq * e_vec[None, None, :]
    lut = np.clip(255.0 * np.exp(-_LN10 * od) + 0.5, 0, 255).astype(np.uint8)
    strip = 512
    nreg = len(regions.he_to_um)
    for r0 in range(0, H, strip):
        rh = min(strip, H - r0)
        # coarse (f x f px) lookups of region claim and background eosin
        ch, cw = (rh + f - 1) // f, (W + f - 1) // f
        v = (r0 + (np.arange(ch) + 0.5) * f)[:, None].astype(np.float64)
        u = ((np.arange(cw) + 0.5) * f)[None, :].astype(np.float64)
        e_bg = np.zeros((ch, cw), np.float32)
        claimed = np.zeros((ch, cw), bool)
        for i in range(nreg):
            xu, yu = apply_affine(regions.he_to_um[i], u, v)
            inside = (xu >= 0) & (xu < spec.width) & (yu >= 0) & (yu < spec.height)
            inside &= regions.region_of(xu, yu) == i
            take = inside & ~claimed
            if take.any():
                xt, yt = xu[take], yu[take]
                e_bg[take] = lookup(e_grid, fields.fstep, xt, yt) * lookup(fields.tissue, fields.step, xt, yt)
                claimed |= take
        tr0 = r0 // f
        e_bg *= 1.0 + 0.28 * tex[tr0 : tr0 + ch, :cw]
        e_bg *= stain_e
        cE = np.repeat(np.repeat(e_bg, f, axis=0), f, axis=1)[:rh, :W].copy()
        cH = np.zeros((rh, W), np.float32)
        sel = (hy + half_c >= r0 - 1) & (hy - half_c < r0 + rh + 1)
        splat(cE, r0, hx[sel], hy[sel], tuple(q[sel] for q in cq), c_e[sel], 0.5)
        splat(cH, r0, hx[sel], hy[sel], tuple(q[sel] for q in cq), c_h[sel], 0.5)
        sel = (hy + half_n >= r0 - 1) & (hy - half_n < r0 + rh + 1)
        splat(cH, r0, hx[sel], hy[sel], tuple(q[sel] for q in nq), hem[sel], 0.3, chrom[sel], grain_seed)
        ih = np.clip(cH * np.float32(255 / _H_MAX) + 0.5, 0, 255).astype(np.uint8)
        ie = np.clip(cE * np.float32(255 / _E_MAX) + 0.5, 0, 255).astype(np.uint8)
        img[r0 : r0 + rh] = lut[ih, ie]

    levels = [img]
    while min(levels[-1].shape[:2]) > 600:
        levels.append(downsample2(levels[-1]))
    opts = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": spec.jpeg_quality},
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
                description=f"morphomol simulated H&E {spec.sample_id} |MPP = {mpp}" if k == 0 else None,
                **opts,
            )
    return [lv.shape[:2] for lv in levels]
