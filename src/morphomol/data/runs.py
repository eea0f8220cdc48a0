"""Run artifacts: the one reader/writer of ``runs/{setting}/fold{k}/metrics.json`` and
``predictions.parquet``.

``metrics.json`` (docs/ARCHITECTURE.md): ``setting, fold, kind (regression | clip), status`` plus,
for ok regression runs, ``mean`` and ``per_gene`` (:func:`morphomol.eval.metrics.regression_report`)
and, for ok CLIP runs, ``recall@1, recall@5, random_recall@1, random_recall@5``. NaN is written as
``null``.

``predictions.parquet``: long table ``tile_id, gene, y, y_hat`` (float32, log1p space), tile-major;
``tile_id`` and ``gene`` are categorical. Written with ``sample_ids`` (the fusion runs) or block by block
(:func:`open_predictions_writer`): a fifth column ``sample_id``, row groups never spanning two samples
(``write_predictions``: one per sample, samples in order of first appearance, rows in their order), so
that :func:`read_sample_predictions` reads one sample's rows through a pyarrow filter (row groups of other
samples are skipped by their statistics); files without the column are filtered while streaming their
record batches (by the sample part of ``tile_id``, ``{sample}__{index}``). Whole-file readers
(:func:`read_predictions`) read the four columns of either layout.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import read_json, write_json

#: metrics every ok regression run must report in ``mean`` (Table A.1 columns)
REQUIRED_MEAN: tuple[str, ...] = ("spearman", "pearson", "mse")
#: metrics every ok CLIP run must report (Table A.2 columns)
REQUIRED_CLIP: tuple[str, ...] = ("recall@1", "recall@5")
RUN_KINDS: tuple[str, ...] = ("regression", "clip")
PREDICTION_COLUMNS: tuple[str, ...] = ("tile_id", "gene", "y", "y_hat")
_RUN_DIR_RE = re.compile(r"^fold(\d+)$")


# ------------------------------------------------------------------------------ metrics.json


def metrics_file(path: str | Path) -> Path:
    """``path`` itself when it names a ``.json`` file, else ``path/metrics.json`` (a run directory)."""
    p = Path(path)
    return p / "metrics.json" if p.is_dir() or p.suffix != ".json" else p


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write a run's ``metrics.json`` atomically (indent 2, NaN/inf as null)."""
    return write_json(path, metrics)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read and check one ``metrics.json`` (or the one in a run directory); adds ``_file``.

    Checks: a JSON object with ``setting`` and ``fold``; ``kind`` regression or clip; a path
    ``runs/{setting}/fold{k}/`` agrees with the content; ok regression runs have ``mean`` with
    :data:`REQUIRED_MEAN` and an object ``per_gene``; ok CLIP runs have :data:`REQUIRED_CLIP`.
    """
    file = metrics_file(path)
    if not file.exists():
        raise InputError("metrics file not found", file=file, expected="runs/{setting}/fold{k}/metrics.json")
    data = read_json(file, "metrics file", obj=True)
    for field in ("setting", "fold"):
        if field not in data:
            raise InputError("missing field", file=file, field=field)
    kind = data.get("kind", "regression")
    if kind not in RUN_KINDS:
        raise InputError(f"unknown kind {kind!r}", file=file, field="kind", expected="regression or clip")
    # the directory layout runs/{setting}/fold{k} must agree with the file's content
    m = _RUN_DIR_RE.match(file.parent.name)
    if m and file.parent.parent.parent.name == "runs":
        if str(data["setting"]) != file.parent.parent.name:
            raise InputError(f"setting {data['setting']!r} does not match the run directory",
                             file=file, field="setting", expected=repr(file.parent.parent.name))
        if int(data["fold"]) != int(m.group(1)):
            raise InputError(f"fold {data['fold']!r} does not match the run directory",
                             file=file, field="fold", expected=m.group(1))
    status = str(data.get("status", "ok"))
    if status == "ok":
        if kind == "regression":
            mean = data.get("mean")
            if not isinstance(mean, dict):
                raise InputError("missing or not an object", file=file, field="mean",
                                 expected='{"pearson":..., "spearman":..., "mse":..., "mae":...}')
            for metric in REQUIRED_MEAN:
                if metric not in mean:
                    raise InputError("missing metric", file=file, field=f"mean.{metric}")
            if not isinstance(data.get("per_gene", {}), dict):
                raise InputError("not an object", file=file, field="per_gene", expected="{gene: {metric: value}}")
        else:
            for metric in REQUIRED_CLIP:
                if metric not in data:
                    raise InputError("missing metric", file=file, field=metric)
    data["_file"] = str(file)
    return data


def discover_metrics(cohort_dir: str | Path) -> list[Path]:
    """All ``runs/*/fold*/metrics.json`` under a cohort result directory (sorted; for tests and notebooks,
    the pipeline passes explicit paths)."""
    return sorted(Path(cohort_dir).glob("runs/*/fold*/metrics.json"))


# ------------------------------------------------------------------------------ predictions


def predictions_frame(tile_ids: Sequence[str], genes: Sequence[str], y: np.ndarray, y_hat: np.ndarray) -> pd.DataFrame:
    """Long table ``tile_id, gene, y, y_hat`` (log1p space, float32), tile-major."""
    n, g = len(tile_ids), len(genes)
    y = np.asarray(y, dtype=np.float32).reshape(n, g)
    y_hat = np.asarray(y_hat, dtype=np.float32).reshape(n, g)
    return pd.DataFrame({
        "tile_id": pd.Categorical(np.repeat(np.asarray(tile_ids, dtype=object), g)),
        "gene": pd.Categorical(np.tile(np.asarray(genes, dtype=object), n), categories=list(genes)),
        "y": y.reshape(-1),
        "y_hat": y_hat.reshape(-1),
    })


def sample_ids_of(tile_ids: Sequence[str]) -> list[str]:
    """The sample part of unit ids ``{sample}__{index}`` (everything before the last ``__``)."""
    return [str(t).rpartition("__")[0] for t in tile_ids]


def write_predictions(path: str | Path, tile_ids: Sequence[str], genes: Sequence[str], y: np.ndarray,
                      y_hat: np.ndarray, *, sample_ids: Sequence[str] | None = None) -> Path:
    """Write ``predictions.parquet`` atomically (:func:`predictions_frame`). With ``sample_ids`` (one per
    tile): column ``sample_id`` and one row group per sample (module docstring), written sample by sample
    through :func:`open_predictions_writer`."""
    path = Path(path)
    if sample_ids is None:
        df = predictions_frame(tile_ids, genes, y, y_hat)
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
        return path
    n, g = len(tile_ids), len(genes)
    if len(sample_ids) != n:
        raise ValueError(f"{len(sample_ids)} sample ids for {n} tiles")
    y = np.asarray(y, dtype=np.float32).reshape(n, g)
    y_hat = np.asarray(y_hat, dtype=np.float32).reshape(n, g)
    ids = np.asarray(tile_ids, dtype=object)
    samples, first, codes = np.unique(np.asarray(sample_ids, dtype=str), return_index=True, return_inverse=True)
    codes = codes.reshape(-1)
    with open_predictions_writer(path) as w:
        for k in np.argsort(first, kind="stable"):  # samples in order of first appearance, rows in their order
            rows = np.flatnonzero(codes == k)
            w.write(ids[rows], genes, y[rows], y_hat[rows], sample_id=str(samples[k]))
    return path


class PredictionsWriter:
    """Appends row groups to an open ``predictions.parquet`` (:func:`open_predictions_writer`)."""

    def __init__(self, writer: Any, sample_column: bool) -> None:
        self._writer = writer
        self.sample_column = sample_column
        self.n_rows = 0

    def write(self, tile_ids: Sequence[str], genes: Sequence[str], y: np.ndarray, y_hat: np.ndarray,
              sample_id: str | None = None) -> None:
        """One block of units of one sample (tile-major, as :func:`predictions_frame`): one row group."""
        import pyarrow as pa

        n, g = len(tile_ids), len(genes)
        if n == 0:
            return
        unit = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(n, dtype=np.int32), g)),
                                              pa.array([str(t) for t in tile_ids], pa.string()))
        gene = pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(g, dtype=np.int32), n)),
                                              pa.array([str(x) for x in genes], pa.string()))
        cols = [unit, gene, pa.array(np.asarray(y, np.float32).reshape(-1)),
                pa.array(np.asarray(y_hat, np.float32).reshape(-1))]
        if self.sample_column:
            if sample_id is None:
                raise ValueError("this predictions file has a sample_id column: pass the block's sample")
            cols.append(pa.array(np.full(n * g, str(sample_id), dtype=object), pa.string()))
        self._writer.write_table(pa.Table.from_arrays(cols, schema=self._writer.schema), row_group_size=n * g)
        self.n_rows += n * g


@contextlib.contextmanager
def open_predictions_writer(path: str | Path, *, sample_column: bool = True) -> Iterator[PredictionsWriter]:
    """``predictions.parquet`` written block by block (a job streams its predictions instead of holding the
    long table of units x genes rows), atomically: the file appears when the block ends without error. The
    columns and types of :func:`write_predictions` (``tile_id`` / ``gene`` read back as categoricals) and, with
    ``sample_column``, ``sample_id`` with one row group per block (blocks never span samples), as
    ``write_predictions(..., sample_ids=...)`` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("tile_id", pa.dictionary(pa.int32(), pa.string())), ("gene", pa.dictionary(pa.int32(), pa.string())),
              ("y", pa.float32()), ("y_hat", pa.float32())]
    schema = pa.schema(fields + ([("sample_id", pa.string())] if sample_column else []))
    with atomic_path(Path(path)) as tmp:
        w = pq.ParquetWriter(str(tmp), schema)
        try:
            yield PredictionsWriter(w, sample_column)
        finally:
            w.close()


