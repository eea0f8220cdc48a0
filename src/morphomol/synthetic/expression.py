"""Gene expression per cell and the transcript table (positions, controls, quality values).

Core genes: negative-binomial counts from per-type mean profiles times the program. Add-on
genes, split evenly by index into three kinds (``truth["addon_kinds"]``):

* ``a``: log-mean linear in ``z``  (predictable from morphology),
* ``b``: mean proportional to a weighted sum of the cell's own core program counts
  (predictable from core genes),
* ``c``: log-mean ``beta * (0.4 z + 0.4 p + 0.8 z p)`` (an AND-like interaction: each
  modality alone explains little, both together explain it).

Transcripts lie in the nucleus or in the cytoplasm rim of their cell; a share diffuses away and
is unassigned; control probes / codewords / blanks and low-qv transcripts come on top, sorted
by field of view (FOV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from morphomol.synthetic.fields import Cells
from morphomol.synthetic.params import TYPES, GeneModel, Patient, SampleSpec

_N_NEG_PROBES = 20
_N_NEG_CODEWORDS = 20
_N_BLANKS = 40


def neg_binomial(r: np.random.Generator, lam: np.ndarray, shape: float) -> np.ndarray:
    """Negative-binomial counts with mean ``lam`` (gamma-Poisson, gamma shape ``shape``)."""
    g = r.gamma(shape, 1.0 / shape, size=lam.shape)
    return r.poisson(lam * g)


def quality_values(r: np.random.Generator, n: int, low_fraction: float) -> np.ndarray:
    """Phred-like qv: ``low_fraction`` below 20, the rest in [20, 40]."""
    low = r.random(n) < low_fraction
    good = np.clip(40.0 - r.gamma(1.5, 4.0, n), 20.0, 40.0)
    bad = r.uniform(2.0, 19.9, n)
    return np.where(low, bad, good)


def control_names() -> list[str]:
    """Feature names of the negative-control probes, codewords and blank codewords (10x style)."""
    probes = [f"NegControlProbe_{i:05d}" for i in (2, 3, 4, 9, 12, 13, 14, 16, 17, 19, 22, 25, 28, 31, 33, 35, 39, 40, 41, 42)]
    codewords = [f"NegControlCodeword_{500 + i:04d}" for i in range(_N_NEG_CODEWORDS)]
    blanks = [f"BLANK_{6 + 7 * i:04d}" for i in range(_N_BLANKS)]
    return probes[:_N_NEG_PROBES] + codewords + blanks


@dataclass
class Expression:
    """Counts per cell and gene (columns: expression genes, then add-on genes)."""

    size: np.ndarray  # per-cell size factor (expected transcripts)
    gene_names: list[str]
    counts: np.ndarray  # (n_cells, n_genes) int64


def express(spec: SampleSpec, genes: GeneModel, patient: Patient, cells: Cells) -> Expression:
    """Per-cell counts from the sample's ``expression`` stream."""
    r = spec.rng("expression")
    g = genes
    n = cells.n
    pat = patient
    size = TYPES.tx_factor[cells.ctype] * np.exp(0.1 * cells.z + 0.25 * r.standard_normal(n))
    size = size / size.mean() * spec.tpc * pat.efficiency * float(np.exp(r.normal(0, 0.08)))
    # relative abundance: expression genes share (1 - addon share) of the transcripts
    prof = np.exp(g.log_profile)  # (K, G)
    prof = prof / prof.sum(axis=1, keepdims=True) * (1.0 - g.addon_share.sum())
    pf = np.array([pat.gene_log_factor[x] for x in g.expr_genes])
    prog = np.clip(cells.p[:, None] * g.program_gamma[None, :], -3, 3) - 0.5 * g.program_gamma[None, :] ** 2
    lam = size[:, None] * prof[cells.ctype] * np.exp(prog + pf[None, :])
    expr_counts = neg_binomial(r, lam, shape=4.0)
    # add-on genes
    z_std = cells.z
    lam_a = np.zeros((n, len(g.addon)))
    col = {x: j for j, x in enumerate(g.expr_genes)}
    qbar = prof.mean(axis=0)
    for i, name in enumerate(g.addon):
        kind, beta, share = g.addon_kind[i], g.addon_beta[i], g.addon_share[i]
        f = math.exp(pat.gene_log_factor[name])
        if kind == "a":
            lam_a[:, i] = size * share * f * np.exp(np.clip(beta * z_std, -3, 3) - 0.5 * beta**2)
        elif kind == "b":
            ins = g.b_inputs[name]
            num = sum(w * expr_counts[:, col[c]] for c, w in ins.items())
            den = sum(w * qbar[col[c]] for c, w in ins.items())
            lam_a[:, i] = share * f * (num / den + 0.05 * spec.tpc)
        else:
            joint = 0.4 * z_std + 0.4 * cells.p + 0.8 * z_std * cells.p
            lam_a[:, i] = size * share * f * np.exp(np.clip(beta * joint, -2.5, 2.5) - 0.5)
    addon_counts = neg_binomial(r, lam_a, shape=6.0)
    return Expression(size=size, gene_names=g.expr_genes + g.addon,
                      counts=np.concatenate([expr_counts, addon_counts], axis=1).astype(np.int64))


