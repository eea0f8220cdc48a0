"""Tissue detection, tile grid and the tile rule on a synthetic pyramidal slide."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.config import IOConfig, TilingConfig
from morphomol.errors import InputError
from morphomol.geometry import TileGrid
from morphomol.tiling import detect_tissue, plan_tiles, tile_sample, tile_tissue_fraction, write_pyramidal_tiff

GENES = [f"G{i:02d}" for i in range(12)]


def make_sample(root: Path, name: str = "S1", *, seed: int = 0, n_tx: int = 30000, he_mpp: float = 0.5,
                shape=(1400, 1800), blob=True, regions: int = 1, extra_genes=(), gene_panel=None) -> dict:
    """Synthetic paired sample: pink tissue blob on white (pyramidal JPEG TIFF), transcripts
    (µm) inside the blob, registration.json with H&E px -> µm = px * mpp (+ offset)."""
    rng = np.random.default_rng(seed)
    root = Path(root) / name
    root.mkdir(parents=True, exist_ok=True)
    h, w = shape
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = h / 2, w / 2, h * 0.35, w * 0.38
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    if blob:
        img[inside] = (rng.normal(0, 8, (int(inside.sum()), 3)) + [200, 110, 170]).clip(0, 255).astype(np.uint8)
    he = root / "he.tif"
    write_pyramidal_tiff(he, img, he_mpp, n_levels=3, tile=256)
    # transcripts: uniform in the blob (px) -> µm = px * mpp + 10
    px = rng.uniform(cx - rx, cx + rx, n_tx * 2)
    py = rng.uniform(cy - ry, cy + ry, n_tx * 2)
    ok = ((py - cy) / ry) ** 2 + ((px - cx) / rx) ** 2 < 1
    px, py = px[ok][:n_tx], py[ok][:n_tx]
    genes = GENES + list(extra_genes)
    feat = rng.choice(genes + ["BLANK_0001", "NegControlProbe_X"], len(px), p=None)
    # a spatial gradient for gene G00 (HVG-friendly)
    g0 = rng.random(len(px)) < (px / w) * 0.5
    feat[g0] = "G00"
    x_um = (px * he_mpp + 10).astype(np.float32)
    y_um = (py * he_mpp + 10).astype(np.float32)
    xen = root / "xenium"
    xen.mkdir(exist_ok=True)
    (xen / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    if gene_panel is not None:
        (xen / "gene_panel.json").write_text(json.dumps({"payload": {"targets": [
            {"type": {"data": {"name": g}, "descriptor": "gene"}} for g in gene_panel]}}))
    pd.DataFrame({"transcript_id": np.arange(len(px)), "feature_name": feat, "x_location": x_um, "y_location": y_um,
                  "z_location": np.zeros(len(px), np.float32), "qv": np.full(len(px), 30.0, np.float32)}
                 ).to_parquet(xen / "transcripts.parquet")
    m = np.array([[he_mpp, 0, 10.0], [0, he_mpp, 10.0], [0, 0, 1]])
    regs = []
    for r in range(regions):
        regs.append({"name": f"r{r}", "matrix": m.tolist(), "inverse": np.linalg.inv(m).tolist(),
                     "n_landmarks": 4, "polygon_um": None,
                     "landmarks_um": [[(cx - rx + r * 2 * rx / regions) * he_mpp + 10 + 1, cy * he_mpp + 10]]})
    bbox = [float(px.min()), float(py.min()), float(px.max()) + 1, float(py.max()) + 1]
    regj = {"sample": name, "method": "matrix", "he_mpp": he_mpp, "xenium_pixel_size": 0.2125, "inputs": {},
            "transcript_bbox_he": bbox, "region_assignment": "nearest", "regions": regs}
    (root / "registration.json").write_text(json.dumps(regj))
    return {"he": he, "xenium": xen, "registration": root / "registration.json", "dir": root, "x_um": x_um,
            "y_um": y_um, "feature": feat}


SMALL = dict(cfg=TilingConfig(tile_px=128, stride_px=64, tile_mpp=0.5, out_px=224, min_transcripts=50,
                              min_tissue_fraction=0.5, thumbnail_mpp=4.0, chunk_tiles=8),
             io=IOConfig(qv_min=20.0, batch_size=7000))


def test_grid_geometry_and_cover():
    g = TileGrid.covering((10, 20, 1000, 530), 256, 128)
    assert (g.nx, g.ny, g.k, g.s) == (7, 3, 2, 7)
    assert g.origin_x + (g.nx - 1) * g.stride_px + g.size_px >= 1000
    assert g.origin_x + (g.nx - 2) * g.stride_px + g.size_px < 1000
    assert g.n_patch_x == 6 * 7 + 14 and g.n_cell_x == 8
    with pytest.raises(InputError, match="whole multiple"):
        TileGrid(0, 0, 512, 200, 2, 2)
    with pytest.raises(InputError, match="whole number of tokens"):
        TileGrid(0, 0, 512, 128, 2, 2)  # k = 4 does not divide 14


def test_detect_tissue_and_fraction():
    img = np.full((100, 120, 3), 240, np.uint8)
    img[20:60, 30:90] = (190, 100, 160)
    img[5, 5] = (190, 100, 160)  # speck: removed
    m = detect_tissue(img)
    assert m[25:55, 35:85].all() and not m[70:, :].any() and not m[5, 5]
    g = TileGrid(0, 0, 40, 20, 5, 4)  # scale 1: mask px = level-0 px
    tf = tile_tissue_fraction(m, g, 1.0)
    assert tf.shape == (4, 5)
    assert tf[1, 2] == pytest.approx(m[20:60, 40:80].mean())
    assert tf[3, 0] == pytest.approx(m[60:100, 0:40].mean())
    assert not detect_tissue(np.full((50, 50, 3), 250, np.uint8)).any()


def test_zero_tiles_error_names_threshold_and_max():
    g = TileGrid(0, 0, 10, 5, 2, 2)
    n = np.array([[3, 7], [0, 1]])
    with pytest.raises(InputError, match=r"sample S9: zero tiles.*most transcripts any of them has is 7.*min_transcripts=100"):
        plan_tiles("S9", g, n, np.zeros((2, 2), int), n, np.ones((2, 2)), min_transcripts=100,
                   min_tissue_fraction=0.5, matrices_px_to_um=[np.eye(3)])


def test_tile_sample_end_to_end(tmp_path):
    import zarr
    from PIL import Image

    s = make_sample(tmp_path, "S1")
    out = tmp_path / "out"
    t = tile_sample(he_path=s["he"], registration=s["registration"], xenium_dir=s["xenium"],
                    out_table=out / "tiles.parquet", out_store=out / "tiles.zarr", **SMALL)
    t2 = pd.read_parquet(out / "tiles.parquet")
    for c in ("tile_id", "index", "x_px", "y_px", "size_px", "x_um", "y_um", "region", "n_transcripts", "n_genes",
              "tissue_fraction"):
        assert c in t2.columns
    assert len(t2) > 10 and (t2["n_transcripts"] >= 50).all() and (t2["tissue_fraction"] >= 0.5).all()
    assert t2["tile_id"].iloc[3] == "S1__000003" and (t2["index"] == np.arange(len(t2))).all()
    assert (t2["size_px"] == 128).all()
    # tile centre in µm follows the registration (px * 0.5 + 10)
    np.testing.assert_allclose(t2["x_um"], (t2["x_px"] + 64) * 0.5 + 10)
    # n_transcripts equals a brute-force count of transcripts in each tile's half-open box
    px = (s["x_um"].astype(np.float64) - 10) / 0.5
    py = (s["y_um"].astype(np.float64) - 10) / 0.5
    genes_ok = ~pd.Series(s["feature"]).str.startswith(("BLANK_", "NegControl")).to_numpy()
    for _, r in t2.sample(5, random_state=0).iterrows():
        inb = genes_ok & (px >= r.x_px) & (px < r.x_px + 128) & (py >= r.y_px) & (py < r.y_px + 128)
        assert abs(int(inb.sum()) - r.n_transcripts) <= 2  # float rounding of µm at borders only
    g = zarr.open_group(str(out / "tiles.zarr"), mode="r")
    im = g["images"]
    assert im.shape == (len(t2), 224, 224, 3) and im.chunks == (8, 224, 224, 3) and im.dtype == np.uint8
    assert g.attrs["sample"] == "S1" and g.attrs["tile_px"] == 128 and g.attrs["stride"] == 64
    # image content: the stored tile equals a direct resample of that box (tissue -> pink)
    first = im[0]
    assert first.shape == (224, 224, 3) and first.mean(axis=(0, 1))[1] < 200
    from morphomol.io.he import open_slide

    sl = open_slide(s["he"])
    r = t2.iloc[len(t2) // 2]
    raw = sl.read_region((int(r.x_px), int(r.y_px)), 0, (128, 128))
    ref = np.asarray(Image.fromarray(raw).resize((224, 224), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(im[int(r["index"])].astype(float) - ref).mean() < 12
    assert (out / "tiles_qc.png").exists()


def test_no_tissue_and_too_few_transcripts(tmp_path):
    s = make_sample(tmp_path, "BLANK", blob=False, n_tx=2000)
    with pytest.raises(InputError, match="sample BLANK: no tissue found"):
        tile_sample(he_path=s["he"], registration=s["registration"], xenium_dir=s["xenium"],
                    out_table=tmp_path / "o/tiles.parquet", out_store=tmp_path / "o/tiles.zarr", **SMALL)
    s = make_sample(tmp_path, "FEW", n_tx=300)
    cfg = dict(SMALL, cfg=dataclasses.replace(SMALL["cfg"], min_transcripts=10_000))
    with pytest.raises(InputError, match=r"sample FEW: zero tiles.*min_transcripts=10000"):
        tile_sample(he_path=s["he"], registration=s["registration"], xenium_dir=s["xenium"],
                    out_table=tmp_path / "o/tiles.parquet", out_store=tmp_path / "o/tiles.zarr", **cfg)
    assert not (tmp_path / "o/tiles.parquet").exists() and not (tmp_path / "o/tiles.zarr").exists()
