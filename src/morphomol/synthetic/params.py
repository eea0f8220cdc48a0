"""Simulator parameters: the sample spec, cell-type table, seeding, cohort gene roles, patient effects.

Seeding: every random stream is ``PCG64(SeedSequence(seed, spawn_key=crc32 of its keys))``.
Cohort constants (gene roles) depend on ``(seed, gene)``, patient effects on ``(seed, patient_id)``,
everything else on ``(seed, sample_id, part)`` (:meth:`SampleSpec.rng`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PIXEL_SIZE = 0.2125  # µm per Xenium morphology pixel
ADDON_KINDS = ("a", "b", "c")
CELL_TYPES = ("tumour", "lymphocyte", "fibroblast", "macrophage", "endothelial")

#: files and folders a simulated sample directory holds (and nothing else)
SAMPLE_OUTPUTS = (
    "xenium",
    "he.tif",
    "keypoints.csv",
    "he_imagealignment.csv",
    "regions.geojson",
    "truth.json",
    "truth_cells.parquet",
)


@dataclass(frozen=True)
class TypeTable:
    """Per-cell-type parameters (index = position in CELL_TYPES)."""

    logit: np.ndarray  # baseline composition logits
    density: np.ndarray  # relative cell density
    major_um: np.ndarray  # nucleus major axis (µm)
    aspect: np.ndarray  # minor / major
    size_cv: np.ndarray  # cell-to-cell log-size sd
    dapi: np.ndarray  # DAPI intensity (counts)
    hem: np.ndarray  # hematoxylin optical density
    chromatin: np.ndarray  # intensity texture amplitude inside the nucleus
    cyto_um: np.ndarray  # cytoplasm rim (µm)
    cyto_eosin: np.ndarray  # cytoplasm eosin optical density
    cyto_hem: np.ndarray  # cytoplasm hematoxylin (amphophilia)
    tx_factor: np.ndarray  # relative transcripts per cell
    nuc_fraction: np.ndarray  # fraction of transcripts in the nucleus
    oriented: np.ndarray  # nuclei follow the local fibre orientation


TYPES = TypeTable(
    logit=np.array([1.1, -0.2, 0.3, -0.6, -0.9]),
    density=np.array([1.0, 1.5, 0.45, 0.7, 0.55]),
    major_um=np.array([11.0, 6.4, 13.0, 9.5, 11.0]),
    aspect=np.array([0.75, 0.92, 0.28, 0.70, 0.30]),
    size_cv=np.array([0.18, 0.07, 0.12, 0.12, 0.10]),
    dapi=np.array([2600.0, 5200.0, 3000.0, 1900.0, 2600.0]),
    hem=np.array([0.55, 1.00, 0.70, 0.38, 0.60]),
    chromatin=np.array([0.45, 0.10, 0.15, 0.25, 0.15]),
    cyto_um=np.array([5.0, 1.2, 2.5, 6.0, 2.0]),
    cyto_eosin=np.array([0.30, 0.04, 0.10, 0.20, 0.08]),
    cyto_hem=np.array([0.07, 0.02, 0.0, 0.04, 0.0]),
    tx_factor=np.array([1.3, 0.55, 0.8, 1.1, 0.75]),
    nuc_fraction=np.array([0.30, 0.55, 0.40, 0.22, 0.35]),
    oriented=np.array([False, False, True, False, True]),
)

# Known marker symbols (used to give real-looking gene roles; unknown symbols get
# deterministic random roles).
_MARKERS: dict[str, int] = {}
for _t, _genes in enumerate(
    (
        "EPCAM KRT8 KRT18 KRT19 KRT7 KRT5 KRT14 CDH1 MKI67 TOP2A ERBB2 CEACAM5 MUC1 ESR1 PGR AR SOX2 TP63",
        "CD3E CD3D CD3G CD2 CD8A CD8B CD4 PTPRC MS4A1 CD79A CD79B GZMB GZMA GZMK NKG7 CCR7 IL7R CD247 LCK "
        "FOXP3 CXCR4 CD19 CD27 CD28 TRAC SELL KLRD1 PRF1",
        "COL1A1 COL1A2 COL3A1 COL5A1 DCN LUM PDGFRA PDGFRB FAP ACTA2 POSTN SFRP2 THY1 MMP2 TAGLN MYH11 VIM",
        "CD68 CD163 CD14 LYZ ITGAM MRC1 C1QA C1QB C1QC APOE FCGR3A CSF1R SPP1 MARCO CD86 ITGAX MS4A4A",
        "PECAM1 VWF CDH5 KDR CLDN5 PLVAP ENG EMCN FLT1 TEK",
    )
):
    for _g in _genes.split():
        _MARKERS[_g] = _t
_PROGRAM_GENES = ("STAT1", "IRF1", "CXCL9", "CXCL10", "GBP5", "IDO1", "GBP1", "GBP4", "PSMB9", "TAP1", "ISG15", "IFIT3")
OTHER_CANDIDATES = ("ACTB", "GAPDH", "RPLP0", "EEF1A1", "TPT1", "UBC", "HPRT1", "TBP")


# --------------------------------------------------------------------------- seeding


def crc_key(text: str) -> int:
    """crc32 of ``text`` (a stable 32-bit key for seeds and ids)."""
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """The random stream of ``(seed, *keys)``."""
    seq = np.random.SeedSequence(int(seed), spawn_key=tuple(crc_key(k) for k in keys))
    return np.random.Generator(np.random.PCG64(seq))


@dataclass(frozen=True)
class SampleSpec:
    """Validated parameters of one simulated sample (see :func:`morphomol.synthetic.simulate_sample`)."""

    sample_id: str
    patient_id: str
    core: list[str]
    addon: list[str]
    other: list[str]
    seed: int
    width: float
    height: float
    he_mpp: float
    cell_density: float
    tpc: float
    click_noise_um: float
    n_regions: int
    landmarks: tuple[int, int]
    control_fraction: float
    low_qv_fraction: float
    unassigned_fraction: float
    neighbourhood_um: float
    he_rotation_deg: float
    region_jitter: float
    jpeg_quality: int

    def rng(self, part: str) -> np.random.Generator:
        """The sample's random stream for one part of the simulation."""
        return seeded_rng(self.seed, "sample", self.sample_id, part)


