# Adapter of rule `slides_embed` (workflow/rules/slides.smk; one job per group of slides): one typed call.
from morphomol.smk import run
from morphomol.studies.slides.bank import embed_slides

run(lambda smk: embed_slides(
    features=list(smk.input.features),
    samples=smk.params.samples,
    out_dir=smk.output[0],
    max_tiles=smk.params.max_tiles,
    seed=smk.params.seed,
))
