"""Tables of the cells study (torch-free): the seed's table, the baseline ladder, the modality matrix,
per-class F1, confusion counts, a summary and the run metadata.

Every figure is recomputed from the predictions (one implementation: :mod:`.metrics`) on the *test* cells
of each donor-grouped fold (validation separately in the seed's table), as mean ± sd over folds; per-class
F1 and confusion pool the test cells of all folds (each cell is tested exactly once). The ladder states,
in words, where the tuned LLM stands against logistic regression: the per-fold accuracy difference and
in how many folds each is ahead.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.report.render import Column, fmt_mean_std, mark_best, render_latex, render_markdown, write_csv, write_text
from morphomol.studies.cells.metrics import classification_metrics, confusion, per_class_f1, summarise
from morphomol.util.jsonio import read_json, write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.tables")

#: method id -> display name, in ladder order
METHODS: dict[str, str] = {
    "majority": "Majority class",
    "logreg_shuffled": "Logistic regression, shuffled labels (null)",
    "knn": "kNN (PCA, cosine)",
    "logreg": "Logistic regression (HVG log1p)",
    "untuned:generate": "Untuned LLM, free generation",
    "untuned:score": "Untuned LLM, constrained scoring",
    "llm:generate": "Tuned LLM, free generation",
    "llm:score": "Tuned LLM, constrained scoring",
}
HIGHER = {"accuracy": True, "macro_f1": True, "balanced_accuracy": True}
MODALITIES = (("genes only", "gene_to_type", "logreg"), ("image only", "image_to_type", "logreg_image"),
              ("image + genes", "image_genes_to_type", "logreg_both"))


def load_predictions(predictions: Mapping[str, Sequence[str | Path]]) -> pd.DataFrame:
    """All runs' predictions with ``fold`` and ``method`` (``llm:score``, ``logreg`` ...)."""
    parts = []
    for model, paths in predictions.items():
        for k, p in enumerate(paths):
            d = pd.read_parquet(p)
            d["fold"] = k
            d["method"] = d["mode"] if model == "baselines" else model + ":" + d["mode"]
            parts.append(d)
    return pd.concat(parts, ignore_index=True)


def per_fold(preds: pd.DataFrame, partition: str, task: str, *, image_cells: bool = False) -> pd.DataFrame:
    """Metrics per (method, fold) of one partition / task (optionally only cells with a patch)."""
    d = preds[(preds["partition"] == partition) & (preds["task"] == task)]
    if image_cells:
        d = d[d["has_image"]]
    rows = [{"method": m, "fold": k, **classification_metrics(g["label"].tolist(), g["pred"].tolist())}
            for (m, k), g in d.groupby(["method", "fold"], sort=True)]
    return pd.DataFrame(rows, columns=["method", "fold", "n", "accuracy", "macro_f1", "balanced_accuracy", "unparsed"])


def _agg(pf: pd.DataFrame, method: str, metric: str) -> tuple[float, float, int, int]:
    g = pf[pf["method"] == method]
    mean, sd, n_folds = summarise(g[metric].tolist())
    return mean, sd, n_folds, int(g["n"].sum())


def _cell(mean: float, sd: float, n_folds: int, pct: bool = False) -> str:
    if pct:
        return fmt_mean_std(100 * mean, 100 * sd, n_folds, digits=1) + ("" if np.isnan(mean) else "%")
    return fmt_mean_std(mean, sd, n_folds)


