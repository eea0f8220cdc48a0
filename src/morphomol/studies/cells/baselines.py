"""Baselines on the same folds and the same evaluated cells as the LLM (torch-free).

Gene -> cell type, fitted on the fold's fit cells, on the log-normalised HVG matrix the cell sentences
come from (:mod:`.sentences`):

* ``majority``: the most frequent fit label;
* ``logreg``: multinomial logistic regression (L2, ``C``) on standardised HVG log1p;
* ``knn``: k-nearest neighbours (cosine) on the first ``knn_pcs`` principal components;
* ``logreg_shuffled``: the same logistic regression fitted on permuted fit labels (null control: what
  "learning" from these features scores by chance).

With H&E patches (the modality matrix): ``logreg_image`` (16 x 16 RGB thumbnail of the patch) and
``logreg_both`` (HVG log1p and thumbnail features side by side), fitted on the fit cells with a patch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.studies.cells.config import CellsBaselinesConfig
from morphomol.studies.cells.metrics import PARTITIONS, results_table
from morphomol.studies.cells.folds import eval_subset, read_fold
from morphomol.studies.cells.sentences import hvg_matrix
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.baselines")

THUMB = 16


def _thumbs(table: pd.DataFrame, stores: Mapping[str, str | Path]) -> np.ndarray:
    """(N, 16*16*3) float32 thumbnails of the cells' patches (rows without a patch are zeros)."""
    import zarr
    from PIL import Image

    out = np.zeros((len(table), THUMB * THUMB * 3), np.float32)
    samples = table["sample_id"].to_numpy()
    has = table["has_image"].to_numpy(bool)
    idx = table["index"].to_numpy(np.int64)
    for s in dict.fromkeys(samples[has]):
        imgs = np.asarray(zarr.open_group(str(stores[s]), mode="r")["images"][:])
        for pos in np.flatnonzero((samples == s) & has):
            im = Image.fromarray(imgs[idx[pos]]).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
            out[pos] = np.asarray(im, np.float32).ravel() / 255.0
    return out


def _lr(cfg: CellsBaselinesConfig, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.lr_c, max_iter=cfg.lr_max_iter, random_state=seed))


def _knn(cfg: CellsBaselinesConfig, n_fit: int, n_feat: int) -> Any:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline

    pcs = max(1, min(cfg.knn_pcs, n_fit - 1, n_feat))
    return make_pipeline(PCA(n_components=pcs, random_state=0),
                         KNeighborsClassifier(n_neighbors=min(cfg.knn_k, n_fit), metric="cosine"))


def run_baselines(*, fold_table: str | Path, fold_meta: str | Path, units: Mapping[str, str | Path],
                  image_stores: Mapping[str, str | Path], out_predictions: str | Path, out_metrics: str | Path,
                  cfg: CellsBaselinesConfig, max_cells: int | None, seed: int) -> dict[str, Any]:
    """Rule entry (``cells_baselines``): predictions and metrics of every baseline on one fold."""
    table, meta = read_fold(fold_table, fold_meta)
    samples = list(dict.fromkeys(table["sample_id"]))
    missing = [s for s in samples if s not in units]
    if missing:
        raise InputError(f"no unit table for sample(s) {missing}", field="units")
    X = hvg_matrix([units[s] for s in samples], [table.loc[table["sample_id"] == s, "index"].to_numpy() for s in samples],
                   meta["hvg"], meta["values"]).toarray().astype(np.float32)
    order = np.concatenate([np.flatnonzero((table["sample_id"] == s).to_numpy()) for s in samples])
    Xt = np.empty_like(X)
    Xt[order] = X
    y = table["label"].astype(str).to_numpy()
    fit = (table["partition"] == "fit").to_numpy()
    rng = np.random.default_rng([int(seed), 5])
    models: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {}
    y_fit = y[fit]
    majority = pd.Series(y_fit).value_counts().sort_index().idxmax()
    models["logreg"] = (_lr(cfg, seed).fit(Xt[fit], y_fit), Xt, np.ones(len(y), bool))
    models["knn"] = (_knn(cfg, int(fit.sum()), Xt.shape[1]).fit(Xt[fit], y_fit), Xt, np.ones(len(y), bool))
    models["logreg_shuffled"] = (_lr(cfg, seed).fit(Xt[fit], rng.permutation(y_fit)), Xt, np.ones(len(y), bool))
    has_img = table["has_image"].to_numpy(bool)
    if (fit & has_img).sum() >= 2 and len(set(y[fit & has_img])) >= 2:
        T = _thumbs(table, image_stores)
        both = np.concatenate([Xt, T], axis=1)
        sel = fit & has_img
        models["logreg_image"] = (_lr(cfg, seed).fit(T[sel], y[sel]), T, has_img)
        models["logreg_both"] = (_lr(cfg, seed).fit(both[sel], y[sel]), both, has_img)
    rows = []
    for part in PARTITIONS:
        cells = eval_subset(table, part, max_cells, seed)
        pos = cells.index.to_numpy()
        base = {"tile_id": cells["tile_id"].to_numpy(), "sample_id": cells["sample_id"].to_numpy(),
                "patient_id": cells["patient_id"].to_numpy(), "has_image": cells["has_image"].to_numpy(bool),
                "partition": part, "label": cells["label"].to_numpy(), "text": "", "margin": np.nan}
        rows.append(pd.DataFrame({**base, "task": "gene_to_type", "mode": "majority", "pred": majority}))
        for name, (model, feats, ok) in models.items():
            keep = ok[pos]
            if not keep.any():
                continue
            task = {"logreg_image": "image_to_type", "logreg_both": "image_genes_to_type"}.get(name, "gene_to_type")
            d = pd.DataFrame({k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in base.items()})
            d["task"], d["mode"], d["pred"] = task, name, model.predict(feats[pos[keep]])
            rows.append(d)
    preds = pd.concat(rows, ignore_index=True)
    results = results_table(preds)
    for r in results:
        if r["partition"] == "test" and r["subset"] == "all":
            log.info("fold %s %s (%s): accuracy %.3f macro-F1 %.3f balanced %.3f (n=%d)", meta["fold"], r["mode"],
                     r["task"], r["accuracy"], r["macro_f1"], r["balanced_accuracy"], r["n"])
    with atomic_path(out_predictions) as tmp:
        preds.to_parquet(tmp, index=False)
    metrics = {"model": "baselines", "fold": meta["fold"], "results": results, "hvg": len(meta["hvg"]),
               "majority": majority, "n_fit": int(fit.sum())}
    write_json(out_metrics, metrics)
    return metrics
