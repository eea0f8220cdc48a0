"""Field-native outputs round-trip through the real libraries (issue 18): per-sample predictions AnnData,
SpatialData (read back with spatialdata), QuPath GeoJSON (geopandas / shapely), the Xenium Explorer
alignment (re-imported by the registration), HEST / TRIDENT h5 features (h5py); a sample that has not
run is one clear error and nothing is written."""

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
    """The finished sample + fabricated per-sample predictions (two settings, fold 1 holds S01 as test)."""
    import anndata as ad

    from morphomol.export.predictions import write_sample_predictions
    from morphomol.export.sample import FinishedSample

    root = finished_sample_dir
    s = root / "samples" / "S01"
    a = ad.read_h5ad(s / "units.h5ad")
    ids = list(a.obs_names)
    other = [f"S02__{i:06d}" for i in range(5)]
    val = [f"S03__{i:06d}" for i in range(3)]
    rng = np.random.default_rng(0)
    rows = []
    for k in range(2):
        for sample, patient, n, part in (("S01", "P1", len(ids), "fit" if k == 0 else "test"),
                                         ("S02", "P2", len(other), "test" if k == 0 else "fit"),
                                         ("S03", "P3", len(val), "val")):
            rows.append({"fold": k, "sample_id": sample, "patient_id": patient, "n_units": n, "partition": part})
    folds = root / "splits" / "folds.parquet"
    folds.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folds)
    genes = ["CD3E", "MS4A1"]
    y = np.log1p(np.asarray(a[:, genes].X.toarray()))
    preds = {}
    for name, noise in (("late_a", 0.1), ("late_b", 1.0)):
        files = []
        for k in range(2):
            test = ids if k == 1 else other
            yy = y if k == 1 else np.zeros((len(other), 2))
            yh = yy + rng.normal(0, noise, yy.shape)
            df = pd.DataFrame({"tile_id": np.repeat(test, 2), "gene": genes * len(test), "y": yy.ravel(),
                               "y_hat": yh.ravel()}).astype({"tile_id": "category", "gene": "category"})
            f = root / "runs" / name / f"fold{k}" / "predictions.parquet"
            f.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(f)
            files.append(f)
        preds[name] = files
    out = root / "fusion" / "samples" / "S01.h5ad"
    write_sample_predictions(sample="S01", units=s / "units.h5ad", folds=folds, predictions=preds, out=out)
    return FinishedSample(cohort="c", sample="S01", kind="xenium", units=s / "units.h5ad", he_path=root / "sim" / "S01" / "he.tif",
                          registration=s / "registration.json", xenium_dir=root / "sim" / "S01" / "xenium",
                          predictions=out, image_store=s / "images.zarr")


def test_sample_predictions_anndata(fs):
    import anndata as ad

    p = ad.read_h5ad(fs.predictions)
    u = ad.read_h5ad(fs.units)
    assert list(p.obs_names) == list(u.obs_names) and list(p.var_names) == ["CD3E", "MS4A1"]
    assert {"measured", "pred_late_a", "pred_late_b"} <= set(p.layers)
    np.testing.assert_allclose(p.layers["measured"], np.log1p(u[:, ["CD3E", "MS4A1"]].X.toarray()), rtol=1e-6)
    np.testing.assert_array_equal(p.X, p.layers["measured"])
    assert (p.obs["fold"] == 1).all() and (p.obs["partition"] == "test").all()
    assert (p.obs["partition_fold0"] == "fit").all() and (p.obs["partition_fold1"] == "test").all()
    assert (p.var["pearson_late_a"] > p.var["pearson_late_b"]).all()  # less noise, higher r
    assert "spatial" in p.uns and p.obsm["spatial"].shape == (p.n_obs, 2)
    assert list(p.uns["predictions"]["settings"]) == ["late_a", "late_b"]


