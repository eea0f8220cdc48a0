"""The spots study in-process on a small simulated Visium cohort: simulator -> units -> tiny-ViT features ->
patient-grouped folds -> targets (training samples only) -> heads over seeds (alignment and its null
controls) -> HEST / CV ridge and mean baselines -> tables -> per-sample AnnData and maps."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.features import extract_features
from morphomol.splits import write_folds
from morphomol.studies.spots.baselines import hest_alpha, ridge_hest_fit_predict, run_spot_baseline
from morphomol.studies.spots.layout import spaceranger_files
from morphomol.studies.spots.settings import load_settings
from morphomol.studies.spots.targets import select_targets, write_targets
from morphomol.studies.spots.train import SpotsInputs, run_spot_setting
from morphomol.studies.spots.units import build_spot_units
from morphomol.synthetic.spots import simulate_spots_sample

SAMPLES = ("A1", "A2", "A3", "A4")
SIM = {"seed": 5, "tissue_um": [1300, 1300], "n_genes": 60, "cell_density": 2500, "depth": 2000, "field_um": 200}
SETTINGS = {"settings": {
    "seed_head": {"role": "reference", "head": {"hidden": [32]}},
    "linear": {"head": {"hidden": []}},
    "align": {"role": "alignment", "head": {"hidden": [32]}, "align": {"weight": 0.5, "warmup_epochs": 1}},
    "align_lambda0": {"role": "control", "head": {"hidden": [32]}, "align": {"weight": 0.0}},
    "align_shuffled": {"role": "control", "head": {"hidden": [32]}, "align": {"weight": 0.5, "captions": "shuffled"}},
}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 simulated sections (4 patients), their units, tiny-ViT features, 2 folds, targets, caption embeddings."""
    from morphomol.studies.spots.text import embed_cohort_captions
    from morphomol.synthetic.spots_models import build_tiny_sentence_model

    root = tmp_path_factory.mktemp("spots_cohort")
    cfg = default_sections(splits={"n_folds": 2}, spots={"patches": {"out_px": 32, "chunk": 16},
                                                        "targets": {"n_genes": 30, "n_eval_genes": 10},
                                                        "training": {"epochs": 6, "batch_size": 32, "lr": 2e-3,
                                                                     "patience": 3}})
    units, feats = {}, {}
    for i, s in enumerate(SAMPLES):
        d = root / "sim" / s
        simulate_spots_sample(d, sample_id=s, patient_id=f"P{i}", params=SIM)
        units[s] = root / "samples" / s / "units.h5ad"
        build_spot_units(sample=s, patient=f"P{i}", fmt="spaceranger",
                         files={**spaceranger_files(d / "outs"), "he": str(d / "he.tif")}, he_mpp=None, image_scale=None,
                         cfg=cfg.spots, out_units=units[s], out_store=root / "samples" / s / "images.zarr",
                         out_qc=root / "samples" / s / "qc.json")
        feats[s] = root / "features" / f"{s}.zarr"
        extract_features(root / "samples" / s / "images.zarr", feats[s], "vit_s", device="cpu", batch_size=64,
                         overrides={"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 32})
    folds = root / "splits" / "folds.parquet"
    write_folds(units=list(units.values()), samples=list(SAMPLES), patients=[f"P{i}" for i in range(4)], out=folds,
                cfg=cfg.splits)
    targets = []
    for k in range(2):
        targets.append(root / "targets" / f"fold{k}.json")
        write_targets(folds=folds, units=units, fold=k, cfg=cfg.spots.targets, out=targets[-1])
    model = build_tiny_sentence_model(root / "tiny_st")
    text = (root / "text" / "captions.parquet", root / "text" / "embeddings.zarr")
    embed_cohort_captions(units=units, sources={s: ("csv", root / "sim" / s / "captions.csv") for s in SAMPLES},
                          model_dir=model, batch_size=32, out_table=text[0], out_store=text[1])
    sfile = root / "spots.yaml"
    sfile.write_text(yaml.safe_dump(SETTINGS))
    return {"root": root, "cfg": cfg, "inputs": SpotsInputs(units=units, features=feats, folds=folds, targets=targets,
                                                           text=text), "settings": load_settings(sfile)}


def _train(cohort, name, out=None, **kw):
    out = out or cohort["root"] / "runs" / name
    training = kw.pop("training", cohort["cfg"].spots.training)
    return run_spot_setting(cohort["settings"][name], cohort["inputs"], out_metrics=out / "metrics.json",
                            out_predictions=out / "predictions.parquet", training=training, seeds=kw.pop("seeds", [3, 4]),
                            encoder="vit_s", threads=1, device="cpu")


def test_targets_come_from_training_samples_only(cohort, tmp_path):
    inp = cohort["inputs"]
    doc = json.loads(inp.targets[0].read_text())
    split = pd.read_parquet(inp.folds)
    split = split[split["fold"] == 0]
    test_samples = sorted(split.loc[split["partition"] == "test", "sample_id"].unique())
    assert sorted(doc["train_samples"]) == sorted(set(SAMPLES) - set(test_samples))
    roles = [g.split("_")[0] for g in doc["genes"]]
    assert roles.count("NOISE") == 0 and roles.count("HK") <= 2  # Moran's I prefers the spatial programs
    assert len(doc["eval_genes"]) == 10 and set(doc["eval_genes"]) <= set(doc["genes"])
    # rewriting a test sample's counts changes nothing
    t = test_samples[0]
    a = ad.read_h5ad(inp.units[t])
    a.X = a.X[np.random.default_rng(0).permutation(a.n_obs)]
    changed = tmp_path / "changed.h5ad"
    a.write_h5ad(changed)
    again = select_targets(folds=inp.folds, units={**inp.units, t: changed}, fold=0,
                           cfg=cohort["cfg"].spots.targets)
    assert again["genes"] == doc["genes"] and again["eval_genes"] == doc["eval_genes"]
    hvg = select_targets(folds=inp.folds, units=inp.units, fold=0,
                         cfg=default_sections(spots={"targets": {"mode": "hvg", "n_genes": 30}}).spots.targets)
    assert len(hvg["genes"]) == 30 and hvg["genes"] != doc["genes"]


def test_heads_seeds_alignment_and_null_controls(cohort):
    ref = _train(cohort, "seed_head")
    assert [(r["fold"], r["seed"]) for r in ref["runs"]] == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert ref["summary"]["test_pearson"]["n"] == 2 and ref["summary"]["test_pearson"]["sd"] is not None
    lam0 = _train(cohort, "align_lambda0")
    # lambda = 0: the same gene head, batches and updates as without alignment
    assert [r["test_pearson"] for r in lam0["runs"]] == [r["test_pearson"] for r in ref["runs"]]
    assert lam0["per_gene_pearson"] == ref["per_gene_pearson"]
    al = _train(cohort, "align")
    sh = _train(cohort, "align_shuffled")
    assert [r["test_mse"] for r in al["runs"]] != [r["test_mse"] for r in ref["runs"]]
    assert [r["test_mse"] for r in sh["runs"]] != [r["test_mse"] for r in al["runs"]]
    assert all(r["align_cos"] is not None for r in al["runs"] + sh["runs"])
    preds = pd.read_parquet(cohort["root"] / "runs" / "seed_head" / "predictions.parquet")
    units = sum(ad.read_h5ad(p, backed="r").n_obs for p in cohort["inputs"].units.values())
    assert preds["tile_id"].nunique() == units  # every unit once: the test fold's first seed
    run = json.loads((cohort["root"] / "runs" / "seed_head" / "fold1" / "seed3" / "metrics.json").read_text())
    assert run["n_test"] > 0 and run["best_epoch"] >= 1 and len(run["history"]) >= 1
    assert (cohort["root"] / "runs" / "seed_head" / "fold1" / "seed3" / "checkpoint.safetensors").exists()
    assert not (cohort["root"] / "runs" / "seed_head" / "fold1" / "seed4" / "checkpoint.safetensors").exists()


def test_finished_runs_are_reused_only_onto_the_same_inputs(cohort):
    first = _train(cohort, "linear")
    again = _train(cohort, "linear")
    assert all(r["reused"] for r in again["runs"]) and not any(r["reused"] for r in first["runs"])
    assert [r["test_pearson"] for r in again["runs"]] == [r["test_pearson"] for r in first["runs"]]
    longer = default_sections(spots={"training": {"epochs": 2, "batch_size": 32, "lr": 2e-3}}).spots.training
    other = _train(cohort, "linear", training=longer)
    assert not any(r["reused"] for r in other["runs"])


def test_alignment_without_captions_is_an_input_error(cohort):
    inp = cohort["inputs"]
    bare = SpotsInputs(units=inp.units, features=inp.features, folds=inp.folds, targets=inp.targets, text=None)
    with pytest.raises(InputError, match="aligns to captions but no spot has one"):
        run_spot_setting(cohort["settings"]["align"], bare, out_metrics=cohort["root"] / "x" / "m.json",
                         out_predictions=cohort["root"] / "x" / "p.parquet", training=cohort["cfg"].spots.training,
                         seeds=[1], encoder="vit_s", threads=1, device="cpu")
    assert not (cohort["root"] / "x" / "m.json").exists()


def test_hest_ridge_is_the_published_probe():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12))
    y = x[:, :3] @ rng.normal(size=(3, 4)) + 5.0  # an offset a no-intercept model cannot fit
    pred, info = ridge_hest_fit_predict(x[:60], y[:60], x[60:], n_components=8)
    assert info == {"alpha": hest_alpha(8, 4), "n_components": 8, "intercept": False} and info["alpha"] == 100 / 32
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    s = StandardScaler().fit(x[:60])
    p = PCA(8, random_state=0).fit(s.transform(x[:60]))
    z_tr, z_te = p.transform(s.transform(x[:60])), p.transform(s.transform(x[60:]))
    w = np.linalg.solve(z_tr.T @ z_tr + info["alpha"] * np.eye(8), z_tr.T @ y[:60])
    assert np.allclose(pred, z_te @ w, atol=5e-3)  # HEST's lsqr solver stops at its default tolerance
    assert abs(pred.mean() - 5.0) > 3  # no intercept: the offset is missing, Pearson is not affected
    assert min(np.corrcoef(pred[:, j], y[60:, j])[0, 1] for j in range(4)) > 0.7


