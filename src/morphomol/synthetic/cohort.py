"""Entry points of the simulator: one sample (:func:`simulate_sample`), a cohort
(:func:`simulate_cohort`, with its ``samples.tsv``), and a cohort's ``simulate`` config block
(:func:`simulate_from_config`, used by the ``simulate`` rule).

A sample is simulated in stages, each with its own random stream (see
:mod:`morphomol.synthetic.params`): fields → regions → cells → expression → transcripts, then
the writers (Xenium bundle, H&E, landmarks, truth).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from morphomol.errors import InputError
from morphomol.synthetic.expression import express, make_transcripts
from morphomol.synthetic.fields import make_fields, make_regions, place_cells
from morphomol.synthetic.he import write_he
from morphomol.synthetic.landmarks import write_landmarks
from morphomol.synthetic.params import OTHER_CANDIDATES, SAMPLE_OUTPUTS, SampleSpec, gene_model, patient_effects
from morphomol.synthetic.truth import WriteStats, truth, write_truth_cells
from morphomol.synthetic.xenium import write_cells, write_dapi, write_experiment, write_panel, write_transcripts
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("simulate")


def _check_genes(core: Sequence[str], addon: Sequence[str]) -> tuple[list[str], list[str]]:
    """Gene lists as strings; InputError for empty, duplicate, control-like or shared names."""
    core, addon = [str(g) for g in core], [str(g) for g in addon]
    if not core:
        raise InputError("no core genes", field="core", expected="a non-empty list of gene symbols")
    if not addon:
        raise InputError("no add-on genes", field="addon", expected="a non-empty list of gene symbols")
    for name, lst in (("core", core), ("addon", addon)):
        dup = sorted({g for g in lst if lst.count(g) > 1})
        if dup:
            raise InputError(f"duplicate genes {dup}", field=name, expected="unique gene symbols")
        ctrl = [g for g in lst if g.startswith(("BLANK_", "NegControl", "Unassigned", "Deprecated", "Intergenic"))]
        if ctrl:
            raise InputError(f"control feature names {ctrl}", field=name, expected="gene symbols")
    both = sorted(set(core) & set(addon))
    if both:
        raise InputError(f"genes in both lists: {both}", field="addon", expected="disjoint core and add-on lists")
    return core, addon


def _check_out_dir(out_dir: Path) -> None:
    """InputError when ``out_dir`` is a file or holds files the simulator does not write."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError("exists and is not a directory", file=out_dir, expected="an output directory")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in SAMPLE_OUTPUTS)
        if foreign:
            raise InputError(
                f"holds files the simulator did not write: {foreign[:5]}",
                file=out_dir,
                expected="an empty or previously simulated sample directory",
            )



