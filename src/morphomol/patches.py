"""Square image patches centred on units (spots, cells) into an image store of the unit-table contract.

The fusion study tiles the tissue on a grid (:mod:`morphomol.tiling`); studies whose units are
points (Visium spots, cells) need one patch per unit, centred on it. :func:`plan_patches` decides
each patch's level-0 box (side ``patch_um / mpp``) and what to do with patches that leave the image
(``pad`` with white, or ``drop`` and say why); :func:`write_patch_store` reads them pyramid-aware
(the best level for the output resolution, consecutive nearby patches read as one region, never the
whole slide) and writes ``images`` (N, out_px, out_px, 3) uint8 in whole chunks: the same layout as
the fusion study's ``images.zarr``, so feature extraction (``features`` rule) and the loader work on
it unchanged. Row ``i`` of the store is unit ``i`` of the kept units, in the order given: sort the
units in raster order (by y, then x) before planning for the fewest region reads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.data.chunks import ChunkWriter
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("patches")

EDGE_MODES = ("pad", "drop")
#: why a unit has no patch
OUTSIDE = "patch outside the image"
PARTLY_OUTSIDE = "patch partly outside the image"


@dataclass(frozen=True)
class PatchPlan:
    """Level-0 boxes of the patches of a sample's units (``x0, y0``: top-left; ``size_px``: side)."""

    x0: np.ndarray  # (N,) float64 level-0 px
    y0: np.ndarray
    size_px: float
    keep: np.ndarray  # (N,) bool: the unit gets a patch
    reason: np.ndarray  # (N,) object: "" for kept units, else why not
    padded: np.ndarray  # (N,) bool: kept, but partly outside the image (padded with white)

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def counts(self) -> dict[str, int]:
        """Kept / padded / dropped-by-reason counts (for QC)."""
        out = {"units": int(len(self.keep)), "kept": self.n_kept, "padded": int(self.padded.sum())}
        for r in sorted(set(self.reason[~self.keep].tolist())):
            out[f"dropped: {r}"] = int((self.reason == r).sum())
        return out


def plan_patches(centres_px: np.ndarray, *, patch_um: float, mpp: float, image_wh: tuple[int, int],
                 on_edge: str = "pad") -> PatchPlan:
    """Plan one square patch of ``patch_um`` µm centred on each unit centre (level-0 px).

    A patch entirely outside the image is always dropped; one partly outside is padded with white
    (``on_edge="pad"``) or dropped (``"drop"``).
    """
    if on_edge not in EDGE_MODES:
        raise InputError(f"unknown value {on_edge!r}", field="on_edge", expected=" | ".join(EDGE_MODES))
    if not (math.isfinite(patch_um) and patch_um > 0 and math.isfinite(mpp) and mpp > 0):
        raise InputError(f"patch {patch_um!r} µm at {mpp!r} µm/px", field="patch_um", expected="positive numbers")
    c = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    size = float(patch_um) / float(mpp)
    x0, y0 = c[:, 0] - size / 2, c[:, 1] - size / 2
    w, h = (float(v) for v in image_wh)
    finite = np.isfinite(x0) & np.isfinite(y0)
    outside = ~finite | (x0 >= w) | (y0 >= h) | (x0 + size <= 0) | (y0 + size <= 0)
    partly = ~outside & ((x0 < 0) | (y0 < 0) | (x0 + size > w) | (y0 + size > h))
    keep = ~outside & (~partly | (on_edge == "pad"))
    reason = np.full(len(c), "", dtype=object)
    reason[outside] = OUTSIDE
    if on_edge == "drop":
        reason[partly] = PARTLY_OUTSIDE
    return PatchPlan(x0=x0, y0=y0, size_px=size, keep=keep, reason=reason, padded=partly & keep)


class _BlockReader:
    """Reads patches from the best pyramid level for the output resolution; consecutive patches
    whose boxes lie within ``max_span`` level-0 px of each other are read as one region."""

    def __init__(self, slide: Any, size_px: float, out_px: int, max_block: int = 16) -> None:
        self.slide, self.size, self.out_px, self.max_block = slide, float(size_px), int(out_px), int(max_block)
        self.level = slide.get_best_level_for_downsample(max(self.size / self.out_px, 1.0))
        self.ds = float(slide.level_downsamples[self.level])
        self.max_span = 4 * self.size
        self.margin = int(math.ceil(2 * max(1.0, self.size / self.ds / self.out_px))) + 1

    def read(self, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
        from PIL import Image

        n = len(x0)
        out = np.empty((n, self.out_px, self.out_px, 3), np.uint8)
        ds, side = self.ds, self.size
        i = 0
        while i < n:
            bx0, by0, bx1, by1 = x0[i], y0[i], x0[i] + side, y0[i] + side
            j = i + 1
            while j < n and j - i < self.max_block:
                nx0, ny0 = min(bx0, x0[j]), min(by0, y0[j])
                nx1, ny1 = max(bx1, x0[j] + side), max(by1, y0[j] + side)
                if nx1 - nx0 > self.max_span or ny1 - ny0 > self.max_span:
                    break
                bx0, by0, bx1, by1 = nx0, ny0, nx1, ny1
                j += 1
            # a margin of the resampling filter's support: pixels near a patch's border see the same
            # neighbours as in the whole slide (PIL clamps at the region's edge)
            m = self.margin
            lx0, ly0 = int(math.floor(bx0 / ds)) - m, int(math.floor(by0 / ds)) - m
            lx1, ly1 = int(math.ceil(bx1 / ds)) + 1 + m, int(math.ceil(by1 / ds)) + 1 + m
            region = self.slide.read_region((int(round(lx0 * ds)), int(round(ly0 * ds))), self.level,
                                            (lx1 - lx0, ly1 - ly0))  # outside the slide reads as white
            pil = Image.fromarray(np.ascontiguousarray(region))
            for t in range(i, j):
                px, py = x0[t] / ds - lx0, y0[t] / ds - ly0
                out[t] = np.asarray(pil.resize((self.out_px, self.out_px), Image.Resampling.BILINEAR,
                                               box=(px, py, px + side / ds, py + side / ds)))
            i = j
        return out


def write_patch_store(path: str | Path, slide: Any, plan: PatchPlan, *, out_px: int = 224, chunk: int = 64,
                      codec: str = "lz4", attrs: dict[str, Any] | None = None, log_every: int = 2048) -> float:
    """Write the kept patches of ``plan`` (in unit order) as ``images`` of a zarr group at ``path``
    (the caller wraps ``path`` in :func:`~morphomol.util.atomic.atomic_path`); returns seconds spent."""
    from morphomol.tiling import create_image_array

    t0 = time.perf_counter()
    idx = np.flatnonzero(plan.keep)
    attrs = {"unit": "patch", "patch_px": plan.size_px, "out_px": int(out_px), **(attrs or {})}
    _, arr = create_image_array(Path(path), len(idx), int(out_px), int(chunk), codec, attrs)
    writer = ChunkWriter(arr, int(chunk))
    reader = _BlockReader(slide, plan.size_px, out_px)
    step = max(int(chunk), 256)
    for a in range(0, len(idx), step):
        sel = idx[a:a + step]
        writer.add(reader.read(plan.x0[sel], plan.y0[sel]))
        done = min(len(idx), a + step)
        if done == len(idx) or (done // log_every) != ((done - len(sel)) // log_every):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log.info("%s: %d/%d patches (%.0f patches/s)", attrs.get("sample", path), done, len(idx), rate)
    writer.flush()
    return time.perf_counter() - t0
