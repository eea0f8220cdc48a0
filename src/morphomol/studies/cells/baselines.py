"""Baselines on the same folds and the same evaluated cells as the LLM (torch-free).

Gene -> cell type, fitted on the fold's fit cells (the cells the LLM trains on: the validation donors only
give the LLM its validation loss), on the log-normalised HVG matrix the cell sentences come from
(:mod:`.sentences`), kept sparse (CSR) end to end. Hyper-parameters are chosen per fold by an inner CV
grouped by donor over the fit donors only (``GroupKFold``, ``baselines.inner_folds`` splits, at most one per
fit donor; accuracy on the held-out donors): logistic regression's ``C`` (``lr_c_grid``) and scaling
(standardised or not, ``lr_standardise``), kNN's ``k`` (``knn_k_grid``, on the kNN reference). With fewer
than two fit donors no inner CV is possible: the stated defaults (``lr_c``, standardised, ``knn_k``) are
used. The values chosen and the inner-CV accuracies are in metrics.json (``hyperparameters``) and the ladder:

* ``majority``: the most frequent fit label;
* ``logreg``: multinomial logistic regression (L2, ``C``) on HVG log1p (standardised or not), fitted on
  every fit cell; the standardisation is applied inside the objective (:mod:`.logreg`), so the CSR matrix is
  never centred (densified) and the problem and optimiser are scikit-learn's ``StandardScaler`` +
  ``LogisticRegression`` ones; the inner CV runs on the kNN reference (at most ``max_reference`` fit cells);
* ``knn``: k-nearest neighbours (cosine) on the first ``knn_pcs`` principal components, with a bounded
  reference: at most ``baselines.max_reference`` fit cells (a seeded subsample; all of them when the fold
  has fewer, i.e. the whole fit set as before), whose PCA it is; queries are answered in blocks, so time is
  linear in the evaluated cells and memory independent of the cohort;
* ``logreg_shuffled``: the same logistic regression (the chosen ``C`` and scaling) fitted on permuted fit
  labels (null control: what "learning" from these features scores by chance).

With H&E patches (the modality matrix): ``logreg_image`` (16 x 16 RGB thumbnail of the patch, standardised)
and ``logreg_both`` (HVG log1p and thumbnail features side by side, sparse, standardised likewise), fitted
on at most ``max_reference`` fit cells with a patch (seeded subsample), with the default ``lr_c``. The sizes used are in metrics.json
(``knn_reference``, ``image_reference``).

Memory: the fit cells' sparse HVG matrix (float64 values of the float32-rounded log1p, int32 columns) plus a
bounded reference (and the inner CV's copies of its rows); the unit tables are read in row blocks (:func:`~.sentences.iter_hvg_rows`) and image
stores chunk by chunk, twice (fitting, then predicting the evaluated cells block by block).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.studies.cells.config import CellsBaselinesConfig
from morphomol.studies.cells.folds import eval_subset, read_fold
from morphomol.studies.cells.logreg import StandardisedLogisticRegression
from morphomol.studies.cells.metrics import PARTITIONS, results_table
from morphomol.studies.cells.sentences import iter_hvg_rows
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.baselines")

THUMB = 16
#: query rows per kNN / dense block
QUERY_BLOCK = 4096


# ------------------------------------------------------------------------------ inputs
class _Rows:
    """Table positions of each sample (in the table's sample order) and their unit-table rows."""

    def __init__(self, table: pd.DataFrame, units: Mapping[str, str | Path]) -> None:
        self.samples = list(dict.fromkeys(table["sample_id"].astype(str)))
        missing = [s for s in self.samples if s not in units]
        if missing:
            raise InputError(f"no unit table for sample(s) {missing}", field="units")
        self.paths = [units[s] for s in self.samples]
        self.sample_of = table["sample_id"].astype(str).to_numpy(object)
        self.code = pd.Categorical(self.sample_of, categories=self.samples).codes.astype(np.int64)
        self.index = table["index"].to_numpy(np.int64)

    def rows(self, positions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sample: (unit rows ascending, the table positions they belong to)."""
        p = np.asarray(positions, np.int64)
        p = p[np.lexsort((self.index[p], self.code[p]))]
        cuts = np.searchsorted(self.code[p], np.arange(len(self.samples) + 1))
        return [(self.index[p[a:b]], p[a:b]) for a, b in pairwise(cuts.tolist())]

    def blocks(self, positions: np.ndarray, hvg: Sequence[str], values: str) -> Any:
        """``(table positions, float32-rounded log1p HVG values as float64 CSR)`` in row blocks."""
        per = self.rows(positions)
        for i, got, X in iter_hvg_rows(self.paths, [r for r, _ in per], hvg, values):
            r, p = per[i]
            X.data = X.data.astype(np.float32).astype(np.float64)
            yield p[np.searchsorted(r, got)], X


def _gather(rows: _Rows, positions: np.ndarray, hvg: Sequence[str], values: str) -> sp.csr_matrix:
    """Sparse HVG matrix of ``positions`` (rows in that order), assembled from row blocks."""
    dest_of = np.full(len(rows.index), -1, np.int64)
    dest_of[positions] = np.arange(len(positions))
    parts = []
    nnz_row = np.zeros(len(positions), np.int64)
    for pos, X in rows.blocks(positions, hvg, values):
        d = dest_of[pos]
        nnz_row[d] = np.diff(X.indptr)
        parts.append((d, X.indptr, X.data.astype(np.float32), X.indices.astype(np.int32)))
    indptr = np.zeros(len(positions) + 1, np.int64)
    np.cumsum(nnz_row, out=indptr[1:])
    data = np.empty(int(indptr[-1]), np.float64)
    indices = np.empty(int(indptr[-1]), np.int32)
    for d, ip, x, ix in parts:
        lens = np.diff(ip)
        dst = np.repeat(indptr[d] - ip[:-1], lens) + np.arange(len(x))
        data[dst] = x
        indices[dst] = ix
    del parts
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(positions), len(hvg)))


def _thumbs(rows: _Rows, positions: np.ndarray, stores: Mapping[str, str | Path]) -> np.ndarray:
    """(len(positions), 16*16*3) float32 thumbnails of the cells' patches, read chunk by chunk."""
    import zarr
    from PIL import Image

    out = np.zeros((len(positions), THUMB * THUMB * 3), np.float32)
    samples = rows.sample_of[positions]
    idx = rows.index[positions]
    for s in dict.fromkeys(samples):
        if s not in stores:
            raise InputError(f"sample {s} has cells with an H&E patch but no image store", field="images",
                             expected="the sample's images.zarr")
        arr = zarr.open_group(str(stores[s]), mode="r")["images"]
        k = np.flatnonzero(samples == s)
        k = k[np.argsort(idx[k], kind="stable")]
        c = int(arr.chunks[0])
        chunk = idx[k] // c
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        for ks in np.split(k, bounds):
            lo = int(idx[ks[0]] // c) * c
            imgs = np.asarray(arr[lo:min(lo + c, arr.shape[0])])
            for j in ks:
                im = Image.fromarray(imgs[idx[j] - lo]).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
                out[j] = np.asarray(im, np.float32).ravel() / 255.0
    return out


def _subsample(positions: np.ndarray, max_n: int, seed: int, stream: int) -> np.ndarray:
    """All ``positions`` when at most ``max_n``, else a seeded subsample (kept in order)."""
    if len(positions) <= max_n:
        return positions
    rng = np.random.default_rng([int(seed), stream, len(positions)])
    return positions[np.sort(rng.choice(len(positions), int(max_n), replace=False))]


# ------------------------------------------------------------------------------ models
def _lr(cfg: CellsBaselinesConfig, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=cfg.lr_c, max_iter=cfg.lr_max_iter, random_state=seed)


def _lr_dense(cfg: CellsBaselinesConfig, seed: int) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), _lr(cfg, seed))


def _lr_sparse(cfg: CellsBaselinesConfig, C: float | None = None, standardise: bool = True
               ) -> StandardisedLogisticRegression:
    return StandardisedLogisticRegression(C=cfg.lr_c if C is None else C, max_iter=cfg.lr_max_iter,
                                          standardise=standardise)


def _pca(cfg: CellsBaselinesConfig, n_ref: int, n_feat: int) -> Any:
    from sklearn.decomposition import PCA

    return PCA(n_components=max(1, min(cfg.knn_pcs, n_ref - 1, n_feat)), random_state=0)


def _knn(cfg: CellsBaselinesConfig, n_ref: int, n_feat: int, k: int | None = None) -> Any:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline

    return make_pipeline(_pca(cfg, n_ref, n_feat),
                         KNeighborsClassifier(n_neighbors=min(cfg.knn_k if k is None else k, n_ref), metric="cosine"))


# ------------------------------------------------------------------------------ inner CV (fit donors only)
def inner_splits(donors: np.ndarray, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Donor-grouped (train, held-out) row splits over ``donors`` (the fit donors of one outer fold):
    ``GroupKFold`` with ``min(n_splits, donors)`` splits; empty with fewer than two donors."""
    from sklearn.model_selection import GroupKFold

    n_donors = len(set(donors.tolist()))
    if n_donors < 2:
        return []
    gkf = GroupKFold(n_splits=min(int(n_splits), n_donors))
    return [(tr, te) for tr, te in gkf.split(np.zeros(len(donors)), groups=donors)]


def _votes(codes: np.ndarray, ks: Sequence[int], n_classes: int) -> dict[int, np.ndarray]:
    """Majority class code among the first k neighbours (rows sorted by distance), for every k; ties go to
    the smallest code (scikit-learn's uniform-weight vote)."""
    out = {}
    counts = np.zeros((codes.shape[0], n_classes), np.int32)
    rows = np.arange(codes.shape[0])
    done = 0
    for k in sorted(ks):
        for j in range(done, k):
            np.add.at(counts, (rows, codes[:, j]), 1)
        done = k
        out[k] = np.argmax(counts, axis=1)
    return out


def select_hyperparameters(X: sp.csr_matrix, y: np.ndarray, donors: np.ndarray, cfg: CellsBaselinesConfig
                           ) -> dict[str, Any]:
    """Logistic regression's C and scaling and kNN's k for one outer fold, by inner donor-grouped CV on
    ``X`` / ``y`` (cells of the fit donors only; the kNN reference). Returns the chosen values, the mean
    held-out accuracy of every candidate, and how they were chosen."""
    from sklearn.neighbors import NearestNeighbors

    splits = inner_splits(np.asarray(donors, dtype=object), cfg.inner_folds)
    splits = [(tr, te) for tr, te in splits if len(set(y[tr].tolist())) >= 2 and len(te)]
    default = {"logreg": {"C": float(cfg.lr_c), "standardise": True}, "knn": {"k": int(cfg.knn_k)}}
    n_donors = len(set(np.asarray(donors, dtype=object).tolist()))
    if not splits:
        why = (f"{n_donors} fit donor(s): no inner CV, defaults" if n_donors < 2
               else f"no inner split with two cell types among {n_donors} fit donors: defaults")
        return {**default, "selection": why, "inner_splits": 0, "fit_donors": n_donors, "scores": {}}
    lr_scores: dict[tuple[float, bool], list[float]] = {}
    knn_scores: dict[int, list[float]] = {}
    classes, yc = np.unique(y, return_inverse=True)
    for tr, te in splits:
        Xtr, Xte = X[tr], X[te]
        for std in cfg.lr_standardise:
            for C in cfg.lr_c_grid:
                m = _lr_sparse(cfg, float(C), bool(std)).fit(Xtr, y[tr])
                lr_scores.setdefault((float(C), bool(std)), []).append(float((m.predict(Xte) == y[te]).mean()))
        ks = sorted({min(int(k), len(tr)) for k in cfg.knn_k_grid})
        D = Xtr.toarray().astype(np.float32)
        pca = _pca(cfg, len(tr), X.shape[1]).fit(D)
        nn = NearestNeighbors(n_neighbors=max(ks), metric="cosine").fit(pca.transform(D))
        del D
        hits = {k: 0 for k in ks}
        for i in range(0, len(te), QUERY_BLOCK):
            q = te[i:i + QUERY_BLOCK]
            idx = nn.kneighbors(pca.transform(X[q].toarray().astype(np.float32)), return_distance=False)
            for k, pred in _votes(yc[tr][idx], ks, len(classes)).items():
                hits[k] += int((pred == yc[q]).sum())
        for k0 in cfg.knn_k_grid:
            k = min(int(k0), len(tr))
            knn_scores.setdefault(int(k0), []).append(hits[k] / len(te))
    lr_mean = {key: float(np.mean(v)) for key, v in lr_scores.items()}
    knn_mean = {k: float(np.mean(v)) for k, v in knn_scores.items()}
    C, std = max(lr_mean, key=lambda key: (lr_mean[key], -abs(np.log(key[0] / cfg.lr_c)), key[1]))
    k = max(knn_mean, key=lambda k: (knn_mean[k], -abs(k - cfg.knn_k)))
    return {"logreg": {"C": C, "standardise": std}, "knn": {"k": int(k)},
            "selection": f"inner {len(splits)}-fold donor-grouped CV over {n_donors} fit donors, on accuracy",
            "inner_splits": len(splits), "fit_donors": n_donors,
            "scores": {"logreg": [{"C": c, "standardise": s_, "accuracy": a} for (c, s_), a in lr_mean.items()],
                       "knn": [{"k": kk, "accuracy": a} for kk, a in knn_mean.items()]}}


def describe_choice(hp: Mapping[str, Any]) -> str:
    """``C = 1, standardised; k = 15`` (the words of the ladder's notes)."""
    lr, knn = hp["logreg"], hp["knn"]
    return (f"logistic regression C = {lr['C']:g}, {'standardised' if lr['standardise'] else 'not standardised'}; "
            f"kNN k = {knn['k']}")


def _predict_dense(model: Any, X: sp.csr_matrix) -> np.ndarray:
    out = [model.predict(X[i:i + QUERY_BLOCK].toarray().astype(np.float32)) for i in range(0, X.shape[0], QUERY_BLOCK)]
    return np.concatenate(out) if out else np.zeros(0, object)


# ------------------------------------------------------------------------------ rule entry
def run_baselines(*, fold_table: str | Path, fold_meta: str | Path, units: Mapping[str, str | Path],
                  image_stores: Mapping[str, str | Path], out_predictions: str | Path, out_metrics: str | Path,
                  cfg: CellsBaselinesConfig, max_cells: int | None, seed: int) -> dict[str, Any]:
    """Rule entry (``cells_baselines``): predictions and metrics of every baseline on one fold."""
    table, meta = read_fold(fold_table, fold_meta, columns=[])
    rows = _Rows(table, units)
    hvg, values = meta["hvg"], meta["values"]
    y = table["label"].astype(str).to_numpy()
    fit = (table["partition"] == "fit").to_numpy()
    has_img = table["has_image"].to_numpy(bool)
    fit_pos = np.flatnonzero(fit)
    y_fit = y[fit]
    rng = np.random.default_rng([int(seed), 5])
    majority = pd.Series(y_fit).value_counts().sort_index().idxmax()

    # fitting: the fit cells' sparse HVG matrix; bounded references for kNN and the image models
    X_fit = _gather(rows, fit_pos, hvg, values)
    ref = _subsample(np.arange(len(fit_pos)), int(cfg.max_reference), seed, 23)
    donors_fit = table["patient_id"].astype(str).to_numpy(object)[fit_pos]
    X_ref = X_fit if len(ref) == len(fit_pos) else X_fit[ref]  # no copy when the reference is every fit cell
    hp = select_hyperparameters(X_ref, y_fit[ref], donors_fit[ref], cfg)
    del X_ref
    log.info("fold %s: %s (%s)", meta["fold"], describe_choice(hp), hp["selection"])
    knn = _knn(cfg, len(ref), X_fit.shape[1], hp["knn"]["k"]).fit(X_fit[ref].toarray().astype(np.float32), y_fit[ref])
    img_models: dict[str, Any] = {}
    img_fit = np.flatnonzero(fit & has_img)
    n_img_ref = 0
    if len(img_fit) >= 2 and len(set(y[img_fit])) >= 2:
        sel = _subsample(img_fit, int(cfg.max_reference), seed, 29)
        n_img_ref = len(sel)
        T = _thumbs(rows, sel, image_stores)
        img_models["logreg_image"] = _lr_dense(cfg, seed).fit(T, y[sel])
        fit_row = np.searchsorted(fit_pos, sel)
        img_models["logreg_both"] = _lr_sparse(cfg).fit(sp.hstack([X_fit[fit_row], sp.csr_matrix(T)], format="csr"),
                                                        y[sel])
        del T
    logreg = _lr_sparse(cfg, hp["logreg"]["C"], hp["logreg"]["standardise"]).fit(X_fit, y_fit)
    shuffled = _lr_sparse(cfg, hp["logreg"]["C"], hp["logreg"]["standardise"]).fit(X_fit, rng.permutation(y_fit))
    del X_fit

    # predicting: the evaluated cells, block by block
    cells_of = {part: eval_subset(table, part, max_cells, seed) for part in PARTITIONS}
    eval_pos = np.unique(np.concatenate([c.index.to_numpy() for c in cells_of.values()]))
    names = ["logreg", "knn", "logreg_shuffled", *img_models]
    pred = {m: np.empty(len(table), dtype=object) for m in names}
    for pos, X in rows.blocks(eval_pos, hvg, values):
        pred["knn"][pos] = _predict_dense(knn, X)
        pred["logreg"][pos] = logreg.predict(X)
        pred["logreg_shuffled"][pos] = shuffled.predict(X)
        im = has_img[pos]
        if img_models and im.any():
            T = _thumbs(rows, pos[im], image_stores)
            pred["logreg_image"][pos[im]] = img_models["logreg_image"].predict(T)
            pred["logreg_both"][pos[im]] = img_models["logreg_both"].predict(
                sp.hstack([X[np.flatnonzero(im)], sp.csr_matrix(T)], format="csr"))

    out = []
    ok = {"logreg_image": has_img, "logreg_both": has_img}
    for part in PARTITIONS:
        cells = cells_of[part]
        pos = cells.index.to_numpy()
        base = {"tile_id": cells["tile_id"].to_numpy(), "sample_id": cells["sample_id"].to_numpy(),
                "patient_id": cells["patient_id"].to_numpy(), "has_image": cells["has_image"].to_numpy(bool),
                "partition": part, "label": cells["label"].to_numpy(), "text": "", "margin": np.nan}
        out.append(pd.DataFrame({**base, "task": "gene_to_type", "mode": "majority", "pred": majority}))
        for name in names:
            keep = ok[name][pos] if name in ok else np.ones(len(pos), bool)
            if not keep.any():
                continue
            task = {"logreg_image": "image_to_type", "logreg_both": "image_genes_to_type"}.get(name, "gene_to_type")
            d = pd.DataFrame({k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in base.items()})
            d["task"], d["mode"], d["pred"] = task, name, pred[name][pos[keep]]
            out.append(d)
    preds = pd.concat(out, ignore_index=True)
    results = results_table(preds)
    for r in results:
        if r["partition"] == "test" and r["subset"] == "all":
            log.info("fold %s %s (%s): accuracy %.3f macro-F1 %.3f balanced %.3f (n=%d)", meta["fold"], r["mode"],
                     r["task"], r["accuracy"], r["macro_f1"], r["balanced_accuracy"], r["n"])
    with atomic_path(out_predictions) as tmp:
        preds.to_parquet(tmp, index=False)
    metrics = {"model": "baselines", "fold": meta["fold"], "results": results, "hvg": len(hvg),
               "majority": majority, "n_fit": int(fit.sum()), "knn_reference": len(ref),
               "image_reference": int(n_img_ref), "max_reference": int(cfg.max_reference), "hyperparameters": hp}
    write_json(out_metrics, metrics)
    log.info("fold %s: kNN reference %d of %d fit cells, image models on %d cells (max_reference %d)", meta["fold"],
             len(ref), len(fit_pos), n_img_ref, cfg.max_reference)
    return metrics