def simulate_sample(
    out_dir: str | Path,
    *,
    sample_id: str,
    patient_id: str,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    seed: int = 0,
    tissue_um: Sequence[float] = (2500.0, 2500.0),
    he_mpp: float = 0.5,
    cell_density: float = 3000.0,
    transcripts_per_cell: float = 60.0,
    click_noise_um: float = 1.5,
    n_regions: int = 2,
    landmarks_per_region: Sequence[int] = (8, 12),
    other_genes: Sequence[str] | None = None,
    n_other_genes: int = 4,
    control_fraction: float = 0.025,
    low_qv_fraction: float = 0.06,
    unassigned_fraction: float = 0.05,
    neighbourhood_um: float = 120.0,
    he_rotation_deg: float = 8.0,
    region_jitter: float = 1.0,
    jpeg_quality: int = 88,
) -> dict[str, Any]:
    """Simulate one paired sample into ``out_dir`` and return its ground truth (``truth.json``).

    Parameters (µm unless stated):
        core_genes, addon_genes: panel lists (disjoint); add-on kinds a/b/c split evenly by index.
        seed: cohort seed. Patient effects depend on (seed, patient_id), gene roles on
            (seed, gene), everything else on (seed, sample_id).
        tissue_um: (width, height) of the Xenium field; the tissue blob fills ~75 % of it.
        he_mpp: µm per H&E pixel at level 0 (the H&E is rendered in its own frame).
        cell_density: mean cells per mm² of tissue; transcripts_per_cell: mean gene
            transcripts per cell (controls come on top).
        click_noise_um: sd per axis of the mismatch between the two clicks of a landmark.
        n_regions: tissue pieces (vertical bands) with their own H&E affine; region_jitter
            scales how much their affines differ (0 = identical).
        landmarks_per_region: (min, max) landmarks per region.
        other_genes / n_other_genes: measured genes outside the panel lists.
        control_fraction, low_qv_fraction, unassigned_fraction: shares of control-probe,
            qv < 20 and cell-unassigned transcripts.
        neighbourhood_um: correlation length of cell-type / state / program fields.
        he_rotation_deg: max global rotation of the H&E against Xenium.

    Deterministic: the same arguments give byte-identical files. The whole directory is
    written under a temporary name and renamed on success; a directory holding files the
    simulator did not write is refused (:class:`InputError`).
    """
    out_dir = Path(out_dir)
    core, addon = _check_genes(core_genes, addon_genes)
    if len(tissue_um) != 2 or min(float(v) for v in tissue_um) < 300:
        raise InputError(f"{list(tissue_um)}", field="tissue_um", expected="[width, height] in µm, each >= 300")
    if not 0.1 <= float(he_mpp) <= 2.0:
        raise InputError(f"{he_mpp}", field="he_mpp", expected="µm per H&E pixel in [0.1, 2]")
    if int(n_regions) < 1 or int(n_regions) > 6:
        raise InputError(f"{n_regions}", field="n_regions", expected="an integer in 1..6")
    if cell_density <= 0 or transcripts_per_cell <= 0:
        raise InputError("must be positive", field="cell_density/transcripts_per_cell", expected="> 0")
    if click_noise_um < 0:
        raise InputError(f"{click_noise_um}", field="click_noise_um", expected=">= 0")
    lo_lm, hi_lm = (int(landmarks_per_region[0]), int(landmarks_per_region[-1]))
    if lo_lm < 3 or hi_lm < lo_lm:
        raise InputError(f"{list(landmarks_per_region)}", field="landmarks_per_region", expected="[min, max] with 3 <= min <= max")
    if other_genes is None:
        panel = set(core) | set(addon)
        other = [g for g in OTHER_CANDIDATES if g not in panel][: int(n_other_genes)]
    else:
        other = [str(g) for g in other_genes if g not in set(core) | set(addon)]
    _check_out_dir(out_dir)

    spec = SampleSpec(
        sample_id=str(sample_id),
        patient_id=str(patient_id),
        core=core,
        addon=addon,
        other=other,
        seed=int(seed),
        width=float(tissue_um[0]),
        height=float(tissue_um[1]),
        he_mpp=float(he_mpp),
        cell_density=float(cell_density),
        tpc=float(transcripts_per_cell),
        click_noise_um=float(click_noise_um),
        n_regions=int(n_regions),
        landmarks=(lo_lm, hi_lm),
        control_fraction=float(control_fraction),
        low_qv_fraction=float(low_qv_fraction),
        unassigned_fraction=float(unassigned_fraction),
        neighbourhood_um=float(neighbourhood_um),
        he_rotation_deg=float(he_rotation_deg),
        region_jitter=float(region_jitter),
        jpeg_quality=int(jpeg_quality),
    )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        doc = _run(spec, tmp)
    log.info(
        "simulated %s (patient %s): %d cells, %d transcripts, H&E %dx%d px",
        sample_id,
        patient_id,
        doc["n_cells"],
        doc["n_transcripts"],
        doc["he_size_px"][0],
        doc["he_size_px"][1],
    )
    return doc

