"""Readers of the three spot layouts into one :class:`SpotData` (counts + positions in image pixels).

* :func:`read_spaceranger` — Space Ranger ``outs/``: the 10x HDF5 matrix (v3 ``matrix/features``, or
  the v2 per-genome layout; Gene Expression features only), ``tissue_positions.csv`` (>= 2.0, header)
  or ``tissue_positions_list.csv`` (1.x, no header; columns barcode, in_tissue, array_row, array_col,
  pxl_row_in_fullres, pxl_col_in_fullres), ``scalefactors_json.json`` (optional).
* :func:`read_st` — legacy ST: a spots x genes counts table (TSV/CSV, optionally gzipped; spot ids
  ``{x}x{y}``, a genes x spots table is transposed) and the ST Spot Detector table (``x, y, pixel_x,
  pixel_y`` [+ ``selected``]; pixels of the full-resolution image).
* :func:`read_hest` — HEST-1k: ``st/{id}.h5ad`` (``obsm['spatial']`` in full-resolution px; obs
  ``in_tissue``, ``array_row``, ``array_col`` when present) and ``metadata/{id}.json``.

Spots of the counts without a position and in-tissue (selected) positions without counts — a few per
section are normal in legacy ST — are dropped by default (``missing_spots="drop"``: counted in
``SpotData.counts_info`` and the sample's QC, one warning naming the spot table / positions file, the
file that holds them); ``missing_spots="error"`` (config ``spots.missing_spots``) makes them an InputError.
When they are more than half of either side, the two files do not belong together: an InputError in
either mode. Every other inconsistency is one InputError naming the file: duplicate spot ids,
non-finite or negative counts, malformed rows.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json
from morphomol.util.logs import get_logger

log = get_logger("spots.readers")

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
ST_ID = re.compile(r"^(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)$")


@dataclass
class SpotData:
    """One sample's spots: counts (spots x genes) and positions in full-resolution image pixels."""

    fmt: str
    platform: str                   # visium | st (geometry of morphomol.studies.spots.geometry.PLATFORMS)
    barcodes: np.ndarray            # (N,) str
    counts: sp.csr_matrix           # (N, G) float32 raw counts
    genes: list[str]
    x_px: np.ndarray                # (N,) float64, full-resolution px (x right)
    y_px: np.ndarray                # (N,) float64 (y down)
    in_tissue: np.ndarray           # (N,) bool
    array_row: np.ndarray | None = None
    array_col: np.ndarray | None = None
    spot_diameter_px: float | None = None   # scalefactors spot_diameter_fullres
    scalefactors: dict[str, float] = field(default_factory=dict)
    hest_mpp: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    counts_info: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.barcodes)


def _unique_genes(names: list[str], file: Path) -> list[str]:
    """Gene names made unique the way AnnData does (``name-1``, ``name-2`` for repeats)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    if len(set(out)) != len(names):
        raise InputError("gene names cannot be made unique", file=file, field="features/name")
    n_dup = sum(1 for v in seen.values() if v)
    if n_dup:
        log.info("%s: %d gene name(s) occur more than once; made unique with -1, -2 suffixes", file, n_dup)
    return out


MISSING_SPOTS = ("drop", "error")


def check_counts(values: Any, file: Path, field_name: str, ids: Any = None, genes: Any = None) -> None:
    """Counts must be finite and non-negative (a NaN gene would make every spot's total NaN)."""
    data = values.data if sp.issparse(values) else np.asarray(values)
    if data.size == 0:
        return
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{int(bad.sum())} non-finite count value(s) (NaN or inf)", file=file, field=field_name,
                         expected="finite, non-negative raw counts")
    lo = float(data.min())
    if lo < 0:
        raise InputError(f"negative count value(s) (min {lo:g}): scaled or centred data", file=file, field=field_name,
                         expected="non-negative raw counts")