def test_baselines_on_the_same_splits(cohort):
    root, inp = cohort["root"], cohort["inputs"]
    ridge = default_sections(ridge={"n_components": 16, "alphas": [0.1, 10.0, 1000.0], "inner_folds": 2}).ridge
    out = {}
    for name in ("mean", "ridge_hest", "ridge_cv"):
        out[name] = run_spot_baseline(name, SpotsInputs(units=inp.units, features=inp.features, folds=inp.folds,
                                                        targets=inp.targets), out_metrics=root / "runs" / name / "metrics.json",
                                      out_predictions=root / "runs" / name / "predictions.parquet", ridge=ridge,
                                      encoder="vit_s")
    assert all(r["test_pearson"] != r["test_pearson"] for r in out["mean"]["runs"])  # NaN: constant predictor
    assert out["ridge_hest"]["runs"][0]["alpha"] == pytest.approx(100 / (16 * 30))
    assert out["ridge_hest"]["runs"][0]["alpha_eval_genes"] == pytest.approx(100 / (16 * 10))
    assert out["ridge_cv"]["runs"][0]["alpha"] in (0.1, 10.0, 1000.0)
    a = pd.read_parquet(root / "runs" / "mean" / "predictions.parquet")
    b = pd.read_parquet(root / "runs" / "ridge_cv" / "predictions.parquet")
    assert set(a["tile_id"]) == set(b["tile_id"])


