"""Highly variable genes and cell sentences (the Cell2Sentence convention), and the baselines' features.

* HVGs: chosen on the *training* (fit) cells of a fold only, among the genes every sample measures
  (``seurat_v3`` on counts; ``seurat`` on log-normalised values; all genes when ``n_hvg`` covers them).
* Cell sentence: ``normalize_total`` (to 1e4 over every gene of the cell) + ``log1p``, restricted to the
  HVGs, expressed genes in descending order, ties broken by gene symbol (so the order never depends on
  column order), the top ``K``; joined by single spaces, as Cell2Sentence datasets and checkpoints expect.
  On log-normalised input (``values: normalised``) the values are ranked as they are.
* Baseline features: the same log1p-normalised HVG matrix (logistic regression, kNN).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

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


def select_hvg(X_fit: sp.spmatrix, genes: Sequence[str], n_hvg: int, *, values: str, flavor: str = "auto") -> list[str]:
    """``n_hvg`` highly variable genes of the fit cells (``X_fit``: counts or log-normalised values)."""
    import warnings

    import anndata as ad
    import pandas as pd
    import scanpy as sc

    genes = list(genes)
    if n_hvg >= len(genes):
        log.info("n_hvg %d >= %d genes: every gene is used", n_hvg, len(genes))
        return genes
    flavor = ("seurat_v3" if values == "counts" else "seurat") if flavor == "auto" else flavor
    if flavor == "seurat_v3" and values != "counts":
        raise InputError("seurat_v3 HVGs need raw counts", field="cells.hvg_flavor",
                         expected="auto, seurat or cell_ranger for normalised values")
    a = ad.AnnData(X=sp.csr_matrix(X_fit, dtype=np.float32), var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flavor == "seurat_v3":
            sc.pp.highly_variable_genes(a, n_top_genes=int(n_hvg), flavor="seurat_v3")
        else:
            if values == "counts":
                a.X = log_normalise(a.X, "counts").astype(np.float32)
            sc.pp.highly_variable_genes(a, n_top_genes=int(n_hvg), flavor=flavor)
    return [g for g, h in zip(genes, a.var["highly_variable"].to_numpy(bool), strict=True) if h]


def cell_sentences(X_log: sp.csr_matrix, genes: Sequence[str], k: int) -> list[list[str]]:
    """Top-``k`` expressed genes per row of a log-normalised matrix restricted to the sentence genes,
    descending, ties by gene symbol."""
    X_log = sp.csr_matrix(X_log)
    names = np.asarray(genes, dtype=object)
    name_rank = np.argsort(np.argsort(names.astype(str)))  # rank of each column's symbol
    out = []
    for i in range(X_log.shape[0]):
        lo, hi = X_log.indptr[i], X_log.indptr[i + 1]
        cols, vals = X_log.indices[lo:hi], X_log.data[lo:hi]
        nz = vals > 0
        cols, vals = cols[nz], vals[nz]
        order = np.lexsort((name_rank[cols], -vals))[:k]
        out.append([str(names[c]) for c in cols[order]])
    return out


def hvg_matrix(units: Sequence[str | Path], rows: Sequence[np.ndarray], hvg: Sequence[str], values: str) -> sp.csr_matrix:
    """Log-normalised expression of ``hvg`` for the given rows of each sample's unit table (stacked in
    order): the sentences' and the baselines' input."""
    from morphomol.data.units import read_units

    parts = []
    for path, r in zip(units, rows, strict=True):
        if len(r) == 0:
            continue
        a = read_units(path)
        pos = {str(g): i for i, g in enumerate(a.var_names)}
        missing = [g for g in hvg if g not in pos]
        if missing:
            raise InputError(f"{len(missing)} HVG(s) not in the unit table: {missing[:5]}", file=path, field="var_names")
        X = log_normalise(a.X[np.asarray(r, np.int64)], values)
        parts.append(sp.csr_matrix(X[:, [pos[g] for g in hvg]]))
    return sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, len(hvg)))
