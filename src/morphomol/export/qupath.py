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

Tissue contours are written only where tissue detection means something (:func:`tissue_contours`): an
image with no glass background (a crop inside the tissue), a mask covering the whole image, or a mask
falling apart into many small pieces (nuclei traced, not tissue) gives no contours, and the reason is
one of the export's notes. A sample without an H&E image (an AnnData-only sample of a cells cohort) is
:class:`~morphomol.export.sample.NotExportable`: ``morphomol export`` skips it and says why.

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
from morphomol.export.sample import FinishedSample, NotExportable, unit_outlines_px
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


MIN_GLASS_FRACTION = 0.05   # below this share of bright unsaturated pixels the image has no background
MAX_TISSUE_FRACTION = 0.97  # a mask covering more than this is the whole image, not a contour
MAX_PIECES = 50             # more tissue pieces than this (or many tiny ones) are texture, not tissue
MIN_MEDIAN_PIECE_FRAC = 1e-3  # median piece area / image area below this, with > 20 pieces: nuclei traced


def _glass_mask(rgb: np.ndarray) -> np.ndarray:
    img = np.asarray(rgb, dtype=np.float32) / 255.0
    mx, mn = img.max(axis=2), img.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return (sat < 0.1) & (mx > 0.8)


def glass_fraction(rgb: np.ndarray) -> float:
    """Share of bright, unsaturated (glass) pixels of an RGB uint8 image."""
    g = _glass_mask(rgb)
    return float(g.mean()) if g.size else 0.0


