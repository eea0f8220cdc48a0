"""Patient-grouped outer folds and the validation policy of every study, at sample level.

**The policy** (shared by the fusion, spots, slides and cells studies; documented in docs/ARCHITECTURE.md,
"Splits"):

* Outer folds are always grouped by patient (the cells study's donor): ``splits.n_folds`` test folds over
  the patients, so every sample is ``test`` in exactly one fold and no test patient is ever trained on.
  ``n_folds`` needs at least ``n_folds`` patients (5 patients allow 5 folds); fewer is an InputError naming
  ``splits.n_folds`` and the value that works, raised by ``morphomol check-config`` before any job.
* Validation, per fold, from the fold's training part (``splits.validation``):
  ``patient`` — ``val_fraction`` of the training patients (at least one, at least one left to fit); needs
  >= 2 training patients. ``sample`` — ``val_fraction`` of the training samples, grouped by sample (a patient
  may then be in fit and in val); needs >= 2 training samples. ``none`` — no validation partition: the
  trainers run a fixed number of epochs (``training.epochs``) and keep the last weights, no early stopping.
  ``auto`` (default) takes, per fold, the first that the fold allows in that order, with an INFO log line
  saying which and why; a value that a fold cannot honour is an InputError naming ``splits.validation``, the
  value and the value that would work.

:func:`plan_folds` is the one feasibility function (pure, torch-free): the splits rule, the cells study's
donor folds and every study's check-config call it. One job per cohort (rule ``splits``) writes every fold
at once into ``splits/folds.parquet``: one row per (fold, sample) — ``fold, sample_id, patient_id, n_units,
partition, validation`` — so its size is folds x samples, never the cohort's units. Every unit of a sample
shares the sample's partition; jobs that need unit rows expand a fold over the unit ids of their own inputs
(:func:`morphomol.data.folds.unit_split`). :func:`check_fold` asserts what the fold's policy promises, on
every fold, when the table is written and again when a fold is read.

Outer assignment: unit-weighted (the largest patient goes to the lightest fold, as scikit-learn's
``GroupKFold`` does over unit rows). Validation groups are drawn with ``(seed, fold)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from morphomol.config.sections import SplitsConfig
from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("splits")

PARTITIONS = ("fit", "val", "test")
FOLDS_COLUMNS = ("fold", "sample_id", "patient_id", "n_units", "partition", "validation")
#: validation policies of one fold, strongest first; ``auto`` picks the first the fold allows
POLICIES = ("patient", "sample", "none")
VALIDATION_VALUES = ("auto", *POLICIES)


# =========================================================================== the policy (pure)
def feasible_validation(n_train_patients: int, n_train_samples: int) -> str:
    """The strongest validation a training part of this size allows: ``patient`` (>= 2 patients), else
    ``sample`` (>= 2 samples), else ``none``."""
    if n_train_patients >= 2:
        return "patient"
    if n_train_samples >= 2:
        return "sample"
    return "none"


def allows(policy: str, n_train_patients: int, n_train_samples: int) -> bool:
    return {"patient": n_train_patients >= 2, "sample": n_train_samples >= 2, "none": True}[policy]


@dataclass(frozen=True)
class FoldPlan:
    """One fold of a plan: its test and training patients, the training samples and the validation policy."""

    fold: int
    test_patients: tuple[str, ...]
    train_patients: tuple[str, ...]
    train_samples: tuple[str, ...]
    validation: str
    reason: str


def folds_needed(n_patients: int, n_folds: int, *, cohort: str | None = None, unit: str = "patient",
                 file: object = None) -> None:
    """InputError (field ``splits.n_folds``) unless ``n_patients`` >= ``n_folds`` (folds grouped by patient)."""
    if n_patients >= n_folds:
        return
    where = f"cohort '{cohort}'" if cohort else "the cohort"
    fix = (f"use n_folds: {n_patients}" if n_patients >= 2
           else f"patient-grouped cross-validation needs >= 2 {unit}s")
    raise InputError(f"{n_folds} folds need >= {n_folds} {unit}s; {where} has {n_patients} {unit}(s) — "
                     f"{fix}",
                     file=file, field="splits.n_folds", expected=f"at most {n_patients} folds (folds are grouped by {unit})")


def plan_folds(samples: pd.DataFrame | Mapping[str, Sequence[str]], n_folds: int, validation: str = "auto", *,
               test_fold: Mapping[str, int] | None = None, cohort: str | None = None,
               unit: str = "patient", file: object = None) -> list[FoldPlan]:
    """The folds of a cohort and each fold's validation policy, or one InputError naming the field
    (``splits.n_folds`` / ``splits.validation``), the value and the value that would work.

    ``samples``: ``sample_id, patient_id[, n_units]`` rows (one per sample), or patient -> its samples.
    ``test_fold``: patient -> test fold (default: the unit-weighted assignment of :func:`group_kfold`, with
    ``n_units`` — or one per sample when the units are not known yet, as in check-config)."""
    t = _as_samples(samples)
    if validation not in VALIDATION_VALUES:
        raise InputError(f"invalid value {validation!r}", file=file, field="splits.validation",
                         expected=" | ".join(VALIDATION_VALUES))
    patients = sorted(set(t["patient_id"]))
    folds_needed(len(patients), int(n_folds), cohort=cohort, unit=unit, file=file)
    if test_fold is None:
        test_fold = group_kfold(t["patient_id"].tolist(), t["n_units"].tolist(), int(n_folds))
    plans, bad = [], []
    for k in range(int(n_folds)):
        test = tuple(p for p in patients if test_fold[p] == k)
        train = tuple(p for p in patients if test_fold[p] != k)
        train_samples = tuple(t.loc[t["patient_id"].isin(train), "sample_id"])
        best = feasible_validation(len(train), len(train_samples))
        why = f"its training part has {len(train)} {unit}(s) and {len(train_samples)} sample(s)"
        if validation != "auto" and not allows(validation, len(train), len(train_samples)):
            bad.append((k, test, len(train), len(train_samples)))
        plans.append(FoldPlan(k, test, train, train_samples, best if validation == "auto" else validation, why))
    if bad:
        works = _weakest(validation, *(p.validation if p.fold not in {b[0] for b in bad} else
                                       feasible_validation(len(p.train_patients), len(p.train_samples))
                                       for p in plans))
        k, test, n_p, n_s = bad[0]
        need = {"patient": f">= 2 training {unit}s", "sample": ">= 2 training samples"}[validation]
        raise InputError(f"{validation!r} needs {need} in every fold; fold {k} (test {unit}(s) {', '.join(test)}) "
                         f"has {n_p} {unit}(s) and {n_s} sample(s) to train on"
                         + (f" ({len(bad)} of {len(plans)} folds fall short)" if len(bad) > 1 else "")
                         + f" — use validation: {works} (or auto)",
                         file=file, field="splits.validation", expected=f"validation: {works} or auto")
    return plans


def _weakest(*policies: str) -> str:
    return max(policies, key=POLICIES.index)


def _as_samples(samples: pd.DataFrame | Mapping[str, Sequence[str]]) -> pd.DataFrame:
    if isinstance(samples, Mapping):
        rows = [(str(s), str(p)) for p, ss in samples.items() for s in ss]
        t = pd.DataFrame(rows, columns=["sample_id", "patient_id"])
    else:
        for col in ("sample_id", "patient_id"):
            if col not in samples.columns:
                raise InputError(f"splits input lacks column {col!r}", field=col)
        t = samples.reset_index(drop=True).copy()
    t["sample_id"] = t["sample_id"].astype(str)
    t["patient_id"] = t["patient_id"].astype(str)
    t["n_units"] = t["n_units"].astype(np.int64) if "n_units" in t.columns else np.ones(len(t), np.int64)
    if t["sample_id"].duplicated().any():
        raise InputError(f"duplicate sample_id {t['sample_id'][t['sample_id'].duplicated()].iloc[0]}",
                         field="sample_id", expected="unique sample ids")
    return t[["sample_id", "patient_id", "n_units"]]


def check_plan(samples: pd.DataFrame | Mapping[str, Sequence[str]], cfg: SplitsConfig, *, cohort: str,
               file: object = None, unit: str = "patient") -> list[FoldPlan]:
    """check-config's fold check (every study kind): :func:`plan_folds` with one unit per sample (the unit
    counts are not known before any job; the splits rule re-plans with them), the InputError given ``file``."""
    return plan_folds(samples, cfg.n_folds, cfg.validation, cohort=cohort, unit=unit, file=file)


def check_fold_plan(cohort: object, *, file: object = None,
                    groups: Mapping[str, Sequence[str]] | None = None, unit: str = "patient") -> list[FoldPlan]:
    """check-config's fold check of a cohort (fusion, spots, slides: the sheet's samples and patients; cells:
    ``groups`` = donor -> its (donor, sample) groups): :func:`check_plan` with the cohort's ``splits``."""
    if groups is None:
        t = cohort.samples  # type: ignore[attr-defined]
        groups = {}
        for s, p in zip(t["sample_id"].astype(str), t["patient_id"].astype(str), strict=True):
            groups.setdefault(p, []).append(s)
    return check_plan(groups, cohort.cfg.splits, cohort=cohort.name, file=file, unit=unit)  # type: ignore[attr-defined]


