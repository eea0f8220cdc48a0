"""``morphomol export spatialdata``: one SpatialData zarr per finished sample.

Elements (coordinate system ``global`` = the sample's µm frame, that of ``obsm['spatial']``):

* image ``he``: the H&E (pyramid level ``he_level``, multiscale), with ``Affine`` H&E px -> µm to
  ``global`` and ``Identity`` to ``he_px`` (its own pixels). A registration with several regions has
  one affine per region; the image takes the affine of the region holding most units (the others are
  listed in the table's ``uns['morphomol_export']``), so it is exact for single-region samples;
* shapes ``units``: tiles as their square (the H&E square mapped to µm with its region's affine),
  spots and cells as circles (``radius`` µm); index = row of the unit table;
* points ``transcripts`` (Xenium samples): ``x``, ``y`` (µm), ``feature_name``, ``qv``, streamed from the
  bundle (Parquet read lazily with dask);
* tables ``table``: the unit table (counts in ``X``, obs, ``obsm['spatial']``) annotating ``units``
  (``region_key`` ``element``, ``instance_key`` ``instance_id``); ``predictions``: the per-sample
  predictions AnnData (layers ``measured``, ``pred_<setting>``) when the sample has them.

Read back with ``spatialdata.read_zarr(path)``; napari-spatialdata shows it (``Interactive(sdata)``).
Written to a temporary sibling and renamed: a failed export leaves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample, unit_diameter_um
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("export.spatialdata")

REGION_KEY, INSTANCE_KEY = "element", "instance_id"


def dominant_region(units: Any, reg: Any) -> int:
    """The registration region holding most units (its affine places the whole image)."""
    if len(reg.regions) == 1:
        return 0
    if "region" in units.obs.columns:
        r = units.obs["region"].to_numpy()
    else:
        xy = np.asarray(units.obsm["spatial"], float)
        r = reg.assign_regions(xy[:, 0], xy[:, 1])
    r = np.asarray(r, int)
    r = r[(r >= 0) & (r < len(reg.regions))]
    return int(np.bincount(r, minlength=len(reg.regions)).argmax()) if len(r) else 0


def he_dask(slide: Any, level: int = 0, chunk: int = 1024) -> Any:
    """The slide's pyramid level as a lazy (3, H, W) uint8 dask array read chunk by chunk."""
    import dask
    import dask.array as da

    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    rows = []
    for y0 in range(0, lh, chunk):
        h = min(chunk, lh - y0)
        row = []
        for x0 in range(0, lw, chunk):
            w = min(chunk, lw - x0)
            blk = dask.delayed(slide.read_region)((int(round(x0 * ds)), int(round(y0 * ds))), level, (w, h))
            row.append(da.from_delayed(blk, shape=(h, w, 3), dtype=np.uint8))
        rows.append(da.concatenate(row, axis=1))
    return da.concatenate(rows, axis=0).transpose(2, 0, 1)


def _units_shapes(units: Any, reg: Any, kind: str) -> Any:
    import geopandas as gpd
    from shapely.geometry import Point, Polygon

    obs = units.obs
    n = units.n_obs
    if {"x_px", "y_px", "size_px"} <= set(obs.columns):  # tiles: H&E squares through their region's affine
        x, y, s = (obs[c].to_numpy(float) for c in ("x_px", "y_px", "size_px"))
        if "region" in obs.columns:
            r = obs["region"].to_numpy(int)
        else:
            xy = np.asarray(units.obsm["spatial"], float)
            r = reg.assign_regions(xy[:, 0], xy[:, 1])
        geoms = []
        for i in range(n):
            cx = np.array([x[i], x[i] + s[i], x[i] + s[i], x[i]])
            cy = np.array([y[i], y[i], y[i] + s[i], y[i] + s[i]])
            ux, uy = reg.he_to_um(cx, cy, int(max(r[i], 0)))
            geoms.append(Polygon(np.c_[ux, uy]))
        return gpd.GeoDataFrame(geometry=geoms, index=np.arange(n)), "square"
    xy = np.asarray(units.obsm["spatial"], float)
    gdf = gpd.GeoDataFrame(geometry=[Point(a, b) for a, b in xy], index=np.arange(n))
    gdf["radius"] = unit_diameter_um(units) / 2.0
    return gdf, "circle"


def _transcripts(xenium_dir: Path) -> Any:
    import dask.dataframe as dd

    from morphomol.io.xenium_layout import TRANSCRIPT_FILES

    f = next((xenium_dir / n for n in TRANSCRIPT_FILES if (xenium_dir / n).is_file()), None)
    if f is None:
        raise InputError("no transcripts file", file=xenium_dir, expected=" or ".join(TRANSCRIPT_FILES))
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        have = pq.ParquetFile(f).schema_arrow.names
        cols = [c for c in ("feature_name", "x_location", "y_location", "z_location", "qv") if c in have]
        ddf = dd.read_parquet(str(f), columns=cols)
    else:
        ddf = dd.read_csv(str(f), blocksize=None)
        ddf = ddf[[c for c in ("feature_name", "x_location", "y_location", "z_location", "qv") if c in ddf.columns]]
    ddf = ddf.rename(columns={"x_location": "x", "y_location": "y"})
    ddf = ddf[[c for c in ddf.columns if c != "z_location"]]
    # known categories (one pass over the names): spatialdata needs them for the feature key
    ddf["feature_name"] = ddf["feature_name"].astype(str).astype("category").cat.as_known()
    return ddf


