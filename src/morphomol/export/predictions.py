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
``predictions.parquet``), one setting at a time (each turned into its dense layer before the next is read);
:func:`write_sample_predictions` is the rule's entry: it reads the fold table (``splits/folds.parquet``) and
only the sample's rows of each run's predictions (:func:`morphomol.data.runs.read_sample_predictions`: a
pyarrow filter on ``sample_id``), so its memory is the sample's, whatever the size of the fold or cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("export.predictions")

LAYER_PREFIX = "pred_"


def _wide(df: pd.DataFrame, pos: Mapping[str, int], genes: Sequence[str], col: str) -> np.ndarray:
    """(units, genes) float32 of one value column of a long table: ``pivot_table(index=tile_id,
    columns=gene, aggfunc="first")`` reindexed to the units and genes (the first non-null value of a
    (unit, gene); NaN where none), by direct indexing."""
    n, gpos = len(pos), {g: j for j, g in enumerate(genes)}
    out = np.full((n, len(genes)), np.nan, np.float32)
    v = df[col].to_numpy()
    r = df["tile_id"].map(pos).to_numpy(np.float64)
    c = df["gene"].map(gpos).to_numpy(np.float64)
    keep = ~(np.isnan(r) | np.isnan(c) | pd.isna(v))
    r, c, v = r[keep].astype(np.int64), c[keep].astype(np.int64), v[keep]
    _, first = np.unique(r * max(1, len(genes)) + c, return_index=True)  # first occurrence of each cell
    out[r[first], c[first]] = v[first]
    return out


PredictionSource = pd.DataFrame | Callable[[], pd.DataFrame]


