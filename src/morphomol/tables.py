"""Benchmark tables (Table A.1 / A.2), per-gene metrics, paired t-tests and run metadata.

Everything here works on plain files and DataFrames so it can be tested without Snakemake:

* :func:`load_runs` reads ``runs/{setting}/fold{k}/metrics.json`` files into two long tables
  (one row per (setting, fold) and one per (setting, fold, gene)).
* :func:`build_table_a1` / :func:`build_table_a2` aggregate folds to mean ± std (sample std,
  ``ddof=1``), keep every configured setting (a setting that could not run is listed with the
  reason) and mark the best value per metric column.
* :func:`per_gene_table`, :func:`paired_ttests` (Holm-corrected), :func:`cross_cohort_summary`.
* :func:`render_markdown` / :func:`render_latex` render any table with escaping.
* :func:`make_tables` is the single entry point used by ``scripts/tables.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("tables")

#: Regression metrics shown in Table A.1 (in that order).
METRICS: tuple[str, ...] = ("spearman", "pearson", "mse")
#: Per-gene metrics kept in per_gene.csv.
GENE_METRICS: tuple[str, ...] = ("spearman", "pearson", "mse", "mae")
#: CLIP retrieval metrics shown in Table A.2.
CLIP_METRICS: tuple[str, ...] = ("recall@1", "recall@5")
HIGHER_IS_BETTER: dict[str, bool] = {
    "spearman": True,
    "pearson": True,
    "mse": False,
    "mae": False,
    "recall@1": True,
    "recall@5": True,
}
METRIC_LABELS: dict[str, str] = {
    "spearman": "Spearman",
    "pearson": "Pearson",
    "mse": "MSE",
    "mae": "MAE",
    "recall@1": "Recall@1",
    "recall@5": "Recall@5",
}
DEFAULT_MIN_MAE = "min_mae"
DEFAULT_BASELINE = "best_morph_only"
PACKAGES: tuple[str, ...] = (
    "morphomol", "snakemake", "snakemake-executor-plugin-slurm", "torch", "torchvision", "timm",
    "numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "zarr", "anndata", "scanpy",
    "openslide-python", "openslide-bin", "tifffile", "matplotlib", "safetensors", "transformers",
    "open_clip_torch",
)
_NONE_VALUES = {"", "-", "none", "null", "nan"}
_RUN_DIR_RE = re.compile(r"^fold(\d+)$")


# --------------------------------------------------------------------------------------------
# loading runs
# --------------------------------------------------------------------------------------------


@dataclass
class RunResults:
    """All runs of one cohort, in long form.

    ``folds``: one row per (setting, fold): ``setting, fold, kind, status, path`` plus the
    fold-level metrics (``spearman, pearson, mse, mae`` for regression runs, ``recall@1, recall@5,
    random_recall@1, random_recall@5`` for CLIP runs) and bookkeeping (``epochs_run`` ...).
    ``genes``: one row per (setting, fold, gene) of regression runs with :data:`GENE_METRICS`.
    """

    folds: pd.DataFrame
    genes: pd.DataFrame

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(self.folds["setting"].tolist()))


_FOLD_COLUMNS = ["setting", "fold", "kind", "status", "path", *GENE_METRICS, "recall@1", "recall@5",
                 "random_recall@1", "random_recall@5", "n_test", "epochs_run", "best_epoch",
                 "train_seconds", "tiles_per_second", "pretrained"]
_GENE_COLUMNS = ["setting", "fold", "gene", *GENE_METRICS]


def _metrics_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "metrics.json" if p.is_dir() or p.suffix != ".json" else p


def _as_float(value: Any, file: Path, field: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"not a number: {value!r}", file=file, field=field, expected="a number or null") from None


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read and check one ``metrics.json`` (ARCHITECTURE.md contract)."""
    file = _metrics_file(path)
    if not file.exists():
        raise InputError("metrics file not found", file=file, expected="runs/{setting}/fold{k}/metrics.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON ({exc.msg} at line {exc.lineno})", file=file) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", file=file)
    for field in ("setting", "fold"):
        if field not in data:
            raise InputError("missing field", file=file, field=field)
    kind = data.get("kind", "regression")
    if kind not in ("regression", "clip"):
        raise InputError(f"unknown kind {kind!r}", file=file, field="kind", expected="regression or clip")
    # the directory layout runs/{setting}/fold{k} must agree with the file's content
    m = _RUN_DIR_RE.match(file.parent.name)
    if m and file.parent.parent.parent.name == "runs":
        if str(data["setting"]) != file.parent.parent.name:
            raise InputError(f"setting {data['setting']!r} does not match the run directory",
                             file=file, field="setting", expected=repr(file.parent.parent.name))
        if int(data["fold"]) != int(m.group(1)):
            raise InputError(f"fold {data['fold']!r} does not match the run directory",
                             file=file, field="fold", expected=m.group(1))
    status = str(data.get("status", "ok"))
    if status == "ok":
        if kind == "regression":
            mean = data.get("mean")
            if not isinstance(mean, dict):
                raise InputError("missing or not an object", file=file, field="mean",
                                 expected='{"pearson":..., "spearman":..., "mse":..., "mae":...}')
            for metric in METRICS:
                if metric not in mean:
                    raise InputError("missing metric", file=file, field=f"mean.{metric}")
            if not isinstance(data.get("per_gene", {}), dict):
                raise InputError("not an object", file=file, field="per_gene", expected="{gene: {metric: value}}")
        else:
            for metric in CLIP_METRICS:
                if metric not in data:
                    raise InputError("missing metric", file=file, field=metric)
    data["_file"] = str(file)
    return data


