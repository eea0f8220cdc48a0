"""HEST-Benchmark-style ridge baseline on frozen features.

standardise -> PCA (256 components, capped by the number of training tiles and features) ->
ridge regression, with the ridge penalty chosen by an inner GroupKFold on patients (the scaler
and PCA are refitted inside each inner fold, so the held-out patients never leak into them).
Scores come from :mod:`morphomol.eval.metrics` (the implementation every trained setting uses):
per-gene Pearson, Spearman, MSE, MAE on the test tiles in log1p space.

Inputs of one fold (:func:`run_ridge_fold`): the fold's split and panel, each sample's unit table
(``units.h5ad``: targets = raw counts of the panel's add-on genes) and frozen-feature store
(``features/{encoder}/{sample}.zarr``); row ``i`` of both is unit ``i`` of the sample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.eval.metrics import column_pearson, regression_report
from morphomol.util.jsonio import read_json
from morphomol.util.logs import get_logger

log = get_logger("ridge")

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 6, 17))
DEFAULT_COMPONENTS = 256
DEFAULT_INNER_FOLDS = 5
SELECT_BY = ("mse", "pearson")


class RidgeOptions(Protocol):
    """What :func:`run_ridge_fold` reads of ``morphomol.config.sections.RidgeConfig``."""

    n_components: int
    inner_folds: int
    select_by: str
    alphas: Sequence[float] | None


# ------------------------------------------------------------------------------- model


class _Projector:
    """StandardScaler + PCA fitted on training rows."""

    def __init__(self, n_components: int, seed: int) -> None:
        self.n_components = n_components
        self.seed = seed

    def fit(self, x: np.ndarray) -> _Projector:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        z = self.scaler.transform(x)
        k = int(min(self.n_components, x.shape[0], x.shape[1]))
        self.k = k
        self.pca = PCA(n_components=k, random_state=self.seed, svd_solver="auto").fit(z)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return self.pca.transform(self.scaler.transform(x))


def _ridge_fit_predict(z_tr: np.ndarray, y_tr: np.ndarray, z_te: np.ndarray, alphas: Sequence[float]) -> list[np.ndarray]:
    """Closed-form ridge (with intercept) for several alphas, via one SVD of centred z_tr."""
    zm = z_tr.mean(axis=0)
    ym = y_tr.mean(axis=0)
    u, s, vt = np.linalg.svd(z_tr - zm, full_matrices=False)
    uty = u.T @ (y_tr - ym)
    zte = (z_te - zm) @ vt.T
    preds = []
    for a in alphas:
        d = s / (s * s + float(a))
        preds.append(zte @ (d[:, None] * uty) + ym)
    return preds


def ridge_baseline(
    train_X: np.ndarray,
    train_Y: np.ndarray,
    train_groups: Sequence[Any],
    test_X: np.ndarray,
    test_Y: np.ndarray | None,
    alphas: Sequence[float] | None = None,
    seed: int = 0,
    *,
    n_components: int = DEFAULT_COMPONENTS,
    inner_folds: int = DEFAULT_INNER_FOLDS,
    genes: Sequence[str] | None = None,
    select_by: str = "mse",
) -> dict[str, Any]:
    """Fit the HEST-style ridge probe and score it on the test rows.

    The alpha with the lowest out-of-fold MSE (``select_by="pearson"``: highest mean per-gene
    Pearson) in an inner GroupKFold over ``train_groups`` (patients) is refitted on all training
    rows. MSE is the default criterion because Pearson of heavily shrunk, near-constant
    predictions is unstable. Returns ``alpha``, ``cv`` (alpha -> inner mean Pearson/MSE),
    ``n_components``, ``n_inner_folds``, ``pred`` (test predictions) and, when ``test_Y`` is
    given, ``pearson`` (per-gene array) and the metrics of
    :func:`morphomol.eval.metrics.regression_report` (``genes``, ``mean``, ``per_gene``, ``n_undefined``).
    """
    from sklearn.model_selection import GroupKFold

    xtr = np.asarray(train_X, np.float64)
    ytr = np.asarray(train_Y, np.float64)
    xte = np.asarray(test_X, np.float64)
    groups = np.asarray(train_groups)
    if ytr.ndim == 1:
        ytr = ytr[:, None]
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise InputError(f"feature shapes do not match: train {xtr.shape}, test {xte.shape}",
                         field="features", expected="2-D arrays with the same number of columns")
    if len(xtr) != len(ytr) or len(xtr) != len(groups):
        raise InputError(f"train rows differ: X {len(xtr)}, Y {len(ytr)}, groups {len(groups)}", field="train")
    if len(xtr) < 2:
        raise InputError(f"ridge needs at least 2 training tiles, got {len(xtr)}", field="train")
    if select_by not in SELECT_BY:
        raise InputError(f"select_by must be mse or pearson, not {select_by!r}", field="ridge.select_by")
    alphas = [float(a) for a in (alphas if alphas is not None else DEFAULT_ALPHAS)]
    if not alphas or any(a <= 0 for a in alphas):
        raise InputError(f"alphas must be positive, got {alphas}", field="ridge.alphas")
    n_groups = len(np.unique(groups))
    cv: dict[str, dict[str, float | None]] = {}
    if len(alphas) == 1:
        best = alphas[0]
    else:
        if n_groups < 2:
            raise InputError(f"choosing alpha needs >= 2 training patients, got {n_groups}",
                             field="patient_id", expected="several patients in the training partition")
        k = int(min(inner_folds, n_groups))
        oof = [np.zeros_like(ytr) for _ in alphas]
        for inner_tr, inner_va in GroupKFold(n_splits=k).split(xtr, ytr, groups):
            proj = _Projector(n_components, seed).fit(xtr[inner_tr])
            preds = _ridge_fit_predict(proj.transform(xtr[inner_tr]), ytr[inner_tr],
                                       proj.transform(xtr[inner_va]), alphas)
            for i, p in enumerate(preds):
                oof[i][inner_va] = p
        scores = []
        for a, p in zip(alphas, oof):
            r = column_pearson(ytr, p)
            mean_r = float(np.nanmean(r)) if np.isfinite(r).any() else float("-inf")
            mse = float(((ytr - p) ** 2).mean())
            cv[repr(a)] = {"pearson": mean_r if np.isfinite(mean_r) else None, "mse": mse}
            scores.append((-mse, mean_r) if select_by == "mse" else (mean_r, -mse))
        best = alphas[max(range(len(alphas)), key=lambda i: scores[i])]
    proj = _Projector(n_components, seed).fit(xtr)
    pred = _ridge_fit_predict(proj.transform(xtr), ytr, proj.transform(xte), [best])[0]
    genes = list(genes) if genes is not None else [f"y{j}" for j in range(ytr.shape[1])]
    out: dict[str, Any] = {"alpha": best, "cv": cv, "n_components": proj.k, "pred": pred,
                           "n_inner_folds": min(inner_folds, n_groups) if len(alphas) > 1 else 0}
    if test_Y is not None:
        yte = np.asarray(test_Y, np.float64)
        if yte.ndim == 1:
            yte = yte[:, None]
        report = regression_report(yte, pred, genes)
        out["pearson"] = np.array([report["per_gene"][g]["pearson"] for g in genes], dtype=np.float64)
        out.update(report)
    return out


# --------------------------------------------------------------------------- fold data


def _unit_ids(path: str | Path) -> pd.Index:
    from morphomol.data.units import read_units

    a = read_units(path, backed=True)
    try:
        return pd.Index(a.obs_names.astype(str))
    finally:
        a.file.close()


def load_fold_data(
    split: str | Path,
    panel: str | Path,
    units: Mapping[str, str | Path],
    features: Mapping[str, str | Path],
) -> dict[str, Any]:
    """X (features), Y (log1p add-on counts), the split rows (``meta``) and ``genes`` of one fold.

    Reads the split parquet (``tile_id, sample_id, patient_id, index, partition``), the fold
    panel's ``addon`` genes, per sample (in sorted order, rows in split order) the unit table's
    counts of those genes (:func:`morphomol.data.units.unit_counts`) and the feature rows
    (:func:`morphomol.data.features.read_features`) of the split's ``index``.
    """
    from morphomol.data.features import read_features
    from morphomol.data.units import unit_counts

    split_df = pd.read_parquet(split)
    need = {"tile_id", "sample_id", "patient_id", "index", "partition"}
    if not need <= set(split_df.columns):
        raise InputError(f"missing columns {sorted(need - set(split_df.columns))}", file=split,
                         field="columns", expected=f"{sorted(need)}")
    bad = set(split_df["partition"].unique()) - {"fit", "val", "test"}
    if bad:
        raise InputError(f"unknown partitions {sorted(bad)}", file=split, field="partition",
                         expected="fit|val|test")
    panel_doc = read_json(panel, "fold panel")
    genes = [str(g) for g in (panel_doc.get("addon") or [])] if isinstance(panel_doc, dict) else []
    if not genes:
        raise InputError("panel has no add-on genes", file=panel, field="addon", expected="a non-empty list")
    xs, ys, frames = [], [], []
    dim = None
    for sample, part in split_df.groupby("sample_id", sort=True):
        sample = str(sample)
        if sample not in features:
            raise InputError(f"no features store for sample '{sample}'", file=split, field="sample_id")
        if sample not in units:
            raise InputError(f"no unit table for sample '{sample}'", file=split, field="sample_id")
        idx = part["index"].to_numpy(np.int64)
        ids = _unit_ids(units[sample])
        n_units = len(ids)
        if len(idx) and (idx.min() < 0 or idx.max() >= n_units):
            raise InputError(f"tile index {int(idx.max() if idx.max() >= n_units else idx.min())} out of range "
                             f"for {n_units} units", file=units[sample], field="index",
                             expected="row numbers of the unit table")
        wrong = part["tile_id"].astype(str).to_numpy() != ids[idx].to_numpy()
        if wrong.any():
            first = part["tile_id"].astype(str).to_numpy()[wrong][0]
            raise InputError(f"{int(wrong.sum())} split row(s) point to another unit (first: {first})",
                             file=units[sample], field="index", expected="split index = unit table row of tile_id")
        x, attrs = read_features(features[sample], idx)
        n_rows = attrs.get("n_tiles")
        if n_rows is not None and int(n_rows) != n_units:
            raise InputError(f"{int(n_rows)} feature rows but {n_units} units in the unit table",
                             file=features[sample], field="features", expected="one feature row per unit")
        if dim is not None and x.shape[1] != dim:
            raise InputError(f"feature dim {x.shape[1]} differs from {dim}", file=features[sample], field="dim")
        dim = x.shape[1]
        xs.append(np.asarray(x, np.float32))
        ys.append(np.log1p(unit_counts(units[sample], genes, idx)))
        frames.append(part[["tile_id", "sample_id", "patient_id", "partition"]])
    if not xs:
        raise InputError("split has no tiles", file=split)
    meta = pd.concat(frames, ignore_index=True)
    return {"X": np.concatenate(xs), "Y": np.concatenate(ys), "meta": meta, "genes": genes}


# --------------------------------------------------------------------------- fold runner


def run_ridge_fold(
    split: str | Path,
    panel: str | Path,
    units: Mapping[str, str | Path],
    features: Mapping[str, str | Path],
    out_metrics: str | Path,
    out_predictions: str | Path,
    *,
    encoder: str,
    fold: int,
    cfg: RidgeOptions | None = None,
    seed: int = 0,
    train_partitions: Sequence[str] = ("fit", "val"),
) -> dict[str, Any]:
    """One outer fold: train on ``train_partitions`` (fit+val; alpha is chosen by inner grouped
    CV), test on ``test``; write ``metrics.json`` (kind regression, the same ``mean`` /
    ``per_gene`` / ``n_undefined`` as the trained settings) and ``predictions.parquet``.
    ``cfg``: ``ridge`` config section (n_components, inner_folds, select_by, alphas); None = defaults.
    Returns the metrics dict."""
    from morphomol.data.runs import write_metrics, write_predictions

    n_components = int(getattr(cfg, "n_components", DEFAULT_COMPONENTS))
    inner_folds = int(getattr(cfg, "inner_folds", DEFAULT_INNER_FOLDS))
    select_by = str(getattr(cfg, "select_by", "mse"))
    alphas = getattr(cfg, "alphas", None)
    t0 = time.perf_counter()
    data = load_fold_data(split, panel, units, features)
    meta, genes = data["meta"], data["genes"]
    tr = meta["partition"].isin(list(train_partitions)).to_numpy()
    te = (meta["partition"] == "test").to_numpy()
    if not te.any():
        raise InputError("fold has no test tiles", file=split, field="partition", expected="some 'test' rows")
    log.info("ridge %s fold %d: %d train tiles (%d patients), %d test tiles, %d genes, dim %d", encoder, fold,
             int(tr.sum()), meta.loc[tr, "patient_id"].nunique(), int(te.sum()), len(genes), data["X"].shape[1])
    res = ridge_baseline(data["X"][tr], data["Y"][tr], meta.loc[tr, "patient_id"].astype(str).to_numpy(),
                         data["X"][te], data["Y"][te], alphas=alphas, seed=seed,
                         n_components=n_components, inner_folds=inner_folds, genes=genes,
                         select_by=select_by)
    seconds = time.perf_counter() - t0
    log.info("ridge %s fold %d: alpha %.3g, %d components, mean pearson %s", encoder, fold, res["alpha"],
             res["n_components"], res["mean"]["pearson"])
    n_part = meta["partition"].value_counts()
    metrics = {
        "setting": f"ridge_{encoder}",
        "fold": int(fold),
        "kind": "regression",
        "status": "ok",
        "n_fit": int(n_part.get("fit", 0)),
        "n_val": int(n_part.get("val", 0)),
        "n_test": int(n_part.get("test", 0)),
        "genes": res["genes"],
        "mean": res["mean"],
        "per_gene": res["per_gene"],
        "n_undefined": res["n_undefined"],
        "best_epoch": None,
        "epochs_run": None,
        "train_seconds": seconds,
        "tiles_per_second": float(tr.sum() / seconds) if seconds > 0 else None,
        "model": "ridge",
        "encoder": encoder,
        "alpha": res["alpha"],
        "alpha_cv": res["cv"],
        "alpha_selected_by": select_by,
        "n_components": res["n_components"],
        "inner_folds": res["n_inner_folds"],
        "train_partitions": list(train_partitions),
        "seed": int(seed),
    }
    test_meta = meta.loc[te].reset_index(drop=True)
    write_predictions(out_predictions, test_meta["tile_id"].astype(str).tolist(), genes, data["Y"][te], res["pred"])
    write_metrics(out_metrics, metrics)
    return metrics


__all__ = ["DEFAULT_ALPHAS", "DEFAULT_COMPONENTS", "DEFAULT_INNER_FOLDS", "RidgeOptions", "load_fold_data",
           "ridge_baseline", "run_ridge_fold"]
