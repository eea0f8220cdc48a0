"""The cells study's rules: the demo cohort's DAG resolves (without torch), every job declares what it reads,
the GPU rules declare their GPUs, and the simulator writes real formats the readers accept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TARGETS = ["results/demo_cells/cells/tables/table_cells.md", "results/demo_cells/cells/tables/plots"]

NO_TORCH = """
import sys
for name in ("torch", "torchvision", "timm", "transformers", "peft", "bitsandbytes", "open_clip"):
    sys.modules[name] = None
sys.argv = ["snakemake", *sys.argv[1:], "-n", "--forceall", "--quiet", "rules"]
from snakemake.cli import main
main()
"""


@pytest.fixture(scope="module")
def dry_run():
    res = subprocess.run([sys.executable, "-c", NO_TORCH, *TARGETS], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    return res.returncode, res.stdout + res.stderr


def test_demo_dag_resolves_without_torch(dry_run):
    rc, out = dry_run
    assert rc == 0, out
    for rule, n in (("cells_simulate_h5ad", 2), ("cells_simulate_xenium", 3), ("cells_register", 3), ("cells_units", 5),
                    ("cells_patches", 3), ("cells_base_model", 1), ("cells_split", 1), ("cells_fold", 3), ("cells_train", 3),
                    ("cells_eval", 6), ("cells_baselines", 3), ("cells_tables", 1), ("cells_plots", 1)):
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [rule]), "")
        assert line.split()[1:2] == [str(n)], f"{rule}: {line!r}\n{out}"


def _job_block(out: str, rule: str, needle: str) -> str:
    for block in out.split("\n\n"):
        if f"rule {rule}:" in block and needle in block:
            return block
    raise AssertionError(f"no {rule} job with {needle}:\n{out[:3000]}")


def test_jobs_declare_what_they_read():
    res = subprocess.run([SNAKEMAKE, "-n", "--forceall", *TARGETS], cwd=REPO, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    train = _job_block(out, "cells_train", "runs/llm/fold1/adapter")
    inputs = train.split("input:", 1)[1].split("output:", 1)[0]
    for needle in ("cells/folds/fold1.parquet", "cells/folds/fold1.json", "cells/base_model", "experiments/cells.yaml",
                   "samples/X2/images.zarr"):
        assert needle in inputs, train
    assert "samples/SC1/units.h5ad" not in inputs  # training reads the fold's sentences, not the counts
    ev = _job_block(out, "cells_eval", "runs/llm/fold2/predictions.parquet")
    assert "runs/llm/fold2/adapter" in ev.split("output:", 1)[0]
    untuned = _job_block(out, "cells_eval", "runs/untuned/fold2/predictions.parquet")
    assert "adapter" not in untuned.split("output:", 1)[0]
    units = _job_block(out, "cells_units", "samples/X3/units.h5ad").split("output:", 1)[0]
    for needle in ("X3/xenium/cell_feature_matrix.h5", "X3/xenium/cells.parquet", "X3/groups.csv", "X3/he.tif",
                   "samples/X3/registration.json", "demo_cells/labels.yaml"):
        assert needle in units, units
    fold = _job_block(out, "cells_fold", "cells/folds/fold2.parquet").split("output:", 1)[0]
    assert "cells/folds/folds.parquet" in fold and "samples/X1/units.h5ad" in fold  # the assignment is computed once
    split = _job_block(out, "cells_split", "cells/folds/folds.parquet")
    assert "samples/SC1/units.h5ad" in split.split("output:", 1)[0]
    sc = _job_block(out, "cells_units", "samples/SC2/units.h5ad").split("output:", 1)[0]
    assert "SC2/cells.h5ad" in sc and "registration" not in sc


def test_gpu_rules_declare_gpus():
    text = (REPO / "workflow" / "rules" / "cells.smk").read_text()
    train = text.split("rule cells_train:", 1)[1].split("\nrule ", 1)[0]
    assert "gpu=lambda w: cfg_of(w).cells.train.gpus" in train
    ev = text.split("rule cells_eval:", 1)[1].split("\nrule ", 1)[0]
    assert "gpu=1" in ev


def test_simulated_xenium_sample_is_read_by_the_real_readers(tmp_path):
    from morphomol.io.he import open_slide
    from morphomol.io.landmarks import read_alignment
    from morphomol.io.xenium import XeniumBundle
    from morphomol.studies.cells.ingest import read_10x_h5
    from morphomol.synthetic.cells import simulate_cells_sample
    from morphomol.synthetic.cells_xenium import PIXEL_SIZE, he_affine

    names = {"matrix": "xenium/cell_feature_matrix.h5", "cells": "xenium/cells.parquet",
             "transcripts": "xenium/transcripts.parquet", "experiment": "xenium/experiment.xenium",
             "groups": "groups.csv", "he": "he.tif", "alignment": "alignment.csv"}
    out = {k: tmp_path / v for k, v in names.items()}
    info = simulate_cells_sample(out, sample="X1", patient="D1", kind="xenium",
                                 params={"seed": 1, "xenium_cells": 60, "field_um": 200})
    b = XeniumBundle(tmp_path / "xenium")
    assert b.pixel_size == PIXEL_SIZE and b.n_rows > 0
    X, genes, barcodes = read_10x_h5(out["matrix"])
    assert X.shape == (info["n_cells"], len(genes)) and not any(g.startswith("NegControl") for g in genes)
    assert int(X.sum()) == b.n_rows  # one transcript per count
    s = open_slide(out["he"])
    assert s.mpp == pytest.approx(0.5) and s.meta_mpp == pytest.approx(0.5)
    m = read_alignment(out["alignment"])
    import numpy as np

    np.testing.assert_allclose(np.diag([PIXEL_SIZE, PIXEL_SIZE, 1]) @ m, he_affine(200, 0.5), atol=1e-9)
