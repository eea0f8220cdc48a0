"""Tissue detection, tile planning, and the ``tiles.parquet`` + ``tiles.zarr`` writer.

The tile grid, the µm -> global patch mapping and the transcript locate kernel live in
:mod:`morphomol.geometry` (shared with :mod:`morphomol.tokens`). The first streaming pass here
counts transcripts per grid cell (one stride) with that kernel; tile statistics are sums of
``k x k`` cells.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.config.sections import IOConfig, TilingConfig
from morphomol.data.chunks import ChunkWriter
from morphomol.errors import InputError
from morphomol.geometry import (
    Batch,
    TileGrid,
    check_regions,
    locate_kernel,
    region_matrices,
    um_to_patch_matrices,
)
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger
from morphomol.util.numba import njit_kernels, numba_module

log = get_logger("tiling")


def tile_ids(sample: str, n: int) -> list[str]:
    """Unit ids of a sample's ``n`` kept tiles, row ``i`` -> ``{sample}__{i:06d}`` (the contract of every
    tile store: ``tiles.parquet``, ``images.zarr``, ``tokens.zarr``, ``units.h5ad`` rows)."""
    return [f"{sample}__{i:06d}" for i in range(int(n))]

#: Compression of ``tiles.zarr/images`` (see benchmarks/bench_tiling.py for the measurement).
DEFAULT_IMAGE_CODEC = "lz4"


# ----------------------------------------------------------------------------- tissue
def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=nbins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (mt - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between)
    return float(centers[int(np.argmax(between))])


def detect_tissue(rgb: np.ndarray, *, min_saturation: float = 0.05, min_object_px: int = 16,
                  close_radius: int = 2) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail: Otsu on HSV saturation, then clean-up.

    Background (glass) is bright and unsaturated; H&E-stained tissue is saturated. The
    threshold is ``max(otsu, min_saturation)``; very dark pixels (pen, black borders) are
    excluded; then closing, hole filling, opening, and removal of objects smaller than
    ``min_object_px`` thumbnail pixels.
    """
    from scipy import ndimage as ndi

    img = np.asarray(rgb, dtype=np.float32) / 255.0
    mx = img.max(axis=2)
    mn = img.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    t = max(otsu_threshold(sat.ravel()), min_saturation) if sat.size else 1.0
    mask = (sat > t) & (mx > 0.15)
    if close_radius > 0:
        st = np.ones((2 * close_radius + 1,) * 2, dtype=bool)
        mask = ndi.binary_closing(mask, structure=st, border_value=0)
        mask = ndi.binary_fill_holes(mask)
        mask = ndi.binary_opening(mask, structure=np.ones((3, 3), bool))
    if min_object_px > 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = np.bincount(lab.ravel())
        small = sizes < min_object_px
        small[0] = True
        mask = ~small[lab]
    return mask


