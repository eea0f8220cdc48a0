"""Target genes of one fold, chosen on its training samples only (``spots.targets``), stored with the fold.

Candidates: genes present in every sample of the cohort (names only) and detected in at least
``min_spot_fraction`` of the training spots. Then, by ``mode``:

* ``moran``: top ``n_genes`` by Moran's I (squidpy ``gr.spatial_autocorr`` on each training sample's
  transformed expression over its ``n_neighbors`` nearest spots), averaged over the training samples
  (weighted by spots) — the seed's spatially variable genes;
* ``hvg``: scanpy's ``seurat_v3`` highly variable genes on the training spots' raw counts (batch = sample);
* ``yaml``: the list in ``genes_file`` (every gene must be measured in every sample).

``eval_genes``: the ``n_eval_genes`` targets with the highest variance of the transformed values over
the training spots — HEST-Benchmark's Pearson on the 50 most variable genes. The fold's
``targets/fold{k}.json`` holds both lists, the scores, the training samples and the transform, so a run
can be rebuilt. "Training" = the fit and validation partitions (never test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.studies.spots.config import TargetOptions
from morphomol.util.jsonio import read_json, write_json
from morphomol.util.logs import get_logger

log = get_logger("spots.targets")


def transform_counts(counts: Any, totals: np.ndarray, mode: str, target_sum: float) -> np.ndarray:
    """float32 (N, G) targets from raw counts: ``log1p`` or ``normalize_log1p`` (library size = ``totals``,
    every gene of the spot, scaled to ``target_sum``)."""
    X = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    X = X.astype(np.float64, copy=False)
    if mode == "normalize_log1p":
        X = X / np.maximum(np.asarray(totals, np.float64), 1.0)[:, None] * float(target_sum)
    elif mode != "log1p":
        raise InputError(f"unknown transform {mode!r}", field="spots.targets.transform",
                         expected="log1p | normalize_log1p")
    return np.log1p(X).astype(np.float32)


def _moran(adata: Any, genes: list[str], n_neighbors: int) -> np.ndarray:
    import squidpy as sq

    knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.8; spatial_neighbors before
    if knn is not None:
        knn(adata, spatial_key="spatial", n_neighs=n_neighbors)
    else:
        sq.gr.spatial_neighbors(adata, spatial_key="spatial", coord_type="generic", n_neighs=n_neighbors)
    sq.gr.spatial_autocorr(adata, mode="moran", genes=genes, n_perms=None, n_jobs=1, show_progress_bar=False)
    return adata.uns["moranI"]["I"].reindex(genes).to_numpy(np.float64)


def select_targets(*, split: str | Path, units: Mapping[str, str | Path], fold: int, cfg: TargetOptions,
                   genes_file: str | Path | None = None) -> dict[str, Any]:
    """Choose the fold's targets (see the module docstring); returns the targets document."""
    import anndata as ad

    from morphomol.data.folds import read_split
    from morphomol.data.units import read_units
    from morphomol.splits import check_fold

    s = read_split(split)
    check_fold(s)
    train_samples = sorted(s.loc[s["partition"] != "test", "sample_id"].astype(str).unique())
    missing = [x for x in s["sample_id"].astype(str).unique() if x not in units]
    if missing:
        raise InputError(f"no unit table for sample(s) {missing}", file=split, field="sample_id")
    common: set[str] | None = None
    for path in units.values():
        a = read_units(path, backed=True)
        names = set(map(str, a.var_names))
        a.file.close()
        common = names if common is None else common & names
    common_l = sorted(common or [])
    warnings: list[str] = []
    tables = {}
    for sample in train_samples:
        a = read_units(units[sample])
        tables[sample] = a[:, [g for g in a.var_names if g in common]].copy()
    n_train = sum(t.n_obs for t in tables.values())
    detected = np.zeros(len(common_l))
    for t in tables.values():
        t._inplace_subset_var(common_l)
        detected += np.asarray((t.X > 0).sum(axis=0)).ravel()
    frac = detected / max(n_train, 1)
    if cfg.mode == "yaml":
        from morphomol.studies.spots.study import read_gene_list

        if not genes_file:
            raise InputError("missing genes file", field="spots.targets.genes_file", expected="a YAML list")
        wanted = read_gene_list(genes_file)
        absent = [g for g in wanted if g not in common]
        if absent:
            raise InputError(f"{len(absent)} target gene(s) not measured in every sample: {', '.join(absent[:10])}",
                             file=genes_file, field="genes", expected="genes present in every sample's matrix")
        genes, scores = wanted, {g: None for g in wanted}
    else:
        cand = [g for g, f in zip(common_l, frac) if f >= cfg.min_spot_fraction]
        if not cand:
            raise InputError(f"no gene is detected in {cfg.min_spot_fraction:g} of the {n_train} training spots",
                             field="spots.targets.min_spot_fraction", expected="a lower fraction")
        if len(cand) < cfg.n_genes:
            warnings.append(f"only {len(cand)} candidate genes for n_genes={cfg.n_genes}: all are targets")
            log.warning("fold %d: %s", fold, warnings[-1])
        if cfg.mode == "moran":
            acc = np.zeros(len(cand))
            for t in tables.values():
                tt = ad.AnnData(X=transform_counts(t[:, cand].X, t.obs["n_counts"].to_numpy(), cfg.transform,
                                                   cfg.target_sum), obsm={"spatial": np.asarray(t.obsm["spatial"])})
                tt.var_names = cand
                acc += np.nan_to_num(_moran(tt, cand, cfg.n_neighbors)) * tt.n_obs
            score = acc / max(n_train, 1)
        elif cfg.mode == "hvg":
            import scanpy as sc

            cat = ad.concat([t[:, cand] for t in tables.values()], label="batch", keys=list(tables), index_unique="-")
            batch = "batch" if len(tables) > 1 else None
            df = sc.pp.highly_variable_genes(cat, flavor="seurat_v3", n_top_genes=min(cfg.n_genes, len(cand)),
                                             batch_key=batch, inplace=False, span=0.5)
            df.index = cand
            score = df["variances_norm"].to_numpy(np.float64)
        else:
            raise InputError(f"unknown mode {cfg.mode!r}", field="spots.targets.mode", expected="moran | hvg | yaml")
        order = np.lexsort((np.array(cand), -score))  # ties broken by name: deterministic
        genes = [cand[i] for i in order[: cfg.n_genes]]
        scores = {cand[i]: float(score[i]) for i in order[: cfg.n_genes]}
    # HEST: the most variable targets (transformed, training spots)
    s1 = np.zeros(len(genes))
    s2 = np.zeros(len(genes))
    for t in tables.values():
        y = transform_counts(t[:, genes].X, t.obs["n_counts"].to_numpy(), cfg.transform, cfg.target_sum)
        s1 += y.sum(axis=0)
        s2 += (y.astype(np.float64) ** 2).sum(axis=0)
    var = s2 / n_train - (s1 / n_train) ** 2
    k = min(cfg.n_eval_genes, len(genes))
    eval_genes = [genes[i] for i in np.lexsort((np.array(genes), -var))[:k]]
    doc = {"fold": int(fold), "mode": cfg.mode, "transform": cfg.transform, "target_sum": cfg.target_sum,
           "genes": genes, "eval_genes": eval_genes, "scores": scores,
           "train_variance": {g: float(v) for g, v in zip(genes, var)}, "train_samples": train_samples,
           "n_train_spots": int(n_train), "n_candidates": int((frac >= cfg.min_spot_fraction).sum()),
           "n_common_genes": len(common_l), "min_spot_fraction": cfg.min_spot_fraction,
           "n_neighbors": cfg.n_neighbors, "warnings": warnings}
    log.info("fold %d: %d %s targets from %d training samples (%d spots); eval genes %d", fold, len(genes), cfg.mode,
             len(train_samples), n_train, len(eval_genes))
    return doc


