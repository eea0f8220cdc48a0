"""Sample-sheet rows of xenium cohorts: input formats, and what the sheet may leave out.

A xenium cohort's rows name one of three input formats (column ``format``, default ``xenium``):

==============  ==============================================  ================================
format          columns                                          registration
==============  ==============================================  ================================
``xenium``      ``xenium_dir`` [, ``he_path``, ``alignment``,   landmarks / matrix / image
                ``he_mpp``, ``regions``]                         (+ refinement)
``spatialdata`` ``sdata`` [, ``sdata_image``, ``he_mpp``,        ``prealigned`` (the zarr's own
                ``regions``]                                     transformations)
``hest``        ``hest_dir`` [, ``hest_id``, ``he_path``,        ``prealigned`` (``he_x`` / ``he_y``)
                ``he_mpp``, ``regions``]
==============  ==============================================  ================================

:func:`resolve_xenium_sheet` runs when the configuration is loaded (torch-free, reads no large
file), so that ``snakemake -n`` knows every input:

* ``xenium`` rows without ``he_path``: the bundle's ``*he_image.ome.tif`` (inside it or next to it,
  :mod:`morphomol.io.discover`); ``alignment`` empty and the H&E found that way: its
  ``*he_imagealignment.csv``. Nothing found: InputError naming the row.
* ``hest`` rows: ``hest_id`` defaults to ``sample_id``, ``he_path`` to ``wsis/{id}.tif``; ``he_mpp``
  is filled from ``pixel_size_um_estimated`` (a sample without a pixel size is an InputError); the
  transcripts must have ``he_x`` / ``he_y``.
* ``spatialdata`` rows: the zarr must hold points ``transcripts`` and an image (layout check).

Columns another format reads are an error. Simulated cohorts (inputs not written yet) are left as
they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from morphomol.errors import InputError

FORMATS = ("xenium", "spatialdata", "hest")
PREALIGNED = ("spatialdata", "hest")
#: files of a converted (pre-aligned) sample, relative to its ingest directory (morphomol.io.ingest)
INGESTED = {"experiment": "xenium/experiment.xenium", "transcripts": "xenium/transcripts.parquet",
            "alignment": "he_imagealignment.csv", "he": "he.ome.tif"}
FORMAT_COLUMNS = {
    "xenium": ("xenium_dir", "he_path", "he_mpp", "alignment", "regions"),
    "spatialdata": ("sdata", "sdata_image", "he_mpp", "regions"),
    "hest": ("hest_dir", "hest_id", "he_path", "he_mpp", "regions"),
}
FORMAT_SPECIFIC = ("xenium_dir", "he_path", "alignment", "sdata", "sdata_image", "hest_dir", "hest_id")


def row_format(row: dict[str, Any]) -> str:
    return str(row.get("format") or "xenium")


@dataclass(frozen=True)
class SampleSources:
    """Where a xenium-kind sample's inputs are, whatever its format: the bundle the stages read (the
    sheet's, or the one the ingest rule writes), the H&E, the alignment and regions (None: not given)."""

    format: str
    xenium_dir: str | None
    he_path: str | None
    he_mpp: float | None
    alignment: str | None
    regions: str | None
    ingested: dict[str, str]  # name (INGESTED keys) -> converted file of a pre-aligned sample

    @property
    def prealigned(self) -> bool:
        return self.format in PREALIGNED


