"""The register stage: :func:`register_sample` (one sample → registration.json + QC PNG).

Alignment input: keypoints CSV (landmark fits per region, LOO residuals, outliers), a 3×3
alignment matrix, or nothing (coarse initialisation from the images); then optional image
refinement per region, the transcript bounding box in H&E px, the QC figure and the JSON.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from morphomol.errors import InputError, MorphomolError
from morphomol.geometry import apply_affine, apply_points, scale
from morphomol.io.landmarks import Keypoints, RegionPolygon, read_alignment
from morphomol.io.regions import read_regions
from morphomol.registration.fit import COLLINEAR_RATIO, ROBUST_METHODS, DegenerateFit, collinearity, robust_fit
from morphomol.registration.images import Raster, he_bbox, load_dapi, load_he
from morphomol.registration.qc import DENSITY_STEP_UM, DensityGrid, RegionQC, write_density_qc_png, write_qc_png
from morphomol.registration.refine import coarse_init, refine_affine
from morphomol.registration.transform import Registration, RegionTransform
from morphomol.util.hashing import sha256_file
from morphomol.util.logs import get_logger

if TYPE_CHECKING:
    from morphomol.config import IOConfig, RegistrationConfig

log = get_logger("registration")

REFINE_MODES = ("auto", "always", "never")
ASSIGNMENTS = ("nearest", "drop")
BOUNDS_TOL = 0.01  # landmarks may lie this fraction of the image size outside it (clicks on the border)


def _opt(v: Any) -> Any:
    """None for missing sheet values (None, NaN, '', 'nan', 'NA')."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, str) and v.strip().lower() in ("", "nan", "na", "none", "null"):
        return None
    return v


def _fmt_lm(kp: Keypoints | None, idx: np.ndarray, order: Sequence[int], values: np.ndarray, k: int = 3) -> str:
    """``landmark j (line L) v µm`` for the first ``k`` of ``order`` (for messages)."""
    parts = []
    for j in list(order)[:k]:
        line = f"line {int(kp.rows[idx[j]])}" if kp is not None and len(kp.rows) else f"#{j}"
        parts.append(f"landmark {j} ({line}) {values[j]:.1f} µm")
    return ", ".join(parts)


def _region_groups(kp: Keypoints, fixed_um: np.ndarray, polygons: list[RegionPolygon] | None,
                   assignment: str, sample: str) -> list[tuple[str, np.ndarray, RegionPolygon | None]]:
    """(name, landmark indices, region polygon) per region."""
    n = len(kp)
    if polygons:
        names = [p.name for p in polygons]
        if kp.regions is not None and set(kp.regions) <= set(names):
            lab = np.array([names.index(r) for r in kp.regions])
        else:
            if kp.regions is not None:
                log.warning("%s: keypoint region labels %s do not match the GeoJSON names %s; "
                            "assigning landmarks by polygon containment", sample, sorted(set(kp.regions)), names)
            tmp = Registration(regions=[RegionTransform(name=p.name, matrix=np.eye(3), inverse=np.eye(3),
                                                        polygon_um=p.polygon_um, geometry_um=p.geometry_mapping())
                                        for p in polygons],
                               region_assignment=assignment)
            lab = tmp.assign_regions(fixed_um[:, 0], fixed_um[:, 1])
            if (lab < 0).any():
                log.warning("%s: %d landmark(s) outside every region polygon dropped (region_assignment=drop)",
                            sample, int((lab < 0).sum()))
        return [(p.name, np.flatnonzero(lab == i), p) for i, p in enumerate(polygons)]
    if kp.regions is not None:
        names = list(dict.fromkeys(kp.regions))
        lab = np.array([names.index(r) for r in kp.regions])
        return [(nm, np.flatnonzero(lab == i), None) for i, nm in enumerate(names)]
    return [("r0", np.arange(n), None)]


