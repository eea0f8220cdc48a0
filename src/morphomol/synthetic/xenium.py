"""Writers of the simulated Xenium bundle (10x formats).

``transcripts.parquet`` (10x columns, controls and low-qv transcripts included),
``cells.parquet``, ``gene_panel.json`` (payload.targets[].type.data.name),
``experiment.xenium`` (JSON, pixel_size 0.2125) and ``morphology_focus.ome.tif`` (DAPI, uint16,
tiled + deflate, SubIFD pyramid). Strings naming the producer say ``morphomol.simulate`` (the
simulator's historical module name) so that the files stay byte-identical.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tifffile

from morphomol.synthetic.expression import Transcripts
from morphomol.synthetic.fields import Cells, Fields
from morphomol.synthetic.params import PIXEL_SIZE, TYPES, SampleSpec, crc_key
from morphomol.synthetic.render import downsample2, ellipse_quad, quad_half, splat


def fov_name(f: int, nfx: int) -> str:
    """10x FOV name of FOV index ``f`` (row letters A, B, ..., Z, AA, ...; column from 1)."""
    row, col = divmod(f, nfx)
    letters = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"{letters}{col + 1}"


def write_transcripts(path: Path, tr: Transcripts, cells: Cells) -> int:
    """Write ``transcripts.parquet``; returns the number of rows."""
    t = tr.tx
    fov = t["fov"]
    # transcript ids: (fov + 1) << 32 | running index within the fov (unique, uint64)
    starts = np.searchsorted(fov, fov, side="left")
    within = np.arange(len(fov)) - starts
    tid = ((fov.astype(np.uint64) + np.uint64(1)) << np.uint64(32)) | within.astype(np.uint64)
    cell_dict = pa.array(list(cells.ids) + ["UNASSIGNED"], type=pa.string())
    cell_codes = np.where(t["cell"] < 0, cells.n, t["cell"])
    ufov = np.unique(fov)
    fov_dict = pa.array([fov_name(int(f), tr.nfx) for f in range(int(ufov.max()) + 1)], type=pa.string())
    feat_dict = pa.array(tr.feature_names, type=pa.string())
    table = pa.table(
        {
            "transcript_id": pa.array(tid, type=pa.uint64()),
            "cell_id": pc.take(cell_dict, pa.array(cell_codes)),
            "overlaps_nucleus": pa.array(t["nuclear"], type=pa.uint8()),
            "feature_name": pc.take(feat_dict, pa.array(t["gene"])),
            "x_location": pa.array(t["x"]),
            "y_location": pa.array(t["y"]),
            "z_location": pa.array(t["z"]),
            "qv": pa.array(t["qv"]),
            "fov_name": pc.take(fov_dict, pa.array(fov)),
            "nucleus_distance": pa.array(t["dist"]),
        }
    )
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 20)
    return int(table.num_rows)


def write_cells(path: Path, tr: Transcripts, cells: Cells, n_genes: int) -> float:
    """Write ``cells.parquet`` (counts of qv >= 20 transcripts); returns the median gene count per cell."""
    t = tr.tx
    n_cells = cells.n
    assigned = t["cell"] >= 0
    c = t["cell"][assigned]
    g = t["gene"][assigned]
    good = t["qv"][assigned] >= 20
    names = tr.feature_names

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(c[mask], minlength=n_cells).astype(np.int64)

    is_gene = g < n_genes
    probe = np.array([n.startswith("NegControlProbe_") for n in names])[g]
    codeword = np.array([n.startswith("NegControlCodeword_") for n in names])[g]
    blank = np.array([n.startswith("BLANK_") for n in names])[g]
    na, nb, cy = cells.na, cells.nb, cells.cyto
    table = pa.table(
        {
            "cell_id": pa.array(list(cells.ids), type=pa.string()),
            "x_centroid": pa.array(cells.cx.astype(np.float64)),
            "y_centroid": pa.array(cells.cy.astype(np.float64)),
            "transcript_counts": pa.array(count(is_gene & good), type=pa.uint32()),
            "control_probe_counts": pa.array(count(probe & good), type=pa.uint32()),
            "genomic_control_counts": pa.array(np.zeros(n_cells, np.uint32)),
            "control_codeword_counts": pa.array(count(codeword & good), type=pa.uint32()),
            "unassigned_codeword_counts": pa.array(count(blank & good), type=pa.uint32()),
            "deprecated_codeword_counts": pa.array(np.zeros(n_cells, np.uint32)),
            "total_counts": pa.array(count(good), type=pa.uint32()),
            "cell_area": pa.array(np.pi * (na + cy) * (nb + cy)),
            "nucleus_area": pa.array(np.pi * na * nb),
            "nucleus_count": pa.array(np.ones(n_cells, np.uint32)),
            "segmentation_method": pa.array(["Segmented by nucleus expansion of 5.0µm"] * n_cells),
        }
    )
    pq.write_table(table, path, compression="zstd")
    return float(np.median(count(is_gene & good)))


def write_panel(path: Path, feature_names: list[str], spec: SampleSpec) -> None:
    """Write ``gene_panel.json`` (core genes predesigned, add-on genes custom, controls by kind)."""
    targets = []
    for i, name in enumerate(feature_names):
        if name.startswith("NegControlProbe_"):
            desc = "negative_control_probe"
        elif name.startswith("NegControlCodeword_"):
            desc = "negative_control_codeword"
        elif name.startswith("BLANK_"):
            desc = "unassigned_codeword"
        else:
            desc = "gene"
        ident = f"ENSG{crc_key(name) % 10**11:011d}" if desc == "gene" else name
        targets.append(
            {
                "codewords": [(crc_key(f"cw:{name}") % 8000) + i],
                "source": {
                    "category": "predesigned" if name in spec.core else ("custom" if name in spec.addon else desc),
                    "design_id": "morphomol-sim",
                    "identity": "simulated",
                },
                "type": {"data": {"id": ident, "name": name}, "descriptor": desc},
            }
        )
    doc = {
        "metadata": {"file_format_version": 3.0, "generated_by": "morphomol.simulate"},
        "payload": {
            "chemistry": {"name": "Xenium v1"},
            "identity": {"name": "morphomol simulated immuno-oncology panel", "revision": 1},
            "panel": {"design_id": "morphomol-sim", "organism": "Human", "tissue": "simulated"},
            "targets": targets,
        },
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_experiment(path: Path, spec: SampleSpec, *, n_cells: int, transcripts_per_cell_median: float,
                     n_transcripts: int, tissue_area_mm2: float) -> None:
    """Write ``experiment.xenium`` (uuids from the sample's ``experiment`` stream)."""
    r = spec.rng("experiment")
    doc = {
        "major_version": 5,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": f"morphomol-sim-{spec.patient_id}",
        "run_start_time": f"2024-{1 + crc_key(spec.sample_id) % 12:02d}-15T09:00:00+00:00",
        "region_name": spec.sample_id,
        "preservation_method": "ffpe",
        "num_cells": int(n_cells),
        "transcripts_per_cell": int(round(transcripts_per_cell_median)),
        "transcripts_per_100um": float(n_transcripts / max(1.0, tissue_area_mm2 * 1e4)),  # per 100 µm2
        "cassette_name": f"SIM{crc_key(spec.patient_id) % 10000:04d}",
        "slide_id": f"{crc_key(spec.sample_id) % 10**7:07d}",
        "panel_design_id": "morphomol-sim",
        "panel_name": "morphomol simulated immuno-oncology panel",
        "panel_organism": "Human",
        "panel_tissue_type": "simulated",
        "panel_num_targets_predesigned": len(spec.core) + len(spec.other),
        "panel_num_targets_custom": len(spec.addon),
        "pixel_size": PIXEL_SIZE,
        "instrument_sn": "SIM0001",
        "instrument_sw_version": "simulated",
        "analysis_sw_version": "morphomol.simulate",
        "experiment_uuid": str(uuid.UUID(bytes=r.bytes(16), version=4)),
        "cassette_uuid": str(uuid.UUID(bytes=r.bytes(16), version=4)),
        "roi_uuid": str(uuid.UUID(bytes=r.bytes(16), version=4)),
        "z_step_size": 3.0,
        "well_uuid": "",
        "calibration_uuid": "N/A",
        "images": {"morphology_focus_filepath": "morphology_focus.ome.tif"},
        "xenium_explorer_files": {},
    }
    path.write_text(json.dumps(doc, indent=4) + "\n")


def write_dapi(path: Path, spec: SampleSpec, fields: Fields, cells: Cells) -> list[tuple[int, int]]:
    """Render and write the DAPI OME-TIFF (level 0 in 512-row strips, SubIFD pyramid down to
    <= 1024 px); returns the level shapes. Draws from the sample's ``dapi`` stream."""
    r = spec.rng("dapi")
    grain_seed = int(r.integers(0, 2**63))
    ps = PIXEL_SIZE
    w = int(math.ceil(spec.width / ps))
    h = int(math.ceil(spec.height / ps))
    tile = 512
    strip = 512
    # cells in DAPI pixels
    cx, cy = cells.cx / ps, cells.cy / ps
    quad = ellipse_quad(cells.na / ps, cells.nb / ps, cells.phi)
    half = quad_half(*quad)
    amp = TYPES.dapi[cells.ctype] * np.clip(1.0 + 0.15 * cells.z, 0.6, 1.6) * cells.hem_jitter
    tex = TYPES.chromatin[cells.ctype]
    col_idx = np.clip(((np.arange(w) + 0.5) * ps / fields.step).astype(np.int64), 0, fields.tissue.shape[1] - 1)
    bg_tissue = np.where(fields.tissue, 160, 40).astype(np.float32)
    levels_shape = [(h, w)]
    while max(levels_shape[-1]) > 1024:
        lh, lw = levels_shape[-1]
        levels_shape.append((lh // 2, lw // 2))
    level1 = np.zeros(levels_shape[1], np.uint16) if len(levels_shape) > 1 else None

    def tiles_in_order() -> Iterator[np.ndarray]:
        # tifffile wants tiles row by row of *tiles*; a strip holds strip // tile tile-rows
        for r0 in range(0, h, strip):
            rh = min(strip, h - r0)
            rows = np.clip(((np.arange(r0, r0 + rh) + 0.5) * ps / fields.step).astype(np.int64), 0,
                           fields.tissue.shape[0] - 1)
            buf = np.ascontiguousarray(bg_tissue[rows][:, col_idx])
            sel = (cy + half >= r0 - 1) & (cy - half < r0 + rh + 1)
            splat(buf, r0, cx[sel], cy[sel], tuple(q[sel] for q in quad), amp[sel], 0.25, tex[sel], grain_seed)
            img = np.clip(buf, 0, 65535).astype(np.uint16)
            if level1 is not None:
                d = downsample2(img)
                lr0 = r0 // 2
                n = min(d.shape[0], level1.shape[0] - lr0)
                level1[lr0 : lr0 + n] = d[:n, : level1.shape[1]]
            for t0 in range(0, rh, tile):
                for c0 in range(0, w, tile):
                    blk = img[t0 : t0 + tile, c0 : c0 + tile]
                    if blk.shape != (tile, tile):
                        t = np.zeros((tile, tile), np.uint16)
                        t[: blk.shape[0], : blk.shape[1]] = blk
                        blk = t
                    yield np.ascontiguousarray(blk)

    meta = {
        "axes": "YX",
        "PhysicalSizeX": ps,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": ps,
        "PhysicalSizeYUnit": "µm",
        "Name": f"{spec.sample_id} DAPI",
        "Channel": {"Name": "DAPI"},
        "UUID": str(uuid.UUID(bytes=r.bytes(16), version=4)),
        "Creator": "morphomol.simulate",
    }
    opts = {"compression": "zlib", "compressionargs": {"level": 1}, "predictor": True}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            tiles_in_order(),
            shape=(h, w),
            dtype=np.uint16,
            tile=(tile, tile),
            subifds=len(levels_shape) - 1,
            metadata=meta,
            photometric="minisblack",
            resolution=(1e4 / ps, 1e4 / ps),
            resolutionunit="CENTIMETER",
            software=False,
            **opts,
        )
        lvl = level1
        for k in range(1, len(levels_shape)):
            if k > 1:
                lvl = downsample2(lvl)
            tif.write(
                lvl,
                subfiletype=1,
                tile=(tile if min(lvl.shape) >= tile else 256, tile if min(lvl.shape) >= tile else 256),
                photometric="minisblack",
                resolution=(1e4 / (ps * 2**k), 1e4 / (ps * 2**k)),
                resolutionunit="CENTIMETER",
                software=False,
                **opts,
            )
    return levels_shape
