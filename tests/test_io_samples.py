"""Field-native inputs (issue 18): regions with holes / multipolygons and Xenium Explorer selections, a
newer bundle's H&E found automatically, HEST-1k and SpatialData samples through the pre-aligned mode,
and the DAG of a cohort mixing the three formats. Bad input: one clear error, nothing written.

``finished_sample_dir`` (also used by tests/test_export.py and tests/test_cli.py) simulates small paired
samples and runs register -> tile -> tokens on them: real files of a finished sample.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from morphomol.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CORE, ADDON = ["EPCAM", "PTPRC", "ACTA2", "KRT8"], ["CD3E", "MS4A1"]


# ------------------------------------------------------------------------------ fixtures (shared)
def simulate(root: Path, samples=(("S01", "P1"),), *, n_regions: int = 2, seed: int = 3) -> None:
    from morphomol.synthetic import simulate_sample

    for s, p in samples:
        simulate_sample(root / s, sample_id=s, patient_id=p, core_genes=CORE, addon_genes=ADDON, seed=seed,
                        tissue_um=(520, 460), n_regions=n_regions, cell_density=2500)


def finish(sim: Path, out: Path, sample: str, *, with_he: bool = True) -> Path:
    """register -> tile -> tokens of one simulated sample into ``out`` (the pipeline's per-sample files)."""
    from morphomol.config import TilingConfig
    from morphomol.registration import register_sample
    from morphomol.tiling import tile_sample
    from morphomol.tokens import tokens_sample

    d, o = sim / sample, out / sample
    register_sample(xenium=d / "xenium", he=d / "he.tif", alignment=d / "keypoints.csv", regions=d / "regions.geojson",
                    out_json=o / "registration.json", out_qc=o / "registration_qc.png", sample=sample, refine="never")
    cfg = TilingConfig(tile_px=96, stride_px=48, tile_mpp=0.5, out_px=32, min_transcripts=20, min_tissue_fraction=0.5,
                       thumbnail_mpp=4.0, chunk_tiles=16)
    tile_sample(he_path=d / "he.tif", registration=o / "registration.json", xenium_dir=d / "xenium",
                out_table=o / "tiles.parquet", out_store=o / "images.zarr", cfg=cfg, sample=sample, grid=14)
    tokens_sample(tiles=o / "tiles.parquet", tiles_store=o / "images.zarr", registration=o / "registration.json",
                  xenium_dir=d / "xenium", out_tokens=o / "tokens.zarr", out_units=o / "units.h5ad", sample=sample,
                  patient="P1", he_path=d / "he.tif" if with_he else None)
    return o


@pytest.fixture(scope="module")
def finished_sample_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    simulate(root / "sim", (("S01", "P1"),))
    finish(root / "sim", root / "samples", "S01")
    return root


# ------------------------------------------------------------------------------ regions
SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]


def _fc(*features):
    return {"type": "FeatureCollection", "features": list(features)}


def _feat(name, geom):
    return {"type": "Feature", "properties": {"name": name}, "geometry": geom}


def test_regions_keep_holes_and_every_part(tmp_path):
    from morphomol.io.regions import read_regions
    from morphomol.registration import Registration, RegionTransform

    p = tmp_path / "regions.geojson"
    p.write_text(json.dumps(_fc(
        _feat("A", {"type": "Polygon", "coordinates": [SQUARE, HOLE]}),
        _feat("B", {"type": "MultiPolygon", "coordinates": [[[[200, 0], [260, 0], [260, 50], [200, 50], [200, 0]]],
                                                            [[[300, 300], [320, 300], [320, 320], [300, 320], [300, 300]]]]}))))
    regs = read_regions(p)
    assert [r.name for r in regs] == ["A", "B"]
    assert len(regs[0].geometry.interiors) == 1 and regs[0].geometry.area == pytest.approx(100 * 100 - 20 * 20)
    assert len(regs[1].geometry.geoms) == 2  # both parts kept (the largest is polygon_um, for QC / bboxes)
    np.testing.assert_allclose(regs[1].polygon_um.max(axis=0), [260, 50])
    for assignment, in_hole in (("drop", -1), ("nearest", 0)):
        reg = Registration(regions=[RegionTransform(name=r.name, matrix=np.eye(3), inverse=np.eye(3),
                                                    polygon_um=r.polygon_um, geometry_um=r.geometry_mapping())
                                    for r in regs], region_assignment=assignment)
        got = reg.assign_regions(np.array([10.0, 50.0, 310.0, 230.0]), np.array([10.0, 50.0, 310.0, 25.0]))
        # corner of A; in A's hole (no region by containment); the second part of B; B's first part
        assert got.tolist() == [0, in_hole, 1, 1]
        # survives registration.json
        f = tmp_path / f"reg_{assignment}.json"
        reg.save(f)
        assert Registration.load(f).assign_regions(np.array([50.0, 310.0]), np.array([50.0, 310.0])).tolist() == [in_hole, 1]


