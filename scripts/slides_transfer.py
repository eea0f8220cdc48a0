# Adapter of rule `slides_transfer` (workflow/rules/slides.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.slides.config import SlidesConfig
from morphomol.studies.slides.transfer import run_transfer

run(lambda smk: run_transfer(
    target=smk.wildcards.target,
    embeddings=dict(zip(smk.params.samples, smk.params.embeddings, strict=True)),
    expression=smk.input.expression,
    scores=smk.input.scores,
    sets=smk.input.sets,
    cfg=typed(SlidesConfig, smk.params.slides),
    val_fraction=smk.params.val_fraction,
    seed=smk.params.seed,
    out=smk.output[0],
    rna_weights=smk.input.get("rna_weights"),
    rna_overrides=smk.params.rna_overrides,
    threads=smk.threads,
))
