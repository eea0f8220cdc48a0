"""Small cohorts run (issue 23): one fold / validation policy for every study (morphomol.splits).

End to end through real Snakemake on simulated cohorts: 2 patients — PA with one sample, PB with two — run
spots, slides and fusion patient-grouped with ``splits.n_folds: 2`` to their tables (the fold testing PA
validates on one of PB's samples, the fold testing PB has no validation partition and trains fixed epochs);
a cells cohort of 5 donors runs 5 donor-grouped folds (test 1 / validation 1 / fit 3). check-config rejects an
infeasible plan for every study kind, naming the field and the value that works.

Reproduce one by hand: ``python tests/test_small_cohorts.py <spots|slides|fusion|cells> <empty dir>`` writes the
workdir; then ``snakemake --snakefile <repo>/Snakefile --directory <dir> --configfile <dir>/config.yaml
--cores 2`` (the same command as :func:`_run`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

#: the 2-patient cohort: PA has one sample, PB two
TWO_PATIENTS = [("S01", "PA"), ("S02", "PB"), ("S03", "PB")]


def _cfg(cohort: str, cohort_yaml: dict, root: Path) -> Path:
    """config.yaml with the repository defaults and one cohort (its YAML written next to it)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["cohorts"] = {cohort: f"config/cohorts/{cohort}.yaml"}
    (root / "config" / "cohorts").mkdir(parents=True, exist_ok=True)
    (root / "config" / "cohorts" / f"{cohort}.yaml").write_text(yaml.safe_dump(cohort_yaml, sort_keys=False))
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "config.yaml"


