"""Bulk RNA of a slides cohort: reading, checking, matching to the slides, and its preprocessing.

Input (``slides.rna``): a matrix file — ``.tsv``/``.txt``/``.tab`` (tab), ``.csv`` (comma), either
optionally gzipped, with gene or sample labels in the first column; ``.parquet`` (labels in the
index or the first column); ``.h5ad`` (obs = samples, var = genes) — in either orientation
(``auto``: the axis whose labels contain the sheet's sample ids, or ``rna_id`` where the sheet gives
one, holds the samples). Or *pseudo-bulk*: the counts of a spatial cohort's unit tables summed per
sample (``pseudobulk_from``).

Checks, each one clear error naming the file: a sheet sample without a matrix column/row (listed);
duplicate gene symbols or sample ids; non-numeric or missing values; the numbers contradicting the
declared ``value_type`` (negative counts/TPM, non-integer counts, TPM that look logged, "log" values
that are negative or too large to be log2(x+1)).

Preprocessing (written beside the results as ``preprocessing.json`` + ``genes.txt``):

* ``counts`` -> log2(CPM + 1), CPM = counts / library size x 1e6 (gene lengths unknown);
* ``tpm``    -> log2(TPM + 1) as given;
* ``log``    -> used as given (declared to be log2(x + 1) of CPM/TPM).

Then genes expressed (> 0) in fewer than ``min_fraction_expressed`` of the samples are dropped.
``expression.h5ad``: obs = the sheet's samples in sheet order (``patient_id``, ``cohort``,
``rna_id``), var = genes in matrix order, ``X`` = log2 expression (float32), ``uns['preprocessing']``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.rna")

VALUE_TYPES = ("counts", "tpm", "log")
TRANSFORMS = {"counts": "log2(CPM + 1)", "tpm": "log2(TPM + 1)", "log": "as given (log2(x + 1))"}


def read_matrix(path: str | Path) -> pd.DataFrame:
    """The matrix as a DataFrame with string labels on both axes (orientation not yet known)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("RNA matrix not found" + (" (it is a directory)" if p.is_dir() else ""), file=p,
                         field="slides.rna.path", expected="a TSV/CSV/Parquet/h5ad matrix")
    name = p.name.lower().removesuffix(".gz")
    try:
        if name.endswith((".tsv", ".txt", ".tab", ".csv")):
            df = _read_text_matrix(p, "," if name.endswith(".csv") else "\t")
        elif name.endswith(".parquet"):
            df = pd.read_parquet(p)
            if isinstance(df.index, pd.RangeIndex) and df.shape[1] and not pd.api.types.is_numeric_dtype(df.iloc[:, 0]):
                df = df.set_index(df.columns[0])
        elif name.endswith(".h5ad"):
            import anndata as ad

            a = ad.read_h5ad(p)
            X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
            df = pd.DataFrame(X, index=a.obs_names.astype(str), columns=a.var_names.astype(str))
        else:
            raise InputError(f"unknown matrix format '{p.suffix}'", file=p, field="slides.rna.path",
                             expected=".tsv, .txt, .tab, .csv (optionally .gz), .parquet or .h5ad")
    except InputError:
        raise
    except Exception as exc:  # pandas / pyarrow / h5py raise many types for malformed files
        raise InputError(f"cannot read the RNA matrix ({type(exc).__name__}: {exc})", file=p,
                         field="slides.rna.path") from None
    df.index = df.index.astype(str).str.strip()
    df.columns = pd.Index([str(c).strip() for c in df.columns])
    return df


def _header(p: Path, sep: str) -> tuple[list[str], int]:
    """(the labels of the first line as written, the fields of the second line). pandas renames repeated
    column labels (``AARS``, ``AARS.1``): duplicates must stay visible to be refused."""
    import csv
    import gzip

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rt", newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh, delimiter=sep)
        labels = [c.strip() for c in next(rows, [])]
        return labels, len(next(rows, labels))