def write_targets(*, split: str | Path, units: Mapping[str, str | Path], fold: int, cfg: TargetOptions,
                  out: str | Path, genes_file: str | Path | None = None) -> dict[str, Any]:
    """The ``spots_targets`` rule: :func:`select_targets` written to ``out`` (JSON, atomic)."""
    doc = select_targets(split=split, units=units, fold=fold, cfg=cfg, genes_file=genes_file)
    write_json(out, doc)
    return doc


def read_targets(path: str | Path) -> dict[str, Any]:
    doc = read_json(path, "targets file")
    if not isinstance(doc, dict) or not isinstance(doc.get("genes"), list) or not doc["genes"]:
        raise InputError("targets file needs a non-empty 'genes' list", file=path, field="genes")
    return doc


def target_matrix(units_path: str | Path, rows: Sequence[int] | np.ndarray, genes: Sequence[str], transform: str,
                  target_sum: float) -> np.ndarray:
    """Transformed targets of ``rows`` of one sample's unit table (columns in ``genes`` order)."""
    from morphomol.data.units import read_units

    a = read_units(units_path)
    pos = {str(g): i for i, g in enumerate(a.var_names)}
    miss = [g for g in genes if g not in pos]
    if miss:
        raise InputError(f"{len(miss)} target gene(s) not in the unit table: {', '.join(miss[:5])}", file=units_path,
                         field="var_names")
    r = np.asarray(rows, np.int64)
    return transform_counts(a.X[r][:, [pos[g] for g in genes]], a.obs["n_counts"].to_numpy()[r], transform, target_sum)
