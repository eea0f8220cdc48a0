"""Behaviour of the issue-19 input pipeline (never its speed: figures come from
``benchmarks/bench_pipeline.py``): the threaded feed gives exactly the in-process batches in the
in-process order for any thread count, reusing its buffers; a resume's skipped batches are never
read; shards, the shuffle buffer, the DataLoader workers' skip; the trainer's options
(validate / checkpoint every k epochs, padded evaluation); feature jobs over a group of samples
that skip current stores; one forward pass for features + patch tokens."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from morphomol.data import loader as store
from morphomol.data.feed import Feed
from morphomol.data.loader import TileStream, plan_epoch, worker_skips
from morphomol.train.loop import global_batch_sizes, pad_batch, predict
from morphomol.train.resume import RESUME_NAME
from morphomol.train.runtime import Runtime, loader_threads
from morphomol.train.sources import InMemoryTiles
from test_loader import PANEL, cohort, split_of, stores  # noqa: F401  (the module-scoped cohort fixture)

FIELDS = ("image", "tokens", "tile_counts", "targets", "index")


def _stream(cohort, **kw):  # noqa: F811
    kw = {"batch_size": 16, "seed": 2, "buffer_chunks": 2, "token_format": "dense", **kw}
    return TileStream(split_of(cohort, 0), PANEL, stores(cohort), ["fit", "val"], **kw)


def _copy(b):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}


def test_feed_gives_the_in_process_batches_for_any_thread_count(cohort):  # noqa: F811
    ts = _stream(cohort)
    for epoch in (0, 3):
        ts.set_epoch(epoch)
        ref = [_copy(b) for b in ts]
        for threads in (0, 1, 3):
            feed = Feed(ts, threads=threads, device="cpu")
            for _ in range(2):  # the second epoch reuses decode states and buffers
                got = 0
                for b, r in zip(feed.epoch(epoch), ref, strict=True):
                    assert b["tile_id"] == r["tile_id"]
                    for f in FIELDS:
                        assert torch.equal(b[f], r[f]), (threads, f)
                    got += 1
                assert got == len(ref)


def test_feed_reuses_its_buffers_and_skips_unread(cohort, monkeypatch):  # noqa: F811
    ts = _stream(cohort, buffer_chunks=1)
    feed = Feed(ts, threads=0, device="cpu")
    ptrs = [b["image"].data_ptr() for b in feed.epoch(1)]
    assert len(set(ptrs)) <= 2 < len(ptrs)  # a ring of slots, no fresh memory per batch
    reads = []
    orig = store.ChunkDecoder.read_chunk
    monkeypatch.setattr(store.ChunkDecoder, "read_chunk",
                        lambda self, si, c: reads.append((si, c)) or orig(self, si, c))
    full = [b["tile_id"] for b in feed.epoch(1)]
    n_full = len(reads)
    reads.clear()
    k = len(full) // 2
    assert [b["tile_id"] for b in feed.epoch(1, skip=k)] == full[k:]
    assert len(reads) < n_full  # the consumed batches of a resumed epoch are not decoded again


def test_dataloader_workers_skip_and_int32_coo(cohort):  # noqa: F811
    ld = store.make_loader(split_of(cohort, 0), PANEL, stores(cohort), "fit", batch_size=8, seed=1, num_workers=2,
                           buffer_chunks=1, token_format="coo", images=False)
    ld.set_epoch(2)
    full = [tuple(b["tile_id"]) for b in ld]
    for k in (1, 3, len(full) - 1):
        ld.set_epoch(2, skip=k)
        assert [tuple(b["tile_id"]) for b in ld] == full[k:]
    b = next(iter(ld))
    assert b["token_index"].dtype == torch.int32
    assert worker_skips([3, 1, 2], 4) == ([2, 1, 1], 2) and worker_skips([2, 2], 0) == ([0, 0], 0)
    assert worker_skips([3, 3], 3) == ([2, 1], 1)


def test_shuffle_buffer_holds_several_batches(cohort):  # noqa: F811
    assert _stream(cohort, batch_size=16, buffer_chunks=2, buffer_batches=4).buffer_chunks >= 4 * 16 // 8
    # the demo's values keep their buffer (batch 32, chunks of 64 tiles: 8 chunks hold 16 batches)
    chunks = [(0, c, np.arange(c * 64, c * 64 + 64)) for c in range(20)]
    need = -(-4 * 32 // 64)
    assert max(8, need) == 8
    assert plan_epoch(chunks, 32, shuffle=True, seed=0, epoch=0, buffer_chunks=8)[0][0].shape == (32, 2)


def test_store_source_with_device_matches_the_host_path(cohort):  # noqa: F811
    from morphomol.studies.fusion.data import StoreSplit

    ds = StoreSplit(split_of(cohort, 0), PANEL, stores(cohort), "fit", buffer_chunks=2)
    fields = ["image", "tokens", "tile", "target"]
    ref = [_copy(b) for b in ds.epoch(1, batch_size=16, fields=fields, seed=0)]
    for threads in (0, 2, None):
        got = list(ds.epoch(1, batch_size=16, fields=fields, seed=0, device=torch.device("cpu"), threads=threads))
        assert len(got) == len(ref)
        if threads is None:  # a DataLoader path: fresh batches; compare all of them
            for b, r in zip(got, ref):
                assert all(torch.equal(b[f], r[f]) for f in fields)


def test_loader_threads_resolution():
    from morphomol.config import default_sections

    t = default_sections(training={"num_workers": 4}).training
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_threads(t, Runtime(), cpu) is None  # CPU with worker processes: as before
    assert loader_threads(t, Runtime(num_workers=0), cpu) == 0  # in process: the feed in the training thread
    assert loader_threads(t, Runtime(), cuda) == 4
    t2 = default_sections(training={"num_workers": 4, "loader": "feed", "loader_threads": 6}).training
    assert loader_threads(t2, Runtime(), cpu) == 6
    assert loader_threads(default_sections(training={"loader": "workers"}).training, Runtime(), cuda) is None


def test_global_batch_sizes_and_padded_prediction():
    assert global_batch_sizes(50, 16, False) == [16, 16, 16, 2]
    assert global_batch_sizes(50, 16, True) == [16, 16, 16]
    assert global_batch_sizes(10, 16, True) == [10]
    b = pad_batch({"x": torch.ones(3, 2), "tile_id": ["a", "b", "c"]}, 5)
    assert b["x"].shape == (5, 2) and b["x"][3:].sum() == 0 and b["tile_id"] == ["a", "b", "c"]

    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.Linear(2, 1)

        def forward(self, batch):
            return self.l(batch["x"])

    ds = InMemoryTiles([str(i) for i in range(11)], x=np.random.default_rng(0).random((11, 2), np.float32),
                       target=np.zeros((11, 1), np.float32))
    m = Lin()
    a = predict(m, ds, ["x", "target"], 4, torch.device("cpu"))
    p = predict(m, ds, ["x", "target"], 4, torch.device("cpu"), pad_last=True)
    assert a[0] == p[0] and np.allclose(a[2], p[2])


def _fit_run(tmp_path, **training):
    from test_training import SETTINGS, TINY, cfg, fold_data, train_setting

    data = fold_data(48, 16, 16)
    seen = []

    def probe(step: int) -> None:  # resume.pt on disk while the 2nd epoch runs?
        if step == 4:
            # resume.pt is written by a background thread after epoch 1 (k=1): give a loaded machine time to
            # finish it; with k=2 no write is started, so its absence does not depend on waiting
            import time

            deadline = time.monotonic() + (60 if not training else 0)
            while not (tmp_path / RESUME_NAME).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            seen.append((tmp_path / RESUME_NAME).exists())

    m = train_setting(SETTINGS["expr_mlp_token"], data, tmp_path, train_cfg=cfg(epochs=4, **training), model_cfg=TINY,
                      on_step=probe)
    import json

    return m, json.loads((tmp_path / "checkpoint.json").read_text())["history"], seen


def test_validate_and_checkpoint_every_k_epochs(tmp_path):
    m1, h1, seen1 = _fit_run(tmp_path / "k1")
    m2, h2, seen2 = _fit_run(tmp_path / "k2", validate_every=2, checkpoint_every=2)
    assert seen1 == [True] and seen2 == [False]  # after epoch 1: written with k=1, not with k=2
    assert [h["val_mse"] is None for h in h2] == [True, False, True, False]
    assert all(h["val_mse"] is not None for h in h1)
    assert m2["best_epoch"] in (1, 3) and m2["epochs_run"] == 4
    # the same optimisation: losses are those of the k=1 run
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-6)
    assert all(math.isfinite(h["tiles_per_second"]) for h in h2)


def _tiles(path, n=12, seed=0):
    import zarr

    imgs = np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    g = zarr.open_group(str(path), mode="w")
    g.create_array("images", shape=imgs.shape, chunks=(4, 224, 224, 3), dtype="uint8")[:] = imgs
    return path


def test_feature_group_skips_current_stores(tmp_path, caplog):
    from morphomol.config import default_sections
    from morphomol.config.sections import EncoderConfig
    from morphomol.data.features import read_features
    from morphomol.features import extract_features_group

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    cfg = default_sections(model={"vit": tiny}, features={"batch_size": 8, "device": "cpu", "patch_tokens": True})
    stores_ = [_tiles(tmp_path / f"s{i}.zarr", seed=i) for i in range(3)]
    outs = [tmp_path / "out" / f"s{i}.zarr" for i in range(3)]
    kw = dict(samples=["s0", "s1", "s2"], stores=stores_, outs=outs, encoder=EncoderConfig(), features=cfg.features,
              vit=cfg.model.vit)
    first = extract_features_group("vit_s", **kw)
    assert all("n_tiles" in v for v in first.values())
    ref = {o: read_features(o)[0] for o in outs}
    again = extract_features_group("vit_s", **kw)
    assert all(v == {"skipped": "current"} for v in again.values())
    # an input store rewritten after its features: that sample only is recomputed
    later = time.time() + 5
    os.utime(stores_[1] / "zarr.json", (later, later))
    third = extract_features_group("vit_s", **kw)
    assert "n_tiles" in third["s1"] and third["s0"] == third["s2"] == {"skipped": "current"}
    assert np.array_equal(read_features(outs[1])[0], ref[outs[1]])
    # other settings (no patch tokens) are not "current"
    cfg2 = default_sections(model={"vit": tiny}, features={"batch_size": 8, "device": "cpu"})
    fourth = extract_features_group("vit_s", **{**kw, "features": cfg2.features})
    assert all("n_tiles" in v for v in fourth.values())


def test_features_and_tokens_in_one_pass_equal_two_passes():
    from morphomol.encoders import create_encoder
    from morphomol.features import features_and_tokens

    enc = create_encoder("vit_s", allow_random=True, embed_dim=32, depth=1, num_heads=2)
    x = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        f, t = features_and_tokens(enc, x)
        assert torch.equal(f, enc(x)) and torch.equal(t, enc.forward_tokens(x))
