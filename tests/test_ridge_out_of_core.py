"""The ridge baselines out of core equal the in-memory pipeline they replace.

The reference below is the in-memory implementation the project used before (StandardScaler -> PCA ->
closed-form ridge on the whole training matrix, inner GroupKFold refitting scaler and PCA, out-of-fold
predictions scored by per-gene Pearson / MSE; HEST's probe with scikit-learn's Ridge). The fold jobs now
read one sample and one chunk at a time into float64 sums; on demo-like inputs (fusion: 6 samples of ~170
tiles, 3 patients, 64-d features, 12 add-on genes; spots: 6 samples of ~400 spots, 100 targets) the chosen
alpha, the inner-CV scores, the predictions and the metrics agree within 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.baselines.ridge import MomentSums, fit_pca_ridge, inner_groups, ridge_baseline, run_ridge_fold
from morphomol.config.sections import RidgeConfig
from morphomol.data.features import write_features
from morphomol.data.units import write_units
from morphomol.errors import InputError
from morphomol.eval.metrics import column_pearson, regression_report
from morphomol.splits import make_folds, sample_table

DEFAULT = RidgeConfig(n_components=256, inner_folds=5, select_by="mse", alphas=None)


# ------------------------------------------------------------------ the in-memory reference
class _Projector:
    def __init__(self, n_components: int, seed: int, solver: str = "auto") -> None:
        self.n_components, self.seed, self.solver = n_components, seed, solver

    def fit(self, x):
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        self.k = int(min(self.n_components, x.shape[0], x.shape[1]))
        z = self.scaler.transform(x)
        self.pca = PCA(n_components=self.k, random_state=self.seed, svd_solver=self.solver).fit(z)
        return self

    def transform(self, x):
        return self.pca.transform(self.scaler.transform(x))


def _ridge_fit_predict(z_tr, y_tr, z_te, alphas):
    zm, ym = z_tr.mean(axis=0), y_tr.mean(axis=0)
    u, s, vt = np.linalg.svd(z_tr - zm, full_matrices=False)
    uty = u.T @ (y_tr - ym)
    zte = (z_te - zm) @ vt.T
    return [zte @ ((s / (s * s + float(a)))[:, None] * uty) + ym for a in alphas]


def reference_ridge(xtr, ytr, groups, xte, yte, alphas=None, n_components=256, inner_folds=5, select_by="mse",
                    solver="auto"):
    from sklearn.model_selection import GroupKFold

    xtr, ytr, xte = np.asarray(xtr, np.float64), np.asarray(ytr, np.float64), np.asarray(xte, np.float64)
    alphas = [float(a) for a in (alphas if alphas is not None else np.logspace(-2, 6, 17))]
    cv, n_groups = {}, len(np.unique(groups))
    if len(alphas) == 1:
        best = alphas[0]
    else:
        k = int(min(inner_folds, n_groups))
        oof = [np.zeros_like(ytr) for _ in alphas]
        for tr, va in GroupKFold(n_splits=k).split(xtr, ytr, groups):
            proj = _Projector(n_components, 0, solver).fit(xtr[tr])
            for i, p in enumerate(_ridge_fit_predict(proj.transform(xtr[tr]), ytr[tr], proj.transform(xtr[va]),
                                                     alphas)):
                oof[i][va] = p
        scores = []
        for a, p in zip(alphas, oof, strict=True):
            r = column_pearson(ytr, p)
            mean_r = float(np.nanmean(r)) if np.isfinite(r).any() else float("-inf")
            mse = float(((ytr - p) ** 2).mean())
            cv[repr(a)] = {"pearson": mean_r if np.isfinite(mean_r) else None, "mse": mse}
            scores.append((-mse, mean_r) if select_by == "mse" else (mean_r, -mse))
        best = alphas[max(range(len(alphas)), key=lambda i: scores[i])]
    proj = _Projector(n_components, 0, solver).fit(xtr)
    pred = _ridge_fit_predict(proj.transform(xtr), ytr, proj.transform(xte), [best])[0]
    out = {"alpha": best, "cv": cv, "n_components": proj.k, "pred": pred}
    if yte is not None:
        out.update(regression_report(np.asarray(yte, np.float64), pred, [f"g{j}" for j in range(ytr.shape[1])]))
    return out


def reference_hest(x_tr, y_tr, x_te, n_components, solver="lsqr"):
    """HEST's probe as the spots study ran it (sklearn Ridge without intercept; ``solver`` lsqr = HEST's)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te = np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64)
    sc = StandardScaler().fit(x_tr)
    k = int(min(n_components, x_tr.shape[0], x_tr.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit(sc.transform(x_tr))
    alpha = 100.0 / (k * y_tr.shape[1])
    kw = {"max_iter": 1000, "random_state": 0} if solver == "lsqr" else {}
    reg = Ridge(alpha=alpha, fit_intercept=False, solver=solver, **kw).fit(pca.transform(sc.transform(x_tr)), y_tr)
    return reg.predict(pca.transform(sc.transform(x_te)))


def _assert_cv_equal(got, want, tol=1e-6):
    assert set(got) == set(want)
    for a in want:
        assert got[a]["mse"] == pytest.approx(want[a]["mse"], rel=tol, abs=tol)
        if want[a]["pearson"] is None:
            assert got[a]["pearson"] is None
        else:
            assert got[a]["pearson"] == pytest.approx(want[a]["pearson"], abs=tol)


# ------------------------------------------------------------------ demo-like cohorts
def _features(rng, n, d, offset, mix=None):
    """Correlated, offset features like a frozen encoder's (low rank + noise, per-column scales); ``mix``: the
    (8, d) map from the latent state (shared by a cohort's samples)."""
    lat = rng.normal(size=(n, 8))
    mix = rng.normal(size=(8, d)) * rng.uniform(0.2, 3.0, d) if mix is None else mix
    x = lat @ mix + 0.7 * rng.normal(size=(n, d))
    return (x + offset).astype(np.float32), lat


def _write_cohort(tmp: Path, *, n_samples, n_patients, per_sample, dim, genes, unit, seed, n_folds):
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=dim) * 4
    mix = rng.normal(size=(8, dim)) * rng.uniform(0.2, 3.0, dim)
    load = rng.normal(size=(8, len(genes))) * 0.5
    units, feats, patients, sizes = {}, {}, [], []
    for i in range(n_samples):
        s, p = f"S{i + 1:02d}", f"P{i % n_patients + 1}"
        n = int(per_sample + rng.integers(-per_sample // 5, per_sample // 5))
        x, lat = _features(rng, n, dim, offset, mix)
        counts = rng.poisson(np.exp(np.clip(lat @ load + rng.normal(size=len(genes)) * 0.3, -4, 3))).astype(np.float32)
        counts[:, [3, 13]] = 0.0  # genes never detected (an add-on gene of the fusion panel): constant targets
        ids = [f"{s}__{j:06d}" for j in range(n)]
        obs = pd.DataFrame({"index": np.arange(n), "n_counts": counts.sum(1) + 50}, index=ids)
        units[s] = write_units(tmp / "samples" / s / "units.h5ad", obs, counts, genes, spatial_um=np.zeros((n, 2)),
                               unit=unit, sample=s, patient=p)
        feats[s] = write_features(tmp / "features" / f"{s}.zarr", x, encoder="vit_s", chunk_rows=64)
        patients.append(p)
        sizes.append(n)
    folds = make_folds(sample_table(list(units), patients, sizes), n_folds=n_folds, val_fraction=0.25, seed=7)
    fpath = tmp / "splits" / "folds.parquet"
    fpath.parent.mkdir(parents=True, exist_ok=True)
    folds.to_parquet(fpath, index=False)
    return units, feats, fpath, folds


def _in_memory(units, feats, samples, genes, transform):
    """Every unit of ``samples`` at once (the old loaders): X float32, Y, unit ids."""
    import anndata as ad

    from morphomol.data.features import read_features

    xs, ys, ids = [], [], []
    for s in samples:
        a = ad.read_h5ad(units[s])
        pos = {g: i for i, g in enumerate(a.var_names)}
        c = a.X[:, [pos[g] for g in genes]]
        ys.append(transform(c, a.obs["n_counts"].to_numpy()))
        xs.append(read_features(feats[s])[0])
        ids += list(a.obs_names)
    return np.concatenate(xs), np.concatenate(ys), ids


@pytest.fixture(scope="module")
def fusion_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusion_demo")
    genes = [f"CORE{j}" for j in range(10)] + [f"ADD{j}" for j in range(12)]
    units, feats, fpath, folds = _write_cohort(tmp, n_samples=6, n_patients=3, per_sample=170, dim=64, genes=genes,
                                               unit="tile", seed=1, n_folds=3)
    panel = tmp / "panel.json"
    panel.write_text(json.dumps({"mode": "yaml", "core": genes[:10], "addon": genes[10:]}))
    return {"tmp": tmp, "units": units, "feats": feats, "folds": fpath, "table": folds, "panel": panel,
            "genes": genes[10:]}


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_fusion_fold_equals_the_in_memory_ridge(fusion_demo, fold):
    d = fusion_demo
    out = d["tmp"] / "runs" / f"fold{fold}"
    m = run_ridge_fold(d["folds"], d["panel"], d["units"], d["feats"], out / "metrics.json",
                       out / "predictions.parquet", encoder="vit_s", fold=fold, cfg=DEFAULT)
    rows = d["table"][d["table"]["fold"] == fold].sort_values("sample_id")
    tr = rows[rows["partition"] != "test"]
    te = rows[rows["partition"] == "test"]
    log1p = lambda c, _t: np.log1p(np.asarray(c.toarray(), np.float64))  # noqa: E731
    xtr, ytr, _ = _in_memory(d["units"], d["feats"], tr["sample_id"], d["genes"], log1p)
    xte, yte, ids = _in_memory(d["units"], d["feats"], te["sample_id"], d["genes"], log1p)
    groups = np.repeat(tr["patient_id"].to_numpy(), tr["n_units"].to_numpy())
    ref = reference_ridge(xtr, ytr, groups, xte, yte)
    assert m["alpha"] == ref["alpha"] and m["n_components"] == ref["n_components"] == 64
    _assert_cv_equal(m["alpha_cv"], ref["cv"])
    for k in ("pearson", "spearman", "mse", "mae"):
        assert m["mean"][k] == pytest.approx(ref["mean"][k], abs=1e-6)
    for g, rg in zip(d["genes"], ref["genes"], strict=True):
        for k in ("pearson", "spearman", "mse", "mae"):
            a, b = m["per_gene"][g][k], ref["per_gene"][rg][k]
            assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-6)
    assert m["n_undefined"] == ref["n_undefined"] >= 1  # ADD3... the constant gene (column 3 of the panel is CORE3)
    pred = pd.read_parquet(out / "predictions.parquet")
    assert list(pred.columns) == ["tile_id", "gene", "y", "y_hat", "sample_id"]
    assert list(pred["tile_id"].astype(str)[:: len(d["genes"])]) == ids  # test tiles, sample-sorted, tile-major
    np.testing.assert_allclose(pred["y_hat"].to_numpy().reshape(len(ids), -1), ref["pred"].astype(np.float32),
                               atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(pred["y"].to_numpy().reshape(len(ids), -1), yte.astype(np.float32))
    # the in-memory API (the same engine, fed from arrays) gives the reference's predictions too
    mem = ridge_baseline(xtr, ytr, groups, xte, yte)
    np.testing.assert_allclose(mem["pred"], ref["pred"], atol=1e-9, rtol=1e-9)


def test_streaming_is_exact_whatever_the_chunk(fusion_demo):
    d = fusion_demo
    out = d["tmp"] / "chunks"
    cfg = RidgeConfig(n_components=16, inner_folds=3, select_by="pearson", alphas=(0.1, 10.0, 1000.0))
    a = run_ridge_fold(d["folds"], d["panel"], d["units"], d["feats"], out / "a.json", out / "a.parquet",
                       encoder="vit_s", fold=0, cfg=cfg)
    b = run_ridge_fold(d["folds"], d["panel"], d["units"], d["feats"], out / "b.json", out / "b.parquet",
                       encoder="vit_s", fold=0, cfg=cfg, chunk_rows=7)
    assert a["alpha"] == b["alpha"]
    _assert_cv_equal(a["alpha_cv"], b["alpha_cv"], tol=1e-9)
    pa_, pb = pd.read_parquet(out / "a.parquet"), pd.read_parquet(out / "b.parquet")
    np.testing.assert_allclose(pa_["y_hat"], pb["y_hat"], atol=1e-6)
    import pyarrow.parquet as pq

    n_test = int(d["table"].query("fold == 0 and partition == 'test'")["n_units"].sum())
    assert pq.ParquetFile(out / "b.parquet").num_row_groups >= n_test // 7  # one row group per chunk


def test_pca_truncated_and_the_randomized_solver():
    """Truncated PCA: equal to scikit-learn's exact solvers. Where scikit-learn's ``auto`` picks its randomized
    solver (here 120 features, 16 components, 600 rows: not 10x more rows than features, > 500 rows), the old
    in-memory result was that solver's approximation; the out-of-core one equals the exact (``full``) PCA."""
    rng = np.random.default_rng(3)
    x, lat = _features(rng, 800, 120, rng.normal(size=120))
    y = lat @ rng.normal(size=(8, 5)) * 0.3 + rng.normal(size=(800, 5))
    groups = np.repeat(np.arange(8), 100).astype(str)
    got = ridge_baseline(x[:600], y[:600], groups[:600], x[600:], y[600:], n_components=16, inner_folds=4)
    want = reference_ridge(x[:600], y[:600], groups[:600], x[600:], y[600:], n_components=16, inner_folds=4,
                           solver="full")
    assert got["alpha"] == want["alpha"] and got["n_components"] == 16
    _assert_cv_equal(got["cv"], want["cv"])
    np.testing.assert_allclose(got["pred"], want["pred"], atol=1e-8, rtol=1e-8)
    # tall data (>= 10 rows per feature): scikit-learn's auto is covariance_eigh, exact as well
    tall = reference_ridge(x[:600, :40], y[:600], groups[:600], x[600:, :40], None, n_components=16, inner_folds=4)
    got2 = ridge_baseline(x[:600, :40], y[:600], groups[:600], x[600:, :40], None, n_components=16, inner_folds=4)
    np.testing.assert_allclose(got2["pred"], tall["pred"], atol=1e-8, rtol=1e-8)


def test_sums_keep_precision_with_large_offsets():
    """Features far from zero (offset 1e4, spread 0.1): the shifted sums keep the scaler and PCA exact."""
    rng = np.random.default_rng(4)
    lat = rng.normal(size=(500, 4))
    x = 1e4 + 0.1 * (lat @ rng.normal(size=(4, 30)) + 0.5 * rng.normal(size=(500, 30)))
    y = lat @ rng.normal(size=(4, 3)) + 100.0
    groups = np.repeat(np.arange(5), 100).astype(str)
    got = ridge_baseline(x[:400], y[:400], groups[:400], x[400:], y[400:], alphas=[0.1, 1.0, 10.0], inner_folds=4)
    want = reference_ridge(x[:400], y[:400], groups[:400], x[400:], y[400:], alphas=[0.1, 1.0, 10.0], inner_folds=4)
    assert got["alpha"] == want["alpha"]
    _assert_cv_equal(got["cv"], want["cv"])
    np.testing.assert_allclose(got["pred"], want["pred"], atol=1e-6)


def test_moment_sums_are_the_data_moments():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(300, 6)) + 3, rng.normal(size=(300, 2))
    sums = MomentSums(6, 2, n_groups=3)
    for lo in range(0, 300, 50):
        sums.add(x[lo:lo + 50].astype(np.float32), y[lo:lo + 50], group=(lo // 50) % 3)
    xf = x.astype(np.float32).astype(np.float64)
    t = sums.total()
    np.testing.assert_allclose(t.mean_x, xf.mean(0), atol=1e-12)
    np.testing.assert_allclose(t.scatter_x, (xf - xf.mean(0)).T @ (xf - xf.mean(0)), atol=1e-9)
    np.testing.assert_allclose(t.scatter_xy, (xf - xf.mean(0)).T @ (y - y.mean(0)), atol=1e-9)
    held = sums.group(1)
    rows = np.concatenate([np.arange(lo, lo + 50) for lo in (50, 200)])
    rest = np.setdiff1d(np.arange(300), rows)
    np.testing.assert_allclose((t - held).mean_x, xf[rest].mean(0), atol=1e-12)
    assert sums.group_sizes() == [100, 100, 100]
    fit = fit_pca_ridge(t, 256)
    assert fit.k == 6 and np.all(np.diff(fit.eigvals) <= 0)


def test_inner_groups_are_sklearns_group_kfold():
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(6)
    sizes = {f"P{i}": int(rng.integers(1, 40)) for i in range(11)}
    sizes["P3"] = sizes["P7"]  # a tie: scikit-learn's stable order
    rows = np.repeat(list(sizes), list(sizes.values()))
    want = {}
    for f, (_tr, te) in enumerate(GroupKFold(n_splits=4).split(rows, groups=rows)):
        want.update({g: f for g in set(rows[te])})
    assert inner_groups(list(sizes), list(sizes.values()), 4) == want


# ------------------------------------------------------------------ spots baselines
@pytest.fixture(scope="module")
def spots_demo(tmp_path_factory):
    from morphomol.studies.spots.targets import transform_counts

    tmp = tmp_path_factory.mktemp("spots_demo")
    genes = [f"G{j:03d}" for j in range(200)]
    units, feats, fpath, folds = _write_cohort(tmp, n_samples=6, n_patients=6, per_sample=400, dim=64, genes=genes,
                                               unit="spot", seed=2, n_folds=3)
    targets = []
    rng = np.random.default_rng(9)
    for k in range(3):
        gk = sorted(rng.choice([g for g in genes if g != "G003"], 100, replace=False).tolist()) + ["G003"]  # constant
        doc = {"fold": k, "mode": "yaml", "transform": "normalize_log1p" if k == 1 else "log1p", "target_sum": 1e4,
               "genes": gk, "eval_genes": gk[:50]}
        targets.append(tmp / "targets" / f"fold{k}.json")
        targets[-1].parent.mkdir(exist_ok=True)
        targets[-1].write_text(json.dumps(doc))
    return {"tmp": tmp, "units": units, "feats": feats, "folds": fpath, "table": folds, "targets": targets,
            "transform": transform_counts}


def _spots_reference(d, name, ridge):
    """Per fold: the old spots baselines on the whole cohort in memory."""
    out = []
    for k, tfile in enumerate(d["targets"]):
        doc = json.loads(Path(tfile).read_text())
        genes, ev = doc["genes"], doc["eval_genes"]
        eidx = [genes.index(g) for g in ev]

        def fn(c, t, doc=doc):
            return d["transform"](c, t, doc["transform"], doc["target_sum"]).astype(np.float64)

        rows = d["table"][d["table"]["fold"] == k]
        order = [s for s in d["units"] if s in set(rows["sample_id"])]
        part = dict(zip(rows["sample_id"], rows["partition"], strict=True))
        tr = [s for s in order if part[s] != "test"]
        te = [s for s in order if part[s] == "test"]
        xtr, ytr, _ = _in_memory(d["units"], d["feats"], tr, genes, fn)
        xte, yte, ids = _in_memory(d["units"], d["feats"], te, genes, fn)
        pat = dict(zip(rows["sample_id"], rows["patient_id"], strict=True))
        groups = np.concatenate([[pat[s]] * int(rows.set_index("sample_id").loc[s, "n_units"]) for s in tr])
        if name == "mean":
            pred = np.broadcast_to(ytr.mean(0), yte.shape)
            pev = pred[:, eidx]
            alpha = None
        elif name == "ridge_hest":
            pred = reference_hest(xtr, ytr, xte, ridge.n_components)
            pev = reference_hest(xtr, ytr[:, eidx], xte, ridge.n_components)
            perm = np.random.default_rng(k).permutation(len(xtr))  # the same problem, rows in another order
            again = reference_hest(xtr[perm], ytr[perm], xte, ridge.n_components)
            alpha = 100.0 / (min(ridge.n_components, xtr.shape[1]) * len(genes))
        else:
            ref = reference_ridge(xtr, ytr, groups, xte, None, alphas=ridge.alphas, n_components=ridge.n_components,
                                  inner_folds=ridge.inner_folds, select_by=ridge.select_by)
            pred, pev, alpha = ref["pred"], ref["pred"][:, eidx], ref["alpha"]
        out.append({"ids": ids, "y": yte, "pred": pred, "rep": regression_report(yte, pred, genes),
                    "ev": regression_report(yte[:, eidx], pev, ev), "alpha": alpha,
                    "again": again if name == "ridge_hest" else None})
    return out


@pytest.mark.parametrize("name", ["mean", "ridge_hest", "ridge_cv"])
def test_spots_baselines_equal_the_in_memory_ones(spots_demo, name):
    from morphomol.studies.spots.baselines import run_spot_baseline
    from morphomol.studies.spots.train import SpotsInputs

    d = spots_demo
    ridge = RidgeConfig(n_components=256, inner_folds=5, select_by="mse", alphas=None)
    inputs = SpotsInputs(units=dict(d["units"]), features=dict(d["feats"]) if name != "mean" else {},
                         folds=d["folds"], targets=list(d["targets"]))
    out = d["tmp"] / "runs" / name
    m = run_spot_baseline(name, inputs, out_metrics=out / "metrics.json", out_predictions=out / "predictions.parquet",
                          ridge=ridge, encoder="vit_s")
    ref = _spots_reference(d, name, ridge)
    pred = pd.read_parquet(out / "predictions.parquet")
    at = 0
    for k, (run, r) in enumerate(zip(m["runs"], ref, strict=True)):
        assert run["fold"] == k and run["n_test"] == len(r["ids"])
        # HEST's LSQR stops at its tolerance (1e-4) after a dozen iterations, and its iterate there is sensitive
        # to rounding: permuting the training rows of the in-memory problem moves its fold-mean Pearson by ~2e-5
        # and single genes by up to ~6e-4 on these data. The LSQR run from the sums agrees with it to that
        # precision (fold means 1e-4, genes 2e-3), not to 1e-6; the other baselines to 1e-6.
        tol, gtol = (1e-4, 2e-3) if name == "ridge_hest" else (1e-6, 1e-6)
        if name == "mean":
            assert np.isnan(run["test_pearson"]) and run["n_undefined"] == len(r["rep"]["genes"])
        else:
            assert run["test_pearson"] == pytest.approx(r["rep"]["mean"]["pearson"], abs=tol)
            assert run["test_pearson_eval"] == pytest.approx(r["ev"]["mean"]["pearson"], abs=tol)
            assert run["test_spearman"] == pytest.approx(r["rep"]["mean"]["spearman"], abs=tol)
            assert run["alpha"] == pytest.approx(r["alpha"], rel=1e-12)
            assert run["test_pearson"] > 0.3
        assert run["test_mse"] == pytest.approx(r["rep"]["mean"]["mse"], rel=tol)
        for g, v in m["per_gene_pearson"][str(k)].items():
            want = r["rep"]["per_gene"][g]["pearson"]
            assert (v is None and (name == "mean" or np.isnan(want))) or v == pytest.approx(want, abs=gtol)
        n = len(r["ids"]) * len(r["rep"]["genes"])
        block = pred.iloc[at:at + n]
        at += n
        assert list(block["tile_id"].astype(str)[:: len(r["rep"]["genes"])]) == r["ids"]
        got = block["y_hat"].to_numpy().reshape(len(r["ids"]), -1)
        if name != "ridge_hest":
            np.testing.assert_allclose(got, r["pred"], atol=1e-5, rtol=1e-6)
        else:  # ... its predictions are as far from today's as today's are from themselves on permuted rows
            gap, noise = np.linalg.norm(got - r["pred"]), np.linalg.norm(r["again"] - r["pred"])
            assert 0 < noise and gap < 3 * noise
    assert at == len(pred)


def test_stale_fold_table_and_misaligned_stores_are_input_errors(fusion_demo, tmp_path):
    d = fusion_demo
    table = pd.read_parquet(d["folds"])
    stale = tmp_path / "folds.parquet"
    table.assign(n_units=table["n_units"] + (table["sample_id"] == "S02")).to_parquet(stale)
    with pytest.raises(InputError, match="lists .* units for sample 'S02'"):
        run_ridge_fold(stale, d["panel"], d["units"], d["feats"], tmp_path / "m.json", tmp_path / "p.parquet",
                       encoder="vit_s", fold=0, cfg=DEFAULT)
    short = dict(d["feats"])
    x = np.zeros((5, 64), np.float32)
    short["S03"] = write_features(tmp_path / "S03.zarr", x, encoder="vit_s")
    with pytest.raises(InputError, match="5 feature rows but"):
        run_ridge_fold(d["folds"], d["panel"], d["units"], short, tmp_path / "m.json", tmp_path / "p.parquet",
                       encoder="vit_s", fold=0, cfg=DEFAULT)
    with pytest.raises(InputError, match="no unit table for sample 'S06'"):
        run_ridge_fold(d["folds"], d["panel"], {k: v for k, v in d["units"].items() if k != "S06"}, d["feats"],
                       tmp_path / "m.json", tmp_path / "p.parquet", encoder="vit_s", fold=0, cfg=DEFAULT)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.parquet").exists()
