"""A finished sample: where its artifacts are, for the exports and ``morphomol predict``.

The results layout is the workflow's (``workflow/paths.py``, loaded by :func:`workflow_paths`, never
re-spelled here); the inputs come from the loaded configuration (:func:`morphomol.io.sheets.sample_sources`
for xenium cohorts, the spots layout for visium cohorts, the sheet for cells / slides cohorts).
:func:`finished_sample` fails with one InputError when the sample has not run (no unit table), naming the
file and the Snakemake target that makes it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError


class NotExportable(InputError):
    """This sample cannot be exported in the format asked for (no H&E image, no registration, no spatial
    coordinates, no features store): ``morphomol export`` skips it, names it with this reason and exports
    the other samples. Called directly, it is the one InputError of the sample."""


def has_coordinates(units: Any) -> bool:
    """Whether the unit table places its units in space (an AnnData-only sample of a cells cohort does not:
    ``uns['morphomol']['spatial']`` says ``none`` and ``obsm['spatial']`` is zeros)."""
    meta = dict(units.uns.get("morphomol", {}))
    if str(meta.get("spatial", "")).startswith("none"):
        return False
    if "spatial" not in units.obsm:
        return False
    xy = np.asarray(units.obsm["spatial"], float)
    return bool(len(xy)) and bool(np.isfinite(xy).all()) and bool(np.any(xy != 0))


def workflow_paths(root: str | Path = "results", workflow_dir: str | Path | None = None) -> Any:
    """``WorkflowPaths(root)`` of the workflow's ``workflow/paths.py`` (``workflow_dir``, the working
    directory, or the source tree this package is installed from)."""
    here = Path(__file__).resolve()
    candidates = [Path(workflow_dir)] if workflow_dir is not None else []
    candidates += [Path.cwd(), here.parents[3]]
    for base in candidates:
        f = base / "workflow" / "paths.py"
        if f.is_file():
            spec = importlib.util.spec_from_file_location("morphomol_workflow_paths", f)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.WorkflowPaths(str(root))
    raise InputError("workflow/paths.py not found", file=candidates[0] if candidates else None,
                     expected="run morphomol from the workflow directory (where the Snakefile is), or --workflow-dir")


@dataclass
class FinishedSample:
    """The artifacts and inputs of one sample whose unit table exists."""

    cohort: str
    sample: str
    kind: str                      # cohort kind: xenium | visium | cells | slides
    units: Path
    he_path: Path | None = None
    he_mpp: float | None = None
    registration: Path | None = None
    xenium_dir: Path | None = None
    predictions: Path | None = None
    features: dict[str, Path] = field(default_factory=dict)
    image_store: Path | None = None

    def read_units(self) -> Any:
        from morphomol.data.units import read_units

        return read_units(self.units)

    def transform(self, units: Any | None = None) -> Any:
        """The H&E level-0 px <-> µm :class:`~morphomol.registration.Registration` of the sample: its
        registration, else the image's pixels x µm/px (spots, slides)."""
        from morphomol.registration import Registration
        from morphomol.registration.warp import scale_registration

        if self.registration is not None and self.registration.is_file():
            return Registration.load(self.registration)
        meta = dict((units if units is not None else self.read_units()).uns.get("morphomol", {}))
        mpp = meta.get("mpp") or meta.get("he_mpp") or self.he_mpp
        if not mpp:
            if self.he_path is None:
                raise NotExportable(f"sample {self.sample} has no H&E image (cohort kind {self.kind}; an AnnData-only "
                                    "sample): nothing places its units in H&E pixels", file=self.units)
            raise NotExportable(f"sample {self.sample}: no registration and no µm/px of its H&E (he_mpp)",
                                file=self.units, field="uns/morphomol/mpp",
                                expected="a registration.json, or he_mpp in the sample sheet")
        return scale_registration(float(mpp), self.sample)


def _require(path: Path, what: str, cohort: str, sample: str) -> Path:
    if not Path(path).exists():
        raise InputError(f"sample {sample} of cohort {cohort} has not run: its {what} is missing (make it with "
                         f"`snakemake {path}`)", file=path, expected=f"the {what} written by the pipeline")
    return Path(path)