def read_predictions(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenated ``tile_id, gene, y, y_hat`` of several ``predictions.parquet`` (empty frame for none)."""
    parts = []
    for p in paths:
        try:
            d = pd.read_parquet(p, columns=list(PREDICTION_COLUMNS))
        except Exception as exc:
            raise InputError(f"cannot read predictions ({exc})", file=p,
                             expected="columns tile_id, gene, y, y_hat") from None
        parts.append(d)
    if not parts:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    return pd.concat(parts, ignore_index=True)


def read_sample_predictions(path: str | Path, sample: str, columns: Sequence[str] = PREDICTION_COLUMNS,
                            batch_rows: int = 1 << 20) -> pd.DataFrame:
    """The rows of one sample of a ``predictions.parquet`` (``columns``), without reading the others:
    a pyarrow filter on ``sample_id`` (row groups of other samples skipped) when the file has the column,
    else its record batches streamed (``batch_rows`` rows at a time) and filtered by the sample part of
    ``tile_id``. Memory: one batch + the sample's rows."""
    import re

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = list(columns)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:
        raise InputError(f"cannot read predictions ({exc})", file=path,
                         expected="columns tile_id, gene, y, y_hat") from None
    missing = [c for c in cols if c not in names]
    if missing:
        raise InputError(f"missing column(s) {missing}", file=path, field=missing[0],
                         expected="columns tile_id, gene, y, y_hat")
    if "sample_id" in names:
        t = pq.read_table(path, columns=cols, filters=[("sample_id", "==", str(sample))])
        pf.close()
        return t.to_pandas()
    # no sample column (e.g. files of writers without sample_ids): {sample}__{index} with no "__" after it
    pattern = "^" + re.escape(str(sample)) + "__([^_]|_[^_])*_?$"
    read = list(dict.fromkeys(cols + ["tile_id"]))
    parts = []
    for b in pf.iter_batches(batch_size=int(batch_rows), columns=read):
        tid = b.column(read.index("tile_id"))
        if pa.types.is_dictionary(tid.type):
            hit = pc.match_substring_regex(tid.dictionary.cast(pa.string()), pattern).to_numpy(zero_copy_only=False)
            idx = tid.indices.to_numpy(zero_copy_only=False)
            mask = pa.array(hit[idx] if len(hit) else np.zeros(len(idx), bool))
        else:
            mask = pc.match_substring_regex(tid.cast(pa.string()), pattern)
        parts.append(b.filter(mask).select(cols))
    pf.close()
    schema = pq.read_schema(path)
    t = (pa.Table.from_batches(parts) if parts
         else schema.empty_table().select(cols))
    return t.replace_schema_metadata(schema.metadata).to_pandas()
