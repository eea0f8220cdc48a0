"""Simulated slide cohort for the slides study (seed 003): H&E slides + bulk RNA with known programs.

Every slide belongs to a patient and a source cohort (the sample sheet says which). Each slide has
latent *program activities* (unit variance; a patient component shared by the patient's slides
plus a slide component). Programs act on the RNA through the genes of named gene sets (GMT) and,
for some programs only, on the H&E:

==================  ================================================  =====================
program             genes raised (log2, ``loading`` per unit)          H&E footprint
==================  ================================================  =====================
proliferation       HALLMARK_G2M_CHECKPOINT, HALLMARK_E2F_TARGETS      tumour nuclear density
immune              HALLMARK_INTERFERON_GAMMA_RESPONSE,                lymphocyte density
                    HALLMARK_ALLOGRAFT_REJECTION
oxphos              HALLMARK_OXIDATIVE_PHOSPHORYLATION                 none
fatty_acid          HALLMARK_FATTY_ACID_METABOLISM                     none
==================  ================================================  =====================

Hidden biology (no footprint): every other set of the GMT and ``n_modules`` random modules of
background genes carry their own independent activity (sd ``hidden_sd``), so that every pathway
varies for reasons the H&E does not show.

RNA: log2 expression = gene baseline + cohort batch offset (per gene) + programs + noise; counts
are Poisson draws at a library size of ~``library_size`` reads (``rna_counts.tsv``, genes x
samples, value type ``counts``). Slides: a tissue blob with eosin texture, tumour nuclei and
lymphocytes at the program-driven densities, in the cohort's stain (cohorts differ in stain
colour: a domain shift for the transfer experiments), written as pyramidal TIFFs.

Outputs (``out_dir``): ``slides/{sample}.tif`` (each slide where the sheet says), ``rna_counts.tsv``,
``truth.parquet`` (per slide: programs, densities, nuclei drawn). Deterministic in ``seed`` and
the sheet.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("synthetic.slides")

#: program -> (gene sets, H&E footprint)
PROGRAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "proliferation": (("HALLMARK_G2M_CHECKPOINT", "HALLMARK_E2F_TARGETS"), "nuclear_density"),
    "immune": (("HALLMARK_INTERFERON_GAMMA_RESPONSE", "HALLMARK_ALLOGRAFT_REJECTION"), "lymphocyte_density"),
    "oxphos": (("HALLMARK_OXIDATIVE_PHOSPHORYLATION",), "none"),
    "fatty_acid": (("HALLMARK_FATTY_ACID_METABOLISM",), "none"),
}


@dataclass(frozen=True)
class SlideSimParams:
    """The ``simulate`` block of a slides cohort YAML (every key optional except ``gmt``)."""

    gmt: str
    seed: int = 3
    slide_um: tuple[float, float] = (640.0, 480.0)
    he_mpp: float = 0.5
    n_background_genes: int = 12000
    loading: float = 0.8            # log2 change of a program gene per unit of activity
    patient_sd: float = 0.8         # patient share of the activity (slide share: sqrt(1 - sd^2))
    batch_sd: float = 0.15          # cohort offset per gene (log2)
    hidden_sd: float = 0.35         # activity sd of the hidden programs (every other GMT set, background modules)
    n_modules: int = 150            # co-regulated modules of background genes (hidden programs)
    module_size: int = 100
    noise_sd: float = 0.35          # per gene and slide (log2)
    library_size: float = 2.0e7
    tumour_per_mm2: float = 2500.0  # at zero proliferation activity
    lymph_per_mm2: float = 2000.0   # at zero immune activity
    density_gain: float = 0.6       # log tumour-nucleus density per unit of activity
    lymph_gain: float = 0.8         # log lymphocyte density per unit of activity
    stain_shift: float = 0.08       # cohort stain difference (OD direction sd)
    programs: dict[str, Any] = field(default_factory=dict)  # overrides: name -> {sets: [...], footprint: ...}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, file: object = None) -> SlideSimParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown key '{unknown[0]}'", file=file, field=f"simulate.{unknown[0]}",
                             expected="one of " + ", ".join(sorted(known)))
        if not data.get("gmt"):
            raise InputError("missing required field", file=file, field="simulate.gmt",
                             expected="a GMT file naming the programs' gene sets")
        kw = dict(data)
        if "slide_um" in kw:
            kw["slide_um"] = tuple(float(v) for v in kw["slide_um"])
        return cls(**kw)

    def program_table(self) -> dict[str, tuple[tuple[str, ...], str]]:
        out = dict(PROGRAMS)
        for name, spec in (self.programs or {}).items():
            out[str(name)] = (tuple(spec.get("sets", ())), str(spec.get("footprint", "none")))
        return out


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator for ``(seed, keys...)`` (names hashed stably, not with Python's ``hash``)."""
    import zlib

    return np.random.default_rng([int(seed), *(zlib.crc32(k.encode()) for k in keys)])


