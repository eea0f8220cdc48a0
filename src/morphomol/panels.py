"""Core / add-on gene panels per fold: from the cohort's panel YAML, or HVG targets.

HVG mode (``panels.mode: hvg``): Seurat v3 highly variable genes (scanpy's ``flavor="seurat_v3"``,
``batch_key="sample"``, ``n_top_genes=n_hvg_targets``) computed on the fold's *fit* tiles only (every
tile of the fold's fit samples: partitions are per sample, ``splits/folds.parquet``); targets (add-on) =
the HVGs, core = every other gene measured in all samples.

The rule's computation is streamed (:func:`seurat_v3_streamed`): per sample (scanpy's batch), the unit
table's counts are read in row chunks (backed CSR) twice — per-gene sums and sums of squares (mean,
variance), the loess fit of log variance on log mean, then the sums of the clipped counts — so a job
holds one chunk and O(genes) per sample (the per-sample ranks: samples x genes), never the tiles. The
result equals scanpy's (same formulas on exact float64 sums of integer counts; tested). The loess is
scikit-misc's (scanpy's) when installed, otherwise an exact local-quadratic loess (span 0.3, tricube).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.config.sections import PanelsConfig
from morphomol.errors import InputError
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("panels")


def loess_fit(x: np.ndarray, y: np.ndarray, span: float = 0.3) -> np.ndarray:
    """Exact loess (degree 2, tricube weights) evaluated at the data points."""
    n = len(x)
    if n < 4:
        return np.full(n, y.mean()) if n else y.copy()
    q = max(4, int(np.floor(span * n)))
    q = min(q, n)
    fitted = np.empty(n)
    X = np.stack([np.ones(n), x, x * x], axis=1)
    for i in range(n):
        d = np.abs(x - x[i])
        idx = np.argpartition(d, q - 1)[:q]
        dmax = d[idx].max()
        if dmax <= 0:
            fitted[i] = y[idx].mean()
            continue
        w = (1 - (d[idx] / (dmax * 1.0000001)) ** 3) ** 3
        A = X[idx] * w[:, None]
        beta, *_ = np.linalg.lstsq(A.T @ X[idx], A.T @ y[idx], rcond=None)
        fitted[i] = X[i] @ beta
    return fitted


def _norm_gene_var(X: Any) -> np.ndarray:
    """Seurat v3 standardized variance of each gene of one batch (cells x genes counts)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, np.float64))
    N = X.shape[0]
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    var = (sq - mean ** 2) * N / max(N - 1, 1)
    est = np.zeros_like(var)
    nc = var > 0
    if nc.sum():
        est[nc] = 10 ** loess_fit(np.log10(mean[nc]), np.log10(var[nc]))
    reg_std = np.sqrt(est)
    clip = reg_std * np.sqrt(N) + mean
    Xc = X.tocsc(copy=True)
    for g in range(X.shape[1]):
        a, b = Xc.indptr[g], Xc.indptr[g + 1]
        np.minimum(Xc.data[a:b], clip[g], out=Xc.data[a:b])
    s1 = np.asarray(Xc.sum(axis=0)).ravel()
    s2 = np.asarray(Xc.multiply(Xc).sum(axis=0)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (N * mean ** 2 + s2 - 2 * mean * s1) / ((N - 1) * reg_std ** 2)
    return np.where(reg_std > 0, v, 0.0)


def hvg_seurat_v3(adata: Any, n_top: int, batch_key: str = "sample") -> list[str]:
    """Top ``n_top`` genes by Seurat v3 (scanpy's ranking: median within-batch rank, then
    number of batches where the gene is highly variable)."""
    try:
        import scanpy as sc
        import skmisc.loess  # noqa: F401

        df = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key,
                                         inplace=False)
        df.index = adata.var_names
        return list(df.index[df["highly_variable"].to_numpy(bool)])
    except ImportError:
        pass
    batches = pd.Categorical(adata.obs[batch_key].astype(str))
    vars_ = []
    for b in batches.categories:
        sel = np.asarray(batches == b)
        vars_.append(_norm_gene_var(adata.X[sel]))
    nv = np.vstack(vars_)
    ranked = np.argsort(np.argsort(-nv, axis=1), axis=1).astype(float)
    nb = (ranked < n_top).sum(axis=0)
    ranked[ranked >= n_top] = np.nan
    with np.errstate(all="ignore"):
        med = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame({"rank": med, "nb": nb, "order": np.arange(len(med))}, index=adata.var_names)
    df = df.sort_values(["rank", "nb", "order"], ascending=[True, False, True], na_position="last")
    return list(df.index[:n_top])