def _read_text_matrix(p: Path, sep: str) -> pd.DataFrame:
    """A delimited matrix with labels in the first column, numbers parsed as float32 (half the memory of
    float64; counts are exact up to 2**24); a file with non-numeric cells is read as it is (the caller
    reports them). Column labels are the header's as written (repeated labels kept, not renamed)."""
    labels, n_fields = _header(p, sep)
    if len(labels) < 2:
        return pd.read_csv(p, sep=sep, index_col=0)
    # columns by position: the header's labels are set afterwards, so that repeated labels stay repeated
    dtype: dict[Any, Any] = {i: np.float32 for i in range(1, max(n_fields, 2))}
    dtype[0] = str
    try:
        df = pd.read_csv(p, sep=sep, header=None, skiprows=1, index_col=0, dtype=dtype)
    except (ValueError, TypeError):
        df = pd.read_csv(p, sep=sep, header=None, skiprows=1, index_col=0)
    if df.shape[1] == len(labels) - 1:
        df.columns = pd.Index(labels[1:])
        df.index.name = labels[0] or None
    elif df.shape[1] == len(labels):  # a header without a label for the first column (R's write.table)
        df.columns = pd.Index(labels)
        df.index.name = None
    else:
        raise InputError(f"the header has {len(labels)} labels but the rows have {df.shape[1] + 1} fields", file=p,
                         field="slides.rna.path", expected="one label per column on the first line")
    return df


def orient(df: pd.DataFrame, rna_ids: Sequence[str], orientation: str, *, file: object = None) -> tuple[pd.DataFrame, str]:
    """(samples x genes, the orientation found). ``auto`` picks the axis holding more of ``rna_ids``."""
    ids = set(rna_ids)
    in_cols, in_rows = len(ids & set(df.columns)), len(ids & set(df.index))
    if orientation == "auto":
        if in_cols == 0 and in_rows == 0:
            raise InputError(f"none of the {len(ids)} sample ids of the sheet (e.g. {', '.join(sorted(ids)[:3])}) is a "
                             f"row or column label of the RNA matrix (rows e.g. {', '.join(map(str, df.index[:3]))}; "
                             f"columns e.g. {', '.join(map(str, df.columns[:3]))})", file=file, field="slides.rna.path",
                             expected="sample ids (or the sheet's rna_id) as the labels of one axis")
        orientation = "genes_x_samples" if in_cols >= in_rows else "samples_x_genes"
    out = df.T if orientation == "genes_x_samples" else df
    return out, orientation


def check_values(X: np.ndarray, value_type: str, genes: Sequence[str], samples: Sequence[str], *,
                 file: object = None, chunk_rows: int = 128) -> None:
    """Raise when the numbers contradict the declared value type (the first offending cell, in row-major
    order, is named). Checked in blocks of ``chunk_rows`` samples (temporaries of one block only)."""
    field, where = "slides.rna.value_type", lambda i, j: f"gene {genes[j]}, sample {samples[i]}"
    blocks = [(a, X[a:a + chunk_rows]) for a in range(0, len(X), chunk_rows)]

    def first(test: Any) -> tuple[int, int, int] | None:
        """(row, column, cells in all) of the first cell where ``test(block)`` holds, or None."""
        hit, total = None, 0
        for a, b in blocks:
            m = test(b)
            c = int(np.count_nonzero(m))
            if c and hit is None:
                i, j = np.argwhere(m)[0]
                hit = (a + int(i), int(j))
            total += c
        return None if hit is None else (*hit, total)

    bad = first(lambda b: ~np.isfinite(b))
    if bad:
        raise InputError(f"missing or non-finite value at {where(bad[0], bad[1])}", file=file, field="slides.rna.path",
                         expected="a number in every cell")
    if value_type in ("counts", "tpm"):
        bad = first(lambda b: b < 0)
        if bad:
            i, j, _ = bad
            raise InputError(f"negative value {X[i, j]:g} at {where(i, j)} but value_type is '{value_type}'", file=file,
                             field=field, expected="non-negative counts/TPM (or value_type: log for logged data)")
    if value_type == "counts":
        bad = first(lambda b: np.abs(b - np.round(b)) > 1e-6)
        if bad:
            i, j, n = bad
            raise InputError(f"non-integer value {X[i, j]:g} at {where(i, j)} ({n} cells) but value_type "
                             "is 'counts'", file=file, field=field, expected="integer counts, or value_type tpm / log")
    vmax = max((float(b.max()) for _, b in blocks if b.size), default=0.0)
    if value_type == "tpm" and X.size and vmax <= 30:
        frac = sum(int(np.count_nonzero(np.abs(b - np.round(b)) > 1e-6)) for _, b in blocks) / X.size
        if frac > 0.5:
            raise InputError(f"values look log-transformed (maximum {vmax:.3g}) but value_type is 'tpm'", file=file,
                             field=field, expected="TPM on the linear scale, or value_type: log")
    if value_type == "log":
        bad = first(lambda b: b < -1e-6)
        if bad:
            i, j, _ = bad
            raise InputError(f"negative value {X[i, j]:g} at {where(i, j)} but value_type 'log' means log2(x + 1)",
                             file=file, field=field, expected="log2(CPM/TPM + 1) >= 0 (not z-scores), or counts / tpm")
        if X.size and vmax > 40:
            raise InputError(f"values up to {vmax:.4g} are not on a log2(x + 1) scale but value_type is 'log'",
                             file=file, field=field, expected="value_type counts or tpm for linear-scale data")


