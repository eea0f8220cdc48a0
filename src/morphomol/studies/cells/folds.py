"""Donor-grouped, label-stratified folds of a cells cohort and each fold's text data (HVGs, cell sentences).

Outer folds: ``StratifiedGroupKFold`` over donors (each cell's ``patient_id`` in the unit tables, which is
the per-cell donor when ``cells.donor_key`` is set), stratified by label x has-image so that every fold
tests each type and, where possible, cells with an H&E patch; ``n_donors >= n_folds`` (5 donors allow 5
folds: test 1, validation 1, fit 3). Validation: the shared policy of :mod:`morphomol.splits` (one rule for
every study) over donors — ``splits.val_fraction`` of the fold's training donors when it has >= 2, else of its
(donor, sample) groups, else none (the trainer runs its fixed steps either way; validation losses are only
logged) — chosen with ``(seed, fold)``. Asserted in code on every fold: test donors never trained on, what the
fold's policy promises, fit / test non-empty, every donor (so every cell) ``test`` in exactly one fold; at
least two cell types among the fit cells (else an InputError).

The assignment is a donor-level computation, done once per cohort (rule ``cells_split``,
:func:`write_folds`): it reads only the obs columns ``patient_id, label, has_image`` of every unit table and
writes ``folds/folds.parquet`` (``fold, patient_id, sample_id, partition, n_cells, validation``: folds x
(donor, sample) rows). Each fold job
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
SEP = "\x1f"  # joins donor and sample into the key of a (donor, sample) group


def group_keys(donors: Any, samples: Any) -> np.ndarray:
    """The shared policy's "sample" of the cells study: a (donor, sample) group — a pooled sample holds
    several donors, and a donor's cells may come from several samples."""
    return (pd.Series(donors, dtype=object).astype(str) + SEP
            + pd.Series(samples, dtype=object).astype(str)).to_numpy(object)


def check_donor_fold(f: pd.DataFrame, validation: str | None = None) -> None:
    """AssertionError unless the fold keeps what its validation policy promises (:func:`morphomol.splits.check_fold`
    over (donor, sample) groups): test donors never trained on, fit / test non-empty; ``patient``: donors
    disjoint across fit / val; ``sample``: (donor, sample) groups disjoint; ``none``: val empty. ``f``: rows of
    cells or of (donor[, sample]) groups; the policy from ``validation``, its ``validation`` column, or inferred."""
    from morphomol.splits import check_fold

    g = pd.DataFrame({"sample_id": group_keys(f["patient_id"], f["sample_id"]) if "sample_id" in f.columns
                      else f["patient_id"].astype(str).to_numpy(object),
                      "patient_id": f["patient_id"].astype(str).to_numpy(object),
                      "partition": f["partition"].astype(str).to_numpy(object)})
    if "validation" in f.columns:
        g["validation"] = f["validation"].astype(str).to_numpy(object)
    if "fold" in f.columns:
        g["fold"] = f["fold"].to_numpy()
    g.attrs.update(f.attrs)
    check_fold(g, validation)


def check_donor_folds(folds: pd.DataFrame) -> None:
    """AssertionError unless every fold lists the same (donor, sample) groups once each, each fold keeps its
    policy's promises, and every donor is test in exactly one fold."""
    per_fold = {k: g for k, g in folds.groupby("fold", sort=True)}
    keys = (lambda g: sorted(group_keys(g["patient_id"], g["sample_id"]))) if "sample_id" in folds.columns \
        else (lambda g: sorted(g["patient_id"]))
    first = keys(per_fold[min(per_fold)])
    for k, g in per_fold.items():
        got = keys(g)
        if got != first or len(set(got)) != len(got):
            raise AssertionError(f"fold {k} lists other donors than fold {min(per_fold)}")
        check_donor_fold(g)
    donors = sorted(set(folds["patient_id"]))
    t = folds[folds["partition"] == "test"].groupby("patient_id")["fold"].nunique().reindex(donors, fill_value=0)
    if not (t == 1).all():
        bad = t[t != 1]
        raise AssertionError(f"donor {bad.index[0]} is test in {int(bad.iloc[0])} folds")


