"""Tables of the fusion study: Table A.1 (add-on gene prediction), Table A.2 (CLIP retrieval),
per-gene metrics with the Min-MAE comparison, paired t-tests, run metadata, cross-cohort summary.

* :func:`build_table_a1` / :func:`build_table_a2` aggregate folds to mean ± std (sample std,
  ``ddof=1``), keep every configured setting (a setting that could not run is listed with the
  reason) and mark the best value per metric column.
* :func:`per_gene_table`, :func:`gene_wins`, :func:`resolve_baseline`, :func:`cross_cohort_summary`.
* :func:`make_tables` is the single entry point of the ``tables`` rule, :func:`make_cross_cohort`
  the one of ``cross_cohort``.

Settings are :class:`~morphomol.studies.fusion.settings.ModelSetting` objects; ``weights`` maps an
encoder to its configured weights path (or None). Runs are read through
:mod:`morphomol.report.runs`, files written through :mod:`morphomol.report.render`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.eval.metrics import HIGHER_IS_BETTER, METRIC_LABELS
from morphomol.eval.stats import paired_ttests
from morphomol.report.render import (
    Column,
    fmt_field,
    fmt_mean_std,
    mark_best,
    norm_none,
    render_markdown,
    write_csv,
    write_table,
    write_text,
)
from morphomol.report.runs import GENE_METRICS, RunResults, aggregate_folds, load_runs, run_status
from morphomol.studies.fusion.settings import ModelSetting, as_setting
from morphomol.util.logs import get_logger

log = get_logger("tables")

#: Regression metrics shown in Table A.1 (in that order).
METRICS: tuple[str, ...] = ("spearman", "pearson", "mse")
#: CLIP retrieval metrics shown in Table A.2.
CLIP_METRICS: tuple[str, ...] = ("recall@1", "recall@5")
DEFAULT_MIN_MAE = "min_mae"
DEFAULT_BASELINE = "best_morph_only"
RIDGE_PREFIX = "ridge_"
A1_FIELDS = ("fusion_stage", "fusion_strategy", "morph_encoder", "morph_init", "freeze_morph", "expr_encoder",
             "freeze_expr", "expr_aggregation")

A1_COLUMNS = [
    Column("setting", "Setting"), Column("paper_row", "Paper row"), Column("family", "Type"),
    Column("fusion_stage", "Stage"), Column("fusion_strategy", "Strategy"), Column("morph_encoder", "Morph encoder"),
    Column("morph_init", "Init"), Column("freeze_morph", "Morph frozen"), Column("expr_encoder", "Expr encoder"),
    Column("freeze_expr", "Expr frozen"), Column("expr_aggregation", "Aggregation"),
    Column("spearman", "Spearman ↑", "spearman", "r"), Column("pearson", "Pearson ↑", "pearson", "r"),
    Column("mse", "MSE ↓", "mse", "r"), Column("n_folds_ok", "Folds", align="r"), Column("status", "Status"),
]
A2_COLUMNS = [
    Column("setting", "Setting"), Column("expr_encoder", "Expr encoder"), Column("morph_encoder", "Morph encoder"),
    Column("morph_init", "Init"), Column("expr_aggregation", "Aggregation"),
    Column("recall@1", "Recall@1 ↑", "recall@1", "r"), Column("recall@5", "Recall@5 ↑", "recall@5", "r"),
    Column("n_folds_ok", "Folds", align="r"), Column("status", "Status"),
]
A1_NOTE = "Mean ± sample std (ddof=1) across folds; best value per column in bold."


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def _settings(settings: Mapping[str, ModelSetting | Mapping[str, Any]]) -> dict[str, ModelSetting]:
    return {str(n): as_setting(s, str(n)) for n, s in settings.items()}


def min_mae_setting(settings: Mapping[str, ModelSetting]) -> str:
    """Name of the setting of kind ``min_mae`` (``min_mae`` when none is configured)."""
    return next((n for n, s in settings.items() if s.kind == "min_mae"), DEFAULT_MIN_MAE)


def setting_reasons(settings: Mapping[str, ModelSetting], weights: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """Per setting: None when runnable, else why not (:meth:`ModelSetting.not_runnable_reason`)."""
    return {name: s.not_runnable_reason(weights or {}) for name, s in settings.items()}


def ridge_fields(name: str) -> dict[str, Any]:
    """Table fields of a ridge baseline row ``ridge_{encoder}`` (frozen features, no expression encoder)."""
    return {"kind": "ridge", "fusion_stage": None, "fusion_strategy": None, "morph_encoder": name[len(RIDGE_PREFIX):],
            "freeze_morph": True, "expr_encoder": None, "freeze_expr": None, "expr_aggregation": None}


def setting_fields(name: str, setting: ModelSetting | None) -> dict[str, Any]:
    """The setting's fields for the table (ridge rows and settings only found in the runs included)."""
    if setting is not None:
        return setting.to_dict()
    return ridge_fields(name) if name.startswith(RIDGE_PREFIX) else {}


