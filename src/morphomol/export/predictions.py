"""Per-sample predictions as AnnData: the convention every study's per-sample outputs share.

``{study}/samples/{sample}.h5ad`` (fusion: rule ``fusion_sample_predictions``; spots: ``spots_outputs``
writes the same layout; ``morphomol predict`` for new samples):

* one observation per unit of the sample (the unit table's order and obs), one variable per predicted gene;
* ``X`` = layer ``measured`` (the targets as the models saw them: log1p counts for the fusion study);
  layers ``pred_<setting>``: each setting's prediction (float32; NaN where a setting has no prediction
  for a unit);
* obs ``fold`` (the fold whose test partition holds the sample, whose runs predicted it; ``-1`` for
  ``morphomol predict`` on new samples), ``partition`` (the unit's partition in that fold: ``test``; ``new``
  for new samples) and ``partition_fold{k}`` for every fold;
* ``obsm['spatial']`` (µm) and ``uns['spatial']`` (the H&E) copied from the unit table, so that
  ``sc.pl.spatial(a, color=gene, layer="pred_<setting>")`` draws predictions over the H&E;
* ``var``: ``pearson_<setting>`` (per-gene Pearson within the sample, where defined);
  ``uns['predictions']``: settings, layers, fold, transform, source files.

:func:`predictions_anndata` builds it from long ``tile_id, gene, y, y_hat`` tables (the runs'
``predictions.parquet``); :func:`write_sample_predictions` is the rule's entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("export.predictions")

LAYER_PREFIX = "pred_"


def _wide(df: pd.DataFrame, ids: Sequence[str], genes: Sequence[str], col: str) -> np.ndarray:
    w = df.pivot_table(index="tile_id", columns="gene", values=col, aggfunc="first", observed=True)
    return w.reindex(index=list(ids), columns=list(genes)).to_numpy(np.float32)


def predictions_anndata(units: Any, predictions: Mapping[str, pd.DataFrame], *, fold: int = -1,
                        partitions: Mapping[int, pd.Series] | None = None, transform: str = "log1p",
                        sources: Mapping[str, Any] | None = None) -> Any:
    """The per-sample AnnData (module docstring) of one unit table (AnnData) and per-setting long
    predictions restricted to its units. Genes: those of the first setting (others must predict the
    same genes); ``measured``: the first setting's ``y``."""
    import anndata as ad

    from morphomol.eval.metrics import column_pearson

    if not predictions:
        raise InputError("no predictions for the sample", field="predictions", expected="at least one setting")
    ids = [str(i) for i in units.obs_names]
    idset = set(ids)
    preds = {n: df[df["tile_id"].astype(str).isin(idset)].astype({"tile_id": str, "gene": str})
             for n, df in predictions.items()}
    first = next(iter(preds))
    genes = list(dict.fromkeys(preds[first]["gene"].tolist()))
    if not genes:
        raise InputError(f"setting {first}: no prediction for any unit of the sample", field="tile_id",
                         expected="test predictions of the fold that holds the sample")
    y = _wide(preds[first], ids, genes, "y")
    out = ad.AnnData(X=y.copy(), obs=units.obs.copy(), var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    out.layers["measured"] = y
    for name, df in preds.items():
        other = set(df["gene"])
        if other and other != set(genes):
            raise InputError(f"setting {name} predicts other genes than {first}", field="gene",
                             expected="the same target genes for every setting of a fold")
        out.layers[f"{LAYER_PREFIX}{name}"] = yh = _wide(df, ids, genes, "y_hat")
        ok = np.isfinite(yh).all(axis=1) & np.isfinite(y).all(axis=1)
        r = column_pearson(y[ok].astype(np.float64), yh[ok].astype(np.float64)) if ok.sum() > 2 else np.full(len(genes), np.nan)
        out.var[f"pearson_{name}"] = np.asarray(r, np.float64)
    out.obs["fold"] = int(fold)
    parts = dict(partitions or {})
    out.obs["partition"] = (parts[fold].reindex(ids).astype(str).to_numpy() if fold in parts else "new")
    for k, part in sorted(parts.items()):
        out.obs[f"partition_fold{k}"] = part.reindex(ids).astype(str).to_numpy()
    if "spatial" in units.obsm:
        out.obsm["spatial"] = np.asarray(units.obsm["spatial"])
    if "spatial" in units.uns:
        out.uns["spatial"] = units.uns["spatial"]
    out.uns["predictions"] = {"settings": list(preds), "layers": [f"{LAYER_PREFIX}{n}" for n in preds],
                              "fold": int(fold), "transform": transform,
                              "sources": {k: str(v) for k, v in (sources or {}).items()}}
    return out


def write_sample_predictions(*, sample: str, units: str | Path, splits: Sequence[str | Path],
                             predictions: Mapping[str, Sequence[str | Path]], out: str | Path) -> dict[str, Any]:
    """Rule ``fusion_sample_predictions``: the sample's AnnData from every setting's per-fold
    ``predictions.parquet`` (the fold where the sample is test); returns a summary."""
    from morphomol.data.folds import read_split
    from morphomol.data.units import read_units
    from morphomol.splits import check_fold
    from morphomol.util.atomic import atomic_path

    a = read_units(units)
    parts: dict[int, pd.Series] = {}
    fold = None
    for k, sp in enumerate(splits):
        s = read_split(sp)
        check_fold(s)
        mine = s[s["sample_id"].astype(str) == str(sample)]
        if mine.empty:
            raise InputError(f"sample {sample} is not in fold {k}", file=sp, field="sample_id",
                             expected="every sample of the cohort in every fold")
        parts[k] = mine.set_index("tile_id")["partition"]
        if (mine["partition"] == "test").all():
            fold = k
    if fold is None:
        raise InputError(f"sample {sample} is test in no fold", field="splits", expected="patient-grouped folds")
    chosen: dict[str, pd.DataFrame] = {}
    used: dict[str, str] = {}
    for name, files in predictions.items():
        files = list(files)
        if len(files) != len(splits):
            raise InputError(f"setting {name}: {len(files)} prediction files for {len(splits)} folds",
                             field="predictions", expected="one predictions.parquet per fold")
        chosen[name] = pd.read_parquet(files[fold], columns=["tile_id", "gene", "y", "y_hat"])
        used[name] = str(files[fold])
    pa = predictions_anndata(a, chosen, fold=fold, partitions=parts, sources=used)
    with atomic_path(out) as tmp:
        pa.write_h5ad(tmp)
    log.info("%s: %d units x %d genes, %d settings (fold %d)", sample, pa.n_obs, pa.n_vars, len(chosen), fold)
    return {"sample": sample, "fold": fold, "units": int(pa.n_obs), "genes": int(pa.n_vars), "settings": list(chosen)}


__all__ = ["LAYER_PREFIX", "predictions_anndata", "write_sample_predictions"]
