"""The CLI's habits (issue 25, item 3): ``--version``; a help text for every option, with its default;
one way to pass the config (``--config``, check-config too); list options that never take the
positional after them (``export --cohort demo --samples S01 explorer``); ``init`` prints each TODO
once, after its log lines."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from morphomol.cli import main

REPO = Path(__file__).resolve().parents[1]
VERBS = ("simulate", "encoders", "studies", "check-config", "init", "doctor", "export", "predict")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word sequences


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from morphomol.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# ------------------------------------------------------------------------------ --version
def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"morphomol {importlib.metadata.version('morphomol')}"
    from morphomol.cli import package_version

    assert package_version() == importlib.metadata.version("morphomol")


# ------------------------------------------------------------------------------ help and defaults
def test_every_option_has_a_help_text_and_help_shows_its_default(capsys):
    subs = _subparsers()
    assert set(subs) == set(VERBS)
    for verb, p in subs.items():
        text = _help(capsys, verb)
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            name = a.option_strings[-1] if a.option_strings else a.dest
            assert a.help and len(a.help.split()) >= 2, f"{verb} {name}: no help text"
            if a.default not in (None, False):
                assert f"default: {a.default}" in text, f"{verb} {name}: default {a.default!r} not shown"


@pytest.mark.parametrize("verb,flag,words", [
    ("simulate", "--patients N", "how many patients to simulate (default: 3)"),
    ("simulate", "--seed SEED", "the same seed writes the same cohort (default: 0)"),
    ("init", "--patients TABLE", "sample_id, patient_id"),
    ("init", "--max-depth N", "folder levels below DIR to search for bundles (default: 4)"),
    ("init", "--overwrite", "replace cohort files that exist"),
    ("predict", "--fold K", "the fold whose checkpoint to apply"),
    ("predict", "--device DEVICE", "cpu, cuda"),
    ("predict", "--seed SEED", "default: the first of spots.seeds"),
    ("doctor", "--config CONFIG", "(default: config/config.yaml)"),
    ("export", "--config CONFIG", "(default: config/config.yaml)"),
])
def test_the_flags_the_issue_names_are_explained(capsys, verb, flag, words):
    text = _help(capsys, verb)
    start = text.index(f"{flag} ", text.index("options:"))
    assert words in text[start:start + 300]


# ------------------------------------------------------------------------------ one way to pass the config
def _one_cohort_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"demo": "config/cohorts/demo.yaml"}
    cfile = tmp_path / "config.yaml"
    cfile.write_text(yaml.safe_dump(config))
    return cfile


def test_check_config_takes_config_like_every_verb(tmp_path, monkeypatch, capsys):
    for verb in ("encoders", "check-config", "doctor", "export", "predict"):
        assert "--config CONFIG" in _help(capsys, verb), verb
    cfile = _one_cohort_config(tmp_path)
    monkeypatch.chdir(REPO)
    assert main(["check-config", "--config", str(cfile)]) == 0
    out, err = capsys.readouterr()
    assert "cohort demo (xenium" in out and "demo_spots" not in out and "configuration OK" in out
    assert "deprecated" not in err
    # the old positional form still works, with a note
    assert main(["check-config", str(cfile)]) == 0
    out, err = capsys.readouterr()
    assert "cohort demo (xenium" in out and "demo_spots" not in out
    assert f"use `morphomol check-config --config {cfile}`" in err
    # two different configs: one error, nothing checked
    assert main(["check-config", str(cfile), "--config", str(tmp_path / "other.yaml")]) == 1
    out, err = capsys.readouterr()
    assert "two configs given" in err and "field '--config'" in err and "configuration OK" not in out


# ------------------------------------------------------------------------------ list options
def test_samples_does_not_swallow_the_export_format():
    from morphomol.cli import build_parser

    a = build_parser().parse_args(["export", "--cohort", "demo", "--samples", "S01", "explorer"])
    assert (a.what, a.cohort, a.samples) == ("explorer", "demo", ["S01"])
    a = build_parser().parse_args(["export", "--genes", "EPCAM", "qupath", "--cohort", "demo"])
    assert (a.what, a.genes, a.samples) == ("qupath", ["EPCAM"], None)


def test_lists_are_comma_separated_or_repeated():
    from morphomol.cli import build_parser

    a = build_parser().parse_args(["export", "qupath", "--cohort", "c", "--samples", "S01,S02", "--samples", "S03",
                                   "--genes=EPCAM, PTPRC", "--genes", "KRT8"])
    assert a.samples == ["S01", "S02", "S03"] and a.genes == ["EPCAM", "PTPRC", "KRT8"]
    a = build_parser().parse_args(["predict", "--samples", "N1,N2", "--cohort", "c", "--setting", "s", "--on", "new"])
    assert a.samples == ["N1", "N2"] and (a.cohort, a.on, a.fold, a.device) == ("c", "new", 0, "cpu")


def test_export_runs_with_samples_before_the_format(tmp_path, monkeypatch, capsys):
    """The issue's command line reaches the export (its sample names checked one by one) instead of
    argparse's 'required: what'."""
    monkeypatch.chdir(tmp_path)
    rc = main(["export", "--cohort", "demo", "--samples", "S01,../up", "explorer", "--config", "none.yaml"])
    err = capsys.readouterr().err
    assert rc == 1 and "field '--samples'" in err and "'../up'" in err and "required" not in err


def test_an_old_space_separated_list_is_refused_with_the_new_syntax(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["export", "explorer", "--cohort", "demo", "--samples", "S01", "S02"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: S02" in err and "--samples S01,S02" in err
    with pytest.raises(SystemExit):
        main(["export", "explorer", "--cohort", "demo", "--samples", "S01,"])
    assert "'S01,' has an empty item" in capsys.readouterr().err


# ------------------------------------------------------------------------------ init's output
def test_init_prints_each_todo_once_after_its_log_lines(tmp_path):
    """Two Space Ranger outs without patient ids and without a full-resolution H&E: 4 TODOs. Each is
    printed once (after the log lines, in the merged stream a user sees) and written once, at the top of
    the sheet; the YAML points to the sheet instead of repeating them."""
    for s in ("A1", "A2"):
        outs = tmp_path / "data" / s / "outs"
        (outs / "spatial").mkdir(parents=True)
        (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"")
        (outs / "spatial" / "tissue_hires_image.png").write_bytes(b"")
    res = subprocess.run([sys.executable, "-m", "morphomol.cli", "init", "data", "--name", "vis"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert res.returncode == 0, res.stdout
    out = res.stdout
    sheet = (tmp_path / "config" / "cohorts" / "vis" / "samples.tsv").read_text()
    cohort = (tmp_path / "config" / "cohorts" / "vis.yaml").read_text()
    todos = [ln[len("# TODO "):] for ln in sheet.splitlines() if ln.startswith("# TODO ")]
    assert len(todos) == 4 and todos[0].startswith("A1: patient_id")
    for t in todos:
        assert out.count(t) == 1, (t, out)
        assert sheet.count(t) == 1 and t not in cohort
    assert "# TODO: 4 value(s) to fill in, listed at the top of config/cohorts/vis/samples.tsv" in cohort
    assert yaml.safe_load(cohort)["kind"] == "visium"  # the header stays a comment
    lines = out.splitlines()
    logs = [i for i, ln in enumerate(lines) if " INFO morphomol." in ln]
    summary = lines.index(next(ln for ln in lines if ln.startswith("cohort vis (visium): 2 samples")))
    assert logs and max(logs) < summary
    assert [ln.strip() for ln in lines[summary + 2:summary + 6]] == todos  # in the sheet's order
