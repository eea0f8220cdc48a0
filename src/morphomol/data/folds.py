"""A cohort's fold artifacts: ``splits/fold{k}.parquet`` and a study's ``panels/fold{k}.json``.

Split table columns: ``tile_id`` (unit id), ``sample_id``, ``patient_id``, ``index`` (row of the
sample's unit table and stores), ``partition`` (fit | val | test). Patient grouping is asserted
when the split is written (:mod:`morphomol.splits`) and again when it is read for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json

SPLIT_COLUMNS = ("tile_id", "sample_id", "patient_id", "index", "partition")
PARTITIONS = ("fit", "val", "test")


def read_split(path: str | Path) -> pd.DataFrame:
    """The split table of one fold; InputError for a missing file or column, an unknown partition."""
    p = Path(path)
    if not p.exists():
        raise InputError("split file missing", file=p, expected="output of the splits rule")
    df = pd.read_parquet(p)
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", file=p, field=missing[0], expected=", ".join(SPLIT_COLUMNS))
    bad = sorted(set(df["partition"].astype(str)) - set(PARTITIONS))
    if bad:
        raise InputError(f"unknown partition(s) {bad}", file=p, field="partition", expected="fit | val | test")
    return df


def read_fold_panel(path: str | Path) -> dict[str, Any]:
    """``{"mode", "core": [...], "addon": [...]}`` of one fold."""
    panel = read_json(path, "panel file")
    if not isinstance(panel, dict) or not isinstance(panel.get("core"), list) or not isinstance(panel.get("addon"), list):
        raise InputError("panel file needs 'core' and 'addon' lists", file=path, field="core/addon")
    return panel
