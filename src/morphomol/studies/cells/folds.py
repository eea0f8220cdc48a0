"""Donor-grouped, label-stratified folds of a cells cohort and each fold's text data (HVGs, cell sentences).

Outer folds: ``StratifiedGroupKFold`` over donors (each cell's ``patient_id`` in the unit tables, which is
the per-cell donor when ``cells.donor_key`` is set), stratified by label x has-image so that every fold
tests each type and, where possible, cells with an H&E patch. Validation: ``splits.val_fraction`` of the
fold's training donors (at least one, leaving one for fitting), chosen with ``(seed, fold)``. Asserted in
code on every fold: no donor in two partitions, every partition non-empty, every donor (so every cell)
``test`` in exactly one fold; at least two cell types among the fit cells (else an InputError).

The assignment is a donor-level computation, done once per cohort (rule ``cells_split``,
:func:`write_folds`): it reads only the obs columns ``patient_id, label, has_image`` of every unit table and
writes ``folds/folds.parquet`` (``fold, patient_id, partition, n_cells``: folds x donors rows). Each fold job
(rule ``cells_fold``, :func:`write_fold`) then streams the unit tables in row blocks: the fit cells' per-gene
sums for the HVGs (:func:`~.sentences.select_hvg_blocks`), then every cell's sentence, written block by
block; its memory is one block plus O(genes), whatever the cohort's size.

``folds/fold{k}.parquet``: the split columns of :mod:`morphomol.data.folds` (``tile_id`` = unit id,
``sample_id, patient_id, index, partition``) + ``label, has_image, sentence, n_sentence_genes`` (row groups
of :data:`ROW_GROUP` cells: :class:`FoldSentences` reads sentences by row group); ``folds/fold{k}.json``:
HVGs, labels, per-partition counts and donors, labels unseen in training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from morphomol.config.sections import SplitsConfig
from morphomol.errors import InputError
from morphomol.studies.cells.config import CellsConfig
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import read_json, write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.folds")

PARTITIONS = ("fit", "val", "test")
#: per-cell columns of a fold table besides the text (the unit-level split columns + label, has_image)
CELL_COLUMNS = ("tile_id", "sample_id", "patient_id", "index", "label", "has_image", "partition")
#: columns of ``folds/folds.parquet`` (one row per fold and donor)
DONOR_FOLD_COLUMNS = ("fold", "patient_id", "partition", "n_cells")
#: cells per parquet row group of a fold table
ROW_GROUP = 4096


# ------------------------------------------------------------------------------ checks
def check_donor_fold(f: pd.DataFrame) -> None:
    """AssertionError unless donors are disjoint across partitions and no partition is empty."""
    n = f.groupby("patient_id")["partition"].nunique()
    if (n > 1).any():
        raise AssertionError(f"donor {n.index[n > 1][0]} appears in two partitions")
    for p in PARTITIONS:
        if not (f["partition"] == p).any():
            raise AssertionError(f"partition {p} is empty")


def check_donor_folds(folds: pd.DataFrame) -> None:
    """AssertionError unless every fold lists the same donors once each, each fold is donor-disjoint with no
    empty partition, and every donor is test in exactly one fold."""
    per_fold = {k: g for k, g in folds.groupby("fold", sort=True)}
    donors = sorted(per_fold[min(per_fold)]["patient_id"])
    for k, g in per_fold.items():
        if sorted(g["patient_id"]) != donors or g["patient_id"].duplicated().any():
            raise AssertionError(f"fold {k} lists other donors than fold {min(per_fold)}")
        check_donor_fold(g)
    n_test = folds[folds["partition"] == "test"].groupby("patient_id").size().reindex(donors, fill_value=0)
    if not (n_test == 1).all():
        bad = n_test[n_test != 1]
        raise AssertionError(f"donor {bad.index[0]} is test in {int(bad.iloc[0])} folds")


# ------------------------------------------------------------------------------ the assignment (donor level)
def donor_folds(donors: np.ndarray, strata: np.ndarray, n_folds: int, val_fraction: float, seed: int) -> pd.DataFrame:
    """``fold, patient_id, partition, n_cells`` of every fold, from each cell's donor and stratum (label x
    has-image): StratifiedGroupKFold over donors, then the validation donors of each fold (asserted)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    donors = np.asarray(donors, dtype=object)
    uniq, inv, n_cells = np.unique(donors, return_inverse=True, return_counts=True)
    if len(uniq) < n_folds + 1:
        raise InputError(f"{len(uniq)} donor(s) cannot make {n_folds} donor-grouped folds with a validation donor",
                         field="splits.n_folds", expected=f"at most {len(uniq) - 1} folds (or more donors)")
    test_fold = np.full(len(uniq), -1, np.int64)
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes with fewer members than folds
        for k, (_, te) in enumerate(skf.split(np.zeros(len(donors)), np.asarray(strata, dtype=object), groups=donors)):
            test_fold[np.unique(inv[te])] = k
    rows = []
    for k in range(n_folds):
        is_test = test_fold == k
        train_donors = sorted(uniq[~is_test].tolist())
        rng = np.random.default_rng([int(seed), k])
        n_val = min(max(int(round(val_fraction * len(train_donors))), 1), len(train_donors) - 1)
        val = set(rng.permutation(np.asarray(train_donors, dtype=object))[:n_val].tolist())
        part = np.where(is_test, "test", np.where(np.isin(uniq, list(val)), "val", "fit"))
        rows.append(pd.DataFrame({"fold": k, "patient_id": uniq.astype(str), "partition": part, "n_cells": n_cells}))
    out = pd.concat(rows, ignore_index=True)
    out["n_cells"] = out["n_cells"].astype(np.int64)
    check_donor_folds(out)
    return out


