"""Config, cohort, sample-sheet, panel and settings validation: every bad value is one clear error,
raised before any job runs (strict schemas, typed sections, the studies' pre-flight checks)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from morphomol.config import (
    TilingConfig,
    default_sections,
    load_config,
    read_sample_sheet,
    typed,
)
from morphomol.errors import InputError
from morphomol.studies.fusion.settings import ModelSetting, load_settings

REPO = Path(__file__).resolve().parents[1]
SETTINGS = REPO / "config" / "experiments" / "table_a1.yaml"


def _write_cohort(tmp: Path, sheet_rows: list[str], *, panel=None, header="sample_id\tpatient_id\txenium_dir\the_path",
                  cohort_extra=None, config_extra=None, gene_panel=None):
    (tmp / "data").mkdir(exist_ok=True)
    for d in ("x1", "x2", "x3"):
        (tmp / "data" / d).mkdir(exist_ok=True)
        if gene_panel is not None:
            targets = [{"type": {"data": {"name": g}, "descriptor": "gene"}} for g in gene_panel]
            (tmp / "data" / d / "gene_panel.json").write_text(json.dumps({"payload": {"targets": targets}}))
    for f in ("he1.tif", "he2.tif", "he3.tif"):
        (tmp / "data" / f).write_bytes(b"")
    (tmp / "sheet.tsv").write_text("\n".join([header, *sheet_rows]) + "\n")
    (tmp / "panel.yaml").write_text(yaml.safe_dump(panel or {"core": ["A", "B"], "addon": ["C"]}))
    cohort = {"samples": "sheet.tsv", "panel": "panel.yaml", **(cohort_extra or {})}
    (tmp / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"c1": "cohort.yaml"}
    config["experiments"]["settings_file"] = str(SETTINGS)
    config["splits"] = {"n_folds": 2}
    for k, v in (config_extra or {}).items():
        config[k] = {**config.get(k, {}), **v} if isinstance(v, dict) and isinstance(config.get(k), dict) else v
    return config


GOOD = ["S1\tP1\tdata/x1\tdata/he1.tif", "S2\tP2\tdata/x2\tdata/he2.tif"]


def _load(config, tmp_path):
    return load_config(config, config_file=tmp_path / "config.yaml", workdir=tmp_path)


def test_good_cohort_loads_typed_with_defaults(tmp_path):
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"tiling": {"min_transcripts": 10}})
    c = _load(config, tmp_path).cohorts["c1"]
    assert list(c.samples.index) == ["S1", "S2"]
    assert c.cfg.tiling.min_transcripts == 10  # cohort override
    assert c.cfg.tiling.tile_px == 512  # default kept
    assert isinstance(c.cfg.tiling, TilingConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cfg.tiling.tile_px = 1  # type: ignore[misc]
    assert (c.panel.mode, c.panel.core, c.panel.addon) == ("yaml", ("A", "B"), ("C",))
    assert c.kind.name == "xenium" and c.studies == ("fusion",)


def test_demo_config_is_valid():
    pc = load_config("config/config.yaml", workdir=REPO)
    demo = pc.cohorts["demo"]
    assert demo.simulate is not None
    assert demo.samples["patient_id"].nunique() >= 3


def test_every_section_is_strict_and_typed():
    """One frozen dataclass per schema section; every schema property is a field (and vice versa)."""
    schemas = REPO / "workflow" / "schemas"
    schema = yaml.safe_load((schemas / "config.schema.yaml").read_text())
    cfg = default_sections()
    for name, sub in schema["properties"].items():
        if name in ("cohorts", "seed", "encoders"):
            continue
        if "$ref" in sub:  # a study's section lives in its own schema file
            sub = yaml.safe_load((schemas / sub["$ref"]).read_text())
        assert sub.get("additionalProperties") is False, f"section {name} is not strict"
        fields = {f.name for f in dataclasses.fields(getattr(cfg, name))}
        assert fields == set(sub["properties"]), name


@pytest.mark.parametrize("where", ["config", "cohort"])
def test_misspelled_key_fails_naming_file_and_key(tmp_path, where):
    bad = {"tiling": {"min_transcipts": 5}}
    config = _write_cohort(tmp_path, GOOD, cohort_extra=bad if where == "cohort" else None,
                           config_extra=bad if where == "config" else None)
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "tiling.min_transcipts"
    assert ("cohort.yaml" if where == "cohort" else "config.yaml") in exc.value.message
    assert "min_transcripts" in exc.value.message  # the expected keys are listed


def test_unknown_section_and_nested_key(tmp_path):
    config = _write_cohort(tmp_path, GOOD)
    config["tilling"] = {"tile_px": 256}
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "tilling"
    config = _write_cohort(tmp_path, GOOD, config_extra={"model": {"vit": {"embd_dim": 64}}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "model.vit.embd_dim"
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"tokenz": {}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "tokenz" and "cohort.yaml" in exc.value.message


def test_misspelled_setting_field_fails(tmp_path):
    doc = yaml.safe_load(SETTINGS.read_text())
    doc["settings"]["morph_vits_ft"]["freez_morph"] = True
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError) as exc:
        load_settings(tmp_path / "s.yaml")
    assert exc.value.field == "settings.morph_vits_ft.freez_morph" and "s.yaml" in exc.value.message
    doc["settings"]["morph_vits_ft"].pop("freez_morph")
    doc["settings"]["morph_vits_ft"]["fusion_stage"] = "middle"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError) as exc:
        load_settings(tmp_path / "s.yaml")
    assert exc.value.field == "settings.morph_vits_ft.fusion_stage"


def test_ridge_section_from_config_and_cohort(tmp_path):
    config = _write_cohort(tmp_path, GOOD, config_extra={"ridge": {"n_components": 8, "alphas": [1.0, 10.0]}},
                           cohort_extra={"ridge": {"inner_folds": 3}})
    r = _load(config, tmp_path).cohorts["c1"].cfg.ridge
    assert (r.n_components, r.alphas, r.inner_folds, r.select_by) == (8, (1.0, 10.0), 3, "mse")


@pytest.mark.parametrize(
    "rows, field, needle",
    [
        (["S 1\tP1\tdata/x1\tdata/he1.tif"], "sample_id", "row 2"),
        (["..\tP1\tdata/x1\tdata/he1.tif", "S2\tP2\tdata/x2\tdata/he2.tif"], "sample_id", "'..'"),
        ([".hidden\tP1\tdata/x1\tdata/he1.tif", "S2\tP2\tdata/x2\tdata/he2.tif"], "sample_id", "row 2"),
        (["S1\tP1\tdata/x1\tdata/he1.tif", "S1\tP2\tdata/x2\tdata/he2.tif"], "sample_id", "duplicate sample_id"),
        (["S1\tP1\tdata/missing\tdata/he1.tif", "S2\tP2\tdata/x2\tdata/he2.tif"], "xenium_dir", "file not found: data/missing"),
        (["S1\tP1\tdata/x1\tdata/nope.svs", "S2\tP2\tdata/x2\tdata/he2.tif"], "he_path", "file not found"),
        (["S1\tP1\tdata/x1\tdata/x2", "S2\tP2\tdata/x2\tdata/he2.tif"], "he_path", "is a directory"),
        (["S1\tP1\tdata/he1.tif\tdata/he1.tif", "S2\tP2\tdata/x2\tdata/he2.tif"], "xenium_dir", "is a file"),
    ],
)
def test_bad_sheet_rows(tmp_path, rows, field, needle):
    config = _write_cohort(tmp_path, rows)
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == field
    assert "sheet.tsv" in exc.value.message
    assert needle in exc.value.message


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1"])
def test_bad_he_mpp(tmp_path, value):
    config = _write_cohort(tmp_path, [f"S1\tP1\tdata/x1\tdata/he1.tif\t{value}", "S2\tP2\tdata/x2\tdata/he2.tif\t"],
                           header="sample_id\tpatient_id\txenium_dir\the_path\the_mpp")
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "he_mpp" and "row 2" in exc.value.message


def test_missing_column(tmp_path):
    config = _write_cohort(tmp_path, ["S1\tdata/x1\tdata/he1.tif"], header="sample_id\txenium_dir\the_path")
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "patient_id"


def test_bad_config_value_names_field(tmp_path):
    config = _write_cohort(tmp_path, GOOD)
    config["tiling"]["min_tissue_fraction"] = 3
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "tiling.min_tissue_fraction"


@pytest.mark.parametrize("name", ["bad name", "..", ".", ".hidden"])
def test_bad_cohort_names(tmp_path, name):
    config = _write_cohort(tmp_path, GOOD)
    config["cohorts"] = {name: "cohort.yaml"}
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert "cohorts" in (exc.value.field or "")


def test_bad_cohort_override(tmp_path):
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"splits": {"n_folds": 1}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert "cohort.yaml" in exc.value.message and exc.value.field == "splits.n_folds"


def test_pre_flight_checks_of_the_fusion_study(tmp_path):
    # more folds than patients
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"splits": {"n_folds": 3}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "splits.n_folds" and "2 patient" in exc.value.message
    # stride not dividing the tile
    config = _write_cohort(tmp_path, GOOD, config_extra={"tiling": {"stride_px": 200}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "tiling.stride_px"
    # unknown feature encoder
    config = _write_cohort(tmp_path, GOOD, config_extra={"features": {"encoders": ["vit_s", "unii"]}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "features.encoders" and "config.yaml" in exc.value.message
    # unknown tables baseline
    config = _write_cohort(tmp_path, GOOD, config_extra={"tables": {"baseline": "nope"}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "tables.baseline"
    # a ViT geometry timm cannot build (heads not dividing the width), named as the config key
    config = _write_cohort(tmp_path, GOOD, cohort_extra={"model": {"vit": {"embed_dim": 65, "depth": 2, "num_heads": 2}}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "model.vit.embed_dim" and "num_heads 2" in exc.value.message


def test_panel_errors(tmp_path):
    config = _write_cohort(tmp_path, GOOD, panel={"core": ["A", "B"], "addon": ["B"]})
    with pytest.raises(InputError, match="both core and addon"):
        _load(config, tmp_path)
    config = _write_cohort(tmp_path, GOOD, panel={"core": ["A"], "addon": []})
    with pytest.raises(InputError, match="addon"):
        _load(config, tmp_path)
    config = _write_cohort(tmp_path, GOOD, panel={"core": ["A"], "addon": ["NegControlProbe_00042"]})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "addon" and "control probe" in exc.value.message
    # add-on genes absent from a bundle's gene panel (gene_panel.json, no transcripts read)
    config = _write_cohort(tmp_path, GOOD, panel={"core": ["A"], "addon": ["Z"]}, gene_panel=["A", "B", "C"])
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "addon" and "gene_panel.json" in exc.value.message
    # HVG mode does not need add-on genes listed
    config = _write_cohort(tmp_path, GOOD, panel={"core": []}, cohort_extra={"panels": {"mode": "hvg"}})
    assert _load(config, tmp_path).cohorts["c1"].panel.mode == "hvg"


def test_missing_weights_file_is_an_error(tmp_path):
    config = _write_cohort(tmp_path, GOOD, config_extra={"encoders": {"conch": {"weights": "weights/conch.safetensors"}}})
    with pytest.raises(InputError) as exc:
        _load(config, tmp_path)
    assert exc.value.field == "encoders.conch.weights"
    assert "nothing is downloaded" in exc.value.message


def test_sheet_relative_to_workdir(tmp_path):
    _write_cohort(tmp_path, GOOD)
    df = read_sample_sheet(tmp_path / "sheet.tsv", "xenium", workdir=tmp_path)
    assert df.loc["S2", "he_path"] == "data/he2.tif"
    with pytest.raises(InputError):
        read_sample_sheet(tmp_path / "sheet.tsv", "xenium", workdir=tmp_path / "elsewhere")


def test_settings_and_runnability(tmp_path):
    settings = load_settings(SETTINGS)
    table_a1 = [s for s in settings.values() if s.kind == "regression" and s.paper_row is not None]
    assert sorted(s.paper_row for s in table_a1) == list(range(34))
    assert sum(s.kind == "min_mae" for s in settings.values()) == 1
    assert sum(s.kind == "clip" for s in settings.values()) == 2
    needs = {n: s for n, s in settings.items() if s.required_weights()}
    assert needs, "some settings need external weights"
    s = needs["late_add_conch_fz_gf_tile"]
    assert set(s.required_weights()) == {"conch", "geneformer"}  # from the encoder registry
    assert "missing weights" in s.not_runnable_reason({})
    assert s.not_runnable_reason({"conch": "x", "geneformer": "y"}) is None
    assert settings["morph_vits_ft"].not_runnable_reason({}) is None  # vit_s weights are optional
    (tmp_path / "bad.yaml").write_text("settings:\n  'bad name': {}\n")
    with pytest.raises(InputError):
        load_settings(tmp_path / "bad.yaml")


@pytest.mark.parametrize("encoder, dim", [("uni", 1024), ("uni2h", 1536), ("phikon2", 1024)])
def test_any_registered_image_encoder_can_be_a_morph_encoder(encoder, dim):
    from morphomol.encoders.registry import get_spec

    s = ModelSetting.from_dict(f"morph_{encoder}_fz", {"fusion_stage": "none", "morph_encoder": encoder,
                                                        "freeze_morph": True})
    assert s.morph_cache == encoder and s.cached_encoders == [encoder] and s.job == "train_cpu"
    assert s.required_weights() == (encoder,) and get_spec(encoder).embed_dim == dim
    late = ModelSetting.from_dict("late", {"fusion_stage": "late", "fusion_strategy": "concat", "morph_encoder": encoder,
                                           "freeze_morph": True, "expr_encoder": "mlp", "expr_aggregation": "tile"})
    assert late.batch_fields == ("tile", "target")
    with pytest.raises(InputError) as exc:  # foundation models are frozen feature extractors
        ModelSetting.from_dict("bad", {"fusion_stage": "none", "morph_encoder": encoder, "freeze_morph": False})
    assert exc.value.field == "settings.bad.freeze_morph"
    with pytest.raises(InputError) as exc:
        ModelSetting.from_dict("bad", {"fusion_stage": "none", "morph_encoder": "unii", "freeze_morph": True})
    assert exc.value.field == "settings.bad.morph_encoder"


def test_typed_sections_round_trip():
    cfg = default_sections(tiling={"tile_px": 256, "stride_px": 128})
    assert cfg.tiling.tile_px == 256 and cfg.tiling.stride_px == 128 and cfg.tiling.tile_mpp == 0.5
    assert typed(TilingConfig, dataclasses.asdict(cfg.tiling)) == cfg.tiling
    assert math.isclose(cfg.training.lr_head, 1e-4)
