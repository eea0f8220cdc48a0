"""Exports that load (issue 25): every export writes what it can and names what it skipped and why; tissue
contours only where tissue detection means something; ``qv_min`` applied to exported transcripts; a
two-region H&E exported as one image element per region, each lining up with its own units; the
features h5 read the way TRIDENT (``read_coords``: ``coords`` + its attributes, ``features``) and
HEST-Bench (``read_assets_from_h5`` + ``embeddings`` / ``barcodes``) read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.errors import InputError
from test_io_samples import finished_sample_dir  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def fs(finished_sample_dir):  # noqa: F811
    from morphomol.export.sample import FinishedSample

    root = finished_sample_dir
    s = root / "samples" / "S01"
    return FinishedSample(cohort="c", sample="S01", kind="xenium", units=s / "units.h5ad", he_path=root / "sim" / "S01" / "he.tif",
                          registration=s / "registration.json", xenium_dir=root / "sim" / "S01" / "xenium",
                          image_store=s / "images.zarr")


@pytest.fixture(scope="module")
def anndata_only(tmp_path_factory):
    """A cells-cohort sample that is only an AnnData (pooled scRNA-seq): no H&E, no coordinates."""
    import anndata as ad

    from morphomol.export.sample import FinishedSample

    d = tmp_path_factory.mktemp("sc1")
    a = ad.AnnData(X=np.ones((4, 3), np.float32), obs=pd.DataFrame(index=[f"SC1__{i}" for i in range(4)]),
                   var=pd.DataFrame(index=["A", "B", "C"]))
    a.obsm["spatial"] = np.zeros((4, 2))
    a.uns["morphomol"] = {"sample": "SC1", "source": "h5ad", "spatial": "none (zeros)", "unit": "cell"}
    a.write_h5ad(d / "units.h5ad")
    return FinishedSample(cohort="cc", sample="SC1", kind="cells", units=d / "units.h5ad")


def _all_tissue_he(path: Path, size: int = 600, seed: int = 0, glass_outside: float | None = None) -> Path:
    """An H&E crop inside the tissue: pink stroma everywhere, dark purple nuclei; no glass (or, with
    ``glass_outside``, glass outside a centred disc of that radius)."""
    import tifffile

    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (222, 160, 196)
    img += rng.normal(0, 6, img.shape)
    yy, xx = np.mgrid[:size, :size]
    for cx, cy in rng.uniform(0, size, (220, 2)):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < 16] = (95, 45, 140)
    if glass_outside is not None:
        img[(xx - size / 2) ** 2 + (yy - size / 2) ** 2 > glass_outside ** 2] = (243, 243, 243)
    tifffile.imwrite(path, np.clip(img, 0, 255).astype(np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    return path


# ------------------------------------------------------------------------------ write what it can
def test_export_skips_what_it_cannot_and_says_why(fs, anndata_only, tmp_path):
    from morphomol.export.cohort import EXTENSIONS, REPORT, export_samples, summary
    from morphomol.export.qupath import export_qupath
    from morphomol.export.sample import NotExportable
    from morphomol.export.spatialdata import export_spatialdata

    with pytest.raises(NotExportable, match="SC1 has no H&E image") as e:
        export_qupath(anndata_only, tmp_path / "direct")
    assert isinstance(e.value, InputError) and "µm/px" not in e.value.message  # not the misleading message
    with pytest.raises(NotExportable, match="SC1 has no spatial coordinates"):
        export_spatialdata(anndata_only, tmp_path / "direct.zarr")
    for what in ("qupath", "explorer", "spatialdata"):
        lines: list[str] = []
        out = tmp_path / what
        done = export_samples(what, [anndata_only, fs], lambda f, out=out, what=what: out / f"{f.sample}{EXTENSIONS[what]}",
                              report_dir=out, echo=lines.append, transcripts=False, tissue=False)
        assert [(d.sample, d.status) for d in done] == [("SC1", "skipped"), ("S01", "written")], what
        assert Path(done[1].file).exists() and not (out / f"SC1{EXTENSIONS[what]}").exists()
        assert lines[0].startswith("SC1: skipped: ") and done[0].reason in lines[0]
        rep = pd.read_csv(out / REPORT, sep="\t", keep_default_na=False)
        assert rep["sample"].tolist() == ["SC1", "S01"] and rep["status"].tolist() == ["skipped", "written"]
        assert rep["reason"].iloc[0] == done[0].reason and "1 skipped (SC1)" in summary(what, done)
    # Explorer takes one affine: the two-region sample is written and the left-out region is a note
    ex = export_samples("explorer", [fs], lambda f: tmp_path / "ex" / "S01_he_imagealignment.csv")
    assert ex[0].status == "written" and any("Xenium Explorer takes one affine" in n for n in ex[0].notes)
    feats = export_samples("features", [fs], lambda f: tmp_path / "f" / "S01.h5", encoder="vit_s")
    assert feats[0].status == "skipped" and "has no vit_s features" in feats[0].reason


# ------------------------------------------------------------------------------ tissue contours
def test_tissue_contours_only_where_detection_is_meaningful(fs, tmp_path):
    from morphomol.export.qupath import export_qupath, tissue_contours
    from morphomol.export.sample import FinishedSample
    from morphomol.io.he import open_slide

    with open_slide(fs.he_path) as slide:  # a slide with glass around the tissue: contours
        polys, why = tissue_contours(slide)
    assert why is None and 1 <= len(polys) <= 5
    crop = _all_tissue_he(tmp_path / "crop.tif")
    with open_slide(crop, mpp=0.5) as slide:
        polys, why = tissue_contours(slide)
    assert polys == [] and "no glass background" in why
    # glass around stroma whose saturation Otsu splits from the nuclei: the tissue is what is not glass
    disc = _all_tissue_he(tmp_path / "disc.tif", glass_outside=200)
    with open_slide(disc, mpp=0.5) as slide:
        polys, why = tissue_contours(slide)
    assert why is None and len(polys) == 1
    assert polys[0].area == pytest.approx(np.pi * 200 ** 2, rel=0.05)
    notes: list[str] = []
    inside = FinishedSample(cohort="c", sample="S01", kind="cells", units=fs.units, he_path=crop, he_mpp=0.5,
                            registration=fs.registration)
    out = export_qupath(inside, tmp_path / "q", notes=notes)
    doc = json.loads(out.read_text())
    classes = [(f["properties"].get("classification") or {}).get("name") for f in doc["features"]]
    assert "Tissue" not in classes and classes.count("Region") == 2
    assert len(notes) == 1 and notes[0].startswith("no tissue contours: the H&E has no glass background")


# ------------------------------------------------------------------------------ SpatialData
def test_spatialdata_transcripts_respect_qv_min(fs, tmp_path):
    import spatialdata as sd

    from morphomol.export.spatialdata import export_spatialdata

    tx = pd.read_parquet(fs.xenium_dir / "transcripts.parquet", columns=["qv"])
    n_pass = int((tx["qv"] >= 20).sum())
    assert 0 < n_pass < len(tx)  # the bundle has low-quality transcripts to drop
    s = sd.read_zarr(str(export_spatialdata(fs, tmp_path / "qv.zarr", qv_min=20.0)))
    pts = s.points["transcripts"].compute()
    assert len(pts) == n_pass and float(pts["qv"].min()) >= 20
    assert s.tables["table"].uns["morphomol_export"]["transcripts_qv_min"] == 20.0
    s = sd.read_zarr(str(export_spatialdata(fs, tmp_path / "all.zarr", qv_min=None)))
    assert len(s.points["transcripts"].compute()) == len(tx)


def test_spatialdata_every_region_lines_up(fs, tmp_path):
    import spatialdata as sd
    import xarray as xr
    from spatialdata.transformations import get_transformation

    from morphomol.export.spatialdata import export_spatialdata
    from morphomol.io.he import open_slide
    from morphomol.registration import Registration

    reg = Registration.load(fs.registration)
    assert len(reg.regions) == 2
    s = sd.read_zarr(str(export_spatialdata(fs, tmp_path / "S01.zarr", transcripts=False)))
    assert set(s.images) == {"he_r0", "he_r1"}
    t = s.tables["table"]
    assert t.uns["morphomol_export"]["images"] == {"he_r0": "r0", "he_r1": "r1"}
    obs = t.obs
    centre = np.c_[obs["x_px"] + obs["size_px"] / 2, obs["y_px"] + obs["size_px"] / 2, np.ones(t.n_obs)]
    region = obs["region"].to_numpy(int)
    with open_slide(fs.he_path) as slide:
        for k, r in enumerate(reg.regions):
            el = s.images[f"he_{r.name}"]
            to_um = get_transformation(el, "global").to_affine_matrix(("x", "y"), ("x", "y"))
            to_px = get_transformation(el, "he_px").to_affine_matrix(("x", "y"), ("x", "y"))
            rows = region == k
            assert rows.sum() > 5
            # each region's units through its own image element: H&E px -> element px -> µm = the unit's µm
            el_px = (np.linalg.inv(to_px) @ centre[rows].T).T
            got = (to_um @ el_px.T).T[:, :2]
            np.testing.assert_allclose(got, t.obsm["spatial"][rows], atol=1e-6)
            img = el if isinstance(el, xr.DataArray) else el["scale0"]["image"]  # a small crop is not multiscale
            h, w = img.shape[1:]
            assert (el_px[:, 0] >= 0).all() and (el_px[:, 0] < w).all() and (el_px[:, 1] < h).all()
            # RGBA: the element's pixels are the slide's, opaque, at its units; the other pieces transparent
            assert list(img.coords["c"].values) == ["r", "g", "b", "a"]
            x0, y0 = int(to_px[0, 2]), int(to_px[1, 2])
            for (ex, ey), (hx, hy) in list(zip(el_px[:, :2].astype(int), centre[rows, :2].astype(int)))[:5]:
                px = np.asarray(img[:, ey - 5:ey + 5, ex - 5:ex + 5]).transpose(1, 2, 0)
                np.testing.assert_array_equal(px[:, :, :3], slide.read_region((hx - 5, hy - 5), 0, (10, 10)))
                assert (px[:, :, 3] == 255).all() and (ex + x0, ey + y0) == (hx, hy)
            other = (np.linalg.inv(to_px) @ centre[~rows].T).T[:, :2].astype(int)
            inside = (other[:, 0] >= 0) & (other[:, 0] < w) & (other[:, 1] >= 0) & (other[:, 1] < h)
            alpha = np.asarray(img[3])
            far = [alpha[y, x] for x, y in other[inside]]
            assert np.mean(np.asarray(far) == 0) > 0.5 if far else True  # the other piece, mostly transparent


# ------------------------------------------------------------------------------ features h5
def _read_assets_from_h5(h5_path):
    """HEST-Bench's reader (hest/bench/utils/file_utils.py): every dataset, with its attributes."""
    import h5py

    assets, attrs = {}, {}
    with h5py.File(h5_path, "r") as f:
        for key in f.keys():
            assets[key] = f[key][:]
            if f[key].attrs is not None:
                attrs[key] = dict(f[key].attrs)
    return assets, attrs


