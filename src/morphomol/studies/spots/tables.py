"""The spots study's tables (rule ``spots_tables``): csv / md / tex through :mod:`morphomol.report.render`.

* ``spots_settings``: one row per setting and baseline — test Pearson pooled over a fold's test spots (all
  targets and the fold's ``eval_genes``, HEST's 50 most variable genes), the within-sample Pearson beside it,
  Spearman, MSE and its difference to the per-gene training-mean predictor, the best validation Pearson and
  its epoch. Trained settings: mean ± sd across seeds of the fold means (``sd over: seeds``); baselines are
  deterministic: mean ± sd across folds. Rows that could not run say why (missing weights, no captions).
  The ``depth_only`` baseline (ridge on each spot's log1p total counts) is the sequencing-depth control; a
  footnote gives the share of the reference's pooled Pearson that it reaches.
* Within-sample Pearson (:func:`morphomol.studies.spots.predictions.within_sample_by_fold`): per gene, the
  Pearson over each test sample's spots alone (samples with at least
  :data:`morphomol.eval.metrics.WITHIN_MIN_UNITS` spots where the gene's measured and predicted values both
  vary), averaged over those samples (unweighted), then over genes; mean ± sd across folds. It is computed
  from a run's ``predictions.parquet`` (one sample at a time), which holds the first seed of a trained
  setting: its sd is over folds for every row. Differences between samples (depth, batch) do not count.
* ``spots_seeds``: the seed's results table for the reference setting — per training seed the final and
  best validation mean gene Pearson and the best epoch (means over folds), and the test Pearson of the
  model selected by validation MSE; a last row with mean ± sd across seeds (within-sample: the first seed).
* ``spots_comparisons``: every setting against the reference, paired over (fold, seed) runs: mean ± sd of
  the difference in test Pearson / MSE, paired t-test p-value (Holm-adjusted across settings), and the
  difference in within-sample Pearson over folds (first seeds); then ``depth_only`` against the reference
  paired over folds (the reference's fold means over seeds; its own Holm family).
* ``per_gene.csv``: gene x fold x setting Pearson (mean over seeds) and within-sample Pearson (first seed);
  ``run_metadata.json`` / ``.md``:
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
#: baseline rows, in table order
BASELINE_ROWS = ("ridge_hest", "ridge_cv", "mean", "depth_only")
#: the depth control (studies.spots.baselines)
DEPTH = "depth_only"


def _fmt(s: Mapping[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return fmt_mean_std(float(s["mean"]), float(s["sd"]) if s.get("sd") is not None else float("nan"), s.get("n", 0))


def _fold_means(m: Mapping[str, Any], metric: str) -> pd.Series:
    r = pd.DataFrame(m.get("runs") or [])
    if r.empty or metric not in r:
        return pd.Series(dtype=float)
    return r.assign(v=r[metric].astype(float)).groupby("fold")["v"].mean()


def _within_values(within: Mapping[str, Any] | None) -> pd.Series:
    """fold -> within-sample Pearson of one run (:func:`~morphomol.studies.spots.predictions.within_sample_by_fold`)."""
    folds = (within or {}).get("folds") or {}
    return pd.Series({int(k): v.get("pearson") for k, v in folds.items()}, dtype=float).sort_index()


def _within_summary(within: Mapping[str, Any] | None) -> dict[str, Any]:
    """mean, sd (ddof 1) and number of the folds with a defined within-sample Pearson."""
    v = _within_values(within).to_numpy(np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if len(v) else None, "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": int(len(v))}


def settings_table(metrics: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any],
                   reasons: Mapping[str, str | None], within: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> pd.DataFrame:
    """The rows of ``spots_settings`` (trained settings in file order, then the baselines). ``within``: run name
    -> its within-sample Pearson per fold (absent: ``n/a``)."""
    within = within or {}
    mean_mse = _fold_means(metrics["mean"], "test_mse") if "mean" in metrics else None
    rows = []
    names = list(settings) + [b for b in BASELINE_ROWS if b in metrics]
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
        ws = _within_summary(within.get(name))
        row["test_pearson_within_mean"] = ws["mean"] if ws["mean"] is not None else np.nan
        row["test_pearson_within_std"] = ws["sd"] if ws["sd"] is not None else np.nan
        row["test_pearson_within"] = _fmt(ws)
        if name == "ridge_hest":
            row["test_mse"] = "n/a (no intercept)"
            row["test_mse_mean"] = np.nan
        if name == "mean":
            row["test_pearson"] = row["test_pearson_eval"] = row["test_spearman"] = "undefined (constant)"
            row["test_pearson_within"] = "undefined (constant)"
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
    for key in [k for k, _ in METRIC_COLS] + ["test_pearson_within"]:
        if f"{key}_mean" not in df:
            df[f"{key}_mean"] = np.nan
    for key, hib in (("test_pearson", True), ("test_pearson_eval", True), ("test_mse", False),
                     ("test_pearson_within", True)):
        col = df[f"{key}_mean"].astype(float)
        best = col.max() if hib else col.min()
        df[f"{key}_best"] = np.isclose(col, best, rtol=0, atol=1e-12) & col.notna()
    return df.drop(columns=[c for c in ("_fields",) if c in df])


def seeds_table(m: Mapping[str, Any], within: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The seed's table for the reference setting (see the module docstring). ``within``: the reference's
    within-sample Pearson per fold (its first seed's predictions): a column with that seed's value."""
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
    first = str(int((m.get("seeds") or [ps["seed"].iloc[0]])[0]))
    ws = _within_summary(within)
    fmt["test_pearson_within"] = [(_fmt(ws) if s == first else "-") for s in fmt["seed"]]
    cells["test_pearson_within"] = "-"
    return pd.concat([fmt, pd.DataFrame([cells])], ignore_index=True)


