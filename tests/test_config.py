"""Config, cohort, sample-sheet and panel validation: every bad value is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morphomol.config import load_cohorts, load_settings, read_sample_sheet, setting_status
from morphomol.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "workflow" / "schemas"


def _write_cohort(tmp: Path, sheet_rows: list[str], *, panel=None, header="sample_id\tpatient_id\txenium_dir\the_path",
                  cohort_extra=None, config_extra=None):
    (tmp / "data").mkdir(exist_ok=True)
    for d in ("x1", "x2"):
        (tmp / "data" / d).mkdir(exist_ok=True)
    for f in ("he1.tif", "he2.tif"):
        (tmp / "data" / f).write_bytes(b"")
    (tmp / "sheet.tsv").write_text("\n".join([header, *sheet_rows]) + "\n")
    (tmp / "panel.yaml").write_text(yaml.safe_dump(panel or {"core": ["A", "B"], "addon": ["C"]}))
    cohort = {"samples": "sheet.tsv", "panel": "panel.yaml", **(cohort_extra or {})}
    (tmp / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"c1": "cohort.yaml"}
    config.update(config_extra or {})
    return config


GOOD = ["S1\tP1\tdata/x1\tdata/he1.tif", "S2\tP2\tdata/x2\tdata/he2.tif"]


def test_good_cohort_loads_with_defaults(tmp_path):
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"tiling": {"min_transcripts": 10}})
    cohorts = load_cohorts(config, SCHEMAS, workdir=tmp_path)
    c = cohorts["c1"]
    assert list(c.samples.index) == ["S1", "S2"]
    assert c.config["tiling"]["min_transcripts"] == 10  # cohort override
    assert c.config["tiling"]["tile_px"] == 512  # default kept
    assert c.panel == {"mode": "yaml", "core": ["A", "B"], "addon": ["C"]}


def test_demo_config_is_valid():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cohorts = load_cohorts(config, SCHEMAS, workdir=REPO)
    assert "demo" in cohorts
    assert cohorts["demo"].simulate is not None
    assert cohorts["demo"].samples["patient_id"].nunique() >= 3


@pytest.mark.parametrize(
    "rows, field, needle",
    [
        (["S 1\tP1\tdata/x1\tdata/he1.tif"], "sample_id", "row 2"),
        (["S1\tP1\tdata/x1\tdata/he1.tif", "S1\tP2\tdata/x2\tdata/he2.tif"], "sample_id", "duplicate sample_id"),
        (["S1\tP1\tdata/missing\tdata/he1.tif"], "xenium_dir", "file not found: data/missing"),
        (["S1\tP1\tdata/x1\tdata/nope.svs"], "he_path", "file not found"),
    ],
)
def test_bad_sheet_rows(tmp_path, rows, field, needle):
    config = _write_cohort(tmp_path, rows)
    with pytest.raises(InputError) as exc:
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    assert exc.value.field == field
    assert "sheet.tsv" in exc.value.message
    assert needle in exc.value.message


def test_bad_he_mpp_and_missing_column(tmp_path):
    config = _write_cohort(tmp_path, ["S1\tP1\tdata/x1\tdata/he1.tif\tabc"],
                           header="sample_id\tpatient_id\txenium_dir\the_path\the_mpp")
    with pytest.raises(InputError, match="he_mpp"):
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    config = _write_cohort(tmp_path, ["S1\tdata/x1\tdata/he1.tif"], header="sample_id\txenium_dir\the_path")
    with pytest.raises(InputError) as exc:
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    assert exc.value.field == "patient_id"


def test_bad_config_value_names_field(tmp_path):
    config = _write_cohort(tmp_path, GOOD)
    config["tiling"]["min_tissue_fraction"] = 3
    with pytest.raises(InputError) as exc:
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    assert exc.value.field == "tiling.min_tissue_fraction"


def test_bad_cohort_name_and_override(tmp_path):
    config = _write_cohort(tmp_path, GOOD)
    config["cohorts"] = {"bad name": "cohort.yaml"}
    with pytest.raises(InputError, match="cohorts"):
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"splits": {"n_folds": 1}})
    with pytest.raises(InputError) as exc:
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    assert "cohort.yaml" in exc.value.message and exc.value.field == "splits.n_folds"


def test_panel_errors(tmp_path):
    config = _write_cohort(tmp_path, GOOD, panel={"core": ["A", "B"], "addon": ["B"]})
    with pytest.raises(InputError, match="both core and addon"):
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    config = _write_cohort(tmp_path, GOOD, panel={"core": ["A"], "addon": []})
    with pytest.raises(InputError, match="addon"):
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    # HVG mode does not need add-on genes listed
    config = _write_cohort(tmp_path, GOOD, panel={"core": []}, cohort_extra={"panels": {"mode": "hvg"}})
    assert load_cohorts(config, SCHEMAS, workdir=tmp_path)["c1"].panel["mode"] == "hvg"


def test_missing_weights_file_is_an_error(tmp_path):
    config = _write_cohort(tmp_path, GOOD, config_extra={"encoders": {"conch": {"weights": "weights/conch.safetensors"}}})
    with pytest.raises(InputError) as exc:
        load_cohorts(config, SCHEMAS, workdir=tmp_path)
    assert exc.value.field == "encoders.conch.weights"
    assert "nothing is downloaded" in exc.value.message


def test_sheet_relative_to_workdir(tmp_path):
    _write_cohort(tmp_path, GOOD)
    df = read_sample_sheet(tmp_path / "sheet.tsv", SCHEMAS, workdir=tmp_path)
    assert df.loc["S2", "he_path"] == "data/he2.tif"
    with pytest.raises(InputError):
        read_sample_sheet(tmp_path / "sheet.tsv", SCHEMAS, workdir=tmp_path / "elsewhere")


def test_settings_and_runnability(tmp_path):
    settings = load_settings(REPO / "config" / "experiments" / "table_a1.yaml")
    table_a1 = [s for s in settings.values() if s.get("kind", "regression") == "regression" and s.get("paper_row") is not None]
    assert sorted(s["paper_row"] for s in table_a1) == list(range(34))
    assert any(s.get("kind") == "min_mae" for s in settings.values())
    assert sum(s.get("kind") == "clip" for s in settings.values()) == 2
    needs = {n: s for n, s in settings.items() if s.get("requires_weights")}
    assert needs, "some settings need external weights"
    name, s = next(iter(needs.items()))
    assert "missing weights" in setting_status(s, {})
    assert setting_status(s, {e: {"weights": "x"} for e in s["requires_weights"]}) is None
    (tmp_path / "bad.yaml").write_text("settings:\n  'bad name': {}\n")
    with pytest.raises(InputError):
        load_settings(tmp_path / "bad.yaml")
