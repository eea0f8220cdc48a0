"""The verbs users expect (issue 18): ``morphomol init`` reproduces the demo sample sheet from simulated
bundles, ``doctor`` reports weights (with checksums) and the SLURM partitions against sinfo, ``export``
runs end to end from a workflow directory, ``predict`` applies a trained fusion setting to new samples;
progress reporting and the per-run history of the training loop."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from morphomol.cli import main
from test_io_samples import CORE, ADDON, finished_sample_dir, simulate  # noqa: F401  (module fixture)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ init
def test_init_reproduces_the_demo_sample_sheet(tmp_path, monkeypatch, capsys):
    """Two samples simulated as the demo's `simulate` rule does (results/demo/simulated/S0x): the sheet
    `morphomol init` writes is the demo sheet's first rows, byte for byte."""
    sim = tmp_path / "results" / "demo" / "simulated"
    for s in ("S01", "S02"):
        simulate(sim, ((s, "P1"),), n_regions=2)
    monkeypatch.chdir(tmp_path)
    assert main(["init", "results/demo/simulated", "--name", "demo", r"--patient-regex=-(P\d+)$"]) == 0
    got = (tmp_path / "config" / "cohorts" / "demo" / "samples.tsv").read_text()
    demo = (REPO / "config" / "cohorts" / "demo" / "samples.tsv").read_text().splitlines()
    assert got == "\n".join(demo[:3]) + "\n"
    cohort = yaml.safe_load((tmp_path / "config" / "cohorts" / "demo.yaml").read_text())
    assert cohort["samples"] == "config/cohorts/demo/samples.tsv" and cohort["panel"] == "config/cohorts/demo/panel.yaml"
    panel = yaml.safe_load((tmp_path / "config" / "cohorts" / "demo" / "panel.yaml").read_text())
    assert panel == {"mode": "hvg"}
    assert "cohort demo (xenium): 2 samples" in capsys.readouterr().out
    # nothing overwritten without --overwrite; without a patient rule the patient is marked, not guessed
    assert main(["init", "results/demo/simulated", "--name", "demo"]) == 1
    assert main(["init", "results/demo/simulated", "--name", "other"]) == 0
    text = (tmp_path / "config" / "cohorts" / "other" / "samples.tsv").read_text()
    assert text.startswith("# TODO S01: patient_id") and "\nS01\t\tresults/demo/simulated/S01/xenium" in text
    from morphomol.config import read_sample_sheet
    from morphomol.errors import InputError

    with pytest.raises(InputError, match="patient_id"):  # the marked sheet stops check-config until edited
        read_sample_sheet(tmp_path / "config" / "cohorts" / "other" / "samples.tsv", "xenium", workdir=tmp_path)


def test_init_space_ranger_outs(tmp_path, monkeypatch):
    for s in ("A1", "A2"):
        outs = tmp_path / "data" / s / "outs"
        (outs / "spatial").mkdir(parents=True)
        (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"")
        (outs / "spatial" / "tissue_hires_image.png").write_bytes(b"")
        (tmp_path / "data" / s / "captions.csv").write_text("barcode,caption\n")
    (tmp_path / "data" / "A1" / "A1_fullres.tif").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert main(["init", "data", "--name", "vis", "--patient-regex", r"data/(A\d)"]) == 0
    df = pd.read_csv(tmp_path / "config" / "cohorts" / "vis" / "samples.tsv", sep="\t", comment="#", dtype=str)
    assert list(df["format"]) == ["spaceranger"] * 2 and list(df["patient_id"]) == ["A1", "A2"]
    assert df.loc[0, "he_path"] == "data/A1/A1_fullres.tif" and df.loc[1, "image_scale"] == "hires"
    assert yaml.safe_load((tmp_path / "config" / "cohorts" / "vis.yaml").read_text())["kind"] == "visium"


