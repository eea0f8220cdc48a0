"""Spot geometry: the platforms' spot size and pitch, the pitch measured on a sample's spot positions,
and the µm-per-pixel of the H&E with where it came from and how its sources agree.

µm/px sources, in order (the first found is used): the sheet's ``he_mpp``; HEST metadata
``pixel_size_um_estimated``; the image file's metadata; Space Ranger's ``spot_diameter_fullres`` (a
theoretical ``fullres_spot_um`` = 65 µm spot, see ``spots.geometry``); the spot pitch measured on the
array neighbours (Visium: 100 µm centre to centre; legacy ST: 200 µm), used when nothing else states
a value (QC ``mpp.source`` = ``spot pitch``, with a warning). None at all (fewer than 2 spots) is an
InputError.

Every pair of available sources is compared: a relative difference above ``spots.geometry.tolerance``
(default 10 %) is an InputError naming both sources and their values (e.g. ``spot_diameter_fullres``
13.0 instead of 130 against the pitch), above half of it a warning in the sample's QC. The sheet's
``he_mpp`` is the user's statement: it overrides the image metadata and the HEST estimate (which
overrides the image's embedded value): a disagreement of an overridden source is a warning; the
sheet must agree with the spot geometry (``spot_diameter_fullres``, pitch).
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


SHEET, HEST, IMAGE, DIAMETER, PITCH = "sheet", "hest", "image", "diameter", "pitch"
#: a source -> the sources it overrides (when present, their disagreements are warnings only): the user's
#: he_mpp overrides the metadata; HEST's estimate overrides the image's embedded value (not always right)
OVERRIDES = {SHEET: (HEST, IMAGE), HEST: (IMAGE,)}
#: the sheet / config field to fix when a source is wrong
FIELDS = {SHEET: "he_mpp", HEST: "pixel_size_um_estimated", IMAGE: "he_mpp", DIAMETER: "spot_diameter_fullres",
          PITCH: "he_mpp"}


@dataclass
class MppResolution:
    """µm/px of the image the patches are cut from, where it came from, and the geometry checks."""

    mpp: float
    source: str
    candidates: dict[str, float | None]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source_key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"mpp": self.mpp, "source": self.source, "source_key": self.source_key, "candidates": self.candidates,
                "checks": self.checks, "warnings": list(self.warnings)}


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def resolve_mpp(*, sheet: float | None, hest: float | None, image: float | None, image_source: str,
                spot_diameter_px: float | None, fullres_spot_um: float, pitch_px: float | None, pitch_how: str,
                platform: Platform, tolerance: float, file: Any = None,
                files: dict[str, Any] | None = None) -> MppResolution:
    """Pick the µm/px and check its sources against each other (see the module docstring). All pixel
    values are in the pixels of the image the patches are cut from. ``files``: the file of each source
    (``sheet``, ``hest``, ``image``, ``diameter``, ``pitch``) named by an error; default ``file``."""
    files = files or {}
    from_diameter = fullres_spot_um / spot_diameter_px if spot_diameter_px else None
    from_pitch = platform.pitch_um / pitch_px if pitch_px else None
    names = {SHEET: "sheet he_mpp", HEST: "HEST metadata pixel_size_um_estimated",
             IMAGE: f"image metadata ({image_source or 'none'})",
             DIAMETER: f"scalefactors spot_diameter_fullres ({fullres_spot_um:g} µm)",
             PITCH: f"spot pitch ({platform.pitch_um:g} µm over "
                    + (f"{pitch_px:.1f} px, {pitch_how})" if pitch_px else "n/a)")}
    values = {SHEET: sheet, HEST: hest, IMAGE: image, DIAMETER: from_diameter, PITCH: from_pitch}
    have = {k: float(v) for k, v in values.items() if _ok(v)}
    candidates = {names[k]: values[k] for k in (SHEET, HEST, IMAGE, DIAMETER)}
    candidates["spot pitch"] = from_pitch
    if not have:
        raise InputError("no µm per pixel anywhere: no he_mpp in the sheet, none in the image metadata, no scale "
                         "factors and no spot pitch (fewer than 2 spots)", file=file, field="he_mpp",
                         expected="he_mpp in the sample sheet, a resolution in the image, or scalefactors_json.json")
    key = next(iter(have))
    res = MppResolution(mpp=have[key], source=names[key], candidates=candidates, source_key=key)
    if key == PITCH:
        msg = (f"µm/px {res.mpp:.4g} derived from the {platform.pitch_um:g} µm spot pitch ({pitch_px:.1f} px, "
               f"{pitch_how}): no he_mpp in the sheet, no image resolution, no scale factors; state he_mpp in the "
               "sample sheet to silence this")
        res.warnings.append(msg)
        log.warning("%s: %s", file, msg)
    keys = list(have)
    overridden = {o: k for k in keys for o in OVERRIDES.get(k, ()) if o in have}
    errors = []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            va, vb = have[a], have[b]
            rel = max(va, vb) / min(va, vb) - 1
            ok = rel <= tolerance
            res.checks[f"{a}~{b}"] = {"sources": [names[a], names[b]], "values": [va, vb], "relative_difference": rel,
                                      "ok": ok}
            if b == PITCH and a == key:  # the chosen value against the pitch (QC key kept from earlier versions)
                res.checks["pitch"] = {"implied_mpp": vb, "relative_difference": abs(va - vb) / vb, "ok": ok}
            if ok and rel <= tolerance / 2:
                continue
            text = (f"{names[a]} {va:.4g} µm/px and {names[b]} {vb:.4g} µm/px disagree by {100 * rel:.0f}% "
                    f"(tolerance spots.geometry.tolerance {100 * tolerance:.0f}%)")
            soft = [k for k in (a, b) if k in overridden]
            if not ok and not soft:
                errors.append((a, b, text))
                continue
            if not ok:
                text += f"; {names[overridden[soft[0]]]} overrides the {names[soft[0]]}"
            res.warnings.append(text)
            log.warning("%s: %s", file, text)
    if errors:
        fails = {k: sum(k in (a, b) for a, b, _ in errors) for k in keys}
        # the source in most disagreements; on a tie a stated value rather than the measured pitch
        wrong = max(keys, key=lambda k: (fails[k], k != PITCH))
        text = "; ".join(e[2] for e in errors)
        more = ""
        hint = {SHEET: "fix he_mpp in the sample sheet", HEST: "state he_mpp in the sample sheet",
                IMAGE: "state the right he_mpp in the sample sheet (it overrides the image metadata)",
                DIAMETER: "fix spot_diameter_fullres in scalefactors_json.json (or the image_scale / he_path pairing)",
                PITCH: "check the spot positions against the image"}[wrong]
        raise InputError(f"the µm/px sources contradict each other: {text}{more}", file=files.get(wrong, file),
                         field=FIELDS[wrong], expected=f"independent µm/px sources agreeing within "
                                                      f"{100 * tolerance:.0f}%: {hint}")
    return res