def _check_bounds(kp: Keypoints, morph_wh: tuple[int, int] | None, he_wh: tuple[int, int], sample: str) -> None:
    """InputError naming the CSV lines of landmarks outside the morphology or H&E image."""
    bad = []
    for label, pts, wh in (("morphology (fixedX/fixedY)", kp.fixed_px, morph_wh),
                           ("H&E (alignmentX/alignmentY)", kp.moving_px, he_wh)):
        if wh is None:
            continue
        w, h = wh
        tx, ty = BOUNDS_TOL * w + 2, BOUNDS_TOL * h + 2
        out = (pts[:, 0] < -tx) | (pts[:, 0] > w + tx) | (pts[:, 1] < -ty) | (pts[:, 1] > h + ty)
        for i in np.flatnonzero(out)[:5]:
            reg = f" region {kp.regions[i]}" if kp.regions is not None else ""
            bad.append(f"line {int(kp.rows[i])}{reg} ({pts[i, 0]:.1f}, {pts[i, 1]:.1f}) outside the "
                       f"{label} image of {w}x{h} px")
    if bad:
        raise InputError(f"sample {sample}: landmarks outside the images: " + "; ".join(bad), file=kp.path,
                         field="fixedX,fixedY,alignmentX,alignmentY", expected="landmarks inside both images")