def load_runs(paths: Iterable[str | Path]) -> RunResults:
    """Read metrics.json files (or run directories containing one) into a :class:`RunResults`."""
    fold_rows: list[dict[str, Any]] = []
    gene_rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], str] = {}
    for path in paths:
        data = read_metrics(path)
        file = Path(data["_file"])
        setting, fold = str(data["setting"]), int(data["fold"])
        if (setting, fold) in seen:
            raise InputError(f"duplicate run for setting {setting!r} fold {fold} (also in {seen[(setting, fold)]})",
                             file=file, field="fold")
        seen[(setting, fold)] = str(file)
        kind = data.get("kind", "regression")
        status = str(data.get("status", "ok"))
        row: dict[str, Any] = {"setting": setting, "fold": fold, "kind": kind, "status": status, "path": str(file.parent)}
        mean = data.get("mean") or {}
        for metric in GENE_METRICS:
            row[metric] = _as_float(mean.get(metric), file, f"mean.{metric}")
        for metric in ("recall@1", "recall@5", "random_recall@1", "random_recall@5"):
            row[metric] = _as_float(data.get(metric), file, metric)
        for key in ("n_test", "epochs_run", "best_epoch", "train_seconds", "tiles_per_second"):
            row[key] = _as_float(data.get(key), file, key)
        pre = data.get("pretrained")
        row["pretrained"] = bool(pre) if isinstance(pre, (bool, int)) else None
        fold_rows.append(row)
        if kind == "regression" and status == "ok":
            for gene, vals in (data.get("per_gene") or {}).items():
                if not isinstance(vals, dict):
                    raise InputError("not an object", file=file, field=f"per_gene.{gene}")
                gene_rows.append({"setting": setting, "fold": fold, "gene": str(gene),
                                  **{m: _as_float(vals.get(m), file, f"per_gene.{gene}.{m}") for m in GENE_METRICS}})
    folds = pd.DataFrame(fold_rows, columns=_FOLD_COLUMNS)
    folds["fold"] = folds["fold"].astype(int)
    genes = pd.DataFrame(gene_rows, columns=_GENE_COLUMNS)
    genes["fold"] = genes["fold"].astype(int)
    return RunResults(folds=folds, genes=genes)


def discover_runs(cohort_dir: str | Path) -> list[Path]:
    """All ``runs/*/fold*/metrics.json`` under a cohort result directory (sorted)."""
    return sorted(Path(cohort_dir).glob("runs/*/fold*/metrics.json"))


# --------------------------------------------------------------------------------------------
# settings helpers
# --------------------------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    """None for the many spellings of 'not applicable'."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip().lower() in _NONE_VALUES:
        return None
    return value


def setting_reasons(settings: Mapping[str, Mapping[str, Any]], encoders_cfg: Mapping[str, Any] | None) -> dict[str, str | None]:
    """Per setting: None when runnable, else why not (``morphomol.config.setting_status``)."""
    from morphomol.config import setting_status

    return {name: setting_status(s, encoders_cfg or {}) for name, s in settings.items()}


def is_clip(name: str, setting: Mapping[str, Any] | None, clip_settings: Sequence[str] = ()) -> bool:
    setting = setting or {}
    return name in clip_settings or setting.get("kind") == "clip" or _norm(setting.get("fusion_stage")) == "clip"


