"""Target genes of one fold, chosen on its training samples only (``spots.targets``), stored with the fold.

Candidates: genes present in every sample of the cohort (names only) and detected in at least
``min_spot_fraction`` of the training spots. Then, by ``mode``:

* ``moran``: top ``n_genes`` by Moran's I (squidpy ``gr.spatial_autocorr`` on each training sample's
  transformed expression over its ``n_neighbors`` nearest spots), averaged over the training samples
  (weighted by spots) — the seed's spatially variable genes;
* ``hvg``: scanpy's ``seurat_v3`` highly variable genes on the training spots' raw counts (batch = sample:
  the per-sample normalised variances, averaged over the samples);
* ``yaml``: the list in ``genes_file`` (every gene must be measured in every sample).

``eval_genes``: the ``n_eval_genes`` targets with the highest variance of the transformed values over
the training spots — HEST-Benchmark's Pearson on the 50 most variable genes. The fold's
``targets/fold{k}.json`` holds both lists, the scores, the training samples and the transform, so a run
can be rebuilt. "Training" = the fit and validation partitions (never test).

Memory: one sample at a time. Every statistic above is a per-sample quantity combined across samples, so
the job streams over the training samples (sparse counts; dense blocks of at most ``_DENSE_MB``): pass 1, a
summary per sample (:func:`sample_summary`: spots, detection of the cohort's common genes) -> the candidates;
pass 2, each sample's Moran's I of the candidates on its own spot graph (or its seurat_v3 normalised
variances), accumulated into the scores (:func:`moran_scores`) -> the targets; pass 3, each sample's columns
of the targets for their variance. Only genes-sized vectors cross samples. The numbers are those of the
computation over all training samples at once (the same per-sample statistics, accumulated in the same
order): targets, scores and eval genes are identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.studies.spots.config import TargetOptions
from morphomol.util.jsonio import read_json, write_json
from morphomol.util.logs import get_logger

log = get_logger("spots.targets")

_DENSE_MB = 256.0  # a dense block of transformed values (float64 while transforming) stays below this


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


# ------------------------------------------------------------------------------------------ one sample
@dataclass
class SampleTable:
    """One sample's unit table as the targets job needs it: CSR counts (float32), spot totals, coordinates."""

    X: sp.csr_matrix
    genes: list[str]
    totals: np.ndarray
    spatial: np.ndarray

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    def columns(self, genes: Sequence[str]) -> sp.csr_matrix:
        pos = {g: i for i, g in enumerate(self.genes)}
        return self.X[:, [pos[g] for g in genes]]


def read_sample(path: str | Path) -> SampleTable:
    """X (CSR float32), var names, ``n_counts`` and ``obsm['spatial']`` of one ``units.h5ad``."""
    from morphomol.data.units import read_units

    a = read_units(path)
    X = a.X if sp.issparse(a.X) else sp.csr_matrix(np.asarray(a.X))
    if "n_counts" not in a.obs.columns:
        raise InputError("unit table lacks obs column 'n_counts'", file=path, field="obs.n_counts",
                         expected="a unit table written by spots_units")
    return SampleTable(X=sp.csr_matrix(X), genes=[str(g) for g in a.var_names],
                       totals=a.obs["n_counts"].to_numpy(), spatial=np.asarray(a.obsm["spatial"]))


def _knn_graph(spatial: np.ndarray, n_neighbors: int) -> Any:
    """The spot graph of one sample (squidpy's k-nearest-neighbour connectivities)."""
    import anndata as ad
    import squidpy as sq

    g = ad.AnnData(X=np.zeros((len(spatial), 1), np.float32), obsm={"spatial": np.asarray(spatial)})
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.8; spatial_neighbors before
    if knn is not None:
        knn(g, spatial_key="spatial", n_neighs=n_neighbors)
    else:
        sq.gr.spatial_neighbors(g, spatial_key="spatial", coord_type="generic", n_neighs=n_neighbors)
    return g.obsp


