"""Registration inputs of a simulated sample: ``keypoints.csv``, ``he_imagealignment.csv``,
``regions.geojson``.

Landmarks are nuclei picked by farthest-point sampling per region; both clicks (DAPI in
morphology px, H&E in level-0 px) carry independent noise so that their mismatch has sd
``click_noise_um`` µm per axis. The alignment matrix is region r0's affine (H&E px →
morphology px), as 10x writes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from morphomol.geometry import apply_affine, scale
from morphomol.synthetic.fields import Cells, Regions
from morphomol.synthetic.params import PIXEL_SIZE, SampleSpec


def write_landmarks(out: Path, spec: SampleSpec, regions: Regions, cells: Cells) -> int:
    """Write the three files into ``out``; returns the number of landmarks.

    Draws from the sample's ``landmarks`` stream.
    """
    r = spec.rng("landmarks")
    side = spec.click_noise_um / math.sqrt(2.0)
    rows = []
    for i in range(spec.n_regions):
        cand = np.nonzero(cells.region == i)[0]
        if len(cand) < 3:
            continue
        n_lm = int(r.integers(spec.landmarks[0], spec.landmarks[1] + 1))
        pts = np.stack([cells.cx[cand], cells.cy[cand]], axis=1)
        # farthest-point sampling among the region's nuclei, from a random start
        chosen = [int(r.integers(0, len(cand)))]
        d = np.hypot(*(pts - pts[chosen[0]]).T)
        for _ in range(min(n_lm, len(cand)) - 1):
            j = int(np.argmax(d * r.uniform(0.85, 1.0, len(d))))
            chosen.append(j)
            d = np.minimum(d, np.hypot(*(pts - pts[j]).T))
        for j in chosen:
            x, y = pts[j]
            # both clicks are noisy; their mismatch has sd ``sigma`` µm per axis
            fx = x / PIXEL_SIZE + r.normal(0, side / PIXEL_SIZE)
            fy = y / PIXEL_SIZE + r.normal(0, side / PIXEL_SIZE)
            ax, ay = apply_affine(regions.um_to_he[i], np.array(x), np.array(y))
            ax = float(ax) + r.normal(0, side / spec.he_mpp)
            ay = float(ay) + r.normal(0, side / spec.he_mpp)
            rows.append((fx, fy, ax, ay, f"r{i}"))
    with open(out / "keypoints.csv", "w") as fh:
        fh.write("fixedX,fixedY,alignmentX,alignmentY,region\n")
        for fx, fy, ax, ay, name in rows:
            fh.write(f"{fx:.4f},{fy:.4f},{ax:.4f},{ay:.4f},{name}\n")
    # 10x alignment matrix: H&E px -> morphology px (region r0's affine)
    m = scale(1.0 / PIXEL_SIZE) @ regions.he_to_um[0]
    with open(out / "he_imagealignment.csv", "w") as fh:
        for row in m:
            fh.write(",".join(f"{v:.10g}" for v in row) + "\n")
    features = [
        {
            "type": "Feature",
            "properties": {"name": f"r{i}"},
            "geometry": {"type": "Polygon", "coordinates": [poly]},
        }
        for i, poly in enumerate(regions.polygons)
    ]
    (out / "regions.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
    return len(rows)
