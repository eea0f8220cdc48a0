"""A cells unit table read in row chunks (torch-free): memory bounded by one chunk, never by the sample.

:class:`UnitRows` opens ``units.h5ad`` with h5py (no AnnData object): the gene names, the value kind
(``uns['morphomol']['values']``), single obs columns (whole or a row range), and the counts ``X`` as CSR
row blocks whose size is bounded by a number of stored entries (:func:`row_blocks`). Every cells job that
reads counts (folds, HVGs, sentences, baselines) goes through :func:`iter_rows`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from morphomol.errors import InputError

#: stored entries (non-zeros) per row block: ~ 1 M x (4 B value + 4 B index) = 8 MB read at a time
NNZ_PER_BLOCK = 1_000_000
#: rows per block at most (dense tables, tables with empty rows)
MAX_BLOCK_ROWS = 65_536


class UnitRows:
    """``units.h5ad`` opened for row-range reads (use as a context manager)."""

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise InputError("unit table not found", file=self.path, expected="units.h5ad written by the pipeline")
        try:
            self.f = h5py.File(self.path, "r")
            x = self.f["X"]
            self._enc = str(x.attrs.get("encoding-type", "array")) if isinstance(x, h5py.Group) else "array"
            if self._enc == "csr_matrix":
                self.shape = tuple(int(v) for v in x.attrs["shape"])
                self.indptr = np.asarray(x["indptr"][()], np.int64)
            elif self._enc == "array":
                self.shape = tuple(int(v) for v in x.shape)
                self.indptr = None
            else:
                raise InputError(f"X is stored as {self._enc}", file=self.path, field="X",
                                 expected="CSR counts (or a dense array), as the cells_units rule writes them")
        except InputError:
            self.close()
            raise
        except Exception as exc:  # h5py raises several types for damaged files
            self.close()
            raise InputError(f"cannot read unit table ({type(exc).__name__}: {exc})", file=self.path) from None

    # ---------------------------------------------------------------- context
    def __enter__(self) -> UnitRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        f = getattr(self, "f", None)
        if f is not None:
            f.close()
            self.f = None

    # ---------------------------------------------------------------- metadata
    @property
    def n_obs(self) -> int:
        return int(self.shape[0])

    def genes(self) -> list[str]:
        var = self.f["var"]
        return [str(g) for g in _column(var, var.attrs["_index"], None, None, self.path)]

    def values(self) -> str:
        """``counts`` | ``normalised`` (``uns['morphomol']['values']``; counts when absent)."""
        try:
            v = self.f["uns/morphomol/values"][()]
        except KeyError:
            return "counts"
        return v.decode() if isinstance(v, bytes) else str(v)

    def obs(self, columns: Sequence[str], lo: int | None = None, hi: int | None = None) -> pd.DataFrame:
        """obs ``columns`` of rows ``lo:hi`` (all rows by default); ``"_index"`` is the unit id."""
        obs = self.f["obs"]
        out = {}
        for c in columns:
            name = obs.attrs["_index"] if c == "_index" else c
            if name not in obs:
                raise InputError(f"no obs column {c!r}", file=self.path, field=f"obs/{c}",
                                 expected="a cells unit table (cells_units rule)")
            out[c] = _column(obs, name, lo, hi, self.path)
        return pd.DataFrame(out)

    # ---------------------------------------------------------------- counts
    def row_blocks(self, nnz_per_block: int = NNZ_PER_BLOCK, max_rows: int = MAX_BLOCK_ROWS) -> list[tuple[int, int]]:
        """Contiguous row ranges covering the table, each holding at most ``nnz_per_block`` stored entries
        (one row more when a single row exceeds it) and ``max_rows`` rows."""
        n = self.n_obs
        if n == 0:
            return []
        if self.indptr is None:
            step = max(1, min(max_rows, nnz_per_block // max(self.shape[1], 1)))
            return [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        out, lo = [], 0
        while lo < n:
            hi = int(np.searchsorted(self.indptr, self.indptr[lo] + nnz_per_block, side="right")) - 1
            hi = min(max(hi, lo + 1), lo + max_rows, n)
            out.append((lo, hi))
            lo = hi
        return out

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        """Rows ``lo:hi`` of X as CSR (the stored dtype)."""
        x = self.f["X"]
        if self.indptr is None:
            return sp.csr_matrix(np.asarray(x[lo:hi]))
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        ptr = self.indptr[lo:hi + 1] - a
        return sp.csr_matrix((x["data"][a:b], x["indices"][a:b], ptr), shape=(hi - lo, self.shape[1]))


def _column(group: Any, name: str, lo: int | None, hi: int | None, path: Path) -> np.ndarray:
    """One obs / var column (rows ``lo:hi``) as a numpy array (strings as objects, categories shared)."""
    import h5py

    el = group[name]
    sl = slice(lo, hi)
    if isinstance(el, h5py.Group):
        enc = str(el.attrs.get("encoding-type", ""))
        if enc == "categorical":
            cats = _strings_or_values(el["categories"], slice(None))
            codes = np.asarray(el["codes"][sl], np.int64)
            out = np.asarray(cats, dtype=object)[np.maximum(codes, 0)]
            if (codes < 0).any():
                out[codes < 0] = None
            return out
        from anndata.io import (
            read_elem,  # nullable arrays and other encodings: read whole, then slice
        )

        v = read_elem(el)
        return np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v)[sl]
    return _strings_or_values(el, sl)


def _strings_or_values(ds: Any, sl: slice) -> np.ndarray:
    if ds.dtype.kind in ("S", "O", "U"):
        return np.asarray(ds.asstr()[sl], dtype=object)
    return np.asarray(ds[sl])


def iter_rows(path: str | Path, rows: np.ndarray | None = None, *, nnz_per_block: int = NNZ_PER_BLOCK
              ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """``(rows, X[rows])`` of one unit table in row blocks, ``rows`` ascending (all rows by default);
    blocks holding none of ``rows`` are not read."""
    with UnitRows(path) as u:
        want = None if rows is None else np.unique(np.asarray(rows, np.int64))
        if want is not None and len(want) and (want[0] < 0 or want[-1] >= u.n_obs):
            raise InputError(f"row {int(want[-1]) if want[-1] >= u.n_obs else int(want[0])} out of range "
                             f"({u.n_obs} units)", file=u.path, field="index", expected="rows of this unit table")
        for lo, hi in u.row_blocks(nnz_per_block):
            if want is None:
                yield np.arange(lo, hi, dtype=np.int64), u.read(lo, hi)
                continue
            a, b = np.searchsorted(want, [lo, hi])
            if a == b:
                continue
            sel = want[a:b]
            X = u.read(lo, hi)
            yield sel, (X if len(sel) == hi - lo else X[sel - lo])