def _fill_holes_without_glass(mask: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """``mask`` with every hole (background enclosed by tissue) filled unless it is mostly glass."""
    from scipy import ndimage as ndi

    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndi.label(holes)
    glass_share = ndi.mean(glass.astype(np.float32), labels=lab, index=np.arange(1, n + 1))
    fill = np.r_[False, np.asarray(glass_share) < 0.5]
    return mask | fill[lab]


def _drop_specks_without_glass(mask: np.ndarray, glass: np.ndarray, *, ring: int = 3) -> np.ndarray:
    """``mask`` without the pieces (other than the largest) whose surrounding ring is mostly not glass: specks
    of stain inside pale tissue, not tissue fragments lying on the glass."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n < 2:
        return mask
    grown = ndi.grey_dilation(lab, size=(2 * ring + 1,) * 2)
    rim = np.where(mask, 0, grown)
    share = np.asarray(ndi.mean(glass.astype(np.float32), labels=rim, index=np.arange(1, n + 1)))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = np.r_[False, (share >= 0.5) | (np.arange(n) == int(np.argmax(sizes)))]
    return keep[lab]


def _clean(mask: np.ndarray, *, radius: int = 2, min_object_px: int = 16) -> np.ndarray:
    """Closing, hole filling, opening and removal of small objects (as :func:`morphomol.tiling.detect_tissue`)."""
    from scipy import ndimage as ndi

    st = np.ones((2 * radius + 1,) * 2, dtype=bool)
    mask = ndi.binary_closing(mask, structure=st, border_value=0)
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3), bool))
    lab, _ = ndi.label(mask)
    small = np.bincount(lab.ravel()) < min_object_px
    small[0] = True
    return ~small[lab]


def tissue_contours(slide: Any, *, max_px: int = 2048, min_area_frac: float = 1e-4) -> tuple[list[Any], str | None]:
    """(polygons, None) where tissue detection is meaningful, else ([], why not) (module docstring). Glass is
    measured on a small thumbnail (at most 128 px), where bright specks inside the tissue average out."""
    glass = glass_fraction(slide.thumbnail(min(128, max_px))[0])
    thumb, ds = slide.thumbnail(max_px)
    if glass < MIN_GLASS_FRACTION:
        return [], (f"the H&E has no glass background ({100 * glass:.1f}% of the image; a crop inside the tissue): "
                    "tissue detection would trace nuclei")
    from morphomol.tiling import detect_tissue

    mask = detect_tissue(thumb)
    frac = float(mask.mean()) if mask.size else 0.0
    glass_px = _glass_mask(thumb)
    if frac < 0.5 * float((~glass_px).mean()):  # Otsu split nuclei from stroma: tissue is what is not glass
        mask = _clean(~glass_px)
    mask = _fill_holes_without_glass(mask, glass_px)  # pale stroma inside the tissue is no hole
    mask = _drop_specks_without_glass(mask, glass_px)  # nor are stained specks in it tissue pieces
    frac = float(mask.mean())
    if frac > MAX_TISSUE_FRACTION:
        return [], f"the tissue mask covers {100 * frac:.1f}% of the image (no tissue edge to trace)"
    if not mask.any():
        return [], "no tissue detected"
    polys = _mask_polygons(mask, ds, min_area_frac=min_area_frac)
    area = thumb.shape[0] * thumb.shape[1] * ds * ds
    med = float(np.median([p.area for p in polys])) / area if polys else 0.0
    if len(polys) > MAX_PIECES or (len(polys) > 20 and med < MIN_MEDIAN_PIECE_FRAC):
        return [], (f"tissue detection found {len(polys)} pieces of median area {100 * med:.3f}% of the image "
                    "(texture or nuclei, not tissue pieces)")
    return polys, None


def tissue_polygons(slide: Any, *, max_px: int = 2048, min_area_frac: float = 1e-4) -> list[Any]:
    """Tissue contours of a slide as shapely polygons (holes kept) in level-0 px (no meaningfulness check:
    :func:`tissue_contours` is what the export uses)."""
    from morphomol.tiling import detect_tissue

    thumb, ds = slide.thumbnail(max_px)
    return _mask_polygons(detect_tissue(thumb), ds, min_area_frac=min_area_frac)


def _mask_polygons(mask: np.ndarray, ds: float, *, min_area_frac: float = 1e-4) -> list[Any]:
    from shapely.geometry import Polygon
    from skimage.measure import find_contours

    thumb_shape = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)
    rings = []
    for c in find_contours(padded, 0.5):
        xy = (c[:, ::-1] - 1.0 + 0.5) * ds  # (row, col) -> (x, y), undo the pad, pixel centres -> level 0
        if len(xy) >= 4:
            p = Polygon(xy)
            if p.is_valid and p.area > min_area_frac * thumb_shape[0] * thumb_shape[1] * ds * ds:
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


def qupath_features(fs: FinishedSample, *, genes: Sequence[str] = (), tissue: bool = True,
                    notes: list[str] | None = None) -> dict[str, Any]:
    """The FeatureCollection (a dict) of one finished sample (module docstring); what was left out and why
    is appended to ``notes``."""
    import anndata as ad
    import shapely
    import shapely.affinity
    from shapely.geometry import Polygon

    from morphomol.io.he import open_slide
    from morphomol.io.regions import geometry_from_mapping

    notes = notes if notes is not None else []
    if fs.he_path is None:
        raise NotExportable(f"sample {fs.sample} has no H&E image (cohort kind {fs.kind}, no he_path in the sheet): "
                            "QuPath objects are placed on the H&E", file=fs.units)
    if not Path(fs.he_path).is_file():
        raise NotExportable(f"sample {fs.sample}: its H&E image is missing", file=fs.he_path,
                            expected="the H&E named by the sample sheet")
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
    if tissue:
        slide = open_slide(fs.he_path, mpp=fs.he_mpp)
        try:
            polys, why_not = tissue_contours(slide)
        finally:
            slide.close()
        if why_not:
            notes.append(f"no tissue contours: {why_not}")
            log.info("%s: no tissue contours: %s", fs.sample, why_not)
        for k, poly in enumerate(polys):
            feats.append({"type": "Feature", "id": str(uuid.uuid5(_NS, f"{fs.sample}/tissue{k}")),
                          "geometry": _geometry(poly), "properties": {
                              "objectType": "annotation", "name": f"tissue {k}",
                              "classification": {"name": "Tissue", "color": [0, 160, 0]}}})
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


def export_qupath(fs: FinishedSample, out: str | Path, *, genes: Sequence[str] = (), tissue: bool = True,
                  notes: list[str] | None = None) -> Path:
    """Write the sample's GeoJSON to ``out`` (a directory gets ``{sample}.geojson``); returns the file. What
    was left out and why is appended to ``notes``."""
    doc = qupath_features(fs, genes=genes, tissue=tissue, notes=notes)
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".geojson", ".json"):
        out = out / f"{fs.sample}.geojson"
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
    n = sum(1 for f in doc["features"] if f["properties"]["objectType"] != "annotation")
    log.info("%s: QuPath GeoJSON %s (%d units, %d annotations)", fs.sample, out, n, len(doc["features"]) - n)
    return out


__all__ = ["export_qupath", "glass_fraction", "qupath_features", "tissue_contours", "tissue_polygons"]
