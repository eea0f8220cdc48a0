"""The Snakemake workflow itself: lint-clean, the demo DAG resolves, bad config fails before any job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _smk(*args: str, cwd: Path = REPO, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, env=env, check=check, timeout=600)


def test_lint_is_clean():
    res = _smk("--lint")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Lints for rule" not in out and "Lints for snakefile" not in out, out


def test_dry_run_resolves_demo_dag():
    # --forceall: the whole DAG even after `make demo` has filled results/ in this checkout
    res = _smk("-n", "--forceall", "--quiet", "rules")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for rule in ("simulate", "qc", "register", "tile", "tokens", "splits", "train", "tables"):
        assert rule in out, f"rule {rule} missing from the demo DAG:\n{out}"


@pytest.fixture()
def repo_copy(tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", "*.zarr", "__pycache__"))
    return dst


def test_bad_sample_sheet_fails_before_any_job(repo_copy):
    sheet = repo_copy / "config" / "cohorts" / "demo" / "samples.tsv"
    lines = sheet.read_text().splitlines()
    lines.append(lines[1])  # duplicate the first sample
    sheet.write_text("\n".join(lines) + "\n")
    res = _smk("-n", cwd=repo_copy)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "samples.tsv" in out and "duplicate sample_id" in out, out
    assert not (repo_copy / "results").exists()


def test_bad_config_value_fails_with_field(repo_copy):
    cfg = repo_copy / "config" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("min_tissue_fraction: 0.5", "min_tissue_fraction: 2.0"))
    res = _smk("-n", cwd=repo_copy)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "min_tissue_fraction" in out, out