# --------------------------------------------------------------------------- cohort constants


@dataclass
class GeneModel:
    """Cohort-level gene roles (type profiles, program loadings, add-on kinds)."""

    core: list[str]
    addon: list[str]
    other: list[str]
    expr_genes: list[str]  # core + other (type-profile genes)
    log_profile: np.ndarray  # (K, len(expr_genes)) log relative abundance
    program_gamma: np.ndarray  # (len(expr_genes),) program loading
    program_genes: list[str]
    addon_kind: list[str]
    addon_beta: np.ndarray
    addon_share: np.ndarray  # expected share of a cell's transcripts
    b_inputs: dict[str, dict[str, float]]  # kind-b gene -> {core gene: weight}


def gene_model(seed: int, core: Sequence[str], addon: Sequence[str], other: Sequence[str]) -> GeneModel:
    """Cohort-level gene roles; per-gene draws depend on (seed, gene name) only."""
    core, addon, other = list(core), list(addon), list(other)
    expr = core + other
    k = len(CELL_TYPES)
    n_prog = max(3, round(0.15 * len(core)))
    known = [g for g in core if g in _PROGRAM_GENES]
    rest = sorted((g for g in core if g not in known), key=lambda g: crc_key(f"{seed}:program:{g}"))
    program = (known + rest)[:n_prog] if len(known) < n_prog else known[:n_prog]
    prog_set = set(program)

    log_profile = np.zeros((k, len(expr)))
    gamma = np.zeros(len(expr))
    for j, g in enumerate(expr):
        r = seeded_rng(seed, "gene", g)
        base = r.normal(-0.2, 0.5)
        noise = r.normal(0.0, 0.35, size=k)
        home = _MARKERS.get(g)
        if home is None and g not in prog_set:
            u = r.random()
            home = int(r.integers(0, k)) if u < 0.75 else None  # others: housekeeping-like
        else:
            r.random()
            r.integers(0, k)
        prof = base + noise
        if g in other:
            prof = base + 0.6 + 0.1 * noise  # generic, abundant, little type signal
        elif home is not None:
            prof[home] += math.log(r.uniform(5.0, 12.0))
            prof -= 0.5  # markers are low elsewhere
        log_profile[:, j] = prof
        if g in prog_set:
            gamma[j] = r.uniform(0.8, 1.1)
            log_profile[:, j] += 0.3

    kinds = [ADDON_KINDS[min(2, (3 * i) // max(1, len(addon)))] for i in range(len(addon))]
    beta = np.zeros(len(addon))
    b_inputs: dict[str, dict[str, float]] = {}
    for i, g in enumerate(addon):
        r = seeded_rng(seed, "addon", g)
        beta[i] = {"a": r.uniform(0.9, 1.2), "b": 1.0, "c": r.uniform(0.8, 1.0)}[kinds[i]]
        if kinds[i] == "b":
            n_in = min(3, len(program))
            pick = sorted(program, key=lambda c: crc_key(f"{seed}:b:{g}:{c}"))[:n_in]
            w = r.uniform(0.5, 1.5, size=n_in)
            b_inputs[g] = {c: float(x) for c, x in zip(pick, w / w.sum(), strict=True)}
    share = np.full(len(addon), 0.012)
    return GeneModel(
        core=core,
        addon=addon,
        other=other,
        expr_genes=expr,
        log_profile=log_profile,
        program_gamma=gamma,
        program_genes=program,
        addon_kind=kinds,
        addon_beta=beta,
        addon_share=share,
        b_inputs=b_inputs,
    )


@dataclass
class Patient:
    """Patient effects (shared by all samples of a patient)."""

    composition: np.ndarray  # (K,) logit offsets
    gene_log_factor: dict[str, float]
    z_shift: float
    p_shift: float
    stain_h: float
    stain_e: float
    efficiency: float


def patient_effects(seed: int, patient_id: str, genes: Sequence[str]) -> Patient:
    """Patient effects; draws depend on ``(seed, patient_id)`` (and the gene for gene factors)."""
    r = seeded_rng(seed, "patient", patient_id)
    comp = r.normal(0.0, 0.6, size=len(CELL_TYPES))
    z_shift, p_shift = r.normal(0.0, 0.3, size=2)
    stain_h, stain_e = np.exp(r.normal(0.0, 0.1, size=2))
    eff = float(np.exp(r.normal(0.0, 0.15)))
    factors = {}
    for g in genes:
        rg = seeded_rng(seed, "patient", patient_id, g)
        affected = rg.random() < 0.5
        val = rg.normal(0.0, 0.35)
        factors[g] = float(val) if affected else 0.0
    return Patient(comp, factors, float(z_shift), float(p_shift), float(stain_h), float(stain_e), eff)

