"""The one implementation of the benchmark metrics: per-gene regression metrics and CLIP recall@k.

Every run kind (trained settings, Min-MAE, the ridge baseline) and every figure that quotes a
correlation uses these functions, so Table A.1 rows are computed one way.

Regression (Table A.1): for one fold, over *all* test tiles, per add-on gene: Pearson, Spearman
(Pearson of average ranks, ties averaged), MSE and MAE, in log1p space; the fold's summary is
the mean across genes.

Constant columns: a correlation is undefined when the true or the predicted values of a gene
are constant over the test tiles (zero variance). Such a gene gets ``NaN`` for Pearson and
Spearman (MSE/MAE stay defined); the fold means use ``nanmean`` over the genes where the
correlation is defined, and ``n_undefined`` counts the others. In JSON, NaN is written as
``null`` (:func:`morphomol.util.jsonio.write_json`).

Within-sample Pearson (the spots tables, beside the pooled one): :class:`WithinSamplePearson` scores each
sample's units alone and averages over samples, so that differences between samples (sequencing depth,
batch) do not count as prediction; streamed one sample at a time.

Retrieval (Table A.2): image -> transcript retrieval *within chunks* of ``chunk_size`` test
tiles (the paper's batch of 256). The test tiles are put in a seeded random order (so a chunk
mixes samples, as a shuffled test batch does), split into consecutive chunks of exactly
``chunk_size`` (a last, smaller remainder is dropped unless it is the only chunk), and in each
chunk every image embedding ranks the chunk's transcript embeddings by cosine similarity.
recall@k = fraction of images whose own transcript embedding is among the top k. The random
baseline is k / chunk size (0.0039 / 0.0195 at 256). Ties in similarity count against the
query (strictly greater similarities rank ahead, equal ones are counted too), so identical
embeddings for every tile do not score perfectly by accident.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: per-gene regression metrics, in the order of metrics.json
METRICS: tuple[str, ...] = ("pearson", "spearman", "mse", "mae")
#: direction of every metric the tables rank
HIGHER_IS_BETTER: dict[str, bool] = {
    "spearman": True,
    "pearson": True,
    "mse": False,
    "mae": False,
    "recall@1": True,
    "recall@5": True,
}
#: display names
METRIC_LABELS: dict[str, str] = {
    "spearman": "Spearman",
    "pearson": "Pearson",
    "mse": "MSE",
    "mae": "MAE",
    "recall@1": "Recall@1",
    "recall@5": "Recall@5",
}


def column_ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks per column (ties share their mean rank, as scipy.stats.rankdata); pandas
    instead of scipy.stats keeps every training job ~1 s quicker to start."""
    return pd.DataFrame(a).rank(axis=0, method="average").to_numpy(dtype=np.float64)


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson per column of two (N, G) arrays; NaN where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[~(den > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two vectors (NaN when either is constant or shorter than 2)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.float64).reshape(-1, 1)
    if len(x) < 2:
        return float("nan")
    return float(column_pearson(x, y)[0])


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman correlation (Pearson of average ranks) of two vectors; NaN when undefined."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.float64).reshape(-1, 1)
    if len(x) < 2:
        return float("nan")
    return float(column_pearson(column_ranks(x), column_ranks(y))[0])


def per_gene_metrics(y: np.ndarray, y_hat: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """Per-gene Pearson, Spearman, MSE, MAE; index = genes. ``y``/``y_hat``: (N, G) in log1p space."""
    y = np.asarray(y, dtype=np.float64)
    y_hat = np.asarray(y_hat, dtype=np.float64)
    if y.shape != y_hat.shape or y.ndim != 2 or y.shape[1] != len(genes):
        raise ValueError(f"shape mismatch: y {y.shape}, y_hat {y_hat.shape}, {len(genes)} genes")
    if y.shape[0] == 0:
        raise ValueError("no tiles to evaluate")
    if not np.isfinite(y_hat).all():
        raise ValueError("predictions contain NaN/inf")
    pear = column_pearson(y, y_hat)
    spear = column_pearson(column_ranks(y), column_ranks(y_hat))
    err = y_hat - y
    return pd.DataFrame({"pearson": pear, "spearman": spear, "mse": (err**2).mean(axis=0),
                         "mae": np.abs(err).mean(axis=0)}, index=pd.Index(list(genes), name="gene"))


def summarize(per_gene: pd.DataFrame) -> dict[str, float]:
    """Means across genes (NaN-safe); NaN only when no gene has a defined value."""
    out: dict[str, float] = {}
    for m in METRICS:
        v = per_gene[m].to_numpy(dtype=np.float64)
        out[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def regression_report(y: np.ndarray, y_hat: np.ndarray, genes: Sequence[str]) -> dict[str, Any]:
    """The metric part of metrics.json: ``genes``, ``mean``, ``per_gene``, ``n_undefined``."""
    pg = per_gene_metrics(y, y_hat, genes)
    return {
        "genes": list(genes),
        "mean": summarize(pg),
        "per_gene": {g: {m: float(pg.at[g, m]) for m in METRICS} for g in pg.index},
        "n_undefined": int(pg["pearson"].isna().sum()),
    }


def recall_at_k(img: np.ndarray, txt: np.ndarray, ks: Sequence[int] = (1, 5), chunk_size: int = 256,
                seed: int = 0) -> dict[str, Any]:
    """Image -> transcript recall@k within chunks of ``chunk_size`` (protocol in the module docstring)."""
    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"embedding shapes differ: {img.shape} vs {txt.shape}")
    n = img.shape[0]
    if n < 2:
        raise ValueError("need at least 2 pairs for retrieval")
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    order = np.random.default_rng(seed).permutation(n)
    size = min(chunk_size, n)
    chunks = [order[i:i + size] for i in range(0, n - size + 1, size)]
    hits = {k: 0 for k in ks}
    random = {k: 0.0 for k in ks}
    n_queries = 0
    for idx in chunks:
        sim = img[idx] @ txt[idx].T  # (c, c); row = image query, column = transcript candidate
        own = np.diag(sim)[:, None]
        # rank of the true partner: candidates at least as similar, excluding itself
        rank = (sim >= own).sum(axis=1) - 1
        for k in ks:
            hits[k] += int((rank < k).sum())
            random[k] += min(k, len(idx))  # expected hits of a random ranking
        n_queries += len(idx)
    out: dict[str, Any] = {"n_pairs": n, "chunk_size": size, "n_chunks": len(chunks), "n_queries": n_queries}
    for k in ks:
        out[f"recall@{k}"] = hits[k] / n_queries
        out[f"random_recall@{k}"] = random[k] / n_queries
    return out


# ------------------------------------------------------------------------------ within-sample Pearson
#: a sample takes part in a gene's within-sample Pearson only with at least this many test spots
WITHIN_MIN_UNITS = 10


class WithinSamplePearson:
    """Per-gene Pearson computed **within each sample**, then averaged over the samples (unweighted).

    The pooled Pearson of :func:`per_gene_metrics` runs over every test unit of a fold, so differences
    between samples (sequencing depth, batch) count as signal: predicting each sample's level is enough.
    Here each sample is scored alone; a (sample, gene) takes part only when the sample has at least
    ``min_units`` units and both the true and the predicted values of the gene vary within it. A gene's
    value is the mean over its defined samples (NaN when none); :meth:`summary` averages over genes like
    :func:`summarize` (``nanmean``). Streaming: :meth:`add` takes one sample's rows at a time and keeps only
    per-gene sums (memory O(genes)), so predictions can be read one sample at a time."""

    def __init__(self, min_units: int = WITHIN_MIN_UNITS) -> None:
        self.min_units = int(min_units)
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self.n_samples = 0          # samples added
        self.n_small = 0            # samples with fewer than min_units units (skipped)

    def add(self, y: np.ndarray, y_hat: np.ndarray, genes: Sequence[str]) -> np.ndarray:
        """Add one sample's (N, G) true / predicted values; returns that sample's per-gene Pearson (NaN where
        undefined or when the sample is too small)."""
        y = np.asarray(y, dtype=np.float64)
        y_hat = np.asarray(y_hat, dtype=np.float64)
        genes = [str(g) for g in genes]
        if y.shape != y_hat.shape or y.ndim != 2 or y.shape[1] != len(genes):
            raise ValueError(f"shape mismatch: y {y.shape}, y_hat {y_hat.shape}, {len(genes)} genes")
        self.n_samples += 1
        for g in genes:
            self._sum.setdefault(g, 0.0)
            self._n.setdefault(g, 0)
        if y.shape[0] < max(self.min_units, 2):
            self.n_small += 1
            return np.full(len(genes), np.nan)
        r = column_pearson(y, y_hat)
        for g, v in zip(genes, r, strict=True):
            if np.isfinite(v):
                self._sum[g] += float(v)
                self._n[g] += 1
        return r

    def per_gene(self) -> pd.DataFrame:
        """``pearson`` (mean over the gene's defined samples) and ``n_samples`` per gene (index = genes)."""
        genes = list(self._sum)
        n = np.array([self._n[g] for g in genes], np.int64)
        s = np.array([self._sum[g] for g in genes], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(n > 0, s / np.maximum(n, 1), np.nan)
        return pd.DataFrame({"pearson": r, "n_samples": n}, index=pd.Index(genes, name="gene"))

    def summary(self) -> dict[str, Any]:
        """``pearson`` (mean over genes with a defined value), ``n_genes``, ``n_undefined``, ``n_samples``,
        ``n_small`` (samples below ``min_units``), ``min_units``."""
        pg = self.per_gene()
        v = pg["pearson"].to_numpy(np.float64)
        return {"pearson": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"), "n_genes": len(v),
                "n_undefined": int((~np.isfinite(v)).sum()), "n_samples": self.n_samples, "n_small": self.n_small,
                "min_units": self.min_units}


def within_sample_pearson(y: np.ndarray, y_hat: np.ndarray, samples: Sequence[str], genes: Sequence[str], *,
                          min_units: int = WITHIN_MIN_UNITS) -> dict[str, Any]:
    """:class:`WithinSamplePearson` over in-memory rows grouped by ``samples`` (one label per row): the
    :meth:`~WithinSamplePearson.summary` plus ``per_gene`` (gene -> mean within-sample Pearson)."""
    y = np.asarray(y)
    y_hat = np.asarray(y_hat)
    labels = np.asarray([str(s) for s in samples], dtype=object)
    if len(labels) != y.shape[0]:
        raise ValueError(f"{len(labels)} sample labels for {y.shape[0]} rows")
    acc = WithinSamplePearson(min_units)
    for s in dict.fromkeys(labels.tolist()):
        rows = np.flatnonzero(labels == s)
        acc.add(y[rows], y_hat[rows], genes)
    out = acc.summary()
    out["per_gene"] = {g: float(v) for g, v in acc.per_gene()["pearson"].items()}
    return out
