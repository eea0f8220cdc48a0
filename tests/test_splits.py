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
from morphomol.splits import FOLDS_COLUMNS, check_fold, group_kfold, make_folds, write_folds


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
    with pytest.raises(InputError, match="cannot make 4 patient-grouped folds"):
        make_folds(_samples([1, 1, 1], 5), 4)
    f = make_folds(_samples([1] * 5, 5), 4)
    bad = f[f.fold == 0].copy()
    bad = pd.concat([bad, bad.iloc[[0]].assign(sample_id="X", partition="test" if bad.partition.iloc[0] != "test"
                                               else "fit")])
    with pytest.raises(AssertionError, match="two partitions"):
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