def test_xenium_explorer_selection_csv(tmp_path):
    from morphomol.io.regions import read_regions

    one = tmp_path / "tumour_coordinates.csv"
    one.write_text("#Selection name: tumour core\n#Area (µm^2): 10000.0\nX,Y\n0,0\n100,0\n100,100\n0,100\n")
    r = read_regions(one)
    assert [x.name for x in r] == ["tumour core"] and r[0].geometry.area == pytest.approx(10000)
    many = tmp_path / "selections.csv"
    many.write_text("#Selections exported\n#\nSelection,X,Y\nA,0,0\nA,10,0\nA,10,10\nB,50,50\nB,70,50\nB,70,80\n")
    got = read_regions(many)
    assert [x.name for x in got] == ["A", "B"] and got[1].geometry.area == pytest.approx(300)
    bad = tmp_path / "bad.csv"
    bad.write_text("#Selection name: x\nX,Y\n0,zero\n")
    with pytest.raises(InputError, match="not numeric") as e:
        read_regions(bad)
    assert "bad.csv" in e.value.message


@pytest.mark.parametrize("geom, match", [
    ({"type": "Point", "coordinates": [1, 2]}, "'Point': regions must be polygons"),
    ({"type": "GeometryCollection", "geometries": []}, "GeometryCollection"),
    ({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "LineString"),
])
def test_geojson_that_is_not_polygons_is_one_error(tmp_path, geom, match):
    from morphomol.io.regions import read_regions

    p = tmp_path / "regions.geojson"
    p.write_text(json.dumps(_fc(_feat("ok", {"type": "Polygon", "coordinates": [SQUARE]}), _feat("bad", geom))))
    with pytest.raises(InputError, match=match) as e:
        read_regions(p)
    assert e.value.field == "geometry.type" and "feature 1 ('bad')" in e.value.message


def test_register_with_holed_regions_writes_their_geometry(tmp_path):
    from morphomol.registration import Registration, register_sample

    simulate(tmp_path, (("S01", "P1"),), n_regions=1)
    d = tmp_path / "S01"
    poly = json.loads((d / "regions.geojson").read_text())["features"][0]["geometry"]["coordinates"][0]
    ring = np.asarray(poly, float)
    c = ring[:-1].mean(axis=0)
    hole = (c + 30 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]])).tolist()
    (d / "holed.geojson").write_text(json.dumps(_fc(_feat("tissue", {"type": "Polygon", "coordinates": [poly, hole]}))))
    reg = register_sample(xenium=d / "xenium", he=d / "he.tif", alignment=d / "keypoints.csv", regions=d / "holed.geojson",
                          out_json=tmp_path / "r.json", out_qc=tmp_path / "r.png", sample="S01", refine="never",
                          region_assignment="drop")
    back = Registration.load(tmp_path / "r.json")
    assert back.regions[0].geometry_um["type"] == "Polygon" and len(back.regions[0].geometry_um["coordinates"]) == 2
    assert back.assign_regions(np.array([c[0]]), np.array([c[1]])).tolist() == [-1]  # in the hole: dropped
    assert reg.method == "landmarks"


