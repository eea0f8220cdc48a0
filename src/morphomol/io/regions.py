"""Tissue regions in Xenium µm: GeoJSON (QuPath, napari, shapely) and Xenium Explorer selection CSVs.

A region is a named polygonal area: a ``Polygon`` (with holes) or a ``MultiPolygon`` (several
parts, each with holes). Everything is kept: transcripts inside a hole belong to no region by
containment (they then go to the nearest region, or are dropped with
``registration.region_assignment: drop``), and every part of a multipolygon is the same region.

Formats (detected by content, not by file name):

* GeoJSON: a FeatureCollection / Feature / Polygon / MultiPolygon (or a list of features), in
  Xenium µm. Names come from ``properties.name`` (or ``region``, ``id``, ``label``, QuPath
  ``classification.name``), else ``r{i}``. Any other geometry type (Point, LineString,
  GeometryCollection, ...) is an error naming the feature. Self-intersecting rings are repaired
  (``shapely.make_valid``, polygonal parts kept) with a warning.
* Xenium Explorer selection CSV ("Download selection coordinates"): ``#`` comment lines
  (``#Selection name: ...``, ``#Area (µm^2): ...``), then ``X,Y`` in µm, or ``Selection,X,Y``
  when several selections were exported into one file (one region per selection).

:class:`RegionPolygon` keeps ``polygon_um`` (the exterior ring of the largest part: bounding boxes,
QC drawings, image refinement masks) and ``geometry`` (the whole shapely geometry, used for
assigning points to regions).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("io.regions")

POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass
class RegionPolygon:
    """One region: ``polygon_um`` (k, 2) exterior ring of its largest part (not closed), and the full
    ``geometry`` (shapely Polygon / MultiPolygon with holes, µm)."""

    name: str
    polygon_um: np.ndarray
    geometry: Any = field(default=None, repr=False)

    def geometry_mapping(self) -> dict[str, Any] | None:
        """The geometry as a GeoJSON mapping (what ``registration.json`` stores), or None."""
        if self.geometry is None:
            return None
        from shapely.geometry import mapping

        return _plain(mapping(self.geometry))


def _plain(obj: Any) -> Any:
    """GeoJSON mapping with lists instead of tuples (JSON round-trips unchanged)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return float(obj) if isinstance(obj, (np.floating, float)) else obj


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError("file not found", file=path, expected="an existing regions file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not a text file ({exc.reason})", file=path,
                         expected="a GeoJSON or a Xenium Explorer selection CSV") from None


def region_name(props: dict | None, i: int) -> str:
    props = props or {}
    for key in ("name", "region", "id", "label"):
        v = props.get(key)
        if v not in (None, ""):
            return str(v)
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    return f"r{i}"


def _ring(coords: Any, path: Path, name: str) -> np.ndarray:
    try:
        arr = np.asarray(coords, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"region {name!r} has malformed coordinates", file=path, field="coordinates",
                         expected="[[x, y], ...] in Xenium µm") from None
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise InputError(f"region {name!r} has malformed coordinates", file=path, field="coordinates",
                         expected="[[x, y], ...] in Xenium µm")
    arr = arr[:, :2]
    if len(arr) > 1 and np.allclose(arr[0], arr[-1]):
        arr = arr[:-1]
    if len(arr) < 3 or not np.all(np.isfinite(arr)):
        raise InputError(f"region {name!r} polygon has {len(arr)} valid vertices", file=path,
                         field="coordinates", expected="a polygon with at least 3 finite vertices")
    return arr


def ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _polygon(rings: list[Any], path: Path, name: str) -> Any:
    from shapely.geometry import Polygon

    if not rings:
        raise InputError(f"region {name!r} has no coordinates", file=path, field="coordinates",
                         expected="a polygon ring")
    shell = _ring(rings[0], path, name)
    if ring_area(shell) <= 0:
        raise InputError(f"region {name!r} polygon has zero area", file=path, field="coordinates",
                         expected="a non-degenerate polygon")
    holes = [_ring(r, path, name) for r in rings[1:]]
    return Polygon(shell, holes)


