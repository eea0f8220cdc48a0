"""Core / add-on gene panels per fold: from the cohort's panel YAML, or HVG targets.

HVG mode (``panels.mode: hvg``): Seurat v3 highly variable genes (``flavor="seurat_v3"``,
``batch_key="sample"``, ``n_top_genes=n_hvg_targets``) computed on the fold's *fit* tiles
only (tile x gene counts from counts.h5ad); targets (add-on) = the HVGs, core = every other
gene measured in all samples. scanpy's implementation is used when its optional
dependency ``scikit-misc`` (loess) is installed; otherwise the same algorithm runs here
with an exact local-quadratic loess (span 0.3, tricube weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.config.sections import PanelsConfig
from morphomol.util.jsonio import write_json
from morphomol.errors import InputError
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
        import skmisc.loess  # noqa: F401
        import scanpy as sc

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
    """counts: sample -> AnnData (tiles x genes). HVGs on the fit tiles; core = the other common genes."""
    import anndata as ad

    common = None
    for a in counts.values():
        common = list(a.var_names) if common is None else [g for g in common if g in set(a.var_names)]
    if not common:
        raise InputError("no gene is measured in every sample", field="panels.mode")
    fit = set(map(str, fit_ids))
    parts = []
    for s, a in counts.items():
        sel = np.array([t in fit for t in a.obs_names.astype(str)])
        if sel.any():
            sub = a[sel, common].to_memory() if getattr(a, "isbacked", False) else a[sel, common].copy()
            sub.obs = pd.DataFrame({"sample": s}, index=sub.obs_names)
            parts.append(sub)
    if not parts:
        raise InputError("no fit tiles for HVG selection", field="splits")
    adata = ad.concat(parts, axis=0)
    adata.obs["sample"] = adata.obs["sample"].astype("category")
    n = int(n_targets)
    if n >= len(common):
        raise InputError(f"n_hvg_targets={n} but only {len(common)} genes are measured in every sample",
                         field="panels.n_hvg_targets", expected=f"fewer than {len(common)}")
    hv = hvg_seurat_v3(adata, n, "sample")
    hvs = set(hv)
    addon = [g for g in common if g in hvs]
    core = [g for g in common if g not in hvs]
    return {"mode": "hvg", "core": core, "addon": addon}


def panel_fold(*, split: str | Path, units: Mapping[str, str | Path], panel: Mapping[str, Any], out: str | Path,
               cfg: PanelsConfig) -> dict[str, Any]:
    """Rule entry: a fold's core / add-on genes -> ``panels/fold{k}.json``.

    ``units``: sample -> unit table (units.h5ad; X = counts of every gene). YAML mode checks every
    sample measures every panel gene; HVG mode picks seurat_v3 HVGs on the fold's fit units.
    """
    import anndata as ad

    mode = "hvg" if panel.get("mode") == "hvg" else cfg.mode
    if mode == "hvg":
        sp = pd.read_parquet(split, columns=["tile_id", "partition"])
        fit_ids = sp.loc[sp["partition"] == "fit", "tile_id"].tolist()
        adatas = {s: ad.read_h5ad(p) for s, p in units.items()}
        n = int(panel.get("n_targets") or cfg.n_hvg_targets)
        res = hvg_panel(adatas, fit_ids, n)
    else:
        genes = {}
        for s, p in units.items():
            a = ad.read_h5ad(p, backed="r")
            genes[s] = list(a.var_names)
            a.file.close()
        res = yaml_panel(dict(panel), genes)
    log.info("panel %s: %d core, %d addon genes", res["mode"], len(res["core"]), len(res["addon"]))
    write_json(out, res, indent=1)
    return res