def predictions_anndata(units: Any, predictions: Mapping[str, PredictionSource], *, fold: int = -1,
                        partitions: Mapping[int, pd.Series | str] | None = None, transform: str = "log1p",
                        sources: Mapping[str, Any] | None = None) -> Any:
    """The per-sample AnnData (module docstring) of one unit table (AnnData, backed or not) and per-setting
    long predictions (a frame, or a callable returning it, called when the setting's turn comes) restricted
    to its units. Genes: those of the first setting (others must predict the same genes); ``measured``: the
    first setting's ``y``. ``partitions``: fold -> the units' partition (a Series by unit id, or one string
    for every unit of the sample)."""
    import anndata as ad

    from morphomol.eval.metrics import column_pearson

    if not predictions:
        raise InputError("no predictions for the sample", field="predictions", expected="at least one setting")
    ids = [str(i) for i in units.obs_names]
    pos = {t: i for i, t in enumerate(ids)}
    first = next(iter(predictions))
    genes: list[str] = []
    y: np.ndarray | None = None
    layers: dict[str, np.ndarray] = {}
    pearson: dict[str, np.ndarray] = {}
    for name, src in predictions.items():
        df = src() if callable(src) else src
        df = df[df["tile_id"].astype(str).isin(pos)].astype({"tile_id": str, "gene": str})
        if name == first:
            genes = list(dict.fromkeys(df["gene"].tolist()))
            if not genes:
                raise InputError(f"setting {first}: no prediction for any unit of the sample", field="tile_id",
                                 expected="test predictions of the fold that holds the sample")
            y = _wide(df, pos, genes, "y")
        assert y is not None
        other = set(df["gene"])
        if other and other != set(genes):
            raise InputError(f"setting {name} predicts other genes than {first}", field="gene",
                             expected="the same target genes for every setting of a fold")
        layers[f"{LAYER_PREFIX}{name}"] = yh = _wide(df, pos, genes, "y_hat")
        del df
        ok = np.isfinite(yh).all(axis=1) & np.isfinite(y).all(axis=1)
        r = column_pearson(y[ok].astype(np.float64), yh[ok].astype(np.float64)) if ok.sum() > 2 else np.full(len(genes), np.nan)
        pearson[name] = np.asarray(r, np.float64)
    assert y is not None
    out = ad.AnnData(X=y.copy(), obs=units.obs.copy(), var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    out.layers["measured"] = y
    for name in predictions:
        out.layers[f"{LAYER_PREFIX}{name}"] = layers.pop(f"{LAYER_PREFIX}{name}")
        out.var[f"pearson_{name}"] = pearson[name]

    def unit_parts(part: pd.Series | str) -> np.ndarray:
        if isinstance(part, str):
            return np.full(len(ids), part, dtype=object)
        return part.reindex(ids).astype(str).to_numpy()

    out.obs["fold"] = int(fold)
    parts = dict(partitions or {})
    out.obs["partition"] = unit_parts(parts[fold]) if fold in parts else "new"
    for k, part in sorted(parts.items()):
        out.obs[f"partition_fold{k}"] = unit_parts(part)
    if "spatial" in units.obsm:
        out.obsm["spatial"] = np.asarray(units.obsm["spatial"])
    if "spatial" in units.uns:
        out.uns["spatial"] = units.uns["spatial"]
    out.uns["predictions"] = {"settings": list(predictions), "layers": [f"{LAYER_PREFIX}{n}" for n in predictions],
                              "fold": int(fold), "transform": transform,
                              "sources": {k: str(v) for k, v in (sources or {}).items()}}
    return out


def write_sample_predictions(*, sample: str, units: str | Path, folds: str | Path,
                             predictions: Mapping[str, Sequence[str | Path]], out: str | Path) -> dict[str, Any]:
    """Rule ``fusion_sample_predictions``: the sample's AnnData from every setting's per-fold
    ``predictions.parquet`` (the fold where the sample is test; only the sample's rows are read) and the
    fold table ``folds`` (``splits/folds.parquet``); returns a summary."""
    from morphomol.data.folds import held_out_fold, n_folds, read_folds, sample_partitions
    from morphomol.data.runs import read_sample_predictions
    from morphomol.data.units import read_units
    from morphomol.util.atomic import atomic_path

    table = read_folds(folds)
    parts: dict[int, pd.Series | str] = {}
    for k in range(n_folds(table)):
        per_sample = sample_partitions(table, k)  # patient grouping asserted
        if str(sample) not in per_sample:
            raise InputError(f"sample {sample} is not in fold {k}", file=folds, field="sample_id",
                             expected="every sample of the cohort in every fold")
        parts[k] = per_sample[str(sample)]
    fold = held_out_fold(table).get(str(sample))
    if fold is None:
        raise InputError(f"sample {sample} is test in no fold", file=folds, field="partition",
                         expected="patient-grouped folds")
    chosen: dict[str, Callable[[], pd.DataFrame]] = {}
    used: dict[str, str] = {}
    for name, files in predictions.items():
        files = list(files)
        if len(files) != len(parts):
            raise InputError(f"setting {name}: {len(files)} prediction files for {len(parts)} folds",
                             field="predictions", expected="one predictions.parquet per fold")
        chosen[name] = lambda f=files[fold]: read_sample_predictions(f, str(sample))
        used[name] = str(files[fold])
    a = read_units(units, backed=True)  # obs, obsm, uns; X (the counts) stays on disk
    try:
        pa = predictions_anndata(a, chosen, fold=fold, partitions=parts, sources=used)
    finally:
        a.file.close()
    with atomic_path(out) as tmp:
        pa.write_h5ad(tmp)
    log.info("%s: %d units x %d genes, %d settings (fold %d)", sample, pa.n_obs, pa.n_vars, len(chosen), fold)
    return {"sample": sample, "fold": fold, "units": int(pa.n_obs), "genes": int(pa.n_vars), "settings": list(chosen)}


__all__ = ["LAYER_PREFIX", "predictions_anndata", "write_sample_predictions"]


def write_samples_predictions(*, samples: Sequence[str], units: Sequence[str | Path], folds: str | Path,
                              predictions: Mapping[str, Sequence[str | Path]], outs: Sequence[str | Path]
                              ) -> list[dict[str, Any]]:
    """The ``fusion_sample_predictions_<cohort>_<k>`` jobs: :func:`write_sample_predictions` for each sample of
    a group in turn (one sample's rows in memory at a time)."""
    from morphomol.util.progress import progress

    if not len(samples) == len(units) == len(outs):
        raise ValueError("samples, units and outs must have the same length")
    return [write_sample_predictions(sample=s, units=u, folds=folds, predictions=predictions, out=o)
            for s, u, o in progress(list(zip(samples, units, outs, strict=True)), desc="samples", unit="sample")]
