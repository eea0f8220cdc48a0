# Adapter of rule `fusion_panel` (workflow/rules/fusion.smk): one typed call.
from morphomol.config import PanelsConfig, typed
from morphomol.panels import panel_fold
from morphomol.smk import run

run(lambda smk: panel_fold(
    folds=smk.input.folds,
    fold=int(smk.wildcards.fold),
    units=dict(zip(smk.params.samples, smk.input.units, strict=True)),
    panel=smk.params.panel,
    out=smk.output[0],
    cfg=typed(PanelsConfig, smk.params.panels),
))