def test_folds_are_asserted_patient_grouped(cohort, tmp_path):
    from morphomol.studies.spots.data import load_cohort, load_fold

    inp = cohort["inputs"]
    s = pd.read_parquet(inp.folds)
    f0 = s.index[(s["fold"] == 0) & (s["partition"] == "test")]
    s.loc[f0[0], "patient_id"] = s.loc[s.index[(s["fold"] == 0) & (s["partition"] == "fit")][0], "patient_id"]
    bad = tmp_path / "folds.parquet"  # one patient on two sides of fold 0
    s.to_parquet(bad)
    spots = load_cohort(inp.units, None, json.loads(inp.targets[0].read_text())["genes"])
    with pytest.raises(AssertionError, match="appears in two partitions"):
        load_fold(spots, 0, bad, inp.targets[0])


def test_tables_and_per_sample_outputs(cohort):
    from morphomol.studies.spots.outputs import write_spot_outputs
    from morphomol.studies.spots.tables import tables_metadata, write_spots_tables

    root, inp = cohort["root"], cohort["inputs"]
    for name in ("seed_head", "align", "align_lambda0"):  # (the tests above ran them when the whole module runs)
        if not (root / "runs" / name / "metrics.json").exists():
            _train(cohort, name)
    ridge = default_sections(ridge={"n_components": 16, "alphas": [0.1, 10.0], "inner_folds": 2}).ridge
    for name in ("mean", "ridge_hest", "ridge_cv"):
        if not (root / "runs" / name / "metrics.json").exists():
            run_spot_baseline(name, SpotsInputs(units=inp.units, features=inp.features, folds=inp.folds,
                                                targets=inp.targets), out_metrics=root / "runs" / name / "metrics.json",
                              out_predictions=root / "runs" / name / "predictions.parquet", ridge=ridge, encoder="vit_s")
    st = cohort["settings"]
    reasons = {n: None if (root / "runs" / n / "metrics.json").exists() else "missing weights: uni2h" for n in st}
    names = [n for n in st if reasons[n] is None] + ["mean", "ridge_hest", "ridge_cv"]
    paths = write_spots_tables(metrics_files=[root / "runs" / n / "metrics.json" for n in names], settings=st,
                               reasons=reasons, reference="seed_head", out_dir=root / "tables",
                               metadata=tables_metadata(cohort="t", config={"spots": {}}, models={"encoder vit_s": None}),
                               cohort="t")
    table = pd.read_csv(paths["spots_settings.csv"])
    assert list(table["setting"][:len(st)]) == list(st) and {"mean", "ridge_hest", "ridge_cv"} <= set(table["setting"])
    md = paths["spots_settings.md"].read_text()
    assert "undefined (constant)" in md and "n/a (no intercept)" in md and "sd over" in md
    cos = table.set_index("setting").loc["align", "align_cos"]
    assert " / " in cos and table.set_index("setting").loc["seed_head", "align_cos"] == "-"
    seeds = pd.read_csv(paths["spots_seeds.csv"])
    assert list(seeds["seed"]) == ["3", "4", "mean ± sd"]
    comp = pd.read_csv(paths["spots_comparisons.csv"])
    assert comp.set_index("setting").loc["align_lambda0", "d_test_pearson_mean"] == 0
    assert "\\begin{tabular}" in paths["spots_settings.tex"].read_text()
    summary = write_spot_outputs(units=inp.units, folds=inp.folds, targets=inp.targets,
                                 predictions={n: root / "runs" / n / "predictions.parquet"
                                              for n in ("seed_head", "mean", "ridge_hest")},
                                 reference="seed_head", out_samples=root / "out" / "samples", out_maps=root / "out" / "maps",
                                 map_samples=1)
    assert sorted(summary) == sorted(SAMPLES)
    a = ad.read_h5ad(root / "out" / "samples" / "A1.h5ad")
    assert {"measured", "pred_seed_head", "pred_mean", "pred_ridge_hest"} <= set(a.layers)  # the per-sample convention
    assert a.obsm["spatial"].shape == (a.n_obs, 2) and (a.obs[f"partition_fold{a.obs['fold'].iloc[0]}"] == "test").all()
    assert (a.obs["partition"] == "test").all()
    assert sorted(p.name for p in (root / "out" / "maps").iterdir()) == ["A1.png", "pred_vs_measured.png"]
    with pytest.raises(InputError, match="reference"):
        write_spot_outputs(units=inp.units, folds=inp.folds, targets=inp.targets, predictions={},
                           reference="seed_head", out_samples=root / "o2", out_maps=root / "m2")
    assert not (root / "o2").exists()


