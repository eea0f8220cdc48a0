"""Legacy ST and Visium quirks of the spots readers (issue 23): spots of one file missing from the other
are dropped and counted (or an error naming the spot table), µm/px from the array pitch when nothing
else states it, contradicting µm/px sources stop, ``image_scale`` is checked against the image size,
non-finite / negative counts are refused, and check-config reports every sample's problem at once.

Fixtures: the real Visium mini sample (scanpy test data, tests/data/spots_visium_mini) and legacy-ST
sections built from its real counts on an ST array (200 µm pitch) with a JPEG H&E without metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from morphomol.config import default_sections, load_config
from morphomol.errors import InputError
from morphomol.studies.spots.geometry import PLATFORMS, resolve_mpp
from morphomol.studies.spots.readers import read_10x_h5, read_spaceranger, read_st
from morphomol.studies.spots.units import build_spot_units, preflight_sample

REPO = Path(__file__).resolve().parents[1]
MINI = Path(__file__).parent / "data" / "spots_visium_mini"
CFG = default_sections(spots={"patches": {"out_px": 32, "chunk": 16}}).spots
STRICT = default_sections(spots={"missing_spots": "error", "patches": {"out_px": 32, "chunk": 16}}).spots
ST_MPP = 200.0 / 290.4  # the sweep's legacy-ST section: 200 µm pitch over 290.4 px


def outputs(d: Path) -> dict[str, Path]:
    return {"out_units": d / "units.h5ad", "out_store": d / "images.zarr", "out_qc": d / "qc.json",
            "out_qc_png": d / "qc.png"}


def mini_counts(n: int, n_genes: int = 20) -> tuple[np.ndarray, list[str]]:
    d = read_spaceranger(MINI / "filtered_feature_bc_matrix.h5", MINI / "spatial" / "tissue_positions_list.csv", None)
    return d.counts[:n, :n_genes].toarray().astype(int), d.genes[:n_genes]


def st_section(d: Path, *, rows: int = 8, cols: int = 10, drop_counts: tuple[str, ...] = (),
               extra_counts: tuple[str, ...] = ()) -> dict[str, str]:
    """A legacy ST section: real counts on an ST array (ids ``{x}x{y}``, 1-based), the spot detector table
    with every spot selected, and a JPEG H&E without resolution (no µm/px anywhere but the pitch)."""
    d.mkdir(parents=True, exist_ok=True)
    pitch = 200.0 / ST_MPP
    yy, xx = np.divmod(np.arange(rows * cols), cols)
    ids = [f"{x + 1}x{y + 1}" for y, x in zip(yy, xx)]
    px, py = 150 + xx * pitch, 150 + yy * pitch
    pd.DataFrame({"x": xx + 1, "y": yy + 1, "new_x": xx + 1.01, "new_y": yy + 0.98, "pixel_x": px, "pixel_y": py,
                  "selected": 1}).to_csv(d / "spots.tsv", sep="\t", index=False)
    counts, genes = mini_counts(len(ids) + len(extra_counts))
    keep = [i for i, s in enumerate(ids) if s not in drop_counts]
    table = pd.DataFrame(counts[: len(ids)][keep], index=[ids[i] for i in keep], columns=genes)
    if extra_counts:
        table = pd.concat([table, pd.DataFrame(counts[len(ids):], index=list(extra_counts), columns=genes)])
    table.to_csv(d / "counts.tsv.gz", sep="\t")
    w, h = int(px.max() + 150), int(py.max() + 150)
    Image.new("RGB", (w, h), (236, 200, 222)).save(d / "he.jpg", quality=80)
    return {"counts": str(d / "counts.tsv.gz"), "spots": str(d / "spots.tsv"), "he": str(d / "he.jpg")}


def sr_copy(d: Path) -> dict[str, str]:
    shutil.copytree(MINI, d)
    return {"matrix": str(d / "filtered_feature_bc_matrix.h5"),
            "positions": str(d / "spatial" / "tissue_positions_list.csv"),
            "scalefactors": str(d / "spatial" / "scalefactors_json.json"),
            "he": str(d / "spatial" / "tissue_lowres_image.png")}


def build(d: Path, fmt: str, files: dict[str, str], *, cfg=CFG, he_mpp=None, image_scale=None) -> dict:
    out = d / "out"
    out.mkdir(parents=True, exist_ok=True)
    return build_spot_units(sample="s", patient="p", fmt=fmt, files=files, he_mpp=he_mpp, image_scale=image_scale,
                            cfg=cfg, **outputs(out))


def nothing_written(d: Path) -> bool:
    return not (d / "out").exists() or not any((d / "out").iterdir())


# ------------------------------------------------------------------------------ missing spots
def test_legacy_st_selected_spots_missing_from_the_counts_are_dropped_and_counted(tmp_path):
    files = st_section(tmp_path, drop_counts=("3x1", "7x5"), extra_counts=("40x40",))
    qc = build(tmp_path, "st", files)
    s = qc["spots"]
    assert s["dropped_selected_without_counts"] == 2 and s["dropped_counts_without_position"] == 1
    assert s["units"] == 78 and s["with_counts"] == 78
    dropped = [w for w in qc["warnings"] if "dropped" in w]
    assert len(dropped) == 1 and files["spots"] in dropped[0] and "2 selected" in dropped[0]
    a = ad.read_h5ad(tmp_path / "out" / "units.h5ad")
    assert not {"3x1", "7x5", "40x40"} & set(a.obs["barcode"]) and a.n_obs == 78
    assert json.loads((tmp_path / "out" / "qc.json").read_text())["spots"]["dropped_selected_without_counts"] == 2


def test_missing_spots_error_names_the_spot_table(tmp_path):
    files = st_section(tmp_path, drop_counts=("3x1",))
    with pytest.raises(InputError, match="1 selected / in-tissue spot\\(s\\) of the spot table are not in the counts"
                                         " \\(e.g. 3x1\\)") as e:
        build(tmp_path, "st", files, cfg=STRICT)
    assert e.value.file == files["spots"] and e.value.field == "x, y" and nothing_written(tmp_path)
    files = st_section(tmp_path / "b", extra_counts=("40x40",))
    with pytest.raises(InputError, match="1 spot\\(s\\) of the counts have no position") as e:
        read_st(files["counts"], files["spots"], missing_spots="error")
    assert e.value.file == files["spots"]


def test_counts_of_another_section_are_an_error_even_when_dropping(tmp_path):
    files = st_section(tmp_path)
    c = pd.read_csv(files["counts"], sep="\t", index_col=0)
    c.index = [f"{int(i.split('x')[0]) + 20}x{i.split('x')[1]}" for i in c.index]
    c.to_csv(files["counts"], sep="\t")
    with pytest.raises(InputError, match="the two files do not belong together") as e:
        read_st(files["counts"], files["spots"])
    assert e.value.file == files["spots"]


def test_space_ranger_in_tissue_positions_without_counts_are_dropped(tmp_path):
    files = sr_copy(tmp_path / "outs")
    p = Path(files["positions"])
    p.write_text(p.read_text() + "TTTTTTTTTTTTTTTT-1,1,70,70,9000,9000\n")
    qc = build(tmp_path, "spaceranger", files, image_scale="lowres")
    assert qc["spots"]["dropped_selected_without_counts"] == 1 and qc["spots"]["units"] == 100
    assert any(files["positions"] in w for w in qc["warnings"])


# ------------------------------------------------------------------------------ µm/px
def test_st_without_he_mpp_derives_it_from_the_pitch(tmp_path):
    files = st_section(tmp_path)
    qc = build(tmp_path, "st", files)
    assert qc["mpp_source"] == "pitch" and qc["mpp"]["source"].startswith("spot pitch")
    assert qc["mpp"]["mpp"] == pytest.approx(ST_MPP, rel=1e-6)
    assert any("derived from the 200 µm spot pitch" in w for w in qc["warnings"])
    a = ad.read_h5ad(tmp_path / "out" / "units.h5ad")
    d = np.diff(np.sort(a.obs["x_um"].unique()))
    assert np.allclose(d, 200.0)  # ST spots 200 µm apart in the unit table


def test_spot_diameter_fullres_contradicting_the_pitch_stops(tmp_path):
    """The sweep's case: spot_diameter_fullres 13.0 instead of 130 gave µm/px 5.0 instead of 0.5."""
    p = PLATFORMS["visium"]
    with pytest.raises(InputError,
                       match="spot_diameter_fullres \\(65 µm\\) 5 µm/px and spot pitch .* 0.5 µm/px") as e:
        resolve_mpp(sheet=None, hest=None, image=None, image_source="", spot_diameter_px=13.0, fullres_spot_um=65,
                    pitch_px=200.0, pitch_how="array neighbours", platform=p, tolerance=0.1)
    assert e.value.field == "spot_diameter_fullres"
    # the same on the real sample: the diameter divided by 10 in scalefactors_json.json
    files = sr_copy(tmp_path / "outs")
    sf = json.loads(Path(files["scalefactors"]).read_text())
    sf["spot_diameter_fullres"] /= 10
    Path(files["scalefactors"]).write_text(json.dumps(sf))
    with pytest.raises(InputError, match="contradict each other") as e:
        build(tmp_path, "spaceranger", files, image_scale="lowres")
    assert e.value.field == "spot_diameter_fullres" and e.value.file == files["scalefactors"]
    assert "161.5 µm/px" in e.value.message and "16.1" in e.value.message and nothing_written(tmp_path)