def make_region(name: str, geom: Any, path: Path) -> RegionPolygon:
    """A :class:`RegionPolygon` from a shapely (Multi)Polygon; invalid rings repaired, polygonal parts kept."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if not geom.is_valid:
        fixed = shapely.make_valid(geom)
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, (Polygon, MultiPolygon))]
        polys = [p for g in parts for p in getattr(g, "geoms", [g])]
        if not polys:
            raise InputError(f"region {name!r} is not a valid polygon ({shapely.is_valid_reason(geom)})", file=path,
                             field="coordinates", expected="a simple polygon")
        log.warning("%s: region %r is not a valid polygon (%s); repaired", path, name, shapely.is_valid_reason(geom))
        geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if geom.area <= 0:
        raise InputError(f"region {name!r} polygon has zero area", file=path, field="coordinates",
                         expected="a non-degenerate polygon")
    parts = list(getattr(geom, "geoms", [geom]))
    largest = max(parts, key=lambda p: p.area)
    ring = np.asarray(largest.exterior.coords, float)[:-1, :2]
    return RegionPolygon(name=name, polygon_um=ring, geometry=geom)


def _features(doc: Any, path: Path) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return doc.get("features") or []
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    if isinstance(doc, dict) and doc.get("type") in POLYGONAL:
        return [{"type": "Feature", "geometry": doc, "properties": {}}]
    got = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
    raise InputError(f"unrecognised GeoJSON document (type {got!r})", file=path, field="type",
                     expected="FeatureCollection, Feature, Polygon or MultiPolygon")


def read_regions_geojson(path: str | Path) -> list[RegionPolygon]:
    """Region polygons (Xenium µm) of a GeoJSON; holes and every part of a MultiPolygon kept."""
    from shapely.geometry import MultiPolygon

    path = Path(path)
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=path,
                         expected="a GeoJSON FeatureCollection of polygons in Xenium µm") from None
    out: list[RegionPolygon] = []
    for i, feat in enumerate(_features(doc, path)):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        name = region_name(feat.get("properties") if isinstance(feat, dict) else None, i)
        if not isinstance(geom, dict):
            raise InputError(f"feature {i} ({name!r}) has no geometry", file=path, field="geometry",
                             expected="a Polygon or MultiPolygon")
        gtype, coords = geom.get("type"), geom.get("coordinates")
        if gtype == "Polygon":
            shape = _polygon(list(coords or []), path, name)
        elif gtype == "MultiPolygon":
            parts = [_polygon(list(p), path, name) for p in (coords or []) if p]
            if not parts:
                raise InputError(f"region {name!r} has no polygons", file=path, field="coordinates",
                                 expected="at least one polygon")
            shape = parts[0] if len(parts) == 1 else MultiPolygon(parts)
        else:
            raise InputError(f"feature {i} ({name!r}) has geometry type {gtype!r}: regions must be polygons",
                             file=path, field="geometry.type", expected="Polygon or MultiPolygon")
        out.append(make_region(name, shape, path))
    return _checked(out, path)


def _checked(out: list[RegionPolygon], path: Path) -> list[RegionPolygon]:
    if not out:
        raise InputError("no region polygons", file=path, field="features", expected="at least one polygon")
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"duplicate region names {dup}", file=path, field="properties.name",
                         expected="unique region names")
    return out


def read_explorer_selection(path: str | Path) -> list[RegionPolygon]:
    """Regions of a Xenium Explorer selection CSV (µm): one per ``Selection`` value, else one."""
    from shapely.geometry import Polygon

    path = Path(path)
    text = _read_text(path)
    meta: dict[str, str] = {}
    body = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            meta[key.strip().lower()] = value.strip()
        elif line.strip():
            body.append(line)
    if not body:
        raise InputError("no coordinates", file=path, field="X,Y", expected="a Xenium Explorer selection CSV: X,Y rows")
    rows = list(csv.reader(io.StringIO("\n".join(body))))
    header = [h.strip() for h in rows[0]]
    low = {h.lower(): i for i, h in enumerate(header)}
    if "x" not in low or "y" not in low:
        raise InputError(f"header is {','.join(header)[:80]!r}", file=path, field="header",
                         expected="columns X,Y (µm), optionally Selection")
    xi, yi, si = low["x"], low["y"], low.get("selection")
    groups: dict[str, list[tuple[float, float]]] = {}
    default = meta.get("selection name") or path.stem
    for line_no, rec in enumerate(rows[1:], start=2):
        try:
            xy = (float(rec[xi]), float(rec[yi]))
        except (ValueError, IndexError):
            raise InputError(f"coordinate row {line_no} is not numeric: {','.join(rec)[:80]!r}", file=path,
                             field="X,Y", expected="numbers (µm)") from None
        name = rec[si].strip() if si is not None and si < len(rec) and rec[si].strip() else default
        groups.setdefault(name, []).append(xy)
    out = [make_region(name, Polygon(_ring(pts, path, name)), path) for name, pts in groups.items()]
    return _checked(out, path)


def detect_regions_format(path: str | Path) -> str:
    """``geojson`` or ``explorer`` (a Xenium Explorer selection CSV), by content."""
    path = Path(path)
    text = _read_text(path).lstrip()
    if text.startswith("{") or text.startswith("["):
        return "geojson"
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    if {t.strip().lower() for t in first.split(",")} >= {"x", "y"}:
        return "explorer"
    raise InputError("neither GeoJSON nor a Xenium Explorer selection CSV", file=path,
                     expected="a GeoJSON of polygons (µm) or an Explorer selection CSV (X,Y in µm)")


def read_regions(path: str | Path) -> list[RegionPolygon]:
    """Regions of a GeoJSON or a Xenium Explorer selection CSV (detected by content)."""
    fmt = detect_regions_format(path)
    return read_regions_geojson(path) if fmt == "geojson" else read_explorer_selection(path)


def geometry_from_mapping(mapping: dict[str, Any] | None) -> Any:
    """A shapely geometry from a stored GeoJSON mapping (None stays None)."""
    if mapping is None:
        return None
    from shapely.geometry import shape

    return shape(mapping)


__all__ = ["RegionPolygon", "detect_regions_format", "geometry_from_mapping", "make_region", "read_explorer_selection",
           "read_regions", "read_regions_geojson", "region_name", "ring_area"]
