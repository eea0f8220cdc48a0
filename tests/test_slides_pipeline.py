"""The slides study end to end in process on a tiny simulated cohort (24 slides, 12 patients, 2 cohorts):
simulate -> tile -> shared feature cache -> per-slide embeddings -> RNA -> ssGSEA -> shared folds -> fold runs
-> transfer -> tables. Checks the outputs' contracts, patient grouping, determinism and the anchors written
beside the results. The feature stores are removed once the slides are embedded: fold and transfer jobs read
the per-slide embeddings only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.config import default_sections
from morphomol.data.features import read_features

GMT = Path(__file__).parent / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"
GROUNDED = ("HALLMARK_G2M_CHECKPOINT", "HALLMARK_INTERFERON_GAMMA_RESPONSE")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from morphomol.config import EncoderConfig, FeaturesConfig, ViTConfig
    from morphomol.config import SplitsConfig
    from morphomol.features import extract_features_group
    from morphomol.splits import write_folds
    from morphomol.studies.slides.bank import embed_slides, embedding_path
    from morphomol.studies.slides.genesets import score_gene_sets
    from morphomol.studies.slides.rna import prepare_rna
    from morphomol.studies.slides.tiles import tile_slides
    from morphomol.synthetic.slides import simulate_slides_cohort

    root = tmp_path_factory.mktemp("slides")
    rows = [{"sample_id": f"S{i:02d}", "patient_id": f"{'AB'[i // 12]}P{(i % 12) // 2}", "cohort": "CA" if i < 12 else "CB",
             "slide_path": str(root / "sim" / "slides" / f"S{i:02d}.tif")} for i in range(24)]
    sheet = pd.DataFrame(rows)
    simulate_slides_cohort(root / "sim", sheet, {"gmt": str(GMT), "slide_um": [256, 256], "n_background_genes": 300,
                                                 "n_modules": 5, "module_size": 30})
    cfg = default_sections(
        slides={"gene_sets": {"gmt": [str(GMT)], "grounded": list(GROUNDED), "n_null": 3, "min_genes": 5},
                "tiling": {"tile_px": 128, "out_px": 32, "thumbnail_mpp": 4.0},
                "pca_components": 4, "slide_pca_components": 8, "poolings": ["mean", "abmil"],
                "align": {"epochs": 12, "batch_size": 8, "patience": 12, "hidden": 32, "proj_dim": 16},
                "prompting": {"knn_k": 5}, "transfer": {"fractions": [0.2], "repeats": 1, "finetune_epochs": 4}},
        splits={"n_folds": 3}).slides
    s = [r["sample_id"] for r in rows]
    units = [root / "samples" / x / "units.h5ad" for x in s]
    stores = [root / "samples" / x / "images.zarr" for x in s]
    tile_slides(slides=sheet["slide_path"].tolist(), samples=s, patients=sheet["patient_id"].tolist(), he_mpp=[None] * 24,
                out_units=units, out_stores=stores, out_qc=[root / "samples" / x / "qc.png" for x in s], cfg=cfg.tiling)
    feats = [root / "features" / f"{x}.zarr" for x in s]
    extract_features_group("vit_s", samples=s, stores=stores, outs=feats, encoder=EncoderConfig(pooling="mean"),
                           features=FeaturesConfig(batch_size=64, encoders=("vit_s",), device="cpu", patch_tokens=False),
                           vit=ViTConfig(embed_dim=32, depth=1, num_heads=2))
    rna = root / "slides" / "rna"
    prepare_rna(sheet=rows, out_expression=rna / "expression.h5ad", out_preprocessing=rna / "preprocessing.json",
                out_genes=rna / "genes.txt", cfg=cfg.rna, matrix=root / "sim" / "rna_counts.tsv")
    gs = root / "slides" / "genesets"
    score_gene_sets(expression=rna / "expression.h5ad", gmt=[GMT], out_scores=gs / "scores.parquet",
                    out_sets=gs / "sets.json", out_coverage=gs / "coverage.tsv", cfg=cfg.gene_sets, seed=0)
    folds = root / "splits" / "folds.parquet"
    write_folds(units=units, samples=s, patients=sheet["patient_id"].tolist(), out=folds,
                cfg=SplitsConfig(n_folds=3, val_fraction=0.25), seed=0)
    embeddings = {}
    for g, part in enumerate((s[:10], s[10:])):  # two groups, as two slides_embed jobs
        d = root / "slides" / "embeddings" / f"group{g}"
        embed_slides(features=[feats[s.index(x)] for x in part], samples=part, out_dir=d,
                     max_tiles=cfg.abmil_max_tiles, seed=0)
        embeddings.update({x: embedding_path(d, x) for x in part})
    features = {x: np.asarray(read_features(f)[0]) for x, f in zip(s, feats, strict=True)}
    shutil.rmtree(root / "features")  # fold and transfer jobs must not need them
    return {"root": root, "cfg": cfg, "samples": s, "tile_features": features, "embeddings": embeddings,
            "folds": folds, "rna": rna, "gs": gs, "sheet": sheet}


def _run(c, setting: str, fold: int, out: Path):
    from morphomol.studies.slides.run import run_fold

    return run_fold(setting=setting, fold=fold, folds=c["folds"], embeddings=c["embeddings"],
                    expression=c["rna"] / "expression.h5ad", scores=c["gs"] / "scores.parquet", sets=c["gs"] / "sets.json",
                    cfg=c["cfg"], seed=0, out_metrics=out / "metrics.json", out_predictions=out / "predictions.parquet",
                    out_checkpoint=out / "checkpoint.safetensors", out_checkpoint_meta=out / "checkpoint.json", threads=1)


@pytest.fixture(scope="module")
def runs(cohort):
    out = {}
    for setting in ("mean", "abmil"):
        for k in range(3):
            d = cohort["root"] / "runs" / setting / f"fold{k}"
            _run(cohort, setting, k, d)
            out.setdefault(setting, []).append(d)
    return out


def test_fold_run_outputs_and_controls(cohort, runs):
    from safetensors.numpy import load_file

    d = runs["mean"][0]
    m = json.loads((d / "metrics.json").read_text())
    assert set(m["retrieval"]) == {"trained", "untrained", "permuted"}
    assert m["retrieval"]["trained"]["chance"]["recall@1"] == pytest.approx(1 / m["n_test"])
    assert m["n_fit"] + m["n_val"] + m["n_test"] == 24
    n_sets = len(m["gene_sets"])
    assert n_sets == 53 and "NULL_SET_01" in m["gene_sets"]
    assert set(m["summary"]) == {"knn_trained", "prompt_trained", "knn_untrained", "knn_permuted", "prompt_permuted"}
    pred = pd.read_parquet(d / "predictions.parquet")
    assert len(pred) == m["n_test"] * n_sets * 5 and np.isfinite(pred["y_hat"]).all()
    meta = json.loads((d / "checkpoint.json").read_text())
    pats = {p: set(cohort["sheet"].set_index("sample_id").loc[meta["slides"][p], "patient_id"]) for p in ("fit", "val", "test")}
    assert not (pats["fit"] & pats["test"]) and not (pats["val"] & pats["test"]) and not (pats["fit"] & pats["val"])
    keys = set(load_file(str(d / "checkpoint.safetensors")))
    assert {"rna_pca.components", "slide_pca.components", "logit_scale"} <= keys
    assert any(k.startswith("slide.attention_a") for k in load_file(str(runs["abmil"][0] / "checkpoint.safetensors")))


def test_fold_runs_are_deterministic(cohort, runs, tmp_path):
    _run(cohort, "mean", 1, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())  # as written (NaN -> null)
    first = json.loads((runs["mean"][1] / "metrics.json").read_text())
    assert again["retrieval"] == first["retrieval"]
    assert again["gene_sets"] == first["gene_sets"]


def test_patient_leakage_in_a_split_is_caught(cohort):
    from morphomol.data.folds import read_folds
    from morphomol.studies.slides.data import slide_partitions

    folds = read_folds(cohort["folds"])
    f0 = folds["fold"] == 0
    first = f0 & (folds["sample_id"] == folds[f0 & (folds["partition"] == "test")]["sample_id"].iloc[0])
    pat = folds.loc[first, "patient_id"].iloc[0]
    folds.loc[f0 & (folds["patient_id"] == pat) & ~first, "partition"] = "fit"
    with pytest.raises(AssertionError, match="two partitions"):
        slide_partitions(folds, 0, cohort["samples"])
    assert list(slide_partitions(cohort["folds"], 0, cohort["samples"][:3])) == \
        list(read_folds(cohort["folds"]).query("fold == 0").set_index("sample_id").loc[cohort["samples"][:3], "partition"])


def test_transfer_and_tables(cohort, runs, tmp_path):
    import anndata as ad

    from morphomol.studies.slides.tables import write_tables
    from morphomol.studies.slides.transfer import run_transfer

    tr = []
    for target in ("CA", "CB"):
        tr.append(tmp_path / "transfer" / f"{target}.json")
        res = run_transfer(target=target, embeddings=cohort["embeddings"], expression=cohort["rna"] / "expression.h5ad",
                           scores=cohort["gs"] / "scores.parquet", sets=cohort["gs"] / "sets.json", cfg=cohort["cfg"],
                           val_fraction=0.25, seed=0, out=tr[-1], threads=1)
        modes = [(r["mode"], r["fraction"]) for r in res["records"]]
        assert modes == [("zero_shot", 0.0), ("reference_only", 0.2), ("finetune", 0.2)]
        assert res["records"][0]["n_eval"] == 12 and res["records"][1]["n_eval"] < 12  # shot patients left out
    out = tmp_path / "tables"
    summary = write_tables(runs={s: [d / "metrics.json" for d in ds] for s, ds in runs.items()},
                           predictions={s: [d / "predictions.parquet" for d in ds] for s, ds in runs.items()},
                           transfer=tr, folds=cohort["folds"], expression=cohort["rna"] / "expression.h5ad",
                           sets=cohort["gs"] / "sets.json", preprocessing=cohort["rna"] / "preprocessing.json",
                           genes=cohort["rna"] / "genes.txt", out_dir=out, cfg=cohort["cfg"])
    folds = pd.read_csv(out / "folds.tsv", sep="\t")
    assert set(folds["test_fold"]) == {0, 1, 2} and list(folds["sample_id"]) == cohort["samples"]
    assert (folds["test_fold"] >= 0).all() and folds.groupby("patient_id")["test_fold"].nunique().max() == 1
    a = ad.read_h5ad(out / "predicted_scores.h5ad")
    assert a.shape == (24, 53) and list(a.obs_names) == cohort["samples"]
    assert {"measured", "knn_mean", "prompt_mean", "knn_abmil", "prompt_abmil"} <= set(a.layers)
    assert np.isfinite(a.X).all() and np.isfinite(a.layers["measured"]).all()
    ret = pd.read_csv(out / "retrieval.csv")
    assert set(ret["model"]) == {"trained", "untrained", "permuted", "chance"} and set(ret["setting"]) == {"mean", "abmil"}
    # 8 test slides per fold: R@10 is 1 by construction there, left out and named; the tables are flagged
    assert ret["slide_to_rna_recall@10_mean"].isna().all() and (ret["slide_to_rna_recall@10_not_computable"] == "0,1,2").all()
    assert ret["slide_to_rna_recall@5_mean"].notna().all() and ret["few_test_slides"].all() and summary["few_test_slides"]
    gs = pd.read_csv(out / "gene_sets_primary.csv")
    assert gs["knn_trained_r2_mean"].is_monotonic_decreasing and gs["null"].sum() == 3
    assert (out / "genes.txt").read_text() == (cohort["rna"] / "genes.txt").read_text()
    assert {"spectrum.png", "retrieval.png", "transfer.png"} <= {p.name for p in (out / "plots").iterdir()}
    assert "slide_to_rna_recall@10_trained" in summary and "transfer_CA_finetune_0.2_recall@10" in summary
    assert "| Slide encoder |" in (out / "retrieval.md").read_text()
