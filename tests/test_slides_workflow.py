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


def test_demo_dag_has_the_slides_rules_and_declared_inputs():
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run([snakemake, "-n", "--forceall", "results/demo_slides/slides/runs/abmil/fold3/metrics.json",
                          "results/demo_slides/slides/tables/summary.json"], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for rule in ("slides_simulate", "slides_tile_demo_slides_0", "features_demo_slides_0", "splits", "slides_rna",
                 "slides_genesets", "slides_fold", "slides_transfer", "slides_tables"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    fold = [b for b in out.split("\n\n") if "rule slides_fold:" in b and "fold3/metrics.json" in b][0]
    inputs = fold.split("input:", 1)[1].split("output:", 1)[0]
    assert "splits/fold3.parquet" in inputs and "features/vit_s/SL100.zarr" in inputs
    assert "genesets/scores.parquet" in inputs and "rna/expression.h5ad" in inputs
    assert "images.zarr" not in inputs  # folds read cached features only
    assert "transfer/SIM-LUAD.json" in out and "transfer/SIM-BRCA.json" in out