# ------------------------------------------------------------------------------ the assignment (donor level)
def donor_folds(donors: np.ndarray, strata: np.ndarray, n_folds: int, val_fraction: float, seed: int,
                validation: str = "auto", *, samples: np.ndarray | None = None,
                cohort: str | None = None) -> pd.DataFrame:
    """``fold, patient_id, sample_id, partition, n_cells, validation`` of every fold (one row per (donor, sample)
    group), from each cell's donor, sample and stratum (label x has-image): StratifiedGroupKFold over donors
    (n_donors >= n_folds: 5 donors allow 5 folds), then each fold's validation by the shared policy
    (:func:`morphomol.splits.plan_folds`: donors, else (donor, sample) groups, else none), asserted."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    from morphomol.splits import folds_needed, group_kfold, log_plan, plan_folds, validation_partition

    donors = np.asarray(donors, dtype=object).astype(str)
    samples = donors if samples is None else np.asarray(samples, dtype=object).astype(str)
    uniq, inv = np.unique(donors, return_inverse=True)
    folds_needed(len(uniq), int(n_folds), cohort=cohort, unit="donor")
    keys = group_keys(donors, samples)
    gk, ginv, g_cells = np.unique(keys, return_inverse=True, return_counts=True)
    g_donor = np.asarray([k.split(SEP, 1)[0] for k in gk], dtype=object)
    g_sample = np.asarray([k.split(SEP, 1)[1] for k in gk], dtype=object)
    test_fold = np.full(len(uniq), -1, np.int64)
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes with fewer members than folds
        for k, (_, te) in enumerate(skf.split(np.zeros(len(donors)), np.asarray(strata, dtype=object), groups=donors)):
            test_fold[np.unique(inv[te])] = k
    if len(set(test_fold.tolist())) < n_folds:  # a fold without a test donor: unit-weighted assignment instead
        counts = np.bincount(inv, minlength=len(uniq))
        fk = group_kfold(uniq.tolist(), counts.tolist(), int(n_folds))
        test_fold = np.asarray([fk[d] for d in uniq], np.int64)
    table = pd.DataFrame({"sample_id": gk, "patient_id": g_donor, "n_units": g_cells})
    plans = plan_folds(table, int(n_folds), validation, test_fold=dict(zip(uniq, test_fold.tolist(), strict=True)),
                       cohort=cohort, unit="donor")
    patient_of = dict(zip(gk, g_donor, strict=True))
    rows = []
    for plan in plans:
        log_plan(plan, validation, unit="donor")
        part_of = validation_partition(plan, patient_of, val_fraction, seed)
        rows.append(pd.DataFrame({"fold": plan.fold, "patient_id": g_donor.astype(str),
                                  "sample_id": g_sample.astype(str),
                                  "partition": [part_of[k] for k in gk], "n_cells": g_cells,
                                  "validation": plan.validation}))
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


def make_folds(cells: pd.DataFrame, n_folds: int, val_fraction: float, seed: int,
               validation: str = "auto") -> list[pd.DataFrame]:
    """Per-cell fold tables (``tile_id, sample_id, patient_id, index, label, has_image, partition``) of the
    donor-level assignment (:func:`donor_folds`); assertions run on every fold."""
    donors = cells["patient_id"].astype(str).to_numpy(object)
    samples = cells["sample_id"].astype(str).to_numpy(object)
    folds = donor_folds(donors, _strata(cells["label"].to_numpy(object), cells["has_image"].to_numpy(bool)),
                        n_folds, val_fraction, seed, validation, samples=samples)
    keys = group_keys(donors, samples)
    out = []
    for k in range(n_folds):
        a = folds[folds["fold"] == k]
        part = pd.Series(a["partition"].to_numpy(), index=group_keys(a["patient_id"], a["sample_id"]))
        f = cells[["tile_id", "sample_id", "patient_id", "index", "label", "has_image"]].copy()
        f["partition"] = part.reindex(keys).to_numpy()
        f.attrs["validation"] = str(a["validation"].iloc[0])
        check_donor_fold(f)
        out.append(f)
    return out


def write_folds(*, units: Sequence[str | Path], out: str | Path, splits: SplitsConfig, seed: int,
                cohort: str | None = None) -> pd.DataFrame:
    """Rule entry (``cells_split``): every fold's donor partitions into ``out`` (``folds/folds.parquet``).
    Reads only the obs columns ``sample_id, patient_id, label, has_image`` of each unit table."""
    from morphomol.studies.cells.matrix import UnitRows

    donors, samples, strata = [], [], []
    for path in units:
        with UnitRows(path) as u:
            o = u.obs(["sample_id", "patient_id", "label", "has_image"])
        donors.append(o["patient_id"].astype(str).to_numpy(object))
        samples.append(o["sample_id"].astype(str).to_numpy(object))
        strata.append(_strata(o["label"].to_numpy(object), o["has_image"].to_numpy(bool)))
    d = np.concatenate(donors) if donors else np.zeros(0, object)
    folds = donor_folds(d, np.concatenate(strata) if strata else d, splits.n_folds, splits.val_fraction, seed,
                        splits.validation, samples=np.concatenate(samples) if samples else d, cohort=cohort)
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
    from morphomol.data.folds import check_partition_table

    df = check_partition_table(pd.read_parquet(p), DONOR_FOLD_COLUMNS, file=p)
    df["patient_id"] = df["patient_id"].astype(str)
    if "sample_id" in df.columns:
        df["sample_id"] = df["sample_id"].astype(str)
    if "validation" not in df.columns:  # written before the policy was recorded (donor rows, donor validation)
        from morphomol.splits import infer_validation

        pol = {int(k): infer_validation(g.assign(sample_id=g["patient_id"])) for k, g in df.groupby("fold")}
        df["validation"] = df["fold"].map(pol).astype(str)
    return df


def fold_partitions(a: pd.DataFrame) -> tuple[dict[str, str], bool]:
    """(group key -> partition, keyed by (donor, sample)) of one fold's rows of ``folds/folds.parquet``."""
    by_sample = "sample_id" in a.columns
    keys = group_keys(a["patient_id"], a["sample_id"]) if by_sample else a["patient_id"].astype(str).to_numpy(object)
    return dict(zip(keys, a["partition"].astype(str), strict=True)), by_sample


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
    part_of, by_sample = fold_partitions(a)
    policy = str(a["validation"].iloc[0])

    def key_of(o: pd.DataFrame) -> pd.Series:
        pid = o["patient_id"].astype(str)
        return pd.Series(group_keys(pid, o["sample_id"]), index=o.index) if by_sample else pid

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
        key = key_of(o)
        unknown = sorted(set(key) - set(part_of))
        if unknown:
            raise InputError(f"donor(s) {[u.replace(SEP, ' in sample ') for u in unknown[:5]]} are not in the fold "
                             "assignment", file=folds, field="patient_id",
                             expected=f"the donors of every unit table (rerun cells_split; {path} changed?)")
        part = key.map(part_of).to_numpy(object)
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
    for p in ("fit", "test") + (("val",) if policy != "none" else ()):
        if counts[p] == 0:
            raise AssertionError(f"fold {fold}: partition {p} is empty (validation {policy})")
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
                                      "partition": pa.array(key_of(o).map(part_of).to_numpy(object), pa.string()),
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
    meta = {"fold": fold, "validation": policy,
            "values": values, "hvg": hvg, "n_genes": int(cfg.n_genes), "labels": sorted(labels),
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
    m = read_json(meta, "cells fold metadata")
    policy = m.get("validation") if isinstance(m, dict) else None
    if policy is not None:
        f.attrs["validation"] = str(policy)
    if isinstance(m, dict) and "fold" in m:
        f.attrs["fold"] = int(m["fold"])
    check_donor_fold(f)
    return f, m


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
