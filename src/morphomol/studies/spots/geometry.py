"""Spot geometry: the platforms' spot size and pitch, the pitch measured on a sample's spot positions,
and the µm-per-pixel of the H&E with where it came from and how it agrees with the spots.

µm/px sources, first found wins: the sheet's ``he_mpp``; HEST metadata ``pixel_size_um_estimated``; the
image file's metadata; Space Ranger's ``spot_diameter_fullres`` (a theoretical ``fullres_spot_um`` =
65 µm spot, see ``spots.geometry``). Nothing found is an InputError that quotes the pitch-derived value
to put in the sheet. The chosen value is then checked against the spot pitch measured on the array
neighbours (Visium: 100 µm centre to centre; legacy ST: 200 µm) and against ``spot_diameter_fullres``;
a disagreement above ``spots.geometry.tolerance`` is a warning in the sample's QC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("spots.geometry")


@dataclass(frozen=True)
class Platform:
    name: str
    spot_um: float                        # capture spot diameter
    pitch_um: float                       # centre-to-centre distance of array neighbours
    neighbours: tuple[tuple[int, int], ...]  # (d_row, d_col) of the array neighbours at pitch_um


PLATFORMS: dict[str, Platform] = {
    "visium": Platform("visium", 55.0, 100.0, ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1))),
    "st": Platform("st", 100.0, 200.0, ((0, 1), (0, -1), (1, 0), (-1, 0))),
}


def measured_pitch_px(x: np.ndarray, y: np.ndarray, row: np.ndarray | None, col: np.ndarray | None,
                      platform: Platform) -> tuple[float | None, int, str]:
    """Median distance (px) between array neighbours: ``(pitch, n_pairs, how)``. Without array
    coordinates: the median nearest-neighbour distance of the spots. None when under 2 spots."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(x) < 2:
        return None, 0, "fewer than 2 spots"
    if row is not None and col is not None and len(row) == len(x):
        pos = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(row, col))}
        d = []
        for (r, c), i in pos.items():
            for dr, dc in platform.neighbours:
                j = pos.get((r + dr, c + dc))
                if j is not None and j > i:
                    d.append(math.hypot(x[i] - x[j], y[i] - y[j]))
        if d:
            return float(np.median(d)), len(d), "array neighbours"
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    return float(np.median(dist[:, 1])), len(x), "nearest neighbours"


@dataclass
class MppResolution:
    """µm/px of the image the patches are cut from, where it came from, and the geometry checks."""

    mpp: float
    source: str
    candidates: dict[str, float | None]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"mpp": self.mpp, "source": self.source, "candidates": self.candidates, "checks": self.checks,
                "warnings": list(self.warnings)}


def resolve_mpp(*, sheet: float | None, hest: float | None, image: float | None, image_source: str,
                spot_diameter_px: float | None, fullres_spot_um: float, pitch_px: float | None, pitch_how: str,
                platform: Platform, tolerance: float, file: Any = None) -> MppResolution:
    """Pick the µm/px (see the module docstring) and check it against the spot geometry. All pixel
    values are in the pixels of the image the patches are cut from."""
    from_diameter = fullres_spot_um / spot_diameter_px if spot_diameter_px else None
    from_pitch = platform.pitch_um / pitch_px if pitch_px else None
    candidates = {"sheet he_mpp": sheet, "HEST metadata pixel_size_um_estimated": hest,
                  f"image metadata ({image_source or 'none'})": image,
                  f"scalefactors spot_diameter_fullres ({fullres_spot_um:g} µm)": from_diameter}
    chosen = next(((k, v) for k, v in candidates.items() if v is not None and math.isfinite(v) and v > 0), None)
    if chosen is None:
        hint = (f"; the spot pitch ({platform.pitch_um:g} µm over {pitch_px:.1f} px, {pitch_how}) suggests "
                f"{from_pitch:.4g}") if from_pitch else ""
        raise InputError("no µm per pixel anywhere: no he_mpp in the sheet, none in the image metadata and no "
                         "scale factors" + hint, file=file, field="he_mpp",
                         expected="he_mpp in the sample sheet, a resolution in the image, or scalefactors_json.json")
    source, mpp = chosen
    res = MppResolution(mpp=float(mpp), source=source, candidates={**candidates, "spot pitch": from_pitch})
    for name, value, what in (("pitch", from_pitch, f"{platform.pitch_um:g} µm spot pitch ({pitch_how})"),
                              ("spot_diameter_fullres", from_diameter, "spot_diameter_fullres")):
        if value is None or name == "spot_diameter_fullres" and source.startswith("scalefactors"):
            continue
        rel = abs(mpp - value) / value
        ok = rel <= tolerance
        res.checks[name] = {"implied_mpp": value, "relative_difference": rel, "ok": ok}
        if not ok:
            msg = (f"µm/px {mpp:.4g} ({source}) disagrees with the {what} by {100 * rel:.0f}% "
                   f"(implies {value:.4g}; tolerance {100 * tolerance:.0f}%)")
            res.warnings.append(msg)
            log.warning("%s: %s", file, msg)
    return res
