"""L2 logistic regression on standardised features that never centres the data (torch-free).

scikit-learn's ``StandardScaler`` cannot centre a sparse matrix, and scaling without centring changes the
optimisation geometry: L-BFGS on uncentred features needs many more iterations (or stops at ``max_iter``
elsewhere). :class:`StandardisedLogisticRegression` keeps ``X`` as it is (CSR or dense) and applies the
standardisation ``z = (x - mean) / std`` inside the objective (``X @ (W / std)`` minus a per-class offset),
so that the problem, the optimiser and its options are exactly those of
``make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs"))``: mean log-loss (multinomial, or
binomial for two classes) + ``0.5 / (C n) ||W||²`` (intercepts unpenalised), L-BFGS-B from zeros with
``maxiter = max_iter, maxls = 50, gtol = tol, ftol = 64 eps``. Memory: ``X`` plus a few (n, classes) arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from morphomol.util.logs import get_logger

log = get_logger("cells.logreg")


def column_mean_std(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (ddof 0) in float64; a zero std is 1 (as StandardScaler)."""
    if sp.issparse(X):
        from sklearn.utils.sparsefuncs import mean_variance_axis

        mean, var = mean_variance_axis(sp.csr_matrix(X, dtype=np.float64), axis=0)
    else:
        X = np.asarray(X, np.float64)
        mean = X.mean(0)
        var = ((X - mean) ** 2).mean(0)
    std = np.sqrt(np.asarray(var, np.float64))
    std[std < 10 * np.finfo(std.dtype).eps] = 1.0
    return np.asarray(mean, np.float64), std


def _matmul(X: Any, M: np.ndarray) -> np.ndarray:
    """``X @ M`` as a dense float64 array."""
    return np.asarray(X @ M, dtype=np.float64)


def _rmatmul(G: np.ndarray, X: Any) -> np.ndarray:
    """``G.T @ X`` (G: (n, k)) as a dense (k, features) array."""
    return np.asarray((X.T @ G).T, dtype=np.float64)


class StandardisedLogisticRegression:
    """``LogisticRegression(C, max_iter, tol)`` on standardised ``X``, standardised implicitly (see the module
    docstring); ``predict`` takes raw (unstandardised) rows. ``standardise=False``: on ``X`` as it is."""

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-4, standardise: bool = True) -> None:
        self.C, self.max_iter, self.tol, self.standardise = float(C), int(max_iter), float(tol), bool(standardise)

    def fit(self, X: Any, y: Any) -> StandardisedLogisticRegression:
        from scipy import optimize
        from scipy.special import expit, logsumexp

        X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, np.float64)
        self.classes_, yi = np.unique(np.asarray(y), return_inverse=True)
        n, F = X.shape
        K = len(self.classes_)
        if K < 2:
            raise ValueError(f"logistic regression needs at least two classes, got {K}")
        if self.standardise:
            self.mean_, self.std_ = column_mean_std(X)
        else:  # the features as they are: plain LogisticRegression(C) on X
            self.mean_, self.std_ = np.zeros(F), np.ones(F)
        a = 1.0 / self.std_
        l2 = 1.0 / (self.C * n)
        rows = np.arange(n)
        if K == 2:
            yb = (yi == 1).astype(np.float64)

            def fg(w: np.ndarray) -> tuple[float, np.ndarray]:
                wf, b = w[:F], w[F]
                ws = wf * a
                raw = _matmul(X, ws) + (b - self.mean_ @ ws)
                loss = float(np.sum(np.logaddexp(0.0, raw) - yb * raw) / n + 0.5 * l2 * (wf @ wf))
                g = (expit(raw) - yb) / n
                grad = np.empty(F + 1)
                grad[:F] = (_rmatmul(g[:, None], X)[0] - g.sum() * self.mean_) * a + l2 * wf
                grad[F] = g.sum()
                return loss, grad

            w0 = np.zeros(F + 1)
        else:
            def fg(w: np.ndarray) -> tuple[float, np.ndarray]:
                W = w.reshape((K, F + 1), order="F")
                Wf, b = W[:, :F], W[:, F]
                Ws = Wf * a
                raw = _matmul(X, Ws.T) + (b - Ws @ self.mean_)
                lse = logsumexp(raw, axis=1)
                loss = float((lse - raw[rows, yi]).sum() / n + 0.5 * l2 * np.sum(Wf * Wf))
                G = np.exp(raw - lse[:, None])
                G[rows, yi] -= 1.0
                G /= n
                grad = np.empty((K, F + 1), order="F")
                grad[:, :F] = (_rmatmul(G, X) - np.outer(G.sum(0), self.mean_)) * a + l2 * Wf
                grad[:, F] = G.sum(0)
                return loss, grad.ravel(order="F")

            w0 = np.zeros((K, F + 1), order="F").ravel(order="F")
        res = optimize.minimize(fg, w0, method="L-BFGS-B", jac=True,
                                options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                                         "ftol": 64 * np.finfo(float).eps})
        if res.status != 0:
            log.warning("logistic regression: L-BFGS stopped after %d iterations without converging (%s)",
                        res.nit, res.message)
        self.n_iter_ = int(res.nit)
        W = res.x.reshape((1 if K == 2 else K, F + 1), order="F")
        # on raw rows: z @ Wf.T + b = x @ (Wf / std).T + (b - (mean / std) @ Wf.T)
        self.coef_ = W[:, :F] * a
        self.intercept_ = W[:, F] - self.coef_ @ self.mean_
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        d = _matmul(X, self.coef_.T) + self.intercept_
        return d[:, 0] if len(self.classes_) == 2 else d

    def predict(self, X: Any) -> np.ndarray:
        d = self.decision_function(X)
        return self.classes_[(d > 0).astype(int)] if len(self.classes_) == 2 else self.classes_[np.argmax(d, axis=1)]
