"""What the slides study's numbers can say on small cohorts, and its RNA input checks (issue 23).

* recall@k only for k < the test slides of a fold (with n test slides recall@n is 1 by construction): a fold
  where k >= n is left out of k's mean and named; per-set R² / Pearson need at least 3 test slides;
* fewer than 10 test slides per fold: the tables are flagged, with a warning footnote and a log warning;
* the transfer table of a one-cohort study has a row saying why it is empty;
* duplicate gene symbols in a samples x genes RNA matrix are an error (pandas used to rename them AARS.1).

The tables are built from hand-written fold results (what a fold run writes), not from trained models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.errors import InputError
from morphomol.studies.slides.config import SlidesConfig, TransferConfig

SETS = ("HALLMARK_G2M_CHECKPOINT", "HALLMARK_HYPOXIA", "NULL_001")
KEYS = ("knn_trained", "prompt_trained", "knn_untrained", "knn_permuted", "prompt_permuted")


def _fold_metrics(fold: int, n_test: int, recall: float = 1.0) -> dict:
    """A fold run's metrics.json as the fold job writes it (values of today's 2-test-slide degenerate case)."""
    ret = {d: {f"recall@{k}": recall if k > 1 else 0.5 for k in (1, 5, 10)} for d in ("slide_to_rna", "rna_to_slide")}
    ret["chance"] = {f"recall@{k}": min(k, n_test) / n_test for k in (1, 5, 10)}
    ret["n_pairs"] = n_test
    return {"setting": "mean", "fold": fold, "kind": "slides_align", "status": "ok", "n_fit": 2, "n_val": 2,
            "n_test": n_test, "retrieval": {m: json.loads(json.dumps(ret)) for m in ("trained", "untrained", "permuted")},
            "summary": {k: {"mean_r2_grounded": -451.0, "mean_r2_other": -3.0, "mean_r2_null": -7.0} for k in KEYS},
            "gene_sets": {s: {k: {"r2": -451.0 if i == 0 else 0.2, "pearson": 1.0 if i % 2 else -1.0}
                              for i, k in enumerate(KEYS)} for s in SETS}}


@pytest.fixture()
def tiny(tmp_path):
    """A one-cohort slides study of 6 slides (3 patients x 2): 3 folds with 2 test slides each."""
    import anndata as ad

    samples = [f"S{i}" for i in range(6)]
    patients = [f"P{i // 2}" for i in range(6)]
    rows = []
    for k in range(3):
        for s, p in zip(samples, patients, strict=True):
            pi = int(p[1:])
            part = "test" if pi == k else "val" if pi == (k + 1) % 3 else "fit"
            rows.append({"fold": k, "sample_id": s, "patient_id": p, "n_units": 1, "partition": part,
                         "validation": "patient"})
    folds = tmp_path / "splits" / "folds.parquet"
    folds.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folds)
    rna = tmp_path / "rna"
    rna.mkdir()
    obs = pd.DataFrame({"patient_id": patients, "cohort": "C1", "rna_id": samples}, index=pd.Index(samples, name="sample_id"))
    ad.AnnData(X=np.random.default_rng(0).random((6, 4)).astype(np.float32), obs=obs,
               var=pd.DataFrame(index=[f"G{i}" for i in range(4)])).write_h5ad(rna / "expression.h5ad")
    (rna / "genes.txt").write_text("G0\nG1\nG2\nG3\n")
    (rna / "preprocessing.json").write_text("{}")
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"sets": {s: {"genes": ["G0", "G1"], "size": 2, "null": s.startswith("NULL"),
                                             "grounded": s == SETS[0]} for s in SETS}}))
    runs, preds = [], []
    for k in range(3):
        d = tmp_path / "runs" / "mean" / f"fold{k}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_fold_metrics(k, 2)))
        test = [s for s, p in zip(samples, patients, strict=True) if int(p[1:]) == k]
        pred = pd.DataFrame([{"sample_id": s, "gene_set": g, "route": r, "model": m, "y": 0.1 * int(s[1:]),
                              "y_hat": 0.1 * int(s[1:]) + (0.05 if int(s[1:]) % 2 else -0.05)}
                             for s in test for g in SETS for r in ("knn", "prompt") for m in ("trained", "permuted")])
        pred.to_parquet(d / "predictions.parquet")
        runs.append(d / "metrics.json")
        preds.append(d / "predictions.parquet")
    return {"runs": {"mean": runs}, "predictions": {"mean": preds}, "folds": folds, "rna": rna, "sets": sets}


def _tables(tiny, out: Path, cfg: SlidesConfig, transfer=()) -> dict:
    from morphomol.studies.slides.tables import write_tables

    return write_tables(runs=tiny["runs"], predictions=tiny["predictions"], transfer=list(transfer), folds=tiny["folds"],
                        expression=tiny["rna"] / "expression.h5ad", sets=tiny["sets"],
                        preprocessing=tiny["rna"] / "preprocessing.json", genes=tiny["rna"] / "genes.txt", out_dir=out,
                        cfg=cfg)


def test_two_test_slides_per_fold_drop_recall_at_5_and_10_and_flag_the_tables(tiny, tmp_path, caplog):
    out = tmp_path / "tables"
    with caplog.at_level(logging.WARNING):
        summary = _tables(tiny, out, SlidesConfig(poolings=("mean",)))
    ret = pd.read_csv(out / "retrieval.csv", keep_default_na=False, na_values=[""])
    for d in ("slide_to_rna", "rna_to_slide"):
        for k in (5, 10):
            assert ret[f"{d}_recall@{k}_mean"].isna().all()  # 1.0 by construction: not reported
            assert (ret[f"{d}_recall@{k}"] == "n/a").all()
            assert (ret[f"{d}_recall@{k}_not_computable"].astype(str) == "0,1,2").all()
        assert ret[f"{d}_recall@1_mean"].notna().all()
    assert ret["few_test_slides"].all() and (ret["min_test_slides"] == 2).all()
    md = (out / "retrieval.md").read_text()
    assert "too few test slides" in md and "R@5 not computable in fold(s) 0, 1, 2" in md
    assert "R@10 not computable in fold(s) 0, 1, 2" in md
    gs = pd.read_csv(out / "gene_sets.csv")
    # r = ±1 and R² = -451 of 2-slide folds are not numbers to average
    assert gs["knn_trained_pearson_mean"].isna().all() and gs["knn_trained_r2_mean"].isna().all()
    assert gs["few_test_slides"].all()
    # what can be said: the out-of-fold predictions of all 6 slides pooled (y = 0.1 i, y_hat = y ± 0.05)
    y = 0.1 * np.arange(6)
    y_hat = y + np.where(np.arange(6) % 2, 0.05, -0.05)
    r2 = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert np.allclose(gs["knn_trained_r2_pooled"], r2) and np.allclose(gs["knn_trained_pearson_pooled"],
                                                                         np.corrcoef(y, y_hat)[0, 1])
    assert f"| {r2:.3f} |" in (out / "gene_sets_primary.md").read_text()
    assert "at least 3" in (out / "gene_sets.md").read_text() and "too few test slides" in (out / "gene_sets.md").read_text()
    ctl = pd.read_csv(out / "controls.csv")
    assert ctl["r2_grounded_mean"].isna().all() and ctl["few_test_slides"].all()
    assert summary["few_test_slides"] is True and summary["recall_not_computable_folds"]["recall@5"] == [0, 1, 2]
    assert summary["test_slides_per_fold"] == {"0": 2, "1": 2, "2": 2}
    assert any("fewer than 10 test slides" in r.getMessage() for r in caplog.records)


def test_recall_mean_uses_only_the_folds_where_k_is_below_the_test_slides():
    from morphomol.studies.slides.tables import retrieval_table

    folds = [_fold_metrics(0, 2, recall=1.0), _fold_metrics(1, 12, recall=0.5)]
    ret = retrieval_table({"mean": folds}, [1, 5, 10]).set_index("model")
    assert ret.at["trained", "slide_to_rna_recall@5_mean"] == pytest.approx(0.5)
    assert ret.at["trained", "slide_to_rna_recall@5"] == "0.500 (n=1)"
    assert ret.at["trained", "slide_to_rna_recall@10_not_computable"] == "0"
    assert ret.at["chance", "slide_to_rna_recall@10_mean"] == pytest.approx(10 / 12)


def test_fold_metrics_themselves_leave_out_uncomputable_numbers():
    from morphomol.studies.slides.evaluate import retrieval, set_metrics

    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 8))
    ret = retrieval(z, z + 0.01 * rng.normal(size=(2, 8)), [1, 5, 10])
    assert ret["slide_to_rna"]["recall@1"] == 1.0
    assert np.isnan(ret["slide_to_rna"]["recall@5"]) and np.isnan(ret["chance"]["recall@10"])
    assert "1 by construction" in ret["not_computable"]["recall@5"]
    ps = set_metrics(np.array([[0.1, 0.3], [0.2, 0.1]]), np.array([[0.9, 0.0], [0.1, 0.2]]), ["A", "B"])
    assert ps["pearson"].isna().all() and ps["r2"].isna().all()  # r = ±1 with 2 slides
    ps3 = set_metrics(np.array([[0.1], [0.2], [0.4]]), np.array([[0.1], [0.3], [0.3]]), ["A"])
    assert np.isfinite(ps3.to_numpy()).all()


def test_one_cohort_transfer_table_says_why_it_is_empty(tiny, tmp_path):
    out = tmp_path / "tables"
    summary = _tables(tiny, out, SlidesConfig(poolings=("mean",)))
    tr = pd.read_csv(out / "transfer.csv")
    assert len(tr) == 1 and tr.at[0, "mode"] == "not run"
    assert "one cohort (C1)" in tr.at[0, "note"] and "at least two cohorts" in tr.at[0, "note"]
    md = (out / "transfer.md").read_text()
    assert "one cohort (C1)" in md and "Why empty" in md
    assert "one cohort (C1)" in summary["transfer"]
    assert not (out / "plots" / "transfer.png").exists()
    out2 = tmp_path / "tables2"
    _tables(tiny, out2, SlidesConfig(poolings=("mean",), transfer=TransferConfig(enabled=False)))
    assert "slides.transfer.enabled: false" in pd.read_csv(out2 / "transfer.csv").at[0, "note"]


def test_transfer_rows_with_few_evaluated_slides_are_flagged():
    from morphomol.studies.slides.tables import transfer_table

    rec = {"target": "A", "mode": "zero_shot", "fraction": 0.0, "repeat": 0, "n_shot_patients": 0, "n_shot_slides": 0,
           "n_eval": 4, "slide_to_rna:recall@10": 1.0, "rna_to_slide:recall@10": 1.0, "chance:recall@10": 1.0,
           "mean_r2_grounded": 0.1, "mean_pearson_grounded": 0.2, "mean_r2_null": 0.0}
    tr = transfer_table([{"records": [rec]}], [1, 5, 10])
    assert np.isnan(tr.at[0, "slide_to_rna:recall@10_mean"]) and tr.at[0, "few_test_slides"]
    assert "R@10 not computable with 4 evaluated slides" in tr.at[0, "note"]
    assert tr.at[0, "mean_r2_grounded_mean"] == pytest.approx(0.1)


@pytest.mark.parametrize("suffix", [".tsv", ".csv.gz"])
def test_duplicate_gene_symbols_in_a_samples_x_genes_matrix_are_an_error(tmp_path, suffix):
    from morphomol.studies.slides.config import RnaConfig
    from morphomol.studies.slides.rna import prepare_rna

    sheet = [{"sample_id": f"S{i}", "patient_id": f"P{i}", "cohort": "C"} for i in range(3)]
    counts = pd.DataFrame(np.arange(12).reshape(3, 4) + 1, index=[s["sample_id"] for s in sheet],
                          columns=["AARS", "TP53", "AARS", "AARS.1"])
    m = tmp_path / f"rna{suffix}"
    counts.to_csv(m, sep="," if ".csv" in suffix else "\t")
    with pytest.raises(InputError, match=r"1 duplicate gene symbol\(s\) in the RNA matrix: AARS \(expected") as exc:
        prepare_rna(sheet=sheet, out_expression=tmp_path / "o" / "e.h5ad", out_preprocessing=tmp_path / "o" / "p.json",
                    out_genes=tmp_path / "o" / "g.txt", cfg=RnaConfig(), matrix=m)
    assert exc.value.file == str(m) and exc.value.field == "gene"
    assert not (tmp_path / "o").exists()