def test_image_metadata_contradicting_the_pitch_stops_unless_he_mpp_states_it(tmp_path):
    files = st_section(tmp_path)
    img = Image.open(files["he"])
    img.save(tmp_path / "he.tif", dpi=(25400 / (2 * ST_MPP),) * 2)  # the metadata says twice the real µm/px
    files["he"] = str(tmp_path / "he.tif")
    with pytest.raises(InputError, match="image metadata .* 1.377 µm/px and spot pitch .* 0.6887 µm/px") as e:
        build(tmp_path, "st", files)
    assert e.value.field == "he_mpp"
    qc = build(tmp_path, "st", files, he_mpp=0.6887)  # the sheet overrides the image metadata: a warning
    assert qc["mpp_source"] == "sheet" and any("overrides the image metadata" in w for w in qc["warnings"])
    with pytest.raises(InputError, match="sheet he_mpp 1.377") as e:  # but not the spot geometry
        build(tmp_path / "c", "st", files, he_mpp=1.377)
    assert e.value.field == "he_mpp"


# ------------------------------------------------------------------------------ image_scale
def small_space_ranger(d: Path, *, hires: float = 0.42) -> dict[str, str]:
    """The real mini positions at 1/10 of their full-resolution pixels, scale factors, a full-resolution
    PNG (no metadata) and the matching hires PNG."""
    files = sr_copy(d)
    pos = pd.read_csv(files["positions"], header=None)
    pos[4] = pos[4] / 10
    pos[5] = pos[5] / 10
    pos.to_csv(files["positions"], header=False, index=False)
    sf = json.loads(Path(files["scalefactors"]).read_text())
    sf.update(spot_diameter_fullres=sf["spot_diameter_fullres"] / 10, tissue_hires_scalef=hires,
              tissue_lowres_scalef=sf["tissue_lowres_scalef"] * 10)
    Path(files["scalefactors"]).write_text(json.dumps(sf))
    w, h = int(pos[5].max() + 60), int(pos[4].max() + 60)
    Image.new("RGB", (w, h), (230, 200, 220)).save(d / "fullres.png")
    Image.new("RGB", (int(w * hires) + 1, int(h * hires) + 1), (230, 200, 220)).save(d / "hires.png")
    return {**files, "he": str(d / "fullres.png")}


