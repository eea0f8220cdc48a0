"""Statistics across folds and genes: Holm correction, paired t-tests, streaming correlation matrices."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from morphomol.eval.metrics import HIGHER_IS_BETTER

TTEST_COLUMNS = ["metric", "setting", "baseline", "n_folds", "folds", "mean_setting", "mean_baseline", "mean_diff",
                 "t_stat", "p_value", "p_holm", "significant", "better_than_baseline"]


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (NaNs stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="mergesort")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_ttests(folds: pd.DataFrame, baseline: str | None, *, metrics: Sequence[str], alpha: float = 0.05,
                  higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER) -> pd.DataFrame:
    """Paired t-test (``scipy.stats.ttest_rel``) across folds of each setting's per-fold mean
    metric against ``baseline``; folds present in both runs are paired. Holm correction per metric
    over all settings compared. ``mean_diff`` = setting − baseline.

    ``folds``: one row per (setting, fold) with ``setting, fold, kind, status`` and one column per
    metric (:class:`morphomol.report.runs.RunResults.folds`); only ``ok`` regression runs count.
    Returns :data:`TTEST_COLUMNS` (empty when the baseline has no runs).
    """
    from scipy import stats

    ok = folds[(folds["status"] == "ok") & (folds["kind"] == "regression")] if len(folds) else folds
    if baseline is None or ok.empty or baseline not in set(ok["setting"]):
        return pd.DataFrame(columns=TTEST_COLUMNS)
    rows = []
    for metric in metrics:
        wide = ok.pivot(index="fold", columns="setting", values=metric)
        family = []
        for name in dict.fromkeys(ok["setting"]):
            if name == baseline:
                continue
            pair = wide[[name, baseline]].dropna()
            a, b = pair[name].to_numpy(float), pair[baseline].to_numpy(float)
            t = p = math.nan
            if len(pair) >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = stats.ttest_rel(a, b)
                t, p = float(res.statistic), float(res.pvalue)
            diff = float(np.mean(a - b)) if len(pair) else math.nan
            family.append({"metric": metric, "setting": name, "baseline": baseline, "n_folds": int(len(pair)),
                           "folds": ",".join(str(int(k)) for k in pair.index),
                           "mean_setting": float(np.mean(a)) if len(a) else math.nan,
                           "mean_baseline": float(np.mean(b)) if len(b) else math.nan,
                           "mean_diff": diff, "t_stat": t, "p_value": p,
                           "better_than_baseline": bool(diff > 0) if higher_is_better[metric] else bool(diff < 0)})
        adj = holm([r["p_value"] for r in family])
        for r, pa in zip(family, adj):
            r["p_holm"] = float(pa)
            r["significant"] = bool(np.isfinite(pa) and pa < alpha)
        rows += family
    return pd.DataFrame(rows, columns=TTEST_COLUMNS)


class CorrelationAccumulator:
    """Streaming Pearson correlation of the columns of row blocks (float64 sums)."""

    def __init__(self, n_cols: int) -> None:
        self.n = 0
        self.s = np.zeros(n_cols)
        self.ss = np.zeros((n_cols, n_cols))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += x.shape[0]
        self.s += x.sum(axis=0)
        self.ss += x.T @ x

    def corr(self) -> np.ndarray:
        """(n_cols, n_cols) correlation matrix; NaN for constant columns (variance at rounding level)."""
        if self.n < 2:
            return np.full(self.ss.shape, np.nan)
        mean = self.s / self.n
        cov = self.ss / self.n - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            c = cov / np.outer(sd, sd)
        c[~np.isfinite(c)] = np.nan
        # constant columns: E[x²] - E[x]² cancels to rounding noise (~1e-16 × E[x²]), not to 0
        tiny = (sd < 1e-12) | (sd * sd <= 1e-12 * np.diag(self.ss) / self.n)
        c[tiny, :] = np.nan
        c[:, tiny] = np.nan
        return np.clip(c, -1, 1)
