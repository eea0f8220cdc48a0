"""HEST-Benchmark-style ridge baseline on frozen features, out of core.

standardise -> PCA (256 components, capped by the number of training units and features) -> ridge
regression, with the ridge penalty chosen by an inner GroupKFold on patients (the scaler and PCA are
refitted inside each inner fold, so the held-out patients never leak into them). Scores come from
:mod:`morphomol.eval.metrics` (the implementation every trained setting uses): per-gene Pearson,
Spearman, MSE, MAE on the test units in log1p space.

Everything is computed from sums, never from the cohort's feature matrix: the training units are read in
chunks (float32 feature rows, the sample's targets) and accumulated in float64 into, per inner fold
(the patients GroupKFold puts in it), the sums ``n, Σx, ΣxxT, Σy, Σy², ΣxyT`` about a fixed shift
(:class:`MomentSums`). The training sums of an inner fold are the total minus the held-out fold's; the
scaler is the mean and variance of those sums, the PCA the eigendecomposition of the standardised
scatter matrix (D x D), the ridge solution is closed-form in the PCA basis, and the out-of-fold MSE and
per-gene Pearson of every alpha follow from the held-out fold's own sums (the predictions are linear in
x), so the inner CV is exact without re-reading a feature. Memory is O(D² x inner folds + D x genes),
whatever the number of units; the test units are streamed through the fitted model and only their
targets and predictions (the fold's output) are kept.

Equal to the in-memory pipeline (``StandardScaler`` -> ``PCA`` -> closed-form ridge) up to rounding
wherever that PCA is exact: when it keeps every component (the demos: PCA width 256 >= the feature width)
or scikit-learn picks its ``full`` / ``covariance_eigh`` solver. Where scikit-learn's ``svd_solver="auto"``
picks the *randomized* solver (more than 1,000 features, 256 components < 0.8 x min(units, features):
real foundation-model features), the in-memory result was an approximation of the one computed here.

Inputs of one fold (:func:`run_ridge_fold`): the cohort's fold table (``splits/folds.parquet``: one row
per sample and fold, every unit of a sample in its sample's partition) and the fold panel, each sample's
unit table (``units.h5ad``: targets = raw counts of the panel's add-on genes) and frozen-feature store
(``features/{encoder}/{sample}.zarr``); row ``i`` of both is unit ``i`` of the sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json
from morphomol.util.logs import get_logger

log = get_logger("ridge")

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 6, 17))
DEFAULT_COMPONENTS = 256
DEFAULT_INNER_FOLDS = 5
SELECT_BY = ("mse", "pearson")
#: float64 bytes of one chunk of feature rows (a chunk is at most this, at least 256 rows)
CHUNK_BYTES = 1 << 25
#: genes per block when the test metrics are computed (ranks of one block at a time)
METRIC_GENE_BLOCK = 64


class RidgeOptions(Protocol):
    """What :func:`run_ridge_fold` reads of ``morphomol.config.sections.RidgeConfig``."""

    n_components: int
    inner_folds: int
    select_by: str
    alphas: Sequence[float] | None


def chunk_rows_for(width: int) -> int:
    """Rows per chunk of rows of ``width`` values (features + targets; about :data:`CHUNK_BYTES` in float64)."""
    return int(np.clip(CHUNK_BYTES // (8 * max(int(width), 1)), 256, 16384))


# ---------------------------------------------------------------------------- sufficient statistics


@dataclass
class Moments:
    """Sums over a set of rows about shifts ``cx``, ``cy`` (shared by every Moments of one accumulator):
    ``n``, ``sx = Σ(x-cx)``, ``sxx = Σ(x-cx)(x-cx)ᵀ``, ``sy = Σ(y-cy)``, ``syy = Σ(y-cy)²`` (per column),
    ``sxy = Σ(x-cx)(y-cy)ᵀ``. The shift (the first chunk's mean) keeps the centred sums free of cancellation."""

    n: int
    sx: np.ndarray
    sxx: np.ndarray
    sy: np.ndarray
    syy: np.ndarray
    sxy: np.ndarray
    cx: np.ndarray
    cy: np.ndarray

    def __add__(self, o: Moments) -> Moments:
        return Moments(self.n + o.n, self.sx + o.sx, self.sxx + o.sxx, self.sy + o.sy, self.syy + o.syy,
                       self.sxy + o.sxy, self.cx, self.cy)

    def __sub__(self, o: Moments) -> Moments:
        return Moments(self.n - o.n, self.sx - o.sx, self.sxx - o.sxx, self.sy - o.sy, self.syy - o.syy,
                       self.sxy - o.sxy, self.cx, self.cy)

    @property
    def mean_x(self) -> np.ndarray:
        return self.cx + self.sx / self.n

    @property
    def mean_y(self) -> np.ndarray:
        return self.cy + self.sy / self.n

    @property
    def scatter_x(self) -> np.ndarray:
        """``Σ(x-x̄)(x-x̄)ᵀ`` (D x D)."""
        return self.sxx - np.outer(self.sx, self.sx) / self.n

    @property
    def scatter_xy(self) -> np.ndarray:
        """``Σ(x-x̄)(y-ȳ)ᵀ`` (D x G)."""
        return self.sxy - np.outer(self.sx, self.sy) / self.n

    @property
    def sum_y2(self) -> np.ndarray:
        """``Σy²`` per column (not centred)."""
        return self.syy + 2.0 * self.cy * self.sy + self.n * self.cy * self.cy

    @property
    def scatter_y(self) -> np.ndarray:
        """``Σ(y-ȳ)²`` per column (G,)."""
        return np.maximum(self.syy - self.sy * self.sy / self.n, 0.0)


class MomentSums:
    """Float64 sums of float32 feature rows ``x`` (N, D) and targets ``y`` (N, G), one :class:`Moments` per
    group (the inner CV folds). ``dim`` 0: targets only (the mean baseline)."""

    def __init__(self, dim: int, n_genes: int, n_groups: int = 1) -> None:
        self.dim, self.n_genes, self.n_groups = int(dim), int(n_genes), max(1, int(n_groups))
        d, g = self.dim, self.n_genes
        self.cx: np.ndarray | None = None
        self.cy: np.ndarray | None = None
        self._n = [0] * self.n_groups
        self._sx = np.zeros((self.n_groups, d))
        self._sxx = np.zeros((self.n_groups, d, d))
        self._sy = np.zeros((self.n_groups, g))
        self._syy = np.zeros((self.n_groups, g))
        self._sxy = np.zeros((self.n_groups, d, g))

    def add(self, x: np.ndarray | None, y: np.ndarray, group: int = 0) -> None:
        """Add rows (``x`` None when ``dim`` is 0) to group ``group``."""
        y = np.asarray(y, np.float64)
        if y.ndim != 2 or y.shape[1] != self.n_genes:
            raise ValueError(f"targets of shape {y.shape}, expected (n, {self.n_genes})")
        n = y.shape[0]
        if n == 0:
            return
        if self.dim:
            if x is None or x.shape != (n, self.dim):
                raise ValueError(f"features of shape {None if x is None else x.shape}, expected ({n}, {self.dim})")
            x = np.asarray(x, np.float64)
        if self.cx is None:
            self.cx = x.mean(axis=0) if self.dim else np.zeros(0)
            self.cy = y.mean(axis=0)
        assert self.cy is not None
        yc = y - self.cy
        self._n[group] += n
        self._sy[group] += yc.sum(axis=0)
        self._syy[group] += np.einsum("ij,ij->j", yc, yc)
        if self.dim:
            xc = x - self.cx
            self._sx[group] += xc.sum(axis=0)
            self._sxx[group] += xc.T @ xc   # BLAS syrk (numpy detects the transposed pair)
            self._sxy[group] += xc.T @ yc

    def group(self, i: int) -> Moments:
        return Moments(self._n[i], self._sx[i], self._sxx[i], self._sy[i], self._syy[i], self._sxy[i],
                       self._shift_x(), self._shift_y())

    def total(self) -> Moments:
        return Moments(sum(self._n), self._sx.sum(0), self._sxx.sum(0), self._sy.sum(0), self._syy.sum(0),
                       self._sxy.sum(0), self._shift_x(), self._shift_y())

    @property
    def n(self) -> int:
        return sum(self._n)

    def group_sizes(self) -> list[int]:
        return list(self._n)

    def _shift_x(self) -> np.ndarray:
        return self.cx if self.cx is not None else np.zeros(self.dim)

    def _shift_y(self) -> np.ndarray:
        return self.cy if self.cy is not None else np.zeros(self.n_genes)


# ------------------------------------------------------------------------------- model


def _is_constant(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """scikit-learn's StandardScaler test for a constant column (error bound of the variance)."""
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


@dataclass
class PcaRidge:
    """StandardScaler -> PCA(k) -> ridge, fitted from training :class:`Moments`.

    ``components`` (D, k): eigenvectors of the standardised scatter matrix, largest first; ``eigvals`` (k,):
    its eigenvalues (= squared singular values of the centred, standardised training rows = the PCA scores'
    sums of squares); ``pty`` (k, G): the PCA scores' cross-products with the centred targets. The ridge
    coefficients in the PCA basis are ``pty / (eigvals + alpha)``."""

    mean_x: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    eigvals: np.ndarray
    pty: np.ndarray
    mean_y: np.ndarray
    n: int

    @property
    def k(self) -> int:
        return int(self.components.shape[1])

    def coef(self, alpha: float, cols: Sequence[int] | None = None) -> np.ndarray:
        p = self.pty if cols is None else self.pty[:, list(cols)]
        return p / (self.eigvals + float(alpha))[:, None]

    def weights(self, alpha: float, cols: Sequence[int] | None = None) -> np.ndarray:
        """(D, G) weights on ``x - mean_x``."""
        return (self.components / self.scale[:, None]) @ self.coef(alpha, cols)


def fit_pca_ridge(m: Moments, n_components: int) -> PcaRidge:
    """Scaler, PCA (``min(n_components, n, D)`` components, exact) and the ridge cross-products of ``m``."""
    import scipy.linalg

    n, d = int(m.n), int(m.sx.shape[0])
    if n < 2:
        raise InputError(f"ridge needs at least 2 training units, got {n}", field="train")
    mean = m.mean_x
    cxx = m.scatter_x
    var = np.maximum(np.diag(cxx) / n, 0.0)
    scale = np.sqrt(var)
    scale[_is_constant(var, mean, n)] = 1.0
    g = cxx / np.outer(scale, scale)
    g = (g + g.T) / 2.0
    k = int(min(n_components, n, d))
    if k < d:
        w, v = scipy.linalg.eigh(g, subset_by_index=[d - k, d - 1], driver="evr")
    else:
        w, v = scipy.linalg.eigh(g, driver="evr")
    w, v = np.maximum(w[::-1], 0.0), np.ascontiguousarray(v[:, ::-1])
    pty = v.T @ (m.scatter_xy / scale[:, None])
    return PcaRidge(mean_x=mean, scale=scale, components=v, eigvals=w, pty=pty, mean_y=m.mean_y, n=n)


@dataclass
class LinearPredictor:
    """``ŷ = (x - mean_x) @ W + intercept`` (the fitted pipeline, collapsed to one linear map)."""

    mean_x: np.ndarray
    weights: np.ndarray
    intercept: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean_x) @ self.weights + self.intercept


def predictor(fit: PcaRidge, alpha: float, *, intercept: bool = True, cols: Sequence[int] | None = None
              ) -> LinearPredictor:
    """The fitted pipeline for one alpha (``intercept`` False: HEST's ridge without intercept)."""
    w = fit.weights(alpha, cols)
    b = (fit.mean_y if cols is None else fit.mean_y[list(cols)]) if intercept else np.zeros(w.shape[1])
    return LinearPredictor(fit.mean_x, w, np.asarray(b, np.float64))


def lsqr_coef(fit: PcaRidge, m: Moments, alpha: float, cols: Sequence[int] | None = None, *, tol: float = 1e-4,
              max_iter: int = 1000) -> np.ndarray:
    """(k, G) coefficients on the PCA scores of ridge **without intercept** solved by LSQR, as scikit-learn's
    ``Ridge(alpha, fit_intercept=False, solver="lsqr", tol, max_iter)`` solves it on the (N, k) score matrix
    ``Z`` (HEST's probe), from the sums alone. LSQR's iterates depend on ``Z`` and a target column ``b`` only
    through rotation-invariant quantities, and ``Z = U diag(s)`` has orthogonal columns (the PCA scores), so
    LSQR runs on the (k+1, k) system ``[diag(s); 0] w ≈ [Uᵀb; ‖b - UUᵀb‖]``: the same iterates and stopping
    test (up to rounding) at O(k) per iteration, with ``Uᵀb = Zᵀb / s`` and ``‖b‖²`` from ``m``."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import lsqr

    cols = list(range(fit.pty.shape[1])) if cols is None else list(cols)
    s = np.sqrt(fit.eigvals)
    with np.errstate(invalid="ignore", divide="ignore"):
        proj = np.where(s[:, None] > 0, fit.pty[:, cols] / s[:, None], 0.0)
    rest = np.sqrt(np.maximum(m.sum_y2[cols] - (proj * proj).sum(axis=0), 0.0))
    a = sp.csr_matrix(np.vstack([np.diag(s), np.zeros((1, len(s)))]))
    damp = float(np.sqrt(alpha))
    out = np.empty((len(s), len(cols)))
    for j in range(len(cols)):
        b = np.concatenate([proj[:, j], rest[j:j + 1]])
        out[:, j] = lsqr(a, b, damp=damp, atol=tol, btol=tol, iter_lim=max_iter)[0]
    return out


def predictor_from_coef(fit: PcaRidge, coef: np.ndarray, intercept: np.ndarray | None = None) -> LinearPredictor:
    """The pipeline for (k, G) coefficients on the PCA scores (``intercept`` None: none)."""
    w = (fit.components / fit.scale[:, None]) @ coef
    return LinearPredictor(fit.mean_x, w, np.zeros(w.shape[1]) if intercept is None else np.asarray(intercept))


def _pearson_from_moments(cov: np.ndarray, vy: np.ndarray, vp: np.ndarray) -> np.ndarray:
    den = np.sqrt(np.maximum(vy, 0.0) * np.maximum(vp, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / den
    r[~(den > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def inner_cv(sums: MomentSums, alphas: Sequence[float], n_components: int) -> list[dict[str, Any]]:
    """Out-of-fold scores of every alpha over the groups of ``sums`` (each group held out once; the scaler,
    PCA and ridge refitted on the others), from the sums alone: per alpha ``mse`` (over every training value,
    as ``((y - oof)**2).mean()``) and ``pearson`` (per gene, of the out-of-fold predictions of all rows)."""
    total = sums.total()
    held = [sums.group(i) for i in range(sums.n_groups)]
    parts: list[list[tuple[Any, ...]]] = [[] for _ in alphas]
    for f in held:
        fit = fit_pca_ridge(total - f, n_components)
        vs = fit.components / fit.scale[:, None]                      # (D, k): x-space -> PCA scores
        m_f = vs.T @ f.scatter_x @ vs                                  # held-out scatter of the scores
        q_f = vs.T @ f.scatter_xy                                      # held-out score x target cross-products
        dv = (f.mean_x - fit.mean_x) @ vs                              # held-out mean score
        yf, syy = f.mean_y, f.scatter_y
        for i, a in enumerate(alphas):
            b = fit.coef(a)
            mu = fit.mean_y + dv @ b                                   # mean prediction over the fold
            vp = np.einsum("ig,ig->g", m_f @ b, b)                     # Σ (ŷ - mu)²
            cr = np.einsum("ig,ig->g", q_f, b)                         # Σ (y - ȳ_f)(ŷ - mu)
            parts[i].append((f.n, yf, syy, mu, np.maximum(vp, 0.0), cr))
    out = []
    for i, _a in enumerate(alphas):
        n = np.array([p[0] for p in parts[i]], np.float64)
        yf = np.stack([p[1] for p in parts[i]])
        syy = np.stack([p[2] for p in parts[i]])
        mu = np.stack([p[3] for p in parts[i]])
        vp = np.stack([p[4] for p in parts[i]])
        cr = np.stack([p[5] for p in parts[i]])
        big_n = n.sum()
        ybar = (n[:, None] * yf).sum(0) / big_n
        pbar = (n[:, None] * mu).sum(0) / big_n
        dy, dp = yf - ybar, mu - pbar
        vy_t = (syy + n[:, None] * dy * dy).sum(0)
        vp_t = (vp + n[:, None] * dp * dp).sum(0)
        cov = (cr + n[:, None] * dy * dp).sum(0)
        sse = (syy - 2.0 * cr + vp + n[:, None] * (yf - mu) ** 2).sum(0)
        r = _pearson_from_moments(cov, vy_t, vp_t)
        out.append({"pearson_per_gene": r, "mse": float(max(sse.sum(), 0.0) / (big_n * sse.shape[0]))})
    return out


def select_alpha(sums: MomentSums, alphas: Sequence[float], n_components: int, select_by: str
                 ) -> tuple[float, dict[str, dict[str, float | None]]]:
    """The alpha with the lowest out-of-fold MSE (``pearson``: highest mean per-gene Pearson; the other
    criterion breaks ties) and ``cv`` (repr(alpha) -> inner mean Pearson / MSE)."""
    cv: dict[str, dict[str, float | None]] = {}
    scores = []
    for a, res in zip(alphas, inner_cv(sums, alphas, n_components), strict=True):
        r, mse = res["pearson_per_gene"], res["mse"]
        mean_r = float(np.nanmean(r)) if np.isfinite(r).any() else float("-inf")
        cv[repr(a)] = {"pearson": mean_r if np.isfinite(mean_r) else None, "mse": mse}
        scores.append((-mse, mean_r) if select_by == "mse" else (mean_r, -mse))
    best = alphas[max(range(len(alphas)), key=lambda i: scores[i])]
    return best, cv


def inner_groups(groups: Sequence[str], units: Sequence[int], n_folds: int) -> dict[str, int]:
    """Inner fold of every group (patient): scikit-learn's ``GroupKFold(n_folds)`` over the rows, computed
    from the groups' unit counts (:func:`morphomol.splits.group_kfold`)."""
    from morphomol.splits import group_kfold

    return group_kfold([str(g) for g in groups], [int(u) for u in units], int(n_folds))


def check_options(alphas: Sequence[float] | None, select_by: str) -> list[float]:
    if select_by not in SELECT_BY:
        raise InputError(f"select_by must be mse or pearson, not {select_by!r}", field="ridge.select_by")
    out = [float(a) for a in (alphas if alphas is not None else DEFAULT_ALPHAS)]
    if not out or any(a <= 0 for a in out):
        raise InputError(f"alphas must be positive, got {out}", field="ridge.alphas")
    return out


def inner_plan(patient_units: Mapping[str, int], alphas: Sequence[float], inner_folds: int
               ) -> tuple[dict[str, int], int]:
    """(patient -> inner fold, number of inner folds); one group and 0 folds when there is one alpha.
    (:func:`inner_plan_samples`: the fold policy's grouping, which never needs two patients.)"""
    if len(alphas) == 1:
        return {p: 0 for p in patient_units}, 0
    n_groups = len(patient_units)
    if n_groups < 2:
        raise InputError(f"choosing alpha needs >= 2 training patients, got {n_groups}",
                         field="patient_id", expected="several patients in the training partition")
    k = int(min(inner_folds, n_groups))
    return inner_groups(list(patient_units), list(patient_units.values()), k), k


def inner_plan_samples(train: pd.DataFrame, alphas: Sequence[float], inner_folds: int
                       ) -> tuple[dict[str, int], int, str]:
    """The inner CV choosing alpha, grouped by the shared policy (:mod:`morphomol.splits`): by patient when the
    training rows (``sample_id, patient_id, n_units``) hold >= 2 patients, else by sample (>= 2 samples), else
    none (the middle alpha, logged). Returns (sample -> inner fold, number of inner folds, grouping)."""
    from morphomol.splits import feasible_validation

    by = feasible_validation(train["patient_id"].nunique(), train["sample_id"].nunique())
    key = {"patient": "patient_id", "sample": "sample_id"}.get(by, "sample_id")
    units = train.groupby(key, sort=True)["n_units"].sum()
    if len(units) < 2:  # one training sample: no inner CV (fit_from_sums takes the middle alpha)
        plan, n_inner = {str(g): 0 for g in units.index}, 0
    else:
        plan, n_inner = inner_plan({str(g): int(n) for g, n in units.items()}, alphas, inner_folds)
    if len(alphas) > 1 and n_inner == 0:
        log.info("one training sample: no inner CV, alpha %.3g (the middle of %d alphas)", middle_alpha(alphas),
                 len(alphas))
    elif len(alphas) > 1 and by == "sample":
        log.info("one training patient: alpha chosen by inner CV over its %d samples", len(units))
    return ({str(s): plan[str(g)] for s, g in zip(train["sample_id"], train[key], strict=True)}, n_inner,
            by if n_inner else "none")


def middle_alpha(alphas: Sequence[float]) -> float:
    return float(sorted(alphas)[len(alphas) // 2])


def fit_from_sums(sums: MomentSums, alphas: Sequence[float], *, n_components: int, select_by: str,
                  n_inner: int) -> dict[str, Any]:
    """Choose alpha (inner CV over the groups of ``sums`` when there are several alphas) and fit on all rows:
    ``alpha``, ``cv``, ``fit`` (:class:`PcaRidge`), ``n_components``, ``n_inner_folds``."""
    if len(alphas) == 1:
        best, cv = alphas[0], {}
    elif n_inner < 1:  # a single training group: no inner CV possible (validation policy none)
        best, cv = middle_alpha(alphas), {}
    else:
        best, cv = select_alpha(sums, alphas, n_components, select_by)
    fit = fit_pca_ridge(sums.total(), n_components)
    return {"alpha": best, "cv": cv, "fit": fit, "n_components": fit.k, "n_inner_folds": n_inner}


# -------------------------------------------------------------------------------- metrics


def report_blockwise(y: np.ndarray, y_hat: np.ndarray, genes: Sequence[str], block: int = METRIC_GENE_BLOCK
                     ) -> dict[str, Any]:
    """:func:`morphomol.eval.metrics.regression_report`, computed a block of genes at a time (the ranks of
    one block in memory, not of every gene): the same numbers (up to summation order within a block)."""
    from morphomol.eval.metrics import METRICS, per_gene_metrics, summarize

    genes = list(genes)
    if y.shape != y_hat.shape or y.ndim != 2 or y.shape[1] != len(genes):
        raise ValueError(f"shape mismatch: y {y.shape}, y_hat {y_hat.shape}, {len(genes)} genes")
    frames = [per_gene_metrics(y[:, lo:lo + block], y_hat[:, lo:lo + block], genes[lo:lo + block])
              for lo in range(0, len(genes), block)]
    pg = pd.concat(frames)
    return {"genes": genes, "mean": summarize(pg),
            "per_gene": {g: {m: float(pg.at[g, m]) for m in METRICS} for g in pg.index},
            "n_undefined": int(pg["pearson"].isna().sum())}


# ------------------------------------------------------------------------ in-memory API


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
    """Fit the HEST-style ridge probe on arrays and score it on the test rows (the engine of the fold jobs,
    fed from memory in chunks).

    The alpha with the lowest out-of-fold MSE (``select_by="pearson"``: highest mean per-gene Pearson) in an
    inner GroupKFold over ``train_groups`` (patients) is refitted on all training rows. MSE is the default
    criterion because Pearson of heavily shrunk, near-constant predictions is unstable. Returns ``alpha``,
    ``cv`` (alpha -> inner mean Pearson/MSE), ``inner_groups`` (group -> inner fold), ``n_components``,
    ``n_inner_folds``, ``pred`` (test predictions) and, when ``test_Y`` is given, ``pearson`` (per-gene
    array) and the metrics of :func:`morphomol.eval.metrics.regression_report` (``genes``, ``mean``,
    ``per_gene``, ``n_undefined``). ``seed`` is kept for the callers: the PCA is exact (no randomness).
    """
    del seed
    xtr = np.asarray(train_X)
    ytr = np.asarray(train_Y, np.float64)
    xte = np.asarray(test_X)
    groups = np.asarray([str(g) for g in np.asarray(train_groups).ravel()], dtype=object)
    if ytr.ndim == 1:
        ytr = ytr[:, None]
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise InputError(f"feature shapes do not match: train {xtr.shape}, test {xte.shape}",
                         field="features", expected="2-D arrays with the same number of columns")
    if len(xtr) != len(ytr) or len(xtr) != len(groups):
        raise InputError(f"train rows differ: X {len(xtr)}, Y {len(ytr)}, groups {len(groups)}", field="train")
    if len(xtr) < 2:
        raise InputError(f"ridge needs at least 2 training tiles, got {len(xtr)}", field="train")
    alphas = check_options(alphas, select_by)
    uniq, counts = np.unique(groups.astype(str), return_counts=True)
    plan, n_inner = inner_plan(dict(zip(uniq.tolist(), counts.tolist(), strict=True)), alphas, inner_folds)
    sums = MomentSums(xtr.shape[1], ytr.shape[1], max(1, n_inner))
    fold_of_row = np.array([plan[g] for g in groups], np.int64)
    step = chunk_rows_for(xtr.shape[1] + ytr.shape[1])
    for f in range(sums.n_groups):
        rows = np.flatnonzero(fold_of_row == f)
        for lo in range(0, len(rows), step):
            r = rows[lo:lo + step]
            sums.add(xtr[r], ytr[r], f)
    res = fit_from_sums(sums, alphas, n_components=n_components, select_by=select_by, n_inner=n_inner)
    model = predictor(res.pop("fit"), res["alpha"])
    pred = np.concatenate([model.predict(xte[lo:lo + step]) for lo in range(0, len(xte), step)]) if len(xte) \
        else np.zeros((0, ytr.shape[1]))
    genes = list(genes) if genes is not None else [f"y{j}" for j in range(ytr.shape[1])]
    out: dict[str, Any] = {**res, "pred": pred, "inner_groups": plan if n_inner else {}}
    if test_Y is not None:
        yte = np.asarray(test_Y, np.float64)
        if yte.ndim == 1:
            yte = yte[:, None]
        report = report_blockwise(yte, pred, genes)
        out["pearson"] = np.array([report["per_gene"][g]["pearson"] for g in genes], dtype=np.float64)
        out.update(report)
    return out


# ------------------------------------------------------------------------- per-sample reads


@dataclass(frozen=True)
class SampleRows:
    """One sample as the fold jobs read it: unit ids, store rows and the reading order."""

    sample: str
    units: Path
    features: Path | None
    unit_ids: np.ndarray      # (N,) str, the unit table's obs index
    store_rows: np.ndarray    # (N,) rows of the features store (the unit table's ``index`` column, else 0..N-1)

    def __len__(self) -> int:
        return len(self.unit_ids)


def open_sample(sample: str, units: str | Path, features: str | Path | None) -> SampleRows:
    """The sample's unit ids (obs only, X stays on disk) and, with ``features``, the store checked against
    them: one row per unit, and the store's unit ids (when it has them) equal to the unit table's."""
    from morphomol.data.features import FEATURES, open_zarr_group, read_feature_units
    from morphomol.data.units import unit_ids

    ids, index = unit_ids(units)
    if features is not None:
        g = open_zarr_group(features)
        if FEATURES not in g:
            raise InputError("store has no 'features' array", file=features, field="features",
                             expected="a features zarr written by the features rule")
        n_rows = int(g[FEATURES].shape[0])
        if n_rows != len(ids):
            raise InputError(f"{n_rows} feature rows but {len(ids)} units in the unit table", file=features,
                             field="features", expected=f"one feature row per unit of {units}")
        if len(index) and (index.min() < 0 or index.max() >= n_rows):
            raise InputError(f"unit index {int(index.max())} out of range for {n_rows} feature rows", file=units,
                             field="index", expected="row numbers of the sample's stores")
        geo = read_feature_units(features)
        if geo is not None:
            stored = np.asarray(geo.barcodes, dtype=object)[index]
            wrong = stored != np.asarray(ids, dtype=object)
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                raise InputError(f"{int(wrong.sum())} feature row(s) belong to another unit (first: row {index[i]} "
                                 f"is {stored[i]}, the unit table says {ids[i]})", file=features, field="barcodes",
                                 expected=f"the units of {units}")
    return SampleRows(str(sample), Path(units), Path(features) if features is not None else None,
                      np.asarray(ids, dtype=object), np.asarray(index, np.int64))


TargetFn = Callable[[Any, np.ndarray], np.ndarray]


def iter_chunks(s: SampleRows, genes: Sequence[str], targets: TargetFn, *, chunk_rows: int,
                with_features: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """(unit ids, feature rows float32 or None, targets) of consecutive chunks of the sample's units.
    ``targets(counts, n_counts)``: the chunk's raw counts of ``genes`` (sparse or dense) and the units'
    ``n_counts`` (obs; NaN when absent) -> (rows, genes) targets. Reads the unit table backed (X by row
    ranges) and the features store by row ranges."""
    from morphomol.data.features import read_features
    from morphomol.data.units import read_units

    a = read_units(s.units, backed=True)
    try:
        pos = {str(g): i for i, g in enumerate(a.var_names)}
        miss = [g for g in genes if g not in pos]
        if miss:
            raise InputError(f"{len(miss)} gene(s) not in the unit table: {', '.join(miss[:10])}", file=s.units,
                             field="var_names", expected="every target gene in every sample")
        cols = np.array([pos[g] for g in genes], np.int64)
        n = int(a.n_obs)
        totals = a.obs["n_counts"].to_numpy(np.float64) if "n_counts" in a.obs.columns else np.full(n, np.nan)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            block = a.X[lo:hi]
            block = block[:, cols]
            y = np.asarray(targets(block, totals[lo:hi]), np.float64)
            x = None
            if with_features and s.features is not None:
                x, _ = read_features(s.features, s.store_rows[lo:hi])
            yield s.unit_ids[lo:hi], x, y
    finally:
        a.file.close()


def log1p_counts(counts: Any, _totals: np.ndarray) -> np.ndarray:
    """The fusion targets: log1p of the raw counts (float64)."""
    x = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    return np.log1p(np.asarray(x, np.float64))


# --------------------------------------------------------------------------- fold runner


def _fold_samples(folds: str | Path, fold: int, units: Mapping[str, str | Path],
                  features: Mapping[str, str | Path] | None) -> pd.DataFrame:
    """The fold's rows (``sample_id, patient_id, n_units, partition``), checked against the declared inputs."""
    from morphomol.data.folds import fold_rows

    rows = fold_rows(folds, int(fold))
    listed = set(rows["sample_id"])
    for sample in rows["sample_id"]:
        if sample not in units:
            raise InputError(f"no unit table for sample '{sample}'", file=folds, field="sample_id",
                             expected="a unit table per sample of the fold table")
        if features is not None and sample not in features:
            raise InputError(f"no features store for sample '{sample}'", file=folds, field="sample_id",
                             expected="a features store per sample of the fold table")
    extra = sorted(set(units) - listed)
    if extra:
        raise InputError(f"{len(extra)} sample(s) not in the fold table: {', '.join(extra[:5])}", file=folds,
                         field="sample_id", expected="splits computed over the cohort's current samples")
    return rows


def _check_units(s: SampleRows, listed: int, folds: str | Path) -> None:
    if len(s) != int(listed):
        raise InputError(f"the fold table lists {int(listed)} units for sample '{s.sample}', its unit table has "
                         f"{len(s)}", file=folds, field="n_units", expected="splits of the current unit tables")


def accumulate(samples: Sequence[tuple[SampleRows, int]], genes: Sequence[str], targets: TargetFn, *, dim: int,
               n_groups: int, chunk_rows: int) -> MomentSums:
    """Sums of the training samples (each with its inner group), read one sample and one chunk at a time."""
    sums = MomentSums(dim, len(genes), n_groups)
    for s, grp in samples:
        for _ids, x, y in iter_chunks(s, genes, targets, chunk_rows=chunk_rows, with_features=dim > 0):
            sums.add(x, y, grp)
    return sums


def feature_dim(paths: Sequence[str | Path]) -> int:
    """The common feature width of the stores (InputError naming the first that differs)."""
    from morphomol.data.features import FEATURES, open_zarr_group

    dim, first = None, None
    for p in paths:
        g = open_zarr_group(p)
        if FEATURES not in g:
            raise InputError("store has no 'features' array", file=p, field="features",
                             expected="a features zarr written by the features rule")
        d = int(g[FEATURES].shape[1])
        if dim is not None and d != dim:
            raise InputError(f"feature dim {d} differs from {dim} ({first})", file=p, field="dim",
                             expected="one encoder (one feature width) for every sample")
        dim, first = d, p
    if dim is None:
        raise InputError("no features store", field="features")
    return dim


def run_ridge_fold(
    folds: str | Path,
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
    chunk_rows: int | None = None,
) -> dict[str, Any]:
    """One outer fold: train on ``train_partitions`` (fit+val; alpha is chosen by inner grouped CV), test on
    ``test``; write ``metrics.json`` (kind regression, the same ``mean`` / ``per_gene`` / ``n_undefined`` as
    the trained settings) and ``predictions.parquet`` (streamed, with ``sample_id``: one row group per chunk
    of a sample). ``folds``: the cohort's fold table; ``cfg``: ``ridge`` config section (n_components,
    inner_folds, select_by, alphas); None = defaults. Reads one sample and one chunk of units at a time.
    Returns the metrics dict."""
    from morphomol.data.runs import open_predictions_writer, write_metrics

    n_components = int(getattr(cfg, "n_components", DEFAULT_COMPONENTS))
    inner_folds = int(getattr(cfg, "inner_folds", DEFAULT_INNER_FOLDS))
    select_by = str(getattr(cfg, "select_by", "mse"))
    alphas = check_options(getattr(cfg, "alphas", None), select_by)
    t0 = time.perf_counter()
    panel_doc = read_json(panel, "fold panel")
    genes = [str(g) for g in (panel_doc.get("addon") or [])] if isinstance(panel_doc, dict) else []
    if not genes:
        raise InputError("panel has no add-on genes", file=panel, field="addon", expected="a non-empty list")
    rows = _fold_samples(folds, fold, units, features).sort_values("sample_id", kind="stable")
    train = rows[rows["partition"].isin(list(train_partitions))]
    test = rows[rows["partition"] == "test"]
    if test.empty or int(test["n_units"].sum()) == 0:
        raise InputError("fold has no test tiles", file=folds, field="partition", expected="some 'test' rows")
    dim = feature_dim([features[s] for s in rows["sample_id"]])
    step = int(chunk_rows or chunk_rows_for(dim + len(genes)))
    opened = {}
    for r in rows.itertuples():
        if r.partition in train_partitions or r.partition == "test":
            opened[r.sample_id] = open_sample(r.sample_id, units[r.sample_id], features[r.sample_id])
            _check_units(opened[r.sample_id], r.n_units, folds)
    patient_units = train.groupby("patient_id", sort=True)["n_units"].sum()
    plan, n_inner, _ = inner_plan_samples(train, alphas, inner_folds)
    n_train = int(train["n_units"].sum())
    log.info("ridge %s fold %d: %d train tiles (%d patients), %d test tiles, %d genes, dim %d", encoder, fold,
             n_train, len(patient_units), int(test["n_units"].sum()), len(genes), dim)
    sums = accumulate([(opened[s], plan[s]) for s in train["sample_id"]],
                      genes, log1p_counts, dim=dim, n_groups=max(1, n_inner), chunk_rows=step)
    if sums.n < 2:
        raise InputError(f"ridge needs at least 2 training tiles, got {sums.n}", file=folds, field="partition")
    res = fit_from_sums(sums, alphas, n_components=n_components, select_by=select_by, n_inner=n_inner)
    model = predictor(res["fit"], res["alpha"])
    del sums
    n_test = int(test["n_units"].sum())
    y_te, p_te = np.empty((n_test, len(genes))), np.empty((n_test, len(genes)))
    at = 0
    with open_predictions_writer(out_predictions) as writer:
        for s in test["sample_id"]:
            for ids, x, y in iter_chunks(opened[s], genes, log1p_counts, chunk_rows=step):
                p = model.predict(x)
                y_te[at:at + len(ids)], p_te[at:at + len(ids)] = y, p
                at += len(ids)
                writer.write(ids, genes, y, p, s)
        report = report_blockwise(y_te, p_te, genes)
        seconds = time.perf_counter() - t0
        log.info("ridge %s fold %d: alpha %.3g, %d components, mean pearson %s", encoder, fold, res["alpha"],
                 res["n_components"], report["mean"]["pearson"])
        n_part = rows.groupby("partition")["n_units"].sum()
        metrics = {
            "setting": f"ridge_{encoder}",
            "fold": int(fold),
            "kind": "regression",
            "status": "ok",
            "n_fit": int(n_part.get("fit", 0)),
            "n_val": int(n_part.get("val", 0)),
            "n_test": int(n_part.get("test", 0)),
            "genes": report["genes"],
            "mean": report["mean"],
            "per_gene": report["per_gene"],
            "n_undefined": report["n_undefined"],
            "best_epoch": None,
            "epochs_run": None,
            "train_seconds": seconds,
            "tiles_per_second": float(n_train / seconds) if seconds > 0 else None,
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
    write_metrics(out_metrics, metrics)
    return metrics


__all__ = ["DEFAULT_ALPHAS", "DEFAULT_COMPONENTS", "DEFAULT_INNER_FOLDS", "LinearPredictor", "MomentSums",
           "Moments", "PcaRidge", "RidgeOptions", "SampleRows", "accumulate", "check_options", "fit_from_sums",
           "fit_pca_ridge", "inner_cv", "inner_groups", "inner_plan", "iter_chunks", "log1p_counts", "lsqr_coef",
           "open_sample", "predictor", "predictor_from_coef", "report_blockwise", "ridge_baseline", "run_ridge_fold",
           "select_alpha"]