def test_hires_scale_with_a_full_resolution_image_stops(tmp_path):
    files = small_space_ranger(tmp_path / "outs")
    with pytest.raises(InputError, match="image_scale hires \\(scale factor 0.42\\) would put the spots at 0.42x") as e:
        build(tmp_path, "spaceranger", files, image_scale="hires")
    assert e.value.field == "image_scale" and nothing_written(tmp_path)
    # the pairing that fits: full-resolution image without image_scale, hires image with hires
    qc = build(tmp_path, "spaceranger", files)
    pos = pd.read_csv(files["positions"], header=None)
    a = ad.read_h5ad(tmp_path / "out" / "units.h5ad")
    assert qc["spots"]["units"] == 100 and np.isclose(a.obs["x_px"].max(), pos[5].max())
    qc = build(tmp_path, "spaceranger", {**files, "he": str(tmp_path / "outs" / "hires.png")}, image_scale="hires")
    a = ad.read_h5ad(tmp_path / "out" / "units.h5ad")
    assert np.isclose(a.obs["x_px"].max(), 0.42 * pos[5].max())


def test_full_resolution_scale_with_a_hires_image_names_image_scale(tmp_path):
    files = small_space_ranger(tmp_path / "outs")
    with pytest.raises(InputError,
                       match="lie outside .*image_scale hires \\(scale factor 0.42\\) puts every spot") as e:
        build(tmp_path, "spaceranger", {**files, "he": str(tmp_path / "outs" / "hires.png")})
    assert e.value.field == "image_scale"


