# Adapter of the generated `slides_tile_<cohort>_<k>` rules (workflow/rules/slides.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.slides.config import SlideTilingConfig
from morphomol.studies.slides.tiles import tile_slides

run(lambda smk: tile_slides(
    slides=smk.params.slides,
    samples=smk.params.samples,
    patients=smk.params.patients,
    he_mpp=smk.params.he_mpp,
    out_units=list(smk.output.units),
    out_stores=list(smk.output.stores),
    out_qc=list(smk.output.qc),
    cfg=typed(SlideTilingConfig, smk.params.tiling),
    seed=smk.params.seed,
))