def join_spots(count_ids: list[str], table_ids: Any, selected: np.ndarray, *, missing_spots: str, table_file: Path,
               counts_file: Path, table_field: str, what: str = "spot table"
               ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Join the counts' spot ids to a spot table (positions). Returns ``(rows, where, info)``: the counts
    rows kept, their row in the table, and ``counts_without_position`` / ``selected_without_counts``.
    Both kinds are dropped (``missing_spots="drop"``, with a warning naming ``table_file``) or are an
    InputError (``"error"``); more than half of either side missing is an InputError in both modes."""
    if missing_spots not in MISSING_SPOTS:
        raise InputError(f"invalid value {missing_spots!r}", field="spots.missing_spots", expected="drop | error")
    index = pd.Index(table_ids)
    where = index.get_indexer(count_ids)
    no_pos = np.asarray(count_ids, dtype=object)[where < 0]
    in_counts = np.zeros(len(index), bool)
    in_counts[where[where >= 0]] = True
    no_counts = np.asarray(index, dtype=object)[np.asarray(selected, bool) & ~in_counts]
    n_sel = int(np.asarray(selected, bool).sum())
    info = {"counts_without_position": int(len(no_pos)), "selected_without_counts": int(len(no_counts))}
    if len(no_pos) * 2 > len(count_ids) or (n_sel and len(no_counts) * 2 > n_sel):
        raise InputError(f"{len(no_pos)} of {len(count_ids)} spot(s) of {counts_file.name} have no position and "
                         f"{len(no_counts)} of {n_sel} selected / in-tissue spot(s) have no counts: the two files do "
                         "not belong together", file=table_file, field=table_field,
                         expected=f"the {what} of the same section as {counts_file.name}")
    if missing_spots == "error":
        if len(no_pos):
            raise InputError(f"{len(no_pos)} spot(s) of the counts have no position (e.g. "
                             f"{', '.join(map(str, no_pos[:3]))})", file=table_file, field=table_field,
                             expected=f"every spot of {counts_file.name} (or spots.missing_spots: drop)")
        if len(no_counts):
            raise InputError(f"{len(no_counts)} selected / in-tissue spot(s) of the {what} are not in the counts "
                             f"(e.g. {', '.join(map(str, no_counts[:3]))})", file=table_file, field=table_field,
                             expected=f"counts in {counts_file.name} for every selected spot "
                                      "(or spots.missing_spots: drop)")
    if len(no_pos) or len(no_counts):
        log.warning("%s: dropped %d selected / in-tissue spot(s) without counts in %s (e.g. %s) and %d spot(s) of "
                    "the counts without a position (e.g. %s) [spots.missing_spots: drop]", table_file, len(no_counts),
                    counts_file.name, ", ".join(map(str, no_counts[:3])) or "-", len(no_pos),
                    ", ".join(map(str, no_pos[:3])) or "-")
    rows = np.flatnonzero(where >= 0)
    return rows, where[rows], info


def _check_duplicates(ids: np.ndarray, file: Path, field_name: str) -> None:
    s = pd.Series(ids)
    dup = s[s.duplicated()]
    if len(dup):
        raise InputError(f"duplicate spot id(s) {sorted(set(dup))[:5]} ({len(dup)} repeated)", file=file,
                         field=field_name, expected="unique spot ids")


# ------------------------------------------------------------------------------ Space Ranger
def read_10x_h5(path: str | Path) -> tuple[np.ndarray, list[str], sp.csr_matrix, dict[str, Any]]:
    """(barcodes, genes, counts barcodes x genes CSR float32, info) of a 10x HDF5 feature-barcode matrix."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise InputError("feature-barcode matrix not found", file=p, expected="filtered_feature_bc_matrix.h5")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise InputError(f"not an HDF5 file ({exc})", file=p, expected="a 10x feature-barcode matrix .h5") from None
    with f:
        if "matrix" in f:
            g = f["matrix"]
            feats = g.get("features")
            if feats is None or "name" not in feats:
                raise InputError("no matrix/features/name", file=p, field="matrix/features")
            names = [x.decode() for x in feats["name"][:]]
            ids = [x.decode() for x in feats["id"][:]] if "id" in feats else names
            ftype = [x.decode() for x in feats["feature_type"][:]] if "feature_type" in feats else ["Gene Expression"] * len(names)
        else:  # Cell Ranger 2 layout: one group per genome
            groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
            if not groups:
                raise InputError("no 'matrix' group", file=p, field="matrix", expected="a 10x HDF5 matrix (v2 or v3)")
            g = f[groups[0]]
            names = [x.decode() for x in g["gene_names"][:]]
            ids = [x.decode() for x in g["genes"][:]]
            ftype = ["Gene Expression"] * len(names)
        try:
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            shape = tuple(int(v) for v in g["shape"][:])
            barcodes = np.array([x.decode() for x in g["barcodes"][:]], dtype=object)
        except KeyError as exc:
            raise InputError(f"missing dataset {exc}", file=p, field="matrix") from None
    if shape != (len(names), len(barcodes)) or len(indptr) != len(barcodes) + 1:
        raise InputError(f"matrix shape {shape} does not match {len(names)} features x {len(barcodes)} barcodes",
                         file=p, field="matrix/shape")
    check_counts(data, p, "matrix/data")
    m = sp.csc_matrix((data, indices, indptr), shape=shape).T.tocsr().astype(np.float32)
    keep = np.array([t == "Gene Expression" for t in ftype])
    if not keep.any():
        raise InputError("no 'Gene Expression' features", file=p, field="matrix/features/feature_type")
    info = {"features": len(names), "gene_expression_features": int(keep.sum())}
    genes = _unique_genes([n for n, k in zip(names, keep) if k], p)
    _check_duplicates(barcodes, p, "matrix/barcodes")
    return barcodes, genes, m[:, np.flatnonzero(keep)], {**info, "gene_ids": [i for i, k in zip(ids, keep) if k]}


def read_tissue_positions(path: str | Path) -> pd.DataFrame:
    """Space Ranger positions (both versions) as a DataFrame with :data:`POSITION_COLUMNS`."""
    p = Path(path)
    if not p.is_file():
        raise InputError("tissue positions not found", file=p,
                         expected="spatial/tissue_positions.csv or spatial/tissue_positions_list.csv")
    with open(p) as fh:
        first = fh.readline()
    header = first.split(",")[0].strip().strip('"') == "barcode"
    try:
        df = pd.read_csv(p, header=0 if header else None, dtype={0: str})
    except Exception as exc:
        raise InputError(f"cannot parse positions ({exc})", file=p) from None
    if df.shape[1] != 6:
        raise InputError(f"{df.shape[1]} columns", file=p, field="columns", expected=", ".join(POSITION_COLUMNS))
    df.columns = list(POSITION_COLUMNS)
    for c in POSITION_COLUMNS[1:]:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            line = int(np.flatnonzero(v.isna().to_numpy())[0]) + (2 if header else 1)
            raise InputError(f"line {line}: {c} {df[c].iloc[line - (2 if header else 1)]!r} is not a number", file=p,
                             field=c)
        df[c] = v
    df["barcode"] = df["barcode"].astype(str)
    _check_duplicates(df["barcode"].to_numpy(), p, "barcode")
    return df


def read_spaceranger(matrix: str | Path, positions: str | Path, scalefactors: str | Path | None, *,
                     missing_spots: str = "drop") -> SpotData:
    """A Space Ranger sample: every spot of the positions file that is in the matrix (out-of-tissue spots
    of a raw matrix included, flagged). Matrix barcodes without a position and in-tissue positions
    without counts are dropped or an InputError (``missing_spots``, see the module docstring)."""
    barcodes, genes, counts, info = read_10x_h5(matrix)
    pos = read_tissue_positions(positions)
    rows, where, dropped = join_spots(list(barcodes), pos["barcode"].to_numpy(), pos["in_tissue"].to_numpy() == 1,
                                      missing_spots=missing_spots, table_file=Path(positions), counts_file=Path(matrix),
                                      table_field="barcode", what="positions")
    if len(rows) < len(barcodes):
        barcodes, counts = barcodes[rows], counts[rows]
    in_tissue_pos = pos.loc[pos["in_tissue"] == 1, "barcode"].to_numpy()
    sel = pos.iloc[where]
    sf: dict[str, float] = {}
    if scalefactors is not None and Path(scalefactors).is_file():
        raw = read_json(scalefactors, "scalefactors_json.json", obj=True)
        sf = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        d = sf.get("spot_diameter_fullres")
        if d is not None and not d > 0:
            raise InputError(f"spot_diameter_fullres {d}", file=scalefactors, field="spot_diameter_fullres",
                             expected="a positive number of pixels")
    return SpotData(
        fmt="spaceranger", platform="visium", barcodes=barcodes, counts=counts, genes=genes,
        x_px=sel["pxl_col_in_fullres"].to_numpy(np.float64), y_px=sel["pxl_row_in_fullres"].to_numpy(np.float64),
        in_tissue=sel["in_tissue"].to_numpy() == 1, array_row=sel["array_row"].to_numpy(np.int64),
        array_col=sel["array_col"].to_numpy(np.int64), spot_diameter_px=sf.get("spot_diameter_fullres"),
        scalefactors=sf, counts_info={"positions": len(pos), "positions_in_tissue": len(in_tissue_pos),
                                      "matrix_barcodes": len(barcodes) + dropped["counts_without_position"],
                                      **dropped},
        meta={"gene_ids": info["gene_ids"], "features": info["features"]})


# ------------------------------------------------------------------------------ legacy ST
def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t"
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            return pd.read_csv(fh, sep=sep, index_col=0)
    except Exception as exc:
        raise InputError(f"cannot parse table ({type(exc).__name__}: {exc})", file=path,
                         expected="a TSV/CSV table, optionally gzipped") from None


def read_st_ids(path: str | Path) -> list[str]:
    """The spot ids of a legacy ST counts table without parsing its values (pre-flight checks): the first
    field of every line, or the header when the table is genes x spots."""
    p = Path(path)
    name = p.name.lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t"
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rt") as fh:
            header = fh.readline().rstrip("\r\n").split(sep)
            first = [ln.split(sep, 1)[0].strip('"') for ln in fh]
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"cannot read table ({type(exc).__name__}: {exc})", file=p,
                         expected="a TSV/CSV table, optionally gzipped") from None
    first = [f for f in first if f]
    cols = [h.strip('"') for h in header[1:]]
    if not all(ST_ID.match(i) for i in first) and cols and all(ST_ID.match(c) for c in cols):
        return cols
    return first


