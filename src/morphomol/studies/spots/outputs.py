"""Per-sample outputs of the spots study (rule ``spots_outputs``).

Each sample is test in exactly one fold; its outputs use that fold's targets and the test predictions
of that fold (reference setting: first seed; baselines: deterministic):

* ``spots/samples/{sample}.h5ad``: AnnData of the sample's spots x the fold's target genes, in the
  per-sample predictions convention shared with the fusion study (:mod:`morphomol.export.predictions`):
  ``X`` and layer ``measured`` = transformed targets, layers ``pred_{setting}`` (the reference setting)
  and ``pred_{baseline}`` (``pred_depth_only``: the sequencing-depth control); obs = the unit table's obs + ``fold`` (where it is test), ``partition`` (its
  partition there: ``test``) and ``partition_fold{k}`` for every fold; ``obsm['spatial']`` in µm and the
  unit table's ``uns['spatial']``; ``var`` has the per-gene Pearson of this sample and ``eval_gene`` (HEST
  eval genes); ``uns['spots']`` the reference setting, seed, transform, layers.
* ``spots/maps/{sample}.png``: measured vs predicted maps of the sample's best, median and worst gene
  (per-gene Pearson within the sample) for the first ``spots.maps.samples`` samples;
  ``spots/maps/pred_vs_measured.png``: predicted vs measured of the cohort's best / median / worst gene.

Memory: one sample at a time. Each setting's predictions are read for the sample alone (its row group of
``predictions.parquet``: :func:`morphomol.data.runs.read_sample_predictions`); the cohort's
per-gene Pearson of the reference comes from running sums per gene, and the pooled figure reads only its
three genes' rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("spots.outputs")


def _wide(pred: pd.DataFrame, ids: Sequence[str], genes: Sequence[str], col: str, *, file: object = None) -> np.ndarray:
    w = pred.pivot(index="tile_id", columns="gene", values=col)
    missing = [u for u in ids if u not in w.index]
    if missing:
        raise InputError(f"{len(missing)} unit(s) without test predictions (e.g. {missing[0]})", file=file,
                         field="tile_id")
    return w.reindex(index=list(ids), columns=list(genes)).to_numpy(np.float32)


class _PooledPearson:
    """Per-gene Pearson over every sample's rows, from running float64 sums (one sample at a time)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}

    def add(self, genes: Sequence[str], y: np.ndarray, yh: np.ndarray) -> None:
        y, yh = y.astype(np.float64), yh.astype(np.float64)
        part = np.stack([np.full(y.shape[1], len(y), np.float64), y.sum(0), yh.sum(0), (y * y).sum(0),
                         (yh * yh).sum(0), (y * yh).sum(0)], axis=1)
        for g, row in zip(genes, part, strict=True):
            self.sums[g] = self.sums[g] + row if g in self.sums else row

    def pearson(self) -> pd.Series:
        out = {}
        for g, (n, sy, sh, syy, shh, syh) in self.sums.items():
            vy, vh = syy - sy * sy / n, shh - sh * sh / n
            den = np.sqrt(vy * vh)
            out[g] = float(np.clip((syh - sy * sh / n) / den, -1, 1)) if n > 1 and den > 0 else np.nan
        return pd.Series(out, dtype=float).sort_index()


