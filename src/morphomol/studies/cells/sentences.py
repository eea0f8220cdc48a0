"""Highly variable genes and cell sentences (the Cell2Sentence convention), and the baselines' features.

* HVGs: chosen on the *training* (fit) cells of a fold only, among the genes every sample measures
  (``seurat_v3`` on counts; ``seurat`` on log-normalised values; all genes when ``n_hvg`` covers them).
  Computed from per-gene sums accumulated over row blocks (:func:`select_hvg_blocks`: memory O(genes), two
  passes for ``seurat_v3``), with scanpy's arithmetic (``sc.pp.highly_variable_genes``: same means,
  variances, loess fit, clipping and ranking), so the genes equal scanpy's on the same cells.
* Cell sentence: ``normalize_total`` (to 1e4 over every gene of the cell) + ``log1p``, restricted to the
  HVGs, expressed genes in descending order, ties broken by gene symbol (so the order never depends on
  column order), the top ``K``; joined by single spaces, as Cell2Sentence datasets and checkpoints expect.
  On log-normalised input (``values: normalised``) the values are ranked as they are. Built for a whole
  row block at once (:func:`top_genes`, :func:`sentence_strings`): no loop over cells.
* Baseline features: the same log1p-normalised HVG matrix (logistic regression, kNN), read in row blocks
  (:func:`iter_hvg_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.util.logs import get_logger
from morphomol.util.numba import njit_kernels, numba_module

log = get_logger("cells.sentences")

TARGET_SUM = 1e4


def common_genes(gene_lists: Sequence[Sequence[str]]) -> list[str]:
    """Genes measured in every sample, in the first sample's order."""
    shared = set(gene_lists[0])
    for g in gene_lists[1:]:
        shared &= set(g)
    return [g for g in gene_lists[0] if g in shared]


def log_normalise(X: sp.spmatrix, values: str) -> sp.csr_matrix:
    """normalize_total(1e4) + log1p of counts (every gene of the cell); normalised values unchanged."""
    X = sp.csr_matrix(X, dtype=np.float64)
    if values == "normalised":
        return X
    totals = np.asarray(X.sum(1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale) @ X)
    out.data = np.log1p(out.data)
    return out


# ------------------------------------------------------------------------------ HVGs
def _build_kernels() -> dict[str, Any]:
    nb = numba_module()

    @nb.njit(cache=True, nogil=True)
    def add_sums(data, indices, s, sq):  # scanpy's sparse_mean_var_minor_axis, in row order
        for j in range(data.shape[0]):
            c = indices[j]
            v = data[j]
            s[c] += v
            sq[c] += v * v

    @nb.njit(cache=True, nogil=True)
    def add_clipped(data, indices, clip, s, sq):  # scanpy's _sum_and_sum_squares_clipped
        for j in range(data.shape[0]):
            c = indices[j]
            e = min(np.float64(data[j]), clip[c])
            sq[c] += e ** 2
            s[c] += e

    return {"add_sums": add_sums, "add_clipped": add_clipped}


def _kernels() -> dict[str, Any]:
    return njit_kernels("cells.hvg", _build_kernels)


def hvg_flavor(values: str, flavor: str = "auto") -> str:
    flavor = ("seurat_v3" if values == "counts" else "seurat") if flavor == "auto" else flavor
    if flavor == "seurat_v3" and values != "counts":
        raise InputError("seurat_v3 HVGs need raw counts", field="cells.hvg_flavor",
                         expected="auto, seurat or cell_ranger for normalised values")
    return flavor