def _tsv(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return str(path.relative_to(path.parents[3]))


def _copy_config(root: Path) -> None:
    shutil.copytree(REPO / "config" / "experiments", root / "config" / "experiments", dirs_exist_ok=True)


def spots_workdir(root: Path, n_folds: int = 2) -> Path:
    """Simulated Visium, 3 sections of 2 patients; one head setting, 1 seed, a few epochs."""
    _copy_config(root)
    c = "two_spots"
    (root / "config" / "experiments" / "spots_small.yaml").write_text(yaml.safe_dump({"settings": {
        "seed_head": {"role": "reference", "description": "the seed's head", "head": {"hidden": [64]}}}}))
    sheet = _tsv(root / "config" / "cohorts" / c / "samples.tsv", [
        {"sample_id": s, "patient_id": p, "format": "spaceranger", "spaceranger_dir": f"results/{c}/simulated/{s}/outs",
         "he_path": f"results/{c}/simulated/{s}/he.tif"} for s, p in TWO_PATIENTS])
    return _cfg(c, {
        "kind": "visium", "description": "2 patients (issue 23)", "samples": sheet,
        "simulate": {"seed": 11, "tissue_um": [1000, 1000], "he_mpp": 1.0, "n_genes": 60, "cell_density": 1500,
                     "depth": 2000, "field_um": 220, "caption_fraction": 0.9},
        "model": {"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 32}},
        "features": {"encoders": ["vit_s"], "batch_size": 64},
        "splits": {"n_folds": n_folds},
        "resources": {"train_threads": 1},
        "spots": {"encoder": "vit_s", "seeds": [40], "settings_file": "config/experiments/spots_small.yaml",
                  "reference": "seed_head", "patches": {"size_um": 112, "out_px": 64},
                  "targets": {"mode": "moran", "n_genes": 20, "n_eval_genes": 10},
                  "training": {"epochs": 3, "batch_size": 32, "lr": 1.0e-3, "patience": 2},
                  "captions": {"source": "none"}, "maps": {"samples": 1}},
    }, root)


def slides_workdir(root: Path, n_folds: int = 2) -> Path:
    """Simulated H&E slides + bulk RNA, 3 slides of 2 patients in one source cohort (no transfer)."""
    _copy_config(root)
    c = "two_slides"
    gmt = root / "config" / "cohorts" / c / "h.all.v7.0.symbols.gmt"
    gmt.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "cohorts" / "demo_slides" / "h.all.v7.0.symbols.gmt", gmt)
    gmt_rel = str(gmt.relative_to(root))
    sheet = _tsv(root / "config" / "cohorts" / c / "samples.tsv", [
        {"sample_id": s, "patient_id": p, "slide_path": f"results/{c}/simulated/slides/{s}.tif", "cohort": "SIM-A",
         "cancer_type": "LUAD", "he_mpp": 0.5} for s, p in TWO_PATIENTS])
    return _cfg(c, {
        "kind": "slides", "description": "2 patients (issue 23)", "samples": sheet,
        "simulate": {"seed": 3, "gmt": gmt_rel, "slide_um": [512, 384], "he_mpp": 0.5, "n_background_genes": 400,
                     "n_modules": 10, "module_size": 20},
        "model": {"vit": {"embed_dim": 64, "depth": 1, "num_heads": 2}},
        "encoders": {"vit_s": {"pooling": "mean"}},
        "features": {"encoders": ["vit_s"], "batch_size": 64, "group_size": 8},
        "splits": {"n_folds": n_folds},
        "resources": {"train_threads": 1},
        "slides": {"rna": {"path": f"results/{c}/simulated/rna_counts.tsv", "value_type": "counts"},
                   "gene_sets": {"gmt": [gmt_rel], "grounded": ["HALLMARK_G2M_CHECKPOINT"], "n_null": 2},
                   "tiling": {"group_size": 8}, "poolings": ["mean"], "pca_components": 2,
                   "slide_pca_components": 0, "prompting": {"knn_k": 2}, "retrieval_ks": [1],
                   "align": {"epochs": 3, "batch_size": 4, "patience": 2}},
    }, root)


FUSION_SETTINGS = ("morph_vits_fz", "expr_mlp_token", "late_add_vits_fz_mlp_tile", "min_mae", "clip_tile")


def fusion_workdir(root: Path, n_folds: int = 2) -> Path:
    """Simulated Xenium + H&E (the demo's simulator, smaller fields), 3 samples of 2 patients; five settings
    (morph-only, expr-only, late fusion, Min-MAE, CLIP), 2 epochs."""
    _copy_config(root)
    c = "two_xenium"
    full = yaml.safe_load((REPO / "config" / "experiments" / "table_a1.yaml").read_text())["settings"]
    (root / "config" / "experiments" / "fusion_small.yaml").write_text(
        yaml.safe_dump({"settings": {k: full[k] for k in FUSION_SETTINGS}}))
    demo = yaml.safe_load((REPO / "config" / "cohorts" / "demo.yaml").read_text())
    (root / "config" / "cohorts").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "cohorts" / "demo" / "panel.yaml", root / "config" / "cohorts" / "panel.yaml")
    sim = f"results/{c}/simulated"
    sheet = _tsv(root / "config" / "cohorts" / c / "samples.tsv", [
        {"sample_id": s, "patient_id": p, "xenium_dir": f"{sim}/{s}/xenium", "he_path": f"{sim}/{s}/he.tif",
         "he_mpp": 0.5, "alignment": f"{sim}/{s}/keypoints.csv", "regions": f"{sim}/{s}/regions.geojson"}
        for s, p in TWO_PATIENTS])
    return _cfg(c, {
        "description": "2 patients (issue 23)", "samples": sheet, "panel": "config/cohorts/panel.yaml",
        "simulate": {**demo["simulate"], "tissue_um": [1000, 1000]},
        "tiling": {"min_transcripts": 500},
        "model": {"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
        "training": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "lr_head": 2.0e-3, "lr_backbone": 2.0e-4,
                     "patience": 2, "num_workers": 0, "clip_batch_size": 32},
        "features": {"encoders": ["vit_s"], "batch_size": 64},
        "experiments": {"settings_file": "config/experiments/fusion_small.yaml"},
        "tables": {"spatial_samples": 1},
        "resources": {"train_threads": 1},
        "splits": {"n_folds": n_folds},
    }, root)


def cells_workdir(root: Path, n_folds: int = 5, n_donors: int = 5) -> Path:
    """Simulated scRNA-seq cells: one pooled h5ad of ``n_donors`` donors (per-cell donor column), no images (the
    image tasks set to weight 0); the demo's tiny random model, a few LoRA steps."""
    _copy_config(root)
    c = "five_donors"
    demo = yaml.safe_load((REPO / "config" / "cohorts" / "demo_cells.yaml").read_text())
    labels = root / "config" / "cohorts" / c / "labels.yaml"
    labels.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "cohorts" / "demo_cells" / "labels.yaml", labels)
    sheet = _tsv(root / "config" / "cohorts" / c / "samples.tsv", [
        {"sample_id": "SC1", "patient_id": "pool", "h5ad": f"results/{c}/simulated/SC1/cells.h5ad"}])
    cells = {**demo["cells"], "label_map": str(labels.relative_to(root)),
             "tasks": {"gene_to_type": [[0, 1.0]], "type_to_genes": [[0, 0.5]], "image_to_genes": [[0, 0]],
                       "image_to_type": [[0, 0]], "image_genes_to_type": [[0, 0]]},
             "n_genes": 12, "n_hvg": 200,
             "train": {**demo["cells"]["train"], "steps": 10, "batch_size": 8, "log_every": 5, "val_every": 5,
                       "val_examples": 8, "save_every": 10},
             "eval": {**demo["cells"]["eval"], "max_cells": 20}}
    return _cfg(c, {
        "description": f"{n_donors} donors (issue 23)", "kind": "cells", "samples": sheet,
        "simulate": {"seed": 11, "cells_per_donor": 40, "pools": {"SC1": [f"D{i + 1}" for i in range(n_donors)]}},
        "cells": cells, "splits": {"n_folds": n_folds}, "resources": {"train_threads": 1},
    }, root)


