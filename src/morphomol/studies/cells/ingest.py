"""Per sample: the unit table of a cells cohort (``units.h5ad``) and the cells' H&E patches (``images.zarr``).

Sources (one per sheet row):

* AnnData ``.h5ad``: counts from X, a named layer, or ``.raw`` (``cells.layer: raw``); the label column
  ``cells.label_key``; the donor per cell from ``cells.donor_key`` (else the sheet's patient_id);
  ``obsm['spatial']`` kept when present; an optional row-aligned ``image_store`` (e.g. Visium spots with
  the spots study's patches);
* Xenium: ``cell_feature_matrix.h5`` (10x HDF5; gene-expression features only: control probes and
  codewords are dropped), ``cells.parquet`` centroids (µm), the Xenium Explorer cell-groups CSV
  (``cell_id, group``); with an H&E, the fusion study's registration maps each centroid into the slide
  (``Registration.um_to_he``) and cells whose patch cannot be cut (``cells.on_edge``) are dropped.

Checks (one InputError each, nothing written): duplicate cell ids (``obs_names``); missing label column /
layer / donor column; labels absent
from the label map (listed); non-integer or negative "counts" unless ``cells.values: normalised``; CSV cell
ids that the matrix lacks. The unit table follows the contract of :mod:`morphomol.data.units`: obs
``sample_id, patient_id, label, raw_label, cell_id, index, has_image, x_um, y_um, he_x_px, he_y_px,
n_counts, n_genes``; ``uns['morphomol']`` records ``values`` (counts | normalised) and ``spatial``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.labels import LabelMap
from morphomol.util.logs import get_logger

log = get_logger("cells.ingest")


@dataclass
class CellTable:
    """Cells of one sample before labels are mapped: matrix (N, G), ids, raw labels, donors, centroids (µm)."""

    X: sp.csr_matrix
    genes: list[str]
    cell_ids: np.ndarray
    raw_labels: np.ndarray
    donors: np.ndarray
    xy_um: np.ndarray | None
    source: str


def check_values(X: sp.csr_matrix, values: str, *, file: Path, field: str) -> None:
    """Counts must be non-negative integers; normalised values finite and non-negative."""
    data = X.data
    if not np.all(np.isfinite(data)):
        raise InputError("non-finite values", file=file, field=field, expected="finite expression values")
    if (data < 0).any():
        raise InputError(f"negative values (min {data.min():.4g}): scaled or centred data", file=file, field=field,
                         expected="raw counts (or log-normalised values with cells.values: normalised), e.g. .raw")
    if values == "counts":
        frac = np.abs(data - np.round(data))
        if (frac > 1e-6).any():
            i = int(np.argmax(frac > 1e-6))
            raise InputError(f"non-integer value {data[i]:.6g} where raw counts are expected ({int((frac > 1e-6).sum())} "
                             "such entries)", file=file, field=field,
                             expected="integer counts; if the values are normalised, set cells.values: normalised")


def read_h5ad_cells(path: str | Path, cfg: CellsConfig, patient: str) -> CellTable:
    """Cells of an AnnData file (see the module docstring)."""
    import anndata as ad

    path = Path(path)
    try:
        a = ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise several types
        raise InputError(f"cannot read AnnData ({type(exc).__name__}: {exc})", file=path) from None
    if cfg.layer is None:
        X, genes, field = a.X, list(a.var_names), "X"
    elif cfg.layer == "raw":
        if a.raw is None:
            raise InputError("no .raw", file=path, field="raw", expected="counts in .raw (cells.layer: raw)")
        X, genes, field = a.raw.X, list(a.raw.var_names), "raw.X"
    else:
        if cfg.layer not in a.layers:
            raise InputError(f"no layer {cfg.layer!r} (layers: {sorted(a.layers)})", file=path,
                             field=f"layers/{cfg.layer}", expected="the layer named by cells.layer")
        X, genes, field = a.layers[cfg.layer], list(a.var_names), f"layers/{cfg.layer}"
    names = a.obs_names.astype(str)
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise InputError(f"{int(names.duplicated().sum())} duplicate cell id(s) in obs_names, e.g. "
                         f"{list(dup[:5])}", file=path, field="obs_names (cell_id)",
                         expected="one row per cell with a unique id (e.g. prefix the ids of pooled batches)")
    if cfg.label_key not in a.obs.columns:
        raise InputError(f"no label column {cfg.label_key!r} in obs (columns: {list(a.obs.columns)})", file=path,
                         field=f"obs/{cfg.label_key}", expected="the cell-type column named by cells.label_key")
    if cfg.donor_key is not None:
        if cfg.donor_key not in a.obs.columns:
            raise InputError(f"no donor column {cfg.donor_key!r} in obs (columns: {list(a.obs.columns)})", file=path,
                             field=f"obs/{cfg.donor_key}", expected="the donor column named by cells.donor_key")
        donors = a.obs[cfg.donor_key].astype(str).to_numpy(object)
    else:
        donors = np.full(a.n_obs, str(patient), dtype=object)
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, np.float64))
    check_values(X, cfg.values, file=path, field=field)
    xy = np.asarray(a.obsm["spatial"], float)[:, :2] if "spatial" in a.obsm else None
    raw = a.obs[cfg.label_key].to_numpy(object)
    return CellTable(X, [str(g) for g in genes], a.obs_names.astype(str).to_numpy(object), raw, donors, xy, "h5ad")


def read_10x_h5(path: str | Path) -> tuple[sp.csr_matrix, list[str], np.ndarray]:
    """(cells x gene-expression features CSR, gene names, barcodes) of a 10x HDF5 feature-barcode matrix;
    control probes / codewords (feature_type other than Gene Expression, or control name prefixes) dropped."""
    import h5py

    from morphomol.io.xenium_layout import is_control

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(v) for v in m["shape"][()])
            mat = sp.csc_matrix((m["data"][()], m["indices"][()].astype(np.int64), m["indptr"][()].astype(np.int64)),
                                shape=shape)
            names = [v.decode() for v in m["features/name"][()]]
            ftype = ([v.decode() for v in m["features/feature_type"][()]] if "feature_type" in m["features"]
                     else ["Gene Expression"] * len(names))
            barcodes = np.array([v.decode() for v in m["barcodes"][()]], dtype=object)
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot read the 10x HDF5 matrix ({exc})", file=path,
                         expected="matrix/{data,indices,indptr,shape,barcodes,features/name}") from None
    keep = np.array([t == "Gene Expression" and not is_control(n) for t, n in zip(ftype, names, strict=True)])
    X = sp.csr_matrix(mat.T)[:, np.flatnonzero(keep)]
    return X, [n for n, k in zip(names, keep, strict=True) if k], barcodes


def read_xenium_cells(xenium_dir: str | Path, labels_csv: str | Path, cfg: CellsConfig, patient: str) -> CellTable:
    """Cells of a Xenium bundle with their Xenium Explorer groups (cells absent from the CSV are dropped)."""
    from morphomol.io.xenium_layout import CELLS_FILES

    d = Path(xenium_dir)
    h5 = d / "cell_feature_matrix.h5"
    if not h5.is_file():
        raise InputError("no cell_feature_matrix.h5", file=d, expected="a Xenium output bundle with its cell matrix")
    X, genes, barcodes = read_10x_h5(h5)
    check_values(X, "counts", file=h5, field="matrix/data")
    cells_file = next((d / n for n in CELLS_FILES if (d / n).is_file()), None)
    if cells_file is None:
        raise InputError("no cells table", file=d, expected=" or ".join(CELLS_FILES))
    cells = pd.read_parquet(cells_file) if cells_file.suffix == ".parquet" else pd.read_csv(cells_file)
    for col in ("cell_id", "x_centroid", "y_centroid"):
        if col not in cells.columns:
            raise InputError(f"no column {col!r}", file=cells_file, field=col, expected="cell_id, x_centroid, y_centroid")
    groups = pd.read_csv(labels_csv, dtype=str, comment="#").rename(columns=lambda c: c.strip())
    for col in ("cell_id", "group"):
        if col not in groups.columns:
            raise InputError(f"no column {col!r} (columns: {list(groups.columns)})", file=labels_csv, field=col,
                             expected="the Xenium Explorer cell-groups export: cell_id, group[, color]")
    if groups["cell_id"].duplicated().any():
        dup = groups.loc[groups["cell_id"].duplicated(), "cell_id"].iloc[0]
        raise InputError(f"cell {dup!r} listed twice", file=labels_csv, field="cell_id", expected="one group per cell")
    pos = {str(b): i for i, b in enumerate(barcodes)}
    missing = [c for c in groups["cell_id"] if c not in pos]
    if missing:
        raise InputError(f"{len(missing)} cell id(s) not in {h5.name}: {missing[:5]}", file=labels_csv, field="cell_id",
                         expected="ids of this sample's cells (wrong CSV for the sample?)")
    xy_of = {str(c): (float(x), float(y)) for c, x, y in zip(cells["cell_id"], cells["x_centroid"], cells["y_centroid"])}
    no_xy = [c for c in groups["cell_id"] if c not in xy_of]
    if no_xy:
        raise InputError(f"{len(no_xy)} labelled cell(s) without a centroid: {no_xy[:5]}", file=cells_file, field="cell_id")
    rows = np.array([pos[c] for c in groups["cell_id"]], dtype=np.int64)
    n_unlabelled = len(barcodes) - len(rows)
    if n_unlabelled:
        log.info("%s: %d of %d cells have no group in %s and are left out", d, n_unlabelled, len(barcodes),
                 Path(labels_csv).name)
    xy = np.array([xy_of[c] for c in groups["cell_id"]], float).reshape(-1, 2)
    return CellTable(X[rows], genes, groups["cell_id"].to_numpy(object), groups["group"].to_numpy(object),
                     np.full(len(rows), str(patient), dtype=object), xy, "xenium")


CELL_DIAMETER_UM = 10.0  # drawn cell size of uns['spatial'] (a typical nucleus-centred cell)


def build_units(*, sample: str, patient: str, out_units: str | Path, cfg: CellsConfig, label_map: str | Path,
                h5ad: str | Path | None = None, xenium_dir: str | Path | None = None,
                labels: str | Path | None = None, image_store: str | Path | None = None,
                he_path: str | Path | None = None, he_mpp: float | None = None,
                registration: str | Path | None = None) -> dict[str, Any]:
    """Rule entry (``cells_units``): write ``out_units``; returns a summary (counts per label, drops)."""
    from morphomol.data.units import write_units

    t0 = time.perf_counter()
    lm = LabelMap.read(label_map)
    if h5ad is not None:
        table = read_h5ad_cells(h5ad, cfg, patient)
        label_file, label_field = Path(h5ad), f"obs/{cfg.label_key}"
    elif xenium_dir is not None and labels is not None:
        table = read_xenium_cells(xenium_dir, labels, cfg, patient)
        label_file, label_field = Path(labels), "group"
    else:
        raise InputError(f"sample {sample}: neither h5ad nor xenium_dir + labels", field="h5ad")
    canon = np.asarray(lm.normalise(table.raw_labels.tolist(), file=label_file, field=label_field), dtype=object)
    keep = np.array([c is not None for c in canon])
    summary: dict[str, Any] = {"sample": sample, "source": table.source, "cells_read": int(len(canon)),
                               "dropped_by_label_map": int((~keep).sum())}
    n = len(canon)
    he_xy = np.full((n, 2), np.nan)
    has_image = np.zeros(n, bool)
    values = cfg.values if table.source == "h5ad" else "counts"
    if image_store is not None:
        n_img = _store_rows(image_store)
        if n_img != n:
            raise InputError(f"image store has {n_img} patches for {n} cells of {h5ad}", file=image_store,
                             field="images", expected="one patch per cell, in the AnnData's order")
        has_image[:] = True
    if he_path is not None:
        if registration is None or table.xy_um is None:
            raise InputError(f"sample {sample}: an H&E needs a Xenium row and its registration", field="he_path")
        he_xy, ok, counts = _he_centres(table.xy_um, he_path, he_mpp, registration, cfg)
        summary["patches"] = counts
        keep &= ok
        has_image[:] = True
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        raise InputError(f"sample {sample}: no cells left", field="label", expected="labelled cells")
    if he_path is not None:  # raster order in the slide: fewest region reads when cutting patches
        idx = idx[np.lexsort((he_xy[idx, 0], he_xy[idx, 1]))]
    X = table.X[idx]
    xy = table.xy_um[idx] if table.xy_um is not None else np.zeros((len(idx), 2))
    obs = pd.DataFrame({
        "sample_id": sample, "patient_id": table.donors[idx].astype(str), "label": canon[idx].astype(str),
        "raw_label": table.raw_labels[idx].astype(str), "cell_id": table.cell_ids[idx].astype(str),
        "index": np.arange(len(idx), dtype=np.int64), "source_row": idx.astype(np.int64),
        "has_image": has_image[idx], "x_um": xy[:, 0], "y_um": xy[:, 1],
        "he_x_px": he_xy[idx, 0], "he_y_px": he_xy[idx, 1],
        "n_counts": np.asarray(X.sum(1)).ravel(), "n_genes": np.diff(X.indptr)})
    obs.index = [f"{sample}__{i:06d}" for i in range(len(idx))]
    spatial = "µm (Xenium centroids)" if table.source == "xenium" else (
        "obsm['spatial'] of the input, as given" if table.xy_um is not None else "none (zeros)")
    uns = {"values": values, "spatial": spatial, "source": table.source, "label_map": str(label_map),
           "image_store": str(image_store) if image_store is not None else ("images.zarr" if he_path else "none")}
    image = None
    if he_path is not None:  # uns['spatial']: the H&E in the cells' µm frame (fusion registration)
        from morphomol.registration.warp import spatial_image

        image = spatial_image(he_path, spatial_um=xy, registration=registration, he_mpp=he_mpp, library_id=sample,
                              spot_diameter_um=CELL_DIAMETER_UM)
    write_units(out_units, obs, X, table.genes, spatial_um=xy, unit="cell", sample=sample, uns=uns,
                spatial_image=image)
    summary.update(cells=int(len(idx)), labels=obs["label"].value_counts().to_dict(),
                   donors=sorted(set(obs["patient_id"])), seconds=round(time.perf_counter() - t0, 2))
    log.info("%s: %d cells (%s), %d donor(s), %d labels; %s", sample, len(idx), table.source,
             len(summary["donors"]), len(summary["labels"]), {k: v for k, v in summary.items() if k == "patches"})
    return summary


def _store_rows(path: str | Path) -> int:
    import zarr

    try:
        return int(zarr.open_group(str(path), mode="r")["images"].shape[0])
    except Exception as exc:  # zarr raises several types for a missing / malformed store
        raise InputError(f"cannot open the image store ({exc})", file=path, field="images",
                         expected="a zarr group with an 'images' array (N, px, px, 3)") from None


def _he_centres(xy_um: np.ndarray, he_path: str | Path, he_mpp: float | None, registration: str | Path,
                cfg: CellsConfig) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Cell centres in H&E level-0 px (fusion registration) and which cells get a patch."""
    from morphomol.io.he import open_slide
    from morphomol.patches import plan_patches
    from morphomol.registration import Registration

    reg = Registration.load(registration)
    region = reg.assign_regions(xy_um[:, 0], xy_um[:, 1])
    out = np.full(xy_um.shape, np.nan)
    inside = region >= 0
    if inside.any():
        hx, hy = reg.um_to_he(xy_um[inside, 0], xy_um[inside, 1], region[inside])
        out[inside] = np.c_[hx, hy]
    slide = open_slide(he_path, mpp=he_mpp)
    try:
        plan = plan_patches(out, patch_um=cfg.patch_um, mpp=float(slide.mpp), image_wh=tuple(slide.dimensions),
                            on_edge=cfg.on_edge)
    finally:
        slide.close()
    counts = plan.counts()
    counts["outside every region"] = int((~inside).sum())
    return out, plan.keep & inside, counts


