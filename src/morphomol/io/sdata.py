"""SpatialData zarrs as pre-aligned xenium-kind samples (sheet ``format: spatialdata``).

What a sample zarr must hold (``spatialdata.read_zarr``):

* points ``transcripts`` with ``x``, ``y`` in µm (the element's own coordinates) and ``feature_name``
  (optionally ``qv``, ``z``) -- spatialdata-io's Xenium reader and :mod:`morphomol.export.spatialdata`
  both write this;
* one H&E image (RGB): the sheet's ``sdata_image``, else the only 3-channel image (spatialdata-io
  names Xenium's ``he_image``), with a transformation to a coordinate system the points also map to.

The H&E level-0 px -> µm affine is ``inverse(T_points) @ T_image`` in the first shared coordinate
system (``global`` preferred): spatialdata-io's Xenium ``global`` system is in morphology pixels
(points: ``Scale(1 / pixel_size)``, H&E: the alignment matrix), morphomol's exports use µm (points:
identity, H&E: its affine); both give the same µm frame. :func:`ingest_spatialdata` (rule
``xenium_ingest_spatialdata``) writes the bundle + alignment + the H&E as an OME-TIFF
(:mod:`morphomol.io.ingest`). No transcripts or no H&E image: one InputError, nothing written.
:func:`check_layout` does the same checks from the zarr's directory layout alone (no spatialdata
import), when the configuration is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("io.sdata")

POINTS = "transcripts"


def _group_names(path: Path, kind: str) -> list[str]:
    d = path / kind
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_layout(path: str | Path, image: str | None = None) -> None:
    """Light pre-flight check of a SpatialData zarr (directory layout only): a ``points/transcripts``
    element and an image (``image`` when named); InputError naming what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise InputError("SpatialData zarr not found" + (" (it is a file)" if p.exists() else ""), file=p,
                         field="sdata", expected="a SpatialData .zarr directory")
    if not ((p / "zarr.json").is_file() or (p / ".zgroup").is_file()):
        raise InputError("not a zarr store (no zarr.json / .zgroup)", file=p, field="sdata",
                         expected="a SpatialData .zarr directory")
    points = _group_names(p, "points")
    if POINTS not in points:
        raise InputError(f"no points element '{POINTS}' (points: {', '.join(points) or 'none'})", file=p,
                         field="points", expected="transcripts as points 'transcripts' (x, y in µm, feature_name)")
    images = _group_names(p, "images")
    if not images:
        raise InputError("no image element", file=p, field="images", expected="the H&E as an image element")
    if image is not None and image not in images:
        raise InputError(f"no image '{image}' (images: {', '.join(images)})", file=p, field="sdata_image",
                         expected="the name of the H&E image element")


def read(path: str | Path) -> Any:
    """``spatialdata.read_zarr`` with one InputError for anything unreadable."""
    import spatialdata as sd

    check_layout(path)
    try:
        return sd.read_zarr(str(path))
    except Exception as exc:  # spatialdata / zarr / ome-zarr raise several types
        raise InputError(f"cannot read SpatialData ({type(exc).__name__}: {exc})", file=path, field="sdata",
                         expected="a SpatialData zarr (spatialdata.read_zarr)") from None


def _level0(img: Any) -> Any:
    """The full-resolution DataArray (c, y, x) of an image element (single- or multi-scale)."""
    if hasattr(img, "children") and "scale0" in getattr(img, "children", {}):
        node = img["scale0"]
        return next(iter(node.data_vars.values())) if hasattr(node, "data_vars") else node["image"]
    return img


def pick_image(sdata: Any, path: Any, image: str | None = None) -> str:
    """The H&E image element: ``image`` when given, else the only RGB (3-channel) image."""
    names = list(sdata.images.keys())
    if image is not None:
        if image not in names:
            raise InputError(f"no image '{image}' (images: {', '.join(names) or 'none'})", file=path,
                             field="sdata_image", expected="the name of the H&E image element")
        return image
    rgb = [n for n in names if int(_level0(sdata.images[n]).sizes.get("c", 1)) == 3]
    if len(rgb) == 1:
        return rgb[0]
    raise InputError(f"{'no' if not rgb else len(rgb)} RGB image(s) among {', '.join(names) or 'none'}", file=path,
                     field="sdata_image", expected="one 3-channel H&E image, or its name in the sheet's sdata_image")


def he_affine(sdata: Any, image: str, path: Any = None) -> tuple[np.ndarray, str]:
    """(3x3 affine H&E level-0 px -> the transcripts' µm, the coordinate system used)."""
    from spatialdata.transformations import get_transformation

    pts = sdata.points[POINTS]
    img = sdata.images[image]
    tp = get_transformation(pts, get_all=True)
    ti = get_transformation(img, get_all=True)
    shared = [c for c in ti if c in tp]
    if not shared:
        raise InputError(f"image '{image}' (systems {sorted(ti)}) and '{POINTS}' (systems {sorted(tp)}) share no "
                         "coordinate system", file=path, field="transformations",
                         expected="the H&E and the transcripts registered to one coordinate system")
    cs = "global" if "global" in shared else shared[0]
    xy = ("x", "y")
    m_img = np.asarray(ti[cs].to_affine_matrix(input_axes=xy, output_axes=xy), float)
    m_pts = np.asarray(tp[cs].to_affine_matrix(input_axes=xy, output_axes=xy), float)
    try:
        a = np.linalg.inv(m_pts) @ m_img
    except np.linalg.LinAlgError:
        raise InputError(f"the transformation of '{POINTS}' to {cs} is singular", file=path,
                         field="transformations", expected="an invertible transformation") from None
    if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:2, :2])) < 1e-12:
        raise InputError(f"the H&E -> µm affine of image '{image}' is singular", file=path, field="transformations",
                         expected="an invertible affine")
    return a, cs


