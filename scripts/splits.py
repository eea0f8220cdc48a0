# Adapter of rule `splits` (workflow/rules/splits.smk): one typed call.
from morphomol.config import SplitsConfig, typed
from morphomol.smk import run
from morphomol.splits import write_folds

run(lambda smk: write_folds(
    units=list(smk.input.units),
    samples=smk.params.samples,
    patients=smk.params.patients,
    out=smk.output[0],
    cfg=typed(SplitsConfig, smk.params.splits),
    seed=smk.params.seed,
    cohort=smk.wildcards.cohort,
))