def _strata(labels: np.ndarray, has_image: np.ndarray) -> np.ndarray:
    """``label|has_image`` per cell (one string object per distinct value)."""
    codes, uniq = pd.factorize(pd.Series(labels, dtype=object).astype(str), sort=False)
    combo = codes.astype(np.int64) * 2 + np.asarray(has_image, bool)
    names = np.asarray([f"{uniq[c // 2]}|{bool(c % 2)}" for c in range(2 * len(uniq))], dtype=object)
    return names[combo]


def make_folds(cells: pd.DataFrame, n_folds: int, val_fraction: float, seed: int) -> list[pd.DataFrame]:
    """Per-cell fold tables (``tile_id, sample_id, patient_id, index, label, has_image, partition``) of the
    donor-level assignment (:func:`donor_folds`); assertions run on every fold."""
    donors = cells["patient_id"].astype(str).to_numpy(object)
    folds = donor_folds(donors, _strata(cells["label"].to_numpy(object), cells["has_image"].to_numpy(bool)),
                        n_folds, val_fraction, seed)
    out = []
    for k in range(n_folds):
        part = folds[folds["fold"] == k].set_index("patient_id")["partition"]
        f = cells[["tile_id", "sample_id", "patient_id", "index", "label", "has_image"]].copy()
        f["partition"] = part.reindex(donors).to_numpy()
        check_donor_fold(f)
        out.append(f)
    return out


def write_folds(*, units: Sequence[str | Path], out: str | Path, splits: SplitsConfig, seed: int) -> pd.DataFrame:
    """Rule entry (``cells_split``): every fold's donor partitions into ``out`` (``folds/folds.parquet``).
    Reads only the obs columns ``patient_id, label, has_image`` of each unit table."""
    from morphomol.studies.cells.matrix import UnitRows

    donors, strata = [], []
    for path in units:
        with UnitRows(path) as u:
            o = u.obs(["patient_id", "label", "has_image"])
        donors.append(o["patient_id"].astype(str).to_numpy(object))
        strata.append(_strata(o["label"].to_numpy(object), o["has_image"].to_numpy(bool)))
    d = np.concatenate(donors) if donors else np.zeros(0, object)
    folds = donor_folds(d, np.concatenate(strata) if strata else d, splits.n_folds, splits.val_fraction, seed)
    with atomic_path(out) as tmp:
        folds.to_parquet(tmp, index=False)
    for k, g in folds.groupby("fold"):
        log.info("fold %d: cells %s, donors %s", k, g.groupby("partition")["n_cells"].sum().to_dict(),
                 g.groupby("partition")["patient_id"].apply(list).to_dict())
    return folds


