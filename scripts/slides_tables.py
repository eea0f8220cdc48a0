# Adapter of rule `slides_tables` (workflow/rules/slides.smk): one typed call.
from pathlib import Path

from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.slides.config import SlidesConfig
from morphomol.studies.slides.tables import write_tables

run(lambda smk: write_tables(
    runs=smk.params.runs,
    predictions=smk.params.predictions,
    transfer=list(smk.input.transfer),
    folds=smk.input.folds,
    expression=smk.input.expression,
    sets=smk.input.sets,
    preprocessing=smk.input.preprocessing,
    genes=smk.input.genes,
    out_dir=Path(smk.output.retrieval).parent,
    cfg=typed(SlidesConfig, smk.params.slides),
))
