"""Per-sample QC stage: library function on real files, and rule `qc` through Snakemake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from morphomol.errors import InputError
from morphomol.io.xenium import CONTROL_PREFIXES
from morphomol.qc import DensityGrid, check_panel_genes, qc_sample

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SFE = DATA / "xenium_mini_sfe"
SVS = DATA / "he_images" / "cmu_small_region.svs"
EXPERIMENT = DATA / "xenium_small_xoa1" / "experiment.xenium"


@pytest.fixture()
def xenium_dir(tmp_path) -> Path:
    d = tmp_path / "xenium"
    d.mkdir()
    shutil.copy(EXPERIMENT, d / "experiment.xenium")
    shutil.copy(SFE / "transcripts.parquet", d)
    shutil.copy(SFE / "morphology_focus.ome.tif", d)
    return d


def _reference() -> pd.DataFrame:
    df = pd.read_parquet(SFE / "transcripts.parquet")
    return df[~df["feature_name"].str.startswith(CONTROL_PREFIXES) & (df["qv"] >= 20)]


def test_qc_sample_outputs(tmp_path, xenium_dir):
    out = tmp_path / "results" / "c" / "samples" / "s1" / "qc"
    summary = qc_sample(xenium_dir, SVS, None, out, "s1", qv_min=20.0, batch_size=1000, panel_genes=["AKT1", "CD3E"])
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "thumbnail.png", "transcripts_per_gene.csv"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    ref = _reference()
    table = pd.read_csv(out / "transcripts_per_gene.csv")
    assert list(table.columns) == ["gene", "count"]
    assert table["gene"].tolist() == sorted(table["gene"])
    assert dict(zip(table["gene"], table["count"])) == ref["feature_name"].value_counts().to_dict()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["n_transcripts"] == len(ref) == 5257
    assert on_disk["n_rows"] == 5260 and on_disk["n_controls_dropped"] == 3 and on_disk["n_low_qv_dropped"] == 0
    assert on_disk["n_genes"] == 27 and on_disk["pixel_size"] == pytest.approx(0.2125)
    x0, y0, x1, y1 = on_disk["xenium_bbox_um"]
    assert x0 == pytest.approx(ref["x_location"].min(), abs=1e-3) and x1 == pytest.approx(ref["x_location"].max(), abs=1e-3)
    assert y0 == pytest.approx(ref["y_location"].min(), abs=1e-3) and y1 == pytest.approx(ref["y_location"].max(), abs=1e-3)
    he = on_disk["he"]
    assert (he["width"], he["height"], he["mpp"], he["backend"]) == (2220, 2967, pytest.approx(0.499), "openslide")
    with Image.open(out / "thumbnail.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 200


def test_qc_counts_low_qv_and_sheet_mpp(tmp_path, xenium_dir):
    out = tmp_path / "qc"
    summary = qc_sample(xenium_dir, SVS, 0.25, out, "s1", qv_min=35.0, batch_size=4096)
    df = pd.read_parquet(SFE / "transcripts.parquet")
    gene = ~df["feature_name"].str.startswith(CONTROL_PREFIXES)
    assert summary["n_low_qv_dropped"] == int((gene & (df["qv"] < 35)).sum()) > 0
    assert summary["n_transcripts"] == int((gene & (df["qv"] >= 35)).sum())
    assert summary["he"]["mpp"] == 0.25 and summary["he"]["mpp_source"] == "he_mpp argument"
    # every gene present in the file is listed, even when the qv filter removed all its rows
    assert len(pd.read_csv(out / "transcripts_per_gene.csv")) == 27


def test_check_panel_genes_lists_missing():
    check_panel_genes(["A", "B", "C"], ["A", "C"], "s1", "t.parquet")
    with pytest.raises(InputError) as info:
        check_panel_genes(["A", "B"], ["A", "ZZZ", "MISSING1"], "s1", "x/transcripts.parquet")
    msg = str(info.value)
    assert "x/transcripts.parquet" in msg and "s1" in msg and "2 panel gene(s)" in msg
    assert "MISSING1, ZZZ" in msg


def test_missing_panel_gene_fails_without_output_and_keeps_previous(tmp_path, xenium_dir):
    out = tmp_path / "qc"
    with pytest.raises(InputError, match="NOT_A_GENE"):
        qc_sample(xenium_dir, SVS, None, out, "s1", panel_genes=["AKT1", "NOT_A_GENE"])
    assert not out.exists() and list(tmp_path.glob(".qc*")) == []
    # a previous good result is left untouched by a failing re-run
    qc_sample(xenium_dir, SVS, None, out, "s1")
    before = (out / "summary.json").read_bytes()
    with pytest.raises(InputError, match="set he_mpp"):
        png = tmp_path / "he.png"
        Image.new("RGB", (64, 64), "white").save(png)
        qc_sample(xenium_dir, png, None, out, "s1")
    assert (out / "summary.json").read_bytes() == before


def test_density_grid_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    x = rng.uniform(-50, 300, 5000).astype(np.float32)
    y = rng.uniform(100, 180, 5000).astype(np.float32)
    g = DensityGrid(10.0)
    for i in range(0, 5000, 700):  # batches reach out in every direction
        g.add(x[i : i + 700], y[i : i + 700])
    one = DensityGrid(10.0)
    one.add(x, y)
    np.testing.assert_array_equal(g.counts, one.counts)
    assert g.counts.sum() == 5000
    x0, y0, x1, y1 = g.extent_um
    assert x0 <= x.min() and x1 > x.max() and y0 <= y.min() and y1 > y.max()


def test_density_grid_coarsens_for_stray_coordinates():
    g = DensityGrid(10.0, max_bins=64)
    g.add(np.array([0.0, 5.0, 15.0], np.float32), np.array([0.0, 0.0, 12.0], np.float32))
    g.add(np.array([5000.0], np.float32), np.array([-3000.0], np.float32))  # far away
    assert max(g.counts.shape) <= 64 and g.counts.sum() == 4
    assert g.bin_um == 80.0  # 5000 µm x-span needs 63 bins of 80 µm (40 µm would need 126)
    x0, y0, x1, y1 = g.extent_um
    assert x0 <= 0 and x1 > 5000 and y0 <= -3000 and y1 > 12


# ---------------------------------------------------------------- rule qc through Snakemake
def write_workflow_config(wd: Path, cohorts: dict[str, dict], *, xenium: Path, he: Path) -> Path:
    """A config.yaml in ``wd`` with one xenium cohort per entry (name -> panel), each with sample s1."""
    import yaml

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["experiments"]["settings_file"] = str(ROOT / "config" / "experiments" / "table_a1.yaml")
    config["io"]["batch_size"] = 1000
    config["splits"] = {"n_folds": 2}
    config["cohorts"] = {}
    for name, panel in cohorts.items():
        (wd / f"{name}.tsv").write_text("sample_id\tpatient_id\txenium_dir\the_path\n"
                                        f"s1\tp1\t{xenium}\t{he}\ns2\tp2\t{xenium}\t{he}\n")
        (wd / f"{name}.panel.yaml").write_text(yaml.safe_dump(panel))
        (wd / f"{name}.yaml").write_text(yaml.safe_dump({"samples": f"{name}.tsv", "panel": f"{name}.panel.yaml"}))
        config["cohorts"][name] = f"{name}.yaml"
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    return wd / "config.yaml"


def test_rule_qc_runs_and_fails_on_missing_panel_gene(tmp_path, xenium_dir):
    """The real Snakefile: cohort "bad" has a panel gene its samples lack (found by the qc job)."""
    wd = tmp_path / "wd"
    wd.mkdir()
    cfg = write_workflow_config(wd, {"good": {"core": ["AKT1", "CD3D"], "addon": ["CD3E"]},
                                     "bad": {"core": ["AKT1", "CD3D"], "addon": ["CD3E", "NOT_IN_SAMPLE"]}},
                                xenium=xenium_dir, he=SVS)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/good/samples/s1/qc", "results/bad/samples/s1/qc",
         "-s", str(ROOT / "Snakefile"), "--directory", str(wd), "--configfile", str(cfg), "--cores", "1",
         "--keep-going", "--workflow-profile", "none", "--quiet", "rules"],
        capture_output=True, text=True, env=env, timeout=300, cwd=wd,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr  # the "bad" job failed
    log = (wd / "results/bad/logs/qc/s1.log").read_text()
    assert "NOT_IN_SAMPLE" in log and "panel gene(s) absent" in log and str(xenium_dir) in log
    assert not (wd / "results/bad/samples/s1/qc").exists()
    qc_dir = wd / "results/good/samples/s1/qc"
    summary = json.loads((qc_dir / "summary.json").read_text())
    assert summary["sample"] == "s1" and summary["n_transcripts"] == 5257 and summary["panel_genes_checked"] == 3
    assert summary["qv_min"] == 20.0 and summary["he"]["mpp"] == pytest.approx(0.499)  # no he_mpp -> file's MPP
    assert (qc_dir / "thumbnail.png").stat().st_size > 0
    assert "rule qc done" in (wd / "results/good/logs/qc/s1.log").read_text()
    # a file rewritten inside the bundle reruns its dependants (the rule declares the bundle's files)
    cmd = [sys.executable, "-m", "snakemake", "results/good/samples/s1/qc", "-s", str(ROOT / "Snakefile"),
           "--directory", str(wd), "--configfile", str(cfg), "--workflow-profile", "none", "-n"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=wd)
    assert "Nothing to be done" in quiet.stdout + quiet.stderr, quiet.stdout + quiet.stderr
    tx = xenium_dir / "transcripts.parquet"
    pd.read_parquet(tx).iloc[:-10].to_parquet(tx)  # rewritten in place (10 transcripts fewer)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=wd)
    out = rerun.stdout + rerun.stderr
    assert "rule qc:" in out and "transcripts.parquet" in out, out
