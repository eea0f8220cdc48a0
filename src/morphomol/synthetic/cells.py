"""Simulated cells for the cells study (demo / tests): 12 immune and stromal cell types with marker
programs, donors, and two platforms in real formats.

* scRNA-seq-like: an AnnData ``.h5ad`` per sample (raw integer counts in X, the label column with the
  data's own label strings, a ``donor`` column: one sample may pool several donors);
* Xenium-like: a bundle per sample (``cell_feature_matrix.h5`` in the 10x HDF5 layout with a few negative
  control probes, ``cells.parquet`` centroids, ``transcripts.parquet``, ``experiment.xenium``), the Xenium
  Explorer cell-groups CSV, an H&E slide in which each cell type has its own morphology (nucleus size and
  shape, cytoplasm) and the 10x alignment matrix (H&E px -> morphology px) for the fusion study's
  registration (:mod:`morphomol.synthetic.cells_xenium`).

Expression: per cell, log-mean = gene background + the type's marker program (strength varying per
cell, shared markers between related types, so some types are confusable) + a donor effect per gene;
counts are negative-binomial around ``library_size * softmax(log-mean)``. The Xenium panel is a subset
of the genes with smaller libraries. Everything is a function of ``(seed, donor)`` / ``(seed, sample)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path

#: canonical type -> (marker genes, label string used in scRNA data, label string used in Xenium groups)
TYPES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "CD4 T cell": (("CD3D", "CD3E", "CD4", "IL7R", "CCR7", "LTB", "TCF7"), "CD4+ T", "T_CD4"),
    "CD8 T cell": (("CD3D", "CD3E", "CD8A", "CD8B", "GZMK", "CCL5", "NKG7"), "CD8+ T", "T_CD8"),
    "Regulatory T cell": (("CD3D", "CD4", "FOXP3", "IL2RA", "CTLA4", "TIGIT", "BATF"), "Treg", "T_reg"),
    "NK cell": (("NKG7", "GNLY", "KLRD1", "PRF1", "GZMB", "FCGR3A", "KLRF1"), "NK", "NK"),
    "B cell": (("MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "CD74", "HLA-DRA"), "B", "B_cell"),
    "Plasma cell": (("JCHAIN", "MZB1", "IGHG1", "IGKC", "XBP1", "SDC1", "CD79A"), "Plasma", "Plasma"),
    "Monocyte": (("CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN", "CD74"), "CD14+ Mono", "Mono"),
    "Macrophage": (("CD68", "C1QA", "C1QB", "C1QC", "APOE", "MARCO", "CD163"), "Macro", "Macrophage"),
    "Dendritic cell": (("CD1C", "FCER1A", "CLEC10A", "HLA-DQA1", "HLA-DRA", "CD74", "LAMP3"), "cDC", "DC"),
    "Mast cell": (("TPSAB1", "TPSB2", "CPA3", "KIT", "MS4A2", "HDC", "GATA2"), "Mast", "Mast"),
    "Fibroblast": (("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "FBLN1"), "Fibro", "Fibroblast"),
    "Endothelial cell": (("PECAM1", "VWF", "CDH5", "CLDN5", "RAMP2", "AQP1", "EMCN"), "Endo", "Endothelial"),
}
CELL_TYPES: tuple[str, ...] = tuple(TYPES)
#: relative abundance of the types (donors vary around it)
ABUNDANCE = np.array([0.15, 0.12, 0.06, 0.07, 0.10, 0.05, 0.10, 0.10, 0.05, 0.04, 0.10, 0.06])
BACKGROUND: tuple[str, ...] = (
    "ACTB", "GAPDH", "B2M", "MALAT1", "TMSB4X", "EEF1A1", "RPL13", "RPS12", "RPL32", "RPS27", "FTL", "FTH1",
    "TPT1", "HLA-A", "HLA-B", "HLA-C", "PTPRC", "VIM", "SRGN", "CD52", "LGALS1", "S100A4", "ANXA1", "CST3",
    "TYROBP", "FCER1G", "IFITM2", "JUNB", "FOS", "DUSP1", "KLF6", "ZFP36", "CXCR4", "CCL4", "CCL3", "IL32",
    "GZMA", "CTSW", "HOPX", "SPARC", "MGP", "IGFBP7", "TAGLN", "ACTA2", "MYL9", "EPCAM", "KRT8", "KRT18",
    "SFTPC", "SFTPB", "NAPSA", "SCGB1A1", "MKI67", "TOP2A", "STMN1", "HMGB2", "ISG15", "IFI6", "MX1", "STAT1",
)
#: named label strings the data use besides the types (mapped under _drop by the demo label map)
UNASSIGNED = "Unassigned"


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), *(zlib.crc32(k.encode()) for k in keys)])


def all_genes() -> list[str]:
    """Every simulated gene (markers first, then background), unique, in a fixed order."""
    out: list[str] = []
    for markers, _, _ in TYPES.values():
        out += [g for g in markers if g not in out]
    return out + [g for g in BACKGROUND if g not in out]


def xenium_panel() -> list[str]:
    """The Xenium-like panel: every marker gene plus the first 24 background genes."""
    markers = all_genes()[: len(all_genes()) - len(BACKGROUND)]
    return markers + [g for g in BACKGROUND[:24] if g not in markers]


@dataclass(frozen=True)
class Expression:
    """Counts of simulated cells: ``counts`` (N, G) int32 over ``genes``, type index and donor per cell."""

    counts: np.ndarray
    genes: list[str]
    types: np.ndarray
    donors: np.ndarray


def _profiles(seed: int, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cohort constants: background log-means (G,) and marker boosts (T, G)."""
    r = _rng(seed, "profiles")
    pos = {g: i for i, g in enumerate(genes)}
    base = r.normal(0.0, 0.8, len(genes))
    for g in ("ACTB", "B2M", "MALAT1", "TMSB4X", "EEF1A1", "FTL"):
        if g in pos:
            base[pos[g]] += 2.0
    boost = np.zeros((len(TYPES), len(genes)))
    for t, (markers, _, _) in enumerate(TYPES.values()):
        for j, g in enumerate(markers):
            if g in pos:  # the first markers are the most specific and strongest
                boost[t, pos[g]] = 2.8 - 0.25 * j + r.normal(0, 0.2)
    return base, boost