def test_preempted_run_resumes_to_the_same_result(cohort, monkeypatch):
    """SIGTERM mid-training: resume.pt, exit 143; the retried job resumes (alignment warm-up included)
    and ends with the metrics of an uninterrupted run; finished (fold, seed) runs are reused."""
    import os
    import signal

    import morphomol.studies.spots.models as models
    from morphomol.train.resume import Preempted

    root = cohort["root"]
    clean = _train(cohort, "align", out=root / "pre" / "clean", seeds=[7])
    real = models.spots_loss
    calls = {"n": 0}

    def interrupting(model, batch):
        calls["n"] += 1
        if calls["n"] == 20:  # fold 0, during the alignment warm-up's second epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    monkeypatch.setattr(models, "spots_loss", interrupting)
    out = root / "pre" / "interrupted"
    with pytest.raises(Preempted) as e:
        _train(cohort, "align", out=out, seeds=[7])
    assert e.value.code == 143 and (out / "fold0" / "seed7" / "resume.pt").exists()
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(models, "spots_loss", real)
    resumed = _train(cohort, "align", out=out, seeds=[7])
    assert [r["test_pearson"] for r in resumed["runs"]] == [r["test_pearson"] for r in clean["runs"]]
    assert [r["test_mse"] for r in resumed["runs"]] == [r["test_mse"] for r in clean["runs"]]
    assert not (out / "fold0" / "seed7" / "resume.pt").exists()
    assert json.loads((out / "fold0" / "seed7" / "metrics.json").read_text())["resumed"] is True