# ------------------------------------------------------------------------------ newer bundles
def test_bundle_he_image_and_alignment_found(tmp_path):
    from morphomol.io.discover import find_he_files

    b = tmp_path / "Xenium_V1_Breast_outs"
    b.mkdir()
    (b / "experiment.xenium").write_text("{}")
    assert find_he_files(b).he_path is None
    # 10x download layout: the H&E and its alignment next to the unpacked outs, other samples' too
    for name in ("Xenium_V1_Breast_he_image.ome.tif", "Xenium_V1_Breast_he_imagealignment.csv",
                 "Xenium_V1_Lung_he_image.ome.tif", "Xenium_V1_Lung_he_imagealignment.csv"):
        (tmp_path / name).write_bytes(b"x")
    f = find_he_files(b)
    assert f.he_path.name == "Xenium_V1_Breast_he_image.ome.tif" and f.alignment.name.startswith("Xenium_V1_Breast")
    # inside the bundle wins
    (b / "he_image.ome.tif").write_bytes(b"x")
    assert find_he_files(b).he_path == b / "he_image.ome.tif"
    (b / "other_he_image.ome.tif").write_bytes(b"x")
    with pytest.raises(InputError, match="candidate H&E image"):
        find_he_files(b)


def test_sheet_without_he_path_uses_the_bundles_he_at_config_load(tmp_path):
    from test_config import _load, _write_cohort

    cfg = _write_cohort(tmp_path, ["S1\tP1\tdata/x1\t", "S2\tP2\tdata/x2\tdata/he2.tif"])
    with pytest.raises(InputError, match="he_path is empty and the bundle data/x1 has no") as e:
        _load(cfg, tmp_path)
    assert e.value.field == "he_path" and "row 2 (sample S1)" in e.value.message
    (tmp_path / "data" / "x1" / "x1_he_image.ome.tif").write_bytes(b"")
    (tmp_path / "data" / "x1" / "x1_he_imagealignment.csv").write_text("1,0,0\n0,1,0\n0,0,1\n")
    c = _load(cfg, tmp_path).cohorts["c1"]
    assert c.field("S1", "he_path") == "data/x1/x1_he_image.ome.tif"
    assert c.field("S1", "alignment") == "data/x1/x1_he_imagealignment.csv"
    assert c.field("S2", "alignment") is None  # an explicit he_path: no alignment assumed


# ------------------------------------------------------------------------------ HEST
def _hest(root: Path, sim: Path, sample: str = "S01", *, pixel_size: float | None = 0.5) -> Path:
    """A HEST-1k layout from a simulated sample: he_x / he_y through the simulation's true affines."""
    from morphomol.registration import Registration

    truth = json.loads((sim / sample / "truth.json").read_text())
    reg = Registration.from_dict({"regions": [{"name": r["name"], "matrix": r["matrix"], "polygon_um": r["polygon_um"]}
                                              for r in truth["regions"]]})
    t = pd.read_parquet(sim / sample / "xenium" / "transcripts.parquet")
    r = reg.assign_regions(t["x_location"], t["y_location"])
    hx, hy = reg.um_to_he(t["x_location"].to_numpy(), t["y_location"].to_numpy(), r)
    hest = root / "hest"
    for sub in ("transcripts", "wsis", "metadata"):
        (hest / sub).mkdir(parents=True, exist_ok=True)
    t.assign(he_x=hx, he_y=hy).to_parquet(hest / "transcripts" / f"TENX01_transcripts.parquet")
    shutil.copy(sim / sample / "he.tif", hest / "wsis" / "TENX01.tif")
    meta = {"st_technology": "Xenium", "pixel_size_um_embedded": 0.5}
    if pixel_size is not None:
        meta["pixel_size_um_estimated"] = pixel_size
    (hest / "metadata" / "TENX01.json").write_text(json.dumps(meta))
    return hest


