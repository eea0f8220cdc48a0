"""Whole-slide tissue detection and tiling: the slides study's unit table and image store.

One job per slide (rule ``slides_tile``): the slide is read at ``thumbnail_mpp`` for the tissue
mask (:func:`morphomol.tiling.detect_tissue`: Otsu on saturation + clean-up), covered by a grid of
non-overlapping tiles of ``tile_px`` px at ``tile_mpp`` µm/px (level-0 side ``tile_px * tile_mpp /
slide_mpp``; :class:`morphomol.geometry.TileGrid` from the slide's top-left corner), and every tile
with a tissue fraction of at least ``min_tissue_fraction`` is kept (at most ``max_tiles``: a seeded
subset, still in row-major order). Tiles are read pyramid-aware, resampled to ``out_px`` and
written through :func:`morphomol.tiling.write_tiles_zarr` into ``images.zarr`` (the image-store
contract, so the shared ``features`` rule runs unchanged).

The unit table ``units.h5ad`` (:mod:`morphomol.data.units`, ``unit="tile"``): obs = tiles
(``{sample}__{index:06d}``) with ``index, x_px, y_px, size_px, x_um, y_um, tissue_fraction, grid_i,
grid_j``; ``obsm['spatial']`` = tile centres in µm of the slide frame (level-0 px x slide mpp);
``X`` is an empty (N, 0) matrix: a slide's tiles carry no measured expression (the slide's bulk RNA
is a per-slide table of the study); ``uns['morphomol']`` records the slide path, mpp and geometry.
A slide without detectable tissue is an error naming it, and nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.tiles")


def plan_slide_tiles(sample: str, tissue: np.ndarray, grid: Any, *, mpp: float, min_tissue_fraction: float,
                     max_tiles: int = 0, seed: int = 0, file: object = None) -> pd.DataFrame:
    """Table of the kept tiles (row-major) from the per-grid-tile tissue fraction ``tissue`` (ny, nx)."""
    keep = tissue >= min_tissue_fraction
    if not keep.any():
        raise InputError(f"slide {sample}: no tile has a tissue fraction >= {min_tissue_fraction:g} "
                         f"(best {float(tissue.max()) if tissue.size else 0.0:.2f} of {tissue.size} tiles)",
                         file=file, field="slides.tiling.min_tissue_fraction",
                         expected="detectable tissue covering at least one tile")
    jj, ii = np.nonzero(keep)
    if max_tiles and len(ii) > max_tiles:
        rng = np.random.default_rng([int(seed), *sample.encode()])
        sel = np.sort(rng.choice(len(ii), size=max_tiles, replace=False))
        jj, ii = jj[sel], ii[sel]
    x0, y0 = grid.tile_origin(ii, jj)
    n = len(ii)
    size = float(grid.size_px)
    return pd.DataFrame({
        "tile_id": [f"{sample}__{i:06d}" for i in range(n)],
        "index": np.arange(n, dtype=np.int64),
        "x_px": np.asarray(x0, np.float64), "y_px": np.asarray(y0, np.float64),
        "size_px": np.full(n, size),
        "x_um": (np.asarray(x0) + size / 2) * mpp, "y_um": (np.asarray(y0) + size / 2) * mpp,
        "tissue_fraction": tissue[jj, ii].astype(np.float32),
        "grid_i": ii.astype(np.int32), "grid_j": jj.astype(np.int32),
    })


def tile_slide(*, slide_path: str | Path, sample: str, patient: str, out_units: str | Path, out_store: str | Path,
               cfg: Any, out_qc: str | Path | None = None, he_mpp: float | None = None, seed: int = 0,
               codec: str = "lz4") -> pd.DataFrame:
    """The ``slides_tile`` rule: tissue mask, tiles, ``images.zarr`` + ``units.h5ad`` (+ QC PNG).

    ``cfg``: :class:`~morphomol.studies.slides.config.SlideTilingConfig`. Reads the slide; writes the
    image store and the unit table (both replaced only when everything succeeded)."""
    import scipy.sparse as sp

    from morphomol.data.units import write_units
    from morphomol.geometry import TileGrid
    from morphomol.io.he import open_slide
    from morphomol.tiling import detect_tissue, qc_png, read_downsampled, tile_tissue_fraction, write_tiles_zarr
    from morphomol.util.atomic import atomic_path

    t0 = time.perf_counter()
    slide = open_slide(slide_path, mpp=he_mpp)
    try:
        mpp = float(slide.mpp)
        w0, h0 = slide.dimensions
        size = cfg.tile_px * cfg.tile_mpp / mpp
        if size > min(w0, h0):
            raise InputError(f"slide {sample}: a {cfg.tile_px} px tile at {cfg.tile_mpp:g} µm/px ({size:.0f} level-0 px) "
                             f"is larger than the slide ({w0}x{h0} px at {mpp:g} µm/px)", file=slide_path,
                             field="slides.tiling.tile_px", expected="tiles smaller than the slide")
        grid = TileGrid.covering((0.0, 0.0, float(w0), float(h0)), size, size, 14)
        scale = max(cfg.thumbnail_mpp / mpp, 1.0)
        thumb = read_downsampled(slide, (0.0, 0.0, float(w0), float(h0)), scale)
        mask = detect_tissue(thumb)
        if not mask.any():
            raise InputError(f"slide {sample}: no tissue detected (thumbnail {thumb.shape[1]}x{thumb.shape[0]} px at "
                             f"{cfg.thumbnail_mpp:g} µm/px is background only)", file=slide_path, field="slide_path",
                             expected="an H&E slide with stained (saturated) tissue")
        tissue = tile_tissue_fraction(mask, grid, scale)
        table = plan_slide_tiles(sample, tissue, grid, mpp=mpp, min_tissue_fraction=cfg.min_tissue_fraction,
                                 max_tiles=cfg.max_tiles, seed=seed, file=slide_path)
        attrs = {"sample": sample, "unit": "tile", "tile_px": cfg.tile_px, "mpp": cfg.tile_mpp, "stride": cfg.tile_px,
                 "out_px": cfg.out_px, "he_mpp": mpp, "grid": grid.to_dict(), "codec": codec, "genes": []}
        with atomic_path(out_store) as tmp_store:
            secs = write_tiles_zarr(tmp_store, slide, table, size_px=size, out_px=cfg.out_px,
                                    chunk_tiles=cfg.chunk_tiles, codec=codec, attrs=attrs)
            obs = table.set_index("tile_id", drop=False)
            write_units(out_units, obs, sp.csr_matrix((len(table), 0), dtype=np.float32), [],
                        spatial_um=table[["x_um", "y_um"]].to_numpy(), unit="tile", sample=sample, patient=patient,
                        uns={"slide_path": str(slide_path), "mpp": mpp, "tile_px": cfg.tile_px,
                             "tile_mpp": cfg.tile_mpp, "grid_nx": grid.nx, "grid_ny": grid.ny,
                             "tissue_fraction_thumbnail": float(mask.mean()),
                             "X": "empty: slides carry no per-tile expression (bulk RNA is per slide)"})
        if out_qc:
            qc_png(Path(out_qc), thumb, mask, table, grid, scale)
    finally:
        slide.close()
    log.info("%s: %d of %d tiles kept (%.0f px tiles at %g µm/px, tissue %.0f%% of the slide), written in %.2f s "
             "(%.1f s in all)", sample, len(table), tissue.size, size, mpp, 100 * mask.mean(), secs,
             time.perf_counter() - t0)
    return table


def tile_slides(*, slides: Sequence[str | Path], samples: Sequence[str], patients: Sequence[str],
                he_mpp: Sequence[float | None], out_units: Sequence[str | Path], out_stores: Sequence[str | Path],
                out_qc: Sequence[str | Path], cfg: Any, seed: int = 0) -> list[int]:
    """The ``slides_tile`` rule of one group of slides: :func:`tile_slide` for each; returns the tile counts."""
    n = len(samples)
    for name, seq in (("slides", slides), ("patients", patients), ("he_mpp", he_mpp), ("out_units", out_units),
                      ("out_stores", out_stores), ("out_qc", out_qc)):
        if len(seq) != n:
            raise ValueError(f"{name}: {len(seq)} entries for {n} samples")
    counts = []
    t0 = time.perf_counter()
    for i in range(n):
        table = tile_slide(slide_path=slides[i], sample=samples[i], patient=patients[i], out_units=out_units[i],
                           out_store=out_stores[i], out_qc=out_qc[i], cfg=cfg, he_mpp=he_mpp[i], seed=seed)
        counts.append(len(table))
    secs = time.perf_counter() - t0
    log.info("tiled %d slides, %d tiles in %.1f s (%.1f slides/s, %.0f tiles/s)", n, sum(counts), secs,
             n / max(secs, 1e-9), sum(counts) / max(secs, 1e-9))
    return counts
