"""Bulk RNA of a slides cohort: reading, checking, matching to the slides, and its preprocessing.

Input (``slides.rna``): a matrix file — ``.tsv``/``.txt``/``.tab`` (tab), ``.csv`` (comma), either
optionally gzipped, with gene or sample labels in the first column; ``.parquet`` (labels in the
index or the first column); ``.h5ad`` (obs = samples, var = genes) — in either orientation
(``auto``: the axis whose labels contain the sheet's sample ids, or ``rna_id`` where the sheet gives
one, holds the samples). Or *pseudo-bulk*: the counts of a spatial cohort's unit tables summed per
sample (``pseudobulk_from``).

Checks, each one clear error naming the file: a sheet sample without a matrix column/row (listed);
duplicate gene symbols or sample ids; non-numeric or missing values; the numbers contradicting the
declared ``value_type`` (negative counts/TPM, non-integer counts, TPM that look logged, "log" values
that are negative or too large to be log2(x+1)).

Preprocessing (written beside the results as ``preprocessing.json`` + ``genes.txt``):

* ``counts`` -> log2(CPM + 1), CPM = counts / library size x 1e6 (gene lengths unknown);
* ``tpm``    -> log2(TPM + 1) as given;
* ``log``    -> used as given (declared to be log2(x + 1) of CPM/TPM).

Then genes expressed (> 0) in fewer than ``min_fraction_expressed`` of the samples are dropped.
``expression.h5ad``: obs = the sheet's samples in sheet order (``patient_id``, ``cohort``,
``rna_id``), var = genes in matrix order, ``X`` = log2 expression (float32), ``uns['preprocessing']``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.rna")

VALUE_TYPES = ("counts", "tpm", "log")
TRANSFORMS = {"counts": "log2(CPM + 1)", "tpm": "log2(TPM + 1)", "log": "as given (log2(x + 1))"}


def read_matrix(path: str | Path) -> pd.DataFrame:
    """The matrix as a DataFrame with string labels on both axes (orientation not yet known)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("RNA matrix not found" + (" (it is a directory)" if p.is_dir() else ""), file=p,
                         field="slides.rna.path", expected="a TSV/CSV/Parquet/h5ad matrix")
    name = p.name.lower().removesuffix(".gz")
    try:
        if name.endswith((".tsv", ".txt", ".tab", ".csv")):
            sep = "," if name.endswith(".csv") else "\t"
            df = pd.read_csv(p, sep=sep, index_col=0)
        elif name.endswith(".parquet"):
            df = pd.read_parquet(p)
            if isinstance(df.index, pd.RangeIndex) and df.shape[1] and not pd.api.types.is_numeric_dtype(df.iloc[:, 0]):
                df = df.set_index(df.columns[0])
        elif name.endswith(".h5ad"):
            import anndata as ad

            a = ad.read_h5ad(p)
            X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
            df = pd.DataFrame(X, index=a.obs_names.astype(str), columns=a.var_names.astype(str))
        else:
            raise InputError(f"unknown matrix format '{p.suffix}'", file=p, field="slides.rna.path",
                             expected=".tsv, .txt, .tab, .csv (optionally .gz), .parquet or .h5ad")
    except InputError:
        raise
    except Exception as exc:  # pandas / pyarrow / h5py raise many types for malformed files
        raise InputError(f"cannot read the RNA matrix ({type(exc).__name__}: {exc})", file=p,
                         field="slides.rna.path") from None
    df.index = df.index.astype(str).str.strip()
    df.columns = pd.Index([str(c).strip() for c in df.columns])
    return df


def orient(df: pd.DataFrame, rna_ids: Sequence[str], orientation: str, *, file: object = None) -> tuple[pd.DataFrame, str]:
    """(samples x genes, the orientation found). ``auto`` picks the axis holding more of ``rna_ids``."""
    ids = set(rna_ids)
    in_cols, in_rows = len(ids & set(df.columns)), len(ids & set(df.index))
    if orientation == "auto":
        if in_cols == 0 and in_rows == 0:
            raise InputError(f"none of the {len(ids)} sample ids of the sheet (e.g. {', '.join(sorted(ids)[:3])}) is a "
                             f"row or column label of the RNA matrix (rows e.g. {', '.join(map(str, df.index[:3]))}; "
                             f"columns e.g. {', '.join(map(str, df.columns[:3]))})", file=file, field="slides.rna.path",
                             expected="sample ids (or the sheet's rna_id) as the labels of one axis")
        orientation = "genes_x_samples" if in_cols >= in_rows else "samples_x_genes"
    out = df.T if orientation == "genes_x_samples" else df
    return out, orientation