def register_sample(*, xenium: Any, he: Any, out_json: str | Path, out_qc: str | Path,
                    alignment: Any = None, regions: Any = None, sample: str = "", he_mpp: Any = None,
                    qv_min: Any = 20.0, robust: str = "trim", outlier_threshold_um: float = 10.0,
                    max_rms_um: float = 15.0, region_assignment: str = "nearest", refine: str = "auto",
                    refine_mpp: float = 4.0, seed: int = 0, batch_size: int = 2_000_000,
                    mpp_tolerance: float = 0.1, cfg: RegistrationConfig | None = None, io: IOConfig | None = None,
                    prealigned: bool = False) -> Registration:
    """Register one sample and write ``registration.json`` + ``registration_qc.png``.

    ``xenium``: Xenium output dir (or a XeniumBundle); ``he``: H&E slide path (or a Slide);
    ``alignment``: keypoints CSV or 3×3 matrix CSV (None → image-based); ``regions``: GeoJSON.
    ``cfg`` / ``io``: the typed ``registration`` / ``io`` config sections; when given, their
    fields replace the keyword settings of the same names. The H&E pixel size stated by the sample
    sheet (``he_mpp``), by the slide's metadata and by the landmark / matrix affine must agree within
    ``mpp_tolerance`` (relative): a disagreement is an error naming all three values (a wrong he_mpp
    would silently give tiles of the wrong physical size). Raises :class:`InputError` (and writes
    nothing) on bad input.

    ``prealigned``: the transcripts are already aligned with the H&E (SpatialData / HEST samples,
    :mod:`morphomol.io.ingest`): ``alignment`` is the 3×3 matrix of that alignment, taken as it is
    (method ``prealigned``, no refinement); the slide metadata's µm/px is only compared with a warning
    (HEST's embedded pixel sizes are known to be unreliable). Without a morphology image the QC figure
    shows the transcript density over the H&E in the µm frame.
    """
    from morphomol.io.he import open_slide
    from morphomol.io.xenium import XeniumBundle

    t0 = time.perf_counter()
    if cfg is not None:
        robust, outlier_threshold_um, max_rms_um = cfg.robust, cfg.outlier_threshold_um, cfg.max_rms_um
        region_assignment, refine, refine_mpp = cfg.region_assignment, cfg.refine, cfg.refine_mpp
        mpp_tolerance = cfg.mpp_tolerance
    if io is not None:
        qv_min, batch_size = io.qv_min, io.batch_size
    if robust not in ROBUST_METHODS:
        raise InputError(f"unknown value {robust!r}", field="registration.robust", expected=" | ".join(ROBUST_METHODS))
    if refine not in REFINE_MODES:
        raise InputError(f"unknown value {refine!r}", field="registration.refine", expected=" | ".join(REFINE_MODES))
    if region_assignment not in ASSIGNMENTS:
        raise InputError(f"unknown value {region_assignment!r}", field="registration.region_assignment",
                         expected=" | ".join(ASSIGNMENTS))
    if not (refine_mpp and float(refine_mpp) > 0):
        raise InputError(f"refine_mpp is {refine_mpp!r}", field="registration.refine_mpp", expected="a positive number")
    refine_mpp = float(refine_mpp)
    alignment, regions, he_mpp = _opt(alignment), _opt(regions), _opt(he_mpp)
    if prealigned:
        if alignment is None:
            raise InputError(f"sample {sample or xenium}: a pre-aligned sample needs its alignment matrix",
                             field="alignment", expected="he_imagealignment.csv written by the ingest rule")
        refine = "never"
    sample = sample or Path(str(xenium)).name

    bundle = xenium if hasattr(xenium, "pixel_size") else XeniumBundle(xenium)
    slide = he if hasattr(he, "read_region") else open_slide(he, mpp=None if he_mpp is None else float(he_mpp))
    ps = float(bundle.pixel_size)
    he_w, he_h = (int(v) for v in slide.dimensions)
    try:
        mh, mw = (int(v) for v in bundle.morphology_levels()[0][-2:])
        morph_wh: tuple[int, int] | None = (mw, mh)
    except (MorphomolError, OSError, FileNotFoundError, IndexError, AttributeError) as exc:
        log.warning("%s: no morphology (DAPI) image (%s); image refinement unavailable", sample, exc)
        morph_wh = None

    inputs: dict[str, str] = {}
    try:
        polygons = read_regions(regions) if regions is not None else None
        parsed = read_alignment(alignment) if alignment is not None else None
    except InputError as exc:  # name the sample too
        raise InputError(f"sample {sample}: {exc.message}") from None
    if regions is not None:
        inputs[Path(regions).name] = sha256_file(regions)
    if alignment is not None:
        inputs[Path(alignment).name] = sha256_file(alignment)

    dapi: Raster | None = None
    if morph_wh is not None:  # for refinement and for the QC overlay
        dapi = load_dapi(bundle, refine_mpp)
    full_um = [0.0, 0.0, morph_wh[0] * ps, morph_wh[1] * ps] if morph_wh else None

    region_list: list[RegionTransform] = []
    qc: list[RegionQC] = []
    if isinstance(parsed, Keypoints):
        method = "landmarks"
        kp = parsed
        _check_bounds(kp, morph_wh, (he_w, he_h), sample)
        fixed_um = kp.fixed_px * ps
        for name, idx, rp in _region_groups(kp, fixed_um, polygons, region_assignment, sample):
            poly = None if rp is None else rp.polygon_um
            lines = ", ".join(str(int(kp.rows[i])) for i in idx[:10])
            if len(idx) < 3:
                raise InputError(f"sample {sample} region {name}: {len(idx)} landmark(s) (lines {lines or 'none'})",
                                 file=kp.path, field="region" if kp.regions is not None or polygons else "rows",
                                 expected="at least 3 non-collinear landmarks per region")
            src, dst = kp.moving_px[idx], fixed_um[idx]
            for label, pts, unit in (("H&E", src, "px"), ("DAPI", dst, "µm")):
                c = collinearity(pts)
                if c < COLLINEAR_RATIO:
                    raise InputError(f"sample {sample} region {name}: the {len(idx)} landmarks (lines {lines}) are "
                                     f"collinear in the {label} image (spread ratio {c:.2g})", file=kp.path,
                                     field="fixedX,fixedY,alignmentX,alignmentY",
                                     expected="at least 3 landmarks not on one line per region")
            try:
                fit = robust_fit(src, dst, method=robust, threshold_um=float(outlier_threshold_um), seed=int(seed))
            except DegenerateFit as exc:
                raise InputError(f"sample {sample} region {name}: {exc} (landmarks on lines {lines})", file=kp.path,
                                 field="fixedX,fixedY,alignmentX,alignmentY", expected="an invertible affine") from None
            norms = np.linalg.norm(np.nan_to_num(fit.residuals, nan=0.0), axis=1)
            outl = [int(i) for i in np.flatnonzero(~fit.inliers)]
            if outl:
                log.warning("%s region %s: outlier landmark(s) excluded: %s", sample, name,
                            _fmt_lm(kp, idx, outl, norms, k=10))
            if fit.rms_um is not None and fit.rms_um > float(max_rms_um):
                order = [int(j) for j in np.argsort(-norms) if fit.inliers[j]]
                raise InputError(f"sample {sample} region {name}: landmark residual RMS {fit.rms_um:.2f} µm exceeds "
                                 f"max_rms_um {float(max_rms_um):g}; worst: {_fmt_lm(kp, idx, order, norms)}",
                                 file=kp.path, field="registration.max_rms_um",
                                 expected=f"RMS <= {float(max_rms_um):g} µm (fix or remove these landmarks)")
            if fit.rms_um is None:
                log.warning("%s region %s: %d inlier landmarks: residuals are undefined (exact fit)",
                            sample, name, int(fit.inliers.sum()))
            m = fit.matrix
            region_list.append(RegionTransform(name=name, matrix=m, inverse=np.linalg.inv(m), n_landmarks=len(idx),
                                               rms_um=fit.rms_um, max_um=fit.max_um, outliers=outl, polygon_um=poly,
                                               landmarks_um=dst,
                                               geometry_um=None if rp is None else rp.geometry_mapping()))
            bbox = _region_bbox(poly, dst, full_um)
            qc.append(RegionQC(fixed_um=dst, residual_um=fit.residuals, outliers=outl, bbox_um=bbox, moving_px=src))
            log.info("%s region %s: %d landmarks, LOO RMS %s µm, max %s µm, %d outlier(s)", sample, name, len(idx),
                     _f(fit.rms_um), _f(fit.max_um), len(outl))
    else:
        if prealigned and not isinstance(parsed, np.ndarray):
            raise InputError(f"sample {sample}: the pre-alignment is not a 3x3 matrix", file=alignment, field="alignment",
                             expected="a headerless 3x3 H&E px -> morphology px matrix")
        if isinstance(parsed, np.ndarray):
            method = "prealigned" if prealigned else "matrix"
            m_all = scale(ps) @ parsed
            log.info("%s: alignment matrix %s (H&E px -> morphology px) scaled by pixel size %.4f", sample,
                     Path(alignment).name, ps)
        else:
            method = "image"
            if dapi is None:
                raise InputError(f"sample {sample}: no alignment file and no morphology image", field="alignment",
                                 expected="a keypoints CSV, an alignment matrix CSV, or a Xenium morphology image")
            coarse_mpp = max(4 * refine_mpp, 16.0)
            dapi_c = load_dapi(bundle, coarse_mpp)
            he_c = load_he(slide, coarse_mpp)
            m_all, _ = coarse_init(dapi_c, he_c, float(slide.mpp), coarse_mpp)
        if not np.all(np.isfinite(m_all)) or abs(np.linalg.det(m_all[:2, :2])) < 1e-12:
            raise InputError(f"sample {sample}: alignment matrix is singular", file=alignment, field="matrix",
                             expected="an invertible affine")
        groups = [(p.name, p.polygon_um, p.geometry_mapping()) for p in polygons] if polygons else [("r0", None, None)]
        for name, poly, geom in groups:
            region_list.append(RegionTransform(name=name, matrix=m_all.copy(), inverse=np.linalg.inv(m_all),
                                               polygon_um=poly, geometry_um=geom))
            qc.append(RegionQC(fixed_um=np.zeros((0, 2)), residual_um=np.zeros((0, 2)), outliers=[],
                                bbox_um=_region_bbox(poly, None, full_um or _um_extent(m_all, he_w, he_h))))

    check_mpp_agreement(sample, sheet=he_mpp, slide=None if prealigned else slide,
                        affine=[affine_scale(r.matrix) for r in region_list] if method != "image" else [],
                        tolerance=float(mpp_tolerance), file=alignment if alignment is not None else he)
    meta = getattr(slide, "meta_mpp", None)
    if prealigned and meta is not None and abs(meta / affine_scale(region_list[0].matrix) - 1) > float(mpp_tolerance):
        log.warning("%s: the slide metadata says %.4g µm/px, the pre-alignment %.4g µm/px: the pre-alignment is used",
                    sample, meta, affine_scale(region_list[0].matrix))

    # image refinement
    do_refine = dapi is not None and (refine != "never" or method == "image")
    if refine != "never" and dapi is None:
        log.warning("%s: refinement skipped (no morphology image)", sample)
    any_refined = False
    for r, q in zip(region_list, qc, strict=True):
        if not do_refine:
            continue
        assert dapi is not None
        t1 = time.perf_counter()
        he_r = load_he(slide, refine_mpp, he_bbox(r.inverse, q.bbox_um, pad_um=0.15 * _diag(q.bbox_um)))
        m, before, after = refine_affine(r.matrix, dapi, he_r, bbox_um=q.bbox_um, polygon_um=r.polygon_um,
                                         refine_mpp=refine_mpp)
        keep = refine == "always" or method == "image" or after > before + 1e-4
        r.refine_score_before, r.refine_score_after = before, (after if keep else before)
        if keep:
            r.matrix, r.inverse, r.refined = m, np.linalg.inv(m), True
            any_refined = True
        log.info("%s region %s: refinement NCC %.4f -> %.4f (%s) in %.1f s", sample, r.name, before, after,
                 "kept" if keep else "discarded", time.perf_counter() - t1)
        if keep and len(q.moving_px):
            inl = np.ones(len(q.moving_px), bool)
            inl[q.outliers] = False
            d = np.linalg.norm(apply_points(r.matrix, q.moving_px[inl]) - q.fixed_um[inl], axis=1)
            log.info("%s region %s: inlier landmark RMS under the refined transform %.2f µm", sample, r.name,
                     float(np.sqrt(np.mean(d**2))))
    if any_refined and method != "image":
        method += "+refine"

    reg = Registration(regions=region_list, sample=sample, method=method, he_mpp=float(slide.mpp),
                       xenium_pixel_size=ps, inputs=inputs, region_assignment=region_assignment)
    density = DensityGrid(DENSITY_STEP_UM) if dapi is None else None
    reg.transcript_bbox_he = transcript_bbox(reg, bundle, qv_min=_opt(qv_min), batch_size=int(batch_size),
                                             he_wh=(he_w, he_h), density=density)
    if reg.transcript_bbox_he is None:
        log.warning("%s: no transcripts mapped into the H&E; transcript_bbox_he is null", sample)
    if density is not None:  # no DAPI to compare with: transcripts over the H&E
        write_density_qc_png(out_qc, reg, slide, density)
    else:
        write_qc_png(out_qc, reg, qc, dapi, slide, refine_mpp)
    reg.save(out_json)
    log.info("%s: registration (%s, %d region(s)) written in %.1f s", sample, method, len(region_list),
             time.perf_counter() - t0)
    return reg