# =========================================================================== fold assignment
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


def choose_val(groups: Sequence[str], frac: float, rng: np.random.Generator) -> set[str]:
    """``frac`` of the distinct ``groups`` (at least one, at least one left), drawn with ``rng``."""
    uniq = sorted(set(groups))
    n_val = int(round(frac * len(uniq)))
    n_val = min(max(n_val, 1), len(uniq) - 1)
    return set(rng.permutation(np.array(uniq, dtype=object))[:n_val].tolist())


_choose_val = choose_val  # older name (slides transfer)


def validation_partition(plan: FoldPlan, patient_of: Mapping[str, str], val_fraction: float, seed: int
                         ) -> dict[str, str]:
    """sample -> fit | val | test of one planned fold (``patient_of``: sample -> patient)."""
    rng = np.random.default_rng([int(seed), int(plan.fold)])
    test = set(plan.test_patients)
    if plan.validation == "patient":
        val_p = choose_val(list(plan.train_patients), val_fraction, rng)
        val_s = {s for s in plan.train_samples if patient_of[s] in val_p}
    elif plan.validation == "sample":
        val_s = choose_val(list(plan.train_samples), val_fraction, rng)
    else:
        val_s = set()
    return {s: "test" if p in test else "val" if s in val_s else "fit" for s, p in patient_of.items()}


