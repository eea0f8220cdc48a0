"""Evaluation of an aligned space: retrieval, the two gene-set prompting routes, per-set R² / Pearson.

* Retrieval: slide -> RNA and RNA -> slide recall@k among the held-out pairs of a fold (all of them
  at once: one chunk), through :func:`morphomol.eval.metrics.recall_at_k` (ties count against the
  query); chance = k / n. Only for k < n: with n held-out pairs recall@n is 1 by construction, so a
  k >= n is NaN (with the reason under ``not_computable``).
* Soft-kNN route (the seed's): a slide's score for every set = softmax-weighted mean of the ssGSEA
  scores of its ``k`` nearest *reference RNA profiles* (the training slides' RNA embeddings) in the
  aligned space; weights ``softmax(cos / temperature)`` (the model's learned temperature unless
  configured).
* Direct prompting: a prompt profile = the training slides' mean log2 expression with the set's genes
  raised by ``raise_sd`` training SDs -> RNA encoder -> projection; the raw score of a slide is
  ``cos(slide, prompt) - cos(slide, base)`` (base = the unraised mean profile); a per-set linear
  calibration (least squares) is fit on the training slides' raw scores vs their measured ssGSEA
  scores and applied to the held-out slides.
* Per set: R² = 1 - SS_res / SS_tot over the held-out slides (can be negative; 0 = predicting their
  mean) and Pearson (:func:`morphomol.eval.metrics.column_pearson`; NaN for constant predictions).
  Both need at least :data:`MIN_SET_SLIDES` (3) held-out slides: with 2 points Pearson is ±1 by
  construction and R² compares against the mean of two values (R² of -451 seen), so they are NaN below.
  Fewer than :data:`FEW_TEST_SLIDES` (10) held-out slides is flagged in the tables (computed, but too few
  for the number to mean much).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from morphomol.eval.metrics import column_pearson, recall_at_k

#: fewest held-out slides for a per-set R² / Pearson (below: NaN; with 2 slides r = ±1 by construction)
MIN_SET_SLIDES = 3
#: fewer held-out slides than this: the tables flag the numbers ("too few test slides to mean much")
FEW_TEST_SLIDES = 10


def recall_computable(k: int, n: int) -> bool:
    """Whether recall@k among ``n`` pairs says anything: k < n (recall@n is 1 by construction)."""
    return int(k) < int(n)


def recall_reason(k: int, n: int) -> str:
    return f"{n} test slides <= k = {k}: recall@{k} is 1 by construction"


def retrieval(z_slide: np.ndarray, z_rna: np.ndarray, ks: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Recall@k in both directions among all pairs (rows) and the chance level k / n; NaN for every k >= n
    (listed with the reason under ``not_computable``)."""
    n = len(z_slide)
    if n < 2:  # one test slide (a fold of a 2-patient cohort): no recall@k at all
        s2r = r2s = {}
    else:
        s2r = recall_at_k(z_slide, z_rna, ks=tuple(ks), chunk_size=n, seed=seed)
        r2s = recall_at_k(z_rna, z_slide, ks=tuple(ks), chunk_size=n, seed=seed)
    ok = {k: recall_computable(k, n) for k in ks}
    nan = float("nan")
    return {"slide_to_rna": {f"recall@{k}": float(s2r[f"recall@{k}"]) if ok[k] else nan for k in ks},
            "rna_to_slide": {f"recall@{k}": float(r2s[f"recall@{k}"]) if ok[k] else nan for k in ks},
            "chance": {f"recall@{k}": float(k / n) if ok[k] else nan for k in ks}, "n_pairs": n,
            "not_computable": {f"recall@{k}": recall_reason(k, n) for k in ks if not ok[k]}}