def affine_scale(m: np.ndarray) -> float:
    """µm per H&E pixel of an affine H&E px -> µm (square root of the area scale)."""
    return float(math.sqrt(abs(np.linalg.det(np.asarray(m, float)[:2, :2]))))


def check_mpp_agreement(sample: str, *, sheet: Any, slide: Any, affine: Sequence[float], tolerance: float,
                        file: Any = None) -> None:
    """InputError when the sample sheet's he_mpp, the slide metadata's µm/px and the affine's scale
    (median over regions) disagree by more than ``tolerance`` (relative to the smaller value)."""
    values = {}
    if sheet is not None:
        values["sample sheet he_mpp"] = float(sheet)
    meta = getattr(slide, "meta_mpp", None)
    if meta is not None:
        values[f"slide metadata ({getattr(slide, 'meta_mpp_source', 'metadata')})"] = float(meta)
    if affine:
        values["landmark/matrix affine"] = float(np.median(np.asarray(affine, float)))
    if len(values) < 2:
        return
    lo, hi = min(values.values()), max(values.values())
    if hi / lo - 1 > tolerance:
        stated = "; ".join(f"{k} {v:.4g} µm/px" for k, v in values.items())
        every = {"sample sheet he_mpp": "not given", "slide metadata": "none", "landmark/matrix affine": "n/a"}
        for k in values:
            every.pop(k.split(" (")[0], None)
        missing = "".join(f"; {k} {v}" for k, v in every.items())
        raise InputError(f"sample {sample}: the H&E pixel size disagrees by {100 * (hi / lo - 1):.0f}%: {stated}"
                         f"{missing}", file=file, field="he_mpp",
                         expected=f"agreement within registration.mpp_tolerance ({100 * tolerance:.0f}%): fix or "
                                  "remove he_mpp in the sample sheet")