def read_donor_folds(path: str | Path) -> pd.DataFrame:
    """``folds/folds.parquet`` (InputError for a missing file / column or an unknown partition)."""
    p = Path(path)
    if not p.exists():
        raise InputError("fold assignment missing", file=p, expected="output of the cells_split rule")
    df = pd.read_parquet(p)
    missing = [c for c in DONOR_FOLD_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", file=p, field=missing[0], expected=", ".join(DONOR_FOLD_COLUMNS))
    bad = sorted(set(df["partition"].astype(str)) - set(PARTITIONS))
    if bad:
        raise InputError(f"unknown partition(s) {bad}", file=p, field="partition", expected="fit | val | test")
    df["patient_id"] = df["patient_id"].astype(str)
    return df


# ------------------------------------------------------------------------------ one fold's table
def write_fold(*, units: Sequence[str | Path], folds: str | Path, fold: int, out_table: str | Path,
               out_meta: str | Path, cfg: CellsConfig, nnz_per_block: int | None = None) -> dict[str, Any]:
    """Rule entry (``cells_fold``): fold ``fold``'s table and metadata, streamed over the unit tables' row
    blocks of at most ``nnz_per_block`` stored entries (see the module docstring); the result does not
    depend on the block size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from morphomol.studies.cells.matrix import NNZ_PER_BLOCK, UnitRows, iter_rows
    from morphomol.studies.cells.sentences import (
        column_map,
        common_genes,
        log_normalise,
        select_hvg_blocks,
        sentence_strings,
    )

    block = int(nnz_per_block or NNZ_PER_BLOCK)
    assignment = read_donor_folds(folds)
    n_folds = int(assignment["fold"].max()) + 1 if len(assignment) else 0
    if not 0 <= int(fold) < n_folds:
        raise InputError(f"fold {fold} out of range ({n_folds} folds in the assignment)", file=folds,
                         field="splits.n_folds")
    fold = int(fold)
    a = assignment[assignment["fold"] == fold]
    part_of = dict(zip(a["patient_id"], a["partition"], strict=True))

    # pass 0: obs only (donors -> partitions, labels, counts), genes, value kinds
    samples, gene_lists, distinct, kinds, fit_rows = [], [], [], set(), []
    counts = {p: 0 for p in PARTITIONS}
    with_image = {p: 0 for p in PARTITIONS}
    donors: dict[str, set[str]] = {p: set() for p in PARTITIONS}
    labels: set[str] = set()
    fit_labels: set[str] = set()
    for path in units:
        with UnitRows(path) as u:
            g = u.genes()
            gene_lists.append(next((h for h in distinct if h == g), g))  # one list per distinct panel, not per sample
            if gene_lists[-1] is g:
                distinct.append(g)
            kinds.add(u.values())
            o = u.obs(["sample_id", "patient_id", "label", "has_image"])
        pid = o["patient_id"].astype(str)
        unknown = sorted(set(pid) - set(part_of))
        if unknown:
            raise InputError(f"donor(s) {unknown[:5]} are not in the fold assignment", file=folds, field="patient_id",
                             expected=f"the donors of every unit table (rerun cells_split; {path} changed?)")
        part = pid.map(part_of).to_numpy(object)
        lab = o["label"].astype(str).to_numpy(object)
        img = o["has_image"].to_numpy(bool)
        samples += [s for s in dict.fromkeys(o["sample_id"].astype(str)) if s not in samples]
        for p in PARTITIONS:
            m = part == p
            counts[p] += int(m.sum())
            with_image[p] += int((m & img).sum())
            donors[p] |= set(pid[m])
        labels |= set(lab)
        fit_labels |= set(lab[part == "fit"])
        fit_rows.append(np.flatnonzero(part == "fit"))
    if len(kinds) > 1:
        raise InputError(f"unit tables mix value kinds {sorted(kinds)}", field="cells.values",
                         expected="counts in every sample, or normalised values in every sample")
    values = kinds.pop()
    for p in PARTITIONS:
        if counts[p] == 0:
            raise AssertionError(f"partition {p} is empty")
    fit_labels_l = sorted(fit_labels)
    if len(fit_labels_l) < 2:
        raise InputError(f"fold {fold}: {len(fit_labels_l)} cell type(s) among the training cells ({fit_labels_l})",
                         field="label", expected="at least two cell types in training")
    unseen = sorted(labels - fit_labels)
    if unseen:
        log.warning("fold %d: label(s) %s have no training cells (every model gets them wrong)", fold, unseen)
    genes = common_genes(gene_lists)
    if len(genes) < len(gene_lists[0]):
        log.info("%d genes measured in every sample (of %d in the first)", len(genes), len(gene_lists[0]))

    # HVGs: per-gene sums over the fit cells' row blocks
    cols_of = {id(g): column_map(g, genes) for g in distinct}
    common_cols = [cols_of[id(g)] for g in gene_lists]

    def fit_blocks() -> Any:
        for path, rows, cols in zip(units, fit_rows, common_cols, strict=True):
            if len(rows):
                for _, X in iter_rows(path, rows, nnz_per_block=block):
                    yield X[:, cols]

    hvg = select_hvg_blocks(fit_blocks, genes, cfg.n_hvg, values=values, flavor=cfg.hvg_flavor)

    # sentences: every cell, block by block, straight into the parquet file
    n_sent, n_empty = 0, 0
    with atomic_path(out_table) as tmp:
        writer = None
        try:
            for path in units:
                with UnitRows(path) as u:
                    cols = column_map(u.genes(), hvg, file=path)
                    for lo, hi in u.row_blocks(block):
                        X = sp.csr_matrix(log_normalise(u.read(lo, hi), values)[:, cols])
                        sent, ng = sentence_strings(X, hvg, cfg.n_genes)
                        o = u.obs(["_index", "sample_id", "patient_id", "index", "label", "has_image"], lo, hi)
                        pid = o["patient_id"].astype(str)
                        t = pa.table({"tile_id": pa.array(o["_index"].astype(str).to_numpy(object), pa.string()),
                                      "sample_id": pa.array(o["sample_id"].astype(str).to_numpy(object), pa.string()),
                                      "patient_id": pa.array(pid.to_numpy(object), pa.string()),
                                      "index": pa.array(o["index"].to_numpy(np.int64), pa.int64()),
                                      "label": pa.array(o["label"].astype(str).to_numpy(object), pa.string()),
                                      "has_image": pa.array(o["has_image"].to_numpy(bool), pa.bool_()),
                                      "partition": pa.array(pid.map(part_of).to_numpy(object), pa.string()),
                                      "sentence": sent,
                                      "n_sentence_genes": pa.array(ng, pa.int32())})
                        if writer is None:
                            writer = pq.ParquetWriter(str(tmp), t.schema)
                        writer.write_table(t, row_group_size=ROW_GROUP)
                        n_sent += int(ng.sum())
                        n_empty += int((ng == 0).sum())
        finally:
            if writer is not None:
                writer.close()
    if n_empty:
        log.warning("fold %d: %d cell(s) express none of the HVGs (empty sentence)", fold, n_empty)
    meta = {"fold": fold, "values": values, "hvg": hvg, "n_genes": int(cfg.n_genes), "labels": sorted(labels),
            "fit_labels": fit_labels_l, "unseen_labels": unseen, "counts": counts,
            "donors": {p: sorted(donors[p]) for p in PARTITIONS}, "with_image": with_image, "samples": samples}
    write_json(out_meta, meta)
    log.info("fold %d: %s cells, donors %s, %d HVGs, mean sentence %.1f genes", fold, meta["counts"], meta["donors"],
             len(hvg), n_sent / max(sum(counts.values()), 1))
    return meta


# ------------------------------------------------------------------------------ reading a fold
def read_fold(table: str | Path, meta: str | Path, *, columns: Sequence[str] | None = None
              ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A fold's table (donor grouping re-asserted) and metadata. ``columns``: read only these besides
    :data:`CELL_COLUMNS` (e.g. ``[]``: no sentences, which :class:`FoldSentences` reads on demand)."""
    p = Path(table)
    if not p.exists():
        raise InputError("fold table missing", file=p, expected="output of the cells_fold rule")
    want = None if columns is None else list(dict.fromkeys([*CELL_COLUMNS, *columns]))
    try:
        f = pd.read_parquet(p, columns=want)
    except Exception as exc:  # pyarrow raises several types (missing column, damaged file)
        raise InputError(f"cannot read the fold table ({type(exc).__name__}: {exc})", file=p,
                         expected="a cells fold table") from None
    required = [*CELL_COLUMNS, "sentence"] if columns is None else list(want)
    for col in required:
        if col not in f.columns:
            raise InputError(f"missing column {col!r}", file=table, field=col, expected="a cells fold table")
    bad = sorted(set(f["partition"].astype(str)) - set(PARTITIONS))
    if bad:
        raise InputError(f"unknown partition(s) {bad}", file=table, field="partition", expected="fit | val | test")
    check_donor_fold(f)
    return f, read_json(meta, "cells fold metadata")


class FoldSentences:
    """The ``sentence`` column of a fold table read on demand, one parquet row group at a time (an LRU cache of
    ``cache_groups`` groups as arrow arrays, ~3 MB each): a training job holds ~10^5 sentences, not the cohort's."""

    def __init__(self, table: str | Path, cache_groups: int = 32) -> None:
        import pyarrow.parquet as pq

        self.path = Path(table)
        self.pf = pq.ParquetFile(str(self.path))
        if "sentence" not in self.pf.schema_arrow.names:
            raise InputError("missing column 'sentence'", file=self.path, field="sentence", expected="a cells fold table")
        md = self.pf.metadata
        self.starts = np.zeros(md.num_row_groups + 1, np.int64)
        np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)], out=self.starts[1:])
        self._cache: OrderedDict[int, Any] = OrderedDict()  # arrow arrays: compact, no Python string per cell
        self.cache_groups = int(cache_groups)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, row: int) -> str:
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(row)
        g = int(np.searchsorted(self.starts, row, side="right")) - 1
        block = self._cache.get(g)
        if block is None:
            block = self.pf.read_row_group(g, columns=["sentence"]).column(0).combine_chunks()
            self._cache[g] = block
            if len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return str(block[row - int(self.starts[g])].as_py())


def eval_subset(f: pd.DataFrame, partition: str, max_cells: int | None, seed: int) -> pd.DataFrame:
    """The cells of ``partition`` evaluated (all, or a deterministic subsample of ``max_cells``): every
    method is scored on the same cells."""
    part = f[f["partition"] == partition]
    if max_cells is None or len(part) <= max_cells:
        return part
    rng = np.random.default_rng([int(seed), 17, len(part)])
    return part.iloc[np.sort(rng.choice(len(part), int(max_cells), replace=False))]