def simulate_expression(seed: int, donors: Sequence[str], n_per_donor: int, *, genes: Sequence[str] | None = None,
                        library_size: float = 1500.0, key: str = "") -> Expression:
    """Counts of ``n_per_donor`` cells per donor over ``genes`` (default: :func:`all_genes`)."""
    genes = list(genes or all_genes())
    base, boost = _profiles(seed, all_genes())
    idx = [all_genes().index(g) for g in genes]
    base, boost = base[idx], boost[:, idx]
    counts, types, dons = [], [], []
    for d in donors:
        rd = _rng(seed, "donor", d)
        donor_gene = rd.normal(0.0, 0.35, len(genes))      # donor (batch) effect per gene
        comp = rd.dirichlet(ABUNDANCE * 40.0)              # donor's type composition
        rc = _rng(seed, "cells", d, key)
        t = rc.choice(len(TYPES), size=n_per_donor, p=comp)
        strength = rc.uniform(0.35, 1.2, n_per_donor)[:, None]
        logit = base[None, :] + donor_gene[None, :] + strength * boost[t] + rc.normal(0, 0.5, (n_per_donor, len(genes)))
        p = np.exp(logit - logit.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        lib = library_size * np.exp(rc.normal(0.0, 0.35, n_per_donor))[:, None]
        mu = lib * p
        theta = 6.0
        counts.append(rc.poisson(rc.gamma(theta, mu / theta)).astype(np.int32))
        types.append(t)
        dons += [d] * n_per_donor
    return Expression(np.concatenate(counts), genes, np.concatenate(types), np.asarray(dons, dtype=object))


def write_h5ad_sample(path: str | Path, *, seed: int, sample: str, donors: Sequence[str], n_per_donor: int,
                      label_key: str = "cell_type", donor_key: str = "donor", library_size: float = 1500.0) -> Path:
    """An scRNA-seq-like AnnData: integer counts in X, obs ``label_key`` (the data's label strings) and
    ``donor_key``; obs names are barcodes."""
    import anndata as ad
    import scipy.sparse as sp

    if not donors:
        raise InputError(f"sample {sample}: no donors to simulate", field="simulate.pools")
    e = simulate_expression(seed, donors, n_per_donor, library_size=library_size, key=sample)
    labels = np.array([TYPES[CELL_TYPES[t]][1] for t in e.types], dtype=object)
    obs = pd.DataFrame({label_key: pd.Categorical(labels), donor_key: pd.Categorical(e.donors.astype(str))},
                       index=[f"{sample}-{i:05d}-1" for i in range(len(labels))])
    a = ad.AnnData(X=sp.csr_matrix(e.counts.astype(np.float32)), obs=obs,
                   var=pd.DataFrame(index=pd.Index(e.genes, dtype=object)))
    a.uns["simulated"] = {"seed": int(seed), "sample": sample}
    path = Path(path)
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
    return path


def simulate_cells_sample(out: Mapping[str, str | Path], *, sample: str, patient: str, kind: str,
                          params: Mapping[str, Any]) -> dict[str, Any]:
    """Rule entry (``cells_simulate_h5ad`` / ``cells_simulate_xenium``): one sample's simulated inputs.

    ``params`` is the cohort's ``simulate`` block: ``seed``, ``cells_per_donor`` (h5ad samples, per donor),
    ``pools`` (h5ad sample -> donors; default: the sheet's patient), ``xenium_cells``, ``field_um``,
    ``he_mpp``, ``label_key``, ``donor_key``. ``out`` names the files to write (see the rules).
    """
    known = {"seed", "cells_per_donor", "pools", "xenium_cells", "field_um", "he_mpp", "label_key", "donor_key",
             "library_size", "xenium_library_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"unknown simulate key(s) {unknown}", field="simulate", expected=", ".join(sorted(known)))
    seed = int(params.get("seed", 0))
    if kind == "h5ad":
        donors = list((params.get("pools") or {}).get(sample) or [patient])
        write_h5ad_sample(out["h5ad"], seed=seed, sample=sample, donors=donors,
                          n_per_donor=int(params.get("cells_per_donor", 150)),
                          label_key=str(params.get("label_key", "cell_type")),
                          donor_key=str(params.get("donor_key", "donor")),
                          library_size=float(params.get("library_size", 1500.0)))
        return {"sample": sample, "kind": kind, "donors": donors}
    from morphomol.synthetic.cells_xenium import write_xenium_sample

    return write_xenium_sample(out, seed=seed, sample=sample, donor=patient,
                               n_cells=int(params.get("xenium_cells", 250)),
                               field_um=float(params.get("field_um", 400.0)),
                               he_mpp=float(params.get("he_mpp", 0.5)),
                               library_size=float(params.get("xenium_library_size", 220.0)))
