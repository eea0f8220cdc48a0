"""The ridge baselines out of core: rule ``fusion_ridge`` (one fold) and rule ``spots_baseline`` (``ridge_cv``,
every fold; the heaviest baseline: inner patient-grouped CV over 17 alphas).

Inputs written with the project's writers: per sample a unit table (``write_units``: sparse raw counts), a
features store (``write_features``, float32, chunks of 1,024 rows as the features rule writes them), the
fold table (``write_folds``: 4 patient-grouped folds), the fusion panel (100 add-on genes, the seed's panel:
380 core + 100 add-on) or the spots targets documents (``write_targets``, mode yaml: the seed's 1,000 target
genes, 50 eval genes). Samples of a fixed size (``UNITS_PER_SAMPLE``; at least 8 samples), one patient each:
n grows with the number of samples, as a cohort does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scale import Stage

DIM = 1536
UNITS_PER_SAMPLE = 1_250
FEATURE_CHUNK_ROWS = 1_024
N_FOLDS = 4
FUSION_CORE, FUSION_ADDON = 380, 100
SPOTS_GENES, SPOTS_TARGETS, SPOTS_EVAL = 1_500, 1_000, 50


def _samples(n: int) -> list[tuple[str, int]]:
    """At least 8 samples (6 training patients per fold: 5 inner folds at every size), else of
    ``UNITS_PER_SAMPLE`` units."""
    k = max(2 * N_FOLDS, -(-n // UNITS_PER_SAMPLE))
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [(f"S{i:05d}", m) for i, m in enumerate(sizes)]


def _write_cohort(n: int, work: Path, n_genes: int, unit: str, seed: int) -> dict[str, Any]:
    """Unit tables + features stores + the fold table of ``n`` units; returns paths and gene names."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from morphomol.config import SplitsConfig
    from morphomol.data.features import write_features
    from morphomol.data.units import write_units
    from morphomol.splits import write_folds

    rng = np.random.default_rng(seed)
    genes = [f"G{j:05d}" for j in range(n_genes)]
    mix = rng.normal(size=(32, DIM)).astype(np.float32)
    load = rng.normal(size=(32, n_genes)) * 0.3
    units, feats, samples, patients = {}, {}, [], []
    for s, m in _samples(n):
        lat = rng.normal(size=(m, 32)).astype(np.float32)
        x = (lat @ mix + rng.normal(size=(m, DIM)).astype(np.float32) + 0.5).astype(np.float32)
        rate = np.exp(np.clip(lat @ load - 2.0, -6, 3))
        counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
        ids = [f"{s}__{i:06d}" for i in range(m)]
        obs = pd.DataFrame({"index": np.arange(m), "n_counts": np.asarray(counts.sum(1)).ravel()}, index=ids)
        up = work / "samples" / s / "units.h5ad"
        write_units(up, obs, counts, genes, spatial_um=np.zeros((m, 2)), unit=unit, sample=s, patient=f"P{s}")
        fp = work / "features" / f"{s}.zarr"
        write_features(fp, x, encoder="uni2h", chunk_rows=FEATURE_CHUNK_ROWS)
        units[s], feats[s] = str(up), str(fp)
        samples.append(s)
        patients.append(f"P{s}")
    folds = work / "splits" / "folds.parquet"
    write_folds(units=list(units.values()), samples=samples, patients=patients, out=folds,
                cfg=SplitsConfig(n_folds=N_FOLDS, val_fraction=0.25), seed=0)
    return {"units": units, "features": feats, "folds": str(folds), "genes": genes}


def prepare_fusion(n: int, work: Path) -> dict[str, Any]:
    from morphomol.util.jsonio import write_json

    c = _write_cohort(n, work, FUSION_CORE + FUSION_ADDON, "tile", seed=1)
    panel = work / "panels" / "fold0.json"
    write_json(panel, {"mode": "yaml", "core": c["genes"][:FUSION_CORE], "addon": c["genes"][FUSION_CORE:]})
    return {**{k: c[k] for k in ("units", "features", "folds")}, "panel": str(panel),
            "out": str(work / "runs" / "ridge_uni2h" / "fold0")}


def run_fusion(kw: dict[str, Any], work: Path) -> None:
    from morphomol.baselines.ridge import run_ridge_fold
    from morphomol.config import RidgeConfig

    out = Path(kw["out"])
    run_ridge_fold(kw["folds"], kw["panel"], kw["units"], kw["features"], out / "metrics.json",
                   out / "predictions.parquet", encoder="uni2h", fold=0,
                   cfg=RidgeConfig(n_components=256, inner_folds=5, select_by="mse", alphas=None))


def prepare_spots(n: int, work: Path) -> dict[str, Any]:
    import yaml

    from morphomol.config import default_sections
    from morphomol.studies.spots.targets import write_targets

    c = _write_cohort(n, work, SPOTS_GENES, "spot", seed=2)
    gfile = work / "targets.yaml"
    gfile.write_text(yaml.safe_dump(c["genes"][:SPOTS_TARGETS]))
    cfg = default_sections(spots={"targets": {"mode": "yaml", "genes_file": str(gfile), "n_genes": SPOTS_TARGETS,
                                              "n_eval_genes": SPOTS_EVAL}}).spots.targets
    targets = []
    for k in range(N_FOLDS):
        t = work / "targets" / f"fold{k}.json"
        write_targets(folds=c["folds"], units=c["units"], fold=k, cfg=cfg, out=t, genes_file=gfile)
        targets.append(str(t))
    return {**{k: c[k] for k in ("units", "features", "folds")}, "targets": targets,
            "out": str(work / "runs" / "ridge_cv")}


def run_spots(kw: dict[str, Any], work: Path) -> None:
    from morphomol.config import RidgeConfig
    from morphomol.studies.spots.baselines import run_spot_baseline
    from morphomol.studies.spots.train import SpotsInputs

    out = Path(kw["out"])
    inputs = SpotsInputs(units={s: Path(p) for s, p in kw["units"].items()},
                         features={s: Path(p) for s, p in kw["features"].items()}, folds=Path(kw["folds"]),
                         targets=[Path(t) for t in kw["targets"]])
    run_spot_baseline("ridge_cv", inputs, out_metrics=out / "metrics.json", out_predictions=out / "predictions.parquet",
                      ridge=RidgeConfig(n_components=256, inner_folds=5, select_by="mse", alphas=None),
                      encoder="uni2h")


STAGES = [
    Stage(name="fusion_ridge", unit="tiles", quick=(5_000, 10_000, 20_000), full=(20_000, 80_000, 320_000),
          seed_n=1_000_000, prepare=prepare_fusion, run=run_fusion,
          note=f"one fold; {DIM}-d float32 features, {FUSION_ADDON} add-on genes ({FUSION_CORE} core), "
               f"{UNITS_PER_SAMPLE:,} tiles per sample, {N_FOLDS} folds, inner CV 5 x 17 alphas, PCA 256"),
    Stage(name="spots_baseline", unit="spots", quick=(5_000, 10_000, 20_000), full=(20_000, 50_000, 100_000),
          seed_n=200_000, prepare=prepare_spots, run=run_spots,
          note=f"ridge_cv, every fold ({N_FOLDS}); {DIM}-d float32 features, {SPOTS_TARGETS} targets "
               f"({SPOTS_EVAL} eval) of {SPOTS_GENES} genes, {UNITS_PER_SAMPLE:,} spots per sample, "
               "inner CV 5 x 17 alphas, PCA 256"),
]
