# Adapter of rule `spots_text` (workflow/rules/spots.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.spots.config import SpotsConfig
from morphomol.studies.spots.text import embed_cohort_captions

run(lambda smk: embed_cohort_captions(
    units=dict(zip(smk.params.samples, smk.input.units, strict=True)),
    sources={s: (kind, path) for s, (kind, path) in smk.params.sources.items()},
    model_dir=smk.input.model,
    batch_size=typed(SpotsConfig, smk.params.spots).captions.embed_batch_size,
    out_table=smk.output.table,
    out_store=smk.output.store,
))