def write_spot_outputs(*, units: Mapping[str, str | Path], folds: str | Path, targets: Sequence[str | Path],
                       predictions: Mapping[str, str | Path], reference: str, out_samples: str | Path,
                       out_maps: str | Path, map_samples: int | None = None) -> dict[str, Any]:
    """Write the per-sample AnnData and the maps (see the module docstring); returns a summary. ``folds``: the
    cohort's fold table (``splits/folds.parquet``)."""
    import anndata as ad

    from morphomol.data.folds import (
        fold_rows,
        held_out_fold,
        partitions_by_fold,
        read_folds,
    )
    from morphomol.data.runs import read_sample_predictions
    from morphomol.data.units import read_units
    from morphomol.eval.metrics import column_pearson
    from morphomol.report.figures import plot_pred_vs_measured, select_genes
    from morphomol.studies.spots.predictions import read_gene_predictions
    from morphomol.studies.spots.targets import read_targets
    from morphomol.util.atomic import atomic_path

    if reference not in predictions:
        raise InputError(f"no predictions of the reference setting {reference!r}", field="spots.reference")
    table = read_folds(folds)
    for k in sorted(set(table["fold"].astype(int))):
        fold_rows(table, k)  # patient grouping asserted
    fold_of = held_out_fold(table)
    partitions = partitions_by_fold(table, units)
    docs = [read_targets(t) for t in targets]
    summary: dict[str, Any] = {}
    pooled = _PooledPearson()
    with atomic_path(out_samples) as tmp_s, atomic_path(out_maps) as tmp_m:
        tmp_s.mkdir(parents=True)
        tmp_m.mkdir(parents=True)
        for i, (sample, upath) in enumerate(units.items()):
            if sample not in fold_of:
                raise InputError(f"sample {sample} is test in no fold", file=folds, field="partition")
            k = fold_of[sample]
            doc = docs[k]
            genes = [str(g) for g in doc["genes"]]
            a = read_units(upath)
            ids = list(a.obs_names.astype(str))
            preds = {n: read_sample_predictions(p, sample).astype({"tile_id": str, "gene": str})
                     for n, p in predictions.items()}
            y = _wide(preds[reference], ids, genes, "y", file=predictions[reference])
            out = ad.AnnData(X=y.copy(), obs=a.obs.copy(), var=pd.DataFrame(index=pd.Index(genes)))
            out.obsm["spatial"] = np.asarray(a.obsm["spatial"])
            if "spatial" in a.uns:
                out.uns["spatial"] = a.uns["spatial"]
            out.layers["measured"] = y
            for name, df in preds.items():
                out.layers[f"pred_{name}"] = _wide(df, ids, genes, "y_hat", file=predictions[name])
            del preds, a
            out.obs["fold"] = k
            out.obs["partition"] = partitions[sample][k]
            for kk, part in sorted(partitions[sample].items()):
                out.obs[f"partition_fold{kk}"] = part
            r = column_pearson(y.astype(np.float64), out.layers[f"pred_{reference}"].astype(np.float64))
            out.var["pearson"] = r
            out.var["eval_gene"] = [g in set(doc.get("eval_genes") or []) for g in genes]
            out.uns["spots"] = {"reference": reference, "seed": "first seed of spots.seeds", "fold": k,
                                "transform": doc.get("transform"), "layers": sorted(out.layers.keys())}
            out.write_h5ad(Path(tmp_s) / f"{sample}.h5ad")
            summary[sample] = {"fold": k, "spots": int(out.n_obs), "mean_pearson": float(np.nanmean(r))
                               if np.isfinite(r).any() else None}
            pooled.add(genes, y, out.layers[f"pred_{reference}"])
            if map_samples is None or i < map_samples:
                plot_sample_maps(Path(tmp_m) / f"{sample}.png", out, sample)
            del out
        chosen = select_genes(pooled.pearson())
        rows = read_gene_predictions(predictions[reference], sorted(set(chosen.values())))
        plot_pred_vs_measured(rows, chosen, Path(tmp_m) / "pred_vs_measured.png",
                              title=f"{reference}: test predictions (first seed), best / median / worst gene")
    log.info("wrote %d samples' AnnData and maps", len(units))
    return summary


def plot_sample_maps(out: Path, a: Any, sample: str) -> Path:
    """Measured vs predicted spot maps of the sample's best, median and worst gene."""
    from morphomol.report.figures import plt, save_figure, select_genes

    genes = select_genes(pd.Series(a.var["pearson"].to_numpy(), index=a.var_names))
    xy = np.asarray(a.obsm["spatial"])
    fig, axes = plt.subplots(3, 2, figsize=(7.5, 9), squeeze=False)
    for row, (label, g) in enumerate(genes.items()):
        j = list(a.var_names).index(g)
        for col, (v, what) in enumerate(((a.layers["measured"][:, j], "measured"),
                                         (a.layers[f"pred_{a.uns['spots']['reference']}"][:, j], "predicted"))):
            ax = axes[row][col]
            # each panel on its own colour scale: predictions shrink towards the mean
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=9, cmap="viridis", marker="h", linewidths=0)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {g} {what}" + (f" (r = {a.var['pearson'].iloc[j]:.2f})" if col else ""), fontsize=8)
            fig.colorbar(sc, ax=ax, shrink=0.8)
    fig.suptitle(f"{sample}: test predictions of {a.uns['spots']['reference']} (fold {a.uns['spots']['fold']})",
                 fontsize=9)
    return save_figure(fig, out)
