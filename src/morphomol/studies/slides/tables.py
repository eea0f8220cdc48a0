"""The slides study's tables, predicted scores and anchors (rule ``slides_tables``).

Reads every fold run (``runs/{setting}/fold{k}/metrics.json`` + ``predictions.parquet``), the
transfer results, the shared fold table (``splits/folds.parquet``) and the cohort tables; writes into ``tables/``:

* ``retrieval.{csv,md,tex}``: recall@k slide->RNA and RNA->slide, mean ± sd over folds, for every
  setting's trained / untrained / permuted-pairs model and chance; the gain over untrained;
* ``gene_sets.{csv,md,tex}``: per gene set (real and null) R² / Pearson of both routes (mean ± sd
  over folds), ordered by the primary setting's soft-kNN R² (the predictability spectrum); beside them the
  trained model's R² / Pearson pooled over every slide's out-of-fold prediction (``*_pooled``, shown in the
  Markdown / LaTeX when folds are small);
* ``controls.{csv,md,tex}``: mean R² over grounded / other / null sets per setting, route and model;
* ``transfer.{csv,md,tex}``: leave-one-cohort-out zero-shot and few-shot adaptation (mean ± sd
  over the repeats);
* ``predicted_scores.csv`` (every slide once, from its test fold: measured and predicted scores of
  every set, both routes, every setting) and ``predicted_scores.h5ad`` (obs = slides with patient,
  cohort and test fold; var = gene sets with size / null / grounded; ``X`` = the primary setting's
  soft-kNN prediction; layers ``measured``, ``{route}_{setting}``);
* ``folds.tsv`` (every slide's test fold and its partition in each fold), ``genes.txt`` and
  ``rna_preprocessing.json`` (the gene order and RNA preprocessing, copied beside the results);
* ``summary.json`` (the headline numbers).

What the numbers can say with few test slides (rules stated in every table's footnote):

* recall@k of a fold is reported only for k < its number of test slides (with n test slides recall@n is
  1 by construction): a fold where k >= n is left out of that k's mean (NaN, listed in
  ``{direction}_recall@{k}_not_computable`` and the footnote); no fold left: ``n/a``;
* per-set R² and Pearson of a fold need at least 3 test slides (with 2, r = ±1 by construction and R²
  compares against the mean of two values); fewer: NaN, left out;
* folds with fewer than 10 test slides: every table carries ``few_test_slides`` = true, a warning
  footnote and a log warning (computed, but too few test slides for the numbers to mean much);
* the transfer table says in a row why it is empty (one cohort, transfer disabled, nothing run).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.report.render import Column, fmt_mean_std, write_table
from morphomol.studies.slides.evaluate import FEW_TEST_SLIDES, MIN_SET_SLIDES, recall_computable
from morphomol.util.jsonio import read_json, write_json
from morphomol.util.logs import get_logger

log = get_logger("slides.tables")

MODELS = ("trained", "untrained", "permuted")


def _ms(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def _fmt(values: Sequence[float]) -> str:
    m, s, n = _ms(values)
    return fmt_mean_std(m, s, n)


def _n_test(fold: Mapping[str, Any]) -> int:
    """Test slides of a fold run (``n_test``; older runs: the retrieval's ``n_pairs``)."""
    n = fold.get("n_test")
    if n is None:
        n = fold["retrieval"]["trained"]["n_pairs"]
    return int(n)


def _fold_no(fold: Mapping[str, Any], i: int) -> int:
    return int(fold.get("fold", i))


def not_computable_folds(folds: Sequence[Mapping[str, Any]], k: int) -> list[int]:
    """The folds (numbers) where recall@k is not computable: k >= their test slides."""
    return [_fold_no(f, i) for i, f in enumerate(folds) if not recall_computable(k, _n_test(f))]


def _recall(fold: Mapping[str, Any], model: str, direction: str, k: int) -> float:
    if not recall_computable(k, _n_test(fold)):
        return float("nan")
    v = fold["retrieval"][model][direction].get(f"recall@{k}")
    return float("nan") if v is None else float(v)


def retrieval_table(runs: Mapping[str, list[dict[str, Any]]], ks: Sequence[int]) -> pd.DataFrame:
    """Recall@k per setting and model, mean ± sd over the folds where k < the fold's test slides; the folds
    left out per k in ``{direction}_recall@{k}_not_computable`` (comma-separated fold numbers)."""
    rows = []
    for setting, folds in runs.items():
        dropped = {k: ",".join(map(str, not_computable_folds(folds, k))) for k in ks}
        for model in (*MODELS, "chance"):
            row: dict[str, Any] = {"setting": setting, "model": model, "n_folds": len(folds)}
            src = "trained" if model == "chance" else model
            for d in ("slide_to_rna", "rna_to_slide"):
                for k in ks:
                    vals = [_recall(f, src, "chance" if model == "chance" else d, k) for f in folds]
                    row[f"{d}_recall@{k}_mean"], row[f"{d}_recall@{k}_sd"], _ = _ms(vals)
                    row[f"{d}_recall@{k}"] = _fmt(vals)
                    row[f"{d}_recall@{k}_not_computable"] = dropped[k]
            rows.append(row)
    df = pd.DataFrame(rows)
    k0 = ks[0]
    base = df[df["model"] == "untrained"].set_index("setting")[f"slide_to_rna_recall@{k0}_mean"]
    df[f"gain_vs_untrained@{k0}"] = [
        (r[f"slide_to_rna_recall@{k0}_mean"] / base[r["setting"]]) if base.get(r["setting"], 0) else float("nan")
        for _, r in df.iterrows()]
    return df


def fold_test_slides(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[int, int]:
    """fold number -> its test slides (the folds are shared by every setting: the first setting's runs)."""
    for folds in runs.values():
        return {_fold_no(f, i): _n_test(f) for i, f in enumerate(folds)}
    return {}


def small_fold_notes(n_test: Mapping[int, int], ks: Sequence[int]) -> list[str]:
    """Footnotes on what the numbers can say with these fold sizes (empty when every fold is large)."""
    notes = []
    few = {k: n for k, n in n_test.items() if n < FEW_TEST_SLIDES}
    if few:
        notes.append(f"Warning: too few test slides for these numbers to mean much: fold(s) "
                     f"{', '.join(f'{k} ({n})' for k, n in few.items())} have fewer than {FEW_TEST_SLIDES} test slides.")
    for k in ks:
        bad = [f for f, n in n_test.items() if not recall_computable(k, n)]
        if bad:
            notes.append(f"R@{k} not computable in fold(s) {', '.join(map(str, bad))} (test slides <= {k}: recall is 1 by "
                         f"construction); left out of the mean" + (", n/a where no fold is left" if len(bad) == len(n_test)
                                                                    else "") + ".")
    tiny = [f for f, n in n_test.items() if n < MIN_SET_SLIDES]
    if tiny:
        notes.append(f"Per-set R² and Pearson need at least {MIN_SET_SLIDES} test slides (with 2, r = ±1 by construction): "
                     f"fold(s) {', '.join(map(str, tiny))} left out.")
    return notes


def _flag(df: pd.DataFrame, n_test: Mapping[int, int]) -> pd.DataFrame:
    """Add ``min_test_slides`` and ``few_test_slides`` (fewer than FEW_TEST_SLIDES in some fold) to every row."""
    m = min(n_test.values()) if n_test else 0
    df["min_test_slides"] = m
    df["few_test_slides"] = bool(m < FEW_TEST_SLIDES)
    return df


def gene_set_table(runs: Mapping[str, list[dict[str, Any]]], primary: str, set_meta: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for setting, folds in runs.items():
        for s in folds[0]["gene_sets"]:
            meta = set_meta.get(s, {})
            row: dict[str, Any] = {"gene_set": s, "setting": setting, "n_genes": meta.get("size"),
                                   "grounded": bool(meta.get("grounded")), "null": bool(meta.get("null"))}
            for key in folds[0]["gene_sets"][s]:
                for metric in ("r2", "pearson"):
                    vals = [f["gene_sets"][s][key][metric] if _n_test(f) >= MIN_SET_SLIDES else None for f in folds]
                    row[f"{key}_{metric}_mean"], row[f"{key}_{metric}_sd"], _ = _ms(vals)
                    row[f"{key}_{metric}"] = _fmt(vals)
            rows.append(row)
    df = pd.DataFrame(rows)
    order = (df[df["setting"] == primary].sort_values("knn_trained_r2_mean", ascending=False)["gene_set"].tolist())
    df["rank"] = df["gene_set"].map({s: i + 1 for i, s in enumerate(order)})
    return df.sort_values(["setting", "rank"]).reset_index(drop=True)


def pooled_set_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, gene set): R² and Pearson of the trained model's out-of-fold predictions pooled over every
    slide (each predicted by the fold that held it out): ``{route}_trained_{r2,pearson}_pooled``. What the
    per-fold numbers cannot give when folds hold a few test slides (same rule: at least 3 slides)."""
    from morphomol.studies.slides.evaluate import set_metrics

    parts = []
    for (setting, route), g in pred.groupby(["setting", "route"], sort=False):
        y = g.pivot(index="sample_id", columns="gene_set", values="y")
        y_hat = g.pivot(index="sample_id", columns="gene_set", values="y_hat").reindex(index=y.index, columns=y.columns)
        ps = set_metrics(y.to_numpy(np.float64), y_hat.to_numpy(np.float64), list(y.columns))
        parts.append(pd.DataFrame({"setting": setting, "gene_set": list(y.columns), "route": route,
                                   "r2": ps["r2"].to_numpy(), "pearson": ps["pearson"].to_numpy()}))
    if not parts:
        return pd.DataFrame(columns=["setting", "gene_set"])
    long = pd.concat(parts, ignore_index=True)
    wide = long.pivot(index=["setting", "gene_set"], columns="route", values=["r2", "pearson"])
    wide.columns = [f"{route}_trained_{metric}_pooled" for metric, route in wide.columns]
    return wide.reset_index()


def controls_table(runs: Mapping[str, list[dict[str, Any]]]) -> pd.DataFrame:
    rows = []
    for setting, folds in runs.items():
        for key in folds[0]["summary"]:
            route, model = key.split("_", 1)
            row: dict[str, Any] = {"setting": setting, "route": route, "model": model}
            for group in ("grounded", "other", "null"):
                vals = [f["summary"][key][f"mean_r2_{group}"] if _n_test(f) >= MIN_SET_SLIDES else None for f in folds]
                row[f"r2_{group}_mean"], row[f"r2_{group}_sd"], _ = _ms(vals)
                row[f"r2_{group}"] = _fmt(vals)
            rows.append(row)
    return pd.DataFrame(rows)


TRANSFER_MODES = ("zero_shot", "reference_only", "finetune")


def transfer_reason(cohorts: Sequence[str], enabled: bool, results: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the transfer table has no result row (None when it has some)."""
    if any(res.get("records") for res in results):
        return None
    uniq = sorted({str(c) for c in cohorts})
    if not enabled:
        return "transfer disabled (slides.transfer.enabled: false)"
    if len(uniq) < 2:
        return (f"one cohort ({', '.join(uniq) or 'none'}) in the sample sheet (column 'cohort'): leave-one-cohort-out "
                "transfer needs at least two cohorts")
    skipped = [f"{res.get('target')}: {res['skipped']}" for res in results if res.get("skipped")]
    if skipped:
        return "transfer could not run (" + "; ".join(skipped) + ")"
    return "no transfer result (no slides_transfer job ran for this cohort)"


def transfer_table(results: Sequence[Mapping[str, Any]], ks: Sequence[int], reason: str | None = None) -> pd.DataFrame:
    """Transfer results per (target, mode, fraction), mean ± sd over the repeats; recall@k only where k < the
    evaluated slides. Without any result: one row whose ``note`` says why (``reason``)."""
    k = ks[-1]
    recs = pd.DataFrame([r for res in results for r in res.get("records", [])])
    if recs.empty:
        why = reason or "no transfer result"
        log.warning("slides transfer table: no result (%s)", why)
        return pd.DataFrame([{"target": "-", "mode": "not run", "fraction": float("nan"), "repeats": 0,
                              "n_shot_patients": 0, "n_eval": 0, "few_test_slides": False, "note": why}])
    for col in (f"slide_to_rna:recall@{k}", f"rna_to_slide:recall@{k}", f"chance:recall@{k}"):
        recs[col] = [float(v) if v is not None and recall_computable(k, n) else float("nan")
                     for v, n in zip(recs[col], recs["n_eval"], strict=True)]
    for col in ("mean_r2_grounded", "mean_pearson_grounded", "mean_r2_null"):
        recs[col] = [float(v) if v is not None and n >= MIN_SET_SLIDES else float("nan")
                     for v, n in zip(recs[col], recs["n_eval"], strict=True)]
    rows = []
    for (target, mode, frac), g in recs.groupby(["target", "mode", "fraction"], sort=True):
        n_eval = g["n_eval"].astype(int)
        row: dict[str, Any] = {"target": target, "mode": mode, "fraction": frac, "repeats": len(g),
                               "n_shot_patients": int(g["n_shot_patients"].iloc[0]), "n_eval": int(n_eval.mean())}
        for col in (f"slide_to_rna:recall@{k}", f"rna_to_slide:recall@{k}", f"chance:recall@{k}", "mean_r2_grounded",
                    "mean_pearson_grounded", "mean_r2_null"):
            vals = g[col].astype(float).tolist()
            row[f"{col}_mean"], row[f"{col}_sd"], _ = _ms(vals)
            row[col] = _fmt(vals)
        notes = []
        if not all(recall_computable(k, n) for n in n_eval):
            notes.append(f"R@{k} not computable with {int(n_eval.min())} evaluated slides")
        if int(n_eval.min()) < FEW_TEST_SLIDES:
            notes.append(f"too few evaluated slides ({int(n_eval.min())} < {FEW_TEST_SLIDES}) to mean much")
        row["few_test_slides"] = bool(int(n_eval.min()) < FEW_TEST_SLIDES)
        row["note"] = "; ".join(notes)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["mode"] = pd.Categorical(out["mode"], list(TRANSFER_MODES), ordered=True)
    return out.sort_values(["target", "fraction", "mode"]).reset_index(drop=True)


def transfer_ran(tr: pd.DataFrame) -> bool:
    """Whether the transfer table holds results (not only the row saying why it is empty)."""
    return not tr.empty and bool(tr["mode"].astype(str).isin(TRANSFER_MODES).any())


def fold_ids(folds: str | Path | pd.DataFrame, samples: Sequence[str], meta: pd.DataFrame) -> pd.DataFrame:
    """One row per slide: patient, cohort, its test fold and its partition in every fold of the fold table."""
    from morphomol.data.folds import n_folds, read_folds, sample_partitions

    table = folds if isinstance(folds, pd.DataFrame) else read_folds(folds)
    out = meta.loc[list(samples), ["patient_id", "cohort"]].copy()
    out.index.name = "sample_id"
    out["test_fold"] = -1
    for k in range(n_folds(table)):
        part = sample_partitions(table, k)
        out[f"fold{k}"] = [part.get(s) for s in out.index]
        out.loc[out[f"fold{k}"] == "test", "test_fold"] = k
    return out.reset_index()


def write_tables(*, runs: Mapping[str, Sequence[str | Path]], predictions: Mapping[str, Sequence[str | Path]],
                 transfer: Sequence[str | Path], folds: str | Path, expression: str | Path,
                 sets: str | Path, preprocessing: str | Path, genes: str | Path, out_dir: str | Path, cfg: Any,
                 ) -> dict[str, Any]:
    """The ``slides_tables`` rule: every table, the predicted scores and the plots under ``out_dir``."""
    import anndata as ad

    from morphomol.studies.slides.plots import plot_retrieval, plot_spectrum, plot_transfer
    from morphomol.util.atomic import atomic_path

    out = Path(out_dir)
    fold_runs = {s: [read_json(p, "fold metrics") for p in paths] for s, paths in runs.items()}
    set_meta = read_json(sets, "gene sets file")["sets"]
    ks = list(cfg.retrieval_ks)
    primary = cfg.primary
    obs = ad.read_h5ad(expression, backed="r").obs[["patient_id", "cohort"]].copy()
    samples = [str(s) for s in obs.index]

    n_test = fold_test_slides(fold_runs)
    small = small_fold_notes(n_test, ks)
    if n_test and min(n_test.values()) < FEW_TEST_SLIDES:
        log.warning("slides tables: fold(s) with fewer than %d test slides (%s): too few test slides for retrieval, "
                    "R² and Pearson to mean much; the tables are flagged (few_test_slides)", FEW_TEST_SLIDES,
                    ", ".join(f"fold {k}: {n}" for k, n in n_test.items() if n < FEW_TEST_SLIDES))
    for k in ks:
        bad = [f for f, n in n_test.items() if not recall_computable(k, n)]
        if bad:
            log.warning("slides tables: recall@%d not computable in fold(s) %s (test slides <= %d); left out", k,
                        ", ".join(map(str, bad)), k)
    ret = _flag(retrieval_table(fold_runs, ks), n_test)
    cols = [Column("setting", "Slide encoder"), Column("model", "Projections")]
    cols += [Column(f"slide_to_rna_recall@{k}", f"Slide→RNA R@{k}", align="r") for k in ks]
    cols += [Column(f"rna_to_slide_recall@{k}", f"RNA→slide R@{k}", align="r") for k in ks]
    write_table(ret, cols, out / "retrieval", title="Slide-RNA retrieval on held-out slides (mean ± sd over folds)",
                label="tab:slides-retrieval", notes=["untrained: the same initialisation, never trained; permuted: "
                                                     "trained on shuffled slide-RNA pairs; chance = k / n test slides; "
                                                     "R@k only for k < the fold's test slides", *small])
    pred = pd.concat([pd.read_parquet(p).assign(setting=s) for s, ps in predictions.items() for p in ps],
                     ignore_index=True)
    pred = pred[pred["model"].astype(str) == "trained"].drop(columns="model")
    for c in ("sample_id", "gene_set", "route", "setting"):
        pred[c] = pred[c].astype(str)
    gs = gene_set_table(fold_runs, primary, set_meta)
    gs = _flag(gs.merge(pooled_set_table(pred), on=["setting", "gene_set"], how="left"), n_test)
    gcols = [Column("rank", "#", align="r"), Column("gene_set", "Gene set"), Column("n_genes", "Genes", align="r"),
             Column("grounded", "Grounded"), Column("null", "Null"), Column("knn_trained_r2", "soft-kNN R²", align="r"),
             Column("knn_trained_pearson", "soft-kNN r", align="r"), Column("prompt_trained_r2", "prompt R²", align="r"),
             Column("prompt_trained_pearson", "prompt r", align="r"),
             Column("knn_permuted_r2", "permuted-pairs R²", align="r")]
    for c in [c for c in gs.columns if c.endswith("_pooled")]:
        gs[f"{c}_fmt"] = [f"{v:.3f}" if np.isfinite(v) else "n/a" for v in gs[c].astype(float)]
    gs_primary = gs[gs["setting"] == primary]
    set_notes = [f"R² and Pearson per fold over its test slides, only with at least {MIN_SET_SLIDES} of them", *small]
    if small and "knn_trained_r2_pooled" in gs:  # per-fold numbers of small folds: show the pooled ones beside them
        gcols += [Column("knn_trained_r2_pooled_fmt", "soft-kNN R² pooled", align="r"),
                  Column("knn_trained_pearson_pooled_fmt", "soft-kNN r pooled", align="r")]
        set_notes.append("pooled: over every slide's out-of-fold prediction (each slide predicted by the fold that "
                         f"held it out), one number per set, at least {MIN_SET_SLIDES} slides")
    write_table(gs, gcols, out / "gene_sets", title=f"Per gene set prediction from H&E ({primary}; mean ± sd over folds)",
                label="tab:slides-gene-sets", notes=set_notes)
    write_table(gs_primary, gcols, out / "gene_sets_primary",
                title=f"Predictability spectrum ({primary} slide embedding)", label="tab:slides-spectrum",
                notes=set_notes)
    ctl = _flag(controls_table(fold_runs), n_test)
    write_table(ctl, [Column("setting", "Slide encoder"), Column("route", "Route"), Column("model", "Model"),
                      Column("r2_grounded", "R² grounded", align="r"), Column("r2_other", "R² other sets", align="r"),
                      Column("r2_null", "R² null sets", align="r")], out / "controls",
                title="Mean R² by set group: grounded programs, other real sets, size-matched null sets",
                label="tab:slides-controls", notes=set_notes)
    results = [read_json(p, "transfer result") for p in transfer]
    tr = transfer_table(results, ks, transfer_reason(obs["cohort"].astype(str).tolist(), cfg.transfer.enabled, results))
    k = ks[-1]
    tcols = [Column("target", "Target cohort"), Column("mode", "Mode"), Column("fraction", "Fraction", align="r"),
             Column("n_shot_patients", "Shot patients", align="r"), Column("n_eval", "Eval slides", align="r"),
             Column(f"slide_to_rna:recall@{k}", f"Slide→RNA R@{k}", align="r"),
             Column(f"chance:recall@{k}", "chance", align="r"),
             Column("mean_r2_grounded", "R² grounded", align="r"),
             Column("mean_pearson_grounded", "r grounded", align="r")]
    tnotes = [f"R@{k} only where k < the evaluated slides; R² and r only with at least {MIN_SET_SLIDES} of them"]
    if not transfer_ran(tr):
        tcols = [Column("target", "Target cohort"), Column("mode", "Mode"), Column("note", "Why empty")]
        tnotes = [f"No transfer: {tr['note'].iloc[0]}."]
    elif tr["note"].astype(str).str.len().gt(0).any():
        tcols.append(Column("note", "Note"))
    write_table(tr, tcols, out / "transfer",
                title="Leave-one-cohort-out transfer and few-shot adaptation (mean ± sd over repeats)",
                label="tab:slides-transfer", notes=tnotes)

    # every slide once, from its test fold (read above)
    with atomic_path(out / "predicted_scores.csv") as tmp:
        pred.to_csv(tmp, index=False, float_format="%.6g")
    fid = fold_ids(folds, samples, obs)
    with atomic_path(out / "folds.tsv") as tmp:
        fid.to_csv(tmp, sep="\t", index=False)
    names = [s for s in set_meta if s in set(pred["gene_set"])]
    wide = {key: g.pivot(index="sample_id", columns="gene_set", values="y_hat").reindex(index=samples, columns=names)
            for key, g in pred.groupby(pred["route"] + "_" + pred["setting"])}
    measured = (pred.drop_duplicates(["sample_id", "gene_set"]).pivot(index="sample_id", columns="gene_set", values="y")
                .reindex(index=samples, columns=names))
    var = pd.DataFrame({"size": [set_meta[s]["size"] for s in names], "null": [bool(set_meta[s]["null"]) for s in names],
                        "grounded": [bool(set_meta[s].get("grounded")) for s in names]}, index=pd.Index(names))
    a = ad.AnnData(X=wide[f"knn_{primary}"].to_numpy(np.float32),
                   obs=fid.set_index("sample_id")[["patient_id", "cohort", "test_fold"]].loc[samples], var=var)
    a.layers["measured"] = measured.to_numpy(np.float32)
    for key, w in wide.items():
        a.layers[key] = w.to_numpy(np.float32)
    a.uns["description"] = (f"X: out-of-fold soft-kNN predictions of the ssGSEA scores ({primary} slide embedding); "
                            "layers: measured ssGSEA ES and every route_setting")
    with atomic_path(out / "predicted_scores.h5ad") as tmp:
        a.write_h5ad(tmp)
    for src, name in ((genes, "genes.txt"), (preprocessing, "rna_preprocessing.json")):
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)

    plots = out / "plots"
    plot_spectrum(gs_primary, plots / "spectrum.png", title=f"Predictability spectrum ({primary})")
    plot_retrieval(ret, ks, plots / "retrieval.png")
    if transfer_ran(tr):
        plot_transfer(tr, ks, plots / "transfer.png")
    summary = headline(ret, ctl, tr, gs_primary, primary, ks)
    summary["test_slides_per_fold"] = {str(f): n for f, n in n_test.items()}
    summary["few_test_slides"] = bool(n_test and min(n_test.values()) < FEW_TEST_SLIDES)
    summary["recall_not_computable_folds"] = {f"recall@{k}": [f for f, n in n_test.items() if not recall_computable(k, n)]
                                              for k in ks}
    if not transfer_ran(tr):
        summary["transfer"] = str(tr["note"].iloc[0])
    write_json(out / "summary.json", summary)
    log.info("slides tables: %s", summary)
    return summary


def headline(ret: pd.DataFrame, ctl: pd.DataFrame, tr: pd.DataFrame, gs: pd.DataFrame, primary: str,
             ks: Sequence[int]) -> dict[str, Any]:
    k = ks[-1]
    r = ret[ret["setting"] == primary].set_index("model")
    c = ctl[(ctl["setting"] == primary)].set_index(["route", "model"])
    out: dict[str, Any] = {"setting": primary}
    for m in ("trained", "untrained", "permuted", "chance"):
        out[f"slide_to_rna_recall@{k}_{m}"] = float(r.at[m, f"slide_to_rna_recall@{k}_mean"])
        out[f"slide_to_rna_recall@{ks[0]}_{m}"] = float(r.at[m, f"slide_to_rna_recall@{ks[0]}_mean"])
    for (route, model), row in c.iterrows():
        for g in ("grounded", "other", "null"):
            out[f"r2_{g}_{route}_{model}"] = float(row[f"r2_{g}_mean"])
    out["top_sets"] = gs.head(5)["gene_set"].tolist()
    if transfer_ran(tr):
        for (target, mode, frac), row in tr.set_index(["target", "mode", "fraction"]).iterrows():
            out[f"transfer_{target}_{mode}_{frac:g}_recall@{k}"] = float(row[f"slide_to_rna:recall@{k}_mean"])
            out[f"transfer_{target}_{mode}_{frac:g}_r2_grounded"] = float(row["mean_r2_grounded_mean"])
    return out