def test_target_transforms():
    from morphomol.studies.spots.targets import transform_counts

    counts = np.array([[0, 3, 1], [4, 0, 0]], dtype=float)
    totals = np.array([10.0, 4.0])  # library sizes over every gene of the spot
    assert np.allclose(transform_counts(counts, totals, "log1p", 1e4), np.log1p(counts))
    norm = transform_counts(counts, totals, "normalize_log1p", 100.0)
    assert np.allclose(norm, np.log1p(counts / totals[:, None] * 100.0)) and norm.dtype == np.float32
    with pytest.raises(InputError, match="unknown transform"):
        transform_counts(counts, totals, "sqrt", 1.0)


def test_streamed_training_and_predictions_by_sample(cohort):
    """A buffer smaller than every partition: the head trains from chunk-shuffled reads (other batches than
    the in-memory order, so other numbers), predicts every unit once, and writes one row group per sample."""
    import pyarrow.parquet as pq

    from morphomol.data.runs import read_sample_predictions

    out = cohort["root"] / "streamed" / "linear"
    streamed = run_spot_setting(cohort["settings"]["linear"], cohort["inputs"], out_metrics=out / "metrics.json",
                                out_predictions=out / "predictions.parquet", training=cohort["cfg"].spots.training,
                                seeds=[3], encoder="vit_s", threads=1, device="cpu", buffer_mb=0.005, chunk_rows=32)
    assert all(np.isfinite(r["test_pearson"]) for r in streamed["runs"])
    preds = pd.read_parquet(out / "predictions.parquet")
    units = {s: ad.read_h5ad(p, backed="r").n_obs for s, p in cohort["inputs"].units.items()}
    assert preds["tile_id"].nunique() == sum(units.values()) == len(preds) // 30  # 30 targets per fold
    f = pq.ParquetFile(out / "predictions.parquet")
    assert f.num_row_groups == len(SAMPLES)  # one per sample: a sample is read alone
    one = read_sample_predictions(out / "predictions.parquet", "A2")
    assert set(one["tile_id"].astype(str).str.rpartition("__")[0]) == {"A2"}
    assert one["tile_id"].nunique() == units["A2"]