# ------------------------------------------------------------------------------ counts values
@pytest.mark.parametrize("value, match", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-3.0, "negative")])
def test_non_finite_or_negative_space_ranger_counts_are_refused(tmp_path, value, match):
    files = sr_copy(tmp_path / "outs")
    with h5py.File(files["matrix"], "r+") as f:
        data = f["matrix/data"][:].astype(np.float64)
        data[:7] = value
        del f["matrix/data"]
        f["matrix/data"] = data
    with pytest.raises(InputError, match=match) as e:
        read_10x_h5(files["matrix"])
    assert e.value.file == files["matrix"] and e.value.field == "matrix/data"
    with pytest.raises(InputError, match=match):
        build(tmp_path, "spaceranger", files, image_scale="lowres")
    assert nothing_written(tmp_path)


def test_negative_st_counts_are_refused(tmp_path):
    files = st_section(tmp_path)
    c = pd.read_csv(files["counts"], sep="\t", index_col=0)
    c.iloc[4, 2] = -1
    c.to_csv(files["counts"], sep="\t")
    with pytest.raises(InputError, match="negative") as e:
        read_st(files["counts"], files["spots"])
    assert e.value.file == files["counts"]


# ------------------------------------------------------------------------------ every sample in one run
def test_check_config_reports_every_samples_problem_at_once(tmp_path):
    """Three samples, three different problems: one InputError before any job lists each of them."""
    for s in ("s1", "s2", "s3", "s4"):
        shutil.copytree(MINI, tmp_path / s)
    sf = json.loads((tmp_path / "s1" / "spatial" / "scalefactors_json.json").read_text())
    sf["spot_diameter_fullres"] /= 10
    (tmp_path / "s1" / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    pos = tmp_path / "s3" / "spatial" / "tissue_positions_list.csv"
    pos.write_text(pos.read_text() + "TTTTTTTTTTTTTTTT-1,1,70,70,9000,9000\n")
    st_section(tmp_path / "st", drop_counts=("3x1",))
    lowres = "spatial/tissue_lowres_image.png"
    (tmp_path / "samples.tsv").write_text(
        "sample_id\tpatient_id\tformat\tspaceranger_dir\tcounts\tspots\the_path\timage_scale\n"
        f"S1\tP1\tspaceranger\ts1\t\t\ts1/{lowres}\tlowres\n"
        f"S2\tP2\tspaceranger\ts2\t\t\ts2/{lowres}\thires\n"
        f"S3\tP3\tspaceranger\ts3\t\t\ts3/{lowres}\tlowres\n"
        f"S4\tP4\tspaceranger\ts4\t\t\ts4/{lowres}\tlowres\n"
        "S5\tP5\tst\t\tst/counts.tsv.gz\tst/spots.tsv\tst/he.jpg\t\n")
    exp = tmp_path / "config" / "experiments"
    exp.mkdir(parents=True)
    shutil.copy(REPO / "config" / "experiments" / "spots.yaml", exp / "spots.yaml")
    cohort = {"kind": "visium", "samples": "samples.tsv", "splits": {"n_folds": 2},
              "spots": {"encoder": "vit_s", "missing_spots": "error"}}
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"cohorts": {"mini": "cohort.yaml"}}))
    with pytest.raises(InputError, match="4 samples of cohort 'mini' cannot run \\(each is listed") as e:
        load_config(tmp_path / "config.yaml", config_file="config.yaml", workdir=tmp_path)
    msg = e.value.message
    lines = {ln.split(":")[0].strip(): ln for ln in msg.splitlines() if ln.startswith("  sample ")}
    assert set(lines) == {"sample S1", "sample S2", "sample S3", "sample S5"}, msg
    assert "spot_diameter_fullres" in lines["sample S1"] and "contradict" in lines["sample S1"]
    assert "image_scale" in lines["sample S2"] and "lowres" in lines["sample S2"]
    assert "s3/spatial/tissue_positions_list.csv" in lines["sample S3"] and "not in the counts" in lines["sample S3"]
    assert "st/spots.tsv" in lines["sample S5"] and "3x1" in lines["sample S5"]
    assert e.value.file.endswith("samples.tsv")
    # dropping (the default) lets S3 and S5 through, with their counts in the pre-flight summary
    cohort["spots"]["missing_spots"] = "drop"
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    with pytest.raises(InputError, match="2 samples of cohort 'mini' cannot run") as e:
        load_config(tmp_path / "config.yaml", config_file="config.yaml", workdir=tmp_path)
    st = {k: str(tmp_path / "st" / v) for k, v in (("counts", "counts.tsv.gz"), ("spots", "spots.tsv"),
                                                    ("he", "he.jpg"))}
    summary = preflight_sample(fmt="st", files=st, he_mpp=None, image_scale=None, cfg=CFG, sheet=None)
    assert summary["mpp_source"] == "pitch" and summary["dropped"]["selected_without_counts"] == 1