def write_cell_patches(*, units: str | Path, he_path: str | Path, he_mpp: float | None, out_store: str | Path,
                       cfg: CellsConfig, chunk: int = 64) -> int:
    """Rule entry (``cells_patches``): one ``cfg.patch_um`` patch per cell of the unit table (row i = unit
    i), cut from the H&E at the centres ``he_x_px, he_y_px`` (``morphomol.patches``); returns the count."""
    from morphomol.data.units import read_units
    from morphomol.io.he import open_slide
    from morphomol.patches import plan_patches, write_patch_store
    from morphomol.util.atomic import atomic_path

    a = read_units(units, backed=True)
    try:
        obs = a.obs[["he_x_px", "he_y_px"]].to_numpy(float)
        sample = str(a.uns["morphomol"]["sample"])
    finally:
        a.file.close()
    if not np.isfinite(obs).all():
        raise InputError("cells without an H&E position", file=units, field="he_x_px",
                         expected="a unit table written with the sample's H&E and registration")
    slide = open_slide(he_path, mpp=he_mpp)
    try:
        plan = plan_patches(obs, patch_um=cfg.patch_um, mpp=float(slide.mpp), image_wh=tuple(slide.dimensions),
                            on_edge="pad")
        if plan.n_kept != len(obs):
            raise InputError(f"{len(obs) - plan.n_kept} cell patch(es) outside the H&E", file=he_path,
                             expected="the H&E the unit table was built with")
        with atomic_path(out_store) as tmp:
            seconds = write_patch_store(tmp, slide, plan, out_px=cfg.patch_px, chunk=chunk,
                                        attrs={"sample": sample, "patch_um": cfg.patch_um, "mpp": float(slide.mpp),
                                               "unit": "cell"})
    finally:
        slide.close()
    log.info("%s: %d cell patches of %g µm (%d px) in %.1f s", sample, len(obs), cfg.patch_um, cfg.patch_px, seconds)
    return len(obs)