# ------------------------------------------------------------------------------ doctor
def _fake_slurm(bin_dir: Path, sinfo_lines: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'slurm 23.02.7'\n")
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '{sinfo_lines}'\n")
    for f in ("sbatch", "sinfo"):
        os.chmod(bin_dir / f, 0o755)


def test_doctor_weights_checksums_and_partitions(tmp_path, monkeypatch, capsys):
    w = tmp_path / "uni.bin"
    w.write_bytes(os.urandom(1000))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"demo": "config/cohorts/demo.yaml"}
    config["encoders"] = {"uni": {"weights": str(w)}}
    cfile = tmp_path / "config.yaml"
    cfile.write_text(yaml.safe_dump(config))
    shutil.copytree(REPO / "profiles" / "slurm", tmp_path / "profile")
    _fake_slurm(tmp_path / "bin", "cpu* (null)\\ngpu-h100 gpu:h100:4\\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    rc = main(["doctor", "--config", str(cfile), "--profile", str(tmp_path / "profile")])
    out = capsys.readouterr().out
    lines = {ln.split(":", 1)[0]: ln for ln in out.splitlines()}
    assert hashlib.sha256(w.read_bytes()).hexdigest() in lines["[ ok ] weights uni"]
    assert lines["[ ok ] config"].endswith("1 cohort(s), 6 samples")
    assert "slurm 23.02.7" in lines["[ ok ] sbatch"]
    assert "[ ok ] partition cpu" in lines and "[ ok ] partition gpu-h100" in lines
    assert "not on this cluster" in lines["[FAIL] partition gpu-a100"] and "-> rename it" in lines["[FAIL] partition gpu-a100"]
    assert rc == 1  # a failed check fails the command
    w.unlink()  # a missing weight file: the config check and the weight line say so
    rc = main(["doctor", "--config", str(cfile), "--profile", str(tmp_path / "profile"), "--no-checksums"])
    out = capsys.readouterr().out
    assert rc == 1 and "[FAIL] config" in out and f"[FAIL] weights uni: {w} not found" in out


# ------------------------------------------------------------------------------ export from a workflow dir
def _workflow_dir(tmp: Path, finished: Path) -> Path:
    """A workflow directory with one finished sample: config + sheet + results/ as the rules lay them out."""
    (tmp / "workflow").mkdir(parents=True)
    shutil.copy(REPO / "workflow" / "paths.py", tmp / "workflow" / "paths.py")
    shutil.copytree(REPO / "config" / "experiments", tmp / "config" / "experiments")
    sim = finished / "sim" / "S01"
    (tmp / "config" / "c.tsv").write_text(
        "sample_id\tpatient_id\txenium_dir\the_path\talignment\tregions\n"
        f"S01\tP1\t{sim / 'xenium'}\t{sim / 'he.tif'}\t{sim / 'keypoints.csv'}\t{sim / 'regions.geojson'}\n"
        f"S02\tP2\t{sim / 'xenium'}\t{sim / 'he.tif'}\t\t\n")
    (tmp / "config" / "panel.yaml").write_text(yaml.safe_dump({"core": CORE, "addon": ADDON}))
    (tmp / "config" / "c.yaml").write_text(yaml.safe_dump({"samples": "config/c.tsv", "panel": "config/panel.yaml",
                                                           "splits": {"n_folds": 2}}))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohorts"] = {"c": "config/c.yaml"}
    (tmp / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(finished / "samples" / "S01", tmp / "results" / "c" / "samples" / "S01")
    return tmp


def test_export_cli_from_a_workflow_directory(tmp_path, monkeypatch, capsys, finished_sample_dir):  # noqa: F811
    import geopandas as gpd
    import spatialdata as sd

    wd = _workflow_dir(tmp_path / "wd", finished_sample_dir)
    monkeypatch.chdir(wd)
    assert main(["export", "qupath", "--cohort", "c", "--samples", "S01"]) == 0
    assert len(gpd.read_file(wd / "results" / "c" / "export" / "qupath" / "S01.geojson")) > 10
    assert main(["export", "explorer", "--cohort", "c", "--samples", "S01", "--out", "exp"]) == 0
    assert (wd / "exp" / "S01_he_imagealignment.csv").is_file()
    assert main(["export", "spatialdata", "--cohort", "c", "--samples", "S01", "--no-transcripts"]) == 0
    s = sd.read_zarr(str(wd / "results" / "c" / "export" / "spatialdata" / "S01.zarr"))
    assert "transcripts" not in s.points and len(s.shapes["units"]) == s.tables["table"].n_obs
    capsys.readouterr()
    # S02 has not run: one clear error, and nothing of the other samples is written first
    assert main(["export", "qupath", "--cohort", "c", "--out", "q2"]) == 1
    err = capsys.readouterr().err
    assert "sample S02 of cohort c has not run" in err and "results/c/samples/S02/units.h5ad" in err
    assert not (wd / "q2").exists()


# ------------------------------------------------------------------------------ predict
def test_predict_applies_a_fusion_checkpoint_to_new_samples(tmp_path, finished_sample_dir):  # noqa: F811
    import anndata as ad
    import torch
    import zarr

    from morphomol.config import ModelConfig, default_sections, typed
    from morphomol.config.sections import to_plain
    from morphomol.data.features import write_features
    from morphomol.studies.fusion.models import build_model
    from morphomol.studies.fusion.settings import load_settings
    from morphomol.tools.predict import NewSample, predict_fusion, write_predictions
    from morphomol.train.checkpoint import save_checkpoint

    s = finished_sample_dir / "samples" / "S01"
    setting = load_settings(REPO / "config" / "experiments" / "table_a1.yaml")["late_add_vits_fz_mlp_tile"]
    n = zarr.open_group(str(s / "images.zarr"), mode="r")["images"].shape[0]
    feats = np.random.default_rng(2).normal(size=(n, 16)).astype(np.float32)
    store = write_features(tmp_path / "S01.zarr", feats, encoder="vit_s", tiles_store=s / "images.zarr")
    model_cfg = typed(ModelConfig, to_plain(default_sections().model))
    torch.manual_seed(0)
    net = build_model(setting, len(CORE), len(ADDON), model_cfg, morph_dim=16)
    run = tmp_path / "runs" / setting.name / "fold0"
    save_checkpoint(net, run / "checkpoint.safetensors", run / "checkpoint.json",
                    {"setting": setting.name, "setting_fields": setting.to_dict(), "fold": 0, "core_genes": CORE,
                     "addon_genes": ADDON, "model": model_cfg, "morph_dim": 16, "expr_dim": None,
                     "features": {"vit_s": "cache"}, "seed": 0})
    new = [NewSample("S01", s / "units.h5ad", s / "tokens.zarr", s / "images.zarr", {"vit_s": store})]
    preds = predict_fusion(run, new, batch_size=17)
    paths = write_predictions(new, {setting.name: preds}, tmp_path / "out")
    p = ad.read_h5ad(paths[0])
    u = ad.read_h5ad(s / "units.h5ad")
    # independent of the loader: the model on the unit table's counts and the stored features, row by row
    with torch.no_grad():
        want = net.eval()({"tile": torch.from_numpy(u[:, CORE].X.toarray().astype(np.float32)),
                           "morph_feat": torch.from_numpy(feats)}).numpy()
    assert list(p.obs_names) == list(u.obs_names) and list(p.var_names) == ADDON
    np.testing.assert_allclose(p.layers[f"pred_{setting.name}"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.layers["measured"], np.log1p(u[:, ADDON].X.toarray()), rtol=1e-6)
    assert (p.obs["fold"] == -1).all() and (p.obs["partition"] == "new").all()
    from morphomol.errors import InputError

    with pytest.raises(InputError, match="reads cached vit_s features; none for sample"):
        predict_fusion(run, [NewSample("S01", s / "units.h5ad", s / "tokens.zarr")])


# ------------------------------------------------------------------------------ progress, history
def test_progress_log_lines_are_rate_limited(monkeypatch, caplog):
    from morphomol.util import progress as prog

    monkeypatch.setenv("MORPHOMOL_PROGRESS", "log")
    clock = iter(np.arange(0, 1000, 7.0))
    lp = prog.LogProgress("export", 100, "sample", every=30, logger=logging.getLogger("morphomol.t"),
                          clock=lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="morphomol.t"):
        for _ in range(100):
            lp.update()
        lp.close()
    # 7 s per item, a line at most every 30 s: ~1 line per 5 items, not 100
    assert 15 <= lp.lines <= 25 and "100/100 sample (100%" in caplog.records[-1].getMessage()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("MORPHOMOL_PROGRESS")
    assert prog.mode() == "log" and not prog.interactive()
    assert list(prog.progress(range(3), desc="x")) == [0, 1, 2]


def test_fit_writes_history_csv_and_learning_curve(tmp_path):
    import torch

    from morphomol.config import TrainingConfig, default_sections
    from morphomol.train.loop import fit
    from morphomol.train.runtime import Runtime
    from morphomol.train.sources import InMemoryTiles

    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.Linear(3, 1)

        def forward(self, b):
            return self.l(b["x"].float())

        def param_groups(self, lr_head, lr_backbone):
            return [{"params": list(self.parameters()), "lr": lr_head}]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32))[:, None]
    src = InMemoryTiles([f"t{i}" for i in range(64)], x=x, target=y)
    t = default_sections().training
    training = TrainingConfig(**{**t.__dict__, "epochs": 3, "warmup_epochs": 1, "batch_size": 16, "num_workers": 0,
                                 "lr_head": 0.05})
    val = lambda m: (float(((m({"x": torch.from_numpy(x)}).detach().numpy() - y) ** 2).mean()), {"val_r": 0.5})  # noqa: E731
    res = fit(Lin(), src, ["x", "target"], training, Runtime(seed=0, device="cpu"), tmp_path / "run",
              loss_fn=lambda m, b: ((m(b) - b["target"].float()) ** 2).mean(), validate=val, fingerprint={"k": "v"})
    h = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(h["epoch"]) == [1, 2, 3] and {"loss", "val_mse", "val_r", "tiles_per_second"} <= set(h.columns)
    np.testing.assert_allclose(h["loss"], [r["loss"] for r in res.history])
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 5000
    fit(Lin(), src, ["x", "target"], training, Runtime(seed=0, device="cpu"), tmp_path / ".scratch",
        loss_fn=lambda m, b: ((m(b) - b["target"].float()) ** 2).mean(), validate=val, fingerprint={"k": "v"})
    assert not (tmp_path / ".scratch" / "history.csv").exists()  # hidden scratch dirs keep none
