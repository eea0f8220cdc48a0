"""The cohort split (rule ``splits``): every fold at once from the unit tables' sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scale import Stage

UNITS_PER_SAMPLE = 10_000


def prepare(n: int, work: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from morphomol.data.units import write_units

    units, samples, patients = [], [], []
    k = UNITS_PER_SAMPLE
    obs = pd.DataFrame({"index": np.arange(k)})
    for i in range(n):
        s = f"S{i:06d}"
        p = work / s / "units.h5ad"
        p.parent.mkdir(parents=True)
        o = obs.copy()
        o.index = [f"{s}__{j:06d}" for j in range(k)]
        write_units(p, o, sp.csr_matrix((k, 0), dtype=np.float32), [], spatial_um=np.zeros((k, 2)), unit="tile", sample=s)
        units.append(str(p))
        samples.append(s)
        patients.append(f"P{i // 2:06d}")
    return {"units": units, "samples": samples, "patients": patients, "out": str(work / "splits" / "folds.parquet")}


def run(kw: dict[str, Any], work: Path) -> None:
    from morphomol.config import SplitsConfig
    from morphomol.splits import write_folds

    write_folds(units=kw["units"], samples=kw["samples"], patients=kw["patients"], out=kw["out"],
                cfg=SplitsConfig(n_folds=4, val_fraction=0.25), seed=0)


STAGES = [Stage(name="splits", unit="samples", quick=(50, 100, 200), full=(200, 1000, 4000), seed_n=10_000,
                prepare=prepare, run=run,
                note=f"{UNITS_PER_SAMPLE:,} units per sample; 4 folds; writes folds.parquet (folds x samples)")]