def program_activities(sheet: pd.DataFrame, programs: Sequence[str], p: SlideSimParams) -> pd.DataFrame:
    """Unit-variance activities per slide: patient component (sd ``patient_sd``) + slide component."""
    slide_sd = float(np.sqrt(max(0.0, 1.0 - p.patient_sd**2)))
    rows = []
    for rec in sheet.to_dict("records"):
        pr = _rng(p.seed, "patient", str(rec["patient_id"]))
        sr = _rng(p.seed, "slide", str(rec["sample_id"]))
        pat = pr.normal(0, p.patient_sd, len(programs))
        rows.append(pat + sr.normal(0, slide_sd, len(programs)))
    return pd.DataFrame(np.asarray(rows), index=sheet["sample_id"].astype(str).to_numpy(), columns=list(programs))


def simulate_rna(sheet: pd.DataFrame, act: pd.DataFrame, gene_sets: Mapping[str, Sequence[str]],
                 p: SlideSimParams) -> pd.DataFrame:
    """Counts (genes x samples, int64) of every slide; genes = the GMT's genes + background genes."""
    table = p.program_table()
    genes = sorted({g for gs in gene_sets.values() for g in gs}) + [f"SIMBG{i:05d}" for i in range(p.n_background_genes)]
    pos = {g: i for i, g in enumerate(genes)}
    gr = _rng(p.seed, "genes")
    base = gr.normal(3.0, 2.0, len(genes))
    load = np.zeros((len(act.columns), len(genes)))
    for k, prog in enumerate(act.columns):
        sets, _ = table[prog]
        for s in sets:
            if s not in gene_sets:
                raise InputError(f"program {prog}: gene set {s} not in the GMT", field="simulate.gmt",
                                 expected="a GMT holding the programs' gene sets (e.g. MSigDB Hallmark)")
            for g in gene_sets[s]:
                load[k, pos[g]] = p.loading
    # hidden biology without a morphological footprint: every other GMT set and modules of background genes
    used = {s for sets, _ in table.values() for s in sets}
    hidden = [[pos[g] for g in gs] for name, gs in gene_sets.items() if name not in used]
    bg = np.arange(len(genes) - p.n_background_genes, len(genes))
    hidden += [gr.choice(bg, size=min(p.module_size, len(bg)), replace=False).tolist() for _ in range(p.n_modules)]
    cohorts = sorted(sheet["cohort"].astype(str).unique())
    batch = {c: _rng(p.seed, "batch", c).normal(0, p.batch_sd, len(genes)) for c in cohorts}
    out = np.zeros((len(genes), len(sheet)), np.int64)
    for j, rec in enumerate(sheet.to_dict("records")):
        sid = str(rec["sample_id"])
        r = _rng(p.seed, "rna", sid)
        log2 = base + batch[str(rec["cohort"])] + act.loc[sid].to_numpy() @ load + r.normal(0, p.noise_sd, len(genes))
        for idx, h in zip(hidden, r.normal(0, p.hidden_sd, len(hidden)), strict=True):
            log2[idx] += p.loading * h
        cpm = np.exp2(log2)
        lib = p.library_size * float(np.exp(r.normal(0, 0.2)))
        out[:, j] = r.poisson(cpm / cpm.sum() * lib)
    return pd.DataFrame(out, index=pd.Index(genes, name="gene"), columns=sheet["sample_id"].astype(str).to_numpy())


