"""Synthetic data (out of the core library): the paired-cohort simulator — a Xenium bundle and an
H&E slide per sample, in real formats — and small in-memory fixtures (:mod:`.fixtures`, needs torch).

Every sample directory holds::

    xenium/transcripts.parquet      10x columns (controls and low-qv transcripts included)
    xenium/cells.parquet            10x cell table
    xenium/experiment.xenium        JSON (pixel_size 0.2125, run/region/panel keys)
    xenium/gene_panel.json          10x layout: payload.targets[].type.data.name
    xenium/morphology_focus.ome.tif DAPI, uint16, tiled + deflate, SubIFD pyramid
    he.tif                          H&E pyramid (tiled JPEG IFDs) that OpenSlide opens
    keypoints.csv                   Xenium Explorer keypoints (+ region column)
    he_imagealignment.csv           headerless 3x3, H&E px -> morphology px (region r0)
    regions.geojson                 region polygons in Xenium µm
    truth.json                      ground truth (affines, proportions, add-on kinds, ...)
    truth_cells.parquet             per-cell latents (cell type, morphology state, program)

Geometry. Xenium µm span ``[0, W] x [0, H]`` (``tissue_um``); the tissue is an irregular
blob in it. The tissue is split into ``n_regions`` vertical bands (slanted split lines);
each band has its own affine ``H&E px -> µm`` (a global rotation/scale/translation composed
with a small per-region rotation, scale, shear and translation about the band centre), as
when a section tears or folds. The H&E slide is rendered in its own pixel frame: nuclei
are drawn forward through the inverse of their band's affine; the background (eosin,
white glass) is looked up backwards through every band's affine.

Biology. Five cell types with distinct nucleus morphology and density, arranged by smooth
random fields of type proportions (neighbourhoods of ~``neighbourhood_um``). Two more
smooth latents: a *morphology state* ``z`` (nucleus size and hyperchromasia, visible in
H&E/DAPI, only weakly reflected in the core genes) and an *expression program* ``p``
(an interferon-like program that drives a few core genes and is invisible in H&E).
Core genes: negative-binomial counts from per-type mean profiles times the program.
Add-on genes, split evenly by index into three kinds (``truth["addon_kinds"]``):

* ``a``: log-mean linear in ``z``  (predictable from morphology),
* ``b``: mean proportional to a weighted sum of the cell's own core program counts
  (predictable from core genes),
* ``c``: log-mean ``beta * (0.4 z + 0.4 p + 0.8 z p)`` (an AND-like interaction: each
  modality alone explains little, both together explain it).

Patient effects (type composition shift, per-gene multiplicative factors, program/state
offsets, stain colour) are a function of ``(seed, patient_id)`` only, cohort constants
(type profiles, gene roles) of ``(seed, gene names)``, and everything else of
``(seed, sample_id)``: a sample simulated alone equals the same sample inside a cohort.

Modules: :mod:`.params` (spec, cell types, seeding, gene roles, patient effects), :mod:`.fields`
(tissue, regions, cells), :mod:`.expression` (counts, transcripts), :mod:`.render` (ellipse
splatting, pyramids), :mod:`.xenium` (bundle writer), :mod:`.he` (H&E), :mod:`.landmarks`
(registration inputs), :mod:`.truth`, :mod:`.cohort` (entry points). Affine helpers come from
:mod:`morphomol.geometry`.
"""

from __future__ import annotations

from morphomol.synthetic.cohort import simulate_cohort, simulate_from_config, simulate_sample
from morphomol.synthetic.params import ADDON_KINDS, CELL_TYPES, PIXEL_SIZE, SAMPLE_OUTPUTS

__all__ = [
    "ADDON_KINDS",
    "CELL_TYPES",
    "PIXEL_SIZE",
    "SAMPLE_OUTPUTS",
    "simulate_cohort",
    "simulate_from_config",
    "simulate_sample",
]
