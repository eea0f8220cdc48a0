"""Readers for registration inputs: Xenium Explorer keypoints, 10x alignment matrices, region GeoJSON.

Formats
-------
* Keypoints CSV (Xenium Explorer export): header ``fixedX,fixedY,alignmentX,alignmentY``
  (fixed = morphology/DAPI image pixels, alignment = H&E pixels), optionally a ``region``
  column (label of the tissue region the landmark belongs to). Extra columns are ignored. A row
  repeating an earlier row (same four coordinates and region) is the same landmark pair, not a new
  one: it is dropped with a warning naming the lines (repeats would weigh a pair twice in the fit and
  make its leave-one-out error look smaller than it is).
* Alignment matrix CSV (``*_he_imagealignment.csv``): headerless 3×3 affine, comma (or
  whitespace) separated, mapping H&E pixels → morphology pixels.
* Regions: GeoJSON polygons / multipolygons (holes kept) or Xenium Explorer selection CSVs in
  Xenium µm: :mod:`morphomol.io.regions` (re-exported here).

:func:`read_alignment` detects keypoints vs matrix by content, not by file name.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphomol.errors import InputError
from morphomol.io.regions import RegionPolygon, read_regions, read_regions_geojson  # noqa: F401  (re-exported)
from morphomol.util.logs import get_logger

log = get_logger("landmarks")

KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
REGION_COLUMN = "region"


@dataclass
class Keypoints:
    """Landmark pairs read from a keypoints CSV.

    ``fixed_px``: (n, 2) morphology-image pixels; ``moving_px``: (n, 2) H&E level-0 pixels;
    ``regions``: per-landmark region label or ``None``; ``rows``: 1-based CSV line numbers
    (header = line 1) so errors can name the offending line.
    """

    path: Path
    fixed_px: np.ndarray
    moving_px: np.ndarray
    regions: list[str] | None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    def __len__(self) -> int:
        return int(self.fixed_px.shape[0])


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError("file not found", file=path, expected="an existing file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not a text file ({exc.reason})", file=path, expected="a CSV text file") from None


def _tokens(line: str) -> list[str]:
    line = line.strip()
    if "," in line:
        return [t.strip().strip('"').strip() for t in line.split(",")]
    if ";" in line:
        return [t.strip() for t in line.split(";")]
    return line.split()


def _is_float(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def detect_alignment_format(path: str | Path) -> str:
    """Return ``"matrix"`` for a headerless 3×3 numeric CSV, ``"keypoints"`` otherwise."""
    path = Path(path)
    lines = [ln for ln in _read_text(path).splitlines() if ln.strip()]
    if not lines:
        raise InputError("file is empty", file=path,
                         expected="a keypoints CSV (fixedX,fixedY,alignmentX,alignmentY) or a 3x3 alignment matrix")
    first = _tokens(lines[0])
    if first and all(_is_float(t) for t in first if t != ""):
        return "matrix"
    return "keypoints"


def read_alignment_matrix(path: str | Path) -> np.ndarray:
    """Read a headerless 3×3 affine (H&E px → morphology px). Validates shape, finiteness, last row."""
    path = Path(path)
    rows = []
    for i, ln in enumerate(_read_text(path).splitlines(), start=1):
        if not ln.strip():
            continue
        toks = [t for t in _tokens(ln) if t != ""]
        if not all(_is_float(t) for t in toks):
            raise InputError(f"line {i} is not numeric: {ln.strip()[:80]!r}", file=path, field="matrix",
                             expected="a headerless 3x3 numeric matrix")
        rows.append([float(t) for t in toks])
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        shape = f"{len(rows)} rows with {sorted({len(r) for r in rows})} columns"
        raise InputError(f"alignment matrix has {shape}", file=path, field="matrix",
                         expected="3 rows x 3 columns (H&E px -> morphology px)")
    m = np.asarray(rows, dtype=float)
    if not np.all(np.isfinite(m)):
        raise InputError("alignment matrix has non-finite entries", file=path, field="matrix",
                         expected="finite numbers")
    if not np.allclose(m[2], [0.0, 0.0, 1.0], atol=1e-6):
        if abs(m[2, 2]) > 1e-12 and np.allclose(m[2, :2], 0.0, atol=1e-9):
            m = m / m[2, 2]
        else:
            raise InputError(f"last row is {m[2].tolist()}, not an affine", file=path, field="matrix",
                             expected="last row [0, 0, 1]")
    det = float(np.linalg.det(m[:2, :2]))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise InputError(f"alignment matrix is singular (det={det:.3g})", file=path, field="matrix",
                         expected="an invertible affine")
    return m


def read_keypoints(path: str | Path) -> Keypoints:
    """Read a Xenium Explorer keypoints CSV (``fixedX,fixedY,alignmentX,alignmentY`` [, ``region``])."""
    path = Path(path)
    text = _read_text(path)
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        raise InputError("file is empty", file=path, field="header",
                         expected=",".join(KEYPOINT_COLUMNS)) from None
    header = [h.strip() for h in header]
    lower = {h.lower(): i for i, h in enumerate(header)}
    missing = [c for c in KEYPOINT_COLUMNS if c.lower() not in lower]
    if missing:
        raise InputError(f"keypoints header is {','.join(header)[:120]!r}; missing {missing}",
                         file=path, field="header",
                         expected="columns " + ",".join(KEYPOINT_COLUMNS) + " (optional 'region')")
    idx = [lower[c.lower()] for c in KEYPOINT_COLUMNS]
    ridx = lower.get(REGION_COLUMN)
    vals: list[list[float]] = []
    regs: list[str] = []
    rows: list[int] = []
    for line_no, rec in enumerate(reader, start=2):
        if not rec or all(not t.strip() for t in rec):
            continue
        try:
            v = [float(rec[i]) for i in idx]
        except (ValueError, IndexError):
            raise InputError(f"line {line_no} has a missing or non-numeric coordinate: {','.join(rec)[:80]!r}",
                             file=path, field=",".join(KEYPOINT_COLUMNS), expected="numbers") from None
        if not all(math.isfinite(x) for x in v):
            raise InputError(f"line {line_no} has a non-finite coordinate", file=path,
                             field=",".join(KEYPOINT_COLUMNS), expected="finite numbers")
        vals.append(v)
        rows.append(line_no)
        if ridx is not None:
            lab = rec[ridx].strip() if ridx < len(rec) else ""
            if not lab:
                raise InputError(f"line {line_no} has an empty region label", file=path, field=REGION_COLUMN,
                                 expected="a region label on every row (or no region column)")
            regs.append(lab)
    if not vals:
        raise InputError("no landmark rows", file=path, field="rows", expected="at least 3 landmark pairs")
    first: dict[tuple, int] = {}
    keep: list[int] = []
    repeats: list[str] = []
    for i, v in enumerate(vals):
        key = (*v, regs[i] if ridx is not None else None)
        if key in first:
            repeats.append(f"line {rows[i]} repeats line {rows[first[key]]}")
        else:
            first[key] = i
            keep.append(i)
    if repeats:
        log.warning("%s: %d repeated landmark row(s) dropped (a repeated pair is one landmark): %s%s", path,
                    len(repeats), "; ".join(repeats[:10]), " ..." if len(repeats) > 10 else "")
        vals = [vals[i] for i in keep]
        rows = [rows[i] for i in keep]
        if ridx is not None:
            regs = [regs[i] for i in keep]
    arr = np.asarray(vals, dtype=float)
    return Keypoints(path=path, fixed_px=arr[:, 0:2].copy(), moving_px=arr[:, 2:4].copy(),
                     regions=regs if ridx is not None else None, rows=np.asarray(rows, dtype=int))


def read_alignment(path: str | Path) -> Keypoints | np.ndarray:
    """Read either input format, detected by content: a :class:`Keypoints` or a 3×3 matrix."""
    kind = detect_alignment_format(path)
    return read_alignment_matrix(path) if kind == "matrix" else read_keypoints(path)


def write_keypoints(path: str | Path, fixed_px: np.ndarray, moving_px: np.ndarray,
                    regions: list[str] | None = None) -> None:
    """Write a keypoints CSV in the Xenium Explorer layout (used by tests, benchmarks, the simulator)."""
    from morphomol.util.atomic import atomic_path

    fixed_px = np.asarray(fixed_px, float)
    moving_px = np.asarray(moving_px, float)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(KEYPOINT_COLUMNS) + ([REGION_COLUMN] if regions is not None else []))
        for i in range(len(fixed_px)):
            row = [f"{fixed_px[i, 0]:.4f}", f"{fixed_px[i, 1]:.4f}", f"{moving_px[i, 0]:.4f}", f"{moving_px[i, 1]:.4f}"]
            if regions is not None:
                row.append(regions[i])
            w.writerow(row)