def to_log2(X: np.ndarray, value_type: str) -> np.ndarray:
    """log2 expression (float64) of checked values of a value type (see the module doc). Rows (samples) are
    transformed independently (counts: each by its own library size)."""
    X = np.asarray(X, np.float64)
    if value_type == "counts":
        lib = X.sum(axis=1, keepdims=True)
        return np.log2(X / np.maximum(lib, 1.0) * 1e6 + 1.0)
    if value_type == "tpm":
        return np.log2(X + 1.0)
    return X


def to_log2_float32(X: np.ndarray, value_type: str, *, chunk_rows: int = 128) -> np.ndarray:
    """:func:`to_log2` in blocks of samples, computed in float64 and stored as float32 (the values written to
    ``expression.h5ad``): one float32 copy of the matrix plus one block of float64 temporaries."""
    out = np.empty(X.shape, np.float32)
    for a in range(0, len(X), chunk_rows):
        out[a:a + chunk_rows] = to_log2(X[a:a + chunk_rows], value_type)
    return out


def match_samples(mat: pd.DataFrame, sheet: pd.DataFrame, *, file: object = None) -> pd.DataFrame:
    """Rows of ``mat`` (samples x genes) in sheet order, indexed by sample_id; unmatched / duplicates are errors."""
    rna_ids = [str(r) for r in sheet["rna_id"]]
    if mat.index.duplicated().any():
        dup = sorted(set(mat.index[mat.index.duplicated()]))
        raise InputError(f"duplicate sample id(s) in the RNA matrix: {', '.join(dup[:10])}", file=file,
                         field="slides.rna.path", expected="one column (or row) per sample")
    if mat.columns.duplicated().any():
        dup = sorted(set(mat.columns[mat.columns.duplicated()]))
        raise InputError(f"{len(dup)} duplicate gene symbol(s) in the RNA matrix: {', '.join(dup[:10])}"
                         f"{' ...' if len(dup) > 10 else ''}", file=file, field="gene",
                         expected="unique gene symbols (aggregate duplicates first)")
    missing = [s for s, r in zip(sheet["sample_id"], rna_ids, strict=True) if r not in mat.index]
    if missing:
        raise InputError(f"{len(missing)} slide(s) of the sample sheet have no RNA profile: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}", file=file, field="slides.rna.path",
                         expected="a column (or row) for every sample_id (or rna_id) of the sheet")
    extra = len(set(mat.index) - set(rna_ids))
    if extra:
        log.info("RNA matrix: %d sample(s) not in the sheet are ignored", extra)
    out = mat.loc[rna_ids]
    out.index = pd.Index([str(s) for s in sheet["sample_id"]], name="sample_id")
    return out


