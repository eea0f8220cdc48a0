# Adapter of rule `cells_split` (workflow/rules/cells.smk): one typed call.
from morphomol.config import SplitsConfig, typed
from morphomol.smk import run
from morphomol.studies.cells.folds import write_folds

run(lambda smk: write_folds(
    units=list(smk.input.units),
    out=smk.output.folds,
    splits=typed(SplitsConfig, smk.params.splits),
    seed=smk.params.seed,
    cohort=smk.wildcards.cohort,
))