def st_key(a: float, b: float) -> str:
    return f"{int(round(a))}x{int(round(b))}"


def read_st_table(spots: str | Path) -> pd.DataFrame:
    """The ST Spot Detector table indexed by ``{x}x{y}``: columns ``px``, ``py``, ``sel``."""
    spath = Path(spots)
    try:
        st = pd.read_csv(spath, sep=None, engine="python")
    except Exception as exc:
        raise InputError(f"cannot parse table ({type(exc).__name__}: {exc})", file=spath,
                         expected="ST Spot Detector columns x, y, pixel_x, pixel_y [, selected]") from None
    st.columns = [str(c).strip() for c in st.columns]
    need = ("x", "y", "pixel_x", "pixel_y")
    miss = [c for c in need if c not in st.columns]
    if miss:
        raise InputError(f"missing column(s) {miss}", file=spath, field=miss[0],
                         expected="ST Spot Detector columns x, y, pixel_x, pixel_y [, selected]")
    for c in need + (("selected",) if "selected" in st.columns else ()):
        v = pd.to_numeric(st[c], errors="coerce")
        if not np.isfinite(v.to_numpy(np.float64)).all():
            line = int(np.flatnonzero(~np.isfinite(v.to_numpy(np.float64)))[0]) + 2
            raise InputError(f"line {line}: {c} {st[c].iloc[line - 2]!r} is not a number", file=spath, field=c)
        st[c] = v
    key = [st_key(a, b) for a, b in zip(st["x"], st["y"])]
    _check_duplicates(np.array(key, dtype=object), spath, "x, y")
    return pd.DataFrame({"px": st["pixel_x"].astype(float).to_numpy(), "py": st["pixel_y"].astype(float).to_numpy(),
                         "sel": (st["selected"].astype(int).to_numpy() == 1) if "selected" in st.columns
                         else np.ones(len(st), bool)}, index=key)


