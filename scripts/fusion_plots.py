# Adapter of rule `fusion_plots` (workflow/rules/fusion.smk): one typed call.
from morphomol.config import TablesConfig, typed
from morphomol.smk import run
from morphomol.studies.fusion.plots import make_plots

run(lambda smk: make_plots(
    smk.output.plots,
    table_a1=smk.input.a1,
    table_a2=smk.input.a2,
    per_gene=smk.input.per_gene,
    predictions=smk.params.predictions,
    tiles=dict(zip(smk.params.samples, smk.input.tiles, strict=True)),
    token_stores=dict(zip(smk.params.samples, smk.input.tokens, strict=True)),
    panel=smk.input.panel,
    slides=smk.params.slides,
    cfg=typed(TablesConfig, smk.params.tables),
))