def setting_family(name: str, setting: Mapping[str, Any] | None, min_mae_setting: str = DEFAULT_MIN_MAE) -> str:
    """Human-readable group of a setting: early/late fusion, morph-only, expr-only, baselines, CLIP."""
    setting = setting or {}
    kind = setting.get("kind")
    if name == min_mae_setting or kind == "min_mae":
        return "baseline (Min-MAE)"
    if name.startswith("ridge_") or kind == "ridge":
        return "baseline (ridge)"
    if kind == "clip":
        return "CLIP"
    stage = _norm(setting.get("fusion_stage"))
    if stage in ("early", "late"):
        return f"{stage} fusion"
    morph, expr = _norm(setting.get("morph_encoder")), _norm(setting.get("expr_encoder"))
    if morph and not expr:
        return "morph-only"
    if expr and not morph:
        return "expr-only"
    return "other"


def _ridge_setting(name: str) -> dict[str, Any]:
    return {"kind": "ridge", "fusion_stage": None, "fusion_strategy": None, "morph_encoder": name[len("ridge_"):],
            "freeze_morph": True, "expr_encoder": None, "freeze_expr": None, "expr_aggregation": None}


def morph_init(setting: Mapping[str, Any], encoders_cfg: Mapping[str, Any] | None,
               runs: pd.DataFrame | None = None) -> str:
    """'pretrained' / 'random-init' for the morphology encoder ('-' when there is none).

    The runs' ``pretrained`` field (metrics.json) wins when all runs agree ('mixed' otherwise);
    then explicit ``morph_init`` / ``pretrained`` keys of the setting; otherwise a ViT-S (``vit_*``)
    is pretrained exactly when ``encoders.<name>.weights`` is configured, and every other encoder
    (foundation models) is pretrained by definition.
    """
    if not _norm(setting.get("morph_encoder")):
        return "-"
    if runs is not None and "pretrained" in runs and len(runs):
        seen = {bool(v) for v in runs["pretrained"] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(seen) == 1:
            return "pretrained" if seen.pop() else "random-init"
        if len(seen) > 1:
            return "mixed (see run_metadata)"
    explicit = setting.get("morph_init")
    if explicit:
        return str(explicit)
    if "pretrained" in setting and setting["pretrained"] is not None:
        return "pretrained" if setting["pretrained"] else "random-init"
    morph = _norm(setting.get("morph_encoder"))
    if not morph:
        return "-"
    if str(morph).lower().startswith("vit"):
        configured = bool(((encoders_cfg or {}).get(morph) or {}).get("weights"))
        return "pretrained" if configured else "random-init"
    return "pretrained"


def _fmt_field(value: Any) -> str:
    value = _norm(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def fmt_mean_std(mean: float, std: float, n: int | float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(std) or n < 2:
        return f"{mean:.{digits}f} (n={int(n)})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _run_status(present: Mapping[int, str], expected: Sequence[int], reason: str | None) -> str:
    if reason is not None and not present:
        return reason
    parts = []
    missing = [k for k in expected if k not in present]
    if missing and len(missing) == len(expected) and not present:
        parts.append("no runs found (expected " + ", ".join(f"fold{k}" for k in expected) + ")")
    elif missing:
        parts.append("missing runs: " + ", ".join(f"fold{k}" for k in missing))
    bad = {k: s for k, s in sorted(present.items()) if s != "ok"}
    if bad:
        parts.append("not ok: " + ", ".join(f"fold{k} ({s})" for k, s in bad.items()))
    if reason is not None:
        parts.append(reason)
    return "; ".join(parts) if parts else "ok"


def _mark_best(df: pd.DataFrame, metrics: Sequence[str], eligible: pd.Series | None = None) -> None:
    for metric in metrics:
        col = df[f"{metric}_mean"].astype(float)
        if eligible is not None:
            col = col.where(eligible)
        best = np.zeros(len(df), dtype=bool)
        if col.notna().any():
            target = col.max() if HIGHER_IS_BETTER[metric] else col.min()
            best = np.isclose(col.to_numpy(), target, rtol=0, atol=1e-12) & col.notna().to_numpy()
        df[f"{metric}_best"] = best


def _aggregate(values: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in metrics:
        v = values[metric].astype(float).dropna() if len(values) else pd.Series(dtype=float)
        out[f"{metric}_mean"] = float(v.mean()) if len(v) else math.nan
        out[f"{metric}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        out[f"{metric}_n"] = int(len(v))
    return out


def _ordered_settings(settings: Mapping[str, Any], results: RunResults, want_clip: bool,
                      clip_settings: Sequence[str]) -> list[str]:
    names = [n for n in settings if is_clip(n, settings[n], clip_settings) == want_clip]
    kinds = results.folds.groupby("setting")["kind"].first().to_dict() if len(results.folds) else {}
    extra = sorted(
        n for n in results.settings
        if n not in settings and ((kinds.get(n) == "clip") == want_clip or (want_clip and n in clip_settings))
    )
    return names + extra


# --------------------------------------------------------------------------------------------
# Table A.1
# --------------------------------------------------------------------------------------------

A1_FIELDS = ("fusion_stage", "fusion_strategy", "morph_encoder", "morph_init", "freeze_morph", "expr_encoder",
             "freeze_expr", "expr_aggregation")


def build_table_a1(
    settings: Mapping[str, Mapping[str, Any]],
    results: RunResults,
    *,
    reasons: Mapping[str, str | None] | None = None,
    encoders_cfg: Mapping[str, Any] | None = None,
    n_folds: int | None = None,
    clip_settings: Sequence[str] = (),
    min_mae_setting: str = DEFAULT_MIN_MAE,
    per_gene: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Table A.1: one row per regression setting (configured or found in the runs).

    Columns: ``setting, paper_row, family`` + :data:`A1_FIELDS` + for each metric
    ``{m}_mean, {m}_std, {m}_n, {m}`` (formatted) and ``{m}_best`` + ``n_folds_ok, status``
    (+ ``genes_beating_min_mae`` when ``per_gene`` is given).
    """
    reasons = dict(reasons) if reasons is not None else setting_reasons(settings, encoders_cfg)
    folds = results.folds[results.folds["kind"] == "regression"] if len(results.folds) else results.folds
    if n_folds is None:
        n_folds = int(results.folds["fold"].max()) + 1 if len(results.folds) else 0
    expected = list(range(int(n_folds)))
    rows = []
    for name in _ordered_settings(settings, results, False, clip_settings):
        s = dict(settings.get(name) or (_ridge_setting(name) if name.startswith("ridge_") else {}))
        runs = folds[folds["setting"] == name]
        present = dict(zip(runs["fold"].astype(int), runs["status"]))
        ok = runs[runs["status"] == "ok"]
        row: dict[str, Any] = {"setting": name, "paper_row": _fmt_field(s.get("paper_row")),
                               "family": setting_family(name, s, min_mae_setting)}
        for field in A1_FIELDS:
            row[field] = morph_init(s, encoders_cfg, ok) if field == "morph_init" else _fmt_field(s.get(field))
        agg = _aggregate(ok, METRICS)
        for metric in METRICS:
            row[f"{metric}_mean"] = agg[f"{metric}_mean"]
            row[f"{metric}_std"] = agg[f"{metric}_std"]
            row[f"{metric}_n"] = agg[f"{metric}_n"]
            row[metric] = fmt_mean_std(agg[f"{metric}_mean"], agg[f"{metric}_std"], agg[f"{metric}_n"])
        row["n_folds_ok"] = int(len(ok))
        row["status"] = _run_status(present, expected, reasons.get(name))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["setting", "paper_row", "family", *A1_FIELDS,
                                   *[f"{m}_{x}" for m in METRICS for x in ("mean", "std", "n")], *METRICS,
                                   "n_folds_ok", "status"])
    _mark_best(df, METRICS)
    if per_gene is not None and len(df):
        wins = gene_wins(per_gene)
        df["genes_beating_min_mae"] = [
            f"{wins[n][0]}/{wins[n][1]}" if n in wins and n != min_mae_setting else "" for n in df["setting"]
        ]
    ordered = ["setting", "paper_row", "family", *A1_FIELDS]
    for metric in METRICS:
        ordered += [metric, f"{metric}_mean", f"{metric}_std", f"{metric}_n", f"{metric}_best"]
    ordered += ["n_folds_ok", "status"] + (["genes_beating_min_mae"] if "genes_beating_min_mae" in df else [])
    return df[ordered].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Table A.2 (CLIP retrieval)
# --------------------------------------------------------------------------------------------


def build_table_a2(
    settings: Mapping[str, Mapping[str, Any]],
    results: RunResults,
    *,
    reasons: Mapping[str, str | None] | None = None,
    encoders_cfg: Mapping[str, Any] | None = None,
    n_folds: int | None = None,
    clip_settings: Sequence[str] = (),
) -> pd.DataFrame:
    """Table A.2: recall@1/@5 (mean ± std across folds) per CLIP setting plus a ``random`` row
    holding the random-retrieval baseline (1/batch, 5/batch) reported by the runs."""
    reasons = dict(reasons) if reasons is not None else setting_reasons(settings, encoders_cfg)
    folds = results.folds
    if n_folds is None:
        n_folds = int(folds["fold"].max()) + 1 if len(folds) else 0
    expected = list(range(int(n_folds)))
    rows = []
    all_ok = []
    for name in _ordered_settings(settings, results, True, clip_settings):
        s = dict(settings.get(name) or {})
        runs = folds[(folds["setting"] == name)]
        present = dict(zip(runs["fold"].astype(int), runs["status"]))
        ok = runs[runs["status"] == "ok"]
        all_ok.append(ok)
        row: dict[str, Any] = {"setting": name, "family": "CLIP",
                               "expr_encoder": _fmt_field(s.get("expr_encoder")),
                               "morph_encoder": _fmt_field(s.get("morph_encoder")),
                               "morph_init": morph_init(s, encoders_cfg, ok),
                               "expr_aggregation": _fmt_field(s.get("expr_aggregation"))}
        agg = _aggregate(ok, [*CLIP_METRICS, "random_recall@1", "random_recall@5"])
        for metric in CLIP_METRICS:
            for x in ("mean", "std", "n"):
                row[f"{metric}_{x}"] = agg[f"{metric}_{x}"]
            row[metric] = fmt_mean_std(agg[f"{metric}_mean"], agg[f"{metric}_std"], agg[f"{metric}_n"])
        row["n_folds_ok"] = int(len(ok))
        row["status"] = _run_status(present, expected, reasons.get(name))
        rows.append(row)
    if rows:
        pooled = pd.concat(all_ok) if all_ok else pd.DataFrame(columns=["random_recall@1", "random_recall@5"])
        rnd: dict[str, Any] = {"setting": "random", "family": "baseline (random)", "expr_encoder": "-",
                               "morph_encoder": "-", "morph_init": "-", "expr_aggregation": "-"}
        pooled = pooled.rename(columns={"random_recall@1": "recall@1", "random_recall@5": "recall@5"})
        pooled = pooled.loc[:, ~pooled.columns.duplicated(keep="last")]
        agg = _aggregate(pooled, CLIP_METRICS)
        for metric in CLIP_METRICS:
            for x in ("mean", "std", "n"):
                rnd[f"{metric}_{x}"] = agg[f"{metric}_{x}"]
            rnd[metric] = fmt_mean_std(agg[f"{metric}_mean"], agg[f"{metric}_std"], agg[f"{metric}_n"])
        rnd["n_folds_ok"] = int(agg["recall@1_n"])
        rnd["status"] = "random retrieval at the CLIP batch size" if agg["recall@1_n"] else "no CLIP runs"
        rows.append(rnd)
    cols = ["setting", "family", "expr_encoder", "morph_encoder", "morph_init", "expr_aggregation"]
    for metric in CLIP_METRICS:
        cols += [metric, f"{metric}_mean", f"{metric}_std", f"{metric}_n", f"{metric}_best"]
    cols += ["n_folds_ok", "status"]
    df = pd.DataFrame(rows, columns=[c for c in cols if not c.endswith("_best")])
    _mark_best(df, CLIP_METRICS, eligible=df["setting"] != "random" if len(df) else None)
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


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (NaNs stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="mergesort")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def is_morph_only(name: str, setting: Mapping[str, Any] | None) -> bool:
    return setting_family(name, setting) == "morph-only"


def resolve_baseline(baseline: str | None, table_a1: pd.DataFrame, settings: Mapping[str, Mapping[str, Any]]) -> str | None:
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


TTEST_COLUMNS = ["metric", "setting", "baseline", "n_folds", "folds", "mean_setting", "mean_baseline", "mean_diff",
                 "t_stat", "p_value", "p_holm", "significant", "better_than_baseline"]


def paired_ttests(folds: pd.DataFrame, baseline: str | None, *, metrics: Sequence[str] = METRICS,
                  alpha: float = 0.05) -> pd.DataFrame:
    """Paired t-test (``scipy.stats.ttest_rel``) across folds of each setting's per-fold mean
    metric against ``baseline``; folds present in both runs are paired. Holm correction per metric
    over all settings compared. ``mean_diff`` = setting − baseline."""
    from scipy import stats

    ok = folds[(folds["status"] == "ok") & (folds["kind"] == "regression")] if len(folds) else folds
    if baseline is None or ok.empty or baseline not in set(ok["setting"]):
        return pd.DataFrame(columns=TTEST_COLUMNS)
    rows = []
    for metric in metrics:
        wide = ok.pivot(index="fold", columns="setting", values=metric)
        family = []
        for name in dict.fromkeys(ok["setting"]):
            if name == baseline:
                continue
            pair = wide[[name, baseline]].dropna()
            a, b = pair[name].to_numpy(float), pair[baseline].to_numpy(float)
            t = p = math.nan
            if len(pair) >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = stats.ttest_rel(a, b)
                t, p = float(res.statistic), float(res.pvalue)
            diff = float(np.mean(a - b)) if len(pair) else math.nan
            family.append({"metric": metric, "setting": name, "baseline": baseline, "n_folds": int(len(pair)),
                           "folds": ",".join(str(int(k)) for k in pair.index),
                           "mean_setting": float(np.mean(a)) if len(a) else math.nan,
                           "mean_baseline": float(np.mean(b)) if len(b) else math.nan,
                           "mean_diff": diff, "t_stat": t, "p_value": p,
                           "better_than_baseline": bool(diff > 0) if HIGHER_IS_BETTER[metric] else bool(diff < 0)})
        adj = holm([r["p_value"] for r in family])
        for r, pa in zip(family, adj):
            r["p_holm"] = float(pa)
            r["significant"] = bool(np.isfinite(pa) and pa < alpha)
        rows += family
    return pd.DataFrame(rows, columns=TTEST_COLUMNS)


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


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

_MD_ESCAPE = re.compile(r"([\\`*_\[\]|<>#])")
_TEX_ESCAPE = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "↑": r"$\uparrow$",
    "↓": r"$\downarrow$", "<": r"\textless{}", ">": r"\textgreater{}",
}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX_ESCAPE))


def _cell(row: Mapping[str, Any] | pd.Series, key: str) -> str:
    value = row.get(key, "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def md_escape(text: Any) -> str:
    """Escape Markdown control characters (underscores, pipes, asterisks ...) of a cell."""
    s = str(text).replace("\n", " ")
    return _MD_ESCAPE.sub(r"\\\1", s)


def tex_escape(text: Any) -> str:
    """Escape LaTeX special characters of a cell (``_`` → ``\\_``, ``±`` → ``$\\pm$`` ...)."""
    return _TEX_RE.sub(lambda m: _TEX_ESCAPE[m.group(0)], str(text).replace("\n", " "))


@dataclass
class Column:
    key: str
    header: str
    metric: str | None = None  # metric columns are bolded when the row is best
    align: str = "l"


def render_markdown(df: pd.DataFrame, columns: Sequence[Column], *, title: str | None = None,
                    notes: Sequence[str] = ()) -> str:
    """GitHub Markdown table; best metric cells (``{metric}_best``) in bold."""
    lines = []
    if title:
        lines += [f"## {md_escape(title)}", ""]
    lines.append("| " + " | ".join(md_escape(c.header) for c in columns) + " |")
    lines.append("|" + "|".join(":---" if c.align == "l" else "---:" for c in columns) + "|")
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            text = md_escape(_cell(row, c.key))
            if c.metric and bool(row.get(f"{c.metric}_best", False)) and text:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [md_escape(n) for n in notes]
    return "\n".join(lines) + "\n"


def _tex_metric(text: str, bold: bool) -> str:
    m = re.fullmatch(r"(-?[0-9.]+) ± ([0-9.]+)", text)
    if m:
        inner = f"{m.group(1)} \\pm {m.group(2)}"
        return f"$\\mathbf{{{inner}}}$" if bold else f"${inner}$"
    esc = tex_escape(text)
    return f"\\textbf{{{esc}}}" if bold else esc


def render_latex(df: pd.DataFrame, columns: Sequence[Column], *, caption: str | None = None,
                 label: str | None = None, notes: Sequence[str] = ()) -> str:
    """A ``table`` + ``tabular`` (booktabs rules) with escaped cells; best metric cells bold."""
    spec = "".join(c.align for c in columns)
    lines = ["% requires \\usepackage{booktabs}", "\\begin{table}[htbp]", "\\centering", "\\small"]
    if caption:
        lines.append(f"\\caption{{{tex_escape(caption)}}}")
    if label:
        lines.append(f"\\label{{{label}}}")
    lines += [f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
              " & ".join(tex_escape(c.header) for c in columns) + " \\\\", "\\midrule"]
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            text = _cell(row, c.key)
            if c.metric:
                cells.append(_tex_metric(text, bool(row.get(f"{c.metric}_best", False))))
            else:
                cells.append(tex_escape(text))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    for n in notes:
        lines.append(f"\\par\\footnotesize {tex_escape(n)}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


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


def _a1_columns(df: pd.DataFrame) -> list[Column]:
    cols = list(A1_COLUMNS)
    if "genes_beating_min_mae" in df and df["genes_beating_min_mae"].astype(str).str.len().gt(0).any():
        cols.insert(-2, Column("genes_beating_min_mae", "Genes beating Min-MAE", align="r"))
    return cols


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _write_csv(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.8g")


def write_table(df: pd.DataFrame, columns: Sequence[Column], stem: str | Path, *, title: str,
                label: str, notes: Sequence[str] = ()) -> list[Path]:
    """Write ``{stem}.csv`` (all columns), ``{stem}.md`` and ``{stem}.tex``."""
    stem = Path(stem)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    _write_csv(paths[0], df)
    _write_text(paths[1], render_markdown(df, columns, title=title, notes=notes))
    _write_text(paths[2], render_latex(df, columns, caption=title, label=label, notes=notes))
    return paths


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights_checksum(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"path": str(path), "exists": False}
    if path.is_file():
        return {"path": str(path), "exists": True, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "exists": True, "bytes": int(sum(p.stat().st_size for p in files)),
            "files": {str(p.relative_to(path)): sha256_file(p) for p in files}}


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, pd.DataFrame):
        return obj.reset_index().to_dict(orient="records")
    return str(obj)


def run_metadata(*, cohort: str | None, config: Mapping[str, Any] | None, settings: Mapping[str, Any],
                 reasons: Mapping[str, str | None], results: RunResults,
                 encoders_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Config, package versions, weight checksums, settings' runnability and per-run bookkeeping."""
    weights = {}
    for name, cfg in (encoders_cfg or {}).items():
        w = (cfg or {}).get("weights")
        if w:
            weights[name] = _weights_checksum(Path(w))
    runs = results.folds.drop(columns=[c for c in ("path",) if c in results.folds]).to_dict(orient="records")
    return _jsonable({
        "cohort": cohort,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "weights": weights,
        "settings": {n: {"runnable": reasons.get(n) is None, "reason": reasons.get(n), **dict(s)}
                     for n, s in settings.items()},
        "runs": runs,
        "config": dict(config or {}),
    })


def render_metadata_md(meta: Mapping[str, Any]) -> str:
    lines = [f"# Run metadata{' — ' + md_escape(meta['cohort']) if meta.get('cohort') else ''}", "",
             f"Python {meta.get('python')} on {md_escape(meta.get('platform'))}", "", "## Packages", "",
             "| package | version |", "|:---|:---|"]
    for k, v in (meta.get("packages") or {}).items():
        lines.append(f"| {md_escape(k)} | {md_escape(v or 'not installed')} |")
    lines += ["", "## Weights", ""]
    if meta.get("weights"):
        lines += ["| encoder | path | sha256 |", "|:---|:---|:---|"]
        for k, v in meta["weights"].items():
            sha = v.get("sha256") or ("missing" if not v.get("exists") else f"{len(v.get('files', {}))} files")
            lines.append(f"| {md_escape(k)} | {md_escape(v['path'])} | {md_escape(sha)} |")
    else:
        lines.append("No pretrained weights configured.")
    lines += ["", "## Settings", "", "| setting | runnable | reason |", "|:---|:---|:---|"]
    for k, v in (meta.get("settings") or {}).items():
        lines.append(f"| {md_escape(k)} | {'yes' if v.get('runnable') else 'no'} | {md_escape(v.get('reason') or '')} |")
    lines += ["", "## Runs", "", "| setting | fold | status | epochs | best epoch | train s |", "|:---|---:|:---|---:|---:|---:|"]
    for r in meta.get("runs") or []:
        lines.append(f"| {md_escape(r['setting'])} | {r['fold']} | {md_escape(r['status'])} | {r.get('epochs_run')} | "
                     f"{r.get('best_epoch')} | {r.get('train_seconds')} |")
    lines += ["", "## Config", "", "```json", json.dumps(meta.get("config"), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def make_tables(
    run_paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    settings: Mapping[str, Mapping[str, Any]],
    encoders_cfg: Mapping[str, Any] | None = None,
    tables_cfg: Mapping[str, Any] | None = None,
    n_folds: int | None = None,
    clip_settings: Sequence[str] = (),
    min_mae_setting: str = DEFAULT_MIN_MAE,
    cohort: str | None = None,
    config: Mapping[str, Any] | None = None,
    metadata_json: str | Path | None = None,
    metadata_md: str | Path | None = None,
) -> dict[str, Path]:
    """Regenerate every table of one cohort from its runs' metrics.json files.

    Writes ``table_a1.{csv,md,tex}``, ``table_a2.{csv,md,tex}``, ``per_gene.csv``,
    ``ttests.csv`` into ``out_dir`` (and run metadata when paths are given); returns name -> path.
    """
    out_dir = Path(out_dir)
    tables_cfg = dict(tables_cfg or {})
    results = load_runs(run_paths)
    log.info("loaded %d runs of %d settings", len(results.folds), len(results.settings))
    reasons = setting_reasons(settings, encoders_cfg)
    for name, reason in reasons.items():
        if reason:
            log.warning("setting %s not run: %s", name, reason)
    per_gene = per_gene_table(results.genes, min_mae_setting=min_mae_setting)
    a1 = build_table_a1(settings, results, reasons=reasons, encoders_cfg=encoders_cfg, n_folds=n_folds,
                        clip_settings=clip_settings, min_mae_setting=min_mae_setting, per_gene=per_gene)
    a2 = build_table_a2(settings, results, reasons=reasons, encoders_cfg=encoders_cfg, n_folds=n_folds,
                        clip_settings=clip_settings)
    baseline = resolve_baseline(tables_cfg.get("baseline"), a1, settings)
    if baseline is None:
        log.warning("no morph-only results: t-tests against best_morph_only are empty")
    tt = paired_ttests(results.folds, baseline, alpha=float(tables_cfg.get("alpha", 0.05)))
    written: dict[str, Path] = {}
    suffix = f" ({cohort})" if cohort else ""
    for p in write_table(a1, _a1_columns(a1), out_dir / "table_a1", title=f"Table A.1: add-on gene prediction{suffix}",
                         label="tab:a1", notes=[A1_NOTE]):
        written[f"table_a1{p.suffix}"] = p
    for p in write_table(a2, A2_COLUMNS, out_dir / "table_a2", title=f"Table A.2: CLIP retrieval{suffix}",
                         label="tab:a2", notes=[A1_NOTE]):
        written[f"table_a2{p.suffix}"] = p
    _write_csv(out_dir / "per_gene.csv", per_gene)
    written["per_gene.csv"] = out_dir / "per_gene.csv"
    _write_csv(out_dir / "ttests.csv", tt)
    written["ttests.csv"] = out_dir / "ttests.csv"
    if metadata_json or metadata_md:
        meta = run_metadata(cohort=cohort, config=config, settings=settings, reasons=reasons, results=results,
                            encoders_cfg=encoders_cfg)
        if metadata_json:
            _write_text(metadata_json, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            written["run_metadata.json"] = Path(metadata_json)
        if metadata_md:
            _write_text(metadata_md, render_metadata_md(meta))
            written["run_metadata.md"] = Path(metadata_md)
    best = a1.dropna(subset=["spearman_mean"])
    if len(best):
        top = best.sort_values("spearman_mean", ascending=False).iloc[0]
        log.info("best setting %s: Spearman %s", top["setting"], top["spearman"])
    return written


def make_cross_cohort(table_csvs: Mapping[str, str | Path], out_csv: str | Path, out_md: str | Path) -> pd.DataFrame:
    """results/tables/cross_cohort.{csv,md} from each cohort's table_a1.csv."""
    tables = {}
    for cohort, path in table_csvs.items():
        p = Path(path)
        if not p.exists():
            raise InputError("table not found", file=p, expected="results/{cohort}/tables/table_a1.csv")
        tables[cohort] = pd.read_csv(p, keep_default_na=True)
    df = cross_cohort_summary(tables)
    _write_csv(out_csv, df)
    show = df.copy()
    cols = [Column("setting", "Setting"), Column("family", "Type")]
    for cohort in tables:
        for m in METRICS:
            key = f"{cohort}:{m}"
            col = show[f"{key}_mean"].astype(float)
            best = col.max() if HIGHER_IS_BETTER[m] else col.min()
            show[f"{key}_best"] = np.isclose(col, best, rtol=0, atol=1e-12) & col.notna()
            cols.append(Column(key, f"{cohort} {METRIC_LABELS[m]}", key, "r"))
    _write_text(out_md, render_markdown(show, cols, title="Cross-cohort summary (Table A.1 metrics)", notes=[A1_NOTE]))
    return df