def check_values(X: np.ndarray, value_type: str, genes: Sequence[str], samples: Sequence[str], *,
                 file: object = None) -> None:
    """Raise when the numbers contradict the declared value type (the first offending cell is named)."""
    field, where = "slides.rna.value_type", lambda i, j: f"gene {genes[j]}, sample {samples[i]}"
    if not np.isfinite(X).all():
        i, j = np.argwhere(~np.isfinite(X))[0]
        raise InputError(f"missing or non-finite value at {where(i, j)}", file=file, field="slides.rna.path",
                         expected="a number in every cell")
    if value_type in ("counts", "tpm") and (X < 0).any():
        i, j = np.argwhere(X < 0)[0]
        raise InputError(f"negative value {X[i, j]:g} at {where(i, j)} but value_type is '{value_type}'", file=file,
                         field=field, expected="non-negative counts/TPM (or value_type: log for logged data)")
    if value_type == "counts":
        frac = np.abs(X - np.round(X)) > 1e-6
        if frac.any():
            i, j = np.argwhere(frac)[0]
            raise InputError(f"non-integer value {X[i, j]:g} at {where(i, j)} ({int(frac.sum())} cells) but value_type "
                             "is 'counts'", file=file, field=field, expected="integer counts, or value_type tpm / log")
    if value_type == "tpm" and X.size and X.max() <= 30 and (np.abs(X - np.round(X)) > 1e-6).mean() > 0.5:
        raise InputError(f"values look log-transformed (maximum {X.max():.3g}) but value_type is 'tpm'", file=file,
                         field=field, expected="TPM on the linear scale, or value_type: log")
    if value_type == "log":
        if (X < -1e-6).any():
            i, j = np.argwhere(X < -1e-6)[0]
            raise InputError(f"negative value {X[i, j]:g} at {where(i, j)} but value_type 'log' means log2(x + 1)",
                             file=file, field=field, expected="log2(CPM/TPM + 1) >= 0 (not z-scores), or counts / tpm")
        if X.size and X.max() > 40:
            raise InputError(f"values up to {X.max():.4g} are not on a log2(x + 1) scale but value_type is 'log'",
                             file=file, field=field, expected="value_type counts or tpm for linear-scale data")


def to_log2(X: np.ndarray, value_type: str) -> np.ndarray:
    """log2 expression (float64) of checked values of a value type (see the module doc)."""
    if value_type == "counts":
        lib = X.sum(axis=1, keepdims=True)
        return np.log2(X / np.maximum(lib, 1.0) * 1e6 + 1.0)
    if value_type == "tpm":
        return np.log2(X + 1.0)
    return X.astype(np.float64)


def match_samples(mat: pd.DataFrame, sheet: pd.DataFrame, *, file: object = None) -> pd.DataFrame:
    """Rows of ``mat`` (samples x genes) in sheet order, indexed by sample_id; unmatched / duplicates are errors."""
    rna_ids = [str(r) for r in sheet["rna_id"]]
    if mat.index.duplicated().any():
        dup = sorted(set(mat.index[mat.index.duplicated()]))
        raise InputError(f"duplicate sample id(s) in the RNA matrix: {', '.join(dup[:10])}", file=file,
                         field="slides.rna.path", expected="one column (or row) per sample")
    if mat.columns.duplicated().any():
        dup = sorted(set(mat.columns[mat.columns.duplicated()]))
        raise InputError(f"{len(dup)} duplicate gene symbol(s) in the RNA matrix: {', '.join(dup[:10])}", file=file,
                         field="slides.rna.path", expected="unique gene symbols (aggregate duplicates first)")
    missing = [s for s, r in zip(sheet["sample_id"], rna_ids, strict=True) if r not in mat.index]
    if missing:
        raise InputError(f"{len(missing)} slide(s) of the sample sheet have no RNA profile: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}", file=file, field="slides.rna.path",
                         expected="a column (or row) for every sample_id (or rna_id) of the sheet")
    extra = len(set(mat.index) - set(rna_ids))
    if extra:
        log.info("RNA matrix: %d sample(s) not in the sheet are ignored", extra)
    out = mat.loc[rna_ids]
    out.index = pd.Index([str(s) for s in sheet["sample_id"]], name="sample_id")
    return out


