"""Stages of the cells study (issue 22): one fold's HVGs + cell sentences (rule ``cells_fold``) and one fold's
baselines (rule ``cells_baselines``), on a cohort of ``n`` cells. (The donor-level fold assignment, rule
``cells_split``, reads obs columns only: ``_run_split`` measures it when called directly.)

Inputs: ``max(8, n // 20,000)`` samples (one donor each), written with :func:`morphomol.data.units.write_units`
in the layout of the ``cells_units`` rule (obs ``sample_id, patient_id, label, ..., has_image``, CSR counts):
20,000 genes, ~1,000 expressed per cell (5 %, integer counts drawn from a skewed gene distribution with 8
cell types and 100 marker genes each); every fourth sample has 32 px H&E patches (zarr image store, the
``cells_patches`` layout). The fold job selects 2,000 HVGs (``seurat_v3``) and writes 100-gene sentences; the
baselines job (``max_cells: null``: every val / test cell is predicted) runs with ``max_reference: 5,000`` so
that the three sizes measure the asymptotic behaviour (a 50,000-cell reference, the default, adds a constant
~0.6 GB: a dense 50 k x 2,000 float32 PCA input). At the quick sizes the start-up (imports, ~2-4 s) is a
large part of the time, so the fitted exponent understates the marginal cost; the full sizes measure it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scale import Stage

GENES = 20_000
DRAWS = 1_300            # multinomial draws per cell (~1,000 distinct genes: 5 % density)
TYPES = 8
MARKERS = 100
CELLS_PER_SAMPLE = 20_000
PATCH_PX = 32
N_HVG = 2_000
N_GENES = 100
SEED_N = 1_700_000


def _cfg(**baselines: Any) -> Any:
    from morphomol.config import default_sections

    return default_sections(cells={"n_hvg": N_HVG, "n_genes": N_GENES, "baselines": baselines}, splits={"n_folds": 4, "val_fraction": 0.25})


def _write_cohort(n: int, workdir: Path) -> dict[str, Any]:
    import pandas as pd
    import scipy.sparse as sp
    import zarr

    from morphomol.data.units import write_units

    rng = np.random.default_rng(0)
    base = np.exp(rng.normal(0.0, 1.5, GENES))
    probs = []
    for t in range(TYPES):
        p = base.copy()
        p[rng.choice(GENES, MARKERS, replace=False)] *= 20.0
        probs.append(np.cumsum(p / p.sum()))
    n_samples = max(8, n // CELLS_PER_SAMPLE)
    sizes = np.full(n_samples, n // n_samples)
    sizes[: n - sizes.sum()] += 1
    genes = [f"G{g:05d}" for g in range(GENES)]
    units, stores = {}, {}
    for i, m in enumerate(sizes.tolist()):
        s = f"S{i:03d}"
        types = rng.integers(0, TYPES, m)
        draws = np.empty((m, DRAWS), np.int64)
        for t in range(TYPES):
            rows = np.flatnonzero(types == t)
            draws[rows] = np.searchsorted(probs[t], rng.random((len(rows), DRAWS)))
        draws = np.minimum(draws, GENES - 1)
        key, counts = np.unique(draws + (np.arange(m, dtype=np.int64) * GENES)[:, None], return_counts=True)
        row, col = np.divmod(key, GENES)
        X = sp.csr_matrix((counts.astype(np.float32), (row, col)), shape=(m, GENES))
        has_image = i % 4 == 3
        labels = np.asarray([f"type{t}" for t in range(TYPES)], dtype=object)[types]
        obs = pd.DataFrame({"sample_id": s, "patient_id": f"D{i:03d}", "label": labels, "raw_label": labels,
                            "cell_id": [f"c{j}" for j in range(m)], "index": np.arange(m, dtype=np.int64),
                            "source_row": np.arange(m, dtype=np.int64), "has_image": has_image,
                            "x_um": rng.random(m) * 1000, "y_um": rng.random(m) * 1000,
                            "he_x_px": np.nan, "he_y_px": np.nan, "n_counts": np.asarray(X.sum(1)).ravel(),
                            "n_genes": np.diff(X.indptr)}, index=[f"{s}__{j:06d}" for j in range(m)])
        path = workdir / s / "units.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_units(path, obs, X, genes, spatial_um=obs[["x_um", "y_um"]].to_numpy(), unit="cell", sample=s,
                    uns={"values": "counts", "source": "h5ad"})
        units[s] = str(path)
        if has_image:
            g = zarr.open_group(str(workdir / s / "images.zarr"), mode="w", zarr_format=3)
            arr = g.create_array("images", shape=(m, PATCH_PX, PATCH_PX, 3), chunks=(256, PATCH_PX, PATCH_PX, 3),
                                 dtype="uint8")
            for lo in range(0, m, 4096):
                hi = min(lo + 4096, m)
                arr[lo:hi] = (rng.integers(0, 256, (hi - lo, 1, 1, 3)) * np.ones((1, PATCH_PX, PATCH_PX, 1))).astype(
                    np.uint8)
            stores[s] = str(workdir / s / "images.zarr")
    return {"units": units, "stores": stores}


def _prepare_split(n: int, workdir: Path) -> dict[str, Any]:
    return _write_cohort(n, workdir)


def _run_split(kw: dict[str, Any], workdir: Path) -> None:
    from morphomol.studies.cells.folds import write_folds

    write_folds(units=list(kw["units"].values()), out=workdir / "folds.parquet", splits=_cfg().splits, seed=0)


def _prepare_fold(n: int, workdir: Path) -> dict[str, Any]:
    kw = _write_cohort(n, workdir)
    _run_split(kw, workdir)
    return kw


def _run_fold(kw: dict[str, Any], workdir: Path) -> None:
    from morphomol.studies.cells.folds import write_fold

    write_fold(units=list(kw["units"].values()), folds=workdir / "folds.parquet", fold=0,
               out_table=workdir / "fold0.parquet", out_meta=workdir / "fold0.json", cfg=_cfg().cells)


def _prepare_baselines(n: int, workdir: Path) -> dict[str, Any]:
    kw = _prepare_fold(n, workdir)
    _run_fold(kw, workdir)
    return kw


def _run_baselines(kw: dict[str, Any], workdir: Path) -> None:
    from morphomol.studies.cells.baselines import run_baselines

    cfg = _cfg(max_reference=5000).cells
    run_baselines(fold_table=workdir / "fold0.parquet", fold_meta=workdir / "fold0.json", units=kw["units"],
                  image_stores=kw["stores"], out_predictions=workdir / "bl.parquet", out_metrics=workdir / "bl.json",
                  cfg=cfg.baselines, max_cells=None, seed=0)


NOTE = f"{GENES:,} genes, ~5 % expressed, {N_HVG:,} HVGs, {N_GENES}-gene sentences, 4 folds, 1/4 samples with patches"
STAGES = [
    Stage("cells_fold", "cells", (10_000, 20_000, 40_000), (40_000, 160_000, 640_000), SEED_N, _prepare_fold,
          _run_fold, note="one fold: streamed HVG sums (seurat_v3) + vectorised sentences; " + NOTE),
    Stage("cells_baselines", "cells", (10_000, 20_000, 40_000), (40_000, 160_000, 640_000), SEED_N,
          _prepare_baselines, _run_baselines,
          note="one fold: sparse logreg x2, kNN (reference 5,000), image/both (<= 5,000), every val/test cell; " + NOTE),
]
