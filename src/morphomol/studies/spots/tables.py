"""The spots study's tables (rule ``spots_tables``): csv / md / tex through :mod:`morphomol.report.render`.

* ``spots_settings``: one row per setting and baseline — test Pearson over all targets and over the
  fold's ``eval_genes`` (HEST's 50 most variable genes), Spearman, MSE and its difference to the
  per-gene training-mean predictor, the best validation Pearson and its epoch. Trained settings: mean ±
  sd across seeds of the fold means (``sd over: seeds``); baselines are deterministic: mean ± sd across
  folds. Rows that could not run say why (missing weights, no captions).
* ``spots_seeds``: the seed's results table for the reference setting — per training seed the final and
  best validation mean gene Pearson and the best epoch (means over folds), and the test Pearson of the
  model selected by validation MSE; a last row with mean ± sd across seeds.
* ``spots_comparisons``: every setting against the reference, paired over (fold, seed) runs: mean ± sd of
  the difference in test Pearson / MSE, paired t-test p-value (Holm-adjusted across settings).
* ``per_gene.csv``: gene x fold x setting Pearson (mean over seeds); ``run_metadata.json`` / ``.md``:
  packages, encoder weights, captions / sentence models, settings (runnable or why not), config;
  ``summary.png``: test Pearson per setting with its sd.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.report.render import Column, fmt_field, fmt_mean_std, write_csv, write_table, write_text
from morphomol.util.jsonio import json_safe, write_json

METRIC_COLS = (("test_pearson", "test Pearson (all targets)"), ("test_pearson_eval", "test Pearson (HEST eval genes)"),
               ("test_spearman", "test Spearman"), ("test_mse", "test MSE"))


def _fmt(s: Mapping[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return fmt_mean_std(float(s["mean"]), float(s["sd"]) if s.get("sd") is not None else float("nan"), s.get("n", 0))


def _fold_means(m: Mapping[str, Any], metric: str) -> pd.Series:
    r = pd.DataFrame(m.get("runs") or [])
    if r.empty or metric not in r:
        return pd.Series(dtype=float)
    return r.assign(v=r[metric].astype(float)).groupby("fold")["v"].mean()


def settings_table(metrics: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any],
                   reasons: Mapping[str, str | None]) -> pd.DataFrame:
    """The rows of ``spots_settings`` (trained settings in file order, then the baselines)."""
    mean_mse = _fold_means(metrics["mean"], "test_mse") if "mean" in metrics else None
    rows = []
    names = list(settings) + [b for b in ("ridge_hest", "ridge_cv", "mean") if b in metrics]
    for name in names:
        m = metrics.get(name)
        s = settings.get(name)
        row: dict[str, Any] = {"setting": name}
        if s is not None:
            d = s.to_dict()
            row.update(role=s.role, description=s.description, depth=s.head.depth,
                       hidden=fmt_field(list(s.head.hidden)) if s.head.hidden else "-", dropout=s.head.dropout,
                       batch_norm=fmt_field(s.head.batch_norm),
                       align=(f"λ={s.align.weight:g}, {s.align.captions}" if s.align else "-"),
                       sd_over="seeds", _fields=json.dumps(d))
        else:
            row.update(role="baseline", description=(m or {}).get("description", ""), depth="-", hidden="-",
                       dropout="-", batch_norm="-", align="-", sd_over="folds")
        if m is None:
            row["status"] = reasons.get(name) or "not run"
            rows.append(row)
            continue
        row["status"] = "ok"
        row["encoder"] = m.get("encoder") or "-"
        summ = m.get("summary") or {}
        for key, _ in METRIC_COLS:
            sm = summ.get(key) or {}
            row[f"{key}_mean"] = sm.get("mean") if sm.get("mean") is not None else np.nan
            row[f"{key}_std"] = sm.get("sd") if sm.get("sd") is not None else np.nan
            row[key] = _fmt(sm)
            fm = _fold_means(m, key)
            row[f"{key}_fold_sd"] = float(fm.std(ddof=1)) if len(fm.dropna()) > 1 else np.nan
        if name == "ridge_hest":
            row["test_mse"] = "n/a (no intercept)"
            row["test_mse_mean"] = np.nan
        if name == "mean":
            row["test_pearson"] = row["test_pearson_eval"] = row["test_spearman"] = "undefined (constant)"
        cm, cs = (summ.get("align_cos") or {}).get("mean"), (summ.get("align_cos_shuffled") or {}).get("mean")
        row["align_cos"] = f"{cm:.3f} / {cs:.3f}" if cm is not None and cs is not None else "-"
        for key in ("val_pearson_best", "val_best_epoch", "best_epoch"):
            sm = summ.get(key) or {}
            row[key] = _fmt(sm) if sm.get("mean") is not None else "-"
        if mean_mse is not None and name not in ("mean", "ridge_hest"):
            fm = _fold_means(m, "test_mse")
            diff = (fm - mean_mse).dropna()
            row["mse_vs_mean"] = f"{diff.mean():+.4f}" if len(diff) else "-"
            row["beats_mean"] = f"{int((diff < 0).sum())}/{len(diff)} folds"
        else:
            row["mse_vs_mean"] = row["beats_mean"] = "-"
        row["n_runs"] = len(m.get("runs") or [])
        rows.append(row)
    df = pd.DataFrame(rows)
    for key, _ in METRIC_COLS:
        if f"{key}_mean" not in df:
            df[f"{key}_mean"] = np.nan
    for key, hib in (("test_pearson", True), ("test_pearson_eval", True), ("test_mse", False)):
        col = df[f"{key}_mean"].astype(float)
        best = col.max() if hib else col.min()
        df[f"{key}_best"] = np.isclose(col, best, rtol=0, atol=1e-12) & col.notna()
    return df.drop(columns=[c for c in ("_fields",) if c in df])


def seeds_table(m: Mapping[str, Any]) -> pd.DataFrame:
    """The seed's table for the reference setting (see the module docstring)."""
    ps = pd.DataFrame(m.get("per_seed") or [])
    if ps.empty:
        return ps
    out = pd.DataFrame({"seed": ps["seed"].astype(int).astype(str), "final_val_pearson": ps["val_pearson_final"],
                        "best_val_pearson": ps["val_pearson_best"], "best_epoch": ps["val_best_epoch"],
                        "test_pearson": ps["test_pearson"], "test_pearson_eval": ps["test_pearson_eval"]})
    cells = {"seed": "mean ± sd"}
    for c in out.columns[1:]:
        v = out[c].astype(float)
        cells[c] = fmt_mean_std(v.mean(), v.std(ddof=1), len(v))
    fmt = out.copy()
    for c in out.columns[1:]:
        fmt[c] = [f"{v:.3f}" if c != "best_epoch" else f"{v:.1f}" for v in out[c].astype(float)]
    return pd.concat([fmt, pd.DataFrame([cells])], ignore_index=True)


