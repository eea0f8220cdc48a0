"""Figures from synthetic inputs: every plot function and the make_plots entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.config.sections import TablesConfig
from morphomol.errors import InputError
from morphomol.report import figures as F
from morphomol.report.runs import discover_runs
from morphomol.studies.fusion import plots as P
from morphomol.studies.fusion import tables as T
from morphomol.studies.fusion.settings import ModelSetting


def tables_cfg(**kw) -> TablesConfig:
    base = {"baseline": "best_morph_only", "plot_gene": None, "alpha": 0.05, "ridge": True, "spatial_samples": None,
            "thumbnail_max_size": 1024}
    return TablesConfig(**{**base, **kw})

MIN_PNG = 3000  # bytes: a real figure, not an empty canvas


def png_ok(path: Path) -> bool:
    return path.exists() and path.stat().st_size > MIN_PNG and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=(300, 5)).astype(np.uint32)
    counts[:, 3] = counts[:, 0] * 2  # strongly correlated pair
    genes = ["a", "b", "c", "d", "e"]
    # two blocks with a different gene order and a gene missing from the second (counts as 0)
    blocks = [(counts[:150], genes), (counts[150:, [4, 3, 2, 1, 0]], genes[::-1])]
    corr = P.source_target_correlation(iter(blocks), core=["a", "b"], addon=["c", "d", "e"])
    x = np.log1p(counts.astype(float))
    ref = np.corrcoef(x, rowvar=False)
    np.testing.assert_allclose(corr.to_numpy(), ref[np.ix_([0, 1], [2, 3, 4])], atol=1e-10)
    assert corr.loc["a", "d"] > 0.9
    avg = P.avg_source_correlation(corr)
    assert avg["d"] == pytest.approx((ref[0, 3] + ref[1, 3]) / 2)
    # a constant gene has no correlation
    const = P.source_target_correlation([(np.c_[counts[:, :2], np.ones(300)], ["a", "b", "z"])], ["a"], ["b", "z"])
    assert np.isnan(const.loc["a", "z"]) and np.isfinite(const.loc["a", "b"])


def test_select_genes() -> None:
    s = pd.Series({"g1": 0.5, "g2": 0.9, "g3": 0.1, "g4": np.nan, "g5": 0.3})
    assert F.select_genes(s) == {"best": "g2", "median": "g5", "worst": "g3"}


def test_spatial_map_with_and_without_background(tmp_path: Path) -> None:
    xs, ys = np.meshgrid(np.arange(0, 2560, 256), np.arange(0, 1536, 256))
    tiles = pd.DataFrame({"tile_id": [f"s1__{i:06d}" for i in range(xs.size)], "x_px": xs.ravel(),
                          "y_px": ys.ravel(), "size_px": 512})
    assert F.cell_size(tiles) == 256
    y = np.sin(tiles["x_px"] / 500.0).to_numpy()
    yh = y + 0.1
    yh[3] = np.nan  # a tile without prediction is skipped
    out = F.plot_spatial_map(tiles, y, yh, tmp_path / "a.png", gene="G1", sample="s1")
    assert png_ok(out)
    bg = np.full((100, 160, 3), 230, dtype=np.uint8)
    out = F.plot_spatial_map(tiles, y, yh, tmp_path / "b.png", gene="G1", sample="s1", background=bg,
                             downsample=20.0)
    assert png_ok(out)
    with pytest.raises(InputError):
        F.plot_spatial_map(tiles, y[:-1], yh, tmp_path / "c.png", gene="G1")


def test_thumbnail_degrades_gracefully(tmp_path: Path) -> None:
    img, ds = F.load_thumbnail(tmp_path / "missing.svs", 0.5)
    assert img is None and ds == 1.0
    assert F.load_thumbnail(None, None) == (None, 1.0)


def test_thumbnail_from_real_tiff(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgb = np.zeros((400, 600, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    img, ds = F.load_thumbnail(path, 0.5, max_size=150)
    if img is None:  # reader not available here: the degraded path is covered above
        pytest.skip("morphomol.io.he could not open a plain TIFF")
    assert max(img.shape[:2]) <= 150 and ds == pytest.approx(4.0)


def synthetic_cohort(root: Path, with_clip: bool = True) -> dict:
    """A tiny cohort directory: runs, tables, tiles.parquet, tokens.zarr, panel."""
    import zarr

    rng = np.random.default_rng(1)
    core, addon = [f"C{i}" for i in range(6)], [f"A{i}" for i in range(4)]
    genes = core + addon
    samples = ["s1", "s2"]
    tiles_of = {}
    for s in samples:
        xs, ys = np.meshgrid(np.arange(0, 2048, 256), np.arange(0, 1280, 256))
        n = xs.size
        tiles = pd.DataFrame({"tile_id": [f"{s}__{i:06d}" for i in range(n)], "index": np.arange(n),
                              "x_px": xs.ravel(), "y_px": ys.ravel(), "size_px": 512})
        d = root / "samples" / s
        d.mkdir(parents=True)
        tiles.to_parquet(d / "tiles.parquet")
        tiles_of[s] = tiles
        base = rng.poisson(4, size=(n, 6))
        add = np.c_[base[:, :2] + rng.poisson(1, size=(n, 2)), rng.poisson(3, size=(n, 2))]
        g = zarr.open_group(str(d / "tokens.zarr"), mode="w")
        g.create_array("tile_counts", data=np.c_[base, add].astype(np.uint32))
        g.attrs["genes"] = genes
    (root / "panels").mkdir()
    (root / "panels" / "fold0.json").write_text(json.dumps({"mode": "yaml", "core": core, "addon": addon}))
    settings = {
        "late_add": ModelSetting("late_add", fusion_stage="late", fusion_strategy="add", morph_encoder="vit_s",
                                 expr_encoder="mlp", expr_aggregation="token"),
        "morph_vits_ft": ModelSetting("morph_vits_ft", morph_encoder="vit_s"),
        "expr_mlp_token": ModelSetting("expr_mlp_token", expr_encoder="mlp", expr_aggregation="token"),
        "min_mae": ModelSetting("min_mae", kind="min_mae"),
        "clip_token": ModelSetting("clip_token", kind="clip", morph_encoder="vit_s", expr_encoder="mlp",
                                   expr_aggregation="token"),
    }
    level = {"late_add": 0.8, "morph_vits_ft": 0.5, "expr_mlp_token": 0.7, "min_mae": 0.68}
    all_tiles = pd.concat(tiles_of.values(), ignore_index=True)
    for s, lv in level.items():
        for k in range(2):
            d = root / "runs" / s / f"fold{k}"
            d.mkdir(parents=True)
            per_gene = {g: {"spearman": lv + 0.05 * j - 0.05 + 0.01 * k, "pearson": lv, "mse": 1 - lv, "mae": 0.4}
                        for j, g in enumerate(addon)}
            (d / "metrics.json").write_text(json.dumps({
                "setting": s, "fold": k, "kind": "regression", "status": "ok", "genes": addon,
                "mean": {"spearman": lv + 0.01 * k, "pearson": lv, "mse": 1 - lv, "mae": 0.4}, "per_gene": per_gene}))
            test = all_tiles[all_tiles["tile_id"].str.startswith(samples[k])]
            rows = []
            for g in addon:
                y = np.log1p(rng.poisson(3, size=len(test)))
                rows.append(pd.DataFrame({"tile_id": test["tile_id"].to_numpy(), "gene": g, "y": y,
                                          "y_hat": y * lv + rng.normal(0, 0.2, len(test))}))
            pd.concat(rows).to_parquet(d / "predictions.parquet")
    if with_clip:
        for k in range(2):
            d = root / "runs" / "clip_token" / f"fold{k}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({
                "setting": "clip_token", "fold": k, "kind": "clip", "status": "ok", "recall@1": 0.06 + 0.01 * k,
                "recall@5": 0.2, "random_recall@1": 1 / 256, "random_recall@5": 5 / 256}))
    T.make_tables(discover_runs(root), root / "tables", settings=settings, weights={}, n_folds=2)
    return {"samples": samples, "settings": settings}


def plot_inputs(root: Path, info: dict) -> dict:
    """The explicit inputs the plots rule passes: tables, predictions per setting, per-sample files, panel."""
    predictions = {}
    for d in sorted((root / "runs").glob("*/fold*")):
        if info["settings"][d.parent.name].kind != "clip":
            predictions.setdefault(d.parent.name, []).append(d / "predictions.parquet")
    return {"table_a1": root / "tables" / "table_a1.csv", "table_a2": root / "tables" / "table_a2.csv",
            "per_gene": root / "tables" / "per_gene.csv", "predictions": predictions,
            "tiles": {s: root / "samples" / s / "tiles.parquet" for s in info["samples"]},
            "token_stores": {s: root / "samples" / s / "tokens.zarr" for s in info["samples"]},
            "panel": root / "panels" / "fold0.json"}


def test_make_plots_end_to_end(tmp_path: Path) -> None:
    info = synthetic_cohort(tmp_path)
    slides = {s: {"he_path": str(tmp_path / "nope.svs"), "he_mpp": 0.5} for s in info["samples"]}
    out = tmp_path / "tables" / "plots"
    written = P.make_plots(out, **plot_inputs(tmp_path, info), slides=slides, cfg=tables_cfg())
    names = {p.name for p in written}
    for name in ("setting_summary.png", "per_gene_spearman.png", "pred_vs_measured.png", "spatial_s1.png",
                 "spatial_s2.png", "source_target_corr.png", "predictability_vs_redundancy.png",
                 "clip_recall.png"):
        assert name in names, name
        assert png_ok(out / name), name
    corr = pd.read_csv(out / "source_target_corr.csv", index_col=0)
    assert corr.shape == (6, 4)
    assert corr.loc["C0", "A0"] > 0.5  # A0 is built from C0
    assert abs(corr.loc["C0", "A3"]) < 0.5


def test_make_plots_chosen_gene_and_no_clip(tmp_path: Path) -> None:
    info = synthetic_cohort(tmp_path, with_clip=False)
    out = tmp_path / "tables" / "plots"
    written = P.make_plots(out, **plot_inputs(tmp_path, info), cfg=tables_cfg(plot_gene="A2", spatial_samples=1))
    names = {p.name for p in written}
    assert "clip_recall.png" not in names
    assert "spatial_s1.png" in names and "spatial_s2.png" not in names
    with pytest.raises(InputError, match="tables.plot_gene"):
        P.make_plots(out, **plot_inputs(tmp_path, info), cfg=tables_cfg(plot_gene="NOT_A_GENE"))


def test_make_plots_reads_only_given_files(tmp_path: Path) -> None:
    # no token stores / panel given: no correlation figures; spatial maps only for samples with tiles given
    info = synthetic_cohort(tmp_path, with_clip=False)
    inputs = plot_inputs(tmp_path, info)
    inputs.update(token_stores={}, panel=None, tiles={"s2": inputs["tiles"]["s2"]})
    written = {p.name for p in P.make_plots(tmp_path / "p", **inputs)}
    assert "source_target_corr.png" not in written and "predictability_vs_redundancy.png" not in written
    assert "spatial_s2.png" in written and "spatial_s1.png" not in written
    assert "pred_vs_measured.png" in written and "setting_summary.png" in written


def test_individual_plots(tmp_path: Path) -> None:
    a1 = pd.DataFrame({"setting": ["a", "b"], "family": ["late fusion", "morph-only"],
                       "spearman_mean": [0.8, 0.6], "spearman_std": [0.01, np.nan]})
    assert png_ok(P.plot_setting_summary(a1, tmp_path / "s.png"))
    a2 = pd.DataFrame({"setting": ["clip_token", "clip_tile", "random"], "recall@1_mean": [0.06, 0.04, 0.004],
                       "recall@1_std": [0.004, 0.003, 0], "recall@5_mean": [0.2, 0.15, 0.02],
                       "recall@5_std": [0.01, 0.01, 0]})
    assert png_ok(P.plot_clip_recall(a2, tmp_path / "c.png"))
    corr = pd.DataFrame(np.random.default_rng(0).uniform(-1, 1, (80, 70)),
                        index=[f"c{i}" for i in range(80)], columns=[f"t{i}" for i in range(70)])
    assert png_ok(F.plot_correlation_heatmap(corr, tmp_path / "h.png"))
    with pytest.raises(InputError):
        P.plot_setting_summary(a1.assign(spearman_mean=np.nan), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


REPO = Path(__file__).resolve().parents[1]
# Stand-in for workflow/rules/fusion.smk's `fusion_plots` rule (same inputs / params), running the real script.
STANDIN_RULE = '''
rule fusion_plots:
    input:
        a1="tables/table_a1.csv",
        a2="tables/table_a2.csv",
        per_gene="tables/per_gene.csv",
        predictions=%(predictions_flat)r,
        tiles=%(tiles)r,
        tokens=%(tokens)r,
        panel="panels/fold0.json",
    output:
        plots=directory("tables/plots"),
    params:
        samples=%(samples)r,
        slides=%(slides)r,
        predictions=%(predictions)r,
        tables=%(tables)r,
        min_mae="min_mae",
    log:
        "logs/plots.log",
    script:
        "%(script)s"
'''


def test_plots_rule_runs_in_snakemake(tmp_path: Path) -> None:
    """scripts/fusion_plots.py under real Snakemake: predictions of the regression runs only, per-sample
    tiles / token stores, the fold0 panel; every figure is drawn."""
    import dataclasses
    import subprocess
    import sys

    info = synthetic_cohort(tmp_path)
    inputs = plot_inputs(tmp_path, info)
    predictions = {s: [str(Path(p).relative_to(tmp_path)) for p in ps] for s, ps in inputs["predictions"].items()}
    assert "clip_token" not in predictions
    (tmp_path / "Snakefile").write_text(STANDIN_RULE % {
        "predictions_flat": [p for ps in predictions.values() for p in ps], "predictions": predictions,
        "tiles": [f"samples/{s}/tiles.parquet" for s in info["samples"]],
        "tokens": [f"samples/{s}/tokens.zarr" for s in info["samples"]], "samples": info["samples"],
        "slides": {s: {"he_path": None, "he_mpp": None} for s in info["samples"]},
        "tables": dataclasses.asdict(tables_cfg(spatial_samples=("s2",))), "script": REPO / "scripts" / "fusion_plots.py"})
    res = subprocess.run([sys.executable, "-m", "snakemake", "-c1", "tables/plots"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "tables" / "plots"
    for name in ("setting_summary.png", "per_gene_spearman.png", "pred_vs_measured.png", "spatial_s2.png",
                 "source_target_corr.png", "predictability_vs_redundancy.png", "clip_recall.png"):
        assert png_ok(out / name), name
    assert not (out / "spatial_s1.png").exists()
