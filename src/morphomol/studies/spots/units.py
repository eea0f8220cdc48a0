"""Per-sample rule of visium cohorts: spots -> the unit-table contract.

:func:`build_spot_units` reads one sample (any of the three layouts), resolves the H&E's µm/px
(:mod:`.geometry`), keeps the in-tissue spots, sorts them in raster order, plans one patch per spot
(:func:`morphomol.patches.plan_patches`: ``spots.patches.size_um`` centred on the spot, partly-outside
patches padded or dropped) and writes

* ``images.zarr`` (:func:`morphomol.patches.write_patch_store`: chunked, pyramid-aware reads);
* ``units.h5ad`` (:func:`morphomol.data.units.write_units`): obs index ``{sample}__{index:06d}``,
  columns ``sample_id, patient_id, index, barcode, array_row, array_col, x_px, y_px`` (level-0 px of
  the image), ``x_um, y_um, in_tissue, padded, n_counts, n_genes``; ``obsm['spatial']`` in µm; X raw
  counts; ``uns['morphomol']`` with the format, µm/px and its source;
* ``spots_qc.json`` (kept / padded / dropped counts with reasons, µm/px, its source and every
  candidate, the geometry checks and warnings) and ``spots_qc.png`` (spots over a thumbnail).

Units = in-tissue spots with a patch. An in-tissue spot whose centre lies outside the image means the
positions and the image do not belong together (wrong image or ``image_scale``): an InputError; so is a
``hires`` / ``lowres`` ``image_scale`` with an image that holds every spot at its full-resolution
position (the full-resolution image). Spots dropped by ``spots.missing_spots: drop`` are counted in
the QC (``spots.dropped_selected_without_counts``, ``spots.dropped_counts_without_position``) with a
warning; the µm/px source is ``mpp_source`` (``sheet | hest | image | diameter | pitch``).

:func:`preflight_sample` runs the same checks from the small files only (positions / spot table, the
counts' spot ids, scale factors, the image header): the spots study's check-config calls it for every
sample and reports every sample's problem at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.studies.spots.config import SpotsConfig
from morphomol.studies.spots.geometry import PLATFORMS, MppResolution, measured_pitch_px, resolve_mpp
from morphomol.studies.spots.readers import SpotData, read_hest, read_spaceranger, read_st
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("spots.units")

IMAGE_SCALES = ("fullres", "hires", "lowres")


def read_sample(fmt: str, files: dict[str, str], missing_spots: str = "drop") -> SpotData:
    """The :class:`SpotData` of one sample from its input files (see :mod:`.layout`)."""
    if fmt == "spaceranger":
        return read_spaceranger(files["matrix"], files["positions"], files.get("scalefactors"),
                                missing_spots=missing_spots)
    if fmt == "st":
        return read_st(files["counts"], files["spots"], missing_spots=missing_spots)
    if fmt == "hest":
        return read_hest(files["adata"], files["metadata"])
    raise InputError(f"unknown format {fmt!r}", field="format", expected="spaceranger | st | hest")


def image_scale_factor(data: SpotData, image_scale: str | None, file: Any) -> float:
    """Image px per full-resolution px: 1 for the full-resolution image, Space Ranger's
    ``tissue_hires_scalef`` / ``tissue_lowres_scalef`` for its downscaled images."""
    scale = image_scale or "fullres"
    if scale not in IMAGE_SCALES:
        raise InputError(f"invalid value {scale!r}", file=file, field="image_scale", expected=" | ".join(IMAGE_SCALES))
    if scale == "fullres":
        return 1.0
    key = f"tissue_{scale}_scalef"
    if data.fmt != "spaceranger" or key not in data.scalefactors:
        raise InputError(f"image_scale {scale} needs {key} in scalefactors_json.json", file=file, field="image_scale",
                         expected="fullres, or a Space Ranger sample with scale factors")
    return float(data.scalefactors[key])


def check_image_scale(data: SpotData, image_scale: str | None, scale: float, image_wh: tuple[int, int],
                      file: Any) -> None:
    """The positions (full-resolution px) x ``scale`` must fit the image, and a downscaled ``image_scale``
    must not be paired with the full-resolution image: when every in-tissue spot already lies inside the
    image at its full-resolution position, ``he_path`` is the full-resolution image and ``hires`` /
    ``lowres`` would put the spots at ``scale`` x their positions (an InputError naming ``image_scale``)."""
    w, h = image_wh
    keep = data.in_tissue
    if not keep.any():
        return
    x, y = data.x_px[keep], data.y_px[keep]
    if scale < 0.9 and (x.min() >= 0 and y.min() >= 0 and x.max() < w and y.max() < h):
        raise InputError(
            f"image_scale {image_scale} (scale factor {scale:.4g}) would put the spots at {scale:.2f}x their "
            f"positions, but the {w}x{h} px image holds every in-tissue spot at its full-resolution position "
            f"(up to x={x.max():.0f}, y={y.max():.0f} px): he_path is the full-resolution image", file=file,
            field="image_scale", expected="image_scale empty (fullres) for a full-resolution he_path, or he_path = "
                                          f"Space Ranger's tissue_{image_scale}_image.png")
    xs, ys = x * scale, y * scale
    out = (xs < 0) | (ys < 0) | (xs >= w) | (ys >= h)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        hint = ""
        for other in ("hires", "lowres"):
            f = data.scalefactors.get(f"tissue_{other}_scalef")
            if f and other != image_scale and (x * f).max() < w and (y * f).max() < h and (x * f).min() >= 0 \
                    and (y * f).min() >= 0:
                hint = f"; image_scale {other} (scale factor {f:.4g}) puts every spot inside it"
                break
        raise InputError(
            f"{int(out.sum())} of {len(xs)} in-tissue spot(s) lie outside the {w}x{h} px image (e.g. "
            f"{data.barcodes[keep][i]} at x={xs[i]:.0f}, y={ys[i]:.0f} px; image scale {scale:g}){hint}",
            file=file, field="spot positions" if not hint else "image_scale",
            expected="positions in the pixels of this image (check he_path and image_scale)")


def source_files(files: dict[str, str], sheet: Any) -> dict[str, Any]:
    """The file an error names for each µm/px source (:func:`.geometry.resolve_mpp`)."""
    pos = files.get("positions") or files.get("spots") or files.get("adata")
    return {"sheet": sheet, "hest": files.get("metadata"), "image": files.get("he"),
            "diameter": files.get("scalefactors"), "pitch": pos}


def sample_mpp(data: SpotData, *, scale: float, he_mpp: float | None, meta_mpp: float | None, meta_src: str,
               cfg: SpotsConfig, files: dict[str, str], sheet: Any) -> tuple[MppResolution, float | None, int, str]:
    """µm/px of the image (sources checked against each other) and the measured pitch: ``(mpp, pitch_px,
    n_pairs, how)``."""
    platform = PLATFORMS[data.platform]
    keep_t = data.in_tissue
    rows = data.array_row[keep_t] if data.array_row is not None else None
    cols = data.array_col[keep_t] if data.array_col is not None else None
    pitch, n_pairs, how = measured_pitch_px(data.x_px[keep_t] * scale, data.y_px[keep_t] * scale, rows, cols, platform)
    mpp = resolve_mpp(sheet=he_mpp, hest=data.hest_mpp / scale if data.hest_mpp else None,
                      image=meta_mpp, image_source=meta_src,
                      spot_diameter_px=data.spot_diameter_px * scale if data.spot_diameter_px else None,
                      fullres_spot_um=cfg.geometry.fullres_spot_um, pitch_px=pitch, pitch_how=how,
                      platform=platform, tolerance=cfg.geometry.tolerance, file=files.get("he"),
                      files=source_files(files, sheet))
    return mpp, pitch, n_pairs, how


def dropped_spots_warning(data: SpotData, files: dict[str, str]) -> str | None:
    """The QC warning of the spots dropped by ``spots.missing_spots: drop`` (None when none were)."""
    a = data.counts_info.get("selected_without_counts", 0)
    b = data.counts_info.get("counts_without_position", 0)
    if not (a or b):
        return None
    table = files.get("positions") or files.get("spots")
    counts = files.get("matrix") or files.get("counts")
    return (f"{a} selected / in-tissue spot(s) of {table} have no counts in {counts} and {b} spot(s) of the counts "
            "have no position in it: dropped (spots.missing_spots: drop)")


def open_image(path: str | Path, sheet_mpp: float | None) -> tuple[Any, float | None, str]:
    """(slide, image-metadata µm/px or None, its source). Without any µm/px the slide is opened with a
    placeholder and the caller reopens it with the resolved value."""
    from morphomol.io.he import open_slide

    if sheet_mpp is not None:
        s = open_slide(path, sheet_mpp)
        return s, s.meta_mpp, s.meta_mpp_source
    try:
        s = open_slide(path)
        return s, s.meta_mpp, s.meta_mpp_source
    except InputError as exc:
        if exc.field != "mpp":
            raise
        return open_slide(path, 1.0), None, ""


def build_spot_units(*, sample: str, patient: str, fmt: str, files: dict[str, str], he_mpp: float | None,
                     image_scale: str | None, cfg: SpotsConfig, out_units: str | Path, out_store: str | Path,
                     out_qc: str | Path, out_qc_png: str | Path | None = None) -> dict[str, Any]:
    """The rule ``spots_units``: read the sample's ``files`` (``he`` = the image) and write the unit
    table, image store and QC (see the module docstring). Returns the QC dict."""
    from morphomol.data.units import write_units
    from morphomol.patches import plan_patches, write_patch_store

    t0 = time.perf_counter()
    data = read_sample(fmt, files, cfg.missing_spots)
    he = files["he"]
    sheet = files.get("sheet")
    scale = image_scale_factor(data, image_scale, sheet)
    slide, meta_mpp, meta_src = open_image(he, he_mpp)
    try:
        keep_t = data.in_tissue
        pos_file = files.get("positions") or files.get("spots") or files.get("adata")
        if not keep_t.any():
            raise InputError("no in-tissue spot", file=pos_file, field="in_tissue",
                             expected="at least one spot under the tissue")
        check_image_scale(data, image_scale, scale, slide.dimensions, pos_file)
        x = data.x_px * scale
        y = data.y_px * scale
        mpp, pitch, n_pairs, how = sample_mpp(data, scale=scale, he_mpp=he_mpp, meta_mpp=meta_mpp, meta_src=meta_src,
                                              cfg=cfg, files=files, sheet=sheet)
        if abs(slide.mpp - mpp.mpp) > 1e-12:
            slide.close()
            from morphomol.io.he import open_slide

            slide = open_slide(he, mpp.mpp)
        w, h = slide.dimensions
        idx_t = np.flatnonzero(keep_t)
        # raster order (y, then x): fewest region reads, deterministic unit order
        order = idx_t[np.lexsort((x[idx_t], y[idx_t]))]
        plan = plan_patches(np.c_[x[order], y[order]], patch_um=cfg.patches.size_um, mpp=mpp.mpp, image_wh=(w, h),
                            on_edge=cfg.patches.on_edge)
        kept = order[plan.keep]
        if len(kept) == 0:
            raise InputError("no in-tissue spot has a patch", file=he, field="spots.patches.on_edge",
                             expected="pad, or patches that fit in the image")
        attrs = {"sample": sample, "unit": "spot", "patch_um": cfg.patches.size_um, "he_mpp": mpp.mpp,
                 "mpp": cfg.patches.size_um / cfg.patches.out_px, "out_px": cfg.patches.out_px, "codec": "lz4",
                 "he_path": str(he)}
        with atomic_path(out_store) as tmp:
            seconds = write_patch_store(tmp, slide, plan, out_px=cfg.patches.out_px, chunk=cfg.patches.chunk,
                                        attrs=attrs)
        n = len(kept)
        X = data.counts[kept]
        counts_total = np.asarray(X.sum(axis=1)).ravel()
        obs = pd.DataFrame({
            "sample_id": sample, "patient_id": patient, "index": np.arange(n, dtype=np.int64),
            "barcode": data.barcodes[kept].astype(str),
            "array_row": data.array_row[kept] if data.array_row is not None else -1,
            "array_col": data.array_col[kept] if data.array_col is not None else -1,
            "x_px": x[kept], "y_px": y[kept], "x_um": x[kept] * mpp.mpp, "y_um": y[kept] * mpp.mpp,
            "in_tissue": True, "padded": plan.padded[plan.keep],
            "n_counts": counts_total, "n_genes": np.asarray((X > 0).sum(axis=1)).ravel(),
        }, index=[f"{sample}__{i:06d}" for i in range(n)])
        uns = {"format": fmt, "platform": data.platform, "mpp": mpp.mpp, "mpp_source": mpp.source,
               "image_scale": scale, "patch_um": cfg.patches.size_um, "he_path": str(he)}
        from morphomol.registration.warp import spatial_image

        spatial = np.c_[x[kept], y[kept]] * mpp.mpp
        image = spatial_image(slide, spatial_um=spatial, library_id=sample,  # uns['spatial']: the H&E in µm
                              spot_diameter_um=cfg.geometry.fullres_spot_um)
        write_units(out_units, obs, X, data.genes, spatial_um=spatial, unit="spot",
                    sample=sample, patient=patient, uns=uns, spatial_image=image)
        qc = _qc(sample, fmt, data, plan, mpp, slide, scale, pitch, n_pairs, how, seconds, time.perf_counter() - t0,
                 dropped_spots_warning(data, files))
        write_json(out_qc, qc)
        if out_qc_png is not None:
            plot_spots_qc(out_qc_png, slide, x[order], y[order], plan, mpp, sample)
    finally:
        slide.close()
    log.info("%s: %d units (%d padded) of %d in-tissue spots; µm/px %.4g from %s; %.1f patches/s", sample, n,
             int(plan.padded.sum()), len(idx_t), mpp.mpp, mpp.source, n / max(seconds, 1e-9))
    return qc


def _qc(sample: str, fmt: str, data: SpotData, plan: Any, mpp: MppResolution, slide: Any, scale: float,
        pitch: float | None, n_pairs: int, how: str, patch_seconds: float, seconds: float,
        dropped_warning: str | None = None) -> dict[str, Any]:
    counts = plan.counts()
    return {
        "sample": sample, "format": fmt, "platform": data.platform,
        # positions: rows of the positions file / spot table; with_counts: spots of the matrix (counts table)
        # that have a position; in_tissue: those under the tissue = the spots patches are planned for
        "spots": {"positions": data.counts_info.get("positions"),
                  "positions_in_tissue": data.counts_info.get("positions_in_tissue"), "with_counts": len(data),
                  "with_counts_out_of_tissue": int((~data.in_tissue).sum()), "in_tissue": int(data.in_tissue.sum()),
                  "units": counts["kept"], "padded": counts["padded"],
                  "dropped": int(counts["units"] - counts["kept"]),
                  # spots.missing_spots: drop (legacy ST: a few selected spots per section have no counts)
                  "dropped_selected_without_counts": int(data.counts_info.get("selected_without_counts", 0)),
                  "dropped_counts_without_position": int(data.counts_info.get("counts_without_position", 0))},
        "dropped_reasons": {k.removeprefix("dropped: "): v for k, v in counts.items() if k.startswith("dropped: ")},
        "mpp": mpp.to_dict(), "mpp_source": mpp.source_key,
        "geometry": {"measured_pitch_px": pitch, "pitch_pairs": n_pairs, "pitch_from": how,
                     "expected_pitch_um": PLATFORMS[data.platform].pitch_um,
                     "spot_diameter_fullres": data.spot_diameter_px, "image_scale": scale},
        "image": {"path": str(slide.path), "backend": slide.backend, "dimensions": list(slide.dimensions),
                  "levels": slide.level_count, "image_metadata_mpp": slide.meta_mpp},
        "patch": {"size_um": None if plan.size_px is None else plan.size_px * mpp.mpp, "size_px_level0": plan.size_px},
        "genes": len(data.genes), "warnings": ([dropped_warning] if dropped_warning else []) + list(mpp.warnings),
        "seconds": seconds,
        "patches_per_second": counts["kept"] / max(patch_seconds, 1e-9),
    }


def plot_spots_qc(out: str | Path, slide: Any, x: np.ndarray, y: np.ndarray, plan: Any, mpp: MppResolution,
                  sample: str, max_size: int = 1024) -> Path:
    """Thumbnail with the in-tissue spots: kept (green), padded (orange), dropped (red)."""
    from morphomol.report.figures import plt, save_figure

    img, ds = slide.thumbnail(max_size)
    fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / max(img.shape[1], 1)))
    ax.imshow(img)
    for mask, colour, label in ((plan.keep & ~plan.padded, "#2ca02c", "kept"), (plan.padded, "#ff7f0e", "padded"),
                                (~plan.keep, "#d62728", "dropped")):
        if mask.any():
            ax.scatter(x[mask] / ds, y[mask] / ds, s=4, c=colour, label=f"{label} ({int(mask.sum())})", linewidths=0)
    ax.set_title(f"{sample}: {int(plan.keep.sum())} spots with a patch; {mpp.mpp:.3g} µm/px ({mpp.source})", fontsize=8)
    ax.legend(loc="lower right", fontsize=7, markerscale=3)
    ax.set_axis_off()
    return save_figure(fig, out)


# ------------------------------------------------------------------------------ pre-flight (check-config)
def image_header(path: str | Path) -> tuple[tuple[int, int], float | None, str]:
    """``((width, height), metadata µm/px or None, its source)`` of an image without decoding its pixels
    (pre-flight: OpenSlide, tifffile or Pillow headers only)."""
    from morphomol.io.he import _pil_mpp, _plausible, _tiff_levels, _tiff_mpp

    p = Path(path)
    try:
        import openslide

        osr = openslide.OpenSlide(str(p))
    except Exception:
        osr = None
    if osr is not None:
        try:
            w, h = osr.dimensions
            value = osr.properties.get("openslide.mpp-x")
            try:
                mpp = _plausible(float(value)) if value is not None else None
            except (TypeError, ValueError):
                mpp = None
        finally:
            osr.close()
        if mpp is not None:
            return (int(w), int(h)), mpp, "openslide.mpp-x"
        tif, _ = _tiff_levels(p)
        if tif is not None:
            with tif:
                mpp, src = _tiff_mpp(tif)
            return (int(w), int(h)), mpp, src
        return (int(w), int(h)), None, ""
    tif, _ = _tiff_levels(p)
    if tif is not None:
        with tif:
            s = tif.series[0]
            shape = dict(zip(s.axes, s.shape))
            mpp, src = _tiff_mpp(tif)
        return (int(shape["X"]), int(shape["Y"])), mpp, src
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as img:  # lazy: reads the header only
                mpp, src = _pil_mpp(img)
                return (int(img.size[0]), int(img.size[1])), mpp, src
    except Exception as exc:
        raise InputError(f"cannot read the image ({type(exc).__name__}: {exc})", file=p,
                         expected="a whole-slide image or PNG/JPEG") from None


def _spots_only(fmt: str, files: dict[str, str], missing_spots: str) -> SpotData:
    """The positions of a sample joined to its counts' spot ids, without reading the counts."""
    import scipy.sparse as sp

    from morphomol.studies.spots.readers import join_spots, read_st_ids, read_st_table, read_tissue_positions
    from morphomol.util.jsonio import read_json

    if fmt == "spaceranger":
        import h5py

        m = Path(files["matrix"])
        try:
            with h5py.File(m, "r") as f:
                g = f["matrix"] if "matrix" in f else f[next(k for k in f.keys() if isinstance(f[k], h5py.Group))]
                barcodes = [b.decode() for b in g["barcodes"][:]]
        except Exception:  # the units stage names what is wrong with the matrix
            return read_sample(fmt, files, missing_spots)
        pos = read_tissue_positions(files["positions"])
        rows, where, dropped = join_spots(barcodes, pos["barcode"].to_numpy(), pos["in_tissue"].to_numpy() == 1,
                                          missing_spots=missing_spots, table_file=Path(files["positions"]),
                                          counts_file=m, table_field="barcode", what="positions")
        sel = pos.iloc[where]
        sf: dict[str, float] = {}
        s = files.get("scalefactors")
        if s is not None and Path(s).is_file():
            raw = read_json(s, "scalefactors_json.json", obj=True)
            sf = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return SpotData(fmt=fmt, platform="visium", barcodes=np.array(barcodes, dtype=object)[rows],
                        counts=sp.csr_matrix((len(rows), 0), dtype=np.float32), genes=[],
                        x_px=sel["pxl_col_in_fullres"].to_numpy(np.float64),
                        y_px=sel["pxl_row_in_fullres"].to_numpy(np.float64), in_tissue=sel["in_tissue"].to_numpy() == 1,
                        array_row=sel["array_row"].to_numpy(np.int64), array_col=sel["array_col"].to_numpy(np.int64),
                        spot_diameter_px=sf.get("spot_diameter_fullres"), scalefactors=sf, counts_info=dropped)
    if fmt == "st":
        from morphomol.studies.spots.readers import ST_ID, st_key

        ids = read_st_ids(files["counts"])
        if not all(ST_ID.match(i) for i in ids):
            return read_sample(fmt, files, missing_spots)  # the reader names the malformed id
        xy = np.array([[float(v) for v in ST_ID.match(i).groups()] for i in ids])  # type: ignore[union-attr]
        table = read_st_table(files["spots"])
        rows, where, dropped = join_spots([st_key(a, b) for a, b in xy], table.index, table["sel"].to_numpy(),
                                          missing_spots=missing_spots, table_file=Path(files["spots"]),
                                          counts_file=Path(files["counts"]), table_field="x, y")
        t = table.iloc[where]
        return SpotData(fmt=fmt, platform="st", barcodes=np.array(ids, dtype=object)[rows],
                        counts=sp.csr_matrix((len(rows), 0), dtype=np.float32), genes=[],
                        x_px=t["px"].to_numpy(np.float64), y_px=t["py"].to_numpy(np.float64),
                        in_tissue=t["sel"].to_numpy(bool), array_row=np.round(xy[rows, 1]).astype(np.int64),
                        array_col=np.round(xy[rows, 0]).astype(np.int64), counts_info=dropped)
    if fmt == "hest":
        import anndata as ad

        from morphomol.studies.spots.readers import _hest_platform

        try:
            meta = read_json(files["metadata"], "HEST metadata", obj=True)
            a = ad.read_h5ad(files["adata"], backed="r")  # obs and obsm only: X stays on disk
            try:
                xy = np.asarray(a.obsm["spatial"], np.float64)
                obs = a.obs.copy()
                ids = np.array(a.obs_names.astype(str), dtype=object)
            finally:
                a.file.close()
        except Exception:  # the reader names what is wrong
            return read_sample(fmt, files, missing_spots)
        if xy.shape != (len(ids), 2):
            return read_sample(fmt, files, missing_spots)
        mpp = meta.get("pixel_size_um_estimated")
        cols = obs.columns
        return SpotData(fmt=fmt, platform=_hest_platform(meta, Path(files["metadata"])), barcodes=ids,
                        counts=sp.csr_matrix((len(ids), 0), dtype=np.float32), genes=[], x_px=xy[:, 0], y_px=xy[:, 1],
                        in_tissue=obs["in_tissue"].astype(int).to_numpy() == 1 if "in_tissue" in cols
                        else np.ones(len(ids), bool),
                        array_row=obs["array_row"].to_numpy(np.int64) if "array_row" in cols else None,
                        array_col=obs["array_col"].to_numpy(np.int64) if "array_col" in cols else None,
                        hest_mpp=float(mpp) if isinstance(mpp, (int, float)) and mpp > 0 else None)
    return read_sample(fmt, files, missing_spots)