def pseudobulk(units: Sequence[str | Path], samples: Sequence[str]) -> pd.DataFrame:
    """Counts summed over each unit table (samples x genes); every table must have the same genes."""
    from morphomol.data.units import read_units

    rows, genes = [], None
    for path, s in zip(units, samples, strict=True):
        a = read_units(path)
        g = [str(x) for x in a.var_names]
        if genes is None:
            genes = g
        elif g != genes:
            raise InputError(f"sample {s}: genes differ from the first sample's ({len(g)} vs {len(genes)})", file=path,
                             field="var_names", expected="the same genes in every unit table of the spatial cohort")
        rows.append(np.asarray(a.X.sum(axis=0)).ravel())
    return pd.DataFrame(np.vstack(rows), index=pd.Index([str(s) for s in samples]), columns=genes)


def prepare_rna(*, sheet: Sequence[Mapping[str, Any]], out_expression: str | Path, out_preprocessing: str | Path,
                out_genes: str | Path, cfg: Any, matrix: str | Path | None = None,
                units: Sequence[str | Path] | None = None, unit_samples: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``slides_rna`` rule: read ``matrix`` (or sum the spatial cohort's ``units``), check it, match it
    to the sheet, transform to log2 expression and write ``expression.h5ad``, ``preprocessing.json`` and
    ``genes.txt``. ``sheet``: rows with sample_id, patient_id, cohort, rna_id (optional)."""
    import anndata as ad

    from morphomol.util.atomic import atomic_path
    from morphomol.util.hashing import sha256_path
    from morphomol.util.jsonio import write_json

    df = pd.DataFrame(list(sheet))
    df["rna_id"] = [r.get("rna_id") or r["sample_id"] for r in df.to_dict("records")]
    if matrix is not None:
        file: Any = matrix
        raw, orientation = orient(read_matrix(matrix), list(df["rna_id"]), cfg.orientation, file=matrix)
        source = {"path": str(matrix), "sha256": sha256_path(matrix), "orientation": orientation}
        value_type = cfg.value_type
    else:
        if not units:
            raise InputError("no RNA source", field="slides.rna", expected="slides.rna.path or slides.rna.pseudobulk_from")
        file = units[0]
        raw = pseudobulk(units, list(unit_samples or []))
        source = {"pseudobulk_from": [str(u) for u in units], "orientation": "samples_x_genes"}
        value_type = "counts"
    mat = match_samples(raw, df, file=file)
    del raw
    try:
        X = mat.to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        bad = [c for c in mat.columns if not pd.api.types.is_numeric_dtype(mat[c])][:5]
        raise InputError(f"non-numeric values in the RNA matrix (genes {', '.join(map(str, bad))})", file=file,
                         field="slides.rna.path", expected="numbers only, labels on the first row / column") from None
    genes, samples = [str(g) for g in mat.columns], list(mat.index)
    del mat
    check_values(X, value_type, genes, samples, file=file)
    n_expr = np.zeros(X.shape[1], np.int64)
    for a in range(0, len(X), 128):
        n_expr += np.count_nonzero(X[a:a + 128] > 0, axis=0)
    expressed = n_expr / max(len(X), 1) >= cfg.min_fraction_expressed
    if not expressed.any():
        raise InputError("no gene passes slides.rna.min_fraction_expressed", file=file,
                         field="slides.rna.min_fraction_expressed", expected="a smaller fraction")
    L = to_log2_float32(X, value_type)
    del X
    if not expressed.all():
        L, genes = L[:, expressed], [g for g, k in zip(genes, expressed, strict=True) if k]
    prep = {**source, "value_type": value_type, "transform": TRANSFORMS[value_type],
            "min_fraction_expressed": cfg.min_fraction_expressed, "n_genes_input": int(len(expressed)),
            "n_genes": len(genes), "n_samples": len(samples), "gene_order": "genes.txt (the columns of X, in order)"}
    obs = pd.DataFrame({"patient_id": df["patient_id"].astype(str).to_numpy(), "cohort": df["cohort"].astype(str).to_numpy(),
                        "rna_id": df["rna_id"].astype(str).to_numpy()}, index=pd.Index(samples, name="sample_id"))
    a = ad.AnnData(X=L, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    a.uns["preprocessing"] = {k: (v if not isinstance(v, list) else [str(x) for x in v]) for k, v in prep.items()}
    with atomic_path(out_expression) as tmp:
        a.write_h5ad(tmp)
    with atomic_path(out_genes) as tmp:
        tmp.write_text("\n".join(genes) + "\n")
    write_json(out_preprocessing, prep)
    log.info("RNA: %d samples x %d genes (%s, %s; %d genes dropped as rarely expressed)", len(samples), len(genes),
             value_type, TRANSFORMS[value_type], int((~expressed).sum()))
    return pd.DataFrame(L, index=samples, columns=genes)


def read_expression(path: str | Path) -> pd.DataFrame:
    """samples x genes log2 expression of ``expression.h5ad`` (sheet order, genes in file order), in memory
    (float64; small cohorts and tests — jobs read it through :class:`ExpressionMatrix`)."""
    m = ExpressionMatrix(path)
    return pd.DataFrame(m.read(np.arange(m.n_samples)), index=pd.Index(m.samples), columns=pd.Index(m.genes))


class ExpressionMatrix:
    """``expression.h5ad`` read by rows (samples) without loading the matrix: ``samples``, ``genes``, ``obs``
    (sample metadata) in memory; ``X`` (N x G float32) read in blocks of ``chunk_rows`` samples and returned as
    float64 (the values as stored). :meth:`row_stats` gives gene means / variances over any rows with exactly
    the arithmetic of ``L[rows].mean(axis=0)`` / ``.var(axis=0)`` (rows added one after the other in the given
    order), so streamed and in-memory fits agree to the last bit."""

    def __init__(self, path: str | Path, chunk_rows: int = 32) -> None:
        import anndata as ad
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise InputError("expression table not found", file=self.path, expected="expression.h5ad of the slides_rna rule")
        a = ad.read_h5ad(self.path, backed="r")
        try:
            self.obs = a.obs.copy()
            self.samples = [str(s) for s in a.obs_names]
            self.genes = [str(g) for g in a.var_names]
        finally:
            a.file.close()
        with h5py.File(self.path, "r") as f:
            x = f.get("X")
            if not isinstance(x, h5py.Dataset) or x.ndim != 2:
                raise InputError("X is not a dense matrix", file=self.path, field="X",
                                 expected="expression.h5ad written by the slides_rna rule (dense float32 X)")
            shape = tuple(int(v) for v in x.shape)
        if shape != (len(self.samples), len(self.genes)):
            raise InputError(f"X has shape {shape} for {len(self.samples)} samples x {len(self.genes)} genes",
                             file=self.path, field="X")
        self.chunk_rows = max(1, int(chunk_rows))

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    def blocks(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None
               ) -> Any:
        """Yields ``(positions, block)``: ``block`` = float64 values of ``rows[positions]`` (all rows when None;
        in the given order) and ``cols`` (all genes when None), ``chunk_rows`` rows at a time."""
        import h5py

        rows = np.arange(self.n_samples) if rows is None else np.asarray(rows, np.int64)
        with h5py.File(self.path, "r") as f:
            X = f["X"]
            for a in range(0, len(rows), self.chunk_rows):
                want = rows[a:a + self.chunk_rows]
                uniq, inv = np.unique(want, return_inverse=True)
                lo, hi = int(uniq[0]), int(uniq[-1]) + 1
                if hi - lo <= 2 * len(uniq):
                    block = X[lo:hi][uniq - lo]
                else:
                    block = X[uniq.tolist()]
                block = np.asarray(block, np.float64)
                if cols is not None:
                    block = block[:, np.asarray(cols, np.int64)]
                yield np.arange(a, a + len(want)), block[inv]

    def read(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), len(cols) or G) float64, rows in the given order."""
        rows = np.asarray(rows, np.int64)
        n_cols = len(self.genes) if cols is None else len(cols)
        out = np.empty((len(rows), n_cols), np.float64)
        for pos, block in self.blocks(rows, cols):
            out[pos] = block
        return out

    def row_stats(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, population variance) per gene over ``rows`` (two streamed passes)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            raise InputError("no samples to compute gene statistics over", file=self.path, expected="at least one")
        acc = np.zeros(len(self.genes))
        for _, block in self.blocks(rows):
            for r in block:
                acc += r
        mean = acc / len(rows)
        acc = np.zeros(len(self.genes))
        for _, block in self.blocks(rows):
            for r in block:
                d = r - mean
                acc += d * d
        return mean, acc / len(rows)
