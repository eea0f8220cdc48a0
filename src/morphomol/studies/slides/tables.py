"""The slides study's tables, predicted scores and anchors (rule ``slides_tables``).

Reads every fold run (``runs/{setting}/fold{k}/metrics.json`` + ``predictions.parquet``), the
transfer results, the shared fold table (``splits/folds.parquet``) and the cohort tables; writes into ``tables/``:

* ``retrieval.{csv,md,tex}``: recall@k slide->RNA and RNA->slide, mean ± sd over folds, for every
  setting's trained / untrained / permuted-pairs model and chance; the gain over untrained;
* ``gene_sets.{csv,md,tex}``: per gene set (real and null) R² / Pearson of both routes (mean ± sd
  over folds), ordered by the primary setting's soft-kNN R² (the predictability spectrum);
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
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.report.render import Column, fmt_mean_std, write_table
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


def retrieval_table(runs: Mapping[str, list[dict[str, Any]]], ks: Sequence[int]) -> pd.DataFrame:
    rows = []
    for setting, folds in runs.items():
        for model in MODELS:
            row: dict[str, Any] = {"setting": setting, "model": model, "n_folds": len(folds)}
            for d in ("slide_to_rna", "rna_to_slide"):
                for k in ks:
                    vals = [f["retrieval"][model][d][f"recall@{k}"] for f in folds]
                    row[f"{d}_recall@{k}_mean"], row[f"{d}_recall@{k}_sd"], _ = _ms(vals)
                    row[f"{d}_recall@{k}"] = _fmt(vals)
            rows.append(row)
        chance = {"setting": setting, "model": "chance", "n_folds": len(folds)}
        for d in ("slide_to_rna", "rna_to_slide"):
            for k in ks:
                vals = [f["retrieval"]["trained"]["chance"][f"recall@{k}"] for f in folds]
                chance[f"{d}_recall@{k}_mean"], chance[f"{d}_recall@{k}_sd"], _ = _ms(vals)
                chance[f"{d}_recall@{k}"] = _fmt(vals)
        rows.append(chance)
    df = pd.DataFrame(rows)
    k0 = ks[0]
    base = df[df["model"] == "untrained"].set_index("setting")[f"slide_to_rna_recall@{k0}_mean"]
    df[f"gain_vs_untrained@{k0}"] = [
        (r[f"slide_to_rna_recall@{k0}_mean"] / base[r["setting"]]) if base.get(r["setting"], 0) else float("nan")
        for _, r in df.iterrows()]
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
                    vals = [f["gene_sets"][s][key][metric] for f in folds]
                    row[f"{key}_{metric}_mean"], row[f"{key}_{metric}_sd"], _ = _ms(vals)
                    row[f"{key}_{metric}"] = _fmt(vals)
            rows.append(row)
    df = pd.DataFrame(rows)
    order = (df[df["setting"] == primary].sort_values("knn_trained_r2_mean", ascending=False)["gene_set"].tolist())
    df["rank"] = df["gene_set"].map({s: i + 1 for i, s in enumerate(order)})
    return df.sort_values(["setting", "rank"]).reset_index(drop=True)


def controls_table(runs: Mapping[str, list[dict[str, Any]]]) -> pd.DataFrame:
    rows = []
    for setting, folds in runs.items():
        for key in folds[0]["summary"]:
            route, model = key.split("_", 1)
            row: dict[str, Any] = {"setting": setting, "route": route, "model": model}
            for group in ("grounded", "other", "null"):
                vals = [f["summary"][key][f"mean_r2_{group}"] for f in folds]
                row[f"r2_{group}_mean"], row[f"r2_{group}_sd"], _ = _ms(vals)
                row[f"r2_{group}"] = _fmt(vals)
            rows.append(row)
    return pd.DataFrame(rows)


def transfer_table(results: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> pd.DataFrame:
    k = ks[-1]
    recs = pd.DataFrame([r for res in results for r in res["records"]])
    if recs.empty:
        return recs
    rows = []
    for (target, mode, frac), g in recs.groupby(["target", "mode", "fraction"], sort=True):
        row: dict[str, Any] = {"target": target, "mode": mode, "fraction": frac, "repeats": len(g),
                               "n_shot_patients": int(g["n_shot_patients"].iloc[0]), "n_eval": int(g["n_eval"].mean())}
        for col in (f"slide_to_rna:recall@{k}", f"rna_to_slide:recall@{k}", f"chance:recall@{k}", "mean_r2_grounded",
                    "mean_pearson_grounded", "mean_r2_null"):
            vals = g[col].astype(float).tolist()
            row[f"{col}_mean"], row[f"{col}_sd"], _ = _ms(vals)
            row[col] = _fmt(vals)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["mode"] = pd.Categorical(out["mode"], ["zero_shot", "reference_only", "finetune"], ordered=True)
    return out.sort_values(["target", "fraction", "mode"]).reset_index(drop=True)


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

    ret = retrieval_table(fold_runs, ks)
    cols = [Column("setting", "Slide encoder"), Column("model", "Projections")]
    cols += [Column(f"slide_to_rna_recall@{k}", f"Slide→RNA R@{k}", align="r") for k in ks]
    cols += [Column(f"rna_to_slide_recall@{k}", f"RNA→slide R@{k}", align="r") for k in ks]
    write_table(ret, cols, out / "retrieval", title="Slide-RNA retrieval on held-out slides (mean ± sd over folds)",
                label="tab:slides-retrieval", notes=["untrained: the same initialisation, never trained; permuted: "
                                                     "trained on shuffled slide-RNA pairs; chance = k / n test slides"])
    gs = gene_set_table(fold_runs, primary, set_meta)
    gcols = [Column("rank", "#", align="r"), Column("gene_set", "Gene set"), Column("n_genes", "Genes", align="r"),
             Column("grounded", "Grounded"), Column("null", "Null"), Column("knn_trained_r2", "soft-kNN R²", align="r"),
             Column("knn_trained_pearson", "soft-kNN r", align="r"), Column("prompt_trained_r2", "prompt R²", align="r"),
             Column("prompt_trained_pearson", "prompt r", align="r"),
             Column("knn_permuted_r2", "permuted-pairs R²", align="r")]
    gs_primary = gs[gs["setting"] == primary]
    write_table(gs, gcols, out / "gene_sets", title=f"Per gene set prediction from H&E ({primary}; mean ± sd over folds)",
                label="tab:slides-gene-sets")
    write_table(gs_primary, gcols, out / "gene_sets_primary",
                title=f"Predictability spectrum ({primary} slide embedding)", label="tab:slides-spectrum")
    ctl = controls_table(fold_runs)
    write_table(ctl, [Column("setting", "Slide encoder"), Column("route", "Route"), Column("model", "Model"),
                      Column("r2_grounded", "R² grounded", align="r"), Column("r2_other", "R² other sets", align="r"),
                      Column("r2_null", "R² null sets", align="r")], out / "controls",
                title="Mean R² by set group: grounded programs, other real sets, size-matched null sets",
                label="tab:slides-controls")
    results = [read_json(p, "transfer result") for p in transfer]
    tr = transfer_table(results, ks)
    k = ks[-1]
    write_table(tr, [Column("target", "Target cohort"), Column("mode", "Mode"), Column("fraction", "Fraction", align="r"),
                     Column("n_shot_patients", "Shot patients", align="r"), Column("n_eval", "Eval slides", align="r"),
                     Column(f"slide_to_rna:recall@{k}", f"Slide→RNA R@{k}", align="r"),
                     Column(f"chance:recall@{k}", "chance", align="r"),
                     Column("mean_r2_grounded", "R² grounded", align="r"),
                     Column("mean_pearson_grounded", "r grounded", align="r")], out / "transfer",
                title="Leave-one-cohort-out transfer and few-shot adaptation (mean ± sd over repeats)",
                label="tab:slides-transfer")

    # every slide once, from its test fold
    pred = pd.concat([pd.read_parquet(p).assign(setting=s) for s, ps in predictions.items() for p in ps],
                     ignore_index=True)
    pred = pred[pred["model"].astype(str) == "trained"].drop(columns="model")
    for c in ("sample_id", "gene_set", "route", "setting"):
        pred[c] = pred[c].astype(str)
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
    if not tr.empty:
        plot_transfer(tr, ks, plots / "transfer.png")
    summary = headline(ret, ctl, tr, gs_primary, primary, ks)
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
    if not tr.empty:
        for (target, mode, frac), row in tr.set_index(["target", "mode", "fraction"]).iterrows():
            out[f"transfer_{target}_{mode}_{frac:g}_recall@{k}"] = float(row[f"slide_to_rna:recall@{k}_mean"])
            out[f"transfer_{target}_{mode}_{frac:g}_r2_grounded"] = float(row["mean_r2_grounded_mean"])
    return out
