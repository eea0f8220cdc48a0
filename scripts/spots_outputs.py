# Adapter of rule `spots_outputs` (workflow/rules/spots.smk): one typed call.
from morphomol.smk import run
from morphomol.studies.spots.outputs import write_spot_outputs

run(lambda smk: write_spot_outputs(
    units=dict(zip(smk.params.samples, smk.input.units, strict=True)),
    folds=smk.input.folds,
    targets=list(smk.input.targets),
    predictions=dict(zip(smk.params.names, smk.input.predictions, strict=True)),
    reference=smk.params.reference,
    out_samples=smk.output.samples,
    out_maps=smk.output.maps,
    map_samples=smk.params.map_samples,
))