def test_hest_sample_is_prealigned_and_tiles(tmp_path):
    from morphomol.config import TilingConfig
    from morphomol.io.hest import hest_xenium_files, ingest_hest
    from morphomol.io.xenium import XeniumBundle
    from morphomol.registration import register_sample
    from morphomol.tiling import tile_sample

    simulate(tmp_path / "sim")
    hest = _hest(tmp_path, tmp_path / "sim")
    files = hest_xenium_files(hest, "TENX01")
    out = tmp_path / "ingest"
    summary = ingest_hest(transcripts=files["transcripts"], metadata=files["metadata"], he=files["he"], out_dir=out,
                          sample="S01")
    b = XeniumBundle(out / "xenium")
    assert b.pixel_size == 0.5 and summary["transcripts"] == b.n_rows
    reg = register_sample(xenium=out / "xenium", he=files["he"], alignment=out / "he_imagealignment.csv",
                          out_json=tmp_path / "reg.json", out_qc=tmp_path / "reg.png", sample="S01", prealigned=True)
    assert reg.method == "prealigned" and not reg.regions[0].refined
    np.testing.assert_allclose(reg.regions[0].matrix, np.diag([0.5, 0.5, 1.0]), atol=1e-12)  # identity in H&E px
    assert (tmp_path / "reg.png").stat().st_size > 10_000  # the QC: transcript density over the H&E
    cfg = TilingConfig(tile_px=96, stride_px=48, tile_mpp=0.5, out_px=32, min_transcripts=20, min_tissue_fraction=0.5,
                       thumbnail_mpp=4.0, chunk_tiles=16)
    table = tile_sample(he_path=files["he"], registration=tmp_path / "reg.json", xenium_dir=out / "xenium",
                        out_table=tmp_path / "tiles.parquet", out_store=tmp_path / "images.zarr", cfg=cfg, sample="S01")
    # the tiles sit on the tissue: the same tiles as a landmark registration of the original bundle would give
    assert len(table) > 20 and table["n_transcripts"].min() >= 20


def test_hest_without_pixel_size_is_one_error_and_writes_nothing(tmp_path):
    from morphomol.io.hest import hest_xenium_files, ingest_hest

    simulate(tmp_path / "sim")
    hest = _hest(tmp_path, tmp_path / "sim", pixel_size=None)
    files = hest_xenium_files(hest, "TENX01")
    with pytest.raises(InputError, match="HEST sample has no pixel size") as e:
        ingest_hest(transcripts=files["transcripts"], metadata=files["metadata"], he=files["he"],
                    out_dir=tmp_path / "ingest", sample="S01")
    assert e.value.field == "pixel_size_um_estimated" and "pixel_size_um_embedded is 0.5" in e.value.message
    assert not (tmp_path / "ingest").exists() or not any((tmp_path / "ingest").rglob("*.*"))


