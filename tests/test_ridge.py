"""HEST-style ridge baseline: recovers linear signal, chooses alpha by patient-grouped CV, and
writes metrics.json / predictions.parquet for a fold from the fold table, real unit tables and feature
stores, scored by the metrics every trained setting uses (morphomol.eval.metrics). Equality with the
in-memory pipeline it replaced: tests/test_ridge_out_of_core.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from morphomol.baselines import ridge
from morphomol.baselines.ridge import ridge_baseline, run_ridge_fold
from morphomol.config.sections import RidgeConfig
from morphomol.data.units import write_units
from morphomol.errors import InputError
from morphomol.eval.metrics import per_gene_metrics, regression_report


def _linear(n: int, d: int, g: int, n_groups: int, seed: int, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, g))
    x = rng.normal(size=(n, d))
    y = x @ w / np.sqrt(d) + noise * rng.normal(size=(n, g))
    groups = np.repeat(np.arange(n_groups), n // n_groups)
    return x, y, groups


def test_recovers_linear_signal_and_not_noise():
    x, y, groups = _linear(400, 40, 5, 10, seed=0)
    res = ridge_baseline(x[:300], y[:300], groups[:300], x[300:], y[300:], seed=0)
    assert res["n_components"] == 40  # PCA capped by the number of features
    assert min(res["pearson"]) > 0.9 and res["mean"]["pearson"] > 0.9
    assert set(res["per_gene"]) == {f"y{j}" for j in range(5)}
    rng = np.random.default_rng(1)
    res0 = ridge_baseline(x[:300], rng.normal(size=(300, 5)), groups[:300], x[300:], rng.normal(size=(100, 5)))
    assert abs(res0["mean"]["pearson"]) < 0.2


def test_pca_capped_by_samples_and_matches_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x, y, groups = _linear(60, 300, 3, 6, seed=2)
    res = ridge_baseline(x[:40], y[:40], groups[:40], x[40:], y[40:], alphas=[3.0], n_components=256)
    assert res["n_components"] == 40 and res["alpha"] == 3.0
    sc = StandardScaler().fit(x[:40])
    pca = PCA(n_components=40, random_state=0).fit(sc.transform(x[:40]))
    model = Ridge(alpha=3.0).fit(pca.transform(sc.transform(x[:40])), y[:40])
    want = model.predict(pca.transform(sc.transform(x[40:])))
    np.testing.assert_allclose(res["pred"], want, rtol=1e-6, atol=1e-8)


def test_alpha_selection_is_grouped_by_patient():
    # Each patient has its own target offset and its own feature "fingerprint": memorising the
    # fingerprints predicts held-out tiles of *seen* patients but not unseen patients. Grouped CV
    # must therefore prefer heavy shrinkage, and no patient may straddle an inner split.
    rng = np.random.default_rng(3)
    n_groups, per, d = 12, 20, 30
    groups = np.repeat(np.arange(n_groups), per)
    finger = rng.normal(size=(n_groups, d)) * 3
    x = finger[groups] + 0.1 * rng.normal(size=(n_groups * per, d))
    y = rng.normal(size=(n_groups, 2))[groups] + 0.05 * rng.normal(size=(n_groups * per, 2))
    alphas = [1e-3, 1e-1, 1e1, 1e3, 1e5]
    res = ridge_baseline(x, y, groups, x[:5], None, alphas=alphas, inner_folds=4)
    assert res["n_inner_folds"] == 4
    assert set(res["inner_groups"]) == {str(g) for g in range(n_groups)}  # one inner fold per patient
    assert sorted(set(res["inner_groups"].values())) == [0, 1, 2, 3]
    assert res["alpha"] == 1e5
    # with a real, shared signal the same search picks light shrinkage
    x2, y2, g2 = _linear(240, 30, 2, 12, seed=4, noise=0.05)
    res2 = ridge_baseline(x2, y2, g2, x2[:5], None, alphas=alphas, inner_folds=4)
    assert res2["alpha"] <= 1e1
    assert set(res2["cv"]) == {repr(a) for a in alphas}


def test_bad_inputs():
    x, y, groups = _linear(40, 5, 2, 1, seed=5)
    with pytest.raises(InputError, match="patients"):
        ridge_baseline(x, y, groups, x, y, alphas=[1.0, 10.0])
    res = ridge_baseline(x, y, groups, x, y, alphas=[1.0])  # one alpha: no CV needed
    assert res["alpha"] == 1.0
    with pytest.raises(InputError, match="positive"):
        ridge_baseline(x, y, groups, x, y, alphas=[0.0])
    with pytest.raises(InputError, match="shapes"):
        ridge_baseline(x, y, groups, x[:, :3], y)
    m = per_gene_metrics(np.ones((5, 1)), np.arange(5.0)[:, None], ["FLAT"])
    assert np.isnan(m.at["FLAT", "pearson"])
    assert m.at["FLAT", "mse"] == pytest.approx(np.mean((np.arange(5.0) - 1) ** 2))


def test_metrics_are_those_of_the_trained_settings():
    # a constant target gene on the test tiles: same NaN handling / means / n_undefined as regression_report
    x, y, groups = _linear(120, 10, 3, 6, seed=7)
    y_te = y[100:].copy()
    y_te[:, 1] = 0.5
    res = ridge_baseline(x[:100], y[:100], groups[:100], x[100:], y_te, alphas=[1.0], genes=["a", "b", "c"])
    want = regression_report(y_te, res["pred"], ["a", "b", "c"])
    assert np.isnan(res["per_gene"]["b"]["pearson"]) and res["n_undefined"] == want["n_undefined"] == 1
    assert res["mean"] == want["mean"] and res["genes"] == ["a", "b", "c"]
    np.testing.assert_array_equal(res["pearson"], [want["per_gene"][g]["pearson"] for g in "abc"])


def _cohort(tmp: Path, genes: list[str], addon: list[str]):
    """Six samples of 30 tiles: features stores, unit tables (raw counts of all genes), fold table, panel."""
    rng = np.random.default_rng(6)
    w = rng.normal(size=(16, len(genes)))
    feats, units, rows = {}, {}, []
    for s in range(6):
        sample, n = f"S{s}", 30
        x = rng.normal(size=(n, 16)).astype(np.float32)
        counts = np.maximum(0, np.round(np.expm1(np.clip(x @ w / 4 + 1.5, 0, 5)))).astype(np.uint32)
        fz = tmp / f"features/{sample}.zarr"
        g = zarr.open_group(str(fz), mode="w")
        g.create_array("features", shape=x.shape, dtype="float32")[:] = x
        g.attrs.update({"encoder": "vit_s", "dim": 16, "n_tiles": n})
        ids = [f"{sample}__{i:06d}" for i in range(n)]
        obs = pd.DataFrame({"x_px": np.arange(n) * 256, "y_px": 0}, index=ids)
        units[sample] = write_units(tmp / f"samples/{sample}/units.h5ad", obs, counts, genes,
                                    spatial_um=np.zeros((n, 2)), unit="tile", sample=sample, patient=f"P{s}")
        feats[sample] = fz
        part = "test" if s < 2 else ("val" if s == 2 else "fit")
        rows.append({"fold": 0, "sample_id": sample, "patient_id": f"P{s}", "n_units": n, "partition": part})
    split = tmp / "splits/folds.parquet"
    split.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(split)
    panel = tmp / "panels/fold0.json"
    panel.parent.mkdir(parents=True)
    panel.write_text(json.dumps({"mode": "yaml", "core": [g for g in genes if g not in addon], "addon": addon}))
    return split, panel, units, feats


RIDGE = RidgeConfig(n_components=256, inner_folds=3, select_by="mse", alphas=(0.1, 10.0, 1000.0))


def test_run_ridge_fold_writes_contract_outputs(tmp_path):
    genes = ["A", "B", "C", "D"]
    split, panel, units, feats = _cohort(tmp_path, genes, ["C", "A"])
    out = tmp_path / "runs/ridge_vit_s/fold0"
    m = run_ridge_fold(split, panel, units, feats, out / "metrics.json", out / "predictions.parquet",
                       encoder="vit_s", fold=0, cfg=RIDGE)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    for key in ("setting", "fold", "kind", "status", "n_fit", "n_val", "n_test", "genes", "mean", "per_gene",
                "n_undefined", "best_epoch", "epochs_run", "train_seconds", "tiles_per_second"):
        assert key in saved
    assert saved["setting"] == "ridge_vit_s" and saved["kind"] == "regression" and saved["status"] == "ok"
    assert (saved["n_fit"], saved["n_val"], saved["n_test"]) == (90, 30, 60)
    assert saved["genes"] == ["C", "A"] and set(saved["per_gene"]) == {"C", "A"}
    assert set(saved["mean"]) == {"pearson", "spearman", "mse", "mae"}
    assert saved["mean"]["pearson"] > 0.5 and saved["alpha"] in (0.1, 10.0, 1000.0)
    pred = pd.read_parquet(out / "predictions.parquet")
    assert list(pred.columns) == ["tile_id", "gene", "y", "y_hat", "sample_id"] and len(pred) == 60 * 2
    assert set(pred["sample_id"]) == {"S0", "S1"}
    assert pred["tile_id"].str.startswith(("S0__", "S1__")).all()
    # y is log1p of the add-on counts of the right tile (unit table row 7 of S1, gene A = column 0)
    row = pred[(pred.tile_id == "S1__000007") & (pred.gene == "A")].iloc[0]
    import anndata as ad

    counts = ad.read_h5ad(units["S1"]).X[7].toarray().ravel()
    assert row.y == pytest.approx(np.log1p(counts[0]), rel=1e-6)
    # the metrics are regression_report of the written predictions, as for the trained settings
    pred["gene"] = pred["gene"].astype(str)
    wide_y = pred.pivot(index="tile_id", columns="gene", values="y")[["C", "A"]].to_numpy()
    wide_p = pred.pivot(index="tile_id", columns="gene", values="y_hat")[["C", "A"]].to_numpy()
    rep = regression_report(wide_y, wide_p, ["C", "A"])
    assert saved["mean"]["pearson"] == pytest.approx(rep["mean"]["pearson"], abs=1e-5)
    # defaults when no ridge section is given (17 alphas, inner_folds 5 capped by 4 training patients)
    m2 = run_ridge_fold(split, panel, units, feats, out / "m2.json", out / "p2.parquet", encoder="vit_s", fold=0)
    assert len(m2["alpha_cv"]) == 17 and m2["inner_folds"] == 4


def test_run_ridge_fold_checks_rows(tmp_path):
    from morphomol.data.features import UnitGeometry, write_features

    split, panel, units, feats = _cohort(tmp_path, ["A", "B"], ["B"])
    out = tmp_path / "runs/ridge_vit_s/fold0"
    # a features store whose rows are the units of another sample
    x = np.zeros((30, 16), np.float32)
    other = UnitGeometry(np.array([f"S4__{i:06d}" for i in range(30)], dtype=object), np.zeros((30, 2)),
                         np.zeros((30, 2)))
    bad = dict(feats, S3=write_features(tmp_path / "S3_wrong.zarr", x, encoder="vit_s", units=other))
    with pytest.raises(InputError, match="belong to another unit"):
        run_ridge_fold(split, panel, units, bad, out / "metrics.json", out / "predictions.parquet",
                       encoder="vit_s", fold=0, cfg=RIDGE)
    df = pd.read_parquet(split)
    df.loc[df["sample_id"] == "S3", "n_units"] = 31  # a fold table older than the unit tables
    df.to_parquet(split)
    with pytest.raises(InputError, match="lists 31 units for sample 'S3'"):
        run_ridge_fold(split, panel, units, feats, out / "metrics.json", out / "predictions.parquet",
                       encoder="vit_s", fold=0, cfg=RIDGE)
    df.loc[df["sample_id"] == "S3", "n_units"] = 30
    df.to_parquet(split)
    with pytest.raises(InputError, match="no unit table for sample 'S5'"):
        run_ridge_fold(split, panel, {k: v for k, v in units.items() if k != "S5"}, feats, out / "metrics.json",
                       out / "predictions.parquet", encoder="vit_s", fold=0, cfg=RIDGE)
    with pytest.raises(InputError, match="fold 1 is not in the fold table"):
        run_ridge_fold(split, panel, units, feats, out / "metrics.json", out / "predictions.parquet",
                       encoder="vit_s", fold=1, cfg=RIDGE)
    assert not out.exists() or not any(out.iterdir())


def test_run_ridge_fold_bad_panel_writes_nothing(tmp_path):
    split, panel, units, feats = _cohort(tmp_path, ["A", "B"], ["B"])
    panel.write_text(json.dumps({"core": ["A"], "addon": ["ZZZ"]}))
    out = tmp_path / "runs/ridge_vit_s/fold0"
    with pytest.raises(InputError, match="ZZZ"):
        run_ridge_fold(split, panel, units, feats, out / "metrics.json", out / "predictions.parquet",
                       encoder="vit_s", fold=0, cfg=RIDGE)
    assert not out.exists() or not any(out.iterdir())
    assert ridge.DEFAULT_COMPONENTS == 256


def test_blockwise_report_is_the_shared_report():
    from morphomol.baselines.ridge import report_blockwise

    rng = np.random.default_rng(8)
    y, p = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    y[:, 2] = 1.0  # undefined correlation
    p[:5, 4] = p[5:10, 4]  # ties in the ranks
    genes = [f"g{j}" for j in range(7)]
    got, want = report_blockwise(y, p, genes, block=3), regression_report(y, p, genes)
    assert got["genes"] == want["genes"] and got["n_undefined"] == want["n_undefined"] == 1
    for m, v in want["mean"].items():
        assert got["mean"][m] == pytest.approx(v, rel=1e-12)
    for g in genes:  # the same numbers up to summation order within a block
        for m, v in want["per_gene"][g].items():
            assert got["per_gene"][g][m] == pytest.approx(v, rel=1e-12, nan_ok=True)
