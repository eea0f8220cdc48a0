"""Panels from YAML and HVG (seurat_v3) per fold."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.config import PanelsConfig
from morphomol.panels import hvg_panel, hvg_seurat_v3, loess_fit, panel_fold, yaml_panel


def _counts(sample, n, genes, rng, hv=()):
    means = np.geomspace(0.5, 20, len(genes))  # a mean-variance trend for the loess
    lam = np.tile(means, (n, 1))
    for g in hv:  # same mean, overdispersed
        m = means[genes.index(g)]
        lam[:, genes.index(g)] = rng.gamma(0.4, m / 0.4, n)
    X = rng.poisson(lam).astype(np.float32)
    obs = pd.DataFrame({"tile_id": [f"{sample}__{i:06d}" for i in range(n)]})
    obs.index = obs["tile_id"].to_numpy()
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))


def _folds(path, *folds):
    rows = [{"fold": k, "sample_id": s, "patient_id": f"P{s}", "n_units": 1, "partition": p}
            for k, parts in enumerate(folds) for s, p in parts.items()]
    pd.DataFrame(rows).to_parquet(path)


def test_loess_recovers_quadratic():
    x = np.linspace(0, 1, 200)
    y = 1 + 2 * x - 3 * x**2
    np.testing.assert_allclose(loess_fit(x, y), y, atol=1e-8)


def test_hvg_mode_picks_overdispersed_genes_on_fit_tiles(tmp_path):
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(40)]
    hv = ["G03", "G17", "G29"]
    a = {"S0": _counts("S0", 300, genes, rng, hv), "S1": _counts("S1", 300, genes, rng, hv)}
    fit = list(a["S0"].obs_names) + list(a["S1"].obs_names)
    res = hvg_panel(a, fit, 3)
    assert res["mode"] == "hvg" and sorted(res["addon"]) == hv
    assert set(res["core"]) == set(genes) - set(hv)
    # only fit tiles count: make S1's fit tiles the only ones, with different HVGs there
    b = {"S0": _counts("S0", 200, genes, rng, ["G01"]), "S1": _counts("S1", 200, genes, rng, ["G05", "G06"])}
    res2 = hvg_panel(b, list(b["S1"].obs_names), 2)
    assert sorted(res2["addon"]) == ["G05", "G06"]
    # batch key is used: per-batch ranks combine
    adata = ad.concat([b["S0"], b["S1"]])
    adata.obs["sample"] = ["S0"] * 200 + ["S1"] * 200
    top = hvg_seurat_v3(adata, 3, "sample")
    assert set(top) == {"G01", "G05", "G06"}
    # rule entry with the fold table + unit tables: the fit samples' tiles (S0, S1; S2 is test)
    paths = []
    a["S2"] = _counts("S2", 300, genes, rng, ["G01"])
    for s, x in a.items():
        p = tmp_path / f"{s}.h5ad"
        x.write_h5ad(p)
        paths.append(p)
    _folds(tmp_path / "folds.parquet", {"S0": "fit", "S1": "fit", "S2": "test", "SV": "val"},
           {"S0": "test", "S1": "fit", "S2": "fit", "SV": "val"})
    out = tmp_path / "panels/fold0.json"
    panel_fold(folds=tmp_path / "folds.parquet", fold=0, units=dict(zip(["S0", "S1", "S2"], paths)),
               panel={"mode": "hvg"}, out=out, cfg=PanelsConfig(mode="hvg", n_hvg_targets=3), chunk_rows=64)
    assert sorted(json.loads(out.read_text())["addon"]) == hv


def test_yaml_panel_and_missing_genes():
    p = yaml_panel({"core": ["A", "B"], "addon": ["C"]}, {"S0": ["A", "B", "C", "D"]})
    assert p == {"mode": "yaml", "core": ["A", "B"], "addon": ["C"]}
    with pytest.raises(InputError, match=r"sample S1: 1 addon panel gene\(s\) not measured: C"):
        yaml_panel({"core": ["A"], "addon": ["C"]}, {"S0": ["A", "C"], "S1": ["A"]})
    with pytest.raises(InputError, match="both core and addon"):
        yaml_panel({"core": ["A"], "addon": ["A"]}, {"S0": ["A"]})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_hvgs_equal_scanpy_seurat_v3(tmp_path, seed):
    """The rule's HVGs (unit tables read in row chunks: per-gene sums per sample, loess, clipped sums) are
    scanpy's seurat_v3 HVGs (batch_key = sample) of the fit samples' tiles in memory; so are the normalised
    variances, and the rule entry's panel."""
    import scanpy as sc

    from morphomol.data.units import write_units
    from morphomol.panels import seurat_v3_batch, seurat_v3_streamed, unit_chunks

    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(int(rng.integers(60, 200)))]
    G = len(genes)
    units, mem = {}, []
    for k in range(4):
        n = int(rng.integers(150, 600))
        mean = np.geomspace(0.05, 40, G)[rng.permutation(G)]
        X = rng.poisson(rng.gamma(rng.uniform(0.2, 4, G), mean / 2, size=(n, G))).astype(np.float32)
        X[:, rng.integers(0, G, 3)] = 0  # genes constant in this sample
        X[rng.integers(0, n, 3), rng.integers(0, G, 3)] += 500  # outliers: clipped
        s = f"S{k}"
        ids = [f"{s}__{i:06d}" for i in range(n)]
        units[s] = write_units(tmp_path / f"{s}.h5ad", pd.DataFrame(index=ids), sp.csr_matrix(X), genes,
                               spatial_um=np.zeros((n, 2)), unit="tile", sample=s)
        if k < 3:
            mem.append(ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame({"sample": s}, index=ids),
                                  var=pd.DataFrame(index=genes)))
    adata = ad.concat(mem)
    adata.obs["sample"] = adata.obs["sample"].astype("category")
    n_top = int(rng.integers(5, G // 3))
    with np.errstate(all="ignore"):
        ref = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, batch_key="sample",
                                          inplace=False)
    want = list(adata.var_names[ref["highly_variable"].to_numpy(bool)])
    batches = {s: unit_chunks(units[s], genes, chunk_rows=61) for s in ("S0", "S1", "S2")}
    assert seurat_v3_streamed(batches, genes, n_top) == want
    norm = np.mean([seurat_v3_batch(batches[s], G) for s in sorted(batches)], axis=0)
    np.testing.assert_allclose(norm, ref["variances_norm"].to_numpy(), rtol=1e-12, atol=0)
    _folds(tmp_path / "folds.parquet", {"S0": "fit", "S1": "fit", "S2": "fit", "S3": "test", "SV": "val"})
    res = panel_fold(folds=tmp_path / "folds.parquet", fold=0, units=units, panel={"mode": "hvg"},
                     out=tmp_path / "fold0.json", cfg=PanelsConfig(mode="hvg", n_hvg_targets=n_top), chunk_rows=100)
    assert res["addon"] == want and res["core"] == [g for g in genes if g not in set(want)]
