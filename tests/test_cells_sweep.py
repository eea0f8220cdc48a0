"""Regression tests of the bad-input sweep (issue 23) in the cells study: duplicate cell ids in an AnnData,
and the predict entry with a truncated adapter or a missing ``--h5ad`` (one clear InputError each, no
SafetensorError / FileNotFoundError traceback)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.studies.cells.ingest import build_units
from morphomol.studies.cells.predict import predict_cells
from morphomol.studies.cells.trainer import TrainInputs, TrainOutputs, train_fold
from morphomol.synthetic.cells_fixtures import TOY_CLASSES, toy_fold, toy_model
from morphomol.train.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "config" / "experiments" / "cells.yaml"


def test_duplicate_cell_ids_in_an_anndata_are_one_clear_error(tmp_path):
    (tmp_path / "labels.yaml").write_text("T cell: [T]\nB cell: [B]\n")
    obs = pd.DataFrame({"cell_type": ["T", "B", "T"]}, index=["c0", "c1", "c0"])
    with pytest.warns(UserWarning, match="not unique"):  # anndata only warns
        a = ad.AnnData(X=sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 1]], np.float32)), obs=obs,
                       var=pd.DataFrame(index=["G0", "G1"]))
    a.write_h5ad(tmp_path / "dup.h5ad")
    out = tmp_path / "units.h5ad"
    with pytest.raises(InputError) as e:
        build_units(sample="S1", patient="P", out_units=out, cfg=default_sections().cells,
                    label_map=tmp_path / "labels.yaml", h5ad=tmp_path / "dup.h5ad")
    msg = e.value.message
    assert "dup.h5ad" in msg and "obs_names" in msg and "'c0'" in msg and "duplicate" in msg
    assert not out.exists()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("cells_predict")
    fold = toy_fold(d / "fold", n_per_class=6)
    model = toy_model(d / "model", fold["genes"], TEMPLATES)
    cfg = default_sections(cells={"tasks": {"gene_to_type": [[0, 1.0]]}, "model": {"tiny": {}}, "n_genes": 8,
                                  "train": {"steps": 1, "batch_size": 2, "gradient_checkpointing": False,
                                            "val_examples": 2}}).cells
    out = TrainOutputs(adapter=d / "run" / "adapter", metrics=d / "run" / "m.json", log_csv=d / "run" / "log.csv")
    train_fold(TrainInputs(fold_table=fold["table"], fold_meta=fold["meta"], base_model=model, templates=TEMPLATES,
                           image_stores=dict(fold["images"])),
               out, cfg=cfg, runtime=Runtime(seed=0, threads=1))
    genes = fold["genes"]
    rng = np.random.default_rng(0)
    cells = ad.AnnData(X=sp.csr_matrix(rng.poisson(2, (4, len(genes))).astype(np.float32)),
                       obs=pd.DataFrame({"cell_type": list(TOY_CLASSES)[:2] * 2}, index=[f"n{i}" for i in range(4)]),
                       var=pd.DataFrame(index=genes))
    cells.write_h5ad(d / "new.h5ad")
    return {"adapter": out.adapter, "h5ad": d / "new.h5ad", "dir": d}


def test_predict_with_a_truncated_adapter_is_a_clear_error(adapter, tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter["adapter"], bad)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy interrupted halfway
    with pytest.raises(InputError) as e:
        predict_cells(h5ad=adapter["h5ad"], adapter=bad, out=tmp_path / "p.csv", device="cpu")
    assert "adapter_model.safetensors" in e.value.message and "complete" in e.value.message
    assert not (tmp_path / "p.csv").exists()
    res = subprocess.run([sys.executable, "-m", "morphomol.studies.cells.predict", "--adapter", str(bad), "--h5ad",
                          str(adapter["h5ad"]), "--out", str(tmp_path / "p.csv"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "SafetensorError" not in res.stderr
    assert "adapter_model.safetensors" in res.stderr
    # the complete adapter still labels the new cells
    df = predict_cells(h5ad=adapter["h5ad"], adapter=adapter["adapter"], out=tmp_path / "p.csv", device="cpu",
                       label_key="cell_type")
    assert len(df) == 4 and set(df["predicted"]) <= set(TOY_CLASSES) and (tmp_path / "p.csv").is_file()


def test_predict_with_a_missing_h5ad_is_a_clear_error(adapter, tmp_path):
    missing = tmp_path / "nowhere.h5ad"
    with pytest.raises(InputError) as e:
        predict_cells(h5ad=missing, adapter=adapter["adapter"], out=tmp_path / "p.csv")
    assert "nowhere.h5ad" in e.value.message and "--h5ad" in e.value.message
    res = subprocess.run([sys.executable, "-m", "morphomol.studies.cells.predict", "--adapter", str(adapter["adapter"]),
                          "--h5ad", str(missing), "--out", str(tmp_path / "p.csv")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "FileNotFoundError" not in res.stderr
    assert "nowhere.h5ad" in res.stderr and "--h5ad" in res.stderr