def preflight_sample(*, fmt: str, files: dict[str, str], he_mpp: float | None, image_scale: str | None,
                     cfg: SpotsConfig, sheet: Any) -> dict[str, Any]:
    """What the units stage would stop on, from the small files only (check-config, ``snakemake -n``):
    the spot table against the counts' spot ids (``spots.missing_spots``), ``image_scale`` against the
    image size, the µm/px sources against each other. Raises the stage's InputError; returns a summary."""
    import logging

    quiet = [logging.getLogger(lg.name) for lg in (log, get_logger("spots.geometry"), get_logger("spots.readers"))]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # the units job logs these warnings; the pre-flight runs at every DAG build
        lg.setLevel(logging.ERROR)
    try:
        return _preflight(fmt=fmt, files=files, he_mpp=he_mpp, image_scale=image_scale, cfg=cfg, sheet=sheet)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def _preflight(*, fmt: str, files: dict[str, str], he_mpp: float | None, image_scale: str | None,
               cfg: SpotsConfig, sheet: Any) -> dict[str, Any]:
    data = _spots_only(fmt, files, cfg.missing_spots)
    pos_file = files.get("positions") or files.get("spots") or files.get("adata")
    if not data.in_tissue.any():
        raise InputError("no in-tissue spot", file=pos_file, field="in_tissue",
                         expected="at least one spot under the tissue")
    scale = image_scale_factor(data, image_scale, sheet)
    wh, meta_mpp, meta_src = image_header(files["he"])
    check_image_scale(data, image_scale, scale, wh, pos_file)
    mpp, *_ = sample_mpp(data, scale=scale, he_mpp=he_mpp, meta_mpp=meta_mpp, meta_src=meta_src, cfg=cfg,
                         files=files, sheet=sheet)
    return {"mpp": mpp.mpp, "mpp_source": mpp.source_key, "dropped": dict(data.counts_info)}
