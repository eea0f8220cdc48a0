"""Ground truth of a simulated sample: ``truth.json`` (affines, proportions, add-on kinds, patient
effects, sizes) and ``truth_cells.parquet`` (per-cell latents)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morphomol.synthetic.expression import Expression
from morphomol.synthetic.fields import Cells, Regions
from morphomol.synthetic.params import CELL_TYPES, PIXEL_SIZE, GeneModel, Patient, SampleSpec


@dataclass
class WriteStats:
    """Figures the writers return that ``truth.json`` reports."""

    n_transcripts: int
    n_ctrl: int
    n_landmarks: int
    he_levels: list[tuple[int, int]]
    dapi_levels: list[tuple[int, int]]


def write_truth_cells(path: Path, cells: Cells, expr: Expression) -> None:
    """Write ``truth_cells.parquet`` (cell id, position, type, region, latents, nucleus size)."""
    table = pa.table(
        {
            "cell_id": pa.array(list(cells.ids), type=pa.string()),
            "x_um": cells.cx,
            "y_um": cells.cy,
            "cell_type": pa.array([CELL_TYPES[t] for t in cells.ctype], type=pa.string()),
            "region": cells.region.astype(np.int32),
            "morph_state": cells.z,
            "program": cells.p,
            "nucleus_major_um": 2 * cells.na,
            "nucleus_minor_um": 2 * cells.nb,
            "size_factor": expr.size,
        }
    )
    pq.write_table(table, path, compression="zstd")


def truth(spec: SampleSpec, genes: GeneModel, patient: Patient, regions: Regions, cells: Cells,
          stats: WriteStats) -> dict[str, Any]:
    """The ``truth.json`` document (also returned by :func:`morphomol.synthetic.simulate_sample`)."""
    props = np.bincount(cells.ctype, minlength=len(CELL_TYPES)) / cells.n
    g = genes
    return {
        "sample_id": spec.sample_id,
        "patient_id": spec.patient_id,
        "seed": spec.seed,
        "pixel_size": PIXEL_SIZE,
        "he_mpp": spec.he_mpp,
        "tissue_um": [spec.width, spec.height],
        "tissue_area_mm2": cells.tissue_area_mm2,
        "he_size_px": list(regions.he_size),
        "he_levels": [list(s) for s in stats.he_levels],
        "dapi_levels": [list(s) for s in stats.dapi_levels],
        "click_noise_um": spec.click_noise_um,
        "n_landmarks": stats.n_landmarks,
        "regions": [
            {
                "name": f"r{i}",
                "matrix": regions.he_to_um[i].tolist(),
                "inverse": regions.um_to_he[i].tolist(),
                "polygon_um": regions.polygons[i],
                "n_cells": int((cells.region == i).sum()),
            }
            for i in range(spec.n_regions)
        ],
        "n_cells": int(cells.n),
        "n_transcripts": int(stats.n_transcripts),
        "n_control_transcripts": int(stats.n_ctrl),
        "cell_types": list(CELL_TYPES),
        "cell_type_proportions": {t: float(p) for t, p in zip(CELL_TYPES, props, strict=True)},
        "core_genes": g.core,
        "addon_genes": g.addon,
        "other_genes": g.other,
        "addon_kinds": dict(zip(g.addon, g.addon_kind, strict=True)),
        "program_genes": g.program_genes,
        "kind_b_inputs": g.b_inputs,
        "patient_effects": {
            "composition_logit": dict(zip(CELL_TYPES, patient.composition.tolist(), strict=True)),
            "morph_state_shift": patient.z_shift,
            "program_shift": patient.p_shift,
            "efficiency": patient.efficiency,
            "gene_log_factor": {k: v for k, v in patient.gene_log_factor.items() if v != 0.0},
        },
    }
