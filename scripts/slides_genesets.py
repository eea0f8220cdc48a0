# Adapter of rule `slides_genesets` (workflow/rules/slides.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.slides.config import GeneSetsConfig
from morphomol.studies.slides.genesets import score_gene_sets

run(lambda smk: score_gene_sets(
    expression=smk.input.expression,
    gmt=list(smk.input.gmt),
    out_scores=smk.output.scores,
    out_sets=smk.output.sets,
    out_coverage=smk.output.coverage,
    cfg=typed(GeneSetsConfig, smk.params.gene_sets),
    seed=smk.params.seed,
    config_file=smk.params.config_file,
))