def comparisons(metrics: Mapping[str, Mapping[str, Any]], reference: str) -> pd.DataFrame:
    """Paired (fold, seed) differences of every trained setting to ``reference``; Holm-adjusted p."""
    from scipy import stats

    from morphomol.eval.stats import holm

    ref = pd.DataFrame((metrics.get(reference) or {}).get("runs") or [])
    rows = []
    if ref.empty:
        return pd.DataFrame()
    for name, m in metrics.items():
        if name == reference or not m.get("seeds"):
            continue
        r = pd.DataFrame(m["runs"]).merge(ref, on=["fold", "seed"], suffixes=("", "_ref"))
        row: dict[str, Any] = {"setting": name, "reference": reference, "n_pairs": len(r)}
        for key in ("test_pearson", "test_mse"):
            d = (r[key].astype(float) - r[f"{key}_ref"].astype(float)).dropna()
            row[f"d_{key}_mean"] = d.mean() if len(d) else np.nan
            row[f"d_{key}_sd"] = d.std(ddof=1) if len(d) > 1 else np.nan
            row[f"d_{key}"] = fmt_mean_std(row[f"d_{key}_mean"], row[f"d_{key}_sd"], len(d), 4)
            if len(d) > 1 and np.abs(d).max() > 0:
                row[f"p_{key}"] = float(stats.ttest_rel(r[key].astype(float), r[f"{key}_ref"].astype(float),
                                                        nan_policy="omit").pvalue)
            else:
                row[f"p_{key}"] = np.nan  # identical runs (e.g. lambda = 0): no test
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in ("test_pearson", "test_mse"):
        if f"p_{key}" in df:
            df[f"p_{key}_holm"] = holm(df[f"p_{key}"].tolist())
    return df


