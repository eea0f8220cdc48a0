"""Patient-grouped outer folds and grouped inner validation splits of a cohort's units.

Outer: ``GroupKFold(n_folds)`` on ``patient_id`` (unit-weighted balancing, deterministic), so every
unit is ``test`` in exactly one fold and no patient is in two partitions. Fewer patients than folds
is an InputError (``morphomol check-config`` reports it before any job): folds are never grouped by
anything finer than the patient.

Inner: ``val_fraction`` of the fold's training *patients* (at least one, and at least one left for
fitting) chosen with ``seed + fold``; grouped by patient when the training part has >= 2 patients,
else by sample. The same assertions run in code on every fold.

Units come from the samples' unit tables (``units.h5ad``: obs index = unit ids, column ``index`` =
row in the sample's stores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from morphomol.config.sections import SplitsConfig
from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("splits")

PARTITIONS = ("fit", "val", "test")


def _group_kfold(groups: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold index (0..n_folds-1) of the test part for every row."""
    from sklearn.model_selection import GroupKFold

    fold = np.full(len(groups), -1, np.int64)
    for k, (_tr, te) in enumerate(GroupKFold(n_splits=n_folds).split(np.zeros(len(groups)), groups=groups)):
        fold[te] = k
    return fold


def _choose_val(groups: Sequence[str], frac: float, rng: np.random.Generator) -> set[str]:
    uniq = sorted(set(groups))
    n_val = int(round(frac * len(uniq)))
    n_val = min(max(n_val, 1), len(uniq) - 1)
    return set(rng.permutation(np.array(uniq, dtype=object))[:n_val].tolist())


def make_splits(tiles: pd.DataFrame, n_folds: int = 4, val_fraction: float = 0.25, seed: int = 0
                ) -> tuple[list[pd.DataFrame], str]:
    """tiles: columns tile_id, sample_id, patient_id, index. Returns (per-fold tables, outer grouping key)."""
    for col in ("tile_id", "sample_id", "patient_id", "index"):
        if col not in tiles.columns:
            raise InputError(f"splits input lacks column {col!r}", field=col)
    t = tiles[["tile_id", "sample_id", "patient_id", "index"]].reset_index(drop=True).copy()
    t["sample_id"] = t["sample_id"].astype(str)
    t["patient_id"] = t["patient_id"].astype(str)
    if t["tile_id"].duplicated().any():
        raise InputError(f"duplicate tile_id {t['tile_id'][t['tile_id'].duplicated()].iloc[0]}", field="tile_id")
    # one patient per sample
    per_sample = t.groupby("sample_id")["patient_id"].nunique()
    if (per_sample > 1).any():
        s = per_sample.index[per_sample > 1][0]
        raise InputError(f"sample {s} has tiles from several patients", field="patient_id")
    n_pat = t["patient_id"].nunique()
    if n_pat < n_folds:
        raise InputError(f"{n_pat} patient(s) cannot make {n_folds} patient-grouped folds", field="splits.n_folds",
                         expected=f"at most {n_pat} folds")
    key = "patient_id"
    test_fold = _group_kfold(t[key].to_numpy(), n_folds)
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
        f["partition"] = part
        check_fold(f, key, inner_key)
        out.append(f)
        log.info("fold %d: %s", k, {p: int((part == p).sum()) for p in PARTITIONS})
    check_folds(out)
    return out, key


def check_fold(f: pd.DataFrame, outer_key: str = "patient_id", inner_key: str = "patient_id") -> None:
    """Raise unless: no sample spans two partitions; with patient-grouped outer folds no
    patient spans two partitions; with patient-grouped validation no patient is in fit and val."""

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


def check_folds(folds: Sequence[pd.DataFrame]) -> None:
    """Raise unless every tile is test in exactly one fold and all folds list the same tiles."""
    ids = folds[0]["tile_id"].to_numpy()
    n_test = np.zeros(len(ids), np.int64)
    for f in folds:
        if not np.array_equal(f["tile_id"].to_numpy(), ids):
            raise AssertionError("folds list different tiles")
        n_test += (f["partition"] == "test").to_numpy()
    if not (n_test == 1).all():
        raise AssertionError(f"tile {ids[np.flatnonzero(n_test != 1)[0]]} is test in {n_test[n_test != 1][0]} folds")


def collect_units(units: Sequence[str | Path], sample_ids: Sequence[str], patient_ids: Sequence[str]) -> pd.DataFrame:
    """``tile_id, sample_id, patient_id, index`` of every unit of the given unit tables (in order)."""
    import anndata as ad

    parts = []
    for path, s, p in zip(units, sample_ids, patient_ids, strict=True):
        a = ad.read_h5ad(path, backed="r")
        try:
            obs = a.obs
            index = obs["index"].to_numpy(np.int64) if "index" in obs.columns else np.arange(len(obs), dtype=np.int64)
            df = pd.DataFrame({"tile_id": obs.index.astype(str).to_numpy(), "index": index})
        finally:
            a.file.close()
        df.insert(1, "sample_id", str(s))
        df.insert(2, "patient_id", str(p))
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def split_fold(*, units: Sequence[str | Path], samples: Sequence[str], patients: Sequence[str], fold: int,
               out: str | Path, cfg: SplitsConfig, seed: int = 0) -> pd.DataFrame:
    """Rule entry: write ``out`` = splits/fold{fold}.parquet. All folds are computed every time (cheap
    and deterministic), so one job per fold gives identical folds."""
    if not 0 <= int(fold) < cfg.n_folds:
        raise InputError(f"fold {fold} out of range (n_folds={cfg.n_folds})", field="splits.n_folds")
    t = collect_units(units, samples, patients)
    all_folds, key = make_splits(t, cfg.n_folds, cfg.val_fraction, seed)
    log.info("%d units, %d samples, %d patients; outer folds grouped by %s", len(t), t["sample_id"].nunique(),
             t["patient_id"].nunique(), key)
    with atomic_path(out) as tmp:
        all_folds[int(fold)].to_parquet(tmp, index=False)
    return all_folds[int(fold)]