def test_features_h5_loads_in_trident_and_hest_bench(fs, tmp_path):
    import anndata as ad
    import h5py
    import zarr

    from morphomol.data.features import write_features
    from morphomol.export.features import export_features_h5
    from morphomol.io.he import open_slide

    n = zarr.open_group(str(fs.image_store), mode="r")["images"].shape[0]
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    store = tmp_path / "features" / "vit_s" / "S01.zarr"
    write_features(store, x, encoder="vit_s", tiles_store=fs.image_store)
    fs.features = {"vit_s": store}
    try:
        out = export_features_h5(fs, "vit_s", tmp_path / "h5")
    finally:
        fs.features = {}
    u = ad.read_h5ad(fs.units)
    # TRIDENT: read_coords (attrs of `coords` + coords) and the features next to them
    with h5py.File(out, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
        feats = f["features"][:]
    for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                "name", "level0_width", "level0_height"):
        assert key in attrs, key
    assert coords.dtype == np.int64 and coords.shape == (n, 2)
    np.testing.assert_array_equal(feats, x)
    size = int(u.obs["size_px"].iloc[0])
    assert int(attrs["patch_size_level0"]) == size
    # TRIDENT's patcher reads patch_size px at target_magnification: level-0 px = patch_size * l0 // target
    assert int(attrs["patch_size"]) * int(attrs["level0_magnification"]) // int(attrs["target_magnification"]) == size
    assert int(attrs["level0_magnification"]) == 20  # 0.5 µm/px in TRIDENT's table
    with open_slide(fs.he_path) as slide:
        assert (int(attrs["level0_width"]), int(attrs["level0_height"])) == tuple(slide.dimensions)
    assert attrs["name"] == "S01"
    # HEST-Bench: read_assets_from_h5, then barcodes / embeddings; two samples concatenate along axis 0
    assets, _ = _read_assets_from_h5(out)
    barcodes = assets["barcodes"].flatten().astype(str).tolist()
    assert barcodes == list(u.obs_names)
    np.testing.assert_array_equal(assets["embeddings"], x)
    merged = {k: np.concatenate([v, v], axis=0) for k, v in assets.items()}
    assert all(len(v) == 2 * n for v in merged.values())
    assert out.stat().st_size < x.nbytes * 1.5 + 200_000  # embeddings is a link, not a second copy


