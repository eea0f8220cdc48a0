"""Baselines of the spots study on the same splits and features as the heads (rule ``spots_baseline``).

* ``ridge_hest`` — the HEST-Benchmark probe: StandardScaler -> PCA (``ridge.n_components``, 256) ->
  ridge with HEST's fixed ``alpha = 100 / (d · n_genes)`` (``d`` = PCA width) and **no intercept**
  (HEST's ``Ridge(solver="lsqr", fit_intercept=False)``). Fitted twice per fold: on every target (the all-genes
  metrics) and on the fold's ``eval_genes`` alone (HEST's 50-gene metric, with HEST's alpha for 50
  genes). Without an intercept the predictions miss the targets' offset, so their MSE is not
  comparable; Pearson (HEST's metric) is unaffected by the offset. Solved as HEST solves it (LSQR, tolerance
  1e-4: an approximation of the exact ridge solution, by up to a few 1e-2 on the demo), from the sums
  (:func:`morphomol.baselines.ridge.lsqr_coef`).
* ``ridge_cv`` — the same probe with the alpha chosen by inner patient-grouped CV (the shared engine of
  :mod:`morphomol.baselines.ridge`, with intercept; ``ridge`` section).
* ``mean`` — the per-gene training mean (a constant: its Pearson is undefined, its MSE is the bar
  every head must beat).
* ``depth_only`` — the sequencing-depth control: ridge (with intercept, fixed ``alpha`` =
  :data:`DEPTH_ALPHA` on the standardised feature) on one feature, the spot's ``log1p(n_counts)`` (its total
  counts over every gene, obs of the unit table), predicting every target. It sees no image: what it reaches is
  what depth alone explains (with ``log1p`` targets of a cohort of mixed depth, most of a gene's pooled
  Pearson). Needs no features store; the same folds, partitions and targets as the others.

Training = the fit + val partitions (the baselines select nothing on validation), test = the fold's
test partition, touched once. Out of core, as :mod:`morphomol.baselines.ridge`: per fold, the training
samples are read one sample and one chunk of spots at a time (feature rows + that sample's targets) into
float64 sums (D x D, D x genes, per inner fold), the model is solved from the sums, and the test samples
are streamed through it; the job holds the sums and the fold's test targets and predictions, never the
cohort's features. Outputs have the structure of a trained setting's (``runs/{name}/metrics.json`` with
one run per fold, ``predictions.parquet`` with ``sample_id``, one row group per chunk of a sample).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.studies.spots.settings import BASELINES
from morphomol.studies.spots.train import RUN_METRICS, SpotsInputs, _summary
from morphomol.util.logs import get_logger

log = get_logger("spots.baselines")

DESCRIPTIONS = {"ridge_hest": "HEST probe: PCA -> ridge, alpha = 100/(d n_genes), no intercept",
                "ridge_cv": "PCA -> ridge, alpha by inner patient-grouped CV",
                "mean": "per-gene training mean",
                "depth_only": "ridge on the spot's log1p total counts alone (sequencing-depth control)"}
#: ridge penalty of the depth control (one standardised feature: negligible next to the n spots it is fitted on)
DEPTH_ALPHA = 1.0


def hest_alpha(d: int, n_genes: int) -> float:
    """HEST-Benchmark's fixed ridge penalty."""
    return 100.0 / (float(d) * float(n_genes))


def ridge_hest_fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, *, n_components: int,
                           seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """HEST's probe on arrays: scaler + PCA fitted on training rows, ridge without intercept (LSQR), alpha =
    100/(d·n_genes) (the engine of the fold job, fed from memory). ``seed``: unused (exact PCA)."""
    from morphomol.baselines.ridge import MomentSums, chunk_rows_for, fit_pca_ridge, lsqr_coef, predictor_from_coef

    del seed
    x_tr, x_te = np.asarray(x_tr), np.asarray(x_te)
    y_tr = np.asarray(y_tr, np.float64)
    sums = MomentSums(x_tr.shape[1], y_tr.shape[1])
    step = chunk_rows_for(x_tr.shape[1] + y_tr.shape[1])
    for lo in range(0, len(x_tr), step):
        sums.add(x_tr[lo:lo + step], y_tr[lo:lo + step])
    total = sums.total()
    fit = fit_pca_ridge(total, n_components)
    alpha = hest_alpha(fit.k, y_tr.shape[1])
    model = predictor_from_coef(fit, lsqr_coef(fit, total, alpha))
    return model.predict(x_te), {"alpha": alpha, "n_components": fit.k, "intercept": False}