def finished_sample(pc: Any, cohort: str, sample: str, paths: Any, *, encoders: list[str] | None = None) -> FinishedSample:
    """The :class:`FinishedSample` of ``sample`` of ``cohort`` in a loaded :class:`PipelineConfig` ``pc``."""
    if cohort not in pc.cohorts:
        raise InputError(f"unknown cohort {cohort!r}", file=pc.config_file, field="cohorts",
                         expected="one of " + ", ".join(pc.cohorts))
    c = pc.cohorts[cohort]
    if sample not in c.sample_ids:
        raise InputError(f"cohort {cohort} has no sample {sample!r}", file=c.sheet_path, field="sample_id",
                         expected="one of " + ", ".join(c.sample_ids[:20]))
    units = _require(Path(paths.units(cohort, sample)), "unit table", cohort, sample)
    kind = c.kind.name
    wd = Path(pc.workdir)
    fs = FinishedSample(cohort=cohort, sample=sample, kind=kind, units=units)
    if kind == "xenium":
        from morphomol.io.sheets import sample_sources

        src = sample_sources(c, sample, paths)
        fs.he_path = wd / src.he_path if src.he_path else None
        fs.he_mpp = src.he_mpp
        fs.xenium_dir = wd / src.xenium_dir if src.xenium_dir else None
        fs.registration = Path(paths.registration(cohort, sample))
        fs.predictions = Path(paths.study_sample("fusion", cohort, sample))
    elif kind == "visium":
        from morphomol.studies.spots.layout import sample_input_files

        fs.he_path = wd / sample_input_files(c.sample(sample), simulated=c.simulate is not None)["he"]
        fs.he_mpp = c.field(sample, "he_mpp")
        fs.predictions = Path(paths.spots_outputs("samples", cohort)) / f"{sample}.h5ad"
    elif kind == "cells":
        he = c.field(sample, "he_path")
        fs.he_path = wd / he if he else None
        fs.he_mpp = c.field(sample, "he_mpp")
        fs.xenium_dir = wd / c.field(sample, "xenium_dir") if c.field(sample, "xenium_dir") else None
        fs.registration = Path(paths.registration(cohort, sample)) if he else None
    elif kind == "slides":
        fs.he_path = wd / c.field(sample, "slide_path")
        fs.he_mpp = c.field(sample, "he_mpp")
    fs.image_store = Path(paths.image_store(cohort, sample))
    for enc in encoders if encoders is not None else list(c.cfg.features.encoders):
        f = Path(paths.features(cohort, enc, sample))
        if f.exists():
            fs.features[enc] = f
    if fs.registration is not None and not fs.registration.is_file() and kind == "xenium":
        _require(fs.registration, "registration", cohort, sample)
    return fs


def unit_outlines_px(units: Any, reg: Any, *, n_circle: int = 32) -> tuple[str, list[np.ndarray]]:
    """(``"square" | "circle"``, one (k, 2) closed ring per unit in level-0 H&E px): tiles as their square,
    spots / cells as circles (spots: the drawn diameter of ``uns['spatial']`` or 55 µm; cells: 10 µm)."""
    obs = units.obs
    if {"x_px", "y_px", "size_px"} <= set(obs.columns):
        x, y, s = (obs[c].to_numpy(float) for c in ("x_px", "y_px", "size_px"))
        rings = [np.array([[a, b], [a + w, b], [a + w, b + w], [a, b + w], [a, b]]) for a, b, w in zip(x, y, s, strict=True)]
        return "square", rings
    cx, cy = centres_px(units, reg)
    he_mpp = float(np.sqrt(abs(np.linalg.det(np.asarray(reg.regions[0].matrix, float)[:2, :2]))))
    r_px = unit_diameter_um(units) / 2.0 / max(he_mpp, 1e-9)
    t = np.linspace(0, 2 * np.pi, n_circle + 1)
    ring = np.c_[np.cos(t), np.sin(t)] * r_px
    return "circle", [ring + [a, b] for a, b in zip(cx, cy, strict=True)]


def centres_px(units: Any, reg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Unit centres in level-0 H&E px: the unit table's columns, else the µm centres through the registration."""
    obs = units.obs
    if {"x_px", "y_px", "size_px"} <= set(obs.columns):
        s = obs["size_px"].to_numpy(float) / 2
        return obs["x_px"].to_numpy(float) + s, obs["y_px"].to_numpy(float) + s
    if {"x_px", "y_px"} <= set(obs.columns):
        return obs["x_px"].to_numpy(float), obs["y_px"].to_numpy(float)
    if {"he_x_px", "he_y_px"} <= set(obs.columns):
        return obs["he_x_px"].to_numpy(float), obs["he_y_px"].to_numpy(float)
    xy = np.asarray(units.obsm["spatial"], float)
    r = reg.assign_regions(xy[:, 0], xy[:, 1])
    return reg.um_to_he(xy[:, 0], xy[:, 1], r)


def unit_diameter_um(units: Any) -> float:
    """The drawn size of a spot / cell: ``uns['spatial']``'s spot diameter, else 55 µm (spots) / 10 µm."""
    sp = units.uns.get("spatial") or {}
    for lib in sp.values():
        d = (lib.get("scalefactors") or {}).get("spot_diameter_fullres")
        if d:
            return float(d)
    return 55.0 if str(units.uns.get("morphomol", {}).get("unit")) == "spot" else 10.0


__all__ = ["FinishedSample", "NotExportable", "centres_px", "finished_sample", "has_coordinates", "unit_diameter_um",
           "unit_outlines_px", "workflow_paths"]