def log_plan(plan: FoldPlan, requested: str, *, unit: str = "patient") -> None:
    """The INFO line of a fold's validation choice (a warning-free statement of what was chosen and why)."""
    how = {"patient": f"validation grouped by {unit}", "sample": "validation grouped by sample",
           "none": "no validation partition: fixed epochs (or steps), last weights kept, no early stopping"}
    src = "auto" if requested == "auto" else "set in splits.validation"
    log.info("fold %d: %s (%s: %s)", plan.fold, how[plan.validation], src, plan.reason)


def sample_table(samples: Sequence[str], patients: Sequence[str], n_units: Sequence[int]) -> pd.DataFrame:
    """``sample_id, patient_id, n_units`` (validated: unique samples, one patient per sample)."""
    t = pd.DataFrame({"sample_id": [str(s) for s in samples], "patient_id": [str(p) for p in patients],
                      "n_units": np.asarray(n_units, np.int64)})
    if t["sample_id"].duplicated().any():
        raise InputError(f"duplicate sample_id {t['sample_id'][t['sample_id'].duplicated()].iloc[0]}",
                         field="sample_id", expected="unique sample ids")
    return t


def make_folds(samples: pd.DataFrame, n_folds: int = 4, val_fraction: float = 0.25, seed: int = 0,
               validation: str = "auto", *, cohort: str | None = None) -> pd.DataFrame:
    """samples: ``sample_id, patient_id, n_units`` (one row per sample). Returns the long fold table
    (``FOLDS_COLUMNS``, folds in order, samples in the given order within each fold)."""
    for col in ("sample_id", "patient_id", "n_units"):
        if col not in samples.columns:
            raise InputError(f"splits input lacks column {col!r}", field=col)
    t = _as_samples(samples)
    plans = plan_folds(t, n_folds, validation, cohort=cohort)
    patient_of = dict(zip(t["sample_id"], t["patient_id"], strict=True))
    out = []
    for plan in plans:
        log_plan(plan, validation)
        part_of = validation_partition(plan, patient_of, val_fraction, seed)
        f = t.copy()
        f.insert(0, "fold", plan.fold)
        f["partition"] = f["sample_id"].map(part_of)
        f["validation"] = plan.validation
        check_fold(f)
        out.append(f)
        log.info("fold %d: units %s", plan.fold, {p: int(f["n_units"][f["partition"] == p].sum()) for p in PARTITIONS})
    folds = pd.concat(out, ignore_index=True)[list(FOLDS_COLUMNS)]
    check_folds(folds)
    return folds


