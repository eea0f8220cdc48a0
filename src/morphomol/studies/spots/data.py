"""The spots of a fold as the head and the baselines read them (torch-free).

Inputs are explicit paths (the rule declares them): each sample's unit table and features store, the
cohort's fold table (``splits/folds.parquet``) and the folds' targets JSON, and optionally the cohort's
caption table + embeddings. Row ``i`` of a sample's features store is unit ``{sample}__{i:06d}`` of its unit
table (checked).

* :func:`fold_targets` — a fold's targets document (genes, eval genes, transform);
* :func:`fold_samples` — the samples of each partition of a fold (patient grouping asserted), in the order of
  the unit tables: what the streaming sources of :mod:`morphomol.studies.spots.stream` read, one sample and
  one chunk of rows at a time;
* :class:`UnitRows` — one sample's unit ids, spot totals and rows of target genes (sparse, by row block);
* :func:`load_cohort` / :func:`load_fold` — every unit of the cohort in memory (small cohorts, tests; the
  training job does not use them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.studies.spots.targets import read_targets, transform_counts
from morphomol.util.logs import get_logger

log = get_logger("spots.data")

PARTS = ("fit", "val", "test")


@dataclass(frozen=True)
class FoldTargets:
    fold: int
    genes: list[str]
    eval_genes: list[str]
    transform: str
    target_sum: float
    targets_file: Path
    doc: dict[str, Any]


def fold_targets(targets: str | Path, fold: int) -> FoldTargets:
    """The targets document of fold ``fold`` (InputError when it belongs to another fold)."""
    doc = read_targets(targets)
    if int(doc.get("fold", fold)) != int(fold):
        raise InputError(f"targets of fold {doc.get('fold')}", file=targets, field="fold", expected=str(fold))
    return FoldTargets(fold=int(fold), genes=[str(g) for g in doc["genes"]],
                       eval_genes=[str(g) for g in doc.get("eval_genes") or doc["genes"]],
                       transform=str(doc.get("transform", "log1p")), target_sum=float(doc.get("target_sum", 1e4)),
                       targets_file=Path(targets), doc=doc)


def fold_samples(folds: str | Path, fold: int, samples: Sequence[str]) -> dict[str, list[str]]:
    """partition -> its samples (in ``samples`` order) in fold ``fold``; patient grouping asserted. Every sample
    of the fold table must be in ``samples`` and vice versa."""
    from morphomol.data.folds import sample_partitions

    parts = sample_partitions(folds, fold)
    extra = [s for s in samples if s not in parts]
    if extra:
        raise InputError(f"{len(extra)} sample(s) not in the fold table: {', '.join(extra[:5])}", file=folds,
                         field="sample_id", expected="splits computed over the cohort's current samples")
    missing = [s for s in parts if s not in set(samples)]
    if missing:
        raise InputError(f"no unit table for sample(s) {missing}", file=folds, field="sample_id",
                         expected="a unit table for every sample of the fold table")
    return {p: [s for s in samples if parts[s] == p] for p in PARTS}


class UnitRows:
    """One sample's unit table, read as the training job needs it: unit ids and spot totals (small per-spot
    arrays, read at once) and the raw counts of ``genes`` for a block of rows (sparse rows from the h5ad,
    never the whole matrix)."""

    def __init__(self, path: str | Path, sample: str, genes: Sequence[str]) -> None:
        import h5py
        from anndata.io import read_elem

        self.path, self.sample, self.genes = Path(path), str(sample), list(genes)
        if not self.path.exists():
            raise InputError("unit table not found", file=self.path, expected="units.h5ad written by the pipeline")
        try:
            with h5py.File(self.path, "r") as f:
                obs = f["obs"]
                self.ids = np.asarray(read_elem(obs[obs.attrs["_index"]])).astype(str)
                if "n_counts" not in obs:
                    raise InputError("unit table lacks obs column 'n_counts'", file=self.path, field="obs.n_counts",
                                     expected="a unit table written by spots_units")
                self.totals = np.asarray(read_elem(obs["n_counts"]))
                var = f["var"]
                names = [str(g) for g in np.asarray(read_elem(var[var.attrs["_index"]]))]
        except InputError:
            raise
        except Exception as exc:  # h5py raises several types for damaged files
            raise InputError(f"cannot read unit table ({type(exc).__name__}: {exc})", file=self.path) from None
        pos = {g: i for i, g in enumerate(names)}
        miss = [g for g in self.genes if g not in pos]
        if miss:
            raise InputError(f"{len(miss)} target gene(s) not in the unit table: {', '.join(miss[:5])}",
                             file=self.path, field="var_names", expected="every target gene in every sample")
        self.cols = np.array([pos[g] for g in self.genes], np.int64)
        n = len(self.ids)
        expect = np.char.add(f"{self.sample}__", np.char.zfill(np.arange(n).astype(str), 6))
        if n and not np.array_equal(self.ids, expect):
            raise InputError("unit ids are not {sample}__{index:06d} in row order", file=self.path, field="obs_names")

    def __len__(self) -> int:
        return len(self.ids)

    def counts(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts (float32 CSR) of rows ``start:stop`` x ``genes``."""
        import h5py
        from anndata.io import sparse_dataset

        with h5py.File(self.path, "r") as f:
            X = f["X"]
            if isinstance(X, h5py.Dataset):
                block = sp.csr_matrix(np.asarray(X[start:stop]))
            else:
                block = sp.csr_matrix(sparse_dataset(X)[start:stop])
        return sp.csr_matrix(block[:, self.cols], dtype=np.float32)

    def targets(self, start: int, stop: int, transform: str, target_sum: float) -> np.ndarray:
        """Transformed targets (float32) of rows ``start:stop``."""
        return transform_counts(self.counts(start, stop), self.totals[start:stop], transform, target_sum)


