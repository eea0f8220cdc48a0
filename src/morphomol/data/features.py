"""Frozen-feature stores (``features/{encoder}/{sample}.zarr``): the one reader and writer.

Layout (a zarr v3 group), row ``i`` = tile ``i`` of the sample (unit ``{sample}__{i:06d}``):

* ``features`` (N, D) float32;
* ``tokens`` (N, T, D) float16, optional (patch tokens);
* ``barcodes`` (N,) string: the unit ids (``{sample}__{index:06d}``), ``coords_px`` (N, 2) float64:
  unit centres in level-0 H&E px, ``coords_um`` (N, 2) float64: unit centres in µm (the unit table's
  ``obsm['spatial']``), so that a store can be used without the unit table (HEST / TRIDENT style).
  Taken from the unit geometry written next to the image store (``tiles.parquet`` of the fusion
  study, else ``units.h5ad``: :func:`unit_geometry`); stores written before this existed lack them
  (:func:`read_feature_units` then returns None and readers fall back on the unit table);
* attrs ``encoder``, ``weights_sha256`` (or ``random-init:seed=N``), ``dim``, ``n_tiles``,
  ``tiles_store``, ``pooling``, ``arch`` (geometry), ``precision``, ``kind`` and, with tokens,
  ``n_tokens``; with unit geometry ``units_from`` (the file it came from).

Written by :func:`morphomol.features.extract_features` through :func:`open_features_writer`
(a temporary sibling renamed on success, so a failed job leaves nothing behind); read by
the ridge baseline and tests through :func:`read_features` / :func:`feature_rows`; the training loader reads
them chunk by chunk with its tile chunks (:mod:`morphomol.data.loader`, validated by :func:`check_feature_stores`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import json_safe

FEATURES = "features"
TOKENS = "tokens"
BARCODES = "barcodes"
COORDS_PX = "coords_px"
COORDS_UM = "coords_um"


def open_zarr_group(path: str | Path) -> Any:
    """Open an existing zarr group read-only; InputError naming ``path`` if absent or unreadable."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise InputError("store not found", file=p, expected="a zarr group")
    try:
        return zarr.open_group(str(p), mode="r")
    except Exception as exc:
        raise InputError(f"cannot open zarr group ({type(exc).__name__}: {exc})", file=p,
                         expected="a zarr v3 group") from None


def _features_array(path: str | Path) -> tuple[Any, Any]:
    g = open_zarr_group(path)
    if FEATURES not in g:
        raise InputError("store has no 'features' array", file=path, field="features",
                         expected="a features zarr written by the features rule")
    return g, g[FEATURES]


def read_features_attrs(path: str | Path) -> dict[str, Any]:
    """The attrs of a features store (encoder, dim, n_tiles, weights_sha256, ...); reads no rows."""
    g, _ = _features_array(path)
    return dict(g.attrs)


