"""Registration: landmark affine fits, LOO residuals, outliers, image refinement, Registration object.

Integration tests build a small paired scene as real files (Xenium bundle with a pyramidal DAPI
OME-TIFF + transcripts.parquet, pyramidal tiled H&E TIFF, keypoints CSV, GeoJSON regions) and
go through the project's real readers (XeniumBundle, open_slide).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from morphomol.errors import InputError
from morphomol.io.landmarks import write_keypoints
from morphomol.registration import (
    DegenerateFit,
    Registration,
    RegionTransform,
    apply_affine,
    fit_affine,
    load_dapi,
    load_he,
    loo_residuals,
    refine_affine,
    register_sample,
    robust_fit,
)

REPO = Path(__file__).resolve().parents[1]
PS = 0.5  # µm per morphology pixel of the synthetic scene
HE_MPP = 0.5
TISSUE = (1000.0, 700.0)  # µm
POLYS = {
    "A": np.array([[40.0, 40.0], [470.0, 60.0], [460.0, 660.0], [50.0, 640.0]]),
    "B": np.array([[530.0, 50.0], [960.0, 40.0], [950.0, 650.0], [540.0, 660.0]]),
}


# ------------------------------------------------------------------------------------------
# synthetic scene written as real files
# ------------------------------------------------------------------------------------------


def _rot(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]])


def _tr(x: float, y: float) -> np.ndarray:
    return np.array([[1, 0, x], [0, 1, y], [0, 0, 1.0]])


def truth_matrices() -> dict[str, np.ndarray]:
    """H&E px -> µm per region (piece B is rotated/shifted a little more: a local deformation)."""
    base = _tr(-60.0, 30.0) @ _rot(4.0) @ np.diag([HE_MPP, HE_MPP, 1.0]) @ _tr(100.0, -250.0)
    cb = POLYS["B"].mean(axis=0)
    tb = _tr(12.0, -8.0) @ _tr(*cb) @ _rot(1.5) @ _tr(*-cb) @ base
    return {"A": base, "B": tb}


def _block(img: np.ndarray, f: int = 2) -> np.ndarray:
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    v = img[:h, :w].astype(np.float32)
    return v.reshape(h // f, f, w // f, f, *img.shape[2:]).mean(axis=(1, 3))


def write_dapi(path: Path, img0: np.ndarray, n_levels: int) -> None:
    import tifffile

    levels = [img0]
    for _ in range(n_levels - 1):
        levels.append(_block(levels[-1]).astype(np.uint16))
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        tw.write(levels[0], subifds=n_levels - 1, tile=(128, 128), metadata={"axes": "YX"})
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, tile=(128, 128))


def write_he(path: Path, rgb: np.ndarray, mpp: float, n_levels: int) -> None:
    import tifffile

    img = rgb
    with tifffile.TiffWriter(path) as tw:
        for i in range(n_levels):
            tw.write(img, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp / 2**i, 1e4 / mpp / 2**i), resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1)
            img = np.clip(_block(img), 0, 255).astype(np.uint8)


def render_nuclei(rng: np.random.Generator, shape_um: tuple[float, float], ps: float, polys) -> tuple[np.ndarray, np.ndarray]:
    """DAPI-like image at ``ps`` µm/px (pixel i <-> i*ps µm) and nuclei centres (µm)."""
    from matplotlib.path import Path as MplPath
    from scipy import ndimage

    w, h = int(shape_um[0] / ps), int(shape_um[1] / ps)
    # density with structure (glands = holes, smooth modulation) so the images are informative
    n = int(shape_um[0] * shape_um[1] / 60.0)
    pts = rng.uniform([0, 0], shape_um, size=(n, 2))
    inside = np.zeros(n, bool)
    for p in polys:
        inside |= MplPath(p).contains_points(pts)
    glands = rng.uniform([0, 0], shape_um, size=(25, 2))
    d = np.min(np.linalg.norm(pts[:, None] - glands[None], axis=2), axis=1)
    keep = inside & (d > 25) & (rng.random(n) < 0.55 + 0.45 * np.sin(pts[:, 0] / 37.0) * np.cos(pts[:, 1] / 53.0))
    pts = pts[keep]
    img = np.zeros((h, w), np.float32)
    ix = np.clip(np.round(pts[:, 0] / ps).astype(int), 0, w - 1)
    iy = np.clip(np.round(pts[:, 1] / ps).astype(int), 0, h - 1)
    np.add.at(img, (iy, ix), 1.0)
    img = ndimage.gaussian_filter(img, 2.0 / ps)
    img = img / img.max()
    return img, pts


@dataclass
class Scene:
    root: Path
    xenium: Path
    he: Path
    truth: dict[str, np.ndarray]
    nuclei_um: np.ndarray


def make_scene(root: Path, seed: int = 0) -> Scene:
    from matplotlib.path import Path as MplPath
    from scipy import ndimage
    from skimage.color import hed2rgb

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    dens, nuclei = render_nuclei(rng, TISSUE, PS, POLYS.values())
    xen = root / "xenium"
    xen.mkdir()
    (xen / "experiment.xenium").write_text(json.dumps({"pixel_size": PS, "run_name": "synthetic"}))
    dapi = (dens * 20000 + rng.normal(0, 300, dens.shape)).clip(0, 65535).astype(np.uint16)
    write_dapi(xen / "morphology_focus.ome.tif", dapi, n_levels=4)
    k = np.repeat(nuclei, 2, axis=0) + rng.normal(0, 3.0, (2 * len(nuclei), 2))
    genes = np.array(["GENE_A", "GENE_B", "GENE_C", "BLANK_0001"])[rng.integers(0, 4, len(k))]
    pq.write_table(pa.table({"transcript_id": np.arange(len(k)), "feature_name": genes,
                             "x_location": k[:, 0].astype(np.float32), "y_location": k[:, 1].astype(np.float32),
                             "z_location": np.zeros(len(k), np.float32), "qv": np.full(len(k), 30.0, np.float32)}),
                   xen / "transcripts.parquet")
    truth = truth_matrices()
    W, H = 2300, 1700
    yy, xx = np.mgrid[0:H, 0:W]
    px = np.column_stack([xx.ravel(), yy.ravel()]).astype(np.float64)
    hval = np.zeros(len(px), np.float32)
    tissue = np.zeros(len(px), np.float32)
    for name, m in truth.items():
        ux, uy = apply_affine(m, px[:, 0], px[:, 1])
        ins = MplPath(POLYS[name]).contains_points(np.column_stack([ux, uy]))
        v = ndimage.map_coordinates(dens, [uy[ins] / PS, ux[ins] / PS], order=1)
        hval[ins] = v
        tissue[ins] = 1.0
    hed = np.zeros((H, W, 3), np.float32)
    hed[..., 0] = (hval * 0.9).reshape(H, W) + rng.normal(0, 0.01, (H, W)).astype(np.float32)
    hed[..., 1] = ndimage.gaussian_filter(tissue.reshape(H, W), 2) * 0.25
    rgb = (np.clip(hed2rgb(hed.clip(0, None)), 0, 1) * 255).astype(np.uint8)
    write_he(root / "he.tif", rgb, HE_MPP, n_levels=4)
    return Scene(root=root, xenium=xen, he=root / "he.tif", truth=truth, nuclei_um=nuclei)


def make_landmarks(scene: Scene, path: Path, *, n: int, sigma_um: float, seed: int,
                   regions=("A", "B"), label: bool = True, outlier: tuple[str, float] | None = None,
                   inset: float = 30.0) -> dict[str, np.ndarray]:
    """Keypoints CSV: fixed = DAPI px with click noise σ, alignment = H&E px (exact)."""
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(seed)
    fixed, moving, labs = [], [], []
    for r in regions:
        poly = POLYS[r]
        lo, hi = poly.min(axis=0) + inset, poly.max(axis=0) - inset
        pts = []
        while len(pts) < n:
            p = rng.uniform(lo, hi)
            if MplPath(poly).contains_point(p):
                pts.append(p)
        pts = np.array(pts)
        inv = np.linalg.inv(scene.truth[r])
        hx, hy = apply_affine(inv, pts[:, 0], pts[:, 1])
        noisy = pts + rng.normal(0, sigma_um, pts.shape)
        if outlier is not None and outlier[0] == r:
            noisy[2] += [outlier[1], -outlier[1] * 0.5]
        fixed.append(noisy / PS)
        moving.append(np.column_stack([hx, hy]))
        labs += [r] * n
    write_keypoints(path, np.vstack(fixed), np.vstack(moving), labs if label else None)
    return {r: None for r in regions}


def write_geojson(path: Path, names=("A", "B")) -> None:
    feats = [{"type": "Feature", "properties": {"name": nm},
              "geometry": {"type": "Polygon", "coordinates": [np.vstack([POLYS[nm], POLYS[nm][:1]]).tolist()]}}
             for nm in names]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def grid_error(m: np.ndarray, truth: np.ndarray, poly: np.ndarray, step: float = 10.0) -> float:
    """RMS distance (µm) between m and truth over a grid of H&E points inside the region."""
    from matplotlib.path import Path as MplPath

    lo, hi = poly.min(axis=0), poly.max(axis=0)
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0], step), np.arange(lo[1], hi[1], step))
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    pts = pts[MplPath(poly).contains_points(pts)]
    hx, hy = apply_affine(np.linalg.inv(truth), pts[:, 0], pts[:, 1])
    ux, uy = apply_affine(m, hx, hy)
    return float(np.sqrt(np.mean((ux - pts[:, 0]) ** 2 + (uy - pts[:, 1]) ** 2)))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("scene"))


def _run(scene: Scene, out: Path, **kw) -> Registration:
    kw.setdefault("sample", "S1")
    kw.setdefault("qv_min", 20.0)
    return register_sample(xenium=scene.xenium, he=scene.he, out_json=out / "registration.json",
                           out_qc=out / "registration_qc.png", **kw)


# ------------------------------------------------------------------------------------------
# affine algebra
# ------------------------------------------------------------------------------------------


def test_fit_affine_exact_and_loo_matches_brute_force():
    rng = np.random.default_rng(1)
    m = _tr(100, -50) @ _rot(17) @ np.diag([0.3, 0.25, 1])
    src = rng.uniform(0, 5000, (9, 2))
    dst = np.column_stack(apply_affine(m, src[:, 0], src[:, 1]))
    np.testing.assert_allclose(fit_affine(src, dst), m, atol=1e-9)
    dst_noisy = dst + rng.normal(0, 2.0, dst.shape)
    loo = loo_residuals(src, dst_noisy)
    for i in range(len(src)):
        keep = np.arange(len(src)) != i
        mi = fit_affine(src[keep], dst_noisy[keep])
        pred = np.array(apply_affine(mi, src[i, 0], src[i, 1]))
        np.testing.assert_allclose(loo[i], pred - dst_noisy[i], atol=1e-6)
    assert np.isnan(loo_residuals(src[:3], dst[:3])).all()


def test_fit_affine_rejects_degenerate():
    src = np.array([[0, 0], [10, 10], [20, 20], [30, 30.0]])
    with pytest.raises(DegenerateFit, match="collinear"):
        fit_affine(src, src)
    with pytest.raises(DegenerateFit, match="at least 3"):
        fit_affine(src[:2], src[:2])
    ok = np.array([[0, 0], [100, 0], [0, 100.0], [100, 100]])
    with pytest.raises(DegenerateFit, match="collinear"):  # all mapped onto a line
        fit_affine(ok, np.column_stack([ok[:, 0], ok[:, 0]]))


@pytest.mark.parametrize("method", ["trim", "ransac"])
def test_robust_fit_flags_outlier(method):
    rng = np.random.default_rng(3)
    m = _tr(10, 20) @ _rot(-3) @ np.diag([0.5, 0.5, 1])
    src = rng.uniform(0, 4000, (14, 2))
    dst = np.column_stack(apply_affine(m, src[:, 0], src[:, 1])) + rng.normal(0, 1.0, (14, 2))
    dst[5] += [60.0, -40.0]
    fit = robust_fit(src, dst, method=method, threshold_um=10.0, seed=0)
    assert np.flatnonzero(~fit.inliers).tolist() == [5]
    clean = fit_affine(np.delete(src, 5, 0), np.delete(dst, 5, 0))
    np.testing.assert_allclose(fit.matrix, clean, atol=1e-9)
    assert fit.rms_um is not None and fit.rms_um < 3.0
    assert np.linalg.norm(fit.residuals[5]) > 50
    plain = robust_fit(src, dst, method="none")
    assert plain.inliers.all() and plain.rms_um > fit.rms_um


def test_robust_trim_keeps_clean_landmarks():
    rng = np.random.default_rng(4)
    src = rng.uniform(0, 4000, (20, 2))
    dst = src * 0.5 + rng.normal(0, 2.0, (20, 2))
    assert robust_fit(src, dst, method="trim", threshold_um=10.0).inliers.all()


# ------------------------------------------------------------------------------------------
# Registration object
# ------------------------------------------------------------------------------------------


def _two_region_reg(assignment="nearest", polygons=True) -> Registration:
    ma = np.diag([0.5, 0.5, 1.0])
    mb = _tr(5, 3) @ _rot(2) @ ma
    ra = RegionTransform(name="A", matrix=ma, inverse=np.linalg.inv(ma), polygon_um=POLYS["A"] if polygons else None,
                         landmarks_um=np.array([[100, 100], [300, 500], [400, 200.0]]))
    rb = RegionTransform(name="B", matrix=mb, inverse=np.linalg.inv(mb), polygon_um=POLYS["B"] if polygons else None,
                         landmarks_um=np.array([[600, 100], [900, 600], [800, 300.0], [5000, 5000]]), outliers=[3])
    return Registration(regions=[ra, rb], sample="S", region_assignment=assignment)


def test_assign_regions_polygons_nearest_drop_and_landmarks():
    x = np.array([100.0, 700.0, 500.0, 2000.0, 10.0])
    y = np.array([100.0, 300.0, 300.0, 300.0, 10.0])
    reg = _two_region_reg("nearest")
    np.testing.assert_array_equal(reg.assign_regions(x, y), [0, 1, 0, 1, 0])  # 500: gap, closer to A's edge (470)
    np.testing.assert_array_equal(_two_region_reg("drop").assign_regions(x, y), [0, 1, -1, -1, -1])
    # no polygons: nearest inlier landmark (the outlier at 5000,5000 of B is ignored)
    lm = _two_region_reg(polygons=False)
    np.testing.assert_array_equal(lm.assign_regions([4900.0, 120.0, 850.0], [4900.0, 90.0, 500.0]), [1, 0, 1])
    assert reg.assign_regions(np.zeros(0), np.zeros(0)).shape == (0,)


def test_mapping_roundtrip_per_point_regions_and_json(tmp_path):
    reg = _two_region_reg()
    rng = np.random.default_rng(0)
    hx, hy = rng.uniform(0, 2000, 50), rng.uniform(0, 1400, 50)
    ridx = rng.integers(-1, 2, 50)
    ux, uy = reg.he_to_um(hx, hy, ridx)
    bx, by = reg.um_to_he(ux, uy, ridx)
    ok = ridx >= 0
    np.testing.assert_allclose(bx[ok], hx[ok], atol=1e-9)
    assert np.isnan(ux[~ok]).all()
    ex = np.array(apply_affine(reg.regions[1].matrix, hx[ridx == 1], hy[ridx == 1]))
    np.testing.assert_allclose(ux[ridx == 1], ex[0])
    sx, sy = reg.he_to_um(10.0, 20.0, 0)
    assert float(sx) == pytest.approx(5.0) and float(sy) == pytest.approx(10.0)
    reg.save(tmp_path / "r.json")
    back = Registration.load(tmp_path / "r.json")
    assert [r.name for r in back.regions] == ["A", "B"] and back.regions[1].outliers == [3]
    np.testing.assert_allclose(back.regions[1].inverse, reg.regions[1].inverse)
    np.testing.assert_array_equal(back.assign_regions([100.0, 700.0], [100.0, 300.0]), [0, 1])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json"):
        Registration.load(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------
# end to end on the synthetic scene (real files, real readers)
# ------------------------------------------------------------------------------------------

SIGMA = 1.5
N_LM = 12


def test_landmarks_two_regions_within_noise_bound(scene, tmp_path):
    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=N_LM, sigma_um=SIGMA, seed=11)
    out = tmp_path / "out"
    reg = _run(scene, out, alignment=kp, refine="never")
    doc = json.loads((out / "registration.json").read_text())
    assert doc["method"] == "landmarks" and doc["xenium_pixel_size"] == PS
    assert doc["he_mpp"] == pytest.approx(HE_MPP)
    assert set(doc["inputs"]) == {"keypoints.csv"} and len(doc["inputs"]["keypoints.csv"]) == 64
    keys = {"name", "matrix", "inverse", "n_landmarks", "rms_um", "max_um", "outliers", "refine_score_before",
            "refine_score_after", "refined", "polygon_um", "geometry_um", "landmarks_um"}
    bound = 4 * SIGMA * math.sqrt(3 / N_LM) + 0.2
    for r in doc["regions"]:
        assert set(r) == keys and r["n_landmarks"] == N_LM and r["outliers"] == [] and r["refined"] is False
        assert 0 < r["rms_um"] < 4 * SIGMA and r["max_um"] >= r["rms_um"]
    for i, name in enumerate(("A", "B")):
        assert reg.regions[i].name == name
        err = grid_error(reg.regions[i].matrix, scene.truth[name], POLYS[name])
        assert err < bound, (name, err, bound)
    # the two regions really differ (per-region affine needed)
    assert grid_error(scene.truth["A"], scene.truth["B"], POLYS["B"]) > 3 * bound
    # transcript bbox ~ the tissue mapped to H&E
    x0, y0, x1, y1 = doc["transcript_bbox_he"]
    assert 0 <= x0 < x1 <= 2300 and 0 <= y0 < y1 <= 1700 and (x1 - x0) > 1500
    assert (out / "registration_qc.png").stat().st_size > 10_000


def test_outlier_flagged_and_excluded_with_geojson_regions(scene, tmp_path):
    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=N_LM, sigma_um=SIGMA, seed=12, label=False, outlier=("B", 45.0))
    geo = tmp_path / "regions.geojson"
    write_geojson(geo)
    out = tmp_path / "out"
    reg = _run(scene, out, alignment=kp, regions=geo, refine="never", robust="trim")
    a, b = reg.regions
    assert a.outliers == [] and b.outliers == [2] and b.n_landmarks == N_LM
    assert grid_error(b.matrix, scene.truth["B"], POLYS["B"]) < 4 * SIGMA * math.sqrt(3 / (N_LM - 1)) + 0.2
    doc = json.loads((out / "registration.json").read_text())
    assert doc["regions"][1]["polygon_um"] is not None and len(doc["regions"][1]["landmarks_um"]) == N_LM
    assert set(doc["inputs"]) == {"keypoints.csv", "regions.geojson"}
    # without robust fitting the outlier drags the fit
    reg2 = _run(scene, tmp_path / "out2", alignment=kp, regions=geo, refine="never", robust="none", max_rms_um=100)
    assert reg2.regions[1].outliers == [] and reg2.regions[1].rms_um > b.rms_um * 2


def test_refinement_recovers_perturbed_matrix(scene, tmp_path):
    # 10x alignment matrix (H&E px -> morphology px), perturbed by 3° and ~35 µm
    name = "A"
    t = scene.truth[name]
    c = POLYS[name].mean(axis=0)
    bad_um = _tr(25.0, -25.0) @ _tr(*c) @ _rot(3.0) @ _tr(*-c) @ t
    mat = tmp_path / "S1_he_imagealignment.csv"
    np.savetxt(mat, np.diag([1 / PS, 1 / PS, 1]) @ bad_um, delimiter=",")
    geo = tmp_path / "regions.geojson"
    write_geojson(geo, names=("A",))
    before = grid_error(bad_um, t, POLYS[name])
    assert before > 25
    reg = _run(scene, tmp_path / "out", alignment=mat, regions=geo, refine="auto")
    r = reg.regions[0]
    assert reg.method == "matrix+refine" and r.refined
    assert r.refine_score_after > r.refine_score_before
    err = grid_error(r.matrix, t, POLYS[name])
    assert err < 2.0, err
    # refine: never keeps the given matrix
    reg0 = _run(scene, tmp_path / "out0", alignment=mat, regions=geo, refine="never")
    np.testing.assert_allclose(reg0.regions[0].matrix, bad_um, atol=1e-9)
    assert reg0.method == "matrix" and reg0.regions[0].refine_score_before is None


def test_image_only_registration(scene, tmp_path):
    geo = tmp_path / "regions.geojson"
    write_geojson(geo, names=("A",))
    reg = _run(scene, tmp_path / "out", regions=geo)
    assert reg.method == "image"
    assert grid_error(reg.regions[0].matrix, scene.truth["A"], POLYS["A"]) < 3.0


def test_loaders_read_pyramid_levels(scene):
    from morphomol.io.he import open_slide
    from morphomol.io.xenium import XeniumBundle

    d = load_dapi(XeniumBundle(scene.xenium), 4.0)
    assert d.level == 3 and d.mpp == pytest.approx(4.0) and d.data.shape == (700 // 4, 1000 // 4)
    d2 = load_dapi(XeniumBundle(scene.xenium), 1.1)  # closest level 1 µm/px
    assert d2.level == 1 and d2.mpp == pytest.approx(1.0)
    s = open_slide(scene.he)
    h = load_he(s, 4.0, [100, 100, 900, 700])
    assert h.level == 3 and h.mpp == pytest.approx(4.0, rel=0.01)  # level 3 is 287 px wide: ds 8.016
    h2 = load_he(s, 8.0)  # best level 3 (4 µm) + 2x block mean
    assert h2.level == 3 and h2.mpp == pytest.approx(8.0, rel=0.01) and h2.data.shape == (212 // 2, 287 // 2)
    # a raster pixel maps to the centre of its level-0 footprint: compare with level-0 reads
    from morphomol.registration import hematoxylin

    ref = hematoxylin(s.read_region((0, 0), 0, (1200, 1000)))
    for k in (5, 40):
        x, y = apply_affine(h.to_frame, k, k)
        lo = round(x - 4)  # 8x8 block of level 0 centred at (x, y)
        assert abs(lo + 3.5 - x) < 0.6
        np.testing.assert_allclose(h.data[k, k], ref[lo:lo + 8, lo:lo + 8].mean(), rtol=0.05, atol=0.002)


# ------------------------------------------------------------------------------------------
# bad input: one clear error, nothing written
# ------------------------------------------------------------------------------------------


def _expect_error(scene, tmp_path, match, **kw):
    out = tmp_path / "bad"
    with pytest.raises(InputError, match=match) as ei:
        _run(scene, out, refine="never", **kw)
    assert not (out / "registration.json").exists()
    return ei.value.message


def test_error_too_few_landmarks_in_region(scene, tmp_path):
    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=8, sigma_um=1.0, seed=1)
    lines = kp.read_text().splitlines()
    kp.write_text("\n".join(lines[:1 + 8 + 2]) + "\n")  # region B keeps 2 landmarks
    msg = _expect_error(scene, tmp_path, "region B", alignment=kp)
    assert "S1" in msg and "2 landmark" in msg and "lines 10, 11" in msg and "keypoints.csv" in msg


def test_error_collinear_landmarks(scene, tmp_path):
    m = scene.truth["A"]
    um = np.array([[100.0, 100], [200, 200], [300, 300], [400, 400]])
    hx, hy = apply_affine(np.linalg.inv(m), um[:, 0], um[:, 1])
    kp = tmp_path / "keypoints.csv"
    write_keypoints(kp, um / PS, np.column_stack([hx, hy]))
    msg = _expect_error(scene, tmp_path, "collinear", alignment=kp)
    assert "region r0" in msg and "lines 2, 3, 4, 5" in msg


def test_error_rms_above_max_names_worst_landmarks(scene, tmp_path):
    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=10, sigma_um=12.0, seed=5, regions=("A",))
    msg = _expect_error(scene, tmp_path, "exceeds max_rms_um 5", alignment=kp, max_rms_um=5.0, robust="none")
    assert "region A" in msg and "worst: landmark" in msg and "(line " in msg


def test_error_landmarks_outside_images(scene, tmp_path):
    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=6, sigma_um=1.0, seed=2, regions=("A",))
    lines = kp.read_text().splitlines()
    parts = lines[3].split(",")
    parts[2] = "99999.0"
    lines[3] = ",".join(parts)
    kp.write_text("\n".join(lines) + "\n")
    msg = _expect_error(scene, tmp_path, "outside", alignment=kp)
    assert "line 4" in msg and "H&E" in msg and "S1" in msg


def test_error_wrong_header_and_singular_matrix(scene, tmp_path):
    kp = tmp_path / "keypoints.csv"
    kp.write_text("x,y,u,v\n1,2,3,4\n5,6,7,8\n9,1,2,3\n")
    msg = _expect_error(scene, tmp_path, "header", alignment=kp)
    assert "fixedX,fixedY,alignmentX,alignmentY" in msg and "sample S1" in msg and "keypoints.csv" in msg
    mat = tmp_path / "m.csv"
    mat.write_text("1,2,0\n2,4,0\n0,0,1\n")
    _expect_error(scene, tmp_path, "singular", alignment=mat)


def test_error_bad_config_values(scene, tmp_path):
    _expect_error(scene, tmp_path, "registration.robust", robust="lmeds")
    _expect_error(scene, tmp_path, "registration.region_assignment", region_assignment="all")


def test_typed_config_sections_replace_the_keyword_settings(scene, tmp_path):
    from morphomol.config import IOConfig, RegistrationConfig

    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=8, sigma_um=1.0, seed=1)
    kw = dict(robust="ransac", outlier_threshold_um=8.0, max_rms_um=12.0, region_assignment="nearest", refine="never",
              refine_mpp=2.0)
    _run(scene, tmp_path / "kw", alignment=kp, batch_size=5000, **kw)
    _run(scene, tmp_path / "cfg", alignment=kp, qv_min=None, cfg=RegistrationConfig(**kw, mpp_tolerance=0.1),
         io=IOConfig(qv_min=20.0, batch_size=5000))
    assert (tmp_path / "kw/registration.json").read_bytes() == (tmp_path / "cfg/registration.json").read_bytes()
    bad = RegistrationConfig(**{**kw, "robust": "lmeds"}, mpp_tolerance=0.1)
    with pytest.raises(InputError, match="registration.robust"):
        _run(scene, tmp_path / "bad", alignment=kp, robust="trim", cfg=bad)


# ------------------------------------------------------------------------------------------
# the real DAPI image through the refinement loader
# ------------------------------------------------------------------------------------------


def _real_dapi_path() -> Path | None:
    for p in (REPO / "tests/data/xenium_mini_sfe/morphology_focus.ome.tif",
              REPO.parent / "shared/data/xenium_mini_sfe/morphology_focus.ome.tif"):
        if p.is_file():
            return p
    return None


def test_real_dapi_through_refinement_loader(tmp_path):
    """Real Xenium DAPI (237×237 uint16) read by load_dapi via XeniumBundle; an H&E made from it
    with a known affine is recovered by refinement from a perturbed start."""
    from skimage.color import hed2rgb

    from morphomol.io.he import open_slide
    from morphomol.io.xenium import XeniumBundle

    src = _real_dapi_path()
    if src is None:
        pytest.skip("real DAPI test image not available")
    xen = tmp_path / "xen"
    xen.mkdir()
    shutil.copy(src, xen / "morphology_focus.ome.tif")
    (xen / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    tx = REPO / "tests/data/xenium_mini_sfe/transcripts.parquet"
    shutil.copy(tx if tx.is_file() else REPO.parent / "shared/data/xenium_mini_sfe/transcripts.parquet",
                xen / "transcripts.parquet")
    b = XeniumBundle(xen)
    d = load_dapi(b, 0.425)  # single level: 2x block mean of level 0
    raw = b.read_morphology(0)
    assert d.level == 0 and d.mpp == pytest.approx(0.425) and d.data.shape == (raw.shape[0] // 2, raw.shape[1] // 2)
    np.testing.assert_allclose(d.data[3, 5], raw[6:8, 10:12].mean(), rtol=1e-5)
    # H&E (0.17 µm/px) rendered from the real DAPI under a known affine
    from scipy import ndimage

    truth = _tr(2.0, -1.5) @ _rot(2.0) @ np.diag([0.17, 0.17, 1.0])
    H, W = 280, 280
    yy, xx = np.mgrid[0:H, 0:W]
    ux, uy = apply_affine(truth, xx.ravel(), yy.ravel())
    v = ndimage.map_coordinates(raw.astype(np.float32), [uy / 0.2125, ux / 0.2125], order=1, cval=0)
    v = v / np.percentile(raw, 99.5)
    hed = np.zeros((H, W, 3), np.float32)
    hed[..., 0] = v.reshape(H, W) * 0.08
    hed[..., 1] = 0.03
    rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    write_he(tmp_path / "he.tif", rgb, 0.17, n_levels=2)
    slide = open_slide(tmp_path / "he.tif")
    ext = [5.0, 5.0, 45.0, 45.0]
    start = _tr(1.5, 1.0) @ _tr(25, 25) @ _rot(1.5) @ _tr(-25, -25) @ truth
    he_r = load_he(slide, 0.425)
    m, before, after = refine_affine(start, d, he_r, bbox_um=ext, refine_mpp=0.425)
    poly = np.array([[5.0, 5], [45, 5], [45, 45], [5, 45]])
    assert after > before
    assert grid_error(m, truth, poly, step=1.0) < 0.3 < grid_error(start, truth, poly, step=1.0)


# ------------------------------------------------------------------------------------------
# against the project's simulator (truth.json per-region affines)
# ------------------------------------------------------------------------------------------

SIM_NOISE = 1.5


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulate = pytest.importorskip("morphomol.synthetic")
    root = tmp_path_factory.mktemp("sim")
    truth = simulate.simulate_sample(root / "S1", sample_id="S1", patient_id="P1",
                                     core_genes=["EPCAM", "PTPRC", "ACTA2", "KRT8"], addon_genes=["CD3E", "MS4A1"],
                                     seed=3, tissue_um=(900, 700), click_noise_um=SIM_NOISE, n_regions=2)
    return root / "S1", truth


def _sim_run(d: Path, out: Path, **kw) -> Registration:
    return register_sample(xenium=d / "xenium", he=d / "he.tif", out_json=out / "registration.json",
                           out_qc=out / "registration_qc.png", sample="S1", **kw)


def _truth_err(reg_region: RegionTransform, t: dict) -> float:
    return grid_error(reg_region.matrix, np.array(t["matrix"]), np.array(t["polygon_um"]))


def test_simulated_landmarks_within_noise_bound_then_refined(sim, tmp_path):
    d, truth = sim
    reg = _sim_run(d, tmp_path / "lm", alignment=d / "keypoints.csv", regions=d / "regions.geojson", refine="never")
    assert [r.name for r in reg.regions] == [t["name"] for t in truth["regions"]]
    for r, t in zip(reg.regions, truth["regions"], strict=True):
        bound = 4 * SIM_NOISE * math.sqrt(3 / r.n_landmarks) + 0.2
        assert _truth_err(r, t) < bound, (r.name, _truth_err(r, t), bound)
        assert r.outliers == [] and r.rms_um < 4 * SIM_NOISE
    ref = _sim_run(d, tmp_path / "ref", alignment=d / "keypoints.csv", regions=d / "regions.geojson", refine="auto")
    assert ref.method == "landmarks+refine"
    for r, t in zip(ref.regions, truth["regions"], strict=True):
        assert r.refined and r.refine_score_after > r.refine_score_before
        assert _truth_err(r, t) < 2.0
    # transcripts of each region land inside the H&E through that region's inverse
    x0, y0, x1, y1 = json.loads((tmp_path / "ref/registration.json").read_text())["transcript_bbox_he"]
    W, H = truth["he_size_px"]
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H


def test_simulated_outlier_flagged(sim, tmp_path):
    d, truth = sim
    lines = (d / "keypoints.csv").read_text().splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.endswith(",r1"))
    p = lines[row].split(",")
    p[0] = f"{float(p[0]) + 200:.4f}"  # 200 morphology px = 42.5 µm off
    lines[row] = ",".join(p)
    kp = tmp_path / "keypoints.csv"
    kp.write_text("\n".join(lines) + "\n")
    reg = _sim_run(d, tmp_path / "o", alignment=kp, regions=d / "regions.geojson", refine="never")
    r1 = reg.regions[1]
    local = [i for i, ln in enumerate(lines[1:], start=1) if ln.endswith(",r1")].index(row)
    assert r1.outliers == [local] and reg.regions[0].outliers == []
    bound = 4 * SIM_NOISE * math.sqrt(3 / (r1.n_landmarks - 1)) + 0.2
    assert _truth_err(r1, truth["regions"][1]) < bound


def test_simulated_refinement_from_perturbed_matrix(sim, tmp_path):
    d, truth = sim
    t0 = truth["regions"][0]
    poly = np.array(t0["polygon_um"])
    geo = tmp_path / "r0.geojson"
    geo.write_text(json.dumps({"type": "Feature", "properties": {"name": "r0"},
                               "geometry": {"type": "Polygon", "coordinates": [poly.tolist()]}}))
    m = np.array(t0["matrix"])
    c = poly.mean(axis=0)
    bad = _tr(-20.0, 30.0) @ _tr(*c) @ _rot(-3.0) @ _tr(*-c) @ m
    mat = tmp_path / "he_imagealignment.csv"
    np.savetxt(mat, np.diag([1 / truth["pixel_size"], 1 / truth["pixel_size"], 1]) @ bad, delimiter=",")
    assert grid_error(bad, m, poly) > 25
    reg = _sim_run(d, tmp_path / "o", alignment=mat, regions=geo, refine="auto")
    assert reg.regions[0].refined and _truth_err(reg.regions[0], t0) < 2.0


def test_he_mpp_contradicting_slide_and_landmarks_is_an_error(scene, tmp_path):
    """Sheet he_mpp half of what the slide metadata and the landmark affine say: one error naming all three
    (issue 14: tiles of twice the physical size after only a warning)."""
    kp = tmp_path / "keypoints.csv"
    make_landmarks(scene, kp, n=N_LM, sigma_um=SIGMA, seed=11)
    msg = _expect_error(scene, tmp_path, "pixel size disagrees", alignment=kp, he_mpp=HE_MPP / 2)
    assert f"sample sheet he_mpp {HE_MPP / 2:.4g}" in msg and f"slide metadata" in msg and "affine" in msg
    assert "mpp_tolerance" in msg
    # within the tolerance: accepted (5% off, tolerance 10%)
    reg = _run(scene, tmp_path / "ok", alignment=kp, he_mpp=HE_MPP * 1.05, refine="never")
    assert reg.he_mpp == pytest.approx(HE_MPP * 1.05)
    # a wider tolerance accepts the 2x disagreement too
    _run(scene, tmp_path / "wide", alignment=kp, he_mpp=HE_MPP / 2, refine="never", mpp_tolerance=1.5)
