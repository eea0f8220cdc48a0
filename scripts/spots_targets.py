# Adapter of rule `spots_targets` (workflow/rules/spots.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.spots.config import SpotsConfig
from morphomol.studies.spots.targets import write_targets

run(lambda smk: write_targets(
    folds=smk.input.folds,
    units=dict(zip(smk.params.samples, smk.input.units, strict=True)),
    fold=int(smk.wildcards.fold),
    cfg=typed(SpotsConfig, smk.params.spots).targets,
    genes_file=smk.input.genes_file or None,
    out=smk.output[0],
))
