"""Baselines of the spots study on the same splits and features as the heads (rule ``spots_baseline``).

* ``ridge_hest`` — the HEST-Benchmark probe: StandardScaler -> PCA (``ridge.n_components``, 256) ->
  ridge with HEST's fixed ``alpha = 100 / (d · n_genes)`` (``d`` = PCA width) and **no intercept**
  (HEST's ``Ridge(solver="lsqr", fit_intercept=False)``). Fitted twice per fold: on every target (the
  all-genes metrics) and on the fold's ``eval_genes`` alone (HEST's 50-gene metric, with HEST's alpha
  for 50 genes). Without an intercept the predictions miss the targets' offset, so their MSE is not
  comparable; Pearson (HEST's metric) is unaffected by the offset.
* ``ridge_cv`` — the same probe with the alpha chosen by inner patient-grouped CV (the shared
  :func:`morphomol.baselines.ridge.ridge_baseline`, with intercept; ``ridge`` section).
* ``mean`` — the per-gene training mean (a constant: its Pearson is undefined, its MSE is the bar
  every head must beat).

Training = the fit + val partitions (the baselines select nothing on validation), test = the fold's
test partition, touched once. Outputs have the structure of a trained setting's (``runs/{name}/
metrics.json`` with one run per fold, ``predictions.parquet``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.studies.spots.data import load_cohort, load_fold, union_genes
from morphomol.studies.spots.settings import BASELINES
from morphomol.studies.spots.train import RUN_METRICS, SpotsInputs, _summary
from morphomol.util.logs import get_logger

log = get_logger("spots.baselines")



def hest_alpha(d: int, n_genes: int) -> float:
    """HEST-Benchmark's fixed ridge penalty."""
    return 100.0 / (float(d) * float(n_genes))


def ridge_hest_fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, *, n_components: int,
                           seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """HEST's probe: scaler + PCA fitted on training rows, ridge without intercept, alpha = 100/(d·n_genes)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    k = int(min(n_components, x_tr.shape[0], x_tr.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(scaler.transform(x_tr))
    z_tr, z_te = pca.transform(scaler.transform(x_tr)), pca.transform(scaler.transform(x_te))
    alpha = hest_alpha(k, y_tr.shape[1])
    reg = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", max_iter=1000, random_state=seed).fit(z_tr, y_tr)
    return reg.predict(z_te), {"alpha": alpha, "n_components": k, "intercept": False}


def run_spot_baseline(name: str, inputs: SpotsInputs, *, out_metrics: str | Path, out_predictions: str | Path,
                      ridge: Any, encoder: str, seed: int = 0) -> dict[str, Any]:
    """Run baseline ``name`` on every fold (see the module docstring); writes its metrics and predictions."""
    from morphomol.baselines.ridge import ridge_baseline
    from morphomol.data.runs import predictions_frame, write_metrics
    from morphomol.eval.metrics import regression_report
    from morphomol.util.atomic import atomic_path

    if name not in BASELINES:
        raise InputError(f"unknown baseline {name!r}", field="baseline", expected=" | ".join(BASELINES))
    genes_all = union_genes(inputs.targets)
    spots = load_cohort(inputs.units, inputs.features if name != "mean" else None, genes_all)
    runs, frames, per_gene = [], [], {}
    for k, (split, targets) in enumerate(zip(inputs.splits, inputs.targets, strict=True)):
        t0 = time.perf_counter()
        fold = load_fold(spots, k, split, targets)
        tr = np.concatenate([fold.rows["fit"], fold.rows["val"]])
        te = fold.rows["test"]
        y_tr = spots.targets(fold.genes, fold.transform, fold.target_sum, tr).astype(np.float64)
        y_te = spots.targets(fold.genes, fold.transform, fold.target_sum, te).astype(np.float64)
        eval_idx = [fold.genes.index(g) for g in fold.eval_genes]
        info: dict[str, Any] = {}
        if name == "mean":
            pred = np.broadcast_to(y_tr.mean(axis=0), y_te.shape).copy()
            pred_eval = pred[:, eval_idx]
        else:
            assert spots.features is not None
            x_tr, x_te = spots.features[tr].astype(np.float64), spots.features[te].astype(np.float64)
            if name == "ridge_hest":
                pred, info = ridge_hest_fit_predict(x_tr, y_tr, x_te, n_components=ridge.n_components, seed=seed)
                pred_eval, info_eval = ridge_hest_fit_predict(x_tr, y_tr[:, eval_idx], x_te,
                                                              n_components=ridge.n_components, seed=seed)
                info["alpha_eval_genes"] = info_eval["alpha"]
            else:
                res = ridge_baseline(x_tr, y_tr, spots.patient[tr].astype(str), x_te, None, alphas=ridge.alphas,
                                     seed=seed, n_components=ridge.n_components, inner_folds=ridge.inner_folds,
                                     genes=fold.genes, select_by=ridge.select_by)
                pred, pred_eval = res["pred"], res["pred"][:, eval_idx]
                info = {"alpha": res["alpha"], "n_components": res["n_components"], "alpha_cv": res["cv"],
                        "inner_folds": res["n_inner_folds"], "intercept": True}
        report = regression_report(y_te, pred, fold.genes)
        ev = regression_report(y_te[:, eval_idx], pred_eval, fold.eval_genes)
        if name == "mean":  # a constant: correlations are undefined (rounding must not fake a value)
            for rep in (report, ev):
                rep["mean"]["pearson"] = rep["mean"]["spearman"] = float("nan")
                rep["n_undefined"] = len(rep["genes"])
                for v in rep["per_gene"].values():
                    v["pearson"] = v["spearman"] = float("nan")
        per_gene[str(k)] = {g: (v["pearson"] if np.isfinite(v["pearson"]) else None) for g, v in report["per_gene"].items()}
        runs.append({"fold": k, "seed": None, "test_pearson": report["mean"]["pearson"],
                     "test_pearson_eval": ev["mean"]["pearson"], "test_spearman": report["mean"]["spearman"],
                     "test_mse": report["mean"]["mse"], "n_fit": int(len(tr)), "n_test": int(len(te)),
                     "n_undefined": report["n_undefined"], "train_seconds": time.perf_counter() - t0, **info})
        frames.append(predictions_frame(list(np.array(spots.unit_ids, dtype=object)[te]), fold.genes, y_te, pred))
        log.info("%s fold %d: test pearson %s (eval genes %s), mse %.4f", name, k, report["mean"]["pearson"],
                 ev["mean"]["pearson"], report["mean"]["mse"])
    df = pd.DataFrame(runs)
    summary = {m: _summary(df[m].astype(float).tolist()) if m in df else _summary([]) for m in RUN_METRICS}
    metrics = {"setting": name, "kind": "spots", "status": "ok", "role": "baseline", "encoder": None if name == "mean"
               else encoder, "description": {"ridge_hest": "HEST probe: PCA -> ridge, alpha = 100/(d n_genes), no intercept",
                                             "ridge_cv": "PCA -> ridge, alpha by inner patient-grouped CV",
                                             "mean": "per-gene training mean"}[name],
               "seeds": [], "n_folds": len(inputs.splits), "runs": runs, "summary": summary, "sd_over": "folds",
               "per_gene_pearson": per_gene, "train_partitions": ["fit", "val"]}
    pred_df = pd.concat([f.astype({"tile_id": str, "gene": str}) for f in frames], ignore_index=True)
    with atomic_path(out_predictions) as tmp:
        pred_df.astype({"tile_id": "category", "gene": "category"}).to_parquet(tmp, index=False)
    write_metrics(out_metrics, metrics)
    return metrics