def setting_family(name: str, setting: ModelSetting | None, min_mae: str = DEFAULT_MIN_MAE) -> str:
    """Human-readable group of a setting: early/late fusion, morph-only, expr-only, baselines, CLIP."""
    if name == min_mae or (setting is not None and setting.kind == "min_mae"):
        return "baseline (Min-MAE)"
    if name.startswith(RIDGE_PREFIX):
        return "baseline (ridge)"
    if setting is None:
        return "other"
    if setting.kind == "clip":
        return "CLIP"
    if setting.fusion_stage in ("early", "late"):
        return f"{setting.fusion_stage} fusion"
    if setting.is_morph_only:
        return "morph-only"
    if setting.kind == "regression" and setting.expr_encoder is not None and setting.morph_encoder is None:
        return "expr-only"
    return "other"


def _random_init_possible(encoder: str) -> bool:
    """True when the encoder runs without weights (the registry's ``requires_weights`` is false)."""
    from morphomol.encoders.registry import get_spec

    try:
        return not get_spec(encoder).requires_weights
    except (KeyError, InputError):  # not a registered encoder: ViTs may start at random, others not
        return str(encoder).lower().startswith("vit")


def morph_init(fields: Mapping[str, Any], weights: Mapping[str, str | None] | None,
               runs: pd.DataFrame | None = None) -> str:
    """'pretrained' / 'random-init' for the morphology encoder ('-' when there is none).

    The runs' ``pretrained`` field (metrics.json) wins when all runs agree ('mixed' otherwise);
    then explicit ``morph_init`` / ``pretrained`` fields; otherwise an encoder that can run without
    weights (``vit_s``) is pretrained exactly when its weights are configured, and every other
    encoder (foundation models) is pretrained by definition.
    """
    morph = norm_none(fields.get("morph_encoder"))
    if not morph:
        return "-"
    if runs is not None and "pretrained" in runs and len(runs):
        seen = {bool(v) for v in runs["pretrained"] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(seen) == 1:
            return "pretrained" if seen.pop() else "random-init"
        if len(seen) > 1:
            return "mixed (see run_metadata)"
    explicit = fields.get("morph_init")
    if explicit:
        return str(explicit)
    if fields.get("pretrained") is not None:
        return "pretrained" if fields["pretrained"] else "random-init"
    if _random_init_possible(str(morph)):
        return "pretrained" if (weights or {}).get(str(morph)) else "random-init"
    return "pretrained"


def _ordered_settings(settings: Mapping[str, ModelSetting], results: RunResults, want_clip: bool) -> list[str]:
    """Configured settings of the table (config order), then settings found only in the runs (sorted)."""
    names = [n for n, s in settings.items() if (s.kind == "clip") == want_clip]
    kinds = results.folds.groupby("setting")["kind"].first().to_dict() if len(results.folds) else {}
    extra = sorted(n for n in results.settings if n not in settings and (kinds.get(n) == "clip") == want_clip)
    return names + extra


def _metric_cells(row: dict[str, Any], agg: Mapping[str, float], metrics: Sequence[str]) -> None:
    for metric in metrics:
        for x in ("mean", "std", "n"):
            row[f"{metric}_{x}"] = agg[f"{metric}_{x}"]
        row[metric] = fmt_mean_std(agg[f"{metric}_mean"], agg[f"{metric}_std"], agg[f"{metric}_n"])


# --------------------------------------------------------------------------------------------
# Table A.1
# --------------------------------------------------------------------------------------------


def build_table_a1(
    settings: Mapping[str, ModelSetting],
    results: RunResults,
    *,
    reasons: Mapping[str, str | None] | None = None,
    weights: Mapping[str, str | None] | None = None,
    n_folds: int | None = None,
    per_gene: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Table A.1: one row per regression setting (configured, ridge baselines and others found in the runs).

    Columns: ``setting, paper_row, family`` + :data:`A1_FIELDS` + for each metric
    ``{m}, {m}_mean, {m}_std, {m}_n, {m}_best`` + ``n_folds_ok, status``
    (+ ``genes_beating_min_mae`` when ``per_gene`` is given).
    """
    settings = _settings(settings)
    reasons = dict(reasons) if reasons is not None else setting_reasons(settings, weights)
    min_mae = min_mae_setting(settings)
    folds = results.folds[results.folds["kind"] == "regression"] if len(results.folds) else results.folds
    if n_folds is None:
        n_folds = int(results.folds["fold"].max()) + 1 if len(results.folds) else 0
    expected = list(range(int(n_folds)))
    rows = []
    for name in _ordered_settings(settings, results, False):
        s = settings.get(name)
        fields = setting_fields(name, s)
        runs = folds[folds["setting"] == name]
        present = dict(zip(runs["fold"].astype(int), runs["status"]))
        ok = runs[runs["status"] == "ok"]
        row: dict[str, Any] = {"setting": name, "paper_row": fmt_field(fields.get("paper_row")),
                               "family": setting_family(name, s, min_mae)}
        for field in A1_FIELDS:
            row[field] = morph_init(fields, weights, ok) if field == "morph_init" else fmt_field(fields.get(field))
        _metric_cells(row, aggregate_folds(ok, METRICS), METRICS)
        row["n_folds_ok"] = int(len(ok))
        row["status"] = run_status(present, expected, reasons.get(name))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["setting", "paper_row", "family", *A1_FIELDS,
                                   *[f"{m}_{x}" for m in METRICS for x in ("mean", "std", "n")], *METRICS,
                                   "n_folds_ok", "status"])
    mark_best(df, METRICS)
    if per_gene is not None and len(df):
        wins = gene_wins(per_gene)
        df["genes_beating_min_mae"] = [
            f"{wins[n][0]}/{wins[n][1]}" if n in wins and n != min_mae else "" for n in df["setting"]
        ]
    ordered = ["setting", "paper_row", "family", *A1_FIELDS]
    for metric in METRICS:
        ordered += [metric, f"{metric}_mean", f"{metric}_std", f"{metric}_n", f"{metric}_best"]
    ordered += ["n_folds_ok", "status"] + (["genes_beating_min_mae"] if "genes_beating_min_mae" in df else [])
    return df[ordered].reset_index(drop=True)


def a1_columns(df: pd.DataFrame) -> list[Column]:
    """Rendered columns of Table A.1 (with 'Genes beating Min-MAE' when any row has a value)."""
    cols = list(A1_COLUMNS)
    if "genes_beating_min_mae" in df and df["genes_beating_min_mae"].astype(str).str.len().gt(0).any():
        cols.insert(-2, Column("genes_beating_min_mae", "Genes beating Min-MAE", align="r"))
    return cols


# --------------------------------------------------------------------------------------------
# Table A.2 (CLIP retrieval)
# --------------------------------------------------------------------------------------------


def build_table_a2(
    settings: Mapping[str, ModelSetting],
    results: RunResults,
    *,
    reasons: Mapping[str, str | None] | None = None,
    weights: Mapping[str, str | None] | None = None,
    n_folds: int | None = None,
) -> pd.DataFrame:
    """Table A.2: recall@1/@5 (mean ± std across folds) per CLIP setting (kind ``clip``) plus a
    ``random`` row holding the random-retrieval baseline (1/batch, 5/batch) reported by the runs."""
    settings = _settings(settings)
    reasons = dict(reasons) if reasons is not None else setting_reasons(settings, weights)
    folds = results.folds
    if n_folds is None:
        n_folds = int(folds["fold"].max()) + 1 if len(folds) else 0
    expected = list(range(int(n_folds)))
    rows = []
    all_ok = []
    for name in _ordered_settings(settings, results, True):
        fields = setting_fields(name, settings.get(name))
        runs = folds[(folds["setting"] == name)]
        present = dict(zip(runs["fold"].astype(int), runs["status"]))
        ok = runs[runs["status"] == "ok"]
        all_ok.append(ok)
        row: dict[str, Any] = {"setting": name, "family": "CLIP",
                               "expr_encoder": fmt_field(fields.get("expr_encoder")),
                               "morph_encoder": fmt_field(fields.get("morph_encoder")),
                               "morph_init": morph_init(fields, weights, ok),
                               "expr_aggregation": fmt_field(fields.get("expr_aggregation"))}
        _metric_cells(row, aggregate_folds(ok, [*CLIP_METRICS, "random_recall@1", "random_recall@5"]), CLIP_METRICS)
        row["n_folds_ok"] = int(len(ok))
        row["status"] = run_status(present, expected, reasons.get(name))
        rows.append(row)
    if rows:
        pooled = pd.concat(all_ok) if all_ok else pd.DataFrame(columns=["random_recall@1", "random_recall@5"])
        rnd: dict[str, Any] = {"setting": "random", "family": "baseline (random)", "expr_encoder": "-",
                               "morph_encoder": "-", "morph_init": "-", "expr_aggregation": "-"}
        pooled = pooled.rename(columns={"random_recall@1": "recall@1", "random_recall@5": "recall@5"})
        pooled = pooled.loc[:, ~pooled.columns.duplicated(keep="last")]
        agg = aggregate_folds(pooled, CLIP_METRICS)
        _metric_cells(rnd, agg, CLIP_METRICS)
        rnd["n_folds_ok"] = int(agg["recall@1_n"])
        rnd["status"] = "random retrieval at the CLIP batch size" if agg["recall@1_n"] else "no CLIP runs"
        rows.append(rnd)
    cols = ["setting", "family", "expr_encoder", "morph_encoder", "morph_init", "expr_aggregation"]
    for metric in CLIP_METRICS:
        cols += [metric, f"{metric}_mean", f"{metric}_std", f"{metric}_n", f"{metric}_best"]
    cols += ["n_folds_ok", "status"]
    df = pd.DataFrame(rows, columns=[c for c in cols if not c.endswith("_best")])
    mark_best(df, CLIP_METRICS, eligible=df["setting"] != "random" if len(df) else None)
    return df[cols].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# per gene
# --------------------------------------------------------------------------------------------


def per_gene_table(genes: pd.DataFrame, *, min_mae_setting: str = DEFAULT_MIN_MAE) -> pd.DataFrame:
    """Per (setting, gene): mean/std (ddof=1)/n across folds of each metric, and the comparison
    with Min-MAE on the same folds: ``delta_{spearman,pearson}_vs_min_mae`` (mean over paired folds
    of setting − Min-MAE), ``fold_wins_{spearman,pearson}`` (folds where the setting is higher),
    ``n_paired_folds`` and ``beats_min_mae_{spearman,pearson}`` (mean delta > 0)."""
    cols = ["setting", "gene"]
    for m in GENE_METRICS:
        cols += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    cmp_cols = ["n_paired_folds", "delta_spearman_vs_min_mae", "fold_wins_spearman", "beats_min_mae_spearman",
                "delta_pearson_vs_min_mae", "fold_wins_pearson", "beats_min_mae_pearson"]
    if genes.empty:
        return pd.DataFrame(columns=cols + cmp_cols)
    g = genes.groupby(["setting", "gene"], sort=False)
    parts = []
    for m in GENE_METRICS:
        a = g[m].agg(["mean", "std", "count"])  # pandas std is ddof=1
        a.columns = [f"{m}_mean", f"{m}_std", f"{m}_n"]
        parts.append(a)
    out = pd.concat(parts, axis=1).reset_index()
    base = genes[genes["setting"] == min_mae_setting][["fold", "gene", "spearman", "pearson"]]
    if base.empty:
        for c in cmp_cols:
            out[c] = np.nan
        return out[cols + cmp_cols]
    paired = genes.merge(base, on=["fold", "gene"], suffixes=("", "_base"))
    paired = paired[paired["setting"] != min_mae_setting]
    for m in ("spearman", "pearson"):
        paired[f"d_{m}"] = paired[m] - paired[f"{m}_base"]
        paired[f"w_{m}"] = (paired[f"d_{m}"] > 0).astype(int)
    pg = paired.groupby(["setting", "gene"], sort=False)
    cmp = pd.DataFrame({
        "n_paired_folds": pg["fold"].count(),
        "delta_spearman_vs_min_mae": pg["d_spearman"].mean(),
        "fold_wins_spearman": pg["w_spearman"].sum(),
        "delta_pearson_vs_min_mae": pg["d_pearson"].mean(),
        "fold_wins_pearson": pg["w_pearson"].sum(),
    }).reset_index()
    cmp["beats_min_mae_spearman"] = cmp["delta_spearman_vs_min_mae"] > 0
    cmp["beats_min_mae_pearson"] = cmp["delta_pearson_vs_min_mae"] > 0
    out = out.merge(cmp, on=["setting", "gene"], how="left")
    return out[cols + cmp_cols]


def gene_wins(per_gene: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """setting -> (genes whose mean Spearman beats Min-MAE, genes compared)."""
    if per_gene.empty or "beats_min_mae_spearman" not in per_gene:
        return {}
    d = per_gene.dropna(subset=["delta_spearman_vs_min_mae"])
    return {s: (int(grp["beats_min_mae_spearman"].astype(bool).sum()), int(len(grp)))
            for s, grp in d.groupby("setting", sort=False)}


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def resolve_baseline(baseline: str | None, table_a1: pd.DataFrame) -> str | None:
    """Setting to test against: a setting name, or ``best_morph_only`` (the morph-only setting
    with the best mean Spearman). None when ``best_morph_only`` has no results."""
    baseline = baseline or DEFAULT_BASELINE
    if baseline == DEFAULT_BASELINE:
        cand = table_a1[table_a1["family"] == "morph-only"].dropna(subset=["spearman_mean"])
        if cand.empty:
            return None
        return str(cand.sort_values("spearman_mean", ascending=False, kind="mergesort")["setting"].iloc[0])
    if baseline not in set(table_a1["setting"]):
        raise InputError(f"unknown baseline setting {baseline!r}", field="tables.baseline",
                         expected="best_morph_only or one of: " + ", ".join(table_a1["setting"]))
    return baseline


# --------------------------------------------------------------------------------------------
# cross-cohort
# --------------------------------------------------------------------------------------------


def cross_cohort_summary(tables: Mapping[str, pd.DataFrame], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """One row per setting, per cohort ``{cohort}:{metric}`` (formatted) + ``_mean``/``_std``
    columns, and the mean across cohorts of each metric's mean (``{metric}_mean_across``)."""
    names: list[str] = []
    family: dict[str, str] = {}
    for df in tables.values():
        for _, r in df.iterrows():
            if r["setting"] not in family:
                names.append(r["setting"])
                family[r["setting"]] = r.get("family", "")
    out = pd.DataFrame({"setting": names, "family": [family[n] for n in names]})
    for cohort, df in tables.items():
        d = df.set_index("setting")
        for m in metrics:
            out[f"{cohort}:{m}_mean"] = out["setting"].map(d[f"{m}_mean"]).astype(float)
            out[f"{cohort}:{m}_std"] = out["setting"].map(d[f"{m}_std"]).astype(float)
            if f"{m}_n" in d:
                n = out["setting"].map(d[f"{m}_n"]).fillna(0).astype(int).tolist()
            else:
                n = [2] * len(out)
            out[f"{cohort}:{m}"] = [fmt_mean_std(a, b, k) for a, b, k in
                                    zip(out[f"{cohort}:{m}_mean"], out[f"{cohort}:{m}_std"], n)]
    for m in metrics:
        cols = [f"{c}:{m}_mean" for c in tables]
        out[f"{m}_mean_across"] = out[cols].mean(axis=1, skipna=False) if cols else np.nan
    return out


def make_cross_cohort(table_csvs: Mapping[str, str | Path], out_csv: str | Path, out_md: str | Path) -> pd.DataFrame:
    """``results/tables/cross_cohort.{csv,md}`` from each cohort's ``table_a1.csv`` (cohort -> path)."""
    tables = {}
    for cohort, path in table_csvs.items():
        p = Path(path)
        if not p.exists():
            raise InputError("table not found", file=p, expected="results/{cohort}/tables/table_a1.csv")
        tables[cohort] = pd.read_csv(p, keep_default_na=True)
    df = cross_cohort_summary(tables)
    write_csv(out_csv, df)
    show = df.copy()
    cols = [Column("setting", "Setting"), Column("family", "Type")]
    for cohort in tables:
        for m in METRICS:
            key = f"{cohort}:{m}"
            col = show[f"{key}_mean"].astype(float)
            best = col.max() if HIGHER_IS_BETTER[m] else col.min()
            show[f"{key}_best"] = np.isclose(col, best, rtol=0, atol=1e-12) & col.notna()
            cols.append(Column(key, f"{cohort} {METRIC_LABELS[m]}", key, "r"))
    write_text(out_md, render_markdown(show, cols, title="Cross-cohort summary (Table A.1 metrics)", notes=[A1_NOTE]))
    return df


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def make_tables(
    metrics: Iterable[str | Path],
    out_dir: str | Path,
    *,
    settings: Mapping[str, ModelSetting],
    weights: Mapping[str, str | None] | None = None,
    cfg: Any = None,
    n_folds: int | None = None,
    cohort: str | None = None,
    config: Any = None,
    metadata_json: str | Path | None = None,
    metadata_md: str | Path | None = None,
) -> dict[str, Path]:
    """Regenerate every table of one cohort from its runs' metrics.json files.

    ``metrics``: the ``metrics.json`` paths (or run directories) of every run to tabulate;
    ``settings``: the study's settings (config order = row order); ``weights``: encoder -> configured
    weights path or None; ``cfg``: the ``tables`` config section (``TablesConfig``: ``baseline``,
    ``alpha``; None = best_morph_only, 0.05); ``config``: what run_metadata records as the config.
    Writes ``table_a1.{csv,md,tex}``, ``table_a2.{csv,md,tex}``, ``per_gene.csv``, ``ttests.csv``
    into ``out_dir`` (and run metadata when paths are given); returns file name -> path.
    """
    from morphomol.report.metadata import run_metadata, write_metadata

    out_dir = Path(out_dir)
    settings = _settings(settings)
    weights = dict(weights or {})
    results = load_runs(metrics)
    log.info("loaded %d runs of %d settings", len(results.folds), len(results.settings))
    reasons = setting_reasons(settings, weights)
    for name, reason in reasons.items():
        if reason:
            log.warning("setting %s not run: %s", name, reason)
    per_gene = per_gene_table(results.genes, min_mae_setting=min_mae_setting(settings))
    a1 = build_table_a1(settings, results, reasons=reasons, weights=weights, n_folds=n_folds, per_gene=per_gene)
    a2 = build_table_a2(settings, results, reasons=reasons, weights=weights, n_folds=n_folds)
    baseline = resolve_baseline(getattr(cfg, "baseline", None), a1)
    if baseline is None:
        log.warning("no morph-only results: t-tests against best_morph_only are empty")
    alpha = getattr(cfg, "alpha", None)
    tt = paired_ttests(results.folds, baseline, metrics=METRICS, alpha=float(0.05 if alpha is None else alpha))
    written: dict[str, Path] = {}
    suffix = f" ({cohort})" if cohort else ""
    for p in write_table(a1, a1_columns(a1), out_dir / "table_a1", title=f"Table A.1: add-on gene prediction{suffix}",
                         label="tab:a1", notes=[A1_NOTE]):
        written[f"table_a1{p.suffix}"] = p
    for p in write_table(a2, A2_COLUMNS, out_dir / "table_a2", title=f"Table A.2: CLIP retrieval{suffix}",
                         label="tab:a2", notes=[A1_NOTE]):
        written[f"table_a2{p.suffix}"] = p
    written["per_gene.csv"] = write_csv(out_dir / "per_gene.csv", per_gene)
    written["ttests.csv"] = write_csv(out_dir / "ttests.csv", tt)
    if metadata_json or metadata_md:
        described = {n: {**s.to_dict(), "requires_weights": list(s.required_weights())} for n, s in settings.items()}
        meta = run_metadata(cohort=cohort, config=config, settings=described, reasons=reasons, results=results,
                            weights=weights)
        written.update(write_metadata(meta, metadata_json, metadata_md))
    best = a1.dropna(subset=["spearman_mean"])
    if len(best):
        top = best.sort_values("spearman_mean", ascending=False).iloc[0]
        log.info("best setting %s: Spearman %s", top["setting"], top["spearman"])
    return written