def _f(v: float | None) -> str:
    """``n/a`` or two decimals (log lines)."""
    return "n/a" if v is None else f"{v:.2f}"


def _diag(b: Sequence[float]) -> float:
    """Diagonal length of a box ``[x0, y0, x1, y1]``."""
    return math.hypot(b[2] - b[0], b[3] - b[1])


def _um_extent(m: np.ndarray, w: int, h: int) -> list[float]:
    """µm bounding box of the ``w x h`` px H&E under ``m``."""
    x, y = apply_affine(m, np.array([0, w, w, 0]), np.array([0, 0, h, h]))
    return [float(x.min()), float(y.min()), float(x.max()), float(y.max())]


def _region_bbox(poly: np.ndarray | None, lm: np.ndarray | None, full: list[float] | None) -> list[float]:
    """Bounding box (µm) used for refinement and QC: polygon, else landmarks hull + 15 %, clipped."""
    if poly is not None:
        p = np.asarray(poly)
        b = [float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())]
    elif lm is not None and len(lm):
        b = [float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max())]
        pad = 0.15 * max(b[2] - b[0], b[3] - b[1])
        b = [b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad]
    else:
        assert full is not None
        b = list(full)
    if full is not None:
        c = [max(b[0], full[0]), max(b[1], full[1]), min(b[2], full[2]), min(b[3], full[3])]
        if c[2] > c[0] and c[3] > c[1]:
            b = c
    return b