def _within_diff(within: Mapping[str, Mapping[str, Any]], name: str, reference: str) -> tuple[str, float, float]:
    """Difference in within-sample Pearson of ``name`` to ``reference`` over the folds both have."""
    d = (_within_values(within.get(name)) - _within_values(within.get(reference))).dropna()
    m = float(d.mean()) if len(d) else np.nan
    sd = float(d.std(ddof=1)) if len(d) > 1 else np.nan
    return (fmt_mean_std(m, sd, len(d), 4) if len(d) else "-"), m, sd


def comparisons(metrics: Mapping[str, Mapping[str, Any]], reference: str,
                within: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Paired (fold, seed) differences of every trained setting to ``reference``; Holm-adjusted p. Then the
    depth control against the reference, paired over folds (see the module docstring)."""
    from scipy import stats

    from morphomol.eval.stats import holm

    within = within or {}
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
        row["d_test_pearson_within"], row["d_test_pearson_within_mean"], row["d_test_pearson_within_sd"] = \
            _within_diff(within, name, reference)
        row["pairs_over"] = "fold, seed"
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in ("test_pearson", "test_mse"):
        if f"p_{key}" in df:
            df[f"p_{key}_holm"] = holm(df[f"p_{key}"].tolist())
    if DEPTH in metrics:  # the control, paired over folds with the reference's fold means (its own Holm family)
        row = {"setting": DEPTH, "reference": reference, "pairs_over": "fold"}
        for key in ("test_pearson", "test_mse"):
            d = (_fold_means(metrics[DEPTH], key) - _fold_means(metrics[reference], key)).dropna()
            row["n_pairs"] = len(d)
            row[f"d_{key}_mean"] = d.mean() if len(d) else np.nan
            row[f"d_{key}_sd"] = d.std(ddof=1) if len(d) > 1 else np.nan
            row[f"d_{key}"] = fmt_mean_std(row[f"d_{key}_mean"], row[f"d_{key}_sd"], len(d), 4)
            p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and np.abs(d).max() > 0 else np.nan
            row[f"p_{key}"] = row[f"p_{key}_holm"] = p
        row["d_test_pearson_within"], row["d_test_pearson_within_mean"], row["d_test_pearson_within_sd"] = \
            _within_diff(within, DEPTH, reference)
        df = pd.concat([df, pd.DataFrame([row])], ignore_index=True)
    return df


def depth_note(table: pd.DataFrame, reference: str, transform: str) -> str:
    """The footnote of the depth control: the share of the reference's pooled test Pearson that ``depth_only``
    reaches (their ratio), both within-sample Pearsons, and the advice for cohorts of mixed depth."""
    t = table.set_index("setting")
    advice = ("A gene's pooled Pearson also counts differences in sequencing depth between spots and samples; with "
              "log1p targets on a cohort of mixed depth set spots.targets.transform: normalize_log1p (per-spot "
              "normalisation)." if transform == "log1p" else
              f"Targets are {transform} (per-spot normalised): depth differences are divided out.")
    if DEPTH not in t.index or t.at[DEPTH, "status"] != "ok":
        return "Depth control (depth_only) not run (spots.baselines.depth_only). " + advice
    d = float(t.at[DEPTH, "test_pearson_mean"])
    r = float(t.at[reference, "test_pearson_mean"]) if reference in t.index else float("nan")
    if not (np.isfinite(d) and np.isfinite(r)) or r == 0:
        return (f"Depth control: depth_only (ridge on each spot's log1p total counts) reaches a pooled test Pearson "
                f"of {d:.3f}; the reference {reference} has none to compare with. " + advice)
    dw, rw = float(t.at[DEPTH, "test_pearson_within_mean"]), float(t.at[reference, "test_pearson_within_mean"])
    within = (f"; within samples {dw:.3f} vs {rw:.3f}" if np.isfinite(dw) and np.isfinite(rw) else "")
    return (f"Depth control: depth_only (ridge on each spot's log1p total counts, no image) reaches {d / r:.0%} of "
            f"{reference}'s pooled test Pearson ({d:.3f} / {r:.3f}){within}. " + advice)


def write_spots_tables(*, metrics_files: Sequence[str | Path], settings: Mapping[str, Any],
                       reasons: Mapping[str, str | None], reference: str, out_dir: str | Path,
                       metadata: Mapping[str, Any], cohort: str,
                       predictions: Mapping[str, str | Path] | None = None, folds: str | Path | None = None,
                       transform: str = "log1p") -> dict[str, Path]:
    """The ``spots_tables`` rule: read every run's metrics.json and write the tables (module docstring).
    ``predictions`` (run name -> its ``predictions.parquet``) and ``folds`` (the cohort's fold table): the
    within-sample Pearson, read one sample at a time (without them its cells say ``n/a``); ``transform``: the
    targets' (``spots.targets.transform``)."""
    from morphomol.eval.metrics import WITHIN_MIN_UNITS
    from morphomol.studies.spots.predictions import within_sample_by_fold

    out = Path(out_dir)
    metrics = {}
    for f in metrics_files:
        m = json.loads(Path(f).read_text())
        metrics[str(m["setting"])] = m
    within: dict[str, dict[str, Any]] = {}
    if predictions:
        if folds is None:
            raise ValueError("the within-sample Pearson needs the fold table")
        for name, path in predictions.items():
            if name in metrics:
                within[name] = within_sample_by_fold(path, folds)
    st = settings_table(metrics, settings, reasons, within)
    cols = [Column("setting", "setting"), Column("role", "role"), Column("depth", "depth", align="r"),
            Column("hidden", "hidden"), Column("align", "alignment"), Column("encoder", "encoder"),
            Column("test_pearson", "test Pearson, pooled (all targets)", "test_pearson", "r"),
            Column("test_pearson_within", "test Pearson, within samples (all targets)", "test_pearson_within", "r"),
            Column("test_pearson_eval", "test Pearson, pooled (HEST eval genes)", "test_pearson_eval", "r"),
            Column("test_mse", "test MSE", "test_mse", "r"), Column("beats_mean", "MSE < mean predictor"),
            Column("align_cos", "caption cos (own / shuffled)", align="r"),
            Column("val_pearson_best", "best val Pearson", align="r"), Column("sd_over", "sd over"),
            Column("status", "status")]
    notes = [f"Cohort {cohort}. Pearson/Spearman/MSE per gene over a fold's test spots ({transform} targets), averaged over "
             "genes; trained settings: mean ± sd across seeds of the fold means; baselines: across folds.",
             "Pooled: over every test spot of the fold, so differences between samples count. Within samples: per "
             f"gene, Pearson over each test sample's spots alone (samples with >= {WITHIN_MIN_UNITS} spots where the "
             "gene's measured and predicted values vary), averaged over samples, then over genes; mean ± sd across "
             "folds, from the predictions kept (trained settings: the first seed).",
             depth_note(st, reference, transform),
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
    seeds = seeds_table(ref, within.get(reference)) if ref else pd.DataFrame()
    scols = [Column("seed", "seed"), Column("final_val_pearson", "final mean gene Pearson (val)", align="r"),
             Column("best_val_pearson", "best mean gene Pearson (val)", align="r"),
             Column("best_epoch", "best epoch", align="r"), Column("test_pearson", "test Pearson, pooled", align="r"),
             Column("test_pearson_within", "test Pearson, within samples", align="r"),
             Column("test_pearson_eval", "test Pearson (HEST eval genes)", align="r")]
    dn = depth_note(st, reference, transform)
    for p in write_table(seeds, scols, out / "spots_seeds", title=f"Per training seed: {reference} (means over folds)",
                         label="tab:spots_seeds", notes=["Validation Pearson per epoch: final = last epoch, best = "
                                                         "highest (epoch 1-based); test = model selected by validation MSE.",
                                                         "Within samples: the first seed's predictions (the ones "
                                                         "kept), mean ± sd across folds.", dn]):
        paths[p.name] = p
    comp = comparisons(metrics, reference, within)
    ccols = [Column("setting", "setting"), Column("pairs_over", "pairs over"), Column("n_pairs", "pairs", align="r"),
             Column("d_test_pearson", "Δ test Pearson, pooled", align="r"),
             Column("p_test_pearson_holm", "p (Holm)", align="r"),
             Column("d_test_pearson_within", "Δ test Pearson, within samples", align="r"),
             Column("d_test_mse", "Δ test MSE", align="r"), Column("p_test_mse_holm", "p (Holm)", align="r")]
    if not comp.empty:
        comp_fmt = comp.copy()
        for c in ("p_test_pearson_holm", "p_test_mse_holm"):
            comp_fmt[c] = [("-" if not np.isfinite(v) else f"{v:.3g}") for v in comp[c].astype(float)]
    else:
        comp_fmt = comp
    for p in write_table(comp_fmt, ccols, out / "spots_comparisons", title=f"Paired differences to {reference}",
                         label="tab:spots_comparisons",
                         notes=["Pairs = (fold, seed) runs; paired t-test, Holm-adjusted across settings. Δ within "
                                "samples: over folds, first seeds. depth_only: paired over folds with the reference's "
                                "fold means over seeds (a family of its own).", dn]):
        paths[p.name] = p
    pg = [{"setting": n, "fold": int(k), "gene": g, "pearson": v,
           "pearson_within": ((within.get(n) or {}).get("per_gene", {}).get(int(k)) or {}).get(g, np.nan)}
          for n, m in metrics.items() for k, genes in (m.get("per_gene_pearson") or {}).items()
          for g, v in genes.items()]
    paths["per_gene.csv"] = write_csv(out / "per_gene.csv", pd.DataFrame(
        pg, columns=["setting", "fold", "gene", "pearson", "pearson_within"]))
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