def read_features(path: str | Path, rows: np.ndarray | Sequence[int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(features float32, attrs) of a features store: all rows (N, D), or ``rows`` in the order
    given (duplicates allowed). Only the row span ``min(rows)..max(rows)`` is read. InputError
    naming the file for a missing store or array and for rows out of range."""
    g, arr = _features_array(path)
    attrs = dict(g.attrs)
    if rows is None:
        return np.asarray(arr[:], dtype=np.float32), attrs
    idx = np.asarray(rows)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise InputError(f"feature rows must be a 1-D integer array, got {idx.dtype} with shape {idx.shape}",
                         file=path, field="features")
    idx = idx.astype(np.int64, copy=False)
    n, dim = int(arr.shape[0]), int(arr.shape[1])
    if idx.size == 0:
        return np.empty((0, dim), dtype=np.float32), attrs
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        bad = hi if hi >= n else lo
        raise InputError(f"tile index {bad} out of range ({n} rows)", file=path, field="features",
                         expected="one feature row per tile of tiles.parquet")
    block = np.asarray(arr[lo : hi + 1], dtype=np.float32)
    return block[idx - lo], attrs


def parse_unit_id(unit_id: str) -> tuple[str, int]:
    """``"{sample}__{index:06d}"`` -> (sample, index)."""
    sample, sep, index = str(unit_id).rpartition("__")
    if not sep or not index.isdigit():
        raise InputError(f"unit id {unit_id!r} is not of the form '{{sample}}__{{index:06d}}'", field="unit_id",
                         expected="ids of the unit table / tiles.parquet")
    return sample, int(index)


def feature_rows(paths: Mapping[str, str | Path], unit_ids: Sequence[str]) -> np.ndarray:
    """The feature rows of ``unit_ids`` (``"{sample}__{index:06d}"``, any mix of samples), in
    their order, as one (len(unit_ids), D) float32 array; ``paths`` maps sample -> features store.

    InputError for a sample without a store (``no cached features for sample ...``), a missing
    store or array, an index out of range, samples with different feature widths, or no units.
    """
    by_sample: dict[str, tuple[list[int], list[int]]] = {}
    for pos, uid in enumerate(unit_ids):
        sample, index = parse_unit_id(uid)
        out_rows, src_rows = by_sample.setdefault(sample, ([], []))
        out_rows.append(pos)
        src_rows.append(index)
    if not by_sample:
        raise InputError("no tiles to read features for")
    out: np.ndarray | None = None
    dim_from: Path | None = None
    for sample, (out_rows, src_rows) in by_sample.items():
        if sample not in paths:
            raise InputError(f"no cached features for sample '{sample}'", field="features",
                             expected="a features zarr per sample of the cohort")
        path = Path(paths[sample])
        feats, _ = read_features(path, np.asarray(src_rows, dtype=np.int64))
        if out is None:
            out = np.empty((len(unit_ids), feats.shape[1]), dtype=np.float32)
            dim_from = path
        elif feats.shape[1] != out.shape[1]:
            raise InputError(f"feature dim {feats.shape[1]} differs from {out.shape[1]} ({dim_from})", file=path,
                             field="dim", expected="one encoder (one feature width) for every sample")
        out[np.asarray(out_rows, dtype=np.int64)] = feats
    assert out is not None
    return out


def check_feature_stores(paths: Mapping[str, str | Path], rows_needed: Mapping[str, int]) -> int:
    """Validate the features stores a batch reader will read per chunk (nothing but shapes is read) and
    return their common width D. ``rows_needed``: sample -> rows the reader will index (max index + 1).

    InputError for a sample without a store (``no cached features for sample ...``), a missing store or
    array, too few rows (``tile index ... out of range``) or samples with different feature widths, as
    :func:`feature_rows`."""
    dim: int | None = None
    dim_from: Path | None = None
    for sample, need in rows_needed.items():
        if sample not in paths:
            raise InputError(f"no cached features for sample '{sample}'", field="features",
                             expected="a features zarr per sample of the cohort")
        path = Path(paths[sample])
        _, arr = _features_array(path)
        n, d = int(arr.shape[0]), int(arr.shape[1])
        if int(need) > n:
            raise InputError(f"tile index {int(need) - 1} out of range ({n} rows)", file=path, field="features",
                             expected="one feature row per tile of tiles.parquet")
        if dim is None:
            dim, dim_from = d, path
        elif d != dim:
            raise InputError(f"feature dim {d} differs from {dim} ({dim_from})", file=path, field="dim",
                             expected="one encoder (one feature width) for every sample")
    if dim is None:
        raise InputError("no tiles to read features for")
    return dim


# --------------------------------------------------------------------------------- unit geometry
@dataclass(frozen=True)
class UnitGeometry:
    """Unit ids and centres of a sample's units (row i = unit i)."""

    barcodes: np.ndarray   # (N,) str
    coords_px: np.ndarray  # (N, 2) float64, level-0 H&E px (NaN where a unit has no H&E position)
    coords_um: np.ndarray  # (N, 2) float64, µm
    source: str = ""
    size_px: float | None = None  # unit side / patch size in level-0 px (tiles), when known

    def __len__(self) -> int:
        return len(self.barcodes)


def geometry_from_obs(obs: Any, spatial_um: np.ndarray | None, source: str = "") -> UnitGeometry:
    """Unit geometry of a unit-table obs: tiles (``x_px, y_px`` top-left + ``size_px``), spots (``x_px,
    y_px`` centres) or cells (``he_x_px, he_y_px``); µm from ``spatial_um`` or ``x_um, y_um``."""
    n = len(obs)
    cols = set(obs.columns)
    px = np.full((n, 2), np.nan)
    size = None
    if {"x_px", "y_px"} <= cols:
        px = obs[["x_px", "y_px"]].to_numpy(np.float64)
        if "size_px" in cols:
            sz = obs["size_px"].to_numpy(np.float64)
            px = px + sz[:, None] / 2.0
            size = float(np.nanmedian(sz)) if n else None
    elif {"he_x_px", "he_y_px"} <= cols:
        px = obs[["he_x_px", "he_y_px"]].to_numpy(np.float64)
    if spatial_um is not None:
        um = np.asarray(spatial_um, np.float64).reshape(n, 2)
    elif {"x_um", "y_um"} <= cols:
        um = obs[["x_um", "y_um"]].to_numpy(np.float64)
    else:
        um = np.full((n, 2), np.nan)
    ids = obs["tile_id"].astype(str).to_numpy() if "tile_id" in cols else np.asarray(obs.index.astype(str))
    return UnitGeometry(np.asarray(ids, dtype=object), px, um, source, size)


def unit_geometry(image_store: str | Path, n: int | None = None) -> UnitGeometry | None:
    """The unit geometry written next to an image (or token) store: ``tiles.parquet`` (fusion tiles, same
    rule as the store) or ``units.h5ad`` (spots, cells, slides: written with or before the store). None
    when neither exists or its row count differs from ``n`` (the store then gets no geometry)."""
    import pandas as pd

    if not str(image_store):
        return None
    d = Path(image_store).parent
    geo = None
    if (d / "tiles.parquet").is_file():
        t = pd.read_parquet(d / "tiles.parquet")
        geo = geometry_from_obs(t, None, str(d / "tiles.parquet"))
    elif (d / "units.h5ad").is_file():
        from morphomol.data.units import read_units

        a = read_units(d / "units.h5ad", backed=True)
        try:
            sp = np.asarray(a.obsm["spatial"]) if "spatial" in a.obsm else None
            geo = geometry_from_obs(a.obs, sp, str(d / "units.h5ad"))
        finally:
            a.file.close()
    if geo is None or (n is not None and len(geo) != n):
        return None
    return geo


def write_unit_geometry(group: Any, geo: UnitGeometry) -> None:
    """``barcodes`` / ``coords_px`` / ``coords_um`` arrays into an open zarr group."""
    n = len(geo)
    rows = max(1, min(n, 1 << 16))
    b = group.create_array(BARCODES, shape=(n,), dtype=str, chunks=(rows,))
    if n:
        b[:] = np.asarray(geo.barcodes, dtype=object)
    for name, arr in ((COORDS_PX, geo.coords_px), (COORDS_UM, geo.coords_um)):
        group.create_array(name, data=np.asarray(arr, np.float64).reshape(n, 2), chunks=(rows, 2))
    if geo.size_px is not None:
        group.attrs["unit_size_px"] = float(geo.size_px)


def read_feature_units(path: str | Path) -> UnitGeometry | None:
    """The unit ids and centres stored with a features store, or None (an older store without them)."""
    g = open_zarr_group(path)
    if BARCODES not in g or COORDS_PX not in g or COORDS_UM not in g:
        return None
    n = int(g[BARCODES].shape[0])
    ids = np.asarray(g[BARCODES][:], dtype=object) if n else np.zeros(0, dtype=object)
    size = g.attrs.get("unit_size_px")
    return UnitGeometry(np.asarray([str(v) for v in ids], dtype=object), np.asarray(g[COORDS_PX][:], np.float64),
                        np.asarray(g[COORDS_UM][:], np.float64), str(g.attrs.get("units_from", "")),
                        float(size) if size is not None else None)


# --------------------------------------------------------------------------------- writing


class FeaturesWriter:
    """Row blocks into an open features group (see :func:`open_features_writer`)."""

    def __init__(self, group: Any, n: int, dim: int, *, chunk_rows: int, n_tokens: int | None = None,
                 token_chunk_rows: int | None = None) -> None:
        self.group = group
        self.n, self.dim = int(n), int(dim)
        self.n_tokens = int(n_tokens) if n_tokens is not None else None
        self.features = group.create_array(FEATURES, shape=(self.n, self.dim), chunks=(int(chunk_rows), self.dim),
                                           dtype="float32")
        self.tokens = None
        self._tokens_direct: Any = None
        if self.n_tokens is not None:
            from morphomol.data.chunks import ChunkFileWriter

            trows = int(token_chunk_rows if token_chunk_rows is not None else chunk_rows)
            # uncompressed (patch tokens barely compress: ~9 % with zstd), whole chunks written
            # straight to their files: the writes keep up with a ViT-L on a GPU
            self.tokens = group.create_array(TOKENS, shape=(self.n, self.n_tokens, self.dim),
                                             chunks=(trows, self.n_tokens, self.dim), dtype="float16",
                                             compressors=None)
            self._tokens_direct = ChunkFileWriter(self.tokens)
        self.finished = False

    def write(self, start: int, stop: int, features: np.ndarray, tokens: np.ndarray | None = None) -> None:
        """Rows ``start:stop`` of ``features`` (and of ``tokens`` when the store has them). Blocks
        of whole chunks may be written from several threads at once (they touch different chunks)."""
        self.features[start:stop] = features
        if self.tokens is not None and tokens is not None:
            d = self._tokens_direct
            if d is not None and d.ok and start % d.C == 0 and (stop % d.C == 0 or stop == self.n):
                for c0 in range(start, stop, d.C):
                    d.write(c0 // d.C, tokens[c0 - start: min(stop, c0 + d.C) - start])
            else:
                self.tokens[start:stop] = tokens

    def finish(self, *, encoder: str, weights_sha256: str, tiles_store: str | Path, pooling: str,
               arch: Mapping[str, Any], precision: str, kind: str, units: UnitGeometry | None = None) -> dict[str, Any]:
        """Write the attrs (``dim``, ``n_tiles``, ``n_tokens`` from the store's shape) and the unit ids and
        centres (``units``; default: :func:`unit_geometry` of ``tiles_store``); returns the attrs."""
        geo = units if units is not None else unit_geometry(tiles_store, self.n)
        attrs = {
            "encoder": encoder,
            "weights_sha256": str(weights_sha256),
            "dim": self.dim,
            "n_tiles": self.n,
            "tiles_store": str(tiles_store),
            "pooling": str(pooling),
            "arch": json_safe(dict(arch)),
            "precision": precision,
            "kind": kind,
            **({"n_tokens": self.n_tokens} if self.n_tokens is not None else {}),
        }
        if geo is not None:
            write_unit_geometry(self.group, geo)
            attrs["units_from"] = geo.source
        self.group.attrs.update(attrs)
        self.finished = True
        return attrs


@contextlib.contextmanager
def open_features_writer(path: str | Path, n: int, dim: int, *, chunk_rows: int, n_tokens: int | None = None,
                         token_chunk_rows: int | None = None) -> Iterator[FeaturesWriter]:
    """A :class:`FeaturesWriter` on a temporary sibling of ``path``, renamed onto ``path`` (an
    existing store is replaced) when the block ends after :meth:`FeaturesWriter.finish`; on any
    exception, or without ``finish``, nothing is left behind and ``path`` is untouched."""
    import zarr

    with atomic_path(Path(path)) as tmp:
        writer = FeaturesWriter(zarr.open_group(str(tmp), mode="w"), n, dim, chunk_rows=chunk_rows,
                                n_tokens=n_tokens, token_chunk_rows=token_chunk_rows)
        yield writer
        if not writer.finished:
            raise RuntimeError(f"features store {path} was not finished (attrs missing)")


def write_features(path: str | Path, features: np.ndarray, *, encoder: str, weights_sha256: str = "unknown",
                   tiles_store: str | Path = "", pooling: str = "", arch: Mapping[str, Any] | None = None,
                   precision: str = "fp32", kind: str = "image", tokens: np.ndarray | None = None,
                   chunk_rows: int | None = None, units: UnitGeometry | None = None) -> Path:
    """Write a whole features store at once (fixtures, tests, re-packing): same layout as the
    features rule's output."""
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    n, dim = feats.shape
    rows = max(1, min(n, int(chunk_rows or n or 1)))
    n_tokens = int(tokens.shape[1]) if tokens is not None else None
    with open_features_writer(path, n, dim, chunk_rows=rows, n_tokens=n_tokens) as w:
        w.write(0, n, feats, None if tokens is None else np.asarray(tokens, dtype=np.float16))
        w.finish(encoder=encoder, weights_sha256=weights_sha256, tiles_store=tiles_store, pooling=pooling,
                 arch=arch or {}, precision=precision, kind=kind, units=units)
    return Path(path)


__all__ = ["open_zarr_group", "read_features", "read_features_attrs", "feature_rows", "check_feature_stores",
           "parse_unit_id", "FeaturesWriter", "open_features_writer", "write_features", "UnitGeometry",
           "geometry_from_obs", "unit_geometry", "write_unit_geometry", "read_feature_units"]
