"""Runs in long form: every ``metrics.json`` of a cohort as one row per (setting, fold) and one row
per (setting, fold, gene), and the fold aggregation the tables share (mean ± sample std, status).

Files are read through :func:`morphomol.data.runs.read_metrics` (the one reader of the contract).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from morphomol.data.runs import discover_metrics, read_metrics
from morphomol.errors import InputError

#: per-gene metrics kept in the long gene table (and per_gene.csv)
GENE_METRICS: tuple[str, ...] = ("spearman", "pearson", "mse", "mae")
#: CLIP retrieval metrics of a run
CLIP_FIELDS: tuple[str, ...] = ("recall@1", "recall@5", "random_recall@1", "random_recall@5")
#: run bookkeeping copied into the fold table
BOOKKEEPING: tuple[str, ...] = ("n_test", "epochs_run", "best_epoch", "train_seconds", "tiles_per_second")
FOLD_COLUMNS = ["setting", "fold", "kind", "status", "path", *GENE_METRICS, *CLIP_FIELDS, *BOOKKEEPING, "pretrained"]
GENE_COLUMNS = ["setting", "fold", "gene", *GENE_METRICS]


@dataclass
class RunResults:
    """All runs of one cohort, in long form.

    ``folds``: one row per (setting, fold): ``setting, fold, kind, status, path`` plus the
    fold-level metrics (``spearman, pearson, mse, mae`` for regression runs, ``recall@1, recall@5,
    random_recall@1, random_recall@5`` for CLIP runs) and bookkeeping (``epochs_run`` ...).
    ``genes``: one row per (setting, fold, gene) of ok regression runs with :data:`GENE_METRICS`.
    """

    folds: pd.DataFrame
    genes: pd.DataFrame

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(self.folds["setting"].tolist()))


def _as_float(value: Any, file: Path, field: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"not a number: {value!r}", file=file, field=field, expected="a number or null") from None


def load_runs(paths: Iterable[str | Path]) -> RunResults:
    """Read metrics.json files (or run directories containing one) into a :class:`RunResults`;
    a (setting, fold) given twice is an error."""
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
        for metric in CLIP_FIELDS:
            row[metric] = _as_float(data.get(metric), file, metric)
        for key in BOOKKEEPING:
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
    folds = pd.DataFrame(fold_rows, columns=FOLD_COLUMNS)
    folds["fold"] = folds["fold"].astype(int)
    genes = pd.DataFrame(gene_rows, columns=GENE_COLUMNS)
    genes["fold"] = genes["fold"].astype(int)
    return RunResults(folds=folds, genes=genes)


def discover_runs(cohort_dir: str | Path) -> list[Path]:
    """All ``runs/*/fold*/metrics.json`` under a cohort result directory (sorted)."""
    return discover_metrics(cohort_dir)


# ------------------------------------------------------------------------------ aggregation


def aggregate_folds(values: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    """``{m}_mean``, ``{m}_std`` (sample std, ddof=1; NaN below 2 folds) and ``{m}_n`` over the
    rows of ``values`` (NaNs dropped per metric)."""
    out: dict[str, float] = {}
    for metric in metrics:
        v = values[metric].astype(float).dropna() if len(values) else pd.Series(dtype=float)
        out[f"{metric}_mean"] = float(v.mean()) if len(v) else math.nan
        out[f"{metric}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        out[f"{metric}_n"] = int(len(v))
    return out


def run_status(present: Mapping[int, str], expected: Sequence[int], reason: str | None) -> str:
    """Status cell of a setting: ``ok``, the reason it could not run, missing folds, folds not ok."""
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
