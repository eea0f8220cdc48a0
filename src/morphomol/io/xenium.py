"""Reader for 10x Xenium output bundles (Xenium Onboard Analysis directories).

A bundle is a directory holding ``experiment.xenium`` (JSON with ``pixel_size``), a
transcript table (``transcripts.parquet`` preferred, else the older ``transcripts.csv.gz``
or ``transcripts.csv``), optionally ``gene_panel.json``, ``cells.parquet`` and a DAPI
morphology OME-TIFF.

Transcripts are streamed in record batches and never loaded whole: real samples hold
1e7-1e9 rows. Gene codes are bundle-wide: ``TranscriptBatch.gene_codes`` index into
``TranscriptBatch.gene_names``, which is always the same list object for every batch of
one call: ``bundle.genes`` (sorted non-control feature names present in the file) when
controls are dropped, ``bundle.features`` (sorted, all feature names, controls included)
otherwise. Building that index costs one streamed pass over the ``feature_name`` column
only (cached on the bundle).
"""

from __future__ import annotations

import csv
import gzip
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json
from morphomol.io.xenium_layout import (
    CELLS_FILES,
    CONTROL_PREFIXES,
    MORPHOLOGY_FILES,
    REQUIRED_COLUMNS,
    TRANSCRIPT_FILES,
    _normalise_name,
    bundle_files,
    is_control,
    read_gene_panel,
)
from morphomol.util.logs import get_logger

__all__ = [
    "CONTROL_PREFIXES",
    "REQUIRED_COLUMNS",
    "TRANSCRIPT_FILES",
    "MORPHOLOGY_FILES",
    "TranscriptBatch",
    "XeniumBundle",
    "is_control",
    "bundle_files",
    "read_gene_panel",
]

log = get_logger("io.xenium")

_FLOAT_COLUMNS = {"x_location", "y_location", "z_location", "qv", "nucleus_distance"}
_CSV_BLOCK_BYTES_PER_ROW = 96  # rough width of one 10x transcript CSV row (for block sizing)


@dataclass(frozen=True)
class TranscriptBatch:
    """One streamed batch of transcripts, after control / qv filtering.

    ``gene_codes[i]`` indexes ``gene_names`` (the bundle-wide list; identical for every
    batch of one ``iter_transcripts`` call). ``columns`` holds any further requested
    columns (e.g. ``qv``, ``cell_id``), filtered like ``x``/``y``.
    """

    x: np.ndarray  # float32 µm
    y: np.ndarray  # float32 µm
    gene_codes: np.ndarray  # int32 index into gene_names
    gene_names: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    n_rows_read: int = 0  # rows of the file read for this batch (before filtering)
    n_controls_dropped: int = 0
    n_low_qv_dropped: int = 0
    row_offset: int = 0  # file row index of the first row read for this batch

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def feature_name(self) -> np.ndarray:
        """Per-transcript gene names (object array); prefer ``gene_codes`` in hot loops."""
        return np.asarray(self.gene_names, dtype=object)[self.gene_codes]


def _to_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return np.array([_normalise_name(v) if v is not None else None for v in arr.to_pylist()], dtype=object)
    return arr.to_numpy(zero_copy_only=False)


