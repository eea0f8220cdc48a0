"""The frozen encoders of the alignment: RNA encoders and the optional slide PCA.

Slide side: the inputs are the per-slide embeddings (:mod:`morphomol.studies.slides.bank`: mean vectors,
bags read per batch); :class:`SlidePca` reduces them with axes fit on the training slides.

RNA side (fit on the training split only, then applied to every slide and to prompt profiles):

* :class:`PcaRna` (``rna_encoder: pca``, the default that needs no weights): the ``n_genes`` most
  variable genes of the training slides' log2 expression among those with a training mean of at
  least ``min_mean`` (log2 units: low-count genes are mostly counting noise), standardised with training means/SDs,
  projected on the first ``n_components`` principal axes of the training slides (SVD), scores
  divided by the first component's training SD.
* :class:`RegistryRna` (``rna_encoder: <registry name>``): a frozen expression encoder of
  :mod:`morphomol.encoders` from local weights (e.g. ``bulkrnabert``); log2(x + 1) expression is
  turned back into linear values (``2**x - 1``: CPM/TPM) and the encoder applies its own documented
  normalisation and gene vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.embed")


class PcaRna:
    """PCA of standardised log2 expression, fit on the training slides (see the module doc)."""

    name = "pca"

    def __init__(self, n_components: int, n_genes: int = 0, min_mean: float = 1.0) -> None:
        self.n_components, self.n_genes, self.min_mean = int(n_components), int(n_genes), float(min_mean)
        self.genes: list[str] = []
        self.idx = np.zeros(0, np.int64)
        self.mean = self.sd = self.components = np.zeros(0)
        self.scale = 1.0

    def fit(self, L: np.ndarray, genes: Sequence[str]) -> PcaRna:
        """Fit on an in-memory (n, G) log2 matrix of the training slides."""
        L = np.asarray(L, np.float64)
        return self._fit(L.mean(axis=0), L.var(axis=0), genes, lambda idx: L[:, idx])

    def fit_matrix(self, expr: Any, rows: np.ndarray) -> PcaRna:
        """Fit on rows ``rows`` of an :class:`~morphomol.studies.slides.rna.ExpressionMatrix`: gene means and
        variances streamed over those rows (the same numbers as in memory), then only the selected genes read."""
        mean, var = expr.row_stats(rows)
        # column-major, like ``L[:, idx]`` in memory: the same reductions and products, bit for bit
        return self._fit(mean, var, expr.genes, lambda idx: np.asfortranarray(expr.read(rows, cols=idx)))

    def _fit(self, mean: np.ndarray, var: np.ndarray, genes: Sequence[str], columns: Any) -> PcaRna:
        order = np.argsort(-var, kind="stable")
        order = order[(var[order] > 0) & (mean[order] >= self.min_mean)]
        if self.n_genes:
            order = order[:self.n_genes]
        if len(order) == 0 and int(n_rows := len(columns(np.zeros(0, np.int64)))) == 1:
            # one training slide (a fold of a 2-patient cohort, splits.validation none): nothing varies; the
            # encoder is the (unit-scaled) profile of the most expressed genes instead of a PCA
            order = np.argsort(-mean, kind="stable")[:max(1, min(self.n_components, len(mean)))]
            log.warning("one training slide: no variance to fit the RNA PCA; using its %d most expressed genes",
                        len(order))
            self.idx = np.sort(order)
            self.genes = [str(genes[i]) for i in self.idx]
            X = np.asarray(columns(self.idx), np.float64)
            self.mean, self.sd = X.mean(axis=0), np.ones(X.shape[1])
            self.components = np.eye(len(self.idx))
            self.scale = 1.0
            return self
        if len(order) == 0:
            raise InputError(f"no gene with mean log2 expression >= {self.min_mean:g} varies across the training slides",
                             field="slides.pca_min_mean", expected="a lower threshold")
        self.idx = np.sort(order)
        self.genes = [str(genes[i]) for i in self.idx]
        X = np.asarray(columns(self.idx), np.float64)
        self.mean, self.sd = X.mean(axis=0), X.std(axis=0) + 1e-6
        Z = (X - self.mean) / self.sd
        _, S, Vt = np.linalg.svd(Z, full_matrices=False)
        k = min(self.n_components, Vt.shape[0])
        self.components = Vt[:k]
        self.scale = float(S[0] / np.sqrt(max(1, len(Z) - 1))) or 1.0
        log.info("RNA PCA: %d genes -> %d components (%.1f%% of the training variance)", len(self.idx), k,
                 100 * float((S[:k] ** 2).sum() / max((S ** 2).sum(), 1e-12)))
        return self

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, L: np.ndarray) -> np.ndarray:
        return self._project(np.asarray(L, np.float64)[:, self.idx])

    def transform_matrix(self, expr: Any) -> np.ndarray:
        """Every row of an ExpressionMatrix (only the PCA's genes are read)."""
        return self._project(np.asfortranarray(expr.read(np.arange(expr.n_samples), cols=self.idx)))

    def _project(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean) / self.sd
        return (Z @ self.components.T / self.scale).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays saved beside the alignment checkpoint (the RNA preprocessing of this fold)."""
        return {"rna_pca.gene_index": self.idx, "rna_pca.mean": self.mean.astype(np.float32),
                "rna_pca.sd": self.sd.astype(np.float32), "rna_pca.components": self.components.astype(np.float32),
                "rna_pca.scale": np.asarray([self.scale], np.float32)}


class RegistryRna:
    """A frozen expression encoder of the registry (local weights) as the RNA encoder."""

    def __init__(self, name: str, weights: str | None, overrides: Mapping[str, Any] | None = None,
                 batch_size: int = 64) -> None:
        from morphomol.encoders import create_encoder, get_spec

        spec = get_spec(name)
        if spec.kind != "expression":
            raise InputError(f"encoder '{name}' is an {spec.kind} encoder", field="slides.rna_encoder",
                             expected="pca or an expression encoder of the registry")
        self.name = name
        self.encoder = create_encoder(name, weights, **dict(overrides or {}))
        self.genes: list[str] = []
        self.batch_size = int(batch_size)

    def fit(self, L: np.ndarray | None, genes: Sequence[str]) -> RegistryRna:
        self.genes = [str(g) for g in genes]
        self.encoder.set_genes(self.genes)  # type: ignore[operator]
        return self

    def fit_matrix(self, expr: Any, rows: np.ndarray) -> RegistryRna:
        return self.fit(None, expr.genes)

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def transform(self, L: np.ndarray) -> np.ndarray:
        import torch

        lin = np.exp2(np.asarray(L, np.float64)) - 1.0
        out = []
        with torch.inference_mode():
            for a in range(0, len(lin), self.batch_size):
                out.append(self.encoder(torch.from_numpy(lin[a:a + self.batch_size].astype(np.float32))).float().numpy())
        return np.concatenate(out).astype(np.float32)

    def transform_matrix(self, expr: Any) -> np.ndarray:
        """Every row of an ExpressionMatrix, read in blocks of whole encoder batches."""
        block = self.batch_size * max(1, 1024 // self.batch_size)
        rows = np.arange(expr.n_samples)
        return np.concatenate([self.transform(expr.read(rows[a:a + block])) for a in range(0, len(rows), block)])

    def state(self) -> dict[str, np.ndarray]:
        return {}


def make_rna_encoder(name: str, *, n_components: int, n_genes: int, min_mean: float = 1.0, weights: str | None = None,
                     overrides: Mapping[str, Any] | None = None) -> PcaRna | RegistryRna:
    if name == "pca":
        return PcaRna(n_components, n_genes, min_mean)
    return RegistryRna(name, weights, overrides)


class SlidePca:
    """Optional PCA of the frozen slide inputs (``slides.slide_pca_components``), fit on the training
    slides: standardised with training means/SDs and projected on the first principal axes. With few
    training slides it keeps the projection heads from fitting noise in a wide tile-feature space (the
    slide-side counterpart of the RNA PCA).

    * slide vectors (N x D, the cohort's summary): SVD of the standardised training vectors;
    * bags: the real tiles of the training slides' bags are not stacked: their mean and D x D covariance are
      accumulated in blocks (float64 sums, :func:`~morphomol.studies.slides.bank.tile_covariance`) and the
      axes are the leading eigenvectors of the correlation-scaled covariance (the right singular vectors of
      the standardised tile matrix), each signed so that its largest loading is positive. Only when the
      training tiles are few (at most ``SVD_MAX_VALUES`` numbers, 32 MB as float64: small cohorts such as the
      demo's) are they stacked and decomposed by SVD as the vectors are: the same axes up to their signs —
      and the signs, arbitrary in both methods, steer the ABMIL's training from its fixed initialisation, so
      small cohorts keep the numbers they had."""

    #: training tiles x dimensions up to which bag tiles are stacked and decomposed by SVD (see the class doc)
    SVD_MAX_VALUES = 4_000_000

    def __init__(self, n_components: int) -> None:
        self.n_components = int(n_components)
        self.mean = self.sd = self.components = np.zeros(0)

    def fit_vectors(self, X: np.ndarray) -> SlidePca:
        X = np.asarray(X, np.float64)
        self.mean, self.sd = X.mean(axis=0), X.std(axis=0) + 1e-6
        _, S, Vt = np.linalg.svd((X - self.mean) / self.sd, full_matrices=False)
        self.components = Vt[:min(self.n_components, Vt.shape[0])]
        log.info("slide PCA: %d-d inputs -> %d components (%.1f%% of the training variance)", X.shape[1],
                 len(self.components), 100 * float((S[:len(self.components)] ** 2).sum() / max((S ** 2).sum(), 1e-12)))
        return self

    def fit_bags(self, bags: Any) -> SlidePca:
        from morphomol.studies.slides.bank import tile_covariance

        if bags.n_tiles() * bags.bank.dim <= self.SVD_MAX_VALUES:
            return self.fit_vectors(np.concatenate([bags.bank.bag(r).astype(np.float32) for r in bags.rows]))
        mean, cov, n = tile_covariance(bags)
        self.mean, self.sd = mean, np.sqrt(np.maximum(np.diag(cov), 0.0)) + 1e-6
        corr = cov / np.outer(self.sd, self.sd)
        w, V = np.linalg.eigh((corr + corr.T) / 2.0)
        order = np.argsort(-w, kind="stable")
        w, V = np.maximum(w[order], 0.0), V[:, order]
        k = min(self.n_components, len(w), n)
        comps = V[:, :k].T.copy()
        flip = comps[np.arange(k), np.argmax(np.abs(comps), axis=1)] < 0
        comps[flip] *= -1.0
        self.components = comps
        log.info("slide PCA: %d tiles of %d slides, %d-d -> %d components (%.1f%% of the training variance; "
                 "covariance accumulated in blocks)", n, len(bags), len(mean), k,
                 100 * float(w[:k].sum() / max(w.sum(), 1e-12)))
        return self

    def project(self, X: np.ndarray) -> np.ndarray:
        return (((np.asarray(X, np.float64) - self.mean) / self.sd) @ self.components.T).astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def state(self) -> dict[str, np.ndarray]:
        return {"slide_pca.mean": self.mean.astype(np.float32), "slide_pca.sd": self.sd.astype(np.float32),
                "slide_pca.components": self.components.astype(np.float32)}


def reduce_slides(inputs: Any, rows: np.ndarray, n_components: int) -> tuple[Any, dict[str, np.ndarray]]:
    """(slide inputs through a PCA fit on slides ``rows``, its state) — unchanged (and no state) when
    ``n_components`` is 0. ``inputs``: :class:`~morphomol.studies.slides.data.SlideInputs`."""
    if not n_components:
        return inputs, {}
    pca = SlidePca(n_components)
    if inputs.bags is not None:
        pca.fit_bags(inputs.bags.subset(rows))
        return inputs.replace(bags=inputs.bags.with_transform(pca.project, pca.dim)), pca.state()
    pca.fit_vectors(inputs.slide[rows])
    return inputs.replace(slide=pca.project(inputs.slide)), pca.state()