def _gene_blocks(n_spots: int, n_genes: int) -> list[slice]:
    step = max(16, int(_DENSE_MB * 1e6 // max(1, 24 * n_spots)))
    return [slice(i, min(i + step, n_genes)) for i in range(0, n_genes, step)]


def sample_moran(t: SampleTable, genes: Sequence[str], cfg: TargetOptions) -> np.ndarray:
    """Moran's I (squidpy, no permutations) of ``genes`` on one sample's transformed values over its
    ``n_neighbors`` graph; NaN for constant genes. Computed in gene blocks: each gene's statistic depends
    only on its own column and the graph."""
    import anndata as ad
    import squidpy as sq

    genes = list(genes)
    out = np.full(len(genes), np.nan)
    if not genes:
        return out
    obsp = _knn_graph(t.spatial, cfg.n_neighbors)
    cols = t.columns(genes)
    for b in _gene_blocks(t.n, len(genes)):
        tt = ad.AnnData(X=transform_counts(cols[:, b], t.totals, cfg.transform, cfg.target_sum),
                        obsm={"spatial": t.spatial})
        tt.var_names = genes[b]
        for k, v in obsp.items():
            tt.obsp[k] = v
        sq.gr.spatial_autocorr(tt, mode="moran", genes=genes[b], n_perms=None, n_jobs=1, show_progress_bar=False)
        out[b] = tt.uns["moranI"]["I"].reindex(genes[b]).to_numpy(np.float64)
    return out


@dataclass
class SampleSummary:
    """Per-gene statistics of one sample over the cohort's common genes (``genes`` order)."""

    sample: str
    n_spots: int
    detected: np.ndarray          # (G,) int64: spots with a count > 0


def sample_summary(sample: str, path: str | Path, genes: Sequence[str]) -> SampleSummary:
    """Spots and per-gene detection of one sample (one sample in memory)."""
    t = read_sample(path)
    detected = np.asarray((t.columns(genes) > 0).sum(axis=0)).ravel().astype(np.int64)
    return SampleSummary(sample=sample, n_spots=t.n, detected=detected)


# ------------------------------------------------------------------------------------------ the fold
def moran_scores(samples: Sequence[str], units: Mapping[str, str | Path], cand: Sequence[str],
                 cfg: TargetOptions) -> np.ndarray:
    """Moran's I of the candidate genes averaged over ``samples`` (in that order), weighted by spots
    (undefined = 0); one sample at a time."""
    acc = np.zeros(len(cand))
    n_total = 0
    for sample in samples:
        t = read_sample(units[sample])
        acc += np.nan_to_num(sample_moran(t, cand, cfg)) * t.n
        n_total += t.n
        del t
    return acc / max(n_total, 1)


def common_genes(units: Mapping[str, str | Path]) -> list[str]:
    """Genes measured in every sample (var names only), sorted."""
    from morphomol.data.units import unit_genes

    common: set[str] | None = None
    for path in units.values():
        names = set(unit_genes(path))
        common = names if common is None else common & names
    return sorted(common or [])


def select_targets(*, folds: str | Path, units: Mapping[str, str | Path], fold: int, cfg: TargetOptions,
                   genes_file: str | Path | None = None) -> dict[str, Any]:
    """Choose the fold's targets (see the module docstring); returns the targets document."""
    from morphomol.data.folds import sample_partitions

    parts = sample_partitions(folds, fold)  # patient grouping asserted
    train_samples = sorted(s for s, p in parts.items() if p != "test")
    missing = [x for x in parts if x not in units]
    if missing:
        raise InputError(f"no unit table for sample(s) {missing}", file=folds, field="sample_id",
                         expected="a unit table for every sample of the fold table")
    common_l = common_genes(units)
    common = set(common_l)
    warnings: list[str] = []
    summaries = [sample_summary(s, units[s], common_l) for s in train_samples]
    n_train = sum(s.n_spots for s in summaries)
    detected = np.zeros(len(common_l))
    for s in summaries:
        detected += s.detected
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
        cand_idx = np.flatnonzero(frac >= cfg.min_spot_fraction)
        cand = [common_l[i] for i in cand_idx]
        if not cand:
            raise InputError(f"no gene is detected in {cfg.min_spot_fraction:g} of the {n_train} training spots",
                             field="spots.targets.min_spot_fraction", expected="a lower fraction")
        if len(cand) < cfg.n_genes:
            warnings.append(f"only {len(cand)} candidate genes for n_genes={cfg.n_genes}: all are targets")
            log.warning("fold %d: %s", fold, warnings[-1])
        if cfg.mode == "moran":
            score = moran_scores(train_samples, units, cand, cfg)
        elif cfg.mode == "hvg":
            score = _hvg_scores(train_samples, units, cand, cfg)
        else:
            raise InputError(f"unknown mode {cfg.mode!r}", field="spots.targets.mode", expected="moran | hvg | yaml")
        order = np.lexsort((np.array(cand), -score))  # ties broken by name: deterministic
        genes = [cand[i] for i in order[: cfg.n_genes]]
        scores = {cand[i]: float(score[i]) for i in order[: cfg.n_genes]}
    # HEST: the most variable targets (transformed, training spots), one sample at a time
    s1 = np.zeros(len(genes))
    s2 = np.zeros(len(genes))
    for sample in train_samples:
        t = read_sample(units[sample])
        y = transform_counts(t.columns(genes), t.totals, cfg.transform, cfg.target_sum)
        s1 += y.sum(axis=0)
        s2 += (y.astype(np.float64) ** 2).sum(axis=0)
        del t, y
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


def _hvg_scores(train_samples: Sequence[str], units: Mapping[str, str | Path], cand: list[str],
                cfg: TargetOptions) -> np.ndarray:
    """scanpy's seurat_v3 ``variances_norm`` with batch = sample: each sample's normalised variances (its own
    loess fit over the candidates), averaged over the samples in sorted order — one sample at a time."""
    import anndata as ad
    import scanpy as sc

    rows = []
    for sample in sorted(train_samples):
        t = read_sample(units[sample])
        a = ad.AnnData(X=t.columns(cand))
        a.var_names = cand
        df = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=min(cfg.n_genes, len(cand)),
                                         inplace=False, span=0.5)
        rows.append(df["variances_norm"].reindex(cand).to_numpy(np.float64).reshape(1, -1))
        del t, a
    return np.mean(np.concatenate(rows, axis=0), axis=0)


def write_targets(*, folds: str | Path, units: Mapping[str, str | Path], fold: int, cfg: TargetOptions,
                  out: str | Path, genes_file: str | Path | None = None) -> dict[str, Any]:
    """The ``spots_targets`` rule: :func:`select_targets` written to ``out`` (JSON, atomic)."""
    doc = select_targets(folds=folds, units=units, fold=fold, cfg=cfg, genes_file=genes_file)
    write_json(out, doc)
    return doc


def read_targets(path: str | Path) -> dict[str, Any]:
    doc = read_json(path, "targets file")
    if not isinstance(doc, dict) or not isinstance(doc.get("genes"), list) or not doc["genes"]:
        raise InputError("targets file needs a non-empty 'genes' list", file=path, field="genes")
    return doc