def test_hest_pre_flight_reads_no_counts_and_agrees_with_the_units_stage(tmp_path):
    """HEST: the pre-flight's µm/px (obs / obsm only) is the units stage's; a HEST estimate that the
    pitch contradicts stops both."""
    d = read_spaceranger(MINI / "filtered_feature_bc_matrix.h5", MINI / "spatial" / "tissue_positions_list.csv", None)
    for sub in ("st", "metadata"):
        (tmp_path / sub).mkdir()
    a = ad.AnnData(X=d.counts, obs=pd.DataFrame({"in_tissue": 1, "array_row": d.array_row, "array_col": d.array_col},
                                                 index=d.barcodes.astype(str)))
    a.var_names = d.genes
    a.obsm["spatial"] = np.c_[d.x_px, d.y_px] * 0.045004502
    a.write_h5ad(tmp_path / "st" / "mini.h5ad")
    files = {"adata": str(tmp_path / "st" / "mini.h5ad"), "metadata": str(tmp_path / "metadata" / "mini.json"),
             "he": str(MINI / "spatial" / "tissue_lowres_image.png")}
    for mpp, ok in ((16.15, True), (32.3, False)):
        (tmp_path / "metadata" / "mini.json").write_text(json.dumps({"st_technology": "Visium",
                                                                      "pixel_size_um_estimated": mpp}))
        if ok:
            pre = preflight_sample(fmt="hest", files=files, he_mpp=None, image_scale=None, cfg=CFG, sheet=None)
            qc = build(tmp_path, "hest", files)
            assert pre["mpp"] == qc["mpp"]["mpp"] == 16.15 and pre["mpp_source"] == qc["mpp_source"] == "hest"
            continue
        for call in (lambda: preflight_sample(fmt="hest", files=files, he_mpp=None, image_scale=None, cfg=CFG,
                                              sheet=None), lambda: build(tmp_path / "b", "hest", files)):
            with pytest.raises(InputError, match="HEST metadata pixel_size_um_estimated 32.3 µm/px and spot pitch"):
                call()
