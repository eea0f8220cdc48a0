"""Per-gene metrics (NaN-safe), recall@k protocol, run output files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr, spearmanr

from morphomol.data.runs import read_metrics, read_predictions, write_metrics, write_predictions
from morphomol.errors import InputError
from morphomol.eval.metrics import (
    pearson,
    per_gene_metrics,
    recall_at_k,
    regression_report,
    spearman,
    summarize,
)
from morphomol.util.jsonio import write_json


def test_per_gene_metrics_match_scipy():
    rng = np.random.default_rng(0)
    y = rng.poisson(2.0, size=(300, 4)).astype(float)  # ties, as in real counts
    y_hat = y + rng.normal(0, 1.0, size=y.shape)
    pg = per_gene_metrics(np.log1p(y), np.log1p(np.clip(y_hat, 0, None)), ["a", "b", "c", "d"])
    for j, g in enumerate("abcd"):
        a, b = np.log1p(y[:, j]), np.log1p(np.clip(y_hat[:, j], 0, None))
        assert pg.at[g, "pearson"] == pytest.approx(pearsonr(a, b)[0], abs=1e-10)
        assert pg.at[g, "spearman"] == pytest.approx(spearmanr(a, b)[0], abs=1e-10)
        assert pg.at[g, "mse"] == pytest.approx(np.mean((a - b) ** 2))
        assert pg.at[g, "mae"] == pytest.approx(np.mean(np.abs(a - b)))


def test_constant_columns_are_nan_and_excluded_from_means(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 3))
    y[:, 1] = 2.0  # gene never varies on the test tiles
    y_hat = y + rng.normal(0, 0.1, size=y.shape)
    y_hat[:, 2] = 0.5  # model predicts a constant
    rep = regression_report(y, y_hat, ["g0", "g1", "g2"])
    assert np.isnan(rep["per_gene"]["g1"]["pearson"]) and np.isnan(rep["per_gene"]["g2"]["spearman"])
    assert np.isfinite(rep["per_gene"]["g1"]["mse"])
    assert rep["n_undefined"] == 2
    assert rep["mean"]["pearson"] == pytest.approx(rep["per_gene"]["g0"]["pearson"])
    assert rep["mean"]["mse"] == pytest.approx(np.mean([rep["per_gene"][g]["mse"] for g in ("g0", "g1", "g2")]))
    write_json(tmp_path / "m.json", rep)
    back = json.loads((tmp_path / "m.json").read_text())  # strict JSON: NaN written as null
    assert back["per_gene"]["g1"]["pearson"] is None
    all_const = summarize(per_gene_metrics(np.ones((5, 1)), np.ones((5, 1)), ["x"]))
    assert np.isnan(all_const["pearson"]) and all_const["mse"] == 0.0


def test_bad_predictions_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        per_gene_metrics(np.zeros((3, 1)), np.array([[0.0], [np.nan], [1.0]]), ["g"])
    with pytest.raises(ValueError, match="shape"):
        per_gene_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["g"])


def test_recall_is_one_for_identical_embeddings():
    e = np.random.default_rng(0).normal(size=(600, 32))
    r = recall_at_k(e, e.copy(), ks=(1, 5), chunk_size=256)
    assert r["recall@1"] == 1.0 and r["recall@5"] == 1.0
    assert (r["n_chunks"], r["n_queries"], r["chunk_size"]) == (2, 512, 256)  # remainder of 88 dropped
    assert r["random_recall@1"] == pytest.approx(1 / 256) and r["random_recall@5"] == pytest.approx(5 / 256)


def test_recall_of_random_embeddings_is_k_over_n():
    rng = np.random.default_rng(0)
    n = 256 * 40
    r = recall_at_k(rng.normal(size=(n, 16)), rng.normal(size=(n, 16)), ks=(1, 5), chunk_size=256, seed=1)
    # binomial standard errors: 0.0006 (k=1) and 0.0014 (k=5)
    assert r["recall@1"] == pytest.approx(1 / 256, abs=0.0025)
    assert r["recall@5"] == pytest.approx(5 / 256, abs=0.006)


def test_recall_small_sets_use_one_chunk_and_ties_do_not_help():
    e = np.random.default_rng(0).normal(size=(10, 4))
    r = recall_at_k(e, e, ks=(1, 5), chunk_size=256)
    assert r["chunk_size"] == 10 and r["random_recall@1"] == pytest.approx(0.1)
    same = np.ones((10, 4))  # every transcript embedding identical: no information
    assert recall_at_k(np.random.default_rng(1).normal(size=(10, 4)), same, ks=(1,))["recall@1"] == 0.0


def test_partial_signal_ranks_between_random_and_perfect():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(512, 16))
    txt = img + rng.normal(scale=1.5, size=img.shape)
    r = recall_at_k(img, txt, ks=(1, 5), chunk_size=256)
    assert r["random_recall@1"] < r["recall@1"] < 1.0
    assert r["recall@1"] <= r["recall@5"]


def test_predictions_parquet_long_format(tmp_path):
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_predictions(tmp_path / "p.parquet", ["s__000000", "s__000001", "s__000002"], ["A", "B"], y, y + 1)
    df = pd.read_parquet(tmp_path / "p.parquet")
    assert list(df.columns) == ["tile_id", "gene", "y", "y_hat"]
    assert df.astype({"tile_id": str, "gene": str}).iloc[3].tolist() == ["s__000001", "B", 3.0, 4.0]
    assert not list(tmp_path.glob(".*tmp*"))


def test_vector_correlations_match_scipy():
    rng = np.random.default_rng(3)
    a = rng.poisson(2.0, size=200).astype(float)
    b = a + rng.normal(0, 1.0, size=200)
    assert pearson(a, b) == pytest.approx(pearsonr(a, b)[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    assert np.isnan(pearson(a, np.ones(200))) and np.isnan(spearman(np.ones(200), b))
    assert np.isnan(pearson([1.0], [2.0]))


def test_metrics_json_roundtrip_and_checks(tmp_path):
    y = np.random.default_rng(4).normal(size=(20, 2))
    rep = regression_report(y, y + 0.1, ["A", "B"])
    run = tmp_path / "runs" / "s" / "fold1"
    write_metrics(run / "metrics.json", {"setting": "s", "fold": 1, "kind": "regression", "status": "ok", **rep})
    back = read_metrics(run)  # a run directory works as well as the file
    assert back["per_gene"]["A"]["mse"] == pytest.approx(0.01) and back["_file"] == str(run / "metrics.json")
    assert (run / "metrics.json").read_text().endswith("}\n")
    (run / "metrics.json").write_text("{bad")
    with pytest.raises(InputError, match="not valid JSON"):
        read_metrics(run / "metrics.json")
    write_metrics(run / "metrics.json", {"setting": "s", "fold": 1, "kind": "clip", "status": "ok", "recall@1": 0.1})
    with pytest.raises(InputError, match="recall@5"):
        read_metrics(run)
    write_metrics(run / "metrics.json", {"setting": "s", "fold": 1, "kind": "other"})
    with pytest.raises(InputError, match="unknown kind"):
        read_metrics(run)


def test_read_predictions(tmp_path):
    y = np.zeros((2, 1), dtype=np.float32)
    write_predictions(tmp_path / "a.parquet", ["s__000000", "s__000001"], ["G"], y, y + 1)
    write_predictions(tmp_path / "b.parquet", ["t__000000"], ["G"], y[:1], y[:1])
    df = read_predictions([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert len(df) == 3 and list(df.columns) == ["tile_id", "gene", "y", "y_hat"]
    assert read_predictions([]).empty
    with pytest.raises(InputError, match="cannot read predictions"):
        read_predictions([tmp_path / "missing.parquet"])