# ------------------------------------------------------------------------------ SpatialData
def _sdata_xenium_style(tmp: Path, sim: Path, *, points: bool = True, image: bool = True) -> Path:
    """A SpatialData zarr as spatialdata-io writes Xenium: 'global' in morphology px (points: Scale(1/0.2125)),
    the H&E with its alignment matrix (H&E px -> morphology px) of a single-region sample."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel, PointsModel
    from spatialdata.transformations import Affine, Scale

    from morphomol.io.he import open_slide
    from morphomol.io.landmarks import read_alignment_matrix

    t = pd.read_parquet(sim / "S01" / "xenium" / "transcripts.parquet")
    t = t[~t["feature_name"].astype(str).str.startswith(("BLANK", "NegControl", "Unassigned"))]
    elements = {}
    if points:
        df = t.rename(columns={"x_location": "x", "y_location": "y"})[["x", "y", "feature_name", "qv"]]
        df["feature_name"] = df["feature_name"].astype(str).astype("category")
        elements["points"] = {"transcripts": PointsModel.parse(df, feature_key="feature_name",
                                                               transformations={"global": Scale([1 / 0.2125, 1 / 0.2125],
                                                                                                axes=("x", "y"))})}
    if image:
        s = open_slide(sim / "S01" / "he.tif")
        rgb = s.read_region((0, 0), 0, s.dimensions)
        s.close()
        m = read_alignment_matrix(sim / "S01" / "he_imagealignment.csv")
        elements["images"] = {"he_image": Image2DModel.parse(rgb.transpose(2, 0, 1), dims=("c", "y", "x"),
                                                             transformations={"global": Affine(m, input_axes=("x", "y"),
                                                                                               output_axes=("x", "y"))})}
    out = tmp / "sample.zarr"
    sd.SpatialData(**elements).write(str(out))
    return out


def test_spatialdata_sample_is_prealigned(tmp_path):
    from morphomol.io.he import open_slide
    from morphomol.io.landmarks import read_alignment_matrix
    from morphomol.io.sdata import ingest_spatialdata
    from morphomol.io.xenium import XeniumBundle
    from morphomol.registration import register_sample

    simulate(tmp_path / "sim", n_regions=1)
    z = _sdata_xenium_style(tmp_path, tmp_path / "sim")
    out = tmp_path / "ingest"
    info = ingest_spatialdata(sdata=z, out_dir=out, sample="S01")
    assert info["image"] == "he_image" and info["coordinate_system"] == "global"
    m_true = np.diag([0.2125, 0.2125, 1]) @ read_alignment_matrix(tmp_path / "sim" / "S01" / "he_imagealignment.csv")
    np.testing.assert_allclose(info["affine"], m_true, atol=1e-9)  # H&E px -> µm, undoing the px 'global'
    with open_slide(out / "he.ome.tif") as he, open_slide(tmp_path / "sim" / "S01" / "he.tif") as src:
        assert he.dimensions == src.dimensions and he.level_count > 1
        assert he.mpp == pytest.approx(info["mpp"])
        np.testing.assert_array_equal(he.read_region((300, 200), 0, (64, 48)), src.read_region((300, 200), 0, (64, 48)))
    assert XeniumBundle(out / "xenium").n_rows == info["transcripts"]
    reg = register_sample(xenium=out / "xenium", he=out / "he.ome.tif", alignment=out / "he_imagealignment.csv",
                          out_json=tmp_path / "reg.json", out_qc=tmp_path / "reg.png", sample="S01", prealigned=True)
    np.testing.assert_allclose(reg.regions[0].matrix, m_true, atol=1e-9)


@pytest.mark.parametrize("missing, match", [("points", "no points element 'transcripts'"),
                                            ("image", "no image element")])
def test_spatialdata_without_transcripts_or_image_is_one_error(tmp_path, missing, match):
    from morphomol.io.sdata import check_layout, ingest_spatialdata

    simulate(tmp_path / "sim", n_regions=1)
    z = _sdata_xenium_style(tmp_path, tmp_path / "sim", points=missing != "points", image=missing != "image")
    for call in (lambda: check_layout(z), lambda: ingest_spatialdata(sdata=z, out_dir=tmp_path / "ingest", sample="S01")):
        with pytest.raises(InputError, match=match) as e:
            call()
        assert "sample.zarr" in e.value.message
    assert not (tmp_path / "ingest").exists()


def test_dag_of_a_cohort_mixing_xenium_spatialdata_and_hest(tmp_path):
    """`snakemake -n` resolves ingest -> register (prealigned) -> tile -> tokens for each format."""
    simulate(tmp_path / "sim", (("S01", "P1"),), n_regions=1)
    _sdata_xenium_style(tmp_path, tmp_path / "sim")
    hest = _hest(tmp_path, tmp_path / "sim")
    shutil.copytree(REPO / "config" / "experiments", tmp_path / "config" / "experiments")
    (tmp_path / "config" / "cohorts").mkdir(parents=True)
    sheet = ("sample_id\tpatient_id\tformat\txenium_dir\the_path\talignment\tsdata\thest_dir\thest_id\n"
             f"X1\tP1\txenium\tsim/S01/xenium\tsim/S01/he.tif\tsim/S01/keypoints.csv\t\t\t\n"
             f"Z1\tP2\tspatialdata\t\t\t\tsample.zarr\t\t\n"
             f"H1\tP3\thest\t\t\t\t\t{hest.name}\tTENX01\n")
    (tmp_path / "config" / "cohorts" / "mixed.tsv").write_text(sheet)
    (tmp_path / "config" / "cohorts" / "panel.yaml").write_text(yaml.safe_dump({"core": CORE, "addon": ADDON}))
    (tmp_path / "config" / "cohorts" / "mixed.yaml").write_text(yaml.safe_dump(
        {"samples": "config/cohorts/mixed.tsv", "panel": "config/cohorts/panel.yaml", "splits": {"n_folds": 3}}))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"mixed": "config/cohorts/mixed.yaml"}
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, "-m", "snakemake", "results/mixed/samples/Z1/units.h5ad",
                        "results/mixed/samples/H1/units.h5ad", "results/mixed/samples/X1/units.h5ad", "-n",
                        "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                        str(tmp_path / "config" / "config.yaml"), "--quiet", "rules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = dict(line.split()[:2] for line in r.stdout.splitlines() if line.strip() and line.split()[-1].isdigit()
                and len(line.split()) == 2)
    assert jobs.get("xenium_ingest_spatialdata") == "1" and jobs.get("xenium_ingest_hest") == "1"
    assert jobs.get("register") == "3" and jobs.get("tokens") == "3"


def test_changed_file_inside_a_bundle_reruns_its_dependants(tmp_path):
    """The bundle's files are the rules' inputs (not the directory): a rewritten transcripts.parquet
    makes `snakemake -n` plan register again (issue 14, item 3)."""
    import os

    simulate(tmp_path / "sim", (("S01", "P1"), ("S02", "P2")), n_regions=1)
    shutil.copytree(REPO / "config" / "experiments", tmp_path / "config" / "experiments")
    (tmp_path / "config" / "cohorts").mkdir(parents=True)
    (tmp_path / "config" / "cohorts" / "b.tsv").write_text(
        "sample_id\tpatient_id\txenium_dir\the_path\talignment\n"
        "X1\tP1\tsim/S01/xenium\tsim/S01/he.tif\tsim/S01/keypoints.csv\n"
        "X2\tP2\tsim/S02/xenium\tsim/S02/he.tif\tsim/S02/keypoints.csv\n")
    (tmp_path / "config" / "cohorts" / "panel.yaml").write_text(yaml.safe_dump({"core": CORE, "addon": ADDON}))
    (tmp_path / "config" / "cohorts" / "b.yaml").write_text(yaml.safe_dump(
        {"samples": "config/cohorts/b.tsv", "panel": "config/cohorts/panel.yaml", "splits": {"n_folds": 2},
         "registration": {"refine": "never"}}))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"b": "config/cohorts/b.yaml"}
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/b/samples/X1/registration.json"

    def smk(*args):
        r = subprocess.run([sys.executable, "-m", "snakemake", target, *args, "-s", str(REPO / "Snakefile"),
                            "--directory", str(tmp_path), "--configfile", str(tmp_path / "config" / "config.yaml")],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout + r.stderr

    dry = smk("-n", "--forceall")
    block = dry.split("rule register:", 1)[1].split("\n\n", 1)[0].split("output:", 1)[0]
    for name in ("sim/S01/xenium/transcripts.parquet", "sim/S01/xenium/experiment.xenium", "sim/S01/xenium/morphology",
                 "sim/S01/he.tif", "sim/S01/keypoints.csv"):
        assert name in block, (name, block)
    smk("--cores", "1")
    assert "Nothing to be done" in smk("-n")
    tx = tmp_path / "sim" / "S01" / "xenium" / "transcripts.parquet"
    pd.read_parquet(tx).to_parquet(tx)  # rewritten in place, same directory
    later = (tmp_path / target).stat().st_mtime + 5
    os.utime(tx, (later, later))
    again = smk("-n")
    assert "register" in again and "Nothing to be done" not in again, again[-2000:]
