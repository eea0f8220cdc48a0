"""Metrics of the spots study that say what they measure (issue 23): the within-sample Pearson beside the
pooled one, the sequencing-depth control ``depth_only`` (ridge on each spot's log1p total counts), and both
in every spots table with the footnote on the share of the head's Pearson that depth alone reaches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from morphomol.config import default_sections
from morphomol.data.features import write_features
from morphomol.data.units import write_units
from morphomol.errors import InputError
from morphomol.eval.metrics import WithinSamplePearson, column_pearson, within_sample_pearson
from morphomol.splits import write_folds
from morphomol.studies.spots.baselines import run_spot_baseline
from morphomol.studies.spots.train import SpotsInputs
from morphomol.util.jsonio import write_json

SAMPLES = ("A1", "A2", "A3", "A4")
GENES = [f"G{j:02d}" for j in range(8)]
DIM = 6


# --------------------------------------------------------------------------- the metric on constructed data
def test_within_sample_pearson_sees_through_sample_offsets():
    """Pooled Pearson is high only because each sample has its own level (same in truth and prediction);
    within each sample truth and prediction are independent: the within-sample Pearson is ~0."""
    rng = np.random.default_rng(0)
    n, genes = 300, ["a", "b", "c"]
    offsets = {"s1": 0.0, "s2": 4.0, "s3": 8.0}
    y = np.concatenate([o + rng.normal(size=(n, 3)) for o in offsets.values()])
    y_hat = np.concatenate([o + rng.normal(size=(n, 3)) for o in offsets.values()])
    labels = np.repeat(list(offsets), n)
    pooled = column_pearson(y, y_hat)
    assert pooled.min() > 0.9
    w = within_sample_pearson(y, y_hat, labels, genes)
    assert abs(w["pearson"]) < 0.05 and all(abs(v) < 0.15 for v in w["per_gene"].values())
    assert w["n_samples"] == 3 and w["n_small"] == 0 and w["n_undefined"] == 0
    # a real within-sample signal is kept: prediction = truth + noise inside each sample
    y_hat2 = y + 0.5 * rng.normal(size=y.shape)
    w2 = within_sample_pearson(y, y_hat2, labels, genes)
    assert w2["pearson"] > 0.85
    # one sample: the within-sample Pearson is the pooled one
    one = within_sample_pearson(y[:n], y_hat2[:n], labels[:n], genes)
    assert one["pearson"] == pytest.approx(float(np.mean(column_pearson(y[:n], y_hat2[:n]))), abs=1e-12)


def test_within_sample_pearson_skips_small_samples_and_constant_genes():
    rng = np.random.default_rng(1)
    acc = WithinSamplePearson(min_units=10)
    y = rng.normal(size=(50, 2))
    yh = y + rng.normal(size=(50, 2))
    r_big = acc.add(y, yh, ["a", "b"])
    small = acc.add(rng.normal(size=(5, 2)), rng.normal(size=(5, 2)), ["a", "b"])   # < 10 spots: not counted
    assert np.isnan(small).all()
    const = np.c_[np.full(30, 2.0), rng.normal(size=30)]
    acc.add(const, rng.normal(size=(30, 2)), ["a", "b"])   # gene a constant there: not counted for a
    pg = acc.per_gene()
    assert pg.loc["a", "n_samples"] == 1 and pg.loc["b", "n_samples"] == 2
    assert pg.loc["a", "pearson"] == pytest.approx(r_big[0])
    s = acc.summary()
    assert s["n_samples"] == 3 and s["n_small"] == 1 and s["min_units"] == 10
    only_const = WithinSamplePearson()
    only_const.add(np.ones((20, 1)), rng.normal(size=(20, 1)), ["a"])
    assert np.isnan(only_const.summary()["pearson"]) and only_const.summary()["n_undefined"] == 1


# --------------------------------------------------------------------------- a small cohort of mixed depth
def _cohort(root, *, pure_depth: bool, seed: int = 0):
    """4 samples (4 patients) of spots with very different sequencing depths. ``pure_depth``: every gene's
    counts are the spot's depth times a fixed fraction (Poisson); else genes also follow a spot program
    that the features carry."""
    rng = np.random.default_rng(seed)
    units, feats = {}, {}
    frac = rng.uniform(0.02, 0.08, size=len(GENES))
    load = np.zeros((2, len(GENES))) if pure_depth else rng.normal(size=(2, len(GENES)))
    for i, s in enumerate(SAMPLES):
        n = 80 + 10 * i
        depth = np.exp(rng.normal(np.log(300 * (i + 1) ** 1.5), 0.5, size=n))   # mixed depth, spot and sample
        program = rng.normal(size=(n, 2))
        rate = depth[:, None] * frac[None, :] * np.exp(program @ load)
        X = rng.poisson(rate).astype(np.float32)
        other = rng.poisson(depth * 0.5)   # counts of genes that are not targets
        totals = X.sum(axis=1) + other
        obs = pd.DataFrame({"index": np.arange(n), "n_counts": totals.astype(np.float64)},
                           index=[f"{s}__{k:06d}" for k in range(n)])
        side = int(np.ceil(np.sqrt(n)))
        xy = np.stack([np.arange(n) // side, np.arange(n) % side], axis=1) * 100.0
        units[s] = write_units(root / s / "units.h5ad", obs, sp.csr_matrix(X), GENES, spatial_um=xy, unit="spot",
                               sample=s, patient=f"P{i}")
        f = np.c_[program, rng.normal(size=(n, DIM - 2))].astype(np.float32)
        feats[s] = write_features(root / s / "features.zarr", f, encoder="t", chunk_rows=32)
    cfg = default_sections(splits={"n_folds": 2})
    folds = root / "folds.parquet"
    write_folds(units=[units[s] for s in SAMPLES], samples=list(SAMPLES), patients=[f"P{i}" for i in range(4)],
                out=folds, cfg=cfg.splits)
    targets = []
    for k in range(2):
        targets.append(root / f"fold{k}.json")
        write_json(targets[-1], {"fold": k, "genes": GENES, "eval_genes": GENES[:4], "transform": "log1p",
                                 "target_sum": 1e4})
    return SpotsInputs(units=units, features=feats, folds=folds, targets=targets)


def _baseline(name, inputs, out, features=True):
    ridge = default_sections(ridge={"n_components": DIM, "alphas": [0.1, 10.0], "inner_folds": 2}).ridge
    inp = inputs if features else SpotsInputs(units=inputs.units, features={}, folds=inputs.folds,
                                              targets=inputs.targets)
    return run_spot_baseline(name, inp, out_metrics=out / name / "metrics.json",
                             out_predictions=out / name / "predictions.parquet", ridge=ridge, encoder="t")


def test_depth_control_reaches_the_pooled_pearson_of_pure_depth_targets(tmp_path):
    """Targets that are pure sequencing depth: the depth control's pooled Pearson per gene is exactly the
    correlation of the gene with the spots' log1p total counts over the fold's test spots (a linear prediction
    from that one feature), and high; it needs no features store."""
    from morphomol.data.folds import held_out_fold
    from morphomol.data.units import read_units

    inputs = _cohort(tmp_path / "c", pure_depth=True)
    m = _baseline("depth_only", inputs, tmp_path / "runs", features=False)
    assert m["setting"] == "depth_only" and m["encoder"] is None and len(m["runs"]) == 2
    assert all(r["feature"] == "log1p(n_counts)" and r["intercept"] for r in m["runs"])
    fold_of = held_out_fold(inputs.folds)
    for r in m["runs"]:
        k = r["fold"]
        ys, xs = [], []
        for s in SAMPLES:
            if fold_of[s] == k:
                a = read_units(inputs.units[s])
                ys.append(np.log1p(a.X.toarray()))
                xs.append(np.log1p(a.obs["n_counts"].to_numpy(np.float64)))
        y, x = np.concatenate(ys), np.concatenate(xs)
        oracle = column_pearson(y, np.repeat(x[:, None], y.shape[1], axis=1))
        got = np.array([m["per_gene_pearson"][str(k)][g] for g in GENES])
        assert np.allclose(got, oracle, atol=1e-5)
        assert r["test_pearson"] == pytest.approx(float(oracle.mean()), abs=1e-5) and r["test_pearson"] > 0.8
    # each test unit predicted once, like every baseline
    p = pd.read_parquet(tmp_path / "runs" / "depth_only" / "predictions.parquet")
    assert p["tile_id"].nunique() == sum(80 + 10 * i for i in range(4)) and set(p["gene"]) == set(GENES)


def test_depth_control_needs_the_spot_totals(tmp_path):
    import anndata as ad

    inputs = _cohort(tmp_path / "c", pure_depth=True)
    a = ad.read_h5ad(inputs.units["A2"])
    a.obs["n_counts"] = np.nan   # e.g. a NaN gene in the counts matrix
    a.write_h5ad(inputs.units["A2"])
    with pytest.raises(InputError, match="total count") as e:
        _baseline("depth_only", inputs, tmp_path / "runs", features=False)
    assert "obs.n_counts" in str(e.value) and "A2" in str(e.value)
    assert not (tmp_path / "runs" / "depth_only" / "metrics.json").exists()


# --------------------------------------------------------------------------- the tables
@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A head (2 seeds), the mean and depth-control baselines on a cohort of mixed depth -> the spots tables."""
    from morphomol.studies.spots.settings import as_setting
    from morphomol.studies.spots.tables import tables_metadata, write_spots_tables
    from morphomol.studies.spots.train import run_spot_setting

    root = tmp_path_factory.mktemp("spots_metrics")
    inputs = _cohort(root / "c", pure_depth=False, seed=3)
    settings = {"seed_head": as_setting({"role": "reference", "head": {"hidden": [16]}}, "seed_head")}
    training = default_sections(spots={"training": {"epochs": 20, "batch_size": 32, "lr": 5e-3,
                                                    "patience": 5}}).spots.training
    runs = root / "runs"
    run_spot_setting(settings["seed_head"], inputs, out_metrics=runs / "seed_head" / "metrics.json",
                     out_predictions=runs / "seed_head" / "predictions.parquet", training=training, seeds=[5, 6],
                     encoder="t", threads=1, device="cpu")
    for name in ("mean", "depth_only"):
        _baseline(name, inputs, runs, features=False)
    _baseline("ridge_cv", inputs, runs)
    names = ["seed_head", "ridge_cv", "mean", "depth_only"]
    paths = write_spots_tables(
        metrics_files=[runs / n / "metrics.json" for n in names], settings=settings, reasons={"seed_head": None},
        reference="seed_head", out_dir=root / "tables",
        metadata=tables_metadata(cohort="t", config={"spots": {}}, models={}), cohort="t",
        predictions={n: runs / n / "predictions.parquet" for n in names}, folds=inputs.folds)
    return {"root": root, "inputs": inputs, "paths": paths, "runs": runs}