def write_spots_tables(*, metrics_files: Sequence[str | Path], settings: Mapping[str, Any],
                       reasons: Mapping[str, str | None], reference: str, out_dir: str | Path,
                       metadata: Mapping[str, Any], cohort: str) -> dict[str, Path]:
    """The ``spots_tables`` rule: read every run's metrics.json and write the tables (module docstring)."""
    out = Path(out_dir)
    metrics = {}
    for f in metrics_files:
        m = json.loads(Path(f).read_text())
        metrics[str(m["setting"])] = m
    st = settings_table(metrics, settings, reasons)
    cols = [Column("setting", "setting"), Column("role", "role"), Column("depth", "depth", align="r"),
            Column("hidden", "hidden"), Column("align", "alignment"), Column("encoder", "encoder"),
            Column("test_pearson", "test Pearson (all targets)", "test_pearson", "r"),
            Column("test_pearson_eval", "test Pearson (HEST eval genes)", "test_pearson_eval", "r"),
            Column("test_mse", "test MSE", "test_mse", "r"), Column("beats_mean", "MSE < mean predictor"),
            Column("align_cos", "caption cos (own / shuffled)", align="r"),
            Column("val_pearson_best", "best val Pearson", align="r"), Column("sd_over", "sd over"),
            Column("status", "status")]
    notes = [f"Cohort {cohort}. Pearson/Spearman/MSE per gene over a fold's test spots (log1p targets), averaged over "
             "genes; trained settings: mean ± sd across seeds of the fold means; baselines: across folds.",
             "HEST eval genes: the fold's most variable targets (training spots). ridge_hest has no intercept "
             "(HEST's protocol), so its MSE is not comparable; the mean predictor is constant, so its correlations are "
             "undefined. Model selection used validation only; each test partition was predicted once per run.",
             "Caption cos: cosine between the alignment head's image of the predicted genes and the spot's own caption "
             "embedding vs a shuffled caption, on test spots (a gap means the alignment learned the captions)."]
    paths = {}
    for p in write_table(st, cols, out / "spots_settings", title="Spots study: settings, ablations, alignment, controls "
                         "and baselines", label="tab:spots_settings", notes=notes):
        paths[p.name] = p
    ref = metrics.get(reference)
    seeds = seeds_table(ref) if ref else pd.DataFrame()
    scols = [Column("seed", "seed"), Column("final_val_pearson", "final mean gene Pearson (val)", align="r"),
             Column("best_val_pearson", "best mean gene Pearson (val)", align="r"),
             Column("best_epoch", "best epoch", align="r"), Column("test_pearson", "test Pearson", align="r"),
             Column("test_pearson_eval", "test Pearson (HEST eval genes)", align="r")]
    for p in write_table(seeds, scols, out / "spots_seeds", title=f"Per training seed: {reference} (means over folds)",
                         label="tab:spots_seeds", notes=["Validation Pearson per epoch: final = last epoch, best = "
                                                         "highest (epoch 1-based); test = model selected by validation MSE."]):
        paths[p.name] = p
    comp = comparisons(metrics, reference)
    ccols = [Column("setting", "setting"), Column("n_pairs", "pairs", align="r"),
             Column("d_test_pearson", "Δ test Pearson", align="r"), Column("p_test_pearson_holm", "p (Holm)", align="r"),
             Column("d_test_mse", "Δ test MSE", align="r"), Column("p_test_mse_holm", "p (Holm)", align="r")]
    if not comp.empty:
        comp_fmt = comp.copy()
        for c in ("p_test_pearson_holm", "p_test_mse_holm"):
            comp_fmt[c] = [("-" if not np.isfinite(v) else f"{v:.3g}") for v in comp[c].astype(float)]
    else:
        comp_fmt = comp
    for p in write_table(comp_fmt, ccols, out / "spots_comparisons", title=f"Paired differences to {reference}",
                         label="tab:spots_comparisons", notes=["Pairs = (fold, seed) runs; paired t-test, Holm-adjusted."]):
        paths[p.name] = p
    pg = [{"setting": n, "fold": int(k), "gene": g, "pearson": v} for n, m in metrics.items()
          for k, genes in (m.get("per_gene_pearson") or {}).items() for g, v in genes.items()]
    paths["per_gene.csv"] = write_csv(out / "per_gene.csv", pd.DataFrame(pg, columns=["setting", "fold", "gene", "pearson"]))
    meta = {**metadata, "settings": {n: {"runnable": reasons.get(n) is None, "reason": reasons.get(n),
                                         **settings[n].to_dict()} for n in settings},
            "runs": {n: {"n_runs": len(m.get("runs") or []), "reused": int(sum(bool(r.get("reused")) for r in m.get("runs") or []))}
                     for n, m in metrics.items()}}
    paths["run_metadata.json"] = write_json(out / "run_metadata.json", json_safe(meta), indent=2, sort_keys=True)
    paths["run_metadata.md"] = write_text(out / "run_metadata.md", _metadata_md(meta))
    paths["summary.png"] = plot_summary(st, out / "summary.png", cohort)
    return paths