class XeniumBundle:
    """A Xenium output directory. See module docstring and docs/ARCHITECTURE.md."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_file() and p.suffix == ".xenium":
            self.experiment_path = p
            p = p.parent
        else:
            self.experiment_path = p / "experiment.xenium"
        self.path = p
        if not p.exists():
            raise InputError("Xenium directory not found", file=p, expected="a Xenium output directory")
        if not p.is_dir():
            raise InputError("not a directory", file=p, expected="a Xenium output directory")
        self.experiment = self._read_experiment()
        self.pixel_size = self._pixel_size(self.experiment)
        self.transcripts_path = self._find_transcripts()
        self.transcripts_format = "parquet" if self.transcripts_path.name.endswith(".parquet") else "csv"
        self.transcript_columns: list[str] = self._columns()
        missing = [c for c in REQUIRED_COLUMNS if c not in self.transcript_columns]
        if missing:
            raise InputError(
                f"missing required column(s) {', '.join(missing)}; found {', '.join(self.transcript_columns) or 'none'}",
                file=self.transcripts_path,
                field=missing[0],
                expected="10x transcript columns " + ", ".join(REQUIRED_COLUMNS),
            )
        self._features: list[str] | None = None
        self._genes: list[str] | None = None

    def __repr__(self) -> str:
        return f"XeniumBundle({str(self.path)!r}, transcripts={self.transcripts_path.name}, pixel_size={self.pixel_size})"

    # ------------------------------------------------------------------ metadata
    def _read_experiment(self) -> dict[str, Any]:
        return read_json(self.experiment_path, "experiment.xenium",
                         expected="experiment.xenium (JSON) in the Xenium output directory", obj=True)

    def _pixel_size(self, data: dict[str, Any]) -> float:
        f = self.experiment_path
        if "pixel_size" not in data:
            raise InputError("missing", file=f, field="pixel_size", expected="µm per morphology pixel, e.g. 0.2125")
        try:
            value = float(data["pixel_size"])
        except (TypeError, ValueError):
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise InputError(
                f"invalid value {data['pixel_size']!r}", file=f, field="pixel_size", expected="a positive number of µm"
            )
        return value

    def gene_panel(self) -> list[str] | None:
        """Target gene names of ``gene_panel.json`` (controls excluded), or None if absent."""
        return read_gene_panel(self.path)

    # ------------------------------------------------------------------ files
    def _find_transcripts(self) -> Path:
        for name in TRANSCRIPT_FILES:
            f = self.path / name
            if f.is_file():
                return f
        raise InputError(
            "no transcripts file", file=self.path, expected=" or ".join(TRANSCRIPT_FILES)
        )

    def _columns(self) -> list[str]:
        f = self.transcripts_path
        if self.transcripts_format == "parquet":
            try:
                return list(pq.ParquetFile(f).schema_arrow.names)
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"corrupt or unreadable Parquet ({exc})", file=f, expected="a Parquet file") from None
        try:
            opener = gzip.open if f.name.endswith(".gz") else open
            with opener(f, "rt", encoding="utf-8-sig", newline="") as fh:  # type: ignore[operator]
                header = next(csv.reader(fh), None)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"corrupt or unreadable CSV ({exc})", file=f, expected="a (gzipped) CSV file") from None
        if not header:
            raise InputError("empty file (no header line)", file=f, expected="a CSV header with " + ", ".join(REQUIRED_COLUMNS))
        return [h.strip() for h in header]

    @property
    def n_rows(self) -> int | None:
        """Row count from the Parquet footer (None for CSV: unknown without a scan)."""
        if self.transcripts_format != "parquet":
            return None
        return int(pq.ParquetFile(self.transcripts_path).metadata.num_rows)

    @property
    def cells_path(self) -> Path | None:
        for name in CELLS_FILES:
            f = self.path / name
            if f.is_file():
                return f
        return None

    def read_cells(self):  # -> pandas.DataFrame
        """cells.parquet (or cells.csv.gz / cells.csv) as a DataFrame (cells tables are small)."""
        f = self.cells_path
        if f is None:
            raise InputError("no cells table", file=self.path, expected=" or ".join(CELLS_FILES))
        try:
            table = pq.read_table(f) if f.name.endswith(".parquet") else pacsv.read_csv(f)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"corrupt or unreadable cells table ({exc})", file=f) from None
        df = table.to_pandas()
        for col in df.columns:
            if df[col].dtype == object and len(df) and isinstance(df[col].iloc[0], (bytes, bytearray)):
                df[col] = [_normalise_name(v) for v in df[col]]
        return df

    # ------------------------------------------------------------------ streaming
    def _raw_batches(self, columns: Sequence[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """Record batches of the requested columns, at most ``batch_size`` rows each."""
        f = self.transcripts_path
        fmt = "Parquet" if self.transcripts_format == "parquet" else "CSV"
        try:
            if self.transcripts_format == "parquet":
                pf = pq.ParquetFile(f, read_dictionary=["feature_name"] if "feature_name" in columns else None)
                yield from pf.iter_batches(batch_size=batch_size, columns=list(columns))
            else:
                yield from _rebatch(self._csv_batches(columns, batch_size), batch_size)
        except (pa.ArrowException, OSError, EOFError) as exc:
            field_name = None
            m = re.search(r"CSV column #(\d+)", str(exc))
            if m and int(m.group(1)) < len(self.transcript_columns):
                field_name = self.transcript_columns[int(m.group(1))]
            raise InputError(
                f"corrupt or unreadable {fmt} ({exc})", file=f, field=field_name, expected=f"a valid {fmt} transcript table"
            ) from None

    def _csv_batches(self, columns: Sequence[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        types: dict[str, pa.DataType] = {c: pa.float64() for c in columns if c in _FLOAT_COLUMNS}
        if "feature_name" in columns:
            types["feature_name"] = pa.string()
        # blocks of at most 8 MB (~90k rows): bounded parser memory; _rebatch assembles batch_size rows
        block = int(min(max(batch_size * _CSV_BLOCK_BYTES_PER_ROW, 1 << 20), 1 << 23))
        reader = pacsv.open_csv(
            self.transcripts_path,
            read_options=pacsv.ReadOptions(block_size=block, encoding="utf8"),
            convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=types),
        )
        yield from reader

    def _index(self) -> tuple[list[str], list[str]]:
        if self._features is None:
            names: set[str] = set()
            n = 0
            for rb in self._raw_batches(["feature_name"], 1_000_000):
                arr = rb.column(0)
                n += len(arr)
                names.update(_batch_names(arr, self.transcripts_path, n - len(arr)))
            if n == 0:  # before any panel check: "every panel gene absent" would hide the real problem
                raise InputError("transcripts file is empty (no transcript rows)", file=self.transcripts_path, field="rows",
                                 expected="a transcript table with at least one row")
            self._features = sorted(names)
            self._genes = [g for g in self._features if not is_control(g)]
            log.info("%s: %d features (%d genes) in %d rows", self.transcripts_path.name, len(self._features), len(self._genes), n)
        assert self._genes is not None
        return self._features, self._genes

    @property
    def features(self) -> list[str]:
        """Sorted distinct feature names present in the transcripts, controls included."""
        return self._index()[0]

    @property
    def genes(self) -> list[str]:
        """Sorted distinct non-control feature names present (same as ``feature_names()``)."""
        return self._index()[1]

    def feature_names(self) -> list[str]:
        """Sorted non-control genes present in the transcripts (scans only ``feature_name``)."""
        return list(self.genes)

    def iter_transcripts(
        self,
        batch_size: int = 1_000_000,
        qv_min: float | None = 20.0,
        drop_controls: bool = True,
        columns: Iterable[str] = ("feature_name", "x_location", "y_location"),
    ) -> Iterator[TranscriptBatch]:
        """Stream transcripts in batches of at most ``batch_size`` rows read.

        * ``qv_min``: keep rows with ``qv >= qv_min``; ``None`` disables; skipped (with a
          warning) when the file has no ``qv`` column.
        * ``drop_controls``: drop features starting with :data:`CONTROL_PREFIXES`;
          ``n_controls_dropped`` counts those rows, ``n_low_qv_dropped`` counts the
          remaining rows that failed the qv filter.
        * ``columns``: feature_name/x_location/y_location are always read; any other
          column named here is returned in ``batch.columns``.

        Raises InputError for non-finite / missing coordinates (with the number of bad
        rows and the first bad row index), missing feature names, unreadable files and
        when no transcript is left after filtering.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        f = self.transcripts_path
        extra = [c for c in columns if c not in REQUIRED_COLUMNS]
        missing = [c for c in extra if c not in self.transcript_columns]
        if missing:
            raise InputError(
                f"requested column(s) {', '.join(missing)} not in the file", file=f, field=missing[0],
                expected="one of " + ", ".join(self.transcript_columns),
            )
        use_qv = qv_min is not None
        if use_qv and "qv" not in self.transcript_columns:
            log.warning("%s has no qv column: qv filter (qv_min=%s) skipped", f, qv_min)
            use_qv = False
        read_cols = list(REQUIRED_COLUMNS) + [c for c in extra if c not in REQUIRED_COLUMNS]
        if use_qv and "qv" not in read_cols:
            read_cols.append("qv")

        features, genes = self._index()
        names = genes if drop_controls else features
        feat_pos = {name: i for i, name in enumerate(features)}
        control = np.array([is_control(n) for n in features], dtype=bool)
        # feature index -> output code (-1 for dropped controls)
        if drop_controls:
            remap = np.full(len(features), -1, dtype=np.int32)
            remap[~control] = np.arange(int((~control).sum()), dtype=np.int32)
        else:
            remap = np.arange(len(features), dtype=np.int32)

        offset = 0
        n_rows = n_kept = n_ctrl = n_lowqv = 0
        for rb in self._raw_batches(read_cols, batch_size):
            n = rb.num_rows
            if n == 0:
                continue
            x = _coords(rb.column(read_cols.index("x_location")))
            y = _coords(rb.column(read_cols.index("y_location")))
            bad = ~(np.isfinite(x) & np.isfinite(y))
            if bad.any():
                self._raise_bad_coordinates(offset + int(np.argmax(bad)))
            fidx = _feature_index(rb.column(0), feat_pos, f, offset)
            keep = np.ones(n, dtype=bool)
            bc = 0
            if drop_controls:
                is_ctrl = control[fidx]
                bc = int(is_ctrl.sum())
                keep &= ~is_ctrl
            bq = 0
            if use_qv:
                qv = _coords(rb.column(read_cols.index("qv")))
                low = ~(qv >= float(qv_min))  # NaN qv counts as low
                bq = int((low & keep).sum())
                keep &= ~low
            k = int(keep.sum())
            n_rows += n
            n_ctrl += bc
            n_lowqv += bq
            if k:
                n_kept += k
                allk = k == n
                cols = {c: _to_numpy(rb.column(read_cols.index(c))) for c in extra}
                yield TranscriptBatch(
                    x=x if allk else x[keep],
                    y=y if allk else y[keep],
                    gene_codes=remap[fidx] if allk else remap[fidx[keep]],
                    gene_names=names,
                    columns={c: (v if allk else v[keep]) for c, v in cols.items()},
                    n_rows_read=n,
                    n_controls_dropped=bc,
                    n_low_qv_dropped=bq,
                    row_offset=offset,
                )
            offset += n
        if n_rows == 0:
            raise InputError("transcripts file is empty (no transcript rows)", file=f, field="rows",
                             expected="a transcript table with at least one row")
        if n_kept == 0:
            raise InputError(
                f"no transcripts left after filtering: {n_rows} rows read, {n_ctrl} control rows dropped, "
                f"{n_lowqv} rows with qv < {qv_min} dropped",
                file=f,
                expected="at least one non-control transcript passing the qv filter",
            )
        log.info("%s: %d of %d transcripts kept (%d controls, %d low qv dropped)", f.name, n_kept, n_rows, n_ctrl, n_lowqv)

    def _raise_bad_coordinates(self, first: int) -> None:
        """Count every row with a missing / non-finite coordinate (second pass), then raise."""
        total = 0
        for rb in self._raw_batches(["x_location", "y_location"], 1_000_000):
            x = _coords(rb.column(0))
            y = _coords(rb.column(1))
            total += int((~(np.isfinite(x) & np.isfinite(y))).sum())
        raise InputError(
            f"{total} row(s) with missing, NaN or infinite coordinates; first bad row index {first} (0-based data row)",
            file=self.transcripts_path,
            field="x_location/y_location",
            expected="finite coordinates in µm",
        )

    # ------------------------------------------------------------------ morphology
    @property
    def morphology_path(self) -> Path | None:
        """First of :data:`MORPHOLOGY_FILES` present, or None."""
        for name in MORPHOLOGY_FILES:
            f = self.path / name
            if f.is_file():
                return f
        return None

    def _morph_levels(self):
        import tifffile

        f = self.morphology_path
        if f is None:
            raise InputError("no morphology image", file=self.path, expected=" or ".join(MORPHOLOGY_FILES))
        try:
            tif = tifffile.TiffFile(f)
        except (tifffile.TiffFileError, OSError, ValueError) as exc:
            raise InputError(f"corrupt or unreadable TIFF ({exc})", file=f, expected="an OME-TIFF morphology image") from None
        try:
            if not tif.series:
                raise InputError("corrupt or unreadable TIFF (no image series)", file=f, expected="an OME-TIFF morphology image")
            return tif, list(tif.series[0].levels)
        except InputError:
            tif.close()
            raise
        except Exception as exc:  # tifffile raises assorted errors on damaged files
            tif.close()
            raise InputError(f"corrupt or unreadable TIFF ({exc})", file=f, expected="an OME-TIFF morphology image") from None

    def morphology_levels(self) -> list[tuple[int, int]]:
        """(height, width) of each pyramid level of the morphology image."""
        tif, levels = self._morph_levels()
        with tif:
            return [_yx_shape(lv) for lv in levels]

    def read_morphology(self, level: int = 0) -> np.ndarray:
        """2D uint16 DAPI image (first channel) at pyramid ``level`` (SubIFD levels included)."""
        tif, levels = self._morph_levels()
        f = self.morphology_path
        with tif:
            if not 0 <= level < len(levels):
                raise InputError(f"level {level} does not exist ({len(levels)} level(s))", file=f, field="level")
            lv = levels[level]
            try:
                pages = [p for p in lv.pages if p is not None]
                if len(pages) > 1:  # planes in OME order: the first plane is channel 0 (DAPI)
                    img = pages[0].asarray()
                else:
                    img = lv.asarray()
            except Exception as exc:
                raise InputError(f"corrupt or unreadable TIFF data ({exc})", file=f, expected="an OME-TIFF morphology image") from None
            axes = pages[0].axes if len(pages) > 1 else lv.axes
            img = _first_channel_2d(np.asarray(img), axes)
        if img.ndim != 2:
            raise InputError(f"image has shape {img.shape}", file=f, expected="a 2D (Y, X) DAPI plane")
        if img.dtype != np.uint16:
            if np.issubdtype(img.dtype, np.floating):
                img = np.nan_to_num(img)
            img = np.clip(img, 0, 65535).astype(np.uint16)
        return img


