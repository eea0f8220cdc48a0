"""Transcript -> tile -> token pooling against a brute-force point-in-box reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphomol.errors import InputError
from morphomol import tokens
from morphomol.geometry import Batch, TileGrid, check_regions, um_to_patch_matrices
from morphomol.tiling import count_cells, tile_stats

ROOT = Path(__file__).resolve().parents[1]


def _densify(indptr, tok, gene, cnt, N, G, grid=14):
    d = np.zeros((N, grid * grid, G), np.int64)
    for t in range(N):
        s = slice(indptr[t], indptr[t + 1])
        np.add.at(d[t], (tok[s].astype(int), gene[s].astype(int)), cnt[s].astype(np.int64))
    return d


def _pool(batches, grid, ti, tj, M, G, buffer_size=1 << 12):
    pc, pm = tokens.pool_patches(batches, grid, ti, tj, M, G, buffer_size=buffer_size)
    return tokens.tile_tokens(pc, pm, grid, ti, tj, G)


def _check(x, y, reg, gene, grid, M, G, *, keep_frac=1.0, rng=None, nbatch=3, buffer_size=1 << 12):
    rng = rng or np.random.default_rng(0)
    jj, ii = np.mgrid[: grid.ny, : grid.nx]
    ii, jj = ii.ravel(), jj.ravel()
    keep = rng.random(len(ii)) < keep_frac
    keep[0] = True
    ii, jj = ii[keep], jj[keep]
    lut = np.arange(G, dtype=np.int32)
    cuts = np.linspace(0, len(x), nbatch + 1).astype(int)
    batches = [Batch(x[a:b], y[a:b], reg[a:b], gene[a:b], lut) for a, b in zip(cuts[:-1], cuts[1:])]
    indptr, tok, gn, cnt, tc = _pool(batches, grid, ii, jj, M, G, buffer_size)
    ref = tokens.reference_tokens(x, y, reg, gene, M, grid, ii, jj, G)
    got = _densify(indptr, tok, gn, cnt, len(ii), G)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(tc, ref.sum(axis=1))
    # the first (counting) pass agrees with the pooled totals
    cc = count_cells(batches, grid, M, G)
    n_tx, _, n_genes = tile_stats(cc, grid)
    np.testing.assert_array_equal(n_tx[jj, ii], ref.sum(axis=(1, 2)))
    np.testing.assert_array_equal(n_genes[jj, ii], (ref.sum(axis=1) > 0).sum(axis=1))
    return ref


def _affines(rng, R):
    """Per-region µm -> H&E px affines (rotation/scale/shear/offset) and their inverses."""
    inv = []
    for _ in range(R):
        a = rng.uniform(-0.3, 0.3)
        s = rng.uniform(2.0, 5.0, 2)
        sh = rng.uniform(-0.1, 0.1)
        m = np.array([[s[0] * np.cos(a), -s[1] * np.sin(a) + sh, rng.uniform(0, 40)],
                      [s[0] * np.sin(a), s[1] * np.cos(a), rng.uniform(0, 40)], [0, 0, 1]])
        inv.append(m)
    return inv


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(1, 3), nx=st.integers(1, 4), ny=st.integers(1, 3),
       k=st.sampled_from([1, 2, 7]), n=st.integers(0, 400), keep=st.floats(0.3, 1.0))
def test_random_inputs_match_brute_force(seed, R, nx, ny, k, n, keep):
    rng = np.random.default_rng(seed)
    size = float(rng.uniform(50, 400))
    grid = TileGrid(float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20)), size, size / k, nx, ny, 14)
    M, _ = um_to_patch_matrices(grid, _affines(rng, R))
    # points over (and a bit beyond) the grid, in µm: invert region 0 roughly via random per region
    G = int(rng.integers(1, 6))
    fx = rng.uniform(-3, grid.n_patch_x + 3, n)
    fy = rng.uniform(-3, grid.n_patch_y + 3, n)
    reg = rng.integers(-1, R, n).astype(np.int32)
    x, y = _patch_to_um(fx, fy, np.maximum(reg, 0), M)
    gene = rng.integers(0, G, n).astype(np.int32)
    _check(x, y, reg, gene, grid, M, G, keep_frac=keep, rng=rng, buffer_size=int(rng.integers(1, 64)))


def _patch_to_um(fx, fy, reg, M):
    x = np.empty(len(fx), np.float32)
    y = np.empty(len(fy), np.float32)
    for r in np.unique(reg):
        A = np.vstack([M[r], [0, 0, 1]])
        Ai = np.linalg.inv(A)
        s = reg == r
        x[s] = Ai[0, 0] * fx[s] + Ai[0, 1] * fy[s] + Ai[0, 2]
        y[s] = Ai[1, 0] * fx[s] + Ai[1, 1] * fy[s] + Ai[1, 2]
    return x, y


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(1, 3))
def test_adversarial_points_on_patch_and_tile_borders(seed, R):
    """Points whose patch coordinate is (within float32 rounding) exactly an integer: every
    patch border is a tile border or a token border; overlapping tiles (stride 1/2 and 1/7)."""
    rng = np.random.default_rng(seed)
    size = 14.0 * float(rng.choice([1.0, 2.0, 4.0]))  # exact in binary: borders land on floats exactly
    k = int(rng.choice([2, 7]))
    grid = TileGrid(float(rng.choice([0.0, 8.0, -4.0])), 0.0, size, size / k, 3, 2, 14)
    # exact power-of-two scales so that µm -> patch is exact for integer patch coordinates
    inv = [np.array([[2.0 ** int(rng.integers(0, 3)), 0, float(rng.integers(-8, 8))],
                     [0, 2.0 ** int(rng.integers(0, 3)), float(rng.integers(-8, 8))], [0, 0, 1]]) for _ in range(R)]
    M, _ = um_to_patch_matrices(grid, inv)
    n = 300
    reg = rng.integers(0, R, n).astype(np.int32)
    fx = rng.integers(-1, grid.n_patch_x + 2, n).astype(np.float64)
    fy = rng.integers(-1, grid.n_patch_y + 2, n).astype(np.float64)
    # nudge a third just below the border (next float down in µm)
    x, y = _patch_to_um(fx, fy, reg, M)
    third = rng.random(n) < 0.33
    x[third] = np.nextafter(x[third], np.float32(-np.inf))
    G = 3
    gene = rng.integers(0, G, n).astype(np.int32)
    ref = _check(x, y, reg, gene, grid, M, G)
    # on-border points were really exact: their patch coordinate is an integer
    r = reg[~third]
    fxx = M[r, 0, 0] * x[~third].astype(np.float64) + M[r, 0, 1] * y[~third].astype(np.float64) + M[r, 0, 2]
    assert np.mean(fxx == np.round(fxx)) > 0.9
    assert ref.sum() > 0


def test_overlap_counts_every_containing_tile():
    """A point in the overlap of 4 tiles (k=2) counts once in each; tokens match tile-local coords."""
    grid = TileGrid(0.0, 0.0, 512.0, 256.0, 3, 3, 14)
    M, _ = um_to_patch_matrices(grid, [np.eye(3)])
    x = np.array([300.0, 256.0, 255.99, 511.99, 0.0], np.float32)
    y = np.array([300.0, 256.0, 100.0, 600.0, 0.0], np.float32)
    reg = np.zeros(5, np.int32)
    gene = np.array([0, 1, 0, 1, 0], np.int32)
    jj, ii = np.mgrid[:3, :3]
    ii, jj = ii.ravel(), jj.ravel()  # tile (i, j) is row j * 3 + i
    indptr, tok, gn, cnt, tc = _pool([Batch(x, y, reg, gene, np.arange(2, dtype=np.int32))], grid, ii, jj, M, 2)
    d = _densify(indptr, tok, gn, cnt, 9, 2)
    # (300, 300) lies in tiles (0,0), (1,0), (0,1), (1,1), at the token given by tile-local 224-px coords
    for i, j in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        u = (300 - 256 * i) * 224 / 512
        v = (300 - 256 * j) * 224 / 512
        assert d[j * 3 + i, int(v // 16) * 14 + int(u // 16), 0] == 1
    # per gene: 300,300 -> 4 tiles; 255.99,100 -> 1; 0,0 -> 1 | 256,256 -> 4; 511.99,600 -> 2 x 2
    assert d[:, :, 0].sum() == 6 and d[:, :, 1].sum() == 8
    # half-open borders: (256, 256) is the top-left token of tile (1,1) and token (7,7) of tile (0,0)
    assert d[1 * 3 + 1, 0, 1] == 1
    assert d[0, 7 * 14 + 7, 1] == 1 and d[0, 6 * 14 + 6, 1] == 0
    assert d[1 * 3 + 2, :, 1].sum() == 0  # tile (2,1) starts at x=512 > 511.99
    ref = tokens.reference_tokens(x, y, reg, gene, M, grid, ii, jj, 2)
    np.testing.assert_array_equal(d, ref)


def test_region_without_transform_is_an_input_error():
    grid = TileGrid(0.0, 0.0, 100.0, 50.0, 2, 2, 14)
    M, has = um_to_patch_matrices(grid, [np.eye(3), None])
    assert has.tolist() == [True, False]
    with pytest.raises(InputError, match=r"S1: 2 transcripts fall in region 1, which has no transform"):
        check_regions(np.array([0, 1, 1, -1], np.int32), has, "S1")
    with pytest.raises(InputError, match="region 5"):
        check_regions(np.array([5], np.int32), has, "S1")
    check_regions(np.array([0, -1, 0], np.int32), has, "S1")


def test_locate_kernel_matches_numpy_and_kernels_build_once():
    from morphomol.geometry import grid_from_attrs, locate_kernel
    from morphomol.util.numba import njit_kernels

    grid = TileGrid(3.0, -2.0, 140.0, 70.0, 3, 2, 14)
    assert grid_from_attrs({"grid": grid.to_dict()}) == grid
    M, has = um_to_patch_matrices(grid, [np.array([[2.0, 0.1, 5.0], [-0.1, 2.0, 1.0], [0, 0, 1]]), None])
    assert has.tolist() == [True, False]
    locate = locate_kernel()
    npx, npy = float(grid.n_patch_x), float(grid.n_patch_y)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(-20, 160, (300, 2)).astype(np.float32):
        fx = M[0, 0, 0] * np.float64(x) + M[0, 0, 1] * np.float64(y) + M[0, 0, 2]
        fy = M[0, 1, 0] * np.float64(x) + M[0, 1, 1] * np.float64(y) + M[0, 1, 2]
        inside = 0 <= fx < npx and 0 <= fy < npy
        assert locate(M, 0, x, y, npx, npy) == ((int(fx), int(fy)) if inside else (-1, -1))
        assert locate(M, 1, x, y, npx, npy) == (-1, -1)  # NaN row: region without a transform
    assert locate_kernel() is locate
    calls = []
    first = njit_kernels("test.once", lambda: calls.append(1) or {"k": 1})
    assert njit_kernels("test.once", lambda: calls.append(2) or {"k": 2}) is first and calls == [1]


def test_panel_genes_missing_is_an_input_error():
    with pytest.raises(InputError, match=r"sample S2: 1 addon panel gene\(s\) not measured in this sample: NOPE"):
        tokens.check_panel_genes("S2", ["A", "B"], {"mode": "yaml", "core": ["A"], "addon": ["B", "NOPE"]})
    tokens.check_panel_genes("S2", ["A"], {"mode": "hvg", "core": [], "addon": []})


def _breast():
    for p in (ROOT / "tests/data/xenium_breast_tx_sample/IDC_transcripts.parquet",
              ROOT.parent / "shared/data/xenium_breast_tx_sample/IDC_transcripts.parquet",
              ROOT / "tests/data/xenium_breast_tx_sample/ILC_transcripts.parquet"):
        if p.exists():
            return p
    pytest.skip("no real breast transcripts available")


def test_real_breast_transcripts_through_pooling(tmp_path):
    """100k-class real Xenium transcripts: identity-ish registration around their bbox."""
    from morphomol.io.xenium import is_control

    df = pd.read_parquet(_breast(), columns=["feature_name", "x_location", "y_location", "qv"])
    df = df[~df["feature_name"].map(is_control) & (df["qv"] >= 20)]
    genes = sorted(df["feature_name"].unique())
    codes = pd.Categorical(df["feature_name"], categories=genes).codes.astype(np.int32)
    x = df["x_location"].to_numpy(np.float32)
    y = df["y_location"].to_numpy(np.float32)
    he_mpp = 0.2125
    # H&E px = (µm - bbox0)/mpp + 100 (with a slight rotation in region 1 = right half)
    x0, y0 = float(x.min()), float(y.min())
    inv0 = np.array([[1 / he_mpp, 0, -x0 / he_mpp + 100], [0, 1 / he_mpp, -y0 / he_mpp + 100], [0, 0, 1]])
    rot = np.array([[np.cos(0.01), -np.sin(0.01), 0], [np.sin(0.01), np.cos(0.01), 0], [0, 0, 1]])
    inv = [inv0, rot @ inv0]
    size = 512 * 0.5 / he_mpp
    bbox = (100, 100, (x.max() - x0) / he_mpp + 100, (y.max() - y0) / he_mpp + 100)
    grid = TileGrid.covering(bbox, size, size / 2)
    M, has = um_to_patch_matrices(grid, inv)
    reg = (x > np.median(x)).astype(np.int32)
    lut = np.arange(len(genes), dtype=np.int32)
    batches = [Batch(x[a:a + 20000], y[a:a + 20000], reg[a:a + 20000], codes[a:a + 20000], lut)
               for a in range(0, len(x), 20000)]
    cc = count_cells(batches, grid, M, len(genes))
    n_tx, _, _ = tile_stats(cc, grid)
    jj, ii = np.nonzero(n_tx >= 5)
    assert len(ii) > 10
    pc, pm = tokens.pool_patches(batches, grid, ii, jj, M, len(genes), buffer_size=30000)
    indptr, tok, gn, cnt, tc = tokens.tile_tokens(pc, pm, grid, ii, jj, len(genes))
    np.testing.assert_array_equal(tc.sum(axis=1), n_tx[jj, ii])
    # brute force on a subset of tiles
    sub = np.arange(0, len(ii), max(1, len(ii) // 8))
    ref = tokens.reference_tokens(x, y, reg, codes, M, grid, ii[sub], jj[sub], len(genes))
    got = _densify(indptr, tok, gn, cnt, len(ii), len(genes))[sub]
    np.testing.assert_array_equal(got, ref)
    # writers: tokens.zarr round trip + the unit table (units.h5ad) + per tile totals
    import anndata as ad
    import zarr

    tc2 = tokens.write_tokens_zarr(tmp_path / "tokens.zarr", pc, pm, grid, ii, jj, genes, "IDC", chunk_tiles=16)
    np.testing.assert_array_equal(tc2, tc)
    g = zarr.open_group(str(tmp_path / "tokens.zarr"), mode="r")
    np.testing.assert_array_equal(g["indptr"][:], indptr)
    np.testing.assert_array_equal(g["token"][:], tok)
    np.testing.assert_array_equal(g["gene"][:], gn)
    np.testing.assert_array_equal(g["count"][:], cnt)
    np.testing.assert_array_equal(g["tile_counts"][:], tc)
    assert g.attrs["genes"] == genes and g.attrs["grid"] == 14
    from morphomol.data.units import write_units

    table = pd.DataFrame({"tile_id": [f"IDC__{i:06d}" for i in range(len(ii))], "index": np.arange(len(ii)),
                          "x_um": np.arange(len(ii), dtype=float), "y_um": np.zeros(len(ii))})
    write_units(tmp_path / "units.h5ad", table, tc, genes, spatial_um=table[["x_um", "y_um"]].to_numpy(), unit="tile",
                sample="IDC", patient="P1", index_col="tile_id")
    a = ad.read_h5ad(tmp_path / "units.h5ad")
    assert a.shape == (len(ii), len(genes)) and list(a.var_names) == genes
    assert list(a.obs_names) == list(table["tile_id"]) and set(a.obs["patient_id"]) == {"P1"}
    np.testing.assert_array_equal(a.obsm["spatial"][:, 0], table["x_um"])
    assert a.uns["morphomol"]["unit"] == "tile" and a.uns["morphomol"]["sample"] == "IDC"
    np.testing.assert_array_equal(np.asarray(a.X.sum(axis=1)).ravel(), tc.sum(axis=1))