def seed_table(preds: pd.DataFrame) -> pd.DataFrame:
    """The seed's table: gene -> cell type accuracy on test and validation (with n), tuned vs untuned."""
    test, val = per_fold(preds, "test", "gene_to_type"), per_fold(preds, "val", "gene_to_type")
    rows = []
    for m in ("llm:score", "llm:generate", "untuned:score", "untuned:generate"):
        if m not in set(test["method"]):
            continue
        tm, ts, tk, tn = _agg(test, m, "accuracy")
        vm, vs, vk, vn = _agg(val, m, "accuracy")
        rows.append({"method": m, "model": METHODS[m], "test_accuracy": _cell(tm, ts, tk, True), "n_test": tn,
                     "val_accuracy": _cell(vm, vs, vk, True), "n_val": vn, "test_mean": tm, "test_sd": ts,
                     "val_mean": vm, "val_sd": vs, "folds": tk})
    df = pd.DataFrame(rows)
    for mode in ("score", "generate"):
        tuned, naive = df[df["method"] == f"llm:{mode}"], df[df["method"] == f"untuned:{mode}"]
        if len(tuned) and len(naive):
            ratio = tuned["test_mean"].iat[0] / naive["test_mean"].iat[0] if naive["test_mean"].iat[0] > 0 else np.inf
            df.loc[df["method"] == f"llm:{mode}", "fold_change"] = ratio
    return df


