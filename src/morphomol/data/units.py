"""The unit table: the per-sample contract every study shares.

``units.h5ad`` is an AnnData with one observation per *unit* (a tile of the fusion study, a spot,
a cell) of one sample:

* ``obs`` index: unit ids (``{sample}__{index:06d}`` for tiles), row ``i`` = row ``i`` of the
  sample's image store and of every features store (``features/{encoder}/{sample}.zarr``);
  columns ``sample_id``, ``patient_id`` and the unit's own geometry (tiles: ``x_px, y_px, size_px,
  x_um, y_um, region, n_transcripts, ...``);
* ``obsm['spatial']``: (N, 2) float64 unit centres in µm (the sample's transcript / spot frame);
* ``X``: raw counts (CSR, float32 holding integers), ``var_names`` = genes;
* ``uns['morphomol']``: ``{"unit": "tile" | "spot" | "cell", "sample": ..., ...}``;
* ``uns['spatial'][library_id]`` (when the sample has an H&E; the scanpy / squidpy / Space Ranger
  convention): ``images: {hires: (H, W, 3) uint8}`` = the H&E resampled into the units' µm frame
  (:mod:`morphomol.registration.warp`), ``scalefactors: {tissue_hires_scalef: hires px per µm,
  spot_diameter_fullres: unit diameter in µm}`` (the coordinates are µm, so "full resolution" is
  1 px = 1 µm), ``metadata: {source_image, he_mpp, coordinates: "µm"}``. ``library_id`` = the sample;
  ``sc.pl.spatial(a, library_id=sample)`` draws the units over the H&E, ``sq.gr.spatial_neighbors(a)``
  builds the neighbour graph from ``obsm['spatial']``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path

UNIT_KINDS = ("tile", "spot", "cell")


@dataclass(frozen=True)
class SpatialImage:
    """A downsampled H&E in the units' µm frame (built by :func:`morphomol.registration.warp.spatial_image`)."""

    library_id: str
    hires: np.ndarray          # (H, W, 3) uint8; pixel (0, 0) is µm (0, 0)
    scalef: float              # hires px per µm
    spot_diameter_um: float    # drawn unit size (tiles: the stride; spots: the spot; cells: ~a nucleus)
    source: str = ""
    he_mpp: float | None = None

    def to_uns(self) -> dict[str, Any]:
        """``uns['spatial']`` in the scanpy / squidpy convention."""
        return {self.library_id: {
            "images": {"hires": np.ascontiguousarray(self.hires, dtype=np.uint8)},
            "scalefactors": {"tissue_hires_scalef": float(self.scalef),
                             "spot_diameter_fullres": float(self.spot_diameter_um)},
            "metadata": {"source_image": self.source, "he_mpp": float(self.he_mpp or float("nan")),
                         "coordinates": "µm"},
        }}


def write_units(path: str | Path, obs: pd.DataFrame, counts: Any, genes: Sequence[str], *, spatial_um: np.ndarray,
                unit: str, sample: str, patient: str | None = None, uns: Mapping[str, Any] | None = None,
                index_col: str | None = None, spatial_image: SpatialImage | None = None) -> Path:
    """Write ``units.h5ad`` atomically. ``counts``: (N, G) dense or sparse raw counts; ``spatial_image``:
    the H&E in the µm frame, stored as ``uns['spatial']`` (see the module docstring)."""
    import anndata as ad
    import scipy.sparse as sp

    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {UNIT_KINDS}, not {unit!r}")
    obs = obs.copy()
    if index_col is not None:
        obs.index = obs[index_col].astype(str).to_numpy()
    obs.index = obs.index.astype(str)
    obs.index.name = None
    if "sample_id" not in obs.columns:
        obs.insert(0, "sample_id", str(sample))
    if patient is not None and "patient_id" not in obs.columns:
        obs.insert(1, "patient_id", str(patient))
    X = counts if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    X = sp.csr_matrix(X, dtype=np.float32)
    spatial = np.asarray(spatial_um, dtype=np.float64)
    if spatial.shape != (len(obs), 2):
        raise ValueError(f"spatial_um has shape {spatial.shape}, expected ({len(obs)}, 2)")
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes], dtype=object)))
    a.obsm["spatial"] = spatial
    a.uns["morphomol"] = {"unit": unit, "sample": str(sample), **({"patient": str(patient)} if patient else {}),
                          **dict(uns or {})}
    if spatial_image is not None:
        a.uns["spatial"] = spatial_image.to_uns()
    path = Path(path)
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
    return path


def read_units(path: str | Path, *, backed: bool = False) -> Any:
    """The AnnData of ``units.h5ad`` (``backed=True``: X stays on disk)."""
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise InputError("unit table not found", file=p, expected="units.h5ad written by the pipeline")
    try:
        return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # h5py / anndata raise several types for damaged files
        raise InputError(f"cannot read unit table ({type(exc).__name__}: {exc})", file=p) from None


def unit_genes(path: str | Path) -> list[str]:
    a = read_units(path, backed=True)
    try:
        return [str(g) for g in a.var_names]
    finally:
        a.file.close()


def unit_counts(path: str | Path, genes: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
    """Dense float64 counts of ``genes`` (columns in that order) for ``rows`` (default: all units)."""
    a = read_units(path)
    pos = {str(g): i for i, g in enumerate(a.var_names)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise InputError(f"{len(missing)} gene(s) not in the unit table: {', '.join(missing[:10])}", file=path,
                         field="var_names", expected="every requested gene")
    X = a.X[:, [pos[g] for g in genes]]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    X = np.asarray(X, dtype=np.float64)
    return X if rows is None else X[np.asarray(rows, dtype=np.int64)]


def count_units(path: str | Path) -> int:
    """Number of units of ``units.h5ad`` (reads only the length of the obs index)."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise InputError("unit table not found", file=p, expected="units.h5ad written by the pipeline")
    try:
        with h5py.File(p, "r") as f:
            obs = f["obs"]
            return int(obs[obs.attrs["_index"]].shape[0])
    except Exception as exc:  # h5py raises several types for damaged files
        raise InputError(f"cannot read unit table ({type(exc).__name__}: {exc})", file=p) from None


def unit_ids(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids as str, row ``index`` in the sample's stores) of ``units.h5ad``, without reading X."""
    a = read_units(path, backed=True)
    try:
        obs = a.obs
        ids = obs.index.astype(str).to_numpy()
        index = obs["index"].to_numpy(np.int64) if "index" in obs.columns else np.arange(len(obs), dtype=np.int64)
    finally:
        a.file.close()
    return ids, index