def soft_knn(z_query: np.ndarray, z_ref: np.ndarray, y_ref: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """(n_query, S) softmax-weighted mean of ``y_ref`` over each query's ``k`` most similar references."""
    zq = z_query / np.maximum(np.linalg.norm(z_query, axis=1, keepdims=True), 1e-12)
    zr = z_ref / np.maximum(np.linalg.norm(z_ref, axis=1, keepdims=True), 1e-12)
    sim = zq @ zr.T
    k = int(min(k, sim.shape[1]))
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sim, top, axis=1) / max(float(temperature), 1e-6)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("qk,qks->qs", w, np.asarray(y_ref, np.float64)[top])


def prompt_profiles(L_train: np.ndarray | tuple[np.ndarray, np.ndarray], set_index: Sequence[np.ndarray],
                    raise_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """(base profile (1, G), prompts (S, G)): the training mean with each set's genes raised by ``raise_sd`` SDs.
    ``L_train``: the training slides' (n, G) log2 expression, or its per-gene (mean, SD) already computed."""
    if isinstance(L_train, tuple):
        mean, sd = (np.asarray(v, np.float64) for v in L_train)
    else:
        mean = L_train.mean(axis=0)
        sd = L_train.std(axis=0)
    prompts = np.repeat(mean[None, :], len(set_index), axis=0)
    for i, idx in enumerate(set_index):
        prompts[i, idx] += raise_sd * sd[idx]
    return mean[None, :], prompts


def prompt_raw(z_slide: np.ndarray, z_base: np.ndarray, z_prompts: np.ndarray) -> np.ndarray:
    """(n, S) cosine to each prompt minus cosine to the base profile (embeddings L2-normalised)."""
    return z_slide @ z_prompts.T - z_slide @ z_base.T


def calibrate(raw_train: np.ndarray, y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-set least-squares ``y = a * raw + b`` on the training slides; a = 0 where raw is constant."""
    xm, ym = raw_train.mean(axis=0), y_train.mean(axis=0)
    xc, yc = raw_train - xm, y_train - ym
    var = (xc * xc).sum(axis=0)
    a = np.where(var > 1e-12, (xc * yc).sum(axis=0) / np.maximum(var, 1e-12), 0.0)
    return a, ym - a * xm


def set_metrics(y: np.ndarray, y_hat: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Per set (columns): ``r2`` and ``pearson`` of predictions vs measured scores over the rows; both NaN
    with fewer than :data:`MIN_SET_SLIDES` rows (see the module doc)."""
    y = np.asarray(y, np.float64)
    y_hat = np.asarray(y_hat, np.float64)
    index = pd.Index(list(names), name="gene_set")
    if len(y) < MIN_SET_SLIDES:
        nan = np.full(len(index), np.nan)
        return pd.DataFrame({"r2": nan, "pearson": nan.copy()}, index=index)
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    ss_res = ((y - y_hat) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)
    return pd.DataFrame({"r2": r2, "pearson": column_pearson(y, y_hat)}, index=index)


def knn_predict(z_slide_test: np.ndarray, z_rna_ref: np.ndarray, y_ref: np.ndarray, *, k: int,
                temperature: float) -> np.ndarray:
    return soft_knn(z_slide_test, z_rna_ref, y_ref, k, temperature)


def prompt_predict(embed_profiles: Callable[[np.ndarray], np.ndarray], L_train: np.ndarray | tuple[np.ndarray, np.ndarray],
                   set_index: Sequence[np.ndarray], raise_sd: float, z_train: np.ndarray, y_train: np.ndarray,
                   z_test: np.ndarray) -> np.ndarray:
    """Direct prompting, calibrated on the training slides: (n_test, S) predicted scores.

    ``embed_profiles(L) -> (n, P)`` maps log2 profiles into the aligned space (RNA encoder + head)."""
    base, prompts = prompt_profiles(L_train, set_index, raise_sd)
    zb, zp = embed_profiles(base), embed_profiles(prompts)
    a, b = calibrate(prompt_raw(z_train, zb, zp), y_train)
    return prompt_raw(z_test, zb, zp) * a + b
