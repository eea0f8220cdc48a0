"""HEST-1k Xenium samples as pre-aligned xenium-kind samples.

HEST-1k (Jaume et al. 2024) ships, per sample id, under one root directory:

* ``transcripts/{id}_transcripts.parquet``: the Xenium transcripts with ``he_x`` / ``he_y``, their
  position in the H&E's level-0 pixels (HEST's own registration), ``feature_name`` (and ``qv`` ...);
* ``wsis/{id}.tif``: the H&E (pyramidal TIFF);
* ``metadata/{id}.json``: ``pixel_size_um_estimated`` (µm per H&E pixel, HEST's estimate; the
  ``pixel_size_um_embedded`` of the file is not always right), ``st_technology`` ...

Converted by :func:`ingest_hest` (rule ``xenium_ingest_hest``) into a bundle whose µm frame is the
H&E's pixels times the pixel size (x_location = he_x * mpp): the registration is the identity in H&E
pixels (``prealigned``). A sample without a pixel size (no ``pixel_size_um_estimated`` and no
``he_mpp`` in the sheet) is an InputError, found when the configuration is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json
from morphomol.util.logs import get_logger

log = get_logger("io.hest")

HE_X, HE_Y = "he_x", "he_y"


def hest_xenium_files(hest_dir: str | Path, hest_id: str, he_path: str | Path | None = None) -> dict[str, str]:
    """``transcripts``, ``metadata`` and ``he`` (the sheet's ``he_path`` or ``wsis/{id}.tif``) of a sample."""
    d = Path(hest_dir)
    return {"transcripts": str(d / "transcripts" / f"{hest_id}_transcripts.parquet"),
            "metadata": str(d / "metadata" / f"{hest_id}.json"),
            "he": str(he_path) if he_path else str(d / "wsis" / f"{hest_id}.tif")}


def read_metadata(path: str | Path) -> dict[str, Any]:
    return read_json(path, "HEST metadata", expected="metadata/{id}.json of the HEST-1k layout", obj=True)


def hest_pixel_size(metadata: str | Path, he_mpp: float | None = None) -> float:
    """µm per H&E pixel: the sheet's ``he_mpp``, else ``pixel_size_um_estimated``; InputError without one."""
    if he_mpp is not None and not (isinstance(he_mpp, float) and math.isnan(he_mpp)):
        return float(he_mpp)
    doc = read_metadata(metadata)
    v = doc.get("pixel_size_um_estimated")
    try:
        value = float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        hint = (f" (the file's pixel_size_um_embedded is {doc['pixel_size_um_embedded']}: check it, then set he_mpp)"
                if doc.get("pixel_size_um_embedded") is not None else "")
        raise InputError(f"HEST sample has no pixel size{hint}", file=metadata, field="pixel_size_um_estimated",
                         expected="pixel_size_um_estimated (µm per H&E pixel) in the metadata, or he_mpp in the sheet")
    return value


def check_transcripts(path: str | Path) -> list[str]:
    """The transcript table's columns; InputError when it lacks ``feature_name``, ``he_x`` or ``he_y``."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise InputError("HEST transcripts not found", file=p,
                         expected="transcripts/{id}_transcripts.parquet of a HEST-1k Xenium sample")
    try:
        cols = list(pq.ParquetFile(p).schema_arrow.names)
    except Exception as exc:  # pyarrow raises several types
        raise InputError(f"unreadable Parquet ({exc})", file=p, expected="a Parquet file") from None
    missing = [c for c in ("feature_name", HE_X, HE_Y) if c not in cols]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}", file=p, field=missing[0],
                         expected="HEST Xenium transcripts with feature_name, he_x, he_y (H&E level-0 px)")
    return cols


def _batches(path: Path, mpp: float, batch_size: int):
    import pyarrow.parquet as pq

    from morphomol.io.xenium_layout import _normalise_name

    pf = pq.ParquetFile(path)
    cols = [c for c in ("feature_name", HE_X, HE_Y, "qv", "z_location") if c in pf.schema_arrow.names]
    for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
        names = rb.column(cols.index("feature_name"))
        fn = names.to_numpy(zero_copy_only=False)
        if fn.dtype == object and len(fn) and isinstance(fn[0], (bytes, bytearray)):
            fn = np.array([_normalise_name(v) for v in fn], dtype=object)
        hx = rb.column(cols.index(HE_X)).to_numpy(zero_copy_only=False).astype(np.float64)
        hy = rb.column(cols.index(HE_Y)).to_numpy(zero_copy_only=False).astype(np.float64)
        ok = np.isfinite(hx) & np.isfinite(hy)
        out = {"feature_name": fn[ok], "x_location": hx[ok] * mpp, "y_location": hy[ok] * mpp}
        for c in ("qv", "z_location"):
            if c in cols:
                out[c] = rb.column(cols.index(c)).to_numpy(zero_copy_only=False).astype(np.float32)[ok]
        yield out


def ingest_hest(*, transcripts: str | Path, metadata: str | Path, he: str | Path, out_dir: str | Path, sample: str,
                he_mpp: float | None = None, batch_size: int = 2_000_000) -> dict[str, Any]:
    """Rule ``xenium_ingest_hest``: write the pre-aligned bundle of a HEST-1k Xenium sample into ``out_dir``
    (see :mod:`morphomol.io.ingest`); returns a summary. Nothing is written on bad input."""
    from morphomol.geometry import scale
    from morphomol.io.he import open_slide
    from morphomol.io.ingest import INGESTED, all_or_nothing, write_alignment, write_experiment, write_transcripts

    mpp = hest_pixel_size(metadata, he_mpp)
    check_transcripts(transcripts)
    slide = open_slide(he, mpp=mpp)  # readable, with this pixel size
    dims = slide.dimensions
    slide.close()
    out = Path(out_dir)
    with all_or_nothing(out, ("transcripts", "experiment", "alignment")):
        n = write_transcripts(out / INGESTED["transcripts"], _batches(Path(transcripts), mpp, batch_size))
        if n == 0:
            raise InputError("no transcript with finite he_x / he_y", file=transcripts, field="he_x",
                             expected="transcripts positioned in the H&E")
        write_experiment(out / INGESTED["experiment"], pixel_size=mpp, source="hest", sample=sample,
                         extra={"hest_metadata": str(metadata)})
        # morphology px are H&E px (pixel_size = mpp): the alignment is the identity
        write_alignment(out / INGESTED["alignment"], scale(1.0))
    log.info("%s: HEST sample, %d transcripts at %.4g µm/px (H&E %dx%d px)", sample, n, mpp, *dims)
    return {"sample": sample, "format": "hest", "transcripts": n, "mpp": mpp}


__all__ = ["check_transcripts", "hest_pixel_size", "hest_xenium_files", "ingest_hest", "read_metadata"]
