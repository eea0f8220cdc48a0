"""HEST-Benchmark-style ridge baseline on frozen features.

standardise -> PCA (256 components, capped by the number of training tiles and features) ->
ridge regression, with the ridge penalty chosen by an inner GroupKFold on patients (the scaler
and PCA are refitted inside each inner fold, so the held-out patients never leak into them).
Scores are per-gene Pearson (plus Spearman, MSE, MAE) on the test tiles in log1p space.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("ridge")

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 6, 17))
DEFAULT_COMPONENTS = 256
DEFAULT_INNER_FOLDS = 5


# ------------------------------------------------------------------------------ metrics


def _pearson_cols(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    y = y - y.mean(axis=0)
    yhat = yhat - yhat.mean(axis=0)
    num = (y * yhat).sum(axis=0)
    den = np.sqrt((y * y).sum(axis=0) * (yhat * yhat).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den <= 1e-12] = np.nan
    return r


def _rank_cols(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0).astype(np.float64)


def per_gene_metrics(y: np.ndarray, yhat: np.ndarray, genes: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Pearson, Spearman, MSE, MAE per gene (columns); undefined correlations are None."""
    y = np.asarray(y, np.float64)
    yhat = np.asarray(yhat, np.float64)
    pear = _pearson_cols(y, yhat)
    spear = _pearson_cols(_rank_cols(y), _rank_cols(yhat)) if len(y) else np.full(y.shape[1], np.nan)
    mse = ((y - yhat) ** 2).mean(axis=0) if len(y) else np.full(y.shape[1], np.nan)
    mae = np.abs(y - yhat).mean(axis=0) if len(y) else np.full(y.shape[1], np.nan)

    def f(v: float) -> float | None:
        return None if not np.isfinite(v) else float(v)

    return {g: {"pearson": f(pear[j]), "spearman": f(spear[j]), "mse": f(mse[j]), "mae": f(mae[j])}
            for j, g in enumerate(genes)}


