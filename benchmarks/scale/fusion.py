"""The fusion study's jobs whose inputs grow with the cohort (issue 22): the per-sample predictions job, the
HVG panel and the CPU training path on cached features.

* ``fusion_sample_predictions`` (rule ``fusion_sample_predictions``): one sample's AnnData from 35 settings'
  ``predictions.parquet`` of its fold. ``n`` = the fold's test tiles (every row of each file: tiles x 100
  targets); the sample itself has ``SAMPLE_TILES`` tiles. The files are written by the runs' writer
  (``data.runs.write_predictions`` with ``sample_ids``: a row group per sample); one file is written and
  named for all 35 settings (each setting's file is read on its own, as 35 distinct files would be).
* ``fusion_panel_hvg`` (rule ``fusion_panel``, ``panels.mode: hvg``): seurat_v3 HVGs of the fit samples'
  tiles, streamed from the unit tables (``write_units``: sparse counts of a 480-gene Xenium-size panel).
  ``n`` = tiles of the cohort (samples of ``PANEL_TILES`` tiles, 4 patient-grouped folds: about half fit).
* ``fusion_train_features`` (rule ``fusion_train_cpu``): setting ``morph_vits_fz`` (a linear head on cached
  1536-d features; 380 core + 100 add-on genes), one epoch, then the test predictions and metrics. Inputs:
  token stores (``tokens.write_tokens_zarr``: the tile counts the targets come from), tile tables,
  features stores (``write_features``, chunks of 256 rows as the features rule writes them at batch 256),
  the fold table (``write_folds``), the panel. ``n`` = tiles of the cohort (samples of ``TRAIN_TILES``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scale import Stage

N_FOLDS = 4
N_SETTINGS = 35
N_TARGETS = 100
SAMPLE_TILES = 2_000
PANEL_GENES = 480
PANEL_TILES = 2_500
TRAIN_TILES = 2_000
CORE, ADDON = 380, 100
DIM = 1536
FEATURE_CHUNK_ROWS = 256


def _split_sizes(n: int, per: int, min_samples: int = 2 * N_FOLDS) -> list[tuple[str, int]]:
    k = max(min_samples, -(-n // per))
    return [(f"S{i:05d}", n // k + (1 if i < n % k else 0)) for i in range(k)]


def _folds(units: dict[str, str], work: Path) -> str:
    from morphomol.config import SplitsConfig
    from morphomol.splits import write_folds

    out = work / "splits" / "folds.parquet"
    write_folds(units=list(units.values()), samples=list(units), patients=[f"P{s}" for s in units], out=out,
                cfg=SplitsConfig(n_folds=N_FOLDS, val_fraction=0.25), seed=0)
    return str(out)


# ----------------------------------------------------------------------------- per-sample predictions
def prepare_sample_predictions(n: int, work: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from morphomol.data.runs import write_predictions
    from morphomol.data.units import write_units

    rng = np.random.default_rng(0)
    genes = [f"G{j:03d}" for j in range(N_TARGETS)]
    sample = "S00000"
    others = _split_sizes(max(0, n - SAMPLE_TILES), SAMPLE_TILES, min_samples=1)
    test = [(sample, SAMPLE_TILES)] + [(f"T{s[1:]}", m) for s, m in others if m > 0]
    ids = [f"{s}__{i:06d}" for s, m in test for i in range(m)]
    y = rng.normal(size=(len(ids), N_TARGETS)).astype(np.float32)
    pred = work / "runs" / "fold0" / "predictions.parquet"
    write_predictions(pred, ids, genes, y, y + rng.normal(size=y.shape).astype(np.float32),
                      sample_ids=[i.rpartition("__")[0] for i in ids])
    units = work / "samples" / sample / "units.h5ad"
    counts = rng.poisson(2.0, size=(SAMPLE_TILES, N_TARGETS)).astype(np.float32)
    write_units(units, pd.DataFrame({"index": np.arange(SAMPLE_TILES)}, index=ids[:SAMPLE_TILES]), counts, genes,
                spatial_um=rng.uniform(0, 5000, (SAMPLE_TILES, 2)), unit="tile", sample=sample, patient="P0")
    rows = []  # fold 0 holds the sample as test, fold 1 as fit (its file there is never read)
    for k, part in ((0, "test"), (1, "fit")):
        rows += [{"fold": k, "sample_id": sample, "patient_id": "P0", "n_units": SAMPLE_TILES, "partition": part},
                 {"fold": k, "sample_id": "V", "patient_id": "PV", "n_units": 1, "partition": "val"},
                 {"fold": k, "sample_id": "F", "patient_id": "PF", "n_units": 1,
                  "partition": "fit" if k == 0 else "test"}]
    folds = work / "splits" / "folds.parquet"
    folds.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folds)
    return {"sample": sample, "units": str(units), "folds": str(folds),
            "predictions": {f"setting_{i:02d}": [str(pred), str(pred)] for i in range(N_SETTINGS)},
            "out": str(work / "fusion" / "samples" / f"{sample}.h5ad")}


def run_sample_predictions(kw: dict[str, Any], work: Path) -> None:
    from morphomol.export.predictions import write_sample_predictions

    write_sample_predictions(sample=kw["sample"], units=kw["units"], folds=kw["folds"], predictions=kw["predictions"],
                             out=kw["out"])


# ----------------------------------------------------------------------------- HVG panel
def prepare_panel(n: int, work: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from morphomol.data.units import write_units

    rng = np.random.default_rng(1)
    genes = [f"G{j:03d}" for j in range(PANEL_GENES)]
    mean = np.geomspace(0.02, 20, PANEL_GENES)[rng.permutation(PANEL_GENES)]
    units = {}
    for s, m in _split_sizes(n, PANEL_TILES):
        lam = rng.gamma(1.0, mean, size=(m, PANEL_GENES)).astype(np.float32)
        counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
        p = work / "samples" / s / "units.h5ad"
        write_units(p, pd.DataFrame({"index": np.arange(m)}, index=[f"{s}__{i:06d}" for i in range(m)]), counts,
                    genes, spatial_um=np.zeros((m, 2)), unit="tile", sample=s, patient=f"P{s}")
        units[s] = str(p)
    return {"units": units, "folds": _folds(units, work), "out": str(work / "fusion" / "panels" / "fold0.json")}


def run_panel(kw: dict[str, Any], work: Path) -> None:
    from morphomol.config import PanelsConfig
    from morphomol.panels import panel_fold

    panel_fold(folds=kw["folds"], fold=0, units=kw["units"], panel={"mode": "hvg"}, out=kw["out"],
               cfg=PanelsConfig(mode="hvg", n_hvg_targets=100))


# ----------------------------------------------------------------------------- training on cached features
def _tokens_store(path: Path, m: int, genes: list[str], sample: str, rng: Any) -> None:
    """A token store of ``m`` non-overlapping tiles through the tokens rule's writer: about 100 (patch, gene)
    counts per tile (the tile counts the targets come from)."""
    import numpy as np

    from morphomol.geometry import TileGrid
    from morphomol.tokens import PatchCounts, kept_patch_map, write_tokens_zarr

    side = int(np.ceil(np.sqrt(m)))
    grid = TileGrid(0.0, 0.0, 512.0, 512.0, side, side, 14)
    ti = np.arange(m) % side
    tj = np.arange(m) // side
    pm, npatch = kept_patch_map(grid, ti, tj)
    per = rng.integers(0, 2, npatch)  # at most one gene per patch
    indptr = np.zeros(npatch + 1, np.int64)
    np.cumsum(per, out=indptr[1:])
    gene = rng.integers(0, len(genes), int(indptr[-1])).astype(np.uint16)
    count = rng.integers(1, 4, len(gene)).astype(np.uint32)
    write_tokens_zarr(path, PatchCounts(indptr, gene, count, int(count.sum())), pm, grid, ti, tj, genes, sample,
                      chunk_tiles=64)


def prepare_train(n: int, work: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from morphomol.data.features import write_features
    from morphomol.data.units import write_units
    from morphomol.util.jsonio import write_json

    rng = np.random.default_rng(2)
    genes = [f"G{j:03d}" for j in range(CORE + ADDON)]
    tokens, tables, feats, units = {}, {}, {}, {}
    for s, m in _split_sizes(n, TRAIN_TILES):
        d = work / "samples" / s
        d.mkdir(parents=True, exist_ok=True)
        _tokens_store(d / "tokens.zarr", m, genes, s, rng)
        ids = [f"{s}__{i:06d}" for i in range(m)]
        pd.DataFrame({"tile_id": ids, "index": np.arange(m)}).to_parquet(d / "tiles.parquet", index=False)
        write_features(work / "features" / "vit_s" / f"{s}.zarr",
                       rng.normal(size=(m, DIM)).astype(np.float32), encoder="vit_s", chunk_rows=FEATURE_CHUNK_ROWS)
        # the fold table counts units from the unit tables (ids only, no counts needed here)
        write_units(d / "units.h5ad", pd.DataFrame({"index": np.arange(m)}, index=ids), np.zeros((m, 1)), ["x"],
                    spatial_um=np.zeros((m, 2)), unit="tile", sample=s, patient=f"P{s}")
        tokens[s], tables[s] = str(d / "tokens.zarr"), str(d / "tiles.parquet")
        feats[s], units[s] = str(work / "features" / "vit_s" / f"{s}.zarr"), str(d / "units.h5ad")
    panel = work / "fusion" / "panels" / "fold0.json"
    write_json(panel, {"mode": "yaml", "core": genes[:CORE], "addon": genes[CORE:]})
    return {"tokens": tokens, "tables": tables, "features": feats, "folds": _folds(units, work), "panel": str(panel),
            "out": str(work / "fusion" / "runs" / "morph_vits_fz" / "fold0")}


def run_train(kw: dict[str, Any], work: Path) -> None:
    from morphomol.config import default_sections
    from morphomol.studies.fusion.data import FoldInputs
    from morphomol.studies.fusion.run import run_setting
    from morphomol.studies.fusion.settings import load_settings
    from morphomol.train.checkpoint import RunOutputs
    from morphomol.train.runtime import Runtime

    root = Path(__file__).resolve().parents[2]
    setting = load_settings(root / "config" / "experiments" / "table_a1.yaml")["morph_vits_fz"]
    sec = default_sections(training={"epochs": 1, "warmup_epochs": 0, "num_workers": 0, "patience": 5})
    inputs = FoldInputs(folds=Path(kw["folds"]), fold=0, panel=Path(kw["panel"]),
                        tokens={s: Path(p) for s, p in kw["tokens"].items()},
                        units={s: Path(p) for s, p in kw["tables"].items()},
                        features={"vit_s": {s: Path(p) for s, p in kw["features"].items()}})
    run_setting(setting, inputs, RunOutputs.in_dir(Path(kw["out"])), fold=0, training=sec.training, model=sec.model,
                weights={}, runtime=Runtime(seed=0, threads=1, device="cpu", num_workers=0))


STAGES = [
    Stage("fusion_sample_predictions", "tiles", quick=(10_000, 20_000, 40_000), full=(50_000, 100_000, 200_000),
          seed_n=300_000, prepare=prepare_sample_predictions, run=run_sample_predictions,
          note=f"one sample ({SAMPLE_TILES:,} tiles) from {N_SETTINGS} settings x its fold's predictions "
               f"(n test tiles x {N_TARGETS} targets each)"),
    Stage("fusion_panel_hvg", "tiles", quick=(10_000, 20_000, 40_000), full=(50_000, 100_000, 200_000),
          seed_n=1_000_000, prepare=prepare_panel, run=run_panel,
          note=f"seurat_v3 HVGs (100) of the fit samples' tiles, {PANEL_GENES} genes, samples of {PANEL_TILES:,}"),
    Stage("fusion_train_features", "tiles", quick=(8_000, 16_000, 32_000), full=(25_000, 50_000, 100_000),
          seed_n=1_000_000, prepare=prepare_train, run=run_train,
          note=f"morph_vits_fz on cached {DIM}-d features, {CORE}+{ADDON} genes, 1 epoch + test predictions"),
]
