"""The slides study in the workflow: pre-flight checks of a slides cohort (one clear error each, before any
job) and the demo DAG (rules, declared inputs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from morphomol.config import load_config
from morphomol.errors import InputError

REPO = Path(__file__).resolve().parents[1]
GMT = REPO / "tests" / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"


def _workdir(tmp_path: Path, slides: dict | None = None, *, n_patients: int = 6, extra: dict | None = None) -> Path:
    (tmp_path / "s.tif").write_bytes(b"x")
    (tmp_path / "rna.tsv").write_text("gene\tS0\nG1\t1\n")
    shutil.copy(GMT, tmp_path / "h.gmt")
    rows = ["sample_id\tpatient_id\tslide_path\tcohort"]
    rows += [f"S{i}\tP{i}\ts.tif\t{'AB'[i % 2]}" for i in range(n_patients)]
    (tmp_path / "samples.tsv").write_text("\n".join(rows) + "\n")
    cohort = {"kind": "slides", "samples": "samples.tsv", "splits": {"n_folds": 3},
              "slides": {"rna": {"path": "rna.tsv"}, "gene_sets": {"gmt": ["h.gmt"]}, **(slides or {})}, **(extra or {})}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cohort))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"cohorts": {"c": "c.yaml"}}))
    return tmp_path


def test_a_valid_slides_cohort_loads(tmp_path):
    pc = load_config("config.yaml", workdir=_workdir(tmp_path))
    c = pc.cohorts["c"]
    assert c.kind.name == "slides" and c.studies == ("slides",)
    assert c.cfg.slides.poolings == ("mean", "abmil") and c.cfg.slides.tiling.tile_px == 256


@pytest.mark.parametrize("slides, extra, field, text", [
    ({"rna": {"path": "missing.tsv"}}, None, "slides.rna.path", "RNA matrix not found"),
    ({"rna": {"path": "rna.tsv", "pseudobulk_from": "other"}}, None, "slides.rna.path", "exactly one RNA source"),
    ({"gene_sets": {"gmt": ["h.gmt"], "grounded": ["HALLMARK_NOPE"]}}, None, "slides.gene_sets.grounded", "HALLMARK_NOPE"),
    ({"gene_sets": {"gmt": []}}, None, "slides.gene_sets.gmt", "no GMT"),
    ({"poolings": ["mean", "transmil"]}, None, "slides.poolings", "unknown slide encoder 'transmil'"),
    ({"poolings": ["abmil_frozen"]}, None, "slides.slide_encoder_weights.abmil_frozen", "needs a local weights file"),
    ({"rna_encoder": "bulkrnabert"}, None, "encoders.bulkrnabert.weights", "needs local weights"),
    ({"encoder": "uni"}, None, "slides.encoder", "not among features.encoders"),
    ({"tiling": {"tile_pix": 3}}, None, "slides.tiling.tile_pix", "unknown key"),
    (None, {"splits": {"n_folds": 7}}, "splits.n_folds", "6 patient"),
])
def test_bad_slides_config_fails_before_any_job(tmp_path, slides, extra, field, text):
    wd = _workdir(tmp_path, slides, extra=extra)
    with pytest.raises(InputError, match=text) as exc:
        load_config("config.yaml", workdir=wd)
    assert field in str(exc.value)


def test_transfer_needs_patients_in_every_cohort(tmp_path):
    wd = _workdir(tmp_path, n_patients=3, extra={"splits": {"n_folds": 2}})
    with pytest.raises(InputError, match="leave-one-cohort-out with target 'A': 1 source and 2 target") as exc:
        load_config("config.yaml", workdir=wd)
    assert "samples.tsv" in str(exc.value)


def _snakemake(args: list[str], cwd: Path, timeout: int = 600) -> str:
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run([snakemake, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    return out


def _job(out: str, rule: str, contains: str) -> tuple[str, str]:
    """(declared inputs, outputs) of the dry-run job of ``rule`` whose block mentions ``contains``."""
    block = [b for b in out.split("\n\n") if f"rule {rule}:" in b and contains in b][0]
    inputs, rest = block.split("input:", 1)[1].split("output:", 1)
    return inputs, rest


def test_demo_dag_has_the_slides_rules_and_declared_inputs():
    out = _snakemake(["-n", "--forceall", "results/demo_slides/slides/runs/abmil/fold3/metrics.json",
                      "results/demo_slides/slides/tables/summary.json"], REPO)
    for rule in ("slides_simulate", "slides_tile_demo_slides_0", "slides_tile_demo_slides_1", "slides_embed",
                 "features", "splits", "slides_rna", "slides_genesets", "slides_fold", "slides_transfer", "slides_tables"):
        assert f"rule {rule}" in out or f"localrule {rule}" in out, rule
    # groups of 50 slides (slides.tiling.group_size): tiling writes each slide's own files, embedding one
    # directory of per-slide embeddings per group
    _, tile_out = _job(out, "slides_tile_demo_slides_0", "samples/SL007/units.h5ad")
    assert "SL050/images.zarr" in tile_out and "SL051" not in tile_out
    embed_in, embed_out = _job(out, "slides_embed", "embeddings/group1")
    assert "features/vit_s/SL051.zarr" in embed_in and "features/vit_s/SL050.zarr" not in embed_in
    assert embed_out.split("log:")[0].strip() == "results/demo_slides/slides/embeddings/group1"


def test_slide_fold_jobs_declare_only_the_slide_embeddings():
    """Fold and transfer jobs read per-slide embeddings (mean vector + bag), never tile features or images."""
    out = _snakemake(["-n", "--forceall", "results/demo_slides/slides/runs/abmil/fold3/metrics.json",
                      "results/demo_slides/slides/transfer/SIM-LUAD.json"], REPO)
    for rule, key in (("slides_fold", "fold3/metrics.json"), ("slides_transfer", "transfer/SIM-LUAD.json")):
        inputs, _ = _job(out, rule, key)
        assert "slides/embeddings/group0" in inputs and "slides/embeddings/group1" in inputs, inputs
        assert "features/" not in inputs and "images.zarr" not in inputs and "units.h5ad" not in inputs, inputs
        assert "genesets/scores.parquet" in inputs and "rna/expression.h5ad" in inputs
    assert "splits/folds.parquet" in _job(out, "slides_fold", "fold3/metrics.json")[0]


def test_the_dag_of_a_2000_slide_sheet_builds(tmp_path):
    """A 2,000-slide simulated-style sheet: the DAG (groups of 16 slides for tiling and embedding) builds; no
    timing is asserted (benchmarks/bench_scale.py --dag-only reports the curve)."""
    src = yaml.safe_load((REPO / "config" / "cohorts" / "demo_slides.yaml").read_text())
    n, cohort = 2000, "big_slides"
    rows = ["sample_id\tpatient_id\tslide_path\tcohort\tcancer_type\the_mpp"]
    rows += [f"SL{i:05d}\tP{i // 2:05d}\tresults/{cohort}/simulated/slides/SL{i:05d}.tif\tC{(i // 2) % 2}\tLUAD\t0.5"
             for i in range(n)]
    (tmp_path / "samples.tsv").write_text("\n".join(rows) + "\n")
    gmt = str(REPO / "config" / "cohorts" / "demo_slides" / "h.all.v7.0.symbols.gmt")
    src.update(samples=str(tmp_path / "samples.tsv"))
    src["simulate"]["gmt"] = gmt
    src["slides"]["rna"]["path"] = f"results/{cohort}/simulated/rna_counts.tsv"
    src["slides"]["gene_sets"]["gmt"] = [gmt]
    src["slides"]["tiling"]["group_size"] = 16
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(src))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["cohorts"] = {cohort: str(tmp_path / "c.yaml")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = _snakemake(["-n", "--quiet", "rules", "--snakefile", str(REPO / "Snakefile"), "--configfile",
                      str(tmp_path / "config.yaml"), "--directory", str(tmp_path), "--cores", "1"], REPO, timeout=900)
    counts = {line.split()[0]: int(line.split()[-1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[-1].isdigit()}
    tile = {k: v for k, v in counts.items() if k.startswith("slides_tile_")}
    assert len(tile) == n // 16 and set(tile.values()) == {1}
    assert counts["slides_embed"] == n // 16 and counts["slides_fold"] == 10
    assert counts["slides_transfer"] == 2 and counts["slides_tables"] == 1
