"""Test predictions of the spots study, partitioned by sample (torch-free).

``predictions.parquet`` of a spots run is the shared layout of :mod:`morphomol.data.runs` written with
``sample_ids``: ``tile_id, gene, y, y_hat`` (tile-major, float32) plus ``sample_id``, one row group per sample,
so that one sample's rows are read alone (:func:`morphomol.data.runs.read_sample_predictions`). The
setting's file (every fold's first-seed test predictions) is concatenated row group by row group
(:func:`concat_predictions`), never loaded whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