def _metadata_md(meta: Mapping[str, Any]) -> str:
    from morphomol.report.render import md_escape

    lines = [f"# Spots study run metadata — {md_escape(meta.get('cohort', ''))}", "", "## Packages", "",
             "| package | version |", "|:---|:---|"]
    lines += [f"| {md_escape(k)} | {md_escape(v or 'not installed')} |" for k, v in (meta.get("packages") or {}).items()]
    lines += ["", "## Models", "", "| what | path | checksum |", "|:---|:---|:---|"]
    for k, v in (meta.get("models") or {}).items():
        lines.append(f"| {md_escape(k)} | {md_escape(v.get('path', ''))} | {md_escape(v.get('sha256') or v.get('note', ''))} |")
    lines += ["", "## Settings", "", "| setting | runnable | reason |", "|:---|:---|:---|"]
    for k, v in (meta.get("settings") or {}).items():
        lines.append(f"| {md_escape(k)} | {'yes' if v.get('runnable') else 'no'} | {md_escape(v.get('reason') or '')} |")
    lines += ["", "## Config (spots section)", "", "```json", json.dumps(meta.get("config", {}).get("spots"), indent=2),
              "```", ""]
    return "\n".join(lines)


def plot_summary(df: pd.DataFrame, out: Path, cohort: str) -> Path:
    """Horizontal bars: test Pearson (all targets) per setting with its sd (seeds or folds)."""
    from morphomol.report.figures import plt, save_figure

    d = df[df["status"] == "ok"].copy()
    d = d[d["test_pearson_mean"].notna()]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * max(len(d), 3) + 1))
    y = np.arange(len(d))
    colours = {"reference": "#1f77b4", "ablation": "#7f7f7f", "alignment": "#2ca02c", "control": "#ff7f0e",
               "baseline": "#d62728"}
    ax.barh(y, d["test_pearson_mean"], xerr=d["test_pearson_std"].fillna(0), color=[colours.get(r, "#999") for r in d["role"]])
    ax.set_yticks(y, d["setting"])
    ax.invert_yaxis()
    ax.set_xlabel("test mean gene Pearson (mean ± sd)")
    ax.set_title(f"{cohort}: spots study", fontsize=9)
    return save_figure(fig, out)


def tables_metadata(*, cohort: str, config: Mapping[str, Any], models: Mapping[str, str | None]) -> dict[str, Any]:
    """Python, platform, package versions, the local models named in config with their sha256, the config."""
    import platform
    import sys

    from morphomol.report.metadata import PACKAGES, package_versions
    from morphomol.util.hashing import sha256_path

    checks: dict[str, Any] = {}
    for what, path in models.items():
        if not path:
            checks[what] = {"path": None, "note": "not configured (random init / not used)"}
        elif not Path(path).exists():
            checks[what] = {"path": path, "note": "missing"}
        else:
            checks[what] = {"path": path, "sha256": sha256_path(path)}
    return {"cohort": cohort, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": package_versions((*PACKAGES, "squidpy", "sentence-transformers")), "models": checks,
            "config": dict(config)}
