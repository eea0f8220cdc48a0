"""Grouped outer folds and inner validation splits (one fold table per cohort, one row per (fold, sample))."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from morphomol.config import SplitsConfig
from morphomol.data.folds import fold_rows, partitions_by_fold, read_folds, sample_partitions, held_out_fold, unit_split
from morphomol.data.units import count_units, write_units
from morphomol.errors import InputError
from morphomol.splits import (
    FOLDS_COLUMNS,
    check_fold,
    feasible_validation,
    group_kfold,
    make_folds,
    plan_folds,
    write_folds,
)


def _samples(samples_per_patient, units_per_sample, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    s = 0
    for p, ns in enumerate(samples_per_patient):
        for _ in range(ns):
            rows.append((f"S{s}", f"P{p}", int(rng.integers(1, units_per_sample + 1))))
            s += 1
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "n_units"])


def _invariants(folds):
    assert list(folds.columns) == list(FOLDS_COLUMNS)
    n = folds["fold"].nunique()
    per_fold = [g for _, g in folds.groupby("fold")]
    ids = per_fold[0]["sample_id"].tolist()
    assert all(g["sample_id"].tolist() == ids for g in per_fold)
    assert (folds[folds.partition == "test"].groupby("sample_id").size() == 1).all()
    assert folds[folds.partition == "test"]["sample_id"].nunique() == len(ids)
    for g in per_fold:
        assert set(g["partition"]) == {"fit", "val", "test"}
        assert (g.groupby("patient_id")["partition"].nunique() == 1).all()
    assert n == len(per_fold)


@settings(max_examples=30, deadline=None)
@given(spp=st.lists(st.integers(1, 3), min_size=4, max_size=12), seed=st.integers(0, 100),
       frac=st.floats(0.1, 0.5))
def test_patient_grouped_folds(spp, seed, frac):
    folds = make_folds(_samples(spp, 20, seed), 4, frac, seed)
    _invariants(folds)


@settings(max_examples=40, deadline=None)
@given(spp=st.lists(st.integers(1, 3), min_size=3, max_size=15), seed=st.integers(0, 100), k=st.integers(2, 3))
def test_group_kfold_equals_sklearn_over_unit_rows(spp, seed, k):
    """The sample-level fold assignment is exactly scikit-learn's GroupKFold over one row per unit (what the
    splits were before they were computed at sample level), so existing folds do not move."""
    from sklearn.model_selection import GroupKFold

    t = _samples(spp, 50, seed)
    rows = np.repeat(t["patient_id"].to_numpy(), t["n_units"].to_numpy())
    want = {}
    for fold, (_, te) in enumerate(GroupKFold(n_splits=k).split(np.zeros(len(rows)), groups=rows)):
        want.update({p: fold for p in set(rows[te])})
    assert group_kfold(t["patient_id"].tolist(), t["n_units"].tolist(), k) == want


def test_fewer_patients_than_folds_is_an_error():
    """Folds are never grouped by anything finer than the patient (no silent sample-level fallback)."""
    t = _samples([2, 1, 2], 30)  # 3 patients, 5 samples, 4 folds
    with pytest.raises(InputError) as exc:
        make_folds(t, 4, 0.25, 0)
    assert exc.value.field == "splits.n_folds" and "3 patient" in exc.value.message
    _invariants(make_folds(t, 3, 0.25, 0))


def test_deterministic_and_seeded():
    t = _samples([1] * 10, 10)
    a = make_folds(t, 4, 0.25, 0)
    assert a.equals(make_folds(t, 4, 0.25, 0))
    c = make_folds(t, 4, 0.25, 1)
    assert not a["partition"].equals(c["partition"])


def test_errors_and_check():
    with pytest.raises(InputError, match="4 folds need >= 4 patients; the cohort has 3 patient.* use n_folds: 3"):
        make_folds(_samples([1, 1, 1], 5), 4)
    f = make_folds(_samples([1] * 5, 5), 4)
    bad = f[f.fold == 0].copy()
    bad = pd.concat([bad, bad.iloc[[0]].assign(sample_id="X", partition="test" if bad.partition.iloc[0] != "test"
                                               else "fit")])
    with pytest.raises(AssertionError, match="appears in two partitions .test and training"):
        check_fold(bad)
    dup = pd.DataFrame({"sample_id": ["A", "A"], "patient_id": ["P", "P"], "n_units": [1, 1]})
    with pytest.raises(InputError, match="duplicate sample_id"):
        make_folds(dup, 2)


def _unit_tables(tmp_path, n_samples=5, n_units=7):
    paths, samples, patients = [], [], []
    for s in range(n_samples):
        p = tmp_path / f"S{s}.h5ad"
        obs = pd.DataFrame({"tile_id": [f"S{s}__{i:06d}" for i in range(n_units + s)], "index": np.arange(n_units + s)})
        write_units(p, obs, np.ones((n_units + s, 2)), ["g1", "g2"], spatial_um=np.zeros((n_units + s, 2)), unit="tile",
                    sample=f"S{s}", index_col="tile_id")
        paths.append(p)
        samples.append(f"S{s}")
        patients.append(f"P{s % 4}")
    return paths, samples, patients


def test_rule_entry_writes_every_fold_once_from_unit_counts(tmp_path):
    paths, samples, patients = _unit_tables(tmp_path)
    assert [count_units(p) for p in paths] == [7, 8, 9, 10, 11]
    out = tmp_path / "splits" / "folds.parquet"
    folds = write_folds(units=paths, samples=samples, patients=patients, out=out, cfg=SplitsConfig(n_folds=4, val_fraction=0.25), seed=0)
    back = read_folds(out)
    assert back.equals(folds)
    _invariants(back)
    assert len(back) == 4 * 5  # folds x samples, never units
    assert back.groupby("sample_id")["n_units"].first().to_dict() == {"S0": 7, "S1": 8, "S2": 9, "S3": 10, "S4": 11}
    parts = sample_partitions(back, 1)
    assert set(parts) == set(samples) and set(parts.values()) == {"fit", "val", "test"}
    assert sorted(held_out_fold(back).values()) == sorted(back.loc[back.partition == "test", "fold"])
    assert partitions_by_fold(back, ["S0"])["S0"] == {k: p for k, p in zip(back[back.sample_id == "S0"].fold,
                                                                          back[back.sample_id == "S0"].partition)}
    with pytest.raises(InputError, match="fold 4 is not in the fold table"):
        fold_rows(back, 4)


def test_unit_split_expands_a_fold_over_unit_ids(tmp_path):
    from morphomol.data.folds import read_split
    from morphomol.data.units import unit_ids

    paths, samples, patients = _unit_tables(tmp_path)
    out = tmp_path / "folds.parquet"
    write_folds(units=paths, samples=samples, patients=patients, out=out, cfg=SplitsConfig(n_folds=4, val_fraction=0.25), seed=0)
    s = read_split(out, 2, dict(zip(samples, paths)))
    assert list(s.columns) == ["tile_id", "sample_id", "patient_id", "index", "partition"]
    assert len(s) == 7 + 8 + 9 + 10 + 11 and s["tile_id"].iloc[0] == "S0__000000"
    parts = sample_partitions(out, 2)
    assert (s["partition"] == s["sample_id"].map(parts)).all()
    check_fold(s)
    with pytest.raises(InputError, match="not in the fold table"):
        unit_split(out, 0, {"S9": unit_ids(paths[0])})


def test_reader_names_the_file_and_field(tmp_path):
    p = tmp_path / "folds.parquet"
    pd.DataFrame({"fold": [0], "sample_id": ["A"], "patient_id": ["P"], "n_units": [1], "partition": ["train"]}
                 ).to_parquet(p)
    with pytest.raises(InputError) as exc:
        read_folds(p)
    assert exc.value.field == "partition" and "train" in exc.value.message
    with pytest.raises(InputError, match="fold table missing"):
        read_folds(tmp_path / "nope.parquet")


# ------------------------------------------------------------------------------ the validation policy (issue 23)
TWO_PATIENTS = pd.DataFrame({"sample_id": ["A1", "B1", "B2"], "patient_id": ["A", "B", "B"], "n_units": [40, 25, 30]})


def test_two_patients_make_two_folds_with_sample_and_no_validation(caplog):
    """One patient with one sample, one with two: both folds exist, the fold training on B's two samples
    validates on one of them, the fold training on A's single sample has no validation partition."""
    with caplog.at_level("INFO", logger="morphomol.splits"):
        folds = make_folds(TWO_PATIENTS, 2, 0.25, 0)
    assert list(folds.columns) == list(FOLDS_COLUMNS)
    by = {k: g.set_index("sample_id") for k, g in folds.groupby("fold")}
    test_a = next(k for k, g in by.items() if g.at["A1", "partition"] == "test")
    test_b = 1 - test_a
    assert set(by[test_a]["validation"]) == {"sample"}
    assert sorted(by[test_a].loc[["B1", "B2"], "partition"]) == ["fit", "val"]
    assert set(by[test_b]["validation"]) == {"none"}
    assert by[test_b].at["A1", "partition"] == "fit" and (by[test_b].loc[["B1", "B2"], "partition"] == "test").all()
    for _, g in folds.groupby("fold"):
        check_fold(g)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"fold {test_a}: validation grouped by sample (auto: its training part has 1 patient(s) and 2 sample(s))"
               in m for m in msgs)
    assert any(f"fold {test_b}: no validation partition" in m and "1 patient(s) and 1 sample(s)" in m for m in msgs)


