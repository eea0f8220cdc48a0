"""H&E → Xenium registration: per-region affine from DAPI landmarks, QC, image-based refinement.

Pipeline of :func:`register_sample` (:mod:`.sample`):

1. Read the alignment input (keypoints CSV or 3×3 alignment matrix, detected by content) and
   optional region polygons (GeoJSON, Xenium µm) or region labels on the keypoints.
2. Per region: least-squares affine H&E level-0 px → Xenium µm, leave-one-out (LOO) residual per
   landmark, robust outlier flagging (iterative trimming or RANSAC), refit without outliers
   (:mod:`.fit`). Without any alignment input: coarse initialisation from tissue masks
   (moments + a few rotations/flips + phase correlation, :mod:`.refine`).
3. Image refinement (:mod:`.refine`): maximise normalised cross-correlation (NCC) between the
   DAPI image and the hematoxylin channel of the H&E (``skimage.color.rgb2hed``) at
   ``refine_mpp`` µm/px, read from pyramid levels only (never full resolution, :mod:`.images`),
   masked to the region, optimising the six affine parameters coarse → fine (Nelder–Mead).
   ``refine: auto`` keeps it only if NCC improves.
4. Transcript-covered area in H&E px (streamed transcripts mapped with their region's inverse).
5. ``registration.json`` (:class:`Registration`, :mod:`.transform`; contract in
   docs/ARCHITECTURE.md) and ``registration_qc.png`` (:mod:`.qc`).

Matrices are 3×3 and act on column vectors ``[x, y, 1]`` (helpers in :mod:`morphomol.geometry`).
``matrix`` maps H&E level-0 px → Xenium µm, ``inverse`` maps µm → H&E px. ``rms_um``/``max_um``
are LOO residuals of the inlier landmarks under the landmark fit (``null`` where not defined: no
landmarks, or exactly 3).
"""

from __future__ import annotations

from morphomol.geometry import apply_affine
from morphomol.registration.fit import (
    COLLINEAR_RATIO,
    ROBUST_METHODS,
    DegenerateFit,
    RobustFit,
    collinearity,
    fit_affine,
    loo_residuals,
    robust_fit,
)
from morphomol.registration.images import MorphologySource, Raster, SlideSource, hematoxylin, load_dapi, load_he
from morphomol.registration.qc import write_qc_png
from morphomol.registration.refine import coarse_init, refine_affine
from morphomol.registration.sample import ASSIGNMENTS, BOUNDS_TOL, REFINE_MODES, register_sample, transcript_bbox
from morphomol.registration.transform import Registration, RegionTransform

__all__ = [
    "ASSIGNMENTS",
    "BOUNDS_TOL",
    "COLLINEAR_RATIO",
    "REFINE_MODES",
    "ROBUST_METHODS",
    "DegenerateFit",
    "MorphologySource",
    "Raster",
    "RegionTransform",
    "Registration",
    "RobustFit",
    "SlideSource",
    "apply_affine",
    "coarse_init",
    "collinearity",
    "fit_affine",
    "hematoxylin",
    "load_dapi",
    "load_he",
    "loo_residuals",
    "refine_affine",
    "register_sample",
    "robust_fit",
    "transcript_bbox",
    "write_qc_png",
]