def _fold_within(pred_file, folds, k):
    """Independent in-memory computation of one fold's within-sample Pearson."""
    from morphomol.data.folds import held_out_fold

    test = [s for s, f in held_out_fold(folds).items() if f == k]
    p = pd.read_parquet(pred_file)
    p = p[p["sample_id"].isin(test)].astype({"tile_id": str, "gene": str})
    y = p.pivot(index="tile_id", columns="gene", values="y").reindex(columns=GENES)
    yh = p.pivot(index="tile_id", columns="gene", values="y_hat").reindex(columns=GENES)
    labels = [t.rpartition("__")[0] for t in y.index]
    return within_sample_pearson(y.to_numpy(), yh.to_numpy(), labels, GENES)["pearson"]


def test_depth_control_and_within_sample_pearson_in_the_settings_table(tables):
    paths, runs, inputs = tables["paths"], tables["runs"], tables["inputs"]
    t = pd.read_csv(paths["spots_settings.csv"]).set_index("setting")
    assert list(t.index) == ["seed_head", "ridge_cv", "mean", "depth_only"]
    d = t.loc["depth_only"]
    assert d["status"] == "ok" and d["role"] == "baseline" and d["sd_over"] == "folds"
    depth = json.loads((runs / "depth_only" / "metrics.json").read_text())
    assert d["test_pearson_mean"] == pytest.approx(depth["summary"]["test_pearson"]["mean"])
    # the within-sample column: mean over folds of each fold's value, computed independently here
    for name in ("seed_head", "ridge_cv", "depth_only"):
        per_fold = [_fold_within(runs / name / "predictions.parquet", inputs.folds, k) for k in range(2)]
        assert t.loc[name, "test_pearson_within_mean"] == pytest.approx(np.mean(per_fold), abs=1e-6)
        assert t.loc[name, "test_pearson_within_std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-6)
        assert " ± " in t.loc[name, "test_pearson_within"]
    assert t.loc["mean", "test_pearson_within"] == "undefined (constant)"
    # the depth control's pooled Pearson rides on the samples' depths: within samples it is lower
    assert t.loc["depth_only", "test_pearson_within_mean"] < t.loc["depth_only", "test_pearson_mean"]
    md = paths["spots_settings.md"].read_text()
    assert "test Pearson, pooled (all targets)" in md and "test Pearson, within samples (all targets)" in md
    share = t.loc["depth_only", "test_pearson_mean"] / t.loc["seed_head", "test_pearson_mean"]
    note = (f"reaches {share:.0%} of seed\\_head's pooled test Pearson "
            f"({t.loc['depth_only', 'test_pearson_mean']:.3f} / {t.loc['seed_head', 'test_pearson_mean']:.3f})")
    assert note in md
    assert "normalize\\_log1p" in md and "mixed depth" in md
    tex = paths["spots_settings.tex"].read_text()
    assert "depth\\_only" in tex and "reaches" in tex and "within samples" in tex


def test_depth_control_and_within_sample_pearson_in_every_other_table(tables):
    paths, runs = tables["paths"], tables["runs"]
    seeds = pd.read_csv(paths["spots_seeds.csv"])
    assert list(seeds["seed"].astype(str)) == ["5", "6", "mean ± sd"]
    assert " ± " in seeds.loc[0, "test_pearson_within"] and seeds.loc[1, "test_pearson_within"] == "-"
    assert "reaches" in paths["spots_seeds.md"].read_text()
    comp = pd.read_csv(paths["spots_comparisons.csv"]).set_index("setting")
    assert "depth_only" in comp.index and comp.loc["depth_only", "pairs_over"] == "fold"
    t = pd.read_csv(paths["spots_settings.csv"]).set_index("setting")
    head = json.loads((runs / "seed_head" / "metrics.json").read_text())
    depth = json.loads((runs / "depth_only" / "metrics.json").read_text())
    ref_fold = pd.DataFrame(head["runs"]).groupby("fold")["test_pearson"].mean()
    dep_fold = pd.DataFrame(depth["runs"]).set_index("fold")["test_pearson"]
    assert comp.loc["depth_only", "d_test_pearson_mean"] == pytest.approx(float((dep_fold - ref_fold).mean()))
    assert comp.loc["depth_only", "d_test_pearson_within_mean"] == pytest.approx(
        t.loc["depth_only", "test_pearson_within_mean"] - t.loc["seed_head", "test_pearson_within_mean"], abs=1e-6)
    pg = pd.read_csv(paths["per_gene.csv"])
    assert {"pearson", "pearson_within"} <= set(pg.columns) and "depth_only" in set(pg["setting"])
    d0 = pg[(pg["setting"] == "depth_only") & (pg["fold"] == 0)].set_index("gene")
    assert d0["pearson"].to_dict() == pytest.approx(depth["per_gene_pearson"]["0"])
    assert d0["pearson_within"].notna().all()


# --------------------------------------------------------------------------- the rules
def test_rules_declare_the_depth_control_and_the_tables_predictions():
    """spots_baseline depth_only reads the unit tables, folds and targets (no features); spots_tables reads every
    run's predictions and the fold table (what the within-sample Pearson needs)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-n", "--forceall",
                          "results/demo_spots/spots/tables/spots_settings.csv"], cwd=repo, capture_output=True,
                         text=True, env=env, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    blocks = out.split("\n\n")
    depth = next(b for b in blocks if "rule spots_baseline:" in b and "runs/depth_only/metrics.json" in b)
    depth_in = depth.split("output:", 1)[0]
    assert "samples/S06/units.h5ad" in depth_in and "splits/folds.parquet" in depth_in
    assert "spots/targets/fold2.json" in depth_in and "features/" not in depth_in
    tables_in = next(b for b in blocks if "rule spots_tables:" in b).split("output:", 1)[0]
    for run in ("seed_head", "ridge_cv", "mean", "depth_only"):
        assert f"runs/{run}/metrics.json" in tables_in and f"runs/{run}/predictions.parquet" in tables_in
    assert "splits/folds.parquet" in tables_in
