"""``morphomol export spatialdata``: one SpatialData zarr per finished sample.

Elements (coordinate system ``global`` = the sample's µm frame, that of ``obsm['spatial']``):

* image ``he``: the H&E (pyramid level ``he_level``, multiscale), with ``Affine`` image px -> µm to
  ``global`` and image px -> level-0 H&E px to ``he_px``. A registration with several regions (tissue
  pieces placed on the slide each with its own affine) gives one image element per region instead,
  ``he_<region>``: the H&E cropped to the region's polygon (its µm polygon through its own inverse
  affine, grown by 16 px), RGBA, transparent outside the polygon (where the other pieces are), each
  with its own affine to ``global``, so that every region lines up with its units and transcripts and
  no piece is drawn twice (a region without a polygon gets the whole image; spatialdata-plot and napari
  draw the pieces side by side as one tissue);
* shapes ``units``: tiles as their square (the H&E square mapped to µm with its region's affine),
  spots and cells as circles (``radius`` µm); index = row of the unit table;
* points ``transcripts`` (Xenium samples): ``x``, ``y`` (µm), ``feature_name``, ``qv``, streamed from the
  bundle (Parquet read lazily with dask), those with ``qv >= qv_min`` (the pipeline's ``io.qv_min``;
  ``None`` keeps all);
* tables ``table``: the unit table (counts in ``X``, obs, ``obsm['spatial']``) annotating ``units``
  (``region_key`` ``element``, ``instance_key`` ``instance_id``); ``predictions``: the per-sample
  predictions AnnData (layers ``measured``, ``pred_<setting>``) when the sample has them.

A sample whose units have no coordinates (an AnnData-only sample of a cells cohort) is
:class:`~morphomol.export.sample.NotExportable`; a sample without an H&E is exported without image.
Read back with ``spatialdata.read_zarr(path)``; napari-spatialdata shows it (``Interactive(sdata)``).
Written to a temporary sibling and renamed: a failed export leaves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample, NotExportable, has_coordinates, unit_diameter_um
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


def he_dask(slide: Any, level: int = 0, chunk: int = 1024, window: tuple[int, int, int, int] | None = None,
            keep: Any | None = None) -> Any:
    """The slide's pyramid level (or the ``window`` (x0, y0, width, height) of it, in that level's px) as a
    lazy (3, H, W) uint8 dask array read chunk by chunk; with ``keep`` (a shapely geometry in that level's
    px), (4, H, W) RGBA whose alpha is 0 outside ``keep`` (255 inside)."""
    import dask
    import dask.array as da

    lw, lh = slide.level_dimensions[level]
    ox, oy = 0, 0
    if window is not None:
        ox, oy, lw, lh = (int(v) for v in window)
    ds = slide.level_downsamples[level]
    rows = []
    for y0 in range(oy, oy + lh, chunk):
        h = min(chunk, oy + lh - y0)
        row = []
        for x0 in range(ox, ox + lw, chunk):
            w = min(chunk, ox + lw - x0)
            loc = (int(round(x0 * ds)), int(round(y0 * ds)))
            if keep is None:
                blk = dask.delayed(slide.read_region)(loc, level, (w, h))
            else:
                blk = dask.delayed(_read_inside)(slide, loc, level, (w, h), (x0, y0), keep)
            row.append(da.from_delayed(blk, shape=(h, w, 3 if keep is None else 4), dtype=np.uint8))
        rows.append(da.concatenate(row, axis=1))
    return da.concatenate(rows, axis=0).transpose(2, 0, 1)


def _read_inside(slide: Any, loc: tuple[int, int], level: int, size: tuple[int, int], origin: tuple[int, int],
                 keep: Any) -> np.ndarray:
    """``slide.read_region`` as RGBA, transparent outside ``keep`` (level px; ``origin``: the block's corner)."""
    from PIL import Image, ImageDraw

    img = np.asarray(slide.read_region(loc, level, size))
    m = Image.new("L", size, 0)
    draw = ImageDraw.Draw(m)
    parts = list(getattr(keep, "geoms", [keep]))
    for part in parts:
        draw.polygon([(x - origin[0], y - origin[1]) for x, y in part.exterior.coords], fill=1)
    for part in parts:
        for hole in part.interiors:
            draw.polygon([(x - origin[0], y - origin[1]) for x, y in hole.coords], fill=0)
    alpha = (np.asarray(m) > 0).astype(np.uint8) * 255
    return np.concatenate([img, alpha[:, :, None]], axis=2)


def region_geometries_px(reg: Any) -> list[Any | None]:
    """Per registration region, its µm polygon (holes, every part) through its own inverse affine, in level-0
    H&E px (shapely); ``None`` for a region without polygon."""
    import shapely.affinity
    from shapely.geometry import Polygon

    from morphomol.io.regions import geometry_from_mapping

    out: list[Any | None] = []
    for r in reg.regions:
        if r.geometry_um is not None:
            g = geometry_from_mapping(r.geometry_um)
        elif r.polygon_um is not None:
            g = Polygon(np.asarray(r.polygon_um, float))
        else:
            out.append(None)
            continue
        inv = np.asarray(r.inverse, float)
        out.append(shapely.affinity.affine_transform(g, [inv[0, 0], inv[0, 1], inv[1, 0], inv[1, 1], inv[0, 2],
                                                         inv[1, 2]]))
    return out


def region_windows(reg: Any, slide: Any, level: int,
                   pad_px: float) -> list[tuple[tuple[int, int, int, int], Any] | None]:
    """Per registration region, ((x0, y0, w, h) window of pyramid ``level``, the region's polygon grown by
    ``pad_px`` level-0 px, in that level's px); ``None``: the whole image (no polygon)."""
    import shapely.affinity

    lw, lh = slide.level_dimensions[level]
    ds = float(slide.level_downsamples[level])
    out: list[tuple[tuple[int, int, int, int], Any] | None] = []
    for g in region_geometries_px(reg):
        if g is None:
            out.append(None)
            continue
        g = shapely.affinity.scale(g.buffer(pad_px), 1.0 / ds, 1.0 / ds, origin=(0, 0))
        x0, y0, x1, y1 = g.bounds
        x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        x1, y1 = min(int(np.ceil(x1)), lw), min(int(np.ceil(y1)), lh)
        out.append(((x0, y0, x1 - x0, y1 - y0), g) if x1 > x0 and y1 > y0 else None)
    return out


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


def _transcripts(xenium_dir: Path, qv_min: float | None = None, notes: list[str] | None = None) -> Any:
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
    if qv_min is not None:
        if "qv" in ddf.columns:
            ddf = ddf[ddf["qv"] >= float(qv_min)]
        elif notes is not None:
            notes.append(f"transcripts: {f.name} has no qv column, qv_min={qv_min} not applied")
    ddf = ddf.rename(columns={"x_location": "x", "y_location": "y"})
    ddf = ddf[[c for c in ddf.columns if c != "z_location"]]
    # known categories (one pass over the names): spatialdata needs them for the feature key
    ddf["feature_name"] = ddf["feature_name"].astype(str).astype("category").cat.as_known()
    return ddf


def build_sdata(fs: FinishedSample, *, he_level: int = 0, transcripts: bool = True, qv_min: float | None = None,
                notes: list[str] | None = None) -> Any:
    """The SpatialData of a finished sample (module docstring); lazy where it can be (image, points). What
    was left out and why is appended to ``notes``."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity

    from morphomol.io.he import open_slide

    notes = notes if notes is not None else []
    units = fs.read_units()
    if not has_coordinates(units):
        raise NotExportable(f"sample {fs.sample} has no spatial coordinates (cohort kind {fs.kind}; an AnnData-only "
                            "sample): nothing to place in a SpatialData frame", file=fs.units, field="obsm/spatial")
    has_he = fs.he_path is not None and Path(fs.he_path).is_file()
    tiles = {"x_px", "y_px", "size_px"} <= set(units.obs.columns)
    reg = fs.transform(units) if (has_he or tiles) else None
    elements: dict[str, dict[str, Any]] = {"images": {}, "shapes": {}, "points": {}, "tables": {}}
    images: dict[str, str] = {}
    if has_he:
        assert reg is not None
        slide = open_slide(fs.he_path, mpp=fs.he_mpp)
        if not 0 <= he_level < slide.level_count:
            raise InputError(f"H&E level {he_level} out of range (0..{slide.level_count - 1})", file=fs.he_path,
                             field="he_level", expected="a pyramid level of the slide")
        ds = float(slide.level_downsamples[he_level])
        if len(reg.regions) == 1:
            windows: list[Any] = [None]
        else:  # each region's crop, its polygon grown by 16 px; RGBA, the neighbouring pieces transparent
            windows = region_windows(reg, slide, he_level, 16.0 * ds)
        for r, wk in zip(reg.regions, windows, strict=True):
            name = "he" if len(reg.regions) == 1 else f"he_{r.name}"
            win, keep = wk if wk is not None else (None, None)
            arr = he_dask(slide, he_level, window=win, keep=keep)
            x0, y0 = (win[0], win[1]) if win is not None else (0, 0)
            scales = []
            h, w = arr.shape[1:]
            while min(h, w) >= 1024 and len(scales) < 6:
                scales.append(2)
                h, w = h // 2, w // 2
            to_l0 = np.array([[ds, 0.0, x0 * ds], [0.0, ds, y0 * ds], [0.0, 0.0, 1.0]])  # image px -> level-0 px
            m = np.asarray(r.matrix, float)
            px = Identity() if np.allclose(to_l0, np.eye(3)) else Affine(to_l0, input_axes=("x", "y"),
                                                                         output_axes=("x", "y"))
            channels = ["r", "g", "b", "a"][: arr.shape[0]]
            elements["images"][name] = Image2DModel.parse(
                arr, dims=("c", "y", "x"), c_coords=channels, scale_factors=scales or None,
                chunks=(len(channels), 1024, 1024), transformations={
                    "global": Affine(m @ to_l0, input_axes=("x", "y"), output_axes=("x", "y")), "he_px": px})
            images[name] = r.name
    elif fs.he_path is not None:
        notes.append(f"no image: the H&E {fs.he_path} is missing")
    else:
        notes.append("no image: the sample has no H&E")
    gdf, shape = _units_shapes(units, reg, fs.kind)
    elements["shapes"]["units"] = ShapesModel.parse(gdf, transformations={"global": Identity()})
    if transcripts and fs.kind == "xenium" and fs.xenium_dir is not None and Path(fs.xenium_dir).is_dir():
        ddf = _transcripts(Path(fs.xenium_dir), qv_min, notes)
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
        "images": images, "transcripts_qv_min": "none" if qv_min is None else float(qv_min),
        "region_affines": {r.name: np.asarray(r.matrix).tolist() for r in reg.regions} if reg is not None else {},
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


def export_spatialdata(fs: FinishedSample, out: str | Path, *, he_level: int = 0, transcripts: bool = True,
                       qv_min: float | None = None, notes: list[str] | None = None) -> Path:
    """Write the sample's SpatialData zarr to ``out`` (atomically); returns ``out``. Transcripts with
    ``qv < qv_min`` are left out (``None`` keeps all); what was left out and why is appended to ``notes``."""
    import warnings

    sdata = build_sdata(fs, he_level=he_level, transcripts=transcripts, qv_min=qv_min, notes=notes)
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(str(tmp))
    log.info("%s: SpatialData %s (%s)", fs.sample, out, ", ".join(f"{k}: {', '.join(v)}" for k, v in
                                                               (("images", sdata.images), ("shapes", sdata.shapes),
                                                                ("points", sdata.points), ("tables", sdata.tables))
                                                               if len(v)))
    return out


__all__ = ["INSTANCE_KEY", "REGION_KEY", "build_sdata", "dominant_region", "export_spatialdata", "he_dask",
           "region_geometries_px", "region_windows"]