def _run(spec: SampleSpec, out: Path) -> dict[str, Any]:
    """Simulate ``spec`` into the (new, empty) directory ``out``; returns ``truth.json``'s document."""
    genes = gene_model(spec.seed, spec.core, spec.addon, spec.other)
    patient = patient_effects(spec.seed, spec.patient_id, spec.core + spec.addon + spec.other)
    fields = make_fields(spec, patient)
    regions = make_regions(spec, fields)
    cells = place_cells(spec, fields, regions, patient)
    expr = express(spec, genes, patient, cells)
    tr = make_transcripts(spec, cells, expr)
    xdir = out / "xenium"
    xdir.mkdir()
    n_transcripts = write_transcripts(xdir / "transcripts.parquet", tr, cells)
    median = write_cells(xdir / "cells.parquet", tr, cells, len(expr.gene_names))
    feature_names, n_ctrl = tr.feature_names, tr.n_ctrl
    del tr  # the transcript arrays are not needed by the image writers
    write_panel(xdir / "gene_panel.json", feature_names, spec)
    dapi_levels = write_dapi(xdir / "morphology_focus.ome.tif", spec, fields, cells)
    write_experiment(xdir / "experiment.xenium", spec, n_cells=cells.n, transcripts_per_cell_median=median,
                     n_transcripts=n_transcripts, tissue_area_mm2=cells.tissue_area_mm2)
    he_levels = write_he(out / "he.tif", spec, patient, fields, regions, cells)
    n_landmarks = write_landmarks(out, spec, regions, cells)
    write_truth_cells(out / "truth_cells.parquet", cells, expr)
    stats = WriteStats(n_transcripts=n_transcripts, n_ctrl=n_ctrl, n_landmarks=n_landmarks, he_levels=he_levels,
                       dapi_levels=dapi_levels)
    doc = truth(spec, genes, patient, regions, cells, stats)
    (out / "truth.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _sheet_row(out_dir: Path, sample_id: str, patient_id: str, he_mpp: float) -> dict[str, Any]:
    """The sample sheet row of a simulated sample."""
    d = out_dir / sample_id
    return {
        "sample_id": sample_id,
        "patient_id": patient_id,
        "xenium_dir": str(d / "xenium"),
        "he_path": str(d / "he.tif"),
        "he_mpp": he_mpp,
        "alignment": str(d / "keypoints.csv"),
        "regions": str(d / "regions.geojson"),
    }


def simulate_cohort(
    out_dir: str | Path,
    *,
    n_patients: int,
    samples_per_patient: int,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    seed: int = 0,
    **sample_kwargs: Any,
) -> pd.DataFrame:
    """Simulate ``n_patients * samples_per_patient`` samples (S01.., patients P1..) under ``out_dir``.

    Returns the sample sheet (also written to ``out_dir/samples.tsv``).
    """
    if int(n_patients) < 1 or int(samples_per_patient) < 1:
        raise InputError(
            f"n_patients={n_patients}, samples_per_patient={samples_per_patient}",
            field="n_patients/samples_per_patient",
            expected="positive integers",
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    he_mpp = float(sample_kwargs.get("he_mpp", 0.5))
    total = int(n_patients) * int(samples_per_patient)
    width = max(2, len(str(total)))
    rows = []
    k = 0
    for p in range(int(n_patients)):
        pid = f"P{p + 1}"
        for _ in range(int(samples_per_patient)):
            k += 1
            sid = f"S{k:0{width}d}"
            log.info("cohort: sample %d/%d %s (patient %s)", k, total, sid, pid)
            simulate_sample(
                out_dir / sid,
                sample_id=sid,
                patient_id=pid,
                core_genes=core_genes,
                addon_genes=addon_genes,
                seed=seed,
                **sample_kwargs,
            )
            rows.append(_sheet_row(out_dir, sid, pid, he_mpp))
    sheet = pd.DataFrame(rows)
    with atomic_path(out_dir / "samples.tsv") as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)
    return sheet


_CONFIG_KEYS = {
    "seed",
    "tissue_um",
    "he_mpp",
    "cell_density",
    "transcripts_per_cell",
    "click_noise_um",
    "n_regions",
    "landmarks_per_region",
    "other_genes",
    "n_other_genes",
    "control_fraction",
    "low_qv_fraction",
    "unassigned_fraction",
    "neighbourhood_um",
    "he_rotation_deg",
    "region_jitter",
    "jpeg_quality",
}


def simulate_from_config(
    out_dir: str | Path,
    *,
    sample_id: str,
    patient_id: str,
    panel: Mapping[str, Any],
    simulate: Mapping[str, Any],
    he_mpp: float | None = None,
    config_file: str | Path | None = None,
) -> dict[str, Any]:
    """Simulate one sample from a cohort's ``simulate`` block and ``panel`` (used by the rule).

    ``he_mpp`` (the sample sheet's value, if any) must agree with the ``simulate`` block.
    """
    sim = dict(simulate or {})
    unknown = sorted(set(sim) - _CONFIG_KEYS)
    if unknown:
        raise InputError(f"unknown keys {unknown}", file=config_file, field="simulate", expected=f"keys among {sorted(_CONFIG_KEYS)}")
    core = list(panel.get("core") or [])
    addon = list(panel.get("addon") or [])
    if not core or not addon:
        raise InputError(
            "the simulator needs explicit gene lists", file=config_file, field="panel.core/panel.addon", expected="non-empty core and addon lists"
        )
    if he_mpp is not None and str(he_mpp).strip() not in ("", "nan", "NaN", "None"):
        try:
            he_mpp = float(he_mpp)
        except (TypeError, ValueError):
            raise InputError(f"{he_mpp!r} is not a number", field="he_mpp", expected="µm per H&E pixel") from None
        block = float(sim.get("he_mpp", he_mpp))
        if abs(block - he_mpp) > 1e-9:
            raise InputError(
                f"sample sheet he_mpp {he_mpp} differs from simulate.he_mpp {block}",
                file=config_file,
                field="he_mpp",
                expected="the same value in both places",
            )
        sim["he_mpp"] = float(he_mpp)
    if "tissue_um" in sim:
        sim["tissue_um"] = tuple(float(v) for v in sim["tissue_um"])
    return simulate_sample(out_dir, sample_id=sample_id, patient_id=patient_id, core_genes=core, addon_genes=addon, **sim)