def build_sdata(fs: FinishedSample, *, he_level: int = 0, transcripts: bool = True) -> Any:
    """The SpatialData of a finished sample (module docstring); lazy where it can be (image, points)."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity

    from morphomol.io.he import open_slide

    units = fs.read_units()
    reg = fs.transform(units)
    elements: dict[str, dict[str, Any]] = {"images": {}, "shapes": {}, "points": {}, "tables": {}}
    main = dominant_region(units, reg)
    m = np.asarray(reg.regions[main].matrix, float)
    if fs.he_path is not None and Path(fs.he_path).is_file():
        slide = open_slide(fs.he_path, mpp=fs.he_mpp)
        if not 0 <= he_level < slide.level_count:
            raise InputError(f"H&E level {he_level} out of range (0..{slide.level_count - 1})", file=fs.he_path,
                             field="he_level", expected="a pyramid level of the slide")
        ds = float(slide.level_downsamples[he_level])
        arr = he_dask(slide, he_level)
        scales = []
        h, w = arr.shape[1:]
        while min(h, w) >= 1024 and len(scales) < 6:
            scales.append(2)
            h, w = h // 2, w // 2
        affine = Affine(m @ np.diag([ds, ds, 1.0]), input_axes=("x", "y"), output_axes=("x", "y"))
        elements["images"]["he"] = Image2DModel.parse(arr, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                                      scale_factors=scales or None, chunks=(3, 1024, 1024),
                                                      transformations={"global": affine, "he_px": Identity()})
    gdf, shape = _units_shapes(units, reg, fs.kind)
    elements["shapes"]["units"] = ShapesModel.parse(gdf, transformations={"global": Identity()})
    if transcripts and fs.kind == "xenium" and fs.xenium_dir is not None and Path(fs.xenium_dir).is_dir():
        ddf = _transcripts(Path(fs.xenium_dir))
        elements["points"]["transcripts"] = PointsModel.parse(ddf, coordinates={"x": "x", "y": "y"},
                                                              feature_key="feature_name",
                                                              transformations={"global": Identity()})
    table = units.copy()
    table.uns.pop("spatial", None)  # the image lives in the SpatialData itself
    table.obs[REGION_KEY] = "units"
    table.obs[REGION_KEY] = table.obs[REGION_KEY].astype("category")
    table.obs[INSTANCE_KEY] = np.arange(table.n_obs)
    table.uns["morphomol_export"] = {
        "sample": fs.sample, "cohort": fs.cohort, "unit_shape": shape, "he_level": int(he_level),
        "image_region": reg.regions[main].name, "region_affines": {r.name: np.asarray(r.matrix).tolist() for r in reg.regions},
        "coordinates": "µm"}
    elements["tables"]["table"] = TableModel.parse(table, region="units", region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    if fs.predictions is not None and Path(fs.predictions).is_file():
        pa = ad.read_h5ad(fs.predictions)
        pos = {u: i for i, u in enumerate(units.obs_names)}
        missing = [u for u in pa.obs_names if u not in pos]
        if missing:
            raise InputError(f"{len(missing)} predicted unit(s) not in the unit table (e.g. {missing[0]})",
                             file=fs.predictions, field="obs_names", expected="the sample's unit ids")
        pa.uns.pop("spatial", None)
        pa.obs[REGION_KEY] = "units"
        pa.obs[REGION_KEY] = pa.obs[REGION_KEY].astype("category")
        pa.obs[INSTANCE_KEY] = [pos[u] for u in pa.obs_names]
        elements["tables"]["predictions"] = TableModel.parse(pa, region="units", region_key=REGION_KEY,
                                                             instance_key=INSTANCE_KEY)
    return sd.SpatialData(**{k: v for k, v in elements.items() if v})


def export_spatialdata(fs: FinishedSample, out: str | Path, *, he_level: int = 0, transcripts: bool = True) -> Path:
    """Write the sample's SpatialData zarr to ``out`` (atomically); returns ``out``."""
    import warnings

    sdata = build_sdata(fs, he_level=he_level, transcripts=transcripts)
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(str(tmp))
    log.info("%s: SpatialData %s (%s)", fs.sample, out, ", ".join(f"{k}: {', '.join(v)}" for k, v in
                                                               (("images", sdata.images), ("shapes", sdata.shapes),
                                                                ("points", sdata.points), ("tables", sdata.tables))
                                                               if len(v)))
    return out


__all__ = ["INSTANCE_KEY", "REGION_KEY", "build_sdata", "dominant_region", "export_spatialdata", "he_dask"]