def read_st(counts: str | Path, spots: str | Path, *, missing_spots: str = "drop") -> SpotData:
    """A legacy ST sample: counts (spots x genes, ids ``{x}x{y}``) joined to the spot detector table.
    Spots of one without the other are dropped or an InputError (``missing_spots``, module docstring)."""
    cpath, spath = Path(counts), Path(spots)
    for p, what in ((cpath, "counts table"), (spath, "spot table")):
        if not p.is_file():
            raise InputError(f"{what} not found", file=p)
    df = _read_table(cpath)
    ids = df.index.astype(str)
    if not ids.str.match(ST_ID).all() and df.columns.astype(str).str.match(ST_ID).all():
        df = df.T
        ids = df.index.astype(str)
    bad = ids[~ids.str.match(ST_ID)]
    if len(bad):
        raise InputError(f"spot id {bad[0]!r} is not of the form XxY", file=cpath, field="spot id",
                         expected="rows (or columns) named like 10x21")
    _check_duplicates(ids.to_numpy(), cpath, "spot id")
    values = df.apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        r, c = np.argwhere(values.isna().to_numpy())[0]
        raise InputError(f"spot {ids[r]}, gene {df.columns[c]}: {df.iat[r, c]!r} is not a count", file=cpath,
                         field=str(df.columns[c]))
    matrix = values.to_numpy(np.float64)
    check_counts(matrix, cpath, "counts")
    xy = np.array([[float(v) for v in ST_ID.match(i).groups()] for i in ids])  # type: ignore[union-attr]
    table = read_st_table(spath)
    count_key = [st_key(a, b) for a, b in xy]
    rows, where, dropped = join_spots(count_key, table.index, table["sel"].to_numpy(), missing_spots=missing_spots,
                                      table_file=spath, counts_file=cpath, table_field="x, y")
    t = table.iloc[where]
    genes = _unique_genes([str(g) for g in df.columns], cpath)
    return SpotData(
        fmt="st", platform="st", barcodes=np.array(list(ids), dtype=object)[rows],
        counts=sp.csr_matrix(matrix[rows].astype(np.float32)), genes=genes, x_px=t["px"].to_numpy(np.float64),
        y_px=t["py"].to_numpy(np.float64), in_tissue=t["sel"].to_numpy(bool),
        array_row=np.round(xy[rows, 1]).astype(np.int64), array_col=np.round(xy[rows, 0]).astype(np.int64),
        counts_info={"positions": len(table), "positions_in_tissue": int(table["sel"].sum()),
                     "matrix_barcodes": len(ids), **dropped})


