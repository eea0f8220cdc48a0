"""Gene sets: GMT reading, coverage against the RNA matrix, size-matched null sets, ssGSEA (gseapy).

GMT (MSigDB): one set per line, ``name <TAB> description <TAB> gene <TAB> gene ...``. Several
files may be given; a set name may appear once. Against the cohort's genes every set is reported
(genes found / missing); a set with fewer than ``min_genes`` (or more than ``max_genes``) genes
left is an error naming it, and so are GMTs whose sets share no gene with the data.

Scores are single-sample GSEA enrichment scores (Barbie et al. 2009) from gseapy (``ssgsea``,
``sample_norm_method="rank"``, rank weight ``alpha``): per sample, genes are ranked by expression
and the score is the sum over the ranking of the difference between the weighted ECDF of the set's
genes and the ECDF of the others — the definition of GSVA's ``method="ssgsea"`` with
``ssgsea.norm=FALSE``. We keep the raw ES (gseapy's ``NES`` divides every score by the range over
the whole matrix, which couples samples and sets); each sample's score depends on its own profile
only, so scoring the whole cohort leaks nothing across folds — and samples are scored in blocks of
``gene_sets.chunk_samples`` (memory of one block, the same scores).

Null sets (``NULL_SET_01`` ...): ``n_null`` random sets drawn uniformly from the matrix genes
(seeded), their sizes spread over the real sets' sizes (size-matched), scored and predicted
exactly like the real sets.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.genesets")

NULL_PREFIX = "NULL_SET_"


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Set name -> genes (order kept, duplicates within a set dropped) of one GMT file."""
    p = Path(path)
    if not p.is_file():
        raise InputError("GMT file not found" + (" (it is a directory)" if p.is_dir() else ""), file=p,
                         field="slides.gene_sets.gmt", expected="a GMT file (name, description, genes; tab-separated)")
    opener = gzip.open if p.suffix == ".gz" else open
    out: dict[str, list[str]] = {}
    with opener(p, "rt") as fh:  # type: ignore[operator]
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise InputError(f"line {lineno}: {len(parts)} tab-separated field(s)", file=p, field="GMT",
                                 expected="name, description and at least one gene, tab-separated")
            name = parts[0].strip()
            genes = list(dict.fromkeys(g.strip() for g in parts[2:] if g.strip()))
            if not name or not genes:
                raise InputError(f"line {lineno}: empty set name or no genes", file=p, field="GMT",
                                 expected="name, description and at least one gene")
            if name in out:
                raise InputError(f"line {lineno}: set '{name}' appears twice", file=p, field="GMT",
                                 expected="unique set names")
            out[name] = genes
    if not out:
        raise InputError("GMT file has no gene sets", file=p, field="slides.gene_sets.gmt")
    return out