# ---------------------------------------------------------------------- helpers
def _rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Yield record batches of exactly ``size`` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    n_pending = 0
    for rb in batches:
        if rb.num_rows == 0:
            continue
        pending.append(rb)
        n_pending += rb.num_rows
        if n_pending < size:
            continue
        table = pa.Table.from_batches(pending).combine_chunks()
        start = 0
        while n_pending - start >= size:
            yield table.slice(start, size).to_batches()[0]
            start += size
        rest = table.slice(start)
        pending = rest.to_batches() if rest.num_rows else []
        n_pending = rest.num_rows
    if n_pending:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _coords(arr: pa.Array) -> np.ndarray:
    """float32 numpy view of a numeric column; nulls become NaN."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type)):
        try:
            arr = pc.cast(arr, pa.float64())
        except pa.ArrowException:
            return np.full(len(arr), np.nan, dtype=np.float32)
    out = arr.to_numpy(zero_copy_only=False)
    return out.astype(np.float32, copy=False)


def _dictionary(arr: pa.Array) -> pa.DictionaryArray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    return arr


def _null_error(arr: pa.Array, file: Path, offset: int) -> InputError:
    nulls = np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    return InputError(
        f"{int(nulls.sum())} row(s) in this batch without a feature name; first at row index {offset + int(np.argmax(nulls))}",
        file=file,
        field="feature_name",
        expected="a gene or control name on every row",
    )


def _batch_names(arr: pa.Array, file: Path, offset: int) -> set[str]:
    d = _dictionary(arr)
    if d.null_count:
        raise _null_error(d, file, offset)
    used = pc.unique(d.indices)
    return {_normalise_name(v) for v in d.dictionary.take(used).to_pylist()}


def _feature_index(arr: pa.Array, feat_pos: dict[str, int], file: Path, offset: int) -> np.ndarray:
    """Index into the bundle's feature list for every row (via the batch dictionary)."""
    d = _dictionary(arr)
    if d.null_count:
        raise _null_error(d, file, offset)
    values = d.dictionary.to_pylist()
    lookup = np.empty(len(values), dtype=np.int32)
    for i, v in enumerate(values):
        name = _normalise_name(v)
        pos = feat_pos.get(name)
        if pos is None:  # file changed since the feature scan
            raise InputError(f"feature {name!r} was not present when the file was indexed", file=file, field="feature_name")
        lookup[i] = pos
    idx = d.indices.to_numpy(zero_copy_only=False)
    return lookup[idx]


def _yx_shape(level: Any) -> tuple[int, int]:
    axes = level.axes
    shape = level.shape
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _first_channel_2d(img: np.ndarray, axes: str) -> np.ndarray:
    """Reduce an array with tifffile ``axes`` to its first (DAPI) 2D Y×X plane."""
    if len(axes) != img.ndim:
        return np.squeeze(img)
    index = tuple(slice(None) if a in "YX" else 0 for a in axes)
    out = img[index]
    kept = [a for a in axes if a in "YX"]
    if kept == ["X", "Y"]:
        out = out.T
    return out
