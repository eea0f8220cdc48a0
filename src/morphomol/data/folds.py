"""A cohort's fold artifacts: ``splits/folds.parquet`` and a study's ``panels/fold{k}.json``.

The fold table (written once per cohort by :func:`morphomol.splits.write_folds`) has one row per (fold,
sample): ``fold, sample_id, patient_id, n_units, partition`` (fit | val | test) and ``validation`` (the fold's
validation policy: patient | sample | none; inferred from the partitions for tables written before the
column existed). Every unit of a sample is in the sample's partition. What the policy promises is asserted
when the table is written and again when a fold is read for training (:func:`fold_rows`); a fold with policy
``none`` has no val rows (its trainers run fixed epochs without early stopping).

Unit-level splits (``tile_id, sample_id, patient_id, index, partition``: what the training loaders take)
exist only inside the job that needs them: :func:`unit_split` expands one fold over the unit ids of the
samples the job reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json

FOLDS_COLUMNS = ("fold", "sample_id", "patient_id", "n_units", "partition")  # required (+ optional "validation")
SPLIT_COLUMNS = ("tile_id", "sample_id", "patient_id", "index", "partition")
PARTITIONS = ("fit", "val", "test")


def read_folds(path: str | Path) -> pd.DataFrame:
    """The fold table of a cohort; InputError for a missing file or column, an unknown partition."""
    p = Path(path)
    if not p.exists():
        raise InputError("fold table missing", file=p, expected="output of the splits rule (splits/folds.parquet)")
    df = check_partition_table(pd.read_parquet(p), FOLDS_COLUMNS, file=p)
    df["sample_id"] = df["sample_id"].astype(str)
    df["patient_id"] = df["patient_id"].astype(str)
    df["partition"] = df["partition"].astype(str)
    df["fold"] = df["fold"].astype(np.int64)
    if "validation" not in df.columns:  # a table written before the policy was recorded
        from morphomol.splits import infer_validation

        policy = {int(k): infer_validation(g) for k, g in df.groupby("fold")}
        df["validation"] = df["fold"].map(policy).astype(str)
    else:
        df["validation"] = df["validation"].astype(str)
        bad_v = sorted(set(df["validation"]) - {"patient", "sample", "none"})
        if bad_v:
            raise InputError(f"unknown validation policy {bad_v}", file=p, field="validation",
                             expected="patient | sample | none")
    return df


def n_folds(folds: pd.DataFrame) -> int:
    return int(folds["fold"].max()) + 1 if len(folds) else 0


def fold_rows(folds: pd.DataFrame | str | Path, fold: int, *, check: bool = True) -> pd.DataFrame:
    """Rows (one per sample) of fold ``fold``: ``sample_id, patient_id, n_units, partition``; patient
    grouping asserted (``check``)."""
    from morphomol.splits import check_fold

    f = read_folds(folds) if not isinstance(folds, pd.DataFrame) else folds
    rows = f[f["fold"] == int(fold)].drop(columns="fold").reset_index(drop=True)
    if rows.empty:
        raise InputError(f"fold {fold} is not in the fold table ({n_folds(f)} folds)", field="splits.n_folds",
                         expected=f"a fold in 0..{n_folds(f) - 1}")
    if check:
        check_fold(rows, fold=int(fold))
    return rows


def fold_validation(folds: pd.DataFrame | str | Path, fold: int) -> str:
    """The validation policy of fold ``fold``: patient | sample | none (``none``: no val partition)."""
    return str(fold_rows(folds, fold)["validation"].iloc[0])


def sample_partitions(folds: pd.DataFrame | str | Path, fold: int) -> dict[str, str]:
    """sample_id -> partition (fit | val | test) in fold ``fold``."""
    r = fold_rows(folds, fold)
    return dict(zip(r["sample_id"], r["partition"], strict=True))


def held_out_fold(folds: pd.DataFrame | str | Path) -> dict[str, int]:
    """sample_id -> the fold in which it is test (not named test_*: pytest would collect it where imported)."""
    f = read_folds(folds) if not isinstance(folds, pd.DataFrame) else folds
    t = f[f["partition"] == "test"]
    return dict(zip(t["sample_id"], t["fold"].astype(int), strict=True))


def partitions_by_fold(folds: pd.DataFrame | str | Path, samples: Iterable[str] | None = None
                       ) -> dict[str, dict[int, str]]:
    """sample_id -> {fold: partition} (restricted to ``samples`` when given)."""
    f = read_folds(folds) if not isinstance(folds, pd.DataFrame) else folds
    keep = None if samples is None else {str(s) for s in samples}
    out: dict[str, dict[int, str]] = {}
    for s, k, p in zip(f["sample_id"], f["fold"], f["partition"], strict=True):
        if keep is None or s in keep:
            out.setdefault(s, {})[int(k)] = p
    return out


def unit_split(folds: pd.DataFrame | str | Path, fold: int, units: Mapping[str, tuple[np.ndarray, np.ndarray]],
               *, file: object = None) -> pd.DataFrame:
    """The unit-level split of fold ``fold`` over ``units`` (sample -> (unit ids, store rows)), samples in the
    mapping's order: ``tile_id, sample_id, patient_id, index, partition``. Every sample of ``units`` must be
    in the fold table."""
    rows = fold_rows(folds, fold).set_index("sample_id")
    missing = [s for s in units if s not in rows.index]
    if missing:
        raise InputError(f"{len(missing)} sample(s) not in the fold table: {', '.join(missing[:5])}", file=file,
                         field="sample_id", expected="splits computed over the cohort's current samples")
    parts = []
    for s, (ids, index) in units.items():
        r = rows.loc[s]
        parts.append(pd.DataFrame({"tile_id": np.asarray(ids).astype(str), "sample_id": s,
                                   "patient_id": str(r["patient_id"]), "index": np.asarray(index, np.int64),
                                   "partition": str(r["partition"])}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SPLIT_COLUMNS))
    for c in ("sample_id", "patient_id", "partition"):
        out[c] = out[c].astype(str)
    out.attrs["validation"] = str(rows["validation"].iloc[0])  # the fold's policy (check_fold reads it)
    return out


def read_split(folds: str | Path, fold: int, unit_tables: Mapping[str, str | Path]) -> pd.DataFrame:
    """Unit-level split of fold ``fold`` over the samples' unit tables (ids read from each ``units.h5ad``)."""
    from morphomol.data.units import unit_ids

    return unit_split(folds, fold, {s: unit_ids(p) for s, p in unit_tables.items()}, file=folds)


def check_split_table(df: pd.DataFrame, *, file: object = None) -> pd.DataFrame:
    """Validate a unit-level split table (columns, partitions)."""
    return check_partition_table(df, SPLIT_COLUMNS, file=file)


def check_partition_table(df: pd.DataFrame, columns: Sequence[str], *, file: object = None) -> pd.DataFrame:
    """InputError unless ``df`` has ``columns`` and every ``partition`` is fit | val | test (fold tables of
    every study, unit-level splits)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", file=file, field=missing[0], expected=", ".join(columns))
    bad = sorted(set(df["partition"].astype(str)) - set(PARTITIONS))
    if bad:
        raise InputError(f"unknown partition(s) {bad}", file=file, field="partition", expected="fit | val | test")
    return df


def read_fold_panel(path: str | Path) -> dict[str, Any]:
    """``{"mode", "core": [...], "addon": [...]}`` of one fold."""
    panel = read_json(path, "panel file")
    if not isinstance(panel, dict) or not isinstance(panel.get("core"), list) or not isinstance(panel.get("addon"), list):
        raise InputError("panel file needs 'core' and 'addon' lists", file=path, field="core/addon")
    return panel
