"""Whole-slide tiling of the slides study: unit table + image store contract, tissue errors, a real SVS;
the simulated slide cohort (footprints visible in the images); the cohort kind's sheet and checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.config import read_sample_sheet
from morphomol.errors import InputError
from morphomol.studies.slides.config import SlideTilingConfig
from morphomol.studies.slides.tiles import tile_slide, tile_slides
from morphomol.synthetic.slides_render import H_OD, Stain, render_slide, write_slide

SVS = Path(__file__).parent / "data" / "he_images" / "cmu_small_region.svs"
GMT = Path(__file__).parent / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"
CFG = SlideTilingConfig(tile_px=128, tile_mpp=0.5, out_px=64, min_tissue_fraction=0.5, thumbnail_mpp=4.0, chunk_tiles=8)
STAIN = Stain(H_OD, np.array([0.216, 0.801, 0.558]) / np.linalg.norm([0.216, 0.801, 0.558]), 1.0, 1.0)


def _slide(path: Path, *, seed: int = 0, tumour: float = 3000, lymph: float = 2000, size=(640, 480)) -> dict:
    rgb, drawn = render_slide(width_px=size[0], height_px=size[1], mpp=0.5, tumour_per_mm2=tumour, lymph_per_mm2=lymph,
                              stain=STAIN, rng=np.random.default_rng(seed))
    write_slide(path, rgb, 0.5)
    return drawn


def test_tile_slide_writes_the_unit_table_and_image_store(tmp_path):
    _slide(tmp_path / "s.tif")
    table = tile_slide(slide_path=tmp_path / "s.tif", sample="S1", patient="P1", out_units=tmp_path / "u.h5ad",
                       out_store=tmp_path / "images.zarr", out_qc=tmp_path / "qc.png", cfg=CFG)
    import anndata as ad
    import zarr

    a = ad.read_h5ad(tmp_path / "u.h5ad")
    n = len(table)
    assert 4 <= n <= 20  # 640 x 480 px at 0.5 µm/px, 64 µm tiles: 5 x 3.75 grid cells, ~70% tissue
    assert list(a.obs_names) == [f"S1__{i:06d}" for i in range(n)] and a.X.shape == (n, 0)
    assert (a.obs["tissue_fraction"] >= 0.5).all() and set(a.obs["patient_id"]) == {"P1"}
    # centres in µm of the slide frame: (x_px + size / 2) * mpp
    np.testing.assert_allclose(a.obsm["spatial"][:, 0], (table["x_px"] + 64) * 0.5)
    assert a.uns["morphomol"]["unit"] == "tile" and a.uns["morphomol"]["mpp"] == pytest.approx(0.5)
    img = zarr.open_group(str(tmp_path / "images.zarr"), mode="r")["images"]
    assert img.shape == (n, 64, 64, 3) and img.dtype == np.uint8
    assert img[0].mean() < 235  # stained tissue, not glass
    assert (tmp_path / "qc.png").stat().st_size > 0


def test_max_tiles_keeps_a_seeded_row_major_subset(tmp_path):
    _slide(tmp_path / "s.tif")
    full = tile_slide(slide_path=tmp_path / "s.tif", sample="S1", patient="P1", out_units=tmp_path / "a.h5ad",
                      out_store=tmp_path / "a.zarr", cfg=CFG)
    cfg = SlideTilingConfig(**{**CFG.__dict__, "max_tiles": 3})
    sub = tile_slide(slide_path=tmp_path / "s.tif", sample="S1", patient="P1", out_units=tmp_path / "b.h5ad",
                     out_store=tmp_path / "b.zarr", cfg=cfg, seed=1)
    assert len(sub) == 3 < len(full)
    keys = list(zip(sub["grid_j"], sub["grid_i"]))
    assert keys == sorted(keys) and set(keys) <= set(zip(full["grid_j"], full["grid_i"]))


def test_slide_without_tissue_is_an_error_and_writes_nothing(tmp_path):
    from morphomol.tiling import write_pyramidal_tiff

    write_pyramidal_tiff(tmp_path / "blank.tif", np.full((480, 640, 3), 246, np.uint8), 0.5, n_levels=1)
    with pytest.raises(InputError, match="slide B1: no tissue detected") as exc:
        tile_slide(slide_path=tmp_path / "blank.tif", sample="B1", patient="P", out_units=tmp_path / "o" / "u.h5ad",
                   out_store=tmp_path / "o" / "images.zarr", cfg=CFG)
    assert "blank.tif" in str(exc.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_tile_group_and_a_real_svs(tmp_path):
    counts = tile_slides(slides=[SVS], samples=["CMU1"], patients=["P1"], he_mpp=[None],
                         out_units=[tmp_path / "u.h5ad"], out_stores=[tmp_path / "i.zarr"], out_qc=[tmp_path / "q.png"],
                         cfg=SlideTilingConfig(tile_px=256, out_px=32, thumbnail_mpp=8.0))
    assert counts[0] > 10  # the CMU-1 crop is mostly tissue: many 128 µm tiles at its 0.499 µm/px


def test_simulated_footprints_are_visible_in_the_images(tmp_path):
    """Denser nuclei / lymphocytes make darker slides; the tissue mask is the same size."""
    lo = render_slide(width_px=320, height_px=320, mpp=0.5, tumour_per_mm2=1500, lymph_per_mm2=800, stain=STAIN,
                      rng=np.random.default_rng(3))
    hi = render_slide(width_px=320, height_px=320, mpp=0.5, tumour_per_mm2=6000, lymph_per_mm2=4000, stain=STAIN,
                      rng=np.random.default_rng(3))
    assert hi[1]["n_tumour_nuclei"] > 3 * lo[1]["n_tumour_nuclei"] and hi[0].mean() < lo[0].mean() - 5


def test_simulated_cohort_writes_slides_rna_and_truth(tmp_path):
    from morphomol.synthetic.slides import simulate_slides_cohort

    sheet = pd.DataFrame([{"sample_id": f"S{i}", "patient_id": f"P{i // 2}", "cohort": "A" if i < 4 else "B",
                           "slide_path": str(tmp_path / "slides" / f"S{i}.tif")} for i in range(6)])
    truth = simulate_slides_cohort(tmp_path, sheet, {"gmt": str(GMT), "slide_um": [160, 160], "n_background_genes": 50,
                                                     "n_modules": 2, "module_size": 10})
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == [f"S{i}.tif" for i in range(6)]
    rna = pd.read_csv(tmp_path / "rna_counts.tsv", sep="\t", index_col=0)
    assert list(rna.columns) == list(sheet["sample_id"]) and (rna.to_numpy() >= 0).all()
    # the proliferation program raises its genes: G2M genes correlate with the program across slides
    g2m = [g for g in ("CDK1", "CCNB2", "MKI67", "TOP2A") if g in rna.index]
    log_cpm = np.log2(rna / rna.sum() * 1e6 + 1)
    r = np.corrcoef(log_cpm.loc[g2m].mean(), truth.set_index("sample_id").loc[rna.columns, "program_proliferation"])[0, 1]
    assert r > 0.8
    # slides of one patient share the patient component of their programs
    t = truth.set_index("sample_id")
    assert abs(t.at["S0", "program_immune"] - t.at["S1", "program_immune"]) < 2.0
    with pytest.raises(InputError, match="unknown key 'tissue_um'"):
        simulate_slides_cohort(tmp_path / "x", sheet, {"gmt": str(GMT), "tissue_um": [1, 1]})


# ------------------------------------------------------------------------------ the cohort kind
def _sheet(tmp_path: Path, rows: list[str]) -> Path:
    p = tmp_path / "samples.tsv"
    p.write_text("sample_id\tpatient_id\tslide_path\tcohort\trna_id\n" + "\n".join(rows) + "\n")
    return p


def test_slides_sheet_reads_and_rejects_duplicates(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    ok = read_sample_sheet(_sheet(tmp_path, ["S1\tP1\ta.svs\tLUAD\tR1", "S2\tP2\ta.svs\tLUAD\t"]), "slides",
                           workdir=tmp_path)
    assert list(ok.index) == ["S1", "S2"]
    with pytest.raises(InputError, match=r"duplicate sample_id \['S1'\]") as exc:
        read_sample_sheet(_sheet(tmp_path, ["S1\tP1\ta.svs\tLUAD\t", "S1\tP2\ta.svs\tLUAD\t"]), "slides",
                          workdir=tmp_path)
    assert "samples.tsv" in str(exc.value)
    with pytest.raises(InputError, match="file not found: missing.svs"):
        read_sample_sheet(_sheet(tmp_path, ["S1\tP1\tmissing.svs\tLUAD\t"]), "slides", workdir=tmp_path)
