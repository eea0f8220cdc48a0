"""Patient-grouped outer folds and grouped inner validation splits of a cohort, at sample level.

One job per cohort (rule ``splits``) writes every fold at once into ``splits/folds.parquet``: one row per
(fold, sample) — ``fold, sample_id, patient_id, n_units, partition`` — so its size is folds x samples,
never the cohort's units. Every unit of a sample shares the sample's partition (a sample belongs to one
patient, and validation is grouped by patient or by sample); jobs that need unit rows expand a fold over
the unit ids of their own inputs (:func:`morphomol.data.folds.unit_split`).

Outer: patients in ``n_folds`` test folds, unit-weighted (the largest patient goes to the lightest fold, as
scikit-learn's ``GroupKFold`` does over unit rows), so every sample is ``test`` in exactly one fold and no
patient is in two partitions. Fewer patients than folds is an InputError (``morphomol check-config``
reports it before any job): folds are never grouped by anything finer than the patient.

Inner: ``val_fraction`` of the fold's training *patients* (at least one, and at least one left for
fitting) chosen with ``seed + fold``; grouped by patient when the training part has >= 2 patients,
else by sample. The same assertions run in code on every fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphomol.config.sections import SplitsConfig
from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("splits")

PARTITIONS = ("fit", "val", "test")
FOLDS_COLUMNS = ("fold", "sample_id", "patient_id", "n_units", "partition")


def group_kfold(groups: Sequence[str], weights: Sequence[int], n_folds: int) -> dict[str, int]:
    """Test fold of every group: ``GroupKFold(n_folds)`` (non-shuffled) over groups with these unit counts —
    the largest group goes to the lightest fold — computed on the groups, not on one row per unit."""
    uniq = np.unique(np.asarray([str(g) for g in groups], dtype=object))
    w = pd.Series(np.asarray(weights, np.int64), index=[str(g) for g in groups]).groupby(level=0).sum()
    n_per_group = w.reindex(uniq).to_numpy(np.int64)
    order = np.argsort(n_per_group, kind="stable")[::-1]
    per_fold = np.zeros(n_folds)
    fold = np.zeros(len(uniq), np.int64)
    for gi in order:
        lightest = int(np.argmin(per_fold))
        per_fold[lightest] += n_per_group[gi]
        fold[gi] = lightest
    return {str(g): int(k) for g, k in zip(uniq, fold, strict=True)}


def _choose_val(groups: Sequence[str], frac: float, rng: np.random.Generator) -> set[str]:
    uniq = sorted(set(groups))
    n_val = int(round(frac * len(uniq)))
    n_val = min(max(n_val, 1), len(uniq) - 1)
    return set(rng.permutation(np.array(uniq, dtype=object))[:n_val].tolist())


def sample_table(samples: Sequence[str], patients: Sequence[str], n_units: Sequence[int]) -> pd.DataFrame:
    """``sample_id, patient_id, n_units`` (validated: unique samples, one patient per sample)."""
    t = pd.DataFrame({"sample_id": [str(s) for s in samples], "patient_id": [str(p) for p in patients],
                      "n_units": np.asarray(n_units, np.int64)})
    if t["sample_id"].duplicated().any():
        raise InputError(f"duplicate sample_id {t['sample_id'][t['sample_id'].duplicated()].iloc[0]}",
                         field="sample_id", expected="unique sample ids")
    return t


def make_folds(samples: pd.DataFrame, n_folds: int = 4, val_fraction: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """samples: ``sample_id, patient_id, n_units`` (one row per sample). Returns the long fold table
    (``FOLDS_COLUMNS``, folds in order, samples in the given order within each fold)."""
    for col in ("sample_id", "patient_id", "n_units"):
        if col not in samples.columns:
            raise InputError(f"splits input lacks column {col!r}", field=col)
    t = samples[["sample_id", "patient_id", "n_units"]].reset_index(drop=True).copy()
    t["sample_id"] = t["sample_id"].astype(str)
    t["patient_id"] = t["patient_id"].astype(str)
    t["n_units"] = t["n_units"].astype(np.int64)
    if t["sample_id"].duplicated().any():
        raise InputError(f"duplicate sample_id {t['sample_id'][t['sample_id'].duplicated()].iloc[0]}",
                         field="sample_id")
    n_pat = t["patient_id"].nunique()
    if n_pat < n_folds:
        raise InputError(f"{n_pat} patient(s) cannot make {n_folds} patient-grouped folds", field="splits.n_folds",
                         expected=f"at most {n_pat} folds")
    fold_of = group_kfold(t["patient_id"].tolist(), t["n_units"].tolist(), n_folds)
    test_fold = t["patient_id"].map(fold_of).to_numpy(np.int64)
    out = []
    for k in range(n_folds):
        rng = np.random.default_rng([int(seed), k])
        is_test = test_fold == k
        train = t[~is_test]
        inner_key = "patient_id" if train["patient_id"].nunique() >= 2 else "sample_id"
        if train[inner_key].nunique() < 2:
            raise InputError(f"fold {k}: training part has a single {inner_key}; no grouped validation split possible",
                             field="splits.n_folds")
        if inner_key != "patient_id":
            log.warning("fold %d: validation grouped by sample_id (one training patient)", k)
        val_groups = _choose_val(train[inner_key].tolist(), val_fraction, rng)
        part = np.where(is_test, "test", np.where(t[inner_key].isin(val_groups), "val", "fit"))
        f = t.copy()
        f.insert(0, "fold", k)
        f["partition"] = part
        check_fold(f, "patient_id", inner_key)
        out.append(f)
        log.info("fold %d: %s", k, {p: int(t["n_units"][part == p].sum()) for p in PARTITIONS})
    folds = pd.concat(out, ignore_index=True)[list(FOLDS_COLUMNS)]
    check_folds(folds)
    return folds


def check_fold(f: pd.DataFrame, outer_key: str = "patient_id", inner_key: str = "patient_id") -> None:
    """Raise unless: no sample spans two partitions; with patient-grouped outer folds no
    patient spans two partitions; with patient-grouped validation no patient is in fit and val.
    ``f``: one fold, rows = samples or units (columns ``sample_id, patient_id, partition``)."""

    def _disjoint(df: pd.DataFrame, key: str, what: str) -> None:
        n = df.groupby(key)["partition"].nunique()
        if (n > 1).any():
            g = n.index[n > 1][0]
            raise AssertionError(f"{key} {g} appears in two partitions ({what})")

    _disjoint(f, "sample_id", "fit/val/test")
    if outer_key == "patient_id":
        _disjoint(f, "patient_id", "fit/val/test")
    if inner_key == "patient_id":
        _disjoint(f[f["partition"] != "test"], "patient_id", "fit/val")
    for p in PARTITIONS:
        if not (f["partition"] == p).any():
            raise AssertionError(f"partition {p} is empty")


def check_folds(folds: pd.DataFrame) -> None:
    """Raise unless every fold lists the same samples and every sample is test in exactly one fold."""
    per_fold = [g["sample_id"].to_numpy() for _, g in folds.groupby("fold", sort=True)]
    ids = per_fold[0]
    for got in per_fold[1:]:
        if not np.array_equal(got, ids):
            raise AssertionError("folds list different samples")
    n_test = folds[folds["partition"] == "test"].groupby("sample_id").size().reindex(ids, fill_value=0)
    if not (n_test == 1).all():
        bad = n_test[n_test != 1]
        raise AssertionError(f"sample {bad.index[0]} is test in {int(bad.iloc[0])} folds")


def write_folds(*, units: Sequence[str | Path], samples: Sequence[str], patients: Sequence[str], out: str | Path,
                cfg: SplitsConfig, seed: int = 0) -> pd.DataFrame:
    """Rule entry: every fold of the cohort into ``out`` (``splits/folds.parquet``). Reads only the number of
    units of each unit table (their obs index length), never the units themselves."""
    from morphomol.data.units import count_units

    n_units = [count_units(u) for u in units]
    t = sample_table(samples, patients, n_units)
    folds = make_folds(t, cfg.n_folds, cfg.val_fraction, seed)
    log.info("%d units, %d samples, %d patients; %d folds grouped by patient_id", int(t["n_units"].sum()), len(t),
             t["patient_id"].nunique(), cfg.n_folds)
    with atomic_path(out) as tmp:
        folds.to_parquet(tmp, index=False)
    return folds
