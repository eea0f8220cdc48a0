# Adapter of rule `fusion_sample_predictions` (workflow/rules/fusion.smk): one typed call.
from morphomol.export.predictions import write_sample_predictions
from morphomol.smk import run

run(lambda smk: write_sample_predictions(sample=smk.wildcards.sample, units=smk.input.units, splits=list(smk.input.splits),
                                         predictions=smk.params.predictions, out=str(smk.output[0])))