def test_spatialdata_export_reads_back(fs, tmp_path):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    from morphomol.export.spatialdata import export_spatialdata
    from morphomol.registration import Registration

    out = export_spatialdata(fs, tmp_path / "S01.zarr")
    s = sd.read_zarr(str(out))
    # two registration regions: one image element per region, each with its own affine (issue 25)
    assert set(s.images) == {"he_r0", "he_r1"} and set(s.shapes) == {"units"} and set(s.points) == {"transcripts"}
    assert set(s.tables) == {"table", "predictions"}
    reg = Registration.load(fs.registration)
    t = s.tables["table"]
    for r in reg.regions:
        m = get_transformation(s.images[f"he_{r.name}"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
        px = get_transformation(s.images[f"he_{r.name}"], "he_px").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(m, np.asarray(r.matrix) @ px, atol=1e-9)
    assert set(t.uns["morphomol_export"]["region_affines"]) == {"r0", "r1"}
    # the table is the unit table, annotating the shapes one to one
    import anndata as ad

    u = ad.read_h5ad(fs.units)
    np.testing.assert_array_equal(t.X.toarray(), u.X.toarray())
    assert t.uns["spatialdata_attrs"]["region"] == "units" and (t.obs["instance_id"] == np.arange(u.n_obs)).all()
    shapes = s.shapes["units"]
    assert len(shapes) == u.n_obs
    cent = np.c_[shapes.geometry.centroid.x, shapes.geometry.centroid.y]
    np.testing.assert_allclose(cent, u.obsm["spatial"], atol=1e-6)  # squares through their region's affine
    assert shapes.geometry.iloc[0].area == pytest.approx((u.obs["size_px"].iloc[0] * 0.5) ** 2, rel=0.05)
    # transcripts: all of the bundle's, in µm
    n_tx = len(pd.read_parquet(fs.xenium_dir / "transcripts.parquet", columns=["x_location"]))
    pts = s.points["transcripts"].compute()
    assert len(pts) == n_tx and {"x", "y", "feature_name"} <= set(pts.columns)
    p = s.tables["predictions"]
    assert {"measured", "pred_late_a"} <= set(p.layers) and p.n_obs == u.n_obs
    # the image is the H&E: level 0 equals the slide
    from morphomol.io.he import open_slide

    el = s.images["he_r0"]
    import xarray as xr

    img = el if isinstance(el, xr.DataArray) else el["scale0"]["image"]  # a small crop is not multiscale
    px = get_transformation(el, "he_px").to_affine_matrix(("x", "y"), ("x", "y"))
    x0, y0 = int(px[0, 2]), int(px[1, 2])
    r0 = t.obs[t.obs["region"] == 0].iloc[0]  # a tile of region r0: the element's pixels there are the slide's
    x, y = int(r0["x_px"]), int(r0["y_px"])
    with open_slide(fs.he_path) as slide:
        np.testing.assert_array_equal(np.asarray(img[:3, y - y0:y - y0 + 40, x - x0:x - x0 + 60]).transpose(1, 2, 0),
                                      slide.read_region((x, y), 0, (60, 40)))


def test_qupath_geojson(fs, tmp_path):
    import geopandas as gpd
    import shapely

    from morphomol.export.qupath import export_qupath

    out = export_qupath(fs, tmp_path, genes=["EPCAM"])
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    g = gpd.read_file(out)  # a real GeoJSON parser (pyogrio / GDAL)
    assert g.geometry.is_valid.all() and len(g) == len(doc["features"])
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    import anndata as ad

    u = ad.read_h5ad(fs.units)
    assert len(tiles) == u.n_obs
    t0 = tiles[0]
    x, y, w = (float(u.obs[c].iloc[0]) for c in ("x_px", "y_px", "size_px"))
    assert shapely.geometry.shape(t0["geometry"]).bounds == pytest.approx((x, y, x + w, y + w))  # level-0 px
    m = t0["properties"]["measurements"]
    assert m["n_transcripts"] == u.obs["n_transcripts"].iloc[0] and m["counts: EPCAM"] == u[0, "EPCAM"].X.toarray()[0, 0]
    assert {"measured: CD3E", "late_a: CD3E", "late_b: MS4A1"} <= set(m)
    ann = {f["properties"]["name"]: shapely.geometry.shape(f["geometry"]) for f in doc["features"]
           if f["properties"]["objectType"] == "annotation"}
    assert {"region r0", "region r1"} <= set(ann) and any(k.startswith("tissue") for k in ann)
    tissue = shapely.union_all([v for k, v in ann.items() if k.startswith("tissue")])
    centres = shapely.points(u.obs["x_px"] + w / 2, u.obs["y_px"] + w / 2)
    assert shapely.contains(tissue, centres).mean() > 0.9  # tiles lie on the detected tissue


def test_explorer_alignment_reimports_to_the_same_registration(fs, tmp_path):
    from morphomol.export.explorer import export_explorer
    from morphomol.io.landmarks import read_alignment_matrix
    from morphomol.registration import Registration, register_sample

    info = export_explorer(fs, tmp_path)
    f = Path(info["file"])
    assert f.name == "S01_he_imagealignment.csv" and info["left_out"]  # two regions: one written
    m = read_alignment_matrix(f)
    reg = Registration.load(fs.registration)
    main = [r.name for r in reg.regions].index(info["region"])
    np.testing.assert_allclose(np.diag([0.2125, 0.2125, 1]) @ m, reg.regions[main].matrix, atol=1e-9)
    back = register_sample(xenium=fs.xenium_dir, he=fs.he_path, alignment=f, out_json=tmp_path / "r.json",
                           out_qc=tmp_path / "r.png", sample="S01", refine="never")
    assert back.method == "matrix"
    np.testing.assert_allclose(back.regions[0].matrix, reg.regions[main].matrix, atol=1e-9)


def test_features_h5_hest_trident_layout(fs, tmp_path):
    import h5py
    import zarr

    from morphomol.data.features import read_feature_units, write_features
    from morphomol.export.features import export_features_h5

    n = zarr.open_group(str(fs.image_store), mode="r")["images"].shape[0]
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    store = tmp_path / "features" / "vit_s" / "S01.zarr"
    write_features(store, x, encoder="vit_s", tiles_store=fs.image_store)  # ids + centres from the tile table
    geo = read_feature_units(store)
    import anndata as ad

    u = ad.read_h5ad(fs.units)
    assert list(geo.barcodes) == list(u.obs_names)
    np.testing.assert_allclose(geo.coords_um, u.obsm["spatial"])
    old = tmp_path / "features" / "vit_s" / "old.zarr"
    write_features(old, x, encoder="vit_s")  # a store without ids: the unit table fills them in
    assert read_feature_units(old) is None
    for st in (store, old):
        fs.features = {"vit_s": st}
        out = export_features_h5(fs, "vit_s", tmp_path / st.stem)
        with h5py.File(out) as h:
            np.testing.assert_array_equal(h["features"][:], x)
            assert [b[0].decode() for b in h["barcodes"][:]] == list(u.obs_names)
            np.testing.assert_array_equal(h["coords"][:], u.obs[["x_px", "y_px"]].to_numpy().round().astype(np.int64))
            assert h["coords"].attrs["patch_size_level0"] == int(u.obs["size_px"].iloc[0])
            np.testing.assert_allclose(h["coords_um"][:], u.obsm["spatial"])
            assert h.attrs["encoder"] == "vit_s"
    fs.features = {}
    with pytest.raises(InputError, match="has no vit_s features"):
        export_features_h5(fs, "vit_s", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_exports_of_a_sample_that_has_not_run(tmp_path, fs):
    from morphomol.config import load_config
    from morphomol.export.explorer import export_explorer
    from morphomol.export.sample import FinishedSample, finished_sample, workflow_paths

    pc = load_config("config/config.yaml", workdir=Path(__file__).resolve().parents[1])
    paths = workflow_paths(tmp_path / "results")
    with pytest.raises(InputError, match="sample S01 of cohort demo has not run: its unit table is missing") as e:
        finished_sample(pc, "demo", "S01", paths)
    assert "snakemake " in e.value.message and str(tmp_path) in e.value.message
    with pytest.raises(InputError, match="no sample 'S99'"):
        finished_sample(pc, "demo", "S99", paths)
    ghost = FinishedSample(cohort="c", sample="S09", kind="xenium", units=fs.units,
                           registration=tmp_path / "missing" / "registration.json")
    with pytest.raises(InputError, match="has not run: its registration is missing"):
        export_explorer(ghost, tmp_path / "out")
    assert not (tmp_path / "out").exists()