# ------------------------------------------------------------------------------ the export verb
def test_export_verb_writes_what_it_can(tmp_path, monkeypatch, capsys, finished_sample_dir):  # noqa: F811
    import spatialdata as sd

    from morphomol.cli import main
    from test_cli import _workflow_dir

    wd = _workflow_dir(tmp_path / "wd", finished_sample_dir)
    monkeypatch.chdir(wd)
    # no features store: the sample is skipped and named, nothing is written, the command fails
    assert main(["export", "features", "--cohort", "c", "--samples", "S01", "--out", "f"]) == 1
    out = capsys.readouterr().out
    assert "S01: skipped: " in out and "has no vit_s features" in out and "0 of 1 samples written" in out
    rep = pd.read_csv(wd / "f" / "export_report.tsv", sep="\t")
    assert rep[["sample", "status"]].values.tolist() == [["S01", "skipped"]]
    # spatialdata: the cohort's io.qv_min (20) by default, --all-transcripts keeps all
    tx = pd.read_parquet(finished_sample_dir / "sim" / "S01" / "xenium" / "transcripts.parquet", columns=["qv"])
    assert main(["export", "spatialdata", "--cohort", "c", "--samples", "S01", "--out", "sd"]) == 0
    assert len(sd.read_zarr(str(wd / "sd" / "S01.zarr")).points["transcripts"]) == int((tx["qv"] >= 20).sum())
    assert main(["export", "spatialdata", "--cohort", "c", "--samples", "S01", "--out", "sd2", "--all-transcripts"]) == 0
    assert len(sd.read_zarr(str(wd / "sd2" / "S01.zarr")).points["transcripts"]) == len(tx)
    out = capsys.readouterr().out
    assert "export spatialdata: 1 of 1 samples written" in out
