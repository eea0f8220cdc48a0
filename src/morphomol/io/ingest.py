"""Pre-aligned samples as Xenium bundles: what the ``xenium_ingest_*`` rules write.

SpatialData zarrs and HEST-1k Xenium samples carry transcripts whose positions are already
aligned with their H&E. Rather than teaching every stage a new reader, a per-sample rule converts
such a sample once into the layout the fusion stages read (``results/{cohort}/samples/{sample}/
ingest/{format}/``):

* ``xenium/experiment.xenium``  ``pixel_size`` = the H&E's µm/px (no morphology image exists, so
  "morphology px" are chosen to be H&E px), ``source``, ``region_name``;
* ``xenium/transcripts.parquet`` 10x columns ``feature_name, x_location, y_location`` (µm) [+ ``qv``,
  ``z_location``], streamed batch by batch;
* ``he_imagealignment.csv``      the 3x3 H&E px -> morphology px of the pre-alignment (Xenium
  Explorer's format); registration reads it in its ``prealigned`` mode (no refinement, QC written);
* ``he.ome.tif``                 (SpatialData only) the H&E as a pyramidal, losslessly compressed
  OME-TIFF with its µm/px (OpenSlide / tifffile open it).

Everything is written to temporary names and renamed at the end, so a failed conversion leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morphomol.io.sheets import FORMATS, INGESTED, PREALIGNED  # noqa: F401  (re-exported)
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("io.ingest")



@contextlib.contextmanager
def all_or_nothing(out_dir: Path, names: Iterable[str]) -> Iterator[None]:
    """The ingested files ``names`` (keys of :data:`INGESTED`) exist together or not at all: on any
    exception inside the block those already written are removed."""
    try:
        yield
    except BaseException:
        for n in names:
            (Path(out_dir) / INGESTED[n]).unlink(missing_ok=True)
        raise


def write_experiment(path: str | Path, *, pixel_size: float, source: str, sample: str, extra: dict | None = None) -> None:
    """A minimal ``experiment.xenium`` (what :class:`morphomol.io.xenium.XeniumBundle` reads)."""
    doc = {"pixel_size": float(pixel_size), "region_name": str(sample), "analysis_sw_version": f"morphomol ingest ({source})",
           "source": source, **(extra or {})}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")


def write_alignment(path: str | Path, matrix: np.ndarray) -> None:
    """A headerless 3x3 CSV (Xenium Explorer's ``*_he_imagealignment.csv`` layout)."""
    m = np.asarray(matrix, float).reshape(3, 3)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(",".join(f"{v:.12g}" for v in row) for row in m) + "\n")


TRANSCRIPT_SCHEMA = pa.schema([("feature_name", pa.string()), ("x_location", pa.float32()),
                               ("y_location", pa.float32()), ("z_location", pa.float32()), ("qv", pa.float32())])


def write_transcripts(path: str | Path, batches: Iterator[dict[str, np.ndarray]]) -> int:
    """Stream ``{feature_name, x_location, y_location[, z_location, qv]}`` batches into a 10x-style
    parquet (missing ``z_location`` = 0, missing ``qv`` = 40: pre-filtered); returns the row count."""
    n = 0
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(str(tmp), TRANSCRIPT_SCHEMA, compression="zstd")
        try:
            for b in batches:
                k = len(b["x_location"])
                if not k:
                    continue
                cols = {
                    "feature_name": pa.array(np.asarray(b["feature_name"]).astype(str), pa.string()),
                    "x_location": pa.array(np.asarray(b["x_location"], np.float32)),
                    "y_location": pa.array(np.asarray(b["y_location"], np.float32)),
                    "z_location": pa.array(np.asarray(b.get("z_location", np.zeros(k)), np.float32)),
                    "qv": pa.array(np.asarray(b.get("qv", np.full(k, 40.0)), np.float32)),
                }
                writer.write_table(pa.table(cols, schema=TRANSCRIPT_SCHEMA))
                n += k
        finally:
            writer.close()
    return n


def write_ome_tiff(path: str | Path, levels: list[Any], mpp: float, *, tile: int = 256) -> None:
    """A pyramidal RGB TIFF from ``levels`` ((H, W, 3) arrays, numpy or dask, level 0 first; each about
    half the previous), written strip by strip (bounded memory): tiled, deflate (lossless), reduced
    levels as ``subfiletype=1`` IFDs, resolution tags in cm + OME PhysicalSizeX (what :func:`open_slide`
    and OpenSlide read)."""
    import tifffile

    def tiles(arr: Any) -> Iterator[np.ndarray]:
        h, w = int(arr.shape[0]), int(arr.shape[1])
        for y0 in range(0, h, tile):
            strip = np.asarray(arr[y0: y0 + tile])
            if hasattr(strip, "compute"):
                strip = strip.compute()
            strip = np.asarray(strip, np.uint8)
            for x0 in range(0, w, tile):
                t = np.full((tile, tile, 3), 255, np.uint8)
                part = strip[:, x0: x0 + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t

    big = sum(int(a.shape[0]) * int(a.shape[1]) * 3 for a in levels) > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(str(tmp), bigtiff=big, ome=False) as tw:
        for lvl, arr in enumerate(levels):
            ds = float(levels[0].shape[1]) / float(arr.shape[1])
            res = 1e4 / (mpp * ds)  # px per cm
            shape = (int(arr.shape[0]), int(arr.shape[1]), 3)
            desc = None
            if lvl == 0:
                desc = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/'
                        '2016-06"><Image ID="Image:0"><Pixels DimensionOrder="XYCZT" ID="Pixels:0" SizeC="3" '
                        f'SizeT="1" SizeZ="1" SizeX="{shape[1]}" SizeY="{shape[0]}" Type="uint8" '
                        f'PhysicalSizeX="{mpp}" PhysicalSizeXUnit="&#181;m" PhysicalSizeY="{mpp}" PhysicalSizeYUnit="&#181;m">'
                        '</Pixels></Image></OME>')
            tw.write(tiles(arr), shape=shape, dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="rgb", subfiletype=0 if lvl == 0 else 1, resolution=(res, res),
                     resolutionunit="CENTIMETER", description=desc, metadata=None)


def pyramid(level0: Any, *, min_side: int = 512) -> list[Any]:
    """Level 0 and its 2x reductions (dask or numpy (H, W, 3) uint8) down to ``min_side``."""
    levels = [level0]
    cur = level0
    while min(int(cur.shape[0]), int(cur.shape[1])) >= 2 * min_side:
        h, w = (int(cur.shape[0]) // 2) * 2, (int(cur.shape[1]) // 2) * 2
        c = cur[:h, :w].astype(np.float32)
        cur = ((c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]) / 4.0 + 0.5).astype(np.uint8)
        levels.append(cur)
    return levels


__all__ = ["FORMATS", "INGESTED", "all_or_nothing", "PREALIGNED", "pyramid", "write_alignment", "write_experiment", "write_ome_tiff",
           "write_transcripts"]