def _read_fold(folds: str | Path, k: int, targets: str | Path, samples: Sequence[str]
               ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The fold's rows (samples in ``samples`` order) and its targets document (genes, eval_genes, transform)."""
    from morphomol.data.folds import fold_rows
    from morphomol.studies.spots.targets import read_targets

    rows = fold_rows(folds, k).set_index("sample_id")
    extra = [s for s in samples if s not in rows.index]
    if extra:
        raise InputError(f"{len(extra)} sample(s) not in the fold table: {', '.join(extra[:5])}", file=folds,
                         field="sample_id", expected="splits computed over the cohort's current samples")
    missing = [s for s in rows.index if s not in set(samples)]
    if missing:
        raise InputError(f"no unit table for sample(s) {missing[:5]}", file=folds, field="sample_id",
                         expected="a unit table for every sample of the fold table")
    doc = read_targets(targets)
    if int(doc.get("fold", k)) != int(k):
        raise InputError(f"targets of fold {doc.get('fold')}", file=targets, field="fold", expected=str(k))
    genes = [str(g) for g in doc["genes"]]
    eval_genes = [str(g) for g in doc.get("eval_genes") or genes]
    bad = [g for g in eval_genes if g not in genes]
    if bad:
        raise InputError(f"eval gene(s) {bad[:5]} are not targets", file=targets, field="eval_genes",
                         expected="a subset of genes")
    info = {"genes": genes, "eval_genes": eval_genes, "transform": str(doc.get("transform", "log1p")),
            "target_sum": float(doc.get("target_sum", 1e4))}
    return rows.loc[list(samples)].reset_index(), info


def _targets_fn(transform: str, target_sum: float, units: Path) -> Any:
    from morphomol.studies.spots.targets import transform_counts

    def fn(counts: Any, totals: np.ndarray) -> np.ndarray:
        if transform == "normalize_log1p" and np.isnan(totals).any():
            raise InputError("unit table lacks obs column 'n_counts'", file=units, field="obs.n_counts",
                             expected="a unit table written by spots_units")
        return transform_counts(counts, totals, transform, target_sum)

    return fn


class _DepthTargets:
    """A targets function (:func:`morphomol.baselines.ridge.iter_chunks`) that also keeps the chunk's depth
    feature ``log1p(n_counts)`` (N, 1): the one feature of the ``depth_only`` control."""

    def __init__(self, fn: Any, units: Path) -> None:
        self.fn, self.units = fn, units
        self.x: np.ndarray | None = None

    def __call__(self, counts: Any, totals: np.ndarray) -> np.ndarray:
        t = np.asarray(totals, np.float64)
        if not np.isfinite(t).all() or (t < 0).any():
            raise InputError(f"{int((~np.isfinite(t) | (t < 0)).sum())} spot(s) without a finite, non-negative "
                             "total count", file=self.units, field="obs.n_counts",
                             expected="a unit table written by spots_units (n_counts per spot)")
        self.x = np.log1p(t)[:, None]
        return self.fn(counts, totals)


def run_spot_baseline(name: str, inputs: SpotsInputs, *, out_metrics: str | Path, out_predictions: str | Path,
                      ridge: Any, encoder: str, seed: int = 0, chunk_rows: int | None = None) -> dict[str, Any]:
    """Run baseline ``name`` on every fold (see the module docstring); writes its metrics and predictions.
    ``inputs``: the job's declared inputs (unit tables and features stores per sample in cohort order, no
    features needed for ``mean`` and ``depth_only``; the cohort's fold table; one targets document per fold);
    ``ridge``: the ``ridge`` config section; ``seed``: unused (the PCA is exact: nothing is random)."""
    from morphomol.baselines.ridge import (MomentSums, check_options, chunk_rows_for, feature_dim, fit_from_sums,
                                           fit_pca_ridge, inner_plan_samples, iter_chunks, lsqr_coef, open_sample,
                                           predictor, predictor_from_coef, report_blockwise)
    from morphomol.data.runs import open_predictions_writer, write_metrics

    del seed
    units, folds, targets = inputs.units, Path(inputs.folds), list(inputs.targets)
    features: Mapping[str, str | Path] | None = inputs.features or None
    if name not in BASELINES:
        raise InputError(f"unknown baseline {name!r}", field="baseline", expected=" | ".join(BASELINES))
    use_x = name in ("ridge_hest", "ridge_cv")   # frozen features (depth_only: its own one feature)
    depth = name == "depth_only"
    samples = [str(s) for s in units]
    if use_x:
        missing = [s for s in samples if s not in (features or {})]
        if missing:
            raise InputError(f"no features store for sample(s) {missing[:5]}", field="features",
                             expected="a features store per sample of the cohort")
    dim = feature_dim([features[s] for s in samples]) if use_x and features else (1 if depth else 0)
    alphas = check_options(ridge.alphas, ridge.select_by) if name == "ridge_cv" else []
    opened = {s: open_sample(s, units[s], features[s] if use_x and features else None) for s in samples}
    runs, per_gene = [], {}
    with open_predictions_writer(out_predictions) as writer:
        for k, tfile in enumerate(targets):
            t0 = time.perf_counter()
            rows, tg = _read_fold(folds, k, tfile, samples)
            for r in rows.itertuples():
                if len(opened[r.sample_id]) != int(r.n_units):
                    raise InputError(f"the fold table lists {int(r.n_units)} units for sample '{r.sample_id}', its "
                                     f"unit table has {len(opened[r.sample_id])}", file=folds, field="n_units",
                                     expected="splits of the current unit tables")
            genes, eval_genes = tg["genes"], tg["eval_genes"]
            eval_idx = [genes.index(g) for g in eval_genes]
            step = int(chunk_rows or chunk_rows_for(dim + len(genes)))
            train = rows[rows["partition"].isin(["fit", "val"])]
            test = rows[rows["partition"] == "test"]
            n_tr, n_te = int(train["n_units"].sum()), int(test["n_units"].sum())
            if n_te == 0:
                raise InputError(f"fold {k} has no test spots", file=folds, field="partition",
                                 expected="some 'test' rows")
            fn = {s: _targets_fn(tg["transform"], tg["target_sum"], opened[s].units) for s in samples}
            if depth:
                fn = {s: _DepthTargets(f, opened[s].units) for s, f in fn.items()}
            info: dict[str, Any] = {}
            if name == "ridge_cv":
                # inner CV grouped by the shared policy: patients, else samples, else none (middle alpha)
                plan, n_inner, _ = inner_plan_samples(train, alphas, ridge.inner_folds)
                groups = [(opened[s], plan[s]) for s in train["sample_id"]]
            else:
                n_inner, groups = 0, [(opened[s], 0) for s in train["sample_id"]]
            sums = MomentSums(dim, len(genes), max(1, n_inner))
            for src, grp in groups:
                for _ids, x, y in iter_chunks(src, genes, fn[src.sample], chunk_rows=step, with_features=use_x):
                    sums.add(fn[src.sample].x if depth else x, y, grp)
            if sums.n < 1 or ((use_x or depth) and sums.n < 2):
                raise InputError(f"fold {k}: {sums.n} training spot(s)", file=folds, field="partition",
                                 expected="fit + val spots to train on")
            if name == "mean":
                mean = sums.total().mean_y
                models = None
            elif depth:
                fit = fit_pca_ridge(sums.total(), 1)
                models = (predictor(fit, DEPTH_ALPHA), None)
                info = {"alpha": DEPTH_ALPHA, "feature": "log1p(n_counts)", "intercept": True}
            elif name == "ridge_hest":
                total = sums.total()
                fit = fit_pca_ridge(total, ridge.n_components)
                a_all, a_eval = hest_alpha(fit.k, len(genes)), hest_alpha(fit.k, len(eval_genes))
                models = (predictor_from_coef(fit, lsqr_coef(fit, total, a_all)),
                          predictor_from_coef(fit, lsqr_coef(fit, total, a_eval, eval_idx)))
                info = {"alpha": a_all, "n_components": fit.k, "intercept": False, "alpha_eval_genes": a_eval}
            else:
                res = fit_from_sums(sums, alphas, n_components=ridge.n_components, select_by=ridge.select_by,
                                    n_inner=n_inner)
                models = (predictor(res["fit"], res["alpha"]), None)
                info = {"alpha": res["alpha"], "n_components": res["n_components"], "alpha_cv": res["cv"],
                        "inner_folds": res["n_inner_folds"], "intercept": True}
            del sums
            y_te = np.empty((n_te, len(genes)), np.float32)   # the targets are float32 (transform_counts)
            p_te = np.empty((n_te, len(genes)))
            p_ev = np.empty((n_te, len(eval_genes))) if name == "ridge_hest" else None
            at = 0
            for s in test["sample_id"]:
                for ids, x, y in iter_chunks(opened[s], genes, fn[s], chunk_rows=step, with_features=use_x):
                    x = fn[s].x if depth else x
                    sl = slice(at, at + len(ids))
                    if models is None:
                        p = np.broadcast_to(mean, y.shape)
                    else:
                        p = models[0].predict(x)
                        if p_ev is not None:
                            p_ev[sl] = models[1].predict(x)
                    y_te[sl], p_te[sl] = y, p
                    at += len(ids)
                    writer.write(ids, genes, y, p, s)
            report = report_blockwise(y_te, p_te, genes)
            ev = report_blockwise(y_te[:, eval_idx], p_ev if p_ev is not None else p_te[:, eval_idx], eval_genes)
            if name == "mean":  # a constant: correlations are undefined (rounding must not fake a value)
                for rep in (report, ev):
                    rep["mean"]["pearson"] = rep["mean"]["spearman"] = float("nan")
                    rep["n_undefined"] = len(rep["genes"])
                    for v in rep["per_gene"].values():
                        v["pearson"] = v["spearman"] = float("nan")
            per_gene[str(k)] = {g: (v["pearson"] if np.isfinite(v["pearson"]) else None)
                                for g, v in report["per_gene"].items()}
            runs.append({"fold": k, "seed": None, "test_pearson": report["mean"]["pearson"],
                         "test_pearson_eval": ev["mean"]["pearson"], "test_spearman": report["mean"]["spearman"],
                         "test_mse": report["mean"]["mse"], "n_fit": n_tr, "n_test": n_te,
                         "n_undefined": report["n_undefined"], "train_seconds": time.perf_counter() - t0, **info})
            log.info("%s fold %d: %d train / %d test spots, test pearson %s (eval genes %s), mse %.4f", name, k,
                     n_tr, n_te, report["mean"]["pearson"], ev["mean"]["pearson"], report["mean"]["mse"])
    df = pd.DataFrame(runs)
    summary = {m: _summary(df[m].astype(float).tolist()) if m in df else _summary([]) for m in RUN_METRICS}
    metrics = {"setting": name, "kind": "spots", "status": "ok", "role": "baseline",
               "encoder": encoder if use_x else None, "description": DESCRIPTIONS[name],
               "seeds": [], "n_folds": len(targets), "runs": runs, "summary": summary, "sd_over": "folds",
               "per_gene_pearson": per_gene, "train_partitions": ["fit", "val"]}
    write_metrics(out_metrics, metrics)
    return metrics
