"""``morphomol export features``: a features store as a HEST / TRIDENT-style h5 file.

One ``{sample}.h5`` per (sample, encoder) with

* ``features`` (N, D) float32: the frozen-encoder embeddings (row i = unit i);
* ``coords`` (N, 2) int64: the top-left corner of each unit's patch in level-0 H&E px (TRIDENT / CLAM
  convention), attrs ``patch_size_level0`` (px), ``level0_mpp``, ``patch_size_um``, ``name``;
* ``barcodes`` (N, 1) bytes: the unit ids (HEST's name for spot barcodes);
* ``coords_center_px`` (N, 2) float64 and ``coords_um`` (N, 2) float64: centres in H&E px and in µm;
* file attrs: ``encoder``, ``sample``, ``dim``, ``weights_sha256``, ``source`` (the zarr store).

Ids and centres come from the store itself (:func:`morphomol.data.features.read_feature_units`) or,
for stores written before they were stored, from the unit table (same row order, checked by count).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("export.features")


def _patch_size_px(fs: FinishedSample, units: Any, reg: Any) -> float | None:
    """Level-0 px side of a unit's patch: tiles' ``size_px``, else the image store's ``patch_um`` / mpp."""
    if "size_px" in units.obs.columns and len(units.obs):
        return float(np.median(units.obs["size_px"].to_numpy(float)))
    if fs.image_store is not None and Path(fs.image_store).exists():
        import zarr

        attrs = dict(zarr.open_group(str(fs.image_store), mode="r").attrs)
        if attrs.get("patch_px"):
            return float(attrs["patch_px"])
        if attrs.get("patch_um"):
            mpp = float(np.sqrt(abs(np.linalg.det(np.asarray(reg.regions[0].matrix, float)[:2, :2]))))
            return float(attrs["patch_um"]) / mpp
    return None


def export_features_h5(fs: FinishedSample, encoder: str, out: str | Path) -> Path:
    """Write ``out`` (a directory gets ``{sample}.h5``) from the sample's ``encoder`` features store."""
    import h5py

    from morphomol.data.features import geometry_from_obs, read_feature_units, read_features

    store = fs.features.get(encoder)
    if store is None:
        raise InputError(f"sample {fs.sample} of cohort {fs.cohort} has no {encoder} features (make them with the "
                         "features rule: `snakemake` with features.encoders listing it)", field="features.encoders",
                         expected=f"results/{fs.cohort}/features/{encoder}/{fs.sample}.zarr")
    feats, attrs = read_features(store)
    geo = read_feature_units(store)
    units = fs.read_units()
    reg = fs.transform(units)
    if geo is None:  # an older store: the unit table's rows, in the same order
        if units.n_obs != len(feats):
            raise InputError(f"{len(feats)} feature rows but {units.n_obs} units", file=store, field="features",
                             expected="one feature row per unit of the unit table")
        sp = np.asarray(units.obsm["spatial"]) if "spatial" in units.obsm else None
        geo = geometry_from_obs(units.obs, sp, str(fs.units))
    if len(geo) != len(feats):
        raise InputError(f"{len(feats)} feature rows but {len(geo)} unit ids", file=store, field="barcodes",
                         expected="one id per feature row")
    size = _patch_size_px(fs, units, reg) or geo.size_px
    centre = np.asarray(geo.coords_px, float)
    top_left = np.round(centre - (size or 0.0) / 2.0)
    mpp = float(np.sqrt(abs(np.linalg.det(np.asarray(reg.regions[0].matrix, float)[:2, :2]))))
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".h5", ".hdf5"):
        out = out / f"{fs.sample}.h5"
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h:
        h.create_dataset("features", data=feats.astype(np.float32))
        c = h.create_dataset("coords", data=np.nan_to_num(top_left, nan=-1).astype(np.int64))
        c.attrs.update({"patch_size_level0": int(round(size)) if size else -1, "level0_mpp": mpp,
                        "patch_size_um": float(size * mpp) if size else -1.0, "name": fs.sample,
                        "coords": "top-left corner of each unit's patch, level-0 H&E px"})
        h.create_dataset("barcodes", data=np.asarray([str(b).encode() for b in geo.barcodes], dtype="S").reshape(-1, 1))
        h.create_dataset("coords_center_px", data=centre)
        h.create_dataset("coords_um", data=np.asarray(geo.coords_um, float))
        h.attrs.update({"encoder": encoder, "sample": fs.sample, "dim": int(feats.shape[1]),
                        "weights_sha256": str(attrs.get("weights_sha256", "")), "source": str(store)})
    log.info("%s: %s features (%d x %d) -> %s", fs.sample, encoder, *feats.shape, out)
    return out


__all__ = ["export_features_h5"]