def ladder(preds: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Every method on the test cells (gene -> type): accuracy, macro-F1, balanced accuracy, and the
    difference to logistic regression per fold; plus the honest sentences for the notes."""
    pf = per_fold(preds, "test", "gene_to_type")
    lr = pf[pf["method"] == "logreg"].set_index("fold")["accuracy"]
    rows, notes = [], []
    for m, name in METHODS.items():
        if m not in set(pf["method"]):
            continue
        r: dict[str, Any] = {"method": m, "model": name}
        for metric in HIGHER:
            mean, sd, k, n = _agg(pf, m, metric)
            r[metric], r[f"{metric}_mean"], r[f"{metric}_sd"], r["n"], r["folds"] = _cell(mean, sd, k), mean, sd, n, k
        own = pf[pf["method"] == m].set_index("fold")["accuracy"]
        diff = (own - lr).dropna()
        dm, ds, dk = summarise(diff.tolist())
        r["delta_vs_logreg"] = "-" if m == "logreg" else fmt_mean_std(dm, ds, dk)
        r["delta_mean"], r["folds_ahead_of_logreg"] = dm, int((diff > 0).sum())
        rows.append(r)
    df = pd.DataFrame(rows)
    mark_best(df, list(HIGHER), higher_is_better=HIGHER)
    for m in ("llm:score", "llm:generate"):
        row = df[df["method"] == m]
        if len(row) and "logreg" in set(df["method"]):
            dm, k = float(row["delta_mean"].iat[0]), int(row["folds"].iat[0])
            ahead = int(row["folds_ahead_of_logreg"].iat[0])
            verdict = "above" if dm > 0 and ahead == k else ("below" if dm < 0 and ahead == 0 else "level with")
            notes.append(f"{METHODS[m]} is {verdict} logistic regression on these donors: accuracy difference "
                         f"{row['delta_vs_logreg'].iat[0]} (ahead in {ahead} of {k} folds).")
    return df, notes


def reference_notes(baselines: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where a fold's kNN reference or image-baseline training set was a bounded subsample of the fit cells
    (``cells.baselines.max_reference``), the sizes used (nothing when every fit cell was used)."""
    knn = [(int(m["knn_reference"]), int(m["n_fit"])) for m in baselines if "knn_reference" in m]
    if not any(r < n for r, n in knn):
        return []
    cap = max(int(m.get("max_reference", 0)) for m in baselines)
    return [f"kNN reference and image-baseline training cells: a seeded subsample of at most {cap:,} fit cells per "
            f"fold (kNN references {', '.join(f'{r:,} of {n:,}' for r, n in knn)})."]


def hyperparameter_notes(baselines: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per fold: the baselines' hyper-parameters chosen by the inner donor-grouped CV (or the defaults)."""
    from morphomol.studies.cells.baselines import describe_choice

    return [f"Fold {m['fold']}: {describe_choice(m['hyperparameters'])} ({m['hyperparameters']['selection']})."
            for m in baselines if "hyperparameters" in m]


def hyperparameter_column(baselines: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """method -> the values each fold used (``fold 0: C=1, std; fold 1: ...``) for the ladder's CSV."""
    out: dict[str, list[str]] = {}
    for m in baselines:
        hp = m.get("hyperparameters")
        if not hp:
            continue
        lr = f"C={hp['logreg']['C']:g}, {'standardised' if hp['logreg']['standardise'] else 'unscaled'}"
        for method, text in (("logreg", lr), ("logreg_shuffled", lr), ("knn", f"k={hp['knn']['k']}")):
            out.setdefault(method, []).append(f"fold {m['fold']}: {text}")
    return {k: "; ".join(v) for k, v in out.items()}


def modality_matrix(preds: pd.DataFrame) -> pd.DataFrame:
    """Test cells with an H&E patch: genes only / image only / both, tuned LLM (both modes) and the
    logistic-regression counterpart on the same cells."""
    rows = []
    for name, task, lr_name in MODALITIES:
        pf = per_fold(preds, "test", task, image_cells=True)
        r: dict[str, Any] = {"modality": name, "task": task}
        for m, col in (("llm:score", "llm_score"), ("llm:generate", "llm_generate"), ("untuned:score", "untuned_score"),
                       (lr_name, "logreg")):
            mean, sd, k, n = _agg(pf, m, "accuracy")
            r[col], r[f"{col}_mean"], r["n"] = _cell(mean, sd, k), mean, max(n, r.get("n", 0))
        rows.append(r)
    return pd.DataFrame(rows)


def pooled(preds: pd.DataFrame, labels: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-class F1 (long: method, label, f1, support) and confusion counts (long: method, true, predicted,
    count) over every fold's test cells (gene -> type)."""
    d = preds[(preds["partition"] == "test") & (preds["task"] == "gene_to_type")]
    f1_rows, conf_rows = [], []
    for m, g in d.groupby("method", sort=True):
        support = g["label"].value_counts()
        for lab, f in per_class_f1(g["label"], g["pred"], labels).items():
            f1_rows.append({"method": m, "label": lab, "f1": f, "support": int(support.get(lab, 0))})
        if m in ("llm:score", "llm:generate", "logreg", "untuned:score"):
            c = confusion(g["label"], g["pred"], labels)
            for t in c.index:
                for p in c.columns:
                    conf_rows.append({"method": m, "true": t, "predicted": p, "count": int(c.at[t, p])})
    return pd.DataFrame(f1_rows), pd.DataFrame(conf_rows)


def _write(df: pd.DataFrame, cols: list[Column], csv: str | Path, md: str | Path, tex: str | Path, *, title: str,
           label: str, notes: Sequence[str]) -> None:
    write_csv(csv, df)
    write_text(md, render_markdown(df, cols, title=title, notes=notes))
    write_text(tex, render_latex(df, cols, caption=title, label=label, notes=notes))


def make_tables(*, metrics: Mapping[str, Sequence[str | Path]], predictions: Mapping[str, Sequence[str | Path]],
                train: Sequence[str | Path], folds: Sequence[str | Path], out: Mapping[str, str | Path], cohort: str,
                config: Mapping[str, Any]) -> dict[str, Any]:
    """Rule entry (``cells_tables``): every table file named by ``out`` (keys of the rule's outputs)."""
    preds = load_predictions(predictions)
    metas = [read_json(f, "cells fold metadata") for f in folds]
    labels = sorted({lab for m in metas for lab in m["labels"]})
    seed = seed_table(preds)
    notes = ["Donor-grouped folds (no donor in two partitions, asserted); mean ± sd over folds; "
             "fold change = tuned / untuned test accuracy."]
    if "fold_change" in seed.columns:
        for _, r in seed.dropna(subset=["fold_change"]).iterrows():
            if np.isfinite(r["fold_change"]):
                notes.append(f"{r['model']}: {r['fold_change']:.1f}x the untuned model's test accuracy.")
            else:
                notes.append(f"{r['model']}: the untuned model named no correct label in this mode (accuracy 0; "
                             "fold change undefined).")
    _write(seed, [Column("model", "Model"), Column("test_accuracy", "Test accuracy", align="r"),
                  Column("n_test", "n (test)", align="r"), Column("val_accuracy", "Validation accuracy", align="r"),
                  Column("n_val", "n (val)", align="r")], out["table_csv"], out["table_md"], out["table_tex"],
           title=f"Cell type from expression ({cohort}, {len(labels)} types)", label="tab:cells", notes=notes)
    lad, honest = ladder(preds)
    evals = {m: [read_json(p, "metrics") for p in ps] for m, ps in metrics.items()}
    chosen = hyperparameter_column(evals.get("baselines", []))
    lad["hyperparameters"] = [chosen.get(m, "") for m in lad["method"]] if len(lad) else []
    _write(lad, [Column("model", "Method"), Column("accuracy", "Accuracy", "accuracy", "r"),
                 Column("macro_f1", "Macro-F1", "macro_f1", "r"),
                 Column("balanced_accuracy", "Balanced accuracy", "balanced_accuracy", "r"),
                 Column("delta_vs_logreg", "Δ accuracy vs LR", align="r"), Column("n", "n", align="r")],
           out["ladder_csv"], out["ladder_md"], out["ladder_tex"], title=f"Baseline ladder, test cells ({cohort})",
           label="tab:cells-ladder", notes=honest + ["Same donor-grouped folds and the same test cells for every "
                                                     "method; mean ± sd over folds. The baselines are fit on the "
                                                     "LLM's training (fit) cells; their hyper-parameters are chosen "
                                                     "by inner CV grouped by donor over those fit donors only:"]
           + hyperparameter_notes(evals.get("baselines", [])) + reference_notes(evals.get("baselines", [])))
    mod = modality_matrix(preds)
    _write(mod, [Column("modality", "Input"), Column("llm_score", "Tuned LLM (scoring)", align="r"),
                 Column("llm_generate", "Tuned LLM (generation)", align="r"),
                 Column("untuned_score", "Untuned LLM (scoring)", align="r"),
                 Column("logreg", "Logistic regression", align="r"), Column("n", "n", align="r")],
           out["modality_csv"], out["modality_md"], out["modality_tex"],
           title=f"Modality matrix: accuracy on test cells with an H&E patch ({cohort})", label="tab:cells-modality",
           notes=["Logistic regression on HVG log1p (genes), a 16x16 RGB thumbnail of the patch (image), or both."]
           + ([] if preds["has_image"].astype(bool).any() else
              ["No cell of this cohort has an H&E patch: the image tasks were left out of training and evaluation "
               "(the rows stay empty)."]))
    f1, conf = pooled(preds, labels)
    write_csv(out["per_class"], f1)
    write_csv(out["confusion"], conf)
    trains = [read_json(t, "train metrics") for t in train]
    summary = {"cohort": cohort, "labels": labels, "honest": honest, "baseline_hyperparameters": chosen,
               "seed_table": seed.drop(columns=[c for c in ("test_accuracy", "val_accuracy") if c in seed])
                                 .to_dict("records"),
               "ladder": {r["method"]: {k: r[f"{k}_mean"] for k in HIGHER} | {"delta_vs_logreg": r["delta_mean"]}
                          for r in lad.to_dict("records")},
               "modality": mod.drop(columns=["llm_score", "llm_generate", "untuned_score", "logreg"]).to_dict("records"),
               "training": {"examples_per_second": float(np.mean([t["examples_per_second"] for t in trains])),
                            "tokens_per_second": float(np.mean([t["tokens_per_second"] for t in trains])),
                            "steps": trains[0]["steps"], "quantization": trains[0]["quantization"]},
               "eval_cells_per_second": {m: {mode: float(np.nanmean([e["cells_per_second"].get(mode) or np.nan for e in es]))
                                             for mode in ("generate", "score")}
                                         for m, es in evals.items() if m != "baselines"}}
    write_json(out["summary"], summary)
    from importlib.metadata import version

    write_json(out["metadata"], {"cohort": cohort, "config": dict(config), "folds": metas, "training": trains,
                                 "python": platform.python_version(),
                                 **{p: version(p) for p in ("torch", "transformers", "peft", "scikit-learn", "scanpy")}})
    for line in honest:
        log.info("%s", line)
    return summary