def read_gmts(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """All sets of several GMT files; a name in two files is an error naming both."""
    if not paths:
        raise InputError("no GMT file configured", field="slides.gene_sets.gmt", expected="at least one GMT file")
    out: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for path in paths:
        for name, genes in read_gmt(path).items():
            if name in out:
                raise InputError(f"gene set '{name}' is in {where[name]} and in {path}", file=path, field="GMT",
                                 expected="set names unique across the GMT files")
            out[name], where[name] = genes, str(path)
    return out


def match_sets(sets: Mapping[str, Sequence[str]], genes: Sequence[str], *, min_genes: int, max_genes: int,
               file: object = None) -> tuple[dict[str, list[str]], pd.DataFrame]:
    """(set -> its genes present in ``genes``, coverage table). Errors: no set shares a gene with the
    data; a set with fewer than ``min_genes`` or more than ``max_genes`` genes left (named)."""
    have = set(genes)
    rows, matched = [], {}
    for name, gs in sets.items():
        found = [g for g in gs if g in have]
        missing = [g for g in gs if g not in have]
        matched[name] = found
        rows.append({"gene_set": name, "n_genes": len(gs), "n_found": len(found), "n_missing": len(missing),
                     "fraction_found": len(found) / max(1, len(gs)), "missing": ";".join(missing)})
    cov = pd.DataFrame(rows)
    if int(cov["n_found"].sum()) == 0:
        raise InputError(f"none of the {len(sets)} gene sets shares a gene with the RNA matrix "
                         f"({len(have)} genes, e.g. {', '.join(list(genes)[:3])})", file=file,
                         field="slides.gene_sets.gmt", expected="gene symbols of the RNA matrix in the GMT")
    few = cov[cov["n_found"] < min_genes]
    if len(few):
        desc = ", ".join(f"{r.gene_set} ({r.n_found} of {r.n_genes})" for r in few.head(5).itertuples())
        raise InputError(f"{len(few)} gene set(s) with fewer than {min_genes} genes in the RNA matrix: {desc}",
                         file=file, field="slides.gene_sets.min_genes",
                         expected=f"at least {min_genes} genes of every set in the data (or remove the set)")
    big = cov[cov["n_found"] > max_genes]
    if len(big):
        desc = ", ".join(f"{r.gene_set} ({r.n_found})" for r in big.head(5).itertuples())
        raise InputError(f"{len(big)} gene set(s) with more than {max_genes} genes: {desc}", file=file,
                         field="slides.gene_sets.max_genes", expected=f"at most {max_genes} genes per set")
    for r in cov[cov["n_missing"] > 0].itertuples():
        log.info("gene set %s: %d of %d genes in the data (missing: %s%s)", r.gene_set, r.n_found, r.n_genes,
                 ", ".join(r.missing.split(";")[:8]), " ..." if r.n_missing > 8 else "")
    return matched, cov


def null_sets(sizes: Sequence[int], genes: Sequence[str], n: int, seed: int) -> dict[str, list[str]]:
    """``n`` random gene sets, sizes at evenly spaced quantiles of ``sizes``, genes drawn without
    replacement from ``genes`` (seeded)."""
    if n <= 0:
        return {}
    rng = np.random.default_rng([int(seed), 3003])
    q = np.quantile(np.asarray(sizes, float), np.linspace(0, 1, n)) if len(sizes) else np.full(n, 50.0)
    pool = np.asarray(list(genes), dtype=object)
    out = {}
    for i, s in enumerate(q):
        k = int(min(max(2, round(s)), len(pool)))
        out[f"{NULL_PREFIX}{i + 1:02d}"] = sorted(rng.choice(pool, size=k, replace=False).tolist())
    return out


def ssgsea(expr: pd.DataFrame, sets: Mapping[str, Sequence[str]], *, weight: float = 0.25,
           threads: int = 1) -> pd.DataFrame:
    """Raw ssGSEA enrichment scores, samples x sets (columns in the order of ``sets``).

    ``expr``: genes x samples (e.g. log-expression). gseapy with rank normalisation and the
    given rank weight; every set is scored (no size filtering here: :func:`match_sets` did it).
    """
    import gseapy

    if expr.index.duplicated().any():
        raise ValueError("duplicate genes in the expression matrix")
    sizes = [len(v) for v in sets.values()]
    res = gseapy.ssgsea(data=expr, gene_sets={k: list(v) for k, v in sets.items()}, outdir=None,
                        sample_norm_method="rank", weight=float(weight), min_size=1,
                        max_size=max(sizes + [1]) + 1, threads=int(threads), no_plot=True, verbose=False)
    es = res.res2d.pivot(index="Name", columns="Term", values="ES").astype(np.float64)
    missing = [k for k in sets if k not in es.columns]
    if missing:
        raise RuntimeError(f"gseapy returned no score for {missing[:5]}")
    return es.loc[[str(c) for c in expr.columns], list(sets)]


def ssgsea_matrix(expr: Any, sets: Mapping[str, Sequence[str]], *, weight: float = 0.25,
                  threads: int = 1) -> pd.DataFrame:
    """:func:`ssgsea` of every sample of an :class:`~morphomol.studies.slides.rna.ExpressionMatrix`, scored
    ``expr.chunk_rows`` samples at a time (each sample's score depends on its own profile only, so the scores
    are those of the whole matrix at once; memory is one block's). Samples x sets, index ``sample_id``."""
    parts = []
    for pos, block in expr.blocks():
        frame = pd.DataFrame(block.T, index=pd.Index(expr.genes), columns=pd.Index([expr.samples[i] for i in pos]))
        parts.append(ssgsea(frame, sets, weight=weight, threads=threads))
    scores = pd.concat(parts) if parts else pd.DataFrame(columns=list(sets), dtype=np.float64)
    scores.index.name = "sample_id"
    return scores


def score_gene_sets(*, expression: str | Path, gmt: Sequence[str | Path], out_scores: str | Path,
                    out_sets: str | Path, out_coverage: str | Path, cfg: Any, seed: int = 0,
                    config_file: object = None) -> pd.DataFrame:
    """The ``slides_genesets`` rule: match the GMT sets to the cohort's genes, add the null sets,
    score every set on every sample with ssGSEA and write ``scores.parquet`` (samples x sets, raw
    ES; index ``sample_id``), ``sets.json`` (set -> genes used, null flag, size) and ``coverage.tsv``.
    ``cfg``: :class:`~morphomol.studies.slides.config.GeneSetsConfig`. Reads ``expression``
    (expression.h5ad of the ``slides_rna`` rule) and the GMT files."""
    from morphomol.studies.slides.rna import ExpressionMatrix
    from morphomol.util.atomic import atomic_path
    from morphomol.util.jsonio import write_json

    t0 = time.perf_counter()
    expr = ExpressionMatrix(expression, chunk_rows=cfg.chunk_samples)
    genes = list(expr.genes)
    raw = read_gmts(list(gmt))
    matched, cov = match_sets(raw, genes, min_genes=cfg.min_genes, max_genes=cfg.max_genes,
                              file=config_file or (gmt[0] if gmt else None))
    unknown = [g for g in cfg.grounded if g not in matched]
    if unknown:
        raise InputError(f"grounded set(s) not in the GMT files: {', '.join(unknown)}", file=config_file,
                         field="slides.gene_sets.grounded", expected="names of gene sets of the GMT files")
    nulls = null_sets([len(v) for v in matched.values()], genes, cfg.n_null, seed)
    all_sets = {**matched, **nulls}
    scores = ssgsea_matrix(expr, all_sets, weight=cfg.weight)
    n = scores.size
    secs = time.perf_counter() - t0
    log.info("ssGSEA: %d sets (%d null) x %d samples over %d genes in %.1f s (%.0f set-samples/s)", len(all_sets),
             len(nulls), len(scores), len(genes), secs, n / max(secs, 1e-9))
    meta = {name: {"genes": list(gs), "size": len(gs), "null": name in nulls,
                   "grounded": name in set(cfg.grounded)} for name, gs in all_sets.items()}
    with atomic_path(out_scores) as tmp:
        scores.to_parquet(tmp)
    with atomic_path(out_coverage) as tmp:
        cov.to_csv(tmp, sep="\t", index=False)
    write_json(out_sets, {"method": "ssGSEA (gseapy, raw ES, rank normalisation)", "weight": cfg.weight,
                          "seed": seed, "sets": meta})
    return scores
