# Adapter of rule `slides_fold` (workflow/rules/slides.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.slides.config import SlidesConfig
from morphomol.studies.slides.run import run_fold

run(lambda smk: run_fold(
    setting=smk.wildcards.setting,
    fold=int(smk.wildcards.fold),
    folds=smk.input.folds,
    embeddings=dict(zip(smk.params.samples, smk.params.embeddings, strict=True)),
    expression=smk.input.expression,
    scores=smk.input.scores,
    sets=smk.input.sets,
    cfg=typed(SlidesConfig, smk.params.slides),
    seed=smk.params.seed,
    out_metrics=smk.output.metrics,
    out_predictions=smk.output.predictions,
    out_checkpoint=smk.output.checkpoint,
    out_checkpoint_meta=smk.output.checkpoint_meta,
    rna_weights=smk.input.get("rna_weights"),
    rna_overrides=smk.params.rna_overrides,
    threads=smk.threads,
))
