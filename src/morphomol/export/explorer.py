"""``morphomol export explorer``: the H&E alignment of a registered sample for Xenium Explorer.

Xenium Explorer overlays a post-Xenium H&E when given ``<name>_he_imagealignment.csv``: a headerless
3x3 affine mapping H&E level-0 pixels -> morphology (DAPI) pixels. From ``registration.json``
(``matrix``: H&E px -> µm) it is ``diag(1/pixel_size, 1/pixel_size, 1) @ matrix``, with the bundle's
``pixel_size`` (µm per morphology pixel, ``experiment.xenium``). A registration with several regions has
several affines and Explorer takes one: the region holding most units is written (exact for
single-region samples) and the others are reported (in the export's notes). A sample without a
registration (no H&E, or a Visium / slides cohort) is :class:`~morphomol.export.sample.NotExportable`.
The same file is what ``alignment`` of a sample sheet reads (matrix mode), so an export re-imports to
the same registration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample, NotExportable
from morphomol.util.logs import get_logger

log = get_logger("export.explorer")

SUFFIX = "_he_imagealignment.csv"


def explorer_alignment(reg: Any, region: int = 0, pixel_size: float | None = None) -> np.ndarray:
    """3x3 H&E px -> morphology px of one region of a :class:`~morphomol.registration.Registration`."""
    ps = pixel_size if pixel_size is not None else reg.xenium_pixel_size
    if not ps or not np.isfinite(ps) or ps <= 0:
        raise InputError(f"sample {reg.sample}: no morphology pixel size", field="xenium_pixel_size",
                         expected="registration.json written by the register rule (or pixel_size)")
    return np.diag([1.0 / float(ps), 1.0 / float(ps), 1.0]) @ np.asarray(reg.regions[region].matrix, float)


def export_explorer(fs: FinishedSample, out: str | Path, *, notes: list[str] | None = None) -> dict[str, Any]:
    """Write ``out`` (a ``*_he_imagealignment.csv``; a directory gets ``{sample}_he_imagealignment.csv``);
    returns a summary (file, region used, regions left out)."""
    from morphomol.export.spatialdata import dominant_region
    from morphomol.io.ingest import write_alignment
    from morphomol.registration import Registration

    if fs.registration is None:
        raise NotExportable(f"sample {fs.sample} (cohort kind {fs.kind}) has no registration to a Xenium bundle",
                            field="registration",
                            expected="a sample registered to a Xenium bundle (xenium cohorts, cells with an H&E)")
    if not Path(fs.registration).is_file():
        raise InputError(f"sample {fs.sample} of cohort {fs.cohort} has not run: its registration is missing (make it "
                         f"with `snakemake {fs.registration}`)", file=fs.registration,
                         expected="registration.json written by the pipeline")
    reg = Registration.load(fs.registration)
    units = fs.read_units() if Path(fs.units).is_file() else None
    main = dominant_region(units, reg) if units is not None else 0
    m = explorer_alignment(reg, main)
    out = Path(out)
    if out.is_dir() or not out.name.endswith(".csv"):
        out = out / f"{fs.sample}{SUFFIX}"
    write_alignment(out, m)
    others = [r.name for i, r in enumerate(reg.regions) if i != main]
    if others and notes is not None:
        notes.append(f"Xenium Explorer takes one affine: region {reg.regions[main].name} written, "
                     f"{', '.join(others)} left out")
    if others:
        log.warning("%s: %d registration regions; Xenium Explorer takes one affine: region %s written, %s left out",
                    fs.sample, len(reg.regions), reg.regions[main].name, ", ".join(others))
    log.info("%s: Xenium Explorer alignment %s", fs.sample, out)
    return {"file": str(out), "region": reg.regions[main].name, "left_out": others,
            "pixel_size": reg.xenium_pixel_size}


__all__ = ["SUFFIX", "explorer_alignment", "export_explorer"]
