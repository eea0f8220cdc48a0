"""The cohort's spots in memory for the head and the baselines: features, counts of the target genes,
caption embeddings, and per fold the fit / val / test partitions (patient grouping asserted).

Inputs are explicit paths (the rule declares them): each sample's unit table and features store, the
folds' split parquet and targets JSON, and optionally the cohort's caption table + embeddings. Row ``i``
of a sample's features store is unit ``{sample}__{i:06d}`` of its unit table (checked).
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
    split_file: Path
    targets_file: Path
    doc: dict[str, Any]


def load_cohort(units: Mapping[str, str | Path], features: Mapping[str, str | Path] | None, genes: Sequence[str],
                text: tuple[str | Path, str | Path] | None = None) -> CohortSpots:
    """Read every sample (unit tables in ``units`` order) into one :class:`CohortSpots`."""
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
            f, attrs = read_features(features[sample])
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


def load_fold(spots: CohortSpots, fold: int, split: str | Path, targets: str | Path) -> FoldSpots:
    """The fold's partitions (as cohort rows) and targets; asserts the patient grouping."""
    from morphomol.data.folds import read_split
    from morphomol.splits import check_fold

    s = read_split(split)
    check_fold(s)
    doc = read_targets(targets)
    if int(doc.get("fold", fold)) != int(fold):
        raise InputError(f"targets of fold {doc.get('fold')}", file=targets, field="fold", expected=str(fold))
    where = np.array([spots.row.get(str(t), -1) for t in s["tile_id"]])
    if (where < 0).any() or len(where) != len(spots.unit_ids):
        raise InputError("split units differ from the cohort's unit tables", file=split, field="tile_id",
                         expected="the splits of these unit tables")
    rows = {p: where[(s["partition"] == p).to_numpy()] for p in ("fit", "val", "test")}
    return FoldSpots(fold=int(fold), genes=[str(g) for g in doc["genes"]],
                     eval_genes=[str(g) for g in doc.get("eval_genes") or doc["genes"]],
                     transform=str(doc.get("transform", "log1p")), target_sum=float(doc.get("target_sum", 1e4)),
                     rows=rows, split_file=Path(split), targets_file=Path(targets), doc=doc)


def union_genes(targets: Sequence[str | Path]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out += [str(g) for g in read_targets(t)["genes"]]
    return list(dict.fromkeys(out))
