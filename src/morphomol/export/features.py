"""``morphomol export features``: a features store as an h5 file that TRIDENT and HEST-Bench load as is.

One ``{sample}.h5`` per (sample, encoder) with

* ``features`` (N, D) float32: the frozen-encoder embeddings (row i = unit i), TRIDENT's name (its
  ``save_h5`` / slide encoders read ``features`` and ``coords``);
* ``embeddings``: the same dataset (an HDF5 hard link, no second copy), HEST-Bench's name (its
  ``read_assets_from_h5`` + ``assets['embeddings']``);
* ``coords`` (N, 2) int64: the top-left corner of each unit's patch in level-0 H&E px (TRIDENT / CLAM
  convention), with TRIDENT's ``coords_to_h5`` attributes: ``patch_size`` and ``target_magnification``
  (the patch as read: level-0 px at the slide's magnification), ``patch_size_level0`` (=
  ``patch_size * level0_magnification // target_magnification``), ``level0_magnification`` (TRIDENT's
  µm/px -> magnification table), ``overlap``, ``name``, ``savetodir``, ``level0_width``,
  ``level0_height``; and ours: ``level0_mpp``, ``patch_size_um``;
* ``barcodes`` (N, 1) bytes: the unit ids (HEST's name for spot barcodes; HEST-Bench reads
  ``assets['barcodes'].flatten().astype(str)``);
* ``coords_center_px`` (N, 2) float64 and ``coords_um`` (N, 2) float64: centres in H&E px and in µm;
* file attrs: ``encoder``, ``sample``, ``dim``, ``weights_sha256``, ``source`` (the zarr store).

Every dataset has one row per unit (HEST-Bench concatenates every dataset of every sample along axis 0).
A sample without a features store for the encoder is
:class:`~morphomol.export.sample.NotExportable` (``morphomol export`` skips it and says why).

Ids and centres come from the store itself (:func:`morphomol.data.features.read_feature_units`) or,
for stores written before they were stored, from the unit table (same row order, checked by count).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample, NotExportable
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


def trident_magnification(mpp: float) -> int:
    """TRIDENT's objective magnification of a level-0 µm/px (its ``WSI`` table: < 0.16 -> 80x, < 0.2 -> 60x,
    < 0.3 -> 40x, < 0.6 -> 20x, < 1.2 -> 10x, < 2.4 -> 5x); coarser images: 10 / mpp, at least 1."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    return max(1, int(round(10.0 / mpp)))


def _level0_size(fs: FinishedSample) -> tuple[int, int]:
    if fs.he_path is None or not Path(fs.he_path).is_file():
        return -1, -1
    from morphomol.io.he import open_slide

    with open_slide(fs.he_path, mpp=fs.he_mpp) as slide:
        w, h = slide.dimensions
    return int(w), int(h)


def export_features_h5(fs: FinishedSample, encoder: str, out: str | Path, *, notes: list[str] | None = None) -> Path:
    """Write ``out`` (a directory gets ``{sample}.h5``) from the sample's ``encoder`` features store."""
    import h5py

    from morphomol.data.features import geometry_from_obs, read_feature_units, read_features

    store = fs.features.get(encoder)
    if store is None:
        raise NotExportable(f"sample {fs.sample} of cohort {fs.cohort} has no {encoder} features (make them with the "
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
    if not size:
        raise NotExportable(f"sample {fs.sample}: the patch size of the {encoder} features is unknown", file=store,
                         field="patch_px", expected="tiles' size_px in the unit table or patch_px / patch_um in "
                                                    "the image store")
    mag = trident_magnification(mpp)
    psize = int(round(size))
    width, height = _level0_size(fs)
    if width < 0 and notes is not None:
        notes.append("coords attrs level0_width / level0_height are -1: no H&E image")
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".h5", ".hdf5"):
        out = out / f"{fs.sample}.h5"
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h:
        f = h.create_dataset("features", data=feats.astype(np.float32))
        f.attrs.update({"name": fs.sample, "encoder": encoder})
        h["embeddings"] = f  # hard link: HEST-Bench's name for the same rows
        c = h.create_dataset("coords", data=np.nan_to_num(top_left, nan=-1).astype(np.int64))
        # the patch as read at level 0: target = level-0 magnification, patch_size_level0 = patch_size * mag // mag
        c.attrs.update({"patch_size": psize, "patch_size_level0": psize, "level0_magnification": mag,
                        "target_magnification": mag, "overlap": 0, "name": fs.sample,
                        "savetodir": str(Path(out).parent.resolve()), "level0_width": width, "level0_height": height,
                        "level0_mpp": mpp, "patch_size_um": float(size * mpp),
                        "description": "(x, y) top-left corner of each unit's patch, level-0 H&E px"})
        h.create_dataset("barcodes", data=np.asarray([str(b).encode() for b in geo.barcodes], dtype="S").reshape(-1, 1))
        h.create_dataset("coords_center_px", data=centre)
        h.create_dataset("coords_um", data=np.asarray(geo.coords_um, float))
        h.attrs.update({"encoder": encoder, "sample": fs.sample, "dim": int(feats.shape[1]),
                        "weights_sha256": str(attrs.get("weights_sha256", "")), "source": str(store)})
    log.info("%s: %s features (%d x %d) -> %s", fs.sample, encoder, *feats.shape, out)
    return out


__all__ = ["export_features_h5", "trident_magnification"]
