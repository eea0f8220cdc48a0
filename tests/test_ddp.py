"""Data-parallel training (:mod:`morphomol.train.ddp`) on the CPU: gloo, two torchrun processes.

What must hold: the ranks' parts of every batch are the batches of one process (each fit tile once
per epoch, counted over ranks); two processes give the metrics of one process within a stated
tolerance — the gradient all-reduce sums in another order than one process does, so results agree
to float32 rounding: relative 1e-4 on every metric (observed: ~1e-7); a SIGTERM to the launcher
stops every rank at the same step, rank 0 writes ``resume.pt``, the launcher exits 143 and a rerun
resumes to the same metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.studies.fusion.data import fold_from_stores
from morphomol.studies.fusion.run import run_setting
from morphomol.train.checkpoint import RunOutputs
from morphomol.train.resume import RESUME_NAME
from morphomol.train.sources import InMemoryTiles
from test_training import RUNTIME, SETTINGS, TINY, cfg, fold_inputs, write_cohort

TESTS = Path(__file__).resolve().parent
REL = 1e-4  # two processes vs one: float32 reduction order only


def _metrics_close(a: dict, b: dict) -> None:
    for k in ("mean", "per_gene"):
        if k in a:
            np.testing.assert_allclose(_flat(a[k]), _flat(b[k]), rtol=REL, atol=1e-7, err_msg=k)
    for k in ("recall@1", "recall@5", "val_mse", "val_infonce"):
        if k in a:
            assert b[k] == pytest.approx(a[k], rel=REL, abs=1e-7), k
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]


def _flat(d: dict) -> list[float]:
    out = []
    for k in sorted(d):
        v = d[k]
        out += _flat(v) if isinstance(v, dict) else [np.nan if v is None else float(v)]
    return out


def test_store_shards_are_the_batches_of_one_process(tmp_path):
    cdir = write_cohort(tmp_path)
    fit = fold_from_stores(fold_inputs(cdir, with_images=True), buffer_chunks=2).fit
    kw = dict(batch_size=16, fields=["image", "tokens", "tile", "target"], seed=0)
    for extra in ({}, {"device": "cpu", "threads": 1}, {"device": "cpu", "threads": 0}):
        whole = [b["tile_id"] for b in fit.epoch(3, **kw)]
        parts = [[b["tile_id"] for b in fit.epoch(3, shard=(r, 2), **kw, **extra)] for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(whole)
        for w, p0, p1 in zip(whole, *parts):
            assert sorted(p0 + p1) == sorted(w) and not set(p0) & set(p1)
            assert abs(len(p0) - len(p1)) <= 1
        seen = [t for p in parts for b in p for t in b]
        assert sorted(seen) == sorted(fit.tile_ids)  # every fit tile once per epoch
    # a rank's part comes with its own data (images / tokens / targets of those tiles)
    ref = {t: i for b in fit.epoch(3, **kw) for i, t in enumerate(b["tile_id"])}
    assert ref and all(t in ref for b in fit.epoch(3, shard=(1, 2), **kw) for t in b["tile_id"])


def test_in_memory_shards():
    ds = InMemoryTiles([str(i) for i in range(37)], x=np.arange(37, dtype=np.float32)[:, None])
    whole = [b["tile_id"] for b in ds.epoch(1, batch_size=8, fields=["x"])]
    parts = [[b["tile_id"] for b in ds.epoch(1, batch_size=8, fields=["x"], shard=(r, 3))] for r in range(3)]
    for i, w in enumerate(whole):
        assert sum((p[i] for p in parts), []) == w


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    cdir = write_cohort(tmp_path)
    for name in ("early_add_vits_ft_mlp_token", "clip_tile"):
        c = cfg(epochs=3, batch_size=16, clip_batch_size=16)
        got = {}
        for p in (1, 2):
            got[p] = run_setting(SETTINGS[name], fold_inputs(cdir, with_images=True),
                                 RunOutputs.in_dir(tmp_path / f"{name}_{p}"), fold=0, training=c, model=TINY,
                                 weights={}, runtime=RUNTIME, processes=p)
        assert got[2]["processes"] == 2 and got[1]["processes"] == 1
        _metrics_close(got[1], got[2])
        hist = json.loads((tmp_path / f"{name}_2" / "checkpoint.json").read_text())["history"]
        assert [h["tiles"] for h in hist] == [80] * 3  # every fit tile once per epoch, counted over ranks
        run2 = tmp_path / f"{name}_2"
        assert (run2 / "metrics.json").exists() and not (run2 / RESUME_NAME).exists()
    pred = [pd.read_parquet(tmp_path / f"early_add_vits_ft_mlp_token_{p}" / "predictions.parquet") for p in (1, 2)]
    assert pred[0]["tile_id"].tolist() == pred[1]["tile_id"].tolist()  # gathered back in the unsharded order
    np.testing.assert_allclose(pred[0]["y_hat"], pred[1]["y_hat"], rtol=REL, atol=1e-6)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from morphomol.util.logs import setup_logging
from morphomol.studies.fusion.run import run_setting
from morphomol.train.checkpoint import RunOutputs
from test_training import RUNTIME, SETTINGS, TINY, cfg, fold_inputs
from pathlib import Path
setup_logging(None)
run_setting(SETTINGS["early_add_vits_ft_mlp_token"], fold_inputs(Path({cdir!r}), with_images=True),
            RunOutputs.in_dir({out!r}), fold=0, training=cfg(epochs=8, batch_size=8), model=TINY, weights={{}},
            runtime=RUNTIME, processes=2)
"""


@pytest.mark.slow
def test_sigterm_to_a_ddp_run_resumes(tmp_path):
    cdir = write_cohort(tmp_path)
    out = tmp_path / "run"
    code = CHILD.format(tests=str(TESTS), cdir=str(cdir), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if "epoch 2/8" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, "".join(lines) + rest
    assert (out / RESUME_NAME).exists() and not (out / "metrics.json").exists()
    c = cfg(epochs=8, batch_size=8)
    got = run_setting(SETTINGS["early_add_vits_ft_mlp_token"], fold_inputs(cdir, with_images=True),
                      RunOutputs.in_dir(out), fold=0, training=c, model=TINY, weights={}, runtime=RUNTIME, processes=2)
    ref = run_setting(SETTINGS["early_add_vits_ft_mlp_token"], fold_inputs(cdir, with_images=True),
                      RunOutputs.in_dir(tmp_path / "ref"), fold=0, training=c, model=TINY, weights={}, runtime=RUNTIME)
    assert got["resumed"] and not ref["resumed"]
    _metrics_close(ref, got)