def _hvg_input(X: sp.spmatrix, values: str, flavor: str) -> sp.csr_matrix:
    """What scanpy's flavour sees of a block of fit cells (float32 CSR, as the in-memory call did)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    if flavor == "seurat_v3":
        return X
    if values == "counts":
        X = log_normalise(X, "counts").astype(np.float32)
    if flavor == "seurat":
        X = X.copy()
        X.data = np.expm1(X.data)
    return X


def _mean_var(blocks: Iterable[sp.csr_matrix], n_genes: int) -> tuple[int, np.ndarray, np.ndarray]:
    k = _kernels()["add_sums"]
    s, sq, n = np.zeros(n_genes), np.zeros(n_genes), 0
    for X in blocks:
        k(X.data, X.indices, s, sq)
        n += X.shape[0]
    if n < 2:
        raise InputError(f"{n} training cell(s): HVGs need at least two", field="partition",
                         expected="a fold with at least two fit cells")
    mean = s / n
    var = sq / n - (s / n) ** 2
    var *= n / (n - 1)
    return n, mean, var


def select_hvg_blocks(blocks: Callable[[], Iterable[sp.spmatrix]], genes: Sequence[str], n_hvg: int, *, values: str,
                      flavor: str = "auto", span: float = 0.3) -> list[str]:
    """``n_hvg`` highly variable genes (in ``genes`` order) of the fit cells that ``blocks()`` yields as row
    blocks over ``genes`` (counts or log-normalised values); called once per pass (``seurat_v3``: two)."""
    genes = list(genes)
    if n_hvg >= len(genes):
        log.info("n_hvg %d >= %d genes: every gene is used", n_hvg, len(genes))
        return genes
    flavor = hvg_flavor(values, flavor)
    if flavor not in ("seurat_v3", "seurat", "cell_ranger"):
        raise InputError(f"unknown HVG flavour {flavor!r}", field="cells.hvg_flavor",
                         expected="auto, seurat_v3, seurat or cell_ranger")
    G = len(genes)
    n, mean, var = _mean_var((_hvg_input(X, values, flavor) for X in blocks()), G)
    if flavor == "seurat_v3":
        hv = _seurat_v3(blocks, values, n, mean, var, int(n_hvg), span)
    else:
        hv = _dispersion_hvg(mean, var, int(n_hvg), flavor)
    return [g for g, h in zip(genes, hv, strict=True) if h]


def _seurat_v3(blocks: Callable[[], Iterable[sp.spmatrix]], values: str, n: int, mean: np.ndarray, var: np.ndarray,
               n_top: int, span: float) -> np.ndarray:
    from skmisc.loess import loess

    not_const = var > 0
    estimat_var = np.zeros(len(mean), dtype=np.float64)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    estimat_var[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10 ** estimat_var)
    clip_val = reg_std * np.sqrt(n) + mean
    k = _kernels()["add_clipped"]
    s, sq = np.zeros(len(mean)), np.zeros(len(mean))
    for X in blocks():
        X = _hvg_input(X, values, "seurat_v3")
        k(X.data, X.indices, clip_val, s, sq)
    norm_gene_var = (1 / ((n - 1) * np.square(reg_std))) * ((n * np.square(mean)) + sq - 2 * s * mean)
    ranked = np.argsort(np.argsort(-norm_gene_var.reshape(1, -1), axis=1), axis=1)[0]
    return ranked < n_top


def _dispersion_hvg(mean: np.ndarray, var: np.ndarray, n_top: int, flavor: str) -> np.ndarray:
    """scanpy's ``seurat`` / ``cell_ranger`` flavours (one batch, ``n_top_genes``) from per-gene mean and var."""
    import pandas as pd

    mean = mean.copy()
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    if flavor == "seurat":
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
        mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    bins: Any = 20 if flavor == "seurat" else np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
    df["mean_bin"] = pd.cut(df["means"], bins=bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        one = stats["dev"].isnull()
        stats.loc[one, "dev"] = stats.loc[one, "avg"]
        stats.loc[one, "avg"] = 0
    else:
        stats = grouped.agg(avg="median", dev=_mad)
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy(np.float64)
    x = norm[~np.isnan(norm)]
    x[::-1].sort()
    cutoff = x[min(n_top, x.size) - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cutoff


def _mad(a: Any) -> float:
    """statsmodels' ``robust.mad`` (normal-consistent median absolute deviation), as scanpy's cell_ranger."""
    from scipy.stats import norm

    a = np.asarray(a, dtype=np.float64)
    return float(np.median(np.abs(a - np.median(a)) / norm.ppf(0.75)))


def select_hvg(X_fit: sp.spmatrix, genes: Sequence[str], n_hvg: int, *, values: str, flavor: str = "auto") -> list[str]:
    """``n_hvg`` highly variable genes of the fit cells (``X_fit``: counts or log-normalised values)."""
    X = sp.csr_matrix(X_fit)
    return select_hvg_blocks(lambda: [X], genes, n_hvg, values=values, flavor=flavor)


# ------------------------------------------------------------------------------ sentences
def top_genes(X_log: sp.spmatrix, names: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` expressed columns per row of ``X_log`` (descending value, ties by ``names``), for all rows at
    once: ``(offsets (n + 1,), columns)`` in CSR layout."""
    X = sp.csr_matrix(X_log)
    n = X.shape[0]
    name_rank = np.argsort(np.argsort(np.asarray(names, dtype=object).astype(str), kind="stable"), kind="stable")
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(X.indptr))
    pos = X.data > 0
    rows, cols, vals = rows[pos], X.indices[pos], X.data[pos]
    order = np.lexsort((name_rank[cols], -vals, rows))
    rows, cols = rows[order], cols[order]
    per_row = np.bincount(rows, minlength=n)
    start = np.zeros(n, np.int64)
    np.cumsum(per_row[:-1], out=start[1:])
    keep = (np.arange(len(rows)) - start[rows]) < int(k)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.minimum(per_row, int(k)), out=offsets[1:])
    return offsets, cols[keep].astype(np.int64)


def sentence_strings(X_log: sp.spmatrix, genes: Sequence[str], k: int) -> tuple[Any, np.ndarray]:
    """(cell sentences as a pyarrow string array, genes per sentence) of every row of ``X_log``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    offsets, cols = top_genes(X_log, genes, k)
    words = pa.array([str(g) for g in genes], pa.string()).take(pa.array(cols, pa.int64()))
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()), words) if len(offsets) > 1 else \
        pa.array([], pa.list_(pa.string()))
    return pc.binary_join(lists, " "), np.diff(offsets).astype(np.int32)


def cell_sentences(X_log: sp.csr_matrix, genes: Sequence[str], k: int) -> list[list[str]]:
    """Top-``k`` expressed genes per row of a log-normalised matrix restricted to the sentence genes,
    descending, ties by gene symbol."""
    offsets, cols = top_genes(X_log, genes, k)
    names = np.asarray([str(g) for g in genes], dtype=object)[cols].tolist()
    return [names[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


# ------------------------------------------------------------------------------ the HVG matrix
def column_map(genes: Sequence[str], wanted: Sequence[str], *, file: object = None) -> np.ndarray:
    """Column of each ``wanted`` gene in ``genes`` (InputError naming the first missing ones)."""
    pos = {str(g): i for i, g in enumerate(genes)}
    missing = [g for g in wanted if g not in pos]
    if missing:
        raise InputError(f"{len(missing)} HVG(s) not in the unit table: {missing[:5]}", file=file, field="var_names")
    return np.asarray([pos[g] for g in wanted], np.int64)


def iter_hvg_rows(units: Sequence[str | Path], rows: Sequence[np.ndarray | None], hvg: Sequence[str], values: str
                  ) -> Iterator[tuple[int, np.ndarray, sp.csr_matrix]]:
    """``(sample position, rows, log-normalised HVG values)`` in row blocks of each sample's unit table:
    ``rows`` ascending (each sample's requested rows; ``None`` = all)."""
    from morphomol.studies.cells.matrix import UnitRows, iter_rows

    for i, (path, r) in enumerate(zip(units, rows, strict=True)):
        if r is not None and len(r) == 0:
            continue
        with UnitRows(path) as u:
            cols = column_map(u.genes(), hvg, file=path)
        for got, X in iter_rows(path, r):
            yield i, got, sp.csr_matrix(log_normalise(X, values)[:, cols])