def test_fold_messages_name_their_own_fold():
    folds = make_folds(TWO_PATIENTS, 2, 0.25, 0)
    f1 = folds[folds.fold == 1].copy()
    f1.loc[f1.partition == "test", "partition"] = "fit"
    with pytest.raises(AssertionError, match="^fold 1: "):
        check_fold(f1)


@pytest.mark.parametrize("value, field, fix", [
    ("patient", "splits.validation", "use validation: none"),
    ("sample", "splits.validation", "use validation: none"),
])
def test_a_set_policy_is_honoured_or_names_the_value_that_works(value, field, fix):
    with pytest.raises(InputError) as exc:
        make_folds(TWO_PATIENTS, 2, 0.25, 0, value, cohort="st")
    assert exc.value.field == field and repr(value) in exc.value.message and fix in exc.value.message
    assert set(make_folds(TWO_PATIENTS, 2, 0.25, 0, "none")["validation"]) == {"none"}
    assert not (make_folds(TWO_PATIENTS, 2, 0.25, 0, "none")["partition"] == "val").any()
    three = _samples([1, 2, 1, 3], 10)
    assert set(make_folds(three, 2, 0.25, 0, "sample")["validation"]) == {"sample"}  # honoured though patient works
    assert set(make_folds(three, 2, 0.25, 0)["validation"]) == {"patient"}


