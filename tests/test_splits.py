"""Grouped outer folds and inner validation splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from morphomol.errors import InputError
from morphomol.config import SplitsConfig
from morphomol.data.units import write_units
from morphomol.splits import check_fold, make_splits, split_fold


def _tiles(samples_per_patient, tiles_per_sample, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    s = 0
    for p, ns in enumerate(samples_per_patient):
        for _ in range(ns):
            n = int(rng.integers(1, tiles_per_sample + 1))
            rows += [(f"S{s}__{i:06d}", f"S{s}", f"P{p}", i) for i in range(n)]
            s += 1
    return pd.DataFrame(rows, columns=["tile_id", "sample_id", "patient_id", "index"])


def _invariants(folds, key):
    ids = folds[0]["tile_id"]
    n_test = sum((f["partition"] == "test").to_numpy().astype(int) for f in folds)
    assert (n_test == 1).all()
    for f in folds:
        assert (f["tile_id"] == ids).all()
        assert set(f["partition"]) == {"fit", "val", "test"}
        assert (f.groupby("sample_id")["partition"].nunique() == 1).all()
        if key == "patient_id":
            assert (f.groupby("patient_id")["partition"].nunique() == 1).all()


@settings(max_examples=30, deadline=None)
@given(spp=st.lists(st.integers(1, 3), min_size=4, max_size=12), seed=st.integers(0, 100),
       frac=st.floats(0.1, 0.5))
def test_patient_grouped_folds(spp, seed, frac):
    t = _tiles(spp, 20, seed)
    folds, key = make_splits(t, 4, frac, seed)
    assert key == "patient_id"
    _invariants(folds, key)


def test_fewer_patients_than_folds_is_an_error():
    """Folds are never grouped by anything finer than the patient (no silent sample-level fallback)."""
    t = _tiles([2, 1, 2], 30)  # 3 patients, 5 samples, 4 folds
    with pytest.raises(InputError) as exc:
        make_splits(t, 4, 0.25, 0)
    assert exc.value.field == "splits.n_folds" and "3 patient" in exc.value.message
    folds, key = make_splits(t, 3, 0.25, 0)
    assert key == "patient_id"
    _invariants(folds, key)
    for f in folds:  # validation patients never also in fit when grouping val by patient
        tv = f[f.partition != "test"]
        if tv.patient_id.nunique() >= 2:
            assert (tv.groupby("patient_id")["partition"].nunique() == 1).all()


def test_deterministic_and_seeded():
    t = _tiles([1] * 10, 10)
    a, _ = make_splits(t, 4, 0.25, 0)
    b, _ = make_splits(t, 4, 0.25, 0)
    assert all(x.equals(y) for x, y in zip(a, b))
    c, _ = make_splits(t, 4, 0.25, 1)
    assert any(not x["partition"].equals(y["partition"]) for x, y in zip(a, c))


def test_errors_and_check():
    with pytest.raises(InputError, match="cannot make 4 patient-grouped folds"):
        make_splits(_tiles([1, 1, 1], 5), 4)
    t = _tiles([1] * 5, 5)
    f, _ = make_splits(t, 4)
    bad = f[0].copy()
    bad.loc[bad.index[0], "partition"] = "test" if bad["partition"].iloc[0] != "test" else "fit"
    with pytest.raises(AssertionError, match="two partitions"):
        check_fold(bad)


def test_rule_entry_reads_unit_tables(tmp_path):
    paths, samples, patients = [], [], []
    for s in range(5):
        p = tmp_path / f"S{s}.h5ad"
        obs = pd.DataFrame({"tile_id": [f"S{s}__{i:06d}" for i in range(7)], "index": np.arange(7)})
        write_units(p, obs, np.ones((7, 2)), ["g1", "g2"], spatial_um=np.zeros((7, 2)), unit="tile", sample=f"S{s}",
                    index_col="tile_id")
        paths.append(p)
        samples.append(f"S{s}")
        patients.append(f"P{s % 4}")
    cfg = SplitsConfig(n_folds=4, val_fraction=0.25)
    outs = [tmp_path / f"splits/fold{k}.parquet" for k in range(4)]
    for k, o in enumerate(outs):
        split_fold(units=paths, samples=samples, patients=patients, fold=k, out=o, cfg=cfg, seed=0)
    folds = [pd.read_parquet(o) for o in outs]
    assert list(folds[0].columns) == ["tile_id", "sample_id", "patient_id", "index", "partition"]
    assert folds[0]["tile_id"].tolist()[:2] == ["S0__000000", "S0__000001"]
    _invariants(folds, "patient_id")
    with pytest.raises(InputError, match="out of range"):
        split_fold(units=paths, samples=samples, patients=patients, fold=4, out=tmp_path / "x.parquet", cfg=cfg)
