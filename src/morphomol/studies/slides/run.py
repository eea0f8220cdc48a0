"""One cross-validation fold of one setting (rule ``slides_fold``): train, control, evaluate, write.

For slide encoder ``setting`` and fold ``k`` (patient-grouped; fold ``k`` of the shared
``splits/folds.parquet``):

1. RNA encoder fit on the fit slides (PCA) or loaded (registry, local weights); slide inputs frozen, from
   the per-slide embeddings only (``slides/embeddings/``: mean vectors, or bags read per batch; optionally
   reduced by a PCA fit on the fit slides, ``slides.slide_pca_components``). Memory: the cohort's N x D
   vectors / N x (PCA genes) expression and one batch of bags, never every bag or every tile feature.
2. ``trained``: projection heads (+ ABMIL) trained contrastively on the fit slides, early stopping on
   the validation slides' InfoNCE. ``untrained``: the same seeded initialisation, never trained.
   ``permuted`` (null control): trained the same way on slide–RNA pairs shuffled within the fit and
   within the validation slides.
3. On the test slides: retrieval in both directions; soft-kNN and direct-prompting predictions of
   every gene set (real and null sets) with the training slides (fit + val) as reference library
   and calibration set; per-set R² / Pearson.

Writes ``metrics.json``, ``predictions.parquet`` (``sample_id, gene_set, route, model, y, y_hat``),
``checkpoint.safetensors`` (heads, ABMIL, temperature, input statistics and the fold's PCA) and
``checkpoint.json`` (gene order of the PCA, settings, fit history).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.util.logs import get_logger

log = get_logger("slides.run")

MODELS = ("trained", "untrained", "permuted")


def permuted_pairs(data: Any, seed: int) -> Any:
    """The same slides with their RNA rows shuffled (seeded): the permuted-pairs null control."""
    rng = np.random.default_rng([int(seed), 99])
    return data.with_rna(data.arrays["rna"][rng.permutation(len(data))])


def evaluate_model(model: Any, data: Any, tables: Any, rna_enc: Any, *, train_idx: np.ndarray, test_idx: np.ndarray,
                   cfg: Any, prompt: bool, train_stats: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(retrieval dict, route -> (n_test, S) predictions) of one model on the test slides. ``train_stats``:
    (mean, SD) of the training slides' log2 expression per gene (the prompt profiles' base)."""
    from morphomol.studies.slides.align import embed_data
    from morphomol.studies.slides.evaluate import prompt_predict, retrieval, soft_knn
    from morphomol.studies.slides.models import embed_rna_only

    zs, zr = embed_data(model, data, cfg.align.batch_size)
    ret = retrieval(zs[test_idx], zr[test_idx], cfg.retrieval_ks)
    temp = cfg.prompting.knn_temperature or float(1.0 / model.scale.detach())
    preds = {"knn": soft_knn(zs[test_idx], zr[train_idx], tables.Y[train_idx], cfg.prompting.knn_k, temp)}
    if prompt:
        stats = train_stats if train_stats is not None else _gene_stats(tables, train_idx)
        preds["prompt"] = prompt_predict(lambda L: embed_rna_only(model, rna_enc.transform(L)), stats,
                                         tables.set_index, cfg.prompting.raise_sd, zs[train_idx], tables.Y[train_idx],
                                         zs[test_idx])
    return ret, preds


