# Adapter of rule `slides_rna` (workflow/rules/slides.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.slides.config import RnaConfig
from morphomol.studies.slides.rna import prepare_rna

run(lambda smk: prepare_rna(
    sheet=smk.params.sheet,
    out_expression=smk.output.expression,
    out_preprocessing=smk.output.preprocessing,
    out_genes=smk.output.genes,
    cfg=typed(RnaConfig, smk.params.rna),
    matrix=smk.input.get("matrix"),
    units=list(smk.input.get("units", [])) or None,
    unit_samples=smk.params.unit_samples,
))