def _loess_log(mean: np.ndarray, var: np.ndarray, span: float = 0.3) -> np.ndarray:
    """Fitted log10 variance of the non-constant genes (scanpy: ``skmisc.loess(x, y, span, degree=2)``)."""
    x, y = np.log10(mean), np.log10(var)
    try:
        from skmisc.loess import loess
    except ImportError:
        return loess_fit(x, y, span)
    model = loess(x, y, span=span, degree=2)
    model.fit()
    return np.asarray(model.outputs.fitted_values, np.float64)


def _csr(X: Any) -> Any:
    import scipy.sparse as sp

    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def seurat_v3_batch(chunks: Callable[[], Iterable[Any]], n_genes: int, span: float = 0.3) -> np.ndarray:
    """Seurat v3 normalised variance of every gene of one batch (a sample's fit tiles), from two passes
    over its count chunks (``chunks()`` yields (rows, n_genes) CSR or dense blocks, the same each time).
    Memory: one chunk + O(genes). Same formulas as scanpy's ``_highly_variable_genes_seurat_v3``."""
    G = int(n_genes)
    s1 = np.zeros(G)
    s2 = np.zeros(G)
    n = 0
    for X in chunks():
        X = _csr(X)
        d = X.data.astype(np.float64)
        n += X.shape[0]
        s1 += np.bincount(X.indices, weights=d, minlength=G)
        s2 += np.bincount(X.indices, weights=d * d, minlength=G)
    mean = s1 / n
    var = s2 / n - mean ** 2
    if n != 1:
        var *= n / (n - 1)
    not_const = var > 0
    estimat_var = np.zeros(G, dtype=np.float64)
    if not_const.any():
        estimat_var[not_const] = _loess_log(mean[not_const], var[not_const], span)
    reg_std = np.sqrt(10 ** estimat_var)
    clip_val = reg_std * np.sqrt(n) + mean
    c1 = np.zeros(G)
    c2 = np.zeros(G)
    for X in chunks():
        X = _csr(X)
        el = np.minimum(X.data.astype(np.float64), clip_val[X.indices])
        c1 += np.bincount(X.indices, weights=el, minlength=G)
        c2 += np.bincount(X.indices, weights=el * el, minlength=G)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1 / ((n - 1) * np.square(reg_std))) * ((n * np.square(mean)) + c2 - 2 * c1 * mean)


def seurat_v3_streamed(batches: Mapping[str, Callable[[], Iterable[Any]]], genes: Sequence[str], n_top: int,
                       span: float = 0.3) -> list[str]:
    """Top ``n_top`` genes by Seurat v3 over ``batches`` (batch -> its count chunks, columns = ``genes``):
    scanpy's ranking (median within-batch rank among the batch's top genes, then the number of batches
    where the gene is highly variable; ties in gene order), returned in ``genes`` order."""
    norm = np.stack([seurat_v3_batch(batches[b], len(genes), span) for b in sorted(batches)])
    ranked = np.argsort(np.argsort(-norm, axis=1), axis=1).astype(np.float32)
    nb = np.sum((ranked < n_top).astype(int), axis=0)
    ranked[ranked >= n_top] = np.nan
    med = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame({"highly_variable_nbatches": nb, "highly_variable_rank": med}, index=pd.Index(list(genes)))
    cols = ["highly_variable_rank", "highly_variable_nbatches"]
    top = df[cols].sort_values(cols, ascending=[True, False], na_position="last").index[: int(n_top)]
    chosen = set(top)
    return [g for g in genes if g in chosen]


def unit_chunks(path: str | Path, genes: Sequence[str], chunk_rows: int = 16384) -> Callable[[], Iterable[Any]]:
    """A re-iterable source of one unit table's counts in row chunks (backed: one chunk in memory), columns
    = ``genes`` (in that order)."""
    from morphomol.data.units import read_units

    def gen() -> Iterable[Any]:
        a = read_units(path, backed=True)
        try:
            pos = {g: i for i, g in enumerate(map(str, a.var_names))}
            cols = np.array([pos[g] for g in genes], np.int64)
            for i0 in range(0, a.n_obs, int(chunk_rows)):
                X = _csr(a.X[i0:min(a.n_obs, i0 + int(chunk_rows))])
                yield X[:, cols]
        finally:
            a.file.close()

    return gen


def unit_genes(path: str | Path) -> list[str]:
    """The genes (var names) of a unit table, without reading its counts (:func:`morphomol.data.units.unit_genes`)."""
    from morphomol.data.units import unit_genes as _unit_genes

    return _unit_genes(path)


def common_genes(gene_lists: Iterable[Sequence[str]]) -> list[str]:
    common: list[str] | None = None
    for genes in gene_lists:
        have = set(genes)
        common = list(genes) if common is None else [g for g in common if g in have]
    if not common:
        raise InputError("no gene is measured in every sample", field="panels.mode")
    return common