def _point_batches(points: Any, path: Any):
    cols = set(points.columns)
    missing = [c for c in ("x", "y", "feature_name") if c not in cols]
    if missing:
        raise InputError(f"points '{POINTS}' lack column(s) {', '.join(missing)} (columns: {', '.join(sorted(cols))})",
                         file=path, field=missing[0], expected="x, y (µm) and feature_name")
    for part in points.to_delayed():
        df = part.compute()
        out = {"feature_name": df["feature_name"].astype(str).to_numpy(), "x_location": df["x"].to_numpy(np.float64),
               "y_location": df["y"].to_numpy(np.float64)}
        if "qv" in df:
            out["qv"] = df["qv"].to_numpy(np.float32)
        if "z" in df:
            out["z_location"] = df["z"].to_numpy(np.float32)
        yield out


def _rgb_levels(img: Any) -> list[Any]:
    """(H, W, 3) uint8 dask arrays of the image's pyramid levels (level 0 first)."""
    import dask.array as da

    if hasattr(img, "children") and getattr(img, "children", None):
        arrs = [next(iter(img[k].data_vars.values())) for k in sorted(img.children, key=lambda k: int(k[5:]))]
    else:
        arrs = [img]
    out = []
    for a in arrs:
        d = a.transpose("y", "x", "c").data
        d = d if isinstance(d, da.Array) else da.from_array(np.asarray(d))
        if d.dtype != np.uint8:
            d = da.clip(d, 0, 255).astype(np.uint8)
        out.append(d)
    return out


def ingest_spatialdata(*, sdata: str | Path, out_dir: str | Path, sample: str, image: str | None = None,
                       he_mpp: float | None = None) -> dict[str, Any]:
    """Rule ``xenium_ingest_spatialdata``: the pre-aligned bundle + ``he.ome.tif`` of one SpatialData
    sample into ``out_dir`` (:mod:`morphomol.io.ingest`); returns a summary."""
    from morphomol.geometry import scale
    from morphomol.io.ingest import (
        INGESTED,
        all_or_nothing,
        pyramid,
        write_alignment,
        write_experiment,
        write_ome_tiff,
        write_transcripts,
    )

    s = read(sdata)
    name = pick_image(s, sdata, image)
    a, cs = he_affine(s, name, sdata)
    mpp = math.sqrt(abs(float(np.linalg.det(a[:2, :2]))))
    if he_mpp is not None and abs(float(he_mpp) / mpp - 1) > 0.1:
        raise InputError(f"sample {sample}: he_mpp {float(he_mpp):g} disagrees with the image transformation "
                         f"({mpp:.4g} µm/px)", file=sdata, field="he_mpp",
                         expected="he_mpp empty, or the µm/px the transformation implies")
    img = s.images[name]
    c = int(_level0(img).sizes.get("c", 1))
    if c not in (3, 4):
        raise InputError(f"image '{name}' has {c} channel(s)", file=sdata, field="sdata_image",
                         expected="an RGB(A) H&E image")
    levels = [lv[..., :3] for lv in _rgb_levels(img)]
    if len(levels) == 1:
        levels = pyramid(levels[0])
    out = Path(out_dir)
    with all_or_nothing(out, ("transcripts", "experiment", "alignment", "he")):
        n = write_transcripts(out / INGESTED["transcripts"], _point_batches(s.points[POINTS], sdata))
        if n == 0:
            raise InputError(f"points '{POINTS}' are empty", file=sdata, field=POINTS, expected="transcripts")
        write_ome_tiff(out / INGESTED["he"], levels, mpp)
        write_experiment(out / INGESTED["experiment"], pixel_size=mpp, source="spatialdata", sample=sample,
                         extra={"sdata": str(sdata), "image": name, "coordinate_system": cs})
        write_alignment(out / INGESTED["alignment"], scale(1.0 / mpp) @ a)  # H&E px -> "morphology" px (= µm / mpp)
    h, w = int(levels[0].shape[0]), int(levels[0].shape[1])
    log.info("%s: SpatialData sample, %d transcripts, H&E '%s' %dx%d px at %.4g µm/px (system %s)", sample, n, name,
             w, h, mpp, cs)
    return {"sample": sample, "format": "spatialdata", "transcripts": n, "mpp": mpp, "image": name,
            "coordinate_system": cs, "affine": json.loads(json.dumps(a.tolist()))}


__all__ = ["POINTS", "check_layout", "he_affine", "ingest_spatialdata", "pick_image", "read"]
