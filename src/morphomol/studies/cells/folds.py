"""Donor-grouped, label-stratified folds of a cells cohort and each fold's text data (HVGs, cell sentences).

Outer folds: ``StratifiedGroupKFold`` over donors (each cell's ``patient_id`` in the unit tables, which is
the per-cell donor when ``cells.donor_key`` is set), stratified by label x has-image so that every fold
tests each type and, where possible, cells with an H&E patch. Validation: ``splits.val_fraction`` of the
fold's training donors (at least one, leaving one for fitting), chosen with ``(seed, fold)``. Asserted in
code on every fold: no donor in two partitions, every partition non-empty, every cell ``test`` in exactly
one fold; at least two cell types among the fit cells (else an InputError).

``folds/fold{k}.parquet``: the split columns of :mod:`morphomol.data.folds` (``tile_id`` = unit id,
``sample_id, patient_id, index, partition``) + ``label, has_image, sentence, n_sentence_genes``;
``folds/fold{k}.json``: HVGs, labels, per-partition counts and donors, labels unseen in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.config.sections import SplitsConfig
from morphomol.errors import InputError
from morphomol.splits import PARTITIONS, check_folds
from morphomol.studies.cells.config import CellsConfig
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import read_json, write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.folds")


def collect_cells(units: Sequence[str | Path]) -> tuple[pd.DataFrame, list[list[str]], str]:
    """Per cell: ``tile_id, sample_id, patient_id, index, label, has_image`` of every unit table; the
    gene lists; the values kind (counts | normalised, one per cohort)."""
    from morphomol.data.units import read_units

    parts, genes, kinds = [], [], set()
    for path in units:
        a = read_units(path, backed=True)
        try:
            o = a.obs
            parts.append(pd.DataFrame({"tile_id": o.index.astype(str), "sample_id": o["sample_id"].astype(str).to_numpy(),
                                       "patient_id": o["patient_id"].astype(str).to_numpy(),
                                       "index": o["index"].to_numpy(np.int64), "label": o["label"].astype(str).to_numpy(),
                                       "has_image": o["has_image"].to_numpy(bool)}))
            genes.append([str(g) for g in a.var_names])
            kinds.add(str(a.uns["morphomol"].get("values", "counts")))
        finally:
            a.file.close()
    if len(kinds) > 1:
        raise InputError(f"unit tables mix value kinds {sorted(kinds)}", field="cells.values",
                         expected="counts in every sample, or normalised values in every sample")
    return pd.concat(parts, ignore_index=True), genes, kinds.pop()


def check_donor_fold(f: pd.DataFrame) -> None:
    """AssertionError unless donors are disjoint across partitions and no partition is empty."""
    n = f.groupby("patient_id")["partition"].nunique()
    if (n > 1).any():
        raise AssertionError(f"donor {n.index[n > 1][0]} appears in two partitions")
    for p in PARTITIONS:
        if not (f["partition"] == p).any():
            raise AssertionError(f"partition {p} is empty")


def make_folds(cells: pd.DataFrame, n_folds: int, val_fraction: float, seed: int) -> list[pd.DataFrame]:
    """Donor-grouped stratified folds (see the module docstring); assertions run on every fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    donors = cells["patient_id"].to_numpy(object)
    n_donors = len(set(donors))
    if n_donors < n_folds + 1:
        raise InputError(f"{n_donors} donor(s) cannot make {n_folds} donor-grouped folds with a validation donor",
                         field="splits.n_folds", expected=f"at most {n_donors - 1} folds (or more donors)")
    strata = (cells["label"] + "|" + cells["has_image"].astype(str)).to_numpy()
    test_fold = np.full(len(cells), -1)
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes with fewer members than folds
        for k, (_, te) in enumerate(skf.split(np.zeros(len(cells)), strata, groups=donors)):
            test_fold[te] = k
    out = []
    for k in range(n_folds):
        is_test = test_fold == k
        train_donors = sorted(set(donors[~is_test]))
        rng = np.random.default_rng([int(seed), k])
        n_val = min(max(int(round(val_fraction * len(train_donors))), 1), len(train_donors) - 1)
        val = set(rng.permutation(np.asarray(train_donors, dtype=object))[:n_val].tolist())
        f = cells[["tile_id", "sample_id", "patient_id", "index", "label", "has_image"]].copy()
        f["partition"] = np.where(is_test, "test", np.where(np.isin(donors, list(val)), "val", "fit"))
        check_donor_fold(f)
        out.append(f)
    check_folds(out)
    return out


