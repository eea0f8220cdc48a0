"""The Snakemake workflow itself: lint-clean, the demo DAG resolves without torch, bad config fails
before any job, rules declare what they read, names cannot escape the results tree."""

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
    for rule in ("simulate", "qc", "register", "tile", "tokens", "splits", "features", "fusion_panel",
                 "fusion_train", "fusion_train_cpu", "fusion_min_mae", "fusion_clip", "fusion_ridge", "fusion_tables",
                 "fusion_plots"):
        assert rule in out, f"rule {rule} missing from the demo DAG:\n{out}"


NO_TORCH = """
import sys
for name in ("torch", "torchvision", "timm", "transformers", "open_clip"):
    sys.modules[name] = None  # any import of these raises ImportError
sys.argv = ["snakemake", "-n", "--forceall", "--quiet", "rules"]
from snakemake.cli import main
main()
"""


def test_dag_builds_with_torch_unimportable():
    res = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "fusion_train" in out


def test_plots_rule_reads_regression_predictions_tokens_and_panel():
    res = _smk("-n", "--forceall", "results/demo/fusion/tables/plots")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    block = out.split("rule fusion_plots:", 1)[1].split("\n\n", 1)[0]
    inputs = block.split("input:", 1)[1].split("output:", 1)[0]
    assert "results/demo/fusion/runs/early_add_vits_ft_mlp_token/fold0/predictions.parquet" in inputs
    assert "results/demo/fusion/runs/ridge_vit_s/fold2/predictions.parquet" in inputs
    assert "clip_token" not in inputs  # CLIP runs have no predictions
    assert "results/demo/samples/S03/tokens.zarr" in inputs and "results/demo/fusion/panels/fold0.json" in inputs


def test_train_rule_declares_exactly_what_the_run_reads():
    res = _smk("-n", "--forceall", "results/demo/fusion/runs/expr_mlp_token/fold1/metrics.json",
               "results/demo/fusion/runs/early_add_vits_ft_mlp_token/fold1/metrics.json")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    cpu = out.split("rule fusion_train_cpu:", 1)[1].split("\n\n", 1)[0].split("output:", 1)[0]
    gpu = out.split("rule fusion_train:", 1)[1].split("\n\n", 1)[0].split("output:", 1)[0]
    for block in (cpu, gpu):
        assert "splits/folds.parquet" in block and "fusion/panels/fold1.json" in block
        assert "samples/S06/tokens.zarr" in block  # the units: the token store's rows
        assert "tiles.parquet" not in block and "units.h5ad" not in block
        assert "targets.parquet" not in block
    assert "images.zarr" not in cpu  # counts-only settings never read images
    assert "samples/S06/images.zarr" in gpu


@pytest.fixture()
def repo_copy(tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", "*.zarr",
                                                             "__pycache__"))
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


def test_misspelled_key_in_cohort_fails_before_any_job(repo_copy):
    cohort = repo_copy / "config" / "cohorts" / "demo.yaml"
    cohort.write_text(cohort.read_text().replace("min_transcripts: 500", "min_transcipts: 500"))
    res = _smk("-n", cwd=repo_copy)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "demo.yaml" in out and "tiling.min_transcipts" in out and "unknown key" in out, out
    res = subprocess.run([sys.executable, "-m", "morphomol.cli", "check-config"], cwd=repo_copy, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "tiling.min_transcipts" in res.stderr, res.stdout + res.stderr


def test_names_cannot_leave_the_results_tree():
    for target in ("results/demo/samples/../registration.json", "results/../samples/S01/tiles.parquet",
                   "results/demo/samples/.hidden/tiles.parquet"):
        res = _smk("-n", target)
        out = res.stdout + res.stderr
        assert res.returncode != 0, (target, out)
        assert "MissingRuleException" in out or "No rule to produce" in out, (target, out)


def test_library_never_sees_the_snakemake_object():
    """Only morphomol.smk touches the snakemake object; every script makes one call into the library."""
    import ast

    src = REPO / "src" / "morphomol"
    offenders = []
    for path in src.rglob("*.py"):
        if path == src / "smk.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n == "snakemake" or n.startswith("snakemake.") for n in names):
                    offenders.append(f"{path}: imports snakemake")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [a.arg for a in node.args.args + node.args.kwonlyargs]
                if "smk" in args or "snakemake" in args:
                    offenders.append(f"{path}:{node.lineno} {node.name}({', '.join(args)})")
    assert not offenders, offenders
    for script in (REPO / "scripts").glob("*.py"):
        text = script.read_text()
        assert "from morphomol.smk import run" in text and "run(" in text, script