# ---------------------------------------------------------------------------- whole cohort (small cohorts)
@dataclass
class CohortSpots:
    """Every unit of the cohort (rows in sample order): ids, features, raw counts of ``genes``."""

    unit_ids: list[str]
    sample: np.ndarray
    patient: np.ndarray
    features: np.ndarray | None
    counts: sp.csr_matrix
    totals: np.ndarray
    genes: list[str]
    text: np.ndarray | None = None       # (N, T) caption embeddings (zeros where none)
    has_text: np.ndarray | None = None   # (N,) float32 1 = the spot has a caption
    row: dict[str, int] = field(default_factory=dict)

    def targets(self, genes: Sequence[str], transform: str, target_sum: float, rows: np.ndarray) -> np.ndarray:
        pos = {g: i for i, g in enumerate(self.genes)}
        return transform_counts(self.counts[rows][:, [pos[g] for g in genes]], self.totals[rows], transform, target_sum)


@dataclass
class FoldSpots:
    fold: int
    genes: list[str]
    eval_genes: list[str]
    transform: str
    target_sum: float
    rows: dict[str, np.ndarray]          # partition -> cohort rows
    folds_file: Path
    targets_file: Path
    doc: dict[str, Any]


def load_cohort(units: Mapping[str, str | Path], features: Mapping[str, str | Path] | None, genes: Sequence[str],
                text: tuple[str | Path, str | Path] | None = None) -> CohortSpots:
    """Read every sample (unit tables in ``units`` order) into one :class:`CohortSpots` (memory grows with the
    cohort: tests and small cohorts only)."""
    from morphomol.data.features import read_features
    from morphomol.data.units import read_units

    ids: list[str] = []
    samples, patients, feats, counts, totals = [], [], [], [], []
    genes = list(dict.fromkeys(genes))
    for sample, upath in units.items():
        a = read_units(upath)
        pos = {str(g): i for i, g in enumerate(a.var_names)}
        miss = [g for g in genes if g not in pos]
        if miss:
            raise InputError(f"{len(miss)} target gene(s) not in the unit table: {', '.join(miss[:5])}", file=upath,
                             field="var_names", expected="every target gene in every sample")
        n = a.n_obs
        expect = [f"{sample}__{i:06d}" for i in range(n)]
        if list(a.obs_names.astype(str)) != expect:
            raise InputError("unit ids are not {sample}__{index:06d} in row order", file=upath, field="obs_names")
        ids += expect
        samples += [sample] * n
        patients += list(a.obs["patient_id"].astype(str))
        counts.append(sp.csr_matrix(a.X[:, [pos[g] for g in genes]], dtype=np.float32))
        totals.append(a.obs["n_counts"].to_numpy(np.float64))
        if features is not None:
            if sample not in features:
                raise InputError(f"no features store for sample {sample}", field="features")
            f, _ = read_features(features[sample])
            if f.shape[0] != n:
                raise InputError(f"{f.shape[0]} feature rows for {n} units", file=features[sample], field="features",
                                 expected="one row per unit of " + str(upath))
            feats.append(f)
    spots = CohortSpots(unit_ids=ids, sample=np.array(samples, dtype=object), patient=np.array(patients, dtype=object),
                        features=np.concatenate(feats) if feats else None, counts=sp.vstack(counts).tocsr(),
                        totals=np.concatenate(totals), genes=genes, row={u: i for i, u in enumerate(ids)})
    if text is not None:
        from morphomol.studies.spots.text import read_text

        table, emb = read_text(*text)
        spots.text = np.zeros((len(ids), emb.shape[1]), np.float32)
        spots.has_text = np.zeros(len(ids), np.float32)
        where = np.array([spots.row.get(u, -1) for u in table["unit_id"].astype(str)])
        if (where < 0).any():
            raise InputError(f"{int((where < 0).sum())} captioned unit(s) are not units of the cohort", file=text[0],
                             field="unit_id")
        spots.text[where] = emb
        spots.has_text[where] = 1.0
    return spots


def load_fold(spots: CohortSpots, fold: int, folds: str | Path, targets: str | Path) -> FoldSpots:
    """The fold's partitions (as cohort rows) and targets; asserts the patient grouping. ``folds``: the
    cohort's fold table (``splits/folds.parquet``)."""
    from morphomol.data.folds import unit_split
    from morphomol.splits import check_fold

    t = fold_targets(targets, fold)
    order = list(dict.fromkeys(spots.sample.tolist()))
    ids = np.asarray(spots.unit_ids, dtype=object)
    units = {}
    for s in order:
        rows = np.flatnonzero(spots.sample == s)
        units[s] = (ids[rows], np.arange(len(rows), dtype=np.int64))
    s = unit_split(folds, fold, units, file=folds)
    check_fold(s, fold=int(fold))
    where = np.array([spots.row.get(str(u), -1) for u in s["tile_id"]])
    if (where < 0).any() or len(where) != len(spots.unit_ids):
        raise InputError("split units differ from the cohort's unit tables", file=folds, field="tile_id",
                         expected="the splits of these unit tables")
    rows = {p: where[(s["partition"] == p).to_numpy()] for p in PARTS}
    return FoldSpots(fold=int(fold), genes=t.genes, eval_genes=t.eval_genes, transform=t.transform,
                     target_sum=t.target_sum, rows=rows, folds_file=Path(folds), targets_file=Path(targets), doc=t.doc)


def union_genes(targets: Sequence[str | Path]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out += [str(g) for g in read_targets(t)["genes"]]
    return list(dict.fromkeys(out))