def sample_sources(cohort: Any, sample: str, paths: Any) -> SampleSources:
    """The :class:`SampleSources` of ``sample`` of ``cohort`` (a loaded :class:`~morphomol.config.Cohort`);
    ``paths``: the workflow's ``WorkflowPaths`` (converted bundles live under ``paths.ingested``).
    Used by the rules (``common.smk``) and by the CLI exports, so both read the same files."""
    field = cohort.field
    fmt = str(field(sample, "format") or "xenium")
    if fmt not in FORMATS:
        raise InputError(f"sample {sample}: unknown format {fmt!r}", file=getattr(cohort, "sheet_path", None),
                         field="format", expected=" | ".join(FORMATS))
    conv = {}
    if fmt in PREALIGNED:
        conv = {k: paths.ingested(fmt, v, cohort.name, sample) for k, v in INGESTED.items()
                if k != "he" or fmt == "spatialdata"}
    xdir = str(Path(conv["experiment"]).parent) if conv else field(sample, "xenium_dir")
    he = conv["he"] if fmt == "spatialdata" else field(sample, "he_path")
    align = conv.get("alignment") or field(sample, "alignment")
    mpp = field(sample, "he_mpp")
    return SampleSources(fmt, xdir, he, float(mpp) if mpp is not None else None, align, field(sample, "regions"), conv)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def resolve_xenium_sheet(df: pd.DataFrame, *, sheet: Path, workdir: Path, simulated: bool) -> pd.DataFrame:
    """The sheet with auto-discovered / default paths filled in (see the module docstring)."""
    from morphomol.io.discover import find_he_files
    from morphomol.io.hest import check_transcripts, hest_pixel_size, hest_xenium_files
    from morphomol.io.sdata import check_layout

    df = df.copy()
    for i, sid in enumerate(df.index):
        row = {k: (None if _empty(v) else v) for k, v in df.loc[sid].to_dict().items()}
        fmt = row_format(row)
        where = f"row {i + 2} (sample {sid})"
        extra = [c for c in FORMAT_SPECIFIC if row.get(c) is not None and c not in FORMAT_COLUMNS[fmt]]
        if extra:
            raise InputError(f"{where}: column {extra[0]} is not read by format {fmt}", file=sheet, field=extra[0],
                             expected=f"columns of format {fmt}: " + ", ".join(FORMAT_COLUMNS[fmt]))
        if simulated:
            continue
        if fmt == "xenium" and row.get("he_path") is None:
            found = find_he_files(workdir / str(row["xenium_dir"]))
            if found.he_path is None:
                raise InputError(f"{where}: he_path is empty and the bundle {row['xenium_dir']} has no "
                                 "*he_image.ome.tif (inside it or next to it)", file=sheet, field="he_path",
                                 expected="he_path in the sheet, or the bundle's H&E (*he_image.ome.tif)")
            df.at[sid, "he_path"] = _rel(found.he_path, workdir)
            if row.get("alignment") is None and found.alignment is not None:
                df.at[sid, "alignment"] = _rel(found.alignment, workdir)
        elif fmt == "hest":
            hid = str(row.get("hest_id") or sid)
            files = hest_xenium_files(workdir / str(row["hest_dir"]), hid, row.get("he_path") and workdir / row["he_path"])
            for name in ("metadata", "he"):
                if not Path(files[name]).is_file():
                    raise InputError(f"{where}: HEST {name} file not found: {files[name]}", file=sheet,
                                     field="he_path" if name == "he" else "hest_dir",
                                     expected="the HEST-1k layout: transcripts/{id}_transcripts.parquet, "
                                              "wsis/{id}.tif, metadata/{id}.json")
            check_transcripts(files["transcripts"])
            df.at[sid, "hest_id"] = hid
            if row.get("he_path") is None:
                df.at[sid, "he_path"] = _rel(Path(files["he"]), workdir)
            try:
                mpp = hest_pixel_size(files["metadata"], row.get("he_mpp"))
            except InputError as exc:
                raise InputError(f"{where}: {exc.message}", field=exc.field) from None
            df.at[sid, "he_mpp"] = mpp
        elif fmt == "spatialdata":
            try:
                check_layout(workdir / str(row["sdata"]), row.get("sdata_image"))
            except InputError as exc:
                raise InputError(f"{where}: {exc.message}", field=exc.field) from None
    return df


def _rel(p: Path, workdir: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(workdir).resolve()))
    except ValueError:
        return str(p)


__all__ = ["FORMATS", "INGESTED", "PREALIGNED", "FORMAT_COLUMNS", "FORMAT_SPECIFIC", "SampleSources", "sample_sources", "resolve_xenium_sheet", "row_format"]