def pseudobulk(units: Sequence[str | Path], samples: Sequence[str]) -> pd.DataFrame:
    """Counts summed over each unit table (samples x genes); every table must have the same genes."""
    from morphomol.data.units import read_units

    rows, genes = [], None
    for path, s in zip(units, samples, strict=True):
        a = read_units(path)
        g = [str(x) for x in a.var_names]
        if genes is None:
            genes = g
        elif g != genes:
            raise InputError(f"sample {s}: genes differ from the first sample's ({len(g)} vs {len(genes)})", file=path,
                             field="var_names", expected="the same genes in every unit table of the spatial cohort")
        rows.append(np.asarray(a.X.sum(axis=0)).ravel())
    return pd.DataFrame(np.vstack(rows), index=pd.Index([str(s) for s in samples]), columns=genes)


def prepare_rna(*, sheet: Sequence[Mapping[str, Any]], out_expression: str | Path, out_preprocessing: str | Path,
                out_genes: str | Path, cfg: Any, matrix: str | Path | None = None,
                units: Sequence[str | Path] | None = None, unit_samples: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``slides_rna`` rule: read ``matrix`` (or sum the spatial cohort's ``units``), check it, match it
    to the sheet, transform to log2 expression and write ``expression.h5ad``, ``preprocessing.json`` and
    ``genes.txt``. ``sheet``: rows with sample_id, patient_id, cohort, rna_id (optional)."""
    import anndata as ad

    from morphomol.util.atomic import atomic_path
    from morphomol.util.hashing import sha256_path
    from morphomol.util.jsonio import write_json

    df = pd.DataFrame(list(sheet))
    df["rna_id"] = [r.get("rna_id") or r["sample_id"] for r in df.to_dict("records")]
    if matrix is not None:
        file: Any = matrix
        raw, orientation = orient(read_matrix(matrix), list(df["rna_id"]), cfg.orientation, file=matrix)
        source = {"path": str(matrix), "sha256": sha256_path(matrix), "orientation": orientation}
        value_type = cfg.value_type
    else:
        if not units:
            raise InputError("no RNA source", field="slides.rna", expected="slides.rna.path or slides.rna.pseudobulk_from")
        file = units[0]
        raw = pseudobulk(units, list(unit_samples or []))
        source = {"pseudobulk_from": [str(u) for u in units], "orientation": "samples_x_genes"}
        value_type = "counts"
    mat = match_samples(raw, df, file=file)
    try:
        X = mat.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        bad = [c for c in mat.columns if not pd.api.types.is_numeric_dtype(mat[c])][:5]
        raise InputError(f"non-numeric values in the RNA matrix (genes {', '.join(map(str, bad))})", file=file,
                         field="slides.rna.path", expected="numbers only, labels on the first row / column") from None
    genes, samples = [str(g) for g in mat.columns], list(mat.index)
    check_values(X, value_type, genes, samples, file=file)
    L = to_log2(X, value_type)
    expressed = (X > 0).mean(axis=0) >= cfg.min_fraction_expressed
    if not expressed.any():
        raise InputError("no gene passes slides.rna.min_fraction_expressed", file=file,
                         field="slides.rna.min_fraction_expressed", expected="a smaller fraction")
    L, genes = L[:, expressed], [g for g, k in zip(genes, expressed, strict=True) if k]
    prep = {**source, "value_type": value_type, "transform": TRANSFORMS[value_type],
            "min_fraction_expressed": cfg.min_fraction_expressed, "n_genes_input": int(len(expressed)),
            "n_genes": len(genes), "n_samples": len(samples), "gene_order": "genes.txt (the columns of X, in order)"}
    obs = pd.DataFrame({"patient_id": df["patient_id"].astype(str).to_numpy(), "cohort": df["cohort"].astype(str).to_numpy(),
                        "rna_id": df["rna_id"].astype(str).to_numpy()}, index=pd.Index(samples, name="sample_id"))
    a = ad.AnnData(X=L.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    a.uns["preprocessing"] = {k: (v if not isinstance(v, list) else [str(x) for x in v]) for k, v in prep.items()}
    with atomic_path(out_expression) as tmp:
        a.write_h5ad(tmp)
    with atomic_path(out_genes) as tmp:
        tmp.write_text("\n".join(genes) + "\n")
    write_json(out_preprocessing, prep)
    log.info("RNA: %d samples x %d genes (%s, %s; %d genes dropped as rarely expressed)", len(samples), len(genes),
             value_type, TRANSFORMS[value_type], int((~expressed).sum()))
    return pd.DataFrame(L, index=samples, columns=genes)


def read_expression(path: str | Path) -> pd.DataFrame:
    """samples x genes log2 expression of ``expression.h5ad`` (sheet order, genes in file order)."""
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise InputError("expression table not found", file=p, expected="expression.h5ad of the slides_rna rule")
    a = ad.read_h5ad(p)
    return pd.DataFrame(np.asarray(a.X, dtype=np.float64), index=a.obs_names.astype(str), columns=a.var_names.astype(str))
