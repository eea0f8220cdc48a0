"""``morphomol export qupath``: a GeoJSON FeatureCollection per sample, in level-0 H&E pixels.

QuPath (File > Import objects, or drag and drop onto the opened slide) reads:

* one ``tile`` object per tile (its square) or one ``detection`` per spot / cell (a circle as a
  polygon), ``name`` = the unit id, ``measurements`` = the unit's numeric QC columns (``n_transcripts``,
  ``n_genes``, ...), ``measured: <gene>`` and ``<setting>: <gene>`` from the per-sample predictions when
  the sample has them (log1p), and ``counts: <gene>`` for the genes asked for; cells carry their label as
  ``classification``;
* ``annotation`` objects: the tissue contours (classification ``Tissue``; polygons with holes, from the
  tissue mask of a thumbnail, :func:`morphomol.tiling.detect_tissue`) and the registration regions
  (classification ``Region``, their µm polygons mapped into the H&E by their own affine).

GeoJSON numbers must be finite: NaN measurements are left out of a unit's ``measurements``. Written
atomically; every geometry is a valid (Multi)Polygon (shapely ``make_valid`` where a ring is not).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample, unit_outlines_px
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("export.qupath")

GEOMETRY_COLUMNS = {"index", "x_px", "y_px", "size_px", "x_um", "y_um", "grid_i", "grid_j", "region", "he_x_px",
                    "he_y_px", "array_row", "array_col", "source_row", "fold", "instance_id"}
_NS = uuid.UUID("6f1d2c3e-6a7b-4c1d-9e0f-2b3c4d5e6f70")


def _ring_list(ring: np.ndarray) -> list[list[float]]:
    r = np.asarray(ring, float)
    if not np.allclose(r[0], r[-1]):
        r = np.vstack([r, r[:1]])
    return np.round(r, 3).tolist()


def _geometry(geom: Any) -> dict[str, Any]:
    from shapely.geometry import mapping

    return json.loads(json.dumps(mapping(geom)))


def tissue_polygons(slide: Any, *, max_px: int = 2048, min_area_frac: float = 1e-4) -> list[Any]:
    """Tissue contours of a slide as shapely polygons (holes kept) in level-0 px."""
    from shapely.geometry import Polygon
    from skimage.measure import find_contours

    from morphomol.tiling import detect_tissue

    thumb, ds = slide.thumbnail(max_px)
    mask = detect_tissue(thumb)
    padded = np.pad(mask.astype(np.float32), 1)
    rings = []
    for c in find_contours(padded, 0.5):
        xy = (c[:, ::-1] - 1.0 + 0.5) * ds  # (row, col) -> (x, y), undo the pad, pixel centres -> level 0
        if len(xy) >= 4:
            p = Polygon(xy)
            if p.is_valid and p.area > min_area_frac * thumb.shape[0] * thumb.shape[1] * ds * ds:
                rings.append(p)
    rings.sort(key=lambda p: -p.area)
    shells: list[list[Any]] = []  # [shell, holes...]
    for p in rings:
        depth_parent = None
        for grp in shells:
            if grp[0].contains(p):
                inside_hole = any(h.contains(p) for h in grp[1:])
                if not inside_hole:
                    depth_parent = grp
                break
        if depth_parent is not None:
            depth_parent.append(p)
        else:
            shells.append([p])
    out = []
    for grp in shells:
        poly = Polygon(grp[0].exterior.coords, [h.exterior.coords for h in grp[1:]])
        out.append(poly.simplify(ds, preserve_topology=True))
    return out


def _measurements(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if v is not None and np.isfinite(v)}


def qupath_features(fs: FinishedSample, *, genes: Sequence[str] = (), tissue: bool = True) -> dict[str, Any]:
    """The FeatureCollection (a dict) of one finished sample (module docstring)."""
    import anndata as ad
    import shapely
    import shapely.affinity
    from shapely.geometry import Polygon

    from morphomol.io.he import open_slide
    from morphomol.io.regions import geometry_from_mapping

    units = fs.read_units()
    reg = fs.transform(units)
    shape, rings = unit_outlines_px(units, reg)
    obj = "tile" if shape == "square" else "detection"
    obs = units.obs
    import pandas as pd

    numeric = [c for c in obs.columns if c not in GEOMETRY_COLUMNS and pd.api.types.is_numeric_dtype(obs[c])
               and not pd.api.types.is_bool_dtype(obs[c])]
    meas = obs[numeric].astype(float).to_dict("records")
    pos = {str(g): i for i, g in enumerate(units.var_names)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise InputError(f"gene(s) not measured in sample {fs.sample}: {', '.join(missing[:10])}", file=fs.units,
                         field="var_names", expected="genes of the unit table")
    if genes:
        X = units.X[:, [pos[g] for g in genes]]
        X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, float)
        for i, m in enumerate(meas):
            m.update({f"counts: {g}": X[i, j] for j, g in enumerate(genes)})
    if fs.predictions is not None and Path(fs.predictions).is_file():
        pa = ad.read_h5ad(fs.predictions)
        row_of = {u: i for i, u in enumerate(pa.obs_names)}
        layers = {"measured": "measured", **{k[len("pred_"):]: k for k in pa.layers if k.startswith("pred_")}}
        for i, uid in enumerate(units.obs_names):
            j = row_of.get(uid)
            if j is None:
                continue
            for label, layer in layers.items():
                vals = np.asarray(pa.layers[layer][j], float).ravel()
                meas[i].update({f"{label}: {g}": v for g, v in zip(pa.var_names, vals, strict=True)})
    labels = obs["label"].astype(str).tolist() if "label" in obs.columns else None
    feats = []
    for i, (uid, ring) in enumerate(zip(units.obs_names, rings, strict=True)):
        props: dict[str, Any] = {"objectType": obj, "name": str(uid), "measurements": _measurements(meas[i])}
        if labels is not None:
            props["classification"] = {"name": labels[i]}
        feats.append({"type": "Feature", "id": str(uuid.uuid5(_NS, f"{fs.sample}/{uid}")),
                      "geometry": {"type": "Polygon", "coordinates": [_ring_list(ring)]}, "properties": props})
    if tissue and fs.he_path is not None and Path(fs.he_path).is_file():
        slide = open_slide(fs.he_path, mpp=fs.he_mpp)
        try:
            for k, poly in enumerate(tissue_polygons(slide)):
                feats.append({"type": "Feature", "id": str(uuid.uuid5(_NS, f"{fs.sample}/tissue{k}")),
                              "geometry": _geometry(poly), "properties": {
                                  "objectType": "annotation", "name": f"tissue {k}",
                                  "classification": {"name": "Tissue", "color": [0, 160, 0]}}})
        finally:
            slide.close()
    for r in reg.regions:  # region polygons (µm) through their own affine into the H&E
        if r.geometry_um is not None:
            g = geometry_from_mapping(r.geometry_um)
        elif r.polygon_um is not None:
            g = Polygon(np.asarray(r.polygon_um, float))
        else:
            continue
        inv = np.asarray(r.inverse, float)
        geom = shapely.affinity.affine_transform(g, [inv[0, 0], inv[0, 1], inv[1, 0], inv[1, 1], inv[0, 2], inv[1, 2]])
        feats.append({"type": "Feature", "id": str(uuid.uuid5(_NS, f"{fs.sample}/region/{r.name}")),
                      "geometry": _geometry(geom), "properties": {
                          "objectType": "annotation", "name": f"region {r.name}",
                          "classification": {"name": "Region", "color": [230, 200, 0]}}})
    return {"type": "FeatureCollection", "features": feats}


def export_qupath(fs: FinishedSample, out: str | Path, *, genes: Sequence[str] = (), tissue: bool = True) -> Path:
    """Write the sample's GeoJSON to ``out`` (a directory gets ``{sample}.geojson``); returns the file."""
    doc = qupath_features(fs, genes=genes, tissue=tissue)
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".geojson", ".json"):
        out = out / f"{fs.sample}.geojson"
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
    n = sum(1 for f in doc["features"] if f["properties"]["objectType"] != "annotation")
    log.info("%s: QuPath GeoJSON %s (%d units, %d annotations)", fs.sample, out, n, len(doc["features"]) - n)
    return out


__all__ = ["export_qupath", "qupath_features", "tissue_polygons"]
