"""The paired-cohort simulator: real formats, determinism, geometry truth and the designed biology."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile

from morphomol.errors import InputError
from morphomol.synthetic import (
    ADDON_KINDS,
    CELL_TYPES,
    PIXEL_SIZE,
    SAMPLE_OUTPUTS,
    simulate_cohort,
    simulate_from_config,
    simulate_sample,
)

openslide = pytest.importorskip("openslide")

CORE = (
    "EPCAM KRT8 KRT18 CDH1 MKI67 CD3E CD8A CD4 PTPRC MS4A1 GZMB COL1A1 COL1A2 DCN ACTA2 "
    "CD68 CD163 LYZ PECAM1 VWF STAT1 IRF1 CXCL9 CXCL10"
).split()
ADDON = "CCNB1 AURKA BIRC5 PSMB9 TAP1 GBP1 PDCD1 LAG3 CD274".split()
CONTROL_PREFIXES = ("BLANK_", "NegControlCodeword_", "NegControlProbe_")
NOISE = 1.5
KW = dict(core_genes=CORE, addon_genes=ADDON, seed=11, tissue_um=(800, 650), he_mpp=0.4, click_noise_um=NOISE)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    truth = simulate_sample(root / "S1", sample_id="S1", patient_id="P1", **KW)
    return root / "S1", truth


@pytest.fixture(scope="module")
def transcripts(sample):
    return pq.read_table(sample[0] / "xenium" / "transcripts.parquet").to_pandas()


@pytest.fixture(scope="module")
def cell_counts(sample, transcripts):
    """Per-cell gene counts (cells of truth_cells.parquet in order) and the per-cell truth."""
    cells = pq.read_table(sample[0] / "truth_cells.parquet").to_pandas().set_index("cell_id")
    t = transcripts[transcripts.cell_id != "UNASSIGNED"]
    counts = pd.crosstab(t.cell_id, t.feature_name).reindex(cells.index).fillna(0)
    return counts, cells


def _apply(m, x, y):
    m = np.asarray(m)
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def test_sample_directory_layout(sample):
    d, truth = sample
    assert sorted(p.name for p in d.iterdir()) == sorted(SAMPLE_OUTPUTS)
    assert sorted(p.name for p in (d / "xenium").iterdir()) == sorted(
        ["transcripts.parquet", "cells.parquet", "experiment.xenium", "gene_panel.json", "morphology_focus.ome.tif"]
    )
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert truth == json.loads((d / "truth.json").read_text())


def test_transcripts_parquet_has_10x_schema(sample, transcripts):
    d, truth = sample
    schema = pq.read_schema(d / "xenium" / "transcripts.parquet")
    types = {f.name: str(f.type) for f in schema}
    assert types == {
        "transcript_id": "uint64",
        "cell_id": "string",
        "overlaps_nucleus": "uint8",
        "feature_name": "string",
        "x_location": "float",
        "y_location": "float",
        "z_location": "float",
        "qv": "float",
        "fov_name": "string",
        "nucleus_distance": "float",
    }
    tx = transcripts
    assert len(tx) == truth["n_transcripts"] > 10_000
    assert tx.transcript_id.is_unique
    w, h = truth["tissue_um"]
    assert tx.x_location.between(0, w).all() and tx.y_location.between(0, h).all()
    genes = set(tx.feature_name)
    assert set(CORE) | set(ADDON) <= genes
    other = genes - set(CORE) - set(ADDON) - {g for g in genes if g.startswith(CONTROL_PREFIXES)}
    assert other == set(truth["other_genes"]) and len(other) >= 2  # genes outside the panel lists
    # nuclear transcripts sit at distance 0, the others away from the nucleus
    assert set(tx.overlaps_nucleus.unique()) == {0, 1}
    assert (tx.nucleus_distance[tx.overlaps_nucleus == 1] == 0).all()
    assert (tx.nucleus_distance[tx.overlaps_nucleus == 0] > 0).mean() > 0.95
    assert 0.15 < (tx.overlaps_nucleus == 1).mean() < 0.6


def test_controls_low_qv_and_unassigned_present(transcripts):
    tx = transcripts
    ctrl = tx.feature_name.str.startswith(CONTROL_PREFIXES)
    assert 0.01 < ctrl.mean() < 0.06
    for prefix in CONTROL_PREFIXES:
        assert tx.feature_name.str.startswith(prefix).sum() > 10, prefix
    low = tx.qv < 20
    assert 0.02 < low.mean() < 0.15
    assert low[ctrl].mean() > low[~ctrl].mean()  # controls are more often low quality
    assert tx.qv.between(0, 40).all()
    assert 0.01 < (tx.cell_id == "UNASSIGNED").mean() < 0.15
    assert tx.cell_id[tx.cell_id != "UNASSIGNED"].str.fullmatch(r"[a-p]{8}-1").all()


def test_xenium_metadata_files(sample, transcripts):
    d, truth = sample
    exp = json.loads((d / "xenium" / "experiment.xenium").read_text())
    assert exp["pixel_size"] == PIXEL_SIZE
    for key in ("run_name", "region_name", "panel_name", "num_cells", "transcripts_per_cell", "analysis_sw_version"):
        assert key in exp
    assert exp["num_cells"] == truth["n_cells"]
    panel = json.loads((d / "xenium" / "gene_panel.json").read_text())
    targets = panel["payload"]["targets"]
    names = [t["type"]["data"]["name"] for t in targets]
    assert set(names) == set(transcripts.feature_name.unique()) | set(names)  # every feature is a panel target
    genes = [t["type"]["data"]["name"] for t in targets if t["type"]["descriptor"] == "gene"]
    assert set(genes) == set(CORE) | set(ADDON) | set(truth["other_genes"])
    cells = pq.read_table(d / "xenium" / "cells.parquet").to_pandas()
    for col in ("cell_id", "x_centroid", "y_centroid", "transcript_counts", "nucleus_area", "cell_area", "total_counts"):
        assert col in cells.columns
    assert len(cells) == truth["n_cells"] and cells.cell_id.is_unique
    assert (cells.cell_area > cells.nucleus_area).all()
    # transcript_counts = non-control, qv >= 20, assigned transcripts of the cell
    t = transcripts[(transcripts.qv >= 20) & ~transcripts.feature_name.str.startswith(CONTROL_PREFIXES)]
    per_cell = t[t.cell_id != "UNASSIGNED"].groupby("cell_id").size()
    got = cells.set_index("cell_id").transcript_counts
    assert (got.reindex(per_cell.index) == per_cell).all()


def test_he_tif_opens_in_openslide_with_pyramid_and_mpp(sample):
    d, truth = sample
    s = openslide.OpenSlide(str(d / "he.tif"))
    try:
        assert s.level_count > 1
        assert s.dimensions == tuple(truth["he_size_px"])
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(KW["he_mpp"], rel=1e-3)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(KW["he_mpp"], rel=1e-3)
        assert s.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        region = np.asarray(s.read_region((0, 0), 0, (64, 64)).convert("RGB"))
        assert region.mean() > 225  # white glass in the margin
        thumb = np.asarray(s.get_thumbnail((256, 256)).convert("RGB")).astype(float)
    finally:
        s.close()
    tissue = thumb.mean(axis=2) < 215
    assert 0.3 < tissue.mean() < 0.9
    r, g, b = (thumb[..., k][tissue].mean() for k in range(3))
    assert r > g and b > g  # eosin / hematoxylin hues, not grey


def test_dapi_ome_tiff_pyramid(sample):
    d, truth = sample
    with tifffile.TiffFile(d / "xenium" / "morphology_focus.ome.tif") as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert len(series.levels) > 1
        assert series.dtype == np.uint16
        w, h = truth["tissue_um"]
        assert series.levels[0].shape == (math.ceil(h / PIXEL_SIZE), math.ceil(w / PIXEL_SIZE))
        assert series.levels[1].shape == tuple(s // 2 for s in series.levels[0].shape)
        assert 'PhysicalSizeX="0.2125"' in tif.ome_metadata
        page = tif.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        level1 = series.levels[1].asarray()
    # nuclei are bright at the cell centroids (level 1: 2 x 0.2125 µm / px)
    cells = pq.read_table(d / "truth_cells.parquet").to_pandas()
    ix = np.clip((cells.x_um / (2 * PIXEL_SIZE)).astype(int), 0, level1.shape[1] - 1)
    iy = np.clip((cells.y_um / (2 * PIXEL_SIZE)).astype(int), 0, level1.shape[0] - 1)
    at_cells = level1[iy, ix].astype(float)
    assert np.median(at_cells) > 5 * np.median(level1)


def test_same_seed_same_bytes_other_seed_differs(sample, tmp_path):
    d, truth = sample
    again = simulate_sample(tmp_path / "S1", sample_id="S1", patient_id="P1", **KW)
    assert again == truth
    for f in ("xenium/transcripts.parquet", "xenium/cells.parquet", "xenium/morphology_focus.ome.tif",
              "xenium/experiment.xenium", "he.tif", "keypoints.csv", "truth_cells.parquet"):
        assert (tmp_path / "S1" / f).read_bytes() == (d / f).read_bytes(), f
    other = simulate_sample(tmp_path / "S1b", sample_id="S1", patient_id="P1", **{**KW, "seed": 12})
    assert other["regions"][0]["matrix"] != truth["regions"][0]["matrix"]
    a = pq.read_table(d / "xenium/transcripts.parquet", columns=["x_location"]).column(0).to_numpy()
    b = pq.read_table(tmp_path / "S1b/xenium/transcripts.parquet", columns=["x_location"]).column(0).to_numpy()
    assert len(a) != len(b) or not np.array_equal(a, b)


def test_keypoints_map_through_truth_within_click_noise(sample):
    d, truth = sample
    kp = pd.read_csv(d / "keypoints.csv")
    assert list(kp.columns) == ["fixedX", "fixedY", "alignmentX", "alignmentY", "region"]
    names = [r["name"] for r in truth["regions"]]
    assert sorted(kp.region.unique()) == sorted(names)
    resid = []
    for r in truth["regions"]:
        k = kp[kp.region == r["name"]]
        assert 8 <= len(k) <= 12
        x, y = _apply(r["matrix"], k.alignmentX.to_numpy(), k.alignmentY.to_numpy())
        dx = x - k.fixedX.to_numpy() * PIXEL_SIZE
        dy = y - k.fixedY.to_numpy() * PIXEL_SIZE
        resid += list(dx) + list(dy)
        # landmarks are spread over the region, not clustered
        assert np.ptp(k.fixedX * PIXEL_SIZE) > 100 and np.ptp(k.fixedY * PIXEL_SIZE) > 100
    resid = np.array(resid)
    assert truth["click_noise_um"] == NOISE
    assert 0.4 * NOISE < resid.std() < 1.8 * NOISE  # per-axis mismatch sd is the click noise
    assert np.abs(resid).max() < 5 * NOISE


def test_regions_have_different_affines_and_files_agree(sample):
    d, truth = sample
    regions = truth["regions"]
    assert len(regions) == 2
    geo = json.loads((d / "regions.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    assert [f["properties"]["name"] for f in geo["features"]] == [r["name"] for r in regions]
    for f, r in zip(geo["features"], regions, strict=True):
        assert f["geometry"]["coordinates"][0] == r["polygon_um"]
        np.testing.assert_allclose(np.array(r["matrix"]) @ np.array(r["inverse"]), np.eye(3), atol=1e-9)
    # the two affines disagree by several µm over the tissue (well above the click noise)
    w, h = truth["tissue_um"]
    gx, gy = np.meshgrid(np.linspace(0, w, 9), np.linspace(0, h, 9))
    inv0 = np.array(regions[0]["inverse"])
    px, py = _apply(inv0, gx.ravel(), gy.ravel())
    x1, y1 = _apply(regions[1]["matrix"], px, py)
    assert np.hypot(x1 - gx.ravel(), y1 - gy.ravel()).max() > 3 * NOISE
    # both map the H&E to the right scale: he_mpp µm per pixel (within a few %)
    for r in regions:
        lin = np.array(r["matrix"])[:2, :2]
        assert math.sqrt(abs(np.linalg.det(lin))) == pytest.approx(KW["he_mpp"], rel=0.05)
    # 10x alignment matrix = region r0's affine in morphology pixels
    m = np.loadtxt(d / "he_imagealignment.csv", delimiter=",")
    np.testing.assert_allclose(m, np.diag([1 / PIXEL_SIZE, 1 / PIXEL_SIZE, 1]) @ np.array(regions[0]["matrix"]), rtol=1e-8)


def test_he_and_dapi_show_the_same_nuclei_through_the_truth(sample):
    """DAPI brightness and H&E darkness correlate through each region's true affine (not the other's)."""
    d, truth = sample
    with tifffile.TiffFile(d / "xenium" / "morphology_focus.ome.tif") as tif:
        dapi = tif.series[0].levels[1].asarray().astype(float)
    s = openslide.OpenSlide(str(d / "he.tif"))
    try:
        he = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(float)
    finally:
        s.close()
    dark = 255.0 - he.mean(axis=2)
    cells = pq.read_table(d / "truth_cells.parquet").to_pandas()
    ps = 2 * PIXEL_SIZE
    for i, r in enumerate(truth["regions"]):
        c = cells[cells.region == i]
        # a 30-µm grid around the region's cells, in Xenium µm
        x0, x1, y0, y1 = c.x_um.quantile(0.2), c.x_um.quantile(0.8), c.y_um.quantile(0.2), c.y_um.quantile(0.8)
        yy, xx = np.mgrid[int(y0 / ps) : int(y1 / ps), int(x0 / ps) : int(x1 / ps)]
        xu, yu = (xx + 0.5) * ps, (yy + 0.5) * ps
        scores = []
        for inv in (r["inverse"], truth["regions"][1 - i]["inverse"]):
            hx, hy = _apply(inv, xu, yu)
            hxi = np.clip(hx.astype(int), 0, dark.shape[1] - 1)
            hyi = np.clip(hy.astype(int), 0, dark.shape[0] - 1)
            scores.append(np.corrcoef(dark[hyi, hxi].ravel(), dapi[yy, xx].ravel())[0, 1])
        assert scores[0] > 0.5 and scores[0] > scores[1] + 0.2, (r["name"], scores)


def test_cell_types_morphology_and_neighbourhoods(sample):
    d, truth = sample
    cells = pq.read_table(d / "truth_cells.parquet").to_pandas()
    props = truth["cell_type_proportions"]
    assert list(props) == list(CELL_TYPES) and sum(props.values()) == pytest.approx(1.0)
    assert all(v > 0.02 for v in props.values())
    size = cells.groupby("cell_type").nucleus_major_um.median()
    assert size["tumour"] > size["lymphocyte"] * 1.4
    elong = (cells.nucleus_minor_um / cells.nucleus_major_um).groupby(cells.cell_type).median()
    assert elong["fibroblast"] < 0.5 < elong["lymphocyte"]
    # nucleus size follows the morphology state (what makes kind-a genes visible in H&E)
    tum = cells[cells.cell_type == "tumour"]
    assert np.corrcoef(tum.morph_state, np.log(tum.nucleus_major_um))[0, 1] > 0.4
    # spatially coherent neighbourhoods: nearest neighbours share their type more than at random
    from scipy.spatial import cKDTree

    xy = cells[["x_um", "y_um"]].to_numpy()
    _, nn = cKDTree(xy).query(xy, k=2)
    same = (cells.cell_type.to_numpy()[nn[:, 1]] == cells.cell_type.to_numpy()).mean()
    random = sum(v * v for v in props.values())
    assert same > random + 0.08, (same, random)


def test_addon_kinds_behave_as_designed(sample, cell_counts):
    d, truth = sample
    counts, cells = cell_counts
    kinds = truth["addon_kinds"]
    assert list(kinds) == ADDON
    assert [kinds[g] for g in ADDON] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert set(kinds.values()) == set(ADDON_KINDS)
    program = np.log1p(counts[truth["program_genes"]].sum(axis=1)).to_numpy()
    z = cells.morph_state.to_numpy()
    p = cells.program.to_numpy()

    def fit(y, *cols):
        """Standardised OLS coefficients and R^2 (the latent fields may correlate by chance in a small tissue)."""
        x = np.column_stack([(c - c.mean()) / c.std() for c in cols])
        yc = (y - y.mean()) / y.std()
        beta, *_ = np.linalg.lstsq(x, yc, rcond=None)
        return beta, 1.0 - np.mean((yc - x @ beta) ** 2)

    for g, kind in kinds.items():
        y = np.log1p(counts[g].to_numpy())
        (b_prog, b_z), _ = fit(y, program, z)
        if kind == "a":  # morphology state, not the core program
            assert b_z > 0.3 and abs(b_prog) < b_z / 2, (g, b_prog, b_z)
        elif kind == "b":  # the cell's own core program counts, not morphology
            assert b_prog > 0.4 and abs(b_z) < b_prog / 3, (g, b_prog, b_z)
            assert set(truth["kind_b_inputs"][g]) <= set(truth["program_genes"]) <= set(CORE)
        else:  # needs both latents: the interaction term matters beyond the main effects
            (bz, bp, bzp), r2_both = fit(y, z, p, z * p)
            _, r2_z = fit(y, z)
            _, r2_p = fit(y, p)
            assert bzp > 0.1 and bz > 0.05 and bp > 0.05, (g, bz, bp, bzp)
            assert r2_both > 1.5 * max(r2_z, r2_p), (g, r2_both, r2_z, r2_p)


def test_patient_effects_shared_and_sample_alone_equals_cohort_member(tmp_path):
    small = dict(tissue_um=(400, 400), he_mpp=0.5, cell_density=2000)
    sheet = simulate_cohort(tmp_path / "cohort", n_patients=2, samples_per_patient=2, core_genes=CORE,
                            addon_genes=ADDON, seed=5, **small)
    assert list(sheet.columns) == ["sample_id", "patient_id", "xenium_dir", "he_path", "he_mpp", "alignment", "regions"]
    assert list(sheet.sample_id) == ["S01", "S02", "S03", "S04"]
    assert list(sheet.patient_id) == ["P1", "P1", "P2", "P2"]
    on_disk = pd.read_csv(tmp_path / "cohort" / "samples.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, sheet)
    for row in sheet.itertuples():
        assert Path(row.xenium_dir, "transcripts.parquet").is_file() and Path(row.he_path).is_file()
        assert Path(row.alignment).is_file() and Path(row.regions).is_file()
    truths = [json.loads(Path(p).with_name("truth.json").read_text()) for p in sheet.he_path]
    eff = [t["patient_effects"] for t in truths]
    assert eff[0] == eff[1] and eff[2] == eff[3] and eff[0] != eff[2]
    assert truths[0]["regions"] != truths[1]["regions"]  # samples differ
    # one sample alone == the same sample inside the cohort
    alone = simulate_sample(tmp_path / "alone", sample_id="S03", patient_id="P2", core_genes=CORE,
                            addon_genes=ADDON, seed=5, **small)
    assert alone == truths[2]
    for f in ("xenium/transcripts.parquet", "he.tif"):
        assert (tmp_path / "alone" / f).read_bytes() == (tmp_path / "cohort" / "S03" / f).read_bytes()


def test_simulate_from_config_and_bad_input(tmp_path):
    panel = {"mode": "yaml", "core": CORE[:8], "addon": ADDON[:3]}
    sim = {"seed": 1, "tissue_um": [350, 350], "he_mpp": 0.5, "cell_density": 1500}
    truth = simulate_from_config(tmp_path / "S1", sample_id="S1", patient_id="P1", panel=panel, simulate=sim, he_mpp="0.5")
    assert truth["he_mpp"] == 0.5 and truth["addon_kinds"] == dict(zip(ADDON[:3], ["a", "b", "c"], strict=True))

    with pytest.raises(InputError, match="simulate") as exc:
        simulate_from_config(tmp_path / "x", sample_id="S1", patient_id="P1", panel=panel, simulate={"tisue_um": [1, 1]})
    assert exc.value.field == "simulate"
    with pytest.raises(InputError, match="he_mpp"):
        simulate_from_config(tmp_path / "x", sample_id="S1", patient_id="P1", panel=panel, simulate=sim, he_mpp=0.25)
    with pytest.raises(InputError, match="gene lists"):
        simulate_from_config(tmp_path / "x", sample_id="S1", patient_id="P1", panel={"mode": "hvg"}, simulate=sim)
    with pytest.raises(InputError, match="both lists"):
        simulate_sample(tmp_path / "x", sample_id="S1", patient_id="P1", core_genes=CORE, addon_genes=["EPCAM"])
    with pytest.raises(InputError, match="tissue_um"):
        simulate_sample(tmp_path / "x", sample_id="S1", patient_id="P1", core_genes=CORE, addon_genes=ADDON,
                        tissue_um=(50, 50))
    assert not (tmp_path / "x").exists()
    # a directory holding someone else's files is never overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="did not write"):
        simulate_sample(tmp_path / "mine", sample_id="S1", patient_id="P1", core_genes=CORE, addon_genes=ADDON)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a failure mid-way leaves no half-written sample behind
    with pytest.raises(InputError):
        simulate_sample(tmp_path / "S9", sample_id="S9", patient_id="P1", core_genes=CORE, addon_genes=ADDON,
                        tissue_um=(350, 350), cell_density=1e-6)
    assert not (tmp_path / "S9").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
