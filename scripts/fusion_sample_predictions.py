# Adapter of the fusion_sample_predictions_<cohort>_<k> rules (workflow/rules/fusion.smk): one typed call per
# sample of the job's group, one sample in memory at a time.
from morphomol.export.predictions import write_samples_predictions
from morphomol.smk import run

run(lambda smk: write_samples_predictions(samples=list(smk.params.samples), units=list(smk.input.units),
                                          folds=smk.input.folds, predictions=smk.params.predictions,
                                          outs=[str(o) for o in smk.output]))