def transcript_bbox(reg: Registration, bundle: Any, *, qv_min: Any = 20.0, batch_size: int = 2_000_000,
                    he_wh: tuple[int, int] | None = None, density: DensityGrid | None = None) -> list[float] | None:
    """Bounding box [x0, y0, x1, y1] (H&E level-0 px) of all transcripts mapped with their region's affine;
    ``density`` (optional) also counts them on a µm grid (the QC figure without a DAPI image)."""
    lo = np.array([np.inf, np.inf])
    hi = np.array([-np.inf, -np.inf])
    n = 0
    for batch in bundle.iter_transcripts(batch_size=batch_size, qv_min=qv_min, drop_controls=True):
        x = np.asarray(batch.x, np.float64)
        y = np.asarray(batch.y, np.float64)
        if not len(x):
            continue
        if density is not None:
            density.add(x, y)
        ridx = reg.assign_regions(x, y)
        keep = ridx >= 0
        if not keep.any():
            continue
        hx, hy = reg.um_to_he(x[keep], y[keep], ridx[keep])
        lo = np.minimum(lo, [hx.min(), hy.min()])
        hi = np.maximum(hi, [hx.max(), hy.max()])
        n += int(keep.sum())
    if n == 0:
        return None
    box = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    if he_wh is not None:
        w, h = he_wh
        box = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
    log.info("transcript bbox in H&E px: %s (%d transcripts)", [round(v, 1) for v in box], n)
    return box
