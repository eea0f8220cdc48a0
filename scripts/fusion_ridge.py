# Adapter of rule `fusion_ridge` (workflow/rules/fusion.smk): one typed call.
from morphomol.baselines.ridge import run_ridge_fold
from morphomol.config import RidgeConfig, typed
from morphomol.smk import run

run(lambda smk: run_ridge_fold(
    smk.input.folds,
    smk.input.panel,
    units=dict(zip(smk.params.samples, smk.input.units, strict=True)),
    features=dict(zip(smk.params.samples, smk.input.features, strict=True)),
    out_metrics=smk.output.metrics,
    out_predictions=smk.output.predictions,
    encoder=smk.wildcards.encoder,
    fold=int(smk.wildcards.fold),
    cfg=typed(RidgeConfig, smk.params.ridge),
    seed=smk.params.seed,
))