# ------------------------------------------------------------------------------ HEST-1k
def _hest_platform(meta: dict[str, Any], file: Path) -> str:
    tech = str(meta.get("st_technology") or "").lower()
    if "visium hd" in tech or "xenium" in tech:
        raise InputError(f"st_technology {meta.get('st_technology')!r} is not spot-based", file=file,
                         field="st_technology", expected="Visium or Spatial Transcriptomics")
    if "spatial transcriptomics" in tech or tech == "st":
        return "st"
    return "visium"


def read_hest(adata: str | Path, metadata: str | Path) -> SpotData:
    """A HEST-1k sample: the AnnData's spots (``obsm['spatial']`` = full-resolution px) and its metadata."""
    import anndata as ad

    apath, mpath = Path(adata), Path(metadata)
    if not apath.is_file():
        raise InputError("HEST AnnData not found", file=apath, expected="st/{id}.h5ad")
    if not mpath.is_file():
        raise InputError("HEST metadata not found", file=mpath, expected="metadata/{id}.json")
    meta = read_json(mpath, "HEST metadata", obj=True)
    try:
        a = ad.read_h5ad(apath)
    except Exception as exc:
        raise InputError(f"cannot read AnnData ({type(exc).__name__}: {exc})", file=apath) from None
    if "spatial" not in a.obsm or np.asarray(a.obsm["spatial"]).shape != (a.n_obs, 2):
        raise InputError("no obsm['spatial'] (N, 2)", file=apath, field="obsm.spatial",
                         expected="spot centres in full-resolution pixels")
    ids = np.array(a.obs_names.astype(str), dtype=object)
    _check_duplicates(ids, apath, "obs_names")
    xy = np.asarray(a.obsm["spatial"], np.float64)
    obs = a.obs
    in_tissue = obs["in_tissue"].astype(int).to_numpy() == 1 if "in_tissue" in obs.columns else np.ones(len(ids), bool)
    row = obs["array_row"].to_numpy(np.int64) if "array_row" in obs.columns else None
    col = obs["array_col"].to_numpy(np.int64) if "array_col" in obs.columns else None
    X = a.X if sp.issparse(a.X) else sp.csr_matrix(np.asarray(a.X))
    check_counts(X, apath, "X")
    mpp = meta.get("pixel_size_um_estimated")
    mpp = float(mpp) if isinstance(mpp, (int, float)) and mpp > 0 else None
    return SpotData(
        fmt="hest", platform=_hest_platform(meta, mpath), barcodes=ids, counts=sp.csr_matrix(X, dtype=np.float32),
        genes=_unique_genes([str(g) for g in a.var_names], apath), x_px=xy[:, 0], y_px=xy[:, 1], in_tissue=in_tissue,
        array_row=row, array_col=col, hest_mpp=mpp,
        meta={k: meta[k] for k in ("st_technology", "pixel_size_um_estimated", "pixel_size_um_embedded",
                                   "spot_diameter", "inter_spot_dist", "organ", "oncotree_code") if k in meta},
        counts_info={"positions": len(ids), "positions_in_tissue": int(in_tissue.sum()), "matrix_barcodes": len(ids)})
