"""Test predictions of the spots study, partitioned by sample (torch-free).

``predictions.parquet`` of a spots run is the shared layout of :mod:`morphomol.data.runs` written with
``sample_ids``: ``tile_id, gene, y, y_hat`` (tile-major, float32) plus ``sample_id``, one row group per sample,
so that one sample's rows are read alone (:func:`morphomol.data.runs.read_sample_predictions`). The
setting's file (every fold's first-seed test predictions) is concatenated row group by row group
(:func:`concat_predictions`), never loaded whole. :func:`within_sample_by_fold` scores a run's file one
sample at a time (the within-sample Pearson of the spots tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError

COLUMNS = ("tile_id", "gene", "y", "y_hat")
SAMPLE = "sample_id"


def _schema():  # type: ignore[no-untyped-def]
    import pyarrow as pa

    dic = pa.dictionary(pa.int32(), pa.string())
    return pa.schema([("tile_id", dic), ("gene", dic), ("y", pa.float32()), ("y_hat", pa.float32()),
                      (SAMPLE, pa.string())])


def write_sample_predictions(path: str | Path, tile_ids: Sequence[str], genes: Sequence[str], y: np.ndarray,
                             y_hat: np.ndarray) -> Path:
    """A run's test predictions, one row group per sample (``{sample}__{index}`` ids)."""
    from morphomol.data.runs import sample_ids_of, write_predictions

    return write_predictions(path, tile_ids, genes, y, y_hat, sample_ids=sample_ids_of(tile_ids))


def concat_predictions(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Concatenate per-run prediction files (with ``sample_id``) row group by row group into ``out``
    (atomic); memory: one row group."""
    import pyarrow.parquet as pq

    from morphomol.util.atomic import atomic_path

    schema = _schema()
    out = Path(out)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as w:
        for p in paths:
            try:
                f = pq.ParquetFile(p)
                if SAMPLE not in f.schema_arrow.names:
                    raise ValueError("no sample_id column")
            except Exception as exc:
                raise InputError(f"cannot read predictions ({exc})", file=p,
                                 expected="columns tile_id, gene, y, y_hat, sample_id") from None
            for i in range(f.num_row_groups):
                t = f.read_row_group(i, columns=[*COLUMNS, SAMPLE])
                if t.num_rows:
                    w.write_table(t.replace_schema_metadata(None).cast(schema), row_group_size=t.num_rows)
    return out


def read_gene_predictions(path: str | Path, genes: Sequence[str]) -> pd.DataFrame:
    """``tile_id, gene, y, y_hat`` (str ids) of ``genes`` over every unit of the file (one filtered scan)."""
    import pyarrow.dataset as ds

    try:
        d = ds.dataset(str(path), format="parquet")
        t = d.to_table(columns=list(COLUMNS), filter=ds.field("gene").isin([str(g) for g in genes]))
    except Exception as exc:
        raise InputError(f"cannot read predictions ({exc})", file=path, expected="columns tile_id, gene, y, y_hat"
                         ) from None
    return t.to_pandas().astype({"tile_id": str, "gene": str})


def within_sample_by_fold(path: str | Path, folds: str | Path, *, min_units: int | None = None) -> dict[str, Any]:
    """The within-sample Pearson of one run's ``predictions.parquet`` per fold
    (:class:`morphomol.eval.metrics.WithinSamplePearson`): each sample's rows are read alone (its row group) and
    scored alone, in the fold where the fold table (``splits/folds.parquet``) puts it in test. Returns
    ``{"folds": {fold: summary}, "per_gene": {fold: {gene: mean within-sample Pearson}}}``; memory: one sample's
    rows. Every test sample of the fold table must have predictions (else an InputError naming the file)."""
    from morphomol.data.folds import held_out_fold
    from morphomol.data.runs import read_sample_predictions
    from morphomol.eval.metrics import WITHIN_MIN_UNITS, WithinSamplePearson

    fold_of = held_out_fold(folds)
    acc: dict[int, WithinSamplePearson] = {}
    for sample, k in fold_of.items():
        df = read_sample_predictions(path, sample, columns=COLUMNS)
        if df.empty:
            raise InputError(f"no test predictions for sample {sample!r} (test in fold {k})", file=path,
                             field=SAMPLE, expected="every unit of the cohort predicted once (its test fold)")
        df = df.astype({"tile_id": str, "gene": str})
        genes = list(dict.fromkeys(df["gene"].tolist()))
        y = df.pivot(index="tile_id", columns="gene", values="y").reindex(columns=genes).to_numpy(np.float64)
        yh = df.pivot(index="tile_id", columns="gene", values="y_hat").reindex(columns=genes).to_numpy(np.float64)
        del df
        a = acc.setdefault(int(k), WithinSamplePearson(WITHIN_MIN_UNITS if min_units is None else min_units))
        a.add(y, yh, genes)
    return {"folds": {k: a.summary() for k, a in sorted(acc.items())},
            "per_gene": {k: {str(g): (float(v) if np.isfinite(v) else None)
                             for g, v in a.per_gene()["pearson"].items()} for k, a in sorted(acc.items())}}