def _run(root: Path, *targets: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(root),
                           "--configfile", str(root / "config.yaml"), "--cores", "2", *targets],
                          cwd=root, capture_output=True, text=True, env=env, timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    return res.stdout + res.stderr


def _policies(folds: Path) -> dict[int, str]:
    f = pd.read_parquet(folds)
    return {int(k): str(g["validation"].iloc[0]) for k, g in f.groupby("fold")}


# ------------------------------------------------------------------------------ trainers without validation
def test_shared_loop_without_validation_trains_fixed_epochs_and_keeps_the_last_weights(tmp_path):
    """Policy none: no val partition -> every epoch runs (patience 1 would stop a validated run), the last
    weights are kept and the run says so."""
    from morphomol.config import default_sections
    from morphomol.studies.fusion import regression
    from morphomol.studies.fusion.data import FoldData
    from morphomol.studies.fusion.settings import load_settings
    from morphomol.synthetic.fixtures import synthetic_tiles
    from morphomol.train.runtime import Runtime

    ds, core, addon = synthetic_tiles(40, n_core=6, n_targets=3, seed=0, img_size=32)
    idx = np.arange(len(ds))
    data = FoldData(ds.subset(idx[:28]), ds.subset(idx[:0]), ds.subset(idx[28:]), core, addon)
    s = load_settings(REPO / "config" / "experiments" / "table_a1.yaml")["expr_mlp_token"]
    training = default_sections(training=dict(epochs=4, warmup_epochs=1, batch_size=8, lr_head=3e-3, patience=1,
                                              num_workers=0)).training
    model = default_sections(model={"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "expr_hidden": 16}).model
    m = regression.train_setting(s, data, tmp_path, fold=0, training=training, model=model,
                                 runtime=Runtime(seed=0, threads=1, device="cpu"), weights={})
    assert m["n_val"] == 0 and m["validation"] == "none" and m["selection"] == "last_epoch"
    assert m["epochs_run"] == 4 and m["best_epoch"] == 3 and not np.isfinite(m["val_mse"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["validation"] == "none" and written["val_mse"] is None and written["epochs_run"] == 4


def test_ridge_alpha_search_follows_the_policy():
    from morphomol.baselines.ridge import fit_from_sums, inner_plan_samples, middle_alpha

    alphas = [0.1, 1.0, 10.0, 100.0]
    two = pd.DataFrame({"sample_id": ["A1", "B1", "B2"], "patient_id": ["A", "B", "B"], "n_units": [5, 6, 7]})
    plan, n, by = inner_plan_samples(two, alphas, 5)
    assert (n, by) == (2, "patient") and plan["B1"] == plan["B2"] != plan["A1"]
    plan, n, by = inner_plan_samples(two[two.patient_id == "B"], alphas, 5)
    assert (n, by) == (2, "sample") and plan["B1"] != plan["B2"]
    plan, n, by = inner_plan_samples(two[two.sample_id == "A1"], alphas, 5)
    assert (n, by, plan) == (0, "none", {"A1": 0})
    assert middle_alpha(alphas) == 10.0 and fit_from_sums.__doc__


# ------------------------------------------------------------------------------ end to end, real Snakemake
def _two_fold_policies(folds: Path) -> None:
    """Fold testing PB (trains on PA's single sample): none; fold testing PA (trains on PB's two): sample."""
    f = pd.read_parquet(folds)
    test_of = {int(k): set(g.loc[g.partition == "test", "patient_id"]) for k, g in f.groupby("fold")}
    pol = _policies(folds)
    assert {frozenset(v) for v in test_of.values()} == {frozenset({"PA"}), frozenset({"PB"})}
    assert {next(iter(test_of[k])): pol[k] for k in pol} == {"PA": "sample", "PB": "none"}


def _run_metrics(paths: list[Path]) -> dict[str, dict]:
    out = {}
    for p in paths:
        m = json.loads(p.read_text())
        out[p.parent.name if p.parent.name.startswith("fold") else p.parent.parent.name] = m
    return out


@pytest.mark.slow
def test_two_patient_spots_cohort_runs_to_its_tables(tmp_path):
    spots_workdir(tmp_path)
    _ok(_run(tmp_path))
    r = tmp_path / "results" / "two_spots"
    _two_fold_policies(r / "splits" / "folds.parquet")
    table = pd.read_csv(r / "spots" / "tables" / "spots_settings.csv")
    assert "seed_head" in set(table["setting"])
    runs = _run_metrics(sorted((r / "spots" / "runs" / "seed_head").glob("fold*/seed*/metrics.json")))
    assert sorted(runs) == ["fold0", "fold1"]
    for m in runs.values():
        assert m["status"] == "ok" and np.isfinite(m["test_pearson"])
        if m["n_val"] == 0:  # the fold without validation: fixed epochs, last weights
            assert m["validation"] == "none" and m["selection"] == "last_epoch" and m["epochs_run"] == 3
        else:
            assert m["selection"] == "best_val"
    assert {m["n_val"] == 0 for m in runs.values()} == {True, False}
    log = (r / "logs" / "splits" / "folds.log").read_text()
    assert "fold 0: " in log and "fold 1: " in log and "(auto: its training part has 1 patient(s)" in log


@pytest.mark.slow
def test_two_patient_slides_cohort_runs_to_its_tables(tmp_path):
    slides_workdir(tmp_path)
    _ok(_run(tmp_path))
    r = tmp_path / "results" / "two_slides"
    _two_fold_policies(r / "splits" / "folds.parquet")
    assert (r / "slides" / "tables" / "retrieval.csv").is_file() and (r / "slides" / "tables" / "gene_sets.csv").is_file()
    runs = _run_metrics(sorted((r / "slides" / "runs" / "mean").glob("fold*/metrics.json")))
    assert sorted(runs) == ["fold0", "fold1"]
    assert sorted(m["validation"] for m in runs.values()) == ["none", "val partition"]
    assert all(m["status"] == "ok" for m in runs.values())


@pytest.mark.slow
def test_two_patient_fusion_cohort_runs_to_its_tables(tmp_path):
    fusion_workdir(tmp_path)
    _ok(_run(tmp_path, timeout=2400))
    r = tmp_path / "results" / "two_xenium"
    _two_fold_policies(r / "splits" / "folds.parquet")
    a1 = pd.read_csv(r / "fusion" / "tables" / "table_a1.csv")
    assert (a1["n_folds_ok"] == 2).all(), a1
    for setting in ("morph_vits_fz", "late_add_vits_fz_mlp_tile", "clip_tile"):
        runs = _run_metrics(sorted((r / "fusion" / "runs" / setting).glob("fold*/metrics.json")))
        assert sorted(runs) == ["fold0", "fold1"]
        assert sorted(m["validation"] for m in runs.values()) == ["none", "val partition"]
        assert {m["selection"] for m in runs.values() if m["validation"] == "none"} == {"last_epoch"}


@pytest.mark.slow
def test_five_donor_cells_cohort_runs_five_folds(tmp_path):
    cells_workdir(tmp_path)
    _ok(_run(tmp_path, timeout=2400))
    r = tmp_path / "results" / "five_donors" / "cells"
    f = pd.read_parquet(r / "folds" / "folds.parquet")
    assert f["fold"].nunique() == 5
    for _, g in f.groupby("fold"):
        assert g.groupby("partition")["patient_id"].nunique().to_dict() == {"fit": 3, "test": 1, "val": 1}
        assert set(g["validation"]) == {"patient"}
    assert (r / "tables").is_dir() and any((r / "tables").glob("*.csv"))


# ------------------------------------------------------------------------------ check-config, every study kind
def _load(cfg: Path):
    from morphomol.config import load_config

    return load_config(cfg, config_file="config.yaml", workdir=cfg.parent)


@pytest.mark.parametrize("build", [spots_workdir, slides_workdir, fusion_workdir], ids=["spots", "slides", "fusion"])
def test_check_config_rejects_more_folds_than_patients(tmp_path, build):
    from morphomol.errors import InputError

    cfg = build(tmp_path, n_folds=3)
    with pytest.raises(InputError) as exc:
        _load(cfg)
    assert exc.value.field == "splits.n_folds"
    assert "3 folds need >= 3 patients" in exc.value.message and "has 2 patient(s) — use n_folds: 2" in exc.value.message
    assert exc.value.file and exc.value.file.endswith(".yaml")
    build(tmp_path, n_folds=2)
    _load(tmp_path / "config.yaml")  # 2 folds: fine


@pytest.mark.parametrize("build", [spots_workdir, slides_workdir, fusion_workdir], ids=["spots", "slides", "fusion"])
def test_check_config_rejects_a_validation_policy_a_fold_cannot_honour(tmp_path, build):
    from morphomol.errors import InputError

    cfg = build(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    cohort_yaml = tmp_path / next(iter(doc["cohorts"].values()))
    c = yaml.safe_load(cohort_yaml.read_text())
    for value in ("patient", "sample"):
        c["splits"] = {"n_folds": 2, "validation": value}
        cohort_yaml.write_text(yaml.safe_dump(c))
        with pytest.raises(InputError) as exc:
            _load(cfg)
        assert exc.value.field == "splits.validation" and repr(value) in exc.value.message
        assert "use validation: none (or auto)" in exc.value.message
    c["splits"] = {"n_folds": 2, "validation": "none"}
    cohort_yaml.write_text(yaml.safe_dump(c))
    _load(cfg)


def _write_h5ad(path: Path, donors: list[str]) -> None:
    import anndata as ad
    import scipy.sparse as sp

    path.parent.mkdir(parents=True, exist_ok=True)
    obs = pd.DataFrame({"cell_type": ["CD4+ T"] * len(donors), "donor": donors},
                       index=[f"c{i}" for i in range(len(donors))])
    ad.AnnData(X=sp.csr_matrix(np.ones((len(donors), 3), np.float32)), obs=obs).write_h5ad(path)


@pytest.mark.parametrize("n_donors, n_folds, ok", [(5, 5, True), (4, 5, False)])
def test_check_config_counts_the_donors_of_a_cells_cohort(tmp_path, n_donors, n_folds, ok):
    """Donors from the h5ad obs column named by cells.donor_key: 5 donors allow 5 folds, 4 do not."""
    from morphomol.errors import InputError

    cfg = cells_workdir(tmp_path, n_folds=n_folds, n_donors=n_donors)
    _write_h5ad(tmp_path / "results" / "five_donors" / "simulated" / "SC1" / "cells.h5ad",
                [f"D{i % n_donors + 1}" for i in range(20)])
    if ok:
        _load(cfg)
        return
    with pytest.raises(InputError) as exc:
        _load(cfg)
    assert exc.value.field == "splits.n_folds"
    assert "5 folds need >= 5 donors; cohort 'five_donors' has 4 donor(s) — use n_folds: 4" in exc.value.message


def test_cells_folds_use_the_shared_rule():
    """5 donors make 5 donor-grouped folds (test 1, validation 1, fit 3); one training donor with two samples
    validates by (donor, sample); a single training donor with one sample has no validation."""
    from morphomol.errors import InputError
    from morphomol.studies.cells.folds import check_donor_folds, donor_folds

    rng = np.random.default_rng(0)
    donors = np.repeat([f"D{i}" for i in range(5)], 30)
    labels = rng.choice(["a", "b", "c"], len(donors))
    f = donor_folds(donors, labels, 5, 0.25, 0)
    check_donor_folds(f)
    for _, g in f.groupby("fold"):
        assert g.groupby("partition").size().to_dict() == {"fit": 3, "test": 1, "val": 1}
        assert set(g["validation"]) == {"patient"}
    with pytest.raises(InputError) as exc:
        donor_folds(donors[donors != "D4"], labels[donors != "D4"], 5, 0.25, 0)
    assert exc.value.field == "splits.n_folds" and "use n_folds: 4" in exc.value.message
    # two donors; D1's cells in two samples
    d = np.array(["D0"] * 20 + ["D1"] * 40)
    s = np.array(["X"] * 20 + ["Y"] * 20 + ["Z"] * 20)
    f2 = donor_folds(d, rng.choice(["a", "b"], 60), 2, 0.5, 0, samples=s)
    pol = {str(g.loc[g.partition == "test", "patient_id"].iloc[0]): g["validation"].iloc[0]
           for _, g in f2.groupby("fold")}
    assert pol == {"D0": "sample", "D1": "none"}
    with pytest.raises(InputError, match="splits.validation"):
        donor_folds(d, rng.choice(["a", "b"], 60), 2, 0.5, 0, "patient", samples=s)


BUILDERS = {"spots": spots_workdir, "slides": slides_workdir, "fusion": fusion_workdir, "cells": cells_workdir}

if __name__ == "__main__":  # python tests/test_small_cohorts.py <study> <dir>: write the workdir of a test
    d = Path(sys.argv[2]).resolve()
    d.mkdir(parents=True, exist_ok=True)
    print(BUILDERS[sys.argv[1]](d))
