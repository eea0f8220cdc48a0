"""The trainer on synthetic in-memory tiles: resume after SIGTERM (only onto identical inputs, never
on a corrupt resume file), fusion vs unimodal, Min-MAE, CLIP; and through the real stores."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from morphomol.config import ModelConfig, default_sections, typed
from morphomol.errors import InputError
from morphomol.studies.fusion import clip as fusion_clip
from morphomol.studies.fusion import regression
from morphomol.studies.fusion.baselines import min_mae_select, run_min_mae
from morphomol.studies.fusion.data import FoldData, FoldInputs, fold_from_stores
from morphomol.studies.fusion.models import build_model
from morphomol.studies.fusion.run import run_setting
from morphomol.studies.fusion.settings import load_settings
from morphomol.synthetic.fixtures import synthetic_tiles
from morphomol.train.checkpoint import RunOutputs
from morphomol.train.loop import learning_rate
from morphomol.train.resume import RESUME_NAME, Preempted
from morphomol.train.runtime import Runtime
from morphomol.train.sources import InMemoryTiles, epoch_batches

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = load_settings(ROOT / "config" / "experiments" / "table_a1.yaml")
TINY = default_sections(model={"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "expr_hidden": 32}).model
RUNTIME = Runtime(seed=0, threads=1, device="cpu")


def fold_data(n_fit: int, n_val: int, n_test: int, seed: int = 0, n_targets: int = 3) -> FoldData:
    ds, core, addon = synthetic_tiles(n_fit + n_val + n_test, n_core=6, n_targets=n_targets, seed=seed)
    idx = np.arange(len(ds))
    return FoldData(ds.subset(idx[:n_fit]), ds.subset(idx[n_fit:n_fit + n_val]), ds.subset(idx[n_fit + n_val:]),
                    core, addon)


def cfg(**kw):
    """The training section with the tests' small-run values (schema defaults for the rest)."""
    base = dict(epochs=3, warmup_epochs=1, batch_size=16, lr_head=3e-3, lr_backbone=1e-3, min_lr=1e-5,
                patience=10, num_workers=0)
    base.update(kw)
    return default_sections(training=base).training


def train_setting(setting, data, out, *, train_cfg, model_cfg=TINY, encoders_cfg=None, **kw):
    """One regression run with the tests' runtime (CPU, 1 thread, seed 0)."""
    return regression.train_setting(setting, data, out, training=train_cfg, model=model_cfg, runtime=RUNTIME,
                                    weights=encoders_cfg or {}, **kw)


def train_clip(setting, data, out, *, train_cfg, model_cfg=TINY, **kw):
    return fusion_clip.train_clip(setting, data, out, training=train_cfg, model=model_cfg, runtime=RUNTIME, **kw)


# ---------------------------------------------------------------- schedule and order


def test_learning_rate_warmup_then_cosine():
    lrs = [learning_rate(s, 1e-4, 1e-6, warmup_steps=10, total_steps=110) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.5 * (1e-4 + 1e-6))
    assert lrs[110] == pytest.approx(1e-6)


def test_epoch_order_depends_only_on_seed_and_epoch():
    ds = InMemoryTiles([str(i) for i in range(50)])
    a = epoch_batches(ds, 16, seed=3, epoch=2)
    assert [len(b) for b in a] == [16, 16, 16, 2]
    assert sorted(np.concatenate(a).tolist()) == list(range(50))
    assert all(np.array_equal(x, y) for x, y in zip(a, epoch_batches(ds, 16, seed=3, epoch=2)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch_batches(ds, 16, seed=3, epoch=1)))
    assert [len(b) for b in epoch_batches(ds, 16, 0, 0, drop_last=True)] == [16, 16, 16]


# ---------------------------------------------------------------- resume after SIGTERM


def _read(out: Path) -> tuple[dict, pd.DataFrame]:
    m = json.loads((out / "metrics.json").read_text())
    return m, pd.read_parquet(out / "predictions.parquet")