# =========================================================================== checks
def infer_validation(f: pd.DataFrame) -> str:
    """The policy of a fold table written before ``validation`` was recorded: ``none`` without val rows,
    ``patient`` when fit and val share no patient, else ``sample``."""
    parts = f["partition"].astype(str)
    if not (parts == "val").any():
        return "none"
    shared = set(f.loc[parts == "fit", "patient_id"]) & set(f.loc[parts == "val", "patient_id"])
    return "sample" if shared else "patient"


def fold_policy(f: pd.DataFrame) -> str:
    """The validation policy of one fold's rows: its ``validation`` column, ``attrs['validation']``, or inferred."""
    if "validation" in f.columns and len(f):
        vals = sorted(set(f["validation"].astype(str)))
        if len(vals) != 1 or vals[0] not in POLICIES:
            raise AssertionError(f"fold validation {vals}: expected one of {', '.join(POLICIES)}")
        return vals[0]
    if f.attrs.get("validation") in POLICIES:
        return str(f.attrs["validation"])
    return infer_validation(f)


def check_fold(f: pd.DataFrame, validation: str | None = None, *, fold: int | None = None) -> None:
    """Raise AssertionError unless the fold keeps what its validation policy promises. ``f``: one fold, rows =
    samples or units (``sample_id, patient_id, partition``; policy from ``validation``, else the rows).

    Always: no sample in two partitions; no test patient among the training (fit + val) patients; fit and test
    non-empty. ``patient``: val non-empty, no patient in fit and val. ``sample``: val non-empty (disjoint
    from fit by sample). ``none``: val empty."""
    policy = validation or fold_policy(f)
    if fold is None and "fold" in f.columns and f["fold"].nunique() == 1:
        fold = int(f["fold"].iloc[0])
    if fold is None and f.attrs.get("fold") is not None:
        fold = int(f.attrs["fold"])
    where = f"fold {fold}: " if fold is not None else ""
    parts = f["partition"].astype(str)

    def _disjoint(df: pd.DataFrame, key: str, what: str) -> None:
        n = df.groupby(key)["partition"].nunique()
        if (n > 1).any():
            g = n.index[n > 1][0]
            raise AssertionError(f"{where}{key} {g} appears in two partitions ({what}; validation {policy})")

    _disjoint(f, "sample_id", "fit/val/test")
    test_p = set(f.loc[parts == "test", "patient_id"])
    both = sorted(test_p & set(f.loc[parts != "test", "patient_id"]))
    if both:
        raise AssertionError(f"{where}patient_id {both[0]} appears in two partitions (test and training; "
                             f"validation {policy})")
    if policy == "patient":
        _disjoint(f[parts != "test"], "patient_id", "fit/val")
    for p in ("fit", "test") + (("val",) if policy in ("patient", "sample") else ()):
        if not (parts == p).any():
            raise AssertionError(f"{where}partition {p} is empty (validation {policy})")
    if policy == "none" and (parts == "val").any():
        raise AssertionError(f"{where}validation none but {int((parts == 'val').sum())} row(s) in val")


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
                cfg: SplitsConfig, seed: int = 0, cohort: str | None = None) -> pd.DataFrame:
    """Rule entry: every fold of the cohort into ``out`` (``splits/folds.parquet``). Reads only the number of
    units of each unit table (their obs index length), never the units themselves."""
    from morphomol.data.units import count_units

    n_units = [count_units(u) for u in units]
    t = sample_table(samples, patients, n_units)
    folds = make_folds(t, cfg.n_folds, cfg.val_fraction, seed, cfg.validation, cohort=cohort)
    log.info("%d units, %d samples, %d patients; %d folds grouped by patient_id, validation %s",
             int(t["n_units"].sum()), len(t), t["patient_id"].nunique(), cfg.n_folds,
             folds.groupby("fold")["validation"].first().tolist())
    with atomic_path(out) as tmp:
        folds.to_parquet(tmp, index=False)
    return folds
