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
    # rule entry with split + counts files
    paths = []
    for s, x in a.items():
        p = tmp_path / f"{s}.h5ad"
        x.write_h5ad(p)
        paths.append(p)
    split = pd.DataFrame({"tile_id": fit, "partition": ["fit"] * 450 + ["test"] * 150})
    split.to_parquet(tmp_path / "fold0.parquet")
    out = tmp_path / "panels/fold0.json"
    panel_fold(split=tmp_path / "fold0.parquet", units=dict(zip(["S0", "S1"], paths)), panel={"mode": "hvg"},
               out=out, cfg=PanelsConfig(mode="hvg", n_hvg_targets=3))
    assert sorted(json.loads(out.read_text())["addon"]) == hv


def test_yaml_panel_and_missing_genes():
    p = yaml_panel({"core": ["A", "B"], "addon": ["C"]}, {"S0": ["A", "B", "C", "D"]})
    assert p == {"mode": "yaml", "core": ["A", "B"], "addon": ["C"]}
    with pytest.raises(InputError, match=r"sample S1: 1 addon panel gene\(s\) not measured: C"):
        yaml_panel({"core": ["A"], "addon": ["C"]}, {"S0": ["A", "C"], "S1": ["A"]})
    with pytest.raises(InputError, match="both core and addon"):
        yaml_panel({"core": ["A"], "addon": ["A"]}, {"S0": ["A"]})
