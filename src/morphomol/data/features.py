"""Frozen-feature stores (``features/{encoder}/{sample}.zarr``): the one reader and writer.

Layout (a zarr v3 group), row ``i`` = tile ``i`` of the sample (unit ``{sample}__{i:06d}``):

* ``features`` (N, D) float32;
* ``tokens`` (N, T, D) float16, optional (patch tokens);
* attrs ``encoder``, ``weights_sha256`` (or ``random-init:seed=N``), ``dim``, ``n_tiles``,
  ``tiles_store``, ``pooling``, ``arch`` (geometry), ``precision``, ``kind`` and, with tokens,
  ``n_tokens``.

Written by :func:`morphomol.features.extract_features` through :func:`open_features_writer`
(a temporary sibling renamed on success, so a failed job leaves nothing behind); read by
training, the ridge baseline and tests through :func:`read_features` / :func:`feature_rows`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import json_safe

FEATURES = "features"
TOKENS = "tokens"


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
               arch: Mapping[str, Any], precision: str, kind: str) -> dict[str, Any]:
        """Write the attrs (``dim``, ``n_tiles``, ``n_tokens`` from the store's shape); returns them."""
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
                   chunk_rows: int | None = None) -> Path:
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
                 arch=arch or {}, precision=precision, kind=kind)
    return Path(path)


__all__ = ["open_zarr_group", "read_features", "read_features_attrs", "feature_rows", "parse_unit_id",
           "FeaturesWriter", "open_features_writer", "write_features"]