@dataclass
class Transcripts:
    """The transcript table (sorted by FOV) and its feature dictionary."""

    tx: dict[str, np.ndarray]  # fov, x, y, z, gene, cell (-1 unassigned), nuclear, qv, dist
    feature_names: list[str]  # genes (expression columns) then controls
    nfx: int  # FOVs per row
    n_ctrl: int


def make_transcripts(spec: SampleSpec, cells: Cells, expr: Expression) -> Transcripts:
    """Transcripts of every counted molecule plus controls, from the sample's ``transcripts`` stream."""
    r = spec.rng("transcripts")
    counts = expr.counts
    n_cells, n_genes = counts.shape
    flat = counts.ravel()
    cell = np.repeat(np.repeat(np.arange(n_cells), n_genes), flat)
    gene = np.repeat(np.tile(np.arange(n_genes), n_cells), flat)
    m = len(cell)
    t = cells.ctype[cell]
    a, b, phi = cells.na[cell], cells.nb[cell], cells.phi[cell]
    nuclear = r.random(m) < TYPES.nuc_fraction[t]
    theta = r.uniform(0.0, 2 * np.pi, m)
    rad = np.where(nuclear, np.sqrt(r.random(m)), 1.0)
    lx, ly = a * rad * np.cos(theta), b * rad * np.sin(theta)
    extra = np.abs(r.standard_normal(m)) * (cells.cyto[cell] * 0.8) + 0.15
    norm = np.hypot(lx, ly) + 1e-9
    lx = np.where(nuclear, lx, lx + extra * lx / norm)
    ly = np.where(nuclear, ly, ly + extra * ly / norm)
    c, s = np.cos(phi), np.sin(phi)
    x = cells.cx[cell] + c * lx - s * ly + 0.2 * r.standard_normal(m)
    y = cells.cy[cell] + s * lx + c * ly + 0.2 * r.standard_normal(m)
    dist = np.where(nuclear, 0.0, extra)
    # diffused transcripts: moved away, not assigned to a cell
    unassigned = r.random(m) < spec.unassigned_fraction
    k = int(unassigned.sum())
    dx, dy = r.normal(0.0, 7.0, k), r.normal(0.0, 7.0, k)
    x[unassigned] += dx
    y[unassigned] += dy
    dist[unassigned] += np.hypot(dx, dy)
    nuclear &= ~unassigned
    cell_idx = np.where(unassigned, -1, cell)
    qv = quality_values(r, m, spec.low_qv_fraction)

    # control probes / codewords / blanks
    names = list(expr.gene_names) + control_names()
    n_ctrl = int(round(spec.control_fraction * m / (1.0 - spec.control_fraction)))
    ctrl_gene = n_genes + r.integers(0, len(names) - n_genes, n_ctrl)
    host = r.integers(0, n_cells, n_ctrl)
    on_tissue = r.random(n_ctrl) < 0.85
    cxs = np.where(on_tissue, cells.cx[host] + r.normal(0, 6.0, n_ctrl), r.uniform(0, spec.width, n_ctrl))
    cys = np.where(on_tissue, cells.cy[host] + r.normal(0, 6.0, n_ctrl), r.uniform(0, spec.height, n_ctrl))
    ctrl_cell = np.where(on_tissue & (r.random(n_ctrl) < 0.6), host, -1)
    ctrl_nuc = (ctrl_cell >= 0) & (r.random(n_ctrl) < 0.3)
    ctrl_dist = np.where(ctrl_nuc, 0.0, np.abs(r.normal(0, 4.0, n_ctrl)))
    ctrl_qv = quality_values(r, n_ctrl, 0.35)

    x = np.concatenate([x, cxs])
    y = np.concatenate([y, cys])
    np.clip(x, 0.0, spec.width, out=x)
    np.clip(y, 0.0, spec.height, out=y)
    fov_um = 900.0
    nfx = int(math.ceil(spec.width / fov_um))
    fov = (np.minimum(y // fov_um, 1e6).astype(np.int64)) * nfx + np.minimum(x // fov_um, nfx - 1).astype(np.int64)
    order = np.argsort(fov, kind="stable")
    fov = fov[order]
    z_loc = 8.0 + 0.0008 * x + 0.0005 * y + r.uniform(-4.0, 4.0, len(x))
    tx = {
        "fov": fov,
        "x": x[order].astype(np.float32),
        "y": y[order].astype(np.float32),
        "z": z_loc[order].astype(np.float32),
        "gene": np.concatenate([gene, ctrl_gene])[order].astype(np.int32),
        "cell": np.concatenate([cell_idx, ctrl_cell])[order].astype(np.int64),
        "nuclear": np.concatenate([nuclear, ctrl_nuc])[order].astype(np.uint8),
        "qv": np.concatenate([qv, ctrl_qv])[order].astype(np.float32),
        "dist": np.concatenate([dist, ctrl_dist])[order].astype(np.float32),
    }
    return Transcripts(tx=tx, feature_names=names, nfx=nfx, n_ctrl=n_ctrl)