def write_fold(*, units: Sequence[str | Path], fold: int, out_table: str | Path, out_meta: str | Path,
               cfg: CellsConfig, splits: SplitsConfig, seed: int) -> dict[str, Any]:
    """Rule entry (``cells_fold``): fold ``fold``'s table and metadata (all folds are recomputed, cheap and
    deterministic, so one job per fold gives identical folds)."""
    from morphomol.studies.cells.sentences import cell_sentences, common_genes, hvg_matrix, select_hvg

    if not 0 <= int(fold) < splits.n_folds:
        raise InputError(f"fold {fold} out of range (n_folds={splits.n_folds})", field="splits.n_folds")
    cells, gene_lists, values = collect_cells(units)
    f = make_folds(cells, splits.n_folds, splits.val_fraction, seed)[int(fold)]
    fit_labels = sorted(set(f.loc[f["partition"] == "fit", "label"]))
    if len(fit_labels) < 2:
        raise InputError(f"fold {fold}: {len(fit_labels)} cell type(s) among the training cells ({fit_labels})",
                         field="label", expected="at least two cell types in training")
    unseen = sorted(set(f["label"]) - set(fit_labels))
    if unseen:
        log.warning("fold %d: label(s) %s have no training cells (every model gets them wrong)", fold, unseen)
    genes = common_genes(gene_lists)
    if len(genes) < len(gene_lists[0]):
        log.info("%d genes measured in every sample (of %d in the first)", len(genes), len(gene_lists[0]))
    samples = list(dict.fromkeys(cells["sample_id"]))
    fit_rows = [f.loc[(f["sample_id"] == s) & (f["partition"] == "fit"), "index"].to_numpy() for s in samples]
    raw_fit = _raw_rows(units, fit_rows, genes)
    hvg = select_hvg(raw_fit, genes, cfg.n_hvg, values=values, flavor=cfg.hvg_flavor)
    all_rows = [f.loc[f["sample_id"] == s, "index"].to_numpy() for s in samples]
    X = hvg_matrix(units, all_rows, hvg, values)
    order = np.concatenate([np.flatnonzero((f["sample_id"] == s).to_numpy()) for s in samples])
    sent = cell_sentences(X, hvg, cfg.n_genes)
    f = f.iloc[order].reset_index(drop=True)
    f["sentence"] = [" ".join(s) for s in sent]
    f["n_sentence_genes"] = np.array([len(s) for s in sent], np.int32)
    empty = int((f["n_sentence_genes"] == 0).sum())
    if empty:
        log.warning("fold %d: %d cell(s) express none of the HVGs (empty sentence)", fold, empty)
    with atomic_path(out_table) as tmp:
        f.to_parquet(tmp, index=False)
    meta = {"fold": int(fold), "values": values, "hvg": hvg, "n_genes": int(cfg.n_genes), "labels": sorted(set(f["label"])),
            "fit_labels": fit_labels, "unseen_labels": unseen,
            "counts": {p: int((f["partition"] == p).sum()) for p in PARTITIONS},
            "donors": {p: sorted(set(f.loc[f["partition"] == p, "patient_id"])) for p in PARTITIONS},
            "with_image": {p: int(((f["partition"] == p) & f["has_image"]).sum()) for p in PARTITIONS},
            "samples": samples}
    write_json(out_meta, meta)
    log.info("fold %d: %s cells, donors %s, %d HVGs, mean sentence %.1f genes", fold, meta["counts"], meta["donors"],
             len(hvg), float(f["n_sentence_genes"].mean()))
    return meta


def _raw_rows(units: Sequence[str | Path], rows: Sequence[np.ndarray], genes: Sequence[str]) -> Any:
    import scipy.sparse as sp

    from morphomol.data.units import read_units

    parts = []
    for path, r in zip(units, rows, strict=True):
        if len(r):
            a = read_units(path)
            pos = {str(g): i for i, g in enumerate(a.var_names)}
            parts.append(sp.csr_matrix(a.X[np.asarray(r, np.int64)][:, [pos[g] for g in genes]]))
    return sp.vstack(parts).tocsr()


def read_fold(table: str | Path, meta: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A fold's table (donor grouping re-asserted) and metadata."""
    from morphomol.data.folds import read_split

    f = read_split(table)
    for col in ("label", "has_image", "sentence"):
        if col not in f.columns:
            raise InputError(f"missing column {col!r}", file=table, field=col, expected="a cells fold table")
    check_donor_fold(f)
    return f, read_json(meta, "cells fold metadata")


def eval_subset(f: pd.DataFrame, partition: str, max_cells: int | None, seed: int) -> pd.DataFrame:
    """The cells of ``partition`` evaluated (all, or a deterministic subsample of ``max_cells``): every
    method is scored on the same cells."""
    part = f[f["partition"] == partition]
    if max_cells is None or len(part) <= max_cells:
        return part
    rng = np.random.default_rng([int(seed), 17, len(part)])
    return part.iloc[np.sort(rng.choice(len(part), int(max_cells), replace=False))]
