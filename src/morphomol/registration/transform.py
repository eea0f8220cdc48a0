"""The registration result: per-region affines (:class:`Registration`, ``registration.json``).

``matrix`` maps H&E level-0 px → Xenium µm, ``inverse`` maps µm → H&E px (3×3, column vectors).
Points are assigned to regions by containment in the region's geometry (``geometry_um``: a GeoJSON
Polygon / MultiPolygon with holes; older files: the ring ``polygon_um``), else to the nearest region
(its boundary or its inlier landmarks); the contract of the JSON file is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from morphomol.errors import InputError
from morphomol.geometry import apply_affine
from morphomol.util.atomic import atomic_path


@dataclass
class RegionTransform:
    """One region's affine pair, landmark residual summary, refinement scores and polygon."""

    name: str
    matrix: np.ndarray  # H&E level-0 px -> Xenium µm
    inverse: np.ndarray  # Xenium µm -> H&E level-0 px
    n_landmarks: int = 0
    rms_um: float | None = None
    max_um: float | None = None
    outliers: list[int] = field(default_factory=list)
    refine_score_before: float | None = None
    refine_score_after: float | None = None
    refined: bool = False
    polygon_um: np.ndarray | None = None
    landmarks_um: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    geometry_um: dict[str, Any] | None = None  # GeoJSON Polygon / MultiPolygon (holes, every part), µm

    def to_dict(self) -> dict[str, Any]:
        def f(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        return {
            "name": self.name,
            "matrix": np.asarray(self.matrix, float).tolist(),
            "inverse": np.asarray(self.inverse, float).tolist(),
            "n_landmarks": int(self.n_landmarks),
            "rms_um": f(self.rms_um),
            "max_um": f(self.max_um),
            "outliers": [int(i) for i in self.outliers],
            "refine_score_before": f(self.refine_score_before),
            "refine_score_after": f(self.refine_score_after),
            "refined": bool(self.refined),
            "polygon_um": None if self.polygon_um is None else np.asarray(self.polygon_um, float).tolist(),
            "landmarks_um": np.asarray(self.landmarks_um, float).reshape(-1, 2).tolist(),
            "geometry_um": self.geometry_um,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegionTransform:
        m = np.asarray(d["matrix"], float)
        inv = np.asarray(d["inverse"], float) if d.get("inverse") is not None else np.linalg.inv(m)
        poly = d.get("polygon_um")
        return cls(name=str(d["name"]), matrix=m, inverse=inv, n_landmarks=int(d.get("n_landmarks", 0)),
                   rms_um=d.get("rms_um"), max_um=d.get("max_um"), outliers=list(d.get("outliers") or []),
                   refine_score_before=d.get("refine_score_before"),
                   refine_score_after=d.get("refine_score_after"), refined=bool(d.get("refined", False)),
                   polygon_um=None if poly is None else np.asarray(poly, float),
                   landmarks_um=np.asarray(d.get("landmarks_um") or np.zeros((0, 2)), float).reshape(-1, 2),
                   geometry_um=d.get("geometry_um"))

    def rings(self) -> list[np.ndarray]:
        """Every boundary ring (exteriors and holes of every part; else ``polygon_um``), (k, 2) µm."""
        g = self.geometry_um
        if g is not None and not (g["type"] == "Polygon" and len(g["coordinates"]) == 1 and self.polygon_um is not None):
            coords = g["coordinates"]
            polys = coords if g["type"] == "MultiPolygon" else [coords]
            return [np.asarray(r, float)[:-1, :2] for p in polys for r in p]
        return [] if self.polygon_um is None else [np.asarray(self.polygon_um, float)]


def _densify(ring: np.ndarray, step: float) -> np.ndarray:
    """Points along a closed ring, at most ``step`` apart."""
    closed = np.vstack([ring, ring[:1]])
    pts = []
    for a, b in zip(closed[:-1], closed[1:], strict=True):
        k = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
        t = np.arange(k)[:, None] / k
        pts.append(a + t * (b - a))
    return np.vstack(pts)


class _Containment:
    """Point-in-region test of one region: shapely (holes, every part) or the single ring."""

    def __init__(self, r: RegionTransform) -> None:
        g = r.geometry_um
        simple = g is None or (g["type"] == "Polygon" and len(g["coordinates"]) == 1 and r.polygon_um is not None)
        if not simple:  # holes or several parts (a simple ring keeps the matplotlib test of older files)
            import shapely
            from shapely.geometry import shape

            self._geom = shape(r.geometry_um)
            shapely.prepare(self._geom)
            self._path = None
        else:
            from matplotlib.path import Path as MplPath

            ring = np.asarray(r.polygon_um, float)
            self._geom = None
            self._path = MplPath(np.vstack([ring, ring[:1]]), closed=True)

    def contains_points(self, pts: np.ndarray) -> np.ndarray:
        if self._geom is not None:
            import shapely

            return np.asarray(shapely.contains_xy(self._geom, pts[:, 0], pts[:, 1]), bool)
        return self._path.contains_points(pts)


@dataclass
class Registration:
    """Per-region affines between H&E level-0 pixels and Xenium µm (see docs/ARCHITECTURE.md)."""

    regions: list[RegionTransform]
    sample: str = ""
    method: str = "landmarks"
    he_mpp: float | None = None
    xenium_pixel_size: float | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    transcript_bbox_he: list[float] | None = None
    region_assignment: str = "nearest"

    # ---- io
    def to_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "method": self.method,
            "he_mpp": self.he_mpp,
            "xenium_pixel_size": self.xenium_pixel_size,
            "inputs": dict(self.inputs),
            "transcript_bbox_he": None if self.transcript_bbox_he is None else [float(v) for v in self.transcript_bbox_he],
            "region_assignment": self.region_assignment,
            "regions": [r.to_dict() for r in self.regions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registration:
        return cls(regions=[RegionTransform.from_dict(r) for r in d["regions"]], sample=d.get("sample", ""),
                   method=d.get("method", "landmarks"), he_mpp=d.get("he_mpp"),
                   xenium_pixel_size=d.get("xenium_pixel_size"), inputs=dict(d.get("inputs") or {}),
                   transcript_bbox_he=d.get("transcript_bbox_he"),
                   region_assignment=d.get("region_assignment", "nearest"))

    @classmethod
    def load(cls, path: str | Path) -> Registration:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            reg = cls.from_dict(d)
        except FileNotFoundError:
            raise InputError("file not found", file=path, expected="a registration.json from the register rule") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a valid registration file ({exc})", file=path,
                             expected="registration.json as in docs/ARCHITECTURE.md") from None
        if not reg.regions:
            raise InputError("no regions", file=path, field="regions", expected="at least one region")
        return reg

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=1))

    # ---- geometry
    def __post_init__(self) -> None:
        self._index: Any = None

    def _build_index(self) -> None:
        has_poly = [r.polygon_um is not None or r.geometry_um is not None for r in self.regions]
        paths: list[Any] = []
        pts, owner = [], []
        if any(has_poly):
            for i, r in enumerate(self.regions):
                if has_poly[i]:
                    paths.append((i, _Containment(r)))
                    bs = []
                    for ring in r.rings():
                        closed = np.vstack([ring, ring[:1]])
                        per = float(np.sum(np.linalg.norm(np.diff(closed, axis=0), axis=1)))
                        bs.append(_densify(ring, max(per / 2000.0, 1e-6)))
                    b = np.vstack(bs)
                else:
                    b = self._region_points(r)
                pts.append(b)
                owner.append(np.full(len(b), i))
        else:
            for i, r in enumerate(self.regions):
                b = self._region_points(r)
                pts.append(b)
                owner.append(np.full(len(b), i))
        allpts = np.vstack(pts) if pts else np.zeros((0, 2))
        tree = cKDTree(allpts) if len(allpts) else None
        self._index = (paths, tree, np.concatenate(owner) if owner else np.zeros(0, int))

    @staticmethod
    def _region_points(r: RegionTransform) -> np.ndarray:
        lm = np.asarray(r.landmarks_um, float).reshape(-1, 2)
        if len(lm):
            keep = np.ones(len(lm), bool)
            keep[[i for i in r.outliers if 0 <= i < len(lm)]] = False
            if keep.sum():
                return lm[keep]
            return lm
        return np.zeros((0, 2))

    def assign_regions(self, x_um: Any, y_um: Any) -> np.ndarray:
        """Region index per point (int64); polygon containment, else nearest region; -1 = dropped."""
        x = np.asarray(x_um, dtype=np.float64).ravel()
        y = np.asarray(y_um, dtype=np.float64).ravel()
        n = len(x)
        if len(self.regions) == 1 and self.regions[0].polygon_um is None and self.regions[0].geometry_um is None:
            return np.zeros(n, dtype=np.int64)
        if self._index is None:
            self._build_index()
        paths, tree, owner = self._index
        out = np.full(n, -1, dtype=np.int64)
        pts = np.column_stack([x, y])
        if paths:
            for i, p in paths:
                todo = out < 0
                if not todo.any():
                    break
                inside = p.contains_points(pts[todo])
                idx = np.flatnonzero(todo)[inside]
                out[idx] = i
            if self.region_assignment == "drop":
                return out
        todo = np.flatnonzero(out < 0)
        if len(todo) and tree is not None:
            _, j = tree.query(pts[todo], k=1)
            out[todo] = owner[j]
        elif len(todo):
            out[todo] = 0
        return out

    def _map(self, a: Any, b: Any, region_idx: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        ridx = np.broadcast_to(np.asarray(region_idx, dtype=np.int64), np.broadcast_shapes(a.shape, b.shape))
        a, b = np.broadcast_to(a, ridx.shape), np.broadcast_to(b, ridx.shape)
        if ridx.ndim == 0:
            if int(ridx) < 0:
                return np.asarray(np.nan), np.asarray(np.nan)
            r = self.regions[int(ridx)]
            return apply_affine(r.matrix if which == "m" else r.inverse, a, b)
        ox = np.full(ridx.shape, np.nan)
        oy = np.full(ridx.shape, np.nan)
        if np.any(ridx >= len(self.regions)):
            raise IndexError(f"region index {int(ridx.max())} out of range ({len(self.regions)} regions)")
        for i, r in enumerate(self.regions):
            sel = ridx == i
            if sel.any():
                ox[sel], oy[sel] = apply_affine(r.matrix if which == "m" else r.inverse, a[sel], b[sel])
        return ox, oy

    def um_to_he(self, x_um: Any, y_um: Any, region_idx: Any) -> tuple[np.ndarray, np.ndarray]:
        """Xenium µm → H&E level-0 px with each point's region (NaN where region_idx == -1)."""
        return self._map(x_um, y_um, region_idx, "inv")

    def he_to_um(self, x_px: Any, y_px: Any, region_idx: Any) -> tuple[np.ndarray, np.ndarray]:
        """H&E level-0 px → Xenium µm with each point's region (NaN where region_idx == -1)."""
        return self._map(x_px, y_px, region_idx, "m")
