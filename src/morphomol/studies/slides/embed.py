"""Frozen embeddings the alignment module reads: slide inputs from the feature cache, RNA encoders.

Slide side (rows = slides, in a given order): :func:`slide_inputs` reads each slide's tile features
(``features/{encoder}/{sample}.zarr``, rows = the slide's tiles) and returns the mean-pooled vector
(``slide``) and, for bag encoders, a padded bag (``bag`` (N, T, D), ``mask`` (N, T)) of at most
``max_tiles`` tiles per slide (a seeded subset when a slide has more).

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
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.embed")


def slide_inputs(features: Mapping[str, str | Path], samples: Sequence[str], *, bag: bool, max_tiles: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """``{"slide": (N, D)}`` (+ ``bag``, ``mask`` when ``bag``) for ``samples`` in order; reads their features."""
    from morphomol.data.features import read_features

    feats = []
    for s in samples:
        if s not in features:
            raise InputError(f"no features for slide {s}", field="features", expected="a features store per slide")
        f, _ = read_features(features[s])
        if len(f) == 0:
            raise InputError(f"slide {s} has no tiles in its features store", file=features[s], field="features")
        feats.append(np.asarray(f, np.float32))
    dims = {f.shape[1] for f in feats}
    if len(dims) != 1:
        raise InputError(f"feature stores of different dimensions {sorted(dims)}", field="features",
                         expected="one encoder for every slide")
    out = {"slide": np.stack([f.mean(axis=0) for f in feats]).astype(np.float32)}
    if bag:
        t = min(max_tiles, max(len(f) for f in feats))
        d = feats[0].shape[1]
        B = np.zeros((len(feats), t, d), np.float32)
        M = np.zeros((len(feats), t), bool)
        for i, (s, f) in enumerate(zip(samples, feats, strict=True)):
            if len(f) > t:
                rng = np.random.default_rng([int(seed), *str(s).encode()])
                f = f[np.sort(rng.choice(len(f), size=t, replace=False))]
            B[i, :len(f)] = f
            M[i, :len(f)] = True
        out["bag"], out["mask"] = B, M
    return out


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
        L = np.asarray(L, np.float64)
        var = L.var(axis=0)
        order = np.argsort(-var, kind="stable")
        order = order[(var[order] > 0) & (L.mean(axis=0)[order] >= self.min_mean)]
        if self.n_genes:
            order = order[:self.n_genes]
        if len(order) == 0:
            raise InputError(f"no gene with mean log2 expression >= {self.min_mean:g} varies across the training slides",
                             field="slides.pca_min_mean", expected="a lower threshold")
        self.idx = np.sort(order)
        self.genes = [str(genes[i]) for i in self.idx]
        X = L[:, self.idx]
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
        Z = (np.asarray(L, np.float64)[:, self.idx] - self.mean) / self.sd
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

    def fit(self, L: np.ndarray, genes: Sequence[str]) -> RegistryRna:
        self.genes = [str(g) for g in genes]
        self.encoder.set_genes(self.genes)  # type: ignore[operator]
        return self

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

    def state(self) -> dict[str, np.ndarray]:
        return {}


def make_rna_encoder(name: str, *, n_components: int, n_genes: int, min_mean: float = 1.0, weights: str | None = None,
                     overrides: Mapping[str, Any] | None = None) -> PcaRna | RegistryRna:
    if name == "pca":
        return PcaRna(n_components, n_genes, min_mean)
    return RegistryRna(name, weights, overrides)


class SlidePca:
    """Optional PCA of the frozen slide inputs (``slides.slide_pca_components``), fit on the training
    slides (their vectors, or the real tiles of their bags): standardised with training means/SDs and
    projected on the first principal axes. With few training slides it keeps the projection heads from
    fitting noise in a wide tile-feature space (the slide-side counterpart of the RNA PCA)."""

    def __init__(self, n_components: int) -> None:
        self.n_components = int(n_components)
        self.mean = self.sd = self.components = np.zeros(0)

    def fit(self, arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> SlidePca:
        X = arrays["bag"][rows][arrays["mask"][rows]] if "bag" in arrays else arrays["slide"][rows]
        X = np.asarray(X, np.float64)
        self.mean, self.sd = X.mean(axis=0), X.std(axis=0) + 1e-6
        _, S, Vt = np.linalg.svd((X - self.mean) / self.sd, full_matrices=False)
        self.components = Vt[:min(self.n_components, Vt.shape[0])]
        log.info("slide PCA: %d-d inputs -> %d components (%.1f%% of the training variance)", X.shape[1],
                 len(self.components), 100 * float((S[:len(self.components)] ** 2).sum() / max((S ** 2).sum(), 1e-12)))
        return self

    def _project(self, X: np.ndarray) -> np.ndarray:
        return (((np.asarray(X, np.float64) - self.mean) / self.sd) @ self.components.T).astype(np.float32)

    def transform(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(arrays)
        if "bag" in arrays:
            B = arrays["bag"]
            out["bag"] = self._project(B.reshape(-1, B.shape[-1])).reshape(B.shape[0], B.shape[1], -1)
            out["bag"][~arrays["mask"]] = 0.0
        else:
            out["slide"] = self._project(arrays["slide"])
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"slide_pca.mean": self.mean.astype(np.float32), "slide_pca.sd": self.sd.astype(np.float32),
                "slide_pca.components": self.components.astype(np.float32)}


def reduce_slides(arrays: Mapping[str, np.ndarray], rows: np.ndarray, n_components: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(slide inputs through a training-split PCA, its state) — unchanged (and no state) when ``n_components`` is 0."""
    if not n_components:
        return dict(arrays), {}
    pca = SlidePca(n_components).fit(arrays, rows)
    return pca.transform(arrays), pca.state()
