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
positions and the image do not belong together (wrong image or ``image_scale``): an InputError.
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


def read_sample(fmt: str, files: dict[str, str]) -> SpotData:
    """The :class:`SpotData` of one sample from its input files (see :mod:`.layout`)."""
    if fmt == "spaceranger":
        return read_spaceranger(files["matrix"], files["positions"], files.get("scalefactors"))
    if fmt == "st":
        return read_st(files["counts"], files["spots"])
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
    data = read_sample(fmt, files)
    he = files["he"]
    sheet = files.get("sheet")
    scale = image_scale_factor(data, image_scale, sheet)
    slide, meta_mpp, meta_src = open_image(he, he_mpp)
    try:
        platform = PLATFORMS[data.platform]
        keep_t = data.in_tissue
        if not keep_t.any():
            raise InputError("no in-tissue spot", file=files.get("positions") or files.get("spots") or files.get("adata"),
                             field="in_tissue", expected="at least one spot under the tissue")
        x = data.x_px * scale
        y = data.y_px * scale
        rows = data.array_row[keep_t] if data.array_row is not None else None
        cols = data.array_col[keep_t] if data.array_col is not None else None
        pitch, n_pairs, how = measured_pitch_px(x[keep_t], y[keep_t], rows, cols, platform)
        mpp = resolve_mpp(sheet=he_mpp, hest=data.hest_mpp / scale if data.hest_mpp else None,
                          image=meta_mpp, image_source=meta_src,
                          spot_diameter_px=data.spot_diameter_px * scale if data.spot_diameter_px else None,
                          fullres_spot_um=cfg.geometry.fullres_spot_um, pitch_px=pitch, pitch_how=how,
                          platform=platform, tolerance=cfg.geometry.tolerance, file=he)
        if abs(slide.mpp - mpp.mpp) > 1e-12:
            slide.close()
            from morphomol.io.he import open_slide

            slide = open_slide(he, mpp.mpp)
        w, h = slide.dimensions
        idx_t = np.flatnonzero(keep_t)
        out = (x[idx_t] < 0) | (y[idx_t] < 0) | (x[idx_t] >= w) | (y[idx_t] >= h)
        if out.any():
            first = idx_t[np.flatnonzero(out)[0]]
            raise InputError(
                f"{int(out.sum())} of {len(idx_t)} in-tissue spot(s) lie outside the {w}x{h} px image (e.g. "
                f"{data.barcodes[first]} at x={x[first]:.0f}, y={y[first]:.0f} px; image scale {scale:g})",
                file=files.get("positions") or files.get("spots") or files.get("adata"), field="spot positions",
                expected="positions in the pixels of this image (check he_path and image_scale)")
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
        qc = _qc(sample, fmt, data, plan, mpp, slide, scale, pitch, n_pairs, how, seconds, time.perf_counter() - t0)
        write_json(out_qc, qc)
        if out_qc_png is not None:
            plot_spots_qc(out_qc_png, slide, x[order], y[order], plan, mpp, sample)
    finally:
        slide.close()
    log.info("%s: %d units (%d padded) of %d in-tissue spots; µm/px %.4g from %s; %.1f patches/s", sample, n,
             int(plan.padded.sum()), len(idx_t), mpp.mpp, mpp.source, n / max(seconds, 1e-9))
    return qc


def _qc(sample: str, fmt: str, data: SpotData, plan: Any, mpp: MppResolution, slide: Any, scale: float,
        pitch: float | None, n_pairs: int, how: str, patch_seconds: float, seconds: float) -> dict[str, Any]:
    counts = plan.counts()
    return {
        "sample": sample, "format": fmt, "platform": data.platform,
        # positions: rows of the positions file / spot table; with_counts: spots of the matrix (counts table)
        # that have a position; in_tissue: those under the tissue = the spots patches are planned for
        "spots": {"positions": data.counts_info.get("positions"),
                  "positions_in_tissue": data.counts_info.get("positions_in_tissue"), "with_counts": len(data),
                  "with_counts_out_of_tissue": int((~data.in_tissue).sum()), "in_tissue": int(data.in_tissue.sum()),
                  "units": counts["kept"], "padded": counts["padded"],
                  "dropped": int(counts["units"] - counts["kept"])},
        "dropped_reasons": {k.removeprefix("dropped: "): v for k, v in counts.items() if k.startswith("dropped: ")},
        "mpp": mpp.to_dict(),
        "geometry": {"measured_pitch_px": pitch, "pitch_pairs": n_pairs, "pitch_from": how,
                     "expected_pitch_um": PLATFORMS[data.platform].pitch_um,
                     "spot_diameter_fullres": data.spot_diameter_px, "image_scale": scale},
        "image": {"path": str(slide.path), "backend": slide.backend, "dimensions": list(slide.dimensions),
                  "levels": slide.level_count, "image_metadata_mpp": slide.meta_mpp},
        "patch": {"size_um": None if plan.size_px is None else plan.size_px * mpp.mpp, "size_px_level0": plan.size_px},
        "genes": len(data.genes), "warnings": list(mpp.warnings), "seconds": seconds,
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
