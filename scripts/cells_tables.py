# Adapter of rule `cells_tables` (workflow/rules/cells.smk): one typed call.
from morphomol.smk import run
from morphomol.studies.cells.tables import make_tables

run(lambda smk: make_tables(
    metrics=dict(smk.params.metrics),
    predictions=dict(smk.params.predictions),
    train=list(smk.input.train),
    folds=list(smk.input.folds),
    out={k: smk.output[k] for k in smk.output.keys()},
    cohort=smk.wildcards.cohort,
    config={**smk.params.config, "samples": smk.params.samples},
))