def test_sigterm_mid_epoch_then_rerun_gives_identical_results(tmp_path):
    data = fold_data(48, 16, 16)
    setting = SETTINGS["early_add_vits_ft_mlp_token"]
    c = cfg(epochs=3)  # 3 steps per epoch

    ref = tmp_path / "ref"
    train_setting(setting, data, ref, train_cfg=c, model_cfg=TINY)
    ref_metrics, ref_pred = _read(ref)
    assert not (ref / RESUME_NAME).exists()

    run = tmp_path / "run"

    def kill_at_step_5(step: int) -> None:  # mid epoch 2: a real signal through the handler
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted) as exc:
        train_setting(setting, data, run, train_cfg=c, model_cfg=TINY, on_step=kill_at_step_5)
    assert exc.value.code == 143
    assert (run / RESUME_NAME).exists()
    assert not (run / "metrics.json").exists() and not (run / "checkpoint.safetensors").exists()
    # the resume file is loadable without unpickling arbitrary objects
    state = torch.load(run / RESUME_NAME, weights_only=True)
    assert (state["state"]["epoch"], state["state"]["batch"], state["state"]["step"]) == (1, 2, 5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored

    steps = []
    got = train_setting(setting, data, run, train_cfg=c, model_cfg=TINY, on_step=steps.append)
    assert steps[0] == 6 and steps[-1] == 9  # continued after the 5 consumed steps
    assert got["resumed"] is True
    run_metrics, run_pred = _read(run)
    for key in ("mean", "per_gene", "best_epoch", "epochs_run", "val_mse"):
        assert run_metrics[key] == ref_metrics[key], key
    pd.testing.assert_frame_equal(run_pred, ref_pred)
    assert not (run / RESUME_NAME).exists()
    # the logged epoch loss of the interrupted epoch is summed in two parts: equal up to rounding
    assert [h["loss"] for h in json.loads((run / "checkpoint.json").read_text())["history"]] == \
        pytest.approx([h["loss"] for h in json.loads((ref / "checkpoint.json").read_text())["history"]], rel=1e-5)


def test_stale_resume_file_is_ignored(tmp_path):
    data = fold_data(32, 16, 16)
    s = SETTINGS["expr_mlp_token"]
    with pytest.raises(Preempted):
        train_setting(s, data, tmp_path, train_cfg=cfg(epochs=2), model_cfg=TINY,
                      on_step=lambda st: os.kill(os.getpid(), signal.SIGTERM))
    other = train_setting(s, data, tmp_path, train_cfg=cfg(epochs=2, lr_head=1e-3), model_cfg=TINY)
    assert other["resumed"] is False and other["epochs_run"] == 2


def test_corrupt_resume_file_warns_and_starts_fresh(tmp_path, caplog):
    data = fold_data(32, 16, 16)
    s = SETTINGS["expr_mlp_token"]
    with pytest.raises(Preempted):
        train_setting(s, data, tmp_path, train_cfg=cfg(epochs=2), on_step=lambda st: os.kill(os.getpid(), signal.SIGTERM))
    resume = tmp_path / RESUME_NAME
    resume.write_bytes(resume.read_bytes()[:100])  # truncated, as by a kill during a write
    with caplog.at_level("WARNING", logger="morphomol"):
        got = train_setting(s, data, tmp_path, train_cfg=cfg(epochs=2))
    assert got["resumed"] is False and got["epochs_run"] == 2
    assert any("cannot read resume state" in r.getMessage() and str(resume) in r.getMessage() for r in caplog.records)
    assert not resume.exists()


# ---------------------------------------------------------------- outputs, checkpoint, features


def test_outputs_and_checkpoint_reload(tmp_path):
    from safetensors.torch import load_file

    data = fold_data(48, 16, 24)
    s = SETTINGS["late_concat_vits_ft_mlp_tile"]
    m = train_setting(s, data, tmp_path, fold=2, train_cfg=cfg(epochs=2), model_cfg=TINY)
    for key in ("setting", "fold", "kind", "status", "n_fit", "n_val", "n_test", "genes", "mean", "per_gene",
                "best_epoch", "epochs_run", "train_seconds", "tiles_per_second"):
        assert key in m
    assert (m["fold"], m["kind"], m["n_test"], m["pretrained"]) == (2, "regression", 24, False)
    assert set(m["mean"]) == {"pearson", "spearman", "mse", "mae"}
    pred = pd.read_parquet(tmp_path / "predictions.parquet")
    assert list(pred.columns) == ["tile_id", "gene", "y", "y_hat", "sample_id"] and len(pred) == 24 * 3
    assert set(pred["sample_id"]) == {"synth"}  # one row group per sample (the in-memory tiles' one sample)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["setting"] == s.name and meta["addon_genes"] == data.addon_genes
    model = build_model(s, meta["n_core"], meta["n_targets"], typed(ModelConfig, meta["model"]))
    model.load_state_dict(load_file(str(tmp_path / "checkpoint.safetensors")))
    model.eval()
    with torch.no_grad():
        y_hat = model(data.test.get_batch(np.arange(24), s.batch_fields)).numpy()  # same order as written
    np.testing.assert_allclose(y_hat.reshape(-1), pred["y_hat"].to_numpy(), rtol=1e-5, atol=1e-6)
    # mse in metrics.json is the mean of the per-gene MSEs of the written predictions
    mse = ((pred.y - pred.y_hat) ** 2).groupby(pred.gene, observed=True).mean().mean()
    assert m["mean"]["mse"] == pytest.approx(mse, rel=1e-5)


def test_frozen_morph_trains_on_cached_features(tmp_path):
    import zarr

    data = fold_data(48, 16, 16)
    s = SETTINGS["late_add_vits_fz_mlp_token"]
    computed = train_setting(s, data, tmp_path / "a", train_cfg=cfg(epochs=2), model_cfg=TINY)
    assert computed["features"] == {"vit_s": "computed"}
    # the same frozen (random-init, seed 0) ViT features written as a per-sample features zarr
    from morphomol.models.vit import ViTEncoder
    from morphomol.studies.fusion.data import frozen_vit_features

    torch.manual_seed(0)
    vit = ViTEncoder(TINY.vit)
    every = InMemoryTiles(data.fit.tile_ids + data.val.tile_ids + data.test.tile_ids,
                          image=np.concatenate([d.arrays["image"] for d in (data.fit, data.val, data.test)]))
    feats = frozen_vit_features(vit, every, 16, torch.device("cpu"))
    g = zarr.open_group(str(tmp_path / "synth.zarr"), mode="w")
    g.create_array("features", shape=feats.shape, dtype="float32")[:] = feats
    g.attrs.update({"encoder": "vit_s", "dim": int(feats.shape[1]), "n_tiles": int(feats.shape[0])})
    cached_data = FoldData(data.fit, data.val, data.test, data.core_genes, data.addon_genes,
                           feature_paths={"vit_s": {"synth": tmp_path / "synth.zarr"}})
    cached = train_setting(s, cached_data, tmp_path / "b", train_cfg=cfg(epochs=2), model_cfg=TINY)
    assert cached["features"] == {"vit_s": "cache"}
    for g_ in data.addon_genes:
        assert cached["per_gene"][g_]["mse"] == pytest.approx(computed["per_gene"][g_]["mse"], rel=1e-4)


def test_frozen_vit_stays_unchanged_in_early_fusion(tmp_path):
    from safetensors.torch import load_file

    data = fold_data(32, 16, 16)
    s = SETTINGS["early_add_vits_fz_mlp_token"]
    train_setting(s, data, tmp_path, train_cfg=cfg(epochs=1), model_cfg=TINY)
    torch.manual_seed(0)
    init = build_model(s, 6, 3, TINY).state_dict()
    trained = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert all(torch.equal(trained[k], v) for k, v in init.items() if k.startswith("vit."))
    assert not torch.equal(trained["expr.net.0.weight"], init["expr.net.0.weight"])


def test_settings_without_weights_fail_clearly(tmp_path):
    data = fold_data(16, 8, 8)
    with pytest.raises(InputError, match="encoders.phikon.weights"):
        train_setting(SETTINGS["morph_phikon_fz"], data, tmp_path, train_cfg=cfg(epochs=1), model_cfg=TINY)
    with pytest.raises(InputError, match="cached 'phikon' features"):
        train_setting(SETTINGS["morph_phikon_fz"], data, tmp_path, train_cfg=cfg(epochs=1), model_cfg=TINY,
                      encoders_cfg={"phikon": "phikon.safetensors"})
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------- fusion vs unimodal


def test_fusion_beats_both_unimodal_settings_on_jointly_determined_gene(tmp_path):
    # target 0 = b + u: b from the image (brightness), u from the transcripts (core gene 0 rate)
    data = fold_data(160, 48, 64, seed=1)
    c = cfg(epochs=4, batch_size=12, warmup_epochs=1)
    mse = {}
    for name in ("early_add_vits_ft_mlp_token", "morph_vits_ft", "expr_mlp_token"):
        m = train_setting(SETTINGS[name], data, tmp_path / name, train_cfg=c, model_cfg=TINY)
        mse[name] = m["per_gene"]["ADD0"]["mse"]
    var = float(np.var(data.test.arrays["target"][:, 0]))
    assert mse["early_add_vits_ft_mlp_token"] < 0.5 * min(mse["morph_vits_ft"], mse["expr_mlp_token"]), mse
    assert mse["early_add_vits_ft_mlp_token"] < 0.25 * var, (mse, var)


# ---------------------------------------------------------------- Min-MAE


def test_min_mae_picks_the_copied_core_gene(tmp_path):
    rng = np.random.default_rng(0)
    tile = rng.poisson(3.0, size=(200, 5)).astype(np.float32)
    target = np.stack([np.log1p(tile[:, 3]), np.log1p(tile[:, 1]) + 0.05, rng.normal(1, 0.1, 200)], 1)
    best, mae = min_mae_select(np.log1p(tile), target)
    assert best[0] == 3 and mae[0, 3] == 0.0
    assert best[1] == 1
    ids = [f"s__{i:06d}" for i in range(200)]
    ds = InMemoryTiles(ids, tile=tile, target=target.astype(np.float32))
    data = FoldData(ds.subset(np.arange(150)), ds.subset(np.arange(0)), ds.subset(np.arange(150, 200)),
                    [f"C{i}" for i in range(5)], ["T0", "T1", "T2"])
    m = run_min_mae(data, tmp_path, fold=1)
    assert m["source_gene"]["T0"] == "C3" and m["source_gene"]["T1"] == "C1"
    assert m["per_gene"]["T0"]["mse"] == 0.0 and m["per_gene"]["T0"]["pearson"] == pytest.approx(1.0)
    pred = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(pred) == 50 * 3
    assert json.loads((tmp_path / "checkpoint.json").read_text())["source_gene"]["T0"] == "C3"


# ---------------------------------------------------------------- CLIP


def test_clip_training_reports_recall(tmp_path):
    data = fold_data(64, 32, 48)
    m = train_clip(SETTINGS["clip_token"], data, tmp_path, train_cfg=cfg(epochs=2, clip_batch_size=16),
                   model_cfg=TINY)
    assert m["kind"] == "clip" and m["status"] == "ok"
    assert m["random_recall@1"] == pytest.approx(1 / 16) and m["random_recall@5"] == pytest.approx(5 / 16)
    assert 0.0 <= m["recall@1"] <= m["recall@5"] <= 1.0
    assert m["retrieval"]["n_chunks"] == 3
    assert math.isfinite(m["val_infonce"])
    assert (tmp_path / "checkpoint.safetensors").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["recall@5"] == m["recall@5"]


# ---------------------------------------------------------------- through the real stores (morphomol.store)


def write_cohort(root: Path, n_per_sample: int = 40, samples=("S0", "S1", "S2", "S3"), chunk: int = 16) -> Path:
    """A cohort on disk in the stage contracts: tiles.zarr, tokens.zarr (CSR), tiles.parquet (ids), the fold
    table (fold 0) + panel of fold 0."""
    import zarr

    cdir = root / "results" / "synth"
    rows = []
    all_genes = [f"CORE{j}" for j in range(6)] + ["ADD0", "ADD1", "CTRL"]
    for si, s in enumerate(samples):
        ds, _, _ = synthetic_tiles(n_per_sample, n_core=6, n_targets=2, seed=10 + si)
        tok = ds.arrays["tokens"].astype(np.int64)  # (N, 196, 6) counts
        n = len(ds)
        # add-on genes as counts over the tile: ADD0 from core 0 and brightness, ADD1 random
        add = np.stack([tok[:, :, 0].sum(1) + (ds.arrays["image"][:, 0, 0, 0] // 40),
                        np.random.default_rng(si).poisson(3, n)], 1)
        full_tc = np.concatenate([tok.sum(1), add, np.zeros((n, 1), np.int64)], 1).astype(np.uint32)
        indptr, tk, gn, ct = [0], [], [], []
        for i in range(n):
            t_idx, g_idx = np.nonzero(tok[i])
            tk.append(t_idx)
            gn.append(g_idx)
            ct.append(tok[i][t_idx, g_idx])
            indptr.append(indptr[-1] + len(t_idx))
        d = cdir / "samples" / s
        g = zarr.open_group(str(d / "tiles.zarr"), mode="w")
        g.create_array("images", data=ds.arrays["image"], chunks=(chunk, 224, 224, 3))
        t = zarr.open_group(str(d / "tokens.zarr"), mode="w")
        t.attrs.update({"genes": all_genes, "grid": 14, "sample": s})
        t.create_array("indptr", data=np.array(indptr, np.int64))
        t.create_array("token", data=np.concatenate(tk).astype(np.uint8))
        t.create_array("gene", data=np.concatenate(gn).astype(np.uint16))
        t.create_array("count", data=np.concatenate(ct).astype(np.uint32))
        t.create_array("tile_counts", data=full_tc, chunks=(chunk, len(all_genes)))
        part = ["fit", "fit", "val", "test"][si % 4]
        pd.DataFrame({"tile_id": [f"{s}__{i:06d}" for i in range(n)], "index": np.arange(n)}).to_parquet(
            d / "tiles.parquet")
        rows.append({"fold": 0, "sample_id": s, "patient_id": f"P{si}", "n_units": n, "partition": part})
    (cdir / "splits").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(cdir / "splits" / "folds.parquet")
    (cdir / "panels").mkdir()
    (cdir / "panels" / "fold0.json").write_text(json.dumps(
        {"mode": "yaml", "core": [f"CORE{j}" for j in range(6)], "addon": ["ADD0", "ADD1"]}))
    return cdir


def fold_inputs(cdir: Path, with_images: bool = False) -> FoldInputs:
    samples = sorted(p.name for p in (cdir / "samples").iterdir())
    return FoldInputs(folds=cdir / "splits" / "folds.parquet", fold=0, panel=cdir / "panels" / "fold0.json",
                      tokens={s: cdir / "samples" / s / "tokens.zarr" for s in samples},
                      units={s: cdir / "samples" / s / "tiles.parquet" for s in samples},
                      tiles={s: cdir / "samples" / s / "tiles.zarr" for s in samples} if with_images else {})


def test_store_backed_runs_resume_and_match_the_split(tmp_path):
    cdir = write_cohort(tmp_path)
    data = fold_from_stores(fold_inputs(cdir))
    assert (len(data.fit), len(data.val), len(data.test)) == (80, 40, 40)
    # a store epoch is the fit partition, once, in an order fixed by (seed, epoch)
    ep = list(data.fit.epoch(1, batch_size=16, fields=["tokens", "tile", "target"], seed=0))
    ids = [t for b in ep for t in b["tile_id"]]
    assert sorted(ids) == sorted(data.fit.tile_ids)
    assert ids == [t for b in data.fit.epoch(1, batch_size=16, fields=["tile"], seed=0) for t in b["tile_id"]]
    b = ep[0]
    assert b["tokens"].shape == (16, 196, 6) and torch.equal(b["tokens"].sum(1), b["tile"])
    assert torch.all(b["target"] >= 0) and b["target"].dtype == torch.float32

    # resume through the store's chunk-shuffled loader (SIGTERM mid epoch 2)
    s = SETTINGS["expr_mlp_token"]
    c = cfg(epochs=3, batch_size=16)

    def run(out, setting=s, training=c, inputs=None, **kw):
        return run_setting(setting, inputs or fold_inputs(cdir), RunOutputs.in_dir(out), fold=0, training=training,
                           model=TINY, weights={}, runtime=RUNTIME, **kw)

    ref = run(tmp_path / "ref")
    with pytest.raises(Preempted):
        run(tmp_path / "run", on_step=lambda st: os.kill(os.getpid(), signal.SIGTERM) if st == 7 else None)
    got = run(tmp_path / "run")
    assert got["resumed"] and got["per_gene"] == ref["per_gene"] and got["mean"] == ref["mean"]
    pred = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert set(pred.tile_id.astype(str)) == set(data.test.tile_ids)

    # images through the store, and the Min-MAE baseline (ADD0 is close to CORE0)
    m = run(tmp_path / "early", SETTINGS["early_add_vits_ft_mlp_token"], cfg(epochs=1, batch_size=16),
            fold_inputs(cdir, with_images=True))
    assert m["n_test"] == 40 and m["epochs_run"] == 1
    mm = run(tmp_path / "minmae", SETTINGS["min_mae"])
    assert mm["source_gene"]["ADD0"] == "CORE0"


def test_resume_only_onto_identical_inputs(tmp_path, caplog):
    """A run interrupted, then rerun after an input artifact was rewritten, starts fresh and says why
    (a stale resume state onto new data would silently give wrong metrics)."""
    cdir = write_cohort(tmp_path)
    s, c = SETTINGS["expr_mlp_token"], cfg(epochs=3, batch_size=16)

    def run(**kw):
        return run_setting(s, fold_inputs(cdir), RunOutputs.in_dir(tmp_path / "run"), fold=0, training=c, model=TINY,
                           weights={}, runtime=RUNTIME, **kw)

    with pytest.raises(Preempted):
        run(on_step=lambda st: os.kill(os.getpid(), signal.SIGTERM) if st == 7 else None)
    # the upstream rule reran and rewrote sample S0's token store (same layout, new file times)
    tc = cdir / "samples" / "S0" / "tokens.zarr" / "zarr.json"
    os.utime(tc, ns=(tc.stat().st_atime_ns, tc.stat().st_mtime_ns + 10**9))
    with caplog.at_level("WARNING", logger="morphomol"):
        got = run()
    assert got["resumed"] is False and got["epochs_run"] == 3
    assert any("input:tokens/S0" in r.getMessage() for r in caplog.records)


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_training import SETTINGS, TINY, cfg, fold_data, train_setting

def slow(step):
    print("STEP", step, flush=True)
    time.sleep(0.3)

train_setting(SETTINGS["expr_mlp_token"], fold_data(64, 16, 16), {out!r}, train_cfg=cfg(epochs=3), model_cfg=TINY,
              on_step=slow)
"""


def test_sigterm_to_a_training_process(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    code = CHILD.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # 4 steps per epoch: stop in the middle of epoch 2
        if line.strip() == "STEP 6":
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, rest
    assert (out / RESUME_NAME).exists() and not (out / "metrics.json").exists()
    got = train_setting(SETTINGS["expr_mlp_token"], fold_data(64, 16, 16), out, train_cfg=cfg(epochs=3), model_cfg=TINY)
    ref = train_setting(SETTINGS["expr_mlp_token"], fold_data(64, 16, 16), tmp_path / "ref", train_cfg=cfg(epochs=3),
                        model_cfg=TINY)
    assert got["resumed"] and not ref["resumed"]
    assert got["per_gene"] == ref["per_gene"] and got["best_epoch"] == ref["best_epoch"]


# ---------------------------------------------------------------- bounded memory: features per chunk, streamed mean


def _write_feature_stores(cdir: Path, dim: int = 12) -> dict[str, Path]:
    from morphomol.data.features import write_features
    from morphomol.data.stores import SampleStore, StorePaths

    out = {}
    for i, d in enumerate(sorted((cdir / "samples").iterdir())):
        n = SampleStore(StorePaths(d / "tokens.zarr")).n_tiles
        feats = np.random.default_rng(50 + i).normal(size=(n, dim)).astype(np.float32)
        out[d.name] = write_features(cdir / "features" / f"{d.name}.zarr", feats, encoder="vit_s", chunk_rows=24)
    return out


def test_cached_features_per_chunk_give_the_in_memory_results(tmp_path):
    """A cached-feature setting on the stores: features read per chunk with their tiles give the very run
    (same batches in the same order, same values: metrics and predictions equal) as the whole partition's
    features gathered in memory (``feature_rows`` + ``WithFeatures``, the path of in-memory sources)."""
    from morphomol.train.sources import WithFeatures

    cdir = write_cohort(tmp_path)
    paths = _write_feature_stores(cdir)
    s = SETTINGS["late_add_vits_fz_mlp_tile"]
    c = cfg(epochs=2, batch_size=16)
    out = {}
    for how in ("chunks", "memory"):
        d = fold_from_stores(fold_inputs(cdir))
        if how == "memory":  # not a StoreSplit: attach_features gathers the rows in memory
            d = FoldData(*(WithFeatures(p, {}) for p in (d.fit, d.val, d.test)), d.core_genes, d.addon_genes)
        d.feature_paths = {"vit_s": paths}
        out[how] = train_setting(s, d, tmp_path / how, train_cfg=c, model_cfg=TINY)
    a, b = out["chunks"], out["memory"]
    assert a["features"] == b["features"] == {"vit_s": "cache"}
    assert a["per_gene"] == b["per_gene"] and a["mean"] == b["mean"] and a["val_mse"] == b["val_mse"]
    pa, pb = (pd.read_parquet(tmp_path / h / "predictions.parquet") for h in ("chunks", "memory"))
    pd.testing.assert_frame_equal(pa, pb)


@pytest.mark.parametrize("n_targets", [1, 2, 12])
def test_streamed_target_mean_equals_the_gathered_mean(n_targets):
    from morphomol.studies.fusion.data import target_mean
    from morphomol.train.sources import gather

    rng = np.random.default_rng(n_targets)
    n = 9000  # > 2 gather batches of 4096
    ds = InMemoryTiles([f"s__{i:06d}" for i in range(n)],
                       target=np.log1p(rng.gamma(1.0, 3.0, size=(n, n_targets))).astype(np.float32))
    want = gather(ds, ["target"])["target"].mean(axis=0)
    got = target_mean(ds)
    assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)


def test_streamed_target_mean_on_the_stores(tmp_path):
    from morphomol.studies.fusion.data import target_mean
    from morphomol.train.sources import gather

    data = fold_from_stores(fold_inputs(write_cohort(tmp_path)))
    want = gather(data.fit, ["target"])["target"].mean(axis=0)
    assert np.array_equal(target_mean(data.fit), want) and np.array_equal(target_mean(data.fit, batch_size=7), want)


# ---------------------------------------------------------------- per-sample predictions: one row group per sample


def test_predictions_by_sample_and_the_per_sample_reader(tmp_path):
    """Runs write one row group per sample (column sample_id); the per-sample job reads only its sample's
    rows, from such files through the filter and from files without the column (e.g. the ridge runs) by
    tile id, and its AnnData is what the whole files give."""
    import anndata as ad
    import pyarrow.parquet as pq

    from morphomol.data.runs import read_predictions, read_sample_predictions, write_predictions
    from morphomol.data.units import write_units
    from morphomol.export.predictions import predictions_anndata, write_sample_predictions

    cdir = write_cohort(tmp_path, samples=("S0", "S1", "S2", "S3", "S4", "S5", "S6", "S7"))
    folds = pd.read_parquet(cdir / "splits" / "folds.parquet")
    # fold 1: the same samples, S2 / S6 test there instead of S3 / S7 (val: S1 / S5 stay)
    f1 = folds.copy()
    f1["fold"] = 1
    f1["partition"] = f1["sample_id"].map({"S0": "fit", "S1": "val", "S2": "test", "S3": "fit", "S4": "fit",
                                           "S5": "val", "S6": "test", "S7": "fit"})
    pd.concat([folds, f1]).to_parquet(cdir / "splits" / "folds.parquet")
    run = run_setting(SETTINGS["expr_mlp_token"], fold_inputs(cdir), RunOutputs.in_dir(tmp_path / "expr"), fold=0,
                      training=cfg(epochs=1, batch_size=16), model=TINY, weights={}, runtime=RUNTIME)
    assert run["n_test"] == 80
    f = tmp_path / "expr" / "predictions.parquet"
    pf = pq.ParquetFile(f)
    groups = [pf.read_row_group(i, columns=["sample_id"]).column(0).unique().to_pylist()
              for i in range(pf.num_row_groups)]
    assert groups == [["S3"], ["S7"]]
    whole = read_predictions([f])  # the whole-file reader reads the four columns of either layout
    assert list(whole.columns) == ["tile_id", "gene", "y", "y_hat"] and len(whole) == 80 * 2
    ids = whole["tile_id"].astype(str)
    # the same rows without the sample column (a writer without sample_ids), read by tile id
    plain = tmp_path / "plain.parquet"
    write_predictions(plain, list(ids[::2]), ["ADD0", "ADD1"], whole["y"].to_numpy(), whole["y_hat"].to_numpy())
    for name in (f, plain):
        got = read_sample_predictions(name, "S7", batch_rows=13)
        want = whole[ids.str.startswith("S7__")]
        pd.testing.assert_frame_equal(got.astype({"tile_id": str, "gene": str}).reset_index(drop=True),
                                      want.astype({"tile_id": str, "gene": str}).reset_index(drop=True))
    # the rule's entry: S7 is test in fold 0; the fold-1 file is never read (it does not exist)
    n = 40
    units = write_units(tmp_path / "S7.h5ad", pd.DataFrame(index=[f"S7__{i:06d}" for i in range(n)]),
                        np.zeros((n, 2)), ["ADD0", "ADD1"], spatial_um=np.zeros((n, 2)), unit="tile", sample="S7")
    out = tmp_path / "samples" / "S7.h5ad"
    res = write_sample_predictions(sample="S7", units=units, folds=cdir / "splits" / "folds.parquet",
                                   predictions={"expr": [f, tmp_path / "missing.parquet"],
                                                "plain": [plain, tmp_path / "missing.parquet"]}, out=out)
    assert res["fold"] == 0 and res["units"] == n
    a = ad.read_h5ad(out)
    ref = predictions_anndata(ad.read_h5ad(units), {"expr": whole, "plain": read_predictions([plain])}, fold=0,
                              partitions={0: "test", 1: "fit"})
    for k in ("measured", "pred_expr", "pred_plain"):
        np.testing.assert_array_equal(a.layers[k], ref.layers[k])
    assert np.isfinite(a.layers["pred_expr"]).all() and (a.obs["partition"] == "test").all()
    assert (a.obs["partition_fold1"] == "fit").all()
    with pytest.raises(InputError, match="test in no fold"):
        write_sample_predictions(sample="S1", units=units, folds=cdir / "splits" / "folds.parquet",
                                 predictions={"expr": [f, f]}, out=tmp_path / "x.h5ad")


def test_sample_layers_equal_the_pivot_of_the_long_table():
    """The per-sample layers (direct indexing) are the long table's pivot (first non-null value of a unit x
    gene, NaN where none), units and genes reindexed, as the AnnData was built before."""
    from morphomol.export.predictions import _wide

    rng = np.random.default_rng(0)
    ids = [f"S1__{i:06d}" for i in range(30)]
    genes = ["B", "A", "C"]
    df = pd.DataFrame({"tile_id": np.repeat(ids[4:] + ["S2__000000"], 3), "gene": genes * 27,
                       "y_hat": rng.normal(size=81).astype(np.float32)})
    df = pd.concat([df, df.iloc[:5].assign(y_hat=np.float32(9))], ignore_index=True)
    df.loc[[0, 7], "y_hat"] = np.nan
    want = (df.pivot_table(index="tile_id", columns="gene", values="y_hat", aggfunc="first", observed=True)
            .reindex(index=ids, columns=genes).to_numpy(np.float32))
    got = _wide(df, {t: i for i, t in enumerate(ids)}, genes, "y_hat")
    np.testing.assert_array_equal(got, want)