def simulate_slides_cohort(out_dir: str | Path, sheet: pd.DataFrame | Sequence[Mapping[str, Any]],
                           params: Mapping[str, Any] | SlideSimParams, *, config_file: str | None = None,
                           slides_dir: str | Path | None = None) -> pd.DataFrame:
    """Write every slide of ``sheet`` (columns sample_id, patient_id, cohort, slide_path), the RNA
    counts and the truth table into ``out_dir``; returns the truth table.

    Slides are written where ``slide_path`` says, which must lie in ``slides_dir`` (default
    ``out_dir/slides``). Reads the GMT named by ``params.gmt``.
    """
    from morphomol.studies.slides.genesets import read_gmt
    from morphomol.synthetic.slides_render import cohort_stain, render_slide, slide_stain, write_slide
    from morphomol.util.atomic import atomic_path

    p = params if isinstance(params, SlideSimParams) else SlideSimParams.from_mapping(params, file=config_file)
    df = pd.DataFrame(list(sheet)) if not isinstance(sheet, pd.DataFrame) else sheet.reset_index(drop=True)
    out = Path(out_dir)
    sdir = Path(slides_dir) if slides_dir is not None else out / "slides"
    for rec in df.to_dict("records"):
        sp = Path(str(rec["slide_path"]))
        if sp.resolve().parent != sdir.resolve():
            raise InputError(f"sample {rec['sample_id']}: slide_path {sp} is not in the simulated slides directory "
                             f"{sdir}", file=config_file, field="slide_path",
                             expected=f"{sdir}/<sample>.tif for a simulated cohort")
    gene_sets = read_gmt(p.gmt)
    table = p.program_table()
    act = program_activities(df, list(table), p)
    t0 = time.perf_counter()
    counts = simulate_rna(df, act, gene_sets, p)
    stains = {c: cohort_stain(_rng(p.seed, "stain", c), p.stain_shift) for c in sorted(df["cohort"].astype(str).unique())}
    w_px, h_px = int(round(p.slide_um[0] / p.he_mpp)), int(round(p.slide_um[1] / p.he_mpp))
    truth = []
    with atomic_path(sdir) as tmp_dir:
        tmp_dir.mkdir(parents=True)
        for i, rec in enumerate(df.to_dict("records")):
            sid = str(rec["sample_id"])
            a = act.loc[sid]
            dens_t, dens_l = p.tumour_per_mm2, p.lymph_per_mm2
            for prog, (_, footprint) in table.items():
                if footprint == "nuclear_density":
                    dens_t *= float(np.exp(p.density_gain * a[prog]))
                elif footprint == "lymphocyte_density":
                    dens_l *= float(np.exp(p.lymph_gain * a[prog]))
            r = _rng(p.seed, "he", sid)
            rgb, drawn = render_slide(width_px=w_px, height_px=h_px, mpp=p.he_mpp, tumour_per_mm2=dens_t,
                                      lymph_per_mm2=dens_l, stain=slide_stain(stains[str(rec["cohort"])], r), rng=r)
            write_slide(tmp_dir / Path(str(rec["slide_path"])).name, rgb, p.he_mpp)
            truth.append({"sample_id": sid, "patient_id": str(rec["patient_id"]), "cohort": str(rec["cohort"]),
                          **{f"program_{k}": float(v) for k, v in a.items()}, "tumour_per_mm2": dens_t,
                          "lymph_per_mm2": dens_l, **drawn})
            if (i + 1) % 25 == 0 or i + 1 == len(df):
                log.info("simulated %d/%d slides (%.1f s)", i + 1, len(df), time.perf_counter() - t0)
    with atomic_path(out / "rna_counts.tsv") as tmp:
        counts.to_csv(tmp, sep="\t")
    truth_df = pd.DataFrame(truth)
    with atomic_path(out / "truth.parquet") as tmp:
        truth_df.to_parquet(tmp, index=False)
    return truth_df
