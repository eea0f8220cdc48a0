"""Stores written by the tile/tokens stages, read back through the chunk-shuffling loader (morphomol.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from morphomol import tokens
from morphomol.config import IOConfig, SplitsConfig
from morphomol.data import loader as store
from morphomol.data.folds import read_split
from morphomol.data.stores import SampleStore, StorePaths, load_tile_arrays, tokens_to_dense
from morphomol.errors import InputError
from morphomol.splits import write_folds
from morphomol.tiling import tile_sample
from test_tiling import GENES, SMALL, make_sample

PANEL = {"mode": "yaml", "core": GENES[:8], "addon": GENES[8:]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    cdir = root / "results" / "demo"
    samples, patients, tiles = ["A", "B", "C"], ["P0", "P1", "P2"], []
    for i, s in enumerate(samples):
        src = make_sample(root / "raw", s, seed=i, n_tx=25000, regions=2 if i == 1 else 1)
        d = cdir / "samples" / s
        tile_sample(he_path=src["he"], registration=src["registration"], xenium_dir=src["xenium"],
                    out_table=d / "tiles.parquet", out_store=d / "tiles.zarr", **SMALL)
        tokens.tokens_sample(tiles=d / "tiles.parquet", tiles_store=d / "tiles.zarr", registration=src["registration"],
                             xenium_dir=src["xenium"], out_tokens=d / "tokens.zarr", out_units=d / "units.h5ad",
                             panel=PANEL, patient=patients[i], io=IOConfig(qv_min=20.0, batch_size=5000),
                             buffer_size=9000)
        tiles.append(d / "units.h5ad")
    write_folds(units=tiles, samples=samples, patients=patients, out=cdir / "splits/folds.parquet",
                cfg=SplitsConfig(n_folds=3, val_fraction=0.5), seed=0)
    (cdir / "panels").mkdir()
    for k in range(3):
        (cdir / f"panels/fold{k}.json").write_text(json.dumps(PANEL))
    return cdir


def stores(cohort: Path) -> dict[str, StorePaths]:
    return {s.name: StorePaths(s / "tokens.zarr", s / "tiles.zarr") for s in sorted((cohort / "samples").iterdir())}


def sample_store(cohort: Path, s: str) -> SampleStore:
    return SampleStore(stores(cohort)[s])


def split_of(cohort: Path, fold: int) -> pd.DataFrame:
    units = {s.name: s / "units.h5ad" for s in sorted((cohort / "samples").iterdir())}
    return read_split(cohort / "splits/folds.parquet", fold, units)


def loader(cohort: Path, fold: int, partition, panel=None, **kw):
    return store.make_loader(split_of(cohort, fold), panel or PANEL, stores(cohort), partition, **kw)


def test_tokens_outputs(cohort):
    import anndata as ad

    d = cohort / "samples" / "B"
    t = pd.read_parquet(d / "tiles.parquet")
    st = sample_store(cohort, "B")
    tc = st.read_tile_counts()
    np.testing.assert_array_equal(tc.sum(axis=1), t["n_transcripts"])
    ip, tk, gn, ct = st.read_tokens(0, st.n_tiles)
    dense = tokens_to_dense(ip, tk, gn, ct, np.arange(len(st.genes)), len(st.genes))
    np.testing.assert_array_equal(dense.sum(axis=1), tc)
    assert tk.max() < 196 and st.genes == GENES
    a = ad.read_h5ad(d / "units.h5ad")  # the unit table: obs = tiles, obsm spatial in µm, X = counts
    assert list(a.obs_names) == list(t["tile_id"]) and "n_transcripts" in a.obs
    assert set(a.obs["sample_id"]) == {"B"} and set(a.obs["patient_id"]) == {"P1"}
    np.testing.assert_allclose(a.obsm["spatial"], t[["x_um", "y_um"]].to_numpy())
    np.testing.assert_array_equal(a.X.toarray(), tc)
    assert not (d / "targets.parquet").exists()  # targets come from one artifact (tokens.zarr tile_counts)


def _epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def test_loader_covers_partition_and_matches_stores(cohort):
    split = split_of(cohort, 0)
    fit = split[split.partition == "fit"]
    ld = loader(cohort, 0, "fit", batch_size=16, shuffle=True, seed=3, buffer_chunks=2)
    batches = _epoch(ld, 0)
    assert len(batches) == len(ld) == -(-len(fit) // 16)
    ids = [i for b in batches for i in b["tile_id"]]
    assert sorted(ids) == sorted(fit["tile_id"]) and len(set(ids)) == len(ids)
    b = batches[1]
    B = len(b["tile_id"])
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (B, 224, 224, 3)
    assert b["tokens"].shape == (B, 196, 8) and b["tokens"].dtype == torch.float32
    assert b["tile_counts"].shape == (B, 8) and b["targets"].shape == (B, 4)
    for j in (0, B - 1):
        s, idx = b["tile_id"][j].split("__")
        st = sample_store(cohort, s)
        i = int(idx)
        assert int(b["index"][j]) == i
        np.testing.assert_array_equal(b["image"][j].numpy(), st.read_images(i, i + 1)[0])
        tc = st.read_tile_counts(i, i + 1)[0]
        np.testing.assert_array_equal(b["tile_counts"][j].numpy(), tc[:8])
        np.testing.assert_allclose(b["targets"][j].numpy(), np.log1p(tc[8:]), rtol=1e-6)
        ref = tokens_to_dense(*st.read_tokens(i, i + 1), np.arange(8), len(st.genes))[0]
        np.testing.assert_array_equal(b["tokens"][j].numpy(), ref)


def test_shuffle_is_epoch_deterministic_and_workers_agree(cohort):
    mk = lambda w, fmt="dense": loader(cohort, 0, ["fit", "val"], batch_size=16, seed=1, num_workers=w,
                                       buffer_chunks=2, token_format=fmt, images=False)
    l0 = mk(0)
    e0 = [b["tile_id"] for b in _epoch(l0, 0)]
    e0b = [b["tile_id"] for b in _epoch(l0, 0)]
    e1 = [b["tile_id"] for b in _epoch(l0, 1)]
    assert e0 == e0b and e0 != e1
    auto = [[b["tile_id"] for b in _epoch(l0)] for _ in range(2)]  # auto-advancing epochs: 2, 3
    assert auto[0] != auto[1]
    l2 = mk(2)
    w0 = [b["tile_id"] for b in _epoch(l2, 0)]
    w1 = [b["tile_id"] for b in _epoch(l2, 1)]
    assert sorted(map(tuple, w0)) == sorted(map(tuple, e0))  # same batches, worker-interleaved order
    assert sorted(map(tuple, w1)) == sorted(map(tuple, e1))
    # COO tokens densify to the dense ones
    lc = mk(0, "coo")
    for bd, bc in zip(_epoch(l0, 5), _epoch(lc, 5)):
        assert bd["tile_id"] == bc["tile_id"]
        torch.testing.assert_close(store.densify_tokens(bc), bd["tokens"])


def test_eval_order_and_tile_arrays(cohort):
    ld = loader(cohort, 1, "test", batch_size=10, shuffle=False, images=False, tokens=False)
    ids = [i for b in ld for i in b["tile_id"]]
    split = split_of(cohort, 1)
    assert ids == list(split.loc[split.partition == "test", "tile_id"])
    ta = load_tile_arrays(split, PANEL, stores(cohort))
    assert ta.core.shape == (len(split), 8) and ta.targets.shape == (len(split), 4)
    te = ta.subset("test")
    assert list(te.tile_id) == ids
    first = next(iter(loader(cohort, 1, "test", batch_size=10, shuffle=False, images=False)))
    np.testing.assert_array_equal(first["tile_counts"].numpy(), te.core[:10])
    np.testing.assert_allclose(first["targets"].numpy(), te.targets[:10], rtol=1e-6)
    with pytest.raises(InputError, match="not in this sample"):
        loader(cohort, 1, "test", panel={"core": ["NOPE"], "addon": ["G09"]}, shuffle=False).__iter__().__next__()


def test_direct_chunk_reads_match_zarr(cohort):
    st = sample_store(cohort, "A")
    n, C = st.n_tiles, st.chunk_tiles
    rd = st.image_chunks
    assert rd.base is not None  # the writers' layout takes the direct path
    for c in range(-(-n // C)):
        got = rd.read(c, rd.empty())
        np.testing.assert_array_equal(got, np.asarray(st.images[c * C:min(n, (c + 1) * C)]))
    g = st._open_tokens()
    for i0, i1 in [(0, n), (1, n - 1), (n // 2, n // 2 + 1), (3, 3)]:
        ip, tk, gn, ct = st.read_tokens(i0, i1)
        a, b = int(st.indptr[i0]), int(st.indptr[i1])
        np.testing.assert_array_equal(tk, g["token"][a:b])
        np.testing.assert_array_equal(gn, g["gene"][a:b])
        np.testing.assert_array_equal(ct, g["count"][a:b])
        np.testing.assert_array_equal(st.read_tile_counts(i0, i1), g["tile_counts"][i0:i1])
    np.testing.assert_array_equal(st.read_tile_counts(), g["tile_counts"][:])


def test_worker_batches_equal_in_process_batches(cohort):
    """Workers build batches in shared memory; contents must equal the in-process ones."""
    mk = lambda w, fmt: loader(cohort, 0, "fit", batch_size=16, seed=2, num_workers=w, buffer_chunks=2,
                               token_format=fmt)
    ref = {tuple(b["tile_id"]): b for b in _epoch(mk(0, "dense"), 1)}
    for fmt in ("dense", "coo"):
        got = _epoch(mk(2, fmt), 1)
        assert sorted(tuple(b["tile_id"]) for b in got) == sorted(ref)
        for b in got:
            r = ref[tuple(b["tile_id"])]
            torch.testing.assert_close(store.densify_tokens(b), r["tokens"], rtol=0, atol=0)
            for f in ("image", "tile_counts", "targets", "index"):
                torch.testing.assert_close(b[f], r[f], rtol=0, atol=0)


def _feature_stores(cohort: Path, root: Path, dim: int = 7, chunk_rows: int = 5) -> dict[str, Path]:
    """A features store per sample (rows = the sample's tiles), chunked unlike the tile chunks."""
    from morphomol.data.features import write_features

    out = {}
    for i, s in enumerate(sorted(p.name for p in (cohort / "samples").iterdir())):
        n = sample_store(cohort, s).n_tiles
        feats = np.random.default_rng(i).normal(size=(n, dim)).astype(np.float32)
        out[s] = write_features(root / f"{s}.zarr", feats, encoder="e", chunk_rows=chunk_rows)
    return out


def test_cached_features_come_with_their_chunks(cohort, tmp_path):
    """Features read per chunk with the tiles equal the stores' rows; the batches (order and contents) are
    those of the loader without features, in process, in worker processes and through the threaded feed."""
    from morphomol.data.features import feature_rows
    from morphomol.data.feed import Feed

    paths = _feature_stores(cohort, tmp_path)
    kw = dict(batch_size=16, seed=4, buffer_chunks=2, images=False)
    plain = _epoch(loader(cohort, 0, "fit", **kw), 1)
    with_f = _epoch(loader(cohort, 0, "fit", features={"morph_feat": paths}, **kw), 1)
    assert [b["tile_id"] for b in with_f] == [b["tile_id"] for b in plain]
    for b, p in zip(with_f, plain):
        assert b["morph_feat"].dtype == torch.float32 and b["morph_feat"].shape == (len(b["tile_id"]), 7)
        np.testing.assert_array_equal(b["morph_feat"].numpy(), feature_rows(paths, b["tile_id"]))
        for f in ("tokens", "tile_counts", "targets", "index"):
            torch.testing.assert_close(b[f], p[f], rtol=0, atol=0)
    workers = {tuple(b["tile_id"]): b for b in _epoch(loader(cohort, 0, "fit", features={"morph_feat": paths},
                                                             num_workers=2, **kw), 1)}
    assert sorted(workers) == sorted(tuple(b["tile_id"]) for b in with_f)
    for b in with_f:
        torch.testing.assert_close(workers[tuple(b["tile_id"])]["morph_feat"], b["morph_feat"], rtol=0, atol=0)
    stream = store.TileStream(split_of(cohort, 0), PANEL, stores(cohort), "fit", shuffle=True, tokens=False,
                              features={"morph_feat": paths}, **kw)
    fed = [(list(b["tile_id"]), b["morph_feat"].clone()) for b in Feed(stream, threads=2, device="cpu").epoch(1)]
    assert [ids for ids, _ in fed] == [b["tile_id"] for b in with_f]
    for (_, f), b in zip(fed, with_f):
        torch.testing.assert_close(f, b["morph_feat"], rtol=0, atol=0)


def test_cached_features_bad_stores(cohort, tmp_path):
    from morphomol.data.features import write_features

    paths = _feature_stores(cohort, tmp_path)
    with pytest.raises(InputError, match="no cached features for sample 'B'"):
        loader(cohort, 0, ["fit", "val", "test"], features={"f": {k: v for k, v in paths.items() if k != "B"}})
    short = dict(paths, A=write_features(tmp_path / "short.zarr", np.zeros((3, 7)), encoder="e"))
    with pytest.raises(InputError, match="out of range") as exc:
        loader(cohort, 0, ["fit", "val", "test"], features={"f": short})
    assert "short.zarr" in str(exc.value)
    n = sample_store(cohort, "A").n_tiles
    wide = dict(paths, A=write_features(tmp_path / "wide.zarr", np.zeros((n, 9)), encoder="e"))
    with pytest.raises(InputError, match="feature dim"):
        loader(cohort, 0, ["fit", "val", "test"], features={"f": wide})