def _gene_stats(tables: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, SD) per gene over ``rows`` of the expression (streamed; equal to ``L[rows].mean / .std``)."""
    mean, var = tables.expr.row_stats(rows)
    return mean, np.sqrt(var)


def summarise(per_set: pd.DataFrame, tables: Any, grounded: tuple[str, ...]) -> dict[str, float]:
    """Mean R² over grounded / other real / null sets."""
    null = tables.is_null()
    names = np.array(tables.set_names)
    g = np.isin(names, list(grounded)) & ~null
    out = {}
    for label, m in (("grounded", g), ("other", ~g & ~null), ("null", null)):
        v = per_set["r2"].to_numpy()[m]
        out[f"mean_r2_{label}"] = float(np.nanmean(v)) if m.any() and np.isfinite(v).any() else float("nan")
    return out


def run_fold(*, setting: str, fold: int, folds: str | Path, embeddings: Mapping[str, str | Path], expression: str | Path,
             scores: str | Path, sets: str | Path, cfg: Any, seed: int, out_metrics: str | Path,
             out_predictions: str | Path, out_checkpoint: str | Path, out_checkpoint_meta: str | Path,
             rna_weights: str | None = None, rna_overrides: Mapping[str, Any] | None = None,
             threads: int | None = None) -> dict[str, Any]:
    """The ``slides_fold`` rule (see the module doc). ``cfg``: SlidesConfig. ``embeddings``: slide -> its
    embedding (``slides/embeddings/{group}/{sample}.zarr``). Reads every input named, and nothing else."""
    from safetensors.numpy import save_file

    from morphomol.studies.slides.align import AlignData, build_model, train_align
    from morphomol.studies.slides.data import load_cohort_tables, make_inputs, slide_partitions
    from morphomol.studies.slides.embed import make_rna_encoder, reduce_slides
    from morphomol.studies.slides.evaluate import set_metrics
    from morphomol.train.checkpoint import cpu_state
    from morphomol.util.atomic import atomic_path
    from morphomol.util.hashing import digest, ids_digest, stat_digest
    from morphomol.util.jsonio import write_json

    t0 = time.perf_counter()
    tables = load_cohort_tables(expression, scores, sets)
    part = slide_partitions(folds, fold, tables.samples, file=folds)
    fit_i, val_i, test_i = (np.flatnonzero(part == p) for p in ("fit", "val", "test"))
    train_i = np.concatenate([fit_i, val_i])
    inputs = make_inputs(setting, embeddings, tables.samples, cfg=cfg)
    bag = inputs.bag
    inputs, slide_pca = reduce_slides(inputs, fit_i, cfg.slide_pca_components)
    rna_enc = make_rna_encoder(cfg.rna_encoder, n_components=cfg.pca_components, n_genes=cfg.pca_genes,
                               min_mean=cfg.pca_min_mean,
                               weights=rna_weights, overrides=rna_overrides).fit_matrix(tables.expr, fit_i)
    data = AlignData(list(tables.samples), {**inputs.arrays(), "rna": rna_enc.transform_matrix(tables.expr)},
                     inputs.bags)
    log.info("%s fold %d: %d fit / %d val / %d test slides, %d gene sets, slide input %s, RNA %s (%d-d)", setting, fold,
             len(fit_i), len(val_i), len(test_i), len(tables.set_names), "bag" if bag else "vector", cfg.rna_encoder,
             rna_enc.dim)
    fp = {"setting": setting, "fold": str(fold), "config": digest(cfg), "ids": ids_digest(tables.samples),
          "inputs": digest([stat_digest(p) for p in (folds, expression, scores, sets, *embeddings.values())])}
    work = Path(out_metrics).parent
    model = build_model(data.subset(fit_i), cfg.align, bag=bag, seed=seed)
    untrained = copy.deepcopy(model).eval()
    res = train_align(model, data.subset(fit_i), data.subset(val_i), cfg.align, work_dir=work / ".train", seed=seed,
                      fingerprint={**fp, "model": "trained"}, threads=threads)
    perm_data = data.subset(train_i)
    perm_fit = permuted_pairs(perm_data.subset(np.arange(len(fit_i))), seed + fold)
    perm_val = permuted_pairs(perm_data.subset(np.arange(len(fit_i), len(train_i))), seed + fold + 1)
    permuted = build_model(perm_fit, cfg.align, bag=bag, seed=seed)
    res_p = train_align(permuted, perm_fit, perm_val, cfg.align, work_dir=work / ".permuted", seed=seed,
                        fingerprint={**fp, "model": "permuted"}, threads=threads)

    retrieval, per_set, rows, summary = {}, {}, [], {}
    y_test = tables.Y[test_i]
    train_stats = _gene_stats(tables, train_i)
    for name, m in (("trained", model), ("untrained", untrained), ("permuted", permuted)):
        ret, preds = evaluate_model(m, data, tables, rna_enc, train_idx=train_i, test_idx=test_i, cfg=cfg,
                                    prompt=name != "untrained", train_stats=train_stats)
        retrieval[name] = ret
        for route, yhat in preds.items():
            ps = set_metrics(y_test, yhat, tables.set_names)
            key = f"{route}_{name}"
            per_set[key] = ps
            summary[key] = summarise(ps, tables, cfg.gene_sets.grounded)
            rows.append(pd.DataFrame({"sample_id": np.repeat(np.array(tables.samples)[test_i], len(tables.set_names)),
                                      "gene_set": np.tile(tables.set_names, len(test_i)), "route": route, "model": name,
                                      "y": y_test.ravel(), "y_hat": yhat.ravel()}))
    gene_sets = {s: {k: {"r2": float(v.at[s, "r2"]), "pearson": float(v.at[s, "pearson"])} for k, v in per_set.items()}
                 for s in tables.set_names}
    metrics = {
        "setting": setting, "fold": int(fold), "kind": "slides_align", "status": "ok",
        "n_fit": int(len(fit_i)), "n_val": int(len(val_i)), "n_test": int(len(test_i)),
        "slide_encoder": setting, "rna_encoder": cfg.rna_encoder, "rna_dim": int(rna_enc.dim),
        "n_gene_sets": len(tables.set_names), "retrieval": retrieval, "summary": summary, "gene_sets": gene_sets,
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "best_val_infonce": res.best_val,
        "validation": "val partition" if len(val_i) else "none", "selection": res.selection,
        "train_seconds": res.train_seconds, "slides_per_second": res.tiles_per_second,
        "temperature": float(1.0 / model.scale.detach()), "permuted_best_epoch": res_p.best_epoch,
        "history": res.history, "seconds": time.perf_counter() - t0,
    }
    pred = pd.concat(rows, ignore_index=True)
    for c in ("sample_id", "gene_set", "route", "model"):
        pred[c] = pred[c].astype("category")
    pred[["y", "y_hat"]] = pred[["y", "y_hat"]].astype(np.float32)
    with atomic_path(out_predictions) as tmp:
        pred.to_parquet(tmp, index=False)
    state = {k: v.numpy() for k, v in cpu_state(model).items()}
    with atomic_path(out_checkpoint) as tmp:
        save_file({**state, **rna_enc.state(), **slide_pca}, str(tmp), metadata={"setting": setting, "format": "morphomol-slides"})
    write_json(out_checkpoint_meta, {"setting": setting, "fold": int(fold), "rna_encoder": cfg.rna_encoder,
                                     "rna_genes": list(getattr(rna_enc, "genes", [])), "bag": bag,
                                     "slides": {p: list(np.array(tables.samples)[i]) for p, i in
                                                (("fit", fit_i), ("val", val_i), ("test", test_i))},
                                     "config": cfg, "seed": seed, "fingerprint": fp})
    write_json(out_metrics, metrics)
    s = summary["knn_trained"]
    log.info("%s fold %d: recall@%d slide->RNA %.2f (untrained %.2f, permuted %.2f, chance %.2f); soft-kNN R² grounded "
             "%.2f / other %.2f / null %.2f; %.1f s", setting, fold, cfg.retrieval_ks[-1],
             retrieval["trained"]["slide_to_rna"][f"recall@{cfg.retrieval_ks[-1]}"],
             retrieval["untrained"]["slide_to_rna"][f"recall@{cfg.retrieval_ks[-1]}"],
             retrieval["permuted"]["slide_to_rna"][f"recall@{cfg.retrieval_ks[-1]}"],
             retrieval["trained"]["chance"][f"recall@{cfg.retrieval_ks[-1]}"], s["mean_r2_grounded"],
             s["mean_r2_other"], s["mean_r2_null"], metrics["seconds"])
    return metrics