def tile_tissue_fraction(mask: np.ndarray, grid: TileGrid, scale: float) -> np.ndarray:
    """Fraction of tissue pixels per tile, (ny, nx). ``mask[0, 0]`` sits at the grid origin;
    one mask pixel is ``scale`` level-0 px. Pixels beyond the mask count as background."""
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), dtype=np.int64)
    ii[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    xs = np.arange(grid.nx) * grid.stride_px / scale
    ys = np.arange(grid.ny) * grid.stride_px / scale
    side = grid.size_px / scale
    ax0 = np.round(xs).astype(np.int64)
    ax1 = np.maximum(np.round(xs + side).astype(np.int64), ax0 + 1)
    ay0 = np.round(ys).astype(np.int64)
    ay1 = np.maximum(np.round(ys + side).astype(np.int64), ay0 + 1)
    area = (ay1 - ay0)[:, None] * (ax1 - ax0)[None, :]
    cx0, cx1 = np.clip(ax0, 0, w), np.clip(ax1, 0, w)
    cy0, cy1 = np.clip(ay0, 0, h), np.clip(ay1, 0, h)
    inside = ii[cy1][:, cx1] - ii[cy0][:, cx1] - ii[cy1][:, cx0] + ii[cy0][:, cx0]
    return inside / area


# ----------------------------------------------------------------------------- streaming count
def _build_count() -> Any:
    nb = numba_module()
    locate = locate_kernel()

    @nb.njit(cache=True, nogil=True)
    def count_cells(x, y, reg, codes, lut, M, npx, npy, s, cell_count, cell_region, cell_gene):  # pragma: no cover
        n = x.shape[0]
        dropped = 0
        for t in range(n):
            r = reg[t]
            if r < 0:
                continue
            g = lut[codes[t]]
            if g < 0:
                continue
            px, py = locate(M, r, x[t], y[t], npx, npy)
            if px < 0:
                dropped += 1
                continue
            cx = px // s
            cy = py // s
            cell_count[cy, cx] += 1
            cell_region[cy, cx, r] += 1
            cell_gene[cy, cx, g] = 1
        return dropped

    return count_cells


def _count_kernel() -> Any:
    """The jitted first-pass kernel (transcripts per grid cell, per region, gene presence)."""
    return njit_kernels("tiling.count", _build_count)


@dataclass
class CellCounts:
    count: np.ndarray  # (ncy, ncx) int64
    region: np.ndarray  # (ncy, ncx, R) int64
    gene: np.ndarray  # (ncy, ncx, G) uint8 presence
    n_seen: int = 0
    n_outside: int = 0


def count_cells(batches: Iterable[Batch], grid: TileGrid, M: np.ndarray, n_genes: int) -> CellCounts:
    """First streaming pass: transcripts per grid cell (and per region, gene presence)."""
    R = M.shape[0]
    cc = CellCounts(np.zeros((grid.n_cell_y, grid.n_cell_x), np.int64),
                    np.zeros((grid.n_cell_y, grid.n_cell_x, R), np.int64),
                    np.zeros((grid.n_cell_y, grid.n_cell_x, max(1, n_genes)), np.uint8))
    kern = _count_kernel()
    for b in batches:
        cc.n_seen += len(b.x)
        cc.n_outside += int(kern(b.x, b.y, b.region.astype(np.int32, copy=False), b.codes.astype(np.int32, copy=False),
                                 b.lut.astype(np.int32, copy=False), M, float(grid.n_patch_x), float(grid.n_patch_y),
                                 grid.s, cc.count, cc.region, cc.gene))
    return cc


def tile_stats(cc: CellCounts, grid: TileGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_transcripts (ny,nx), majority region (ny,nx), n_genes (ny,nx)) from cell counts."""
    k = grid.k
    ny, nx = grid.ny, grid.nx
    n = np.zeros((ny, nx), np.int64)
    reg = np.zeros((ny, nx, cc.region.shape[2]), np.int64)
    pres = np.zeros((ny, nx, cc.gene.shape[2]), np.uint8)
    for dy in range(k):
        for dx in range(k):
            n += cc.count[dy:dy + ny, dx:dx + nx]
            reg += cc.region[dy:dy + ny, dx:dx + nx]
            pres |= cc.gene[dy:dy + ny, dx:dx + nx]
    return n, reg.argmax(axis=2).astype(np.int32), pres.sum(axis=2, dtype=np.int64)


# ----------------------------------------------------------------------------- slide reading
#: most level pixels one strip of read_downsampled holds (192 MB of RGB)
STRIP_LEVEL_PX = 1 << 26


def read_downsampled(slide: Any, box: Sequence[float], scale: float) -> np.ndarray:
    """RGB image of level-0 box (x0, y0, x1, y1) at ``scale`` level-0 px per output px."""
    from PIL import Image

    x0, y0, x1, y1 = (float(v) for v in box)
    ow = max(1, int(math.ceil((x1 - x0) / scale)))
    oh = max(1, int(math.ceil((y1 - y0) / scale)))
    level = slide.get_best_level_for_downsample(max(scale, 1.0))
    ds = float(slide.level_downsamples[level])
    check = getattr(slide, "check_decode", None)
    if check is not None:  # no read decoding gigapixels of a slide without a suitable pyramid level
        check(level, (x0, y0, x1, y1), what=f"tissue thumbnail at {scale:g} level-0 px per px")
    out = np.empty((oh, ow, 3), np.uint8)
    rows_per_strip = max(1, int(2048 * ds / scale))  # output rows per strip (bounded memory)
    level_w = (x1 - x0) / ds + 2
    if rows_per_strip * scale / ds * level_w > STRIP_LEVEL_PX:  # a wide level: fewer rows per strip
        rows_per_strip = max(1, int(STRIP_LEVEL_PX / level_w * ds / scale))
    for r0 in range(0, oh, rows_per_strip):
        r1 = min(oh, r0 + rows_per_strip)
        sy0, sy1 = y0 + r0 * scale, y0 + r1 * scale
        lx0, ly0 = int(math.floor(x0 / ds)), int(math.floor(sy0 / ds))
        lx1, ly1 = int(math.ceil((x0 + ow * scale) / ds)), int(math.ceil(sy1 / ds))
        region = slide.read_region((int(round(lx0 * ds)), int(round(ly0 * ds))), level, (lx1 - lx0, ly1 - ly0))
        box_l = (x0 / ds - lx0, sy0 / ds - ly0, (x0 + ow * scale) / ds - lx0, sy1 / ds - ly0)
        img = Image.fromarray(np.ascontiguousarray(region)).resize((ow, r1 - r0), Image.Resampling.BILINEAR, box=box_l)
        out[r0:r1] = np.asarray(img)
    return out


class TileReader:
    """Reads tiles (level-0 box of side ``size_px``) from the best pyramid level, resampled
    to ``out_px``; rows of neighbouring tiles are read as one region to avoid re-reading
    the overlap."""

    def __init__(self, slide: Any, size_px: float, out_px: int = 224, block_tiles: int = 8) -> None:
        self.slide = slide
        self.size_px = float(size_px)
        self.out_px = int(out_px)
        self.level = slide.get_best_level_for_downsample(self.size_px / self.out_px)
        self.ds = float(slide.level_downsamples[self.level])
        self.block_tiles = block_tiles

    def read_row(self, xs: np.ndarray, y: float) -> np.ndarray:
        """Tiles with top-left (xs[i], y) (xs sorted) -> (n, out, out, 3) uint8."""
        from PIL import Image

        n = len(xs)
        out = np.empty((n, self.out_px, self.out_px, 3), np.uint8)
        ds = self.ds
        i = 0
        while i < n:
            # group tiles whose span stays small (contiguous in the row)
            j = i + 1
            while j < n and j - i < self.block_tiles and xs[j] - xs[j - 1] <= self.size_px:
                j += 1
            bx0, bx1 = float(xs[i]), float(xs[j - 1]) + self.size_px
            lx0, ly0 = int(math.floor(bx0 / ds)), int(math.floor(y / ds))
            lx1, ly1 = int(math.ceil(bx1 / ds)) + 1, int(math.ceil((y + self.size_px) / ds)) + 1
            region = self.slide.read_region((int(round(lx0 * ds)), int(round(ly0 * ds))), self.level,
                                            (lx1 - lx0, ly1 - ly0))
            pil = Image.fromarray(np.ascontiguousarray(region))
            for t in range(i, j):
                bx = float(xs[t]) / ds - lx0
                by = y / ds - ly0
                side = self.size_px / ds
                out[t] = np.asarray(pil.resize((self.out_px, self.out_px), Image.Resampling.BILINEAR,
                                               box=(bx, by, bx + side, by + side)))
            i = j
        return out


# ----------------------------------------------------------------------------- zarr
def image_codecs(name: str) -> list[Any] | None:
    """Compressor list for ``name`` in none | lz4 | zstd1 (Blosc, byte shuffle)."""
    from zarr.codecs import BloscCodec

    if name in ("none", None):
        return None
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=1)]
    if name in ("zstd1", "zstd-1", "zstd"):
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=1)]
    if name in ("zstd1-bitshuffle",):
        return [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=1)]
    raise ValueError(f"unknown image codec {name!r}")


def create_image_array(path: Path, n: int, out_px: int, chunk_tiles: int, codec: str, attrs: dict[str, Any]):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update(attrs)
    arr = g.create_array("images", shape=(n, out_px, out_px, 3), chunks=(chunk_tiles, out_px, out_px, 3),
                         dtype="uint8", compressors=image_codecs(codec), fill_value=0)
    return g, arr


# ----------------------------------------------------------------------------- plan + write
def plan_tiles(
    sample: str, grid: TileGrid, n_tx: np.ndarray, region: np.ndarray, n_genes: np.ndarray,
    tissue: np.ndarray, *, min_transcripts: int, min_tissue_fraction: float,
    matrices_px_to_um: Sequence[np.ndarray | None],
) -> pd.DataFrame:
    """tiles.parquet table (kept tiles in row-major grid order) from per-grid-tile stats."""
    keep = (tissue >= min_tissue_fraction) & (n_tx >= min_transcripts)
    if not keep.any():
        on_tissue = tissue >= min_tissue_fraction
        best_t = int(n_tx[on_tissue].max()) if on_tissue.any() else 0
        raise InputError(
            f"sample {sample}: zero tiles left after filtering: {int(on_tissue.sum())} of {n_tx.size} tiles have "
            f"tissue fraction >= {min_tissue_fraction:g}; the most transcripts any of them has is {best_t} "
            f"(any tile: {int(n_tx.max())}), below min_transcripts={min_transcripts}",
            field="tiling.min_transcripts", expected="at least one tile passing both thresholds",
        )
    jj, ii = np.nonzero(keep)
    x0, y0 = grid.tile_origin(ii, jj)
    reg = region[jj, ii]
    cxp, cyp = x0 + grid.size_px / 2, y0 + grid.size_px / 2
    xum = np.full(len(ii), np.nan)
    yum = np.full(len(ii), np.nan)
    for r, m in enumerate(matrices_px_to_um):
        if m is None:
            continue
        sel = reg == r
        m = np.asarray(m, float)
        xum[sel] = m[0, 0] * cxp[sel] + m[0, 1] * cyp[sel] + m[0, 2]
        yum[sel] = m[1, 0] * cxp[sel] + m[1, 1] * cyp[sel] + m[1, 2]
    n = len(ii)
    idx = np.arange(n)
    return pd.DataFrame({
        "tile_id": tile_ids(sample, n),
        "index": idx.astype(np.int64),
        "x_px": x0.astype(np.float64), "y_px": y0.astype(np.float64),
        "size_px": np.full(n, grid.size_px),
        "x_um": xum, "y_um": yum,
        "region": reg.astype(np.int32),
        "n_transcripts": n_tx[jj, ii].astype(np.int64),
        "n_genes": n_genes[jj, ii].astype(np.int64),
        "tissue_fraction": tissue[jj, ii].astype(np.float32),
        "grid_i": ii.astype(np.int32), "grid_j": jj.astype(np.int32),
    })


def write_tiles_zarr(path: Path, slide: Any, table: pd.DataFrame, *, size_px: float, out_px: int,
                     chunk_tiles: int, codec: str, attrs: dict[str, Any]) -> float:
    """Read + resample each kept tile and write ``images``; returns seconds spent."""
    t0 = time.perf_counter()
    g, arr = create_image_array(path, len(table), out_px, chunk_tiles, codec, attrs)
    writer = ChunkWriter(arr, chunk_tiles)
    reader = TileReader(slide, size_px, out_px)
    ys = table["y_px"].to_numpy()
    xs = table["x_px"].to_numpy()
    # rows of the table are in row-major grid order, so equal y are contiguous
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    ends = np.r_[starts[1:], len(ys)]
    done = 0
    for a, b in zip(starts, ends, strict=True):
        writer.add(reader.read_row(xs[a:b], float(ys[a])))
        done += b - a
        if len(starts) > 10 and (a == 0 or (done * 10) // len(ys) != ((done - (b - a)) * 10) // len(ys)):
            log.info("%s: %d/%d tiles written", attrs.get("sample"), done, len(ys))
    writer.flush()
    return time.perf_counter() - t0


def qc_png(path: Path, thumb: np.ndarray, mask: np.ndarray, table: pd.DataFrame, grid: TileGrid, scale: float) -> None:
    from PIL import Image, ImageDraw

    img = thumb.copy()
    tint = img[mask].astype(np.int16)
    tint[:, 1] = np.clip(tint[:, 1] + 40, 0, 255)
    img[mask] = tint.astype(np.uint8)
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for x, y in zip(table["x_px"].to_numpy(), table["y_px"].to_numpy(), strict=True):
        a = ((x - grid.origin_x) / scale, (y - grid.origin_y) / scale)
        d.rectangle([a[0], a[1], a[0] + grid.size_px / scale, a[1] + grid.size_px / scale], outline=(0, 0, 255))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- the rule
def tile_sample(
    *, he_path: str | Path, registration: str | Path, xenium_dir: str | Path, out_table: str | Path,
    out_store: str | Path, cfg: TilingConfig, out_qc: str | Path | None = None, sample: str | None = None,
    he_mpp: float | None = None, grid: int = 14, io: IOConfig | None = None, codec: str = DEFAULT_IMAGE_CODEC,
) -> pd.DataFrame:
    """Tile one sample: tissue mask, grid over the transcript bbox, transcript counts per tile,
    filtering, then tiles.parquet + tiles.zarr (+ tiles_qc.png).

    ``cfg``: the ``tiling`` config section; ``io``: the ``io`` section (qv filter, batch size;
    default qv >= 20, 2M transcripts per batch); ``grid``: tokens per tile side (``tokens.grid``).
    """
    from morphomol.io.he import open_slide
    from morphomol.io.xenium import XeniumBundle
    from morphomol.registration import Registration
    from morphomol.transcripts import sample_batches, sample_genes

    io = io or IOConfig(qv_min=20.0, batch_size=2_000_000)
    qv_min, batch_size = io.qv_min, io.batch_size
    tile_px, stride_px, tile_mpp, out_px = cfg.tile_px, cfg.stride_px, cfg.tile_mpp, cfg.out_px
    min_transcripts, min_tissue_fraction = cfg.min_transcripts, cfg.min_tissue_fraction
    thumbnail_mpp, chunk_tiles = cfg.thumbnail_mpp, cfg.chunk_tiles

    t_start = time.perf_counter()
    regj = json.loads(Path(registration).read_text())
    sample = sample or regj.get("sample") or Path(out_table).parent.name
    reg = Registration.load(registration)
    slide = open_slide(he_path, mpp=he_mpp)
    mpp = float(slide.mpp)
    bbox = regj.get("transcript_bbox_he")
    if not bbox or len(bbox) != 4:
        raise InputError("missing transcript_bbox_he", file=registration, field="transcript_bbox_he",
                         expected="[x0, y0, x1, y1] in level-0 H&E px")
    w0, h0 = slide.dimensions
    bx0, by0 = max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))
    bx1, by1 = min(float(w0), float(bbox[2])), min(float(h0), float(bbox[3]))
    if bx1 <= bx0 or by1 <= by0:
        raise InputError(f"sample {sample}: transcript bbox {bbox} does not overlap the H&E image ({w0}x{h0} px)",
                         file=registration, field="transcript_bbox_he", expected="a box inside the slide")
    size = tile_px * tile_mpp / mpp
    stride = stride_px * tile_mpp / mpp
    tg = TileGrid.covering((bx0, by0, bx1, by1), size, stride, grid)
    scale = max(thumbnail_mpp / mpp, 1e-9)
    thumb = read_downsampled(slide, (bx0, by0, bx1, by1), scale)
    mask = detect_tissue(thumb)
    if not mask.any():
        raise InputError(f"sample {sample}: no tissue found in the transcript-covered area of the H&E "
                         f"(thumbnail {thumb.shape[1]}x{thumb.shape[0]} px at {thumbnail_mpp:g} µm/px)",
                         file=he_path, expected="stained tissue (saturated pixels) inside transcript_bbox_he")
    tissue = tile_tissue_fraction(mask, tg, scale)
    log.info("%s: grid %dx%d tiles of %.1f px (stride %.1f), tissue %.1f%% of thumbnail, %d tiles on tissue",
             sample, tg.nx, tg.ny, size, stride, 100 * mask.mean(), int((tissue >= min_tissue_fraction).sum()))

    bundle = XeniumBundle(xenium_dir)
    genes = sample_genes(bundle)
    inv, fwd = region_matrices(reg)
    M, has = um_to_patch_matrices(tg, inv)

    def checked() -> Iterator[Batch]:
        for b in sample_batches(bundle, reg, genes, batch_size=batch_size, qv_min=qv_min):
            check_regions(b.region, has, sample)
            yield b

    t1 = time.perf_counter()
    cc = count_cells(checked(), tg, M, len(genes))
    n_tx, region, n_genes = tile_stats(cc, tg)
    log.info("%s: counted %d transcripts in %.1f s (%d outside the tile grid)", sample, cc.n_seen,
             time.perf_counter() - t1, cc.n_outside)
    table = plan_tiles(sample, tg, n_tx, region, n_genes, tissue, min_transcripts=min_transcripts,
                       min_tissue_fraction=min_tissue_fraction, matrices_px_to_um=fwd)
    attrs = {"sample": sample, "tile_px": tile_px, "mpp": tile_mpp, "stride": stride_px, "out_px": out_px,
             "he_mpp": mpp, "grid": tg.to_dict(), "codec": codec, "genes": list(genes)}
    with atomic_path(out_store) as tmp_store:
        secs = write_tiles_zarr(tmp_store, slide, table, size_px=size, out_px=out_px, chunk_tiles=chunk_tiles,
                                codec=codec, attrs=attrs)
        with atomic_path(out_table) as tmp_table:
            table.to_parquet(tmp_table, index=False)
    log.info("%s: %d tiles kept of %d (%.0f tiles/s written) in %.1f s", sample, len(table), n_tx.size,
             len(table) / max(secs, 1e-9), time.perf_counter() - t_start)
    qc = Path(out_qc) if out_qc else Path(out_table).with_name("tiles_qc.png")
    qc_png(qc, thumb, mask, table, tg, scale)
    slide.close()
    return table


def write_pyramidal_tiff(path: str | Path, rgb: np.ndarray, mpp: float, n_levels: int = 3, tile: int = 256,
                         quality: int = 90) -> None:
    """Write an RGB pyramid as separate tiled JPEG IFDs (level 0 ``subfiletype=0``, reduced
    levels ``subfiletype=1``, resolution in cm) — the layout OpenSlide opens as generic-tiff.
    Used by tests and benchmarks to make synthetic slides."""
    import tifffile
    from PIL import Image

    res = 1e4 / mpp  # px per cm
    with tifffile.TiffWriter(str(path), bigtiff=rgb.nbytes > 2**31) as tw:
        img = rgb
        for lvl in range(n_levels):
            tw.write(img, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                     photometric="rgb", subfiletype=0 if lvl == 0 else 1,
                     resolution=(res / 2**lvl, res / 2**lvl), resolutionunit="CENTIMETER")
            if min(img.shape[:2]) < 2 * tile:
                break
            img = np.asarray(Image.fromarray(img).reduce(2))