def _check_n_hvg(n_targets: int, common: Sequence[str]) -> int:
    """``n_targets`` HVGs must leave core genes among the genes measured in every sample."""
    n = int(n_targets)
    if n >= len(common):
        raise InputError(f"n_hvg_targets={n} but only {len(common)} genes are measured in every sample",
                         field="panels.n_hvg_targets", expected=f"fewer than {len(common)}")
    return n


def hvg_units(units: Mapping[str, str | Path], fit_samples: Sequence[str], n_targets: int,
              chunk_rows: int = 16384) -> dict[str, Any]:
    """HVG panel of a fold from the unit tables (sample -> units.h5ad): seurat_v3 on every tile of the fit
    samples, streamed (:func:`seurat_v3_streamed`); core = the other genes measured in every sample."""
    common = common_genes(unit_genes(p) for p in units.values())
    fit = [s for s in units if s in set(map(str, fit_samples))]
    if not fit:
        raise InputError("no fit tiles for HVG selection", field="splits")
    n = _check_n_hvg(n_targets, common)
    hv = set(seurat_v3_streamed({s: unit_chunks(units[s], common, chunk_rows) for s in fit}, common, n))
    return {"mode": "hvg", "core": [g for g in common if g not in hv], "addon": [g for g in common if g in hv]}


def yaml_panel(panel: dict[str, Any], sample_genes: dict[str, Sequence[str]]) -> dict[str, Any]:
    """Panel from the cohort YAML; InputError if a sample lacks a panel gene."""
    core, addon = list(panel.get("core") or []), list(panel.get("addon") or [])
    if not core or not addon:
        raise InputError("panel needs non-empty core and addon lists", field="panel", expected="core: [...], addon: [...]")
    both = set(core) & set(addon)
    if both:
        raise InputError(f"gene(s) in both core and addon: {', '.join(sorted(both)[:10])}", field="panel")
    for s, genes in sample_genes.items():
        have = set(genes)
        for key, lst in (("core", core), ("addon", addon)):
            miss = [g for g in lst if g not in have]
            if miss:
                raise InputError(f"sample {s}: {len(miss)} {key} panel gene(s) not measured: {', '.join(miss[:10])}",
                                 field=f"panel.{key}", expected=f"every {key} gene measured in every sample")
    return {"mode": "yaml", "core": core, "addon": addon}


def hvg_panel(counts: dict[str, Any], fit_ids: Sequence[str], n_targets: int) -> dict[str, Any]:
    """counts: sample -> AnnData (tiles x genes), in memory. HVGs on the fit tiles (``fit_ids``), the same
    streamed computation as the rule's; core = the other common genes."""
    common = common_genes([list(map(str, a.var_names)) for a in counts.values()])
    fit = set(map(str, fit_ids))
    batches: dict[str, Callable[[], Iterable[Any]]] = {}
    for s, a in counts.items():
        sel = np.array([t in fit for t in a.obs_names.astype(str)])
        if sel.any():
            pos = {g: i for i, g in enumerate(map(str, a.var_names))}
            X = _csr(a.X[np.flatnonzero(sel)])[:, [pos[g] for g in common]]
            batches[str(s)] = lambda X=X: iter([X])
    if not batches:
        raise InputError("no fit tiles for HVG selection", field="splits")
    n = _check_n_hvg(n_targets, common)
    hvs = set(seurat_v3_streamed(batches, common, n))
    addon = [g for g in common if g in hvs]
    core = [g for g in common if g not in hvs]
    return {"mode": "hvg", "core": core, "addon": addon}


def panel_fold(*, folds: str | Path, fold: int, units: Mapping[str, str | Path], panel: Mapping[str, Any],
               out: str | Path, cfg: PanelsConfig, chunk_rows: int = 16384) -> dict[str, Any]:
    """Rule entry: a fold's core / add-on genes -> ``panels/fold{k}.json``.

    ``folds``: the cohort's fold table (``splits/folds.parquet``); ``units``: sample -> unit table
    (units.h5ad; X = counts of every gene). YAML mode checks every sample measures every panel gene (gene
    names only); HVG mode picks seurat_v3 HVGs on the fold's fit tiles, streamed in ``chunk_rows`` chunks.
    """
    mode = "hvg" if panel.get("mode") == "hvg" else cfg.mode
    if mode == "hvg":
        from morphomol.data.folds import sample_partitions

        parts = sample_partitions(folds, int(fold))
        fit = [s for s in units if parts.get(str(s)) == "fit"]
        n = int(panel.get("n_targets") or cfg.n_hvg_targets)
        res = hvg_units(units, fit, n, chunk_rows=chunk_rows)
    else:
        res = yaml_panel(dict(panel), {s: unit_genes(p) for s, p in units.items()})
    log.info("panel %s: %d core, %d addon genes", res["mode"], len(res["core"]), len(res["addon"]))
    write_json(out, res, indent=1)
    return res
