"""Spots study inputs: the three readers on real Visium files (and layouts derived from them), µm/px
resolution against the spot geometry, patches centred on their spots for every input kind, and one
clear error with nothing written for each kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.studies.spots.geometry import PLATFORMS, measured_pitch_px, resolve_mpp
from morphomol.studies.spots.readers import read_10x_h5, read_hest, read_spaceranger, read_st, read_tissue_positions
from morphomol.studies.spots.units import build_spot_units
from morphomol.synthetic.spots import write_10x_h5

MINI = Path(__file__).parent / "data" / "spots_visium_mini"
CFG = default_sections().spots


def mini_files(tmp: Path | None = None, *, v2: bool = False) -> dict[str, str]:
    """The real mini outs (optionally with a Space Ranger >= 2.0 positions file with a header)."""
    files = {"matrix": str(MINI / "filtered_feature_bc_matrix.h5"),
             "positions": str(MINI / "spatial" / "tissue_positions_list.csv"),
             "scalefactors": str(MINI / "spatial" / "scalefactors_json.json"),
             "he": str(MINI / "spatial" / "tissue_lowres_image.png")}
    if v2:
        assert tmp is not None
        pos = tmp / "tissue_positions.csv"
        pos.write_text("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
                       + (MINI / "spatial" / "tissue_positions_list.csv").read_text())
        files["positions"] = str(pos)
    return files


def outputs(tmp: Path) -> dict[str, Path]:
    return {"out_units": tmp / "units.h5ad", "out_store": tmp / "images.zarr", "out_qc": tmp / "qc.json",
            "out_qc_png": tmp / "qc.png"}


def assert_nothing_written(tmp: Path) -> None:
    left = [p.name for p in tmp.iterdir() if p.name.startswith(".") or p.name in ("units.h5ad", "images.zarr", "qc.json",
                                                                                    "qc.png")]
    assert left == [], left


# ------------------------------------------------------------------------------ real files
def test_real_visium_mini_both_position_versions(tmp_path):
    a = read_spaceranger(**{k: v for k, v in mini_files().items() if k != "he"})
    b = read_spaceranger(**{k: v for k, v in mini_files(tmp_path, v2=True).items() if k != "he"})
    assert len(a) == len(b) == 100 and a.counts.shape == (100, 100)
    assert np.array_equal(a.x_px, b.x_px) and np.array_equal(a.barcodes, b.barcodes)
    assert a.counts.sum() == 932 and a.in_tissue.all()
    pos = read_tissue_positions(mini_files()["positions"])
    row = pos.set_index("barcode").loc[a.barcodes[0]]
    assert a.x_px[0] == row["pxl_col_in_fullres"] and a.y_px[0] == row["pxl_row_in_fullres"]  # x = column
    assert a.spot_diameter_px == pytest.approx(89.42751063343188)


def test_real_visium_mini_units_and_geometry(tmp_path):
    """The lowres image (Space Ranger's scale factor) + spot_diameter_fullres = 65 µm agree with the
    100 µm pitch measured on the array neighbours."""
    qc = build_spot_units(sample="mini", patient="P", fmt="spaceranger", files=mini_files(), he_mpp=None,
                          image_scale="lowres", cfg=CFG, **outputs(tmp_path))
    assert qc["spots"]["units"] == 100 and qc["mpp"]["source"].startswith("scalefactors")
    assert qc["mpp"]["checks"]["pitch"]["relative_difference"] < 0.01 and not qc["warnings"]
    a = ad.read_h5ad(tmp_path / "units.h5ad")
    assert list(a.obs_names[:2]) == ["mini__000000", "mini__000001"] and a.uns["morphomol"]["unit"] == "spot"
    y = a.obs["y_px"].to_numpy()
    assert (np.diff(y) >= -1e-9).all()  # raster order
    assert np.allclose(a.obsm["spatial"], a.obs[["x_px", "y_px"]].to_numpy() * qc["mpp"]["mpp"])
    # a stated µm/px 20% off the geometry contradicts spot_diameter_fullres and the pitch: it stops, naming he_mpp
    with pytest.raises(InputError, match="sheet he_mpp 19.4 µm/px and .*spot_diameter_fullres.* 16.15") as e:
        build_spot_units(sample="mini", patient="P", fmt="spaceranger", files={**mini_files(), "sheet": "s.tsv"},
                         he_mpp=19.4, image_scale="lowres", cfg=CFG, **outputs(tmp_path))
    assert e.value.field == "he_mpp" and e.value.file == "s.tsv"
    # 7% off: used, and warned about
    qc = build_spot_units(sample="mini", patient="P", fmt="spaceranger", files=mini_files(), he_mpp=17.3,
                          image_scale="lowres", cfg=CFG, **outputs(tmp_path))
    assert qc["mpp"]["source"] == "sheet he_mpp" and any("pitch" in w for w in qc["warnings"])


def _mini_as_st(tmp: Path) -> dict[str, str]:
    """The real mini matrix and positions written as a legacy ST sample (spot ids XxY, spot detector table)."""
    d = read_spaceranger(**{k: v for k, v in mini_files().items() if k not in ("he",)})
    ids = [f"{c}x{r}" for r, c in zip(d.array_row, d.array_col)]
    counts = pd.DataFrame(d.counts.toarray().astype(int), index=ids, columns=d.genes)
    counts.to_csv(tmp / "counts.tsv.gz", sep="\t")
    sel = pd.DataFrame({"x": d.array_col, "y": d.array_row, "new_x": d.array_col + 0.01, "new_y": d.array_row - 0.02,
                        "pixel_x": d.x_px * 0.045004502, "pixel_y": d.y_px * 0.045004502, "selected": 1})
    sel.to_csv(tmp / "spots.tsv", sep="\t", index=False)
    return {"counts": str(tmp / "counts.tsv.gz"), "spots": str(tmp / "spots.tsv")}


def _mini_as_hest(tmp: Path, mpp: float | None = 16.15) -> dict[str, str]:
    d = read_spaceranger(**{k: v for k, v in mini_files().items() if k not in ("he",)})
    for sub in ("st", "metadata", "wsis"):
        (tmp / sub).mkdir(exist_ok=True)
    a = ad.AnnData(X=d.counts, obs=pd.DataFrame({"in_tissue": 1, "array_row": d.array_row, "array_col": d.array_col},
                                                 index=d.barcodes.astype(str)))
    a.var_names = d.genes
    a.obsm["spatial"] = np.c_[d.x_px, d.y_px] * 0.045004502  # HEST: px of its (here: the lowres) image
    a.write_h5ad(tmp / "st" / "mini.h5ad")
    meta = {"st_technology": "Visium", "pixel_size_um_estimated": mpp, "spot_diameter": 55.0, "inter_spot_dist": 100.0}
    (tmp / "metadata" / "mini.json").write_text(json.dumps(meta))
    shutil.copy(MINI / "spatial" / "tissue_lowres_image.png", tmp / "wsis" / "mini.png")
    return {"adata": str(tmp / "st" / "mini.h5ad"), "metadata": str(tmp / "metadata" / "mini.json"),
            "he": str(tmp / "wsis" / "mini.png")}


def test_st_and_hest_layouts_of_the_real_spots(tmp_path):
    ref = read_spaceranger(**{k: v for k, v in mini_files().items() if k != "he"})
    s = read_st(**_mini_as_st(tmp_path))
    assert s.platform == "st" and (s.counts != ref.counts).nnz == 0
    assert np.allclose(s.x_px, ref.x_px * 0.045004502)
    h = read_hest(**{k: v for k, v in _mini_as_hest(tmp_path).items() if k != "he"})
    assert h.platform == "visium" and h.hest_mpp == 16.15 and (h.counts != ref.counts).nnz == 0
    qc = build_spot_units(sample="mini", patient="P", fmt="hest", files=_mini_as_hest(tmp_path), he_mpp=None,
                          image_scale=None, cfg=CFG, **outputs(tmp_path))
    assert qc["mpp"]["source"].startswith("HEST") and qc["spots"]["units"] == 100 and not qc["warnings"]
    # genes x spots tables are transposed
    t = pd.read_csv(tmp_path / "counts.tsv.gz", sep="\t", index_col=0).T
    t.to_csv(tmp_path / "counts_t.csv")
    s2 = read_st(tmp_path / "counts_t.csv", tmp_path / "spots.tsv")
    assert (s2.counts != s.counts).nnz == 0


# ------------------------------------------------------------------------------ geometry
def test_pitch_and_mpp_resolution():
    p = PLATFORMS["visium"]
    rows = np.array([0, 0, 1, 1, 2])
    cols = np.array([0, 2, 1, 3, 0])
    x = cols * 50.0 / 0.5
    y = rows * 86.6025 / 0.5
    pitch, n, how = measured_pitch_px(x, y, rows, cols, p)
    assert pitch == pytest.approx(200.0, rel=1e-4) and how == "array neighbours" and n >= 4
    r = resolve_mpp(sheet=None, hest=None, image=None, image_source="", spot_diameter_px=130.0, fullres_spot_um=65,
                    pitch_px=pitch, pitch_how=how, platform=p, tolerance=0.1)
    assert r.mpp == pytest.approx(0.5) and r.source.startswith("scalefactors") and r.checks["pitch"]["ok"]
    r = resolve_mpp(sheet=None, hest=None, image=None, image_source="", spot_diameter_px=None, fullres_spot_um=65,
                    pitch_px=pitch, pitch_how=how, platform=p, tolerance=0.1)
    assert r.mpp == pytest.approx(0.5) and r.source_key == "pitch" and "spot pitch" in r.warnings[0]
    with pytest.raises(InputError, match="no µm per pixel anywhere"):
        resolve_mpp(sheet=None, hest=None, image=None, image_source="", spot_diameter_px=None, fullres_spot_um=65,
                    pitch_px=None, pitch_how="fewer than 2 spots", platform=p, tolerance=0.1)


# ------------------------------------------------------------------------------ centring
def _marker_image(path: Path, w: int, h: int, centres: np.ndarray, radius: float, mpp: float) -> None:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = np.full((h, w), 255.0)
    for cx, cy in centres:
        d = np.hypot(xx - cx, yy - cy)
        img = np.minimum(img, np.clip((d - radius) * 255.0, 0, 255))
    rgb = np.repeat(img.astype(np.uint8)[:, :, None], 3, axis=2)
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64), resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER")


def _write_kind(kind: str, d: Path, centres: np.ndarray, rows: np.ndarray, cols: np.ndarray, mpp: float) -> dict[str, str]:
    n = len(centres)
    ids = [f"SPOT{i:04d}-1" for i in range(n)]
    counts = np.random.default_rng(0).poisson(3, (n, 5))
    genes = [f"G{i}" for i in range(5)]
    if kind == "spaceranger":
        write_10x_h5(d / "m.h5", np.array(ids, dtype=object), genes, counts)
        pd.DataFrame({"barcode": ids, "in_tissue": 1, "array_row": rows, "array_col": cols,
                      "pxl_row_in_fullres": centres[:, 1], "pxl_col_in_fullres": centres[:, 0]}).to_csv(
            d / "tissue_positions.csv", index=False)
        return {"matrix": str(d / "m.h5"), "positions": str(d / "tissue_positions.csv"), "he": str(d / "he.tif")}
    if kind == "st":
        sid = [f"{c}x{r}" for r, c in zip(rows, cols)]
        pd.DataFrame(counts, index=sid, columns=genes).to_csv(d / "counts.tsv", sep="\t")
        pd.DataFrame({"x": cols, "y": rows, "pixel_x": centres[:, 0], "pixel_y": centres[:, 1], "selected": 1}).to_csv(
            d / "spots.tsv", sep="\t", index=False)
        return {"counts": str(d / "counts.tsv"), "spots": str(d / "spots.tsv"), "he": str(d / "he.tif")}
    a = ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=ids))
    a.var_names = genes
    a.obsm["spatial"] = centres
    a.write_h5ad(d / "s.h5ad")
    (d / "m.json").write_text(json.dumps({"st_technology": "Visium", "pixel_size_um_estimated": mpp}))
    return {"adata": str(d / "s.h5ad"), "metadata": str(d / "m.json"), "he": str(d / "he.tif")}


@pytest.mark.parametrize("kind", ["spaceranger", "st", "hest"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ox=st.floats(60, 90), oy=st.floats(60, 90), mpp=st.floats(0.8, 1.6), jitter=st.integers(0, 2**16))
def test_patches_are_centred_on_their_spots(kind, ox, oy, mpp, jitter, tmp_path_factory):
    d = tmp_path_factory.mktemp(kind)
    plat = PLATFORMS["st" if kind == "st" else "visium"]
    pitch_px = plat.pitch_um / mpp
    rng = np.random.default_rng(jitter)
    if kind == "st":
        rows, cols = np.divmod(np.arange(6), 3)
        xy = np.c_[cols, rows] * pitch_px
    else:
        rows = np.array([0, 0, 0, 1, 1, 2, 2])
        cols = np.array([0, 2, 4, 1, 3, 0, 2])
        xy = np.c_[cols * pitch_px / 2, rows * pitch_px * np.sqrt(3) / 2]
    centres = xy + [ox, oy] + rng.uniform(-0.5, 0.5, xy.shape)
    w, h = int(centres[:, 0].max() + 90), int(centres[:, 1].max() + 90)
    _marker_image(d / "he.tif", w, h, centres, radius=6.0, mpp=mpp)
    files = _write_kind(kind, d, centres, rows, cols, mpp)
    cfg = default_sections(spots={"patches": {"size_um": 0.45 * plat.pitch_um, "out_px": 48, "chunk": 4}}).spots
    qc = build_spot_units(sample="s", patient="p", fmt=kind, files=files, he_mpp=None, image_scale=None, cfg=cfg,
                          out_units=d / "u.h5ad", out_store=d / "i.zarr", out_qc=d / "q.json")
    assert qc["spots"]["units"] == len(centres) and qc["mpp"]["mpp"] == pytest.approx(mpp, rel=1e-3)
    import zarr

    imgs = zarr.open_group(str(d / "i.zarr"), mode="r")["images"][:]
    a = ad.read_h5ad(d / "u.h5ad")
    # unit table rows = store rows; positions are the input's (raster order)
    order = np.lexsort((centres[:, 0], centres[:, 1]))
    assert np.allclose(a.obs[["x_px", "y_px"]].to_numpy(), centres[order], atol=1e-9)
    yy, xx = np.mgrid[0:48, 0:48] + 0.5
    for img in imgs:
        dark = 255.0 - img[:, :, 0].astype(np.float64)
        assert dark.sum() > 0
        cx, cy = (dark * xx).sum() / dark.sum(), (dark * yy).sum() / dark.sum()
        assert abs(cx - 24) < 0.25 and abs(cy - 24) < 0.25, (cx, cy)


# ------------------------------------------------------------------------------ bad input
def _sr_copy(tmp: Path) -> dict[str, str]:
    d = tmp / "outs"
    shutil.copytree(MINI, d)
    return {"matrix": str(d / "filtered_feature_bc_matrix.h5"),
            "positions": str(d / "spatial" / "tissue_positions_list.csv"),
            "scalefactors": str(d / "spatial" / "scalefactors_json.json"),
            "he": str(d / "spatial" / "tissue_lowres_image.png")}


def _expect_error(tmp: Path, files: dict[str, str], match: str, file_part: str, **kw) -> None:
    out = tmp / "out"
    out.mkdir()
    with pytest.raises(InputError, match=match) as e:
        build_spot_units(sample="s", patient="p", fmt=kw.pop("fmt", "spaceranger"), files=files,
                         he_mpp=kw.pop("he_mpp", None), image_scale=kw.pop("image_scale", "lowres"),
                         cfg=kw.pop("cfg", CFG), **outputs(out))
    assert file_part in (e.value.file or ""), e.value.message
    assert_nothing_written(out)


def test_missing_h5(tmp_path):
    f = _sr_copy(tmp_path)
    Path(f["matrix"]).unlink()
    _expect_error(tmp_path, f, "matrix not found", "filtered_feature_bc_matrix.h5")


STRICT = default_sections(spots={"missing_spots": "error"}).spots


def test_matrix_barcode_without_position(tmp_path):
    f = _sr_copy(tmp_path)
    p = Path(f["positions"])
    lines = p.read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.split(",")[1] == "1")  # an in-tissue (matrix) spot
    p.write_text("\n".join(lines[:first] + lines[first + 1:]) + "\n")
    _expect_error(tmp_path, f, "1 spot\\(s\\) of the counts have no position", "tissue_positions_list.csv",
                  cfg=STRICT)


def test_in_tissue_position_without_counts(tmp_path):
    f = _sr_copy(tmp_path)
    p = Path(f["positions"])
    p.write_text(p.read_text() + "TTTTTTTTTTTTTTTT-1,1,70,70,9000,9000\n")
    _expect_error(tmp_path, f, "1 selected / in-tissue spot\\(s\\) of the positions are not in the counts",
                  "tissue_positions_list.csv", cfg=STRICT)


def test_duplicate_spot_ids(tmp_path):
    f = _sr_copy(tmp_path)
    p = Path(f["positions"])
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines + [lines[3]]) + "\n")
    _expect_error(tmp_path, f, "duplicate spot id", "tissue_positions_list.csv")
    st_files = _mini_as_st(tmp_path)
    c = pd.read_csv(st_files["counts"], sep="\t", index_col=0)
    pd.concat([c, c.iloc[:1]]).to_csv(st_files["counts"], sep="\t")
    (tmp_path / "out").rmdir()
    _expect_error(tmp_path, {**st_files, "he": f["he"]}, "duplicate spot id", "counts.tsv.gz", fmt="st")


def test_no_scale_factors_and_no_mpp_anywhere(tmp_path):
    """One in-tissue spot (no pitch), no scale factors, no he_mpp, a PNG without resolution."""
    f = _sr_copy(tmp_path)
    del f["scalefactors"]
    pos = read_tissue_positions(f["positions"])
    pos["in_tissue"] = (np.arange(len(pos)) == np.flatnonzero(pos["in_tissue"] == 1)[0]).astype(int)
    for c in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        pos[c] = pos[c] * 0.045004502
    pos.to_csv(f["positions"], header=False, index=False)
    _expect_error(tmp_path, f, "no µm per pixel anywhere", "tissue_lowres_image.png", image_scale=None)


def test_spots_outside_the_image(tmp_path):
    f = _sr_copy(tmp_path)  # full-resolution positions against the lowres image: the wrong pairing
    _expect_error(tmp_path, f, "lie outside the 600x600 px image", "tissue_positions_list.csv", image_scale=None,
                  he_mpp=16.0)


def test_image_scale_needs_scale_factors(tmp_path):
    f = _sr_copy(tmp_path)
    del f["scalefactors"]
    with pytest.raises(InputError, match="tissue_lowres_scalef"):
        build_spot_units(sample="s", patient="p", fmt="spaceranger", files=f, he_mpp=16.0, image_scale="lowres",
                         cfg=CFG, **outputs(tmp_path))


def test_h5_of_another_kind_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_10x_h5(bad)
