"""The spots study's jobs whose inputs grow with the cohort (issue 22): fold targets, head training, the
per-sample outputs. ``n`` = spots of the cohort; samples of ``SAMPLE_SPOTS`` spots (at least 4: one per
fold), one patient per sample, the fold table written by ``splits.write_folds``.

* ``spots_targets`` (rule ``spots_targets``, one fold): Moran's I targets on the fold's training samples,
  streamed one sample at a time (per-sample detection and Moran's I on the sample's 6-NN spot graph, then the
  spot-weighted reduce, then the target variances). Unit tables written by ``data.units.write_units``:
  ``TARGET_GENES`` genes, sparse Poisson-lognormal counts (about ``DETECTED`` genes detected per spot, a
  Visium-like depth), 1,000 targets chosen.
* ``spots_train`` (rule ``spots_train``): a linear head on cached ``DIM``-d features (``write_features``,
  chunks of 256 rows), 1,000 target genes read as sparse rows of the unit tables, 4 folds x 1 seed x 2
  epochs, then each fold's test predictions (written by sample) and the setting's metrics / predictions
  files. The spots buffer of a partition is ``TRAIN_BUFFER_MB`` here (the rule's default,
  ``stream.BUFFER_MB``, is 512 MB: at most three partitions' buffers, a constant on top of these figures),
  so that the measured sizes stream as the seeds' cohort does.
* ``spots_outputs`` (rule ``spots_outputs``): per-sample AnnData + maps of every sample from a reference
  setting and three baselines' ``predictions.parquet`` (1,000 genes; written by sample as the runs write
  them), read one sample at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scale import Stage

N_FOLDS = 4
SAMPLE_SPOTS = 1_000
TARGET_GENES = 20_000
DETECTED = 1_000
N_TARGETS = 1_000
DIM = 1536
TRAIN_BUFFER_MB = 64.0
FEATURE_CHUNK_ROWS = 256


def _samples(n: int, per: int = SAMPLE_SPOTS, min_samples: int = N_FOLDS) -> list[tuple[str, int]]:
    k = max(min_samples, -(-n // per))
    return [(f"S{i:05d}", n // k + (1 if i < n % k else 0)) for i in range(k)]


def _write_units(path: Path, sample: str, n: int, genes: list[str], density: float, rng: Any) -> None:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from morphomol.data.units import write_units

    g = len(genes)
    nnz = int(n * g * density)
    rows = rng.integers(0, n, nnz)
    # genes with a skewed (lognormal) expression level: some detected everywhere, most rarely
    w = rng.lognormal(0.0, 2.0, g)
    cols = rng.choice(g, nnz, p=w / w.sum())
    X = sp.csr_matrix((rng.poisson(1.5, nnz).astype(np.float32) + 1, (rows, cols)), shape=(n, g))
    X.sum_duplicates()
    side = int(np.ceil(np.sqrt(n)))
    ij = np.stack([np.arange(n) // side, np.arange(n) % side], axis=1).astype(np.float64)
    obs = pd.DataFrame({"index": np.arange(n), "n_counts": np.asarray(X.sum(axis=1)).ravel(),
                        "patient_id": f"P{sample}"}, index=[f"{sample}__{i:06d}" for i in range(n)])
    write_units(path, obs, X, genes, spatial_um=ij * 100.0, unit="spot", sample=sample, patient=f"P{sample}")


def _folds(units: dict[str, str], work: Path) -> str:
    from morphomol.config import SplitsConfig
    from morphomol.splits import write_folds

    out = work / "splits" / "folds.parquet"
    write_folds(units=list(units.values()), samples=list(units), patients=[f"P{s}" for s in units], out=out,
                cfg=SplitsConfig(n_folds=N_FOLDS, val_fraction=0.25), seed=0)
    return str(out)


def _targets_doc(path: Path, k: int, genes: list[str]) -> str:
    from morphomol.util.jsonio import write_json

    write_json(path, {"fold": k, "mode": "moran", "transform": "log1p", "target_sum": 1e4, "genes": genes,
                      "eval_genes": genes[:50]})
    return str(path)


# ----------------------------------------------------------------------------- targets
def prepare_targets(n: int, work: Path) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    genes = [f"G{j:05d}" for j in range(TARGET_GENES)]
    units = {}
    for s, m in _samples(n):
        units[s] = str(work / "samples" / s / "units.h5ad")
        _write_units(Path(units[s]), s, m, genes, DETECTED / TARGET_GENES, rng)
    return {"units": units, "folds": _folds(units, work)}


def run_targets(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.spots.config import TargetOptions
    from morphomol.studies.spots.targets import write_targets

    write_targets(folds=kw["folds"], units=kw["units"], fold=0, out=work / "targets" / "fold0.json",
                  cfg=TargetOptions(mode="moran", n_genes=N_TARGETS))


# ----------------------------------------------------------------------------- training
def prepare_train(n: int, work: Path) -> dict[str, Any]:
    import numpy as np

    from morphomol.data.features import write_features

    rng = np.random.default_rng(0)
    genes = [f"G{j:05d}" for j in range(N_TARGETS)]
    units, feats = {}, {}
    for s, m in _samples(n):
        units[s] = str(work / "samples" / s / "units.h5ad")
        _write_units(Path(units[s]), s, m, genes, 0.2, rng)
        feats[s] = str(work / "features" / f"{s}.zarr")
        write_features(feats[s], rng.normal(size=(m, DIM)).astype(np.float32), encoder="bench",
                       chunk_rows=FEATURE_CHUNK_ROWS)
    targets = [_targets_doc(work / "targets" / f"fold{k}.json", k, genes) for k in range(N_FOLDS)]
    return {"units": units, "features": feats, "folds": _folds(units, work), "targets": targets}


def run_train(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.spots.config import HeadTraining
    from morphomol.studies.spots.settings import as_setting
    from morphomol.studies.spots.train import SpotsInputs, run_spot_setting

    inputs = SpotsInputs(units={s: Path(p) for s, p in kw["units"].items()},
                         features={s: Path(p) for s, p in kw["features"].items()}, folds=Path(kw["folds"]),
                         targets=[Path(t) for t in kw["targets"]])
    setting = as_setting({"role": "reference", "head": {"hidden": []}}, "linear")
    run_spot_setting(setting, inputs, out_metrics=work / "runs" / "linear" / "metrics.json",
                     out_predictions=work / "runs" / "linear" / "predictions.parquet",
                     training=HeadTraining(epochs=2, batch_size=256, lr=1e-3, patience=5, save_checkpoints="none"),
                     seeds=[0], encoder="bench", threads=1, device="cpu", buffer_mb=TRAIN_BUFFER_MB)


# ----------------------------------------------------------------------------- outputs
def prepare_outputs(n: int, work: Path) -> dict[str, Any]:
    import numpy as np

    from morphomol.data.folds import held_out_fold
    from morphomol.studies.spots.predictions import write_sample_predictions

    rng = np.random.default_rng(0)
    genes = [f"G{j:05d}" for j in range(N_TARGETS)]
    units = {}
    sizes = dict(_samples(n))
    for s, m in sizes.items():
        units[s] = str(work / "samples" / s / "units.h5ad")
        _write_units(Path(units[s]), s, m, genes, 0.2, rng)
    folds = _folds(units, work)
    targets = [_targets_doc(work / "targets" / f"fold{k}.json", k, genes) for k in range(N_FOLDS)]
    fold_of = held_out_fold(folds)
    preds = {}
    for name in ("seed_head", "mean", "ridge_hest", "ridge_cv"):
        out = work / "runs" / name / "predictions.parquet"
        ids = [f"{s}__{i:06d}" for k in range(N_FOLDS) for s in units if fold_of[s] == k for i in range(sizes[s])]
        y = rng.normal(size=(len(ids), N_TARGETS)).astype(np.float32)
        write_sample_predictions(out, ids, genes, y, y + rng.normal(size=y.shape).astype(np.float32))
        preds[name] = str(out)
    return {"units": units, "folds": folds, "targets": targets, "predictions": preds}


def run_outputs(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.spots.outputs import write_spot_outputs

    write_spot_outputs(units=kw["units"], folds=kw["folds"], targets=kw["targets"], predictions=kw["predictions"],
                       reference="seed_head", out_samples=work / "out" / "samples", out_maps=work / "out" / "maps",
                       map_samples=2)


STAGES = [
    Stage("spots_targets", "spots", quick=(4_000, 8_000, 16_000), full=(16_000, 32_000, 64_000), seed_n=200_000,
          prepare=prepare_targets, run=run_targets,
          note=f"Moran's I, {TARGET_GENES:,} genes (~{DETECTED:,} detected per spot), {SAMPLE_SPOTS:,}-spot samples, "
               f"{N_TARGETS} targets, one fold"),
    Stage("spots_train", "spots", quick=(4_000, 8_000, 16_000), full=(25_000, 50_000, 100_000), seed_n=200_000,
          prepare=prepare_train, run=run_train,
          note=f"linear head, {DIM}-d features, {N_TARGETS} genes, {N_FOLDS} folds x 1 seed x 2 epochs, "
               f"{TRAIN_BUFFER_MB:g} MB buffers"),
    Stage("spots_outputs", "spots", quick=(4_000, 8_000, 16_000), full=(25_000, 50_000, 100_000), seed_n=200_000,
          prepare=prepare_outputs, run=run_outputs,
          note=f"4 settings' predictions x {N_TARGETS} genes, {SAMPLE_SPOTS:,}-spot samples, 2 maps"),
]