def mean_metrics(per_gene: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in ("pearson", "spearman", "mse", "mae"):
        vals = [v[m] for v in per_gene.values() if v[m] is not None]
        out[m] = float(np.mean(vals)) if vals else None
    return out


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
    predictions is unstable. Returns
    ``alpha``, ``cv`` (alpha -> inner mean Pearson/MSE), ``n_components``, ``pred`` (test
    predictions), ``pearson`` (per-gene array), ``per_gene`` and ``mean`` metric dicts (when
    ``test_Y`` is given).
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
    if select_by not in ("mse", "pearson"):
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
            r = _pearson_cols(ytr, p)
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
        out["pearson"] = _pearson_cols(yte, pred) if len(yte) > 1 else np.full(yte.shape[1], np.nan)
        out["per_gene"] = per_gene_metrics(yte, pred, genes)
        out["mean"] = mean_metrics(out["per_gene"])
    return out


# --------------------------------------------------------------------------- fold runner


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("file not found", file=path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON ({exc})", file=path) from None


def _open(path: str | Path) -> Any:
    import zarr

    if not Path(path).exists():
        raise InputError("store not found", file=path, expected="a zarr group")
    return zarr.open_group(str(path), mode="r")


def load_fold_data(
    split_path: str | Path,
    panel_path: str | Path,
    feature_stores: Mapping[str, str | Path],
    token_stores: Mapping[str, str | Path],
) -> dict[str, Any]:
    """Assemble X (features), Y (log1p add-on counts), partitions and patients for one fold."""
    split = pd.read_parquet(split_path)
    need = {"tile_id", "sample_id", "patient_id", "index", "partition"}
    if not need <= set(split.columns):
        raise InputError(f"missing columns {sorted(need - set(split.columns))}", file=split_path,
                         field="columns", expected=f"{sorted(need)}")
    bad = set(split["partition"].unique()) - {"fit", "val", "test"}
    if bad:
        raise InputError(f"unknown partitions {sorted(bad)}", file=split_path, field="partition",
                         expected="fit|val|test")
    panel = _read_json(panel_path)
    genes = list(panel.get("addon") or [])
    if not genes:
        raise InputError("panel has no add-on genes", file=panel_path, field="addon", expected="a non-empty list")
    xs, ys, frames = [], [], []
    dim = None
    for sample, part in split.groupby("sample_id", sort=True):
        sample = str(sample)
        if sample not in feature_stores:
            raise InputError(f"no features store for sample '{sample}'", file=split_path, field="sample_id")
        if sample not in token_stores:
            raise InputError(f"no tokens store for sample '{sample}'", file=split_path, field="sample_id")
        fg = _open(feature_stores[sample])
        if "features" not in fg:
            raise InputError("store has no 'features' array", file=feature_stores[sample], field="features")
        feats = fg["features"]
        tg = _open(token_stores[sample])
        if "tile_counts" not in tg:
            raise InputError("store has no 'tile_counts' array", file=token_stores[sample], field="tile_counts")
        all_genes = [str(g) for g in (tg.attrs.get("genes") or [])]
        missing = [g for g in genes if g not in all_genes]
        if missing:
            raise InputError(f"add-on genes not in tokens.zarr: {missing[:5]}", file=token_stores[sample],
                             field="genes", expected="every add-on gene of the panel")
        idx = part["index"].to_numpy(np.int64)
        n_tiles = int(feats.shape[0])
        if len(idx) and (idx.min() < 0 or idx.max() >= n_tiles):
            raise InputError(f"tile index {int(idx.max())} out of range for {n_tiles} feature rows",
                             file=feature_stores[sample], field="features",
                             expected="one feature row per tile of tiles.parquet")
        if int(tg["tile_counts"].shape[0]) != n_tiles:
            raise InputError(f"{n_tiles} feature rows but {tg['tile_counts'].shape[0]} tiles in tokens.zarr",
                             file=feature_stores[sample], field="features", expected="the same tiles")
        x = np.asarray(feats[:], np.float32)[idx]
        if dim is not None and x.shape[1] != dim:
            raise InputError(f"feature dim {x.shape[1]} differs from {dim}", file=feature_stores[sample], field="dim")
        dim = x.shape[1]
        cols = [all_genes.index(g) for g in genes]
        counts = np.asarray(tg["tile_counts"][:], np.float64)[idx][:, cols]
        xs.append(x)
        ys.append(np.log1p(counts))
        frames.append(part[["tile_id", "sample_id", "patient_id", "partition"]])
    if not xs:
        raise InputError("split has no tiles", file=split_path)
    meta = pd.concat(frames, ignore_index=True)
    return {"X": np.concatenate(xs), "Y": np.concatenate(ys), "meta": meta, "genes": genes}


def run_ridge_fold(
    split_path: str | Path,
    panel_path: str | Path,
    feature_stores: Mapping[str, str | Path],
    token_stores: Mapping[str, str | Path],
    out_metrics: str | Path,
    out_predictions: str | Path,
    *,
    encoder: str,
    fold: int,
    alphas: Sequence[float] | None = None,
    n_components: int = DEFAULT_COMPONENTS,
    inner_folds: int = DEFAULT_INNER_FOLDS,
    seed: int = 0,
    train_partitions: Sequence[str] = ("fit", "val"),
    select_by: str = "mse",
) -> dict[str, Any]:
    """One outer fold: train on ``train_partitions`` (fit+val; alpha is chosen by inner grouped
    CV), test on ``test``; write metrics.json (kind regression) and predictions.parquet."""
    t0 = time.perf_counter()
    data = load_fold_data(split_path, panel_path, feature_stores, token_stores)
    meta, genes = data["meta"], data["genes"]
    tr = meta["partition"].isin(list(train_partitions)).to_numpy()
    te = (meta["partition"] == "test").to_numpy()
    if not te.any():
        raise InputError("fold has no test tiles", file=split_path, field="partition", expected="some 'test' rows")
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
        "genes": genes,
        "mean": res["mean"],
        "per_gene": res["per_gene"],
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
    yte = data["Y"][te]
    pred = res["pred"]
    preds = pd.DataFrame({
        "tile_id": np.repeat(test_meta["tile_id"].to_numpy(), len(genes)),
        "gene": np.tile(np.asarray(genes, dtype=object), len(test_meta)),
        "y": yte.reshape(-1).astype(np.float32),
        "y_hat": pred.reshape(-1).astype(np.float32),
    })
    with atomic_path(out_predictions) as tmp:
        preds.to_parquet(tmp, index=False)
    with atomic_path(out_metrics) as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=1))
    return metrics


def run_rule(smk: Any) -> dict[str, Any]:
    """Snakemake entry (scripts/ridge.py)."""
    cfg = dict(smk.params.cfg or {})
    samples = list(smk.params.samples)
    return run_ridge_fold(
        split_path=smk.input.split,
        panel_path=smk.input.panel,
        feature_stores=dict(zip(samples, smk.input.features)),
        token_stores=dict(zip(samples, smk.input.tokens)),
        out_metrics=smk.output.metrics,
        out_predictions=smk.output.predictions,
        encoder=smk.wildcards.encoder,
        fold=int(smk.wildcards.fold),
        alphas=cfg.get("alphas"),
        n_components=int(cfg.get("n_components", DEFAULT_COMPONENTS)),
        inner_folds=int(cfg.get("inner_folds", DEFAULT_INNER_FOLDS)),
        select_by=str(cfg.get("select_by", "mse")),
        seed=int(smk.params.seed),
    )