def test_plan_is_pure_and_names_the_fold_count_that_works():
    plans = plan_folds({"A": ["A1"], "B": ["B1", "B2"]}, 2)
    assert [p.validation for p in sorted(plans, key=lambda p: p.test_patients)] == ["sample", "none"]
    with pytest.raises(InputError) as exc:
        plan_folds({"A": ["A1"], "B": ["B1", "B2"]}, 3, cohort="x")
    assert exc.value.field == "splits.n_folds"
    assert "3 folds need >= 3 patients; cohort 'x' has 2 patient(s) — use n_folds: 2" in exc.value.message
    with pytest.raises(InputError, match="needs >= 2 patients"):
        plan_folds({"A": ["A1", "A2"]}, 2)
    with pytest.raises(InputError, match="splits.validation"):
        plan_folds({"A": ["A1"], "B": ["B1"]}, 2, "by_slide")
    assert [feasible_validation(p, s) for p, s in [(2, 2), (1, 2), (1, 1), (0, 0)]] == ["patient", "sample", "none",
                                                                                         "none"]


@settings(max_examples=60, deadline=None)
@given(spp=st.lists(st.integers(1, 3), min_size=2, max_size=8), seed=st.integers(0, 50), frac=st.floats(0.1, 0.6),
       k=st.integers(2, 4), policy=st.sampled_from(["auto", "patient", "sample", "none"]))
def test_every_cohort_size_either_plans_or_names_the_fix(spp, seed, frac, k, policy):
    """Any cohort with >= n_folds patients gets folds (auto never fails); a set policy either holds in every
    fold or is one InputError; every fold keeps what its policy promises, and breaking a promise is caught."""
    t = _samples(spp, 20, seed)
    if len(spp) < k:
        with pytest.raises(InputError, match="use n_folds" if len(spp) >= 2 else "needs >= 2"):
            make_folds(t, k, frac, seed, policy)
        return
    try:
        folds = make_folds(t, k, frac, seed, policy)
    except InputError as e:
        assert policy in ("patient", "sample") and e.field == "splits.validation"
        return
    for fold, g in folds.groupby("fold"):
        pol = g["validation"].iloc[0]
        assert policy in ("auto", pol)
        train = g[g.partition != "test"]
        assert not set(g.loc[g.partition == "test", "patient_id"]) & set(train["patient_id"])
        assert pol == feasible_validation(train["patient_id"].nunique(), len(train)) or policy != "auto"
        if pol == "patient":
            assert not set(train.loc[train.partition == "fit", "patient_id"]) & set(
                train.loc[train.partition == "val", "patient_id"])
        assert (g.partition == "val").any() == (pol != "none")
        check_fold(g)
        # a broken promise: a test patient's sample moved into training
        bad = g.copy()
        bad.loc[bad.index[bad.partition == "test"][0], "partition"] = "fit"
        if (bad.partition == "test").any() and set(bad.loc[bad.partition == "test", "patient_id"]) & set(
                bad.loc[bad.partition == "fit", "patient_id"]):
            with pytest.raises(AssertionError):
                check_fold(bad)
        if pol == "none":  # a val row in a fold without validation
            extra = g[g.partition == "fit"].iloc[[0]].assign(sample_id="extra", partition="val")
            with pytest.raises(AssertionError, match="validation none"):
                check_fold(pd.concat([g, extra]))
        else:  # validation emptied
            with pytest.raises(AssertionError, match="partition val is empty"):
                check_fold(g.assign(partition=g.partition.replace("val", "fit")))


def test_older_fold_tables_read_with_their_policy_inferred(tmp_path):
    folds = make_folds(TWO_PATIENTS, 2, 0.25, 0)
    p = tmp_path / "old.parquet"
    folds.drop(columns="validation").to_parquet(p)
    back = read_folds(p)
    assert back["validation"].tolist() == folds["validation"].tolist()
    rows = fold_rows(back, 0)
    assert set(rows["validation"]) == set(folds.loc[folds.fold == 0, "validation"])
