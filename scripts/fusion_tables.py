# Adapter of rules `fusion_tables` and `fusion_cross_cohort` (workflow/rules/fusion.smk): one typed call.
from pathlib import Path

from morphomol.config import TablesConfig, typed
from morphomol.smk import run
from morphomol.studies.fusion.settings import ModelSetting
from morphomol.studies.fusion.tables import make_cross_cohort, make_tables


def main(smk):
    if smk.rule == "fusion_cross_cohort":
        make_cross_cohort(dict(zip(smk.params.cohorts, smk.input.tables, strict=True)), smk.output.csv, smk.output.md)
        return
    make_tables(
        list(smk.input.metrics),
        Path(smk.output.a1_csv).parent,
        settings={n: ModelSetting.from_dict(n, d, source=smk.params.settings_file) for n, d in smk.params.settings.items()},
        weights=smk.params.weights,
        cfg=typed(TablesConfig, smk.params.tables),
        n_folds=smk.params.n_folds,
        cohort=smk.wildcards.cohort,
        config={**smk.params.config, "samples": smk.params.samples},
        metadata_json=smk.output.metadata_json,
        metadata_md=smk.output.metadata_md,
    )


run(main)
